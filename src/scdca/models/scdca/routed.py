"""`scdca_routed`, the recommended model: seen and new molecules go to different heads, and the
new-molecule head is shrunk towards the drug-blind answer where it cannot be trusted."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from scdca import storage
from scdca.chem.molecules import canonical_smiles
from scdca.data.screen import PerturbationData
from scdca.errors import ScdcaInputError
from scdca.models.base import MODELS, PerturbationModel, read_model_json, write_model_json
from scdca.models.scdca.presets import ScDCALowRank
from scdca.models.shrinkage import ScaledMeanBaseline, cv_weights, trust_or_stack

log = logging.getLogger(__name__)


@MODELS.register("scdca_routed")
class ScDCARouted(PerturbationModel):
    """Two `scdca_lowrank` heads on the same frozen backbone, chosen per molecule (our extension).

    A molecule seen in training (in any line or dose; matched by canonical SMILES) gets the
    plain head, which fits each training molecule closely; a new molecule gets a head whose
    molecule projection trained with dropout (`new_dropout`), which fits the training
    molecules less closely but varies more smoothly between them. Measured: the plain head
    ranks seen drugs better and new drugs worse than the dropout head (DECISIONS.md D15),
    and one head shared by both kinds of molecule was worse than each on its own kind. The
    choice uses only what is known when predicting: whether the molecule was in training.

    A new molecule's predicted change is then a stack anchored on the drug-blind
    `scaled_mean`: anchor + w_scdca * (head - anchor) + w_ridge * (ridge - anchor), with
    non-negative weights chosen on the training drugs alone (`shrinkage.cv_weights`: the new
    head and a fingerprint `ridge` refitted on `shrinkage_folds` folds of training drugs, the
    weights minimising the error on the held-out ones). The stack is used only where the
    held-out drugs show the head doing worse than the anchor (one-sided paired t-test over
    drugs, p < 0.05; `trust_or_stack`); otherwise the head is kept as trained. Where
    structure predicts little (real L1000 plates) the model so falls back to the common
    response; where the head generalises (the simulated demo) it is left alone. The weights
    are chosen on first use (a new molecule to predict, or `save`). `stack_ridge=False`
    stacks the head alone; `new_shrinkage` fixes the head's weight instead (1.0: unshrunk).
    Each head loads its own copy of the backbone (cost() counts it once) and trains when a
    molecule first needs it, so a screen of seen (or of new) molecules trains one head. With
    `checkpoint_dir`, each head keeps its own checkpoints (`seen/`, `new/`), so a killed run
    resumes where it stopped.
    """

    name = "scdca_routed"
    savable = True
    options = ScDCALowRank.options

    def __init__(
        self,
        *,
        new_dropout: float = 0.6,
        new_shrinkage: float | None = None,
        shrinkage_folds: int = 3,
        stack_ridge: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs,
    ):
        if new_shrinkage is not None and not 0.0 <= new_shrinkage <= 1.0:
            raise ScdcaInputError(
                f"new_shrinkage: {new_shrinkage!r}; use a weight in [0, 1], or None to choose it "
                f"by cross-validation over the training drugs"
            )
        if shrinkage_folds < 2:
            raise ScdcaInputError(f"shrinkage_folds: {shrinkage_folds!r}; use at least 2 folds of training drugs")
        self.new_dropout, self.new_shrinkage, self.shrinkage_folds = new_dropout, new_shrinkage, shrinkage_folds
        self.stack_ridge = stack_ridge and new_shrinkage is None
        folder = Path(checkpoint_dir) if checkpoint_dir else None
        self._new_kwargs = {**kwargs, "gene_head_dropout": new_dropout}
        self.seen = ScDCALowRank(**kwargs, checkpoint_dir=folder / "seen" if folder else None)
        self.new = ScDCALowRank(**self._new_kwargs, checkpoint_dir=folder / "new" if folder else None)

    def fit(self, train: PerturbationData) -> ScDCARouted:
        # each head trains when first needed (`_head`): a grid cell whose test molecules were all
        # seen in training (pairs, few-shot and zero-shot lines) never trains the new head, one whose
        # molecules are all new (unseen drugs) never trains the seen head; `save` trains both
        self._unfitted = {"seen": self.seen, "new": self.new}
        self._head_train = train
        self._molecules = sorted({canonical_smiles(s) or s for s in train.drug_smiles().values()})
        self._anchor = ScaledMeanBaseline().fit(train)
        self.shrinkage_cv_: dict = {}
        self._ridge, self._shrinkage_seconds = None, 0.0
        # the weights are chosen when first needed too (a new molecule to predict, save)
        self._weights = {"scdca": float(self.new_shrinkage)} if self.new_shrinkage is not None else None
        self._train = train if self._weights is None else None
        return self

    def _head(self, kind: str) -> ScDCALowRank:
        """The `seen` or `new` head, trained on the training data the first time it is asked for."""
        head = self._unfitted.pop(kind, None)
        if head is not None:
            head.fit(self._head_train)
            if not self._unfitted:
                self._head_train = None
        return getattr(self, kind)

    def _any_head(self) -> ScDCALowRank:
        """A trained head (both share genes, lines and molecules); the seen head if neither is yet."""
        unfitted = getattr(self, "_unfitted", {})
        return self.new if "new" not in unfitted and "seen" in unfitted else self._head("seen")

    @property
    def weights_(self) -> dict[str, float]:
        """Weights of the new molecules' deviations from `scaled_mean` (chosen on first use)."""
        if self._weights is None:
            self._weights = self._choose_weights(self._train)
            self._train = None
        return self._weights

    def _choose_weights(self, train: PerturbationData) -> dict[str, float]:

        t0 = time.perf_counter()
        n_drugs = train.conditions["drug"].nunique()
        if n_drugs < 2 * self.shrinkage_folds:
            weights = {"scdca": 1.0}
            log.warning(
                "scdca_routed: %d training drugs are too few to choose the weights of new molecules by "
                "%d-fold cross-validation; new molecules get the new head unshrunk",
                n_drugs,
                self.shrinkage_folds,
            )
        else:
            models = {"scdca": lambda inner, held: ScDCALowRank(**self._new_kwargs).fit(inner).predict(held)}
            if self.stack_ridge:
                models["ridge"] = lambda inner, held: MODELS.get("ridge")().fit(inner).predict(held)
            self._oof = {}
            stacked, self.shrinkage_cv_ = cv_weights(
                models, train, n_folds=self.shrinkage_folds, seed=int(self._new_kwargs.get("seed", 0)), keep=self._oof
            )
            weights = trust_or_stack(stacked, self.shrinkage_cv_, "scdca")
            if weights.get("ridge", 0.0) > 0.0:
                self._ridge = MODELS.get("ridge")().fit(train)
        self._shrinkage_seconds = time.perf_counter() - t0
        return weights

    def new_molecule_out_of_fold(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(condition ids (N,), (N, G) predictions, (N,) fold) of the training conditions made by the
        shrinkage folds' models (fold f's trained on the other folds' drugs), combined with the
        chosen weights: what this model predicts for a new molecule, at no extra fit
        (`scdca.models.intervals` calibrates on it).
        None when no folds ran (too few drugs, a fixed `new_shrinkage`, or a loaded model)."""
        weights = self.weights_
        oof = getattr(self, "_oof", None)
        if not oof:
            return None
        pred = oof["base"] + sum(w * oof["deviation"][name] for name, w in weights.items())
        return oof["ids"], np.maximum(pred, 0), oof["fold"]

    @property
    def shrinkage_(self) -> float:
        """The new head's weight (1: unshrunk)."""
        return self.weights_["scdca"]

    @property
    def genes(self) -> np.ndarray:
        return self._any_head().genes

    @property
    def control_lines(self) -> dict[str, np.ndarray]:
        return self._any_head().control_lines

    @property
    def training_molecules(self) -> dict[str, str] | None:
        return self._any_head().training_molecules

    def is_seen(self, smiles) -> np.ndarray:
        """(N,) True where the molecule was in the training data."""
        smiles = list(smiles)
        known = set(self._molecules)
        seen = {s: (canonical_smiles(s) or s) in known for s in set(smiles)}  # each molecule parsed once
        return np.array([seen[s] for s in smiles], dtype=bool)

    def _predict(self, query: PerturbationData) -> np.ndarray:
        if not hasattr(self, "_molecules"):
            raise RuntimeError("call fit() (or ScDCARouted.load) before predict()")
        seen = self.is_seen(query.conditions["smiles"])
        out = np.empty((len(query.ids), query.n_genes), dtype=np.float32)
        for mask, kind in ((seen, "seen"), (~seen, "new")):
            if mask.any():
                out[mask] = self._head(kind).predict(query.subset(np.asarray(query.ids)[mask], observed=False))
        if (~seen).any() and self.weights_ != {"scdca": 1.0}:  # new molecules: the stack on the drug-blind answer
            new = query.subset(np.asarray(query.ids)[~seen], observed=False)
            anchor = new.control_for(new.conditions["cell_line"]) + self._anchor.change(new)
            blend = anchor + self.weights_["scdca"] * (out[~seen] - anchor)
            if self.weights_.get("ridge", 0.0) > 0:
                blend += self.weights_["ridge"] * (self._ridge.predict(new) - anchor)
            out[~seen] = blend
        return out

    def cost(self) -> dict[str, Any]:
        """Parameters of both heads (one frozen backbone); steps and training time of the heads
        trained so far (a head no test molecule needed is never trained)."""
        unfitted = getattr(self, "_unfitted", {})
        trained = [h.cost() for kind, h in (("seen", self.seen), ("new", self.new)) if kind not in unfitted]
        if not trained or not all(trained):
            return {}
        head = trained[0]["params_trainable"]  # the two heads are the same network
        trainable = 2 * head
        total = trained[0]["params_total"] + head  # one frozen backbone, two heads
        return {
            "params_trainable": trainable,
            "params_total": total,
            "params_trainable_pct": 100.0 * trainable / total,
            "steps": sum(c["steps"] for c in trained),
            "train_seconds": sum(c["train_seconds"] for c in trained),
            "shrinkage": self._weights["scdca"] if self._weights else float("nan"),  # NaN: never needed
            "ridge_weight": self._weights.get("ridge", 0.0) if self._weights else float("nan"),
            "shrinkage_seconds": self._shrinkage_seconds,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Both heads in subfolders `seen/` and `new/`, then model.json (written last)."""
        folder = Path(path)
        weights = self.weights_  # a saved model predicts any molecule: choose the weights and train both heads now
        for kind in ("seen", "new"):
            self._head(kind).save(folder / kind)
        anchor = {
            str(k): {"mean": m.tolist(), "levels": lv.tolist(), "scales": sc.tolist()}
            for k, (m, lv, sc) in self._anchor._fits.items()
        }
        files = ["seen/model.json", "new/model.json"]
        if self._ridge is not None:
            with storage.atomic_path(folder / "ridge.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **self._ridge.to_arrays())
            files.append("ridge.npz")
        write_model_json(
            folder,
            {
                "model": self.name,
                "new_dropout": self.new_dropout,
                "molecules": self._molecules,
                "weights": weights,
                "shrinkage_cv": self.shrinkage_cv_,
                "anchor": anchor,
            },
            files=files,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None, device: str | None = None) -> ScDCARouted:
        folder = Path(path)
        meta = read_model_json(folder)
        model = cls.__new__(cls)
        model.new_dropout = meta["new_dropout"]
        model.seen = ScDCALowRank.load(folder / "seen", backbone=backbone, device=device)
        model.new = ScDCALowRank.load(folder / "new", backbone=backbone, device=device)
        model._molecules = list(meta["molecules"])
        # models saved before the stack existed have no weights: their new head, unshrunk
        model._weights = {k: float(v) for k, v in (meta.get("weights") or {"scdca": 1.0}).items()}
        model._train, model._shrinkage_seconds = None, 0.0
        model._unfitted, model._head_train = {}, None
        model.shrinkage_cv_ = meta.get("shrinkage_cv", {})
        model.new_shrinkage, model.shrinkage_folds, model.stack_ridge = None, 3, "ridge" in model.weights_
        model._anchor = ScaledMeanBaseline.from_fits(meta.get("anchor") or {})
        model._ridge = None
        if (folder / "ridge.npz").exists():
            with np.load(folder / "ridge.npz") as z:
                model._ridge = MODELS.get("ridge").from_arrays(dict(z))
        return model
