"""Predictions for new drugs and new cell lines, and library screening, from a saved model.

`predict` returns AnnData: one row per drug x cell line x dose, `var_names` = the model's
genes, `layers['control']` = the line's control, `obs` with cell_line, drug, dose, smiles.
A cell line never seen in training only needs its control expression (zero-shot).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from scdca.chem.molecules import NearestTraining, canonical_smiles, canonicalize
from scdca.data.expression import looks_like_counts, normalize_log1p, validated_genes, validated_matrix
from scdca.data.keys import DataKeys, condition_id
from scdca.data.screen import PerturbationData, read
from scdca.errors import ScdcaInputError
from scdca.intervals import LEVEL, Intervals, load_calibration
from scdca.models.base import PerturbationModel, load_model

log = logging.getLogger(__name__)


def load(path: str | os.PathLike, **kwargs) -> PerturbationModel:
    """A model folder written by `scdca train`, with its calibration (`calibration.npz`) as
    `model.calibration` (None without one): `predict` and `screen` then add prediction intervals.
    Keyword arguments (`backbone`, `device`) go to `scdca.models.load_model`."""
    model = load_model(path, **kwargs)
    model.calibration = load_calibration(path)
    return model


def control_from_anndata(
    adata: ad.AnnData | str | os.PathLike, genes: Sequence[str], *, keys: DataKeys = DataKeys()
) -> np.ndarray:
    """Mean log1p expression over the rows of an AnnData of control cells (or one pseudobulk row).

    Raw counts are detected and normalised as in `scdca.data.load`. Returns (G,) in `genes` order.
    """
    adata = adata if isinstance(adata, ad.AnnData) else read(adata)
    names = validated_genes(adata, keys)
    X = validated_matrix(adata, keys)
    if looks_like_counts(X):
        X = normalize_log1p(X)
    pos = pd.Index(names).get_indexer(list(genes))
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos) if p < 0]
        raise ScdcaInputError(
            f"control: {len(missing)} of the model's genes are missing from the control data, "
            f"e.g. {missing[:10]}; provide expression for every model gene"
        )
    mean = np.asarray(X.mean(axis=0)).ravel()
    return mean[pos].astype(np.float32)


def _query(genes, controls: dict[str, np.ndarray], drugs: dict[str, str], doses: Sequence[float]) -> PerturbationData:
    rows = [(c, d, float(x)) for c in controls for d in drugs for x in doses]
    cond = pd.DataFrame(
        {
            "cell_line": [r[0] for r in rows],
            "drug": [r[1] for r in rows],
            "dose": [r[2] for r in rows],
            "smiles": [drugs[r[1]] for r in rows],
            "n_cells": 0,
        },
        index=pd.Index([condition_id(*r) for r in rows], name="condition_id"),
    )
    lines = list(controls)
    cm = np.stack([controls[c] for c in lines]).astype(np.float32)
    return PerturbationData(
        genes=np.asarray(genes, dtype=object),
        conditions=cond,
        mean=None,
        std=None,
        controls=pd.DataFrame({"n_cells": 0}, index=pd.Index(lines, name="cell_line")),
        control_mean=cm,
        control_std=np.full_like(cm, np.nan),
    )


def resolve_controls(model, cell_lines: Sequence[str] | None, control: dict[str, np.ndarray] | None):
    """Known lines by name (from the model's training data) plus new lines given as control vectors."""
    known = model.control_lines
    out: dict[str, np.ndarray] = {}
    for c in cell_lines or []:
        if c not in known:
            raise ScdcaInputError(
                f"cell_line: {c!r} was not in the training data (known: {list(known)}); "
                f"for a new line pass its control expression (--control FILE)"
            )
        out[c] = known[c]
    out.update(control or {})
    if not out:
        raise ScdcaInputError("give at least one cell line (--cell-line NAME) or a control file (--control FILE)")
    return out


def predict(
    model,
    smiles: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    cell_lines: Sequence[str] | None = None,
    control: dict[str, np.ndarray] | None = None,
    doses: Sequence[float] = (1.0,),
    level: float = LEVEL,
) -> ad.AnnData:
    """Predict every drug x cell line x dose.

    Args:
        model: a fitted or loaded ScDCAModel (or any fitted model: `genes`, `control_lines`, `predict`).
        smiles: drugs to predict (need not have been seen in training).
        names: drug names (default: the SMILES).
        cell_lines: known lines by name.
        control: new lines: name -> control expression in the model's gene order (zero-shot).
        doses: doses in the units of the training data.
        level: the prediction intervals' level, where the model has a calibration (`scdca train`
            calibrates by default): layers lower and upper, obs expected_mse and confidence.
    Returns:
        AnnData of predicted mean expression.
    """
    names = list(names) if names is not None else list(smiles)
    drugs = canonicalize(dict(zip(names, smiles)), arg="smiles")
    query = _query(model.genes, resolve_controls(model, cell_lines, control), drugs, doses)
    pred = model.predict(query)
    out = ad.AnnData(
        X=pred.astype(np.float32),
        obs=query.conditions[["cell_line", "drug", "dose", "smiles"]].copy(),
        var=pd.DataFrame(index=[str(g) for g in model.genes]),
    )
    similarity = TrainingSimilarity(model)
    if similarity.available:
        per_drug = pd.DataFrame(similarity.columns(list(drugs.values())), index=list(drugs))
        for col in per_drug:
            out.obs[col] = out.obs["drug"].map(per_drug[col]).to_numpy()
    out.layers["control"] = query.control_for(query.conditions["cell_line"])
    cal = model.calibration
    if cal is not None:
        cond = query.conditions
        interval = Intervals.of(
            cal, pred, out.layers["control"], cond["dose"].to_numpy(), cond["smiles"], levels=(level,)
        )
        out.layers["lower"], out.layers["upper"] = interval.bounds(pred, level)
        out.obs["expected_mse"], out.obs["confidence"] = interval.expected_mse, interval.confidence
        out.uns["intervals"] = {"level": level, "calibrated_for": cal.task}
    return out


class TrainingSimilarity:
    """How close each query molecule is to the model's training molecules (its applicability
    domain): the max Tanimoto similarity and the nearest training drug (`NearestTraining`).
    Predictions for molecules far from every training drug are the least reliable (the
    report's score-by-similarity figure shows how much on a benchmark)."""

    def __init__(self, model):
        train = model.training_molecules
        self.available = bool(train)
        if not self.available:
            log.info("the model records no training molecules: no similarity-to-training columns")
            return
        self._nearest = NearestTraining(train)

    def columns(self, smiles: Sequence[str]) -> dict[str, list]:
        """max_tanimoto_train (float) and nearest_train_drug (str) for parseable SMILES."""
        max_sim, nearest = self._nearest.query(smiles)
        return {"max_tanimoto_train": max_sim.astype(float).round(4).tolist(), "nearest_train_drug": nearest}


def _batches(items: list, size: int) -> Iterator[list]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def screen(
    model,
    names: Sequence[str],
    smiles: Sequence[str],
    *,
    cell_line: str | None = None,
    control: dict[str, np.ndarray] | None = None,
    dose: float = 1.0,
    signature: pd.Series | None = None,
    batch_size: int = 256,
    progress: bool = True,
    rank_by: str = "auto",
    level: float = LEVEL,
) -> pd.DataFrame:
    """Rank a molecule library by predicted effect size (and similarity to a target signature).

    Streams the library in batches: memory holds batch_size x genes predictions at a time.
    Unparseable SMILES are reported in the `error` column, not fatal.

    Returns:
        DataFrame sorted by `score` (signature cosine if given, else effect size) with columns
        drug, smiles, effect_size (RMS change from control over genes), n_up, n_down
        (absolute change > 0.5), signature_cosine (if a signature is given), score, and, when the
        model records its training molecules, max_tanimoto_train and nearest_train_drug. With a
        calibrated model also effect_lower (the effect size with every gene's change shrunk to the
        edge of its `level` interval nearest to no change: a lower confidence bound), expected_mse
        and confidence.
        `rank_by`: 'auto' (signature cosine if a signature is given, else effect size), 'effect',
        'effect_lower' (needs a calibrated model) or 'signature'.
    """
    cal = model.calibration
    column = _rank_column(rank_by, signature is not None, cal is not None)
    controls = resolve_controls(model, [cell_line] if cell_line else None, control)
    if len(controls) != 1:
        raise ScdcaInputError("screen one cell line at a time (--cell-line or --control)")
    line, ctrl = next(iter(controls.items()))
    sig = _signature_vector(signature, model.genes)
    similarity = TrainingSimilarity(model)
    rows = []
    pairs = list(zip(names, smiles))
    bar = tqdm(total=len(pairs), desc="screen", unit="mol", disable=not progress)
    for chunk in _batches(pairs, batch_size):
        rows += _screen_batch(model, chunk, line, ctrl, dose, sig, similarity, (cal, level))
        bar.update(len(chunk))
    bar.close()
    df = _checked_screen(pd.DataFrame(rows))
    df["score"] = df.get(column)
    return df.sort_values("score", ascending=False, na_position="last").reset_index(drop=True)


RANK_BY = {"effect": "effect_size", "effect_lower": "effect_lower", "signature": "signature_cosine"}


def _rank_column(rank_by: str, has_signature: bool, calibrated: bool) -> str:
    """The screen table's column that `rank_by` sorts on, or an error saying what is missing."""
    if rank_by == "auto":
        return "signature_cosine" if has_signature else "effect_size"
    if rank_by not in RANK_BY:
        raise ScdcaInputError(f"rank_by: {rank_by!r}; choose one of auto, {', '.join(RANK_BY)}")
    if rank_by == "effect_lower" and not calibrated:
        raise ScdcaInputError(
            "rank_by: 'effect_lower' needs a calibrated model; retrain it with `scdca train` (which calibrates "
            "by default, --intervals unseen_drug) or rank by 'effect'"
        )
    if rank_by == "signature" and not has_signature:
        raise ScdcaInputError("rank_by: 'signature' needs a target signature (--signature FILE)")
    return RANK_BY[rank_by]


def _signature_vector(signature: pd.Series | None, genes) -> np.ndarray | None:
    """A target signature (gene -> change) on the model's genes, missing genes as 0."""
    if signature is None:
        return None
    sig = signature.reindex([str(g) for g in genes]).to_numpy(float)
    if np.isnan(sig).all():
        raise ScdcaInputError("signature: none of its genes are model genes")
    return np.nan_to_num(sig)


def _screen_batch(model, chunk, line: str, ctrl: np.ndarray, dose: float, sig, similarity, calibration) -> list[dict]:
    """Score one batch of (name, SMILES): effect size, genes up and down, signature cosine, novelty,
    and with a calibration (cal, level) the effect's lower bound, expected error and confidence."""

    ok = [(n, canonical_smiles(s)) for n, s in chunk]
    good = {n: c for n, c in ok if c is not None}
    rows = [{"drug": n, "smiles": s, "error": "unparseable SMILES"} for (n, s), (_, c) in zip(chunk, ok) if c is None]
    if not good:
        return rows
    query = _query(model.genes, {line: ctrl}, good, [dose])
    pred = model.predict(query)
    delta = pred - ctrl[None, :]  # (b, G)
    near = similarity.columns(list(good.values())) if similarity.available else {}
    cal, level = calibration
    if cal is not None:
        interval = Intervals.of(
            cal, pred, ctrl[None, :], np.full(len(pred), dose), list(good.values()), levels=(level,)
        )
        shrunk = np.maximum(np.abs(delta) - interval.alphas[level] * interval.sigma, 0)  # change nearest 0
        near = {
            **near,
            "effect_lower": np.sqrt((shrunk**2).mean(1)).tolist(),
            "expected_mse": interval.expected_mse.tolist(),
            "confidence": interval.confidence.tolist(),
        }
    for i, ((name, smi), d) in enumerate(zip(good.items(), delta)):
        r = {
            "drug": name,
            "smiles": smi,
            "effect_size": float(np.sqrt((d**2).mean())),
            "n_up": int((d > 0.5).sum()),
            "n_down": int((d < -0.5).sum()),
            "error": "",
            **{col: values[i] for col, values in near.items()},
        }
        if sig is not None:
            den = np.linalg.norm(d) * np.linalg.norm(sig)
            r["signature_cosine"] = float(d @ sig / den) if den > 0 else 0.0
        rows.append(r)
    return rows


def _checked_screen(df: pd.DataFrame) -> pd.DataFrame:
    """Refuse a library with nothing to screen; warn about the molecules that could not be read."""
    if df.empty:
        raise ScdcaInputError(
            "library: no molecules in it; pass one SMILES per line (.smi) or a CSV with a 'smiles' column"
        )
    failed = df["error"] != ""
    if failed.all():
        raise ScdcaInputError(
            f"library: none of its {len(df)} SMILES could be parsed (e.g. "
            f"{df['smiles'].head(3).tolist()!r}); pass one SMILES per line (.smi) or a CSV "
            f"with a 'smiles' column"
        )
    if failed.any():
        log.warning(
            "screen: skipped %d molecule(s) with unparseable SMILES: %s%s (listed in the 'error' column)",
            failed.sum(),
            ", ".join(df.loc[failed, "drug"].astype(str).head(10)),
            " ..." if failed.sum() > 10 else "",
        )
    return df
