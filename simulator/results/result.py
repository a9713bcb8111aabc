"""The outcome of one run: the hourly table, the pods' summaries, the day's totals and the
end-of-run invariants (conservation, finiteness, sums) that every run must pass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from fleetsim.base.errors import InvariantError
from fleetsim.base.version import __version__
from fleetsim.config.scenario import Resolved, Scenario
from fleetsim.results.accounting import PodSummary, hourly_table
from fleetsim.results.output import dumps
from fleetsim.serving.recorder import hist_percentile


@dataclass
class Result:
    """The outcome of one simulated run."""

    resolved: Resolved
    hourly: pa.Table
    pods: list[PodSummary]
    scale: float
    wall_s: float
    totals: dict[str, float] = field(default_factory=dict)
    day_latency: dict[str, float] = field(default_factory=dict)
    pod_ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def scenario(self) -> Scenario:
        return self.resolved.scenario

    def metadata(self, scenario_text: str = "") -> dict[str, str]:
        """Key-value metadata that makes an output file explain itself."""
        rs = self.resolved
        return {
            "fleetsim.version": __version__,
            "fleetsim.scenario_text": scenario_text,
            "fleetsim.config": rs.scenario.model_dump_json(),
            "fleetsim.resolved": dumps(
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
            "fleetsim.seed": str(rs.scenario.seed),
            "fleetsim.profile_id": rs.profile_id,
            "fleetsim.profile_sha256": rs.profile_sha256,
            "fleetsim.wall_s": f"{self.wall_s:.3f}",
            "fleetsim.totals": dumps(self.totals),
        }


def day_totals(res: Result) -> dict[str, float]:
    """Sums over the day of the hourly table, and the derived per-request figures."""
    t = res.hourly
    s = {
        c: float(np.nansum(t.column(c).to_numpy()))
        for c in (
            "requests_arrived",
            "requests_completed",
            "requests_rejected",
            "prompt_tokens",
            "output_tokens",
            "gpu_busy_s",
            "energy_gpu_kwh",
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
    }
    s["prefix_hit_rate"] = (
        s["prefix_hit_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
    )
    s["requests_in_flight"] = res.scale * sum(p.in_flight for p in res.pods)
    done = s["requests_completed"]
    s["wh_per_request"] = s["energy_facility_kwh"] * 1000 / done if done else math.nan
    s["usd_per_mtok"] = (
        s["total_cost_usd"] / s["output_tokens"] * 1e6 if s["output_tokens"] else math.nan
    )
    s["usd_per_1k_requests"] = s["total_cost_usd"] / done * 1000 if done else math.nan
    gpu_s = float(np.sum(t.column("gpus_powered_mean").to_numpy())) * 3600.0
    s["gpu_hours"] = gpu_s / 3600.0
    s["utilization"] = s["gpu_busy_s"] / gpu_s if gpu_s else 0.0
    cost = t.column("total_cost_usd").to_numpy()
    s["peak_hour"] = int(np.argmax(cost)) if len(cost) else 0
    s["iterations"] = float(sum(p.iterations for p in res.pods))
    s["events"] = float(sum(p.events for p in res.pods))
    ok = sum(sum(p.slo_ok) for p in res.pods)
    n = sum(sum(p.lat_n) for p in res.pods)
    s["slo_attainment"] = ok / n if n else math.nan
    return s


def day_latency(pods: list[PodSummary]) -> dict[str, float]:
    """Day-wide latency figures: means (exact) and p50/p99 (from log-histograms, +-0.23%)."""
    out: dict[str, float] = {}
    for m in ("ttft", "tpot", "e2e"):
        n = sum(
            p.lat_n_tpot[h] if m == "tpot" else p.lat_n[h] for p in pods for h in range(p.hours)
        )
        total = sum(p.lat_sum_s[h][m] for p in pods for h in range(p.hours))
        out[f"{m}_mean_s"] = total / n if n else math.nan
        hists = [p.hist[h][m] for p in pods for h in range(p.hours) if p.hist and p.hist[h]]
        if hists:
            hsum = sum(hists[1:], np.asarray(hists[0]))  # one bin array at a time: O(bins) memory
            out[f"{m}_p50_s"] = hist_percentile(hsum, 50)
            out[f"{m}_p99_s"] = hist_percentile(hsum, 99)
        else:
            out[f"{m}_p50_s"] = out[f"{m}_p99_s"] = math.nan
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
            [float(np.nansum(hourly_table(rs, [p], P).column(name).to_numpy())) for p in pods]
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
        v = t.column(col).to_numpy()
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise InvariantError(f"{col} is negative or not finite: {v.tolist()}")
    util = t.column("utilization").to_numpy()
    if np.any(util > 1 + 1e-9):
        raise InvariantError(f"utilization above 1: {util.max()}")
    for m in ("ttft", "tpot", "e2e"):
        p50 = t.column(f"{m}_p50_s").to_numpy()
        p99 = t.column(f"{m}_p99_s").to_numpy()
        bad = np.isfinite(p50) & np.isfinite(p99) & (p50 > p99 * (1 + 1e-12))
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
        return t.column(name).to_numpy().astype(np.float64)

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)

    extensive = (
        "requests_arrived",
        "requests_completed",
        "requests_rejected",
        "prompt_tokens",
        "output_tokens",
        "gpu_busy_s",
        "energy_gpu_kwh",
        "energy_overhead_kwh",
        "energy_it_kwh",
        "energy_facility_kwh",
        "energy_cost_usd",
        "hardware_cost_usd",
        "total_cost_usd",
        "carbon_kg",
    )
    for name in (n for n in extensive if n in res.totals):
        if not close(res.totals[name], float(np.nansum(col(name)))):
            raise InvariantError(
                f"hourly sums != day totals: sum of {name} is "
                f"{float(np.nansum(col(name)))!r}, the day's total {res.totals[name]!r}"
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
        ("total_cost_usd", ("energy_cost_usd", "hardware_cost_usd")),
    ):
        lhs, rhs = col(total), sum(col(c) for c in parts)
        bad = ~np.isclose(lhs, rhs, rtol=1e-9, atol=1e-12)
        if np.any(bad):
            raise InvariantError(
                f"{total} != {' + '.join(parts)} in hours {np.nonzero(bad)[0].tolist()}"
            )
