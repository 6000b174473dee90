"""The scPEFT command: `annotate` (cell types with a PEFT-tuned frozen backbone)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scdca.cli.options import Command, add_fields, settings
from scdca.errors import ScdcaInputError

if TYPE_CHECKING:
    from scdca.annotation import AnnotateConfig

TRAINING = {
    "epochs": ("--epochs", "at most this many epochs"),
    "patience": ("--patience", "stop after this many epochs without a better validation loss (10%% of the "
                 "reference; the best epoch is kept); 0 = train every epoch"),
    "batch_size": ("--batch-size", None),
    "lr": ("--lr", "default 1e-3 (full: 1e-4)"),
    "max_genes": ("--max-genes", "gene tokens per cell (most variable in the reference)"),
    "backbone_dropout": ("--backbone-dropout", "keep the frozen backbone's dropout while training (an epoch "
                         "costs about 3x on CPU: attention cannot run fused; `full` always keeps it)"),
    "seed": ("--seed", None),
}  # fmt: skip
PEFT = {
    "method": ("--method", None),
    "r": ("--r", "LoRA rank"),
    "prefix_tokens": ("--prefix-tokens", None),
}


def add_commands(sub) -> None:
    from scdca.annotation import AnnotateConfig
    from scdca.nn.peft import PeftConfig

    an = Command(sub, "annotate", cmd_annotate, help="cell-type annotation: a PEFT-tuned backbone and a reference")
    an.add("--reference", required=True, help="labelled .h5ad (log1p values or raw counts in X or --layer)")
    an.add("--query", required=True, help=".h5ad to annotate")
    an.add("--label-key", required=True, help="obs column of the reference with the cell types")
    an.add("--backbone", required=True, help="checkpoint folder (scdca pretrain) or random:<layers>x<dim>")
    add_fields(an, PeftConfig, PEFT)
    an.add("--out", required=True, help="annotated query .h5ad (obs scdca_label, scdca_confidence)")
    an.add("--explain", action="store_true", help="also rank genes per predicted type by <cls> attention: "
           "OUT_genes.csv and a heatmap OUT_genes.png")  # fmt: skip
    an.add("--save-model", default=None, help="folder to save the trained parts in")
    add_fields(an, AnnotateConfig, TRAINING)
    an.add("--layer", default=None)
    an.add("--device", default=None)
    an.add("--quiet", action="store_true")


def annotate_config(args) -> AnnotateConfig:
    """Every registered training and PEFT flag, through `settings` (patience 0: train every epoch)."""
    from dataclasses import replace

    from scdca.annotation import AnnotateConfig
    from scdca.nn.peft import PeftConfig

    cfg = settings(args, AnnotateConfig, TRAINING, peft=settings(args, PeftConfig, PEFT))
    return replace(cfg, patience=cfg.patience or None)


def cmd_annotate(args) -> None:
    from scdca import storage
    from scdca.annotation import Annotator, write_explanation
    from scdca.data.screen import read

    reference = read(args.reference, what="reference")
    query = read(args.query, what="query")
    if not args.out.endswith(".h5ad"):
        raise ScdcaInputError(f"out: {args.out!r} must be an .h5ad path (the annotated query)")
    cfg = annotate_config(args)
    ann = Annotator(args.backbone, cfg, device=args.device, progress=not args.quiet).fit(
        reference, args.label_key, layer=args.layer
    )
    out = ann.annotate(query, layer=args.layer)
    storage.write_h5ad(args.out, out)
    c = ann.cost
    print(
        f"wrote {args.out}: {out.n_obs} cells labelled in obs['scdca_label'] (probabilities in obsm['scdca_proba']); "
        f"{args.method} trained {c['params_trainable']:,} parameters ({c['params_trainable_pct']:.2f}%) in "
        f"{c['fit_seconds']:.0f} s (best epoch {c['best_epoch']} of {c['epochs_run']} run)"
    )
    if c["best_val_loss"] is not None and c["best_epoch"] == c["epochs_run"] == args.epochs > 1:
        print(
            f"note: the last epoch was the best; the model may be undertrained: raise --epochs "
            f"(now {args.epochs}) and set --patience"
        )
    if args.label_key in query.obs:
        truth = query.obs[args.label_key].astype(str).to_numpy()
        pred = out.obs["scdca_label"].astype(str).to_numpy()
        from sklearn.metrics import f1_score

        print(
            f"query has {args.label_key!r}: accuracy {(truth == pred).mean():.3f}, macro-F1 "
            f"{f1_score(truth, pred, average='macro', labels=sorted(set(truth))):.3f}"
        )
    if args.save_model:
        ann.save(args.save_model)
        print(f"wrote {args.save_model} (trained parameters only; the backbone is referenced)")
    if args.explain:
        table = ann.explain(query, out.obs["scdca_label"], layer=args.layer)
        csv = args.out[: -len(".h5ad")] + "_genes.csv"
        png = write_explanation(table, csv)
        print(f"wrote {csv} (genes ranked per predicted cell type by <cls> attention) and {png}")
