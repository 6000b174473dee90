"""The expression matrix of an AnnData: validation, chunked reading, count detection,
normalisation and gene selection."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdca.data.keys import CHANGE_SCALE, SCALE_KEY, DataKeys
from scdca.errors import ScdcaInputError


def validated_genes(adata: ad.AnnData, keys: DataKeys) -> np.ndarray:
    if keys.gene_symbols is not None:
        if keys.gene_symbols not in adata.var.columns:
            raise ScdcaInputError(
                f"gene_symbols: var column {keys.gene_symbols!r} not found; available: {list(adata.var.columns)!r}"
            )
        names = adata.var[keys.gene_symbols].astype(str).to_numpy()
    else:
        names = adata.var_names.astype(str).to_numpy()
    dup = pd.Index(names)[pd.Index(names).duplicated()].unique()
    if len(dup):
        raise ScdcaInputError(
            f"gene names are not unique: {list(dup[:10])!r} appear more than once. "
            f"Make them unique (adata.var_names_make_unique()) or sum duplicates first."
        )
    return names.astype(object)


def matrix_of(adata: ad.AnnData, keys: DataKeys):
    """The expression matrix (X or the layer), possibly backed; checks it exists."""
    if keys.layer is not None:
        if keys.layer not in adata.layers:
            raise ScdcaInputError(
                f"layer: {keys.layer!r} not in adata.layers ({list(adata.layers)!r}); pass one of these, "
                f"or no --layer to read X."
            )
        X = adata.layers[keys.layer]
    else:
        X = adata.X
    if X is None:
        raise ScdcaInputError("data: adata.X is empty; pass a layer with expression values (--layer)")
    return X


def checked_values(X, keys: DataKeys, rows: slice | None = None, *, changes: bool = False):
    """X as float32 (CSR if sparse), refusing NaN/inf and (unless the values are `changes`) negative values."""
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    values = X.data if sp.issparse(X) else X
    where = ("X" if keys.layer is None else f"layers[{keys.layer!r}]") + (
        f" (cells {rows.start}-{rows.stop - 1})" if rows is not None else ""
    )
    if not np.isfinite(values).all():
        n = int((~np.isfinite(values)).sum())
        raise ScdcaInputError(
            f"{where}: expression contains {n} NaN or infinite value(s); remove or impute them before loading."
        )
    if not changes and (values < 0).any():
        raise ScdcaInputError(
            f"{where}: expression contains {int((values < 0).sum())} negative values (min "
            f"{float(values.min()):.3g}); scdca needs raw "
            f"counts or log1p-normalised expression. If X was scaled (z-scored), pass the unscaled "
            f"data via a layer (DataKeys(layer=...), CLI --layer)."
        )
    return X


def validated_matrix(adata: ad.AnnData, keys: DataKeys):
    """The whole expression matrix in memory, checked."""
    X = matrix_of(adata, keys)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    return checked_values(X, keys, changes=holds_changes(adata))


def matrix_chunks(adata: ad.AnnData, keys: DataKeys, chunk_size: int):
    """Yield (first row, checked chunk) over the matrix, reading only `chunk_size` rows at a time
    from a backed file."""
    X = matrix_of(adata, keys)
    for start in range(0, adata.n_obs, chunk_size):
        rows = slice(start, min(start + chunk_size, adata.n_obs))
        yield start, checked_values(X[rows], keys, rows, changes=holds_changes(adata))


HVG_SAMPLE_CELLS = 50_000  # cells that choose the highly variable genes when a file is streamed in chunks


def sample_rows(adata: ad.AnnData, keys: DataKeys, n: int, seed: int):
    """A seeded random sample of up to n rows of the matrix (sorted, read in one pass)."""
    rows = np.sort(np.random.default_rng([seed, 7]).choice(adata.n_obs, min(n, adata.n_obs), replace=False))
    return checked_values(matrix_of(adata, keys)[rows], keys, changes=holds_changes(adata))


def says_log_scale(adata: ad.AnnData) -> bool:
    """True when the file records that its values are already log-scale or changes (uns[SCALE_KEY])."""
    return str(adata.uns.get(SCALE_KEY, "")).startswith("log") or holds_changes(adata)


def holds_changes(adata: ad.AnnData) -> bool:
    """True when every profile is a change already (LINCS levels 4-5: the reference is zero)."""
    return str(adata.uns.get(SCALE_KEY, "")) == CHANGE_SCALE


def looks_like_counts(X) -> bool:
    values = X.data if sp.issparse(X) else X.ravel()
    if values.size == 0:
        return False
    sample = values[:: max(1, values.size // 200_000)]
    return bool(np.all(sample == np.round(sample)) and sample.max() > 30)


def normalize_log1p(X, target_sum: float = 1e4):
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
    if sp.issparse(X):
        X = sp.diags(scale) @ X
        X.data = np.log1p(X.data)
        return X.tocsr()
    return np.log1p(X * scale[:, None])


def select_genes(X, names, *, genes, n_top_genes, n_genes: int | None = None) -> np.ndarray:
    """Columns to keep: `genes` in that order, else the top highly variable genes of X, else all."""
    n_genes = X.shape[1] if n_genes is None else n_genes
    if genes is not None:
        index = pd.Index(names)
        pos = index.get_indexer(list(genes))
        if (pos < 0).any():
            missing = [g for g, p in zip(genes, pos) if p < 0]
            raise ScdcaInputError(f"genes: {len(missing)} requested gene(s) are not in the data, e.g. {missing[:10]!r}")
        return pos
    if n_top_genes is None or n_top_genes >= n_genes:
        return np.arange(n_genes)
    import scanpy as sc

    tmp = ad.AnnData(X)
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
    return np.flatnonzero(tmp.var["highly_variable"].to_numpy())
