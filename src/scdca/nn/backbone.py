"""A single-cell transformer with scGPT's architecture, and its checkpoint format.

Our own implementation (no flash-attn, no torchtext): gene-token embedding + LayerNorm,
a continuous value encoder, post-norm transformer layers on
`torch.nn.functional.scaled_dot_product_attention`, a per-gene expression decoder and
an optional MVC decoder. Parameter names follow PyTorch's `nn.TransformerEncoderLayer`
layout, so an official scGPT `state_dict` maps onto this model key by key.

A checkpoint is a folder with `best_model.pt` (a state_dict), `args.json` and
`vocab.json`, as released by scGPT. `load` reads both attention layouts
(`self_attn.Wqkv.*` / `self_attn._impl.*` from flash-attention training, and torch's
`self_attn.in_proj_*`); `save` writes the torch layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scdca import storage
from scdca.errors import ScdcaInputError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


@dataclass
class BackboneConfig:
    """Architecture of the backbone; mirrors the fields of scGPT's args.json that matter."""

    ntoken: int
    d_model: int = 512
    nhead: int = 8
    d_hid: int = 512
    nlayers: int = 12
    dropout: float = 0.2
    pad_token_id: int = 0
    pad_value: float = -2.0
    mask_value: float = -1.0
    max_value: float = 512.0
    do_mvc: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.nhead:
            raise ScdcaInputError(f"d_model {self.d_model} must be divisible by nhead {self.nhead}")

    def to_args(self) -> dict:
        """args.json fields, named as scGPT names them."""
        return {
            "embsize": self.d_model,
            "nheads": self.nhead,
            "d_hid": self.d_hid,
            "nlayers": self.nlayers,
            "dropout": self.dropout,
            "pad_token": "<pad>",
            "pad_value": self.pad_value,
            "mask_value": self.mask_value,
            "input_emb_style": "continuous",
            "do_mvc": self.do_mvc,
            "fast_transformer": False,
        }

    @classmethod
    def from_args(cls, args: dict, vocab: dict[str, int]) -> BackboneConfig:
        try:
            d_model, nlayers, nhead = int(args["embsize"]), int(args["nlayers"]), int(args["nheads"])
        except KeyError as err:
            raise ScdcaInputError(f"args.json: required field {err.args[0]!r} is missing") from err
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            log.warning(
                "args.json: input_emb_style=%r; scdca feeds continuous values (as scGPT's perturbation "
                "fine-tuning and scDCA do)",
                style,
            )
        pad_token = args.get("pad_token", "<pad>")
        if pad_token not in vocab:
            raise ScdcaInputError(f"vocab.json has no pad token {pad_token!r}")
        return cls(
            ntoken=len(vocab),
            d_model=d_model,
            nhead=nhead,
            d_hid=int(args.get("d_hid", d_model)),
            nlayers=nlayers,
            dropout=float(args.get("dropout", 0.2)),
            pad_token_id=vocab[pad_token],
            pad_value=float(args.get("pad_value", -2)),
            mask_value=float(args.get("mask_value", -1)),
            do_mvc=bool(args.get("do_mvc", args.get("MVC", False))),
        )


# ----------------------------------------------------------------------------- modules


class GeneEncoder(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.ntoken, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.enc_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, gene_ids: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Scalar expression value -> vector: Linear(1, D), ReLU, Linear(D, D), LayerNorm."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, cfg.d_model)
        self.linear2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.max_value = cfg.max_value

    def forward(self, values: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed q/k/v projection (torch's in_proj layout)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        d = cfg.d_model
        self.nhead, self.dropout = cfg.nhead, cfg.dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.cls_attention: list[Tensor] | None = None  # a list: forward appends the <cls> token's attention

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.nhead, D // self.nhead).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        self.record_cls_attention(q, k, attn_mask)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))

    def record_cls_attention(self, q: Tensor, k: Tensor, attn_mask: Tensor | None) -> None:
        """If recording, append how the first token (<cls>) attends to every token, (B, H, T)."""
        if self.cls_attention is None:
            return
        scores = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) * q.shape[-1] ** -0.5  # (B, H, T)
        if attn_mask is not None:  # (B, 1, 1, T), True = attend
            scores = scores.masked_fill(~attn_mask[:, :, 0], float("-inf"))
        self.cls_attention.append(scores.softmax(-1).detach())


class TransformerLayer(nn.Module):
    """Post-norm encoder layer: x = norm1(x + SA(x)); x = norm2(x + FF(x)), ReLU feed-forward."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_hid)
        self.linear2 = nn.Linear(cfg.d_hid, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:  # (B, T, D) -> (B, T, D)
        x = self.norm1(x + self.dropout1(self.self_attn(x, attn_mask)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class TransformerStack(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.nlayers))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


class ExprDecoder(nn.Module):
    """Per-token MLP -> one expression value per gene."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        d = cfg.d_model
        self.fc = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))

    def forward(self, h: Tensor) -> Tensor:  # (B, T, D) -> (B, T)
        return self.fc(h).squeeze(-1)


