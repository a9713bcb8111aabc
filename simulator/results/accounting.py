"""From pod recorders to the hourly table: energy, cost and latency, hour by hour.

Energy is the integral of power over time, never "FLOPs x power x time":

    GPU energy      = idle_w x on GPU-seconds + wake_w x waking GPU-seconds
                      + standby_w x off GPU-seconds + the iterations' dynamic energy
                      (active_w x busy time + J/FLOP x FLOPs + J/byte x bytes)
    host energy     = (node_idle_w x powered (on + waking) GPU-seconds
                       + (node_overhead_w - node_idle_w) x busy GPU-seconds) / gpus_per_node
                      (the node's host by state: idle while powered, its serving draw while
                      a request is in flight; reported as ``energy_overhead_kwh``)
    facility energy = (GPU + host energy) x PUE
    cost            = facility kWh x the price in that hour + GPU-hours x the hourly hardware price

where the hardware price is the amortised capex (owned: every hour, on or off) or the rent
(rented: only while provisioned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from fleetsim.base.errors import InvariantError
from fleetsim.base.units import HOUR_S, per_sim_hour, utc_hour
from fleetsim.config.resolved import GpuSpec, Resolved
from fleetsim.config.schedules import hourly_values
from fleetsim.results import arrow
from fleetsim.serving.recorder import HIST_BINS, LAT_METRICS, LAT_PCTS, Recorder, hist_percentile

J_PER_KWH = 3.6e6

HOURLY_SCHEMA = pa.schema(
    [
        ("hour", pa.int32()),
        ("hour_start", pa.timestamp("s", tz="UTC")),
        ("requests_arrived", pa.int64()),
        ("requests_completed", pa.int64()),
        ("requests_rejected", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("gpus_powered_mean", pa.float64()),
        ("gpu_busy_s", pa.float64()),
        ("utilization", pa.float64()),
        ("energy_gpu_kwh", pa.float64()),
        ("energy_overhead_kwh", pa.float64()),
        ("energy_it_kwh", pa.float64()),
        ("energy_facility_kwh", pa.float64()),
        ("price_usd_per_kwh", pa.float64()),
        ("energy_cost_usd", pa.float64()),
        ("hardware_cost_usd", pa.float64()),
        ("total_cost_usd", pa.float64()),
        ("energy_gpu_idle_kwh", pa.float64()),
        ("energy_gpu_dynamic_kwh", pa.float64()),
        ("iterations", pa.int64()),
        ("batch_occupancy", pa.float64()),
        ("flops_utilization", pa.float64()),
        ("bandwidth_utilization", pa.float64()),
        ("request_throughput_per_s", pa.float64()),
        ("output_throughput_tokens_per_s", pa.float64()),
        # vLLM's latency metrics: mean and percentiles of TTFT, TPOT, ITL and e2e, in seconds
        *(
            (f"{m}_{stat}_s", pa.float64())
            for m in LAT_METRICS
            for stat in ("mean", *(f"p{int(q)}" for q in LAT_PCTS))
        ),
        ("slo_attainment", pa.float64()),
        ("wh_per_request", pa.float64()),
        ("usd_per_mtok", pa.float64()),
        ("carbon_kg", pa.float64()),
        # the paged KV policy (serving/kv_paged.py)
        ("prefix_hit_tokens", pa.int64()),
        ("preemptions", pa.int64()),
        ("recomputed_tokens", pa.int64()),
        ("kv_utilization", pa.float64()),
    ]
)
HOURLY_COLUMNS = tuple(HOURLY_SCHEMA.names)


@dataclass
class PodSummary:
    """What one pod's simulation hands back (small and picklable, for any executor)."""

    pod: int
    hours: int
    powered_gpu_s: list[float]
    busy_s: list[float]
    dyn_j: list[float]
    prompt_tokens: list[int]
    output_tokens: list[int]
    arrived: list[int]
    rejected: list[int]
    completed: list[int]
    in_flight: int
    iterations: int
    events: int
    lat_n: list[int]
    lat_n_tpot: list[int]
    slo_ok: list[int]
    lat_pct: list[dict]  # per hour: {"ttft": {50: .., 99: ..}, ...} (exact, this pod)
    lat_sum_s: list[dict]  # per hour: {"ttft": sum, "tpot": sum, "e2e": sum}
    hist: list[dict | None] = field(default_factory=list)
    lat_n_itl: list[int] = field(default_factory=list)  # token gaps (ITL samples) per hour
    flops: list[float] = field(default_factory=list)  # per hour, all replicas
    bytes_moved: list[float] = field(default_factory=list)
    iters_h: list[int] = field(default_factory=list)  # iterations ended in each hour
    waking_gpu_s: list[float] = field(default_factory=list)  # cold starts (part of powered)
    off_gpu_s: list[float] = field(default_factory=list)  # powered off, on standby draw
    prefix_hit_tokens: list[int] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)
    recomputed_tokens: list[int] = field(default_factory=list)
    kv_block_s: list[float] = field(default_factory=list)  # KV blocks in use x seconds
    kv_blocks: int = 0  # KV blocks per replica x replicas of the pod
    pools: dict | None = None  # disaggregated: per-pool work and the link (serving/disagg.py)

    @classmethod
    def from_recorder(
        cls,
        pod: int,
        rec: Recorder,
        powered_gpu_s: list[float],
        waking_gpu_s: list[float] | None = None,
        off_gpu_s: list[float] | None = None,
    ) -> PodSummary:
        H = rec.hours
        return cls(
            waking_gpu_s=list(waking_gpu_s or [])[:H],
            off_gpu_s=list(off_gpu_s or [])[:H],
            pod=pod,
            hours=H,
            powered_gpu_s=list(powered_gpu_s[:H]),
            busy_s=rec.busy_s[:H],
            dyn_j=rec.dyn_j[:H],
            prompt_tokens=rec.prompt_tokens[:H],
            output_tokens=rec.output_tokens[:H],
            arrived=rec.arrived[:H],
            rejected=rec.rejected[:H],
            completed=rec.completed[:H],
            in_flight=rec.in_flight,
            iterations=rec.iterations,
            events=rec.events,
            lat_n=[s.n for s in rec.stats],
            lat_n_tpot=[s.n_tpot for s in rec.stats],
            slo_ok=[s.slo_ok for s in rec.stats],
            lat_pct=[
                {"ttft": s.ttft, "tpot": s.tpot, "itl": s.itl, "e2e": s.e2e} for s in rec.stats
            ],
            lat_sum_s=[
                {"ttft": s.ttft_sum_s, "tpot": s.tpot_sum_s, "itl": s.itl_sum_s, "e2e": s.e2e_sum_s}
                for s in rec.stats
            ],
            hist=[s.hist for s in rec.stats],
            prefix_hit_tokens=rec.prefix_hit_tokens[:H],
            preemptions=rec.preemptions[:H],
            recomputed_tokens=rec.recomputed_tokens[:H],
            kv_block_s=rec.kv_block_s[:H],
            kv_blocks=rec.kv_blocks,
            lat_n_itl=[s.n_itl for s in rec.stats],
            flops=rec.flops[:H],
            bytes_moved=rec.bytes_moved[:H],
            iters_h=rec.iters_h[:H],
        )


