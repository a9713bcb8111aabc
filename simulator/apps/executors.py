"""Executors: where the tasks of a run, a sweep or a capacity plan are simulated.

A *task* is a module-level function and picklable arguments: a scenario as a plain dict (its
JSON form) plus the source path that relative files resolve against, and for pods the pod
index. No SimPy object crosses a process boundary; what comes back is a small dataclass
(:class:`~fleetsim.results.accounting.PodSummary`, :class:`RunSummary`).

* ``local``: a :class:`concurrent.futures.ProcessPoolExecutor` (spawned workers, so no fork of
  a threaded parent); ``workers=1`` runs the tasks in this process.
* ``ray``: ``ray.init(address=...)`` joins an existing cluster, or starts a local Ray when no
  address is given. Ray is an optional extra (``pip install 'fleetsim[ray]'``).

Every task is seeded from the scenario seed and its own identity only (pods:
``SeedSequence(seed, spawn_key=(pod,))``; sweep points and plan probes: their own scenario), so
the results do not depend on the executor, the number of workers or the order of completion.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from fleetsim.base.errors import UserError
from fleetsim.results.accounting import PodSummary
from fleetsim.results.result import DayTotals

EXECUTORS = ("local", "ray")


# ---------------------------------------------------------------------------------------------
# tasks (module level, so that both a process pool and Ray ship them by reference)
@dataclass
class RunSummary:
    """What a whole-run task hands back: the hourly table, the day's totals and latency."""

    hourly: pa.Table
    totals: DayTotals
    day_latency: dict[str, float]
    pod_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    in_flight_by_pod: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def _resolved(scenario_json: str, source: str):
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve

    return resolve(scenario_from_dict(json.loads(scenario_json), source), source)


def pod_task(scenario: dict, source: str, pod_index: int) -> PodSummary:
    """Simulate one pod of ``scenario`` (a task of ``fleetsim run --executor``)."""
    from fleetsim.apps.simulate import simulate_pod

    rs = _resolved(json.dumps(scenario, sort_keys=True), source)
    return simulate_pod(rs, pod_index, source=source)


def run_task(scenario: dict, source: str) -> RunSummary:
    """Simulate a whole scenario (its pods one after the other): a sweep point or a plan probe."""
    from fleetsim.apps.simulate import simulate

    rs = _resolved(json.dumps(scenario, sort_keys=True), source)
    res = simulate(rs, source=source)
    return RunSummary(
        hourly=res.hourly,
        totals=res.totals,
        day_latency=res.day_latency,
        pod_ci=res.pod_ci,
        in_flight_by_pod=[p.in_flight for p in res.pods],
    )


# ---------------------------------------------------------------------------------------------
class Executor:
    """Runs tasks and yields ``(index, result)`` as they finish; :meth:`map` keeps the order."""

    name = "base"
    workers = 1

    def imap_unordered(self, fn: Callable, args: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        for i, a in enumerate(args):
            yield i, fn(*a)

    def map(
        self, fn: Callable, args: Sequence[tuple], on_done: Callable[[], None] | None = None
    ) -> list:
        """Results of ``fn(*a)`` for each ``a`` in ``args``, in order."""
        out: list[Any] = [None] * len(args)
        for i, r in self.imap_unordered(fn, args):
            out[i] = r
            if on_done is not None:
                on_done()
        return out

    def close(self, cancel: bool = False) -> None:
        """Release the workers; ``cancel``: stop the running tasks now, without waiting."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        # leaving on an error or an interrupt: the running tasks are cancelled, not awaited
        self.close(cancel=exc_type is not None)


class LocalExecutor(Executor):
    """A process pool of ``workers`` spawned processes (``workers=1``: this process)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            _quiet_resource_tracker()
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init
            )
            _LIVE.add(self)
        return self._pool

    def imap_unordered(self, fn, args):
        if self.workers == 1 or (len(args) <= 1 and self._pool is None):
            yield from super().imap_unordered(fn, args)
            return
        pool = self._get_pool()
        futs = {pool.submit(fn, *a): i for i, a in enumerate(args)}
        try:
            pending = set(futs)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield futs[f], f.result()
        finally:
            for f in futs:
                f.cancel()

    def close(self, cancel: bool = False) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        _LIVE.discard(self)
        if not cancel:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        _terminate(pool)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with its leak warning off: after a second
    Ctrl-C the command exits at once (os._exit), and the tracker, which then unlinks the pool's
    semaphores as it should, would otherwise print a multi-line warning under the one-line
    message."""
    from multiprocessing import resource_tracker

    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning:multiprocessing.resource_tracker"
    try:
        resource_tracker.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved


def _worker_init() -> None:
    """In a worker: a terminal's Ctrl-C (sent to the whole process group) is the parent's to
    handle; the parent then terminates the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _terminate(pool: ProcessPoolExecutor, grace_s: float = 0.5) -> None:
    """Stop a process pool now: pending tasks cancelled, worker processes terminated (SIGTERM,
    then SIGKILL after ``grace_s``), never waiting for a running task."""
    import time

    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    t_end = time.monotonic() + grace_s
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, t_end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(0.5)


