"""Commands that evaluate: `benchmark` (the grid), `report`, `export` (to cell-eval)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import replace

from scdca.cli.options import (
    KEY_FLAGS,
    LINCS_FLAGS,
    MODEL_OPTIONS,
    Command,
    add_fields,
    add_keys,
    add_training_options,
    data_keys,
    encoder_help,
    field_default,
    lincs_options,
    model_options,
    require,
)

GRID = {
    "models": ("--models", None),
    "tasks": ("--tasks", None),
    "seeds": ("--seeds", "number of seeds (0..N-1)"),
    "metrics": ("--metrics", None),
    "k": ("--k", "top-k DEGs for the *_deg metrics"),
    "n_top_genes": ("--n-top-genes", "keep the top-N highly variable genes"),
    "held_out_lines": (
        "--held-out-lines",
        "line tasks: hold out this many lines per seed, drawn at random "
        "(default: every line in turn; a LINCS file has dozens)",
    ),
    "chunk_size": ("--chunk-size", "read --data backed, this many cells at a time (files larger than memory)"),
    "intervals": (
        "--intervals",
        "conformal 90%% intervals and expected errors for every model, calibrated on "
        "refits over the task's own splits of the training data (costs extra fits)",
    ),
}


def add_commands(sub) -> None:
    from scdca.data.splits import ALL_TASKS
    from scdca.eval.grid import BenchmarkConfig
    from scdca.eval.metrics import METRICS
    from scdca.models import MODELS

    b = Command(sub, "benchmark", cmd_benchmark, help="run models x tasks x seeds and score them", from_file=_flat)
    b.add("--data", default=None, help=".h5ad (single-cell or pseudobulk) or a LINCS .gct/.gctx plate")
    b.add("--out", default=None, help="output folder (resumes if it exists)")
    help = {"models": f"comma-separated, from: {', '.join(MODELS.names())}",
            "tasks": f"'all' (the paper's four) or comma-separated, from: {', '.join(ALL_TASKS)}",
            "metrics": f"'all' or comma-separated, from: {', '.join(METRICS.names())}"}  # fmt: skip
    models_field = next(f for f in dataclasses.fields(BenchmarkConfig) if f.name == "models")
    defaults = {"models": ",".join(field_default(models_field)),
                "tasks": "all", "metrics": "all", "seeds": 5}  # fmt: skip
    spec = {k: (f, help.get(k, h)) for k, (f, h) in GRID.items()}
    add_fields(b, BenchmarkConfig, spec, defaults=defaults, types={"seeds": int})
    b.add("--no-references", dest="references", action="store_false", help="skip the ceiling and oracle rows")
    b.add("--quiet", action="store_true", help="no progress bar")
    b.add("--workers", type=int, default=1, help="run grid cells in parallel on a local Ray with N workers")
    b.add("--ray-address", default=None, help="run grid cells on a Ray cluster: 'auto' or HOST:PORT")
    b.add("--threads-per-worker", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    g = b.group("learned models (each takes the options it knows; see `scdca.models` and the docs' models page)")
    b.add("--backbone", default=None, group=g, help="backbone folder (scdca pretrain writes one), or random:LxD")
    b.add("--encoder", default=None, group=g, help=encoder_help("chemnet for scDCA, rdkit2d for biolord"))
    add_training_options(b, g)
    b.add("--device", default=None, group=g)
    add_keys(b)

    r = Command(sub, "report", cmd_report, help="HTML + Markdown report from a benchmark folder's results.csv")
    r.add("dir")
    r.add("--model", default=None, help="model to test against all others (default: first learned model)")
    r.add("--metric", default="pearson_delta_deg", help=f"one of {', '.join(METRICS.names())}")
    r.add("--annotations", default=None, help="CSV/TSV mapping drugs to groups (target, pathway)")
    r.add("--drug-column", default="Product.Name")
    r.add("--group-column", default="Target")

    x = Command(sub, "export", cmd_export, help="write one grid cell's predictions in another tool's format")
    x.add("run", help="a `scdca benchmark` --out folder")
    x.add("--model", required=True)
    x.add("--task", required=True)
    x.add("--seed", type=int, default=0)
    x.add("--format", default="cell-eval", help="cell-eval: real/pred AnnData pair with control rows")
    x.add("--out", required=True, help="output folder")


def _flat(raw: dict) -> dict:
    """A run's config.json (BenchmarkConfig's fields, nested) as this command's options."""
    raw = {k: v for k, v in raw.items() if k not in ("identity", "provenance", "report")}
    flat = {k: v for k, v in raw.items() if k not in ("keys", "model_options", "lincs")}
    for field, value in (raw.get("lincs") or {}).items():  # read_lincs's arguments: their flags
        flat[LINCS_FLAGS[field][0].lstrip("-") if field in LINCS_FLAGS else f"lincs.{field}"] = value
    for key in ("models", "tasks", "metrics"):
        if isinstance(flat.get(key), list):
            flat[key] = ",".join(flat[key])
    for field, value in (raw.get("keys") or {}).items():
        flag = KEY_FLAGS.get(field, (f"--{field}",))[0]
        flat[flag.lstrip("-")] = value
    options = raw.get("model_options") or {}
    flat.update({k: v for k, v in options.items() if k in MODEL_OPTIONS})
    flat.update({f"model_options.{k}": v for k, v in options.items() if k not in MODEL_OPTIONS})  # refused, named
    return flat


def cmd_benchmark(args) -> None:
    from scdca.eval.grid import BenchmarkConfig, run
    from scdca.eval.report import build, recommended_text
    from scdca.eval.stats import split_means
    from scdca.eval.tables import format_summary, summarize

    require(args, "data", "out")
    grid = {k: getattr(args, k) for k in GRID}
    cfg = BenchmarkConfig(data=args.data, out=args.out, **grid, keys=data_keys(args), references=args.references,
                          model_options=model_options(args), compounds=args.compounds,
                          lincs=lincs_options(args))  # fmt: skip
    t0 = time.perf_counter()
    results = run(
        replace(cfg, report=False),
        progress=not args.quiet,
        workers=args.workers,
        ray_address=args.ray_address,
        threads=args.threads_per_worker,
    )
    t1 = time.perf_counter()
    print(format_summary(summarize(results)))
    print(f"\nwrote {cfg.out}/results.csv, summary.csv, predictions/, splits/ (grid {t1 - t0:.1f} s)")
    path = build(cfg.out)
    print(f"wrote {path} ({time.perf_counter() - t1:.1f} s)")
    lead = recommended_text(split_means(results))
    if lead:
        print("\n" + lead)


def cmd_report(args) -> None:
    from scdca.eval.report import build

    ann = None
    if args.annotations:
        from scdca.eval.report import read_annotations

        ann = read_annotations(args.annotations, drug_column=args.drug_column, group_column=args.group_column)
    path = build(args.dir, model=args.model, metric=args.metric, annotations=ann, annotation_name=args.group_column)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def cmd_export(args) -> None:
    from scdca.eval.export import export

    paths = export(args.run, args.model, args.task, args.seed, args.out, fmt=args.format)
    real, pred = (str(p) for p in paths)
    print(
        f"wrote {real} and {pred}; score them with:\n"
        f"  cell-eval run -ar {real} -ap {pred} --control-pert control --pert-col perturbation "
        f"--celltype-col cell_line --profile anndata -o {args.out}/cell-eval"
    )
