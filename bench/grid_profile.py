"""Where the demo grid's wall time goes: the models' fit + predict against everything else.

    python bench/grid_profile.py [--data runs/demo/data.h5ad] [--models ...] [--seeds 5]

Runs `make demo`'s grid once, serially, in a fresh folder, timing each phase of the harness
by wrapping the grid's own functions (nothing is changed in how they run): start-up
(imports), loading the data, diagnostics, splits, the models' fit + predict (the `seconds`
each grid cell records, measured around fit and predict), scoring, building and writing
prediction files, collecting results, and the report. Its last line is
`overhead <X>% of <T> s`: the share of the wall time that is not a model's fit + predict.
Run it with nothing else running on the machine.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402

import pandas as pd  # noqa: E402

from scdca.eval import grid, report  # noqa: E402

T_IMPORTS = time.perf_counter() - T_START
# `make demo`'s grid (the Makefile's DEMO_MODELS and benchmark options); bench/scale.py reads these too
DEMO_MODELS = "control,train_mean,dose_mean,pooled_mean,additive,ridge,knn,dominant,c3tl,scdca_routed"
DEMO_GENES = 256
DEMO_OPTIONS = {"backbone": "random:4x128", "encoder": "chemnet"}
PHASES = {  # phase -> (module, function) wrapped for timing
    "load data": (grid, "load"),
    "diagnostics": (grid, "plate_diagnostics"),
    "splits (make + write)": (grid, "_splits"),
    "scoring": (grid, "score_conditions"),
    "prediction files (build)": (grid, "predictions_file"),
    "cell files (write)": (grid, "write_cell"),
    "collect results": (grid, "collect"),
    "results tables (write)": (grid, "write_results"),
}


def timed(seconds: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t0

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/demo/data.h5ad", help="the demo screen (`scdca simulate` makes it)")
    parser.add_argument("--models", default=DEMO_MODELS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-top-genes", type=int, default=DEMO_GENES, help="as make demo")
    parser.add_argument("--backbone", default=DEMO_OPTIONS["backbone"], help="as make demo")
    parser.add_argument("--encoder", default=DEMO_OPTIONS["encoder"], help="as make demo")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        raise SystemExit(f"data: {args.data!r} does not exist; make it with `scdca simulate --out {args.data}`")
    seconds = defaultdict(float)
    for name, (module, attr) in PHASES.items():
        setattr(module, attr, timed(seconds, name, getattr(module, attr)))
    with tempfile.TemporaryDirectory() as out:
        cfg = grid.BenchmarkConfig(data=args.data, out=out, models=args.models, tasks="all", seeds=args.seeds,
                                   n_top_genes=args.n_top_genes, report=False,
                                   model_options={"backbone": args.backbone, "encoder": args.encoder})  # fmt: skip
        t0 = time.perf_counter()
        grid.run(cfg, progress=False)
        t_grid = time.perf_counter() - t0
        t1 = time.perf_counter()
        report.build(out)
        seconds["report"] = time.perf_counter() - t1
        costs = pd.read_csv(os.path.join(out, "costs.csv"))
    model_seconds = float(costs["seconds"].sum())
    per_model = costs.groupby("model")["seconds"].sum().sort_values(ascending=False)
    seconds["start-up (imports)"] = T_IMPORTS
    total = T_IMPORTS + t_grid + seconds["report"]
    accounted = model_seconds + sum(seconds.values())
    print(f"{'phase':32s} {'seconds':>8s} {'share':>6s}")
    print(f"{'models: fit + predict':32s} {model_seconds:8.1f} {model_seconds / total:6.1%}")
    for model, s in per_model.items():
        print(f"{'  ' + model:32s} {s:8.1f} {s / total:6.1%}")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{name:32s} {s:8.1f} {s / total:6.1%}")
    print(f"{'other (grid loop, unattributed)':32s} {total - accounted:8.1f} {(total - accounted) / total:6.1%}")
    print(f"overhead {100 * (total - model_seconds) / total:.1f}% of {total:.1f} s")


if __name__ == "__main__":
    main()
