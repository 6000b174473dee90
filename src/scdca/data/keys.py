"""Where scdca finds things in an AnnData (`DataKeys`) and how a condition is named."""

from __future__ import annotations

from dataclasses import dataclass

CONTROL_NAMES = ("control", "dmso", "vehicle", "ctrl")
SCALE_KEY = "expression_scale"  # uns key a reader sets when values are already log-scale ('log2' for LINCS)
CHANGE_SCALE = "change"  # SCALE_KEY value of data whose profiles are changes already (LINCS levels 4-5): reference 0
TRUTH_KEY = "scdca_truth"


@dataclass(frozen=True)
class DataKeys:
    """Where scdca finds things in an AnnData. Defaults match chemCPA's sci-Plex3 file.

    Args:
        cell_line: obs column with the cell line (or cell type).
        drug: obs column with the drug name; vehicle cells may be named 'control'/'DMSO'.
        smiles: obs column with each drug's SMILES.
        dose: obs column with the dose (any unit; used as given).
        control: obs column flagging vehicle cells (1/True). If the column is absent,
            cells whose drug is one of 'control', 'DMSO', 'vehicle', 'ctrl' are controls.
        degs_uns: uns key with precomputed DEGs (dict: '<line>_<drug>_<dose>' -> genes).
        gene_symbols: var column with gene symbols; None uses var_names.
        layer: layer to read expression from; None uses X.
    """

    cell_line: str = "cell_type"
    drug: str = "condition"
    smiles: str = "SMILES"
    dose: str = "dose_val"
    control: str = "control"
    degs_uns: str = "rank_genes_groups_cov"
    gene_symbols: str | None = None
    layer: str | None = None


def condition_id(cell_line: str, drug: str, dose: float) -> str:
    """The id of a condition, as chemCPA's `cov_drug_dose_name`: 'A549_Dacinostat_0.1'."""
    return f"{cell_line}_{drug}_{float(dose)}"
