"""Differentially expressed genes per condition against its line's control: scanpy's t-test,
computed from pseudobulk summary statistics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd


class Screen(Protocol):
    """What these functions read of a `scdca.data.screen.PerturbationData` (a protocol, so that
    the screen may import this module without this module importing the screen)."""

    @property
    def ids(self) -> Sequence[str]: ...
    @property
    def genes(self) -> Any: ...  # (G,) names
    @property
    def space(self) -> str: ...

    @property
    def degs(self) -> Any: ...  # condition id -> gene positions by |t|
    @property
    def mean(self) -> np.ndarray | None: ...  # (N, G)
    @property
    def std(self) -> np.ndarray | None: ...  # (N, G)
    @property
    def conditions(self) -> pd.DataFrame: ...
    @property
    def controls(self) -> pd.DataFrame: ...
    @property
    def control_mean(self) -> np.ndarray: ...  # (L, G)
    @property
    def control_std(self) -> np.ndarray: ...  # (L, G)


log = logging.getLogger(__name__)


def welch_t(mean1, std1, n1, mean0, std0, n0) -> np.ndarray:
    """Welch's t statistic of group 1 vs group 0 from summary statistics (as scanpy's 't-test')."""
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(std1**2 / n1 + std0**2 / n0)
        t = (mean1 - mean0) / se
    return np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def rank_degs(data: Screen) -> dict[str, np.ndarray]:
    """Rank every gene per condition by |Welch t| against the same line's control.

    Matches scanpy `rank_genes_groups(method='t-test', rankby_abs=True, reference=control)`
    run within each cell line. When a condition or its control has a single row (bulk
    input), genes are ranked by the absolute change from control instead.
    """
    n1, n0, m0, s0 = _versus_control(data)
    score = welch_t(data.mean, data.std, n1, m0, s0, n0)
    bulk = (n1[:, 0] < 2) | (n0[:, 0] < 2)
    score[bulk] = (data.mean - m0)[bulk]
    # stable sort on -|score|, ties broken by gene order
    order = np.argsort(-np.abs(score), axis=1, kind="stable").astype(np.int32)
    return dict(zip(data.ids, order))


def deg_statistics(data: Screen) -> dict[str, np.ndarray]:
    """scanpy's t-test statistics of every condition against its line's control, (N, G) each.

    scores = Welch t; logfoldchanges = log2 of the ratio of mean expression on the count
    scale (expm1 of the log1p means, + 1e-9), as scanpy reports them (on change-space data, LINCS
    levels 4-5, the change itself); pvals two-sided from
    the Welch-Satterthwaite degrees of freedom; pvals_adj by Benjamini-Hochberg within each
    condition. NaN where a group has a single row (bulk input: no variance).
    """
    from scipy import stats

    n1, n0, m0, s0 = _versus_control(data)
    if data.mean is None or data.std is None:
        raise ValueError("deg_statistics: the conditions need their observed means and standard deviations")
    m1, s1, m0, s0 = (x.astype(np.float64) for x in (data.mean, data.std, m0, s0))
    with np.errstate(invalid="ignore", divide="ignore"):
        v1, v0 = s1**2 / n1, s0**2 / n0
        t = (m1 - m0) / np.sqrt(v1 + v0)
        dof = (v1 + v0) ** 2 / (v1**2 / (n1 - 1) + v0**2 / (n0 - 1))
        pvals = 2 * stats.t.sf(np.abs(t), dof)
    if data.space == "change":  # signed changes (LINCS levels 4-5): the change itself, in the file's units
        lfc = m1 - m0
    else:
        lfc = np.log2((np.expm1(m1) + 1e-9) / (np.expm1(m0) + 1e-9))
    return {"scores": t, "logfoldchanges": lfc, "pvals": pvals, "pvals_adj": _bh(pvals)}


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values along each row (scipy; NaN stays NaN)."""
    from scipy import stats

    out = np.full_like(p, np.nan)
    whole = ~np.isnan(p).any(1)
    if whole.any():  # one vectorised call for the rows without NaN (the usual case)
        out[whole] = stats.false_discovery_control(p[whole], axis=1, method="bh")
    for i in np.flatnonzero(~whole):
        ok = ~np.isnan(p[i])
        if ok.any():
            out[i, ok] = stats.false_discovery_control(p[i, ok], method="bh")
    return out


