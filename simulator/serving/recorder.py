"""Per-pod accumulators: hourly work, energy and latency, and the optional per-request stream.

Everything the engine measures lands here, keyed by the hour in which it happened:

* work and energy of iterations (an iteration that straddles an hour boundary is split by time);
* tokens, credited to the hour in which the iteration that processed them ended;
* arrivals and rejections by arrival hour, completions and their latencies by finish hour.

Latency samples of an hour are kept only until the hour is over; then its percentiles are taken
and the samples dropped, so memory does not grow with the length of the run.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import numpy as np

from fleetsim.base.units import HOUR_S

LAT_PCTS = (50.0, 90.0, 95.0, 99.0)
#: the latency metrics, named as vLLM's benchmarks name them (docs/model.md, "Latency metrics")
LAT_METRICS = ("ttft", "tpot", "itl", "e2e")
# log-spaced histogram (for merging latency distributions across pods): 1 us .. 1e6 s
HIST_LO_S, HIST_DECADES, HIST_PER_DECADE = 1e-6, 12, 500
HIST_BINS = HIST_DECADES * HIST_PER_DECADE


def _hist(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The log-histogram of ``x`` (each value counted ``weights[i]`` times, integers)."""
    ok = np.isfinite(x)
    x = x[ok]
    idx = np.floor(np.log10(np.maximum(x, HIST_LO_S) / HIST_LO_S) * HIST_PER_DECADE).astype(
        np.int64
    )
    idx = np.clip(idx, 0, HIST_BINS - 1)
    if weights is None:
        return np.bincount(idx, minlength=HIST_BINS).astype(np.int64)
    out = np.zeros(HIST_BINS, dtype=np.int64)
    np.add.at(out, idx, weights[ok].astype(np.int64))  # exact integer counts
    return out


class SparseHist:
    """A log-histogram kept as its non-empty span (first bin + int32 counts; a pod-hour has at most
    MAX_ARRIVALS_PER_POD_HOUR = 2e6 requests). A dense histogram is 3 x 48 kB per pod-hour, which
    made memory grow by ~3.5 MB per simulated day; the span of real latencies is a few hundred
    bins. It behaves as the dense array where one is needed: ``np.asarray(h)``, ``h + other``,
    ``sum(hists)``, ``np.sum(hists, axis=0)``."""

    __slots__ = ("counts", "lo")

    def __init__(self, dense: np.ndarray) -> None:
        nz = np.flatnonzero(dense)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        self.lo = lo
        span = dense[lo:hi]
        # int32 for request counts; token-gap counts (ITL) can exceed it
        small = not len(span) or int(span.max()) < 2**31
        self.counts = span.astype(np.int32 if small else np.int64)

    def dense(self) -> np.ndarray:
        """The full-length int64 histogram."""
        out = np.zeros(HIST_BINS, dtype=np.int64)
        out[self.lo : self.lo + len(self.counts)] = self.counts
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        d = self.dense()
        return d if dtype is None else d.astype(dtype)

    def __add__(self, other) -> np.ndarray:
        return self.dense() + np.asarray(other)

    __radd__ = __add__

    def __len__(self) -> int:
        return HIST_BINS