def lat_count(p: PodSummary, h: int, m: str) -> int:
    """The samples behind metric ``m`` in hour ``h`` of pod ``p`` (requests, or token gaps)."""
    if m == "tpot":
        return p.lat_n_tpot[h]
    if m == "itl":
        return p.lat_n_itl[h] if p.lat_n_itl else 0
    return p.lat_n[h]


def _latency_columns(pods: list[PodSummary], H: int) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {}
    for m in LAT_METRICS:
        cols[f"{m}_mean_s"] = []
        for q in LAT_PCTS:
            cols[f"{m}_p{int(q)}_s"] = []
    for h in range(H):
        with_data = [p for p in pods if p.lat_n[h] > 0]
        for m in LAT_METRICS:
            n = sum(lat_count(p, h, m) for p in with_data)
            total = sum(p.lat_sum_s[h].get(m, 0.0) for p in with_data)
            cols[f"{m}_mean_s"].append(total / n if n else math.nan)
            # several pods: merge their log-histograms (bin width 0.46%)
            merged = _merged_hist(with_data, h, m) if len(with_data) > 1 and n else None
            for q in LAT_PCTS:
                key = f"{m}_p{int(q)}_s"
                if not with_data or not n:
                    cols[key].append(math.nan)
                elif merged is None:  # exact percentiles of the one pod
                    cols[key].append(float(with_data[0].lat_pct[h][m].get(q, math.nan)))
                else:
                    cols[key].append(hist_percentile(merged, q))
    return cols


