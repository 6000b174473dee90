"""Run independent jobs (benchmark grid cells) in this process, or in parallel on Ray.

`run_jobs(fn, jobs, shared, ...)` yields `(job, result)` pairs as jobs finish, where each
job is a tuple of arguments for `fn(shared, *job)` and `result` is the return value or a
:class:`JobFailure` (the job's formatted traceback). A failing job never stops the others.

Ray is the engine for more than one worker: `workers=N` starts a private local Ray with N
CPUs, `address='auto'` or 'HOST:PORT' joins a running cluster (`ray start --head` on one
node, `ray start --address HEAD:6379` on the others). `shared` (the dataset) is put into
Ray's object store once and read zero-copy by every task; results come back to the
driver, which alone writes files, so workers need no shared filesystem for outputs.
Each task is given `threads` CPUs and caps torch's and BLAS's threads to match, so N
workers do not oversubscribe the cores (N workers x 2 threads on 2 cores runs ~3x slower).

A local Ray costs its start-up (`RAY_START_S`, measured by `python bench/scale.py --small-grid`),
which a small grid cannot win back. So with `workers=N` the jobs first run here, one after
another with the workers' thread cap, and after each one the time the rest would take here
is estimated (the mean job so far x jobs left). Once N workers would save more than Ray's
start-up, the rest go to Ray: a large grid switches after its first job, a grid of quick
jobs never starts Ray.

Results equal a serial run's with the same threads per job (`workers=1, threads=T`).
With another thread count, BLAS and torch sum in another order: most models agree to
the last bit, but a model whose fit amplifies rounding (c3tl on some splits, DECISIONS.md D18)
can differ visibly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from scdca.errors import ScdcaInputError

log = logging.getLogger(__name__)

RAY_START_S = 8.0  # a local Ray's start-up on a 2-core machine: init, and a worker importing the grid's code


@dataclass
class JobFailure:
    """A job that raised: the exception's one-line summary and its full traceback."""

    summary: str
    traceback: str


def default_threads(workers: int) -> int:
    """Threads per worker so that `workers` workers fill this machine's cores without oversubscribing."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _call(fn: Callable, shared: Any, job: tuple, threads: int | None):
    """Run one job, returning a JobFailure instead of raising (KeyboardInterrupt still stops).

    `threads` caps torch's and the BLAS libraries' threads (numpy's SVD sums in another order
    with another thread count), so a job gives the same numbers wherever it runs with the same cap.
    """
    limits, restore = contextlib.nullcontext(), None
    if threads is not None:
        import torch
        from threadpoolctl import threadpool_limits

        restore = torch.get_num_threads()  # a job run in the driver leaves its thread count as it was
        torch.set_num_threads(threads)
        limits = threadpool_limits(limits=threads)
    try:
        with limits:
            return fn(shared, *job)
    except Exception as err:  # noqa: BLE001 - reported to the user with its traceback, never swallowed
        return JobFailure(f"{type(err).__name__}: {err}".splitlines()[0][:300], traceback.format_exc())
    finally:
        if restore is not None:
            torch.set_num_threads(restore)


def run_jobs(
    fn: Callable,
    jobs: Sequence[tuple],
    shared: Any = None,
    *,
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
) -> Iterator[tuple[tuple, Any]]:
    """Yield `(job, fn(shared, *job) or JobFailure)` for every job, in order of completion.

    Args:
        fn: a module-level function (Ray workers import it by name).
        jobs: argument tuples, one per job.
        shared: one large read-only object every job needs (put in Ray's object store once).
        workers: 1 runs the jobs here, one after another; N > 1 runs them on a local Ray
            with N CPUs, once the jobs left would take longer here than Ray saves (see above).
        address: a running Ray cluster ('auto' or 'HOST:PORT'); overrides `workers`.
        threads: torch threads (= Ray CPUs) per job; default: cores // workers locally,
            1 on a cluster.
    """
    if workers < 1:
        raise ScdcaInputError(f"workers: {workers!r}; use 1 (serial) or more")
    if address is None and workers == 1:
        for job in jobs:
            yield job, _call(fn, shared, job, threads)
        return
    threads = threads or (1 if address else default_threads(workers))
    left = list(jobs)
    if address is None and RAY_START_S > 0:  # the workers' thread cap here, so these jobs give their numbers
        spent, done = 0.0, 0
        while left and not (done and spent / done * len(left) * (1 - 1 / workers) > RAY_START_S):
            job = left.pop(0)
            start = time.perf_counter()
            result = _call(fn, shared, job, threads)
            spent, done = spent + time.perf_counter() - start, done + 1
            yield job, result
        if not left:
            log.info("all %d jobs ran here: starting %d workers would have cost more than it saved", done, workers)
            return
    yield from _run_ray(fn, left, shared, workers=workers, address=address, threads=threads)


def _run_ray(fn, jobs, shared, *, workers: int, address: str | None, threads: int):
    try:
        import ray
    except ImportError:
        raise ScdcaInputError(
            "workers: running in parallel needs Ray; install it (pip install 'ray==2.60.0') or use --workers 1"
        ) from None
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no token
        kwargs = {"address": address} if address else {"num_cpus": workers * threads}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ScdcaInputError(
                f"ray-address: cannot reach a Ray cluster at {address!r} ({err}); start one "
                f"with `ray start --head` or drop --ray-address"
            ) from None
    try:
        remote = ray.remote(num_cpus=threads, max_retries=0)(_call)
        ref = ray.put(shared)
        pending = {remote.remote(fn, ref, job, threads): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - the worker process died (out of memory, killed, segfault)
                result = JobFailure(f"{type(err).__name__}: {err}".splitlines()[0][:300], str(err))
            yield job, result
    finally:
        if started:
            ray.shutdown()
