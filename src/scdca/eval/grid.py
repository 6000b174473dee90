"""The benchmark grid: models x tasks x seeds -> a tidy results table.

Each grid cell (model, task, seed) is written atomically to `DIR/cells/` when it
finishes, so an interrupted run resumes where it stopped. `results.csv` and
`summary.csv` are rebuilt from the cells at the end.

Two reference rows are scored on the same test conditions as the models:
`ceiling_half` (split-half noise ceiling: the mean of one random half of each condition's
cells scored against the other half; pessimistic, since each half has half the cells),
`ceiling` (its correlation metrics corrected to full depth, see `spearman_brown`) and, for
simulated data, `oracle` (the noise-free truth scored against the observed pseudobulk).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from scdca import storage
from scdca.data.degs import rank_degs
from scdca.data.keys import DataKeys
from scdca.data.screen import PerturbationData, load
from scdca.data.splits import ALL_TASKS, LINE_TASKS, TASKS, Split, make_splits
from scdca.errors import GridError, ScdcaInputError
from scdca.eval.diagnostics import plate_diagnostics
from scdca.eval.metrics import METRICS, ScoringInput, score
from scdca.eval.parallel import JobFailure, run_jobs
from scdca.eval.report import build
from scdca.eval.runs import (
    RESULT_COLUMNS,
    cell_path,
    cell_stem,
    collect,
    collect_costs,
    git_commit,
    package_versions,
    predictions_file,
    write_cell,
    write_results,
)
from scdca.eval.tables import summarize
from scdca.intervals import Intervals, SharedFits, calibrate
from scdca.models import MODELS
from scdca.models.baselines import DoseMeanBaseline
from scdca.nn.backbone import is_random
from scdca.nn.backbone import reference as backbone_reference

log = logging.getLogger(__name__)


_REFERENCE_CELLS = ("ceiling", "oracle")  # grid cells that write them (the ceiling cell writes both ceilings)
# correlations between two measurements of the same profile: the ones a split-half correction applies to
CORRELATION_METRICS = ("pearson_delta", "pearson_delta_deg")


@dataclass
class BenchmarkConfig:
    """Everything that defines a benchmark run; saved as `DIR/config.json`."""

    data: str
    out: str
    models: list[str] = field(default_factory=lambda: ["control", "train_mean", "additive", "ridge", "knn"])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    metrics: list[str] = field(default_factory=lambda: METRICS.names())
    k: int = 20
    n_top_genes: int | None = None
    keys: DataKeys = field(default_factory=DataKeys)
    references: bool = True
    model_options: dict = field(default_factory=dict)  # keyword arguments for the torch models (scdca & co.)
    report: bool = True  # write report.html / report.md at the end
    chunk_size: int | None = None  # stream the data file in chunks of this many cells (atlas-scale input)
    compounds: str | None = None  # a LINCS .gct/.gctx `data` file's compounds table (pert_id/pert_iname -> smiles)
    intervals: bool = False  # conformal prediction intervals for every model (refits each on calibration splits)
    lincs: dict = field(default_factory=dict)  # read_lincs's selection and schema arguments for LINCS `data`
    held_out_lines: int | None = None  # line tasks hold out this many lines per seed, drawn at random (None: all)

    def __post_init__(self):
        self.models = MODELS.parse_list(self.models, arg="models")
        self.metrics = METRICS.parse_list(self.metrics, arg="metrics")
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks)
        named = {"all": list(TASKS), "extended": list(ALL_TASKS)}
        tasks = named.get(",".join(tasks).strip(), [t.strip() for t in tasks])
        bad = [t for t in tasks if t not in ALL_TASKS]
        if bad or not tasks:
            raise ScdcaInputError(
                f"tasks: unknown task(s) {bad!r}; choose from {', '.join(ALL_TASKS)} (or 'all': the paper's "
                f"four; 'extended': every task)"
            )
        self.tasks = tasks
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ScdcaInputError(f"seeds: {self.seeds!r}; use at least 1")
            self.seeds = list(range(self.seeds))
        if isinstance(self.keys, dict):
            self.keys = DataKeys(**self.keys)
        if self.model_options.get("encoder"):  # an unknown encoder fails now, not at the first model that uses it
            from scdca.chem.encoders import ENCODERS

            name = str(self.model_options["encoder"]).split(":", 1)[0]
            if name not in ENCODERS.names():
                raise ScdcaInputError(
                    f"encoder: unknown molecule encoder {name!r}; choose one of: "
                    f"{', '.join(ENCODERS.names())} (e.g. --encoder morgan)"
                )

    def identity(self) -> dict:
        """The settings that must match for a run to resume into an existing folder."""
        identity = {
            "data": os.path.abspath(self.data),
            "k": self.k,
            "n_top_genes": self.n_top_genes,
            "keys": asdict(self.keys),
            "metrics": self.metrics,
            "model_options": _absolute(self.model_options),
        }
        if self.compounds:
            identity["compounds"] = os.path.abspath(self.compounds)
        if self.lincs:
            identity["lincs"] = dict(self.lincs)
        if self.held_out_lines:
            identity["held_out_lines"] = self.held_out_lines
        if self.intervals:
            identity["intervals"] = True
        if self.chunk_size and self.n_top_genes:  # streamed files choose HVGs on a sample: other genes possible
            identity["chunk_size"] = self.chunk_size
        return identity


def run(
    cfg: BenchmarkConfig,
    *,
    data: PerturbationData | None = None,
    progress: bool = True,
    workers: int = 1,
    ray_address: str | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Run the grid and write results.csv, summary.csv, predictions/, splits/, config.json.

    Args:
        cfg: the benchmark definition.
        data: already-loaded data (skips reading `cfg.data`).
        progress: show a progress bar.
        workers: grid cells run in parallel on a local Ray with this many workers (1: serial,
            in this process). Results equal the serial run's (see `scdca.eval.parallel`).
        ray_address: run the cells on this Ray cluster instead ('auto' or 'HOST:PORT').
        threads: torch and BLAS threads per worker (default: cores // workers; 1 on a cluster).
    Returns:
        The tidy results table (one row per test condition and metric).
    Raises:
        GridError: after all other cells finished and were written, if some cells raised;
            their tracebacks are in `DIR/failed/`, and a rerun retries them.
    """
    t_start = time.perf_counter()
    out = Path(cfg.out)
    data = _prepare(cfg, out, data)
    splits = {
        (task, seed): _splits(data, task, seed, out, cfg.held_out_lines) for task in cfg.tasks for seed in cfg.seeds
    }
    names = list(cfg.models) + (
        [r for r in _REFERENCE_CELLS if r != "oracle" or data.truth is not None] if cfg.references else []
    )
    grid = [(m, t, s) for t in cfg.tasks for s in cfg.seeds for m in names]
    todo = [(m, t, s, splits[t, s]) for m, t, s in grid if not cell_path(out, m, t, s).exists()]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="benchmark", unit="cell", disable=not progress)
    job_cfg = dataclasses.replace(cfg, model_options=_absolute(cfg.model_options))  # workers may run elsewhere
    jobs = run_jobs(
        partial(compute_cell, cfg=job_cfg), todo, data, workers=workers, address=ray_address, threads=threads
    )
    failures = _write_cells(out, jobs, bar)
    finished = [c for c in grid if cell_path(out, *c).exists()]
    results = collect(out, finished)
    write_results(out, results)
    storage.write_csv(out / "summary.csv", summarize(results))
    storage.write_csv(out / "costs.csv", collect_costs(out, finished))
    log.info("benchmark: grid done in %.1f s", time.perf_counter() - t_start)
    if failures:
        listed = "; ".join(f"{stem} ({why})" for stem, why in failures[:3]) + (" ..." if len(failures) > 3 else "")
        raise GridError(
            f"{len(failures)} of {len(grid)} grid cell(s) failed: {listed}. The other cells are in "
            f"results.csv; tracebacks in {out / 'failed'}/; rerun the same command to retry the failed ones"
        )
    if cfg.report:
        build(out)
    return results


