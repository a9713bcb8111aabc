"""Micro-benchmarks (matmul FLOP/s, copy bandwidth) and the prefill / decode timing grid.

Every timed call runs under ``torch.inference_mode`` and is timed by a :class:`Timer`
(:func:`make_timer`): on CUDA by CUDA events (``torch.cuda.Event(enable_timing=True)``) recorded
on the stream around the call, after a synchronise that empties the queue, so a time runs from
the first launch to the end of the last kernel (the host's launch gaps included, as in an engine
iteration) and is read from the GPU's own clock; on the CPU by ``time.perf_counter``. Each point
is warmed up, repeated, and summarised by its median.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .model import TORCH_DTYPES, TorchTransformer
from .power import PowerMeter


class Timer:
    """Times one call: ``time(fn)`` returns its seconds. ``sync`` waits for the device's queued
    work; ``clock`` is the wall clock of the power meter's windows."""

    method = "perf_counter"

    def __init__(
        self, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.sync = sync
        self.clock = clock

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = self.clock()
        fn()
        self.sync()
        return self.clock() - t0


class CudaEventTimer(Timer):
    """Times a call with a pair of CUDA events (``event_cls(enable_timing=True)``) on the
    current stream: ``elapsed_time`` is the GPU's clock, in milliseconds."""

    method = "cuda-events"

    def __init__(
        self,
        sync: Callable[[], None],
        event_cls: Callable[..., Any],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        self.start = event_cls(enable_timing=True)
        self.end = event_cls(enable_timing=True)

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()  # an empty queue: the start event fires when it is recorded
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end)) / 1e3


def make_timer(device: torch.device, torch_mod: Any = torch) -> Timer:
    """CUDA events on a CUDA device, ``time.perf_counter`` elsewhere. ``torch_mod`` is the torch
    module (a fake in the tests)."""
    if device.type == "cuda":
        return CudaEventTimer(lambda: torch_mod.cuda.synchronize(device), torch_mod.cuda.Event)
    return Timer(lambda: None)


