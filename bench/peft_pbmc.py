"""scPEFT on real cells: every PEFT method x 5 seeds on scanpy's PBMCs, one run.

Data: `scdca pbmc` (scanpy's pbmc68k_reduced, 700 cells, 10 types in obs['bulk_labels']),
reference = G1-phase cells (501), query = cycling S/G2M cells (199): the query's cell
state was never seen in training (out of context). The backbone is pretrained by
`scdca pretrain` on the reference cells only (no labels, no query cells), once, and reused.

Each (method, seed) fit runs in its own fresh process, one after another: accuracy and
macro-F1 on the query, trainable parameters, fit seconds, and the peak resident memory
added by fit + predict above what the process held before fitting (ru_maxrss delta).
`logreg` is a reference without any backbone: scikit-learn's logistic regression on the
log1p values of the same gene tokens (fit in the bench's own process, seconds; its memory is not
measured). Writes runs/pbmc/peft_results.csv (rows of methods not rerun are kept) and prints
mean ± sd over seeds per method.
Do not run it while another torch job runs: two jobs on 2 cores slow each ~3x.

    python bench/peft_pbmc.py [--seeds 5] [--epochs 100] [--patience 5] [--max-genes 128] [--steps 3000]
        [--out-csv runs/pbmc/peft_results.csv]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RUNS = Path(__file__).resolve().parent.parent / "runs" / "pbmc"
METHODS = ("linear", "lora", "prefix", "adapter", "token", "full", "logreg")

CHILD = r"""
import json, resource, sys
import numpy as np
from sklearn.metrics import f1_score
from scdca.annotation import AnnotateConfig, Annotator
from scdca.data import read
from scdca.nn.peft import PeftConfig
method, seed, epochs, backbone, folder, max_genes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
    sys.argv[5], int(sys.argv[6])
patience = int(sys.argv[7]) if sys.argv[7] != "none" else None
ref, query = read(f"{folder}/reference.h5ad"), read(f"{folder}/query.h5ad")
import torch
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # first optimiser's one-off imports, before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ann = Annotator(backbone, AnnotateConfig(peft=PeftConfig(method=method), epochs=epochs, seed=seed,
                                        max_genes=max_genes, patience=patience), progress=False)
ann.fit(ref, "bulk_labels")
pred = ann.annotate(query).obs["scdca_label"].astype(str).to_numpy()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
truth = query.obs["bulk_labels"].astype(str).to_numpy()
print(json.dumps({"method": method, "seed": seed, "accuracy": float((pred == truth).mean()),
                  "macro_f1": float(f1_score(truth, pred, average="macro", labels=sorted(set(truth)))),
                  "params_trainable": ann.cost["params_trainable"], "trainable_pct": ann.cost["params_trainable_pct"],
                  "fit_seconds": ann.cost["fit_seconds"], "epochs_run": ann.cost["epochs_run"],
                  "best_epoch": ann.cost["best_epoch"], "peak_added_mb": (peak - before) / 1024}))
"""


def logreg(seeds: int, max_genes: int) -> list[dict]:
    """Logistic regression on the annotator's gene tokens (the most variable known genes)."""
    import time

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from scdca.annotation import expression
    from scdca.data.screen import read

    ref, query = read(RUNS / "reference.h5ad"), read(RUNS / "query.h5ad")
    Xr, Xq = expression(ref), expression(query)
    keep = np.sort(np.argsort(-Xr.var(0), kind="stable")[:max_genes])  # as Annotator chooses its genes
    truth = query.obs["bulk_labels"].astype(str).to_numpy()
    rows = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        clf = LogisticRegression(max_iter=2000, random_state=seed).fit(Xr[:, keep], ref.obs["bulk_labels"].astype(str))
        pred = clf.predict(Xq[:, keep])
        rows.append(
            {
                "method": "logreg",
                "seed": seed,
                "accuracy": float((pred == truth).mean()),
                "macro_f1": float(f1_score(truth, pred, average="macro", labels=sorted(set(truth)))),
                "params_trainable": int(clf.coef_.size + clf.intercept_.size),
                "trainable_pct": 100.0,
                "fit_seconds": time.perf_counter() - t0,
                "peak_added_mb": float("nan"),
            }
        )
        print(f"  logreg   seed {seed}: accuracy {rows[-1]['accuracy']:.3f}, macro-F1 {rows[-1]['macro_f1']:.3f}")
    return rows