def _versus_control(data: Screen):
    """Per condition: its cell count n1 (N, 1) and its line's control count n0 (N, 1), mean and std (N, G)."""
    ctrl_pos = data.controls.index.get_indexer(data.conditions["cell_line"])
    n1 = data.conditions["n_cells"].to_numpy()[:, None].astype(float)
    n0 = data.controls["n_cells"].to_numpy()[ctrl_pos][:, None].astype(float)
    return n1, n0, data.control_mean[ctrl_pos], data.control_std[ctrl_pos]


DEG_COLUMNS = ("names", "scores", "logfoldchanges", "pvals", "pvals_adj")  # scanpy's, in its order


def deg_long_table(data: Screen, *, n_degs: int = 100) -> pd.DataFrame:
    """Each condition's top DEGs (`data.degs` order) with scanpy's t-test statistics, one row
    per (condition, rank): columns group (condition id) and `DEG_COLUMNS`, as
    `sc.get.rank_genes_groups_df` returns them. At most n_degs per condition (fewer when the
    data keeps fewer, e.g. taken from the file's uns).

    This long form is what scdca stores in files (uns['rank_genes_groups_df']): scanpy's own
    layout (record arrays with one field per group) cannot be written to .h5ad beyond a few
    hundred groups (HDF5's 64 KB object-header limit), and screens have thousands of
    conditions. `rank_genes_groups_uns` turns it into scanpy's layout in memory.
    """
    ids = data.ids
    n = min([n_degs] + [len(data.degs[i]) for i in ids])
    stat = deg_statistics(data)
    ranked = np.stack([np.asarray(data.degs[i])[:n] for i in ids])  # (N, n)
    rows = np.arange(len(ids))[:, None]
    table = {
        "group": pd.Categorical(np.repeat(np.asarray(ids, dtype=str), n), categories=[str(i) for i in ids]),
        "names": np.asarray(data.genes, dtype=object)[ranked].astype(str).ravel(),
    }
    for key in DEG_COLUMNS[1:]:
        table[key] = stat[key][rows, ranked].astype(np.float32).ravel()
    return pd.DataFrame(table)


def rank_genes_groups_uns(table: pd.DataFrame) -> dict:
    """scanpy's `uns['rank_genes_groups']` (record arrays, one field per group) from a
    `deg_long_table`, for scanpy's plots and `sc.get.rank_genes_groups_df`:

        >>> a.uns["rank_genes_groups"] = rank_genes_groups_uns(a.uns["rank_genes_groups_df"])
    """
    groups = list(pd.unique(table["group"].astype(str)))
    by_group = {g: t for g, t in table.groupby(table["group"].astype(str), sort=False)}
    out: dict[str, Any] = {
        "params": {
            "groupby": "condition_id",
            "reference": "control of the same cell line",
            "method": "t-test",
            "use_raw": False,
            "layer": "mean",
            "corr_method": "benjamini-hochberg",
        }
    }
    for key in DEG_COLUMNS:
        dtype = "O" if key == "names" else "float32"
        out[key] = np.rec.fromarrays([by_group[g][key].to_numpy() for g in groups], dtype=[(g, dtype) for g in groups])
    return out


def condition_degs(data: Screen, given, *, n_degs: int | None) -> dict[str, np.ndarray]:
    computed = rank_degs(data)
    if isinstance(given, dict) and given:
        gene_pos = pd.Index(data.genes)
        n_used = 0
        for cid in data.ids:
            if cid in given:
                pos = gene_pos.get_indexer([str(g) for g in np.asarray(given[cid]).ravel()])
                pos = pos[pos >= 0]
                if len(pos):
                    computed[cid] = pos.astype(np.int32)
                    n_used += 1
        log.info("data: took DEGs for %d of %d conditions from uns", n_used, len(data.ids))
    if n_degs is not None:
        computed = {k: v[:n_degs] for k, v in computed.items()}
    return computed
