"""`scdca_stack`, the recommended model: a committee of the project's experts, chosen by what
their out-of-fold predictions on the training data show (DECISIONS.md D45).

How it decides, from the training conditions alone:

1. **Folds that hold out what the task holds out** (`data.splits.fold_splits`: folds of the
   training drugs for unseen_drug, of the training pairs for unseen_pair, the task's own rule on
   training lines for the line tasks). Each expert is refitted on each fold's training part and
   predicts its held-out part.
2. **A committee.** Every committee of one to three drug-aware experts, their predictions averaged
   with equal weights, is scored out of fold by its error and its rank, each against the drug-blind
   anchor (`scaled_mean`): mse / anchor mse + rank / 0.5, which is 2 for the anchor itself. The
   lowest score wins; equal weights, because weights fitted on fold models that saw less data
   than the final ones shrink every expert toward the anchor (DECISIONS.md D45 has the numbers).
3. **Evidence, not hope.** Where no committee scores below the anchor, or the chosen one's error is
   shown above the anchor's (one-sided paired t-test over held-out units, p < 0.05), the
   prediction is the anchor (D16's lesson: where structure predicts nothing, the common response
   is the honest answer).
4. **One set of folds for everything.** The chosen committee's out-of-fold predictions are what
   the conformal intervals (`intervals.calibrate`) calibrate on: they refit nothing.

Experts outside the committee are never fitted on the whole training data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdca import storage
from scdca.data.screen import PerturbationData
from scdca.data.splits import Split, fold_splits
from scdca.errors import ScdcaInputError
from scdca.models.base import MODELS, PerturbationModel, Saved
from scdca.models.baselines import RidgeBaseline
from scdca.models.scdca.routed import HEADS, ScDCARouted
from scdca.models.shrinkage import ScaledMeanBaseline, worse_than_anchor

log = logging.getLogger(__name__)

EXPERTS = ("scdca_head", "ridge", "c3tl", "knn", "additive")
NEW_DRUG_TASKS = ("unseen_drug", "unseen_scaffold")  # tasks whose test molecules are not in training
MAX_COMMITTEE = 3  # committees of 1 to 3 experts are compared
ALPHA = 0.05  # a committee shown worse than the anchor at this one-sided level is not used (the convention, not tuned)


def distance_ranks(pred: np.ndarray, observed: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Within each group: the normalised rank of each prediction's own observation by distance
    (0: its own observation is the nearest; 0.5: chance). The benchmark's `rank` metric."""
    out = np.full(pred.shape[0], np.nan)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if idx.size < 2:
            continue
        P, O = pred[idx].astype(np.float64), observed[idx].astype(np.float64)
        d = (P**2).sum(1)[:, None] + (O**2).sum(1)[None, :] - 2 * P @ O.T  # (n, n) squared distances
        own = np.diag(d)[:, None]
        closer = (d < own - 1e-9).sum(1)
        ties = (np.abs(d - own) <= 1e-9).sum(1) - 1  # minus itself
        out[idx] = (closer + 0.5 * ties) / (idx.size - 1)
    return out


def units(cond: pd.DataFrame, task: str) -> np.ndarray:
    """(N,) the unit the stack's evidence is paired over: the drug (drug and scaffold tasks), else
    the drug-line pair (pairs, doses and the line tasks, whose few calibration lines are too few)."""
    drug = cond["drug"].astype(str)
    if task in ("unseen_drug", "unseen_scaffold"):
        return drug.to_numpy()
    return (drug + "|" + cond["cell_line"].astype(str)).to_numpy()


def expert(name: str, options: dict, seed: int, **head) -> PerturbationModel:
    """A fresh expert: `scdca_head` is `scdca_routed` unshrunk (the low-rank heads named by
    `options['scdca_heads']`, both by default; the stack does the shrinking; `head` may add
    progress and checkpoint_dir), `ridge` chooses its penalty by
    3 folds of training drugs; any other registered model takes the options it declares."""
    if name == "scdca_head":
        scdca = {k: v for k, v in {**options, "seed": seed}.items() if k in ScDCARouted.options}
        return ScDCARouted(new_shrinkage=1.0, heads=options.get("scdca_heads", HEADS), **scdca, **head)
    if name == "ridge":
        return RidgeBaseline(penalty_folds=3, seed=seed)
    cls = MODELS.get(name)
    return cls(**{k: v for k, v in {**options, "seed": seed}.items() if k in cls.options})