def weighted_percentile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """The q-th percentile of the sample in which value ``x[i]`` occurs ``w[i]`` times (integer
    weights), with numpy's default linear interpolation: equal to
    ``np.percentile(np.repeat(x, w), q)`` without building the repeated array."""
    keep = w > 0
    x, w = x[keep], w[keep]
    if not len(x):
        return math.nan
    order = np.argsort(x, kind="stable")
    x, cw = x[order], np.cumsum(w[order])
    rank = q / 100.0 * (int(cw[-1]) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    xl = float(x[np.searchsorted(cw, lo, side="right")])
    xh = float(x[np.searchsorted(cw, hi, side="right")])
    return xl + (xh - xl) * (rank - lo)


def percentiles(x: np.ndarray, qs: tuple[float, ...] = LAT_PCTS) -> list[float]:
    """``np.percentile(x, qs).tolist()`` for a non-empty 1-D float array, from one sort and the
    same float operations (numpy's default "linear" method: the virtual index ``(n - 1) q``,
    its floor and the next, and numpy's ``_lerp``, which takes ``b - (b - a)(1 - t)`` from
    ``t >= 0.5``; a NaN anywhere gives NaN). Why not numpy's own: ``np.percentile`` calls
    ``np.unique``, which imports ``numpy.ma`` (and ``inspect``'s tokenizer through it), ~0.02
    CPU s of every run's start (bench/RESULTS.md, start-up). tests/test_recorder_pct.py checks
    it against ``np.percentile`` value for value."""
    s = np.sort(x)
    n = len(s)
    last = float(s[-1])
    if math.isnan(last):
        return [math.nan] * len(qs)
    out = []
    top = n - 1
    for q in qs:
        v = top * (q / 100.0)
        if v >= top:
            out.append(last)
            continue
        i = math.floor(v)
        a = float(s[i])
        b = float(s[i + 1])
        t = v - i
        d = b - a
        out.append(b - d * (1 - t) if t >= 0.5 else a + d * t)
    return out


def hist_percentile(h: np.ndarray, q: float) -> float:
    """The q-th percentile of a log-histogram (geometric mid-point of the bin)."""
    total = int(h.sum())
    if total == 0:
        return math.nan
    rank = q / 100.0 * (total - 1)
    i = int(np.searchsorted(np.cumsum(h), rank + 1, side="left"))
    return HIST_LO_S * 10 ** ((i + 0.5) / HIST_PER_DECADE)


@dataclass
class HourStats:
    """Latency summary of one hour of one pod."""

    n: int = 0
    n_tpot: int = 0
    slo_ok: int = 0
    n_itl: int = 0  # token gaps (output tokens - 1, summed over the requests)
    ttft: dict[float, float] = field(default_factory=dict)
    tpot: dict[float, float] = field(default_factory=dict)
    itl: dict[float, float] = field(default_factory=dict)
    e2e: dict[float, float] = field(default_factory=dict)
    ttft_sum_s: float = 0.0
    tpot_sum_s: float = 0.0
    itl_sum_s: float = 0.0  # sum of the token gaps = sum of (e2e - ttft)
    e2e_sum_s: float = 0.0
    hist: dict[str, SparseHist] | None = None


class Recorder:
    """Accumulates one pod's day. Plain Python lists: the engine adds to them on every run."""

    def __init__(
        self, hours: int, slo_ttft_s: float, slo_tpot_s: float, keep_hist: bool, request_sink=None
    ) -> None:
        self.hours = hours
        n = hours + 1  # one spill-over bucket past the horizon, dropped at the end
        self.busy_s = [0.0] * n  # replica-seconds busy (x tp gives GPU-seconds)
        self.dyn_j = [0.0] * n  # dynamic GPU energy (active + compute + memory), J
        # replica-seconds of busy time spent in tensor/expert-parallel communication (part of
        # busy_s; PowerSpec.comm_w); 0 on one GPU
        self.comm_s = [0.0] * n
        # replica-seconds of busy time spent in the block-scaled K loop of fp8 fused-MoE
        # kernels (part of busy_s; PowerSpec.moe_loop_w); 0 for other models
        self.moe_loop_s = [0.0] * n
        # FLOPs of the routed experts' grouped GEMMs (part of the FLOPs; PowerSpec.moe_compute_w)
        self.expert_flops = [0.0] * n
        self.prompt_tokens = [0] * n
        self.output_tokens = [0] * n
        self.arrived = [0] * n
        self.rejected = [0] * n
        self.completed = [0] * n
        # the paged KV policy (serving/kv_paged.py)
        self.prefix_hit_tokens = [0] * n  # prompt tokens served from the prefix cache
        self.preemptions = [0] * n
        self.recomputed_tokens = [0] * n  # prefill tokens computed again after a preemption
        self.kv_block_s = [0.0] * n  # KV blocks in use x seconds, summed over replicas
        self.kv_blocks = 0  # KV blocks of all the pod's replicas (set by the pod)
        self.flops = [0.0] * n  # FLOPs of the iterations (whole replica, all its GPUs)
        self.bytes_moved = [0.0] * n  # bytes read and written by the iterations (all GPUs)
        self.iters_h = [0] * n  # iterations, by the hour in which each ended
        self.iterations = 0  # engine iterations simulated (for the benchmarks)
        self.events = 0  # SimPy events scheduled
        self.in_flight = 0  # requests admitted and not finished at the horizon (set by the pod)
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.keep_hist = keep_hist
        self.sink = request_sink
        self._cur_hour = 0
        self._h_lo, self._h_hi = 0.0, HOUR_S  # the current hour's span (empty past the horizon)
        # the current hour's completions; their latencies are taken at the flush (numpy, the
        # same float operations element by element as in Python)
        self._arr = array("d")  # arrival
        self._first = array("d")  # first token
        self._fin = array("d")  # finish
        self._out = array("q")  # output tokens
        self.stats: list[HourStats] = [HourStats() for _ in range(hours)]

    # -- per request --------------------------------------------------------------------------
    def complete(self, r, finish_s: float, replica: int) -> None:
        if self._h_lo <= finish_s < self._h_hi:  # (the engine's hot path: no division)
            h = self._cur_hour
        else:
            h = int(finish_s // HOUR_S)
            if h >= self.hours:
                return
            if h != self._cur_hour:
                self.flush_until(h)
        self.completed[h] += 1
        self._arr.append(r.arrival_s)
        self._first.append(r.first_token_s)
        self._fin.append(finish_s)
        self._out.append(r.out)
        if self.sink is not None:
            ttft = r.first_token_s - r.arrival_s
            e2e = finish_s - r.arrival_s
            tpot = (finish_s - r.first_token_s) / (r.out - 1) if r.out > 1 else math.nan
            self.sink.add(r, replica, finish_s, ttft, tpot, e2e, "completed")

    def flush_until(self, hour: int) -> None:
        """Summarise the current hour's latency samples and move on to ``hour``."""
        h = self._cur_hour
        if h < self.hours and len(self._arr):
            st = self.stats[h]
            arr = np.frombuffer(self._arr, dtype=np.float64)
            first = np.frombuffer(self._first, dtype=np.float64)
            fin = np.frombuffer(self._fin, dtype=np.float64)
            out = np.frombuffer(self._out, dtype=np.int64)
            # as complete() would take them one by one: first - arrival, finish - arrival,
            # (finish - first) / (out - 1) for out > 1 (else NaN)
            ttft = first - arr
            e2e = fin - arr
            gaps = out - 1
            with np.errstate(divide="ignore", invalid="ignore"):
                tpot = np.where(out > 1, (fin - first) / gaps, math.nan)
            finite = tpot[~np.isnan(tpot)]
            st.n = len(ttft)
            st.n_tpot = len(finite)
            ok_tpot = np.where(np.isnan(tpot), True, tpot <= self.slo_tpot_s)
            st.slo_ok = int(np.count_nonzero((ttft <= self.slo_ttft_s) & ok_tpot))
            st.ttft = dict(zip(LAT_PCTS, percentiles(ttft)))
            st.e2e = dict(zip(LAT_PCTS, percentiles(e2e)))
            st.tpot = (
                dict(zip(LAT_PCTS, percentiles(finite)))
                if len(finite)
                else dict.fromkeys(LAT_PCTS, math.nan)
            )
            # ITL, as vLLM's benchmarks define it: the gaps between consecutive output tokens,
            # pooled over requests. The engine advances in runs of decode steps, so each
            # request's gaps are taken at their mean (its TPOT), weighted by its gap count:
            # the mean is exact, the percentiles lose the spread within a request.
            has = gaps > 0
            tp, gp = tpot[has], gaps[has]
            st.n_itl = int(gp.sum())
            st.itl = {q: weighted_percentile(tp, gp, q) for q in LAT_PCTS}
            st.ttft_sum_s = float(ttft.sum())
            st.tpot_sum_s = float(finite.sum())
            st.itl_sum_s = float((tp * gp).sum())
            st.e2e_sum_s = float(e2e.sum())
            if self.keep_hist:
                st.hist = {
                    "ttft": SparseHist(_hist(ttft)),
                    "tpot": SparseHist(_hist(finite)),
                    "itl": SparseHist(_hist(tp, gp)),
                    "e2e": SparseHist(_hist(e2e)),
                }
        self._arr = array("d")
        self._first = array("d")
        self._fin = array("d")
        self._out = array("q")
        self._cur_hour = hour
        if hour < self.hours:
            self._h_lo, self._h_hi = hour * HOUR_S, (hour + 1) * HOUR_S
        else:
            self._h_lo, self._h_hi = math.inf, -math.inf

    # -- per run (called by the engine) ----------------------------------------------------------
    def add_work(
        self, h: int, busy_s: float, dyn_j: float, flops: float = 0.0, bytes_moved: float = 0.0
    ) -> None:
        if h > self.hours:
            h = self.hours
        self.busy_s[h] += busy_s
        self.dyn_j[h] += dyn_j
        self.flops[h] += flops
        self.bytes_moved[h] += bytes_moved

    def add_work_spread(
        self, h: int, start_s: float, busy_s: float, dyn_j: float, flops: float, bytes_moved: float
    ) -> None:
        """The work of one iteration that starts at ``start_s`` in hour ``h`` and lasts
        ``busy_s``, put into every hour it overlaps by the share of its time in each (an
        iteration of a slow device can span several hours: issue #16 item 14). A two-hour
        straddle is split exactly as ``frac, 1 - frac``."""
        last = min(int((start_s + busy_s) // HOUR_S), self.hours) if busy_s > 0 else h
        last = max(h, last)
        done = 0.0
        for g in range(h, last + 1):
            frac = (
                1.0 - done
                if g == last
                else min(1.0 - done, ((g + 1) * HOUR_S - max(start_s, g * HOUR_S)) / busy_s)
            )
            self.add_work(g, busy_s * frac, dyn_j * frac, flops * frac, bytes_moved * frac)
            done += frac

    def add_tokens(self, t_end: float, prompt: int, output: int) -> None:
        h = int(t_end // HOUR_S)
        if h > self.hours:
            h = self.hours
        self.prompt_tokens[h] += prompt
        self.output_tokens[h] += output
