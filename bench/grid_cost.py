"""What an optional part of the grid costs: a grid run twice, without and with it.

    python bench/grid_cost.py --variant intervals|metrics [--grid demo|baselines]
        [--data runs/demo/data.h5ad] [--models ...] [--seeds 5] [--out runs/grid_cost]

Runs a grid on the demo screen twice in this process, into two fresh folders, report included,
and prints both wall times and their ratio. The grids (all four tasks, 5 seeds):

- `demo` (default): `make demo`'s grid as that target runs it: its models, scDCA included, on
  256 genes, the untrained `random:4x128` backbone, `chemnet` molecules and 2 Ray workers.
- `baselines`: the baselines and C3TL on all 1,000 genes, serially (`make demo`'s grid before it
  ran scDCA; sessions 12-13 measured the intervals on it).

Variants:

- `intervals`: without and with `--intervals` (conformal intervals; issue 28's bar: at most
  1.30x), then the calibration table of the run with them (coverage per level, the 90%
  interval's width, Spearman of expected against realised error), and the calibration's time
  as a share of the models' own fit-and-predict time within that run (the two wall times are minutes apart, and
  this machine's speed drifts by 10-20% between them).
- `metrics`: the six metrics of the paper's harness, then every metric (the `*_vs_mean_*`,
  DEG and `rank_dose` metrics added; issue 26's bar: at most 1.10x).

Run it on a quiet machine: nothing else may use the cores.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from scdca.eval.grid import BenchmarkConfig, run
from scdca.eval.tables import calibration_table

BASELINES = "control,train_mean,dose_mean,pooled_mean,additive,ridge,knn,dominant,c3tl"
GRIDS = {  # name -> (models, BenchmarkConfig settings, workers); `demo` is the Makefile's `make demo`
    "demo": (
        BASELINES + ",scdca_routed",
        {"n_top_genes": 256, "model_options": {"backbone": "random:4x128", "encoder": "chemnet"}},
        2,
    ),
    "baselines": (BASELINES, {}, 1),
}
PAPER_METRICS = "r2_deg,r2_delta_deg,pearson_delta_deg,pearson_delta,mse,rank"
VARIANTS = {  # name -> (settings without it, settings with it)
    "intervals": ({"intervals": False}, {"intervals": True}),
    "metrics": ({"metrics": PAPER_METRICS}, {"metrics": "all"}),
}


def timed_grid(path: str, out: Path, models: str, seeds: int, settings: dict, workers: int) -> tuple[float, object]:
    """(seconds, results) of one fresh grid run, data loading and report included, as `scdca
    benchmark` runs it."""
    if out.exists():
        shutil.rmtree(out)
    cfg = BenchmarkConfig(data=path, out=str(out), models=models, tasks="all", seeds=seeds, **settings)
    t0 = time.perf_counter()
    results = run(cfg, progress=False, workers=workers)
    return time.perf_counter() - t0, results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--grid", default="demo", choices=sorted(GRIDS))
    p.add_argument("--data", default="runs/demo/data.h5ad")
    p.add_argument("--models", default=None, help="default: the grid's models")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="runs/grid_cost")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    models, settings, workers = GRIDS[args.grid]
    models = args.models or models
    without, with_ = VARIANTS[args.variant]
    out = Path(args.out) / args.grid / args.variant
    base, _ = timed_grid(args.data, out / "without", models, args.seeds, {**settings, **without}, workers)
    print(f"grid without {args.variant}: {base:.0f} s", flush=True)
    seconds, results = timed_grid(args.data, out / "with", models, args.seeds, {**settings, **with_}, workers)
    print(f"grid with {args.variant}:    {seconds:.0f} s")
    if args.variant == "intervals":
        print("\n" + calibration_table(results).to_string())
        costs = pd.read_csv(out / "with" / "costs.csv")
        work = costs["calibration_seconds"].sum() / costs["seconds"].sum()
        print(
            f"\nwithin the run with them, calibration took {work:.0%} of the models' own fit-and-predict time "
            f"(both measured in the same run, so steadier than the wall-time ratio when the machine's speed drifts)"
        )
    print(
        f"\n{args.variant} cost {seconds / base:.2f}x the grid without them "
        f"({args.grid} grid: {models}; {args.seeds} seeds, {workers} worker(s))"
    )


if __name__ == "__main__":
    main()
