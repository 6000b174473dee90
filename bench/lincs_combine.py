"""Does combining LINCS files help models on new drugs? A plate alone against the plate with
another file's signatures of the same line added to its training data, on the same test drugs.

    python bench/lincs_combine.py PLATE.gct OTHER.gct COMPOUNDS [--cell-id A375] [--seeds 5]
        [--models control,dose_mean,additive,ridge,knn,c3tl,scdca_stack] [--backbone random:4x128] [--encoder chemnet]

For each seed, the unseen-drug split of the plate alone holds out its test drugs. Each model is then
fitted twice: on the plate's other drugs ("alone"), and on those plus every condition of OTHER in
`--cell-id` whose drug is not a test drug ("pooled": each file read at its own level, the same line
at the same time joined as one line, other times as lines of their own). Both arms predict the
same test conditions and are scored against the same mean reference (`dose_mean` on the plate's
training drugs), so the difference between arms is only the added training data.

Which arm to use is chosen on training data only: ridge's error and rank over 3 folds of the
plate's training drugs, each arm's fold models fitted with the arm's extra conditions, scored as
the stack scores committees (mse / dose_mean's mse + rank / 0.5, lower is better). The "chosen"
rows take that arm per seed. Prints change score, rank, mse and pearson_vs_mean_deg per arm
(mean ± SE over seeds), the paired difference pooled - alone per model, and the choice per seed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pandas as pd
from scipy import stats

from scdca.data.lincs import read_lincs
from scdca.data.screen import PerturbationData, load
from scdca.data.splits import Split, fold_splits, make_splits
from scdca.eval.grid import _make, score_conditions, scoring_extras
from scdca.eval.stats import per_seed
from scdca.models.stack import distance_ranks

JUDGED = ("pearson_delta_deg", "rank", "mse", "pearson_vs_mean_deg")
MODELS = "control,dose_mean,additive,ridge,knn,c3tl,scdca_stack"


def key(cond: pd.DataFrame) -> pd.Series:
    """A condition's (drug, dose), the same in both arms (the line's name may differ)."""
    return cond["drug"].astype(str) + "@" + cond["dose"].round(6).astype(str)


def arms(plate: str, other: str, compounds: str, cell_id: str) -> tuple[PerturbationData, PerturbationData, str]:
    """(the plate alone, the plate with OTHER's signatures of the line, the plate's line in the pooled data)."""
    alone = load(read_lincs(plate, compounds=compounds))
    pooled = load(read_lincs([plate, other], compounds=compounds, cell_id=cell_id))
    drugs = set(alone.conditions["drug"].astype(str))
    cond = pooled.conditions
    in_plate = cond["drug"].astype(str).isin(drugs) & key(cond).isin(set(key(alone.conditions)))
    line = cond.loc[in_plate, "cell_line"].astype(str).value_counts().index[0]
    return alone, pooled, line


def pooled_split(split: Split, alone: PerturbationData, pooled: PerturbationData, line: str) -> Split:
    """The alone split's test conditions in the pooled data; training: everything else but test drugs."""
    test_keys = set(key(alone.conditions.loc[list(split.test)]))
    test_drugs = set(alone.conditions.loc[list(split.test), "drug"].astype(str))
    cond = pooled.conditions
    ids = np.asarray(pooled.ids)
    is_test = ((cond["cell_line"].astype(str) == line) & key(cond).isin(test_keys)).to_numpy()
    is_train = ~cond["drug"].astype(str).isin(test_drugs).to_numpy()
    return Split(split.task, split.seed, "", tuple(ids[is_train]), tuple(ids[is_test]))


def ordered_like(test_ids, reference: PerturbationData, pooled: PerturbationData) -> list[str]:
    """The pooled test ids in the order of `reference`'s conditions (matched by drug and dose)."""
    by_key = dict(zip(key(pooled.conditions.loc[list(test_ids)]), test_ids))
    return [by_key[k] for k in key(reference.conditions)]


