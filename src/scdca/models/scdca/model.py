"""`ScDCAModel`: fit and predict the scDCA network behind the model interface."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from scdca.chem.featurizer import DrugFeaturizer
from scdca.data.screen import PerturbationData
from scdca.errors import ScdcaInputError
from scdca.models.base import PerturbationModel, Saved
from scdca.models.scdca.config import ScDCAConfig
from scdca.models.scdca.net import ScDCANet
from scdca.nn import distributed
from scdca.nn.adapters import count_parameters, group_molecules
from scdca.nn.backbone import reference as backbone_reference
from scdca.nn.backbone import resolve as resolve_backbone
from scdca.nn.backbone import weights_hash
from scdca.nn.train import EarlyStopping, ResumeFile, fit_epochs, optimizer_step, progress

log = logging.getLogger(__name__)


@dataclass
class _TrainingRows:
    """The training conditions as tensors: drug conditions (N, C), targets (N, T), each row's
    line index (N,) and the lines' controls (L, T), kept genes only."""

    cond: Tensor
    target: Tensor
    lines: Tensor
    controls: Tensor


class ScDCAModel(PerturbationModel):
    """scDCA behind the common interface: `fit(train)` then `predict(query)`.

    Args:
        backbone: checkpoint folder (scGPT format; `scdca pretrain` writes one).
        encoder: molecule encoder spec ('chemnet', 'morgan', 'hf:<folder>', 'table:<file>').
        device: 'cpu', 'cuda', ... (default: cuda if available).
        progress: show a progress bar while training.
        **config: fields of ScDCAConfig.
    """

    name = "scdca"
    savable = True
    options: ClassVar[tuple[str, ...]] = (
        "backbone", "encoder", "epochs", "max_steps", "lr", "device", "seed", "precision", "frozen_dtype",
        "recompute_frozen",
    )  # fmt: skip
    variant: str = "adapter"
    defaults: dict[str, Any] = {}

    def __init__(
        self,
        *,
        backbone: str | None = None,
        encoder: str = "chemnet",
        device: str | None = None,
        progress: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        **config,
    ):
        if backbone is None:
            raise ScdcaInputError(
                f"model {self.name!r} needs a backbone checkpoint folder: pass backbone=... "
                f"(CLI: --backbone DIR; `scdca pretrain` makes one)"
            )
        self.backbone_path, self.encoder_spec, self.progress = backbone, encoder, progress
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = ScDCAConfig(**{"variant": self.variant, **self.defaults, **config})
        self._cost: dict[str, Any] = {}

    # -- inputs ------------------------------------------------------------------------
    def _conditions(self, data: PerturbationData) -> np.ndarray:
        return self._drugs.conditions(data.conditions)  # (N, C)

    def _setup(self, train: PerturbationData) -> None:
        self._drugs = DrugFeaturizer(self.encoder_spec).fit(train.drug_smiles(), train.conditions["dose"])
        backbone = resolve_backbone(self.backbone_path, genes=train.genes, device=self.device)
        self._backbone_hash = weights_hash(backbone)
        mapping = backbone.vocab.map_genes(train.genes)
        if len(mapping.ids) == 0:
            raise ScdcaInputError(
                "none of the data's genes are in the backbone vocabulary; check gene symbols "
                "(--gene-symbols-key) or pretrain a backbone on these genes"
            )
        self._kept, self._genes = mapping.kept, np.asarray(train.genes)
        cond_dim = self._drugs.dim + 1
        torch.manual_seed(self.cfg.seed)
        self.net = ScDCANet(backbone, torch.from_numpy(mapping.ids), cond_dim, self.cfg).to(self.device)

    # -- training ----------------------------------------------------------------------
    def _fit(self, train: PerturbationData, *, _stop_after_epochs: int | None = None) -> None:
        """Train on `train`. With `checkpoint_dir`, every epoch is saved atomically and a rerun
        on the same data and settings resumes from the last finished epoch to the same result.
        `_stop_after_epochs` (tests only) stops abruptly after that many epochs of this run."""
        t_start = time.perf_counter()
        ctx = distributed.context(self.device)  # one of several torchrun processes, or alone
        self.device = ctx.device
        distributed.check_precision(self.cfg.precision)
        self._setup(train)
        cfg = self.cfg
        rows = _TrainingRows(
            cond=torch.from_numpy(self._conditions(train)),
            target=torch.from_numpy(train.observed[:, self._kept]),  # (N, T)
            lines=torch.from_numpy(train.controls.index.get_indexer(train.conditions["cell_line"])),
            controls=torch.from_numpy(train.control_mean[:, self._kept]),  # (L, T)
        )
        self._fit_offsets(train)
        cache = self._line_hidden(rows.controls, list(train.controls.index))
        is_val = validation_mask(train.conditions, cfg.val_fraction, cfg.seed)
        tr_idx, va_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)

        epoch, steps, best = self._train(train, rows, cache, tr_idx, va_idx, ctx, _stop_after_epochs)
        # without a validation set (val_fraction 0, as scdca_lowrank) `best` is a training loss
        loss = {"best_val_mse": best} if len(va_idx) else {"final_train_mse": best}
        self._cost.update(epochs_run=epoch + 1, steps=steps, train_seconds=time.perf_counter() - t_start, **loss)

    def _train(self, train, rows: _TrainingRows, cache, tr_idx, va_idx, ctx, stop_after) -> tuple[int, int, float]:
        """The training loop (resumable, early-stopped); returns (last epoch, steps, best value)."""
        cfg, _stop_after_epochs = self.cfg, stop_after
        opt = self._optimizer()
        self._report_parameters(ctx)
        # without a validation set there is nothing to stop early on: the budget is fixed
        stopper = EarlyStopping(patience=cfg.patience if len(va_idx) else None, min_delta=1e-6)
        resume = self._resume_file(train)
        counter = {"step": 0}
        start = 0
        state = resume.load()
        if state is not None:
            self.net.load_state_dict(state["trainable"], strict=False)
            opt.load_state_dict(state["opt"])
            stopper.restore(state["stopper"])
            counter["step"], start = state["step"], state["epoch"]
        if start == 0 and cfg.warms_up_head:
            self._warm_up_head(rows.controls, cache[2], rows.lines[tr_idx], rows.cond[tr_idx], rows.target[tr_idx])
        spent = cfg.max_steps is not None and counter["step"] >= cfg.max_steps
        stopped = start >= cfg.epochs or stopper.stop or spent
        bar = progress(
            range(start, cfg.epochs if not stopped else start),
            enabled=self.progress and ctx.is_main,
            desc=self.name,
            unit="epoch",
        )
        runner = distributed.wrap(self.net, ctx)  # DDP with several processes: gradients averaged over ranks
        self.loss_history_: list[float] = []  # training loss of every optimiser step (the whole global batch)

        # a full batch sums the same rows in any order: one order, its inputs kept (`_train_epoch`)
        full = cfg.batch_size <= 0 or cfg.batch_size >= len(tr_idx)
        fixed: dict[str, Any] = {}

        def run_epoch(epoch: int) -> tuple[float, bool]:
            if _stop_after_epochs is not None and epoch - start >= _stop_after_epochs:
                raise KeyboardInterrupt(f"stopped before epoch {epoch}")
            order = tr_idx if full else np.random.default_rng([cfg.seed, 1, epoch]).permutation(tr_idx)
            return self._train_epoch(order, rows, cache, opt, runner, ctx, counter, fixed if full else None)

        def validate(train_loss: float) -> float:
            if not len(va_idx):
                return train_loss
            return float(self._loss(rows.controls, cache, rows.lines, rows.cond, rows.target, va_idx))

        def checkpoint(epoch: int) -> None:
            if ctx.is_main and resume.path is not None:
                resume.save(trainable=self._trainable_state(), opt=opt.state_dict(), stopper=stopper.state(),
                            step=counter["step"], epoch=epoch + 1)  # fmt: skip

        epoch = fit_epochs(
            bar,
            run_epoch=run_epoch,
            validate=validate,
            stopper=stopper,
            snapshot=lambda: {k: v.detach().clone() for k, v in self._trainable_state().items()},
            after_epoch=checkpoint,
            last=start - 1,
        )
        if stopper.best_state is not None:
            self.net.load_state_dict(stopper.best_state, strict=False)
        return epoch, counter["step"], stopper.best

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (the drug x gene head's stay out when it is frozen)."""
        cfg = self.cfg
        head = {id(p) for p in self.net.gene_head.parameters()} if cfg.freeze_head and cfg.gene_head else set()
        params = [p for p in self.net.parameters() if p.requires_grad and id(p) not in head]
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _resume_file(self, train: PerturbationData) -> ResumeFile:
        """The resume file of this run in `checkpoint_dir` (none without one)."""
        return ResumeFile(
            self.checkpoint_dir / "train_state.pt" if self.checkpoint_dir else None,
            {"config": asdict(self.cfg), "ids": list(train.ids), "backbone": self._backbone_hash, "model": self.name},
            what="checkpoint_dir",
            mismatch="holds a run with other data or settings; use another folder or delete it",
        )

    def _report_parameters(self, ctx) -> None:
        """Count trainable parameters into the cost table and say how many train."""
        self._cost = {f"params_{k}": v for k, v in count_parameters(self.net).items()}
        summary = (
            f"{self.name}: {self._cost['params_trainable']:,} trainable of {self._cost['params_total']:,} "
            f"parameters ({self._cost['params_trainable_pct']:.3f}%)"
        )
        if self.progress and ctx.is_main:
            tqdm.write(summary)
        log.info(summary)

    def _train_epoch(
        self, order, rows: _TrainingRows, cache, opt, runner, ctx, counter, fixed: dict | None = None
    ) -> tuple[float, bool]:
        """One pass over the training rows in `order`; returns (last step's loss, step budget spent).

        Each optimiser step takes a global batch; under DDP every rank computes its share and
        the loss is scaled so the averaged gradient equals one process's. `fixed` (full-batch
        training: the same rows every step) keeps the batch's inputs from one step to the next."""
        cfg = self.cfg
        batch = cfg.batch_size if cfg.batch_size > 0 else len(order)
        n_genes = rows.target.shape[1]
        if not self.net.training:  # (validation leaves it in eval mode); walking every module costs a millisecond
            self.net.train()
        sq_errs, sizes = [], []  # per step; summed over ranks and read once per epoch (no per-step sync)
        spent = False
        for s in range(0, len(order), batch):
            b = order[s : s + batch]
            mine = distributed.shard(b, ctx)  # this rank's rows of the global batch (all of it alone)
            weight = 1.0 if len(mine) else 0.0  # a rank with no rows still joins the gradient exchange
            mine = mine if len(mine) else b[:1]
            batch_in = fixed if fixed else self._batch_inputs(rows, cache, mine)
            if fixed is not None and not fixed:
                fixed.update(batch_in)
            with distributed.autocast(self.device, cfg.precision):
                pred = self._forward(rows.controls, cache, batch_in["lines"], batch_in["cond"], net=runner,
                                     offset=batch_in["offset"], molecules=batch_in["molecules"])  # fmt: skip
            sq_err = weight * ((pred.float() - batch_in["target"]) ** 2).sum()
            optimizer_step(distributed.global_mean_loss(sq_err, len(b) * n_genes, ctx), opt)
            counter["step"] += 1
            sq_errs.append(sq_err.detach())
            sizes.append(len(b) * n_genes)
            spent = cfg.max_steps is not None and counter["step"] >= cfg.max_steps
            if spent:
                break
        self.loss_history_ += list(distributed.all_sum(torch.stack(sq_errs), ctx) / np.array(sizes))
        return float(self.loss_history_[-1]), spent  # a plain float: numpy scalars cannot be resumed from

    def _warm_up_head(
        self, controls: Tensor, offsets: Tensor | None, lines: Tensor, cond: Tensor, target: Tensor, lr: float = 3e-3
    ) -> None:
        """Fit the drug x gene head alone, full batch, on the frozen backbone's per-line hidden
        states. The adapters are still the identity, so the model's output is then exactly
        control + head(h_L): the adapters start from a model that already separates drugs."""
        head = self.net.gene_head
        hidden = self.net.frozen_hidden(controls.to(self.device))  # (L, T, D)
        change = (target - controls[lines]).to(self.device)
        if offsets is not None:
            change = change - self._offset(offsets, lines.to(self.device), cond.to(self.device))
        cond, lines = cond.to(self.device), lines.to(self.device)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
        for _ in range(self.cfg.head_warmup_epochs):
            optimizer_step(((head(hidden, cond, lines) - change) ** 2).mean(), opt)

    def _fit_offsets(self, train: PerturbationData) -> None:
        """Each training line's mean change (kept genes), the mean over all training changes and
        the dose profile: the mean change at each training dose level minus that overall mean."""
        delta = train.delta()[:, self._kept]
        lines = train.conditions["cell_line"].to_numpy()
        self._offsets = {str(c): delta[lines == c].mean(0).astype(np.float32) for c in np.unique(lines)}
        self._global_offset = delta.mean(0).astype(np.float32)
        t = self._drugs.dose(train.conditions["dose"].to_numpy(float))
        grid, level = dose_levels(t)
        self._dose_grid = grid.astype(np.float32)  # (D,)
        self._dose_profile = np.stack([delta[level == i].mean(0) for i in range(len(grid))]).astype(np.float32)
        self._dose_profile -= self._global_offset  # (D, T)

    def _offset_rows(self, line_names: list[str]) -> Tensor | None:
        """(L, T) offsets for these lines (the global mean change for a line not seen in training)."""
        if not self.cfg.line_offset:
            return None
        rows = [self._offsets.get(str(c), self._global_offset) for c in line_names]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def _line_hidden(self, controls: Tensor, line_names: list[str]) -> tuple[Tensor | None, ...]:
        """Per-line caches (frozen, so computed once): hidden states or reference outputs, offsets."""
        c = controls.to(self.device)
        offsets = self._offset_rows(line_names)
        if self.cfg.reads_frozen_states:
            return self.net.frozen_hidden(c), None, offsets  # (L, T, D)
        return None, self.net.reference_output(c), offsets  # (L, T)

    def _batch_inputs(self, rows: _TrainingRows, cache, mine) -> dict[str, Any]:
        """A batch's inputs on the device: lines, cond, target, and what depends on them alone:
        the drug-agnostic offset (B, T) and, for `lowrank`, the rows grouped by molecule."""
        lines, cond = rows.lines[mine].to(self.device), rows.cond[mine].to(self.device)
        offsets = cache[2]
        return {
            "lines": lines,
            "cond": cond,
            "target": rows.target[mine].to(self.device),
            "offset": None if offsets is None else self._offset(offsets, lines, cond),
            "molecules": group_molecules(cond) if self.cfg.variant == "lowrank" else None,
        }

    def _forward(
        self, controls, cache, lines, cond, net: nn.Module | None = None, *, offset=None, molecules=None
    ) -> Tensor:
        """Predictions for rows (lines, cond); `net` is the module to call (training passes its DDP
        wrapper); `offset` and `molecules` (`_batch_inputs`) are computed when not given."""
        hidden, ref, offsets = cache
        net = net or self.net
        if self.cfg.variant == "lowrank":  # per-line hidden states, indexed inside the head
            out = net(
                controls[lines].to(self.device),
                cond.to(self.device),
                hidden,
                lines=lines.to(self.device),
                molecules=molecules,
            )
        else:
            out = net(
                controls[lines].to(self.device),
                cond.to(self.device),
                hidden[lines] if hidden is not None else None,
                ref[lines] if ref is not None else None,
            )
        if offsets is None:
            return out
        if offset is None:
            offset = self._offset(offsets, lines.to(self.device), cond.to(self.device))
        return out + offset

    def _offset(self, offsets: Tensor, lines: Tensor, cond: Tensor) -> Tensor:
        """(B, T) drug-agnostic part of each row's change: its line's mean change, plus the
        dose profile at the row's scaled dose (cond's last column) with `dose_profile`."""
        out = offsets[lines]
        if self.cfg.dose_profile:
            grid = torch.from_numpy(self._dose_grid).to(cond.device)
            profile = torch.from_numpy(self._dose_profile).to(cond.device)
            out = out + interpolation_weights(cond[:, -1], grid) @ profile  # (B, D) @ (D, T)
        return out

    def _loss(self, controls, cache, line_idx, cond, target, idx) -> float:
        self.net.eval()
        total = 0.0
        with torch.no_grad():
            for s in range(0, len(idx), 64):
                b = idx[s : s + 64]
                pred = self._forward(controls, cache, line_idx[b], cond[b])
                total += float(((pred - target[b].to(self.device)) ** 2).sum())
        return total / (len(idx) * target.shape[1])

    def _trainable_state(self) -> dict[str, Tensor]:
        """The trainable parameters by state-dict name (detached, not copied)."""
        return {n: p.detach() for n, p in self.net.named_parameters() if p.requires_grad}

    # -- prediction --------------------------------------------------------------------
    def _predict(self, query: PerturbationData) -> np.ndarray:
        if not hasattr(self, "net"):
            raise RuntimeError("call fit() (or ScDCAModel.load) before predict()")
        if list(query.genes) != list(self._genes):
            raise ScdcaInputError("query genes differ from the genes the model was trained on")
        cond = torch.from_numpy(self._conditions(query))
        lines = query.controls.index.get_indexer(query.conditions["cell_line"])  # (N,) row of each line
        line_controls = torch.from_numpy(query.control_mean[:, self._kept])  # (L, T)
        out = query.control_mean[lines].copy()  # (N, G): genes the model does not cover stay at control
        self.net.eval()
        with torch.no_grad():
            # per-line caches, computed once however many drugs are asked for (screening);
            # finetune changed its backbone, so its 'no change' reference comes from the checkpoint
            if self.cfg.trains_backbone:
                pretrained = resolve_backbone(self.backbone_path, genes=self._genes, device=self.device)
                cache: tuple[Tensor | None, ...] = (
                    None,
                    self.net.reference_output(line_controls.to(self.device), pretrained),
                    self._offset_rows(list(query.controls.index)),
                )
                del pretrained
            else:
                cache = self._line_hidden(line_controls, list(query.controls.index))
            preds = [
                self._forward(line_controls, cache, torch.from_numpy(lines[s : s + 64]), cond[s : s + 64])
                .float()
                .cpu()
                .numpy()
                for s in range(0, len(cond), 64)
            ]
        out[:, self._kept] = np.concatenate(preds) if preds else np.zeros((0, int(self._kept.sum())))
        return out

    def cost(self) -> dict[str, Any]:
        return dict(self._cost)

    # -- save / load (`models.base.save_folder`): only what was trained, with the backbone's hash --
    def settings(self) -> dict[str, Any]:
        config = {k: v for k, v in asdict(self.cfg).items() if k != "variant"}
        return {
            "backbone": backbone_reference(self.backbone_path),
            "encoder": self.encoder_spec,
            "device": None,
            **config,
        }

    def _saved(self, folder: Path) -> Saved:
        arrays = {f"net.{k}": v.detach().cpu().float().numpy() for k, v in self._trainable_state().items()}
        arrays.update(
            kept=self._kept,
            global_offset=self._global_offset,
            offsets=np.stack(list(self._offsets.values())),
            dose_grid=self._dose_grid,
            dose_profile=self._dose_profile,
        )
        meta = {"backbone_sha256": self._backbone_hash, "offset_lines": list(self._offsets), "cost": self._cost}
        return Saved(meta, arrays, featurizer=self._drugs, encoder=self.encoder_spec)

    def _restored(self, saved: Saved, folder: Path, overrides: dict[str, Any]) -> None:
        """Refuses a backbone whose weights differ from the one the model was trained on."""
        a, meta = saved.arrays, saved.meta
        bb = resolve_backbone(self.backbone_path, genes=self.genes, device=self.device)
        if weights_hash(bb) != meta["backbone_sha256"]:
            raise ScdcaInputError(
                f"backbone {self.backbone_path!r} differs from the one this model was trained on "
                f"(weights hash mismatch); pass the original backbone folder"
            )
        self._backbone_hash, self._kept, self._drugs = (
            meta["backbone_sha256"],
            a["kept"].astype(bool),
            saved.restored_featurizer,
        )
        mapping = bb.vocab.map_genes(self.genes)
        self.net = ScDCANet(bb, torch.from_numpy(mapping.ids), self._drugs.dim + 1, self.cfg).to(self.device)
        state = {k[4:]: torch.from_numpy(v) for k, v in a.items() if k.startswith("net.")}
        missing = self.net.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise ScdcaInputError(f"saved weights do not fit this model: {missing.unexpected_keys[:5]}")
        self._cost = meta["cost"]
        self._offsets = dict(zip(meta["offset_lines"], a["offsets"]))
        self._global_offset, self._dose_grid, self._dose_profile = a["global_offset"], a["dose_grid"], a["dose_profile"]


def dose_levels(t: np.ndarray, max_levels: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Dose levels for the dose profile: the distinct scaled doses, or, with more than
    `max_levels` of them (dose series that differ per drug), that many quantile bins.
    t (N,) -> (centres (D,) ascending, level of each row (N,))."""
    distinct, level = np.unique(np.round(t, 6), return_inverse=True)
    if len(distinct) > max_levels:
        edges = np.quantile(t, np.linspace(0, 1, max_levels + 1)[1:-1])
        _, level = np.unique(np.searchsorted(edges, t, side="right"), return_inverse=True)
    centres = np.array([t[level == i].mean() for i in range(level.max() + 1)])
    return centres, level


def interpolation_weights(t: Tensor, grid: Tensor) -> Tensor:
    """(B,) values, (D,) ascending grid -> (B, D) weights of linear interpolation between the
    two neighbouring grid points (each row sums to 1; flat beyond the ends)."""
    out = t.new_zeros(len(t), len(grid))
    if len(grid) == 1:
        return out + 1.0
    t = t.clamp(grid[0], grid[-1])
    hi = torch.searchsorted(grid, t, right=True).clamp(1, len(grid) - 1)  # (B,)
    w = (t - grid[hi - 1]) / (grid[hi] - grid[hi - 1])
    out.scatter_(1, (hi - 1)[:, None], (1 - w)[:, None])
    out.scatter_add_(1, hi[:, None], w[:, None])
    return out


def validation_mask(conditions, fraction: float, seed: int) -> np.ndarray:
    """Training conditions held out for early stopping: every condition of a random `fraction`
    of the training drugs (none with fewer than 5 drugs, or fraction 0)."""
    drugs = np.array(sorted(conditions["drug"].astype(str).unique()))
    n_val = int(round(fraction * len(drugs))) if len(drugs) >= 5 else 0
    held = set(np.random.default_rng([seed, 0]).choice(drugs, size=n_val, replace=False)) if n_val else set()
    return conditions["drug"].astype(str).isin(held).to_numpy()