def _prepare(cfg: BenchmarkConfig, out: Path, data: PerturbationData | None) -> PerturbationData:
    """Checks before any work, the data, and the run's record: config, diagnostics, backbone audit."""
    for name in cfg.models:  # fail before any work, not halfway through the grid
        MODELS.get(name).check_available()
    _check_resume(cfg, out)
    if storage.remove_stale_temps(out):
        log.info("benchmark: removed temporary files of an interrupted run in %s", out)
    if data is None:
        data = load(
            cfg.data, keys=cfg.keys, n_top_genes=cfg.n_top_genes, chunk_size=cfg.chunk_size, compounds=cfg.compounds,
            lincs=cfg.lincs,
            cells_per_condition=max(MODELS.get(m).cells_per_condition for m in cfg.models),
            control_cells_per_line=max(MODELS.get(m).control_cells_per_line for m in cfg.models),
        )  # fmt: skip
    storage.write_json(out / "config.json", written_config(cfg))
    storage.write_csv(out / "diagnostics.csv", plate_diagnostics(data))
    if cfg.model_options.get("backbone") and any("backbone" in MODELS.get(m).options for m in cfg.models):
        storage.write_json(out / "backbone_audit.json", backbone_audit(cfg.model_options["backbone"], cfg.data))
    return data


