import dataclasses
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdca.errors import ScdcaInputError
from scdca.eval.grid import BenchmarkConfig, run
from scdca.eval.runs import RESULT_COLUMNS
from scdca.storage import atomic_path, write_csv


@pytest.fixture(scope="module")
def bench(tiny_sim, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchmarkConfig(
        data="tiny.h5ad",
        out=str(out),
        models=["control", "additive"],
        tasks=["unseen_drug", "unseen_cell_zeroshot"],
        seeds=2,
        k=5,
    )
    results = run(cfg, data=tiny_data, progress=False)
    return cfg, out, results, tiny_data


def test_results_are_tidy_with_one_row_per_condition_and_metric(bench):
    cfg, out, results, data = bench
    assert list(results.columns) == RESULT_COLUMNS
    on_disk = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert len(on_disk) == len(results)
    # zero-shot: every condition of every line is tested exactly once per seed
    z = results[(results.model == "control") & (results.task == "unseen_cell_zeroshot") & (results.metric == "mse")]
    assert len(z) == 2 * len(data.ids)
    assert set(results["model"]) == {"control", "additive", "ceiling", "ceiling_half", "oracle"}


def test_summary_is_mean_and_se_over_seeds(bench):
    cfg, out, results, data = bench
    summary = pd.read_csv(out / "summary.csv")
    row = summary[(summary.model == "additive") & (summary.task == "unseen_drug") & (summary.metric == "mse")].iloc[0]
    per_seed = (
        results[(results.model == "additive") & (results.task == "unseen_drug") & (results.metric == "mse")]
        .groupby("seed")["value"]
        .mean()
    )
    assert row["n"] == 2
    assert row["mean"] == pytest.approx(per_seed.mean())
    assert row["se"] == pytest.approx(per_seed.std(ddof=1) / np.sqrt(2))


def test_control_has_zero_change_correlation_and_oracle_beats_it(bench):
    _, out, _, _ = bench
    s = pd.read_csv(out / "summary.csv").set_index(["model", "task", "metric"])["mean"]
    assert s["control", "unseen_drug", "pearson_delta_deg"] == 0.0
    assert s["oracle", "unseen_drug", "mse"] < s["control", "unseen_drug", "mse"]


def test_prediction_files_carry_observed_control_and_degs(bench):
    _, out, _, data = bench
    p = ad.read_h5ad(out / "predictions" / "additive__unseen_cell_zeroshot__seed0.h5ad")
    ctrl = p.obs["control"].to_numpy(bool)
    # every condition once, then one control row per line (its observed control mean, also as prediction)
    assert (~ctrl).sum() == len(data.ids) and ctrl.sum() == len(data.cell_lines)
    assert list(p.var_names) == list(data.genes)
    assert {"observed", "control"} <= set(p.layers)
    cid = p.obs_names[0]
    np.testing.assert_allclose(p.layers["observed"][0], data.mean[data.ids.index(cid)], rtol=1e-6)
    line = p.obs.loc[ctrl, "cell_line"].iloc[0]
    np.testing.assert_allclose(p[ctrl].X[0], data.control_for([line])[0], rtol=1e-6)
    assert p.uns["degs"].loc[cid].iloc[0] == data.genes[data.degs[cid][0]]
    assert set(p.obs["held_out"]) == set(data.cell_lines)
    assert p.uns["scdca"]["model"] == "additive" and "torch" in p.uns["scdca"]["versions"]
    # the data's own obs keys (sci-Plex defaults here) next to the canonical ones
    assert (p.obs["cell_type"] == p.obs["cell_line"]).all() and (p.obs["dose_val"] == p.obs["dose"]).all()
    assert p.obs.loc[cid, "perturbation"] == f"{p.obs.loc[cid, 'drug']}@{p.obs.loc[cid, 'dose']:g}"
    assert (out / "splits" / "unseen_drug__seed1.json").exists()


def test_resume_skips_finished_cells_and_redoes_missing_ones(bench, tiny_data):
    cfg, out, results, _ = bench
    done = out / "cells" / "control__unseen_drug__seed0.parquet"
    redo = out / "cells" / "additive__unseen_drug__seed1.parquet"
    t_done = os.path.getmtime(done)
    redo.unlink()
    again = run(cfg, data=tiny_data, progress=False)
    assert os.path.getmtime(done) == t_done
    assert redo.exists()
    pd.testing.assert_frame_equal(again.reset_index(drop=True), results.reset_index(drop=True))
    # the table is written twice, as CSV for people and parquet for the report: the same rows
    from scdca.eval.runs import read_results

    fast = read_results(out)
    slow = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""], dtype={"held_out": str})
    assert len(fast) == len(slow) == len(results)
    np.testing.assert_allclose(fast["value"], slow["value"], rtol=1e-12, equal_nan=True)
    assert (fast["metric"].astype(str).to_numpy() == slow["metric"].to_numpy()).all()


