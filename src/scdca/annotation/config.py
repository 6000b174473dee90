"""What `Annotator` trains: its settings and the classifier on top of the backbone."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from scdca.errors import ScdcaInputError
from scdca.nn.backbone import Backbone
from scdca.nn.peft import PeftConfig

KEY = "scdca"  # obs/obsm/uns prefix of what `annotate` writes


@dataclass
class AnnotateConfig:
    """Training settings; `peft` chooses the method (lora, prefix, adapter, token, full, linear)."""

    peft: PeftConfig = field(default_factory=PeftConfig)
    epochs: int = 100  # at most; fewer when `patience` stops training
    patience: int | None = 5  # stop after this many epochs without a better validation loss (None: never)
    batch_size: int = 32
    lr: float | None = None  # default: 1e-4 for full fine-tuning, 1e-3 for the others
    max_genes: int = 128  # gene tokens per cell; 128 rather than 256: a CPU fit in a third of the time at the
    #                       same accuracy (DECISIONS.md D43); raise it on a GPU
    val_fraction: float = 0.1  # stratified; the epoch with the best validation loss is kept
    backbone_dropout: bool = False  # the frozen backbone's own dropout while training (`full` always keeps
    #                                 it); off, attention runs fused and an epoch costs a third (DECISIONS.md D43)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.peft, dict):
            self.peft = PeftConfig(**self.peft)
        if self.epochs < 1 or self.batch_size < 1 or self.max_genes < 1:
            raise ScdcaInputError(
                f"epochs {self.epochs}, batch_size {self.batch_size} and max_genes {self.max_genes} must be >= 1"
            )
        if self.patience is not None and self.patience < 1:
            raise ScdcaInputError(f"patience: {self.patience!r} must be >= 1 (or None to train every epoch)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.peft.method == "full" else 1e-3)


class CellTypeClassifier(nn.Module):
    """Backbone (PEFT-adapted) -> <cls> hidden state -> linear head -> class logits."""

    def __init__(self, backbone: Backbone, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.d_model, n_classes)

    def forward(self, gene_ids: Tensor, values: Tensor) -> Tensor:  # (B, T), (B, T) -> (B, K)
        return self.head(self.backbone.encode(gene_ids, values)[:, 0])
