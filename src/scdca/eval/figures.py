"""The report's figures: each takes its table (and optionally the axes to draw on) and returns
the matplotlib figure, so a notebook can place them in its own layout:

    fig, axes = plt.subplots(1, 4)
    bars_figure(results, "pearson_delta_deg", axes=axes)
"""

from __future__ import annotations

import base64
import glob
import io
from pathlib import Path

import numpy as np
import pandas as pd

from scdca import storage
from scdca.eval.runs import REFERENCES, read_predictions
from scdca.eval.stats import per_seed
from scdca.eval.tables import BASELINES
from scdca.models.peers import PEERS


def _pyplot():
    """pyplot with a file backend (no display needed), imported only when a figure is drawn."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(axes, n: int, figsize, *, column: bool = False, **subplots) -> tuple:
    """(figure, n axes): the caller's axes, or a new one-row (or one-column) figure."""
    if axes is not None:
        axes = list(np.ravel(axes))
        if len(axes) != n:
            raise ValueError(f"axes: {len(axes)} given, this figure draws {n} panels")
        return axes[0].figure, axes
    fig, new = _pyplot().subplots(*((n, 1) if column else (1, n)), figsize=figsize, squeeze=False, **subplots)
    return fig, list(new.ravel())


def model_colors(models) -> dict:
    """One distinct, stable colour per model name (sorted), shared by the line figures."""
    plt = _pyplot()
    return {m: plt.cm.tab20(i % 20) for i, m in enumerate(sorted(set(models)))}


def novelty_figure(nov: pd.DataFrame, metric: str, *, axes=None):
    """Left: the test drugs' max Tanimoto to training; right: each model's score by that similarity."""
    drugs = nov.drop_duplicates(["task", "seed", "drug"])
    fig, (ax1, ax2) = _axes(axes, 2, (10, 3.6))
    ax1.hist(drugs["max_tanimoto"], bins=np.linspace(0, 1, 21), color="#555555")
    ax1.axvline(0.4, color="red", ls="--", lw=1)
    ax1.set_xlabel("max Tanimoto to training drugs (Morgan r=2, 2048 bits)")
    ax1.set_ylabel("test drugs (all seeds)")
    ax1.set_title(f"{np.mean(drugs['max_tanimoto'] < 0.4):.0%} of test drugs below 0.4", fontsize=10)
    bins = [0, 0.2, 0.3, 0.4, 0.6, 1.0001]
    nov = nov.assign(bin=pd.cut(nov["max_tanimoto"], bins, right=False))
    colors = model_colors(nov["model"])
    for model, g in nov.groupby("model"):
        m = g.groupby("bin", observed=False)["value"].mean()
        ax2.plot(
            [f"{b.left:.1f}-{min(b.right, 1):.1f}" for b in m.index],
            m.to_numpy(),
            marker="o",
            label=model,
            color=colors[model],
            ls="--" if model in REFERENCES else "-",
        )
    ax2.set_xlabel("max Tanimoto to training (bin)")
    ax2.set_ylabel(metric)
    ax2.set_title("score of test drugs by similarity to training", fontsize=10)
    ax2.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def first_predictions(folder: Path, model: str):
    """(the model's first seed-0 prediction file, its task), or (None, None) when it has none."""
    files = sorted(glob.glob(str(folder / "predictions" / f"{model}__*__seed0.h5ad")))
    return (read_predictions(files[0]), Path(files[0]).stem.split("__")[1]) if files else (None, None)


