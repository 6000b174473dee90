"""Statistics over a results table: per-seed means, paired tests between models, Holm's
correction, whether a model tells drugs apart."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scdca.eval.runs import REFERENCES

DRUG_BLIND_TOLERANCE = 0.02  # |rank - 0.5| at or below this: the model does not distinguish drugs
DRUG_BLIND_NOTE = "does not distinguish drugs"


def drug_blind(results: pd.DataFrame) -> pd.DataFrame:
    """(task, model) pairs whose mean `rank` over seeds is within DRUG_BLIND_TOLERANCE of 0.5 (random).

    Such a model predicts (nearly) the same change for every drug of a line; its change
    metrics measure the line's average response, not drug effects. Control and references
    are excluded (control predicts no change at all).
    """
    r = per_seed(results, "rank").groupby(["task", "model"], as_index=False)["value"].mean()
    r = r[~r["model"].isin(("control",) + REFERENCES)]
    return r[(r["value"] - 0.5).abs() <= DRUG_BLIND_TOLERANCE + 1e-12].reset_index(drop=True)


def split_means(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, seed, held_out, metric): the mean over the split's conditions
    (NaN values skipped; NaN where a split has none).

    Everything that reads only split means (`per_seed` and what is built on it) gives the same
    numbers from this table as from the per-condition rows, on a table hundreds of times smaller.
    """
    keys = ["model", "task", "seed", "held_out", "metric"]
    out = results.groupby(keys, observed=True, sort=False)["value"].mean().reset_index()
    return out.astype({k: object for k in ("model", "task", "held_out", "metric")})  # plain text, as in results.csv


def per_seed(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean per (model, task, seed): conditions averaged within a split, held-out lines within a seed."""
    r = results[results["metric"] == metric]
    # dropna=False: tasks without held-out lines have held_out '' (NaN when a CSV is read with pandas' defaults)
    keys = {"as_index": False, "observed": True}  # `metric` may be categorical (`read_results`)
    split = r.groupby(["model", "task", "seed", "held_out"], dropna=False, **keys)["value"].mean()
    out = split.groupby(["model", "task", "seed"], **keys)["value"].mean()
    return out.astype({"model": object, "task": object})  # plain text keys, whatever the input's dtype


def paired_tests(results: pd.DataFrame, model: str, metric: str = "pearson_delta_deg") -> pd.DataFrame:
    """Paired t-tests of `model` against every other model per task, paired on seed.

    p-values are two-sided (scipy.stats.ttest_rel); `p_holm` applies Holm's correction over the
    comparisons within each task. Needs >= 2 seeds; otherwise t and p are NaN.
    """
    from scipy import stats

    s = per_seed(results, metric)
    rows = []
    for task, grp in s.groupby("task"):
        wide = grp.pivot(index="seed", columns="model", values="value")
        if model not in wide:
            continue
        for other in wide.columns:
            if other == model:
                continue
            pair = wide[[model, other]].dropna()
            diff = (pair[model] - pair[other]).to_numpy()
            if len(pair) >= 2 and np.std(diff) > 0:
                t, p = stats.ttest_rel(pair[model], pair[other])
            else:
                t, p = np.nan, np.nan
            rows.append(
                {
                    "task": task,
                    "model": model,
                    "versus": other,
                    "metric": metric,
                    "n_seeds": len(pair),
                    "mean_difference": float(diff.mean()) if len(diff) else np.nan,
                    "t": t,
                    "p": p,
                }
            )
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["p_holm"] = df.groupby("task")["p"].transform(holm)
    return df


def holm(p: pd.Series) -> pd.Series:
    vals = p.to_numpy(float)
    ok = np.isfinite(vals)
    out = np.full_like(vals, np.nan)
    order = np.argsort(vals[ok])
    m = ok.sum()
    adj = np.maximum.accumulate((m - np.arange(m)) * vals[ok][order])
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return pd.Series(out, index=p.index)
