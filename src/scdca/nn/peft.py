"""Parameter-efficient fine-tuning (PEFT) of a frozen backbone: one interface, six methods.

`apply(backbone, PeftConfig(method=...))` freezes the backbone and adds the method's
trainable parts in place (the model is otherwise unchanged, so `backbone.encode` still
works). Every method starts as the frozen model: its new outputs are zero-initialised.

Methods (what trains; how):

- `lora`: rank-r updates of the packed q/k/v projection (attention) and/or the two
  feed-forward linears. HF peft (`target_parameters` for the packed q/k/v weight,
  `target_modules` for the linears); B = 0 at start.
- `prefix`: `prefix_tokens` learned key/value pairs per layer, per head. Ours: peft's prefix
  tuning needs a transformers model. Every query also attends to the prefix, in its own
  softmax, scaled by a per-head gate that starts at 0 (zero-init attention gating).
- `adapter`: a Houlsby bottleneck (D -> D*ratio -> D, GELU) after the attention and the
  feed-forward sub-blocks of each layer. Ours (a residual wrapper around the sub-module's
  output); up-projection = 0 at start.
- `token`: a bottleneck of ratio 1 on the value (expression) embedding of every gene token;
  ours, as `adapter`.
- `full`: every backbone weight (reference: ordinary fine-tuning).
- `linear`: nothing in the backbone (reference: frozen encoder, the task head alone).

The task head (e.g. a classifier) is the caller's and always trains. `trainable_state`
is what a saved model needs besides the frozen backbone it names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scdca.errors import ScdcaInputError
from scdca.nn.backbone import Backbone, SelfAttention

Method = Literal["lora", "prefix", "adapter", "token", "full", "linear"]
METHODS = get_args(Method)
LORA_TARGETS = ("attention", "ff")


@dataclass
class PeftConfig:
    """Which PEFT method and its size."""

    method: Method = "lora"
    r: int = 8  # LoRA rank
    alpha: float = 8.0  # LoRA scaling alpha / r
    lora_on: tuple[str, ...] = ("attention", "ff")
    prefix_tokens: int = 8
    bottleneck_ratio: float = 0.25  # adapter width = d_model * ratio (token: 1.0)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ScdcaInputError(f"method: {self.method!r} is not a PEFT method; choose one of {', '.join(METHODS)}")
        self.lora_on = tuple(self.lora_on.split(",") if isinstance(self.lora_on, str) else self.lora_on)
        bad = [t for t in self.lora_on if t not in LORA_TARGETS]
        if bad or not self.lora_on:
            raise ScdcaInputError(f"lora_on: {bad or self.lora_on!r}; use any of {', '.join(LORA_TARGETS)}")
        if self.r < 1 or self.prefix_tokens < 1 or not 0 < self.bottleneck_ratio <= 4:
            raise ScdcaInputError(
                f"r {self.r}, prefix_tokens {self.prefix_tokens} must be >= 1 and bottleneck_ratio "
                f"{self.bottleneck_ratio} in (0, 4]"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "lora_on": list(self.lora_on)}


class Bottleneck(nn.Module):
    """x + up(gelu(down(x))), with up = 0 at start (the identity)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.down = nn.Linear(d_model, width)
        self.up = nn.Linear(width, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        return x + self.up(F.gelu(self.down(x)))


class AdaptedOutput(nn.Module):
    """A frozen sub-module followed by a `Bottleneck` on its output."""

    def __init__(self, base: nn.Module, d_model: int, width: int):
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(d_model, width)

    def forward(self, *args, **kwargs) -> Tensor:
        return self.adapter(self.base(*args, **kwargs))


class PrefixAttention(nn.Module):
    """Self-attention whose queries also read `n` learned key/value prefix tokens.

    y = attn(q, K, V) + tanh(gate_h) * softmax(q P_k^T / sqrt(d)) P_v, per head h, then the
    frozen output projection. The gate starts at 0, so the layer starts as the frozen one.
    The gene tokens' own attention is untouched, which keeps attention-based gene rankings
    comparable across methods.
    """

    def __init__(self, base: SelfAttention, n: int):
        super().__init__()
        self.base = base
        d = base.out_proj.in_features
        dh = d // base.nhead
        self.prefix_k = nn.Parameter(torch.randn(base.nhead, n, dh) * dh**-0.5)  # (H, n, Dh)
        self.prefix_v = nn.Parameter(torch.randn(base.nhead, n, dh) * dh**-0.5)
        self.gate = nn.Parameter(torch.zeros(base.nhead))  # (H,)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:  # (B, T, D) -> (B, T, D)
        b = self.base
        B, T, D = x.shape
        qkv = F.linear(x, b.in_proj_weight, b.in_proj_bias)
        q, k, v = qkv.view(B, T, 3, b.nhead, D // b.nhead).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        b.record_cls_attention(q, k, attn_mask)  # among the gene tokens, as without a prefix
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=b.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        pk = self.prefix_k.unsqueeze(0).expand(B, -1, -1, -1)  # (B, H, n, Dh)
        pv = self.prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
        y = y + torch.tanh(self.gate).view(1, -1, 1, 1) * F.scaled_dot_product_attention(q, pk, pv)
        return b.out_proj(y.transpose(1, 2).reshape(B, T, D))


def apply(backbone: Backbone, cfg: PeftConfig) -> Backbone:
    """Freeze `backbone` and add `cfg.method`'s trainable parts, in place; returns it."""
    for p in backbone.parameters():
        p.requires_grad_(cfg.method == "full")
    d = backbone.cfg.d_model
    layers: Any = backbone.transformer_encoder.layers  # torch's encoder layers (typed as plain modules)
    if cfg.method == "lora":
        _lora(backbone, cfg)
    elif cfg.method == "prefix":
        for layer in layers:
            layer.self_attn = PrefixAttention(layer.self_attn, cfg.prefix_tokens)
    elif cfg.method == "adapter":
        width = max(1, round(d * cfg.bottleneck_ratio))
        for layer in layers:
            layer.self_attn = AdaptedOutput(layer.self_attn, d, width)
            layer.linear2 = AdaptedOutput(layer.linear2, d, width)
    elif cfg.method == "token":
        cast(Any, backbone).value_encoder = AdaptedOutput(backbone.value_encoder, d, d)
    backbone.peft_method = cfg.method
    return backbone


def _lora(backbone: Backbone, cfg: PeftConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    modules = r"transformer_encoder\.layers\.\d+\.(linear1|linear2)" if "ff" in cfg.lora_on else None
    params = ["self_attn.in_proj_weight"] if "attention" in cfg.lora_on else None
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates an int; it is a float scale
        lora_dropout=0.0,
        bias="none",
        target_modules=modules or [],
        target_parameters=params,
    )
    inject_adapter_in_model(config, backbone)  # LoRA B starts at zero: the frozen model at step 0
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The tensors a PEFT method trained (requires_grad), by name: all a saved model needs
    besides its frozen backbone."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k in names}
