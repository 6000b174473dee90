"""The scDCA network: frozen backbone, drug-conditional adapters, output head."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scdca.models.scdca.config import ScDCAConfig
from scdca.nn.adapters import (
    AdapterConfig,
    DrugConditionalAdapter,
    DrugGeneConfig,
    DrugGeneHead,
    MoleculeGroups,
    freeze,
    zero_output,
)
from scdca.nn.backbone import Backbone


class ScDCANet(nn.Module):
    """The torch module: backbone (shared, frozen unless finetune) + the variant's trainable parts."""

    gene_ids: Tensor  # (T,) the backbone's token of each gene read (a buffer)
    head: nn.Module  # the read-out: the pretrained decoder (adapter), or an MLP (concat, feature)

    def __init__(self, backbone: Backbone, gene_ids: Tensor, cond_dim: int, cfg: ScDCAConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.register_buffer("gene_ids", gene_ids.long(), persistent=False)  # (T,)
        if not cfg.trains_backbone:
            freeze(backbone)
        D = backbone.cfg.d_model
        self._build_injector(D, cond_dim)
        self._build_head(D, cond_dim, len(gene_ids))
        # after the head: a trainable copy of the decoder (train_head) stays fp32
        self.frozen_dtype = getattr(torch, cfg.frozen_dtype)
        if self.frozen_dtype != torch.float32:
            backbone.to(self.frozen_dtype)

    def _build_injector(self, D: int, cond_dim: int) -> None:
        """Where the drug enters: adapters after every layer, or a projection onto every input token."""
        cfg = self.cfg
        if cfg.variant == "adapter":
            acfg = AdapterConfig(D, cond_dim, cfg.bottleneck, cfg.proj_hidden, cfg.residual, cfg.skip, cfg.modulation)
            self.adapters = nn.ModuleList(DrugConditionalAdapter(acfg) for _ in range(self.backbone.cfg.nlayers))
        elif cfg.variant == "finetune":
            self.mol_in = nn.Linear(cond_dim, D)
            nn.init.zeros_(self.mol_in.weight)
            nn.init.zeros_(self.mol_in.bias)

    def _build_head(self, D: int, cond_dim: int, n_genes: int) -> None:
        """What reads the hidden states out as expression; every head starts at 'no change'."""
        cfg = self.cfg
        if cfg.variant == "adapter":  # the pretrained expression decoder; a trainable copy only if asked
            self.head = (
                copy.deepcopy(self.backbone.decoder).requires_grad_(True) if cfg.train_head else self.backbone.decoder
            )
        elif cfg.variant == "concat":
            self.head = nn.Sequential(
                nn.Linear(D + cond_dim, D), nn.LeakyReLU(), nn.Linear(D, D), nn.LeakyReLU(), nn.Linear(D, 1)
            )
        elif cfg.variant == "feature":
            self.head = nn.Sequential(nn.Linear(D + cond_dim, 256), nn.ReLU(), nn.Linear(256, n_genes))
        if cfg.variant == "lowrank" or cfg.gene_head:  # low-rank drug x gene output on the final hidden states
            self.gene_head = DrugGeneHead(
                DrugGeneConfig(
                    D,
                    cond_dim,
                    n_genes,
                    cfg.gene_head_rank,
                    cfg.gene_head_hidden,
                    cfg.gene_head_dropout,
                    cfg.gene_head_free_genes,
                )
            )
        if cfg.variant in ("concat", "feature"):
            zero_output(self.head)

    def train(self, mode: bool = True) -> ScDCANet:
        """Frozen backbone layers stay in eval mode (no dropout) while the trainable parts train.

        With dropout on, the frozen layers added noise larger than most drug effects to every
        training output, and a systematic shift that the 'no change' reference (computed in
        eval mode) does not contain: scDCA then fitted its training conditions worse than
        predicting no change. `finetune` trains the backbone itself, so it keeps dropout.
        """
        super().train(mode)
        if not self.cfg.trains_backbone:
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
            return ref.decoder(ref.encode(ids, values.to(self.frozen_dtype))).float()

    def frozen_hidden(self, values: Tensor) -> Tensor:
        """h_L of the frozen backbone for control inputs (B, T) -> (B, T, D); cacheable per line."""
        ids = self.gene_ids.expand(values.shape[0], -1)
        with torch.no_grad():
            return self.backbone.encode(ids, values.to(self.frozen_dtype)).float()

    def forward(
        self,
        values: Tensor,
        cond: Tensor,
        hidden: Tensor | None = None,
        reference: Tensor | None = None,
        *,
        lines: Tensor | None = None,
        molecules: MoleculeGroups | None = None,
    ) -> Tensor:
        """values (B, T) control expression, cond (B, C) -> predicted expression (B, T).

        `hidden` (frozen h_L) and `reference` (reference_output) depend only on the cell line,
        so callers may pass them cached; they are computed when omitted. `lowrank` also takes
        `hidden` per line (L, T, D) with `lines` (B,), so the head reads each line once, and
        `molecules` (cond's rows grouped by molecule) when the same rows come every step.
        """
        if self.cfg.reads_frozen_states:
            return values + self._read_frozen(values, cond, hidden, lines, molecules)
        out = self._adapted_output(values, cond)
        if reference is None:
            if self.cfg.trains_backbone:
                raise ValueError("finetune needs `reference` (the pretrained model's output), computed before training")
            reference = self.reference_output(values)
        return values + out - reference

    def _read_frozen(
        self,
        values: Tensor,
        cond: Tensor,
        hidden: Tensor | None,
        lines: Tensor | None,
        molecules: MoleculeGroups | None = None,
    ) -> Tensor:
        """The change (B, T) a head predicts from the frozen backbone's final states."""
        if self.cfg.variant == "lowrank":
            if hidden is None:
                hidden, lines = self.frozen_hidden(values), None  # (B, T, D)
            return self.gene_head(hidden, cond, lines, molecules)
        h = hidden if hidden is not None else self.frozen_hidden(values)  # (B, T, D)
        if self.cfg.variant == "concat":
            c = cond[:, None, :].expand(-1, h.shape[1], -1)
            return self.head(torch.cat([h, c], -1)).squeeze(-1)
        return self.head(torch.cat([h.mean(1), cond], -1))

    def _adapted_output(self, values: Tensor, cond: Tensor) -> Tensor:
        """The decoder's output (B, T) after the drug went into the backbone (adapters or input tokens)."""
        ids = self.gene_ids.expand(values.shape[0], -1)
        h = self.backbone.embed(ids, values.to(self.frozen_dtype))  # (B, T, D)
        if self.cfg.trains_backbone:
            return self.backbone.decoder(self.backbone.transformer_encoder(h + self.mol_in(cond)[:, None, :]))
        for layer, adapter in zip(self.backbone.transformer_encoder.layers, self.adapters):
            h = adapter(self._frozen_layer(layer, h), cond)  # the adapters run in fp32
        out = self._frozen_layer(self.head, h) if self.head is self.backbone.decoder else self.head(h)  # (B, T)
        return out + self.gene_head(h, cond) if self.cfg.gene_head else out

    def _frozen_layer(self, layer: nn.Module, h: Tensor) -> Tensor:
        """A frozen module on h in the backbone's dtype, returned as fp32. With `recompute_frozen`
        its activations are recomputed in the backward pass instead of stored; a module whose
        input needs no gradient (below the first adapter) stores nothing anyway."""
        x = h.to(self.frozen_dtype)
        if self.cfg.recompute_frozen and x.requires_grad:
            return checkpoint(layer, x, use_reentrant=False).float()
        return layer(x).float()