def time_fn(
    fn: Callable[[], object],
    timer: Timer,
    *,
    warmup: int,
    repeats: int,
    min_time_s: float = 0.0,
) -> tuple[list[float], float, float]:
    """Run ``fn`` ``warmup`` times untimed, then at least ``repeats`` times (and for at least
    ``min_time_s`` seconds of wall time); returns the per-call times (s, by ``timer``) and the
    wall window (``timer.clock``) of the timed runs."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        timer.sync()
        times: list[float] = []
        t_begin = timer.clock()
        while len(times) < repeats or timer.clock() - t_begin < min_time_s:
            times.append(timer.time(fn))
            if len(times) >= 10_000:
                break
        return times, t_begin, timer.clock()


def matmul_peak(device: torch.device, dtype: str, n: int, repeats: int) -> dict:
    """Achievable FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` (median of repeats)."""
    gen = torch.Generator(device=device).manual_seed(123)
    dt = TORCH_DTYPES[dtype]
    a = torch.empty(n, n, device=device, dtype=dt).uniform_(-1, 1, generator=gen)
    b = torch.empty(n, n, device=device, dtype=dt).uniform_(-1, 1, generator=gen)
    times, _, _ = time_fn(lambda: a @ b, make_timer(device), warmup=2, repeats=repeats)
    t = statistics.median(times)
    return {"peak_flops": 2.0 * n**3 / t, "matmul_n": n, "matmul_dtype": dtype, "matmul_time_s": t}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> dict:
    """Achievable memory bandwidth: a copy of ``nbytes`` (bytes read + written per second)."""
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    times, _, _ = time_fn(lambda: dst.copy_(src), make_timer(device), warmup=2, repeats=repeats)
    t = statistics.median(times)
    moved = 2.0 * src.numel() * 4
    return {"mem_bw_bytes_per_s": moved / t, "copy_bytes": int(moved), "copy_time_s": t}


def matmul_rate(device: torch.device, dtype: str, n: int = 256) -> float:
    """FLOP/s of a small matmul: a cheap probe for a pathological dtype (bf16 on old CPUs)."""
    return matmul_peak(device, dtype, n, repeats=3)["peak_flops"]


@dataclass(frozen=True)
class GridSpec:
    """Shapes and repeats of the timing grid."""

    prompt_tokens: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    max_prefill_tokens: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    max_cache_tokens: int
    layer_counts: tuple[int, ...]
    warmup: int = 1
    repeats: int = 3
    min_time_s: float = 0.0

    def prefill_points(self) -> list[tuple[int, int]]:
        """(batch, prompt_tokens) pairs within the token budget."""
        return [
            (b, n)
            for n in self.prompt_tokens
            for b in self.prefill_batches
            if b * n <= self.max_prefill_tokens
        ]

    def prefill_order(self) -> list[tuple[int, int]]:
        """:meth:`prefill_points` in timing order: one point per distinct token count ``B * L``
        first (the smallest batch; spread over the range), then the others (spread): a grid cut
        by the deadline still covers every ``T`` that the tabulated efficiency needs."""
        pts = self.prefill_points()
        first: dict[int, tuple[int, int]] = {}
        for b, n in sorted(pts):
            first.setdefault(b * n, (b, n))
        lead = [first[t] for t in sorted(first)]
        rest = [pt for pt in pts if pt not in lead]
        return spread(lead) + spread(rest)

    def decode_points(self) -> list[tuple[int, int]]:
        """(batch, context_tokens) pairs within the cache budget."""
        return [
            (b, c)
            for b in self.decode_batches
            for c in self.decode_contexts
            if b * c <= self.max_cache_tokens
        ]


def spread(items: list) -> list:
    """``items`` reordered first, last, middle, quarter points, ...: any prefix covers the range."""
    out: list = []
    seen: set[int] = set()
    n = len(items)
    step = n
    while len(out) < n:
        for i in [0, n - 1] if step == n else range(step // 2, n, max(step, 1)):
            if i not in seen:
                seen.add(i)
                out.append(items[i])
        if step <= 1:
            out.extend(items[i] for i in range(n) if i not in seen)
            break
        step = max(step // 2, 1)
    return out


def time_point(model: TorchTransformer, grid: GridSpec, row: dict) -> list[float]:
    """Time one grid point again (same shapes, warm-up and repeats as :func:`run_grid`);
    returns the per-call seconds."""
    timer = make_timer(model.device)
    layers, b = int(row["n_layers"]), int(row["batch"])
    try:
        if row["phase"] == "prefill":
            n = int(row["prompt_tokens"])
            model.allocate_cache(b, n)
            toks = model.random_tokens(b, n)
            fn: Callable[[], object] = lambda: model.prefill(toks, n_layers=layers)  # noqa: E731
        else:
            c = int(row["context_tokens"])
            model.allocate_cache(b, c)
            tok = model.random_tokens(b, 1)[:, 0]

            def fn() -> None:
                model.set_position(c - 1)
                model.decode_step(tok, n_layers=layers)

        times, _, _ = time_fn(
            fn, timer, warmup=grid.warmup, repeats=grid.repeats, min_time_s=grid.min_time_s
        )
        return times
    finally:
        model.free_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_grid(
    model: TorchTransformer,
    grid: GridSpec,
    *,
    meter: PowerMeter | None = None,
    deadline: float = math.inf,
    progress: Callable[[str], None] = lambda s: None,
    min_points: int = 3,
) -> tuple[list[dict], list[str]]:
    """Time prefill and decode over the grid; returns rows and notes (skipped points).

    Decode points run at a fixed context: the cache position is reset before each step, so the
    new token attends exactly ``context_tokens`` keys (itself included). Cache contents are
    zeros; attention time does not depend on the values.

    With a ``deadline`` (``time.perf_counter`` seconds), each layer count gets an equal share of
    the time left, and prefill half of that share; a phase stops starting new points when its
    share is spent, but always times its first ``min_points`` points so the fit has both phases.
    """
    timer = make_timer(model.device)
    rows: list[dict] = []
    notes: list[str] = []

    def record(phase: str, layers: int, b: int, prompt: int, ctx: int, fn: Callable) -> None:
        times, t0, t1 = time_fn(
            fn, timer, warmup=grid.warmup, repeats=grid.repeats, min_time_s=grid.min_time_s
        )
        power = math.nan
        if meter is not None:  # (a sampled meter lags: the start of its window is left out)
            power = meter.mean_w(t0 + meter.lag_fraction * (t1 - t0), t1)
        rows.append(
            {
                "phase": phase,
                "n_layers": layers,
                "batch": b,
                "prompt_tokens": prompt,
                "context_tokens": ctx,
                "time_s": statistics.median(times),
                "time_min_s": min(times),
                "time_max_s": max(times),
                "repeats": len(times),
                "power_w": power,
                "window_s": t1 - t0,
            }
        )
        progress(
            f"{phase} layers={layers} B={b} L={prompt} ctx={ctx}: "
            f"{statistics.median(times) * 1e3:.2f} ms"
        )

    def share(fraction: float) -> float:
        now = time.perf_counter()
        return now + fraction * (deadline - now) if math.isfinite(deadline) else math.inf

    for li, layers in enumerate(grid.layer_counts):
        layer_deadline = share(1.0 / (len(grid.layer_counts) - li))
        now = time.perf_counter()
        phase_deadline = now + 0.5 * (layer_deadline - now)
        for i, (b, n) in enumerate(grid.prefill_order()):
            if i >= min_points and time.perf_counter() > phase_deadline:
                notes.append(f"deadline: skipped prefill B={b} L={n} layers={layers}")
                continue
            try:
                model.allocate_cache(b, n)
                toks = model.random_tokens(b, n)
                record(
                    "prefill",
                    layers,
                    b,
                    n,
                    0,
                    lambda toks=toks, layers=layers: model.prefill(toks, n_layers=layers),
                )
            except (RuntimeError, MemoryError) as exc:
                if not _is_oom(exc) and not isinstance(exc, MemoryError):
                    raise
                notes.append(f"out of memory: skipped prefill B={b} L={n} layers={layers}")
            finally:
                model.free_cache()
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
        by_batch: dict[int, list[int]] = {}
        for b, c in grid.decode_points():
            by_batch.setdefault(b, []).append(c)
        done = 0
        for b in spread(list(by_batch)):
            contexts = by_batch[b]
            try:
                model.allocate_cache(b, max(contexts))
                tok = model.random_tokens(b, 1)[:, 0]
                for c in contexts:
                    done += 1
                    if done > min_points and time.perf_counter() > layer_deadline:
                        notes.append(f"deadline: skipped decode B={b} ctx={c} layers={layers}")
                        continue

                    def step(c: int = c, tok=tok, layers: int = layers) -> None:
                        model.set_position(c - 1)
                        model.decode_step(tok, n_layers=layers)

                    record("decode", layers, b, 0, c, step)
            except (RuntimeError, MemoryError) as exc:
                if not _is_oom(exc) and not isinstance(exc, MemoryError):
                    raise
                notes.append(f"out of memory: skipped decode B={b} layers={layers}")
            finally:
                model.free_cache()
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, notes
