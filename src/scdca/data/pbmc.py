"""A real single-cell file that ships with scanpy (PBMC 68k, reduced), split for the annotation tutorial."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdca import storage


def pbmc68k_split(out: str | os.PathLike) -> tuple[str, str]:
    """Real cells for annotation: scanpy's `pbmc68k_reduced` (700 PBMCs, 765 genes, 10 types
    in obs['bulk_labels']) split by a covariate, not at random: the reference holds the G1-phase
    cells, the query the cycling ones (S and G2M), an out-of-context shift in cell state.
    X is the log1p-normalised expression scanpy keeps in `.raw` (its X is scaled).
    Writes OUT/reference.h5ad and OUT/query.h5ad; returns their paths."""
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    full = ad.AnnData(
        X=np.asarray(pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else pbmc.raw.X, np.float32),
        obs=pbmc.obs[["bulk_labels", "phase", "n_counts", "percent_mito", "louvain"]].copy(),
        var=pd.DataFrame(index=pbmc.raw.var_names.astype(str)),
    )
    paths = []
    for name, keep in (("reference", full.obs["phase"] == "G1"), ("query", full.obs["phase"] != "G1")):
        part = full[keep.to_numpy()].copy()
        part.obs["bulk_labels"] = part.obs["bulk_labels"].cat.remove_unused_categories()
        part.uns["source"] = "scanpy.datasets.pbmc68k_reduced, .raw log1p values; split by obs['phase']"
        path = os.path.join(os.fspath(out), f"{name}.h5ad")
        storage.write_h5ad(path, part)
        paths.append(path)
    return paths[0], paths[1]
