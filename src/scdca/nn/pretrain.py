"""Pretrain a backbone with scGPT's masked-expression objective where no weights exist.

Each training example is one cell: a random subset of `seq_len` genes (tokens) with
their log1p-normalised values; a share `mask_ratio` of the values is replaced by
`mask_value` and the model predicts them (MSE on masked positions only). Values are
fed continuously, as scGPT's perturbation fine-tuning and scDCA do (scGPT's own
pretraining binned them). A <cls> token (value 0) leads every sequence.

Cells: on a perturbation screen only the vehicle controls are used unless
`include_perturbed=True`. Perturbed cells include those of the conditions a benchmark
later tests, so pretraining on them lets the backbone see test responses (a
transductive leak). A file without control/drug columns (an atlas) is used whole. What
the backbone saw is recorded in `pretrain_summary.json` and `args.json` (`provenance`),
and `scdca benchmark` reports it.

The run writes a checkpoint folder in scGPT's release format (`best_model.pt`,
`args.json`, `vocab.json`) that `scdca.nn.backbone.load` reads, keeping the weights with
the best validation loss. It is resumable: `train_state.pt` is saved atomically every
`save_every` steps and a rerun continues from it to the same result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scdca import storage
from scdca.data.expression import (
    looks_like_counts,
    normalize_log1p,
    says_log_scale,
    select_genes,
    validated_genes,
    validated_matrix,
)
from scdca.data.keys import DataKeys
from scdca.data.screen import control_flags, read
from scdca.errors import ScdcaInputError
from scdca.nn import distributed
from scdca.nn.backbone import Backbone, BackboneConfig, GeneVocab, save
from scdca.nn.distributed import Precision, check_precision
from scdca.nn.train import ResumeFile, optimizer_step
from scdca.nn.train import progress as progress_bar

log = logging.getLogger(__name__)
MASK_VALUE = -1.0  # scGPT's mask_value


@dataclass
class PretrainConfig:
    """Settings of `scdca pretrain`. Defaults give the small demo backbone (~0.6M parameters)."""

    layers: int = 4
    dim: int = 128
    heads: int = 4
    d_hid: int | None = None  # defaults to dim, as in scGPT_human
    genes: int | None = None  # keep the top-N highly variable genes (None: all)
    seq_len: int = 128  # genes per training example
    mask_ratio: float = 0.4
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    dropout: float = 0.1
    val_fraction: float = 0.1
    val_cells: int = 512
    eval_every: int = 100
    save_every: int = 50
    seed: int = 0
    device: str | None = None
    include_perturbed: bool = False  # also pretrain on drug-treated cells (leaks test responses)
    precision: Precision = "auto"  # bf16 autocast on CUDA, fp32 on CPU; "bf16" forces it, "fp32" turns it off

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ScdcaInputError(f"mask_ratio: {self.mask_ratio!r} must be in (0, 1)")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ScdcaInputError("steps, batch_size must be >= 1 and seq_len >= 2")
        check_precision(self.precision)


def _expression(adata: ad.AnnData, keys: DataKeys, n_genes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Log-normalised dense float32 expression (cells x genes) and gene names."""
    genes = validated_genes(adata, keys)
    X = validated_matrix(adata, keys)
    if not says_log_scale(adata) and looks_like_counts(X):
        X = normalize_log1p(X)
    keep = select_genes(X, genes, genes=None, n_top_genes=n_genes)
    X = X[:, keep]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return X.astype(np.float32), genes[keep]


