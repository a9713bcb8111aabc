"""The outcome of one run: the hourly table, the pods' summaries, the day's totals and the
end-of-run invariants (conservation, finiteness, sums) that every run must pass."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa

from fleetsim.base.errors import InvariantError
from fleetsim.base.units import HOUR_S
from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import Scenario
from fleetsim.results.accounting import PodSummary, hourly_table
from fleetsim.results.arrow import to_numpy
from fleetsim.results.output import dumps
from fleetsim.results.provenance import provenance
from fleetsim.serving.recorder import LAT_METRICS, LAT_PCTS, hist_percentile

# the hourly columns whose day total is their sum (day_totals; _check_sums holds them to it)
SUMMED_COLUMNS = (
    "requests_arrived",
    "requests_completed",
    "requests_rejected",
    "prompt_tokens",
    "output_tokens",
    "gpu_busy_s",
    "energy_gpu_kwh",
    "energy_gpu_idle_kwh",
    "energy_gpu_dynamic_kwh",
    "energy_overhead_kwh",
    "energy_it_kwh",
    "energy_facility_kwh",
    "energy_cost_usd",
    "hardware_cost_usd",
    "total_cost_usd",
    "carbon_kg",
    "prefix_hit_tokens",
    "preemptions",
    "recomputed_tokens",
)


@dataclass(frozen=True, slots=True)
class DayTotals:
    """The day's totals of a run: sums of the hourly table's columns over the horizon, and the
    figures derived from them. Written into every output's metadata (``fleetsim.totals``, the
    fields in this order, by :meth:`as_dict`)."""

    requests_arrived: float
    requests_completed: float
    requests_rejected: float
    prompt_tokens: float
    output_tokens: float
    gpu_busy_s: float
    energy_gpu_kwh: float
    energy_overhead_kwh: float
    energy_it_kwh: float
    energy_facility_kwh: float
    energy_cost_usd: float
    hardware_cost_usd: float
    total_cost_usd: float
    carbon_kg: float
    requests_in_flight: float  # at the horizon (scaled to the fleet)
    wh_per_request: float  # facility energy per completed request
    usd_per_mtok: float  # total cost per million output tokens
    usd_per_1k_requests: float
    gpu_hours: float  # powered GPU-hours
    utilization: float  # busy share of the powered GPU time
    peak_hour: int  # the hour of the highest total cost
    iterations: float  # engine iterations simulated (the simulated pods only)
    events: float  # SimPy events scheduled (the simulated pods only)
    slo_attainment: float  # share of completed requests meeting both TTFT and TPOT targets
    energy_gpu_idle_kwh: float = math.nan  # static draw: idle while on, wake, standby
    energy_gpu_dynamic_kwh: float = math.nan  # the iterations' dynamic energy
    request_throughput_per_s: float = math.nan  # completed requests per second of the horizon
    output_throughput_tokens_per_s: float = math.nan
    batch_occupancy: float = math.nan  # mean sequences per iteration / max_num_seqs
    flops_utilization: float = math.nan  # achieved FLOP/s / peak of the powered GPUs
    bandwidth_utilization: float = math.nan  # achieved bytes/s / peak of the powered GPUs
    # the paged KV policy (serving/kv_paged.py)
    prefix_hit_tokens: float = 0.0  # prompt tokens served from the prefix cache
    preemptions: float = 0.0
    recomputed_tokens: float = 0.0  # prefill tokens computed again after a preemption
    prefix_hit_rate: float = 0.0  # prefix_hit_tokens / prompt_tokens

    def as_dict(self) -> dict[str, float]:
        """The totals as a plain dict, for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> DayTotals:
        """Totals read back from a file's metadata: a figure that is missing or not a number
        there is NaN (``peak_hour``: -1), and unknown keys are ignored."""
        vals: dict[str, float] = {}
        for f in fields(cls):
            v = d.get(f.name)
            vals[f.name] = (
                float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
            )
        peak = vals.pop("peak_hour")
        return cls(peak_hour=int(peak) if math.isfinite(peak) else -1, **vals)


@dataclass
class Result:
    """The outcome of one simulated run."""

    resolved: Resolved
    hourly: pa.Table
    pods: list[PodSummary]
    scale: float
    wall_s: float
    totals: DayTotals
    day_latency: dict[str, float] = field(default_factory=dict)
    pod_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    pools: pa.Table | None = None  # disaggregated fleets: one row per (hour, pool)

    @property
    def scenario(self) -> Scenario:
        return self.resolved.scenario

    def metadata(self, scenario_text: str = "") -> dict[str, str]:
        """Key-value metadata that makes an output file explain itself."""
        rs = self.resolved
        return provenance(
            rs,
            scenario_text,
            resolved=dumps(
                {
                    "model": asdict(rs.model),
                    "gpu": asdict(rs.gpu),
                    "tensor_parallel": rs.tp,
                    "kv_capacity_tokens": rs.kv_capacity_tokens,
                    "hourly_rate_per_s": rs.hourly_rate_per_s,
                    "scale": self.scale,
                    "pods_simulated": [p.pod for p in self.pods],
                }
            ),
            wall_s=f"{self.wall_s:.3f}",
            totals=dumps(self.totals.as_dict()),
            latency=dumps(self.day_latency),
            vllm=dumps(self.vllm()),
            # the 95% interval over the simulated pods (a sampled fleet; the report shows it)
            **(
                {"pod_ci95": dumps({k: list(v) for k, v in self.pod_ci.items()})}
                if self.pod_ci
                else {}
            ),
        )

    def vllm(self) -> dict:
        """The run in the keys and units of vLLM's benchmark_serving result
        (:mod:`fleetsim.results.vllm`)."""
        from fleetsim.results.vllm import vllm_result

        return vllm_result(self)


