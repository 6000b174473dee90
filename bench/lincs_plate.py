"""The unseen-drug grid on a real LINCS L1000 plate, judged by change, rank and error together.

    python bench/lincs_plate.py PLATE.gct|gctx COMPOUNDS.csv [--seeds 5] [--out DIR] [--backbone random:4x128]
        [--intervals] [--skip MODEL,...] [--tradeoff]

Runs every baseline, `dominant`, `scaled_mean`, ridge (plain and shrunk), knn, c3tl, biolord
and STATE (when installed), `scdca_routed` and the recommended `scdca_stack` with `scdca
benchmark`'s grid (5 seeds, unseen drugs), prints pearson_delta_deg, rank, mse and
pearson_vs_mean_deg side by side (mean ± SE over seeds), the paired t-tests of the recommended
model against each other model, the committee it chose per seed with the out-of-fold scores,
and the plate's diagnostics. `--tradeoff` adds how scdca_routed's new head and ridge trade rank
against error as they are blended toward `scaled_mean` at fixed weights (one refit per seed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scdca.data.screen import load
from scdca.data.splits import make_splits
from scdca.eval.diagnostics import describe, plate_diagnostics
from scdca.eval.grid import BenchmarkConfig, run
from scdca.eval.metrics import ScoringInput, score
from scdca.eval.stats import paired_tests, per_seed
from scdca.eval.tables import calibration_table
from scdca.models import MODELS
from scdca.models.scdca.routed import ScDCARouted
from scdca.models.shrinkage import ScaledMeanBaseline

RECOMMENDED = "scdca_stack"
JUDGED = ("pearson_delta_deg", "rank", "mse", "pearson_vs_mean_deg")
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def side_by_side(results: pd.DataFrame) -> pd.DataFrame:
    cols = {}
    for m in JUDGED:
        s = per_seed(results, m).groupby("model")["value"].agg(["mean", "sem"])
        cols[m] = [f"{a:.3f} ± {b:.3f}" for a, b in zip(s["mean"], s["sem"])]
        index = s.index
    return pd.DataFrame(cols, index=index)


def tradeoff(data, seeds, model_options) -> pd.DataFrame:
    """Scores of anchor + w * (unshrunk model - anchor) at fixed w, per seed, for scdca_routed and ridge."""
    rows = []
    for seed in seeds:
        (split,) = make_splits(data, "unseen_drug", seed)
        train, test = data.subset(split.train), data.subset(split.test)
        query = data.subset(split.test, observed=False)
        control = query.control_for(query.conditions["cell_line"])
        anchor = control + ScaledMeanBaseline().fit(train).change(query)
        raw = {
            "scdca_routed": ScDCARouted(new_shrinkage=1.0, seed=seed, **model_options).fit(train).predict(query),
            "ridge": MODELS.get("ridge")().fit(train).predict(query),
        }
        for name, pred in raw.items():
            for w in WEIGHTS:
                inp = ScoringInput(
                    pred=np.maximum(anchor + w * (pred - anchor), 0),
                    observed=test.mean,
                    control=control,
                    degs=[test.degs[i] for i in test.ids],
                    groups=test.conditions["cell_line"].to_numpy(),
                )
                rows += [
                    {"model": name, "w": w, "seed": seed, "metric": m, "value": float(np.nanmean(v))}
                    for m, v in score(inp, JUDGED[:3]).items()
                ]
    t = pd.DataFrame(rows).groupby(["model", "w", "metric"])["value"].mean().unstack("metric")
    return t[list(JUDGED[:3])]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plate")
    p.add_argument("compounds")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="runs/lincs_plate")
    p.add_argument("--backbone", default="random:4x128", help="backbone of the scDCA models")
    p.add_argument("--encoder", default="chemnet")
    p.add_argument("--intervals", action="store_true", help="also calibrate 90%% intervals and print their coverage")
    p.add_argument("--skip", default="", help="models to leave out, comma-separated (e.g. state: 3-4 min a fit)")
    p.add_argument("--tradeoff", action="store_true", help="also the fixed-weight blends of scdca_routed and ridge")
    args = p.parse_args(argv)
    skip = {m.strip() for m in args.skip.split(",") if m.strip()}
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    models = ["control", "train_mean", "dominant", "scaled_mean", "ridge", "ridge_shrunk", "knn", "c3tl"]
    for peer in ("biolord", "state"):  # STATE runs in pseudobulk mode here: a plate's rows are wells
        if peer in skip:
            continue
        try:
            MODELS.get(peer).check_available()
            models.append(peer)
        except Exception as err:  # the peers are optional; say why one is missing
            print(f"{peer} not run: {err}", file=sys.stderr)
    models = [m for m in models if m not in skip] + ["scdca_routed", RECOMMENDED]
    options = {"backbone": args.backbone, "encoder": args.encoder}
    data = load(args.plate, compounds=args.compounds)
    t0 = time.perf_counter()
    cfg = BenchmarkConfig(
        data=args.plate,
        compounds=args.compounds,
        out=args.out,
        models=models,
        tasks=["unseen_drug"],
        seeds=args.seeds,
        model_options=options,
        intervals=args.intervals,
    )
    results = run(cfg, data=data, progress=False)
    print(f"grid: {time.perf_counter() - t0:.0f} s, {args.seeds} seeds, unseen drugs, {Path(args.plate).name}\n")
    print(side_by_side(results).to_string())
    print(f"\npaired t-tests, {RECOMMENDED} vs each (two-sided, paired on seed, Holm within metric):")
    tests = pd.concat([paired_tests(results, RECOMMENDED, m) for m in JUDGED])
    print(tests[["metric", "versus", "mean_difference", "p", "p_holm"]].round(4).to_string(index=False))
    costs = pd.concat(pd.read_csv(f) for f in sorted((Path(args.out) / "costs").glob(f"{RECOMMENDED}__*.csv")))
    shown = ["seed", "committee", "used", "p_worse", *(c for c in costs.columns if c.startswith("oof_"))]
    print(f"\n{RECOMMENDED}: the committee chosen per seed on the training drugs, and its out-of-fold evidence:")
    print(costs[shown].round(4).T.to_string())
    if args.intervals:
        print("\nprediction intervals (conformal, calibrated on folds of the training drugs):")
        print(calibration_table(results).to_string())
    diag = plate_diagnostics(data)
    print("\nplate diagnostics:\n" + diag.round(3).to_string(index=False) + "\n" + describe(diag))
    if args.tradeoff:
        print("\ntrade-off: anchor (scaled_mean) + w x (model without shrinkage - anchor), mean over seeds:")
        print(tradeoff(data, list(range(args.seeds)), options).round(3).to_string())


if __name__ == "__main__":
    main()
