"""Tables, statistics, figures and an HTML/Markdown report, all pure functions of a benchmark folder.

Inputs: `DIR/results.parquet` or `DIR/results.csv` (tidy per-condition scores, the same table),
`DIR/costs.csv` and a few `DIR/predictions/*.h5ad` (the per-gene figure). Nothing here trains or predicts.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scdca.data.screen import read
from scdca.errors import ScdcaInputError
from scdca.eval.diagnostics import describe as describe_diagnostics
from scdca.eval.figures import (
    bars_figure,
    calibration_figure,
    first_predictions,
    genes_figure,
    novelty_figure,
    png,
    sweep_figure,
)
from scdca.eval.metrics import METRICS, SWEEP_SIZES, r2_rows
from scdca.eval.render import write_html, write_markdown
from scdca.eval.runs import REFERENCES, read_prediction_parts, read_results
from scdca.eval.stats import (
    DRUG_BLIND_NOTE,
    DRUG_BLIND_TOLERANCE,
    drug_blind,
    holm,
    paired_tests,
    per_seed,
    split_means,
)
from scdca.eval.tables import (
    BASELINES,
    MEAN_BASELINES,
    NOVELTY_TASKS,
    calibration_table,
    dose_table,
    group_table,
    main_table,
    normalised_scores,
    novelty,
    per_held_out,
    sweep_table,
)
from scdca.models import RECOMMENDED
from scdca.models.peers import peer_status


def deg_sweep(results: pd.DataFrame) -> pd.DataFrame:
    """R^2 of expression over the top-k DEGs as a function of k (paper's Figure 8), from the
    `r2_deg_<k>` and `r2_all` rows of the results -> columns model, task, k, value (mean over
    seeds; held-out lines averaged first, as every table does). Empty for runs made before
    those metrics existed (`deg_sweep_from_predictions` reads their prediction files)."""
    frames = []
    for k in (*SWEEP_SIZES, "all"):
        s = per_seed(results, "r2_all" if k == "all" else f"r2_deg_{k}")
        mean = s.groupby(["model", "task"], as_index=False)["value"].mean().dropna()
        frames.append(mean.assign(k=str(k)))
    out = pd.concat(frames, ignore_index=True)
    return out[["model", "task", "k", "value"]]


def deg_sweep_from_predictions(
    folder: str | os.PathLike, ks: Sequence[int | str] = (*SWEEP_SIZES, "all")
) -> pd.DataFrame:
    """`deg_sweep` of a run without the sweep metrics, read from its saved predictions.

    k values larger than the number of DEGs stored in the prediction files are skipped;
    'all' uses every gene.
    """
    rows = []
    for path in sorted(glob.glob(str(Path(folder) / "predictions" / "*.h5ad"))):
        model, task, seed = Path(path).stem.split("__")
        a = read_prediction_parts(path)
        table = a.uns["degs"].loc[list(a.obs_names)]
        idx = pd.Index(a.var_names).get_indexer(table.to_numpy().ravel()).reshape(table.shape)  # -1 = none
        n_stored = int((idx >= 0).sum(1).min())
        pred, obs = np.asarray(a.X, dtype=np.float64), np.asarray(a.layers["observed"], dtype=np.float64)
        for k in ks:
            if k == "all":
                p, o = pred, obs
            elif int(k) <= n_stored:
                sel = idx[:, : int(k)]
                p, o = np.take_along_axis(pred, sel, 1), np.take_along_axis(obs, sel, 1)
            else:
                continue
            per_split = pd.Series(r2_rows(o, p)).groupby(a.obs["held_out"].to_numpy()).mean().mean()
            rows.append({"model": model, "task": task, "seed": seed, "k": str(k), "value": per_split})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.groupby(["model", "task", "k"], as_index=False)["value"].mean()


def cost_table(folder: str | os.PathLike) -> pd.DataFrame:
    """Per model: mean fit+predict seconds per split, trainable and total parameters (Table 9).
    Read from `costs.csv` (the grid writes it at the end), else from the cells' `costs/*.csv`."""
    one = Path(folder) / "costs.csv"
    if one.exists() and one.stat().st_size > 1:
        frames = [pd.read_csv(one)]
    else:
        files = glob.glob(str(Path(folder) / "costs" / "*.csv"))
        frames = [pd.read_csv(f) for f in files if os.path.getsize(f) > 1]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    c = pd.concat(frames, ignore_index=True)
    agg = {"seconds": "mean", **{col: "mean" for col in ("shrinkage", "ridge_weight") if col in c}}
    if "peak_rss_mb" in c:  # the median over a model's cells: robust to what ran before in the same worker
        agg["peak_rss_mb"] = "median"
    for col in ("peak_python_mb", "params_trainable", "params_total", "params_trainable_pct"):
        if col in c:
            agg[col] = "max"
    return c.groupby("model").agg(agg).round(3).sort_values("seconds")


def stack_table(costs: pd.DataFrame | None, model: str = RECOMMENDED) -> pd.DataFrame:
    """What the recommended model was made of, per task and held-out line: the mean weight of each
    expert over seeds, the share of splits where the stack beat the anchor out of fold (`used`; else
    the prediction is the anchor), and the out-of-fold mse and rank that chose them. Empty when
    the model did not run or recorded no weights."""
    if costs is None or "model" not in costs:
        return pd.DataFrame()
    rows = costs[costs["model"] == model]
    cols = [c for c in rows.columns if c.startswith(("w_", "oof_mse_", "oof_rank_"))]
    if rows.empty or not cols:
        return pd.DataFrame()
    rows = rows.assign(used=rows["used"].astype(float), held_out=rows["held_out"].fillna(""))
    return rows.groupby(["task", "held_out"])[["used", *cols]].mean().round(3)


def _cost_text(table: pd.DataFrame) -> str:
    """Parameter counts as whole numbers with separators; '-' where a model has none (closed form)."""
    shown = table.copy()
    for col in ("params_trainable", "params_total"):
        if col in shown:
            shown[col] = shown[col].map(lambda v: "-" if pd.isna(v) else f"{int(v):,}")
    return shown.to_string(na_rep="-")


def data_info(folder: str | os.PathLike) -> tuple[dict[str, str], pd.DataFrame | None, str]:
    """Drug -> SMILES and the per-drug annotation table of the benchmark's dataset, and why
    not ('' when read). The data path in config.json is absolute (relative paths of runs made
    before that are tried from the run's parent folder and the working directory)."""
    import json

    cfg_path = Path(folder) / "config.json"
    if not cfg_path.exists():
        return {}, None, f"{cfg_path} does not exist"
    cfg = json.loads(cfg_path.read_text())
    path, keys = cfg.get("data"), cfg.get("keys", {})
    candidates = (
        [Path(path)]
        if path and Path(path).is_absolute()
        else [Path(folder).resolve().parent / str(path), Path(str(path))]
        if path
        else []
    )
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return (
            {},
            None,
            (
                f"the benchmark's data file {path!r} (config.json 'data') is not found"
                + (f" (tried {', '.join(map(str, candidates))})" if candidates else "")
            ),
        )
    import logging

    lincs_log = logging.getLogger("scdca.data.lincs")
    level = lincs_log.level
    lincs_log.setLevel(logging.ERROR)  # the benchmark already warned about the plate's wells
    try:
        a = read(found, what="data", backed=None if cfg.get("compounds") else "r", compounds=cfg.get("compounds"))
    except ScdcaInputError as err:  # a damaged data file costs the report one section, not the report
        return {}, None, str(err)
    finally:
        lincs_log.setLevel(level)
    obs = a.obs
    drug_col, smi_col = keys.get("drug", "condition"), keys.get("smiles", "SMILES")
    smiles = {}
    if drug_col in obs and smi_col in obs:
        sub = obs[[drug_col, smi_col]].astype(str).drop_duplicates(drug_col)
        smiles = {d: s_ for d, s_ in zip(sub[drug_col], sub[smi_col]) if s_ and s_ != "nan"}
    ann = a.uns.get("drug_annotations")
    table = (
        pd.DataFrame({k: np.asarray(v) for k, v in ann.items()}).set_index("drug") if isinstance(ann, dict) else None
    )
    if a.isbacked:
        a.file.close()
    return smiles, table, "" if smiles else f"{found} has no {smi_col!r} column for the {drug_col!r} drugs"


def backbone_text(audit: dict) -> str:
    """One paragraph from backbone_audit.json (see `benchmark.backbone_audit`)."""
    verdict, prov = audit["verdict"], audit.get("provenance") or {}
    if verdict == "random":
        return f"{audit['backbone']}: an untrained (randomly initialised) backbone; it saw no data."
    if verdict == "unknown":
        return f"{audit['backbone']}: the checkpoint records no pretraining data (e.g. an official release)."
    seen = (
        f"{prov.get('cells', '?'):,} cells from {prov.get('n_cell_lines', '?')} cell lines/states of "
        f"{prov.get('data_file', '?')}, {prov.get('perturbed_cells', 0):,} of them drug-treated"
    )
    meaning = {
        "leak": "LEAK: these include treated cells of this benchmark's data, so the backbone has seen "
        "test-condition responses; scores of backbone models are optimistic.",
        "controls of this file": "only control cells of this benchmark's data: no test response was seen.",
        "other data": "a different file from this benchmark's data.",
    }[verdict]
    return f"{audit['backbone']}: pretrained on {seen}; {meaning}"


def peers_text(results: pd.DataFrame, costs: pd.DataFrame | None = None) -> str:
    """One line per published peer model: in this report (and, for a model that records its
    `mode` in its costs, whether it trained on cell sets or pseudobulk profiles), installed but
    not run, or not installable here. `costs` is the grid's costs.csv (one row per cell)."""
    lines = []
    for name, missing in peer_status().items():
        if name in set(results["model"]):
            lines.append(
                f"{name}: in this report, {_peer_input(name, costs)}, on the same splits as every other model."
            )
        elif missing is None:
            lines.append(f"{name}: installed but not in this run; add it to --models (e.g. make demo-peers).")
        else:
            lines.append(f"{name}: not run, its package is not installed here ({missing}).")
    return "\n".join(lines) + "\n"


def _peer_input(name: str, costs: pd.DataFrame | None) -> str:
    """What a peer trained on, from the modes its cells recorded (STATE: 'set' or 'pseudobulk')."""
    rows = costs[costs["model"] == name] if costs is not None and "mode" in costs else None
    if rows is None or rows["mode"].isna().all():
        return "trained on pseudobulk profiles, as the other models"
    parts = []
    for mode, group in rows.groupby("mode"):
        size = int(group["set_size"].max()) if "set_size" in group else 1
        what = (
            f"sets of {size} sampled cells of a condition against {size} of its line's control cells (its set loss)"
            if mode == "set"
            else "pseudobulk profiles, one per set (its network as a regression model)"
        )
        parts.append(f"in {mode} mode in {len(group)} of {len(rows)} cells: {what}")
    return "trained " + "; ".join(parts)


def _cell_costs(folder: Path) -> pd.DataFrame | None:
    """The grid's per-cell cost rows (costs.csv), None when absent."""
    path = Path(folder) / "costs.csv"
    return pd.read_csv(path) if path.exists() and path.stat().st_size > 1 else None


def _test_phrase(results: pd.DataFrame, model: str, versus: str, task: str, metric: str) -> str:
    """'paired t-test p = ...' for model vs versus on task, or why there is none."""
    tests = paired_tests(results, model, metric)
    row = tests[(tests["task"] == task) & (tests["versus"] == versus)]
    p = row["p"].iloc[0] if len(row) else np.nan
    return f"paired t-test p = {p:.3g}" if np.isfinite(p) else "too few seeds for a test"


def calibration_text(calib: pd.DataFrame) -> str:
    """Where the intervals hold and where they are too narrow (coverage_90 outside 0.85-0.95)."""
    narrow = [f"{m} on {t} ({c:.2f})" for (t, m), c in calib["coverage_90"].items() if c < 0.85]
    wide = [f"{m} on {t} ({c:.2f})" for (t, m), c in calib["coverage_90"].items() if c > 0.95]
    parts = [f"90% intervals hold (coverage 0.85-0.95) for {int((calib['verdict'] == 'ok').sum())} of {len(calib)} "
             f"model x task rows."]  # fmt: skip
    if narrow:
        parts.append("Too narrow (the model is more wrong than it says): " + "; ".join(narrow) + ".")
    if wide:
        parts.append("Too wide (conservative): " + "; ".join(wide) + ".")
    return " ".join(parts)


def mean_baseline_text(results: pd.DataFrame, metric: str = "pearson_vs_mean_deg") -> str:
    """Per task: which models beat the average perturbed response beyond noise on `metric`, on which
    the mean baseline (`dose_mean`) scores 0 by construction: a one-sample t-test of the per-seed
    means against 0 (the same as a paired test against dose_mean), Holm-corrected within task."""
    from scipy import stats

    s = per_seed(results, metric)
    s = s[~s["model"].isin(REFERENCES + MEAN_BASELINES + ("control",))]
    if s.empty:
        return ""
    blind = {(t, m) for t, m in drug_blind(results)[["task", "model"]].itertuples(index=False)}
    parts = []
    for task, grp in s.groupby("task", sort=False):
        by = grp.groupby("model")["value"]
        p = by.apply(lambda v: stats.ttest_1samp(v, 0.0).pvalue if len(v) > 1 and v.std() > 0 else np.nan)
        p_holm, means = holm(p.dropna()), by.mean()
        winners = [m for m in p_holm.index if p_holm[m] < 0.05 and means[m] > 0]
        best = means.idxmax()
        if winners:
            listed = ", ".join(
                f"{m} ({means[m]:.3f}, p_holm {p_holm[m]:.3f}{'; ' + DRUG_BLIND_NOTE if (task, m) in blind else ''})"
                for m in winners
            )
            parts.append(f"On {task}, {listed} beat{'s' if len(winners) == 1 else ''} it beyond noise.")
        else:
            ph = f"p_holm {p_holm[best]:.2f}" if best in p_holm.index else "the same on every seed: no test"
            parts.append(f"On {task}, no model beats it beyond noise (best: {best}, {means[best]:.3f}, {ph}).")
    return (
        f"Against the average perturbed response ({metric}: the line's mean training change at the dose "
        f"scores 0, a drug-blind model about 0; one-sample t over seeds): " + " ".join(parts)
    )


def recommended_text(results: pd.DataFrame, model: str = RECOMMENDED) -> str:
    """One line per task: `model`'s change score, rank and mse next to the best simple baseline
    on each of them (which may be a different baseline per metric); '' when `model` did not run."""
    if model not in set(results["model"]):
        return ""
    lines = [f"The recommended model, {model} (mean over seeds; the best simple baseline on each metric in brackets):"]
    for task in dict.fromkeys(results.loc[results["model"] == model, "task"]):
        cells = []
        for metric, label in (("pearson_delta_deg", "change score"), ("rank", "rank"), ("mse", "mse")):
            means = per_seed(results[results["task"] == task], metric).groupby("model")["value"].mean()
            if model not in means:
                continue
            base = means[[b for b in BASELINES if b in means.index]]
            text = f"{label} {means[model]:.3f}"
            if len(base):
                best = base.idxmax() if METRICS.get(metric).higher_is_better else base.idxmin()
                text += f" ({best} {base[best]:.3f})"
            cells.append(text)
        lines.append(f"- {task}: " + ", ".join(cells))
    return "\n".join(lines)


def summary_text(results: pd.DataFrame, metric: str = "pearson_delta_deg") -> str:
    """A plain-language paragraph: who wins each task on `metric`, against the best simple baseline."""
    s = per_seed(results, metric)
    means = s.groupby(["task", "model"])["value"].mean()
    higher = METRICS.get(metric).higher_is_better
    parts = []
    for task in means.index.get_level_values(0).unique():
        m = means[task].drop([r for r in REFERENCES if r in means[task].index])
        best = m.idxmax() if higher else m.idxmin()
        base = m[[b for b in BASELINES if b in m.index]]
        best_base = (base.idxmax() if higher else base.idxmin()) if len(base) else None
        text = f"On {task}, {best} scores best ({m[best]:.3f})"
        learned = [x for x in m.index if x not in BASELINES]
        if best in BASELINES:
            text += (
                ", a simple baseline: no learned model beats it" if learned else " (only simple baselines in this run)"
            )
            if learned:
                top = max(learned, key=lambda x: m[x]) if higher else min(learned, key=lambda x: m[x])
                text += (
                    f"; the best learned model, {top}, scores {m[top]:.3f} ({m[top] - m[best]:+.3f}, "
                    f"{_test_phrase(results, top, best, task, metric)})"
                )
        elif best_base:
            text += (
                f", {m[best] - m[best_base]:+.3f} over the best simple baseline {best_base} "
                f"({_test_phrase(results, best, best_base, task, metric)})"
            )
        if "oracle" in means[task].index:
            text += f"; the noise-free oracle reaches {means[task]['oracle']:.3f}"
        parts.append(text + ".")
    blind = drug_blind(results)
    for task, grp in blind.groupby("task", sort=False):
        parts.append(
            f"On {task}, {', '.join(grp['model'])} {'does' if len(grp) == 1 else 'do'} not distinguish "
            f"drugs (rank within {DRUG_BLIND_TOLERANCE} of 0.5): {'its' if len(grp) == 1 else 'their'} "
            f"change scores reflect the line's average response, not drug effects."
        )
    return f"Metric: {metric} (mean over seeds). " + " ".join(parts)


def read_annotations(path: str | os.PathLike, *, drug_column: str, group_column: str) -> pd.Series:
    """Drug -> group from a CSV/TSV (e.g. sci-Plex's drugProperties_short.tsv: Product.Name -> Target).

    Names are matched as given and also without a trailing parenthesis ('Veliparib (ABT-888)'
    -> 'Veliparib'), so product names match the short names used in chemCPA's files.
    """

    sep = "\t" if str(path).endswith((".tsv", ".txt")) else ","
    table = pd.read_csv(path, sep=sep)
    for col in (drug_column, group_column):
        if col not in table.columns:
            raise ScdcaInputError(f"annotations: column {col!r} not in {str(path)!r}; columns: {list(table.columns)!r}")
    table = table.dropna(subset=[drug_column, group_column])
    names = table[drug_column].astype(str)
    groups = pd.Series(table[group_column].astype(str).to_numpy(), index=names)
    short = pd.Series(groups.to_numpy(), index=names.str.replace(r"\s*\(.*\)\s*$", "", regex=True))
    both = pd.concat([groups, short])
    return both[~both.index.duplicated()]


def build(
    folder: str | os.PathLike,
    *,
    model: str | None = None,
    metric: str = "pearson_delta_deg",
    annotations: pd.Series | None = None,
    annotation_name: str = "group",
) -> Path:
    """Write DIR/report.md and a self-contained DIR/report.html (+ PNG figures). Returns the HTML path.

    `annotations` (drug -> group, see `read_annotations`) adds a per-group table next to any
    annotations stored in the dataset itself.
    """
    folder = Path(folder)
    results = read_results(folder)
    splits = split_means(results)  # what the tables of split means read: the same numbers, far fewer rows
    learned = [m for m in splits["model"].unique() if m not in BASELINES and m not in REFERENCES]
    model = model or (learned[0] if learned else "additive")
    sections = _overview(splits, folder, model, metric)
    sections += _breakdowns(results, splits, folder, metric, annotations, annotation_name)
    sections += _run_facts(results, splits, folder, model)
    title = f"scdca benchmark report: {folder.name}"
    write_markdown(folder / "report.md", title, sections)
    write_html(folder / "report.html", title, sections)
    return folder / "report.html"


Section = tuple[str, str, str | None]  # (title, text or table, PNG as base64 or None)


def _overview(results: pd.DataFrame, folder: Path, model: str, metric: str) -> list[Section]:
    """Summary, data diagnostics, the main table with its figure, paired tests (`results`: split means)."""
    sections: list[Section] = []
    lead = "\n\n".join(t for t in (recommended_text(results), mean_baseline_text(results)) if t)
    sections.append(("Summary", (lead + "\n\n" if lead else "") + summary_text(results, metric), None))
    normalised = normalised_scores(results)
    if not normalised.empty:
        sections.append(
            (
                "Normalised change score (pearson_delta_deg: 0 = the best mean baseline, 1 = the oracle or ceiling)",
                normalised["normalised"].unstack("task").to_string(),
                None,
            )
        )
    if (folder / "diagnostics.csv").exists():
        diag = pd.read_csv(folder / "diagnostics.csv")
        sections.append(
            (
                "How much drug signal the data carries (before any model; scdca.eval.diagnostics)",
                describe_diagnostics(diag) + "\n\n" + diag.round(3).to_string(index=False),
                None,
            )
        )
    main = main_table(results)
    sections.append(
        (
            "Main table (mean ± SE over seeds; * = best non-reference model)",
            main.to_string(),
            png(bars_figure(results, metric), folder / "fig_main.png"),
        )
    )
    tests = paired_tests(results, model, metric)
    title = f"Paired t-tests: {model} vs every other model ({metric}, paired on seed; Holm-corrected within task)"
    if tests.empty:
        pass
    elif tests["n_seeds"].max() < 2:
        sections.append(
            (
                title,
                f"Not computed: this run has {int(tests['n_seeds'].max())} seed; a paired test "
                f"needs at least 2 (the paper uses 5: --seeds 5).",
                None,
            )
        )
    else:
        sections.append((title, tests.round(4).to_string(index=False), None))
    return sections


def _breakdowns(results, splits, folder: Path, metric: str, annotations, annotation_name: str) -> list[Section]:
    """The scores broken down: per held-out line, per dose, per DEG-set size, per drug group, by novelty."""
    sections: list[Section] = []
    judged = [metric] + (["rank"] if metric != "rank" and (splits["metric"] == "rank").any() else [])
    pho = per_held_out(splits, metric)
    if not pho.empty:
        sections.append((f"Per held-out cell line ({metric})", pho.to_string(), None))
    for m in judged:
        doses = dose_table(results, m)
        if not doses.empty and doses.index.get_level_values("dose").nunique() > 1:
            sections.append((f"Per dose ({m}; conditions pooled over seeds)", doses.to_string(), None))
    sweep = deg_sweep(splits)
    if sweep.empty:  # a run from before the sweep metrics: read its prediction files
        sweep = deg_sweep_from_predictions(folder)
    if not sweep.empty:
        sections.append(
            (
                "DEG-size sweep (R² of expression over the top-k DEGs)",
                sweep_table(sweep).to_string(),
                png(sweep_figure(sweep), folder / "fig_deg_sweep.png"),
            )
        )
    smiles, stored, missing = data_info(folder)
    if stored is not None:
        if "active" in stored:  # the simulator's hidden activity flag: does a model score on inactive drugs?
            stored = stored.assign(active=stored["active"].astype(int).map({1: "active", 0: "inactive"}))
        for col in [c for c in ("mechanism", "active", "target", "pathway") if c in stored]:
            for m in judged:
                g = group_table(results, stored[col], m)
                if not g.empty:
                    sections.append((f"Per drug group: {col} ({m}; conditions pooled over seeds)", g.to_string(), None))
    if annotations is not None:
        tested = results["drug"].nunique()
        matched = results["drug"].isin(annotations.index).groupby(results["drug"], observed=True).first().sum()
        for m in judged:
            g = group_table(results, annotations, m)
            sections.append(
                (
                    f"Per drug group: {annotation_name} ({m}; {matched} of {tested} drugs annotated)",
                    g.to_string() if not g.empty else "no tested drug matched the annotation table",
                    None,
                )
            )
    nov = novelty(results, smiles, metric) if smiles else pd.DataFrame()
    if missing and results["task"].isin(NOVELTY_TASKS).any():
        sections.append(("Chemical novelty of test drugs (unseen-drug tasks)", f"not shown: {missing}.", None))
    if not nov.empty:
        sections.append(
            (
                "Chemical novelty of test drugs (unseen-drug tasks)",
                nov.assign(bin=pd.cut(nov["max_tanimoto"], [0, 0.2, 0.3, 0.4, 0.6, 1.0001], right=False))
                .pivot_table(index="bin", columns="model", values="value", aggfunc="mean", observed=False)
                .round(3)
                .to_string(),
                png(novelty_figure(nov, metric), folder / "fig_novelty.png"),
            )
        )
    return sections


def _run_facts(results: pd.DataFrame, splits: pd.DataFrame, folder: Path, model: str) -> list[Section]:
    """Per-gene view, costs, which peers ran, what the backbone saw."""
    sections: list[Section] = []
    preds, task = first_predictions(folder, model)
    if preds is not None:
        sections.append(
            (
                f"Per-gene view: top-20 DEGs of the two most-changed test conditions ({model})",
                "Grey squares: control; black: observed (± SD across cells when stored); red x: predicted.",
                png(genes_figure(preds, model, task), folder / "fig_genes.png"),
            )
        )
    costs = cost_table(folder)
    if not costs.empty:
        sections.append(
            (
                "Cost (seconds per split for fit + predict; peak_python_mb = peak Python-heap allocation "
                "traced by tracemalloc, which does not see torch's tensor memory; peak_rss_mb = the median over a "
                "model's cells of the process's highest resident memory during fit + predict (sampled every "
                "20 ms; torch's tensors, the imports and the loaded data included); "
                "parameters, '-' = closed form)",
                _cost_text(costs),
                None,
            )
        )
    made = stack_table(_cell_costs(folder))
    if not made.empty:
        sections.append(
            (
                f"What the recommended model ({RECOMMENDED}) was made of: per task, the mean weight (w_) of each "
                "expert's deviation from the drug-blind anchor (scaled_mean), the share of splits where the stack "
                "beat the anchor out of fold (used; elsewhere it predicts the anchor), and the out-of-fold mse and "
                "rank on the training data that chose them (held_out: the line, on line tasks)",
                made.T.to_string(),
                None,
            )
        )
    calib = calibration_table(results)
    if not calib.empty:
        sections.append(
            (
                "Prediction intervals (conformal, calibrated on the training data's own splits; coverage over "
                "the top-k DEGs, mean over seeds; error_spearman = Spearman of expected against realised mse)",
                calibration_text(calib) + "\n\n" + calib.to_string(),
                png(calibration_figure(results), folder / "fig_calibration.png"),
            )
        )
    sections.append(("Published peers", peers_text(splits, _cell_costs(folder)), None))
    audit_path = folder / "backbone_audit.json"
    if audit_path.exists():
        sections.append(
            ("What the backbone saw in pretraining", backbone_text(json.loads(audit_path.read_text())), None)
        )

    return sections
