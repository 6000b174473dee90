"""`scdca annotate --method lora` as a user runs it, before and after session 14's change, in one run.

The user's path: `scdca pbmc` (scanpy's pbmc68k_reduced: 501 G1-phase reference cells, 199
cycling query cells), `scdca pretrain` with its defaults on the reference (4 x 128, dropout 0.1,
400 steps; once, into runs/pbmc/backbone_default), then LoRA annotation with annotate's
defaults otherwise (batch 32, early stopping with patience 5 on the reference's validation
split). Settings (`--settings`, default all):

- `dropout on`: 256 gene tokens, and the frozen backbone keeps its dropout while training
  (`--backbone-dropout`): what annotate did before session 14. Attention with dropout cannot
  use the fused kernel.
- `dropout off`: 256 gene tokens, no dropout in the frozen backbone.
- `128 genes`: 128 tokens and no dropout: the defaults since session 14 (DECISIONS.md D43).

Each (setting, seed) fit runs in a fresh process, one after another. Prints per setting the
mean fit seconds (and per 1,000 reference cells: an epoch is linear in cells), epochs run,
and query accuracy and macro-F1, mean ± sd over seeds, then the time ratio.
Do not run it while another torch job runs: two jobs on 2 cores slow each ~3x.

    python bench/annotate_speed.py [--seeds 5] [--seeds-before 2] [--settings "dropout off,128 genes"]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RUNS = Path(__file__).resolve().parent.parent / "runs" / "pbmc"
SETTINGS = {"dropout on": ("on", 256), "dropout off": ("off", 256), "128 genes": ("off", 128)}  # (dropout, tokens)

CHILD = r"""
import json, sys
from sklearn.metrics import f1_score
from scdca.annotation import AnnotateConfig, Annotator
from scdca.data import read
from scdca.nn.peft import PeftConfig
folder, backbone, seed, dropout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "on"
genes = int(sys.argv[5])
ref, query = read(f"{folder}/reference.h5ad"), read(f"{folder}/query.h5ad")
ann = Annotator(backbone, AnnotateConfig(peft=PeftConfig(method="lora"), seed=seed, backbone_dropout=dropout,
                                        max_genes=genes), progress=False)
ann.fit(ref, "bulk_labels")
pred = ann.annotate(query).obs["scdca_label"].astype(str).to_numpy()
truth = query.obs["bulk_labels"].astype(str).to_numpy()
print(json.dumps({"seed": seed, "accuracy": float((pred == truth).mean()),
                  "macro_f1": float(f1_score(truth, pred, average="macro", labels=sorted(set(truth)))),
                  "fit_seconds": ann.cost["fit_seconds"], "epochs_run": ann.cost["epochs_run"],
                  "val_loss": ann.cost["best_val_loss"],
                  "reference_cells": int(ref.n_obs)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds of the default (dropout off)")
    p.add_argument("--seeds-before", type=int, default=2, help="seeds of `dropout on` (about 10 min each here)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS))
    args = p.parse_args()
    chosen = args.settings.split(",")
    if bad := sorted(set(chosen) - set(SETTINGS)):
        sys.exit(f"--settings: unknown {bad}; choose from {', '.join(SETTINGS)}")
    scdca = [str(Path(sys.executable).parent / "scdca")]
    if not (RUNS / "query.h5ad").exists():
        subprocess.run(scdca + ["pbmc", "--out", str(RUNS)], check=True)
    backbone = RUNS / "backbone_default"
    if not (backbone / "pretrain_summary.json").exists():  # scdca pretrain's defaults, as a user runs it
        subprocess.run(
            scdca + ["pretrain", "--data", str(RUNS / "reference.h5ad"), "--out", str(backbone), "--quiet"], check=True
        )
    rows = {}
    for setting in chosen:
        dropout, genes = SETTINGS[setting]
        rows[setting] = []
        for seed in range(args.seeds_before if dropout == "on" else args.seeds):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(RUNS), str(backbone), str(seed), dropout, str(genes)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[setting].append(r)
            print(f"  {setting:<12} seed {seed}: {r['fit_seconds']:6.1f} s, {r['epochs_run']} epochs, "
                  f"validation loss {r['val_loss']:.3f}, accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}",
                  flush=True)  # fmt: skip
    cells = next(iter(rows.values()))[0]["reference_cells"]
    print(f"LoRA annotation, {cells} reference cells, scdca pretrain's default backbone (mean ± sd over seeds)")
    print(
        f"{'setting':<13}{'seeds':>6}{'fit s':>8}{'per 1k cells':>14}{'epochs':>8}{'val loss':>10}"
        f"{'accuracy':>16}{'macro-F1':>16}"
    )
    mean = {}
    keys = ("fit_seconds", "epochs_run", "val_loss", "accuracy", "macro_f1")
    for setting, rs in rows.items():
        col = {k: np.array([r[k] for r in rs], float) for k in keys}
        mean[setting] = col["fit_seconds"].mean()
        print(
            f"{setting:<13}{len(rs):>6}{mean[setting]:>8.0f}{mean[setting] * 1000 / cells:>14.0f}"
            f"{col['epochs_run'].mean():>8.1f}{col['val_loss'].mean():>10.3f}"
            f"{col['accuracy'].mean():>9.3f} ± {col['accuracy'].std():.3f}"
            f"{col['macro_f1'].mean():>9.3f} ± {col['macro_f1'].std():.3f}"
        )
    for setting in mean:
        if setting != "dropout on" and "dropout on" in mean:
            print(f"fit time {setting} / dropout on: {mean[setting] / mean['dropout on']:.2f}")


if __name__ == "__main__":
    main()
