"""Pods and sampling: the P/k scale, the 95% interval from the spread between pods against the
exact all-pods total, and pods run as executor tasks giving the same table as in-process."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, merge, tables_equal

from fleetsim.apps.cli import main as cli_main
from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.results.accounting import hourly_table
from fleetsim.results.result import pod_confidence

P = 10
PODS = merge(
    SMALL,
    simulation={"hours": 1},
    fleet={"replicas": 1, "pods": P, "router": "round_robin"},
    traffic=dict(SMALL["traffic"], requests_per_day=24 * 300 * P),
)  # 300 per pod-hour


def _sum(t, col: str) -> float:
    return float(np.nansum(t.column(col).to_numpy()))


def test_sample_scales_by_pods_over_k():
    full = simulate(scenario_from_dict(PODS))
    part = simulate(scenario_from_dict(merge(PODS, fleet={"sample_pods": 4})))
    assert part.scale == P / 4 and [p.pod for p in part.pods] == [0, 1, 2, 3]
    for a, b in zip(part.pods, full.pods[:4]):  # the same pods, seeded by identity
        assert a.arrived == b.arrived and a.dyn_j == b.dyn_j
    rs = full.resolved
    four = hourly_table(rs, full.pods[:4])  # the four pods alone, unscaled
    assert math.isclose(part.totals.energy_facility_kwh, P / 4 * _sum(four, "energy_facility_kwh"))
    assert math.isclose(part.totals.energy_cost_usd, P / 4 * _sum(four, "energy_cost_usd"))
    # owned hardware is the whole fleet's, whatever is simulated
    assert math.isclose(part.totals.hardware_cost_usd, full.totals.hardware_cost_usd)
    assert abs(part.totals.requests_arrived - P / 4 * sum(sum(p.arrived) for p in part.pods)) <= 0.5
    # the interval is centred on the reported total
    for name in ("energy_facility_kwh", "total_cost_usd"):
        lo, hi = part.pod_ci[name]
        assert math.isclose((lo + hi) / 2, getattr(part.totals, name), rel_tol=1e-12)
        assert lo < getattr(part.totals, name) < hi


def test_all_pods_simulated_gives_an_exact_interval():
    full = simulate(scenario_from_dict(PODS))
    for name, (lo, hi) in full.pod_ci.items():
        assert math.isclose(lo, getattr(full.totals, name), rel_tol=1e-12)
        assert math.isclose(hi, getattr(full.totals, name), rel_tol=1e-12)


def test_interval_covers_the_all_pods_total_95_percent():
    """Coverage of the 95% interval from k = 4 of 10 pods against the exact total of all 10, over
    independent seeds. The t-interval with the finite population correction covers 95% (97% in
    200 seeds when this test was written): over 48 seeds at least 40 must cover (4 binomial
    standard deviations below 45.6). An interval that counted owned hardware once per pod, or
    missed the scale P, would almost never cover; one a few times too wide shows in the mean
    ratio of |error| to half-width (0.33 over 200 seeds; t with 3 df predicts about 0.3)."""
    k, seeds = 4, 48
    covered = {"energy_facility_kwh": 0, "total_cost_usd": 0}
    width_ratio = []
    for seed in range(seeds):
        d = merge(PODS, seed=1000 + seed, cost={"hardware": "owned"})
        sc = scenario_from_dict(d)
        rs = resolve(sc)
        full = simulate(rs)
        ci = pod_confidence(rs, full.pods[:k])
        for name in covered:
            lo, hi = ci[name]
            covered[name] += lo <= getattr(full.totals, name) <= hi
        # spread of the k-pod estimate around the truth vs the interval's half-width
        vals = [_sum(hourly_table(rs, [p], P), "energy_facility_kwh") for p in full.pods]
        est = float(np.mean(vals[:k]))
        lo, hi = ci["energy_facility_kwh"]
        width_ratio.append(abs(est - full.totals.energy_facility_kwh) / ((hi - lo) / 2))
    for name, c in covered.items():
        assert c >= 40, (name, c)
    # |error| / half-width: below 1 in 95% of cases, and not tiny on average (not over-wide)
    assert 0.2 < float(np.mean(width_ratio)) < 0.5


def test_pods_as_executor_tasks_match_in_process(tmp_path):
    """``fleetsim run --workers 2`` (pods in a process pool) writes the in-process table."""
    d = merge(PODS, fleet={"sample_pods": 3})
    scen = tmp_path / "s.toml"
    lines = [
        "name = 'pods'",
        f"seed = {d['seed']}",
        "[simulation]",
        "hours = 1",
        "[model]",
        "name = 'llama-3.1-8b'",
        "[fleet]",
        "replicas = 1",
        f"pods = {P}",
        "sample_pods = 3",
        "router = 'round_robin'",
        "[traffic]",
        f"requests_per_day = {d['traffic']['requests_per_day']}",
        "diurnal = 'flat'",
        "prompt = { dist = 'lognormal', median = 500, sigma = 0.8, min = 4, max = 4000 }",
        "output = { dist = 'lognormal', median = 100, sigma = 0.8, min = 1, max = 1000 }",
    ]
    scen.write_text("\n".join(lines) + "\n")
    assert (
        cli_main(["run", str(scen), "--workers", "2", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    )
    pooled = pq.read_table(tmp_path / "o" / "hourly.parquet")
    here = simulate(scenario_from_dict(d))
    assert tables_equal(pooled.select(here.hourly.schema.names), here.hourly)


@pytest.mark.slow
def test_interval_narrows_with_more_sampled_pods():
    """The half-width shrinks like sqrt((1 - k/P) / k) (the spread between pods is the same)."""
    full = simulate(
        scenario_from_dict(
            merge(
                PODS,
                fleet={"pods": 40, "replicas": 1},
                traffic=dict(PODS["traffic"], requests_per_day=24 * 300 * 40),
            )
        )
    )
    rs = full.resolved
    widths = {
        k: np.subtract(*pod_confidence(rs, full.pods[:k])["energy_facility_kwh"][::-1])
        for k in (4, 16, 40)
    }
    assert widths[40] == pytest.approx(0.0, abs=1e-9)
    assert widths[16] < widths[4]


def test_one_replica_least_loaded_is_routed_directly_and_identically(monkeypatch):
    """A static pod of one replica under least_loaded hands arrivals to the replica itself
    (router.direct()): the same tables, request for request, as through the router."""
    from types import SimpleNamespace

    from fleetsim.serving import routers
    from fleetsim.serving.pod import Pod

    one = SimpleNamespace(on_arrival=lambda r: None, outstanding=0)
    two = [SimpleNamespace(outstanding=0), SimpleNamespace(outstanding=0)]
    rng = np.random.default_rng(0)
    assert routers.LeastLoaded(SimpleNamespace(active=[one]), rng).direct() == one.on_arrival
    assert routers.LeastLoaded(SimpleNamespace(active=two), rng).direct() is None
    assert routers.RoundRobin(SimpleNamespace(active=[one]), rng).direct() is None
    sc = scenario_from_dict(
        merge(
            SMALL,
            simulation={"hours": 2},
            fleet={"replicas": 1, "router": "least_loaded"},
            traffic=dict(SMALL["traffic"], requests_per_day=24 * 2000),
        )
    )
    routed = []
    real_init = Pod.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        routed.append(self._route == self.replicas[0].on_arrival)

    monkeypatch.setattr(Pod, "__init__", spy)
    fast = simulate(sc)
    monkeypatch.setattr(routers.LeastLoaded, "direct", lambda self: None)
    slow = simulate(sc)
    assert routed == [True, False]
    assert fast.totals.requests_completed > 2000
    assert tables_equal(fast.hourly, slow.hourly)
    assert fast.totals == slow.totals