def _merged_hist(pods: list[PodSummary], h: int, metric: str) -> np.ndarray:
    """The sum of the pods' log-histograms of ``metric`` in hour ``h`` (dense bin counts)."""
    total = np.zeros(HIST_BINS, dtype=np.int64)
    for p in pods:
        d = p.hist[h] if p.hist else None
        if d is None:
            raise InvariantError(f"pod {p.pod} kept no latency histogram for hour {h}")
        total += np.asarray(d[metric])
    return total


def energy_cost(
    rs: Resolved,
    g: GpuSpec,
    total_gpus: int,
    powered: np.ndarray,
    waking: np.ndarray,
    off: np.ndarray,
    busy_gpu_s: np.ndarray,
    dyn_j: np.ndarray,
    price: np.ndarray,
) -> dict[str, np.ndarray]:
    """Hourly energy and cost of ``total_gpus`` GPUs of type ``g`` (see the module docstring):
    powered/waking/off GPU-seconds, busy GPU-seconds and the iterations' dynamic energy (J)."""
    sc = rs.scenario
    pw = sc.power
    H = len(price)
    wake_w = g.idle_w if pw.wake_w is None else pw.wake_w
    # static draw (idle while on, wake, standby while off) and the iterations' dynamic energy
    e_gpu_idle = (g.idle_w * (powered - waking) + wake_w * waking + pw.standby_w * off) / J_PER_KWH
    # the power limit: no hour's busy GPU-seconds draw more than max_w on average (the engine
    # integrates each run's dynamic energy linearly in its FLOPs and bytes; PowerSpec.dynamic_j)
    cap_j = max(g.power.max_w - g.idle_w, 0.0) * np.asarray(busy_gpu_s, dtype=np.float64)
    e_gpu_dyn = np.minimum(np.asarray(dyn_j, dtype=np.float64), cap_j) / J_PER_KWH
    e_gpu = e_gpu_idle + e_gpu_dyn
    # host power by state: the idle host while powered, up to its serving draw while busy
    idle_h = g.host_idle_w_per_gpu
    e_over = (idle_h * powered + (g.overhead_w_per_gpu - idle_h) * busy_gpu_s) / J_PER_KWH
    e_it = e_gpu + e_over
    e_fac = e_it * pw.pue
    if sc.cost.hardware == "owned":
        per_gpu_h = (
            g.capex_usd / (sc.cost.amortization_years * 8760.0)
            + sc.cost.maintenance_usd_per_gpu_hour
        )
        hw_cost = np.full(H, total_gpus * per_gpu_h)
    else:
        hw_cost = g.rent_usd_per_gpu_hour * powered / HOUR_S
    return {
        "powered_gpu_s": powered,
        "gpu_busy_s": busy_gpu_s,
        "energy_gpu_kwh": e_gpu,
        "energy_gpu_idle_kwh": e_gpu_idle,
        "energy_gpu_dynamic_kwh": e_gpu_dyn,
        "energy_overhead_kwh": e_over,
        "energy_it_kwh": e_it,
        "energy_facility_kwh": e_fac,
        "energy_cost_usd": e_fac * price,
        "hardware_cost_usd": hw_cost,
    }


def _pools(p: PodSummary) -> dict:
    """The per-pool record of a pod of a disaggregated fleet."""
    assert p.pools is not None, "not a disaggregated pod"
    return p.pools


