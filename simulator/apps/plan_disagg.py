"""``fleetsim plan`` for disaggregated fleets: the prefill and decode replica counts (and,
optionally, each pool's GPU type) of the cheapest disaggregated fleet that meets the SLO.

The two pool sizes are not searched as a grid. Each pool is first sized against its own
target, then the coupled system is checked:

1. **Prefill against TTFT.** Steady probes at the peak hour's rate (two flat hours, the second
   judged, as the aggregated planner does) with a decode pool far larger than needed, so that
   nothing backs up from decode: the smallest prefill count ``P*`` whose p99 TTFT meets the
   target (galloping search from a throughput bound, then bisection).
2. **Decode against TPOT.** The same probes with ``P*`` prefill replicas: the smallest decode
   count ``D*`` whose p99 TPOT (which includes the KV transfer and the wait for decode room)
   meets the target.
3. **The coupled day.** Whole simulated days at ``(P, D)`` starting from ``(P*, D*)``: while the
   day fails, the pool whose own metric failed grows by one; once it passes, ``(P - 1, D)`` and
   ``(P, D - 1)`` are tried and the search moves down while one of them passes. Every day is
   judged on TTFT, TPOT, rejections and backlog in every hour (``--hours all``), as the
   aggregated planner judges its candidates.

Every probe is a task for the executor, cached by its scenario, and shares the scenario's seed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fleetsim.apps import plan_search
from fleetsim.base.io import term
from fleetsim.config.resolved import Resolved

CAP = 400  # give up on a pool above this many replicas per pod


@dataclass
class DisaggCandidate(plan_search.PlanCandidate):
    """One (prefill GPU, decode GPU) pair and what the search learns about it; its size is
    (prefill, decode) replicas per pod."""

    POOLS = (("disaggregation", "prefill", "replicas"), ("disaggregation", "decode", "replicas"))
    prefill_gpu: str
    decode_gpu: str
    lb_prefill: int = 0
    lb_decode: int = 0
    screened_prefill: int | None = None
    screened_decode: int | None = None
    prefill: int | None = None
    decode: int | None = None

    @property
    def label(self) -> str:
        return f"prefill {self.prefill_gpu} / decode {self.decode_gpu}"


def disagg_base(data: dict, prefill_gpu: str, decode_gpu: str) -> dict:
    """The scenario dict of a disaggregated candidate (a [disaggregation] section is added with
    the defaults when the scenario has none)."""
    d = copy.deepcopy(data)
    d.setdefault("autoscaler", {})["policy"] = "static"
    dis = d.get("disaggregation") or {}
    dis = {k: v for k, v in dis.items() if v is not None}
    for pool, gpu in (("prefill", prefill_gpu), ("decode", decode_gpu)):
        sec = {k: v for k, v in (dis.get(pool) or {}).items() if v is not None}
        sec["gpu"] = gpu
        dis[pool] = sec
    d["disaggregation"] = dis
    return d


def pool_bounds(rs: Resolved, source: str) -> tuple[int, int]:
    """Throughput lower bounds (replicas per pod) of the prefill and decode pools at the peak
    rate: prefill in full ``max_batched_tokens`` chunks, decode at the largest batch the KV
    budget holds (optimistic, as the aggregated planner's bound)."""
    pools = rs.pools
    assert pools is not None
    from fleetsim.results.capacity import Sizes, kv_tokens_per_sequence, size_draws

    p, o = size_draws(rs.scenario, source)
    # the decode pool receives each prompt's KV whole (no chunks of its own to prefill) and
    # holds prompt + tokens so far, weighted by time in flight (results/capacity.py)
    sizes = Sizes(float(np.mean(p)), float(np.mean(o)), kv_tokens_per_sequence(p, o))
    eo = sizes.output
    peak = max(rs.hourly_rate_per_s) / rs.scenario.fleet.pods
    pp, dp = pools.prefill, pools.decode
    bp = plan_search.BestCase.of(pp.rs, pp.max_batch, pp.max_tokens, sizes)
    t_pf = bp.chunk_s / bp.chunk_prompts  # per prompt
    bd = plan_search.BestCase.of(dp.rs, dp.max_batch, dp.max_tokens, sizes)
    t_tok = bd.step_s / bd.batch  # per output token
    return max(1, math.ceil(peak * t_pf)), max(1, math.ceil(peak * eo * t_tok))


class DisaggPlanner(plan_search.Search):
    """The disaggregated design's search: two pools, sized by the shared screening (prefill
    against TTFT with a decode pool far larger than needed, then decode against TPOT) and
    verification on whole days (apps/plan_search.py)."""

    def plan(self, cand: DisaggCandidate) -> None:
        """Size both pools of ``cand`` (see the module docstring); when no size is found and
        even one sequence alone on the decode pool misses the TPOT target (a request's TPOT is
        its decode replica's steps), the reason says so, as the aggregated plan's does."""
        self._plan(cand)
        if cand.prefill is None and cand.problem.startswith(("no decode pool", "no fleet")):
            assert cand.rs is not None and cand.rs.pools is not None
            pool = cand.rs.pools.decode
            step = plan_search.one_sequence_tpot_s(pool.rs)
            if step > self.slo.tpot_p99_s:
                cand.problem = plan_search.hopeless_tpot(
                    pool.gpu_name,
                    pool.tp,
                    step,
                    self.slo.tpot_p99_s,
                    "a faster decode GPU (--decode-gpus), more tensor parallelism in the decode "
                    "pool (disaggregation.decode.tensor_parallel)",
                )

    def _plan(self, cand: DisaggCandidate) -> None:
        rs = cand.rs
        assert rs is not None
        peak = self.set_rates(rs)
        cand.lb_prefill, cand.lb_decode = pool_bounds(rs, self.source)
        size: plan_search.Size | None = (cand.lb_prefill, cand.lb_decode)
        if self.steady_ok:
            big_d = 2 * cand.lb_decode + 4
            steps = [
                plan_search.ScreenStep(
                    0,
                    "ttft",
                    cand.lb_prefill,
                    CAP,
                    f"no prefill pool up to {CAP} replicas meets the TTFT target",
                    hold={1: big_d},
                ),
                plan_search.ScreenStep(
                    1,
                    "tpot",
                    cand.lb_decode,
                    CAP,
                    f"no decode pool up to {CAP} replicas meets the TPOT target",
                ),
            ]
            assert size is not None
            size = self.screen(cand, size, steps, peak)
            if size is None:
                return
            cand.screened_prefill, cand.screened_decode = size
        assert size is not None
        problem = f"no fleet up to {CAP} replicas per pool meets the SLO"
        size = self.verify(cand, size, ["ttft", "tpot"], CAP, problem)
        if size is None:
            return
        cand.prefill, cand.decode = size
        cand.day = self.run(cand, [(size, None)])[0]


def make_disagg_candidates(
    data: dict, prefill_gpus: list[str], decode_gpus: list[str], source: str
) -> list[DisaggCandidate]:
    """Every (prefill GPU, decode GPU) pair; one that does not fit keeps its reason
    (:func:`disagg_reason`), ``not accepted`` where it is not about memory, as the aggregated
    plan's."""
    cands = []
    for pg in prefill_gpus:
        for dg in decode_gpus:
            c = DisaggCandidate(prefill_gpu=pg, decode_gpu=dg, base=disagg_base(data, pg, dg))
            plan_search.resolve_candidate(
                c,
                source,
                lambda f: f.endswith(".gpu"),
                "--prefill-gpus/--decode-gpus",
                disagg_reason,
            )
            if c.rs is None and not any(w in c.problem for w in plan_search.MEMORY_WORDS):
                c.problem = "not accepted: " + c.problem.removeprefix("does not fit: ")
            cands.append(c)
    return cands


def disagg_reason(exc) -> str:
    """A disaggregated candidate's refusal: the field (which pool's), the value, the problem
    and the fix, without the scenario file's name. Data or expert parallelism, which the
    disaggregated design is simulated without (config/resolve.py, whose fix "drop
    [disaggregation]" is no fix for the plan that added it), gets the plan's fix."""
    if exc.field in ("fleet.data_parallel", "fleet.expert_parallel"):
        off = {"fleet.data_parallel": "1", "fleet.expert_parallel": "false"}[exc.field]
        return (
            f"{exc.field} = {str(exc.value).lower()}: {exc.problem} (fix: --set "
            f"{exc.field}={off} to plan the disaggregated design without it, or --designs "
            "aggregated)"
        )
    return f"{exc.field} = {exc.value!r}: {exc.problem}" + (f" (fix: {exc.fix})" if exc.fix else "")


DISAGG_COLUMNS = (  # after the rank (plan_search.ranked_table)
    *plan_search.columns(
        "prefill_gpu:str prefill_tensor_parallel:int prefill_replicas:int "
        "decode_gpu:str decode_tensor_parallel:int decode_replicas:int pods:int gpus:int "
        "status:str problem:str screened_prefill:int screened_decode:int probes:int"
    ),
    *plan_search.COST_COLUMNS,
    *plan_search.SLO_COLUMNS,
)


def disagg_table(cands: list[DisaggCandidate], pods: int) -> pa.Table:
    """The disaggregated candidates, cheapest first (those without an answer last)."""
    rows = []
    for c in cands:
        r: dict = {k: None for k, _ in DISAGG_COLUMNS}
        r.update(
            prefill_gpu=c.prefill_gpu,
            decode_gpu=c.decode_gpu,
            pods=pods,
            probes=c.probes,
            status="ok"
            if c.day is not None
            else (
                ("not accepted" if c.problem.startswith("not accepted") else "does not fit")
                if c.rs is None
                else "infeasible"
            ),
            problem=c.problem or None,
            screened_prefill=c.screened_prefill,
            screened_decode=c.screened_decode,
        )
        if c.rs is not None and c.rs.pools is not None:
            r["prefill_tensor_parallel"] = c.rs.pools.prefill.tp
            r["decode_tensor_parallel"] = c.rs.pools.decode.tp
        if c.day is not None and c.rs is not None and c.rs.pools is not None:
            r.update(plan_search.day_figures(c.day))
            r.update(
                prefill_replicas=c.prefill,
                decode_replicas=c.decode,
                gpus=pods
                * (
                    (c.prefill or 0) * c.rs.pools.prefill.tp
                    + (c.decode or 0) * c.rs.pools.decode.tp
                ),
            )
        rows.append(r)
    return plan_search.ranked_table(rows, DISAGG_COLUMNS)


def print_designs(agg: pa.Table | None, dis: pa.Table, slo, c, hours: int = 24) -> None:
    """The best aggregated and the best disaggregated fleet side by side (``hours``: the
    simulated horizon of their cost and energy)."""
    from fleetsim.base.tables import print_table

    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    title = (
        f"best fleet of each design: p99 TTFT <= {slo.ttft_p99_s:g} s and p99 TPOT <= "
        f"{slo.tpot_p99_s * 1000:g} ms in {'every hour' if slo.hours == 'all' else 'the peak hour'}"
    )
    per = plan_search.horizon(hours)
    headers = ("design", "fleet (per pod)", "GPUs", f"$/{per}", f"kWh/{per}", "TTFT s", "TPOT ms")
    rows = []
    if agg is not None and agg.num_rows and agg["rank"][0].as_py() is not None:
        a = agg.slice(0, 1).to_pylist()[0]
        rows.append(
            (
                "aggregated",
                f"{a['replicas']} x TP{a['tensor_parallel']}"
                + (f" x DP{a['data_parallel']}" if (a.get("data_parallel") or 1) > 1 else "")
                + f" {a['gpu']}",
                a,
            )
        )
    if dis.num_rows and dis["rank"][0].as_py() is not None:
        d = dis.slice(0, 1).to_pylist()[0]
        rows.append(
            (
                "disaggregated",
                f"prefill {d['prefill_replicas']} x TP{d['prefill_tensor_parallel']} "
                f"{d['prefill_gpu']} + decode {d['decode_replicas']} x "
                f"TP{d['decode_tensor_parallel']} {d['decode_gpu']}",
                d,
            )
        )
    cells = []
    for name, fleet, r in rows:
        cells.append(
            (
                name,
                fleet,
                f(r["gpus"], ",d"),
                f(r["total_cost_usd"], ",.2f"),
                f(r["energy_facility_kwh"], ",.1f"),
                f(r["worst_hour_ttft_p99_s"], ".3f"),
                f((r["worst_hour_tpot_p99_s"] or math.nan) * 1000, ".1f"),
            )
        )
    print_table(c, title, headers, cells, left=("design", "fleet (per pod)"))
    c.print("TTFT/TPOT = the worst hour's p99 of the day at that fleet")
    for r in dis.to_pylist():
        if r["problem"]:
            # (as written: "[disaggregation]" in a reason is no console markup)
            line = f"  disaggregated {r['prefill_gpu']}/{r['decode_gpu']}: {r['problem']}"
            c.print(term(line, 700), highlight=False)