def _splits(data: PerturbationData, task: str, seed: int, out: Path, held_out_lines: int | None = None) -> list[Split]:
    """The task's splits for this seed, each also written to `out/splits/`; a line task holds out
    `held_out_lines` lines drawn with the seed among those with two drugs or more, which a few-shot
    split and a rank need (every line when None: a LINCS file has dozens)."""
    lines = None
    if held_out_lines and task in LINE_TASKS:
        per_line = data.conditions.groupby("cell_line", observed=True)["drug"].nunique()
        eligible = sorted(per_line.index[per_line >= 2])
        rng = np.random.default_rng([seed, 41])
        lines = sorted(rng.choice(eligible, size=min(held_out_lines, len(eligible)), replace=False))
    splits = make_splits(data, task, seed, lines=lines)
    for s in splits:
        s.save(out / "splits" / f"{s.name}.json")
    return splits


def _write_cells(out: Path, jobs, bar) -> list[tuple[str, str]]:
    """Write each finished cell as it arrives; a failed one leaves its traceback in `out/failed/`."""
    failures = []
    for (model, task, seed, _), result in jobs:
        stem = cell_stem(model, task, seed)
        if isinstance(result, JobFailure):
            storage.write_text(out / "failed" / f"{stem}.txt", result.traceback)
            log.error("benchmark: %s failed: %s (traceback in %s)", stem, result.summary, out / "failed")
            failures.append((stem, result.summary))
        else:
            (out / "failed" / f"{stem}.txt").unlink(missing_ok=True)
            write_cell(out, model, task, seed, *result)
        bar.update(1)
        bar.set_postfix_str(f"{model} / {task} / seed {seed}" + (f", {len(failures)} failed" if failures else ""))
    bar.close()
    return failures


def _absolute(options: dict) -> dict:
    """Model options with local paths (a backbone folder, a 'table:' encoder file) made absolute."""
    out = dict(options)
    backbone = out.get("backbone")
    if backbone and os.path.exists(backbone):
        out["backbone"] = backbone_reference(backbone)
    encoder = str(out.get("encoder") or "")
    if encoder.startswith(("table:", "hf:")) and os.path.exists(encoder.split(":", 1)[1]):
        out["encoder"] = f"{encoder.split(':', 1)[0]}:{os.path.abspath(encoder.split(':', 1)[1])}"
    return out


