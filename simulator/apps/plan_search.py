"""The search of ``fleetsim plan``, shared by both fleet designs: the aggregated fleet
(apps/plan.py: one pool of replicas per candidate GPU x TP) and the disaggregated one
(apps/plan_disagg.py: a prefill pool and a decode pool). A design is a candidate whose fleet
size is a tuple, one replica count per pool (``(replicas,)`` or ``(prefill, decode)``), and
which builds the scenario of a size (``cand.sized(size)``). The rest is common:

* **Judging a probe** (:func:`passes`): the p99 TTFT and/or TPOT of the judged hours within the
  SLO (``metric`` "ttft", "tpot" or "both"), no request rejected, and a backlog at the end that
  a fleet keeping up could hold (:func:`backlog_ok`).
* **Probes** (:meth:`Search.run`): a size on the whole horizon, or on two flat hours at a rate
  (the first warms the queues, the second is judged: about a tenth of a day); every probe is a
  task for the executor, cached by its scenario, and shares the scenario's seed (common random
  numbers: two sizes see the same arrivals, so pass/fail is monotone up to router effects).
* **Screening** (:meth:`Search.screen`): steady probes at the peak hour's rate, one pool at a
  time against its own metric (:class:`ScreenStep`), each by :func:`search_min`.
* **Verification on whole days** (:meth:`Search.verify`): from the screened size, until the
  size passes and one replica fewer fails. One pool: :func:`search_min` on days, its first
  round at n and n - 1. Several pools: a walk; while the day fails, the pools whose metric
  failed grow by one; once it passes, each pool one smaller is tried and the walk moves down
  while one passes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from fleetsim.apps.executors import Executor, RunSummary, run_task
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.base.units import DAY_S, HOUR_S
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import Resolved
from fleetsim.results.capacity import Sizes, scenario_sizes

Size = tuple[int, ...]  # replicas per pod of each pool of the design


def with_pool(size: Size, pool: int, n: int) -> Size:
    """``size`` with pool ``pool`` at ``n`` replicas."""
    return (*size[:pool], n, *size[pool + 1 :])


@dataclass(frozen=True)
class Slo:
    """The planner's target: p99 TTFT and p99 TPOT per hour, in every hour or the peak one."""

    ttft_p99_s: float
    tpot_p99_s: float
    hours: str = "all"  # "all" | "peak"


# ---------------------------------------------------------------------------------------------
# judging a probe
def hours_passing(res: RunSummary, slo: Slo, metric: str = "both") -> np.ndarray:
    """Per hour: p99 TTFT and/or p99 TPOT (``metric``; of the requests completed in it) within
    the SLO and no rejection. An hour with nothing completed has no latency to judge and passes
    here; a stalled fleet is caught by :func:`backlog_ok`."""
    t = res.hourly
    ok = t.column("requests_rejected").to_numpy() == 0
    for m, target in (("ttft", slo.ttft_p99_s), ("tpot", slo.tpot_p99_s)):
        if metric in (m, "both"):
            v = t.column(f"{m}_p99_s").to_numpy()
            ok &= np.where(np.isnan(v), True, v <= target)
    return ok


def backlog_ok(res: RunSummary, slo: Slo) -> bool:
    """The requests in flight at the end fit a fleet that keeps up: by Little's law a compliant
    fleet holds on average ``m = rate x (TTFT target + mean output x TPOT target)`` requests;
    allow ``m + 4 sqrt(m) + 10`` (Poisson spread). A growing queue exceeds it by far."""
    t = res.hourly
    last_rate = float(t.column("requests_arrived").to_numpy()[-1]) / HOUR_S
    tot = res.totals
    mean_out = tot.output_tokens / max(tot.requests_completed, 1.0)
    m = last_rate * (slo.ttft_p99_s + mean_out * slo.tpot_p99_s)
    return tot.requests_in_flight <= m + 4.0 * math.sqrt(m) + 10.0


