"""Beyond one process, measured in one run: parallel grid speed-up and streaming memory.

1. Grid wall time, serial vs `--workers 2` (Ray), on the demo screen: the same grid
   (ridge, knn, c3tl + references; all four tasks; 2 seeds) run into fresh folders from
   the same loaded data: serial with 2 threads (the default), serial with 1 thread, and 2
   workers of 1 thread. Prints the times, serial / parallel, and the largest difference in
   any result value per model (0 expected against the serial run with 1 thread). On 2
   cores the ideal speed-up is 2.0; serial numpy/torch already use both cores for their
   larger operations, so expect less.
2. Peak resident memory of pseudobulk aggregation (`scdca.data.load(..., chunk_size=50_000)`)
   on simulated files of 0.2M and 2M cells (200 genes; written once in chunks by
   `simulate(out=...)` into runs/scale/, reused afterwards). Each load runs in a fresh
   process and reports its peak RSS (ru_maxrss); also the 0.2M file loaded whole, and a
   process that only imports scdca (the floor). Prints the 2M / 0.2M ratio: close to 1
   means memory does not grow with the number of cells (10 would be linear).

3. With `--small-grid` (instead of 1 and 2): Ray's start-up (init, one task that imports the
   grid's code, shutdown), and a 24-cell grid of closed-form baselines (control, ridge, knn,
   dominant + references; new drugs and pairs; 2 seeds) serial, with `--workers 2`, and with 2
   workers forced onto Ray for every cell (`RAY_START_S = 0`, the rule before session 14).
4. With `--demo-grid` (instead of 1 and 2): `make demo`'s grid (scdca_routed, the baselines
   and C3TL; 256 genes, untrained backbone, chemnet; all four tasks, 5 seeds), serial with 2
   threads against `--workers 2`, in one run (about 20 minutes). Issue 30's bar: 1.6x.

Do not run it while another torch job runs: two jobs on 2 cores slow each ~3x.

    python bench/scale.py [--skip-grid] [--skip-memory] [--small-grid] [--demo-grid]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = Path(__file__).resolve().parent.parent / "runs"

CHILD = r"""
import resource, sys, time
from scdca.data import load
path, chunk = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if path != "-":
    data = load(path, chunk_size=None if chunk == "none" else int(chunk))
    print(f"{len(data.ids)} {time.perf_counter() - t:.1f}", end=" ")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB -> MiB
"""


def grid(data_path: Path) -> None:
    import pandas as pd

    from scdca.data.screen import load
    from scdca.eval.grid import BenchmarkConfig, run

    data = load(data_path)
    tmp = Path(tempfile.mkdtemp(prefix="scale_grid_"))
    times, results = {}, {}
    try:
        for name, workers, threads in (("serial", 1, None), ("serial_1thread", 1, 1), ("workers2", 2, None)):
            cfg = BenchmarkConfig(
                data=str(data_path),
                out=str(tmp / name),
                models=["ridge", "knn", "c3tl"],
                tasks="all",
                seeds=2,
                report=False,
            )
            t0 = time.perf_counter()
            results[name] = run(cfg, data=data, progress=False, workers=workers, threads=threads)
            times[name] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    key = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric"]
    runs = {k: r.sort_values(key).reset_index(drop=True) for k, r in results.items()}
    for name in ("serial_1thread", "workers2"):
        pd.testing.assert_frame_equal(runs["serial"][key], runs[name][key])  # the same rows
    n_cells = runs["serial"].groupby(["model", "task", "seed"]).ngroups
    print(f"grid ({n_cells} cells: ridge, knn, c3tl + references, 4 tasks x 2 seeds, {len(data.ids)} conditions)")
    print(f"  serial, 2 threads         {times['serial']:7.1f} s")
    print(f"  serial, 1 thread          {times['serial_1thread']:7.1f} s")
    print(f"  --workers 2 (1 thread)    {times['workers2']:7.1f} s   (Ray start-up included)")
    print(f"  speed-up vs serial        {times['serial'] / times['workers2']:7.2f} x")

    def diff(a, b):
        d = (runs[a]["value"] - runs[b]["value"]).abs().groupby(runs[a]["model"]).max()
        return ", ".join(f"{m} {v:.1e}" for m, v in d.items())

    print(f"  max |workers 2 - serial 1 thread| per model: {diff('workers2', 'serial_1thread')}")
    print(f"  max |workers 2 - serial 2 threads| per model: {diff('workers2', 'serial')}")


SMALL_GRID = ["control", "ridge", "knn", "dominant"]


def _import_grid() -> float:
    t = time.perf_counter()
    import scdca.eval.grid  # noqa: F401 - what a worker imports before its first cell

    return time.perf_counter() - t


def small_grid(data_path: Path) -> None:
    """Ray's start-up, and a small grid serial, with 2 workers, and with 2 workers always on Ray."""
    import ray

    from scdca.data.screen import load
    from scdca.eval import parallel
    from scdca.eval.grid import BenchmarkConfig, run

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the grid's private Ray
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    worker_import = ray.get(ray.remote(num_cpus=1)(_import_grid).remote())
    ray.shutdown()
    print(f"Ray start-up: {time.perf_counter() - t0:.1f} s (init, one task importing the grid's code, shutdown; "
          f"the import alone {worker_import:.1f} s)")  # fmt: skip
    data = load(data_path)
    tmp = Path(tempfile.mkdtemp(prefix="scale_small_"))
    times, budget = {}, parallel.RAY_START_S
    try:
        for name, workers, first in (("serial", 1, budget), ("workers2", 2, budget), ("workers2_ray", 2, 0.0)):
            cfg = BenchmarkConfig(data=str(data_path), out=str(tmp / name), models=SMALL_GRID,
                                  tasks=["unseen_drug", "unseen_pair"], seeds=2, report=False)  # fmt: skip
            parallel.RAY_START_S = first
            t0 = time.perf_counter()
            res = run(cfg, data=data, progress=False, workers=workers)
            times[name] = time.perf_counter() - t0
    finally:
        parallel.RAY_START_S = budget
        shutil.rmtree(tmp, ignore_errors=True)
    n_cells = res.groupby(["model", "task", "seed"]).ngroups
    print(f"small grid ({n_cells} cells: control, ridge, knn, dominant + references; 2 tasks x 2 seeds)")
    print(f"  serial, 2 threads                   {times['serial']:7.1f} s")
    print(f"  --workers 2 (RAY_START_S {budget:.0f} s)        {times['workers2']:7.1f} s")
    print(f"  --workers 2, every cell on Ray      {times['workers2_ray']:7.1f} s")
    print(f"  workers 2 / serial: {times['workers2'] / times['serial']:.2f} (every cell on Ray: "
          f"{times['workers2_ray'] / times['serial']:.2f})")  # fmt: skip


