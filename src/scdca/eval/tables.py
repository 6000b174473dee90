"""Tables as pure functions of `results.csv` (tidy per-condition scores): summaries, the main
table, per-line, per-dose, per-group and novelty tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from scdca.chem.molecules import novelty_table
from scdca.eval.metrics import METRICS
from scdca.eval.runs import REFERENCES
from scdca.eval.stats import DRUG_BLIND_NOTE, drug_blind, per_seed
from scdca.models import MODELS


def _plain(rows: pd.DataFrame) -> pd.DataFrame:
    """A copy of some result rows with text columns as plain strings (`read_results` gives
    categories, whose groupby and comparison rules differ; convert after filtering, on few rows)."""
    return rows.astype({c: object for c in rows.columns if isinstance(rows[c].dtype, pd.CategoricalDtype)})


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over seeds: conditions are averaged within each split,

    held-out lines within each seed, then seeds give mean, se and n.
    """
    keys = {"as_index": False, "observed": True}  # `metric` may be categorical (`read_results`)
    per_split = results.groupby(["model", "task", "metric", "seed", "held_out"], **keys)["value"].mean()
    per_seed = per_split.groupby(["model", "task", "metric", "seed"], **keys)["value"].mean()
    g = per_seed.groupby(["model", "task", "metric"], observed=True)["value"]
    summary = pd.DataFrame({"mean": g.mean(), "se": g.sem(ddof=1), "n": g.count()}).reset_index()
    return summary[["model", "task", "metric", "mean", "se", "n"]]


def format_summary(
    summary: pd.DataFrame, metrics=("r2_deg", "r2_delta_deg", "pearson_delta_deg", "pearson_delta", "rank", "mse")
) -> str:
    """A wide text table: rows model x task, columns metrics as 'mean ± se'."""
    s = summary[summary["metric"].isin(metrics)].copy()
    s["cell"] = [f"{m:.3f} ± {e:.3f}" if np.isfinite(e) else f"{m:.3f}" for m, e in zip(s["mean"], s["se"])]
    wide = s.pivot_table(index=["task", "model"], columns="metric", values="cell", aggfunc="first", observed=True)
    wide = wide[[m for m in metrics if m in wide.columns]]
    return wide.to_string()


# led by metrics a drug-blind model cannot game (0 for the average perturbed response, `dose_mean`)
MAIN_METRICS = (
    "pearson_vs_mean_deg",
    "r2_vs_mean_deg",
    "rank_dose",
    "r2_deg",
    "r2_delta_deg",
    "pearson_delta_deg",
    "pearson_delta",
    "rank",
    "mse",
)


def _flagged(flag: str) -> tuple[str, ...]:
    """The registered models whose class sets `flag` (a `PerturbationModel` class flag)."""
    return tuple(n for n in MODELS.names() if getattr(MODELS.get(n), flag))


MEAN_BASELINES = _flagged("mean_change")  # what a drug-blind model predicts: dose_mean, train_mean, ...
BASELINES = _flagged("baseline")  # control, the means, additive, ridge, knn, dominant, ...


def main_table(results: pd.DataFrame, metrics: Sequence[str] = MAIN_METRICS) -> pd.DataFrame:
    """Rows (task, model); columns metric -> 'mean ± se', best non-reference model per column marked '*'.
    Metrics the run did not score (e.g. the `*_vs_mean_*` ones in an older run) are left out."""
    metrics = [m for m in metrics if (results["metric"] == m).any()]
    out = {}
    blind = (
        {(t, m) for t, m in drug_blind(results)[["task", "model"]].itertuples(index=False)}
        if "rank" in metrics
        else set()
    )
    for m in metrics:
        s = per_seed(results, m).groupby(["task", "model"])["value"].agg(["mean", "sem", "count"])
        higher = METRICS.get(m).higher_is_better
        cells = {}
        for task, grp in s.groupby(level=0):
            models = grp.droplevel(0)
            cand = models.drop([r for r in REFERENCES if r in models.index])
            best = (cand["mean"].idxmax() if higher else cand["mean"].idxmin()) if len(cand) else None
            for model, row in models.iterrows():
                se = "" if not np.isfinite(row["sem"]) else f" ± {row['sem']:.3f}"
                flag = f" ({DRUG_BLIND_NOTE})" if m == "rank" and (task, model) in blind else ""
                cells[(task, model)] = f"{row['mean']:.3f}{se}{' *' if model == best else ''}{flag}"
        out[m] = pd.Series(cells)
    table = pd.DataFrame(out)
    table.index.names = ["task", "model"]
    return table


