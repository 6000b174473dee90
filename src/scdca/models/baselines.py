"""Simple baselines that an honest benchmark must include (docs/concepts.md says what each one
tells a reader of the results).

All predict a change from the cell line's control and add it back, so they share
one helper that indexes the training changes by drug, line and dose.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from scdca.chem.featurizer import dose_range, scaled_dose
from scdca.chem.molecules import morgan_fingerprints, tanimoto
from scdca.data.screen import PerturbationData
from scdca.models.base import MODELS, PerturbationModel, per_line_fits, principal_directions


class _Changes:
    """Training changes from control, indexed for the fallbacks the baselines need."""

    def __init__(self, train: PerturbationData):
        cond = train.conditions
        self.delta = train.delta()  # (N, G)
        self.global_mean = self.delta.mean(0)
        self.by_line = {c: self.delta[(cond["cell_line"] == c).to_numpy()].mean(0) for c in cond["cell_line"].unique()}
        self._idx: dict[tuple, list[int]] = defaultdict(list)
        for i, (d, c, x) in enumerate(zip(cond["drug"], cond["cell_line"], cond["dose"])):
            self._idx[(d, c, x)].append(i)
            self._idx[(d, None, x)].append(i)
            self._idx[(d, None, None)].append(i)
        self.drugs = sorted(cond["drug"].unique())

    def line_mean(self, line: str) -> np.ndarray:
        return self.by_line.get(line, self.global_mean)

    def drug_change(self, drug: str, line: str | None, dose: float | None):
        """Mean training change of `drug` (optionally in `line`, at `dose`), or None if unobserved."""
        rows = self._idx.get((drug, line, dose), [])
        return self.delta[rows].mean(0) if rows else None


@MODELS.register("control")
class ControlBaseline(PerturbationModel):
    """Predicts no change: the cell line's control expression."""

    name = "control"
    baseline = True
    drug_blind = True

    def _fit(self, train) -> None:
        """Nothing to learn: the prediction is the line's control."""

    def _predict(self, query):
        return query.control_for(query.conditions["cell_line"]).copy()


@MODELS.register("train_mean")
class TrainMeanBaseline(PerturbationModel):
    """Control + the mean change over the line's training perturbations (global mean for unseen lines)."""

    name = "train_mean"
    baseline = True
    drug_blind = True
    mean_change = True

    def _fit(self, train) -> None:
        self._changes = _Changes(train)

    def _predict(self, query):
        lines = query.conditions["cell_line"]
        delta = np.stack([self._changes.line_mean(c) for c in lines])
        return query.control_for(lines) + delta


@MODELS.register("additive")
class AdditiveBaseline(PerturbationModel):
    """Control + the drug's mean change at that dose in other lines; else the line's mean change."""

    name = "additive"
    baseline = True

    def _fit(self, train) -> None:
        self._changes = _Changes(train)

    def _predict(self, query):
        cond = query.conditions
        out = []
        for c, d, x in zip(cond["cell_line"], cond["drug"], cond["dose"]):
            delta = self._changes.drug_change(d, None, x)
            if delta is None:
                delta = self._changes.drug_change(d, None, None)
            out.append(self._changes.line_mean(c) if delta is None else delta)
        return query.control_for(cond["cell_line"]) + np.stack(out)


