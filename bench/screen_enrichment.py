"""Virtual screening on the simulated world: does a trained model rank new molecules by mechanism?

Each model is trained on every condition of the demo screen (256 most variable genes), then
screens molecules it never saw: RDKit's bundled NCI compounds that pass the simulator's drug
filter and are not demo drugs. Each library molecule's predicted effect size (RMS change from
control at the top training dose, averaged over the cell lines) is scored against the hidden
mechanism the simulator's rules give it (`scdca.data.simulate.assign_mechanism`; never shown to a
model): one-vs-rest AUROC per mechanism. A model that separates drugs puts the strong
mechanisms (hdac_like: four programs at double strength, 95% of its drugs active) on top and
the weak ones ('none', 20% active) at the bottom; a drug-agnostic model scores 0.5 everywhere.

Reference without any model: `nearest drug` gives each molecule the observed effect size of
its most similar demo drug (Tanimoto on Morgan r=2 bits), the screen a chemist would run first.

    python bench/screen_enrichment.py [--data runs/demo/data.h5ad] [--backbone runs/demo/backbone_atlas]
        [--models scdca_routed,c3tl] [--n 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from scdca.chem.molecules import NearestTraining, canonical_smiles
from scdca.data.screen import load
from scdca.data.simulate import _druglike_pool, assign_mechanism
from scdca.models import make_model
from scdca.predict import screen


def library(train_smiles: set[str], n: int, seed: int) -> pd.DataFrame:
    """n molecules of the simulator's drug pool that are not training drugs, with their mechanism."""
    pool = [(name, smi, mol) for name, smi, mol in _druglike_pool() if smi not in train_smiles]
    pick = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    rows = [pool[i] for i in np.sort(pick)]
    return pd.DataFrame(
        {
            "drug": [r[0] for r in rows],
            "smiles": [r[1] for r in rows],
            "mechanism": [assign_mechanism(r[2]) for r in rows],
        }
    )


def observed_effect(data, dose: float) -> pd.Series:
    """Drug -> observed effect size (RMS change from control over genes) at `dose`, mean over lines."""
    cond = data.conditions.reset_index(drop=True)
    at = (cond["dose"] == dose).to_numpy()
    rms = np.sqrt((data.delta()[at] ** 2).mean(1))
    return pd.Series(rms).groupby(cond.loc[at, "drug"].to_numpy()).mean()


def nearest_drug_effect(data, lib: pd.DataFrame, dose: float) -> np.ndarray:
    """Observed effect size of each library molecule's most similar training drug (Tanimoto)."""
    per_drug = observed_effect(data, dose)
    drugs = data.drug_smiles()
    _, nearest = NearestTraining({d: drugs[d] for d in per_drug.index}).query(list(lib["smiles"]))
    return per_drug.loc[nearest].to_numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data.h5ad")
    p.add_argument("--backbone", default="runs/demo/backbone_atlas")
    p.add_argument("--models", default="scdca_routed,c3tl")
    p.add_argument("--n", type=int, default=1000, help="library size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = load(args.data, n_top_genes=256)
    train_smiles = {canonical_smiles(s) for s in data.drug_smiles().values()}
    lib = library(train_smiles, args.n, args.seed)
    dose = float(data.conditions["dose"].max())
    lines = list(data.controls.index)
    scores = {"nearest drug": nearest_drug_effect(data, lib, dose)}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        options = {"backbone": args.backbone, "seed": args.seed} if name.startswith("scdca") else {"seed": args.seed}
        model = make_model(name, **options).fit(data)
        effect = np.zeros(len(lib))
        for line in lines:
            ranked = screen(model, list(lib["drug"]), list(lib["smiles"]), cell_line=line, dose=dose, progress=False)
            effect += ranked.set_index("drug").loc[lib["drug"], "effect_size"].to_numpy() / len(lines)
        scores[name] = effect
        print(
            f"{name}: trained and screened {len(lib)} molecules x {len(lines)} lines in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    counts = lib["mechanism"].value_counts()
    table = pd.DataFrame(
        {
            model: {m: roc_auc_score(lib["mechanism"] == m, s) for m in counts.index if counts[m] >= 5}
            for model, s in scores.items()
        }
    ).round(3)
    table.insert(0, "molecules", counts[table.index])
    # how strong each mechanism is in the demo: mean observed effect size of its demo drugs at that dose
    strength = mechanism_strength(data, dose)
    table.insert(1, "demo_effect", strength.reindex(table.index).round(3))
    expected = lib["mechanism"].map(strength).to_numpy()
    print(
        f"\n{len(lib)} library molecules (not demo drugs), effect size at dose {dose:g} averaged over "
        f"{len(lines)} lines; one-vs-rest AUROC of each hidden mechanism (0.5 = not separated); demo_effect: "
        f"the mechanism's mean observed effect size among the demo drugs"
    )
    print(table.to_string())
    print(
        "Spearman of the predicted effect with demo_effect: "
        + ", ".join(f"{model} {spearmanr(s, expected).statistic:.3f}" for model, s in scores.items())
    )


def mechanism_strength(data, dose: float) -> pd.Series:
    """Mechanism -> mean observed effect size (RMS change) of the demo drugs of that mechanism at `dose`."""
    from rdkit import Chem

    per_drug = observed_effect(data, dose)
    drugs = data.drug_smiles()
    return per_drug.groupby([assign_mechanism(Chem.MolFromSmiles(drugs[d])) for d in per_drug.index]).mean()


if __name__ == "__main__":
    main()