def test_a_run_folder_without_results_parquet_is_reported_from_its_csv(bench, tmp_path):
    import shutil

    from scdca.eval.report import build
    from scdca.eval.runs import read_results

    _, out, _, _ = bench
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "results.parquet").unlink()  # a run made before session 13
    (old / "report.md").unlink()
    from_csv = read_results(old)
    from_parquet = read_results(out)
    assert isinstance(from_csv["metric"].dtype, pd.CategoricalDtype)
    np.testing.assert_allclose(from_csv["value"], from_parquet["value"], rtol=1e-12, equal_nan=True)
    build(old)

    def section(folder, title):
        text = (folder / "report.md").read_text()
        return text[text.index(title) :].split("\n## ")[0]

    for title in ("## Summary", "## Main table", "## DEG-size sweep"):
        assert section(old, title) == section(out, title)


def test_a_run_folder_with_csv_cells_from_an_older_version_resumes_without_recomputing(bench, tiny_data, tmp_path):
    import shutil

    cfg, out, results, _ = bench
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for cell in (old / "cells").glob("*.parquet"):  # the layout before session 13: one CSV per cell
        pd.read_parquet(cell).to_csv(cell.with_suffix(".csv"), index=False)
        cell.unlink()
    stamp = {p: os.path.getmtime(p) for p in (old / "cells").glob("*.csv")}
    again = run(dataclasses.replace(cfg, out=str(old)), data=tiny_data, progress=False)
    assert {p: os.path.getmtime(p) for p in (old / "cells").glob("*.csv")} == stamp  # nothing recomputed
    assert not list((old / "cells").glob("*.parquet"))
    np.testing.assert_allclose(again["value"].to_numpy(), results["value"].to_numpy(), rtol=1e-12, equal_nan=True)


def test_resume_into_a_folder_with_other_settings_is_refused(bench, tiny_data):
    cfg, out, _, _ = bench
    other = BenchmarkConfig(data="tiny.h5ad", out=str(out), models=["control"], tasks=["unseen_drug"], seeds=1, k=7)
    with pytest.raises(ScdcaInputError, match="different settings"):
        run(other, data=tiny_data, progress=False)


def test_unknown_model_task_metric_names_are_refused_with_choices(tmp_path):
    with pytest.raises(ScdcaInputError, match="models: unknown model.*'gpt'.*knn"):
        BenchmarkConfig(data="x.h5ad", out=str(tmp_path), models="control,gpt")
    with pytest.raises(ScdcaInputError, match="tasks: unknown task.*unseen_pair"):
        BenchmarkConfig(data="x.h5ad", out=str(tmp_path), tasks="unseen_moon")
    with pytest.raises(ScdcaInputError, match="metrics: unknown metric.*r2_deg"):
        BenchmarkConfig(data="x.h5ad", out=str(tmp_path), metrics="accuracy")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_csv(target, pd.DataFrame({"a": [1]}))
    assert target.read_text() == "a\n1\n"


def test_benchmark_writes_a_report_with_a_deg_sweep(bench):
    _, out, results, _ = bench
    page = (out / "report.html").read_text()
    assert "DEG-size sweep" in page and "Paired t-tests" in page
    from scdca.eval.report import deg_sweep, deg_sweep_from_predictions

    sweep = deg_sweep(results)  # from the results' r2_deg_<k> rows, no prediction file read
    assert set(sweep["k"]) >= {"10", "all"}
    # the same numbers as the sweep read from the prediction files (runs made before the metrics)
    old = deg_sweep_from_predictions(out, ks=(10, "all"))
    old["model"] = old["model"].replace({"ceiling": "ceiling_half"})  # its file holds the uncorrected halves
    both = sweep.merge(old, on=["model", "task", "k"], suffixes=("", "_files"))
    assert len(both) == len(old) > 0
    np.testing.assert_allclose(both["value"], both["value_files"], rtol=1e-6)