def pool_energy_cost(
    rs: Resolved, name: str, pods: list[PodSummary], scale: float, price: np.ndarray
) -> dict[str, np.ndarray]:
    """:func:`energy_cost` of one pool of a disaggregated fleet (its power states from its own
    autoscaler, if any), from the pods' ``pools`` records."""
    assert rs.pools is not None
    spec = rs.pools.by_name()[name]
    prs = spec.rs

    def tot(key: str) -> np.ndarray:
        return scale * np.sum(
            [np.asarray(_pools(p)[name][key], dtype=np.float64) for p in pods], axis=0
        )

    return energy_cost(
        rs,
        prs.gpu,
        rs.scenario.fleet.pods * spec.replicas * prs.tp,
        tot("powered_gpu_s"),
        tot("waking_gpu_s"),
        tot("off_gpu_s"),
        tot("busy_s") * prs.tp,
        tot("dyn_j"),
        price,
    )


def hourly_table(rs: Resolved, pods: list[PodSummary], scale: float = 1.0) -> pa.Table:
    """The hourly contract table of ``pods`` (extensive figures multiplied by ``scale``)."""
    sc = rs.scenario
    H = sc.simulation.hours
    start = sc.simulation.start_utc
    hod0 = start.hour

    def tot(name: str) -> np.ndarray:
        return scale * np.sum(
            [np.asarray(getattr(p, name), dtype=np.float64) for p in pods], axis=0
        )

    def tot0(name: str) -> np.ndarray:  # optional per-hour fields: empty means zeros
        return scale * np.sum(
            [np.asarray(getattr(p, name) or [0.0] * H, dtype=np.float64) for p in pods], axis=0
        )

    hod = [utc_hour(h, hod0) for h in range(H)]
    price_day = hourly_values(sc.cost.electricity_usd_per_kwh, 24)
    assert price_day is not None  # a price is always given
    price = np.array([price_day[x] for x in hod])
    powered, busy_gpu_s, e = _energy_columns(rs, pods, scale, price)
    e_gpu, e_over, e_it, e_fac = e["gpu"], e["overhead"], e["it"], e["facility"]
    e_cost, hw_cost, e_gpu_idle, e_gpu_dyn = e["cost"], e["hardware"], e["idle"], e["dynamic"]
    total = e_cost + hw_cost
    arrived = np.rint(tot("arrived")).astype(np.int64)
    completed = np.rint(tot("completed")).astype(np.int64)
    rejected = np.rint(tot("rejected")).astype(np.int64)
    prompt = np.rint(tot("prompt_tokens")).astype(np.int64)
    output = np.rint(tot("output_tokens")).astype(np.int64)
    n_lat = np.sum([p.lat_n for p in pods], axis=0)
    ok = np.sum([p.slo_ok for p in pods], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        util = np.where(powered > 0, busy_gpu_s / powered, 0.0)
        slo = np.where(n_lat > 0, ok / np.maximum(n_lat, 1), np.nan)
        whpr = np.where(completed > 0, e_fac * 1000.0 / np.maximum(completed, 1), np.nan)
        usd_mtok = np.where(output > 0, total / np.maximum(output, 1) * 1e6, np.nan)
    occupancy, flops_util, bw_util, iters = _headroom_columns(rs, pods, scale, powered, output)
    carbon_day = hourly_values(sc.cost.carbon_kg_per_kwh, 24)
    carbon = (
        e_fac * np.array([carbon_day[x] for x in hod])
        if carbon_day is not None
        else np.full(H, np.nan)
    )
    # mean fraction of the KV blocks in use (paged engine; 0 with the first engine)
    blocks_s = sum(p.kv_blocks for p in pods) * 3600.0
    kv_util = tot0("kv_block_s") / scale / blocks_s if blocks_s else np.zeros(H)
    cols = {
        "prefix_hit_tokens": np.rint(tot0("prefix_hit_tokens")).astype(np.int64),
        "preemptions": np.rint(tot0("preemptions")).astype(np.int64),
        "recomputed_tokens": np.rint(tot0("recomputed_tokens")).astype(np.int64),
        "kv_utilization": kv_util,
        "hour": np.arange(H, dtype=np.int32),
        "hour_start": [start + timedelta(hours=h) for h in range(H)],
        "requests_arrived": arrived,
        "requests_completed": completed,
        "requests_rejected": rejected,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "gpus_powered_mean": powered / HOUR_S,
        "gpu_busy_s": busy_gpu_s,
        "utilization": util,
        "energy_gpu_kwh": e_gpu,
        "energy_overhead_kwh": e_over,
        "energy_it_kwh": e_it,
        "energy_facility_kwh": e_fac,
        "price_usd_per_kwh": price,
        "energy_cost_usd": e_cost,
        "hardware_cost_usd": hw_cost,
        "total_cost_usd": total,
        "energy_gpu_idle_kwh": e_gpu_idle,
        "energy_gpu_dynamic_kwh": e_gpu_dyn,
        "iterations": np.rint(iters).astype(np.int64),
        "batch_occupancy": occupancy,
        "flops_utilization": flops_util,
        "bandwidth_utilization": bw_util,
        "request_throughput_per_s": completed / HOUR_S,
        "output_throughput_tokens_per_s": output / HOUR_S,
        **_latency_columns(pods, H),
        "slo_attainment": slo,
        "wh_per_request": whpr,
        "usd_per_mtok": usd_mtok,
        "carbon_kg": carbon,
    }
    # no grid intensity: carbon is unknown, null (not NaN, which SQL engines would sum to NaN)
    cols["carbon_kg"] = arrow.array(carbon, pa.float64(), nan_is_null=True)
    return arrow.table(cols, HOURLY_SCHEMA)  # (not pa.table: it would import pandas)


def _energy_columns(
    rs: Resolved, pods: list[PodSummary], scale: float, price: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Powered GPU-seconds, busy GPU-seconds and the energy and cost columns of each hour
    (a disaggregated fleet: each pool priced with its own GPU, then summed)."""
    sc = rs.scenario
    H = sc.simulation.hours

    def tot(name: str) -> np.ndarray:
        return scale * np.sum(
            [np.asarray(getattr(p, name), dtype=np.float64) for p in pods], axis=0
        )

    def tot0(name: str) -> np.ndarray:  # optional per-hour fields: empty means zeros
        return scale * np.sum(
            [np.asarray(getattr(p, name) or [0.0] * H, dtype=np.float64) for p in pods], axis=0
        )

    if rs.pools is not None:  # disaggregated: each pool priced with its own GPU, then summed
        parts = [pool_energy_cost(rs, name, pods, scale, price) for name in ("prefill", "decode")]
        powered = sum(p["powered_gpu_s"] for p in parts)
        busy_gpu_s = sum(p["gpu_busy_s"] for p in parts)
        e_gpu = sum(p["energy_gpu_kwh"] for p in parts)
        e_gpu_idle = sum(p["energy_gpu_idle_kwh"] for p in parts)
        e_gpu_dyn = sum(p["energy_gpu_dynamic_kwh"] for p in parts)
        e_over = sum(p["energy_overhead_kwh"] for p in parts)
        e_cost = sum(p["energy_cost_usd"] for p in parts)
        hw_cost = sum(p["hardware_cost_usd"] for p in parts)
        e_it = e_gpu + e_over
        e_fac = e_it * sc.power.pue
    else:
        powered = tot("powered_gpu_s")  # on + waking GPU-seconds
        ec = energy_cost(
            rs,
            rs.gpu,
            sc.fleet.pods * sc.fleet.replicas * rs.tp,
            powered,
            tot0("waking_gpu_s"),
            tot0("off_gpu_s"),
            tot("busy_s") * rs.tp,
            tot("dyn_j"),
            price,
        )
        busy_gpu_s = ec["gpu_busy_s"]
        e_gpu, e_over, e_it, e_fac = (
            ec["energy_gpu_kwh"],
            ec["energy_overhead_kwh"],
            ec["energy_it_kwh"],
            ec["energy_facility_kwh"],
        )
        e_cost, hw_cost = ec["energy_cost_usd"], ec["hardware_cost_usd"]
        e_gpu_idle, e_gpu_dyn = ec["energy_gpu_idle_kwh"], ec["energy_gpu_dynamic_kwh"]
    e = {
        "gpu": e_gpu,
        "overhead": e_over,
        "it": e_it,
        "facility": e_fac,
        "cost": e_cost,
        "hardware": hw_cost,
        "idle": e_gpu_idle,
        "dynamic": e_gpu_dyn,
    }
    return np.asarray(powered), np.asarray(busy_gpu_s), e


def _headroom_columns(
    rs: Resolved, pods: list[PodSummary], scale: float, powered: np.ndarray, output: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batch occupancy, FLOP/s and bandwidth utilisation against the powered GPUs' peak, and
    the iterations of each hour."""
    sc = rs.scenario
    H = sc.simulation.hours

    def tot0(name: str) -> np.ndarray:  # optional per-hour fields: empty means zeros
        return scale * np.sum(
            [np.asarray(getattr(p, name) or [0.0] * H, dtype=np.float64) for p in pods], axis=0
        )

    # work done (FLOPs, bytes, iterations) and the peak of the powered GPUs that did it
    if rs.pools is not None:
        work = {k: np.zeros(H) for k in ("flops", "bytes_moved", "iters_h")}
        peak_f: np.ndarray = np.zeros(H)
        peak_b: np.ndarray = np.zeros(H)
        for name, spec in rs.pools.by_name().items():
            for k in work:
                work[k] += scale * np.sum(
                    [np.asarray(_pools(p)[name].get(k) or [0.0] * H, float) for p in pods], axis=0
                )
            pw_s = scale * np.sum(
                [np.asarray(_pools(p)[name]["powered_gpu_s"], float) for p in pods], axis=0
            )
            peak_f += spec.rs.profile.peak_flops * pw_s
            peak_b += spec.rs.profile.mem_bw_bytes_per_s * pw_s
        flops_done, bytes_done, iters = work["flops"], work["bytes_moved"], work["iters_h"]
    else:
        flops_done, bytes_done, iters = tot0("flops"), tot0("bytes_moved"), tot0("iters_h")
        peak_f = np.asarray(rs.profile.peak_flops * powered)
        peak_b = np.asarray(rs.profile.mem_bw_bytes_per_s * powered)
    with np.errstate(invalid="ignore", divide="ignore"):
        # mean sequences per iteration (each yields one token) against max_num_seqs
        occupancy = np.where(iters > 0, output / np.maximum(iters, 1), np.nan) / (
            sc.fleet.max_batch_size
        )
        # achieved FLOP/s and bytes/s of the powered GPUs against their peak
        flops_util = np.where(peak_f > 0, flops_done / np.where(peak_f > 0, peak_f, 1), np.nan)
        bw_util = np.where(peak_b > 0, bytes_done / np.where(peak_b > 0, peak_b, 1), np.nan)
    return occupancy, flops_util, bw_util, iters


POOLS_SCHEMA = pa.schema(
    [
        ("hour", pa.int32()),
        ("hour_start", pa.timestamp("s", tz="UTC")),
        ("pool", pa.string()),
        ("gpu", pa.string()),
        ("tensor_parallel", pa.int32()),
        ("replicas", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("gpus_powered_mean", pa.float64()),
        ("gpu_busy_s", pa.float64()),
        ("utilization", pa.float64()),
        ("energy_gpu_kwh", pa.float64()),
        ("energy_overhead_kwh", pa.float64()),
        ("energy_it_kwh", pa.float64()),
        ("energy_facility_kwh", pa.float64()),
        ("energy_cost_usd", pa.float64()),
        ("hardware_cost_usd", pa.float64()),
        ("total_cost_usd", pa.float64()),
        ("kv_transfers", pa.int64()),
        ("kv_transfer_bytes", pa.float64()),
        ("kv_transfer_mean_s", pa.float64()),
        ("kv_transfer_p99_s", pa.float64()),
        # the paged engine's KV figures of the pool (0 under kv_allocation = "reserve"): prompt
        # tokens served from the prefix cache (prefill pool only: decode keeps no prefix cache),
        # preemptions (a decode-pool victim is recomputed there), and the share of the pool's
        # KV blocks in use, time-averaged over the hour
        ("prefix_hit_tokens", pa.int64()),
        ("preemptions", pa.int64()),
        ("kv_utilization", pa.float64()),
    ]
)


def pools_table(rs: Resolved, pods: list[PodSummary], scale: float = 1.0) -> pa.Table | None:
    """One row per (hour, pool) of a disaggregated fleet (None for an aggregated one): each
    pool's GPUs, busy time, energy and cost, priced with its own GPU type. The fleet's hourly
    table is their sum. The KV-transfer columns sit on the prefill rows (the link is the
    prefill replicas' egress; transfers counted in the hour the KV arrives) and are 0 / null
    on the decode rows."""
    if rs.pools is None:
        return None
    sc = rs.scenario
    H = sc.simulation.hours
    start = sc.simulation.start_utc
    hod0 = start.hour
    price_day = hourly_values(sc.cost.electricity_usd_per_kwh, 24)
    assert price_day is not None
    price = np.array(per_sim_hour(price_day, hod0, H))

    def tot(name: str, key: str) -> np.ndarray:
        return scale * np.sum(
            [np.asarray(_pools(p)[name][key], dtype=np.float64) for p in pods], axis=0
        )

    count = tot("transfer", "count")
    tsum = tot("transfer", "time_sum_s")
    if len(pods) == 1:
        p99 = np.asarray(_pools(pods[0])["transfer"]["p99_s"], dtype=np.float64)
    else:
        p99 = np.array(
            [
                hist_percentile(
                    np.sum([np.asarray(_pools(p)["transfer"]["hist"][h]) for p in pods], axis=0),
                    99.0,
                )
                for h in range(H)
            ]
        )
    rows: dict[str, list] = {k: [] for k in POOLS_SCHEMA.names}
    xbytes = tot("transfer", "bytes")
    cols_by_pool = {}
    for name, spec in rs.pools.by_name().items():
        ec = pool_energy_cost(rs, name, pods, scale, price)
        ec["prompt_tokens"] = tot(name, "prompt_tokens")
        ec["output_tokens"] = tot(name, "output_tokens")
        for k in ("prefix_hit_tokens", "preemptions", "kv_block_s"):
            ec[k] = tot(name, k) if k in _pools(pods[0])[name] else np.zeros(H)
        blocks_s = scale * sum(_pools(p)[name].get("kv_blocks", 0) for p in pods) * HOUR_S
        ec["kv_utilization"] = ec["kv_block_s"] / blocks_s if blocks_s else np.zeros(H)
        cols_by_pool[name] = (spec, ec)
    for h in range(H):
        for name, (spec, ec) in cols_by_pool.items():
            pw = ec["powered_gpu_s"][h]
            pre = name == "prefill"
            rows["hour"].append(h)
            rows["hour_start"].append(start + timedelta(hours=h))
            rows["pool"].append(name)
            rows["gpu"].append(spec.gpu_name)
            rows["tensor_parallel"].append(spec.tp)
            rows["replicas"].append(sc.fleet.pods * spec.replicas)
            rows["prompt_tokens"].append(round(ec["prompt_tokens"][h]))
            rows["output_tokens"].append(round(ec["output_tokens"][h]))
            rows["gpus_powered_mean"].append(pw / HOUR_S)
            rows["gpu_busy_s"].append(ec["gpu_busy_s"][h])
            rows["utilization"].append(ec["gpu_busy_s"][h] / pw if pw > 0 else 0.0)
            for k in (
                "energy_gpu_kwh",
                "energy_overhead_kwh",
                "energy_it_kwh",
                "energy_facility_kwh",
                "energy_cost_usd",
                "hardware_cost_usd",
            ):
                rows[k].append(float(ec[k][h]))
            rows["total_cost_usd"].append(
                float(ec["energy_cost_usd"][h] + ec["hardware_cost_usd"][h])
            )
            rows["kv_transfers"].append(round(count[h]) if pre else 0)
            rows["kv_transfer_bytes"].append(float(xbytes[h]) if pre else 0.0)
            rows["kv_transfer_mean_s"].append(
                float(tsum[h] / count[h]) if pre and count[h] > 0 else None
            )
            rows["kv_transfer_p99_s"].append(
                float(p99[h]) if pre and count[h] > 0 and math.isfinite(p99[h]) else None
            )
            rows["prefix_hit_tokens"].append(round(ec["prefix_hit_tokens"][h]))
            rows["preemptions"].append(round(ec["preemptions"][h]))
            rows["kv_utilization"].append(float(ec["kv_utilization"][h]))
    return arrow.table(rows, POOLS_SCHEMA)