def passes(res: RunSummary, slo: Slo, judged: list[int], metric: str = "both") -> bool:
    """Whether the probe meets the SLO (``metric``) in the ``judged`` hours and keeps up at the
    end."""
    ok = hours_passing(res, slo, metric)
    return bool(all(ok[h] for h in judged)) and backlog_ok(res, slo)


# ---------------------------------------------------------------------------------------------
def search_min(
    test,
    start: int,
    workers: int = 1,
    *,
    first: list[int] | None = None,
    hi: int | None = None,
    cap: int = 100_000,
) -> int | None:
    """The smallest n >= 1 with ``test(n)`` true, for a monotone predicate, by rounds of up to
    ``workers`` probes (``test`` takes a list of n and returns a list of bools): gallop up from
    ``start`` until a pass (steps growing from 5% of ``start``), gallop down from a pass until a
    fail, then k-section of the bracket. ``first``: the points of the first round; ``hi``: a
    count known to pass. None when nothing up to ``cap`` passes."""
    lo = 0
    up = max(1, round(0.05 * start))  # galloping steps, doubled after every probe
    down = 1
    pending = list(first or [])
    w = max(1, workers)
    while hi is None or hi - lo > 1:
        if pending:
            pts, pending = pending, []
        elif hi is None:
            base = start if lo < start else lo + up
            pts = [min(cap, base + up * (2**i - 1)) for i in range(w)]
            up *= 2**w
        elif lo == 0:
            pts = [max(1, hi - down * 2**i) for i in range(w)]
            down *= 2**w
        else:
            pts = [lo + round((hi - lo) * (i + 1) / (w + 1)) for i in range(w)]
        pts = sorted({p for p in pts if lo < p <= cap and (hi is None or p < hi)})
        if not pts:
            return hi
        results = test(pts)
        for n, ok in zip(pts, results):
            if ok and (hi is None or n < hi):
                hi = n
        lo = max([lo] + [n for n, ok in zip(pts, results) if not ok and (hi is None or n < hi)])
    return hi


# ---------------------------------------------------------------------------------------------
# throughput bounds (where the searches start)
def mean_sizes(rs: Resolved, source: str) -> Sizes:
    """The scenario's request sizes: mean prompt and output tokens and the KV a running
    sequence holds, weighted by its time in flight (:func:`fleetsim.results.capacity.
    scenario_sizes`: 20,000 draws on a stream of their own, so every candidate of a plan sees
    the same, or a timed trace's own requests)."""
    return scenario_sizes(rs, source)