class _Batches:
    """Deterministic masked examples: gene subset, masked values, targets."""

    def __init__(self, X: np.ndarray, gene_ids: np.ndarray, cfg: PretrainConfig, vocab: GeneVocab):
        self.X, self.gene_ids, self.cfg = X, gene_ids, cfg
        self.cls_id = vocab["<cls>"]
        self.seq = min(cfg.seq_len, X.shape[1])

    def make(self, cells: np.ndarray, rng: np.random.Generator):
        B, S = len(cells), self.seq
        cols = np.stack([rng.choice(self.X.shape[1], size=S, replace=False) for _ in range(B)])  # (B, S)
        values = self.X[cells[:, None], cols]  # (B, S)
        masked = rng.random((B, S)) < self.cfg.mask_ratio
        masked[np.arange(B), rng.integers(S, size=B)] = True  # at least one masked gene per cell
        inp = np.where(masked, MASK_VALUE, values)
        ids = np.concatenate([np.full((B, 1), self.cls_id), self.gene_ids[cols]], 1)
        inp = np.concatenate([np.zeros((B, 1), np.float32), inp], 1)
        mask = np.concatenate([np.zeros((B, 1), bool), masked], 1)
        target = np.concatenate([np.zeros((B, 1), np.float32), values], 1)
        return (
            torch.from_numpy(ids).long(),
            torch.from_numpy(inp.astype(np.float32)),
            torch.from_numpy(mask),
            torch.from_numpy(target.astype(np.float32)),
            cols,
        )


def pretrain(
    data: ad.AnnData | str | os.PathLike,
    out: str | os.PathLike,
    cfg: PretrainConfig = PretrainConfig(),
    *,
    keys: DataKeys = DataKeys(),
    progress: bool = True,
    _stop_after: int | None = None,
    compounds: str | os.PathLike | None = None,
) -> dict:
    """Pretrain a backbone on the cells of any AnnData; returns the run summary.

    Args:
        data: AnnData (counts or log-normalised) or path to .h5ad.
        out: output folder (checkpoint, logs; resumes from `train_state.pt` if present).
        cfg: settings.
        keys: only `layer` and `gene_symbols` are used.
        progress: show a progress bar.
        _stop_after: for tests: stop abruptly (KeyboardInterrupt) after this many steps of this run.
    Returns:
        dict with the best validation loss, the gene-mean and linear (`linear_baseline`)
        references on the same masked values, steps, seconds and parameter count (also
        written to `pretrain_summary.json`).

    Example:
        >>> scdca.nn.pretrain.pretrain("cells.h5ad", "models/demo_backbone")
    """
    out = Path(out)
    X, genes, provenance = _cells(data, keys, cfg, compounds)
    ctx = distributed.context(cfg.device)  # one of several torchrun processes (DDP), or alone
    if ctx.world > cfg.batch_size:
        raise ScdcaInputError(
            f"batch_size: {cfg.batch_size} cells cannot be shared by {ctx.world} processes; "
            f"use a batch of at least {ctx.world} (--batch-size)"
        )
    run = _Run.build(X, genes, cfg, ctx)
    resume = ResumeFile(
        out / "train_state.pt",
        {"config": asdict(cfg), "genes": list(map(str, genes))},
        what="out",
        mismatch="holds a pretraining run with other settings or data; use a new --out folder or delete it to "
        "start over",
    )
    state = resume.load()
    if state is not None:
        run.restore(state)
        log.info("pretrain: resuming at step %d", run.step)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = progress_bar(
        total=cfg.steps, initial=run.step, enabled=progress and ctx.is_main, desc="pretrain", unit="step"
    )
    start = run.step
    while run.step < cfg.steps:
        if _stop_after is not None and run.step - start >= _stop_after:
            raise KeyboardInterrupt(f"stopped after step {run.step}")
        train_loss = run.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}")
        if (run.step % cfg.eval_every == 0 or run.step == cfg.steps) and run.evaluate(train_loss) and ctx.is_main:
            extra = {"pretrained_by": "scdca pretrain", "seq_len": cfg.seq_len, "provenance": provenance}
            save(run.model, run.vocab, out, extra_args=extra)
        if (run.step % cfg.save_every == 0 or run.step == cfg.steps) and ctx.is_main:
            resume.save(**run.state())
    bar.close()
    return _finish(run, out, provenance, seconds=time.perf_counter() - t0)


