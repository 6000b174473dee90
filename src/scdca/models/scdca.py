"""scDCA and the paper's comparison models, behind the common model interface.

Variants (all predict the perturbed pseudobulk of every in-vocabulary gene from the
line's control pseudobulk and the drug condition; MSE loss):

- `scdca`        frozen backbone + a drug-conditional adapter after every layer + MLP head
- `scdca_nores`  as scdca with a plain nonlinearity instead of the residual block (ablation)
- `finetune`     eq. 4: a projection of the drug added to every input token; all weights train
- `concat`       frozen backbone; drug concatenated to each gene's final hidden state -> head
- `feature`      frozen backbone's mean cell embedding + drug -> a separately trained MLP

Our extensions (not in the paper; why, and the ablation, in NOTES.md):
- `scdca_lowrank` frozen backbone, no adapters: the line's mean training change, shifted by
                 the mean change at the row's dose (the dose profile), plus a low-rank drug x gene
                 head (`adapters.DrugGeneHead`) on the cached final gene states; full-batch
                 steps, a fixed budget, no early stopping
- `scdca_plus`   FiLM adapters + the same head and line offset (no dose profile); the head is
                 first fitted alone on the frozen states, then everything trains within the
                 usual budget
- `scdca_plus_frozen` as scdca_plus, but the head keeps its warm-up fit (600 steps) and only
                 the adapters train afterwards, on a fixed budget with no best-validation restore

Output: every variant predicts control + (output - reference), where the reference is what
the untrained model outputs for that control (the pretrained backbone's decoder on its own
encoding, cached per cell line). With zero-initialised adapters the prediction at step 0 is
exactly the control ('no change'), and training learns the drug's effect; the loss is still
the paper's MSE on perturbed expression. Predicting the decoder's raw output instead starts
from the masked-pretraining decoder's imperfect reconstruction of unmasked values, which on
the demo scored below the `control` baseline after 200 steps (mse 0.083 vs 0.061).

The drug condition is the molecule embedding (standardised over training drugs) with the
dose appended as t = scaled log10(dose) in [0, 1]; the molecule projection f_l sees both,
so dose can modulate every adapter. Genes missing from the backbone vocabulary are not
modelled: their prediction is the control value (no change), and fit logs how many.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import _io, distributed
from ..adapters import (AdapterConfig, DrugConditionalAdapter, DrugGeneConfig, DrugGeneHead, count_parameters,
                        freeze)
from ..backbone import Backbone, reference as backbone_reference, resolve as resolve_backbone, weights_hash
from ..data import PerturbationData
from ..encoders import get_encoder, standardisation, standardise
from ..errors import ScdcaInputError
from ..molecules import canonical_smiles
from .base import MODELS, PerturbationModel, dose_range, read_model_json, scaled_dose, write_model_json
from .shrinkage import ScaledMeanBaseline

log = logging.getLogger(__name__)

Variant = Literal["adapter", "finetune", "concat", "feature", "lowrank"]


@dataclass
class ScDCAConfig:
    """Architecture and training settings. Training defaults are the paper's (Adam, lr 1e-4,
    batch 16, 20 epochs) plus early stopping on a 10% validation split of training drugs."""

    variant: str = "adapter"
    bottleneck: int = 16
    proj_hidden: int = 16  # f_l hidden width; 16 keeps whole-human scDCA under 1% trainable
    residual: bool = True
    skip: bool = True
    modulation: str = "bias"  # "film": the drug also scales the bottleneck channels (our extension)
    train_head: bool = False  # the paper trains only f_l, W_down, W_up and res_net; the head is the
    #                           backbone's pretrained expression decoder, frozen
    gene_head: bool = False  # add the low-rank drug x gene output (DrugGeneHead) on the final hidden states
    gene_head_rank: int = 32
    gene_head_hidden: int = 128
    gene_head_dropout: float = 0.0  # dropout inside the head's molecule projection q
    gene_head_free_genes: bool = True  # the head's free per-gene loadings E (False: ablation, hidden states only)
    epochs: int = 20
    batch_size: int = 16  # 0: the whole training set in every step (cheap for cached variants)
    lr: float = 1e-4
    weight_decay: float = 0.0  # decoupled (AdamW); 0 is the paper's Adam
    val_fraction: float = 0.1
    line_offset: bool = False  # add each line's mean training change (global mean for unseen lines) to the
    #                            output, so the trainable parts model what differs between drugs
    dose_profile: bool = False  # with line_offset: also add the mean training change at the row's dose, relative
    #                             to the mean over all doses (shared by all lines; our extension, NOTES.md session 8)
    head_warmup_epochs: int = 0  # gene_head with adapters: first fit the head alone on the frozen, cached
    freeze_head: bool = False  # gene_head with adapters: the head keeps its warm-up fit; only adapters train after
    #                              hidden states (full batch, this many steps), then train everything
    patience: int = 5
    max_steps: int | None = None  # stop after this many optimiser steps in total (CPU budgets)
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU; "bf16" forces it, "fp32" turns it off
    seed: int = 0


class ScDCANet(nn.Module):
    """The torch module: backbone (shared, frozen unless finetune) + the variant's trainable parts."""

    def __init__(self, backbone: Backbone, gene_ids: Tensor, cond_dim: int, cfg: ScDCAConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.register_buffer("gene_ids", gene_ids.long(), persistent=False)  # (T,)
        D = backbone.cfg.d_model
        if cfg.variant != "finetune":
            freeze(backbone)
        if cfg.variant not in ("adapter", "finetune", "concat", "feature", "lowrank"):
            raise ScdcaInputError(f"variant: {cfg.variant!r} is not one of adapter, finetune, concat, feature, lowrank")
        if cfg.variant == "adapter":
            acfg = AdapterConfig(D, cond_dim, cfg.bottleneck, cfg.proj_hidden, cfg.residual, cfg.skip, cfg.modulation)
            self.adapters = nn.ModuleList(DrugConditionalAdapter(acfg) for _ in range(backbone.cfg.nlayers))
            # the pretrained expression decoder; a trainable copy only if asked
            self.head = copy.deepcopy(backbone.decoder).requires_grad_(True) if cfg.train_head else backbone.decoder
        elif cfg.variant == "finetune":
            self.mol_in = nn.Linear(cond_dim, D)
            nn.init.zeros_(self.mol_in.weight)
            nn.init.zeros_(self.mol_in.bias)
        elif cfg.variant == "concat":
            self.head = nn.Sequential(nn.Linear(D + cond_dim, D), nn.LeakyReLU(), nn.Linear(D, D), nn.LeakyReLU(),
                                      nn.Linear(D, 1))
        elif cfg.variant == "feature":
            n = len(gene_ids)
            self.head = nn.Sequential(nn.Linear(D + cond_dim, 256), nn.ReLU(), nn.Linear(256, n))
        if cfg.variant == "lowrank" or cfg.gene_head:  # low-rank drug x gene output on the final hidden states
            self.gene_head = DrugGeneHead(DrugGeneConfig(D, cond_dim, len(gene_ids), cfg.gene_head_rank,
                                                         cfg.gene_head_hidden, cfg.gene_head_dropout,
                                                         cfg.gene_head_free_genes))
        if cfg.variant in ("concat", "feature"):  # start at 'no change', like the adapters
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def train(self, mode: bool = True) -> "ScDCANet":
        """Frozen backbone layers stay in eval mode (no dropout) while the trainable parts train.

        With dropout on, the frozen layers added noise larger than most drug effects to every
        training output, and a systematic shift that the 'no change' reference (computed in
        eval mode) does not contain: scDCA then fitted its training conditions worse than
        predicting no change. `finetune` trains the backbone itself, so it keeps dropout.
        """
        super().train(mode)
        if self.cfg.variant != "finetune":
            self.backbone.eval()
        return self

    def reference_output(self, values: Tensor, pretrained: Backbone | None = None) -> Tensor:
        """What the untrained model predicts for control inputs (B, T) -> (B, T): the pretrained
        backbone's decoder on its own encoding. `forward` predicts control + (output - reference),
        so every variant starts at 'no change' and learns the drug's effect.

        For `finetune` the backbone itself changes during training, so the caller computes this
        before training (cached per line) or passes the `pretrained` backbone reloaded from disk.
        """
        ids = self.gene_ids.expand(values.shape[0], -1)
        ref = pretrained if pretrained is not None else self.backbone
        with torch.no_grad():
            return ref.decoder(ref.encode(ids, values))

    def frozen_hidden(self, values: Tensor) -> Tensor:
        """h_L of the frozen backbone for control inputs (B, T) -> (B, T, D); cacheable per line."""
        ids = self.gene_ids.expand(values.shape[0], -1)
        with torch.no_grad():
            return self.backbone.encode(ids, values)

    def forward(self, values: Tensor, cond: Tensor, hidden: Tensor | None = None,
                reference: Tensor | None = None, *, lines: Tensor | None = None) -> Tensor:
        """values (B, T) control expression, cond (B, C) -> predicted expression (B, T).

        `hidden` (frozen h_L) and `reference` (reference_output) depend only on the cell line,
        so callers may pass them cached; they are computed when omitted. `lowrank` also takes
        `hidden` per line (L, T, D) with `lines` (B,), so the head reads each line once.
        """
        v = self.cfg.variant
        if v == "lowrank":
            if hidden is None:
                hidden, lines = self.frozen_hidden(values), None  # (B, T, D)
            return values + self.gene_head(hidden, cond, lines)
        if v in ("concat", "feature"):
            h = hidden if hidden is not None else self.frozen_hidden(values)  # (B, T, D)
            if v == "concat":
                c = cond[:, None, :].expand(-1, h.shape[1], -1)
                return values + self.head(torch.cat([h, c], -1)).squeeze(-1)
            return values + self.head(torch.cat([h.mean(1), cond], -1))
        ids = self.gene_ids.expand(values.shape[0], -1)
        h = self.backbone.embed(ids, values)  # (B, T, D)
        if v == "finetune":
            out = self.backbone.decoder(self.backbone.transformer_encoder(h + self.mol_in(cond)[:, None, :]))
        else:
            for layer, adapter in zip(self.backbone.transformer_encoder.layers, self.adapters):
                h = adapter(layer(h), cond)
            out = self.head(h)  # (B, T)
            if self.cfg.gene_head:
                out = out + self.gene_head(h, cond)
        if reference is None:
            if v == "finetune":
                raise ValueError("finetune needs `reference` (the pretrained model's output), computed before training")
            reference = self.reference_output(values)
        return values + out - reference


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
    options = ("backbone", "encoder", "epochs", "max_steps", "lr", "device", "seed")
    variant: str = "adapter"
    defaults: dict[str, Any] = {}

    def __init__(self, *, backbone: str | None = None, encoder: str = "chemnet", device: str | None = None,
                 progress: bool = False, checkpoint_dir: str | os.PathLike | None = None, **config):
        if backbone is None:
            raise ScdcaInputError(f"model {self.name!r} needs a backbone checkpoint folder: pass backbone=... "
                                  f"(CLI: --backbone DIR; `scdca pretrain` makes one)")
        self.backbone_path, self.encoder_spec, self.progress = backbone, encoder, progress
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = ScDCAConfig(**{"variant": self.variant, **self.defaults, **config})
        if self.cfg.dose_profile and not self.cfg.line_offset:
            raise ScdcaInputError("dose_profile=True shifts the line offset by dose and needs line_offset=True; "
                                  "set both, or dose_profile=False")
        self._cost: dict[str, Any] = {}
        self.training_molecules: dict[str, str] | None = None  # drug -> SMILES, set by fit

    # -- inputs ------------------------------------------------------------------------
    def _conditions(self, data: PerturbationData) -> np.ndarray:
        cond = data.conditions
        smiles = list(cond["smiles"])
        emb = self._encoder.encode(smiles, names=list(cond["drug"]))
        emb = standardise(emb, self._emb_mean, self._emb_std)
        t = scaled_dose(cond["dose"].to_numpy(float), self._dose_lo, self._dose_span)
        return np.hstack([emb, t[:, None]]).astype(np.float32)  # (N, C)

    def _setup(self, train: PerturbationData) -> None:
        self._encoder = get_encoder(self.encoder_spec)
        drugs = train.drug_smiles()
        emb = self._encoder.encode(list(drugs.values()), names=list(drugs))
        self._emb_mean, self._emb_std = standardisation(emb)
        self._dose_lo, self._dose_span = dose_range(train.conditions["dose"].to_numpy(float))
        backbone = resolve_backbone(self.backbone_path, genes=train.genes, device=self.device)
        self._backbone_hash = weights_hash(backbone)
        mapping = backbone.vocab.map_genes(train.genes)
        if len(mapping.ids) == 0:
            raise ScdcaInputError("none of the data's genes are in the backbone vocabulary; check gene symbols "
                                  "(--gene-symbols-key) or pretrain a backbone on these genes")
        self._kept, self._genes = mapping.kept, np.asarray(train.genes)
        cond_dim = emb.shape[1] + 1
        torch.manual_seed(self.cfg.seed)
        self.net = ScDCANet(backbone, torch.from_numpy(mapping.ids), cond_dim, self.cfg).to(self.device)

    # -- training ----------------------------------------------------------------------
    def fit(self, train: PerturbationData, *, _stop_after_epochs: int | None = None) -> "ScDCAModel":
        """Train on `train`. With `checkpoint_dir`, every epoch is saved atomically and a rerun
        on the same data and settings resumes from the last finished epoch to the same result.
        `_stop_after_epochs` (tests only) stops abruptly after that many epochs of this run."""
        t_start = time.perf_counter()
        ctx = distributed.context(self.device)  # one of several torchrun processes, or alone
        self.device = ctx.device
        distributed.check_precision(self.cfg.precision)
        self._setup(train)
        self.training_molecules = {str(d): str(smi) for d, smi in train.drug_smiles().items()}
        cfg = self.cfg
        cond = torch.from_numpy(self._conditions(train))
        target = torch.from_numpy(train.mean[:, self._kept])  # (N, T)
        line_idx = torch.from_numpy(train.controls.index.get_indexer(train.conditions["cell_line"]))
        controls = torch.from_numpy(train.control_mean[:, self._kept])  # (L, T)
        self._fit_offsets(train)
        cache = self._line_hidden(controls, list(train.controls.index))

        is_val = validation_mask(train.conditions, cfg.val_fraction, cfg.seed)
        tr_idx, va_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        batch = cfg.batch_size if cfg.batch_size > 0 else len(tr_idx)

        head = {id(p) for p in self.net.gene_head.parameters()} if cfg.freeze_head and cfg.gene_head else set()
        params = [p for p in self.net.parameters() if p.requires_grad and id(p) not in head]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._cost = {**{f"params_{k}": v for k, v in count_parameters(self.net).items()}}
        summary = (f"{self.name}: {self._cost['params_trainable']:,} trainable of {self._cost['params_total']:,} "
                   f"parameters ({self._cost['params_trainable_pct']:.3f}%)")
        if self.progress and ctx.is_main:
            tqdm.write(summary)
        log.info(summary)
        best, best_state, bad_epochs, step, start = float("inf"), None, 0, 0, 0
        ckpt = self.checkpoint_dir / "train_state.pt" if self.checkpoint_dir else None
        run_id = {"config": asdict(cfg), "ids": list(train.ids), "backbone": self._backbone_hash, "model": self.name}
        if ckpt is not None and ckpt.exists():
            state = _io.load_state(ckpt, what="checkpoint_dir")
            if state["run_id"] != run_id:
                raise ScdcaInputError(f"checkpoint_dir: {str(self.checkpoint_dir)!r} holds a run with other data or "
                                      f"settings; use another folder or delete it")
            self.net.load_state_dict(state["trainable"], strict=False)
            opt.load_state_dict(state["opt"])
            best, best_state, bad_epochs, step, start = (state[k] for k in ("best", "best_state", "bad_epochs",
                                                                             "step", "epoch"))
            torch.set_rng_state(state["torch_rng"])
        if start == 0 and cfg.variant == "adapter" and cfg.gene_head and cfg.head_warmup_epochs > 0:
            self._warm_up_head(controls, cache[2], line_idx[tr_idx], cond[tr_idx], target[tr_idx])
        stopped = start >= cfg.epochs or (len(va_idx) and bad_epochs >= cfg.patience) or (
            cfg.max_steps is not None and step >= cfg.max_steps)
        epoch = start - 1
        bar = tqdm(range(start, cfg.epochs if not stopped else start), desc=self.name, unit="epoch",
                   disable=not (self.progress and ctx.is_main))
        runner = distributed.wrap(self.net, ctx)  # DDP with several processes: gradients averaged over ranks
        n_genes = target.shape[1]
        self.loss_history_ = []  # training loss of every optimiser step (the whole global batch)
        for epoch in bar:
            if _stop_after_epochs is not None and epoch - start >= _stop_after_epochs:
                raise KeyboardInterrupt(f"stopped before epoch {epoch}")
            self.net.train()
            order = np.random.default_rng([cfg.seed, 1, epoch]).permutation(tr_idx)
            sq_errs, sizes = [], []  # per step; summed over ranks and read once per epoch (no per-step sync)
            for s in range(0, len(order), batch):
                b = order[s : s + batch]
                mine = distributed.shard(b, ctx)  # this rank's rows of the global batch (all of it alone)
                weight = 1.0 if len(mine) else 0.0  # a rank with no rows still joins the gradient exchange
                mine = mine if len(mine) else b[:1]
                with distributed.autocast(self.device, cfg.precision):
                    pred = self._forward(controls, cache, line_idx[mine], cond[mine], net=runner)
                sq_err = weight * ((pred.float() - target[mine].to(self.device)) ** 2).sum()
                loss = distributed.global_mean_loss(sq_err, len(b) * n_genes, ctx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                sq_errs.append(sq_err.detach())
                sizes.append(len(b) * n_genes)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            self.loss_history_ += list(distributed.all_sum(torch.stack(sq_errs), ctx) / np.array(sizes))
            train_loss = float(self.loss_history_[-1])  # a plain float: numpy scalars cannot be resumed from
            val = float(self._loss(controls, cache, line_idx, cond, target, va_idx)) if len(va_idx) else train_loss
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}")
            if val < best - 1e-6:
                best, bad_epochs = val, 0
                best_state = {k: v.detach().clone() for k, v in self._trainable_state().items()}
            else:
                bad_epochs += 1
            if ckpt is not None and ctx.is_main:
                _io.save_state(ckpt, {"run_id": run_id, "trainable": self._trainable_state(), "opt": opt.state_dict(),
                                      "best": best, "best_state": best_state, "bad_epochs": bad_epochs, "step": step,
                                      "epoch": epoch + 1, "torch_rng": torch.get_rng_state()})
            # without a validation set there is nothing to stop early on: the budget is fixed
            if (len(va_idx) and bad_epochs >= cfg.patience) or (cfg.max_steps is not None and step >= cfg.max_steps):
                break
        if best_state is not None:
            self.net.load_state_dict(best_state, strict=False)
        self._controls = (list(train.controls.index), train.control_mean.copy())
        self._cost.update(epochs_run=epoch + 1, steps=step, best_val_mse=best,
                          train_seconds=time.perf_counter() - t_start)
        return self

    def _warm_up_head(self, controls: Tensor, offsets: Tensor | None, lines: Tensor, cond: Tensor, target: Tensor,
                      lr: float = 3e-3) -> None:
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
            loss = ((head(hidden, cond, lines) - change) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def _fit_offsets(self, train: PerturbationData) -> None:
        """Each training line's mean change (kept genes), the mean over all training changes and
        the dose profile: the mean change at each training dose level minus that overall mean."""
        delta = train.delta()[:, self._kept]
        lines = train.conditions["cell_line"].to_numpy()
        self._offsets = {str(c): delta[lines == c].mean(0).astype(np.float32) for c in np.unique(lines)}
        self._global_offset = delta.mean(0).astype(np.float32)
        t = scaled_dose(train.conditions["dose"].to_numpy(float), self._dose_lo, self._dose_span)
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
        if self.cfg.variant in ("concat", "feature", "lowrank"):
            return self.net.frozen_hidden(c), None, offsets  # (L, T, D)
        return None, self.net.reference_output(c), offsets  # (L, T)

    def _forward(self, controls, cache, lines, cond, net: nn.Module | None = None) -> Tensor:
        """Predictions for rows (lines, cond); `net` is the module to call (training passes its DDP wrapper)."""
        hidden, ref, offsets = cache
        net = net or self.net
        if self.cfg.variant == "lowrank":  # per-line hidden states, indexed inside the head
            out = net(controls[lines].to(self.device), cond.to(self.device), hidden, lines=lines.to(self.device))
        else:
            out = net(controls[lines].to(self.device), cond.to(self.device),
                      hidden[lines] if hidden is not None else None, ref[lines] if ref is not None else None)
        return out if offsets is None else out + self._offset(offsets, lines.to(self.device), cond.to(self.device))

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
        names = {n for n, p in self.net.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.net.state_dict().items() if k in names}

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
            if self.cfg.variant == "finetune":
                pretrained = resolve_backbone(self.backbone_path, genes=self._genes, device=self.device)
                cache = (None, self.net.reference_output(line_controls.to(self.device), pretrained),
                         self._offset_rows(list(query.controls.index)))
                del pretrained
            else:
                cache = self._line_hidden(line_controls, list(query.controls.index))
            preds = [self._forward(line_controls, cache, torch.from_numpy(lines[s : s + 64]), cond[s : s + 64])
                     .float().cpu().numpy() for s in range(0, len(cond), 64)]
        out[:, self._kept] = np.concatenate(preds) if preds else np.zeros((0, int(self._kept.sum())))
        return out

    def cost(self) -> dict[str, Any]:
        return dict(self._cost)

    # -- save / load -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save only what was trained (safetensors) + config, genes, encoder id, backbone hash."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._trainable_state().items()}
        with _io.atomic_path(folder / "trained.safetensors") as tmp:
            save_file(state, str(tmp))
        meta = {"model": self.name, "config": asdict(self.cfg), "backbone": backbone_reference(self.backbone_path),
                "backbone_sha256": self._backbone_hash, "encoder": self.encoder_spec,
                "encoder_identifier": self._encoder.identifier, "genes": [str(g) for g in self._genes],
                "kept": self._kept.tolist(), "emb_mean": self._emb_mean.tolist(), "emb_std": self._emb_std.tolist(),
                "dose_lo": self._dose_lo, "dose_span": self._dose_span, "cost": self._cost,
                "training_molecules": self.training_molecules}
        lines, ctrl = self._controls
        with _io.atomic_path(folder / "controls.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, cell_lines=np.array(lines), control_mean=ctrl.astype(np.float32),
                         offset_lines=np.array(list(self._offsets)), global_offset=self._global_offset,
                         offsets=np.stack(list(self._offsets.values())), dose_grid=self._dose_grid,
                         dose_profile=self._dose_profile)
        write_model_json(folder, meta, files=["trained.safetensors", "controls.npz"])  # last: marks it complete

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None, device: str | None = None) -> "ScDCAModel":
        """Load a saved model; refuses a backbone whose weights differ from the one it was trained on."""
        from safetensors.torch import load_file

        folder = Path(path)
        meta = read_model_json(folder)
        klass = MODELS.get(meta["model"])
        model = klass(backbone=backbone or meta["backbone"], encoder=meta["encoder"], device=device,
                      **{k: v for k, v in meta["config"].items() if k != "variant"})
        bb = resolve_backbone(model.backbone_path, genes=meta["genes"], device=model.device)
        if weights_hash(bb) != meta["backbone_sha256"]:
            raise ScdcaInputError(f"backbone {model.backbone_path!r} differs from the one this model was trained on "
                                  f"(weights hash mismatch); pass the original backbone folder")
        model._encoder = get_encoder(model.encoder_spec)
        if model._encoder.identifier != meta["encoder_identifier"]:
            raise ScdcaInputError(f"molecule encoder {model._encoder.identifier!r} differs from the one used in "
                                  f"training ({meta['encoder_identifier']!r})")
        model._backbone_hash = meta["backbone_sha256"]
        model._genes, model._kept = np.array(meta["genes"], dtype=object), np.array(meta["kept"], dtype=bool)
        model._emb_mean = np.array(meta["emb_mean"], dtype=np.float32)
        model._emb_std = np.array(meta["emb_std"], dtype=np.float32)
        model._dose_lo, model._dose_span = meta["dose_lo"], meta["dose_span"]
        mapping = bb.vocab.map_genes(model._genes)
        model.net = ScDCANet(bb, torch.from_numpy(mapping.ids), len(model._emb_mean) + 1, model.cfg).to(model.device)
        missing = model.net.load_state_dict(load_file(str(folder / "trained.safetensors")), strict=False)
        if missing.unexpected_keys:
            raise ScdcaInputError(f"saved weights do not fit this model: {missing.unexpected_keys[:5]}")
        model._cost = meta.get("cost", {})
        model.training_molecules = meta.get("training_molecules")  # None in models saved before it was kept
        with np.load(folder / "controls.npz") as z:
            model._controls = (z["cell_lines"].tolist(), z["control_mean"])
            model._offsets = dict(zip(z["offset_lines"].tolist(), z["offsets"]))
            model._global_offset = z["global_offset"]
            # models saved before the dose profile existed have none (and dose_profile=False)
            model._dose_grid = z["dose_grid"] if "dose_grid" in z else np.zeros(1, np.float32)
            model._dose_profile = z["dose_profile"] if "dose_profile" in z else np.zeros((1, int(model._kept.sum())),
                                                                                            np.float32)
        return model


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


def _variant(name: str, variant: str, doc: str, **defaults):
    cls = type(f"ScDCA_{name}", (ScDCAModel,), {"name": name, "variant": variant, "defaults": defaults,
                                                  "__doc__": doc})
    MODELS.add(name, cls)
    return cls


MODELS.add("scdca", ScDCAModel)
_variant("scdca_nores", "adapter", "scDCA with a plain nonlinearity in the bottleneck (Houlsby-style).",
         residual=False)
_variant("scdca_noskip", "adapter", "scDCA with eq. 5 as printed: the adapter output replaces h_l.", skip=False)
_variant("scdca_film", "adapter", "scDCA whose drug projection also scales the bottleneck channels (FiLM; "
         "our extension, not in the paper).", modulation="film")
ScDCALowRank = _variant(
    "scdca_lowrank", "lowrank", "Frozen backbone + a low-rank drug x gene output on its final hidden states (our "
    "extension). No adapters, so the hidden states are cached per line and a full-batch step costs milliseconds: it "
    "trains on its own budget (the benchmark-wide --epochs/--max-steps/--lr CPU budgets do not apply).",
    batch_size=0, epochs=600, lr=3e-3, val_fraction=0.0, line_offset=True,  # 600 vs 300 steps: NOTES.md, session 4
    dose_profile=True)  # NOTES.md, session 8
ScDCALowRank.options = ("backbone", "encoder", "device", "seed")
_variant("scdca_plus", "adapter", "scDCA with FiLM adapters plus the low-rank drug x gene output on the adapted "
         "hidden states, the head first fitted alone on the frozen states (our extension).", modulation="film",
         gene_head=True, head_warmup_epochs=300, line_offset=True)
_variant("scdca_plus_frozen", "adapter", "scdca_plus whose drug x gene head keeps its warm-up fit (600 full-batch "
         "steps, as scdca_lowrank) while the FiLM adapters train on a fixed budget, without best-validation restore "
         "(our extension; NOTES.md, session 5).", modulation="film", gene_head=True, head_warmup_epochs=600,
         freeze_head=True, line_offset=True, val_fraction=0.0)
_variant("finetune", "finetune", "Full fine-tuning with the drug added to every input token (eq. 4).")
_variant("concat", "concat", "Frozen backbone; drug concatenated to each gene's hidden state before the head.")
_variant("feature", "feature", "Frozen backbone cell embedding + drug into a separately trained MLP.")


@MODELS.register("scdca_routed")
class ScDCARouted(PerturbationModel):
    """Two `scdca_lowrank` heads on the same frozen backbone, chosen per molecule (our extension).

    A molecule seen in training (in any line or dose; matched by canonical SMILES) gets the
    plain head, which fits each training molecule closely; a new molecule gets a head whose
    molecule projection trained with dropout (`new_dropout`), which fits the training
    molecules less closely but varies more smoothly between them. Measured: the plain head
    ranks seen drugs better and new drugs worse than the dropout head (NOTES.md, session 6),
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
    Each head loads its own copy of the backbone (cost() counts it once). With
    `checkpoint_dir`, each head keeps its own checkpoints (`seen/`, `new/`), so a killed run
    resumes where it stopped.
    """

    name = "scdca_routed"
    options = ScDCALowRank.options

    def __init__(self, *, new_dropout: float = 0.6, new_shrinkage: float | None = None, shrinkage_folds: int = 3,
                 stack_ridge: bool = True, checkpoint_dir: str | os.PathLike | None = None, **kwargs):
        if new_shrinkage is not None and not 0.0 <= new_shrinkage <= 1.0:
            raise ScdcaInputError(f"new_shrinkage: {new_shrinkage!r}; use a weight in [0, 1], or None to choose it "
                                  f"by cross-validation over the training drugs")
        if shrinkage_folds < 2:
            raise ScdcaInputError(f"shrinkage_folds: {shrinkage_folds!r}; use at least 2 folds of training drugs")
        self.new_dropout, self.new_shrinkage, self.shrinkage_folds = new_dropout, new_shrinkage, shrinkage_folds
        self.stack_ridge = stack_ridge and new_shrinkage is None
        folder = Path(checkpoint_dir) if checkpoint_dir else None
        self._new_kwargs = {**kwargs, "gene_head_dropout": new_dropout}
        self.seen = ScDCALowRank(**kwargs, checkpoint_dir=folder / "seen" if folder else None)
        self.new = ScDCALowRank(**self._new_kwargs, checkpoint_dir=folder / "new" if folder else None)

    def fit(self, train: PerturbationData) -> "ScDCARouted":
        self.seen.fit(train)
        self.new.fit(train)
        self._molecules = sorted({canonical_smiles(s) or s for s in train.drug_smiles().values()})
        self._anchor = ScaledMeanBaseline().fit(train)
        self.shrinkage_cv_: dict = {}
        self._ridge, self._shrinkage_seconds = None, 0.0
        # the weights are chosen when first needed (a new molecule to predict, save): a grid cell
        # whose test molecules were all seen in training (few-shot, zero-shot lines) never pays for them
        self._weights = {"scdca": float(self.new_shrinkage)} if self.new_shrinkage is not None else None
        self._train = train if self._weights is None else None
        return self

    @property
    def weights_(self) -> dict[str, float]:
        """Weights of the new molecules' deviations from `scaled_mean` (chosen on first use)."""
        if self._weights is None:
            self._weights = self._choose_weights(self._train)
            self._train = None
        return self._weights

    def _choose_weights(self, train: PerturbationData) -> dict[str, float]:
        from .shrinkage import cv_weights, trust_or_stack

        t0 = time.perf_counter()
        n_drugs = train.conditions["drug"].nunique()
        if n_drugs < 2 * self.shrinkage_folds:
            weights = {"scdca": 1.0}
            log.warning("scdca_routed: %d training drugs are too few to choose the weights of new molecules by "
                        "%d-fold cross-validation; new molecules get the new head unshrunk", n_drugs,
                        self.shrinkage_folds)
        else:
            models = {"scdca": lambda inner, held: ScDCALowRank(**self._new_kwargs).fit(inner).predict(held)}
            if self.stack_ridge:
                models["ridge"] = lambda inner, held: MODELS.get("ridge")().fit(inner).predict(held)
            stacked, self.shrinkage_cv_ = cv_weights(models, train, n_folds=self.shrinkage_folds,
                                                     seed=int(self._new_kwargs.get("seed", 0)))
            weights = trust_or_stack(stacked, self.shrinkage_cv_, "scdca")
            if weights.get("ridge", 0.0) > 0.0:
                self._ridge = MODELS.get("ridge")().fit(train)
        self._shrinkage_seconds = time.perf_counter() - t0
        return weights

    @property
    def shrinkage_(self) -> float:
        """The new head's weight (1: unshrunk)."""
        return self.weights_["scdca"]

    @property
    def _controls(self):  # what scdca.predict reads from a model: the training lines' controls, genes
        return self.seen._controls

    @property
    def _genes(self):
        return self.seen._genes

    @property
    def training_molecules(self) -> dict[str, str] | None:
        return self.seen.training_molecules

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
        for mask, head in ((seen, self.seen), (~seen, self.new)):
            if mask.any():
                out[mask] = head.predict(query.subset(np.asarray(query.ids)[mask], observed=False))
        if (~seen).any() and self.weights_ != {"scdca": 1.0}:  # new molecules: the stack on the drug-blind answer
            new = query.subset(np.asarray(query.ids)[~seen], observed=False)
            anchor = new.control_for(new.conditions["cell_line"]) + self._anchor.change(new)
            blend = anchor + self.weights_["scdca"] * (out[~seen] - anchor)
            if self.weights_.get("ridge", 0.0) > 0:
                blend += self.weights_["ridge"] * (self._ridge.predict(new) - anchor)
            out[~seen] = blend
        return out

    def cost(self) -> dict[str, Any]:
        a, b = self.seen.cost(), self.new.cost()
        if not a or not b:
            return {}
        trainable = a["params_trainable"] + b["params_trainable"]
        total = a["params_total"] + b["params_trainable"]  # one frozen backbone, two heads
        return {"params_trainable": trainable, "params_total": total, "params_trainable_pct": 100.0 * trainable / total,
                "steps": a["steps"] + b["steps"], "train_seconds": a["train_seconds"] + b["train_seconds"],
                "shrinkage": self._weights["scdca"] if self._weights else float("nan"),  # NaN: never needed
                "ridge_weight": self._weights.get("ridge", 0.0) if self._weights else float("nan"),
                "shrinkage_seconds": self._shrinkage_seconds}

    def save(self, path: str | os.PathLike) -> None:
        """Both heads in subfolders `seen/` and `new/`, then model.json (written last)."""
        folder = Path(path)
        weights = self.weights_  # a saved model predicts any molecule: choose the weights now
        self.seen.save(folder / "seen")
        self.new.save(folder / "new")
        anchor = {str(k): {"mean": m.tolist(), "levels": lv.tolist(), "scales": sc.tolist()}
                  for k, (m, lv, sc) in self._anchor._fits.items()}
        files = ["seen/model.json", "new/model.json"]
        if self._ridge is not None:
            with _io.atomic_path(folder / "ridge.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **self._ridge.to_arrays())
            files.append("ridge.npz")
        write_model_json(folder, {"model": self.name, "new_dropout": self.new_dropout, "molecules": self._molecules,
                                  "weights": weights, "shrinkage_cv": self.shrinkage_cv_,
                                  "anchor": anchor}, files=files)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None, device: str | None = None) -> "ScDCARouted":
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
        model.shrinkage_cv_ = meta.get("shrinkage_cv", {})
        model.new_shrinkage, model.shrinkage_folds, model.stack_ridge = None, 3, "ridge" in model.weights_
        model._anchor = ScaledMeanBaseline.from_fits(meta.get("anchor") or {})
        model._ridge = None
        if (folder / "ridge.npz").exists():
            with np.load(folder / "ridge.npz") as z:
                model._ridge = MODELS.get("ridge").from_arrays(dict(z))
        return model