def main() -> None:
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100, help="at most this many epochs per fit (annotate's default)")
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop a fit after this many epochs without a better validation loss (annotate's default); "
        "0 = train every epoch",
    )
    p.add_argument("--out-csv", default=str(RUNS / "peft_results.csv"))
    p.add_argument("--max-genes", type=int, default=128, help="gene tokens per cell (annotate's default)")
    p.add_argument("--steps", type=int, default=3000, help="pretraining steps of the backbone (no dropout)")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    scdca = [str(Path(sys.executable).parent / "scdca")]
    if not (RUNS / "query.h5ad").exists():
        subprocess.run(scdca + ["pbmc", "--out", str(RUNS)], check=True)
    backbone = RUNS / "backbone"
    if not (backbone / "pretrain_summary.json").exists():
        subprocess.run(
            scdca
            + [
                "pretrain",
                "--data",
                str(RUNS / "reference.h5ad"),
                "--out",
                str(backbone),
                "--layers",
                "4",
                "--dim",
                "64",
                "--heads",
                "4",
                "--steps",
                str(args.steps),
                "--seq-len",
                "128",
                "--dropout",
                "0",
                "--quiet",
            ],
            check=True,
        )
    rows = []
    methods = args.methods.split(",")
    for method in methods:
        if method == "logreg":
            rows += logreg(args.seeds, args.max_genes)
            continue
        for seed in range(args.seeds):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    method,
                    str(seed),
                    str(args.epochs),
                    str(backbone),
                    str(RUNS),
                    str(args.max_genes),
                    str(args.patience or "none"),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                sys.exit(f"{method} seed {seed} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"  {method:8s} seed {seed}: accuracy {rows[-1]['accuracy']:.3f}, macro-F1 "
                f"{rows[-1]['macro_f1']:.3f}, {rows[-1]['fit_seconds']:.0f} s, best epoch "
                f"{rows[-1]['best_epoch']} of {rows[-1]['epochs_run']}",
                flush=True,
            )
    df = pd.DataFrame(rows)
    old = Path(args.out_csv)
    if old.exists():  # keep the methods not rerun this time
        previous = pd.read_csv(old)
        df = pd.concat([previous[~previous["method"].isin(methods)], df], ignore_index=True)
    df.to_csv(old, index=False)
    g = df.groupby("method", sort=False)
    table = pd.DataFrame(
        {
            "accuracy": g["accuracy"].agg(lambda s: f"{s.mean():.3f} ± {s.std(ddof=1):.3f}"),
            "macro_f1": g["macro_f1"].agg(lambda s: f"{s.mean():.3f} ± {s.std(ddof=1):.3f}"),
            "trainable": g["params_trainable"].first().map("{:,}".format),
            "trainable_%": g["trainable_pct"].first().map("{:.2f}".format),
            "fit_s": g["fit_seconds"].mean().map("{:.1f}".format),
            "epochs": g["epochs_run"].mean().map("{:.0f}".format) if "epochs_run" in df else "",
            "peak_added_MB": g["peak_added_mb"].mean().map("{:.0f}".format),
        }
    )
    summary = json.loads((backbone / "pretrain_summary.json").read_text())
    print(
        f"\nbackbone: {summary['parameters']:,} parameters, masked MSE {summary['best_val_loss']:.3f} vs "
        f"{summary['gene_mean_baseline_val_loss']:.3f} for gene means; query = {args.seeds} seeds, "
        f"at most {args.epochs} epochs (patience {args.patience}), {args.max_genes} gene tokens per cell"
    )
    print(table.to_string())


if __name__ == "__main__":
    main()
