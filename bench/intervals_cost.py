"""What prediction intervals cost and whether they hold: the demo grid with and without `--intervals`.

    python bench/intervals_cost.py [--data runs/demo/data.h5ad] [--models ...] [--seeds 5] [--out runs/intervals_cost]

Runs `make demo`'s grid (its models, all four tasks) twice in this process, serially, first
without and then with intervals, into two fresh folders, and prints both wall times, their
ratio and the calibration table of the run with intervals (realised coverage per level, the
90% interval's width, Spearman of expected against realised error). The issue's bar: the
ratio at most 1.30. Run it on a quiet machine: nothing else may use the cores.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from scdca.data.screen import load
from scdca.eval.grid import BenchmarkConfig, run
from scdca.eval.tables import calibration_table

DEMO_MODELS = "control,train_mean,additive,ridge,knn,dominant,c3tl"


def timed_grid(data, path: str, out: Path, models: str, seeds: int, intervals: bool) -> tuple[float, object]:
    """(seconds, results) of one fresh grid run, report included, as `scdca benchmark` runs it."""
    if out.exists():
        shutil.rmtree(out)
    cfg = BenchmarkConfig(data=path, out=str(out), models=models, tasks="all", seeds=seeds, intervals=intervals)
    t0 = time.perf_counter()
    results = run(cfg, data=data, progress=False)
    return time.perf_counter() - t0, results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="runs/demo/data.h5ad")
    p.add_argument("--models", default=DEMO_MODELS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="runs/intervals_cost")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    data = load(args.data)
    out = Path(args.out)
    plain, _ = timed_grid(data, args.data, out / "plain", args.models, args.seeds, False)
    print(f"grid without intervals: {plain:.0f} s", flush=True)
    with_iv, results = timed_grid(data, args.data, out / "intervals", args.models, args.seeds, True)
    print(f"grid with intervals:    {with_iv:.0f} s")
    print("\n" + calibration_table(results).to_string())
    print(f"\nintervals cost {with_iv / plain:.2f}x the grid without them ({args.models}; {args.seeds} seeds)")


if __name__ == "__main__":
    main()
