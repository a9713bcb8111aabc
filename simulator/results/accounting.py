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
from fleetsim.serving.recorder import LAT_METRICS, LAT_PCTS, Recorder, hist_percentile

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
            for q in LAT_PCTS:
                key = f"{m}_p{int(q)}_s"
                if not with_data or not n:
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
    # static draw (idle while on, wake, standby while off) and the iterations' dynamic energy
    e_gpu_idle = (g.idle_w * (powered - waking) + wake_w * waking + pw.standby_w * off) / J_PER_KWH
    e_gpu_dyn = dyn_j / J_PER_KWH
    e_gpu = e_gpu_idle + e_gpu_dyn
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
    iters = tot0("iters_h")
    prof = rs.profile
    with np.errstate(invalid="ignore", divide="ignore"):
        # mean sequences per iteration (each yields one token) against max_num_seqs
        occupancy = np.where(iters > 0, output / np.maximum(iters, 1), np.nan) / (
            sc.fleet.max_batch_size
        )
        # achieved FLOP/s and bytes/s of the powered GPUs against their peak
        flops_util = np.where(powered > 0, tot0("flops") / (prof.peak_flops * powered), np.nan)
        bw_util = np.where(
            powered > 0, tot0("bytes_moved") / (prof.mem_bw_bytes_per_s * powered), np.nan
        )
    carbon_day = hourly_values(sc.cost.carbon_kg_per_kwh, 24)
    carbon = (
        e_fac * np.array([carbon_day[x] for x in hod])
        if carbon_day is not None
        else np.full(H, np.nan)
    )
    cols = {
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
        "energy_gpu_idle_kwh": e_gpu_idle,
        "energy_gpu_dynamic_kwh": e_gpu_dyn,
        "iterations": np.rint(iters).astype(np.int64),
        "batch_occupancy": occupancy,
        "flops_utilization": flops_util,
        "bandwidth_utilization": bw_util,
        "request_throughput_per_s": completed / 3600.0,
        "output_throughput_tokens_per_s": output / 3600.0,
        **_latency_columns(pods, H),
        "slo_attainment": slo,
        "wh_per_request": whpr,
        "usd_per_mtok": usd_mtok,
        "carbon_kg": carbon,
    }
    # no grid intensity: carbon is unknown, null (not NaN, which SQL engines would sum to NaN)
    cols["carbon_kg"] = pa.array(carbon, type=pa.float64(), from_pandas=True)
    return pa.table({k: cols[k] for k in HOURLY_COLUMNS}, schema=HOURLY_SCHEMA)
