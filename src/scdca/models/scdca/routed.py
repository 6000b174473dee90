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
from scdca.data.splits import Split
from scdca.errors import ScdcaInputError
from scdca.models.base import MODELS, PerturbationModel, Saved
from scdca.models.baselines import RidgeBaseline
from scdca.models.scdca.presets import ScDCALowRank
from scdca.models.shrinkage import ScaledMeanBaseline, cv_weights, trust_or_stack

log = logging.getLogger(__name__)

HEADS = ("seen", "new")  # the head for molecules seen in training, the one for new molecules


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
    response; where the head generalises (the simulated demo) it is left alone.
    `stack_ridge=False` stacks the head alone; `new_shrinkage` fixes the head's weight instead
    (1.0: unshrunk). `fit` trains both heads and chooses the weights; `heads=("new",)` (or
    `("seen",)`) trains one head only, and every molecule then goes to it (`scdca_stack` asks for
    the one its task needs). Each head loads its own copy of the backbone (cost() counts it once).
    With `checkpoint_dir`, each head keeps its own checkpoints (`seen/`, `new/`), so a killed run
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
        heads: tuple[str, ...] | list[str] = HEADS,
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
        if not heads or any(h not in HEADS for h in heads):
            raise ScdcaInputError(f"heads: {heads!r}; name one or both of {', '.join(HEADS)}")
        self.new_dropout, self.new_shrinkage, self.shrinkage_folds = new_dropout, new_shrinkage, shrinkage_folds
        self.stack_ridge = stack_ridge and new_shrinkage is None
        self.heads = tuple(h for h in HEADS if h in heads)
        folder = Path(checkpoint_dir) if checkpoint_dir else None
        self._new_kwargs = {**kwargs, "gene_head_dropout": new_dropout}
        self.seen = ScDCALowRank(**kwargs, checkpoint_dir=folder / "seen" if folder else None)
        self.new = ScDCALowRank(**self._new_kwargs, checkpoint_dir=folder / "new" if folder else None)

    def _fit(self, train: PerturbationData) -> None:
        self._molecules = sorted({canonical_smiles(s) or s for s in train.drug_smiles().values()})
        self._anchor = ScaledMeanBaseline().fit(train)
        self.shrinkage_cv_: dict = {}
        self._ridge: RidgeBaseline | None = None
        self._shrinkage_seconds = 0.0
        self._oof: dict[str, Any] = {}  # the shrinkage folds' predictions (`cv_weights`' keep)
        for kind in self.heads:
            getattr(self, kind).fit(train)
        fixed = {"scdca": float(self.new_shrinkage)} if self.new_shrinkage is not None else None
        self.weights_ = fixed or (self._choose_weights(train) if "new" in self.heads else {"scdca": 1.0})

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
                self._ridge = RidgeBaseline().fit(train)
        self._shrinkage_seconds = time.perf_counter() - t0
        return weights

    def out_of_fold(self, task: str) -> list[tuple[Split, np.ndarray]] | None:
        """For unseen_drug: the shrinkage folds' predictions of the training conditions (fold f's
        model trained on the other folds' drugs), combined with the chosen weights: what this model
        predicts for a new molecule, at no extra fit (`scdca.intervals` calibrates on them).
        None for other tasks, or when no folds ran (too few drugs, a fixed `new_shrinkage`, a loaded model)."""
        oof = self._oof
        if task != "unseen_drug" or not oof:
            return None
        pred = np.maximum(oof["base"] + sum(w * oof["deviation"][name] for name, w in self.weights_.items()), 0)
        ids, fold = np.asarray(oof["ids"]), np.asarray(oof["fold"])
        return [
            (Split(task, 0, "", tuple(ids[fold != f]), tuple(ids[fold == f])), pred[fold == f]) for f in np.unique(fold)
        ]

    @property
    def shrinkage_(self) -> float:
        """The new head's weight (1: unshrunk)."""
        return self.weights_["scdca"]

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
        to_new = ~seen if self.heads == HEADS else np.full(len(seen), self.heads == ("new",))
        out = np.empty((len(query.ids), query.n_genes), dtype=np.float32)
        for mask, kind in ((~to_new, "seen"), (to_new, "new")):
            if mask.any():
                out[mask] = getattr(self, kind).predict(query.subset(np.asarray(query.ids)[mask], observed=False))
        shrunk = to_new & ~seen  # new molecules on the new head: the stack on the drug-blind answer
        if shrunk.any() and self.weights_ != {"scdca": 1.0}:
            new = query.subset(np.asarray(query.ids)[shrunk], observed=False)
            anchor = new.control_for(new.conditions["cell_line"]) + self._anchor.change(new)
            blend = anchor + self.weights_["scdca"] * (out[shrunk] - anchor)
            if self.weights_.get("ridge", 0.0) > 0:
                if self._ridge is None:
                    raise RuntimeError("scdca_routed: a ridge weight without its fitted ridge")
                blend += self.weights_["ridge"] * (self._ridge.predict(new) - anchor)
            out[shrunk] = blend
        return out

    def cost(self) -> dict[str, Any]:
        """Parameters of its heads (one frozen backbone); their steps and training time."""
        trained = [getattr(self, kind).cost() for kind in self.heads]
        if not trained or not all(trained):
            return {}
        head = trained[0]["params_trainable"]  # the two heads are the same network
        trainable = len(trained) * head
        total = trained[0]["params_total"] + (len(trained) - 1) * head  # one frozen backbone
        return {
            "params_trainable": trainable,
            "params_total": total,
            "params_trainable_pct": 100.0 * trainable / total,
            "steps": sum(c["steps"] for c in trained),
            "train_seconds": sum(c["train_seconds"] for c in trained),
            "shrinkage": self.weights_["scdca"],
            "ridge_weight": self.weights_.get("ridge", 0.0),
            "shrinkage_seconds": self._shrinkage_seconds,
        }

    # -- save / load (`models.base.save_folder`): its heads in subfolders `seen/` and `new/` ---------
    def settings(self) -> dict[str, Any]:
        head = self.seen.settings()  # both heads share every setting but the new head's dropout
        return {
            **head,
            "new_dropout": self.new_dropout,
            "new_shrinkage": self.new_shrinkage,
            "shrinkage_folds": self.shrinkage_folds,
            "stack_ridge": self.stack_ridge,
            "heads": list(self.heads),
        }

    def _saved(self, folder: Path) -> Saved:
        for kind in self.heads:
            getattr(self, kind).save(folder / kind)
        files = [f"{kind}/model.json" for kind in self.heads]
        if self._ridge is not None:  # its arrays include text (its lines): an npz, not safetensors
            storage.write_npz(folder / "ridge.npz", **self._ridge.to_arrays())
            files.append("ridge.npz")
        meta = {
            "molecules": self._molecules,
            "weights": self.weights_,
            "shrinkage_cv": self.shrinkage_cv_,
            "anchor": self._anchor.to_json(),
        }
        return Saved(meta, files=files)

    def _restored(self, saved: Saved, folder: Path, overrides: dict[str, Any]) -> None:
        meta = saved.meta
        for kind in self.heads:
            setattr(self, kind, ScDCALowRank.load(folder / kind, **overrides))
        self._molecules = list(meta["molecules"])
        self.weights_ = {k: float(v) for k, v in meta["weights"].items()}
        self._shrinkage_seconds, self._oof = 0.0, {}
        self.shrinkage_cv_ = meta["shrinkage_cv"]
        self._anchor = ScaledMeanBaseline.from_fits(meta["anchor"])
        self._ridge = None
        if (folder / "ridge.npz").is_file():
            with np.load(folder / "ridge.npz") as z:
                self._ridge = RidgeBaseline.from_arrays(dict(z))