def written_config(cfg: BenchmarkConfig) -> dict:
    """config.json: the settings with the data path made absolute (so `scdca report` and a
    rerun find it from any folder), plus what is needed to trust a rerun: the data file's
    SHA-256, package versions and the git commit of the scdca source, if any.
    `scdca benchmark --config config.json` reruns it."""
    settings = {**asdict(cfg), "model_options": _absolute(cfg.model_options)}
    data = Path(cfg.data)
    if data.is_file():
        settings["data"] = str(data.resolve())
    if cfg.compounds and Path(cfg.compounds).is_file():
        settings["compounds"] = str(Path(cfg.compounds).resolve())
    provenance = {
        "data_sha256": storage.file_sha256(data) if data.is_file() else None,
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    return {**settings, "identity": cfg.identity(), "provenance": provenance}


def read_config(path: str | os.PathLike, **overrides) -> BenchmarkConfig:
    """A BenchmarkConfig from a YAML or JSON file (a written config.json reruns its run).

    Keys written for provenance (identity, provenance, report) are ignored; `overrides`
    (e.g. out=...) replace file values. Unknown keys are refused, naming them.
    """
    raw = storage.read_mapping(path, arg="config", hint="a YAML or JSON file such as a run's config.json")
    raw = {k: v for k, v in raw.items() if k not in ("identity", "provenance", "report")}
    fields = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ScdcaInputError(f"config: unknown setting(s) {unknown!r} in {str(path)!r}; known: {sorted(fields)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("data", "out") if k not in raw]
    if missing:
        raise ScdcaInputError(f"config: {str(path)!r} does not set {missing!r}; add them or pass --data/--out")
    return BenchmarkConfig(**raw)


def backbone_audit(backbone: str, data_path: str) -> dict:
    """What the backbone saw in pretraining, against this benchmark's data file.

    Reads the `provenance` that `scdca pretrain` records in args.json. `verdict` is
    'leak' when the backbone was pretrained on drug-treated cells of this very file (it
    has seen test responses), 'controls of this file' when only its control cells were
    used, 'other data' when another file, 'random' for an untrained backbone, and
    'unknown' when the checkpoint records nothing (e.g. an official scGPT release).
    """
    if is_random(backbone):
        return {"backbone": backbone, "verdict": "random", "provenance": None}
    args_path = Path(backbone) / "args.json"
    prov = json.loads(args_path.read_text()).get("provenance") if args_path.exists() else None
    audit = {"backbone": os.path.abspath(backbone), "provenance": prov}
    if not prov or "data_sha256" not in prov:
        return {**audit, "verdict": "unknown"}
    same = os.path.exists(data_path) and storage.file_sha256(data_path) == prov["data_sha256"]
    if same and prov.get("perturbed_cells", 0) > 0:
        log.warning(
            "backbone %s was pretrained on %d drug-treated cells of this benchmark's data file: test "
            "responses leak into it (pretrain without --include-perturbed, or on other data)",
            backbone,
            prov["perturbed_cells"],
        )
        return {**audit, "verdict": "leak"}
    return {**audit, "verdict": "controls of this file" if same else "other data"}


def _make(name: str, options: dict, seed: int, split: Split | None = None):
    """Build a model with the benchmark-wide options it accepts (and the grid seed; the split's task
    and held-out line for a model whose own folds mimic the task, `scdca_stack`)."""
    cls = MODELS.get(name)
    where = {"task": split.task, "held_out": split.held_out} if split is not None else {}
    return cls(**{k: v for k, v in {**options, "seed": seed, **where}.items() if k in cls.options})


def _check_resume(cfg: BenchmarkConfig, out: Path) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("identity")
    if saved != json.loads(json.dumps(cfg.identity())):
        raise ScdcaInputError(
            f"out: {str(out)!r} holds a benchmark with different settings ({saved}); "
            f"use a new --out folder, or delete this one to start over."
        )


class PeakRSS:
    """Context manager: the process's highest resident memory while inside (`peak_mb`; imports
    and the loaded data included), sampled every 20 ms by a thread. Unlike tracemalloc it sees
    torch's tensors, the bulk of a neural model's memory on CPU. (The rise above the level at
    entry would under-count in a worker that still holds memory freed by an earlier cell.)
    NaN where psutil cannot read it."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, float("nan")

    def __enter__(self):
        import threading

        try:
            import psutil
        except ImportError:  # a requirement, but the harness should not fail without it
            self._proc = None
            return self
        self._proc = psutil.Process()
        self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self._proc is None:
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = self._peak / 2**20
        return False


def compute_cell(
    data: PerturbationData, model_name: str, task: str, seed: int, splits: list[Split], *, cfg: BenchmarkConfig
):
    """Fit and score one grid cell -> (result rows, prediction AnnData, costs); writes nothing
    (the driver does, so it can run in a worker elsewhere)."""
    rows, preds, costs = [], [], []
    shared = SharedFits.for_splits(data, splits, seed) if cfg.intervals else None  # calibration fits splits share
    for split in splits:
        test = data.subset(split.test)
        if model_name == "ceiling" and (test.half_a is None or np.isnan(test.half_a).any(1).all()):
            return pd.DataFrame(columns=RESULT_COLUMNS), None, []
        t0 = time.perf_counter()
        tracemalloc.start()
        with PeakRSS() as rss:
            test, pred, observed, extra, model = _fit_predict(data, model_name, split, test, cfg, seed)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        cost = {"model": model_name, "task": task, "seed": seed, "held_out": split.held_out}
        memory = {"peak_python_mb": peak / 2**20, "peak_rss_mb": rss.peak_mb}
        costs.append({**cost, "seconds": time.perf_counter() - t0, **memory, **extra})
        if pred.shape != observed.shape:
            raise RuntimeError(f"{model_name} predicted shape {pred.shape}, expected {observed.shape}")
        interval = None
        if cfg.intervals and model is not None:
            t1 = time.perf_counter()
            interval = _intervals(data, model_name, split, test, pred, cfg, seed, model, shared)
            costs[-1]["calibration_seconds"] = time.perf_counter() - t1
        extras = {**scoring_extras(data, split, test, cfg.metrics), **(interval.scoring() if interval else {})}
        if model_name == "ceiling":
            half = score_conditions(test, pred, observed, "ceiling_half", split, cfg.k, cfg.metrics, extras)
            rows += [half, spearman_brown(half)]
        else:
            rows.append(score_conditions(test, pred, observed, model_name, split, cfg.k, cfg.metrics, extras))
        preds.append((split, test, pred, observed, interval))
    return (
        pd.concat(rows, ignore_index=True),
        predictions_file(model_name, task, seed, preds, k=cfg.k, keys=cfg.keys),
        costs,
    )


def _fit_predict(data: PerturbationData, model_name: str, split: Split, test: PerturbationData, cfg, seed):
    """(test, prediction, observation, cost extras, fitted model or None) for a model or a reference row."""
    if model_name == "ceiling":
        halves = test.half_a if test.half_a is not None else np.full((len(test.ids), test.n_genes), np.nan)
        ok = ~np.isnan(halves).any(1)
        test = data.subset(list(np.asarray(split.test)[ok]))
        test.degs = half_b_degs(test)
        return test, test.half_a, test.half_b, {}, None
    if model_name == "oracle":
        return test, test.truth, test.mean, {}, None
    model = _make(model_name, cfg.model_options, seed, split)
    model.fit(data.subset(split.train))
    pred = np.asarray(model.predict(data.subset(test.ids, observed=False)), dtype=np.float32)
    return test, pred, test.mean, model.cost(), model


def _intervals(
    data,
    model_name: str,
    split: Split,
    test: PerturbationData,
    pred,
    cfg,
    seed,
    model,
    shared: SharedFits | None = None,
) -> Intervals:
    """Conformal intervals for one split's predictions, calibrated on its training conditions only."""
    cal = calibrate(
        partial(_make, model_name, cfg.model_options, seed, split),
        data.subset(split.train),
        split.task,
        seed,
        k=cfg.k,
        exclude=split.held_out,
        fitted=model,
        shared=shared,
    )
    cond = test.conditions
    return Intervals.of(cal, pred, test.control_for(cond["cell_line"]), cond["dose"].to_numpy(), cond["smiles"])


def spearman_brown(half: pd.DataFrame) -> pd.DataFrame:
    """The `ceiling` rows: split-half correlations corrected to full depth.

    Each half holds half of a condition's cells, so the split-half correlation r measures
    agreement at half depth. The Spearman-Brown formula for doubling the depth,
    r_full = 2 r / (1 + r), estimates what two full-depth measurements would agree to (the
    correction cell-eval applies to its ceiling). Applied per condition to the correlation
    metrics (`CORRELATION_METRICS`) where r > 0; r <= 0 means no measurable reliability and
    is kept as it is (the formula has a pole at -1 and would only amplify noise). Other
    metrics (R^2, mse, rank) have no such correction and get no `ceiling` row; the
    uncorrected `ceiling_half` rows keep every metric.
    """
    out = half[half["metric"].isin(CORRELATION_METRICS)].copy()
    r = out["value"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["value"] = np.where(r > 0, 2 * r / (1 + r), r)
    out["model"] = "ceiling"
    return out


def half_b_degs(test: PerturbationData) -> dict[str, np.ndarray]:
    """DEGs ranked from half B (the 'observation') alone, as models' DEGs come from theirs.

    The prediction (half A) then plays no part in choosing the genes, exactly as for a
    model. Ranking on the full data would pick genes where both halves happen to agree
    and inflate the ceiling. Uses the full-data standard deviation with half the cells.
    """
    half = PerturbationData(
        genes=test.genes,
        conditions=test.conditions.assign(n_cells=test.conditions["n_cells"] // 2),
        mean=test.half_b,
        std=test.std,
        controls=test.controls,
        control_mean=test.control_mean,
        control_std=test.control_std,
    )
    return rank_degs(half)


def scoring_extras(data: PerturbationData, split: Split, test: PerturbationData, metrics) -> dict:
    """The ScoringInput fields beyond predictions that the chosen metrics need: the average perturbed
    response (`dose_mean` fitted on the split's training conditions) and the doses."""
    needs = {METRICS.get(m).needs for m in metrics}
    extras = {}
    if "reference" in needs:
        extras["reference"] = DoseMeanBaseline().fit(data.subset(split.train)).change(test)
    if "doses" in needs:
        extras["doses"] = test.conditions["dose"].to_numpy(float)
    return extras


def score_conditions(
    test: PerturbationData, pred, observed, model, split: Split, k, metrics, extras: dict | None = None
) -> pd.DataFrame:
    """Score one split's predictions -> tidy rows (one per condition and metric); `extras`: more
    ScoringInput fields (`scoring_extras`, `Intervals.scoring`)."""
    cond = test.conditions
    inp = ScoringInput(
        pred=pred,
        observed=observed,
        control=test.control_for(cond["cell_line"]),
        degs=[test.degs[i] for i in test.ids],
        groups=cond["cell_line"].to_numpy(),
        k=k,
        **(extras or {}),
    )
    values = score(inp, metrics)
    frames = [
        pd.DataFrame(
            {
                "model": model,
                "task": split.task,
                "seed": split.seed,
                "held_out": split.held_out,
                "cell_line": cond["cell_line"].to_numpy(),
                "drug": cond["drug"].to_numpy(),
                "dose": cond["dose"].to_numpy(),
                "metric": name,
                "value": v,
            }
        )
        for name, v in values.items()
    ]
    return pd.concat(frames, ignore_index=True)
