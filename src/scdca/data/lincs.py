"""LINCS L1000 files as AnnData in the project's conventions: every schema, levels 3-5, many plates.

Level 3 files hold one column per well (quantile-normalised log2 expression, landmark genes as
rows) and per-well metadata (`pert_id`, `pert_type`, `pert_dose`, ...). `read_lincs` turns them
into wells x genes AnnData with obs under `DataKeys` names, so `scdca.data.load` treats a plate
like any pseudobulk file: each well is one "cell" of its condition. With several plates of one
line, each well's change is taken against its own plate's vehicle wells.

Levels 4 (z-scores of each well against its plate) and 5 (consensus signatures) are changes
already: they load as change-space data, with a zero reference per line and no vehicle wells.

The older CMap field names (`exp_pert_dose`, `pert_desc`, ...) and the CMap 2020 ones
(`cell_iname`, `cmap_name`) are read as the LINCS 2017 names (`FIELDS`). The file formats
themselves are read by `scdca.data.gct`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from scdca.data.gct import (  # noqa: F401  (read_gct_table, write_gctx: public here as before)
    MISSING,
    gctx_metadata,
    missing_as_na,
    read_gct_table,
    read_gctx_matrix,
    write_gctx,
)
from scdca.data.keys import CHANGE_SCALE, SCALE_KEY, DataKeys
from scdca.errors import ScdcaInputError, reason

log = logging.getLogger(__name__)

LINCS_SUFFIXES = (".gct", ".gctx")
# canonical (LINCS 2017) field <- the names other schemas give it, first found wins
FIELDS = {
    "pert_id": ("pert_id",),
    "pert_iname": ("pert_iname", "cmap_name", "pert_desc"),
    "pert_type": ("pert_type",),
    "pert_dose": ("pert_dose", "exp_pert_dose"),
    "pert_dose_unit": ("pert_dose_unit", "exp_pert_dose_unit"),
    "pert_idose": ("pert_idose",),
    "pert_time": ("pert_time", "exp_pert_time"),
    "pert_time_unit": ("pert_time_unit", "exp_pert_time_unit"),
    "pert_itime": ("pert_itime",),
    "cell_id": ("cell_id", "cell_iname", "cell_mfc_name"),
    "plate": ("rna_plate", "det_plate", "plate"),
}
COLUMN_IDS = ("inst_id", "sig_id", "distil_id", "cid", "id")  # a companion table's column-id field
LEVELS = ("auto", "3", "4", "5")
COMPOUND_ID_LEN = 13  # 'BRD-K05870596-001-01-5' -> 'BRD-K05870596': the compound, without batch/salt
DOSE_TO_UM = {"um": 1.0, "µm": 1.0, "μm": 1.0, "micromolar": 1.0, "nm": 1e-3, "pm": 1e-6, "mm": 1e3, "m": 1e6}


@dataclass(frozen=True)
class LincsOptions:
    """How `read_lincs` reads and selects LINCS files (the CLI's --lincs-level, --col-meta, ...):
    its keyword arguments, with comma-separated text for lists. `as_kwargs()` gives the set ones."""

    level: Literal["auto", "3", "4", "5"] = "auto"
    col_meta: str | None = None
    cell_id: str | None = None
    pert_time: str | None = None
    pert_id: str | None = None
    plates: str | None = None
    genes: str | None = None

    def __post_init__(self):
        if str(self.level) not in LEVELS:
            raise ScdcaInputError(f"level: {self.level!r} is not one of {', '.join(LEVELS)} (LINCS data levels)")

    def as_kwargs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and (k != "level" or v != "auto")}


def is_lincs(path) -> bool:
    """True for a .gct or .gctx path, a list of them, or a folder holding them (chosen by extension)."""
    if not isinstance(path, (str, os.PathLike)):
        return bool(path) and all(is_lincs(p) for p in path)
    if Path(path).is_dir():
        return any(str(f).lower().endswith(LINCS_SUFFIXES) for f in Path(path).iterdir())
    return str(path).lower().endswith(LINCS_SUFFIXES)


def read_compounds(path: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """A compounds table (CSV/TSV path or DataFrame) -> columns key (13-character compound id
    or lower-case name) and smiles.

    Needs a `smiles` (or `canonical_smiles`) column and a `pert_id` and/or `pert_iname`
    (or `name`) column.
    """
    if isinstance(path, pd.DataFrame):
        table = path.astype(str)
    else:
        path = Path(path)
        if not path.is_file():
            raise ScdcaInputError(
                f"compounds: file {str(path)!r} does not exist; pass a CSV with pert_id (or "
                f"pert_iname) and smiles columns"
            )
        try:
            table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
        except Exception as err:
            raise ScdcaInputError(f"compounds: {str(path)!r} is not a readable CSV/TSV ({reason(err, 120)})") from None
    lower = {c.lower(): c for c in table.columns}
    smi = next((lower[c] for c in ("smiles", "canonical_smiles") if c in lower), None)
    ids = [lower[c] for c in ("pert_id", "pert_iname", "name", "drug") if c in lower]
    if smi is None or not ids:
        raise ScdcaInputError(
            f"compounds: the table has columns {list(table.columns)[:12]!r}; it needs a 'smiles' (or "
            f"'canonical_smiles') column and a 'pert_id' or 'pert_iname' column"
        )
    keys = []
    for col in ids:
        key = table[col].str.strip()
        key = key.str[:COMPOUND_ID_LEN] if col == lower.get("pert_id") else key.str.lower()
        keys.append(pd.DataFrame({"key": key, "smiles": table[smi].str.strip()}))
    out = pd.concat(keys, ignore_index=True)
    out = out[(out["key"] != "") & ~out["smiles"].str.lower().isin(MISSING)]
    return out.drop_duplicates("key").reset_index(drop=True)


def dose_in_um(dose: pd.Series, unit: pd.Series | None) -> np.ndarray:
    """`pert_dose` converted to uM by `pert_dose_unit` (uM when the unit is missing); NaN where unknown.

    Also reads doses written with their unit, as `pert_idose` holds them ('10 uM', '500 nM').
    """
    # the micro sign as files write it: 'µ' (latin-1 or utf-8), 'μ' (Greek mu), or the text '<b5>'
    text = dose.astype(str).str.strip().str.replace("<b5>", "µ", regex=False)
    parts = text.str.extract(r"^\s*([-+0-9.eE]+)\s*([A-Za-zµμ]*)\s*$")
    value = pd.to_numeric(parts[0], errors="coerce")
    own = parts[1].fillna("").str.lower()
    given = unit.astype(str).str.strip().str.lower() if unit is not None else pd.Series("", index=dose.index)
    given = given.where(~given.isin(MISSING), "")
    units = own.where(own != "", given).replace("", "um")
    factor = units.map(DOSE_TO_UM)
    return (value * factor).to_numpy(dtype=float)


def read_lincs(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    compounds: str | os.PathLike | pd.DataFrame | None = None,
    keys: DataKeys = DataKeys(),
    level: str | int = "auto",
    col_meta: str | os.PathLike | None = None,
    cell_id: str | Sequence[str] | None = None,
    pert_time: str | float | Sequence | None = None,
    pert_id: str | Sequence[str] | None = None,
    plates: str | Sequence[str] | None = None,
    genes: str | Sequence[str] | None = None,
) -> ad.AnnData:
    """Read LINCS L1000 files (GCT or GCTX; one, a list, or a folder of them) as wells x genes AnnData.

    Level 3: vehicle wells (`pert_type` 'ctl_vehicle') become controls; compound wells (`trt_cp`)
    are kept when their compound has a structure; other well types are dropped. Where a line has
    several plates, each well is re-referenced to its own plate's vehicle wells (its change from
    them is kept; the line's control is the mean over its plates' vehicle means), so a plate
    effect does not read as a drug effect; a plate without vehicle wells is refused.
    Levels 4 and 5: every profile is a change; they load as change-space data
    (uns['expression_scale'] = 'change', one zero reference row per line, vehicle wells dropped).
    A compound is the first 13 characters of `pert_id`, named by `pert_iname` where that is
    unique to it, one drug across plates; doses in uM; cell lines from `cell_id` (with the time
    appended, e.g. 'A375_24h', when the wells have several times).

    Args:
        path: a .gct (v1.2/v1.3) or .gctx file, a list of them, or a folder holding them.
        compounds: CSV/TSV (gzipped or not; the LINCS perturbagen table as it ships) or DataFrame
            mapping `pert_id` or `pert_iname` to `smiles` or `canonical_smiles`; None takes SMILES
            from the files' metadata.
        keys: obs names to write (the defaults are what `scdca.data.load` reads).
        level: 3, 4, 5 or 'auto' (from the values and metadata: negative values mean changes, and
            consensus fields such as `distil_nsample` or signature ids 'PLATE:PERT:DOSE' mean 5).
        col_meta: a companion table (`inst_info`, `siginfo_beta`, ...) joined on the column id,
            for files whose matrix carries no well metadata; its fields fill the missing ones.
        cell_id, pert_time, pert_id, plates: keep only these lines, times (24, '24h'), compounds
            (full or 13-character ids) and plates; from a GCTX only their columns are read.
        genes: 'landmark' (rows with `pr_is_lm`/`is_lm` 1) or a list of row ids or symbols.

    Returns:
        AnnData: X = the files' values (float32), var_names = gene symbols (`pr_gene_symbol`
        where unique, else row ids), obs = the wells' metadata plus keys.cell_line, keys.drug,
        keys.smiles, keys.dose (uM), keys.control and `plate`; uns['lincs'] records the level,
        the files, the wells read and kept and which field names were read (`fields`).

    Example:
        >>> a = scdca.read_lincs("LJP009.gct", compounds="LJP009_compounds.csv")
    """
    files = lincs_files(path)
    select = {"cell_id": cell_id, "pert_time": pert_time, "pert_id": pert_id, "plates": plates}
    parts = [_read_one(f, col_meta, select, genes) for f in files]
    X, rows, cols, fields = _joined(parts, files)
    level = _level(X, cols, level)
    table = read_compounds(compounds) if compounds is not None else None
    adata = _wells(X, rows, cols, level, table, keys, where=_where(files))
    adata.uns["lincs"].update(
        {"files": [os.path.basename(str(f)) for f in files], "level": int(level), "fields": fields}
    )
    return adata


def lincs_files(path) -> list[Path]:
    """The LINCS files `path` names: one file, a list of files, or the .gct/.gctx files of a folder."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if is_lincs(f))
            if not found:
                raise ScdcaInputError(f"data: folder {str(p)!r} holds no .gct or .gctx file; pass a folder of plates")
            files += found
        elif not p.is_file():
            raise ScdcaInputError(f"data: LINCS file {str(p)!r} does not exist; pass the path of a .gct or .gctx file")
        else:
            files.append(p)
    return files


