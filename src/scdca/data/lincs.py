"""LINCS L1000 files (GCT v1.2/v1.3 text, GCTX HDF5) as AnnData in the project's conventions.

Level 3 files hold one column per well (quantile-normalised log2 expression, landmark genes
as rows) and per-well metadata (`pert_id`, `pert_type`, `pert_dose`, ...). `read_lincs` turns
one into wells x genes AnnData with obs under `DataKeys` names, so `scdca.data.load` treats a
plate like any pseudobulk file: each well is one "cell" of its condition.

Why not cmapPy (checked with the pinned numpy 2.4 / pandas 2.3): its GCT parser works but
relies on `pd.to_numeric(errors="ignore")`, deprecated and due to raise in pandas 3; its GCTX
writer fails on numpy 2 (`np.string_`) and, patched, on a real plate whose column metadata
has an `id` field. The formats are small, so we read them here (DECISIONS.md D29).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scdca import storage
from scdca.data.keys import SCALE_KEY, DataKeys
from scdca.errors import ScdcaInputError, reason

log = logging.getLogger(__name__)

LINCS_SUFFIXES = (".gct", ".gctx")
MISSING = ("-666", "-666.0", "nan", "na", "")  # the LINCS pipeline writes -666 for "not applicable"
COMPOUND_ID_LEN = 13  # 'BRD-K05870596-001-01-5' -> 'BRD-K05870596': the compound, without batch/salt
DOSE_TO_UM = {"um": 1.0, "µm": 1.0, "μm": 1.0, "micromolar": 1.0, "nm": 1e-3, "pm": 1e-6, "mm": 1e3, "m": 1e6}


def is_lincs(path: str | os.PathLike) -> bool:
    """True for a .gct or .gctx path (the format is chosen by extension)."""
    return str(path).lower().endswith(LINCS_SUFFIXES)


def read_gct_table(path: str | os.PathLike) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """The matrix (genes, wells), row metadata (genes) and column metadata (wells) of a GCT or GCTX file.

    Metadata values stay strings; '-666' and 'na' become missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ScdcaInputError(f"data: LINCS file {str(path)!r} does not exist; pass the path of a .gct or .gctx file")
    if path.suffix.lower() == ".gctx":
        return _read_gctx(path)
    return _read_gct(path)


def _bad(path, problem: str) -> ScdcaInputError:
    return ScdcaInputError(
        f"data: {str(path)!r} is not a readable GCT file ({problem}); pass a level 3 .gct (v1.2 or "
        f"v1.3) or .gctx file as the LINCS pipeline writes it"
    )