def oof_score(data: PerturbationData, split: Split, extra: list[str], options: dict, seed: int) -> float:
    """Ridge's out-of-fold score on folds of the split's training drugs (of the plate), each fold's
    model also fitted on `extra` (the arm's added conditions): mse / dose_mean's + rank / 0.5."""
    train = data.subset(split.train)
    plate_part = train.subset([i for i in train.ids if i not in set(extra)])
    mse, ref, rank = [], [], []
    for fold in fold_splits(plate_part, "unseen_drug", seed):
        inner = data.subset(list(fold.train) + list(extra))
        held = data.subset(list(fold.test), observed=False)
        obs = data.subset(list(fold.test)).mean
        pred = _make("ridge", options, seed).fit(inner).predict(held)
        base = _make("dose_mean", options, seed).fit(inner).predict(held)
        mse.append(((pred - obs) ** 2).mean())
        ref.append(((base - obs) ** 2).mean())
        rank.append(np.nanmean(distance_ranks(pred, obs, held.conditions["cell_line"].to_numpy())))
    return float(np.mean(mse) / np.mean(ref) + np.mean(rank) / 0.5)


def run_seed(alone, pooled, line, seed: int, models: list[str], options: dict) -> tuple[pd.DataFrame, str]:
    (split,) = make_splits(alone, "unseen_drug", seed)
    psplit = pooled_split(split, alone, pooled, line)
    test = alone.subset(split.test)
    extras = scoring_extras(alone, split, test, JUDGED)  # one reference for both arms
    plate_train = set(key(alone.conditions.loc[list(split.train)]))
    cond = pooled.conditions.loc[list(psplit.train)]
    lines = cond["cell_line"].astype(str)
    added = [i for i, k, ln in zip(psplit.train, key(cond), lines) if not (ln == line and k in plate_train)]
    pooled_score = oof_score(pooled, psplit, added, options, seed)
    choice = "pooled" if pooled_score < oof_score(alone, split, [], options, seed) else "alone"
    frames = []
    for name in models:
        for arm, data, s in (("alone", alone, split), ("pooled", pooled, psplit)):
            model = _make(name, options, seed, s).fit(data.subset(s.train))
            ids = list(s.test) if arm == "alone" else ordered_like(s.test, test, pooled)
            pred = np.asarray(model.predict(data.subset(ids, observed=False)), np.float32)
            rows = score_conditions(test, pred, test.mean, name, split, 20, JUDGED, extras)
            frames.append(rows.assign(arm=arm))
    return pd.concat(frames, ignore_index=True), choice


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plate")
    p.add_argument("other")
    p.add_argument("compounds")
    p.add_argument("--cell-id", default="A375")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--models", default=MODELS)
    p.add_argument("--backbone", default="random:4x128")
    p.add_argument("--encoder", default="chemnet")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    alone, pooled, line = arms(args.plate, args.other, args.compounds, args.cell_id)
    added = len(pooled.ids) - len(alone.ids)
    print(f"plate alone: {len(alone.ids)} conditions; pooled: {len(pooled.ids)} (+{added}), plate line {line!r}, "
          f"lines {sorted(pooled.conditions['cell_line'].astype(str).unique())}")  # fmt: skip
    options = {"backbone": args.backbone, "encoder": args.encoder}
    models = args.models.split(",")
    results, choices = [], {}
    for seed in range(args.seeds):
        rows, choices[seed] = run_seed(alone, pooled, line, seed, models, options)
        results.append(rows)
        print(f"seed {seed}: training folds choose {choices[seed]!r}", flush=True)
    res = pd.concat(results, ignore_index=True)
    chosen = res[res["arm"] == res["seed"].map(choices)].assign(arm="chosen")
    res = pd.concat([res, chosen], ignore_index=True)
    table = {}
    for metric in JUDGED:
        s = per_seed(res.assign(model=res["model"] + " / " + res["arm"]), metric).groupby("model")["value"]
        table[metric] = s.agg(lambda v: f"{v.mean():.3f} ± {v.sem():.3f}")
    print(pd.DataFrame(table).to_string())
    print("\npooled - alone, paired over seeds (t-test p):")
    for metric in JUDGED:
        seeds = per_seed(res.assign(model=res["model"] + "|" + res["arm"]), metric)
        wide = seeds.pivot_table(index="seed", columns="model", values="value")
        parts = []
        for name in models:
            d = wide[f"{name}|pooled"] - wide[f"{name}|alone"]
            p_value = stats.ttest_1samp(d, 0.0).pvalue if d.std() > 0 else 1.0
            parts.append(f"{name} {d.mean():+.4f} (p {p_value:.2f})")
        print(f"  {metric}: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
