"""From AnnData to pseudobulk perturbation data.

Everything downstream of this module works on :class:`PerturbationData`: one row
per condition (cell line x drug x dose) holding the mean log1p expression of its
cells, plus each cell line's control (vehicle) mean. Obs columns are read here,
by the names in :class:`DataKeys`, and nowhere else.

Single-cell and already-pseudobulk (bulk, L1000-style) inputs follow the same
path: rows are grouped by condition; a condition with one row simply has n=1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdca.chem.molecules import canonicalize
from scdca.data.cells import CellSample, sample_cells
from scdca.data.degs import condition_degs, deg_long_table
from scdca.data.expression import (
    HVG_SAMPLE_CELLS,
    holds_changes,
    looks_like_counts,
    matrix_chunks,
    normalize_log1p,
    sample_rows,
    says_log_scale,
    select_genes,
    validated_genes,
    validated_matrix,
)
from scdca.data.keys import CHANGE_SCALE, CONTROL_NAMES, SCALE_KEY, TRUTH_KEY, DataKeys, condition_id
from scdca.data.lincs import is_lincs, read_lincs
from scdca.errors import ScdcaInputError, reason

log = logging.getLogger(__name__)


@dataclass
class PerturbationData:
    """Pseudobulk perturbation data: what every model, split and metric consumes.

    Attributes:
        genes: gene names, shape (G,).
        conditions: one row per condition, indexed by condition id, with columns
            cell_line, drug, dose, smiles, n_cells.
        mean: observed mean log1p expression, (N, G); None when observations were withheld.
        std: observed per-gene standard deviation across cells, (N, G) (NaN when n_cells=1).
        controls: one row per cell line (index) with column n_cells.
        control_mean: (L, G) mean control expression per cell line, rows ordered as `controls`.
        control_std: (L, G).
        degs: condition id -> gene indices ranked by differential expression vs control.
        half_a, half_b: (N, G) means of two random halves of each condition's cells
            (split-half noise ceiling); None when not available.
        truth: (N, G) noise-free expected means (simulated data only).
        cells: a bounded sample of single cells per condition and per control line, for
            set-based models (`load(cells_per_condition=k)`); None on pseudobulk or bulk input.
        space: 'expression' (log-scale expression; controls measured), or 'change' (every profile
            is a change already, as LINCS levels 4-5: each line's control is a zero reference).
    """

    genes: np.ndarray
    conditions: pd.DataFrame
    mean: np.ndarray | None
    std: np.ndarray | None
    controls: pd.DataFrame
    control_mean: np.ndarray
    control_std: np.ndarray
    degs: dict[str, np.ndarray] = field(default_factory=dict)
    half_a: np.ndarray | None = None
    half_b: np.ndarray | None = None
    truth: np.ndarray | None = None
    cells: CellSample | None = None
    space: Literal["expression", "change"] = "expression"

    @property
    def observed(self) -> np.ndarray:
        """`mean`, the observed (N, G) means; an error on a query, whose observations were withheld."""
        if self.mean is None:
            raise ScdcaInputError("data: these conditions carry no observations (a query); subset with observed=True")
        return self.mean

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def ids(self) -> list[str]:
        return list(self.conditions.index)

    @property
    def cell_lines(self) -> list[str]:
        return list(self.controls.index)

    @property
    def drugs(self) -> list[str]:
        return sorted(self.conditions["drug"].unique())

    def drug_smiles(self) -> dict[str, str]:
        return dict(zip(self.conditions["drug"], self.conditions["smiles"]))

    def control_for(self, cell_lines: Sequence[str]) -> np.ndarray:
        """Control mean expression for each given cell line -> (n, G)."""
        idx = self.controls.index.get_indexer(list(cell_lines))
        if (idx < 0).any():
            missing = sorted({c for c, i in zip(cell_lines, idx) if i < 0})
            raise ScdcaInputError(f"no control expression for cell line(s) {missing!r}")
        return self.control_mean[idx]

    def delta(self) -> np.ndarray:
        """Observed change from the line's control, (N, G)."""
        if self.mean is None:
            raise RuntimeError("observations were withheld from this PerturbationData")
        return self.mean - self.control_for(self.conditions["cell_line"])

    def to_anndata(self, *, n_degs: int = 100) -> ad.AnnData:
        """Pseudobulk AnnData for scanpy: one row per condition, then one control row per line.

        X = layers['mean'] = mean log1p expression; layers['std'] = across-cell standard
        deviation; obs: condition_id, cell_line, drug, dose, smiles, control (bool) and
        n_cells (the cells behind each row's mean and std, per row as it holds for every gene).
        uns['rank_genes_groups_df'] holds each condition's top `n_degs` ranked DEGs against its
        line's control with scanpy's t-test statistics (`deg_long_table`);
        `rank_genes_groups_uns` makes scanpy's layout of it for scanpy's plots.
        """
        if self.mean is None:
            raise ScdcaInputError(
                "to_anndata: this PerturbationData holds no observations (a query made with "
                "observed=False); call it on the loaded data or a subset with observed=True"
            )
        cond = self.conditions
        lines = list(self.controls.index)
        obs = pd.concat(
            [
                pd.DataFrame(
                    {
                        "condition_id": cond.index.astype(str),
                        "cell_line": cond["cell_line"].astype(str),
                        "drug": cond["drug"].astype(str),
                        "dose": cond["dose"].astype(float),
                        "smiles": cond["smiles"].astype(str),
                        "control": False,
                        "n_cells": cond["n_cells"].astype(int),
                    }
                ),
                pd.DataFrame(
                    {
                        "condition_id": [f"{c}_control" for c in lines],
                        "cell_line": lines,
                        "drug": "control",
                        "dose": 0.0,
                        "smiles": "",
                        "control": True,
                        "n_cells": self.controls["n_cells"].astype(int).to_numpy(),
                    }
                ),
            ],
            ignore_index=True,
        )
        obs.index = obs["condition_id"].to_numpy()
        mean = np.vstack([self.mean, self.control_mean]).astype(np.float32)
        std = np.vstack(
            [self.std if self.std is not None else np.full_like(self.mean, np.nan), self.control_std]
        ).astype(np.float32)
        adata = ad.AnnData(X=mean.copy(), obs=obs, var=pd.DataFrame(index=[str(g) for g in self.genes]))
        adata.layers["mean"], adata.layers["std"] = mean, std
        adata.uns["rank_genes_groups_df"] = deg_long_table(self, n_degs=n_degs)
        if self.space == "change":
            adata.uns[SCALE_KEY] = CHANGE_SCALE
        return adata

    def subset(self, ids: Sequence[str], *, observed: bool = True) -> PerturbationData:
        """The conditions `ids`, with all controls. `observed=False` drops every observation,

        which is what a model's `predict` receives, so it cannot peek at test data.
        """
        ids = list(ids)
        pos = self.conditions.index.get_indexer(ids)
        if (pos < 0).any():
            bad = [i for i, p in zip(ids, pos) if p < 0][:10]
            raise ScdcaInputError(f"unknown condition id(s) {bad!r}")

        def take(a):
            return None if (a is None or not observed) else a[pos]

        return replace(
            self,
            conditions=self.conditions.iloc[pos].copy(),
            mean=take(self.mean),
            std=take(self.std),
            half_a=take(self.half_a),
            half_b=take(self.half_b),
            truth=take(self.truth),
            cells=None if self.cells is None else self.cells.subset(ids, observed=observed),
            degs={i: self.degs[i] for i in ids if i in self.degs} if observed else {},
        )


# ----------------------------------------------------------------------------- loading


def read(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    what: str = "data",
    backed: str | None = None,
    compounds: str | os.PathLike | None = None,
    keys: DataKeys | None = None,
    lincs: dict | None = None,
) -> ad.AnnData:
    """Read an .h5ad file, or LINCS .gct/.gctx plates (`scdca.data.lincs.read_lincs`, with the
    `compounds` table giving their SMILES; one file, several joined by commas, or a folder; `lincs`:
    read_lincs's other keyword arguments), with a clear error when it is missing, empty, truncated
    or not AnnData. `what` names the argument in the error message.
    """
    if not isinstance(path, (str, os.PathLike)) or "," in os.fspath(path) or os.path.isdir(path):
        if isinstance(path, str):
            paths: list = [p.strip() for p in path.split(",")]
        else:  # a folder as a Path, or a list of files
            paths = [path] if isinstance(path, os.PathLike) else list(path)
        if not is_lincs(paths if len(paths) > 1 else paths[0]):
            raise ScdcaInputError(
                f"{what}: {path!r} names several files or a folder; only LINCS .gct/.gctx plates are read together"
            )
        return read_lincs(paths, compounds=compounds, keys=keys or DataKeys(), **(lincs or {}))
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ScdcaInputError(f"{what}: file {path!r} does not exist; pass the path of an .h5ad, .gct or .gctx file")

    if is_lincs(path):
        return read_lincs(path, compounds=compounds, keys=keys or DataKeys(), **(lincs or {}))
    if compounds is not None:
        raise ScdcaInputError(
            f"compounds: {os.fspath(compounds)!r} is given, but {what} {path!r} is not a LINCS "
            f".gct/.gctx file; SMILES of an .h5ad come from its obs (--smiles-key)"
        )
    if not path.endswith(".h5ad"):
        raise ScdcaInputError(f"{what}: {path!r} is not an .h5ad, .gct or .gctx file; convert it with anndata first")
    if os.path.getsize(path) == 0:
        raise ScdcaInputError(f"{what}: {path!r} is empty (0 bytes); rewrite it, e.g. with adata.write_h5ad")
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as err:  # h5py/anndata raise OSError, KeyError, TypeError... on a broken file
        raise ScdcaInputError(
            f"{what}: {path!r} could not be read as AnnData ({reason(err, 160)}); the file is "
            f"truncated or not an .h5ad file: rewrite it with adata.write_h5ad"
        ) from None


def load(
    adata: ad.AnnData | str | os.PathLike,
    *,
    keys: DataKeys = DataKeys(),
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    n_degs: int | None = None,
    normalize: Literal["auto", "counts", "log"] = "auto",
    seed: int = 0,
    chunk_size: int | None = None,
    compounds: str | os.PathLike | None = None,
    cells_per_condition: int = 0,
    control_cells_per_line: int | None = None,
    lincs: dict | None = None,
) -> PerturbationData:
    """Turn single-cell or pseudobulk AnnData into :class:`PerturbationData`.

    Args:
        adata: AnnData or path to an .h5ad file.
        keys: where to find cell line, drug, SMILES, dose and control flags.
        genes: keep exactly these genes (in this order).
        n_top_genes: otherwise keep the top-N highly variable genes (scanpy, on log data).
        n_degs: keep only the top-N ranked DEGs per condition (None keeps the full ranking).
        normalize: 'counts' applies normalize_total(1e4) + log1p, 'log' uses values as given,
            'auto' detects raw counts (non-negative integers with a maximum above 30).
        seed: seed for the split-half assignment of each condition's cells.
        chunk_size: stream the expression matrix from a backed file in chunks of this many
            cells, so memory does not grow with the number of cells (atlas-scale files);
            None reads it whole. Results equal the in-memory ones (float64 sums), except
            that 'auto' normalisation looks at the first chunk only and `n_top_genes` is
            chosen on a random sample of `HVG_SAMPLE_CELLS` cells.
        compounds: for a LINCS .gct/.gctx path, the table mapping its compounds to SMILES.
        cells_per_condition: also keep up to this many cells of each condition (seeded by
            `seed`) as `data.cells`, for set-based models; 0 keeps none. Ignored for LINCS
            plates, whose rows are wells, not cells.
        control_cells_per_line: with `cells_per_condition`, keep up to this many control cells
            of each line (default: `cells_per_condition`).
        lincs: for LINCS files, `read_lincs`'s selection and schema arguments (level, col_meta,
            cell_id, pert_time, pert_id, plates, genes).

    Returns:
        PerturbationData with conditions, control means, DEGs and split halves.

    Example:
        >>> data = scdca.data.load("sciplex3.h5ad", n_top_genes=2000)
    """
    if not isinstance(adata, ad.AnnData):
        adata = read(adata, backed="r" if chunk_size else None, compounds=compounds, keys=keys, lincs=lincs)
    obs = _validated_obs(adata, keys)
    gene_names, chunks = _expression(adata, keys, genes, n_top_genes, normalize, seed, chunk_size)
    is_ctrl, lines_all, codes, conditions = _condition_table(obs, keys)
    k_control = cells_per_condition if control_cells_per_line is None else control_cells_per_line
    for arg, k in (("cells_per_condition", cells_per_condition), ("control_cells_per_line", k_control)):
        if k < 0:
            raise ScdcaInputError(f"{arg}: {k!r}; use 0 (keep no cells) or more")
    if "lincs" in adata.uns:  # wells of a plate: pseudobulk profiles already
        cells_per_condition = 0
    ks = (cells_per_condition, k_control) if cells_per_condition else None
    parts = _aggregate(obs, is_ctrl, lines_all, codes, conditions, len(gene_names), chunks, seed, ks)
    data = PerturbationData(
        genes=np.asarray(gene_names, dtype=object),
        conditions=conditions,
        **parts,
        space="change" if holds_changes(adata) else "expression",
    )
    data.degs = condition_degs(data, adata.uns.get(keys.degs_uns), n_degs=n_degs)
    data.truth = _truth(adata.uns.get(TRUTH_KEY), data)
    return data


def _expression(adata, keys: DataKeys, genes, n_top_genes, normalize, seed: int, chunk_size):
    """The kept gene names and the normalised matrix as (first row, rows) chunks, streamed when
    `chunk_size` is given (highly variable genes then chosen on a sample of cells)."""
    gene_names = validated_genes(adata, keys)
    if normalize not in ("auto", "counts", "log"):
        raise ScdcaInputError(f"normalize: {normalize!r} is not one of 'auto', 'counts', 'log'")
    if chunk_size is not None and chunk_size < 1:
        raise ScdcaInputError(f"chunk_size: {chunk_size!r}; use a positive number of cells per chunk, or None")
    if chunk_size is None:
        X = validated_matrix(adata, keys)
        first = X
    else:
        first = next(matrix_chunks(adata, keys, chunk_size))[1]
    if normalize == "auto":  # a file that says it is log-scale (LINCS: log2) is never taken for counts
        normalize = "counts" if not says_log_scale(adata) and looks_like_counts(first) else "log"
    if normalize == "counts":
        log.info("data: raw counts detected; applying normalize_total(1e4) + log1p")
    norm = normalize_log1p if normalize == "counts" else (lambda A: A)
    if chunk_size is None:
        X = norm(X)
        keep = select_genes(X, gene_names, genes=genes, n_top_genes=n_top_genes)
        chunks: Iterable[tuple[int, Any]] = [(0, X[:, keep])]
    else:
        sample = None
        if genes is None and n_top_genes is not None and n_top_genes < len(gene_names):
            sample = norm(sample_rows(adata, keys, HVG_SAMPLE_CELLS, seed))
        keep = select_genes(sample, gene_names, genes=genes, n_top_genes=n_top_genes, n_genes=len(gene_names))
        chunks = ((i, norm(A)[:, keep]) for i, A in matrix_chunks(adata, keys, chunk_size))
    gene_names = gene_names[keep]

    return gene_names, chunks


def _condition_table(obs: pd.DataFrame, keys: DataKeys):
    """Which cells are controls, the cell lines, each treated cell's condition code and the
    condition table (cell_line, drug, dose, smiles, n_cells); every line must have controls."""
    is_ctrl = obs["_control"].to_numpy()
    treated = obs.loc[~is_ctrl]
    lines_all = sorted(obs["_cell_line"].unique())
    lines_ctrl = set(obs.loc[is_ctrl, "_cell_line"])
    no_ctrl = [c for c in lines_all if c not in lines_ctrl]
    if no_ctrl:
        raise ScdcaInputError(
            f"{keys.cell_line}: cell line(s) {no_ctrl!r} have no control cells; every line needs "
            f"vehicle cells (flag them in obs[{keys.control!r}] or name their drug 'control'), "
            f"or drop these lines."
        )
    if len(treated) == 0:
        raise ScdcaInputError("data: no perturbed (non-control) cells found; check the control flag")

    smiles = _drug_smiles(treated, keys)
    codes, conditions = _condition_codes(treated)
    conditions["smiles"] = conditions["drug"].map(smiles)
    n_cond = len(conditions)
    conditions["n_cells"] = np.bincount(codes, minlength=n_cond)

    return is_ctrl, lines_all, codes, conditions


def _aggregate(obs, is_ctrl, lines_all, codes, conditions, n_genes: int, chunks, seed: int, ks) -> dict:
    """One streaming pass over the matrix: per condition and per control line the mean and std
    (float64 sums), each condition's split halves (its cells assigned by `seed`), and with
    `ks` = (k, k_control) a `CellSample` of up to k cells per condition and k_control control
    cells per line (None: no sample)."""
    n_cond = len(conditions)
    # per-cell group codes (-1: not in the grouping)
    cond_code = np.full(len(obs), -1, dtype=np.int64)
    cond_code[~is_ctrl] = codes
    in_a = _half_assignment(codes, n_cond, seed=seed)
    half_code = {h: np.full(len(obs), -1, dtype=np.int64) for h in "ab"}
    if in_a is not None:
        half_code["a"][~is_ctrl] = np.where(in_a, codes, -1)
        half_code["b"][~is_ctrl] = np.where(in_a, -1, codes)
    ctrl_code = np.full(len(obs), -1, dtype=np.int64)
    ctrl_code[is_ctrl] = pd.Index(lines_all).get_indexer(obs["_cell_line"].to_numpy()[is_ctrl])
    sums = {
        name: _GroupSums(n, n_genes)
        for name, n in (("cond", n_cond), ("a", n_cond), ("b", n_cond), ("ctrl", len(lines_all)))
    }
    groupings = {"cond": cond_code, "a": half_code["a"], "b": half_code["b"], "ctrl": ctrl_code}
    group = np.where(cond_code >= 0, cond_code, np.where(ctrl_code >= 0, n_cond + ctrl_code, -1))
    if ks:
        limits = np.r_[np.full(n_cond, ks[0]), np.full(len(lines_all), ks[1])]
        keep = sample_cells(group, limits, seed=seed)
    else:
        keep = np.zeros(len(obs), dtype=bool)
    kept = []
    for start, A in chunks:
        picked = keep[start : start + A.shape[0]]
        if picked.any():
            kept.append((start + np.flatnonzero(picked), _dense(A[picked]).astype(np.float32)))
        A, A2 = _GroupSums.powers(A)
        for name, code in groupings.items():
            sums[name].add(A, A2, code[start : start + A.shape[0]])
    mean, std = sums["cond"].result()
    half_a = half_b = None
    if in_a is not None:
        single = conditions["n_cells"].to_numpy() < 2
        (half_a, _), (half_b, _) = sums["a"].result(), sums["b"].result()
        half_a[single] = np.nan
        half_b[single] = np.nan
    control_mean, control_std = sums["ctrl"].result()
    controls = pd.DataFrame({"n_cells": sums["ctrl"].n.astype(np.int64)}, index=pd.Index(lines_all, name="cell_line"))

    return {
        "mean": mean,
        "std": std,
        "controls": controls,
        "control_mean": control_mean,
        "control_std": control_std,
        "half_a": half_a,
        "half_b": half_b,
        "cells": _cell_sample(kept, group, conditions, lines_all, ks) if ks else None,
    }


def _cell_sample(kept, group: np.ndarray, conditions: pd.DataFrame, lines_all, ks) -> CellSample:
    """The sampled rows of every chunk as one CellSample (group code -> condition id / line)."""
    rows = np.concatenate([r for r, _ in kept]) if kept else np.zeros(0, dtype=np.int64)
    X = np.vstack([x for _, x in kept]) if kept else np.zeros((0, 0), np.float32)
    g = group[rows]
    n_cond = len(conditions)
    ids = np.asarray(conditions.index, dtype=object)
    lines = np.asarray(lines_all, dtype=object)
    is_cond = g < n_cond
    condition = np.where(is_cond, ids[np.minimum(g, n_cond - 1)], "").astype(object)
    line = np.where(is_cond, conditions["cell_line"].to_numpy(object)[np.minimum(g, n_cond - 1)],
                    lines[np.maximum(g - n_cond, 0)]).astype(object)  # fmt: skip
    return CellSample(X=X, condition=condition, cell_line=line, k=ks[0], k_control=ks[1])


# ----------------------------------------------------------------------------- validation


def control_flags(adata: ad.AnnData, keys: DataKeys) -> np.ndarray | None:
    """Which cells are vehicle controls: obs[keys.control] if present, else a control drug
    name in obs[keys.drug]; None when the file has neither column (no perturbation annotation)."""
    if keys.control in adata.obs.columns:
        flag = adata.obs[keys.control]
        try:
            return flag.astype(float).fillna(0).to_numpy() > 0
        except (TypeError, ValueError):
            return flag.astype(str).str.lower().isin(["true", "yes", "control"]).to_numpy()
    if keys.drug in adata.obs.columns:
        return adata.obs[keys.drug].astype(str).str.lower().isin(CONTROL_NAMES).to_numpy()
    return None


def _validated_obs(adata: ad.AnnData, keys: DataKeys) -> pd.DataFrame:
    needed = {"cell_line": keys.cell_line, "drug": keys.drug, "dose": keys.dose}
    missing = [f"{arg}={col!r}" for arg, col in needed.items() if col not in adata.obs.columns]
    if missing:
        raise ScdcaInputError(
            f"obs column(s) not found: {', '.join(missing)}. Available obs columns: "
            f"{list(adata.obs.columns)!r}. Pass the right names via DataKeys "
            f"(CLI: --cell-line-key, --drug-key, --dose-key)."
        )
    obs = pd.DataFrame(index=adata.obs_names)
    obs["_cell_line"] = _str_categorical(adata.obs[keys.cell_line])
    obs["_drug"] = _str_categorical(adata.obs[keys.drug])
    is_ctrl = control_flags(adata, keys)
    assert is_ctrl is not None  # None only without a drug column, which was checked above
    obs["_control"] = is_ctrl
    dup = adata.obs_names[adata.obs_names.duplicated()].unique()
    if len(dup):
        raise ScdcaInputError(
            f"obs_names: {len(dup)} cell name(s) appear more than once, e.g. {list(dup[:5])!r} (files "
            f"concatenated without new names?); make them unique with adata.obs_names_make_unique()."
        )
    dose = pd.to_numeric(adata.obs[keys.dose], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(dose) & ~is_ctrl
    if bad.any():
        examples = adata.obs[keys.dose].to_numpy()[bad][:5]
        raise ScdcaInputError(
            f"obs[{keys.dose!r}]: {bad.sum()} perturbed cell(s) have a missing or non-numeric dose, "
            f"e.g. {list(examples)!r}; give every perturbed cell a numeric dose."
        )
    bad = (dose <= 0) & ~is_ctrl
    if bad.any():
        drugs = sorted(set(adata.obs[keys.drug].astype(str).to_numpy()[bad]))
        raise ScdcaInputError(
            f"obs[{keys.dose!r}]: {bad.sum()} perturbed cell(s) have a zero or negative dose (e.g. "
            f"{[float(x) for x in sorted(set(dose[bad]))[:5]]!r}, drugs {drugs[:5]!r}); "
            f"doses are concentrations > 0 (log-scaled by "
            f"the models). Flag untreated cells as controls (obs[{keys.control!r}]) instead."
        )
    obs["_dose"] = np.where(is_ctrl, 0.0, dose)
    if keys.smiles in adata.obs.columns:
        obs["_smiles"] = adata.obs[keys.smiles].to_numpy()
    else:
        raise ScdcaInputError(
            f"obs column {keys.smiles!r} (SMILES) not found. Available obs columns: "
            f"{list(adata.obs.columns)!r}. Pass the SMILES column via DataKeys(smiles=...) "
            f"(CLI: --smiles-key)."
        )
    return obs


def _str_categorical(col: pd.Series) -> pd.Categorical:
    """A column as a categorical of strings: one small code per cell, not a string per cell."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        names = col.cat.categories.astype(str)
        if not names.duplicated().any():
            return pd.Categorical.from_codes(col.cat.codes.to_numpy(), categories=names)
    return pd.Categorical(col.astype(str).to_numpy())


def _condition_codes(treated: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Each treated cell's condition index and the condition table (cell_line, drug, dose),
    sorted by condition id. Groups on the columns, so no per-cell id strings are built."""
    keys = ["_cell_line", "_drug", "_dose"]
    grouped = treated.groupby(keys, sort=True, observed=True)
    first = grouped.ngroup().to_numpy()
    uniq = grouped.size().index.to_frame(index=False)  # in the order of ngroup (sorted keys)
    ids = np.array(
        [condition_id(c, d, x) for c, d, x in zip(uniq["_cell_line"], uniq["_drug"], uniq["_dose"])], dtype=object
    )
    order = np.argsort(ids, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    conditions = pd.DataFrame(
        {
            "cell_line": uniq["_cell_line"].to_numpy()[order].astype(object),
            "drug": uniq["_drug"].to_numpy()[order].astype(object),
            "dose": uniq["_dose"].to_numpy()[order].astype(float),
        },
        index=pd.Index(ids[order], name="condition_id"),
    )
    return rank[first], conditions


def _drug_smiles(treated: pd.DataFrame, keys: DataKeys) -> dict[str, str]:
    per_drug: dict[str, str | None] = {}
    pairs = treated[["_drug", "_smiles"]].drop_duplicates()  # first occurrence of each pair, in order
    for drug, smi in zip(pairs["_drug"], pairs["_smiles"]):
        if per_drug.get(drug) is None and isinstance(smi, str) and smi.strip() and smi != "nan":
            per_drug[drug] = smi
        else:
            per_drug.setdefault(drug, None)
    return canonicalize(per_drug, arg=f"obs[{keys.smiles!r}]")


# ----------------------------------------------------------------------------- statistics


def _indicator(codes: np.ndarray, n_groups: int, rows: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """(n_groups, n_rows) 0/1 matrix with a one at (codes[i], rows[i])."""
    return sp.csr_matrix((np.ones(len(rows)), (codes, rows)), shape=(n_groups, n_rows))


def _dense(A) -> np.ndarray:
    return A.toarray() if sp.issparse(A) else np.asarray(A)


class _GroupSums:
    """Per-group running sums of x and x^2 (float64) over row chunks -> mean and sample std."""

    def __init__(self, n_groups: int, n_genes: int):
        self.s1 = np.zeros((n_groups, n_genes))
        self.s2 = np.zeros((n_groups, n_genes))
        self.n = np.zeros(n_groups)

    @staticmethod
    def powers(X) -> tuple:
        """(X, X^2) in float64, computed once per chunk for all groupings."""
        X = X.astype(np.float64)
        return X, (X.multiply(X) if sp.issparse(X) else X**2)

    def add(self, X, X2, codes: np.ndarray) -> None:
        """Add rows: X and X2 = `powers(chunk)`, (rows, G); codes (rows,) is each row's group, -1 for none."""
        rows = np.flatnonzero(codes >= 0)
        if rows.size == 0:
            return
        present, local = np.unique(codes[rows], return_inverse=True)  # only the groups in this chunk
        M = _indicator(local, len(present), rows, X.shape[0])
        self.s1[present] += _dense(M @ X)
        self.s2[present] += _dense(M @ X2)
        self.n[present] += np.bincount(local, minlength=len(present))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32; std has ddof=1 and is NaN for groups of one (mean NaN for empty ones)."""
        n = self.n[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s1 / n
            var = (self.s2 - n * mean**2) / (n - 1)
        var = np.where(n > 1, np.maximum(var, 0.0), np.nan)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _half_assignment(codes: np.ndarray, n_groups: int, *, seed: int) -> np.ndarray | None:
    """Which rows form half A of their group (a seeded random half); None if no group has two rows."""
    counts = np.bincount(codes, minlength=n_groups)
    if counts.max() < 2:
        return None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(codes))
    # rank of each row within its group, in random order
    sorted_idx = order[np.argsort(codes[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[sorted_idx] = np.arange(len(codes)) - np.repeat(starts, counts)
    return rank < (counts[codes] // 2)


def _truth(stored, data: PerturbationData) -> np.ndarray | None:
    if not isinstance(stored, dict) or "ids" not in stored or "mean" not in stored:
        return None
    ids = pd.Index([str(i) for i in stored["ids"]])
    genes = pd.Index([str(g) for g in stored["genes"]])
    rows = ids.get_indexer(data.ids)
    cols = genes.get_indexer([str(g) for g in data.genes])
    if (rows < 0).any() or (cols < 0).any():
        return None
    return np.asarray(stored["mean"], dtype=np.float32)[np.ix_(rows, cols)]