def test_models_get_only_the_options_they_accept_and_the_grid_seed(monkeypatch):
    from scdca.eval.grid import _make
    from scdca.models import MODELS
    from scdca.models.base import PerturbationModel

    seen = {}

    class Probe(PerturbationModel):
        options = ("encoder", "seed")

        def __init__(self, **kw):
            seen.update(kw)

        def _fit(self, train):
            pass

        def _predict(self, query):
            raise NotImplementedError

    monkeypatch.setitem(MODELS._entries, "probe", Probe)
    _make("probe", {"encoder": "morgan", "lr": 0.5, "backbone": "x"}, 3)
    assert seen == {"encoder": "morgan", "seed": 3}
    assert type(_make("ridge", {"encoder": "morgan", "lr": 0.5}, 3)).__name__ == "RidgeBaseline"


def test_backbone_audit_says_what_the_backbone_saw(tmp_path, tiny_sim):
    from scdca import storage
    from scdca.eval.grid import backbone_audit
    from scdca.eval.report import backbone_text
    from scdca.nn.pretrain import PretrainConfig, pretrain

    data, other = tmp_path / "screen.h5ad", tmp_path / "other.h5ad"
    storage.write_h5ad(data, tiny_sim)
    storage.write_h5ad(other, tiny_sim[:200].copy())
    tiny = dict(layers=1, dim=8, heads=2, steps=1, batch_size=4, seq_len=8, eval_every=1, val_cells=8)
    pretrain(str(data), tmp_path / "ctrl", PretrainConfig(**tiny), progress=False)
    pretrain(str(data), tmp_path / "leak", PretrainConfig(**tiny, include_perturbed=True), progress=False)
    pretrain(str(other), tmp_path / "other", PretrainConfig(**tiny), progress=False)
    verdicts = {name: backbone_audit(str(tmp_path / name), str(data))["verdict"] for name in ("ctrl", "leak", "other")}
    assert verdicts == {"ctrl": "controls of this file", "leak": "leak", "other": "other data"}
    assert backbone_audit("random:2x8", str(data))["verdict"] == "random"
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "args.json").write_text("{}")
    assert backbone_audit(str(tmp_path / "official"), str(data))["verdict"] == "unknown"
    assert backbone_text(backbone_audit(str(tmp_path / "leak"), str(data))).count("LEAK") == 1


def _readable(path: Path) -> None:
    """Raise if a file under its final name is partial."""
    if path.suffix == ".csv":
        pd.read_csv(path)
    elif path.suffix == ".parquet":
        pd.read_parquet(path)
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".h5ad":
        ad.read_h5ad(path)
    elif path.suffix == ".png":
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82")
    elif path.suffix in (".html", ".md"):
        assert path.read_text().rstrip()


@pytest.mark.slow  # over 20 s; `make test` runs it
def test_killed_at_random_points_and_rerun_gives_the_uninterrupted_results(tmp_path, tiny_sim):
    import signal
    import subprocess
    import sys

    from scdca import storage

    data = tmp_path / "d.h5ad"
    storage.write_h5ad(data, tiny_sim)

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "scdca.cli",
            "benchmark",
            "--data",
            str(data),
            "--out",
            str(out),
            "--models",
            "control,ridge",
            "--tasks",
            "unseen_drug,unseen_pair",
            "--seeds",
            "2",
            "--k",
            "5",
            "--quiet",
        ]

    import time

    subprocess.run(cmd(tmp_path / "full"), check=True, capture_output=True)
    out, rng, kills, done_at_kill = tmp_path / "killed", np.random.default_rng(0), 0, []
    n_cells = 16  # (control, ridge, ceiling, oracle) x 2 tasks x 2 seeds

    def finished() -> int:
        return len(list((out / "cells").glob("*.parquet")))

    # kill once during start-up, then after a random number of finished grid cells (plus a random
    # instant, so some kills land inside the next cell's work or its writes): progress, not wall
    # time, decides, so a slow or busy machine kills mid-grid as surely as a fast one
    targets = [0] + sorted(int(n) for n in rng.choice(np.arange(1, n_cells), size=3, replace=False))
    for target in targets:
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and finished() < target:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.1)) + (1.0 if target == 0 else 0.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            done_at_kill.append(finished())
        for path in out.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                _readable(path)  # every file under its final name is complete
    subprocess.run(cmd(out), check=True, capture_output=True)
    assert kills >= 2 and any(0 < n < 16 for n in done_at_kill), done_at_kill  # killed mid-grid, not only before
    assert not list(out.rglob(".*.tmp"))  # temporary files of killed writes are cleaned up
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), pd.read_csv(tmp_path / "full" / "results.csv"))