def _cells(data, keys: DataKeys, cfg: PretrainConfig, compounds) -> tuple[np.ndarray, np.ndarray, dict]:
    """The expression matrix (cells, genes) to pretrain on, its gene names and where it came from."""
    adata = data if isinstance(data, ad.AnnData) else read(data, compounds=compounds, keys=keys)
    adata, provenance = select_cells(adata, keys, include_perturbed=cfg.include_perturbed)
    if not isinstance(data, ad.AnnData):
        provenance = {"data_file": os.path.abspath(data), "data_sha256": storage.file_sha256(data), **provenance}
    X, genes = _expression(adata, keys, cfg.genes)
    if X.shape[0] < 10:
        raise ScdcaInputError(f"data: {X.shape[0]} cells are too few to pretrain on; use >= 10")
    return X, genes, provenance


class _Run:
    """One pretraining run's state: the model, its optimiser and schedule, the fixed validation
    batch with its two references (gene means, PCA), the step counter and the history."""

    cfg: PretrainConfig
    ctx: Any  # distributed.Context
    n_genes: int
    val_cells: np.ndarray
    train_cells: np.ndarray
    vocab: GeneVocab
    batches: _Batches
    model: Backbone
    opt: torch.optim.Optimizer
    runner: Any  # the model, or its DDP wrapper
    sched: torch.optim.lr_scheduler.LambdaLR
    val: tuple  # (ids, values, mask, target, gene positions) of the fixed validation batch
    baseline: float
    linear: Any
    step: int
    best: float
    history: list

    @classmethod
    def build(cls, X: np.ndarray, genes: np.ndarray, cfg: PretrainConfig, ctx) -> _Run:
        run = cls()
        run.cfg, run.ctx, run.n_genes = cfg, ctx, len(genes)
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(X.shape[0])
        n_val = max(1, min(cfg.val_cells, int(round(cfg.val_fraction * X.shape[0]))))
        run.val_cells, run.train_cells = order[:n_val], order[n_val:]
        run.vocab = GeneVocab.from_genes(genes)
        run.batches = _Batches(X, np.array([run.vocab[g] for g in genes], dtype=np.int64), cfg, run.vocab)
        bcfg = BackboneConfig(
            ntoken=len(run.vocab),
            d_model=cfg.dim,
            nhead=cfg.heads,
            d_hid=cfg.d_hid or cfg.dim,
            nlayers=cfg.layers,
            dropout=cfg.dropout,
            pad_token_id=run.vocab["<pad>"],
        )
        torch.manual_seed(cfg.seed)
        run.model = Backbone(bcfg).to(ctx.device)
        run.opt = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr, weight_decay=0.01)
        run.runner = distributed.wrap(run.model, ctx)  # DDP with several processes: gradients averaged over ranks
        run.sched = torch.optim.lr_scheduler.LambdaLR(
            run.opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / cfg.steps)
        )
        # fixed validation examples and the gene-mean baseline on exactly those masked values
        run.val = run.batches.make(run.val_cells, np.random.default_rng([cfg.seed, 1]))
        gene_mean = X[run.train_cells].mean(0)
        base_pred = np.concatenate([np.zeros((n_val, 1), np.float32), gene_mean[run.val[4]]], 1)
        run.baseline = float(((torch.from_numpy(base_pred) - run.val[3])[run.val[2]] ** 2).mean())
        run.linear = linear_baseline(X, run.train_cells, run.val, seed=cfg.seed)
        run.step, run.best, run.history = 0, float("inf"), []
        return run

    def train_step(self) -> float:
        """One optimiser step on a fresh batch; returns its masked MSE (over all ranks)."""
        cfg, ctx, device = self.cfg, self.ctx, self.ctx.device
        # batch composition depends only on (seed, step): identical after a resume
        brng = np.random.default_rng([cfg.seed, 2, self.step])
        cells = self.train_cells[brng.integers(len(self.train_cells), size=cfg.batch_size)]
        ids, inp, mask, target, _ = self.batches.make(cells, brng)  # the global batch; this rank keeps its rows
        n_masked = int(mask.sum())
        ids, inp, mask, target = (distributed.shard(t, ctx) for t in (ids, inp, mask, target))
        self.model.train()
        with distributed.autocast(device, cfg.precision):
            pred = self.runner(ids.to(device), inp.to(device))["pred"]
        sq_err = ((pred.float() - target.to(device))[mask.to(device)] ** 2).sum()
        loss = distributed.global_mean_loss(sq_err, n_masked, ctx)
        optimizer_step(loss, self.opt, clip=1.0, params=self.model.parameters(), schedule=self.sched)
        self.step += 1
        return float(distributed.all_sum(sq_err, ctx)) / n_masked

    def evaluate(self, train_loss: float) -> bool:
        """Score the validation batch, log it; True when it is the best so far."""
        val_loss = _evaluate(self.model, self.val, self.ctx.device)
        self.history.append(
            {
                "step": self.step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "gene_mean_baseline": self.baseline,
                "linear_baseline": self.linear,
            }
        )
        if val_loss < self.best:
            self.best = val_loss
            return True
        return False

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "step": self.step,
            "best": self.best,
            "history": self.history,
        }

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.best, self.history = state["step"], state["best"], state["history"]


