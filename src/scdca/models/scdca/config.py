"""The scDCA family's settings (`ScDCAConfig`): which parts a model is built from, and how it trains.

A model is three choices. The *injector* puts the drug into the backbone: adapters after every
layer (`adapter`), a projection added to every input token with the backbone trained
(`finetune`), or nothing, the backbone frozen and read once per line (`concat`, `feature`,
`lowrank`). The *head* turns hidden states into expression: the backbone's decoder (adapter,
finetune), an MLP on [h, drug] per gene (`concat`), an MLP on the cell embedding (`feature`) or a
low-rank drug x gene output (`lowrank`; `gene_head` adds it to the decoder). The *offset* adds a
drug-agnostic change: each line's mean training change (`line_offset`), shifted by dose
(`dose_profile`). `variant` names the injector-head pair; the rules below refuse combinations
that mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args, get_origin, get_type_hints

from scdca.errors import ScdcaInputError
from scdca.nn.distributed import Precision

Variant = Literal["adapter", "finetune", "concat", "feature", "lowrank"]
Modulation = Literal["bias", "film"]
FrozenDtype = Literal["float32", "bfloat16"]


@dataclass
class ScDCAConfig:
    """Architecture and training settings. Training defaults are the paper's (Adam, lr 1e-4,
    batch 16, 20 epochs) plus early stopping on a 10% validation split of training drugs."""

    variant: Variant = "adapter"
    bottleneck: int = 16
    proj_hidden: int = 16  # f_l hidden width; 16 keeps whole-human scDCA under 1% trainable
    residual: bool = True
    skip: bool = True
    modulation: Modulation = "bias"  # "film": the drug also scales the bottleneck channels (our extension)
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
    #                             to the mean over all doses (shared by all lines; our extension, DECISIONS.md D13)
    head_warmup_epochs: int = 0  # gene_head with adapters: first fit the head alone on the frozen, cached
    freeze_head: bool = False  # gene_head with adapters: the head keeps its warm-up fit; only adapters train after
    #                              hidden states (full batch, this many steps), then train everything
    patience: int = 5
    max_steps: int | None = None  # stop after this many optimiser steps in total (CPU budgets)
    precision: Precision = "auto"  # bf16 autocast on CUDA, fp32 on CPU; "bf16" forces it, "fp32" turns it off
    frozen_dtype: FrozenDtype = "float32"  # "bfloat16": the frozen backbone's weights and activations are
    #                                        stored in bf16 (half the memory); what trains stays fp32
    recompute_frozen: bool = False  # recompute the frozen layers' activations in the backward pass instead
    #                                 of storing them (adapter variant: less memory, one more forward)
    seed: int = 0

    def __post_init__(self):
        for name, hint in get_type_hints(type(self)).items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                raise ScdcaInputError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(get_args(hint))}")
        if self.dose_profile and not self.line_offset:
            raise ScdcaInputError(
                "dose_profile=True shifts the line offset by dose and needs line_offset=True; "
                "set both, or dose_profile=False"
            )
        if self.trains_backbone and (self.frozen_dtype != "float32" or self.recompute_frozen):
            raise ScdcaInputError(
                f"frozen_dtype={self.frozen_dtype!r} / recompute_frozen={self.recompute_frozen} act on a frozen "
                "backbone, and variant='finetune' trains it; use variant='adapter', or leave them at their defaults"
            )
        if (self.freeze_head or self.head_warmup_epochs) and not (self.gene_head and self.variant == "adapter"):
            raise ScdcaInputError(
                "freeze_head and head_warmup_epochs act on the drug x gene head of an adapter model; "
                "set gene_head=True with variant='adapter', or leave them at their defaults"
            )

    @property
    def trains_backbone(self) -> bool:
        """Full fine-tuning: the backbone's own weights train (and keep their dropout)."""
        return self.variant == "finetune"

    @property
    def reads_frozen_states(self) -> bool:
        """The head reads the frozen backbone's final hidden states, computed once per line."""
        return self.variant in ("concat", "feature", "lowrank")

    @property
    def warms_up_head(self) -> bool:
        """The drug x gene head is first fitted alone on the frozen states, then the adapters train."""
        return self.variant == "adapter" and self.gene_head and self.head_warmup_epochs > 0
