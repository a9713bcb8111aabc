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
import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fleetsim.apps.executors import RunSummary, run_task
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import Resolved

CAP = 400  # give up on a pool above this many replicas per pod


@dataclass
class DisaggCandidate:
    """One (prefill GPU, decode GPU) pair and what the search learns about it."""

    prefill_gpu: str
    decode_gpu: str
    base: dict
    rs: Resolved | None = None
    problem: str = ""
    lb_prefill: int = 0
    lb_decode: int = 0
    screened_prefill: int | None = None
    screened_decode: int | None = None
    prefill: int | None = None
    decode: int | None = None
    day: RunSummary | None = None
    probes: int = 0

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


def _hours_ok(res: RunSummary, slo, metric: str, judged: list[int], backlog_ok) -> bool:
    """Hours ``judged`` meet the ``metric`` target(s) ("ttft", "tpot" or "both"), nothing was
    rejected, and the backlog at the end fits a fleet that keeps up (``backlog_ok``, the
    aggregated planner's rule)."""
    t = res.hourly
    ok = t.column("requests_rejected").to_numpy() == 0
    for m, target in (("ttft", slo.ttft_p99_s), ("tpot", slo.tpot_p99_s)):
        if metric in (m, "both"):
            v = t.column(f"{m}_p99_s").to_numpy()
            ok &= np.where(np.isnan(v), True, v <= target)
    return bool(all(ok[h] for h in judged)) and backlog_ok(res, slo)


def _failing_metrics(res: RunSummary, slo, judged: list[int], backlog_ok) -> tuple[bool, bool]:
    """Whether TTFT and whether TPOT fail in some judged hour (or the fleet falls behind)."""
    return (
        not _hours_ok(res, slo, "ttft", judged, backlog_ok),
        not _hours_ok(res, slo, "tpot", judged, backlog_ok),
    )