class MVCDecoder(nn.Module):
    """Inner-product decoder: expression of gene g = <W sigmoid(Q e_g), cell embedding>."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.gene2query = nn.Linear(cfg.d_model, cfg.d_model)
        self.W = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:  # (B, D), (B, T, D) -> (B, T)
        query = torch.sigmoid(self.gene2query(gene_embs))
        return torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)


class Backbone(nn.Module):
    """scGPT-architecture transformer over (gene token, continuous value) pairs."""

    vocab: GeneVocab  # attached by `load` and `random_backbone`
    peft_method: str  # attached by `scdca.nn.peft.apply`
    load_report: LoadReport

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = GeneEncoder(cfg)
        self.value_encoder = ContinuousValueEncoder(cfg)
        self.transformer_encoder = TransformerStack(cfg)
        self.decoder = ExprDecoder(cfg)
        self.mvc_decoder = MVCDecoder(cfg) if cfg.do_mvc else None
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    @staticmethod
    def attention_mask(pad_mask: Tensor | None) -> Tensor | None:
        """(B, T) True = padding -> (B, 1, 1, T) True = attend, for SDPA; None if nothing is padded."""
        if pad_mask is None or not bool(pad_mask.any()):
            return None
        return ~pad_mask[:, None, None, :]

    def embed(self, gene_ids: Tensor, values: Tensor) -> Tensor:
        """Input embedding h_0 = gene embedding + value embedding, (B, T, D)."""
        return self.encoder(gene_ids) + self.value_encoder(values)

    def encode(self, gene_ids: Tensor, values: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Final hidden states h_L, (B, T, D)."""
        return self.transformer_encoder(self.embed(gene_ids, values), self.attention_mask(pad_mask))

    def forward(self, gene_ids: Tensor, values: Tensor, pad_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Per-gene predictions: {'pred': (B, T), 'cell_emb': (B, D), 'mvc': (B, T) if MVC}."""
        h = self.encode(gene_ids, values, pad_mask)  # (B, T, D)
        out = {"pred": self.decoder(h), "cell_emb": h[:, 0], "hidden": h}
        if self.mvc_decoder is not None:
            out["mvc"] = self.mvc_decoder(h[:, 0], self.encoder(gene_ids))
        return out


# ----------------------------------------------------------------------------- vocabulary


@dataclass
class GeneVocab:
    """Token -> id, including <pad>, <cls>, <eoc>."""

    token_to_id: dict[str, int]

    @classmethod
    def from_genes(cls, genes: Sequence[str] | np.ndarray) -> GeneVocab:
        tokens = list(dict.fromkeys(str(g) for g in genes))
        return cls({t: i for i, t in enumerate(tokens + [t for t in SPECIAL_TOKENS if t not in tokens])})

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        with open(path) as fh:
            vocab = json.load(fh)
        if not isinstance(vocab, dict):
            raise ScdcaInputError(f"{path}: vocab.json must map token -> id")
        return cls({str(k): int(v) for k, v in vocab.items()})

    def __len__(self) -> int:
        return max(self.token_to_id.values()) + 1

    def __getitem__(self, token: str) -> int:
        return self.token_to_id[token]

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_id

    def map_genes(self, genes: Sequence[str] | np.ndarray) -> GeneMapping:
        """Map gene symbols to ids. Genes not in the vocabulary are excluded, and reported."""
        genes = [str(g) for g in genes]
        kept = np.array([g in self.token_to_id and g not in SPECIAL_TOKENS for g in genes])
        ids = np.array([self.token_to_id[g] for g, k in zip(genes, kept) if k], dtype=np.int64)
        oov = [g for g, k in zip(genes, kept) if not k]
        if oov:
            log.warning(
                "%d of %d genes are not in the backbone vocabulary and are excluded, e.g. %s",
                len(oov),
                len(genes),
                oov[:10],
            )
        return GeneMapping(ids=ids, kept=kept, oov=oov)


@dataclass
class GeneMapping:
    ids: np.ndarray  # vocabulary ids of the kept genes, in data order
    kept: np.ndarray  # (G,) bool: gene is in the vocabulary
    oov: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- checkpoints

_LAYOUT_RENAMES = (
    ("self_attn._impl.Wqkv.", "self_attn.in_proj_"),
    ("self_attn._impl.out_proj.", "self_attn.out_proj."),
    ("self_attn.Wqkv.", "self_attn.in_proj_"),
)
# Keys of released checkpoints that this model does not use: reported, then ignored.
_IGNORED_PREFIXES = ("flag_encoder.", "cls_decoder.", "grad_reverse_discriminator.", "batch_encoder.", "dsbn.", "bn.")


def normalise_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename flash-attention layout keys to torch's in_proj layout (no reshaping needed)."""
    out = {}
    for key, value in state.items():
        for old, new in _LAYOUT_RENAMES:
            if old in key:
                key = key.replace(old, new)
                break
        out[key] = value
    return out


@dataclass
class LoadReport:
    ignored: list[str]
    missing: list[str]


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", strict: bool = True) -> Backbone:
    """Load a scGPT-format checkpoint folder (best_model.pt, args.json, vocab.json).

    Args:
        path: the folder.
        device: where to put the model.
        strict: refuse checkpoints that lack keys of the model (e.g. no decoder).
    Returns:
        Backbone in eval mode, with `.vocab` (GeneVocab) and `.load_report` attached.

    Example:
        >>> model = scdca.nn.backbone.load("models/scGPT_human")
    """
    folder = Path(path)
    for name in ("best_model.pt", "args.json", "vocab.json"):
        if not (folder / name).exists():
            raise ScdcaInputError(
                f"checkpoint folder {str(folder)!r} has no {name}; expected best_model.pt, "
                f"args.json and vocab.json (scGPT's release format)"
            )
    vocab = GeneVocab.load(folder / "vocab.json")
    args = json.loads((folder / "args.json").read_text())
    state = torch.load(folder / "best_model.pt", map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    state = normalise_keys(state)
    args = {**args, "do_mvc": any(k.startswith("mvc_decoder.") for k in state)}
    cfg = BackboneConfig.from_args(args, vocab.token_to_id)
    model = Backbone(cfg)
    expected = model.state_dict()
    ignored = sorted(k for k in state if k not in expected)
    unknown = [k for k in ignored if not k.startswith(_IGNORED_PREFIXES)]
    if unknown:
        log.warning("checkpoint keys not used by scdca (ignored): %s", unknown[:10])
    if ignored:
        log.info("ignored checkpoint keys: %s", ignored)
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ScdcaInputError(
                f"checkpoint key {key!r}: expected shape {tuple(expected[key].shape)} from "
                f"args.json/vocab.json, found {tuple(value.shape)}"
            )
    missing = sorted(k for k in expected if k not in state)
    if missing and strict:
        raise ScdcaInputError(
            f"checkpoint lacks {len(missing)} key(s) of the model, e.g. {missing[:5]}; "
            f"pass strict=False to keep their random initialisation"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.vocab = vocab
    model.load_report = LoadReport(ignored=ignored, missing=missing)
    return model.to(device).eval()


RANDOM_PREFIX = "random:"


def is_random(spec: str | os.PathLike) -> bool:
    """Whether a backbone spec names an untrained backbone ('random:<layers>x<dim>')."""
    return os.fspath(spec).startswith(RANDOM_PREFIX)


def reference(spec: str | os.PathLike) -> str:
    """How a backbone spec is recorded in saved files: an absolute folder, or the 'random:' spec."""
    return os.fspath(spec) if is_random(spec) else os.path.abspath(spec)


def resolve(
    spec: str | os.PathLike, *, genes: Sequence[str] | np.ndarray | None = None, device: str | torch.device = "cpu"
) -> Backbone:
    """A checkpoint folder (see `load`) or 'random:<layers>x<dim>': an untrained backbone.

    The random backbone (for the 'does pretraining help?' ablation) has a vocabulary of
    `genes`, 4 heads (1 if dim is not divisible by 4), d_hid = dim, and weights drawn from
    a fixed seed, so the same spec and genes always give the same weights (and hash).

    Example:
        >>> bb = scdca.nn.backbone.resolve("random:4x128", genes=["g0", "g1"])
    """
    text = os.fspath(spec)
    if not is_random(text):
        return load(text, device=device)
    try:
        layers, dim = (int(x) for x in text[len(RANDOM_PREFIX) :].lower().split("x"))
        if layers < 1 or dim < 4:
            raise ValueError
    except ValueError:
        raise ScdcaInputError(
            f"backbone: {text!r} is not 'random:<layers>x<dim>' with layers >= 1 and dim >= 4, e.g. 'random:4x128'"
        ) from None
    if genes is None:
        raise ScdcaInputError("backbone: a random backbone needs the gene list to build its vocabulary")
    vocab = GeneVocab.from_genes([str(g) for g in genes])
    cfg = BackboneConfig(
        ntoken=len(vocab),
        d_model=dim,
        nhead=4 if dim % 4 == 0 else 1,
        d_hid=dim,
        nlayers=layers,
        dropout=0.1,
        pad_token_id=vocab["<pad>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Backbone(cfg)
    model.vocab = vocab
    model.load_report = LoadReport(ignored=[], missing=[])
    return model.to(device).eval()


def save(model: Backbone, vocab: GeneVocab, path: str | os.PathLike, *, extra_args: dict | None = None) -> None:
    """Write best_model.pt (torch layout), args.json and vocab.json; each file atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(folder / "best_model.pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    storage.write_json(folder / "args.json", {**model.cfg.to_args(), **(extra_args or {})})
    storage.write_json(folder / "vocab.json", vocab.token_to_id)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of every tensor in the state_dict."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()
