"""The drug-conditional adapter (scDCA, eq. 5) and the modules that inject a drug.

After transformer layer l, with hidden states h_l (B, T, D) and drug condition c (B, C):

    b_l    = f_l(c)                              two-layer molecule projection, (B, D)
    down   = W_down h_l + b_l[:, :r]             (B, T, r)   r = bottleneck
    z      = res_net(down)                       residual block in the bottleneck
    up     = W_up z + b_l                        (B, T, D)
    h_l+1  = h_l + up                            (skip=True, our default)
    h_l+1  = up                                  (skip=False, the equations as printed)

To first order the drug enters this adapter only through b_l, which is the same for
every gene token, so drug-specific *per-gene* changes must come from nonlinearities.
`modulation="film"` (our extension, not in the paper) also lets the drug scale the
bottleneck channels, down = (W_down h_l) * (1 + g_l) + b_l[:r] with g_l = f_l(c)[D:],
which gives each drug its own low-rank gene-specific change W_up diag(g_l) W_down h_l.

The skip connection plus zero-initialised W_up and last layer of f_l make the adapted
model equal the frozen backbone at step 0 (as LoRA starts at the base model). Without
it the first step would feed zeros to every frozen layer after the first adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class AdapterConfig:
    d_model: int
    cond_dim: int  # molecule embedding + dose features
    bottleneck: int = 16
    proj_hidden: int = 64
    residual: bool = True  # False: a plain nonlinearity in the bottleneck (Houlsby-style ablation)
    skip: bool = True  # False: replace h_l by the adapter output, as eq. 5 is printed
    modulation: str = "bias"  # "bias" (paper) or "film" (drug also scales the bottleneck channels)


class BottleneckResBlock(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(r, r), nn.Linear(r, r)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, r) -> (B, T, r)
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class DrugConditionalAdapter(nn.Module):
    """One adapter; wraps nothing itself: the model calls it on each layer's output."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        if cfg.bottleneck > cfg.d_model:
            raise ValueError(f"bottleneck {cfg.bottleneck} exceeds d_model {cfg.d_model}")
        if cfg.modulation not in ("bias", "film"):
            raise ValueError(f"modulation {cfg.modulation!r} is not 'bias' or 'film'")
        self.cfg = cfg
        n_out = cfg.d_model + (cfg.bottleneck if cfg.modulation == "film" else 0)
        self.mol_proj = nn.Sequential(
            nn.Linear(cfg.cond_dim, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, n_out)
        )  # f_l
        self.down = nn.Linear(cfg.d_model, cfg.bottleneck, bias=False)
        self.mid = BottleneckResBlock(cfg.bottleneck) if cfg.residual else nn.GELU()
        self.up = nn.Linear(cfg.bottleneck, cfg.d_model, bias=False)
        nn.init.zeros_(self.up.weight)
        zero_output(self.mol_proj)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:  # (B, T, D), (B, C) -> (B, T, D)
        r, D = self.cfg.bottleneck, self.cfg.d_model
        f = self.mol_proj(cond)  # (B, D) or (B, D + r) with film
        b = f[:, :D]
        down = self.down(h)  # (B, T, r)
        if self.cfg.modulation == "film":
            down = down * (1.0 + f[:, None, D:])
        down = down + b[:, None, :r]
        up = self.up(self.mid(down)) + b[:, None, :]  # (B, T, D)
        return h + up if self.cfg.skip else up


@dataclass
class DrugGeneConfig:
    d_model: int
    cond_dim: int
    n_genes: int  # gene tokens the model reads (T), each with its own free loading vector
    rank: int = 32  # number of response axes shared by all drugs
    hidden: int = 128  # width of the drug projection q
    dropout: float = 0.0  # dropout on q's molecule features and hidden layer while training
    free_genes: bool = True  # the free per-gene loadings E; False: loadings come from the hidden states alone


