"""GCT (v1.2/v1.3 text) and GCTX (HDF5) files: metadata, and the matrix read by chunk blocks.

A GCTX stores the matrix as (columns, rows) = (wells or signatures, genes) in HDF5 chunks. Reading
a selection reads only the chunks that hold selected columns, one contiguous block at a time, so a
cell line's 20,000 wells come out of a 1.3-million-column release without loading the rest
(`read_gctx_matrix`), and `gctx_group_sums` streams the whole matrix into per-group sums.

Why not cmapPy (checked with the pinned numpy 2.4 / pandas 2.3): its GCT parser relies on
`pd.to_numeric(errors="ignore")`, deprecated and due to raise in pandas 3; its GCTX writer fails on
numpy 2 (`np.string_`) and, patched, on a real plate whose column metadata has an `id` field; and
its GCTX reader selects columns with one h5py fancy index, which HDF5 serves element-wise. The
formats are small, so we read them here (DECISIONS.md D29).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scdca import storage
from scdca.errors import ScdcaInputError, reason

MISSING = ("-666", "-666.0", "nan", "na", "")  # the LINCS pipeline writes -666 for "not applicable"
BLOCK_COLUMNS = 4096  # columns read per block when streaming a GCTX (about 16 MB at 978 genes)


def bad_file(path, problem: str) -> ScdcaInputError:
    return ScdcaInputError(
        f"data: {str(path)!r} is not a readable GCT file ({problem}); pass a .gct (v1.2 or v1.3) or .gctx "
        f"file as the LINCS pipeline writes it"
    )


def read_gct_table(path: str | os.PathLike) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """The matrix (genes, wells), row metadata (genes) and column metadata (wells) of a GCT or GCTX file.

    Metadata values stay strings; '-666' and 'na' become missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ScdcaInputError(f"data: LINCS file {str(path)!r} does not exist; pass the path of a .gct or .gctx file")
    if path.suffix.lower() == ".gctx":
        rows, cols = gctx_metadata(path, "ROW"), gctx_metadata(path, "COL")
        return read_gctx_matrix(path).T, rows, cols
    return _read_gct(path)


def _read_gct(path: Path):
    with open(path, encoding=_encoding(path)) as fh:
        version = fh.readline().strip()
        if version not in ("#1.2", "#1.3"):
            raise bad_file(path, f"first line is {version[:20]!r}, expected '#1.3' or '#1.2'")
        n_rows, n_cols, n_rmeta, n_cmeta = _dimensions(path, version, fh.readline().split())
        header = fh.readline().rstrip("\n\r").split("\t")
        if len(header) != 1 + n_rmeta + n_cols:
            raise bad_file(
                path, f"header has {len(header)} fields, expected 1 + {n_rmeta} + {n_cols} from its second line"
            )
        col_meta = {}
        for i in range(n_cmeta):
            fields = fh.readline().rstrip("\n\r").split("\t")
            if len(fields) != len(header):
                raise bad_file(
                    path,
                    f"column metadata row {i + 1} of {n_cmeta} has {len(fields)} fields, expected "
                    f"{len(header)} (metadata rows missing?)",
                )
            col_meta[fields[0]] = fields[1 + n_rmeta :]
        body = pd.read_csv(
            fh, sep="\t", header=None, dtype=str, keep_default_na=False, na_filter=False, quoting=3, engine="c"
        )
    if body.shape != (n_rows, len(header)):
        raise bad_file(path, f"data block is {body.shape[0]} x {body.shape[1]}, expected {n_rows} x {len(header)}")
    try:
        X = body.iloc[:, 1 + n_rmeta :].to_numpy().astype(np.float32)
    except ValueError as err:
        raise bad_file(path, f"non-numeric expression value ({reason(err, 80)})") from None
    rows = pd.DataFrame(
        {h: body.iloc[:, 1 + j].to_numpy() for j, h in enumerate(header[1 : 1 + n_rmeta]) if h != "id"},
        index=pd.Index(body.iloc[:, 0].to_numpy(), name="id"),
    )
    cols = pd.DataFrame(col_meta, index=pd.Index(header[1 + n_rmeta :], name="id"))
    return X, missing_as_na(rows), missing_as_na(cols.drop(columns=["id"], errors="ignore"))


