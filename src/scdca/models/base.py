"""The one interface every model follows, baselines and scDCA alike."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from scdca import storage
from scdca.data.screen import PerturbationData
from scdca.errors import ScdcaInputError, reason
from scdca.models.intervals import load_calibration
from scdca.registry import Registry


class PerturbationModel(ABC):
    """Predicts the mean expression of (cell line, drug, dose) conditions.

    `fit` sees only training conditions (with observations) and every line's control.
    `predict` sees the requested conditions without observations, so a model cannot
    read test data even by mistake.
    """

    name: ClassVar[str] = "model"
    # benchmark-wide options (CLI: --encoder, --epochs, ...) this model accepts; the grid's
    # seed is passed as `seed` when listed. Closed-form baselines take none.
    options: ClassVar[tuple[str, ...]] = ()
    savable: ClassVar[bool] = False  # True where `save` and `load` are implemented (`scdca train` needs it)
    # single cells per condition and control cells per line this model trains on
    # (`PerturbationData.cells`); 0: pseudobulk only. The benchmark keeps the most any of its models asks.
    cells_per_condition: ClassVar[int] = 0
    control_cells_per_line: ClassVar[int] = 0

    @classmethod
    def check_available(cls) -> None:
        """Raise ScdcaInputError (saying how to fix it) if this model cannot run here."""
        return None

    @abstractmethod
    def fit(self, train: PerturbationData) -> PerturbationModel:
        """Learn from the training conditions; returns self."""

    def predict(self, query: PerturbationData) -> np.ndarray:
        """Predicted mean log1p expression, shape (len(query.ids), n_genes), never below 0.

        The one place where predictions are made valid expression (change-space data, LINCS
        levels 4-5, is left as predicted): models predict changes on top of a control, and a
        large predicted decrease can cross zero, which no log1p value can. Such values are
        clipped to 0 here for every model (`n_clipped_` counts them for the last call), so
        metrics and exported files see what a user would.
        """
        pred = np.asarray(self._predict(query))
        expected = (len(query.ids), query.n_genes)
        if pred.shape != expected:
            raise RuntimeError(f"{self.name}: predicted shape {pred.shape}, expected {expected}")
        if query.space == "change":  # changes (LINCS levels 4-5) are signed: nothing to clip
            self.n_clipped_ = 0
            return pred
        negative = pred < 0
        self.n_clipped_ = int(negative.sum())
        return np.where(negative, np.zeros((), pred.dtype), pred) if self.n_clipped_ else pred

    @abstractmethod
    def _predict(self, query: PerturbationData) -> np.ndarray:
        """The model's raw prediction, shape (len(query.ids), n_genes); `predict` clips it."""

    def cost(self) -> dict[str, Any]:
        """What fitting cost (trainable parameters etc.); empty for closed-form baselines."""
        return {}

    @property
    def genes(self) -> np.ndarray:
        """The genes of the training data, (G,): the columns `predict` returns."""
        return self._after_fit("_genes")

    @property
    def control_lines(self) -> dict[str, np.ndarray]:
        """Each training line's control pseudobulk, (G,) per line name: what `scdca predict` starts from."""
        lines, mean = self._after_fit("_controls")
        return dict(zip(lines, mean))

    def save(self, path) -> None:
        """Write the fitted model to the folder `path` (`load_model` reads it back)."""
        raise ScdcaInputError(f"model: {self.name!r} cannot be saved; train one of {', '.join(savable_models())}")

    @classmethod
    def load(cls, path, **kwargs) -> PerturbationModel:
        """Read a folder written by `save`; use `load_model(path)`, which finds the class from model.json."""
        raise ScdcaInputError(f"model: {cls.name!r} models cannot be loaded from a folder")

    def _after_fit(self, attribute: str):
        if not hasattr(self, attribute):
            raise ScdcaInputError(
                f"model: {self.name!r} has no {attribute.strip('_')} before `fit`; fit it "
                f"(or load a trained folder) first"
            )
        return getattr(self, attribute)


MODELS: Registry[type[PerturbationModel]] = Registry("model")


def savable_models() -> list[str]:
    """Names of the registered models that can be saved and loaded."""
    return [n for n in MODELS.names() if MODELS.get(n).savable]