class _Fits:
    """Experts fitted on the same training conditions, kept for reuse within a process.

    A line task's splits repeat their out-of-fold fits (with three lines, the zero-shot split of
    line A fits on C alone to predict B, as the split of B does to predict A): the fit is reused
    if its expert, options and training data (hashed) are the same. Bounded, oldest out first."""

    def __init__(self, size: int = 4):
        self.size, self._fits = size, OrderedDict[tuple, PerturbationModel]()

    def get(self, key: tuple, fit):
        if key in self._fits:
            self._fits.move_to_end(key)
            return self._fits[key]
        model = fit()
        self._fits[key] = model
        while len(self._fits) > self.size:
            self._fits.popitem(last=False)
        return model


_FITS = _Fits()


def _data_key(data: PerturbationData) -> str:
    h = hashlib.sha256()
    h.update("\0".join(data.ids).encode())
    for a in (data.mean, data.control_mean):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(list(data.controls.index)).encode())
    return h.hexdigest()


@MODELS.register("scdca_stack")
class ScDCAStack(PerturbationModel):
    """The recommended model: a committee of experts chosen by out-of-fold evidence on the training data.

    Experts (`experts`, default `EXPERTS`): the scDCA heads (`scdca_routed`'s two low-rank heads on
    the frozen backbone, unshrunk; no adapters), `ridge` (penalty by folds of training drugs),
    `c3tl`, `knn` and `additive`; any registered model can be named (e.g. `scdca`, the paper's
    adapters, or `biolord`, at their cost). The prediction is the mean of the chosen committee's
    predictions, or the anchor `scaled_mean` where no committee beats it out of fold (module
    docstring); `weights_` gives each expert's share (1/size in the committee, else 0). `task` is
    the kind of new prediction the folds mimic (the benchmark passes its own; `scdca train` its
    `--intervals` task), `held_out` a few-shot split's own line, never a fold's held-out line.

    After `fit`, `evidence_` holds the weights, the committee, each expert's out-of-fold mse and
    rank, the anchor's and the chosen prediction's, the test's p-value and whether a committee was used.
    """

    name = "scdca_stack"
    savable = True
    options = (*ScDCARouted.options, "task", "held_out")

    def __init__(
        self,
        *,
        experts: tuple[str, ...] | str = EXPERTS,
        task: str = "unseen_drug",
        held_out: str = "",
        seed: int = 0,
        progress: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        **options,
    ):
        names = tuple(e.strip() for e in experts.split(",")) if isinstance(experts, str) else tuple(experts)
        unknown = [e for e in names if e != "scdca_head" and e not in MODELS.names()]
        if not names or unknown:
            raise ScdcaInputError(
                f"experts: {unknown or names!r} are not models; name registered models (or scdca_head), "
                f"e.g. {','.join(EXPERTS)}"
            )
        self.experts, self.task, self.held_out, self.seed = names, task, held_out, seed
        # the scDCA heads a task's test molecules need: the new-molecule head where they are new,
        # both on pairs (a drug tested only in held-out pairs is new), the seen head on lines
        heads = ("new",) if task in NEW_DRUG_TASKS else HEADS if task == "unseen_pair" else ("seen",)
        self._options = {**options, "seed": seed, "scdca_heads": heads}
        self._progress, self._checkpoint = progress, checkpoint_dir

    # -- fitting -----------------------------------------------------------------------------
    def _fit(self, train: PerturbationData) -> None:
        t0 = time.perf_counter()
        self._anchor = ScaledMeanBaseline().fit(train)
        self._parts: list[tuple[Split, np.ndarray]] = []
        try:
            splits = fold_splits(train, self.task, self.seed, exclude=self.held_out)
        except ScdcaInputError as err:
            splits = []
            log.warning("scdca_stack: no out-of-fold evidence (%s); it predicts the drug-blind anchor", err)
        evidence = self._evidence(train, splits) if splits else None
        self.weights_ = self._decide(evidence)
        self._fitted = {name: self._final(name, train) for name, w in self.weights_.items() if w > 0}
        self._train = train  # what `save` keeps for the closed-form experts
        self.evidence_["seconds"] = time.perf_counter() - t0

    def _final(self, name: str, train: PerturbationData) -> PerturbationModel:
        """The expert fitted on all training data; the scDCA heads keep progress and checkpoints."""
        folder = Path(self._checkpoint) / name if self._checkpoint else None
        head = {"progress": self._progress, "checkpoint_dir": folder} if name == "scdca_head" else {}
        return expert(name, self._options, self.seed, **head).fit(train)

    def _evidence(self, train: PerturbationData, splits: list[Split]) -> dict:
        """Every expert's out-of-fold predictions on the splits' held-out conditions."""
        ids, fold, base, observed = [], [], [], []
        preds: dict[str, list[np.ndarray]] = {e: [] for e in self.experts}
        for k, split in enumerate(splits):
            inner, held = train.subset(split.train), train.subset(split.test, observed=False)
            cond = held.conditions
            anchor = held.control_for(cond["cell_line"]) + ScaledMeanBaseline().fit(inner).change(held)
            key = _data_key(inner)
            for name in self.experts:
                spec = (name, repr(sorted(self._options.items())), key)
                fresh = lambda name=name, inner=inner: expert(name, self._options, self.seed).fit(inner)  # noqa: E731
                fitted = _FITS.get(spec, fresh)
                preds[name].append(np.asarray(fitted.predict(held), np.float64))
            ids += list(split.test)
            fold.append(np.full(len(split.test), k))
            base.append(anchor)
            observed.append(train.subset(split.test).observed.astype(np.float64))
        sub = train.subset(ids)
        return {
            "ids": np.asarray(ids),
            "fold": np.concatenate(fold),
            "lines": sub.conditions["cell_line"].astype(str).to_numpy(),
            "units": units(sub.conditions, self.task),
            "base": np.concatenate(base),
            "observed": np.concatenate(observed),
            "pred": {e: np.concatenate(p) for e, p in preds.items()},
            "splits": splits,
        }

    def _decide(self, ev: dict | None) -> dict[str, float]:
        """The experts' weights (all 0: the anchor), and `evidence_`, the record of why."""
        zero = {e: 0.0 for e in self.experts}
        if ev is None:
            self.evidence_ = {"used": False, "p_worse": float("nan"), "n_units": 0, "committee": ""}
            return zero
        groups = np.array([f"{line}|{k}" for line, k in zip(ev["lines"], ev["fold"])])  # ranked within these
        scores = {"anchor": _scores(ev["base"], ev["observed"], groups)}
        scores.update({e: _scores(ev["pred"][e], ev["observed"], groups) for e in self.experts})
        aware = [e for e in self.experts if e == "scdca_head" or not MODELS.get(e).drug_blind]
        best: tuple[str, ...] = ()
        best_score = 2.0  # the anchor's own score: mse ratio 1 + rank 0.5 / 0.5
        for size in range(1, min(MAX_COMMITTEE, len(aware)) + 1):
            for members in combinations(aware, size):
                pred = np.mean([ev["pred"][e] for e in members], axis=0)
                mse, rank = _scores(pred, ev["observed"], groups)
                score = mse / scores["anchor"][0] + rank / 0.5
                if score < best_score:
                    best, best_score = members, score
        committee = np.mean([ev["pred"][e] for e in best], axis=0) if best else ev["base"]
        target = ev["observed"] - ev["base"]
        p = worse_than_anchor(committee - ev["base"], target, ev["units"]) if best else 1.0
        used = bool(best) and p >= ALPHA
        weights = {e: (1.0 / len(best) if used and e in best else 0.0) for e in self.experts}
        oof = committee if used else ev["base"]
        self._parts = [(s, oof[ev["fold"] == k]) for k, s in enumerate(ev["splits"])]
        scores["stack"] = _scores(oof, ev["observed"], groups)
        self.evidence_ = {
            "used": used,
            "committee": "+".join(best),
            "p_worse": float(p),
            "n_units": int(len(np.unique(ev["units"]))),
            "n_conditions": int(len(target)),
            **{f"w_{e}": w for e, w in weights.items()},
            **{f"oof_mse_{n}": float(v[0]) for n, v in scores.items()},
            **{f"oof_rank_{n}": float(v[1]) for n, v in scores.items()},
        }
        log.info(
            "scdca_stack (%s): %s (out-of-fold score %.3f, the anchor's 2; p_worse = %.3g over %d units)",
            self.task,
            f"the mean of {', '.join(best)}" if used else "the anchor",
            best_score,
            p,
            self.evidence_["n_units"],
        )
        return weights

    # -- prediction ---------------------------------------------------------------------------
    def _predict(self, query: PerturbationData) -> np.ndarray:
        if not hasattr(self, "weights_"):
            raise RuntimeError("call fit() (or load_model) before predict()")
        lines = query.conditions["cell_line"]
        base = query.control_for(lines) + self._anchor.change(query)
        out = base.astype(np.float64)
        for name, model in self._fitted.items():
            out += self.weights_[name] * (np.asarray(model.predict(query), np.float64) - base)
        return out.astype(np.float32)

    def out_of_fold(self, task: str) -> list[tuple[Split, np.ndarray]] | None:
        """[(fold split, (n, G) what this model predicted for its held-out conditions)] when the
        folds mimic `task`: the intervals calibrate on these and refit nothing. None otherwise."""
        return self._parts if task == self.task and self._parts else None

    def cost(self) -> dict[str, Any]:
        """The weights and the out-of-fold scores that chose them (one row per split in costs.csv)."""
        cost = dict(self.evidence_)
        head = self._fitted["scdca_head"].cost() if "scdca_head" in self._fitted else {}
        if head:
            cost.update({k: head[k] for k in ("params_trainable", "params_total", "params_trainable_pct")})
        return cost

    def describe(self) -> str:
        """One line: the committee or the anchor, and the out-of-fold evidence that chose it."""
        e = self.evidence_
        if not e.get("n_units"):
            return "the drug-blind anchor (scaled_mean): too few training units for out-of-fold evidence"
        names = ("anchor", "stack", *self.experts)
        mse = ", ".join(f"{n} {e[f'oof_mse_{n}']:.4g}" for n in names)
        rank = ", ".join(f"{n} {e[f'oof_rank_{n}']:.3f}" for n in names)
        what = (
            f"the mean of {str(e['committee']).replace('+', ', ')}"
            if e["used"]
            else "the drug-blind anchor (scaled_mean): no committee of experts beats it out of fold"
        )
        return (
            f"{what} (p_worse = {e['p_worse']:.3g} over {e['n_units']} held-out units, {self.task}); "
            f"out-of-fold mse: {mse}; rank: {rank}"
        )

    # -- saving (`models.base.save_folder`): savable experts in subfolders; closed-form ones refit on
    # -- load from the training changes saved beside them (`train.npz`)
    def settings(self) -> dict[str, Any]:
        plain = (str, int, float, bool, type(None))
        options = {k: v for k, v in self._options.items() if k not in ("seed", "scdca_heads") and isinstance(v, plain)}
        return {"experts": list(self.experts), "task": self.task, "seed": self.seed, "backbone": None, "device": None,
                **options}  # fmt: skip

    def _saved(self, folder: Path) -> Saved:
        files = []
        for name, model in self._fitted.items():
            if type(model).savable:
                model.save(folder / name)
                files.append(f"{name}/model.json")
        if any(not type(m).savable for m in self._fitted.values()):
            _save_training(self._train_for_save, folder / "train.npz")
            files.append("train.npz")
        meta = {"weights": self.weights_, "evidence": self.evidence_, "anchor": self._anchor.to_json()}
        return Saved(meta, files=files)

    def _restored(self, saved: Saved, folder: Path, overrides: dict[str, Any]) -> None:
        meta = saved.meta
        self.weights_ = {k: float(v) for k, v in meta["weights"].items()}
        self.evidence_, self._parts = dict(meta["evidence"]), []
        self._anchor = ScaledMeanBaseline.from_fits(meta["anchor"])
        train = _load_training(folder / "train.npz") if (folder / "train.npz").is_file() else None
        self._fitted = {}
        for name, w in self.weights_.items():
            if w <= 0:
                continue
            proto = expert(name, self._options, self.seed)
            cls = type(proto)
            if cls.savable:
                self._fitted[name] = cls.load(folder / name, **overrides)
            elif train is None:
                raise ScdcaInputError(f"model: {str(folder)!r} lacks train.npz, which its {name!r} expert refits from")
            else:
                self._fitted[name] = proto.fit(train)

    @property
    def _train_for_save(self) -> PerturbationData:
        train = getattr(self, "_train", None)
        if train is None:
            raise ScdcaInputError("scdca_stack: save a model right after fit (its training changes are not kept)")
        return train