def genes_figure(a, model: str, task: str, *, n_conditions: int = 2, k: int = 20, axes=None):
    """Control, observed (± cell SD) and predicted expression of the top-k DEGs for the
    conditions with the largest observed change (paper's Figure 4); `a` is a prediction file."""
    change = np.abs(a.layers["observed"] - a.layers["control"]).mean(1)
    picks = np.argsort(-change)[:n_conditions]
    genes = pd.Index(a.var_names)
    fig, axes = _axes(axes, n_conditions, (10, 2.8 * n_conditions), column=True)
    for ax, i in zip(axes, picks):
        cid = a.obs_names[i]
        names = [g for g in a.uns["degs"].loc[cid].tolist() if g][:k]
        idx = genes.get_indexer(names)
        x = np.arange(len(idx))
        ax.plot(x, a.layers["control"][i, idx], "s", color="#999999", label="control")
        sd = a.layers["observed_std"][i, idx] if "observed_std" in a.layers else None
        ax.errorbar(
            x,
            a.layers["observed"][i, idx],
            yerr=sd,
            fmt="o",
            color="black",
            capsize=2,
            label="observed" + (" ± cell SD" if sd is not None else ""),
        )
        ax.plot(x, np.asarray(a.X)[i, idx], "x", color="#d62728", ms=8, label=f"predicted ({model})")
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_ylabel("log1p expression")
        ax.set_title(f"{cid} ({task}, seed 0)", fontsize=9)
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def bars_figure(results: pd.DataFrame, metric: str, *, axes=None):
    """One panel per task: each model's mean ± SE over seeds, coloured by kind of model."""
    s = per_seed(results, metric).groupby(["task", "model"])["value"].agg(["mean", "sem"]).reset_index()
    tasks = list(dict.fromkeys(s["task"]))
    fig, axes = _axes(axes, len(tasks), (3.6 * len(tasks), 3.8), sharey=True)
    for ax, task in zip(axes, tasks):
        t = s[s["task"] == task]
        colors = [
            "#999999" if m in REFERENCES else "#1f77b4" if m in BASELINES else "#ff7f0e" if m in PEERS else "#d62728"
            for m in t["model"]
        ]
        ax.barh(t["model"], t["mean"], xerr=t["sem"].fillna(0), color=colors)
        ax.set_title(task.replace("_", " "), fontsize=10)
        ax.set_xlabel(metric)
        ax.axvline(0, color="black", lw=0.5)
    fig.suptitle(
        f"{metric} by task (mean ± SE over seeds; grey = references, blue = baselines, "
        f"orange = published peers, red = scDCA & co.)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def sweep_figure(sweep: pd.DataFrame, *, axes=None):
    """One panel per task: R² of expression over the top-k DEGs as k grows, one line per model."""
    tasks = list(dict.fromkeys(sweep["task"]))
    fig, axes = _axes(axes, len(tasks), (3.6 * len(tasks), 3.4), sharey=True)
    order = [k for k in ("10", "20", "50", "100", "200", "all") if k in set(sweep["k"])]
    # the axis starts just below 'control' (no change), so one collapsed model cannot flatten the
    # others into a single line; models cut off are named under each panel
    anchor = sweep[sweep["model"] == "control"]["value"]
    floor = float(anchor.min()) - 0.1 if len(anchor) else float(sweep["value"].min())
    colors = model_colors(sweep["model"])
    for ax, task in zip(axes, tasks):
        t = sweep[sweep["task"] == task]
        for model, g in t.groupby("model"):
            g = g.set_index("k").reindex(order)
            ax.plot(
                order, g["value"], marker="o", label=model, color=colors[model], ls="--" if model in REFERENCES else "-"
            )
        ax.set_title(task.replace("_", " "), fontsize=10)
        below = t[t["value"] < floor].groupby("model")["value"].min()
        note = "\n".join(f"{m} below axis (min {v:.2f})" for m, v in below.items())
        ax.set_xlabel("top-k DEGs" + (f"\n{note}" if note else ""))
        ax.set_ylabel("R² (expression)")
    top = float(sweep["value"].max())
    for ax in axes:
        ax.set_ylim(floor, top + 0.02 * max(top - floor, 1e-3))
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def png(fig, path: Path) -> str:
    """Write the figure to `path` (atomically), close it, and return the PNG as base64."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    with storage.atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return base64.b64encode(data).decode()


def calibration_figure(results: pd.DataFrame, *, axes=None):
    """Nominal against realised coverage of the prediction intervals, one panel per task, one line per model."""
    from scdca.intervals import LEVELS

    names = {f"coverage_{round(100 * lv)}": lv for lv in LEVELS}
    r = results[results["metric"].isin(names)].astype({"model": object, "task": object, "metric": object})
    tasks = list(dict.fromkeys(r["task"]))
    fig, axs = _axes(axes, len(tasks), (3.4 * len(tasks), 3.4), sharey=True)
    colors = model_colors(r["model"])
    for ax, task in zip(axs, tasks):
        realised = r[r["task"] == task].groupby(["model", "metric"], observed=True)["value"].mean()
        for model in realised.index.get_level_values(0).unique():
            cov = realised[model]
            ax.plot([names[m] for m in cov.index], cov.to_numpy(), "o-", color=colors[model], label=model)
        ax.plot([0.4, 1], [0.4, 1], color="grey", ls="--", lw=1)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("nominal coverage")
    axs[0].set_ylabel("realised coverage (top-k DEGs)")
    axs[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
