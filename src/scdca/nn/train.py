"""The training loop every trained model shares: optimiser steps, early stopping, resume, progress.

Used by the scDCA family, C3TL, cell-type annotation and backbone pretraining. The loop
itself is `fit_epochs`; the parts are usable alone (pretraining counts steps, not epochs):

- `optimizer_step`: zero the gradients, backpropagate, clip, step the optimiser and schedule.
- `EarlyStopping`: the best validation value, its weights and the epochs since (patience).
- `ResumeFile`: an atomic resume file bound to a run identity, with torch's RNG state, so a
  killed run continues to exactly the result of an uninterrupted one.
- `progress`: a tqdm bar that stays silent when asked to (or on all but the main DDP rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from scdca import storage
from scdca.errors import ScdcaInputError


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    *,
    clip: float | None = None,
    params: Iterable[torch.nn.Parameter] | None = None,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """One optimiser step on `loss`: gradients cleared first, clipped to norm `clip` over `params`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        if params is None:
            raise ValueError("optimizer_step: clip needs the params to clip over")
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if schedule is not None:
        schedule.step()


@dataclass
class EarlyStopping:
    """Keeps the best value seen (lower is better) and a snapshot of the weights at it.

    `patience` None never stops (a fixed budget; the best snapshot is still kept). An epoch
    improves when its value is below the best by more than `min_delta`.
    """

    patience: int | None = None
    min_delta: float = 0.0
    best: float = math.inf
    best_state: dict | None = None
    best_epoch: int = 0  # 1-based epoch of the best value; 0 before any
    bad_epochs: int = 0

    def update(self, value: float, epoch: int, snapshot: Callable[[], dict]) -> bool:
        """Record epoch `epoch` (0-based) with `value`; True when it is the new best."""
        if value < self.best - self.min_delta:
            self.best, self.best_state, self.best_epoch, self.bad_epochs = value, snapshot(), epoch + 1, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        """Its fields for a resume file (the best snapshot by reference, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def restore(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class ResumeFile:
    """An atomic resume file (`storage.save_state`) that belongs to one run identity.

    `run_id` is any plain value (settings, data ids, a weights hash); a file written by another
    run is refused with an error telling the user to pick another folder. Saving also stores
    torch's global RNG state and loading restores it, so dropout continues as if never stopped.
    """

    def __init__(self, path: str | Path | None, run_id: Any, *, what: str, mismatch: str):
        self.path = Path(path) if path is not None else None
        self.run_id, self.what, self.mismatch = run_id, what, mismatch

    def load(self) -> dict | None:
        """The saved state (RNG restored), or None when there is no file to resume from."""
        if self.path is None or not self.path.exists():
            return None
        state = storage.load_state(self.path, what=self.what)
        if state.get("run_id") != self.run_id:
            raise ScdcaInputError(f"{self.what}: {str(self.path.parent)!r} {self.mismatch}")
        torch.set_rng_state(state["torch_rng"])
        return state

    def save(self, **state: Any) -> None:
        if self.path is not None:
            storage.save_state(self.path, {**state, "run_id": self.run_id, "torch_rng": torch.get_rng_state()})


def progress(iterable=None, *, enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar, silent unless `enabled`."""
    return tqdm(iterable, disable=not enabled, **kwargs)


def fit_epochs(
    bar: Iterable[int],
    *,
    run_epoch: Callable[[int], tuple[float, bool]],
    validate: Callable[[float], float | None],
    stopper: EarlyStopping,
    snapshot: Callable[[], dict],
    after_epoch: Callable[[int], None] | None = None,
    last: int = -1,
) -> int:
    """Train epoch by epoch over `bar` (epoch numbers); returns the last epoch run (`last` if none).

    Per epoch: `run_epoch(epoch)` trains and returns (training loss, budget spent);
    `validate(train_loss)` returns the value to stop on (None: no validation, nothing
    recorded); `stopper` keeps the best `snapshot()`; `after_epoch(epoch)` checkpoints. The
    loop ends early when the stopper's patience runs out or the step budget is spent.
    """
    epoch = last
    for epoch in bar:
        train_loss, spent = run_epoch(epoch)
        value = validate(train_loss)
        if value is not None:
            stopper.update(value, epoch, snapshot)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{value:.4f}")
        if after_epoch is not None:
            after_epoch(epoch)
        if stopper.stop or spent:
            break
    return epoch
