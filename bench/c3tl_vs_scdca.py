"""Fit + predict cost of c3tl, scdca_lowrank and scDCA on the same demo split, one run.

Each model runs in its own fresh process, one after the other, on the `unseen_pair` split
of seed 0 of the demo data (256 most variable genes, the demo scDCA budget: 200 optimiser
steps, lr 1e-3), each with its default molecule encoder (chemnet for the scDCA family,
whose model load counts; morgan for c3tl). The one-off import that torch's first
optimiser triggers is done before timing in every process. Prints seconds, the peak
resident memory added by fit + predict above what the loaded data already held (sampled
every 5 ms), and the ratios to scdca. Molecule embeddings come from the on-disk cache for
every model alike. Needs runs/demo/data.h5ad and a backbone (make demo-scdca makes both).
Do not run it while another torch job runs: two jobs on 2 cores slow each ~3x.

    python bench/c3tl_vs_scdca.py [--data runs/demo/data.h5ad] [--backbone runs/demo/backbone_atlas]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, os, sys, threading, time
from scdca.data import load
from scdca.models import make_model
from scdca.data.splits import make_splits

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

name, data_path, backbone = sys.argv[1:4]
data = load(data_path, n_top_genes=256)
split = make_splits(data, "unseen_pair", 0)[0]
train, query = data.subset(split.train), data.subset(split.test, observed=False)
opts = {"backbone": backbone} if name.startswith("scdca") else {}  # each model's default encoder
if name == "scdca":
    opts.update(max_steps=200, lr=1e-3)
import torch
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # the first optimiser imports torch._dynamo (~2 s,
#                                                           once per process): not a per-split cost
base, peak, done = rss_mb(), [0.0], threading.Event()

def sample():  # current RSS every 5 ms: ru_maxrss would still hold the data-loading peak
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
model = make_model(name, **opts).fit(train)
model.predict(query)
seconds = time.perf_counter() - t0
done.set()
thread.join()
print(json.dumps({"model": name, "seconds": seconds, "peak_extra_mb": max(peak[0] - base, 0.0),
                  "trainable": model.cost().get("params_trainable")}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/demo/data.h5ad")
    p.add_argument("--backbone", default="runs/demo/backbone_atlas")
    args = p.parse_args()
    from pathlib import Path

    missing = [x for x in (args.data, args.backbone) if not Path(x).exists()]
    if missing:
        sys.exit(f"missing {missing}: run `make demo-scdca` first (it writes the demo data and backbone)")
    rows = {}
    for name in ("c3tl", "scdca_lowrank", "scdca"):
        out = (
            subprocess.run(
                [sys.executable, "-c", CHILD, name, args.data, args.backbone],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows[name] = json.loads(out)
    print(f"{'model':15s} {'fit+predict s':>14s} {'peak extra RSS MB':>18s} {'trainable':>10s}")
    for r in rows.values():
        print(f"{r['model']:15s} {r['seconds']:14.2f} {r['peak_extra_mb']:18.0f} {r['trainable'] or 0:10,}")
    base = rows["scdca"]
    for name in ("c3tl", "scdca_lowrank"):
        print(
            f"{name} / scdca: time {rows[name]['seconds'] / base['seconds']:.3f}, "
            f"peak extra memory {rows[name]['peak_extra_mb'] / max(base['peak_extra_mb'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