def _where(files: list[Path]) -> str:
    return f"data: {str(files[0])!r}" if len(files) == 1 else f"data: {len(files)} files ({files[0].name}, ...)"


def _read_one(path: Path, col_meta, select: dict, genes):
    """(wells x genes X, row metadata, canonical column metadata, fields read) of one file, selected."""
    if path.suffix.lower() == ".gctx":
        cols = gctx_metadata(path, "COL")
        rows = gctx_metadata(path, "ROW")
        X = None
    else:
        X, rows, cols = read_gct_table(path)
        X = X.T
    cols = _with_companion(cols, col_meta, path)
    cols, fields = canonical_fields(cols)
    if "plate" not in cols or cols["plate"].isna().all():
        ids = cols.index.to_series().astype(str)
        cols["plate"] = ids.str.split(":").str[0].where(ids.str.contains(":"), path.stem)
    keep_cols = np.flatnonzero(_selected(cols, select, path))
    keep_rows = _gene_rows(rows, genes, path)
    if X is None:
        X = read_gctx_matrix(path, keep_cols, keep_rows)
    else:
        X = X[keep_cols][:, keep_rows]
    cols = cols.iloc[keep_cols].astype(object)
    return X, rows.iloc[keep_rows], cols, fields


def canonical_fields(cols: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Column metadata with the LINCS 2017 field names (`FIELDS`) and lower-case `pert_type`;
    returns it and {canonical name: the file's name it was read from}."""
    cols = cols.copy()
    fields = {}
    for name, aliases in FIELDS.items():
        source = next((a for a in aliases if a in cols.columns and cols[a].notna().any()), None)
        if source is not None:
            fields[name] = source
            cols[name] = cols[source]
    if "pert_type" in cols:
        cols["pert_type"] = cols["pert_type"].astype(object).str.strip().str.lower()
    return cols, fields


def _with_companion(cols: pd.DataFrame, col_meta, path: Path) -> pd.DataFrame:
    """The matrix's column metadata, its missing fields filled from the companion table `col_meta`."""
    if col_meta is None:
        return cols
    try:
        table = pd.read_csv(col_meta, sep=None, engine="python", dtype=str, keep_default_na=False)
    except Exception as err:
        raise ScdcaInputError(f"col_meta: {str(col_meta)!r} is not a readable CSV/TSV ({reason(err, 120)})") from None
    key = next((c for c in COLUMN_IDS if c in table.columns), None)
    if key is None:
        raise ScdcaInputError(
            f"col_meta: {str(col_meta)!r} has no column-id field (one of {', '.join(COLUMN_IDS)}; it has "
            f"{list(table.columns)[:8]!r}); pass the inst_info or sig_info table that came with the matrix"
        )
    table = missing_as_na(table.drop_duplicates(key).set_index(key))
    found = cols.index.isin(table.index)
    if not found.any():
        raise ScdcaInputError(
            f"col_meta: none of {str(path)!r}'s column ids (e.g. {list(cols.index[:2])!r}) is in its {key!r} "
            f"field; pass the table that describes this matrix's columns"
        )
    extra = table.reindex(cols.index)
    merged = cols.copy()
    for field in extra.columns:
        merged[field] = merged[field].where(merged[field].notna(), extra[field]) if field in merged else extra[field]
    return merged


def _selected(cols: pd.DataFrame, select: dict, path: Path) -> np.ndarray:
    """(n_columns,) True for the columns the selection keeps."""
    keep = np.ones(len(cols), dtype=bool)
    tests = {
        "cell_id": lambda v: cols.get("cell_id", pd.Series(index=cols.index, dtype=object)).astype(str),
        "pert_time": lambda v: _times(cols).astype(str),
        "plates": lambda v: cols["plate"].astype(str),
    }
    for name, value in select.items():
        if value is None:
            continue
        wanted = value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else value
        wanted = [w.strip() if isinstance(w, str) else w for w in wanted]
        if name == "pert_time":
            wanted = [f"{float(str(w).lower().rstrip('h ')):g}h" for w in wanted]
        if name == "pert_id":
            pid = cols.get("pert_id", pd.Series(index=cols.index, dtype=object)).astype(str)
            keep &= pid.isin(wanted) | pid.str[:COMPOUND_ID_LEN].isin(wanted) | (cols["pert_type"] == "ctl_vehicle")
            continue
        keep &= tests[name](value).isin([str(w) for w in wanted]).to_numpy()
    if not keep.any():
        log.info("lincs: %s: no column matches the selection %s", path.name, {k: v for k, v in select.items() if v})
    return keep


def _gene_rows(rows: pd.DataFrame, genes, path: Path) -> np.ndarray:
    if genes is None:
        return np.arange(len(rows))
    if isinstance(genes, str) and genes == "landmark":
        field = next((f for f in ("pr_is_lm", "is_lm") if f in rows), None)
        if field is None:
            raise ScdcaInputError(
                f"genes: 'landmark' needs a pr_is_lm (or is_lm) row field, which {str(path)!r} lacks; pass the "
                f"landmark genes' row ids as a list instead"
            )
        return np.flatnonzero(rows[field].astype(str).str.strip().isin(["1", "1.0", "True", "true"]).to_numpy())
    wanted = [g.strip() for g in genes.split(",")] if isinstance(genes, str) else list(genes)
    symbols = rows.get("pr_gene_symbol", pd.Series(index=rows.index, dtype=object)).astype(str)
    hit = rows.index.isin(wanted) | symbols.isin(wanted).to_numpy()
    if not hit.any():
        raise ScdcaInputError(f"genes: none of {wanted[:5]!r} is a row id or pr_gene_symbol of {str(path)!r}")
    return np.flatnonzero(hit)


def _joined(parts, files: list[Path]):
    """One (X, rows, cols, fields) from several files; their genes must be the same (in any order)."""
    X0, rows0, _, fields = parts[0]
    matrices = [X0]
    for (X, rows, _, _), f in zip(parts[1:], files[1:]):
        if set(rows.index) != set(rows0.index) or rows.index.duplicated().any():
            differ = len(set(rows.index) ^ set(rows0.index))
            raise ScdcaInputError(
                f"data: {f.name!r} has other genes than {files[0].name!r} ({differ} row ids differ); plates read "
                f"together must share their rows: pass genes='landmark' (--lincs-genes landmark) or read them apart"
            )
        matrices.append(X[:, rows.index.get_indexer(rows0.index)])  # the first file's gene order
    X = np.concatenate(matrices) if len(parts) > 1 else X0
    cols = pd.concat([p[2] for p in parts])
    if cols.index.duplicated().any():
        raise ScdcaInputError(
            f"data: column id {cols.index[cols.index.duplicated()][0]!r} is in more than one file; pass each plate once"
        )
    for p in parts[1:]:
        fields = {**p[3], **fields}
    return X, rows0, cols, fields


def _level(X: np.ndarray, cols: pd.DataFrame, level) -> int:
    """3 (expression), 4 (z-scores per well) or 5 (consensus signatures): given, or read from the files."""
    if str(level) not in LEVELS:
        raise ScdcaInputError(f"level: {level!r} is not one of {', '.join(LEVELS)} (LINCS data levels 3, 4, 5)")
    if str(level) != "auto":
        return int(level)
    if X.size and float(np.nanmin(X)) >= 0:  # expression (log2); a plate without vehicle wells is then refused
        return 3
    signature = "distil_nsample" in cols or bool((cols.index.astype(str).str.count(":") >= 2).all())
    return 5 if signature else 4


def _wells(X, rows, cols, level: int, table, keys: DataKeys, where: str) -> ad.AnnData:
    """The kept wells as AnnData: controls and compounds, re-referenced per plate (level 3) or
    with a zero reference per line (levels 4-5)."""
    is_ctrl, is_cpd = _well_types(cols, where, level)
    compound_id = cols["pert_id"].fillna("").astype(str).str.strip().str[:COMPOUND_ID_LEN]
    iname = (
        cols["pert_iname"].fillna("").astype(str).str.strip()
        if "pert_iname" in cols
        else pd.Series("", index=cols.index)
    )
    smiles = _well_smiles(cols, compound_id, iname, table, where)
    dose = _well_doses(cols, where)
    keep, no_structure = _kept_wells(cols, is_ctrl, is_cpd, smiles, dose, compound_id, iname, table, where)
    cell, time = _cell_lines(cols, keep, where)
    drug = _drug_names(compound_id, iname, keep & is_cpd)
    obs = cols.copy()
    obs[keys.cell_line] = cell.to_numpy()
    obs[keys.drug] = np.where(is_ctrl, "control", drug)
    obs[keys.smiles] = np.where(is_ctrl, "", _one_structure(drug, smiles, keep & is_cpd))
    obs[keys.dose] = np.where(is_ctrl, 0.0, np.nan_to_num(dose))
    obs[keys.control] = is_ctrl
    obs["pert_time_h"] = time.to_numpy()
    obs, X = obs.loc[keep], np.ascontiguousarray(X[keep], dtype=np.float32)
    n_plates = 0
    if level == 3:
        X, n_plates = per_plate_reference(X, obs, keys, where)
    else:
        obs, X = _zero_reference(obs, X, keys)
    adata = ad.AnnData(X=X, obs=obs, var=_var(rows))
    adata.obs_names = obs.index.astype(str)
    adata.uns[SCALE_KEY] = "log2" if level == 3 else CHANGE_SCALE
    adata.uns["lincs"] = {
        "n_wells_read": int(len(cols)),
        "n_wells_kept": int(keep.sum()),
        "n_vehicle": int(is_ctrl.sum()),
        "n_no_structure": int(no_structure.sum()),
        "n_plates_rereferenced": int(n_plates),
    }
    log.info(
        "lincs: %s: level %d, %d compound wells of %d compounds and %d vehicle wells x %d genes",
        where,
        level,
        int((keep & is_cpd).sum()),
        len(set(drug[keep & is_cpd])),
        int((keep & is_ctrl).sum()),
        adata.n_vars,
    )
    return adata


def per_plate_reference(X: np.ndarray, obs: pd.DataFrame, keys: DataKeys, where: str) -> tuple[np.ndarray, int]:
    """Wells of a line measured on several plates, each moved by (line reference - own plate's vehicle
    mean), the line reference being the mean of its plates' vehicle means: a well's change from its
    line's control is then its change from its own plate's vehicle wells. Lines on one plate are left
    as read. Returns (X, plates re-referenced)."""
    line, plate = obs[keys.cell_line].astype(str).to_numpy(), obs["plate"].astype(str).to_numpy()
    ctrl = obs[keys.control].to_numpy(bool)
    X = X.copy()
    moved = 0
    for name in np.unique(line):
        in_line = line == name
        plates = np.unique(plate[in_line])
        if len(plates) < 2:
            continue
        empty = [p for p in plates if not (ctrl & in_line & (plate == p)).any()]
        if empty:
            raise ScdcaInputError(
                f"{where}: plate(s) {empty[:3]!r} of line {name!r} have no vehicle wells (pert_type 'ctl_vehicle'); "
                f"a level 3 plate's changes need its own DMSO wells: leave those plates out (plates=...)"
            )
        means = {p: X[ctrl & in_line & (plate == p)].astype(np.float64).mean(0) for p in plates}
        reference = np.mean(list(means.values()), axis=0)
        for p in plates:
            rows = in_line & (plate == p)
            X[rows] = (X[rows] + (reference - means[p])).astype(np.float32)
        moved += len(plates)
    return X, moved


def _zero_reference(obs: pd.DataFrame, X: np.ndarray, keys: DataKeys) -> tuple[pd.DataFrame, np.ndarray]:
    """Changes already (levels 4-5): drop vehicle wells, add one all-zero reference row per line."""
    treated = ~obs[keys.control].to_numpy(bool)
    obs, X = obs.loc[treated], X[treated]
    lines = sorted(obs[keys.cell_line].astype(str).unique())
    ref = pd.DataFrame(index=pd.Index([f"{line}:zero_reference" for line in lines]), columns=obs.columns, dtype=object)
    ref[keys.cell_line], ref[keys.drug], ref[keys.smiles] = lines, "control", ""
    ref[keys.dose], ref[keys.control] = 0.0, True
    out = pd.concat([obs, ref])
    out[keys.control] = out[keys.control].astype(bool)
    out[keys.dose] = out[keys.dose].astype(float)
    return out, np.vstack([X, np.zeros((len(lines), X.shape[1]), np.float32)])


def _well_types(cols: pd.DataFrame, where: str, level: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Which wells are vehicle controls and which are compounds; the others are dropped (logged)."""
    need = [c for c in ("pert_id", "pert_type") if c not in cols.columns]
    if need:
        raise ScdcaInputError(
            f"{where} has no column metadata field(s) {need!r} (fields: {list(cols.columns)[:12]!r}); "
            f"pass a LINCS file with its well annotations (pert_id, pert_type, pert_dose, cell_id), or its "
            f"inst_info/sig_info table (--col-meta FILE)"
        )
    ptype = cols["pert_type"].fillna("").astype(str).str.strip().str.lower()
    is_ctrl = (ptype == "ctl_vehicle").to_numpy()
    is_cpd = (ptype == "trt_cp").to_numpy()
    if level == 3 and not is_ctrl.any():
        raise ScdcaInputError(
            f"{where} has no vehicle wells (pert_type 'ctl_vehicle'; types present: "
            f"{sorted(set(ptype))[:8]!r}); a level 3 plate needs its DMSO wells as the control (levels 4-5 "
            f"need none: --lincs-level 4)"
        )
    dropped = ptype[~(is_ctrl | is_cpd)].value_counts()
    if len(dropped):
        log.info(
            "lincs: dropped %d well(s) that are neither compounds nor vehicle: %s",
            int(dropped.sum()),
            ", ".join(f"{n} {t or 'untyped'}" for t, n in dropped.items()),
        )
    return is_ctrl, is_cpd


def _well_doses(cols: pd.DataFrame, where: str) -> np.ndarray:
    """Each well's dose in uM: from pert_dose and its unit, else from the pert_idose text ('10 uM')."""
    if "pert_dose" not in cols and "pert_idose" not in cols:
        raise ScdcaInputError(
            f"{where} has no pert_dose (or exp_pert_dose, pert_idose) metadata field; every compound well needs a dose"
        )
    dose = np.full(len(cols), np.nan)
    if "pert_dose" in cols:
        dose = dose_in_um(cols["pert_dose"].astype(object), cols.get("pert_dose_unit"))
    if "pert_idose" in cols:
        dose = np.where(np.isnan(dose), dose_in_um(cols["pert_idose"].astype(object), None), dose)
    return dose


def _kept_wells(cols, is_ctrl, is_cpd, smiles, dose, compound_id, iname, compounds, where):
    """Vehicle wells and compound wells with a structure (the others warned about), every kept
    compound well with a dose; returns (kept, compound wells without a structure)."""
    keep = is_ctrl | (is_cpd & smiles.notna().to_numpy())
    no_structure = is_cpd & smiles.isna().to_numpy()
    if no_structure.any():
        names = sorted(set(np.where(iname[no_structure] != "", iname[no_structure], compound_id[no_structure])))
        log.warning(
            "lincs: skipped %d compound well(s) of %d compound(s) with no structure in %s, e.g. %s",
            int(no_structure.sum()),
            len(names),
            "the compounds table" if compounds is not None else "the file (pass --compounds)",
            ", ".join(names[:5]),
        )
    bad_dose = keep & ~is_ctrl & ~(dose > 0)
    if bad_dose.any():
        examples = cols["pert_dose"].to_numpy()[bad_dose][:5] if "pert_dose" in cols else []
        raise ScdcaInputError(
            f"{where}: {int(bad_dose.sum())} compound well(s) have a missing or unknown dose "
            f"(e.g. {list(examples)!r}, "
            f"units {sorted(set(cols.get('pert_dose_unit', pd.Series(dtype=str)).dropna()))!r}); "
            f"give pert_dose in uM, nM or mM"
        )
    if not (keep & is_cpd).any():
        raise ScdcaInputError(
            f"{where}: no compound well has a structure; pass --compounds with a CSV mapping pert_id "
            f"(or pert_iname) to smiles"
        )

    return keep, no_structure


def _cell_lines(cols: pd.DataFrame, keep: np.ndarray, where: str = "") -> tuple[pd.Series, pd.Series]:
    """Each well's cell line (split by treatment time when the kept wells have several) and time."""
    known = cols["cell_id"].notna().to_numpy() if "cell_id" in cols else np.zeros(len(cols), bool)
    if known.any() and not known[keep].all():
        raise ScdcaInputError(
            f"{where}: {int((keep & ~known).sum())} kept profile(s) have no cell_id (e.g. "
            f"{list(cols.index[keep & ~known][:2])!r}); give every column its cell line (cell_id or cell_iname), "
            f"or its sig_info table (--col-meta FILE)"
        )
    cell = (
        cols["cell_id"].fillna("unknown").astype(str).str.strip()
        if "cell_id" in cols
        else pd.Series("unknown", index=cols.index)
    )
    time = _times(cols)
    if time[keep].nunique() > 1:
        cell = cell + "_" + time.fillna("na")
        log.info(
            "lincs: several treatment times (%s); each cell line is split by time", sorted(time[keep].dropna().unique())
        )

    return cell, time


def _well_smiles(cols, compound_id, iname, table: pd.DataFrame | None, where) -> pd.Series:
    """Each well's SMILES from the compounds table (by compound id, then name), or from the file."""
    if table is None:
        field = next((c for c in ("canonical_smiles", "smiles", "SMILES") if c in cols), None)
        if field is None:
            raise ScdcaInputError(
                f"{where} has no SMILES in its metadata; pass a compounds table (--compounds "
                f"FILE.csv, or compounds= in Python) mapping pert_id or pert_iname to smiles"
            )
        return cols[field]
    lookup = dict(zip(table["key"], table["smiles"]))
    by_id = compound_id.map(lookup)
    by_name = iname.str.lower().map(lookup)
    return by_id.where(by_id.notna(), by_name)


def _drug_names(compound_id: pd.Series, iname: pd.Series, treated: np.ndarray) -> np.ndarray:
    """pert_iname where each compound id that carries it has that name only, else the compound id.

    A name may cover several compound ids (Broad ids of one compound's batches, salts or stereo
    forms; the level 5 file's vemurafenib has two): they are one drug, across plates too."""
    pairs = pd.DataFrame({"cid": compound_id[treated].to_numpy(), "name": iname[treated].to_numpy()}).drop_duplicates()
    one_name = pairs.groupby("cid")["name"].transform("nunique").eq(1) & (pairs["name"] != "")
    clean = pairs.groupby("name")["cid"].transform(lambda c: bool(one_name[c.index].all()))
    good = dict(zip(pairs.loc[one_name & clean.astype(bool), "cid"], pairs.loc[one_name & clean.astype(bool), "name"]))
    return np.array([good.get(c, c) for c in compound_id], dtype=object)


def _one_structure(drug: np.ndarray, smiles: pd.Series, rows: np.ndarray) -> np.ndarray:
    """Each drug's most common SMILES over its wells `rows` (a name over several ids may differ by stereo)."""
    out = smiles.fillna("").to_numpy(dtype=object).copy()
    table = pd.DataFrame({"drug": drug[rows], "smiles": out[rows]})
    common = table.groupby("drug")["smiles"].agg(lambda s: s.value_counts().index[0])
    out[rows] = common.loc[table["drug"]].to_numpy()
    return out


UNIT_HOURS = {"h": 1.0, "hr": 1.0, "hrs": 1.0, "hour": 1.0, "hours": 1.0, "m": 1 / 60, "min": 1 / 60,
              "d": 24.0, "day": 24.0, "days": 24.0}  # fmt: skip


def _times(cols: pd.DataFrame) -> pd.Series:
    """Treatment time per well as text in hours ('24h'); missing when the well has none. A well's
    `pert_time` (+ `pert_time_unit`) is read where it has one, else its `pert_itime` ('24 h'):
    files of two schemas read together each keep their own."""
    value = pd.Series(np.nan, index=cols.index, dtype=float)
    unit = pd.Series("h", index=cols.index, dtype=object)
    if "pert_itime" in cols:
        parts = cols["pert_itime"].astype(str).str.extract(r"^\s*([0-9.]+)\s*([A-Za-z]*)")
        value, unit = pd.to_numeric(parts[0], errors="coerce"), parts[1].fillna("h").replace("", "h")
    if "pert_time" in cols:
        own = pd.to_numeric(cols["pert_time"].astype(object), errors="coerce")
        own_unit = cols.get("pert_time_unit", pd.Series("h", index=cols.index)).astype(object).fillna("h")
        unit = own_unit.where(own.notna(), unit)
        value = own.fillna(value.astype(float))
    hours = value * unit.astype(str).str.lower().str.strip().map(UNIT_HOURS).fillna(1.0)
    return hours.map(lambda h: np.nan if pd.isna(h) else f"{h:g}h")


def _var(rows: pd.DataFrame) -> pd.DataFrame:
    """Genes named by symbol where symbols are present and unique, else by the file's row ids."""
    var = rows.copy()
    var["row_id"] = var.index.astype(str)
    sym = rows.get("pr_gene_symbol")
    if sym is not None and sym.notna().all() and not sym.duplicated().any():
        var.index = pd.Index(sym.astype(str).to_numpy())
    else:
        var.index = pd.Index(var.index.astype(str))
    return var


def aggregate_lincs(path: str | os.PathLike, *, genes: str | Sequence[str] | None = None) -> ad.AnnData:
    """Stream a level 3 GCTX (a whole release) into per-condition changes, each well against its own
    plate's vehicle wells, without loading the matrix.

    Two passes over the file by chunk blocks: each plate's vehicle mean, then each condition's sum of
    wells, from which its wells' own plates' vehicle means are taken. A condition is (cell_id, time,
    13-character compound id, dose); its wells may lie on several plates. No compounds table is
    needed (nothing is dropped for want of a structure).

    Returns:
        AnnData (conditions x genes): X = the mean change (float32); obs = cell_id, pert_time_h,
        pert_id, dose_um, n_wells, n_plates; uns['expression_scale'] = 'change'.
    """
    from scipy import sparse

    from scdca.data.gct import gctx_group_sums

    path = Path(path)
    cols, _ = canonical_fields(gctx_metadata(path, "COL", fields=[a for v in FIELDS.values() for a in v]))
    rows = gctx_metadata(path, "ROW")
    keep_rows = _gene_rows(rows, genes, path)
    where = f"data: {str(path)!r}"
    is_ctrl, is_cpd = _well_types(cols, where, 3)
    plate, plates = pd.factorize(cols["plate"].astype(object).fillna("").to_numpy())
    vehicle_sums, vehicle_n = gctx_group_sums(path, np.where(is_ctrl, plate, -1), len(plates), keep_rows)
    treated_plates = np.unique(plate[is_cpd])
    if (vehicle_n[treated_plates] == 0).any():
        empty = list(plates[treated_plates[vehicle_n[treated_plates] == 0]][:3])
        raise ScdcaInputError(f"{where}: plate(s) {empty!r} have no vehicle wells; a level 3 change needs its own")
    vehicle = (vehicle_sums / np.maximum(vehicle_n, 1)[:, None]).astype(np.float32)  # (plates, genes)
    code, conditions = _condition_codes(cols, is_cpd, where)
    group = np.full(len(cols), -1)
    group[is_cpd] = code
    sums, n = gctx_group_sums(path, group, len(conditions), keep_rows, dtype=np.float32)
    per_plate = sparse.csr_matrix(
        (np.ones(len(code), np.float32), (code, plate[is_cpd])), (len(conditions), len(plates))
    )
    per_plate.sum_duplicates()  # (conditions, plates): each condition's wells per plate
    for start in range(0, len(sums), 65536):  # each well's own plate's vehicle mean out, in slices
        part = slice(start, start + 65536)
        sums[part] -= per_plate[part] @ vehicle
        sums[part] /= n[part, None]
    obs = conditions.to_frame(index=False)
    obs["n_wells"] = n
    obs["n_plates"] = np.diff(per_plate.indptr)
    obs.index = pd.Index([f"c{i}" for i in range(len(obs))])
    adata = ad.AnnData(X=sums, obs=obs, var=_var(rows.iloc[keep_rows]))
    adata.uns[SCALE_KEY] = CHANGE_SCALE
    return adata


def _condition_codes(cols: pd.DataFrame, treated: np.ndarray, where: str) -> tuple[np.ndarray, pd.MultiIndex]:
    """(code of each treated well's condition, the conditions (cell_id, pert_time_h, pert_id, dose_um))."""
    key = pd.DataFrame(
        {
            "cell_id": cols["cell_id"].astype(object).fillna("unknown").to_numpy(),
            "pert_time_h": _times(cols).fillna("na").to_numpy(),
            "pert_id": cols["pert_id"].astype(object).fillna("").str[:COMPOUND_ID_LEN].to_numpy(),
            "dose_um": _well_doses(cols, where),
        }
    )[treated]
    code, conditions = pd.MultiIndex.from_frame(key).factorize()
    return code, conditions.set_names(list(key.columns))