def per_held_out(results: pd.DataFrame, metric: str = "pearson_delta_deg") -> pd.DataFrame:
    """Cell-line tasks: mean over seeds of each model's score per held-out line (paper's Table 8)."""
    r = results[(results["metric"] == metric) & (results["held_out"].astype(str) != "")]
    split = r.groupby(["task", "model", "held_out", "seed"], observed=True)["value"].mean()
    return split.groupby(["task", "model", "held_out"], observed=True).mean().unstack("held_out").round(3)


def group_table(results: pd.DataFrame, groups: pd.Series, metric: str = "pearson_delta_deg") -> pd.DataFrame:
    """Score per drug group (target, pathway, mechanism ...): rows (task, group), columns models.

    Conditions are pooled over seeds; the `n_drugs` column counts the group's tested drugs.
    """
    r = _plain(results[(results["metric"] == metric) & results["drug"].isin(groups.index)])
    if r.empty:
        return pd.DataFrame()
    r["group"] = r["drug"].map(groups).astype(str)
    table = r.pivot_table(
        index=["task", "group"], columns="model", values="value", aggfunc="mean", observed=True
    ).round(3)
    table.insert(0, "n_drugs", r.groupby(["task", "group"], observed=True)["drug"].nunique())
    return table


def dose_table(results: pd.DataFrame, metric: str = "pearson_delta_deg") -> pd.DataFrame:
    """Score per dose: rows (task, dose), columns models; conditions pooled over seeds.

    Dose-dependent failures hide in the averages: a model that hedges for new molecules
    predicts too small a change at high doses, where effects are largest.
    """
    r = _plain(results[results["metric"] == metric])
    if r.empty:
        return pd.DataFrame()
    table = r.pivot_table(index=["task", "dose"], columns="model", values="value", aggfunc="mean", observed=True).round(
        3
    )
    table.insert(
        0,
        "n_conditions",
        r.drop_duplicates(["task", "dose", "cell_line", "drug"]).groupby(["task", "dose"], observed=True).size(),
    )
    return table


NOVELTY_TASKS = ("unseen_drug", "unseen_scaffold")  # tasks whose test drugs are all new


def novelty(
    results: pd.DataFrame,
    smiles: dict[str, str],
    metric: str = "pearson_delta_deg",
    tasks: Sequence[str] = NOVELTY_TASKS,
) -> pd.DataFrame:
    """Per (task, seed, model, test drug): its max Tanimoto to the training drugs and its mean score.

    In these tasks every drug that is not tested is a training drug, so the split is read
    from the results table itself.
    """

    rows = []
    r = _plain(results[results["metric"] == metric])
    for (task, seed), grp in r[r["task"].isin(tasks)].groupby(["task", "seed"], observed=True):
        test = sorted(d for d in grp["drug"].unique() if d in smiles)
        train = [d for d in smiles if d not in set(grp["drug"])]
        if not test or not train:
            continue
        sim = novelty_table({d: smiles[d] for d in train}, {d: smiles[d] for d in test})["max_tanimoto"]
        per_drug = grp.groupby(["model", "drug"], observed=True)["value"].mean().reset_index()
        per_drug = per_drug[per_drug["drug"].isin(test)]
        per_drug["max_tanimoto"] = per_drug["drug"].map(sim)
        per_drug["task"], per_drug["seed"] = task, seed
        rows.append(per_drug)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def sweep_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """task x model rows, k columns in numeric order with 'all' last (k is stored as text)."""
    table = sweep.pivot_table(index=["task", "model"], columns="k", values="value").round(3)
    order = sorted(table.columns, key=lambda k: (k == "all", int(k) if k != "all" else 0))
    return table[order]