def day_totals(rs: Resolved, hourly: pa.Table, pods: list[PodSummary], scale: float) -> DayTotals:
    """Sums over the day of the hourly table, and the derived per-request figures."""
    t = hourly
    s: dict[str, float] = {c: float(np.nansum(to_numpy(t.column(c)))) for c in SUMMED_COLUMNS}
    s["prefix_hit_rate"] = (
        s["prefix_hit_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
    )
    if t.column("carbon_kg").null_count == t.num_rows:  # no grid intensity given: unknown
        s["carbon_kg"] = math.nan
    s["requests_in_flight"] = scale * sum(p.in_flight for p in pods)
    done = s["requests_completed"]
    s["wh_per_request"] = s["energy_facility_kwh"] * 1000 / done if done else math.nan
    s["usd_per_mtok"] = (
        s["total_cost_usd"] / s["output_tokens"] * 1e6 if s["output_tokens"] else math.nan
    )
    s["usd_per_1k_requests"] = s["total_cost_usd"] / done * 1000 if done else math.nan
    gpu_s = float(np.sum(to_numpy(t.column("gpus_powered_mean")))) * HOUR_S
    s["gpu_hours"] = gpu_s / HOUR_S
    s["utilization"] = s["gpu_busy_s"] / gpu_s if gpu_s else 0.0
    cost = to_numpy(t.column("total_cost_usd"))
    peak_hour = int(np.argmax(cost)) if len(cost) else 0
    s["iterations"] = float(sum(p.iterations for p in pods))
    s["events"] = float(sum(p.events for p in pods))
    ok = sum(sum(p.slo_ok) for p in pods)
    n = sum(sum(p.lat_n) for p in pods)
    secs = HOUR_S * t.num_rows
    s["request_throughput_per_s"] = done / secs if secs else math.nan
    s["output_throughput_tokens_per_s"] = s["output_tokens"] / secs if secs else math.nan
    it = float(np.sum(to_numpy(t.column("iterations"))))
    mb = rs.scenario.fleet.max_batch_size
    s["batch_occupancy"] = s["output_tokens"] / it / mb if it else math.nan
    g = to_numpy(t.column("gpus_powered_mean"))
    for name in ("flops_utilization", "bandwidth_utilization"):  # weighted by powered GPUs
        u = np.nan_to_num(to_numpy(t.column(name)))
        s[name] = float(np.sum(u * g) / np.sum(g)) if np.sum(g) else math.nan
    s["slo_attainment"] = ok / n if n else math.nan
    return DayTotals(peak_hour=peak_hour, **s)


def day_latency(pods: list[PodSummary]) -> dict[str, float]:
    """Day-wide latency figures of TTFT, TPOT, ITL and e2e: means (exact) and p50/p90/p95/p99
    (from log-histograms, +-0.23%)."""
    from fleetsim.results.accounting import lat_count

    out: dict[str, float] = {}
    for m in LAT_METRICS:
        n = sum(lat_count(p, h, m) for p in pods for h in range(p.hours))
        total = sum(p.lat_sum_s[h].get(m, 0.0) for p in pods for h in range(p.hours))
        out[f"{m}_mean_s"] = total / n if n else math.nan
        hists = [d[m] for p in pods if p.hist for d in p.hist if d]
        hsum = sum(hists[1:], np.asarray(hists[0])) if hists else None  # O(bins) memory
        for q in LAT_PCTS:
            out[f"{m}_p{int(q)}_s"] = hist_percentile(hsum, q) if hsum is not None else math.nan
    return out


def pod_confidence(rs: Resolved, pods: list[PodSummary]) -> dict[str, tuple[float, float]]:
    """95% confidence intervals of the fleet's daily energy and cost from the spread between
    the simulated pods.

    Pods are exchangeable (iid seeds, identical configuration), so the k simulated pods are a
    simple random sample of the P pods. Let ``y_i`` be pod i's fleet total estimated from pod i
    alone (``hourly_table(rs, [pod i], scale=P)``: extensive figures x P, fixed costs such as
    owned hardware counted once). The estimate of the total is their mean (it equals the run's
    total) and the unsimulated pods add the prediction error of a finite population total:
    ``Var = P^2 s^2 / k x (1 - k/P)`` with ``s`` the spread of one pod's figure; so the
    standard error of the mean of ``y_i`` takes the finite population correction
    ``sqrt(1 - k/P)`` (the interval is exact, of zero width, when every pod is simulated), and
    the interval uses Student's t with k - 1 degrees of freedom."""
    from scipy import stats

    P = rs.scenario.fleet.pods
    k = len(pods)
    out = {}
    for name in ("energy_facility_kwh", "total_cost_usd"):
        vals = np.array(
            [float(np.nansum(to_numpy(hourly_table(rs, [p], P).column(name)))) for p in pods]
        )
        mean = float(vals.mean())
        se = float(vals.std(ddof=1)) / math.sqrt(k) * math.sqrt(max(0.0, 1 - k / P))
        half = float(stats.t.ppf(0.975, k - 1)) * se
        out[name] = (mean - half, mean + half)
    return out


def check_invariants(res: Result) -> None:
    """Conservation, finiteness and ordering checks at the end of every run. A violation is
    a bug: it raises InvariantError naming the invariant, and nothing is written."""
    for p in res.pods:
        a, c, r = sum(p.arrived), sum(p.completed), sum(p.rejected)
        if a != c + r + p.in_flight:
            raise InvariantError(
                f"request conservation failed in pod {p.pod}: arrived {a} != "
                f"completed {c} + rejected {r} + in flight {p.in_flight}"
            )
    t = res.hourly
    for col in (
        "energy_gpu_kwh",
        "energy_overhead_kwh",
        "energy_it_kwh",
        "energy_facility_kwh",
        "energy_cost_usd",
        "hardware_cost_usd",
        "total_cost_usd",
        "gpu_busy_s",
    ):
        v = to_numpy(t.column(col))
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise InvariantError(f"{col} is negative or not finite: {v.tolist()}")
    util = to_numpy(t.column("utilization"))
    if np.any(util > 1 + 1e-9):
        raise InvariantError(f"utilization above 1: {util.max()}")
    for m in LAT_METRICS:
        for lo_q, hi_q in itertools.pairwise(LAT_PCTS):
            lo = to_numpy(t.column(f"{m}_p{int(lo_q)}_s"))
            hi = to_numpy(t.column(f"{m}_p{int(hi_q)}_s"))
            bad = np.isfinite(lo) & np.isfinite(hi) & (lo > hi * (1 + 1e-12))
            if np.any(bad):
                raise InvariantError(
                    f"{m} percentiles out of order in hours {np.nonzero(bad)[0].tolist()}"
                )
    _check_sums(res)


def _check_sums(res: Result) -> None:
    """The hourly rows add up: to the day's totals, to the pods' own counters (computed apart
    from the table), and across the energy and cost columns of every hour."""
    t, rs = res.hourly, res.resolved
    H = rs.scenario.simulation.hours
    if t.num_rows != H:
        raise InvariantError(f"hourly table has {t.num_rows} rows, expected {H} (one per hour)")

    def col(name: str) -> np.ndarray:
        return to_numpy(t.column(name)).astype(np.float64)

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)

    for name in SUMMED_COLUMNS:
        total = getattr(res.totals, name)
        if math.isnan(total) and t.column(name).null_count == t.num_rows:
            continue  # unknown all day (carbon without a grid intensity)
        if not close(total, float(np.nansum(col(name)))):
            raise InvariantError(
                f"hourly sums != day totals: sum of {name} is "
                f"{float(np.nansum(col(name)))!r}, the day's total {total!r}"
            )
    # counts: each hour is rounded after scaling by pods/sample_pods, so allow 0.5 per hour then
    slack = 0.0 if res.scale == 1 else 0.5 * H
    for name, attr in (
        ("requests_arrived", "arrived"),
        ("requests_completed", "completed"),
        ("requests_rejected", "rejected"),
        ("prompt_tokens", "prompt_tokens"),
        ("output_tokens", "output_tokens"),
    ):
        pods = res.scale * sum(sum(getattr(p, attr)) for p in res.pods)
        if abs(float(col(name).sum()) - pods) > slack + 1e-6 * pods:
            raise InvariantError(
                f"hourly sums != pod counters: sum of {name} is "
                f"{float(col(name).sum())!r}, the pods counted {pods!r}"
            )
    for total, parts in (
        ("energy_it_kwh", ("energy_gpu_kwh", "energy_overhead_kwh")),
        ("energy_gpu_kwh", ("energy_gpu_idle_kwh", "energy_gpu_dynamic_kwh")),
        ("total_cost_usd", ("energy_cost_usd", "hardware_cost_usd")),
    ):
        lhs, rhs = col(total), sum(col(c) for c in parts)
        bad = ~np.isclose(lhs, rhs, rtol=1e-9, atol=1e-12)
        if np.any(bad):
            raise InvariantError(
                f"{total} != {' + '.join(parts)} in hours {np.nonzero(bad)[0].tolist()}"
            )
