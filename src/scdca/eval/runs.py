"""The run folder of `scdca benchmark`: where each grid cell's results, costs and predictions live,
the prediction-file format, and the run's provenance (package versions, git commit)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scdca import storage
from scdca.data.degs import deg_long_table
from scdca.data.keys import DataKeys
from scdca.data.screen import PerturbationData, read
from scdca.errors import ScdcaInputError
from scdca.intervals import LEVEL, Intervals

CONTROL = "control"


def perturbation_label(drug: str, dose: float) -> str:
    """The perturbation name of a condition: 'Dacinostat@0.1'."""
    return f"{drug}@{float(dose):g}"


def prediction_file(run: str | Path, model: str, task: str, seed: int) -> Path:
    """The prediction file of one grid cell, or an error listing what the run holds."""
    folder = Path(run) / "predictions"
    path = folder / f"{model}__{task}__seed{seed}.h5ad"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.h5ad")) if folder.is_dir() else []
        hint = (
            f"the run holds: {', '.join(have[:12])}{' ...' if len(have) > 12 else ''}"
            if have
            else f"{str(folder)!r} holds no prediction files; pass the --out folder of `scdca benchmark`"
        )
        raise ScdcaInputError(
            f"model/task/seed: no predictions for {model!r} on {task!r} seed {seed} in {str(run)!r}; {hint}"
        )
    return path


RESULT_COLUMNS = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric", "value"]
REFERENCES = ("ceiling", "ceiling_half", "oracle")  # reference rows, not models


def cell_stem(model: str, task: str, seed: int) -> str:
    return f"{model}__{task}__seed{seed}"


def cell_path(out: Path, model: str, task: str, seed: int) -> Path:
    """A grid cell's result rows, whose existence marks the cell done: parquet, or a CSV cell where
    the run folder holds one (older run folders), which is read the same way."""
    folder, stem = Path(out) / "cells", cell_stem(model, task, seed)
    old = folder / f"{stem}.csv"
    return old if old.exists() else folder / f"{stem}.parquet"


def predictions_anndata(
    test: PerturbationData,
    pred,
    observed,
    *,
    held_out: str = "",
    n_degs: int = 50,
    keys: DataKeys | None = None,
    interval: Intervals | None = None,
) -> ad.AnnData:
    """One split's predictions as AnnData that scanpy, pertpy and cell-eval read as they are.

    Rows: the tested conditions, then one control row per cell line (prediction = observation
    = the line's control mean). X = prediction; layers observed, observed_std, control.
    obs: canonical cell_line, drug, dose, smiles, held_out, `perturbation` ('drug@dose' or
    'control') and `control` (bool), plus the same values under the data's own obs keys
    (`keys`, e.g. cell_type / condition / dose_val). uns['degs']: each condition's ranked DEG
    names (the report reads them); uns['rank_genes_groups_df']: the same DEGs with scanpy's
    t-test statistics in the long form of `sc.get.rank_genes_groups_df` (`data.deg_long_table`;
    `data.rank_genes_groups_uns` turns it into scanpy's uns['rank_genes_groups'] in memory).
    With `interval`: layers lower and upper (the 90% interval; a control row's are its value),
    obs expected_mse and confidence (NaN on control rows), uns['intervals'] = {'level': 0.9}.
    """

    cond = test.conditions
    lines = list(dict.fromkeys(cond["cell_line"]))  # in order of appearance
    control = test.control_for(cond["cell_line"])
    ctrl_rows = test.control_for(lines)
    std = test.std if test.std is not None and test.std.shape == control.shape else np.full_like(control, np.nan)
    ctrl_std = test.control_std[test.controls.index.get_indexer(lines)]
    obs = pd.DataFrame(
        {
            "cell_line": list(cond["cell_line"]) + lines,
            "drug": list(cond["drug"]) + [CONTROL] * len(lines),
            "dose": list(cond["dose"].astype(float)) + [0.0] * len(lines),
            "smiles": list(cond["smiles"].astype(str)) + [""] * len(lines),
            "held_out": held_out,
            "perturbation": [perturbation_label(d, x) for d, x in zip(cond["drug"], cond["dose"])]
            + [CONTROL] * len(lines),
            "control": [False] * len(cond) + [True] * len(lines),
        },
        index=list(test.ids) + [f"{line}_{CONTROL}" for line in lines],
    )
    keys = keys or DataKeys()
    for canonical, user in (
        ("cell_line", keys.cell_line),
        ("drug", keys.drug),
        ("dose", keys.dose),
        ("smiles", keys.smiles),
        ("control", keys.control),
    ):
        if user not in obs:
            obs[user] = obs[canonical]
    adata = ad.AnnData(
        X=np.vstack([pred, ctrl_rows]).astype(np.float32), obs=obs, var=pd.DataFrame(index=[str(g) for g in test.genes])
    )
    adata.layers["observed"] = np.vstack([observed, ctrl_rows]).astype(np.float32)
    adata.layers["observed_std"] = np.vstack([std, ctrl_std]).astype(np.float32)  # across cells, per-gene plots
    adata.layers["control"] = np.vstack([control, ctrl_rows]).astype(np.float32)
    adata.uns["degs"], adata.uns["rank_genes_groups_df"] = _deg_tables(test, n_degs)
    if interval is not None:
        add_intervals(adata, pred, interval)
    return adata


def add_intervals(adata: ad.AnnData, pred, interval: Intervals, level: float = LEVEL) -> None:
    """Write `interval` for the first len(pred) rows of adata (the rest, control rows, get their value
    as both bounds and NaN expected error): layers lower/upper, obs expected_mse/confidence, uns['intervals']."""
    n, extra = len(pred), adata.n_obs - len(pred)
    lower, upper = interval.bounds(pred, level)
    fill = np.asarray(adata.X[n:], dtype=np.float32)
    adata.layers["lower"] = np.vstack([lower, fill])
    adata.layers["upper"] = np.vstack([upper, fill])
    adata.obs["expected_mse"] = np.concatenate([interval.expected_mse, np.full(extra, np.nan)])
    adata.obs["confidence"] = np.concatenate([interval.confidence, np.full(extra, np.nan)])
    adata.uns["intervals"] = {"level": level}


_DEG_CACHE: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}  # content hash -> tables, this process only


def _deg_tables(test: PerturbationData, n_degs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test conditions' DEG tables (`deg_table`, `deg_long_table`). They depend on the test
    data only, not on the model, so every model of a split shares one computation: keyed by a
    hash of everything they are computed from."""
    h = hashlib.sha1(f"{n_degs}|{'|'.join(map(str, test.ids))}|{'|'.join(map(str, test.genes))}".encode())
    for array in (test.mean, test.std, test.control_mean, test.control_std):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    h.update(test.controls["n_cells"].to_numpy().tobytes() + test.conditions["n_cells"].to_numpy().tobytes())
    h.update(test.controls.index.astype(str).str.cat(sep="|").encode())
    for i in test.ids:
        h.update(np.asarray(test.degs[i][:n_degs]).tobytes())
    key = h.hexdigest()
    if key not in _DEG_CACHE:
        if len(_DEG_CACHE) >= 64:
            _DEG_CACHE.pop(next(iter(_DEG_CACHE)))
        _DEG_CACHE[key] = (deg_table(test, n_degs), deg_long_table(test, n_degs=n_degs))
    table, long = _DEG_CACHE[key]
    return table.copy(), long.copy()


def read_predictions(path: str | os.PathLike) -> ad.AnnData:
    """A prediction file's condition rows (its control rows dropped), as the report and export use them."""

    a = read(path, what="predictions")
    return a[~a.obs["control"].to_numpy(bool)].copy() if "control" in a.obs else a


def read_prediction_parts(path: str | os.PathLike, layers=("observed",), uns=("degs",)) -> ad.AnnData:
    """The condition rows of a prediction file with only X, these layers and these uns entries:
    about 2.5x faster than `read_predictions` for readers that need no DEG statistics."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            a = ad.AnnData(X=read_elem(f["X"]), obs=read_elem(f["obs"]), var=read_elem(f["var"]))
            for name in layers:
                a.layers[name] = read_elem(f["layers"][name])
            for name in uns:
                a.uns[name] = read_elem(f["uns"][name])
    except (OSError, KeyError) as err:
        raise ScdcaInputError(
            f"predictions: {str(path)!r} is not a complete prediction file ({err}); rerun its grid "
            f"cell (delete its cells/ and predictions/ files and rerun the benchmark)"
        ) from None
    return a[~a.obs["control"].to_numpy(bool)].copy() if "control" in a.obs else a


def deg_table(test: PerturbationData, n_degs: int) -> pd.DataFrame:
    """Condition id (index) -> its ranked DEG names in columns '1'..'n' ('' past the end)."""
    rows = {}
    for i in test.ids:
        names = [str(g) for g in test.genes[test.degs[i][:n_degs]]]
        rows[i] = names + [""] * (n_degs - len(names))
    return pd.DataFrame.from_dict(rows, orient="index", columns=[str(r + 1) for r in range(n_degs)])


def predictions_file(model, task, seed, preds, *, k: int = 20, keys: DataKeys | None = None) -> ad.AnnData | None:
    """One grid cell's prediction AnnData (its splits' `predictions_anndata`, concatenated), with
    each condition's top-k DEGs, the genes its `*_deg` metrics were scored on (the top-k only:
    the DEG-size sweep is scored with the other metrics and needs no DEG lists in the files)."""
    if not preds:
        return None
    adatas = [
        predictions_anndata(t, p, o, held_out=s.held_out, n_degs=k, keys=keys, interval=i) for s, t, p, o, i in preds
    ]
    merged = ad.concat(adatas, merge="same") if len(adatas) > 1 else adatas[0]
    merged.uns["degs"] = pd.concat([a.uns["degs"] for a in adatas])
    merged.uns["rank_genes_groups_df"] = pd.concat([a.uns["rank_genes_groups_df"] for a in adatas], ignore_index=True)
    if "intervals" in adatas[0].uns:
        merged.uns["intervals"] = adatas[0].uns["intervals"]
    merged.uns["scdca"] = {"model": model, "task": task, "seed": seed, "versions": package_versions()}
    return merged


def write_cell(out, model, task, seed, rows, predictions: ad.AnnData | None, costs):
    stem = cell_stem(model, task, seed)
    if predictions is not None:
        storage.write_h5ad(out / "predictions" / f"{stem}.h5ad", predictions)
    storage.write_csv(out / "costs" / f"{stem}.csv", pd.DataFrame(costs))
    rows = rows.assign(held_out=rows["held_out"].fillna("").astype(str))
    storage.write_parquet(out / "cells" / f"{stem}.parquet", rows)  # last: marks the cell done


def collect(out: Path, grid) -> pd.DataFrame:
    frames = []
    for model, task, seed in grid:
        path = cell_path(out, model, task, seed)
        if path.suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"held_out": str})
        else:
            df = pd.read_parquet(path)
        df["held_out"] = df["held_out"].fillna("")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)[RESULT_COLUMNS] if frames else pd.DataFrame(columns=RESULT_COLUMNS)


def collect_costs(out: Path, grid) -> pd.DataFrame:
    """The cost rows (`costs/<cell>.csv`) of these grid cells in one table."""
    files = [Path(out) / "costs" / f"{cell_stem(*c)}.csv" for c in grid]
    frames = [pd.read_csv(f) for f in files if f.exists() and f.stat().st_size > 1]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


TEXT_COLUMNS = ["model", "task", "held_out", "cell_line", "drug", "metric"]


def write_results(out: Path, results: pd.DataFrame) -> None:
    """results.csv (for people and other tools) and results.parquet, the same table with its
    text columns stored as categories, which the report reads 10x faster."""
    storage.write_large_csv(Path(out) / "results.csv", results)
    storage.write_parquet(Path(out) / "results.parquet", results.astype({c: "category" for c in TEXT_COLUMNS}))


def read_results(folder: str | os.PathLike) -> pd.DataFrame:
    """A run's results: `results.parquet` when it is at least as new as results.csv, else
    results.csv. The text columns come back as categories (the report filters and groups on
    them dozens of times), so group with `observed=True`."""
    folder = Path(folder)
    csv, fast = folder / "results.csv", folder / "results.parquet"
    if fast.exists() and (not csv.exists() or fast.stat().st_mtime >= csv.stat().st_mtime):
        return pd.read_parquet(fast)
    if not csv.exists():
        raise ScdcaInputError(f"folder: {str(folder)!r} has no results.csv; run `scdca benchmark --out {folder}` first")
    results = pd.read_csv(csv, keep_default_na=False, na_values=[""], dtype={"held_out": str})
    results["held_out"] = results["held_out"].fillna("")
    return results.astype({c: "category" for c in TEXT_COLUMNS})


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide a run's numbers (those installed)."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("scdca", "torch", "numpy", "pandas", "anndata", "scanpy", "scikit-learn", "rdkit"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the scdca source tree when it is a git checkout (editable install), with
    '-dirty' appended when the tree has uncommitted changes; None elsewhere."""
    import subprocess

    package = Path(__file__).resolve().parents[1]  # src/scdca
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True, text=True, timeout=5
        )
        lines = res.stdout.split()
        if res.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "src" / "scdca" != package:
            return None  # not our checkout (e.g. installed inside someone else's repository)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=lines[0], capture_output=True, text=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1] + ("-dirty" if status.stdout.strip() else "")