def pool_bounds(rs: Resolved, source: str) -> tuple[int, int]:
    """Throughput lower bounds (replicas per pod) of the prefill and decode pools at the peak
    rate: prefill in full ``max_batched_tokens`` chunks, decode at the largest batch the KV
    budget holds (optimistic, as the aggregated planner's bound)."""
    from fleetsim.workload.sampling import SizeSampler

    sc = rs.scenario
    pools = rs.pools
    assert pools is not None
    p, o = SizeSampler(sc.traffic.prompt, sc.traffic.output, source).draw(
        20_000, np.random.default_rng(np.random.SeedSequence(sc.seed, spawn_key=(2**31,)))
    )
    ep, eo = float(p.mean()), float(o.mean())
    peak = max(rs.hourly_rate_per_s) / sc.fleet.pods
    pp, dp = pools.prefill, pools.decode
    lat_p = pp.rs.latency_model()
    chunk = max(1, pp.max_tokens // max(int(ep), 1))
    t_pf = lat_p.prefill_time(max(int(ep), 1), chunk) / chunk  # per prompt
    lat_d = dp.rs.latency_model()
    per_seq = ep + eo / 2.0
    batch = int(max(1, min(dp.max_batch, dp.kv_capacity_tokens // max(per_seq, 1.0))))
    t_tok = lat_d.decode_time(batch, int(per_seq)) / batch  # per output token
    return max(1, math.ceil(peak * t_pf)), max(1, math.ceil(peak * eo * t_tok))


class DisaggPlanner:
    """The disaggregated search, sharing the aggregated planner's executor, cache and SLO, and
    its search (``search_min``) and backlog rule (``backlog_ok``), passed in by apps/plan.py."""

    def __init__(self, planner, search_min, backlog_ok) -> None:
        self.p = planner
        self.search_min = search_min
        self.ok = backlog_ok

    def _scenario(self, cand: DisaggCandidate, P: int, D: int, rate: float | None) -> dict:
        d = copy.deepcopy(cand.base)
        d["disaggregation"]["prefill"]["replicas"] = P
        d["disaggregation"]["decode"]["replicas"] = D
        if rate is not None:
            d.setdefault("simulation", {})["hours"] = 2
            d["traffic"]["diurnal"] = "flat"
            d["traffic"]["requests_per_day"] = rate * 86400.0
            if d.get("fleet", {}).get("pods", 1) > 1:
                d["fleet"]["sample_pods"] = 1
        return d

    def run(self, cand: DisaggCandidate, specs: list[tuple[int, int, float | None]]) -> list:
        p = self.p
        scen = [self._scenario(cand, P, D, r) for P, D, r in specs]
        keys = [json.dumps(d, sort_keys=True) for d in scen]
        todo = list(dict.fromkeys(k for k in keys if k not in p.cache))
        if todo:
            if p.hooks is not None:
                p.hooks.add(len(todo))
            done = p.ex.map(
                run_task,
                [(json.loads(k), p.source) for k in todo],
                p.hooks.done if p.hooks is not None else None,
            )
            p.cache.update(zip(todo, done))
            cand.probes += len(todo)
        return [p.cache[k] for k in keys]

    def plan(self, cand: DisaggCandidate) -> None:
        """Size both pools of ``cand`` (see the module docstring)."""
        search_min = self.search_min
        bk = self.ok
        p = self.p
        rs = cand.rs
        assert rs is not None
        H = p.sc.simulation.hours
        rates = [rs.hourly_rate_per_s[h % 24] for h in range(H)]
        judged = [int(np.argmax(rates))] if p.slo.hours == "peak" else list(range(H))
        peak = max(rates[h] for h in judged)
        cand.lb_prefill, cand.lb_decode = pool_bounds(rs, p.source)
        w = max(1, p.ex.workers)
        P, D = cand.lb_prefill, cand.lb_decode
        if p.steady_ok:
            big_d = 2 * cand.lb_decode + 4

            def test_p(ns: list[int]) -> list[bool]:
                res = self.run(cand, [(n, big_d, peak) for n in ns])
                return [_hours_ok(r, p.slo, "ttft", [1], bk) for r in res]

            Ps = search_min(test_p, cand.lb_prefill, w, cap=CAP)
            if Ps is None:
                cand.problem = f"no prefill pool up to {CAP} replicas meets the TTFT target"
                return

            def test_d(ns: list[int]) -> list[bool]:
                res = self.run(cand, [(Ps, n, peak) for n in ns])
                return [_hours_ok(r, p.slo, "tpot", [1], bk) for r in res]

            Ds = search_min(test_d, cand.lb_decode, w, cap=CAP)
            if Ds is None:
                cand.problem = f"no decode pool up to {CAP} replicas meets the TPOT target"
                return
            cand.screened_prefill, cand.screened_decode = P, D = Ps, Ds
        # the coupled system, on whole days
        for _ in range(4 * CAP):
            specs: list[tuple[int, int, float | None]] = [(P, D, None)]
            if P > 1:
                specs.append((P - 1, D, None))
            if D > 1:
                specs.append((P, D - 1, None))
            res = dict(zip(specs, self.run(cand, specs)))
            here = res[(P, D, None)]
            if not _hours_ok(here, p.slo, "both", judged, bk):
                bad_ttft, bad_tpot = _failing_metrics(here, p.slo, judged, bk)
                P += 1 if bad_ttft or not bad_tpot else 0
                D += 1 if bad_tpot else 0
                if max(P, D) > CAP:
                    cand.problem = f"no fleet up to {CAP} replicas per pool meets the SLO"
                    return
                continue
            down = [
                (a, b)
                for a, b in ((P - 1, D), (P, D - 1))
                if (a, b, None) in res and _hours_ok(res[(a, b, None)], p.slo, "both", judged, bk)
            ]
            if not down:
                break
            P, D = down[0]
        cand.prefill, cand.decode = P, D
        cand.day = self.run(cand, [(P, D, None)])[0]


def make_disagg_candidates(
    data: dict, prefill_gpus: list[str], decode_gpus: list[str], source: str
) -> list[DisaggCandidate]:
    """Every (prefill GPU, decode GPU) pair; one that does not fit keeps its reason."""
    cands = []
    for pg in prefill_gpus:
        for dg in decode_gpus:
            c = DisaggCandidate(prefill_gpu=pg, decode_gpu=dg, base=disagg_base(data, pg, dg))
            try:
                c.rs = resolve(scenario_from_dict(c.base, source), source)
            except ScenarioError as exc:
                if exc.field.endswith(".gpu"):
                    raise UserError(f"--prefill-gpus/--decode-gpus: {exc}") from None
                c.problem = f"does not fit: {exc}"
            cands.append(c)
    return cands


DISAGG_COLUMNS = (
    ("rank", pa.int32()),
    ("prefill_gpu", pa.string()),
    ("prefill_tensor_parallel", pa.int32()),
    ("prefill_replicas", pa.int32()),
    ("decode_gpu", pa.string()),
    ("decode_tensor_parallel", pa.int32()),
    ("decode_replicas", pa.int32()),
    ("pods", pa.int32()),
    ("gpus", pa.int32()),
    ("status", pa.string()),
    ("problem", pa.string()),
    ("screened_prefill", pa.int32()),
    ("screened_decode", pa.int32()),
    ("probes", pa.int32()),
    ("energy_facility_kwh", pa.float64()),
    ("energy_cost_usd", pa.float64()),
    ("hardware_cost_usd", pa.float64()),
    ("total_cost_usd", pa.float64()),
    ("worst_hour_ttft_p99_s", pa.float64()),
    ("worst_hour_tpot_p99_s", pa.float64()),
    ("slo_attainment", pa.float64()),
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
            else ("does not fit" if c.rs is None else "infeasible"),
            problem=c.problem or None,
            screened_prefill=c.screened_prefill,
            screened_decode=c.screened_decode,
        )
        if c.rs is not None and c.rs.pools is not None:
            r["prefill_tensor_parallel"] = c.rs.pools.prefill.tp
            r["decode_tensor_parallel"] = c.rs.pools.decode.tp
        if c.day is not None and c.rs is not None and c.rs.pools is not None:
            t, hr = c.day.totals, c.day.hourly
            r.update(
                prefill_replicas=c.prefill,
                decode_replicas=c.decode,
                gpus=pods
                * (
                    (c.prefill or 0) * c.rs.pools.prefill.tp
                    + (c.decode or 0) * c.rs.pools.decode.tp
                ),
                energy_facility_kwh=t.energy_facility_kwh,
                energy_cost_usd=t.energy_cost_usd,
                hardware_cost_usd=t.hardware_cost_usd,
                total_cost_usd=t.total_cost_usd,
                worst_hour_ttft_p99_s=float(np.nanmax(hr.column("ttft_p99_s").to_numpy())),
                worst_hour_tpot_p99_s=float(np.nanmax(hr.column("tpot_p99_s").to_numpy())),
                slo_attainment=t.slo_attainment,
            )
        rows.append(r)
    rows.sort(key=lambda r: (r["total_cost_usd"] is None, r["total_cost_usd"] or 0.0))
    for i, r in enumerate(rows):
        r["rank"] = i + 1 if r["total_cost_usd"] is not None else None
    return pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in DISAGG_COLUMNS})


def print_designs(agg: pa.Table | None, dis: pa.Table, slo, c) -> None:
    """The best aggregated and the best disaggregated fleet side by side."""
    from fleetsim.base.tables import print_table

    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    title = (
        f"best fleet of each design: p99 TTFT <= {slo.ttft_p99_s:g} s and p99 TPOT <= "
        f"{slo.tpot_p99_s * 1000:g} ms in {'every hour' if slo.hours == 'all' else 'the peak hour'}"
    )
    headers = ("design", "fleet (per pod)", "GPUs", "$/day", "kWh/day", "TTFT s", "TPOT ms")
    rows = []
    if agg is not None and agg.num_rows and agg["rank"][0].as_py() is not None:
        a = agg.slice(0, 1).to_pylist()[0]
        rows.append(
            (
                "aggregated",
                f"{a['replicas']} x TP{a['tensor_parallel']} {a['gpu']}",
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
            c.print(f"  disaggregated {r['prefill_gpu']}/{r['decode_gpu']}: {r['problem']}")