def test_ceiling_is_the_split_half_correlation_corrected_by_spearman_brown(bench):
    from scdca.eval.grid import spearman_brown

    half = pd.DataFrame(
        {
            "model": "ceiling_half",
            "metric": ["pearson_delta", "pearson_delta_deg", "mse", "pearson_delta"],
            "value": [0.5, 0.8, 0.1, -0.2],
        }
    )
    full = spearman_brown(half)
    # by hand: 2 * 0.5 / 1.5 and 2 * 0.8 / 1.8; no correction for r <= 0; none defined for mse
    np.testing.assert_allclose(full["value"], [2 / 3, 16 / 18, -0.2])
    assert list(full["metric"]) == ["pearson_delta", "pearson_delta_deg", "pearson_delta"]
    assert set(full["model"]) == {"ceiling"}
    # in a run: the ceiling row is the corrected ceiling_half row of the same condition
    _, _, results, _ = bench
    key = ["task", "seed", "held_out", "cell_line", "drug", "dose", "metric"]
    both = results[results["model"] == "ceiling"].merge(results[results["model"] == "ceiling_half"], on=key)
    assert len(both) and set(both["metric"]) == {"pearson_delta", "pearson_delta_deg"}
    r = both["value_y"].to_numpy()
    np.testing.assert_allclose(both["value_x"], np.where(r > 0, 2 * r / (1 + r), r))
    assert (both["value_x"] >= both["value_y"]).all()


def test_the_run_records_the_data_diagnostics_and_the_report_opens_with_them(bench):
    from scdca.eval.diagnostics import plate_diagnostics
    from scdca.eval.report import build

    _, out, _, data = bench
    stored = pd.read_csv(out / "diagnostics.csv")
    pd.testing.assert_frame_equal(stored, plate_diagnostics(data).astype(stored.dtypes.to_dict()), check_exact=False)
    assert list(stored["cell_line"]) == data.cell_lines
    page = build(out).read_text()
    assert page.index("How much drug signal the data carries") < page.index("Main table")


def test_reading_parts_of_a_prediction_file_gives_what_the_full_read_gives(bench):
    from scdca.eval.runs import read_prediction_parts, read_predictions

    path = next((bench[1] / "predictions").glob("*.h5ad"))
    full, parts = read_predictions(path), read_prediction_parts(path)
    assert list(parts.obs_names) == list(full.obs_names) and not parts.obs["control"].any()
    np.testing.assert_array_equal(parts.X, full.X)
    np.testing.assert_array_equal(parts.layers["observed"], full.layers["observed"])
    pd.testing.assert_frame_equal(parts.uns["degs"], full.uns["degs"])
    assert "rank_genes_groups_df" not in parts.uns and "control" not in parts.layers


def test_intervals_are_scored_written_and_reported(tiny_data, tmp_path):
    cfg = BenchmarkConfig(
        data="tiny.h5ad", out=str(tmp_path), models=["ridge"], tasks=["unseen_drug", "unseen_cell_fewshot"],
        seeds=2, k=5, intervals=True, references=False,
    )  # fmt: skip
    results = run(cfg, data=tiny_data, progress=False)
    cov = results[results["metric"] == "coverage_90"]
    assert len(cov) == len(results[results["metric"] == "mse"]) and cov["value"].between(0, 1).all()
    assert cov["value"].mean() > 0.5  # calibrated intervals cover most values (0 would mean broken scales)
    width = results[results["metric"] == "interval_width_90"]["value"]
    assert (width > 0).all() and np.isfinite(width).all()
    a = ad.read_h5ad(tmp_path / "predictions" / "ridge__unseen_drug__seed0.h5ad")
    rows = ~a.obs["control"].to_numpy(bool)
    assert (a.layers["lower"] <= a.X + 1e-6).all() and (a.X <= a.layers["upper"] + 1e-6).all()
    assert np.isfinite(a.obs.loc[rows, "expected_mse"]).all() and a.uns["intervals"]["level"] == 0.9
    costs = pd.read_csv(tmp_path / "costs" / "ridge__unseen_drug__seed0.csv")
    assert (costs["calibration_seconds"] > 0).all()
    report = (tmp_path / "report.md").read_text()
    assert "Prediction intervals" in report and "error_spearman" in report
    assert (tmp_path / "fig_calibration.png").stat().st_size > 1000