@dataclass(frozen=True)
class BestCase:
    """A replica's best case: prefill in full ``max_batched_tokens`` chunks of mean prompts and
    decode at the largest batch the KV budget (and ``max_batch_size``) holds. Optimistic (real
    batches are smaller and mixed): only where the search starts."""

    chunk_s: float  # one full prefill chunk
    chunk_prompts: int  # mean prompts in it
    step_s: float  # one decode step of the largest batch
    batch: int

    @classmethod
    def of(cls, rs: Resolved, max_batch: int, max_tokens: int, sizes: Sizes) -> BestCase:
        lat = rs.latency_model()
        ep, per_seq = sizes.prompt, sizes.kv_per_seq  # (KV weighted by time in flight)
        batch = int(max(1, min(max_batch, rs.kv_capacity_tokens // max(per_seq, 1.0))))
        chunk = max(1, max_tokens // max(int(ep), 1))
        return cls(
            chunk_s=lat.prefill_time(max(int(ep), 1), chunk),
            chunk_prompts=chunk,
            step_s=lat.decode_time(batch, int(per_seq)),
            batch=batch,
        )


# ---------------------------------------------------------------------------------------------
# candidates
@dataclass(kw_only=True)
class PlanCandidate:
    """What a candidate of any design carries: its scenario dict (``base``), resolved (``rs``;
    None with the reason in ``problem`` when it does not fit), the day simulated at the answer,
    and the probes simulated for it. ``POOLS``: where each pool's replica count sits in the
    scenario dict, in the order of a :data:`Size`."""

    POOLS: ClassVar[tuple[tuple[str, ...], ...]] = ()
    base: dict
    rs: Resolved | None = None
    problem: str = ""
    day: RunSummary | None = None
    probes: int = 0

    def sized(self, size: Size) -> dict:
        """A copy of the scenario dict with each pool at its replica count in ``size``."""
        d = copy.deepcopy(self.base)
        for keys, n in zip(self.POOLS, size):
            node: Any = d
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = n
        return d


#: the words of the refusals that are about memory (the weights, the KV cache): a candidate
#: refused for anything else is ``not accepted``, not ``does not fit`` (both designs' plans)
MEMORY_WORDS = ("weights need", "no memory left for the KV cache", "exceeds the KV budget")


def resolve_candidate(
    cand: PlanCandidate,
    source: str,
    gpu_field: Callable[[str], bool],
    flag: str,
    problem: Callable,
) -> None:
    """Resolve ``cand.base`` into ``cand.rs``. A fleet that does not fit keeps its reason
    (``problem(exc)``) in ``cand.problem``; an error in a GPU field (an unknown name) is the
    user's ``flag``."""
    try:
        cand.rs = resolve(scenario_from_dict(cand.base, source), source)
    except ScenarioError as exc:
        if gpu_field(exc.field):
            raise UserError(f"{flag}: {exc}") from None
        cand.problem = f"does not fit: {problem(exc)}"


_ARROW = {"int": pa.int32(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}


def columns(spec: str) -> tuple[tuple[str, pa.DataType], ...]:
    """Table columns written ``"name:type name:type ..."`` (int, float, str or bool) as
    (name, Arrow type) pairs."""
    return tuple((n, _ARROW[t]) for n, t in (c.split(":") for c in spec.split()))


# the day's figures, columns of both designs' tables
COST_COLUMNS = columns(
    "energy_facility_kwh:float energy_cost_usd:float hardware_cost_usd:float total_cost_usd:float"
)
SLO_COLUMNS = columns(
    "worst_hour_ttft_p99_s:float worst_hour_tpot_p99_s:float slo_attainment:float"
)


def horizon(hours: int) -> str:
    """What a plan table's cost and energy columns cover: the simulated horizon
    (``simulation.hours``), ``day`` for 24 hours (``$/day``); a plan of a 2-hour scenario
    labelled ``$/day`` read as a day's cost 12 times too small."""
    return "day" if hours == 24 else f"{hours} h"


def worst_hour(res: RunSummary, metric: str) -> float:
    """The worst hour's p99 of ``metric`` ("ttft" or "tpot")."""
    return float(np.nanmax(res.hourly.column(f"{metric}_p99_s").to_numpy()))


def day_figures(day: RunSummary) -> dict:
    """The values of :data:`COST_COLUMNS` and :data:`SLO_COLUMNS` for a simulated day."""
    t = day.totals
    return {
        "energy_facility_kwh": t.energy_facility_kwh,
        "energy_cost_usd": t.energy_cost_usd,
        "hardware_cost_usd": t.hardware_cost_usd,
        "total_cost_usd": t.total_cost_usd,
        "worst_hour_ttft_p99_s": worst_hour(day, "ttft"),
        "worst_hour_tpot_p99_s": worst_hour(day, "tpot"),
        "slo_attainment": t.slo_attainment,
    }


def ranked_table(rows: list[dict], columns: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    """The candidates' rows ranked by the day's total cost (those without an answer last): a
    ``rank`` column, then ``columns``."""
    rows.sort(key=lambda r: (r["total_cost_usd"] is None, r["total_cost_usd"] or 0.0))
    for i, r in enumerate(rows):
        r["rank"] = i + 1 if r["total_cost_usd"] is not None else None
    cols = [("rank", pa.int32()), *columns]
    return pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in cols})


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScreenStep:
    """One pool's steady search: the smallest count of pool ``pool`` that meets ``metric`` at
    the peak rate, from ``start``, up to ``cap``; ``hold`` fixes other pools meanwhile
    ({pool: count}); ``problem`` is the candidate's reason when no count up to ``cap`` does."""

    pool: int
    metric: str
    start: int
    cap: int
    problem: str
    hold: dict[int, int] = field(default_factory=dict)


class Search:
    """The probes of one plan (one executor, one cache) and the screening and verification of
    its candidates (see the module docstring)."""

    def __init__(self, data: dict, source: str, slo: Slo, executor: Executor, hooks=None) -> None:
        self.data = data
        self.source = source
        self.slo = slo
        self.ex = executor
        self.hooks = hooks
        self.cache: dict[str, RunSummary] = {}
        sc = scenario_from_dict(data, source)
        self.sc = sc
        self.rates = [0.0] * sc.simulation.hours  # fleet requests/s per hour, set per candidate
        self.steady_ok = sc.traffic.trace is None  # (a timed trace has no rate to hold steady)

    @property
    def workers(self) -> int:
        return max(1, self.ex.workers)

    # -- probes ---------------------------------------------------------------------------------
    def _scenario(self, cand: PlanCandidate, size: Size, rate: float | None) -> dict:
        """A probe: the whole horizon (``rate`` None), or two flat hours at ``rate`` (fleet
        requests/s) judged on the second, one pod of the fleet."""
        d = cand.sized(size)
        if rate is not None:
            d.setdefault("simulation", {})["hours"] = 2
            d["traffic"]["diurnal"] = "flat"
            d["traffic"]["requests_per_day"] = rate * DAY_S
            if d.get("fleet", {}).get("pods", 1) > 1:
                d["fleet"]["sample_pods"] = 1
        return d

    def run(self, cand: PlanCandidate, specs: list[tuple[Size, float | None]]) -> list[RunSummary]:
        """Simulate (or fetch from the cache) the probes ``(size, rate or None)`` of ``cand``
        (its ``probes`` counts those simulated)."""
        keys = [json.dumps(self._scenario(cand, s, r), sort_keys=True) for s, r in specs]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            if self.hooks is not None:
                self.hooks.add(len(todo))
            done = self.ex.map(
                run_task,
                [(json.loads(k), self.source) for k in todo],
                self.hooks.done if self.hooks is not None else None,
            )
            self.cache.update(zip(todo, done))
            cand.probes += len(todo)
        return [self.cache[k] for k in keys]

    def set_rates(self, rs: Resolved) -> float:
        """The candidate's fleet rate per simulated hour; the peak of the judged hours."""
        self.rates = [rs.hourly_rate_per_s[h % 24] for h in range(self.sc.simulation.hours)]
        return max(self.rates[h] for h in self.judged_hours())

    def judged_hours(self) -> list[int]:
        if self.slo.hours == "peak":
            return [int(np.argmax(self.rates))]
        return list(range(self.sc.simulation.hours))

    def steady_test(
        self, cand: PlanCandidate, rate: float, size: Size, pool: int = 0, metric: str = "both"
    ):
        """``test(ns)`` for :func:`search_min`: steady probes at ``rate`` of ``size`` with pool
        ``pool`` at each n, judged on ``metric`` in their second hour."""

        def test(ns: list[int]) -> list[bool]:
            specs: list[tuple[Size, float | None]] = [(with_pool(size, pool, n), rate) for n in ns]
            return [passes(r, self.slo, [1], metric) for r in self.run(cand, specs)]

        return test

    # -- screening and verification -------------------------------------------------------------
    def screen(
        self, cand: PlanCandidate, size: Size, steps: list[ScreenStep], rate: float
    ) -> Size | None:
        """Each step's pool sized in turn by steady probes at ``rate`` (the pools after it at
        ``size`` or ``hold``); None (and ``cand.problem``) when a step finds no count."""
        for st in steps:
            at = tuple(st.hold.get(i, n) for i, n in enumerate(size))
            test = self.steady_test(cand, rate, at, st.pool, st.metric)
            n = search_min(test, st.start, self.workers, cap=st.cap)
            if n is None:
                cand.problem = st.problem
                return None
            size = with_pool(size, st.pool, n)
        return size

    def verify(
        self, cand: PlanCandidate, size: Size, metrics: Sequence[str], cap: int, problem: str
    ) -> Size | None:
        """From ``size``, the size whose whole day passes while one replica fewer (in any pool)
        fails; ``metrics``: the metric each pool answers for. None (and ``cand.problem``) when
        nothing up to ``cap`` replicas (per pool) passes."""
        judged = self.judged_hours()
        if len(size) == 1:

            def test(ns: list[int]) -> list[bool]:
                res = self.run(cand, [((n,), None) for n in ns])
                return [passes(r, self.slo, judged) for r in res]

            start = size[0]
            first = [start, start - 1] if start > 1 else [start]
            n = search_min(test, start, self.workers, first=first, cap=cap)
            if n is None:
                cand.problem = problem
                return None
            return (n,)
        for _ in range(4 * cap):
            below = [with_pool(size, i, n - 1) for i, n in enumerate(size) if n > 1]
            res = dict(zip([size, *below], self.run(cand, [(s, None) for s in [size, *below]])))
            if not passes(res[size], self.slo, judged):
                bad = [not passes(res[size], self.slo, judged, m) for m in metrics]
                grow = bad if any(bad) else [i == 0 for i in range(len(size))]
                size = tuple(n + 1 if g else n for n, g in zip(size, grow))
                if max(size) > cap:
                    cand.problem = problem
                    return None
                continue
            down = [s for s in below if passes(res[s], self.slo, judged)]
            if not down:
                break
            size = down[0]
        return size


__all__ = [
    "COST_COLUMNS",
    "SLO_COLUMNS",
    "BestCase",
    "PlanCandidate",
    "ScreenStep",
    "Search",
    "Size",
    "Slo",
    "backlog_ok",
    "columns",
    "day_figures",
    "horizon",
    "hours_passing",
    "mean_sizes",
    "passes",
    "ranked_table",
    "resolve_candidate",
    "search_min",
    "with_pool",
    "worst_hour",
]


def one_sequence_tpot_s(rs) -> float:
    """The smallest TPOT any request can have on this candidate: its model's decode step of one
    sequence alone (batch 1, no prefill chunk beside it) at the shortest prompt the traffic can
    draw (its distribution's ``min``; 1 token where it has none, a trace) plus the first output
    token. A request's TPOT is the mean of its decode steps (serving/recorder.py); a step with
    more sequences, a prefill chunk or a longer context is no faster, so every request with two
    or more output tokens has at least this TPOT: above the target, no replica count helps."""
    shortest = getattr(rs.scenario.traffic.prompt, "min", None)
    ctx = int(shortest) if isinstance(shortest, (int, float)) and shortest >= 1 else 1
    return float(rs.latency_model().decode_time(1, ctx + 1))


def hopeless_tpot(
    gpu: str,
    tp: int,
    step_s: float,
    tpot_s: float,
    fix: str = "a faster GPU (--gpus), more tensor parallelism (--tp)",
    dp: int = 1,
) -> str:
    """The reason of a candidate that no replica count can help: one sequence alone misses the
    TPOT target; ``fix`` names the GPU and parallelism to change (the disaggregated design's
    decode pool: its own); ``dp``: the candidate's data-parallel engines per replica."""
    return (
        f"even one sequence alone decodes at {step_s * 1e3:.1f} ms per token on {gpu} TP{tp}"
        + (f" x DP{dp}" if dp > 1 else "")
        + " "
        f"(its one-sequence decode step), above the TPOT SLO of {tpot_s * 1e3:.1f} ms: no replica "
        f"count can meet it (fix: {fix}, or a looser TPOT (--slo-tpot-p99-s))"
    )
