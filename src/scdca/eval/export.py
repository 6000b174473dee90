"""Hand a benchmark's saved predictions to other tools.

`cell_eval_pair` turns one prediction file (`RUN/predictions/<model>__<task>__seed<k>.h5ad`)
into the two AnnData files cell-eval reads as they are (`cell-eval run -ap pred.h5ad -ar
real.h5ad`, or `cell_eval.MetricsEvaluator`):

- one row per tested condition (its pseudobulk mean: observed in `real`, predicted in `pred`)
  plus one control row per cell line (the line's observed control mean, in both files, so
  both sides measure their change from the same control, as our metrics do);
- `obs[PERT_COL]` names the perturbation as `drug@dose`, the control row `CONTROL`;
- `obs['cell_line']` keeps the lines apart: pass `--celltype-col cell_line` so each line is
  scored against its own control.

The rows are pseudobulk means, not cells, so only cell-eval's profiles that work on means
(`--profile anndata`, or `pds`) are meaningful; its DE-based metrics need cells.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scdca import storage
from scdca.errors import ScdcaInputError
from scdca.eval.runs import CONTROL, perturbation_label, prediction_file, read_predictions

PERT_COL = "perturbation"
FORMATS = ("cell-eval",)


def cell_eval_pair(preds: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """(real, pred) AnnData for cell-eval from one prediction file's AnnData."""
    for key in ("observed", "control"):
        if key not in preds.layers:
            raise ScdcaInputError(
                f"predictions: the file has no layers[{key!r}]; pass a file written by "
                f"`scdca benchmark` (RUN/predictions/*.h5ad)"
            )
    obs = preds.obs
    if (obs["drug"].astype(str) == CONTROL).any():
        raise ScdcaInputError(
            f"predictions: a drug is named {CONTROL!r}, which is the control label in the export; rename that drug"
        )
    labels = [perturbation_label(d, x) for d, x in zip(obs["drug"], obs["dose"])]
    lines = obs["cell_line"].astype(str).to_numpy()
    first = pd.Series(np.arange(len(lines))).groupby(lines).first()  # a row of each line, for its control
    control = np.asarray(preds.layers["control"], dtype=np.float32)[first.to_numpy()]

    meta = pd.DataFrame(
        {
            PERT_COL: labels + [CONTROL] * len(first),
            "cell_line": np.concatenate([lines, first.index.to_numpy(dtype=str)]),
            "drug": np.concatenate([obs["drug"].astype(str).to_numpy(), [CONTROL] * len(first)]),
            "dose": np.concatenate([obs["dose"].to_numpy(dtype=float), np.zeros(len(first))]),
        }
    )
    meta.index = [f"{c}|{p}" for c, p in zip(meta["cell_line"], meta[PERT_COL])]
    if meta.index.duplicated().any():
        dup = meta.index[meta.index.duplicated()].unique().tolist()[:3]
        raise ScdcaInputError(
            f"predictions: conditions {dup} appear twice (a file merging several held-out "
            f"runs of the same line?); export one model/task/seed file"
        )

    def build(x: np.ndarray) -> ad.AnnData:
        return ad.AnnData(
            X=np.vstack([np.asarray(x, dtype=np.float32), control]),
            obs=meta.copy(),
            var=pd.DataFrame(index=preds.var_names.copy()),
        )

    return build(preds.layers["observed"]), build(preds.X)


def export(run: str | Path, model: str, task: str, seed: int, out: str | Path, fmt: str = "cell-eval") -> list[Path]:
    """Write the files of `fmt` for one grid cell of a benchmark run; returns their paths."""
    if fmt not in FORMATS:
        raise ScdcaInputError(f"format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")

    real, pred = cell_eval_pair(read_predictions(prediction_file(run, model, task, seed)))
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model}__{task}__seed{seed}")
    paths = [Path(out) / f"{stem}_real.h5ad", Path(out) / f"{stem}_pred.h5ad"]
    storage.write_h5ad(paths[0], real)
    storage.write_h5ad(paths[1], pred)
    return paths
