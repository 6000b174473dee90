"""Shrink a model's drug-specific effect toward the drug-agnostic answer, by as much as the
training drugs say it can be trusted.

For a molecule never seen in training a model predicts anchor + deviation, where the anchor
is what a drug-blind model predicts (`scaled_mean`: the line's mean training change, scaled
per dose). Where structure does not predict the response (a broad screen, a plate with few
drugs), the deviation is confident noise: its error adds to the anchor's. `cv_shrinkage`
refits the model on folds of the training *drugs* (every dose of a drug in the same fold, as
in the unseen-drug task) and returns the weight w in [0, 1] that minimises the squared error
of anchor + w * deviation on the held-out training drugs. The test drugs are never used.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..data import PerturbationData
from .base import MODELS, PerturbationModel

log = logging.getLogger(__name__)


@MODELS.register("scaled_mean")
class ScaledMeanBaseline(PerturbationModel):
    """Drug-blind: control + a(line, dose) * m(line).

    m is the line's mean training change (what `train_mean` predicts) and a(line, dose) >= 0
    the mean projection of the line's training changes at that dose onto m, divided by |m|^2
    (nearest training dose on a log scale): the common response, as strong as the dose makes
    it. Its change has the direction of `train_mean`'s, so its change correlations equal
    train_mean's; its magnitude follows dose. Lines without training changes use the pooled
    m and a.
    """

    name = "scaled_mean"

    def fit(self, train: PerturbationData) -> "ScaledMeanBaseline":
        cond = train.conditions
        delta = train.delta().astype(np.float64)  # (N, G)
        logd = np.log10(np.maximum(cond["dose"].to_numpy(float), 1e-12))
        lines = cond["cell_line"].to_numpy()
        self._fits = {None: self._scales(delta, logd)}
        for line in np.unique(lines):
            rows = lines == line
            self._fits[line] = self._scales(delta[rows], logd[rows])
        return self

    @staticmethod
    def _scales(delta: np.ndarray, logd: np.ndarray):
        mean = delta.mean(0)  # (G,)
        norm2 = float(mean @ mean)
        proj = delta @ mean / norm2 if norm2 > 0 else np.zeros(len(delta))  # (N,)
        levels = np.unique(logd)
        scales = np.array([max(proj[logd == x].mean(), 0.0) for x in levels])
        return mean, levels, scales

    @classmethod
    def from_fits(cls, fits: dict) -> "ScaledMeanBaseline":
        """Rebuild from saved fits {line or 'None': {mean, levels, scales}} (what ScDCARouted saves)."""
        model = cls()
        model._fits = {None if k == "None" else k: (np.asarray(v["mean"]), np.asarray(v["levels"]),
                                                    np.asarray(v["scales"])) for k, v in fits.items()}
        return model

    def change(self, query: PerturbationData) -> np.ndarray:
        """The predicted change from control, (N, G)."""
        cond = query.conditions
        logd = np.log10(np.maximum(cond["dose"].to_numpy(float), 1e-12))
        out = np.empty((len(cond), query.n_genes))
        for i, (line, x) in enumerate(zip(cond["cell_line"], logd)):
            mean, levels, scales = self._fits.get(line, self._fits[None])
            out[i] = scales[np.argmin(np.abs(levels - x))] * mean
        return out

    def _predict(self, query):
        return query.control_for(query.conditions["cell_line"]) + self.change(query)


def drug_folds(drugs, n_folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each condition: the distinct drugs dealt at random into `n_folds` groups."""
    drugs = np.asarray(drugs)
    names = np.unique(drugs)
    order = np.random.default_rng([seed, 17]).permutation(len(names))
    fold_of = {names[j]: i % n_folds for i, j in enumerate(order)}
    return np.array([fold_of[d] for d in drugs])


def best_weight(deviation: np.ndarray, target: np.ndarray) -> float:
    """argmin over w in [0, 1] of |target - w * deviation|^2 (least squares, clipped)."""
    den = float((deviation.astype(np.float64) ** 2).sum())
    return float(np.clip((deviation * target).sum() / den, 0.0, 1.0)) if den > 0 else 0.0


def cv_shrinkage(fit_predict: Callable[[PerturbationData, PerturbationData], np.ndarray], train: PerturbationData,
                 *, n_folds: int = 3, seed: int = 0) -> tuple[float, dict]:
    """The weight of a model's deviation from `scaled_mean` that held-out training drugs support.

    Args:
        fit_predict: (fold's training data, held-out query without observations) -> the
            model's predicted mean expression for the query, (n, G).
        train: the training conditions (never the test ones).
        n_folds: folds of training drugs (each refits the model once).
        seed: which drugs go to which fold.
    Returns:
        (w in [0, 1], details: folds, the out-of-fold squared error at w = 0, w and 1).
    """
    ids = np.asarray(train.ids)
    fold = drug_folds(train.conditions["drug"], n_folds, seed)
    dev = np.zeros((len(ids), train.n_genes))
    target = np.zeros_like(dev)
    for k in range(n_folds):
        inner, held = train.subset(ids[fold != k]), train.subset(ids[fold == k], observed=False)
        anchor = ScaledMeanBaseline().fit(inner).change(held)
        control = held.control_for(held.conditions["cell_line"])
        dev[fold == k] = np.asarray(fit_predict(inner, held), dtype=np.float64) - control - anchor
        target[fold == k] = train.subset(ids[fold == k]).delta() - anchor
    w = best_weight(dev, target)
    sse = {f"sse_w{name}": float(((target - v * dev) ** 2).sum()) for name, v in (("0", 0.0), ("", w), ("1", 1.0))}
    log.info("shrinkage: w = %.3f from %d folds of %d training drugs (out-of-fold SSE %.1f at w=0, %.1f at w, "
             "%.1f at w=1)", w, n_folds, len(np.unique(train.conditions["drug"])), sse["sse_w0"], sse["sse_w"],
             sse["sse_w1"])
    return w, {"folds": n_folds, **sse}


@MODELS.register("ridge_shrunk")
class ShrunkRidge(PerturbationModel):
    """`ridge`, its drug-specific deviation from `scaled_mean` shrunk by `cv_shrinkage`."""

    name = "ridge_shrunk"
    options = ("seed",)

    def __init__(self, *, n_folds: int = 3, seed: int = 0):
        self.n_folds, self.seed = n_folds, seed

    def fit(self, train):
        self.shrinkage_, self.shrinkage_cv_ = cv_shrinkage(
            lambda inner, held: MODELS.get("ridge")().fit(inner).predict(held), train,
            n_folds=self.n_folds, seed=self.seed)
        self._ridge = MODELS.get("ridge")().fit(train)
        self._anchor = ScaledMeanBaseline().fit(train)
        return self

    def _predict(self, query):
        anchor = self._anchor.predict(query)
        return anchor + self.shrinkage_ * (self._ridge.predict(query) - anchor)

    def cost(self):
        return {"shrinkage": self.shrinkage_}