def _finish(run: _Run, out: Path, provenance: dict, *, seconds: float) -> dict:
    """The run summary; warns when the backbone learned little, writes the log and summary."""
    learned = coexpression_learned(run.best, run.baseline, run.linear)
    summary = {
        "best_val_loss": run.best,
        "gene_mean_baseline_val_loss": run.baseline,
        "linear_baseline_val_loss": run.linear,
        "coexpression_learned": learned,
        "steps": run.step,
        "seconds_this_run": seconds,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "genes": run.n_genes,
        "train_cells": int(len(run.train_cells)),
        "val_cells": int(len(run.val_cells)),
        "config": asdict(run.cfg),
        "provenance": provenance,
    }
    if run.ctx.is_main and learned < LEARNED_ENOUGH:
        log.warning(
            "pretrain: validation MSE %.4f is %s (gene means %.4f, PCA %.4f): the backbone has learned "
            "little that adapters can reuse; pretrain with more --steps (the demo needs 3000) or check --lr",
            run.best,
            describe_learned(learned),
            run.baseline,
            run.linear,
        )
    if run.ctx.is_main:
        storage.write_csv(out / "pretrain_log.csv", pd.DataFrame(run.history))
        storage.write_json(out / "pretrain_summary.json", summary)
    return summary


def select_cells(adata: ad.AnnData, keys: DataKeys, *, include_perturbed: bool) -> tuple[ad.AnnData, dict]:
    """The cells to pretrain on and a record of what they are (see the module docstring)."""
    flags = control_flags(adata, keys)
    lines = adata.obs[keys.cell_line].astype(str) if keys.cell_line in adata.obs.columns else None
    if flags is None:
        keep = np.ones(adata.n_obs, dtype=bool)
        n_perturbed = 0
    elif include_perturbed:
        keep = np.ones(adata.n_obs, dtype=bool)
        n_perturbed = int((~flags).sum())
        if n_perturbed:
            log.warning(
                "pretrain: %d drug-treated cells are included (--include-perturbed); any benchmark on this "
                "file then tests conditions whose cells the backbone has seen (transductive leak)",
                n_perturbed,
            )
    else:
        keep, n_perturbed = flags, 0
        if not keep.any():
            raise ScdcaInputError(
                f"data: no control cells found (obs[{keys.control!r}] / control drug names in "
                f"obs[{keys.drug!r}]); flag the vehicle cells, or pass --include-perturbed to "
                f"pretrain on treated cells (they leak test responses into the backbone)"
            )
        if (~flags).any():
            log.info(
                "pretrain: using the %d control cells only (%d drug-treated cells left out; "
                "--include-perturbed uses them)",
                int(keep.sum()),
                int((~flags).sum()),
            )
    seen = sorted(lines[keep].unique()) if lines is not None else []
    provenance = {
        "cells": int(keep.sum()),
        "perturbed_cells": n_perturbed,
        "include_perturbed": include_perturbed,
        "cell_lines": seen[:1000],
        "n_cell_lines": len(seen),
    }
    return (adata if keep.all() else adata[keep].copy()), provenance


