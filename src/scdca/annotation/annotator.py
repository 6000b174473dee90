"""Cell-type annotation with a PEFT-adapted frozen backbone, and attention-based gene ranking.

scPEFT's main task: a classifier reads the `<cls>` token's final hidden state of the
backbone; the backbone stays frozen except for the PEFT method's parts (`scdca.nn.peft`).
Every cell is the same sequence: `<cls>` then the `max_genes` most variable genes of the
reference that the backbone knows, with the cell's log1p values (raw counts are
log-normalised first, as everywhere in scdca).

    ann = Annotator("models/pbmc_backbone", AnnotateConfig(method="lora")).fit(ref, "bulk_labels")
    out = ann.annotate(query)             # obs: scdca_label, scdca_confidence; obsm: scdca_proba
    genes = ann.explain(query, out.obs["scdca_label"])   # tidy: cell_type, gene, attention, rank

`explain` ranks genes per cell type by the attention the `<cls>` token pays them,
averaged over heads, layers and the type's cells (scPEFT's reading of condition-specific
genes from attention).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import cast

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from scdca import storage
from scdca.annotation.config import KEY, AnnotateConfig, CellTypeClassifier
from scdca.data.expression import looks_like_counts, normalize_log1p, validated_matrix
from scdca.data.keys import DataKeys
from scdca.errors import ScdcaInputError
from scdca.nn.adapters import count_parameters
from scdca.nn.backbone import GeneVocab, SelfAttention, is_random, weights_hash
from scdca.nn.backbone import reference as backbone_reference
from scdca.nn.backbone import resolve as resolve_backbone
from scdca.nn.peft import apply as apply_peft
from scdca.nn.peft import trainable_state
from scdca.nn.train import EarlyStopping, fit_epochs, optimizer_step, progress

log = logging.getLogger(__name__)


def expression(adata: ad.AnnData, layer: str | None = None, *, what: str = "reference") -> np.ndarray:
    """Dense log1p expression (cells x genes); raw counts are log-normalised."""
    X = validated_matrix(adata, DataKeys(layer=layer))
    if looks_like_counts(X):
        log.info("%s: raw counts detected; applying normalize_total(1e4) + log1p", what)
        X = normalize_log1p(X)
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


class Annotator:
    """Train a cell-type classifier on a labelled reference; annotate and explain queries.

    Args:
        backbone: checkpoint folder (scGPT format; `scdca pretrain` writes one) or 'random:<layers>x<dim>'.
        cfg: method and training settings.
        device: 'cpu', 'cuda', ... (default: cuda if available).
        progress: show a progress bar while training.
    """

    def __init__(
        self,
        backbone: str | os.PathLike,
        cfg: AnnotateConfig | None = None,
        *,
        device: str | None = None,
        progress: bool = True,
    ):
        self.backbone_spec = os.fspath(backbone)
        self.cfg = cfg or AnnotateConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.cost: dict = {}

    # -- inputs ------------------------------------------------------------------------
    def _build(self, genes: list[str], classes: list[str]) -> None:
        backbone = resolve_backbone(self.backbone_spec, genes=genes, device="cpu")
        self._backbone_hash = weights_hash(backbone)
        self._cls_id = backbone.vocab["<cls>"]
        self.genes, self.classes = list(genes), list(classes)
        self._gene_ids = torch.tensor([backbone.vocab[g] for g in self.genes])
        torch.manual_seed(self.cfg.seed)
        self.net = CellTypeClassifier(apply_peft(backbone, self.cfg.peft), len(classes)).to(self.device)

    def _tokens(self, adata: ad.AnnData, layer: str | None, what: str) -> tuple[Tensor, Tensor]:
        """(ids, values), each (cells, 1 + genes): <cls> then this model's genes (absent ones at 0)."""
        names = pd.Index(adata.var_names.astype(str))
        pos = names.get_indexer(self.genes)
        if (pos < 0).all():
            raise ScdcaInputError(
                f"{what}: none of the model's {len(self.genes)} genes (e.g. {self.genes[:3]}) are "
                f"in its var_names (e.g. {list(names[:3])}); use the same gene symbols as the "
                f"reference"
            )
        if (pos < 0).any():
            log.warning("%s: %d of %d model genes are missing and are set to 0", what, int((pos < 0).sum()), len(pos))
        X = expression(adata, layer, what=what)
        values = np.zeros((adata.n_obs, len(pos) + 1), np.float32)
        values[:, 1:][:, pos >= 0] = X[:, pos[pos >= 0]]
        ids = torch.cat([torch.tensor([self._cls_id]), self._gene_ids]).expand(adata.n_obs, -1)
        return ids, torch.from_numpy(values)

    # -- training ----------------------------------------------------------------------
    def fit(self, reference: ad.AnnData, label_key: str, *, layer: str | None = None) -> Annotator:
        """Train on `reference` (labels in obs[label_key]); the best epoch on a stratified
        validation split is kept."""
        t0 = time.perf_counter()
        labels = _labels(reference, label_key)
        classes = sorted(labels.unique())
        genes = self._choose_genes(reference, layer)
        self._build(genes, classes)
        ids, values = self._tokens(reference, layer, "reference")
        y = torch.from_numpy(pd.Categorical(labels, categories=classes).codes.astype(np.int64))
        tr, va = self._validation_split(y, len(classes))
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=0.01)
        self._count_parameters()
        # a linear probe trains the head only: the frozen backbone's <cls> states are computed once
        feats = self._cls_states(ids, values) if self.cfg.peft.method == "linear" else None  # (N, D)

        def logits(rows: Tensor) -> Tensor:  # (b,) -> (b, K)
            if feats is not None:
                return self.net.head(feats[rows.to(feats.device)])
            return self.net(ids[rows].to(self.device), values[rows].to(self.device))

        rng = np.random.default_rng(self.cfg.seed)
        stopper = EarlyStopping(patience=self.cfg.patience)
        bar = progress(
            range(self.cfg.epochs), enabled=self.progress, desc=f"annotate ({self.cfg.peft.method})", unit="epoch"
        )

        def run_epoch(epoch: int) -> tuple[float, bool]:
            self.net.train()
            if not (self.cfg.backbone_dropout or self.cfg.peft.method == "full"):
                self.net.backbone.eval()  # frozen weights: no dropout; the PEFT parts have none of their own
            order = rng.permutation(tr)
            for s in range(0, len(order), self.cfg.batch_size):
                b = torch.from_numpy(order[s : s + self.cfg.batch_size])
                loss = F.cross_entropy(logits(b), y[b].to(self.device))
                optimizer_step(loss, opt)
            return loss.item(), False

        def validate(train_loss: float) -> float | None:
            if not len(va):
                return None  # too few cells for a validation split: train on all, keep the last epoch
            if feats is not None:
                with torch.no_grad():
                    return F.cross_entropy(logits(torch.from_numpy(va)), y[va].to(self.device)).item()
            return F.cross_entropy(self._logits(ids[va], values[va]), y[va].to(self.device)).item()

        epochs_run = 1 + fit_epochs(
            bar, run_epoch=run_epoch, validate=validate, stopper=stopper, snapshot=lambda: trainable_state(self.net)
        )
        if stopper.best_state is not None:
            self.net.load_state_dict(stopper.best_state, strict=False)
        best, best_epoch = stopper.best, stopper.best_epoch
        self.cost.update(
            fit_seconds=time.perf_counter() - t0,
            best_val_loss=best if len(va) else None,
            epochs_run=epochs_run,
            best_epoch=best_epoch if len(va) else epochs_run,
        )
        return self

    def _validation_split(self, y: Tensor, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Stratified (train, validation) rows; no validation rows when there are too few cells."""
        from sklearn.model_selection import train_test_split

        n_val = int(round(self.cfg.val_fraction * len(y)))
        if n_val < n_classes:  # too few cells for a validation split: train on all, keep the last epoch
            return np.arange(len(y)), np.array([], dtype=int)
        return tuple(
            train_test_split(np.arange(len(y)), test_size=n_val, stratify=y.numpy(), random_state=self.cfg.seed)
        )

    def _count_parameters(self) -> None:
        """What trains (backbone PEFT parts + head) into the cost table, and say so."""
        counts = count_parameters(self.net.backbone)
        head = sum(p.numel() for p in self.net.head.parameters())
        self.cost = {
            "method": self.cfg.peft.method,
            "params_backbone": counts["total"],
            "params_trainable": counts["trainable"] + head,
            "params_trainable_pct": 100.0 * (counts["trainable"] + head) / (counts["total"] + head),
        }
        log.info(
            "annotate: %s trains %d of %d parameters (%.2f%%)",
            self.cfg.peft.method,
            self.cost["params_trainable"],
            counts["total"] + head,
            self.cost["params_trainable_pct"],
        )

    def _choose_genes(self, reference: ad.AnnData, layer: str | None) -> list[str]:
        names = reference.var_names.astype(str)
        if is_random(self.backbone_spec):  # an untrained backbone gets the reference's genes as vocabulary
            known: set[str] | GeneVocab = set(names)
        else:
            vocab_file = Path(self.backbone_spec) / "vocab.json"
            if not vocab_file.exists():
                raise ScdcaInputError(
                    f"backbone: {self.backbone_spec!r} has no vocab.json; pass a folder written by "
                    f"`scdca pretrain` (or an scGPT release), or random:<layers>x<dim>"
                )
            known = GeneVocab.load(vocab_file)
        shared = [i for i, g in enumerate(names) if g in known]
        if not shared:
            raise ScdcaInputError(
                f"reference: none of its {len(names)} genes (e.g. {list(names[:3])}) are in the "
                f"backbone's vocabulary; pretrain a backbone on these genes (scdca pretrain) or "
                f"map the gene names to the backbone's symbols"
            )
        X = expression(reference, layer)[:, shared]
        top = np.argsort(-X.var(0), kind="stable")[: self.cfg.max_genes]
        return [str(names[shared[i]]) for i in np.sort(top)]

    @torch.no_grad()
    def _cls_states(self, ids: Tensor, values: Tensor, batch: int = 256) -> Tensor:
        """The frozen backbone's <cls> state per cell, in eval mode: (N, T), (N, T) -> (N, D)."""
        self.net.backbone.eval()
        return torch.cat(
            [
                self.net.backbone.encode(ids[s : s + batch].to(self.device), values[s : s + batch].to(self.device))[
                    :, 0
                ]
                for s in range(0, len(ids), batch)
            ]
        )

    # -- prediction --------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, ids: Tensor, values: Tensor, batch: int = 256) -> Tensor:
        self.net.eval()
        return torch.cat(
            [
                self.net(ids[s : s + batch].to(self.device), values[s : s + batch].to(self.device))
                for s in range(0, len(ids), batch)
            ]
        )

    def predict_proba(self, query: ad.AnnData, *, layer: str | None = None) -> pd.DataFrame:
        """Class probabilities, cells x classes."""
        self._check_fitted()
        ids, values = self._tokens(query, layer, "query")
        proba = self._logits(ids, values).softmax(-1).cpu().numpy()
        return pd.DataFrame(proba, index=query.obs_names, columns=self.classes)

    def annotate(self, query: ad.AnnData, *, layer: str | None = None) -> ad.AnnData:
        """A copy of `query` with obs['scdca_label'], obs['scdca_confidence'] (its probability),
        obsm['scdca_proba'] (cells x classes, class names in uns['scdca_annotate']['classes'])."""
        proba = self.predict_proba(query, layer=layer)
        out = query.copy()
        out.obs[f"{KEY}_label"] = pd.Categorical(proba.idxmax(axis=1).to_numpy(), categories=self.classes)
        out.obs[f"{KEY}_confidence"] = proba.max(axis=1).to_numpy()
        out.obsm[f"{KEY}_proba"] = proba.to_numpy(np.float32)
        out.uns[f"{KEY}_annotate"] = {
            "classes": np.array(self.classes),
            "method": self.cfg.peft.method,
            "backbone": backbone_reference(self.backbone_spec),
            "params_trainable_pct": float(self.cost.get("params_trainable_pct", np.nan)),
        }
        return out

    @torch.no_grad()
    def explain(self, adata: ad.AnnData, groups, *, layer: str | None = None, batch: int = 128) -> pd.DataFrame:
        """Genes ranked per group by the attention the <cls> token pays them.

        Attention rows of <cls> (over the gene tokens, its own column dropped and the rest
        renormalised) are averaged over heads, layers and the group's cells.
        Returns a tidy table: group, gene, attention, rank (1 = most attended).
        """
        self._check_fitted()
        groups = np.asarray(groups).astype(str)
        if len(groups) != adata.n_obs:
            raise ScdcaInputError(f"groups: {len(groups)} labels for {adata.n_obs} cells; give one per cell")
        ids, values = self._tokens(adata, layer, "explain")
        attns = [m for m in self.net.modules() if isinstance(m, SelfAttention)]
        per_cell = []
        self.net.eval()
        try:
            for s in range(0, len(ids), batch):
                for m in attns:
                    m.cls_attention = []
                self.net(ids[s : s + batch].to(self.device), values[s : s + batch].to(self.device))
                a = torch.stack([cast(list, m.cls_attention)[0] for m in attns]).mean((0, 2))[
                    :, 1:
                ]  # (B, G): layers, heads
                per_cell.append((a / a.sum(1, keepdim=True)).cpu().numpy())
        finally:
            for m in attns:
                m.cls_attention = None
        A = np.concatenate(per_cell)
        rows = []
        for g in sorted(set(groups)):
            mean = A[groups == g].mean(0)
            order = np.argsort(-mean, kind="stable")
            rows.append(
                pd.DataFrame(
                    {
                        "group": g,
                        "gene": np.asarray(self.genes)[order],
                        "attention": mean[order],
                        "rank": np.arange(1, len(order) + 1),
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def _check_fitted(self) -> None:
        if not hasattr(self, "net"):
            raise RuntimeError("call fit() (or Annotator.load) first")

    # -- persistence -------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Save what was trained (PEFT parts + head, safetensors) and the settings; the frozen
        backbone is referenced by path and weights hash, not copied."""
        from safetensors.torch import save_file

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with storage.atomic_path(folder / "trained.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in trainable_state(self.net).items()}, str(tmp))
        meta = {
            "model": "annotator",
            "backbone": backbone_reference(self.backbone_spec),
            "backbone_sha256": self._backbone_hash,
            "config": {**asdict(self.cfg), "peft": self.cfg.peft.to_dict()},
            "genes": self.genes,
            "classes": self.classes,
            "cost": self.cost,
        }
        storage.write_model_json(folder, meta, files=["trained.safetensors"])

    @classmethod
    def load(cls, folder: str | os.PathLike, *, device: str | None = None, backbone: str | None = None) -> Annotator:
        """Rebuild a saved annotator on its backbone (refused if the backbone's weights changed)."""
        from safetensors.torch import load_file

        meta = storage.read_model_json(folder)
        if meta.get("model") != "annotator":
            raise ScdcaInputError(f"model: {str(folder)!r} holds a {meta.get('model')!r} model, not an annotator")
        self = cls(backbone or meta["backbone"], AnnotateConfig(**meta["config"]), device=device, progress=False)
        self._build(meta["genes"], meta["classes"])
        if self._backbone_hash != meta["backbone_sha256"]:
            raise ScdcaInputError(
                f"backbone: {self.backbone_spec!r} is not the backbone this annotator was trained "
                f"on (weights differ); pass the original with --backbone"
            )
        state = load_file(str(Path(folder) / "trained.safetensors"))
        missing = set(trainable_state(self.net)) - set(state)
        if missing:
            raise ScdcaInputError(f"model: {str(folder)!r} lacks trained tensors {sorted(missing)[:3]}; resave it")
        self.net.load_state_dict(state, strict=False)
        self.cost = meta.get("cost", {})
        return self


def _labels(reference: ad.AnnData, label_key: str) -> pd.Series:
    if label_key not in reference.obs.columns:
        raise ScdcaInputError(
            f"label-key: {label_key!r} is not an obs column of the reference; available: {list(reference.obs.columns)}"
        )
    labels = reference.obs[label_key]
    if labels.isna().any():
        raise ScdcaInputError(
            f"label-key: {int(labels.isna().sum())} reference cell(s) have no {label_key!r} label; "
            f"drop them (reference[reference.obs[{label_key!r}].notna()])"
        )
    labels = labels.astype(str)
    counts = labels.value_counts()
    single = sorted(counts.index[counts < 2])
    if single:
        raise ScdcaInputError(
            f"label-key: label(s) {single} have a single reference cell; a classifier cannot "
            f"learn or validate them: drop or merge them"
        )
    if len(counts) < 2:
        raise ScdcaInputError(
            f"label-key: {label_key!r} has only one label ({counts.index[0]!r}); nothing to tell apart"
        )
    return labels


def write_explanation(table: pd.DataFrame, out_csv: str | os.PathLike, *, top: int = 10) -> Path:
    """Write the tidy ranking (CSV) and a heatmap PNG next to it: the union of each group's
    top genes (rows) by group (columns), colour = mean <cls> attention. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_csv = Path(out_csv)
    storage.write_csv(out_csv, table)
    genes = list(dict.fromkeys(table.loc[table["rank"] <= top].sort_values(["group", "rank"])["gene"]))
    wide = table.pivot(index="gene", columns="group", values="attention").loc[genes]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * wide.shape[1], 1.0 + 0.22 * wide.shape[0]))
    im = ax.imshow(wide.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(wide.shape[0]), wide.index, fontsize=7)
    ax.set_title(f"<cls> attention, top {top} genes per group", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    png = out_csv.with_suffix(".png")
    with storage.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return png