def _encoding(path: Path) -> str:
    """utf-8 where the file is valid utf-8, else latin-1, which reads any byte (level 5 files write
    their dose unit as a latin-1 "\\xb5M")."""
    with open(path, "rb") as fh:
        try:
            for line in fh:
                line.decode("utf-8")
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8"


def _dimensions(path, version: str, dims: list[str]) -> tuple[int, int, int, int]:
    try:
        values = [int(x) for x in dims]
    except ValueError:
        raise bad_file(path, f"second line {' '.join(dims)[:40]!r} does not hold the table's sizes") from None
    if version == "#1.2":
        if len(values) < 2:
            raise bad_file(path, "second line needs the numbers of rows and columns")
        return values[0], values[1], 1, 0  # 'Name', 'Description', samples...
    if len(values) != 4:
        raise bad_file(
            path, f"second line has {len(values)} numbers, v1.3 needs 4 (rows, columns, row and column metadata fields)"
        )
    return values[0], values[1], values[2], values[3]


def _open(path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise bad_file(path, f"HDF5: {reason(err, 80)}") from None


def _node(f, name: str, path):
    try:
        return f[name]
    except KeyError:
        raise bad_file(
            path, f"missing HDF5 node {name!r}; a GCTX holds /0/DATA/0/matrix and /0/META/ROW, /0/META/COL"
        ) from None


def gctx_metadata(path: str | os.PathLike, axis: str, fields: Sequence[str] | None = None) -> pd.DataFrame:
    """A GCTX file's column ('COL') or row ('ROW') metadata: strings, '-666' missing, indexed by id.

    `fields` reads only those (the ones present); a release's column metadata is large."""
    with _open(path) as f:
        meta = _node(f, f"0/META/{axis}", path)
        ids = _strings(_node(f, f"0/META/{axis}/id", path)[()])
        names = [k for k in meta.keys() if k != "id" and (fields is None or k in fields)]
        # categorical: a release's 1.3 million columns repeat a few thousand values per field
        table = pd.DataFrame({k: _categorical(meta[k][()]) for k in names}, index=pd.Index(ids, name="id"))
    return missing_as_na(table)


def _categorical(values) -> pd.Categorical:
    """Stored strings (or numbers) as a categorical of str, decoding each distinct value once."""
    codes, uniques = pd.factorize(np.asarray(values).ravel())
    return pd.Categorical.from_codes(codes, categories=pd.Index(_strings(uniques)).astype(str), validate=False)


def read_gctx_matrix(
    path: str | os.PathLike, columns: np.ndarray | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """(selected columns, selected rows) float32 from a GCTX, reading only the chunks of the selected
    columns, block by block (`columns`, `rows`: integer positions or None for all)."""
    with _open(path) as f:
        matrix = _node(f, "0/DATA/0/matrix", path)
        n_cols, n_rows = matrix.shape
        columns = np.arange(n_cols) if columns is None else np.asarray(columns, dtype=np.int64)
        picked: slice | np.ndarray = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        width = n_rows if isinstance(picked, slice) else len(picked)
        out = np.empty((len(columns), width), dtype=np.float32)
        order = np.argsort(columns, kind="stable")
        done = 0
        for start, stop, want in _blocks(columns[order], matrix.chunks, n_cols):
            block = matrix[start:stop]  # (stop - start, n_rows): whole chunks, one contiguous read
            out[order[done : done + len(want)]] = block[want - start][:, picked]
            done += len(want)
    return out


def _blocks(sorted_columns: np.ndarray, chunks, n_cols: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, wanted columns in [start, stop)) over runs of chunks that hold wanted columns,
    each at most BLOCK_COLUMNS wide (rounded to whole chunks)."""
    step = chunks[0] if chunks else BLOCK_COLUMNS
    width = max(step, BLOCK_COLUMNS // step * step)
    chunk = sorted_columns // step
    i = 0
    while i < len(sorted_columns):
        start = int(chunk[i] * step)
        stop = min(start + width, n_cols)
        j = int(np.searchsorted(sorted_columns, stop, side="left"))
        yield start, stop, sorted_columns[i:j]
        i = j


def gctx_group_sums(
    path: str | os.PathLike, group: np.ndarray, n_groups: int, rows: np.ndarray | None = None, dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Stream a whole GCTX: (n_groups, rows) sums of the columns of each group (in `dtype`; float32 halves
    the memory of many groups) and the (n_groups,) counts; `group` (n_columns,) is each column's group,
    -1 for columns left out."""
    import scipy.sparse as sp

    group = np.asarray(group, dtype=np.int64)
    with _open(path) as f:
        matrix = _node(f, "0/DATA/0/matrix", path)
        n_cols, n_rows = matrix.shape
        cols = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        sums = np.zeros((n_groups, n_rows if rows is None else len(rows)), dtype=dtype)
        for start, stop, _ in _blocks(np.flatnonzero(group >= 0), matrix.chunks, n_cols):
            g = group[start:stop]
            keep = np.flatnonzero(g >= 0)
            block = matrix[start:stop][:, cols][keep].astype(dtype)  # (kept, rows)
            ones = np.ones(len(keep), dtype=dtype)
            indicator = sp.csr_matrix((ones, (g[keep], np.arange(len(keep)))), shape=(n_groups, len(keep)))
            touched = np.unique(g[keep])  # only the groups this block holds: the rest of `sums` is not rewritten
            sums[touched] += (indicator[touched] @ block).astype(dtype)
    counts = np.bincount(group[group >= 0], minlength=n_groups)
    return sums, counts


def _strings(values) -> np.ndarray:
    values = np.asarray(values).ravel()
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values.astype(str).astype(object)


def missing_as_na(df: pd.DataFrame) -> pd.DataFrame:
    """'-666', 'na' and empty fields as missing values (strings otherwise; categoricals stay categorical)."""

    def one(col: pd.Series) -> pd.Series:
        if isinstance(col.dtype, pd.CategoricalDtype):
            cats = col.cat.categories
            return col.cat.remove_categories(cats[cats.str.strip().str.lower().isin(MISSING)])
        col = col.astype(str)
        return col.where(~col.str.strip().str.lower().isin(MISSING))

    return df.apply(one) if len(df.columns) else df


def write_gctx(
    path: str | os.PathLike, X: np.ndarray, rows: pd.DataFrame, cols: pd.DataFrame, *, chunk_columns: int | None = None
) -> None:
    """Write a GCTX file (X as genes x wells; metadata as strings), atomically. For tests and conversions;
    `chunk_columns` chunks the matrix as the LINCS releases are (columns per chunk, every row)."""
    import h5py

    X = np.asarray(X, dtype=np.float32)
    chunks = (min(chunk_columns, X.shape[1]), X.shape[0]) if chunk_columns else None
    with storage.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["version"] = np.bytes_(b"GCTX1.0")
            f.create_dataset("0/DATA/0/matrix", data=X.T, chunks=chunks)
            write_gctx_metadata(f, rows, cols)


def write_gctx_metadata(f, rows: pd.DataFrame, cols: pd.DataFrame) -> None:
    """The /0/META/ROW and /0/META/COL groups of an open GCTX file (strings; missing as -666)."""

    def strings(values) -> np.ndarray:
        return np.array([str(v).encode("latin-1") for v in values], dtype="S")

    for name, meta in (("ROW", rows), ("COL", cols)):
        f.create_dataset(f"0/META/{name}/id", data=strings(meta.index))
        for field in meta.columns:
            f.create_dataset(f"0/META/{name}/{field}", data=strings(meta[field].fillna("-666")))