LEARNED_ENOUGH = 0.5  # below this share of the gene-mean -> linear gap, `pretrain` warns


def coexpression_learned(val_loss: float, gene_mean: float, linear: float) -> float:
    """Share of the gap from the gene-mean to the linear reference that a backbone closed:
    0 = no better than gene means, 1 = as good as PCA, > 1 = better (NaN without a gap)."""
    gap = gene_mean - linear
    return float((gene_mean - val_loss) / gap) if gap > 0 else float("nan")


def describe_learned(learned: float) -> str:
    """`coexpression_learned` in words."""
    if np.isnan(learned):
        return "not comparable (PCA is no better than the gene means here)"
    if learned < 0:
        return "worse than the gene means"
    return f"{100 * learned:.0f}% of the way from the gene means to PCA"


def linear_baseline(
    X: np.ndarray, cells: np.ndarray, val, *, k: int = 32, max_cells: int = 5_000, seed: int = 0
) -> float:
    """Masked-value MSE of a linear co-expression model (probabilistic PCA) on `val`.

    The top-`k` principal axes V (genes x k, variances lam) of the training cells (rows
    `cells` of X; at most `max_cells` of them, copied once, centred on the gene means mu;
    randomised SVD, so whole transcriptomes stay cheap) and the leftover variance per gene
    s2 are fitted once. Each validation cell's
    scores are their posterior mean given its unmasked values x_o alone,
    z = (V_o'V_o + s2 diag(1/lam))^-1 V_o'(x_o - mu_o), and its masked values are predicted
    as mu + V z. A backbone that does not beat this has learned less gene co-expression than
    PCA, however far below the gene-mean baseline it is.
    """
    from sklearn.utils.extmath import randomized_svd

    rng = np.random.default_rng([seed, 3])
    sample = X[rng.choice(cells, size=min(max_cells, len(cells)), replace=False)]  # (n, G)
    mu = sample.mean(0)
    centred = sample - mu
    n, n_genes = centred.shape
    k = max(1, min(k, n - 1, n_genes - 1))
    _, sv, vt = randomized_svd(centred, n_components=k, random_state=seed)
    V, lam = vt.T, np.maximum(sv**2 / max(n - 1, 1), 1e-12)  # (G, k), (k,)
    total = float(centred.var(0, ddof=1).sum()) if n > 1 else 0.0
    s2 = max((total - float(lam.sum())) / (n_genes - k), 1e-12)
    _, inp, mask, target, cols = val  # (B, 1 + S) with <cls> first; cols (B, S) gene columns
    inp, mask, target = inp[:, 1:].numpy(), mask[:, 1:].numpy(), target[:, 1:].numpy()
    sq, n = 0.0, 0
    for i in range(len(cols)):
        seen, hidden = cols[i][~mask[i]], cols[i][mask[i]]
        A = V[seen]  # (n_seen, k)
        z = np.linalg.solve(A.T @ A + s2 * np.diag(1 / lam), A.T @ (inp[i][~mask[i]] - mu[seen]))
        sq += float(((mu[hidden] + V[hidden] @ z - target[i][mask[i]]) ** 2).sum())
        n += int(mask[i].sum())
    return sq / n


def _evaluate(model: Backbone, val, device) -> float:
    ids, inp, mask, target, _ = val
    model.eval()
    losses, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), 64):
            pred = model(ids[s : s + 64].to(device), inp[s : s + 64].to(device))["pred"].cpu()
            err = (pred - target[s : s + 64])[mask[s : s + 64]] ** 2
            losses += float(err.sum())
            n += int(err.numel())
    return losses / n