def test_the_mean_baseline_scores_zero_against_itself_on_every_extended_task(tiny_data, tmp_path):
    cfg = BenchmarkConfig(data="tiny.h5ad", out=str(tmp_path), models=["dose_mean", "ridge"], tasks="extended",
                          seeds=1, k=5)  # fmt: skip
    assert len(cfg.tasks) == 7
    results = run(cfg, data=tiny_data, progress=False)
    assert set(results["task"]) == set(cfg.tasks)
    vs = results[results["metric"].isin(["pearson_vs_mean_deg", "r2_vs_mean_deg"])]
    mean = vs[vs["model"] == "dose_mean"]
    assert len(mean) > 0 and np.allclose(mean["value"], 0.0)
    assert not np.allclose(vs[vs["model"] == "ridge"]["value"].dropna(), 0.0)  # a drug model deviates from it
    summary = (tmp_path / "report.md").read_text()
    assert "Against the average perturbed response" in summary
    # the main table leads with the metric a drug-blind model cannot game
    table = summary[summary.index("Main table") :]
    assert table.index("pearson_vs_mean_deg") < table.index("pearson_delta_deg")


def test_the_benchmarks_precision_and_frozen_backbone_options_reach_the_scdca_models():
    from scdca.eval.grid import _make

    options = {"backbone": "random:1x8", "precision": "bf16", "frozen_dtype": "bfloat16", "recompute_frozen": True}
    adapter = _make("scdca", options, 0)
    assert (adapter.cfg.precision, adapter.cfg.frozen_dtype, adapter.cfg.recompute_frozen) == ("bf16", "bfloat16", True)
    lowrank = _make("scdca_lowrank", options, 0)  # reads cached states: nothing to recompute
    assert (lowrank.cfg.frozen_dtype, lowrank.cfg.recompute_frozen) == ("bfloat16", False)
    finetune = _make("finetune", options, 0)  # trains its backbone: the frozen-backbone options are not its own
    assert (finetune.cfg.precision, finetune.cfg.frozen_dtype) == ("bf16", "float32")


def test_peak_rss_sees_memory_that_tracemalloc_does_not():
    import numpy as np

    from scdca.eval.grid import PeakRSS

    with PeakRSS() as idle:
        pass
    with PeakRSS(interval=0.005) as busy:
        block = np.ones((64, 2**20), dtype=np.float32)  # 256 MB, allocated outside Python's heap tracing
        del block
    with PeakRSS() as after:
        pass
    assert busy.peak_mb - idle.peak_mb > 200  # the block was seen while it lived
    assert after.peak_mb < busy.peak_mb - 200  # and the peak is this block's, not the process's lifetime maximum
    assert idle.peak_mb > 10  # the process's own baseline (interpreter, numpy) is counted


def test_a_run_in_a_git_checkout_records_its_commit():
    import subprocess
    from pathlib import Path

    from scdca.eval.runs import git_commit

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True)
    expected = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    assert git_commit() == expected


def test_a_line_task_can_hold_out_a_few_lines_per_seed(tiny_data, tmp_path):
    cfg = BenchmarkConfig(
        data="tiny.h5ad",
        out=str(tmp_path / "run"),
        models=["control"],
        tasks=["unseen_cell_zeroshot"],
        seeds=6,
        k=5,
        report=False,
        references=False,
        held_out_lines=1,
    )
    results = run(cfg, data=tiny_data, progress=False)
    per_seed = results.groupby("seed")["held_out"].nunique()
    assert (per_seed == 1).all() and len(tiny_data.cell_lines) == 3  # one of three lines per seed
    assert results["held_out"].nunique() > 1  # drawn with the seed, not always the same line
