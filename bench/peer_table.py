"""One model against others across benchmark runs that share their splits: scores and paired tests.

    python bench/peer_table.py RUN [RUN ...] --model state [--versus scdca_routed,ridge,biolord]
        [--metrics pearson_delta_deg,rank,mse]

Each model's rows come from the first RUN that has them for a (task, seed), so a costly model can
be run on its own and compared with a grid run earlier. Every RUN must hold the same splits for
each (task, seed) it shares with another (checked on the split files; refused otherwise), so the
t-tests stay paired on identical test conditions. Prints, per task, mean ± SE over seeds of each
metric, then the paired t-tests (two-sided, on seed, Holm within task and metric) of `--model`
against each of `--versus`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from scdca.eval.runs import collect
from scdca.eval.stats import paired_tests, per_seed


def same_splits(runs: list[Path]) -> None:
    """Refuse runs whose split files of the same name differ."""
    seen: dict[str, tuple[Path, dict]] = {}
    for run in runs:
        for f in sorted((run / "splits").glob("*.json")):
            split = json.loads(f.read_text())
            key = {k: split[k] for k in ("train", "test") if k in split}
            if f.name in seen and seen[f.name][1] != key:
                raise SystemExit(
                    f"{f} differs from {seen[f.name][0] / 'splits' / f.name}: the runs' splits are not the same"
                )
            seen.setdefault(f.name, (run, key))


def finished_cells(run: Path) -> list[tuple[str, str, int]]:
    """(model, task, seed) of every cell a run has written, finished or not (an interrupted run too)."""
    out = []
    for f in sorted((run / "cells").glob("*__*__seed*.*")):
        model, task, seed = f.stem.split("__")
        out.append((model, task, int(seed.removeprefix("seed"))))
    return out


def combined(runs: list[Path], models: list[str]) -> pd.DataFrame:
    """Rows of `models`, each (model, task, seed) cell taken from the first run that has it."""
    parts, have = [], set()
    for run in runs:
        new = [c for c in finished_cells(run) if c[0] in models and c not in have]
        if new:
            parts.append(collect(run, new))
        have |= set(new)
    return pd.concat(parts, ignore_index=True).astype({"model": str, "task": str, "metric": str})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--versus", default="scdca_routed,ridge,biolord")
    p.add_argument("--metrics", default="pearson_delta_deg,rank,mse")
    args = p.parse_args(argv)
    versus, metrics = args.versus.split(","), args.metrics.split(",")
    same_splits(args.runs)
    results = combined(args.runs, [args.model, *versus])
    for metric in metrics:
        s = per_seed(results, metric).groupby(["task", "model"])["value"].agg(["mean", "sem", "count"])
        table = s.apply(lambda r: f"{r['mean']:.4f} ± {r['sem']:.4f} ({int(r['count'])})", axis=1).unstack("model")
        print(f"\n{metric}, mean ± SE over seeds (seeds):\n{table.to_string()}")
    tests = pd.concat([paired_tests(results, args.model, m) for m in metrics])
    print(f"\npaired t-tests, {args.model} against each (two-sided, paired on seed, Holm within task and metric):")
    print(tests[["task", "metric", "versus", "mean_difference", "p", "p_holm"]].round(4).to_string(index=False))


if __name__ == "__main__":
    main()