class DrugGeneHead(nn.Module):
    """A low-rank drug x gene output (our extension, not in the paper).

        change[b, t] = sum_k L[b, t, k] * w(c_b)_k,   L[b, t] = A LN(h[b, t]) + E[t]
        w(c) = u(m) * sigmoid(alpha(m) + beta(m) t)       c = [molecule m, scaled log dose t]

    Each gene token's loadings on `rank` response axes come from its hidden state h
    (context-specific: h depends on the cell line's control; A: D -> rank, shared by all
    genes; LN a LayerNorm without weights) plus a free per-gene vector E[t]. The drug
    condition gives the axes' weights w (q: two-layer MLP on the molecule, last layer
    zero-initialised, so the head starts at 'no change'). E is needed because a linear
    read-out of D-dim hidden states spans at most D gene patterns; measured on the demo
    (256 genes, D = 128), A h alone fitted the training drugs barely better than 'no
    change' (docs/archive/journal.md, 'Ablation: without the free per-gene loadings E'). The dose
    enters only through a per-molecule sigmoid gate, so all doses of a drug share one
    direction: with a free function of (m, t) each noisy condition was fitted on its own.
    `dropout` on q trades fitting the training molecules for smoothness across molecules
    (better for new molecules, worse for seen ones; DECISIONS.md D15).
    `free_genes=False` drops E (an ablation: what the backbone's gene states carry alone;
    docs/archive/journal.md, session 7).
    """

    def __init__(self, cfg: DrugGeneConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.gene_proj = nn.Linear(cfg.d_model, cfg.rank)  # A
        if cfg.free_genes:
            self.gene_emb = nn.Parameter(0.1 * torch.randn(cfg.n_genes, cfg.rank))  # E, (T, K)
        else:  # ablation: every gene's loadings are read from its hidden state (what the backbone knows)
            self.register_buffer("gene_emb", torch.zeros(cfg.n_genes, cfg.rank), persistent=False)
        # q reads the molecule only (cond without its last column, the dose t) and returns the
        # drug's direction u (rank) and two dose-gate parameters (alpha, beta)
        self.drug_proj = nn.Sequential(
            nn.Linear(cfg.cond_dim - 1, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.rank + 2)
        )
        zero_output(self.drug_proj)

    def forward(
        self, h: Tensor, cond: Tensor, rows: Tensor | None = None, molecules: MoleculeGroups | None = None
    ) -> Tensor:
        """h (B, T, D), cond (B, C) -> (B, T). With `rows` (B,), h holds one entry per cell
        line (L, T, D) and row b reads line rows[b]: loadings are computed once per line.
        `molecules`: cond's rows grouped by molecule (`group_molecules(cond)`), for callers that
        pass the same rows every step; computed when omitted."""
        loadings = self.gene_proj(self._normalised(h)) + self.gene_emb  # (B or L, T, K)
        weights = self.drug_weights(cond, molecules)  # (B, K)
        if rows is None:
            return torch.einsum("btk,bk->bt", loadings, weights)
        # One matmul per line, on the rows sorted by line. Gathering loadings[rows] would
        # materialise (B, T, K); indexing loadings[line] once per line would cost, in backward, a
        # full-size zero tensor per line (80% of a step on 86 lines). unbind's backward is one stack.
        order = torch.argsort(rows, stable=True)
        lines, counts = torch.unique_consecutive(rows[order], return_counts=True)
        per_line = loadings.unbind(0)
        chunks = weights[order].split(counts.tolist())
        out = torch.cat([w @ per_line[line].T for line, w in zip(lines.tolist(), chunks)])  # (B, T), sorted
        return out[torch.argsort(order)]

    def _normalised(self, h: Tensor) -> Tensor:
        """LN(h), kept while the same frozen states come back (training passes one cached tensor
        every step); recomputed for any other tensor or when h needs a gradient."""
        if h.requires_grad:
            return self.norm(h)
        kept = getattr(self, "_norm_kept", None)  # (h, its version, LN(h)); holding h keeps its id unique
        if kept is None or kept[0] is not h or kept[1] != h._version:
            kept = self._norm_kept = (h, h._version, self.norm(h))
        return kept[2]

    def _drop(self, x: Tensor) -> Tensor:
        """Dropout with a mask from `torch.rand_like` (on CPU twice as fast as torch's own dropout,
        which was a third of a training step; the same distribution, another random stream)."""
        p = self.cfg.dropout
        if not self.training or p == 0.0:
            return x
        if p >= 1.0:  # everything dropped, as torch's dropout does
            return torch.zeros_like(x)
        return x * (torch.rand_like(x) >= p) / (1.0 - p)

    def drug_weights(self, cond: Tensor, molecules: MoleculeGroups | None = None) -> Tensor:  # (B, C) -> (B, K)
        """u(m) * sigmoid(alpha(m) + beta(m) t): one direction per molecule m, scaled by a
        sigmoid in the scaled log dose t that rises with dose (beta > 0), as a Hill curve."""
        first, act, last = self.drug_proj
        if self.training and self.cfg.dropout > 0.0:  # each row its own dropout mask
            out = last(self._drop(act(first(self._drop(cond[:, :-1])))))  # (B, K + 2)
        else:  # the rows of one molecule (its doses, lines) share q(m): computed once per molecule
            groups = molecules if molecules is not None else group_molecules(cond)
            out = groups.select @ self.drug_proj(groups.molecules)  # (B, M) @ (M, K + 2)
        u, alpha, beta = out[:, :-2], out[:, -2], out[:, -1]
        gate = torch.sigmoid(alpha + 8.0 * nn.functional.softplus(beta) * (cond[:, -1] - 0.5))  # (B,)
        return u * gate[:, None]


@dataclass
class MoleculeGroups:
    """The rows of a batch of drug conditions grouped by molecule: `molecules` (M, C - 1) the
    distinct molecule embeddings, `select` (B, M) one-hot, row b -> its molecule. A one-hot
    matmul rather than an index: an index's backward sums repeated rows in a thread-dependent
    order (DECISIONS.md D18)."""

    molecules: Tensor
    select: Tensor


def group_molecules(cond: Tensor) -> MoleculeGroups:
    """Group the rows of cond (B, C: molecule embedding, then the scaled dose) by molecule.

    Rows are grouped by a fixed random projection of the embedding, and the grouping is checked
    exactly; should two different molecules ever share a projection, each row is its own group.
    The projection can round one molecule's rows differently at different positions of a batch,
    splitting them into two groups: harmless (each group computes the same q(m)), and kept so,
    because routed's training amplifies rounding (DECISIONS.md, open questions).
    """
    x = cond[:, :-1].detach()
    probe = torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64, device=x.device).sin()  # fixed, irregular
    _, index = torch.unique(x.double() @ probe, return_inverse=True)  # (B,)
    n = int(index.max()) + 1 if len(index) else 0
    first = torch.empty(n, dtype=torch.long, device=x.device).scatter_(0, index, torch.arange(len(x), device=x.device))
    molecules = x[first]  # (M, C - 1): one row of each group
    if not torch.equal(molecules[index], x):
        molecules, index = x, torch.arange(len(x), device=x.device)
    select = nn.functional.one_hot(index, len(molecules)).to(x.dtype)  # (B, M)
    return MoleculeGroups(molecules, select)


def zero_output(module: nn.Module) -> None:
    """Zero a Linear layer, or a Sequential's last one: the module then outputs its zero (a
    bias-free nothing) until it trains, so whatever it is added to starts unchanged."""
    last = module[-1] if isinstance(module, nn.Sequential) else module
    if not isinstance(last, nn.Linear):
        raise TypeError(f"zero_output: {type(last).__name__} is not a Linear layer")
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


def count_parameters(module: nn.Module, *, exclude: tuple[str, ...] = ()) -> dict[str, float]:
    """Total and trainable parameter counts and the trainable percentage (names in `exclude` skipped)."""
    named = [(n, p) for n, p in module.named_parameters() if not n.startswith(exclude)]
    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module
