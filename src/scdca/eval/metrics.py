"""Metrics: a registry of per-condition scores on pseudobulk predictions.

Every metric takes the same :class:`ScoringInput` (all test conditions at once, so
set-level scores such as `rank` fit the same interface) and returns one value per
condition. Averages are taken later, from the tidy results table.

Conventions: R^2 is sklearn's `r2_score` over genes (1 - SS_res / SS_tot), never
clipped; it is NaN when the observed values are constant. A Pearson correlation with
a constant side (e.g. the `control` baseline's zero change) is 0: no association
can be detected, and dropping it would hide a useless model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from scdca.errors import ScdcaInputError
from scdca.intervals import LEVELS
from scdca.models.stack import distance_ranks
from scdca.registry import Registry


@dataclass(frozen=True)
class ScoringInput:
    """Predictions and observations for N test conditions over G genes.

    Attributes:
        pred: (N, G) predicted mean expression.
        observed: (N, G) observed mean expression.
        control: (N, G) the control mean of each condition's cell line.
        degs: N arrays of gene indices, ranked (most differential first).
        groups: (N,) group label per condition (cell line) for set-level metrics.
        k: number of top DEGs used by the `*_deg` metrics.
        sigma: (N, G) the interval scale of each prediction (`scdca.intervals`), or None.
        alphas: level -> the conformal multiplier of sigma at that level (with sigma).
        expected_mse: (N,) each prediction's expected mse (with sigma).
        reference: (N, G) the average perturbed response's change from control for each condition
            (`dose_mean`, fitted on the split's training conditions), or None.
        doses: (N,) each condition's dose (for `rank_dose`), or None.
    """

    pred: np.ndarray
    observed: np.ndarray
    control: np.ndarray
    degs: Sequence[np.ndarray]
    groups: np.ndarray
    k: int = 20
    sigma: np.ndarray | None = None
    alphas: dict[float, float] | None = None
    expected_mse: np.ndarray | None = None
    reference: np.ndarray | None = None
    doses: np.ndarray | None = None

    def __post_init__(self):
        shapes = {a: getattr(self, a).shape for a in ("pred", "observed", "control")}
        if len(set(shapes.values())) != 1 or len(self.pred.shape) != 2:
            raise ScdcaInputError(f"pred/observed/control must share one 2-D shape; got {shapes}")
        if len(self.degs) != self.pred.shape[0] or len(self.groups) != self.pred.shape[0]:
            raise ScdcaInputError("degs and groups need one entry per condition")
        if not np.isfinite(self.pred).all():
            raise ScdcaInputError("pred: the model produced NaN or infinite predictions")
        if self.k < 2:
            raise ScdcaInputError(f"k: {self.k!r} DEGs is too few for R^2 or correlation; use k >= 2")

    def top(self, i: int) -> np.ndarray:
        return np.asarray(self.degs[i][: self.k])

    def top_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) index arrays (N, k) of every condition's top-k DEGs."""
        cols = np.stack([self.top(i) for i in range(self.pred.shape[0])])
        return np.arange(len(cols))[:, None], cols


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    higher_is_better: bool
    fn: Callable[[ScoringInput], np.ndarray]
    needs: str = ""  # a ScoringInput field the metric needs; scored only where it is given (not None)


METRICS: Registry[Metric] = Registry("metric")


def _metric(name: str, description: str, higher_is_better: bool, needs: str = ""):
    def deco(fn):
        METRICS.add(name, Metric(name, description, higher_is_better, fn, needs))
        return fn

    return deco


def r2(y: np.ndarray, yhat: np.ndarray) -> float:
    """Coefficient of determination of yhat for y (sklearn's r2_score, one output)."""
    return float(r2_rows(np.asarray(y)[None], np.asarray(yhat)[None])[0])


def r2_rows(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """`r2` of each row of yhat (n, k) for the same row of y -> (n,); NaN where a row of y is constant."""
    ss_tot = ((y - y.mean(1, keepdims=True)) ** 2).sum(1)
    ss_res = ((y - yhat) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def _per_condition(inp: ScoringInput, f) -> np.ndarray:
    return np.array([f(inp, i) for i in range(inp.pred.shape[0])], dtype=float)


@_metric("r2_deg", "R^2 between predicted and observed expression over the top-k DEGs (the paper's metric)", True)
def _r2_deg(inp: ScoringInput) -> np.ndarray:
    return _per_condition(inp, lambda s, i: r2(s.observed[i, s.top(i)], s.pred[i, s.top(i)]))


SWEEP_SIZES = (10, 20, 50, 100, 200)  # the DEG-size sweep (paper's Figure 8), plus every gene: `r2_all`


def _r2_top(n: int):
    """R^2 of expression over each condition's top-n DEGs (NaN where fewer genes are ranked)."""

    def fn(inp: ScoringInput) -> np.ndarray:
        out = np.full(inp.pred.shape[0], np.nan)
        ok = np.flatnonzero([len(d) >= n for d in inp.degs])
        if len(ok):
            cols = np.stack([np.asarray(inp.degs[int(i)][:n]) for i in ok])  # (n_ok, n)
            rows = ok[:, None]
            out[ok] = r2_rows(inp.observed[rows, cols].astype(float), inp.pred[rows, cols].astype(float))
        return out

    return fn


for _n in SWEEP_SIZES:
    METRICS.add(
        f"r2_deg_{_n}",
        Metric(f"r2_deg_{_n}", f"R^2 of expression over the top {_n} DEGs (the DEG-size sweep)", True, _r2_top(_n)),
    )


@_metric("r2_all", "R^2 of expression over all genes (the DEG-size sweep's last point)", True)
def _r2_all(inp: ScoringInput) -> np.ndarray:
    return r2_rows(inp.observed.astype(float), inp.pred.astype(float))


def _on_deg_change(score_fn):
    """Apply score_fn(observed change, predicted change) over each condition's top-k DEGs."""

    def f(s: ScoringInput, i: int) -> float:
        g = s.top(i)
        return score_fn(s.observed[i, g] - s.control[i, g], s.pred[i, g] - s.control[i, g])

    return f


@_metric("r2_delta_deg", "R^2 of the change from control over the top-k DEGs", True)
def _r2_delta_deg(inp: ScoringInput) -> np.ndarray:
    return _per_condition(inp, _on_deg_change(r2))


@_metric("pearson_delta_deg", "Pearson correlation of the change from control over the top-k DEGs", True)
def _pearson_delta_deg(inp: ScoringInput) -> np.ndarray:
    return _per_condition(inp, _on_deg_change(pearson))


@_metric("pearson_delta", "Pearson correlation of the change from control over all genes", True)
def _pearson_delta(inp: ScoringInput) -> np.ndarray:
    return _per_condition(inp, lambda s, i: pearson(s.observed[i] - s.control[i], s.pred[i] - s.control[i]))


@_metric("mse", "mean squared error over all genes", False)
def _mse(inp: ScoringInput) -> np.ndarray:
    return ((inp.pred - inp.observed) ** 2).mean(axis=1).astype(float)


@_metric(
    "rank",
    "normalised rank of a condition's own observation among all test observations of its cell "
    "line, by distance to its prediction (0 = always closest, 0.5 = random; exposes one "
    "prediction for every drug)",
    False,
)
def _rank(inp: ScoringInput) -> np.ndarray:
    return _ranks(inp.pred, inp.observed, inp.groups)


_ranks = distance_ranks  # one definition: scdca_stack scores its committees by the same rank


def _needed(value, name: str):
    """A ScoringInput field a metric needs (`Metric.needs`: `score` runs the metric only when set)."""
    if value is None:
        raise ValueError(f"metric: ScoringInput.{name} is needed and missing")
    return value


def _versus_mean(score_fn):
    """score_fn(observed - reference, predicted - reference) over each condition's top-k DEGs, where
    reference = control + the average perturbed response (`ScoringInput.reference`)."""

    def f(s: ScoringInput, i: int) -> float:
        g = s.top(i)
        ref = s.control[i, g] + _needed(s.reference, "reference")[i, g]
        return score_fn(s.observed[i, g] - ref, s.pred[i, g] - ref)

    return f


def _skill(y: np.ndarray, yhat: np.ndarray) -> float:
    """1 - SS(y - yhat) / SS(y): 0 for yhat = 0 (the reference itself), 1 for a perfect prediction."""
    den = float((y * y).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / den if den > 0 else np.nan


@_metric(
    "pearson_vs_mean_deg",
    "Pearson, over the top-k DEGs, of the predicted against the observed deviation from the average "
    "perturbed response (dose_mean: 0; drug-blind models: about 0)",
    True,
    needs="reference",
)
def _pearson_vs_mean_deg(inp: ScoringInput) -> np.ndarray:
    return _per_condition(inp, _versus_mean(pearson))


@_metric(
    "r2_vs_mean_deg",
    "skill over the average perturbed response on the top-k DEGs: 1 - SS(observed - predicted) / "
    "SS(observed - reference) (dose_mean: 0; below 0: worse than it)",
    True,
    needs="reference",
)
def _r2_vs_mean_deg(inp: ScoringInput) -> np.ndarray:
    return _per_condition(inp, _versus_mean(_skill))


@_metric("deg_precision", "share of the observed top-k DEGs among the top-k genes by |predicted change|", True)
def _deg_precision(inp: ScoringInput) -> np.ndarray:
    _, observed = inp.top_entries()
    change = np.abs(inp.pred - inp.control)
    predicted = np.argsort(-change, axis=1, kind="stable")[:, : inp.k]
    return np.array([np.isin(o, p).mean() for o, p in zip(observed, predicted)], dtype=float)


@_metric("deg_direction", "share of the observed top-k DEGs whose predicted change has the observed sign", True)
def _deg_direction(inp: ScoringInput) -> np.ndarray:
    rows, cols = inp.top_entries()
    obs = np.sign(inp.observed[rows, cols] - inp.control[rows, cols])
    pred = np.sign(inp.pred[rows, cols] - inp.control[rows, cols])
    return (obs == pred).mean(1).astype(float)


@_metric(
    "rank_dose",
    "`rank` among the line's test conditions at the same dose only (a dose-aware drug-blind model: 0.5)",
    False,
    needs="doses",
)
def _rank_dose(inp: ScoringInput) -> np.ndarray:
    groups = np.array([f"{g}|{d:g}" for g, d in zip(inp.groups, np.asarray(inp.doses, float))])
    return _ranks(inp.pred, inp.observed, groups)


def _interval(inp: ScoringInput, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(observed, lower, upper) on each condition's top-k DEGs, (N, k), at this level; lower clipped at 0."""
    rows, cols = inp.top_entries()
    pred = inp.pred[rows, cols]
    half = _needed(inp.alphas, "alphas")[level] * _needed(inp.sigma, "sigma")[rows, cols]
    return inp.observed[rows, cols], np.maximum(pred - half, 0), pred + half


def _coverage(level: float):
    def fn(inp: ScoringInput) -> np.ndarray:
        y, lower, upper = _interval(inp, level)
        return ((y >= lower) & (y <= upper)).mean(1).astype(float)

    return fn


for _level in LEVELS:
    _metric(
        f"coverage_{round(100 * _level)}",
        f"share of the top-k DEG values inside the {100 * _level:g}% prediction interval (calibrated: {_level:g})",
        True,
        needs="sigma",
    )(_coverage(_level))


@_metric("interval_width_90", "mean width of the 90% prediction interval over the top-k DEGs", False, "sigma")
def _interval_width_90(inp: ScoringInput) -> np.ndarray:
    _, lower, upper = _interval(inp, 0.9)
    return (upper - lower).mean(1).astype(float)


@_metric(
    "expected_mse", "the model's own expected mse for the condition (report: Spearman against mse)", False, "sigma"
)
def _expected_mse(inp: ScoringInput) -> np.ndarray:
    return np.asarray(inp.expected_mse, dtype=float)


def score(inp: ScoringInput, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Compute the named metrics (default: all) -> name -> (N,) values. A metric that needs an
    input field (intervals, the reference, doses) is computed only where the input has it."""
    names = list(metrics) if metrics is not None else METRICS.names()
    chosen = [METRICS.get(n) for n in names]
    return {m.name: m.fn(inp) for m in chosen if not m.needs or getattr(inp, m.needs) is not None}
