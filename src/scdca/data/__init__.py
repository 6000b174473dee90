"""Data: AnnData and LINCS files in, pseudobulk `PerturbationData` out, DEGs, splits, the simulator.

Everything downstream works on `PerturbationData`; obs columns are read by the names in
`DataKeys` here and nowhere else.
"""

from scdca.data.degs import deg_long_table, rank_degs, rank_genes_groups_uns
from scdca.data.keys import DataKeys, condition_id
from scdca.data.lincs import read_lincs
from scdca.data.screen import PerturbationData, load, read

__all__ = [
    "DataKeys",
    "PerturbationData",
    "condition_id",
    "deg_long_table",
    "load",
    "rank_degs",
    "rank_genes_groups_uns",
    "read",
    "read_lincs",
]