@MODELS.register("ridge")
class RidgeBaseline(PerturbationModel):
    """Ridge regression from [Morgan bits, bits x dose, line one-hot, dose] to the change.

    The change is first reduced to its top `n_components` principal components (drug
    effects are low-rank; this is 20x faster than one ridge per gene and discards noise);
    the penalty is chosen on the training conditions by efficient leave-one-out (RidgeCV), or,
    with `penalty_folds` > 1, by that many folds of training drugs (every dose and line of a
    drug held out together, as the unseen-drug task holds it out): leave-one-condition-out
    keeps the held-out drug's other doses in training and so picks too weak a penalty for new
    drugs (DECISIONS.md D17).
    """

    name = "ridge"
    baseline = True

    def __init__(
        self,
        *,
        radius: int = 2,
        n_bits: int = 2048,
        n_components: int = 64,
        alphas=tuple(np.logspace(-1, 4, 11)),  # noqa: B008  (a tuple, evaluated once)
        penalty_folds: int = 0,
        seed: int = 0,
    ):
        self.radius, self.n_bits, self.alphas = radius, n_bits, alphas
        self.n_components, self.penalty_folds, self.seed = n_components, penalty_folds, seed

    def _features(self, data: PerturbationData) -> np.ndarray:
        cond = data.conditions
        fp = morgan_fingerprints(list(cond["smiles"]), radius=self.radius, n_bits=self.n_bits).astype(np.float32)
        t = scaled_dose(cond["dose"].to_numpy(float), self._dose_lo, self._dose_span)[:, None]
        onehot = (cond["cell_line"].to_numpy()[:, None] == np.array(self._lines)[None, :]).astype(np.float32)
        return np.hstack([fp, fp * t, onehot, t])

    def _fit(self, train) -> None:
        from sklearn.linear_model import RidgeCV

        self._dose_lo, self._dose_span = dose_range(train.conditions["dose"].to_numpy(float))
        self._lines = sorted(train.conditions["cell_line"].unique())
        Y = train.delta().astype(np.float64)
        self._y_mean, self._basis = principal_directions(Y, self.n_components)  # (G,), (C, G)
        scores = (Y - self._y_mean) @ self._basis.T
        alphas = np.asarray(self.alphas, dtype=float)
        drugs = train.conditions["drug"].astype(str).to_numpy()
        if self.penalty_folds > 1 and len(np.unique(drugs)) >= self.penalty_folds:
            from scdca.models.shrinkage import drug_folds  # here: the registry lists the baselines first

            fold = drug_folds(drugs, self.penalty_folds, self.seed)
            cv = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(self.penalty_folds)]
            ridge = RidgeCV(alphas=alphas, cv=cv, scoring="neg_mean_squared_error")
        else:
            ridge = RidgeCV(alphas=alphas)
        self._model = ridge.fit(self._features(train), scores)
        self.alpha_ = float(self._model.alpha_)

    def _predict(self, query):
        scores = self._model.predict(self._features(query)).reshape(len(query.ids), -1)  # (N, C)
        return query.control_for(query.conditions["cell_line"]) + scores @ self._basis + self._y_mean

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything a fitted ridge predicts from, as arrays (for models that save one inside them)."""
        return {
            "coef": self._model.coef_,
            "intercept": np.atleast_1d(self._model.intercept_),
            "basis": self._basis,
            "y_mean": self._y_mean,
            "lines": np.array(self._lines, dtype=str),
            "dose": np.array([self._dose_lo, self._dose_span]),
            "shape": np.array([self.radius, self.n_bits]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict) -> RidgeBaseline:
        from sklearn.linear_model import Ridge

        model = cls(radius=int(arrays["shape"][0]), n_bits=int(arrays["shape"][1]))
        model._dose_lo, model._dose_span = (float(x) for x in arrays["dose"])
        model._lines = [str(x) for x in arrays["lines"]]
        model._basis, model._y_mean = np.asarray(arrays["basis"]), np.asarray(arrays["y_mean"])
        model._model = Ridge()
        model._model.coef_, model._model.intercept_ = np.asarray(arrays["coef"]), np.asarray(arrays["intercept"])
        model._model.n_features_in_ = model._model.coef_.shape[-1]
        return model


@MODELS.register("knn")
class KnnBaseline(PerturbationModel):
    """Control + the Tanimoto-weighted mean change of the k most similar training drugs.

    A neighbour's change is taken in the same line at the same dose when observed, else
    averaged over lines at that dose, else over all its observations. A drug observed in
    training (in other lines) is its own nearest neighbour.
    """

    name = "knn"
    baseline = True

    def __init__(self, *, k: int = 5):
        self.k = k

    def _fit(self, train) -> None:
        self._changes = _Changes(train)
        smiles = train.drug_smiles()
        self._drugs = self._changes.drugs
        self._fps = morgan_fingerprints([smiles[d] for d in self._drugs])

    def _neighbour_change(self, drug, line, dose):
        for key in ((drug, line, dose), (drug, None, dose), (drug, None, None)):
            delta = self._changes.drug_change(*key)
            if delta is not None:
                return delta
        raise AssertionError("every training drug has at least one observation")

    def _predict(self, query):
        cond = query.conditions
        qs = pd.Series(query.drug_smiles())
        q_drugs = list(qs.index)
        sim = tanimoto(morgan_fingerprints(list(qs.values)), self._fps)  # (n_query_drugs, n_train_drugs)
        row_of = {d: i for i, d in enumerate(q_drugs)}
        out = []
        for c, d, x in zip(cond["cell_line"], cond["drug"], cond["dose"]):
            s = sim[row_of[d]]
            nn = np.argsort(-s, kind="stable")[: self.k]
            w = s[nn] if s[nn].sum() > 0 else np.ones(len(nn))
            changes = np.stack([self._neighbour_change(self._drugs[j], c, x) for j in nn])
            out.append((w[:, None] * changes).sum(0) / w.sum())
        return query.control_for(cond["cell_line"]) + np.stack(out)


@MODELS.register("dominant")
class DominantDirectionBaseline(PerturbationModel):
    """Drug-agnostic reference: control + m(line) + s(line, dose) * v(line).

    m is the line's mean training change (what `train_mean` predicts), v the dominant
    direction of the line's training changes around m (first principal direction), and
    s the mean projection of the line's training changes at that dose onto v (nearest
    training dose on a log scale): the average response, shaped by dose. Lines without
    training changes use the pooled m, v and s. It never looks at which drug is given, so
    any score it reaches needs no drug knowledge at all.
    """

    name = "dominant"
    baseline = True
    drug_blind = True

    def _fit(self, train) -> None:
        self._fits = per_line_fits(train, self._direction)

    @staticmethod
    def _direction(delta: np.ndarray, logd: np.ndarray):
        mean, (v,) = principal_directions(delta, 1)  # (G,), (G,)
        proj = (delta - mean) @ v
        levels = np.unique(logd)
        scales = np.array([proj[logd == x].mean() for x in levels])
        return mean, v, levels, scales

    def _predict(self, query):
        cond = query.conditions
        logd = np.log10(np.maximum(cond["dose"].to_numpy(float), 1e-12))
        out = []
        for line, x in zip(cond["cell_line"], logd):
            mean, v, levels, scales = self._fits.get(line, self._fits[None])
            out.append(mean + scales[np.argmin(np.abs(levels - x))] * v)
        return query.control_for(cond["cell_line"]) + np.stack(out)


class _DoseMeans:
    """Mean training change per (line, dose) and per dose over all lines, with fallbacks."""

    def __init__(self, train: PerturbationData):
        cond = train.conditions
        delta = train.delta()
        lines, doses = cond["cell_line"].astype(str).to_numpy(), cond["dose"].to_numpy(float)
        self._means: dict[tuple, np.ndarray] = {}
        for key in set(zip(lines, doses)) | {(None, x) for x in doses}:
            rows = (doses == key[1]) & ((lines == key[0]) if key[0] is not None else True)
            self._means[key] = delta[rows].mean(0)
        self._doses = {line: np.unique(doses[lines == line]) for line in np.unique(lines)}
        self._doses[None] = np.unique(doses)

    def change(self, line: str | None, dose: float) -> np.ndarray:
        """The line's mean change at this dose; else all lines' at it; else the same at the nearest
        training dose (log scale) of the line, then of all lines."""
        for key in ((line, dose), (None, dose)):
            if key in self._means:
                return self._means[key]
        for where in (line, None):
            if where in self._doses:
                have = self._doses[where]
                near = have[np.abs(np.log10(np.maximum(have, 1e-12)) - np.log10(max(dose, 1e-12))).argmin()]
                return self._means[(where, near)]
        raise AssertionError("unreachable: every training dose has a pooled mean")


@MODELS.register("dose_mean")
class DoseMeanBaseline(PerturbationModel):
    """Drug-blind: control + the line's mean training change at that dose (the average perturbed response).

    Falls back to all training lines' mean change at that dose (unseen lines) and then to the
    nearest training dose. It is the reference of the `*_vs_mean_*` metrics, on which it scores 0.
    """

    name = "dose_mean"
    baseline = True
    drug_blind = True
    mean_change = True
    pooled = False

    def _fit(self, train) -> None:
        self._means = _DoseMeans(train)

    def change(self, query: PerturbationData) -> np.ndarray:
        """(N, G) the predicted change from control."""
        cond = query.conditions
        return np.stack(
            [
                self._means.change(None if self.pooled else str(c), float(x))
                for c, x in zip(cond["cell_line"], cond["dose"])
            ]
        )

    def _predict(self, query):
        return query.control_for(query.conditions["cell_line"]) + self.change(query)


@MODELS.register("pooled_mean")
class PooledMeanBaseline(DoseMeanBaseline):
    """Drug- and line-blind: control + the mean change over all training lines at that dose."""

    name = "pooled_mean"
    baseline = True
    drug_blind = True
    mean_change = True
    pooled = True