def _error_spearman(results: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task, seed): Spearman, over the test conditions, of expected_mse against mse."""
    from scipy.stats import spearmanr

    keys = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose"]
    wide = _plain(results[results["metric"].isin(["expected_mse", "mse"])]).pivot_table(
        index=keys, columns="metric", values="value", aggfunc="first", observed=True
    )
    if "expected_mse" not in wide:
        return pd.DataFrame(columns=["model", "task", "seed", "value"])
    rows = [
        {"model": m, "task": t, "seed": s, "value": spearmanr(g["expected_mse"], g["mse"])[0] if len(g) > 2 else np.nan}
        for (m, t, s), g in wide.dropna().reset_index().groupby(["model", "task", "seed"], observed=True)
    ]
    return pd.DataFrame(rows)


def calibration_table(results: pd.DataFrame, levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95)) -> pd.DataFrame:
    """Rows (task, model) for models with intervals: realised coverage at each level, the 90% interval's
    width and the Spearman of expected against realised per-condition mse (mean over seeds), and a
    verdict: 'too narrow' where coverage_90 < 0.85, 'too wide' where > 0.95."""
    names = [f"coverage_{round(100 * lv)}" for lv in levels] + ["interval_width_90"]
    if not results["metric"].isin([*names, "expected_mse"]).any():
        return pd.DataFrame()
    results = _plain(results[results["metric"].isin([*names, "expected_mse", "mse"])])
    results = results.assign(held_out=results["held_out"].fillna(""))  # drug tasks hold out no line
    r = results[results["metric"].isin(names)]
    if r.empty:
        return pd.DataFrame()
    seeds = (
        r.groupby(["task", "model", "metric", "seed", "held_out"], observed=True)["value"]
        .mean()
        .groupby(level=[0, 1, 2, 3], observed=True)
        .mean()
    )
    table = seeds.groupby(level=[0, 1, 2], observed=True).mean().unstack("metric")
    table = table[[n for n in names if n in set(r["metric"])]]
    rho = _error_spearman(results).groupby(["task", "model"])["value"].mean()
    table["error_spearman"] = rho.reindex(table.index)
    cov = table.get("coverage_90")
    if cov is not None:
        table["verdict"] = np.where(cov < 0.85, "too narrow", np.where(cov > 0.95, "too wide", "ok"))
    return table.round(3)


def normalised_scores(results: pd.DataFrame, metric: str = "pearson_delta_deg") -> pd.DataFrame:
    """Rows (task, model): the metric rescaled so that 0 = the best mean baseline of the task
    (`MEAN_BASELINES`) and 1 = the oracle (simulated data) or else the noise ceiling (cell-eval's
    normalised score). Empty without a mean baseline or a reference in the run."""
    means = per_seed(results, metric).groupby(["task", "model"])["value"].mean()
    higher = METRICS.get(metric).higher_is_better
    rows = []
    for task, m in means.groupby(level=0):
        m = m.droplevel(0)
        base = m[[b for b in MEAN_BASELINES if b in m.index]]
        top = next((m[r] for r in ("oracle", "ceiling") if r in m.index), None)
        if base.empty or top is None:
            continue
        floor = base.max() if higher else base.min()
        span = top - floor
        for model, v in m.drop([r for r in REFERENCES if r in m.index]).items():
            rows.append({"task": task, "model": model, "normalised": (v - floor) / span if span else np.nan})
    return pd.DataFrame(rows).set_index(["task", "model"]).round(3) if rows else pd.DataFrame()