def demo_grid(data_path: Path) -> None:
    """`make demo`'s grid, serial (2 threads) and with 2 workers, from the same loaded data."""
    from grid_profile import DEMO_GENES, DEMO_MODELS, DEMO_OPTIONS  # this folder: make demo's grid
    from scdca.data.screen import load
    from scdca.eval.grid import BenchmarkConfig, run

    data = load(data_path, n_top_genes=DEMO_GENES)
    tmp = Path(tempfile.mkdtemp(prefix="scale_demo_"))
    times = {}
    try:
        for name, workers in (("serial", 1), ("workers2", 2)):
            cfg = BenchmarkConfig(data=str(data_path), out=str(tmp / name), models=DEMO_MODELS, tasks="all", seeds=5,
                                  n_top_genes=DEMO_GENES, report=False, model_options=DEMO_OPTIONS)  # fmt: skip
            t0 = time.perf_counter()
            run(cfg, data=data, progress=False, workers=workers)
            times[name] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"make demo's grid ({DEMO_GENES} genes; data loaded once, report not built)")
    print(f"  serial, 2 threads         {times['serial']:7.1f} s")
    print(f"  --workers 2 (1 thread)    {times['workers2']:7.1f} s   (Ray start-up included)")
    print(f"  speed-up vs serial        {times['serial'] / times['workers2']:7.2f} x")


def memory() -> None:
    from scdca.data.simulate import SimulationConfig, simulate

    folder = RUNS / "scale"
    files = {}
    for label, per_condition in (("0.2M", 137), ("2M", 1387)):  # 3 lines x 480 conditions + 3,000 controls
        path = folder / f"cells_{label}.h5ad"
        if not path.exists():
            t0 = time.perf_counter()
            a = simulate(SimulationConfig(n_genes=200, cells_per_condition=per_condition), seed=0, out=path)
            print(f"wrote {path}: {a.n_obs:,} cells x {a.n_vars} genes ({time.perf_counter() - t0:.0f} s)")
        files[label] = path

    def child(path, chunk):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(chunk)], capture_output=True, text=True, check=True
        ).stdout.split()
        return out

    floor = float(child("-", "none")[0])
    print(f"aggregation peak RSS (fresh process each; importing scdca alone: {floor:.0f} MiB)")
    peak = {}
    for label, path in files.items():
        n_cond, secs, rss = child(path, 50_000)
        peak[label] = float(rss)
        print(f"  {label:>4} cells, chunks of 50,000   {peak[label]:7.0f} MiB  ({n_cond} conditions, {secs} s)")
    _, secs, rss = child(files["0.2M"], "none")
    print(f"  0.2M cells, read whole          {float(rss):7.0f} MiB  ({secs} s)")
    print(
        f"  ratio 2M / 0.2M (chunked)       {peak['2M'] / peak['0.2M']:7.2f}   (above the import floor: "
        f"{(peak['2M'] - floor) / (peak['0.2M'] - floor):.2f})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(RUNS / "demo" / "data.h5ad"))
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--demo-grid", action="store_true", help="make demo's grid, serial vs 2 workers, only")
    p.add_argument("--small-grid", action="store_true", help="Ray's start-up and a small grid, only")
    args = p.parse_args()
    if args.small_grid:
        small_grid(Path(args.data))
        return
    if args.demo_grid:
        demo_grid(Path(args.data))
        return
    if not args.skip_grid:
        if not Path(args.data).exists():
            sys.exit(f"{args.data} not found; run `make demo` (or scdca simulate --out {args.data}) first")
        grid(Path(args.data))
    if not args.skip_memory:
        memory()


if __name__ == "__main__":
    main()
