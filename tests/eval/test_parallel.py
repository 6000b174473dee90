import operator
import time

import pandas as pd
import pytest
import torch

from scdca.errors import GridError, ScdcaInputError
from scdca.eval import parallel
from scdca.eval.grid import BenchmarkConfig, run
from scdca.eval.parallel import JobFailure, default_threads, run_jobs


def _nap(threads_seen: list, seconds: float) -> float:
    threads_seen.append(torch.get_num_threads())
    time.sleep(seconds)
    return seconds


def test_serial_jobs_report_a_failure_and_finish_the_others():
    out = dict(run_jobs(operator.truediv, [(2.0,), (0.0,), (4.0,)], 8.0))
    assert out[2.0,] == 4.0 and out[4.0,] == 2.0
    assert isinstance(out[0.0,], JobFailure)
    assert "ZeroDivisionError" in out[0.0,].summary and "Traceback" in out[0.0,].traceback


def test_threads_per_worker_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert default_threads(1) == 8 and default_threads(3) == 2 and default_threads(16) == 1
    with pytest.raises(ScdcaInputError, match="workers: 0"):
        list(run_jobs(operator.add, [(1,)], 1, workers=0))


def test_jobs_run_here_until_workers_would_save_more_than_rays_start_up(monkeypatch):
    sent = []
    monkeypatch.setattr(parallel, "_run_ray", lambda fn, jobs, shared, **kw: sent.extend(jobs) or iter(()))
    before, seen = torch.get_num_threads(), []
    monkeypatch.setattr(parallel, "RAY_START_S", 0.15)
    here = [job for job, _ in run_jobs(_nap, [(0.1,)] * 5, seen, workers=2, threads=1)]
    # after the first job: 4 more x 0.1 s here, of which 2 workers would save 0.2 s > 0.15 s
    assert len(here) == 1 and len(sent) == 4
    assert seen == [1] and torch.get_num_threads() == before  # the workers' thread cap, then restored
    sent.clear()
    monkeypatch.setattr(parallel, "RAY_START_S", 0.25)  # saving at most 0.2 s: never worth starting Ray
    assert len(list(run_jobs(_nap, [(0.1,)] * 5, [], workers=2))) == 5 and not sent
    sent.clear()
    list(run_jobs(_nap, [(0.01,)] * 3, [], address="auto"))  # a cluster was asked for: everything goes there
    assert len(sent) == 3
    sent.clear()
    monkeypatch.setattr(parallel, "RAY_START_S", 0.0)  # 0: every job on the workers
    list(run_jobs(_nap, [(0.01,)] * 3, [], workers=2))
    assert len(sent) == 3


@pytest.fixture(scope="module")
def grids(tiny_data, tmp_path_factory):
    """The same tiny grid, serial and on 2 Ray workers; in the parallel one a third model's
    cells all fail (its backbone folder holds no checkpoint)."""
    pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parallel, "RAY_START_S", 0.0)  # every cell on the workers, however small the grid
        return _grids(tiny_data, tmp_path_factory)


def _grids(tiny_data, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken_backbone")
    (broken / "best_model.pt").write_bytes(b"not a checkpoint")
    common = dict(data="tiny.h5ad", tasks=["unseen_drug", "unseen_cell_zeroshot"], seeds=2, k=5, report=False)
    serial = run(
        BenchmarkConfig(out=str(tmp_path_factory.mktemp("serial")), models=["control", "additive", "ridge"], **common),
        data=tiny_data,
        progress=False,
    )
    out = tmp_path_factory.mktemp("parallel")
    cfg = BenchmarkConfig(
        out=str(out),
        models=["control", "additive", "ridge", "scdca_lowrank"],
        model_options={"backbone": str(broken)},
        **common,
    )
    with pytest.raises(GridError) as err:
        run(cfg, data=tiny_data, progress=False, workers=2)
    return serial, out, str(err.value)


@pytest.mark.slow  # over 20 s; `make test` runs it
def test_parallel_grid_equals_the_serial_one(grids):
    serial, out, _ = grids
    parallel = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""], dtype={"held_out": str})
    parallel["held_out"] = parallel["held_out"].fillna("")
    key = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric"]
    a = serial.sort_values(key).reset_index(drop=True)
    b = parallel.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)
    assert set(b["model"]) >= {"control", "additive", "ridge", "ceiling", "oracle"}


@pytest.mark.slow  # shares a fixture that takes over 20 s; `make test` runs it
def test_a_failing_cell_is_reported_and_the_others_are_kept(grids):
    _, out, message = grids
    failed = sorted(p.name for p in (out / "failed").iterdir())
    assert failed == [
        f"scdca_lowrank__{t}__seed{s}.txt" for t in ("unseen_cell_zeroshot", "unseen_drug") for s in (0, 1)
    ]
    assert "Traceback" in (out / "failed" / failed[0]).read_text()
    assert message.startswith("4 of 24 grid cell(s) failed: scdca_lowrank__") and "rerun the same command" in message
    assert not any(p.name.startswith("scdca_lowrank") for p in (out / "cells").iterdir())


@pytest.mark.slow  # over 20 s; `make test` runs it
def test_two_workers_give_the_serial_one_thread_numbers_for_the_recommended_model(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setattr(parallel, "RAY_START_S", 0.0)
    common = dict(
        data="tiny.h5ad",
        models=["scdca_routed"],
        tasks=["unseen_drug", "unseen_cell_fewshot"],
        seeds=1,
        k=5,
        report=False,
        model_options={"backbone": "random:2x16", "encoder": "morgan:bits=128"},
    )
    serial = run(BenchmarkConfig(out=str(tmp_path / "serial"), **common), data=tiny_data, progress=False, threads=1)
    workers = run(BenchmarkConfig(out=str(tmp_path / "parallel"), **common), data=tiny_data, progress=False, workers=2)
    key = ["model", "task", "seed", "held_out", "cell_line", "drug", "dose", "metric"]
    a = serial.sort_values(key).reset_index(drop=True)
    b = workers.sort_values(key).reset_index(drop=True)
    assert (a["model"] == "scdca_routed").any()
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # the same thread cap: the same numbers
