"""From pod recorders to the hourly table: energy, cost and latency, hour by hour.

Energy is the integral of power over time, never "FLOPs x power x time":

    GPU energy      = idle_w x on GPU-seconds + wake_w x waking GPU-seconds
                      + standby_w x off GPU-seconds + the iterations' dynamic energy
                      (active_w x busy time + J/FLOP x FLOPs + J/byte x bytes)
    overhead energy = node_overhead_w / gpus_per_node x powered (on + waking) GPU-seconds
    facility energy = (GPU + overhead energy) x PUE
    cost            = facility kWh x the price in that hour + GPU-hours x the hourly hardware price

where the hardware price is the amortised capex (owned: every hour, on or off) or the rent
(rented: only while provisioned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import pyarrow as pa

from fleetsim.config.scenario import GpuSpec, Resolved, hourly_values
from fleetsim.serving.recorder import LAT_PCTS, Recorder, hist_percentile

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
        ("ttft_p50_s", pa.float64()),
        ("ttft_p99_s", pa.float64()),
        ("tpot_p50_s", pa.float64()),
        ("tpot_p99_s", pa.float64()),
        ("e2e_p50_s", pa.float64()),
        ("e2e_p99_s", pa.float64()),
        ("slo_attainment", pa.float64()),
        ("wh_per_request", pa.float64()),
        ("usd_per_mtok", pa.float64()),
        ("carbon_kg", pa.float64()),
        # second-generation engine (serving/paged.py)
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
            lat_pct=[{"ttft": s.ttft, "tpot": s.tpot, "e2e": s.e2e} for s in rec.stats],
            lat_sum_s=[
                {"ttft": s.ttft_sum_s, "tpot": s.tpot_sum_s, "e2e": s.e2e_sum_s} for s in rec.stats
            ],
            hist=[s.hist for s in rec.stats],
            prefix_hit_tokens=rec.prefix_hit_tokens[:H],
            preemptions=rec.preemptions[:H],
            recomputed_tokens=rec.recomputed_tokens[:H],
            kv_block_s=rec.kv_block_s[:H],
            kv_blocks=rec.kv_blocks,
        )


def _latency_columns(pods: list[PodSummary], H: int) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {
        f"{m}_p{int(q)}_s": [] for m in ("ttft", "tpot", "e2e") for q in LAT_PCTS
    }
    for h in range(H):
        with_data = [p for p in pods if p.lat_n[h] > 0]
        for m in ("ttft", "tpot", "e2e"):
            for q in LAT_PCTS:
                key = f"{m}_p{int(q)}_s"
                if not with_data:
                    cols[key].append(math.nan)
                elif len(with_data) == 1:  # exact percentiles of the one pod
                    cols[key].append(float(with_data[0].lat_pct[h][m].get(q, math.nan)))
                else:  # several pods: merge their log-histograms (bin width 0.46%)
                    hist = sum(p.hist[h][m] for p in with_data)
                    cols[key].append(hist_percentile(hist, q))
    return cols


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
    e_gpu = (
        g.idle_w * (powered - waking) + wake_w * waking + pw.standby_w * off + dyn_j
    ) / J_PER_KWH
    e_over = g.overhead_w_per_gpu * powered / J_PER_KWH
    e_it = e_gpu + e_over
    e_fac = e_it * pw.pue
    if sc.cost.hardware == "owned":
        per_gpu_h = (
            g.capex_usd / (sc.cost.amortization_years * 8760.0)
            + sc.cost.maintenance_usd_per_gpu_hour
        )
        hw_cost = np.full(H, total_gpus * per_gpu_h)
    else:
        hw_cost = g.rent_usd_per_gpu_hour * powered / 3600.0
    return {
        "powered_gpu_s": powered,
        "gpu_busy_s": busy_gpu_s,
        "energy_gpu_kwh": e_gpu,
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
    """:func:`energy_cost` of one pool of a disaggregated fleet (static pools: no waking or
    off time), from the pods' ``pools`` records."""
    assert rs.pools is not None
    spec = rs.pools.by_name()[name]
    prs = spec.rs
    H = len(price)

    def tot(key: str) -> np.ndarray:
        return scale * np.sum(
            [np.asarray(_pools(p)[name][key], dtype=np.float64) for p in pods], axis=0
        )

    zeros = np.zeros(H)
    return energy_cost(
        rs,
        prs.gpu,
        rs.scenario.fleet.pods * spec.replicas * prs.tp,
        tot("powered_gpu_s"),
        zeros,
        zeros,
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

    hod = [(hod0 + h) % 24 for h in range(H)]
    price_day = hourly_values(sc.cost.electricity_usd_per_kwh, 24)
    price = np.array([price_day[x] for x in hod])
    if rs.pools is not None:  # disaggregated: each pool priced with its own GPU, then summed
        parts = [pool_energy_cost(rs, name, pods, scale, price) for name in ("prefill", "decode")]
        powered = sum(p["powered_gpu_s"] for p in parts)
        busy_gpu_s = sum(p["gpu_busy_s"] for p in parts)
        e_gpu = sum(p["energy_gpu_kwh"] for p in parts)
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
        "gpus_powered_mean": powered / 3600.0,
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
        **_latency_columns(pods, H),
        "slo_attainment": slo,
        "wh_per_request": whpr,
        "usd_per_mtok": usd_mtok,
        "carbon_kg": carbon,
    }
    return pa.table({k: cols[k] for k in HOURLY_COLUMNS}, schema=HOURLY_SCHEMA)


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
    price = np.array([price_day[(hod0 + h) % 24] for h in range(H)])

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
            rows["gpus_powered_mean"].append(pw / 3600.0)
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
    return pa.table(rows, schema=POOLS_SCHEMA)
