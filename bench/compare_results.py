"""Compare two benchmark runs' results.csv row by row: are the scores of the models both contain equal?

    python bench/compare_results.py REFERENCE/results.csv NEW/results.csv [--tol 1e-9]

Rows are matched on (model, task, seed, held_out, cell_line, drug, dose, metric). Models or metrics
present in only one file are listed, not compared (new models and metrics are exempt). Exits 1
when a matched value differs by more than --tol or a reference row of a shared model and metric
is missing from the new run.
"""

import argparse
import sys

import pandas as pd

KEY = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric"]


def compare(reference: pd.DataFrame, new: pd.DataFrame, tol: float) -> tuple[pd.DataFrame, list[str]]:
    """Matched rows with their absolute difference, and lines describing what is not compared."""
    notes = []
    for col in ("model", "metric"):
        only_ref = sorted(set(reference[col]) - set(new[col]))
        only_new = sorted(set(new[col]) - set(reference[col]))
        if only_ref:
            notes.append(f"{col}s only in the reference (missing from the new run): {only_ref}")
        if only_new:
            notes.append(f"{col}s only in the new run (exempt): {only_new}")
    shared = reference[reference["model"].isin(new["model"]) & reference["metric"].isin(new["metric"])]
    merged = shared.merge(new, on=KEY, how="left", suffixes=("_ref", "_new"), validate="one_to_one")
    both_nan = merged["value_ref"].isna() & merged["value_new"].isna()
    merged["diff"] = (merged["value_ref"] - merged["value_new"]).abs().where(~both_nan, 0.0)
    return merged, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("new")
    parser.add_argument("--tol", type=float, default=1e-9)
    args = parser.parse_args(argv)
    reference, new = (
        pd.read_csv(p, keep_default_na=False, na_values=[""], dtype={"held_out": str}, low_memory=False)
        for p in (args.reference, args.new)
    )
    merged, notes = compare(reference, new, args.tol)
    for line in notes:
        print(line)
    missing = merged["value_new"].isna() & merged["value_ref"].notna()
    worst = merged["diff"].max() if len(merged) else 0.0
    bad = (merged["diff"] > args.tol) | missing | (merged["diff"].isna())
    print(
        f"compared {len(merged)} rows of {merged['model'].nunique()} models; "
        f"max |difference| {worst:.3g}; {int(bad.sum())} rows differ by more than {args.tol:g} or are missing"
    )
    if bad.any():
        print(merged[bad].head(20).to_string())
    return 1 if bad.any() else 0


if __name__ == "__main__":
    sys.exit(main())