_LIVE: set[LocalExecutor] = set()  # executors with a live pool (for kill_workers)


def kill_workers() -> None:
    """SIGKILL every worker process of this process's pools (a second Ctrl-C: no waiting)."""
    for ex in list(_LIVE):
        pool = ex._pool
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                p.kill()


class RayExecutor(Executor):
    """Tasks as Ray remote functions, on a cluster (``address``) or a local Ray."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError(
                "--executor ray: Ray is not installed "
                "(fix: pip install 'fleetsim[ray]', or use --executor local)"
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=workers or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            self._started = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self._remote: dict[Callable, Any] = {}

    def imap_unordered(self, fn, args):
        ray = self._ray
        rf = self._remote.get(fn)
        if rf is None:
            rf = self._remote[fn] = ray.remote(num_cpus=1)(fn)
        refs = [rf.remote(*a) for a in args]
        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    yield index[r], ray.get(r)
        finally:
            for r in pending:
                ray.cancel(r, force=True)

    def close(self, cancel: bool = False) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def check_workers(workers: int | None) -> None:
    """``--workers`` is unset or at least 1 (checked before any output or progress bar)."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1 (fix: --workers 2)")


def make_executor(
    name: str = "local", workers: int | None = None, address: str | None = None
) -> Executor:
    """An executor by name: ``local`` (process pool) or ``ray``."""
    check_workers(workers)
    if name == "local":
        if address:
            raise UserError(f"--address {address!r}: only for --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, address)
    raise UserError(f"--executor {name!r}: not an executor (fix: one of {', '.join(EXECUTORS)})")


def add_executor_args(p) -> None:
    """The ``--executor/--workers/--address`` options shared by run, sweep and plan."""
    p.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="where tasks run: local process pool (default) or ray",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (local: default os.cpu_count(); ray: local CPUs)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (ray.init(address=...)); default: a local Ray",
    )


def pod_runner(executor: Executor, on_done: Callable[[], None] | None = None) -> Callable:
    """A ``simulate(..., pod_runner=...)`` hook that runs the pods as tasks of ``executor``."""

    def run(rs, indices: list[int], source: str) -> list[PodSummary]:
        data = rs.scenario.model_dump(mode="json")
        return executor.map(pod_task, [(data, source, i) for i in indices], on_done)

    return run


def progress_label(command: str, ex: Executor) -> str:
    """The progress bar's label of a command's tasks: ``sweep (local, 2 workers)``, ``1 worker``."""
    return f"{command} ({ex.name}, {ex.workers} worker{'' if ex.workers == 1 else 's'})"


@contextmanager
def task_progress(label: str, quiet: bool = False):
    """A rich progress bar over tasks on stderr; yields ``add(n)``, ``done()``, ``describe(text)``
    and ``log(text)`` callbacks. ``log`` prints a line above the bar (through the bar's own
    console, so the line never runs into the bar's)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fleetsim.apps.common import console as make_console

    console = make_console(stderr=True, quiet=quiet)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=0)

        class _Hooks:
            def add(self, n: int) -> None:
                bar.update(task, total=(bar.tasks[0].total or 0) + n)

            def done(self) -> None:
                bar.advance(task, 1)

            def describe(self, text: str) -> None:
                bar.update(task, description=text)

            def log(self, text: str) -> None:
                bar.console.print(text, soft_wrap=True)

        yield _Hooks()
