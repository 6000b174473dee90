"""How much learnable drug signal a screen carries, per cell line, before any model is fit.

A plate whose conditions differ from one another mostly by the common response and by well
noise cannot reward a drug model, whatever it is. These numbers say so next to the scores:

- `common_share`: share of the conditions' summed squared change (from control) that the
  line's drug-blind mean response, scaled per dose (`scaled_mean`), explains.
- `drug_specific_share`: what is left, 1 - common_share: the drug-specific part plus noise.
- `noise_share`: the part of that residual that measurement noise alone would produce,
  from the vehicle wells' (cells') per-gene variance and each condition's number of wells
  (cells): E|noise|^2 = sum_g var_g (1/n + 1/n_control). Near 1: the drug-specific part is
  noise-sized, nothing is left to learn.
- `replicate_r`: where conditions hold several wells (cells), the Pearson correlation,
  over genes and conditions, of the two split halves' deviations from the common response;
  `dose_neighbour_r` (always): the same between a drug's two highest doses, which agree
  only if the drug has a reproducible effect of its own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scdca.data.screen import PerturbationData
from scdca.eval.metrics import pearson
from scdca.models.shrinkage import ScaledMeanBaseline


def plate_diagnostics(data: PerturbationData) -> pd.DataFrame:
    """One row per cell line: n_conditions, n_drugs, n_doses and the shares described above."""
    common = ScaledMeanBaseline().fit(data).change(data)  # (N, G)
    delta = data.delta().astype(np.float64)
    resid = delta - common
    cond = data.conditions
    ctrl_var = np.nan_to_num(data.control_std.astype(np.float64) ** 2)  # (L, G); NaN with one vehicle well
    rows = []
    for li, line in enumerate(data.controls.index):
        idx = np.flatnonzero((cond["cell_line"] == line).to_numpy())
        if idx.size == 0:
            continue
        n = cond["n_cells"].to_numpy()[idx].astype(float)
        n0 = float(data.controls["n_cells"].iloc[li])
        total = float((delta[idx] ** 2).sum())
        left = float((resid[idx] ** 2).sum())
        noise = float(ctrl_var[li].sum() * (1.0 / n + 1.0 / n0).sum()) if n0 > 1 else np.nan
        row = {
            "cell_line": line,
            "n_conditions": int(idx.size),
            "n_drugs": int(cond["drug"].iloc[idx].nunique()),
            "n_doses": int(cond["dose"].iloc[idx].nunique()),
            "common_share": 1.0 - left / total if total > 0 else np.nan,
            "drug_specific_share": left / total if total > 0 else np.nan,
            "noise_share": min(noise / left, 1.0) if left > 0 and np.isfinite(noise) else np.nan,
            "replicate_r": _replicate_r(data, idx, common),
            "dose_neighbour_r": _dose_neighbour_r(cond, idx, resid),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _replicate_r(data: PerturbationData, idx: np.ndarray, common: np.ndarray) -> float:
    if data.half_a is None or data.half_b is None:
        return np.nan
    ctrl = data.control_for(data.conditions["cell_line"].iloc[idx])
    a, b = data.half_a[idx] - ctrl - common[idx], data.half_b[idx] - ctrl - common[idx]
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    return pearson(a[ok].ravel(), b[ok].ravel()) if ok.sum() >= 2 else np.nan


def _dose_neighbour_r(cond: pd.DataFrame, idx: np.ndarray, resid: np.ndarray) -> float:
    a, b = [], []
    sub = cond.iloc[idx].assign(_row=idx)
    for _, g in sub.groupby("drug"):
        if len(g) >= 2:
            top = g.sort_values("dose")["_row"].to_numpy()[-2:]
            a.append(resid[top[1]])
            b.append(resid[top[0]])
    return pearson(np.concatenate(a), np.concatenate(b)) if len(a) >= 2 else np.nan


def describe(table: pd.DataFrame) -> str:
    """One plain sentence per line on whether a drug model has anything to learn."""
    out = []
    for _, r in table.iterrows():
        verdict = (
            "little drug-specific signal beyond noise: expect drug-blind baselines to be hard to beat"
            if (np.isfinite(r["noise_share"]) and r["noise_share"] > 0.8)
            or (np.isfinite(r["dose_neighbour_r"]) and r["dose_neighbour_r"] < 0.1)
            else "drug-specific signal above noise: a drug model can add to the common response"
        )
        out.append(
            f"{r['cell_line']}: the common response explains {r['common_share']:.0%} of the change; of the "
            f"rest, noise accounts for {r['noise_share']:.0%}; a drug's two top doses agree at "
            f"r = {r['dose_neighbour_r']:.2f}: {verdict}."
        )
    return "\n".join(out)