def _scores(pred: np.ndarray, observed: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(mse over all genes, mean distance rank within `groups`) of out-of-fold predictions."""
    return float(((pred - observed) ** 2).mean()), float(np.nanmean(distance_ranks(pred, observed, groups)))


def _save_training(data: PerturbationData, path: Path) -> None:
    """The training changes a closed-form expert refits from: conditions, means, controls."""
    cond = data.conditions
    arrays = {
        "ids": np.asarray(data.ids, dtype=str),
        "genes": np.asarray(data.genes, dtype=str),
        **{c: np.asarray(cond[c].astype(str), dtype=str) for c in ("cell_line", "drug", "smiles")},
        "dose": cond["dose"].to_numpy(float),
        "n_cells": cond["n_cells"].to_numpy(int),
        "mean": data.mean,
        "std": data.std if data.std is not None else np.full_like(data.mean, np.nan),
        "lines": np.asarray(data.controls.index, dtype=str),
        "line_cells": data.controls["n_cells"].to_numpy(int),
        "control_mean": data.control_mean,
        "control_std": data.control_std,
    }
    with storage.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _load_training(path: Path) -> PerturbationData:
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    cond = pd.DataFrame(
        {c: a[c] for c in ("cell_line", "drug", "smiles")} | {"dose": a["dose"], "n_cells": a["n_cells"]},
        index=pd.Index(a["ids"]),
    )
    controls = pd.DataFrame({"n_cells": a["line_cells"]}, index=pd.Index(a["lines"]))
    return PerturbationData(
        genes=a["genes"],
        conditions=cond,
        mean=a["mean"],
        std=a["std"],
        controls=controls,
        control_mean=a["control_mean"],
        control_std=a["control_std"],
    )
