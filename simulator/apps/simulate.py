"""``simulate(scenario) -> Result``: the one in-process entry point of a whole run.

The CLI, sweeps, the capacity planner and the executors all call this function (or its
per-pod half, :func:`simulate_pod`); none of them shell out or glob for files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fleetsim.base.units import HOUR_S
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import Scenario
from fleetsim.results.accounting import PodSummary, hourly_table, pools_table
from fleetsim.results.result import (
    Result,
    check_invariants,
    day_latency,
    day_totals,
    pod_confidence,
)
from fleetsim.serving.pod import Pod


def simulate_pod(
    rs: Resolved,
    pod_index: int,
    *,
    keep_hist: bool = True,
    request_sink=None,
    progress: Callable[[int], None] | None = None,
    source: str = "",
) -> PodSummary:
    """Simulate pod ``pod_index`` of the fleet and summarise it."""
    sc = rs.scenario
    if rs.pools is not None:
        return _simulate_disagg_pod(
            rs,
            pod_index,
            keep_hist=keep_hist,
            request_sink=request_sink,
            progress=progress,
            source=source,
        )
    pod = Pod(
        rs,
        pod_index,
        sc.fleet.pods,
        keep_hist=keep_hist,
        request_sink=request_sink,
        progress=progress,
        source=source,
    )
    rec = pod.run()
    H = sc.simulation.hours
    powered = [sc.fleet.replicas * rs.tp * HOUR_S] * H
    states: dict[str, list[float]] = {}
    if pod.scaler is not None:  # power states integrated by the autoscaler (autoscale.py)
        powered, states = pod.scaler.gpu_seconds()
    return PodSummary.from_recorder(pod_index, rec, powered, **states)


def _simulate_disagg_pod(rs: Resolved, pod_index: int, **kw) -> PodSummary:
    """One pod of a disaggregated fleet (serving/disagg.py): the pod's figures are the sums of
    both pools; the pools' own hourly work and the link's traffic ride along in ``pools``."""
    from fleetsim.serving.disagg import DisaggPod

    sc = rs.scenario
    pod = DisaggPod(rs, pod_index, sc.fleet.pods, **kw)
    rec = pod.run()
    state = pod.pool_state()
    H = sc.simulation.hours
    pp, dp = state["prefill"], state["decode"]
    powered = [a + b for a, b in zip(pp["powered_gpu_s"], dp["powered_gpu_s"])]
    states = {k: [a + b for a, b in zip(pp[k], dp[k])] for k in ("waking_gpu_s", "off_gpu_s")}
    s = PodSummary.from_recorder(pod_index, rec, powered, **states)
    tp_p, tp_d = pod.prefill.tp, pod.decode.tp
    # the pod's busy time in units of rs.tp (the decode pool's) replica-seconds, so that
    # busy_s x rs.tp is the GPU-seconds of both pools
    s.busy_s = [dp["busy_s"][h] + pp["busy_s"][h] * tp_p / tp_d for h in range(H)]
    s.dyn_j = [dp["dyn_j"][h] + pp["dyn_j"][h] for h in range(H)]
    s.prompt_tokens = [dp["prompt_tokens"][h] + pp["prompt_tokens"][h] for h in range(H)]
    s.output_tokens = [dp["output_tokens"][h] + pp["output_tokens"][h] for h in range(H)]
    # the paged engine's counts of both pools (prefix hits are the prefill pool's, decode-pool
    # preemptions recompute there); KV use over both pools' blocks
    rp = pod.rec_prefill
    for k in ("prefix_hit_tokens", "preemptions", "recomputed_tokens", "kv_block_s"):
        mine = getattr(s, k)
        setattr(s, k, [mine[h] + getattr(rp, k)[h] for h in range(H)])
    s.kv_blocks += rp.kv_blocks
    s.pools = state
    return s


def pods_to_simulate(sc: Scenario) -> list[int]:
    """The pods that are simulated: all, or the first ``sample_pods`` (pods are exchangeable)."""
    k = sc.fleet.sample_pods or sc.fleet.pods
    return list(range(min(k, sc.fleet.pods)))


def simulate(
    scenario: Scenario | Resolved,
    *,
    source: str = "",
    request_sink=None,
    progress: Callable[[int], None] | None = None,
    pod_runner=None,
) -> Result:
    """Simulate the scenario's fleet over its horizon and return the hourly table and totals.

    ``pod_runner(rs, pod_indices, source) -> list[PodSummary]`` lets an executor run the pods
    elsewhere (process pool, Ray); by default they run here, one after the other."""
    t0 = time.perf_counter()
    rs = scenario if isinstance(scenario, Resolved) else resolve(scenario, source)
    sc = rs.scenario
    idx = pods_to_simulate(sc)
    if pod_runner is None or request_sink is not None:
        pods = [
            simulate_pod(rs, i, request_sink=request_sink, progress=progress, source=source)
            for i in idx
        ]
    else:
        pods = pod_runner(rs, idx, source)
    scale = sc.fleet.pods / len(idx)
    table = hourly_table(rs, pods, scale)
    res = Result(
        resolved=rs,
        hourly=table,
        pods=pods,
        scale=scale,
        wall_s=time.perf_counter() - t0,
        totals=day_totals(rs, table, pods, scale),
    )
    res.day_latency = day_latency(pods)
    res.pod_ci = pod_confidence(rs, pods) if len(pods) > 1 else {}
    res.pools = pools_table(rs, pods, scale)
    check_invariants(res)
    res.wall_s = time.perf_counter() - t0
    return res


def write_outputs(res: Result, out_dir: Path, scenario_text: str = "") -> Path:
    """Write ``hourly.parquet`` (atomically) with its metadata; returns its path."""
    from fleetsim.results.output import write_table_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "hourly.parquet"
    write_table_atomic(res.hourly, path, res.metadata(scenario_text))
    if res.pools is not None:  # disaggregated: per (hour, pool); hourly.parquet is their sum
        write_table_atomic(res.pools, out_dir / "pools.parquet", res.metadata(scenario_text))
    return path
