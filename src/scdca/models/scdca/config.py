"""The scDCA family's settings (`ScDCAConfig`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


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
