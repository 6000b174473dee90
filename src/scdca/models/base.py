"""The one interface every model follows, baselines and scDCA alike."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import numpy as np

from scdca import storage
from scdca.chem.featurizer import DrugFeaturizer
from scdca.data.screen import PerturbationData
from scdca.data.splits import Split
from scdca.errors import ScdcaInputError, reason
from scdca.registry import Registry


class PerturbationModel(ABC):
    """Predicts the mean expression of (cell line, drug, dose) conditions.

    `fit` sees only training conditions (with observations) and every line's control.
    `predict` sees the requested conditions without observations, so a model cannot
    read test data even by mistake.

    The contract every model keeps, with defaults true for all of them:

    - `fit(train)` fits (subclasses implement `_fit`), and records what every fitted model
      knows: `genes`, `control_lines` and `training_molecules`.
    - class flags: `drug_blind` (the same change for every drug: a reference that the report
      and `scdca_stack` treat as such), `mean_change` (a drug-blind mean of training changes),
      `baseline` (listed among the report's baselines), `savable` (`save` and `load` are implemented).
    - `calibration`: None, or the `scdca.intervals.Calibration` that `scdca.predict.load` attached.
    - `out_of_fold(task)`: None, or the predictions the model made on folds of its own training
      data while fitting (calibration then needs no refit).
    """

    name: ClassVar[str] = "model"
    # benchmark-wide options (CLI: --encoder, --epochs, ...) this model accepts; the grid's
    # seed is passed as `seed` when listed. Closed-form baselines take none.
    options: ClassVar[tuple[str, ...]] = ()
    savable: ClassVar[bool] = False  # True where `save` and `load` are implemented (`scdca train` needs it)
    drug_blind: ClassVar[bool] = False  # True: predicts the same change for every drug of a line and dose
    baseline: ClassVar[bool] = False  # True: one of the report's reference baselines
    # True: predicts a mean of training changes (drug-blind), the reference of the *_vs_mean metrics
    mean_change: ClassVar[bool] = False
    # single cells per condition and control cells per line this model trains on
    # (`PerturbationData.cells`); 0: pseudobulk only. The benchmark keeps the most any of its models asks.
    cells_per_condition: ClassVar[int] = 0
    control_cells_per_line: ClassVar[int] = 0
    # a scdca.intervals.Calibration (typed loosely: calibration is a layer above models)
    calibration: Any = None
    training_molecules: dict[str, str] | None = None  # drug -> SMILES of the training data, set by `fit`

    @classmethod
    def check_available(cls) -> None:
        """Raise ScdcaInputError (saying how to fix it) if this model cannot run here."""
        return None

    def fit(self, train: PerturbationData, **kwargs) -> Self:
        """Learn from the training conditions; returns self."""
        self._genes = np.asarray(train.genes)
        self._controls = (list(train.controls.index), train.control_mean.copy())
        self.training_molecules = {str(d): str(smi) for d, smi in train.drug_smiles().items()}
        self._fit(train, **kwargs)
        return self

    @abstractmethod
    def _fit(self, train: PerturbationData) -> None:
        """The model's own fitting (`fit` has recorded genes, control lines and molecules)."""

    def out_of_fold(self, task: str) -> list[tuple[Split, np.ndarray]] | None:
        """(split, predictions of its held-out conditions) for folds of the training data that
        hold out what `task` holds out, made while fitting; None where the model made none."""
        return None

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

    def _fitted_meta(self) -> dict[str, Any]:
        """What `fit` recorded, as a saved model's model.json keeps it (the control means are arrays:
        each model stores `control_lines[...]` with its own)."""
        lines, _ = self._after_fit("_controls")
        return {
            "model": self.name,
            "genes": [str(g) for g in self.genes],
            "control_lines": [str(c) for c in lines],
            "training_molecules": self.training_molecules,
        }

    def _restore_fitted(self, meta: dict, control_mean: np.ndarray) -> None:
        """Put back what `fit` recorded, from `_fitted_meta`'s fields and the (L, G) control means."""
        self._genes = np.asarray(meta["genes"], dtype=object)
        self._controls = (list(meta["control_lines"]), np.asarray(control_mean))
        self.training_molecules = meta["training_molecules"]

    # -- saving: savable models say what they keep (`settings`, `_saved`, `_restored`); the helper
    # -- `save_folder`/`load_folder` owns model.json, the arrays file and the featurizer
    def settings(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this model unfitted: `load` calls ``cls(**settings)``."""
        raise NotImplementedError(f"{self.name}: a savable model says how to rebuild itself")

    def _saved(self, folder: Path) -> Saved:
        """What this model learned beyond what `fit` records for every model; it may write parts
        (other models' folders) under `folder` and name their model.json in `Saved.files`."""
        raise NotImplementedError(f"{self.name}: a savable model says what it keeps")

    def _restored(self, saved: Saved, folder: Path, overrides: dict[str, Any]) -> None:
        """Put back what `_saved` kept; `overrides` are `load`'s backbone and device, for parts."""
        raise NotImplementedError(f"{self.name}: a savable model says how to restore itself")

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to the folder `path` (`load_model` reads it back)."""
        if not self.savable:
            raise ScdcaInputError(f"model: {self.name!r} cannot be saved; train one of {', '.join(savable_models())}")
        save_folder(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> Self:
        """Read a folder written by `save`; `load_model(path)` finds the class from model.json.
        `overrides` (backbone, device) replace the saved settings of the same name."""
        if not cls.savable:
            raise ScdcaInputError(f"model: {cls.name!r} models cannot be loaded from a folder")
        return cast(Self, load_folder(cls, Path(path), **overrides))

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


FORMAT = 2  # model folders: model.json (settings, fitted record, the model's own fields) + arrays
ARRAYS = "arrays.safetensors"  # every numpy array of a saved model, the featurizer's included
RUNTIME = ("backbone", "device")  # `load` overrides that are where to run, not what was learned


@dataclass
class Saved:
    """What a savable model keeps beyond `fit`'s record (genes, control lines, molecules)."""

    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able fields
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # into arrays.safetensors
    files: list[str] = field(default_factory=list)  # files the model wrote itself (its parts' model.json)
    featurizer: DrugFeaturizer | None = None  # its molecule featurizer, kept (and restored) whole
    encoder: str | None = None  # the featurizer's encoder spec

    @property
    def restored_featurizer(self) -> DrugFeaturizer:
        """The featurizer `load_folder` restored; an error for a folder saved without one."""
        if self.featurizer is None:
            raise ScdcaInputError("model: the folder has no featurizer state; retrain it with `scdca train`")
        return self.featurizer


def save_folder(model: PerturbationModel, folder: Path) -> None:
    """model.json (written last, with each file's hash), arrays.safetensors and the model's parts."""
    saved = model._saved(folder)
    arrays = {**saved.arrays, "control_mean": np.asarray(model._after_fit("_controls")[1], np.float32)}
    meta: dict[str, Any] = {**model._fitted_meta(), "format": FORMAT, "settings": model.settings()}
    if saved.featurizer is not None:
        f = saved.featurizer
        meta["featurizer"] = {
            "encoder": saved.encoder,
            "identifier": f.encoder.identifier,
            "dose_lo": f.dose_lo,
            "dose_span": f.dose_span,
        }
        arrays.update({"featurizer.mean": f.mean, "featurizer.std": f.std})
    storage.write_safetensors(folder / ARRAYS, arrays)
    storage.write_model_json(folder, {**meta, "own": saved.meta}, [ARRAYS, *saved.files])


def load_folder(cls: type[PerturbationModel], folder: Path, **overrides) -> PerturbationModel:
    """The model `save_folder` wrote, rebuilt from its settings (overridden by `overrides` where
    given), with `fit`'s record, its featurizer and its own fields restored."""
    meta = storage.read_model_json(folder)
    if meta.get("format") != FORMAT:
        raise ScdcaInputError(
            f"model: {str(folder)!r} was saved by an older scdca (model folder format "
            f"{meta.get('format', 1)}; this version reads {FORMAT}): retrain it with `scdca train`"
        )
    named = MODELS.get(meta["model"])
    cls = named if issubclass(named, cls) else cls  # ScDCAModel.load of a preset's folder builds the preset
    arrays = storage.read_safetensors(folder / ARRAYS)
    runtime = {k: v for k, v in overrides.items() if k in RUNTIME and v is not None}
    settings = {**meta["settings"], **{k: v for k, v in runtime.items() if k in meta["settings"]}}
    model = cls(**settings)
    model._restore_fitted(meta, arrays.pop("control_mean"))
    featurizer = None
    if "featurizer" in meta:
        f = meta["featurizer"]
        featurizer = DrugFeaturizer(f["encoder"]).restore(
            mean=arrays.pop("featurizer.mean"),
            std=arrays.pop("featurizer.std"),
            dose_lo=f["dose_lo"],
            dose_span=f["dose_span"],
            identifier=f["identifier"],
        )
    model._restored(Saved(meta["own"], arrays, featurizer=featurizer), folder, runtime)
    return model


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


def load_model(path, **kwargs) -> PerturbationModel:
    """Load a model folder written by a model's `save` (the model name is in model.json).

    The model comes without its calibration (`model.calibration` is None); `scdca.predict.load`
    reads both, so that `predict` and `screen` add prediction intervals.
    Keyword arguments (`backbone`, `device`) replace the saved settings of that name; those the
    model has no setting for (`backbone` for C3TL) or that are None are dropped. A folder whose
    files fail their checksums, or whose model.json was edited so the weights no longer fit,
    gives a ScdcaInputError, not a traceback.
    """
    meta = storage.read_model_json(path)
    cls = MODELS.get(meta["model"])
    if not cls.savable:
        raise ScdcaInputError(f"model: {meta['model']!r} models cannot be loaded from a folder")
    try:
        return cls.load(path, **kwargs)
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