def _read_gct(path: Path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        version = fh.readline().strip()
        if version not in ("#1.2", "#1.3"):
            raise _bad(path, f"first line is {version[:20]!r}, expected '#1.3' or '#1.2'")
        dims = fh.readline().split()
        try:
            dims = [int(x) for x in dims]
        except ValueError:
            raise _bad(path, f"second line {' '.join(dims)[:40]!r} does not hold the table's sizes") from None
        if version == "#1.2":
            if len(dims) < 2:
                raise _bad(path, "second line needs the numbers of rows and columns")
            n_rows, n_cols, n_rmeta, n_cmeta = dims[0], dims[1], 1, 0  # 'Name', 'Description', samples...
        else:
            if len(dims) != 4:
                raise _bad(
                    path,
                    f"second line has {len(dims)} numbers, v1.3 needs 4 (rows, columns, row and "
                    f"column metadata fields)",
                )
            n_rows, n_cols, n_rmeta, n_cmeta = dims
        header = fh.readline().rstrip("\n\r").split("\t")
        if len(header) != 1 + n_rmeta + n_cols:
            raise _bad(path, f"header has {len(header)} fields, expected 1 + {n_rmeta} + {n_cols} from its second line")
        col_ids = header[1 + n_rmeta :]
        col_meta = {}
        for i in range(n_cmeta):
            fields = fh.readline().rstrip("\n\r").split("\t")
            if len(fields) != len(header):
                raise _bad(
                    path,
                    f"column metadata row {i + 1} of {n_cmeta} has {len(fields)} fields, expected "
                    f"{len(header)} (metadata rows missing?)",
                )
            col_meta[fields[0]] = fields[1 + n_rmeta :]
        body = pd.read_csv(
            fh, sep="\t", header=None, dtype=str, keep_default_na=False, na_filter=False, quoting=3, engine="c"
        )
    if body.shape != (n_rows, len(header)):
        raise _bad(path, f"data block is {body.shape[0]} x {body.shape[1]}, expected {n_rows} x {len(header)}")
    try:
        X = body.iloc[:, 1 + n_rmeta :].to_numpy().astype(np.float32)
    except ValueError as err:
        raise _bad(path, f"non-numeric expression value ({reason(err, 80)})") from None
    rows = pd.DataFrame(
        {h: body.iloc[:, 1 + j].to_numpy() for j, h in enumerate(header[1 : 1 + n_rmeta])},
        index=pd.Index(body.iloc[:, 0].to_numpy(), name="id"),
    )
    cols = pd.DataFrame(col_meta, index=pd.Index(col_ids, name="id"))
    return X, _missing(rows), _missing(cols.drop(columns=["id"], errors="ignore"))


def _read_gctx(path: Path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            try:
                matrix = f["0/DATA/0/matrix"]
                row_ids, col_ids = _strings(f["0/META/ROW/id"][()]), _strings(f["0/META/COL/id"][()])
                rows = {k: _strings(v[()]) for k, v in f["0/META/ROW"].items() if k != "id"}
                cols = {k: _strings(v[()]) for k, v in f["0/META/COL"].items() if k != "id"}
            except KeyError as err:
                raise _bad(
                    path,
                    f"missing HDF5 node ({reason(err, 80)}); a GCTX holds /0/DATA/0/matrix and "
                    f"/0/META/ROW, /0/META/COL",
                ) from None
            if matrix.shape != (len(col_ids), len(row_ids)):
                raise _bad(
                    path, f"matrix is {matrix.shape}, expected (columns, rows) = ({len(col_ids)}, {len(row_ids)})"
                )
            X = np.asarray(matrix[()], dtype=np.float32).T  # stored wells x genes; (genes, wells) like GCT
    except OSError as err:
        raise _bad(path, f"HDF5: {reason(err, 80)}") from None
    return (
        X,
        _missing(pd.DataFrame(rows, index=pd.Index(row_ids, name="id"))),
        _missing(pd.DataFrame(cols, index=pd.Index(col_ids, name="id"))),
    )


def _strings(values) -> np.ndarray:
    values = np.asarray(values).ravel()
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values.astype(str).astype(object)


def _missing(df: pd.DataFrame) -> pd.DataFrame:
    """'-666' and 'na' as missing values (strings otherwise)."""
    return df.astype(str).apply(lambda col: col.where(~col.str.strip().str.lower().isin(MISSING)))


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
            f"compounds: the table has columns {list(table.columns)!r}; it needs a 'smiles' "
            f"column and a 'pert_id' or 'pert_iname' column"
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
    text = dose.astype(str).str.strip()
    parts = text.str.extract(r"^\s*([-+0-9.eE]+)\s*([A-Za-zµμ]*)\s*$")
    value = pd.to_numeric(parts[0], errors="coerce")
    own = parts[1].fillna("").str.lower()
    given = unit.astype(str).str.strip().str.lower() if unit is not None else pd.Series("", index=dose.index)
    given = given.where(~given.isin(MISSING), "")
    units = own.where(own != "", given).replace("", "um")
    factor = units.map(DOSE_TO_UM)
    return (value * factor).to_numpy(dtype=float)


def read_lincs(
    path: str | os.PathLike,
    *,
    compounds: str | os.PathLike | pd.DataFrame | None = None,
    keys: DataKeys = DataKeys(),
) -> ad.AnnData:
    """Read a LINCS L1000 level 3 plate (GCT or GCTX) as wells x genes AnnData.

    Vehicle wells (`pert_type == 'ctl_vehicle'`) become controls; compound wells (`trt_cp`)
    are kept when their compound has a structure; positive controls and every other well
    type are dropped. A compound is the first 13 characters of `pert_id`; it is named by
    `pert_iname` where that is unique to it. Doses are converted to uM; cell lines come from
    `cell_id` (with the time appended, e.g. 'A375_24h', when a file holds several times).

    Args:
        path: a .gct (v1.2/v1.3) or .gctx file.
        compounds: CSV/TSV path (or DataFrame) mapping `pert_id` or `pert_iname` to `smiles`;
            None takes SMILES from a `canonical_smiles`/`smiles` column metadata field.
        keys: obs names to write (the defaults are what `scdca.data.load` reads).

    Returns:
        AnnData: X = the file's log2 values (float32), var_names = gene symbols (`pr_gene_symbol`
        where unique, else row ids) with the row metadata in var, obs = the wells' metadata plus
        keys.cell_line, keys.drug, keys.smiles, keys.dose (uM), keys.control;
        uns['expression_scale'] = 'log2' (so `load` never treats the values as counts).

    Example:
        >>> a = scdca.read_lincs("LJP009.gct", compounds="LJP009_compounds.csv")
    """
    X, rows, cols = read_gct_table(path)
    where = f"data: {str(path)!r}"
    is_ctrl, is_cpd = _well_types(cols, where)
    compound_id = cols["pert_id"].fillna("").str.strip().str[:COMPOUND_ID_LEN]
    iname = cols["pert_iname"].fillna("").str.strip() if "pert_iname" in cols else pd.Series("", index=cols.index)
    smiles = _well_smiles(cols, compound_id, iname, compounds, where)
    dose = _well_doses(cols, where)
    keep, no_structure = _kept_wells(cols, is_ctrl, is_cpd, smiles, dose, compound_id, iname, compounds, where)
    cell, time = _cell_lines(cols, keep)
    drug = _drug_names(compound_id, iname, keep & is_cpd)
    obs = cols.copy()
    obs[keys.cell_line] = cell.to_numpy()
    obs[keys.drug] = np.where(is_ctrl, "control", drug)
    obs[keys.smiles] = np.where(is_ctrl, "", smiles.fillna("").to_numpy())
    obs[keys.dose] = np.where(is_ctrl, 0.0, np.nan_to_num(dose))
    obs[keys.control] = is_ctrl
    obs["pert_time_h"] = time.to_numpy()
    obs = obs.loc[keep]
    var = _var(rows)
    adata = ad.AnnData(X=np.ascontiguousarray(X[:, keep].T), obs=obs, var=var)
    adata.obs_names = obs.index.astype(str)
    adata.uns[SCALE_KEY] = "log2"
    adata.uns["lincs"] = {
        "file": os.path.basename(str(path)),
        "n_wells_read": int(len(cols)),
        "n_wells_kept": int(keep.sum()),
        "n_vehicle": int(is_ctrl.sum()),
        "n_no_structure": int(no_structure.sum()),
    }
    log.info(
        "lincs: %s: %d compound wells of %d compounds and %d vehicle wells x %d genes",
        os.path.basename(str(path)),
        int((keep & is_cpd).sum()),
        len(set(drug[keep & is_cpd])),
        int(is_ctrl.sum()),
        adata.n_vars,
    )
    return adata


def _well_types(cols: pd.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Which wells are vehicle controls and which are compounds; the others are dropped (logged)."""
    need = [c for c in ("pert_id", "pert_type") if c not in cols.columns]
    if need:
        raise ScdcaInputError(
            f"{where} has no column metadata field(s) {need!r} (fields: {list(cols.columns)[:12]!r}); "
            f"pass a level 3 LINCS file with its well annotations (pert_id, pert_type, pert_dose, "
            f"cell_id)"
        )
    ptype = cols["pert_type"].fillna("").str.strip().str.lower()
    is_ctrl = (ptype == "ctl_vehicle").to_numpy()
    is_cpd = (ptype == "trt_cp").to_numpy()
    if not is_ctrl.any():
        raise ScdcaInputError(
            f"{where} has no vehicle wells (pert_type 'ctl_vehicle'; types present: "
            f"{sorted(set(ptype))[:8]!r}); a plate needs its DMSO wells as the control"
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
    """Each well's dose in uM (from pert_dose and its unit, or the pert_idose text)."""
    if "pert_dose" in cols:
        return dose_in_um(cols["pert_dose"], cols.get("pert_dose_unit"))
    elif "pert_idose" in cols:
        return dose_in_um(cols["pert_idose"], None)
    raise ScdcaInputError(f"{where} has no pert_dose (or pert_idose) metadata field; every compound well needs a dose")


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


def _cell_lines(cols: pd.DataFrame, keep: np.ndarray) -> tuple[pd.Series, pd.Series]:
    """Each well's cell line (split by treatment time when the kept wells have several) and time."""
    cell = (
        cols["cell_id"].fillna("unknown").str.strip() if "cell_id" in cols else pd.Series("unknown", index=cols.index)
    )
    time = _times(cols)
    if time[keep].nunique() > 1:
        cell = cell + "_" + time.fillna("na")
        log.info(
            "lincs: several treatment times (%s); each cell line is split by time", sorted(time[keep].dropna().unique())
        )

    return cell, time


def _well_smiles(cols, compound_id, iname, compounds, where) -> pd.Series:
    """Each well's SMILES from the compounds table (by compound id, then name), or from the file."""
    if compounds is None:
        field = next((c for c in ("canonical_smiles", "smiles", "SMILES") if c in cols), None)
        if field is None:
            raise ScdcaInputError(
                f"{where} has no SMILES in its metadata; pass a compounds table (--compounds "
                f"FILE.csv, or compounds= in Python) mapping pert_id or pert_iname to smiles"
            )
        return cols[field]
    table = read_compounds(compounds)
    lookup = dict(zip(table["key"], table["smiles"]))
    by_id = compound_id.map(lookup)
    by_name = iname.str.lower().map(lookup)
    return by_id.where(by_id.notna(), by_name)


def _drug_names(compound_id: pd.Series, iname: pd.Series, treated: np.ndarray) -> np.ndarray:
    """pert_iname where it names exactly one compound id (and the reverse), else the compound id."""
    pairs = pd.DataFrame({"cid": compound_id[treated].to_numpy(), "name": iname[treated].to_numpy()}).drop_duplicates()
    unique = (
        pairs.groupby("name")["cid"].transform("nunique").eq(1)
        & pairs.groupby("cid")["name"].transform("nunique").eq(1)
        & (pairs["name"] != "")
    )
    good = dict(zip(pairs.loc[unique, "cid"], pairs.loc[unique, "name"]))
    return np.array([good.get(c, c) for c in compound_id], dtype=object)


def _times(cols: pd.DataFrame) -> pd.Series:
    """Treatment time per well as text in hours ('24h'); missing when the file has none."""
    if "pert_time" not in cols:
        return pd.Series(np.nan, index=cols.index, dtype=object)
    value = pd.to_numeric(cols["pert_time"], errors="coerce")
    unit = cols.get("pert_time_unit", pd.Series("h", index=cols.index)).fillna("h").str.lower().str.strip()
    hours = value * unit.map(
        {
            "h": 1.0,
            "hr": 1.0,
            "hrs": 1.0,
            "hour": 1.0,
            "hours": 1.0,
            "m": 1 / 60,
            "min": 1 / 60,
            "d": 24.0,
            "day": 24.0,
            "days": 24.0,
        }
    ).fillna(1.0)
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


def write_gctx(path: str | os.PathLike, X: np.ndarray, rows: pd.DataFrame, cols: pd.DataFrame) -> None:
    """Write a GCTX file (X as genes x wells; metadata as strings), atomically. For tests and conversions."""
    import h5py

    def strings(values) -> np.ndarray:
        return np.array([str(v).encode() for v in values], dtype="S")

    with storage.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["version"] = np.bytes_(b"GCTX1.0")
            f.create_dataset("0/DATA/0/matrix", data=np.asarray(X, dtype=np.float32).T)
            for name, meta in (("ROW", rows), ("COL", cols)):
                f.create_dataset(f"0/META/{name}/id", data=strings(meta.index))
                for field in meta.columns:
                    f.create_dataset(f"0/META/{name}/{field}", data=strings(meta[field].fillna("-666")))
