"""Train-fit correlation: how well a model fits its own training conditions.

For the `unseen_drug` split of seed 0 of the demo data (256 most variable genes), fit each
model, predict its TRAINING conditions, and average over the conditions of active drugs
(the simulator's hidden `active` flag) the Pearson correlation of the predicted change
with the noise-free true change (`uns['scdca_truth']`). A model that cannot fit the drugs
it was trained on cannot rank new ones. Needs runs/demo/data.h5ad and, for the scDCA
family, a backbone (make demo-scdca makes both).

    python bench/train_fit.py [--models ridge,c3tl,scdca_lowrank,scdca_routed,scdca] [--backbone DIR]
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np

from scdca.data.screen import load
from scdca.data.splits import make_splits
from scdca.models import make_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data.h5ad")
    p.add_argument("--backbone", default="runs/demo/backbone_atlas")
    p.add_argument("--models", default="ridge,c3tl,scdca_lowrank,scdca_routed,scdca")
    args = p.parse_args()
    data = load(args.data, n_top_genes=256)
    ann = ad.read_h5ad(args.data, backed="r").uns["drug_annotations"]
    active = {d for d, a in zip(ann["drug"], ann["active"]) if a}
    split = make_splits(data, "unseen_drug", 0)[0]
    train = data.subset(split.train)
    rows = np.flatnonzero(train.conditions["drug"].isin(active).to_numpy())
    control = train.control_for(train.conditions["cell_line"])
    for name in args.models.split(","):
        options = {"backbone": args.backbone} if name.startswith("scdca") else {}
        if name == "scdca":
            options.update(max_steps=200, lr=1e-3)  # the demo budget
        pred = make_model(name, **options).fit(train).predict(data.subset(split.train, observed=False))
        corr = [np.corrcoef(pred[i] - control[i], train.truth[i] - control[i])[0, 1] for i in rows]
        print(f"{name:15s} train-fit correlation {np.nanmean(corr):.3f} over {len(rows)} active training conditions")


if __name__ == "__main__":
    main()
