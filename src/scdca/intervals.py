"""Conformal prediction intervals and an expected error around any registered model (DECISIONS.md D36).

How a model is calibrated (`calibrate`):

1. **Out-of-fold predictions that mimic the task.** The training conditions are split the way the
   task splits the data (`data.splits.fold_splits`: folds of the training drugs for unseen_drug, of
   the training pairs for unseen_pair, the task's own rule on two training lines for the line
   tasks, more lines pooled into two folds where lines are small: D48). A fresh copy of the
   model is fitted on each calibration split's training part and predicts its held-out part.
   Test drugs and lines are not in `train`, so they never reach calibration.
2. **Difficulty.** Each condition gets an expected mse `E[c]`, a log-linear fit of the realised
   out-of-fold mse on the log dose and the molecule's max Tanimoto similarity to the molecules
   its model trained on, plus the log size of the predicted change and the squared log dose
   where held-out groups show they help (`_chosen_columns`); each gene a scale
   `s[g]`, its out-of-fold RMS residual. An entry's scale is `sigma[c, g] = s[g] * sqrt(E_d[c] / mean E_d)`,
   with `E_d` the same fit on the dose alone (`fit_calibration` says why).
3. **Normalised split-conformal** (crepes' `ConformalRegressor`) on the calibration conditions'
   top-k DEG entries: the interval is `prediction +- alpha(level) * sigma`, lower bound clipped at 0.
   Calibrating on DEG entries makes the intervals hold where `coverage_90` measures them (the
   genes a condition changes most); on the other genes they are conservative.

The refits make the intervals distribution-free for new groups of the task's kind (up to the
difference between a model fitted on all training data and one fitted on part of it).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from scdca import storage
from scdca.data.screen import PerturbationData
from scdca.data.splits import Split, fold_splits, held_out_units
from scdca.errors import ScdcaInputError

LEVELS = (0.5, 0.8, 0.9, 0.95)  # the levels the harness measures coverage at
LEVEL = 0.9  # the default interval level
FILE = "calibration.npz"  # its name in a saved model folder


def difficulty_features(pred: np.ndarray, control: np.ndarray, dose: np.ndarray, similarity=None) -> np.ndarray:
    """(N, 5) per-condition features of how hard a prediction is: 1, log10 dose, log RMS predicted
    change, the molecule's max Tanimoto similarity to the training molecules (`similarity`, (N,);
    None: 1, every molecule seen), and log10 dose squared (a dose response's curvature)."""
    change = np.sqrt(((np.asarray(pred, float) - control) ** 2).mean(1))
    logd = np.log10(np.maximum(np.asarray(dose, float), 1e-12))
    sim = np.ones(len(change)) if similarity is None else np.asarray(similarity, float)
    return np.column_stack([np.ones(len(change)), logd, np.log(change + 1e-3), sim, logd**2])


# the expected mse's candidate feature sets (columns of `difficulty_features`), one chosen per
# calibration by cross-validation over its held-out groups (`_chosen_columns`)
OPTIONAL_FEATURES = (2, 4)  # the predicted change and the dose's curvature
BASE_FEATURES = (0, 1, 3)  # 1, log dose, similarity: always read
# the sign each feature's coefficient in the expected mse may take (0: free): the error does not
# fall as the dose or the predicted change grows, nor rise as the molecule nears the training ones
SIGNS = np.array([0, 1, 1, -1, 0])


def nearest_training(training_smiles) -> Callable:
    """smiles (N,) -> (N,) each molecule's max Tanimoto similarity (Morgan r=2, 2048 bits) to
    `training_smiles`, whose fingerprints are computed once (`NearestTraining`)."""
    from scdca.chem.molecules import NearestTraining

    nearest = NearestTraining({str(i): str(s) for i, s in enumerate(training_smiles)})
    return lambda smiles: np.asarray(nearest.query([str(s) for s in smiles])[0], float)


@dataclass
class OutOfFold:
    """Predictions for training conditions made by models that did not see them.

    Attributes: pred, observed, control (N, G); dose (N,); top (N, k) the top-k DEG indices;
    group (N,) the unit held out together (a drug, a line or a drug-line pair), or None;
    similarity (N,) each molecule's max Tanimoto similarity to the molecules its predicting
    model trained on, or None (1: every molecule seen).
    """

    pred: np.ndarray
    observed: np.ndarray
    control: np.ndarray
    dose: np.ndarray
    top: np.ndarray
    group: np.ndarray | None = None
    similarity: np.ndarray | None = None


@dataclass
class Calibration:
    """A fitted calibration: turns a model's predictions into intervals and expected errors."""

    gene_scale: np.ndarray  # (G,) out-of-fold RMS residual per gene
    coef: np.ndarray  # (5,) log expected mse ~ difficulty_features, 0 for unchosen ones ((3,) in older files)
    smear: float  # Duan's smearing factor: exp(fit) * smear is the expected mse, not its geometric mean
    mean_expected: float  # mean of the scale's expected mse over the calibration conditions (its normaliser)
    residuals: np.ndarray  # (n,) observed - predicted on calibration DEG entries
    sigmas: np.ndarray  # (n,) their scales
    calibration_mse: np.ndarray  # (M,) realised mse of each calibration condition (for `confidence`)
    task: str = ""
    scale_coef: np.ndarray | None = None  # (S,) the scale's log-mse fit on the first S features (None: coef)
    scale_smear: float | None = None
    training_smiles: np.ndarray | None = None  # (T,) the molecules the calibrated model trained on
    _regressor: Any = field(default=None, repr=False, compare=False)  # crepes' ConformalRegressor
    _similarity: Callable | None = field(default=None, repr=False, compare=False)  # built on first use

    def __post_init__(self):
        from crepes import ConformalRegressor

        self._regressor = ConformalRegressor().fit(residuals=self.residuals, sigmas=self.sigmas)

    def expected_mse(self, pred, control, dose, smiles=None) -> np.ndarray:
        """(N,) the expected mse over genes of each predicted condition (`smiles` (N,): its molecules,
        needed by a calibration that knows its model's training molecules)."""
        coef = np.asarray(self.coef)
        similarity = None  # a calibration without training molecules reads every molecule as seen
        if len(coef) > 3 and coef[3] != 0 and self.training_smiles is not None:
            if smiles is None:
                raise ScdcaInputError(
                    "smiles: None; this calibration's expected error reads each molecule's similarity "
                    "to the training molecules: pass the predicted conditions' SMILES"
                )
            if self._similarity is None:  # the training fingerprints once, not per screen batch
                self._similarity = nearest_training(self.training_smiles)
            similarity = self._similarity(smiles)
        return np.exp(difficulty_features(pred, control, dose, similarity)[:, : len(coef)] @ coef) * self.smear

    def scale(self, pred, control, dose) -> np.ndarray:
        """(N, G) sigma: each entry's scale; the interval half-width is alpha(level) * sigma."""
        coef, smear = self._scale_fit()
        X = difficulty_features(pred, control, dose)[:, : len(coef)]
        return _sigma(self.gene_scale, coef, smear, X, self.mean_expected).astype(np.float32)

    def _scale_fit(self) -> tuple[np.ndarray, float]:
        """The scale's log-mse coefficients and smearing factor (a file from before D36's dose-only
        scale has none: its scale used the expected-mse fit)."""
        if self.scale_coef is None or self.scale_smear is None:
            return np.asarray(self.coef), float(self.smear)
        return np.asarray(self.scale_coef), float(self.scale_smear)

    def alpha(self, level: float = LEVEL) -> float:
        """The conformal multiplier of sigma at this level (inf when calibration is too small for it)."""
        if not 0 < level < 1:
            raise ScdcaInputError(f"level: {level!r}; give an interval level between 0 and 1, e.g. 0.9")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # crepes warns when the level is too high for n; inf says it
            return float(self._regressor.predict_int(np.zeros(1), sigmas=np.ones(1), confidence=level)[0, 1])

    def confidence(self, expected: np.ndarray) -> np.ndarray:
        """(N,) share of calibration conditions whose realised mse was larger than this expected mse
        (1 = expected to be more accurate than every held-out training condition)."""
        ranked = np.sort(self.calibration_mse)
        return 1.0 - np.searchsorted(ranked, np.asarray(expected), side="right") / len(ranked)

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as one .npz (atomically); `Calibration.load` reads it."""
        coef, smear = self._scale_fit()
        arrays = {k: np.asarray(getattr(self, k)) for k in _SAVED}
        if self.training_smiles is not None:
            arrays["training_smiles"] = np.asarray(self.training_smiles, dtype=str)
        storage.write_npz(Path(path), **arrays, scale_coef=coef, scale_smear=np.asarray(smear))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            with np.load(path, allow_pickle=False) as f:
                values = {k: f[k] for k in _SAVED}
                if "scale_coef" in f:
                    values["scale_coef"], values["scale_smear"] = f["scale_coef"], float(f["scale_smear"])
                if "training_smiles" in f:  # files from before the similarity feature have none
                    values["training_smiles"] = f["training_smiles"]
        except (OSError, ValueError, KeyError) as err:
            raise ScdcaInputError(
                f"calibration: {str(path)!r} is not a calibration written by `scdca train` ({type(err).__name__}); "
                f"delete it (the model then predicts without intervals) or retrain the model"
            ) from None
        for k in ("smear", "mean_expected"):
            values[k] = float(values[k])
        values["task"] = str(values["task"])
        return cls(**values)


@dataclass
class Intervals:
    """Intervals of one set of N predictions over G genes.

    Attributes: sigma (N, G) the entries' scales; expected_mse (N,); confidence (N,) in [0, 1]
    (`Calibration.confidence`); alphas: level -> multiplier (the half-width is alphas[level] * sigma).
    """

    sigma: np.ndarray
    expected_mse: np.ndarray
    confidence: np.ndarray
    alphas: dict[float, float]

    @classmethod
    def of(cls, cal: Calibration, pred, control, dose, smiles=None, levels=(*LEVELS, LEVEL)) -> Intervals:
        """The intervals of predictions `pred` (N, G) of conditions with these controls (N, G), doses
        and molecules' SMILES (N,) (`Calibration.expected_mse` says when SMILES are needed)."""
        expected = cal.expected_mse(pred, control, dose, smiles)
        sigma = cal.scale(pred, control, dose)
        return cls(sigma, expected, cal.confidence(expected), {lv: cal.alpha(lv) for lv in levels})

    def bounds(self, pred, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) like pred, lower clipped at 0."""
        if level not in self.alphas:
            raise ScdcaInputError(f"level: {level!r} was not calibrated; choose one of {sorted(self.alphas)}")
        half = self.alphas[level] * self.sigma
        return np.maximum(pred - half, 0).astype(np.float32), (pred + half).astype(np.float32)  # no log value < 0

    def scoring(self) -> dict:
        """The ScoringInput fields the interval metrics read."""
        return {"sigma": self.sigma, "alphas": self.alphas, "expected_mse": self.expected_mse}


_SAVED = ("gene_scale", "coef", "smear", "mean_expected", "residuals", "sigmas", "calibration_mse", "task")


def _difficulty(res: np.ndarray, X: np.ndarray, signs=None) -> tuple[np.ndarray, np.ndarray, float]:
    """(gene scale (G,), log-mse coefficients (one per column of X), smearing factor) fitted on residuals res (N, G)."""
    gene_scale = np.sqrt((res**2).mean(0))
    gene_scale = np.maximum(gene_scale, 1e-3 * np.median(gene_scale) + 1e-8)  # no zero scale
    y = np.log(np.maximum((res**2).mean(1), 1e-12))
    coef = _least_squares(X, y, signs)
    return gene_scale, coef, float(np.exp(y - X @ coef).mean())


def _least_squares(X: np.ndarray, y: np.ndarray, signs=None) -> np.ndarray:
    """Least-squares coefficients of y on X's columns (column 0: the intercept), each of sign
    `signs[j]` (+1 >= 0, -1 <= 0, 0 free; default all free). A column that does not vary (one
    dose, or every molecule seen) gets 0: the data say nothing of it, so a query where it differs
    is read like the calibration conditions, not extrapolated."""
    from scipy.optimize import lsq_linear

    varies = np.ptp(X, axis=0) > 0
    varies[0] = True
    signs = np.zeros(X.shape[1]) if signs is None else np.asarray(signs)[varies]
    coef = np.zeros(X.shape[1])
    if not signs.any():
        coef[varies] = np.linalg.lstsq(X[:, varies], y, rcond=None)[0]
        return coef
    lower = np.where(signs > 0, 0.0, -np.inf)
    upper = np.where(signs < 0, 0.0, np.inf)
    coef[varies] = lsq_linear(X[:, varies], y, bounds=(lower, upper)).x
    return coef


def _chosen_columns(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_folds: int = 5) -> list[int]:
    """The columns of X (`BASE_FEATURES` plus a subset of `OPTIONAL_FEATURES`) whose least-squares
    fit of y predicts y best on held-out groups (`n_folds` folds of the groups).

    With fewer groups than folds (a line task's two calibration lines) every column is read: a
    fold would then hold out a whole line, and a feature that differs between lines but not within
    one (`train_mean`'s predicted change) would never be chosen, though it is what says which
    line is hard."""
    names = np.unique(groups)
    change, curvature = OPTIONAL_FEATURES
    candidates = [sorted(BASE_FEATURES + extra) for extra in ((), (change,), (curvature,), (change, curvature))]
    if len(names) < n_folds:
        return candidates[-1]
    deal = dict(zip(np.random.default_rng(36).permutation(names), np.arange(len(names)) % n_folds))
    fold = np.array([deal[g] for g in groups])
    errors = []
    for cols in candidates:
        sse = 0.0
        for f in np.unique(fold):
            inner = fold != f
            coef = _least_squares(X[inner][:, cols], y[inner], SIGNS[cols])
            sse += float(((X[~inner][:, cols] @ coef - y[~inner]) ** 2).sum())
        errors.append(sse)
    return candidates[int(np.argmin(errors))]


def _sigma(gene_scale, coef, smear, X, mean_expected) -> np.ndarray:
    """(N, G) entry scales from a difficulty model and the features X (N, len(coef))."""
    expected = np.exp(X @ coef) * smear
    return gene_scale[None, :] * np.sqrt(expected / mean_expected)[:, None]


SCALE_FEATURES = 2  # the interval scale reads 1 and log dose only (DECISIONS.md D36)


def fit_calibration(oof: OutOfFold, task: str = "", training_smiles=None) -> Calibration:
    """Fit the difficulty models and the conformal regressor on out-of-fold predictions.

    Two log-linear fits of a condition's out-of-fold mse: on the difficulty features that
    `_chosen_columns` picks for the expected mse (their coefficients of sign `SIGNS`), and on
    the first `SCALE_FEATURES` (1, log dose) for the interval scale. The
    scale leaves out the size of the predicted change because the refits that calibrate predict
    changes of another size than the model fitted on all training data (c3tl's refits on half the
    pairs predict 40% larger ones), which would shift every test scale; the dose is the query's.
    The similarity to the training molecules is left out of the scale for the same reason (a
    refit knows fewer molecules than the final model). `training_smiles`: the molecules of the
    model to calibrate, against which its queries' similarity is read.

    The scales of a group's own conformal scores come from a fit made without that group
    (cross-fitting): scales fitted on the very residuals they divide would shrink the largest
    scores and make the intervals too narrow on new groups. The stored model uses every group.
    """
    res = np.asarray(oof.observed, float) - oof.pred
    X = difficulty_features(oof.pred, oof.control, oof.dose, oof.similarity)
    groups = np.zeros(len(res)) if oof.group is None else np.asarray(oof.group)
    cols = _chosen_columns(X, np.log(np.maximum((res**2).mean(1), 1e-12)), groups)
    _, chosen, smear = _difficulty(res, X[:, cols], SIGNS[cols])
    coef = np.zeros(X.shape[1])
    coef[cols] = chosen
    Xs = X[:, :SCALE_FEATURES]
    gene_scale, scale_coef, scale_smear = _difficulty(res, Xs)
    mean_expected = float((np.exp(Xs @ scale_coef) * scale_smear).mean())
    sigma = np.empty_like(res)
    for g in np.unique(groups):
        own = groups == g
        fit = _difficulty(res[~own], Xs[~own]) if (~own).sum() >= 3 else (gene_scale, scale_coef, scale_smear)
        sigma[own] = _sigma(*fit, Xs[own], mean_expected)
    rows = np.repeat(np.arange(len(res)), oof.top.shape[1])
    top = oof.top.ravel()
    return Calibration(
        gene_scale=gene_scale,
        coef=coef,
        smear=smear,
        mean_expected=mean_expected,
        residuals=res[rows, top],
        sigmas=sigma[rows, top],
        calibration_mse=(res**2).mean(1),
        task=task,
        scale_coef=scale_coef,
        scale_smear=scale_smear,
        training_smiles=None if training_smiles is None else np.asarray(list(training_smiles), dtype=str),
    )


class SharedFits:
    """Calibration fits that several calibrations of one model on the same data ask for.

    The splits of one line task repeat their calibration splits: with three lines, the zero-shot
    refit that holds out line B for test line A trains on line C alone, as does the one that holds
    out A for test line B. Built from every training-id tuple the calibrations will fit (with
    repeats), it keeps a fit only while another calibration will still ask for it, so it holds no
    model that will not be reused (a screen of many lines shares few).
    """

    def __init__(self, planned):
        self._left = Counter(planned)  # training ids -> calibrations still to ask for them
        self._fits: dict = {}

    @classmethod
    def for_splits(cls, data: PerturbationData, splits: list[Split], seed: int) -> SharedFits:
        """The fits that calibrating each of `splits` (on its own training conditions) will ask for."""
        planned = []
        for split in splits:
            try:
                cals = fold_splits(data.subset(split.train), split.task, seed, exclude=split.held_out)
            except ScdcaInputError:  # `calibrate` raises it again, with the same message
                continue
            planned += [c.train for c in cals]
        return cls(planned)

    def __len__(self) -> int:
        """The number of fits held now."""
        return len(self._fits)

    def fit(self, key: tuple, fit: Callable):
        """The model fitted on the training ids `key`: kept from an earlier call, or `fit()`."""
        model = self._fits.pop(key, None)
        if model is None:
            model = fit()
        self._left[key] -= 1
        if self._left[key] > 0:
            self._fits[key] = model
        return model


def out_of_fold(
    make_model: Callable, train: PerturbationData, splits: list[Split], k: int, *, shared: SharedFits | None = None
) -> OutOfFold:
    """Fit a fresh model on each calibration split's training part (or take it from `shared`);
    predict its held-out part."""
    parts = []
    for split in splits:

        def fit(split=split):
            return make_model().fit(train.subset(split.train))

        model = fit() if shared is None else shared.fit(split.train, fit)
        pred = np.asarray(model.predict(train.subset(split.test, observed=False)), float)
        seen = train.subset(split.train).drug_smiles().values()
        parts.append(_held_out(train, split.test, pred, k, split.task, seen))
    if not parts:
        raise ScdcaInputError("intervals: no calibration split could be made from the training conditions")
    return _concatenated(parts)


def _concatenated(parts: list[OutOfFold]) -> OutOfFold:
    return OutOfFold(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(OutOfFold)})


def _held_out(train: PerturbationData, ids, pred, k: int, task: str, seen) -> OutOfFold:
    """The OutOfFold of the training conditions `ids`, predicted as `pred` by a model that did not
    see them and was trained on the molecules `seen` (SMILES)."""
    held = train.subset(list(ids))
    cond = held.conditions
    top = np.stack([np.asarray(held.degs[i][:k]) for i in held.ids])
    control = held.control_for(cond["cell_line"])
    similarity = nearest_training(seen)(cond["smiles"])
    return OutOfFold(
        pred, held.observed, control, cond["dose"].to_numpy(float), top, held_out_units(cond, task), similarity
    )


def calibrate(
    make_model: Callable,
    train: PerturbationData,
    task: str,
    seed: int = 0,
    *,
    k: int = 20,
    exclude: str = "",
    fitted=None,
    shared: SharedFits | None = None,
) -> Calibration:
    """Calibrate the model that `make_model()` builds for the generalisation task `task`.

    Args:
        make_model: builds an unfitted model (the same settings as the one to calibrate).
        train: the training conditions (the model to calibrate was fitted on them).
        task: the kind of new prediction to calibrate for (unseen_drug, unseen_cell_zeroshot, ...).
        seed: seed of the calibration splits.
        k: the number of top DEGs per condition the conformal scores are taken on.
        exclude: a line that must not be a calibration line (a few-shot split's own line).
        fitted: the model fitted on `train`, if at hand. A model that made out-of-fold predictions
            for this task while fitting (`out_of_fold(task)`: `scdca_stack`'s folds, `scdca_routed`'s
            shrinkage folds) is calibrated on those, with no refit.
        shared: calibration fits shared between calls for the same model and data (`SharedFits`);
            the harness keeps one per grid cell.
    """
    molecules = train.drug_smiles().values()
    parts = fitted.out_of_fold(task) if fitted is not None else None
    if parts:  # a model whose own folds mimic the task (scdca_stack, scdca_routed): no refit
        held = [
            _held_out(train, s.test, pred, k, task, train.subset(s.train).drug_smiles().values()) for s, pred in parts
        ]
        return fit_calibration(_concatenated(held), task, molecules)
    return fit_calibration(
        out_of_fold(make_model, train, fold_splits(train, task, seed, exclude=exclude), k, shared=shared),
        task,
        molecules,
    )


def load_calibration(folder: str | os.PathLike) -> Calibration | None:
    """The calibration saved in a model folder by `scdca train`, or None if it has none."""
    path = Path(folder) / FILE
    return Calibration.load(path) if path.is_file() else None
