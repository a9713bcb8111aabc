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

from fleetsim.config.scenario import Resolved, hourly_values
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

    powered = tot("powered_gpu_s")  # on + waking GPU-seconds
    waking = tot0("waking_gpu_s")
    off = tot0("off_gpu_s")
    busy_gpu_s = tot("busy_s") * rs.tp
    dyn_j = tot("dyn_j")
    g = rs.gpu
    pw = sc.power
    wake_w = g.idle_w if pw.wake_w is None else pw.wake_w
    e_gpu = (
        g.idle_w * (powered - waking) + wake_w * waking + pw.standby_w * off + dyn_j
    ) / J_PER_KWH
    e_over = g.overhead_w_per_gpu * powered / J_PER_KWH
    e_it = e_gpu + e_over
    e_fac = e_it * sc.power.pue
    hod = [(hod0 + h) % 24 for h in range(H)]
    price_day = hourly_values(sc.cost.electricity_usd_per_kwh, 24)
    price = np.array([price_day[x] for x in hod])
    e_cost = e_fac * price
    total_gpus = sc.fleet.pods * sc.fleet.replicas * rs.tp
    if sc.cost.hardware == "owned":
        per_gpu_h = (
            g.capex_usd / (sc.cost.amortization_years * 8760.0)
            + sc.cost.maintenance_usd_per_gpu_hour
        )
        hw_cost = np.full(H, total_gpus * per_gpu_h)
    else:
        hw_cost = g.rent_usd_per_gpu_hour * powered / 3600.0
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