def parameter_counts(module) -> dict[str, Any]:
    """A torch module's trainable and total parameters, and the trainable share in %, for `cost()`."""
    params = list(module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {
        "params_trainable": int(trainable),
        "params_total": int(total),
        "params_trainable_pct": 100.0 * trainable / max(total, 1),
    }


def principal_directions(delta: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean change (G,), top-k principal directions of the changes around it (<= k, G)).

    Drug effects are low-rank: models that predict in this space (ridge, dominant, c3tl)
    discard per-gene noise and fit k numbers per condition instead of G.
    Each direction's sign is fixed (its largest-magnitude entry is positive): the SVD's sign
    is arbitrary and changed with the BLAS thread count, which moved c3tl's fit (DECISIONS.md D18).
    """
    mean = delta.mean(0)
    _, _, vt = np.linalg.svd(delta - mean, full_matrices=False)
    vt = vt[:k]
    return mean, vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]


def per_line_fits(train: PerturbationData, fit) -> dict:
    """{None: fit over all training changes, line: fit over that line's}, where
    fit(delta (n, G), log10 dose (n,)) is a drug-blind model's summary of changes."""
    cond = train.conditions
    delta = train.delta()
    logd = np.log10(np.maximum(cond["dose"].to_numpy(float), 1e-12))
    lines = cond["cell_line"].to_numpy()
    fits = {None: fit(delta, logd)}
    for line in np.unique(lines):
        rows = lines == line
        fits[line] = fit(delta[rows], logd[rows])
    return fits


def write_model_json(folder, meta: dict, files: list[str]) -> None:
    """Write model.json last, with the SHA-256 of each saved file, so a folder whose files
    were changed or damaged after saving is refused on load (`read_model_json`)."""
    from pathlib import Path

    folder = Path(folder)
    storage.write_json(folder / "model.json", {**meta, "files": {f: storage.file_sha256(folder / f) for f in files}})


def read_model_json(folder) -> dict:
    """model.json of a saved model folder, after checking every file it lists is unchanged."""
    import json
    from pathlib import Path

    folder = Path(folder)
    path = folder / "model.json"
    try:
        meta = json.loads(path.read_text())
        name = meta["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ScdcaInputError(
            f"model: {str(folder)!r} has no readable model.json naming its model; pass a folder "
            f"written by `scdca train`"
        ) from None
    for file, digest in (meta.get("files") or {}).items():
        target = folder / file
        if not target.is_file() or storage.file_sha256(target) != digest:
            raise ScdcaInputError(
                f"model: {str(target)!r} is missing or differs from what `scdca train` saved "
                f"(checksum mismatch); the {name!r} model folder was changed or damaged: "
                f"retrain it or restore the folder"
            )
    return meta


def load_model(path, **kwargs) -> PerturbationModel:
    """Load a model folder written by a model's `save` (the model name is in model.json).

    The folder's calibration (`calibration.npz`, written by `scdca train`) becomes `model.calibration`
    (None without one): `predict` and `screen` then add prediction intervals.
    Keyword arguments the model's `load` does not take (e.g. `backbone` for C3TL) or that
    are None are dropped. A folder whose files fail their checksums, or whose model.json
    was edited so the weights no longer fit, gives a ScdcaInputError, not a traceback.
    """
    import inspect

    meta = read_model_json(path)
    cls = MODELS.get(meta["model"])
    if not cls.savable:
        raise ScdcaInputError(f"model: {meta['model']!r} models cannot be loaded from a folder")
    accepted = inspect.signature(cls.load).parameters
    try:
        model = cls.load(path, **{k: v for k, v in kwargs.items() if v is not None and k in accepted})
        model.calibration = load_calibration(path)
        return model
    except ScdcaInputError:
        raise
    except Exception as err:  # an edited model.json: missing keys, wrong sizes, wrong types
        raise ScdcaInputError(
            f"model: the folder {str(path)!r} does not load ({type(err).__name__}: {reason(err)}); "
            f"its model.json or weights were edited: retrain it or restore the folder"
        ) from None


def make_model(name: str, **kwargs) -> PerturbationModel:
    """Build a registered model by name (unknown names list the choices)."""
    return MODELS.get(name)(**kwargs)
