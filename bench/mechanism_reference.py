"""How well can any model rank new drugs on a simulated screen? References that know more.

The simulator gives every drug a hidden mechanism (`uns['drug_annotations']`). On the
unseen-drug task this script scores two predictors that use that hidden label, which no
model sees:

- `mechanism known`: a new drug's change is the mean training change of the drugs of its
  true mechanism, in the same line and at the same dose (it still does not know which drugs
  are active).
- `mechanism learned, <encoder>`: a logistic regression learns the mechanism from the
  molecule embeddings of the training drugs (their true labels; its L2 strength chosen by
  3-fold cross-validation over those drugs, by log-loss), and a new drug's change is
  the probability-weighted mean of those mechanism means. It shows what a model would reach
  if it learned the mechanism from structure as well as supervised learning does on the
  same embeddings.

If a model's rank is level with the second reference, the encoder, not the model, limits it.
Rows of `results.csv` (the demo grid) are printed next to the references when given.

    python bench/mechanism_reference.py [--data runs/demo/data.h5ad] [--encoders chemnet,rdkit2d,morgan]
        [--seeds 5] [--results runs/scdca_demo/results.csv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from scdca.chem.encoders import get_encoder, standardisation, standardise
from scdca.data.screen import PerturbationData, load
from scdca.data.splits import Split, make_splits
from scdca.eval.grid import BenchmarkConfig, score_conditions

METRICS = ("rank", "pearson_delta_deg")


def mechanism_means(train: PerturbationData, mechanism: pd.Series) -> dict[tuple, np.ndarray]:
    """(mechanism, line, dose) -> mean change of the training conditions of that mechanism;
    (None, line, dose) -> mean change of all training conditions there (the fallback)."""
    cond = train.conditions.reset_index(drop=True)
    delta = train.delta()
    mech = cond["drug"].map(mechanism)
    means = {}
    for (line, dose), rows in cond.groupby(["cell_line", "dose"]).groups.items():
        rows = np.asarray(rows)
        means[(None, line, dose)] = delta[rows].mean(0)
        for m in mech.iloc[rows].unique():
            means[(m, line, dose)] = delta[rows[mech.iloc[rows].to_numpy() == m]].mean(0)
    return means


def predict(test: PerturbationData, probs: pd.DataFrame, means: dict) -> np.ndarray:
    """Control + sum over mechanisms of p(mechanism | drug) x that mechanism's mean change."""
    cond = test.conditions
    out = test.control_for(cond["cell_line"]).astype(np.float64)
    for i, (drug, line, dose) in enumerate(zip(cond["drug"], cond["cell_line"], cond["dose"])):
        p = probs.loc[drug]
        out[i] += sum(w * means.get((m, line, dose), means[(None, line, dose)]) for m, w in p.items() if w > 0)
    return out


def scores(test: PerturbationData, pred: np.ndarray, split: Split) -> dict[str, float]:
    """Mean of each metric over the test conditions, scored as the benchmark grid scores them."""
    rows = score_conditions(test, pred, test.mean, "reference", split, BenchmarkConfig.k, METRICS)
    return rows.groupby("metric")["value"].mean().to_dict()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data.h5ad")
    p.add_argument("--encoders", default="chemnet,rdkit2d,morgan")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n-top-genes", type=int, default=256)
    p.add_argument("--results", default="runs/scdca_demo/results.csv")
    args = p.parse_args()
    uns = ad.read_h5ad(args.data, backed="r").uns
    if "drug_annotations" not in uns:
        raise SystemExit(
            f"--data: {args.data!r} has no uns['drug_annotations'] (the hidden mechanisms); "
            f"this bench needs a screen made by `scdca simulate`"
        )
    ann = uns["drug_annotations"]
    mechanism = pd.Series(np.asarray(ann["mechanism"]), index=np.asarray(ann["drug"]).astype(str))
    data = load(args.data, n_top_genes=args.n_top_genes)
    smiles = data.drug_smiles()
    encoders = {name: get_encoder(name) for name in args.encoders.split(",")}
    rows = []
    for seed in range(args.seeds):
        split = make_splits(data, "unseen_drug", seed)[0]
        train, test = data.subset(split.train), data.subset(split.test)
        means = mechanism_means(train, mechanism)
        train_drugs = sorted(train.conditions["drug"].astype(str).unique())
        test_drugs = sorted(test.conditions["drug"].astype(str).unique())
        known = pd.get_dummies(mechanism[test_drugs]).astype(float)
        rows.append(
            {
                "reference": "mechanism known",
                "seed": seed,
                "accuracy": 1.0,
                **scores(test, predict(test, known, means), split),
            }
        )
        for name, enc in encoders.items():
            emb = enc.encode([smiles[d] for d in train_drugs], names=train_drugs)
            centre, spread = standardisation(emb)
            clf = LogisticRegressionCV(
                Cs=np.logspace(-3, 2, 11),
                cv=StratifiedKFold(3, shuffle=True, random_state=seed),
                scoring="neg_log_loss",
                max_iter=5000,
            )
            clf.fit(standardise(emb, centre, spread), mechanism[train_drugs].to_numpy())
            new = standardise(enc.encode([smiles[d] for d in test_drugs], names=test_drugs), centre, spread)
            probs = pd.DataFrame(clf.predict_proba(new), index=test_drugs, columns=clf.classes_)
            accuracy = float((probs.idxmax(axis=1).to_numpy() == mechanism[test_drugs].to_numpy()).mean())
            rows.append(
                {
                    "reference": f"mechanism learned, {name}",
                    "seed": seed,
                    "accuracy": accuracy,
                    **scores(test, predict(test, probs, means), split),
                }
            )
        print(f"seed {seed} done", flush=True)
    table = pd.DataFrame(rows).groupby("reference", sort=False)[["accuracy", *METRICS]].mean()
    config = Path(args.results).parent / "config.json"
    same_data = (
        not config.exists()
        or Path(json.loads(config.read_text()).get("data", args.data)).resolve() == Path(args.data).resolve()
    )
    if Path(args.results).exists() and not same_data:
        print(f"not showing {args.results}: that grid ran on other data than --data {args.data}")
    elif Path(args.results).exists():
        res = pd.read_csv(
            args.results, keep_default_na=False, na_values=[""], dtype={"held_out": str}, low_memory=False
        )
        res = res[(res["task"] == "unseen_drug") & res["metric"].isin(METRICS) & (res["seed"].astype(int) < args.seeds)]
        per_seed = res.groupby(["model", "metric", "seed"])["value"].mean().groupby(["model", "metric"]).mean()
        models = per_seed.unstack("metric").loc[lambda t: t.index.isin(["scdca_routed", "c3tl", "ridge"])]
        table = pd.concat([table, models.rename(index=lambda m: f"model {m} ({args.results})")])
    print(
        f"\nunseen drug, {args.seeds} seeds, {args.n_top_genes} genes: mean over seeds "
        f"(accuracy: test drugs whose most probable mechanism is the true one)"
    )
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
