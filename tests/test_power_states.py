"""Power states and autoscalers: exact energy and cost of off, waking and on GPUs; cold starts
delay service; the schedule powers what it says; the reactive policy follows the load; and
time-of-use prices and carbon intensities are read at the UTC hour of day."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import ListSink, merge, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.base.errors import ScenarioError

J_PER_KWH = 3.6e6


def _col(res, name):
    return res.hourly.column(name).to_numpy()


def _idle_fleet(small, sched, policy="schedule", **extra):
    """Zero traffic, TP2 replicas of an 8B model, powered by a schedule."""
    d = merge(
        small,
        simulation={"hours": len(sched)},
        fleet={"replicas": 3, "tensor_parallel": 2},
        traffic={"requests_per_day": 0},
        autoscaler={"policy": policy, "replicas_by_hour": (sched * 24)[:24]},
        **extra,
    )
    rs = resolved(d)
    return rs, simulate(rs)


def test_off_replica_draws_only_standby_and_no_overhead(small):
    rs, res = _idle_fleet(small, [3, 1], power={"wake_s": 0.0, "standby_w": 7.5, "pue": 1.3})
    g, tp = rs.gpu, 2
    for h, on in enumerate([3, 1]):
        off = 3 - on
        gpu_kwh = (g.idle_w * on + 7.5 * off) * tp * 3600 / J_PER_KWH
        over_kwh = g.host_idle_w_per_gpu * on * tp * 3600 / J_PER_KWH  # idle host: no traffic
        assert _col(res, "energy_gpu_kwh")[h] == pytest.approx(gpu_kwh, rel=1e-12)
        assert _col(res, "energy_overhead_kwh")[h] == pytest.approx(over_kwh, rel=1e-12)
        assert _col(res, "energy_facility_kwh")[h] == pytest.approx(
            (gpu_kwh + over_kwh) * 1.3, rel=1e-12
        )
        assert _col(res, "gpus_powered_mean")[h] == on * tp


def test_cold_start_costs_its_energy(small):
    # hour 0: one replica on, a second one pre-warms during the last 100 s; hour 1: two on
    rs, res = _idle_fleet(small, [1, 2], power={"wake_s": 100.0, "wake_w": 250.0, "standby_w": 5.0})
    g, tp = rs.gpu, 2
    waking_s, off_s = 100.0, 3600.0 - 100.0
    gpu0 = (g.idle_w * 3600 + 250.0 * waking_s + 5.0 * (off_s + 3600)) * tp / J_PER_KWH
    over0 = g.host_idle_w_per_gpu * (3600 + waking_s) * tp / J_PER_KWH
    assert _col(res, "energy_gpu_kwh")[0] == pytest.approx(gpu0, rel=1e-12)
    assert _col(res, "energy_overhead_kwh")[0] == pytest.approx(over0, rel=1e-12)
    assert _col(res, "gpus_powered_mean")[0] == pytest.approx(
        (3600 + waking_s) * tp / 3600, rel=1e-12
    )
    # the wake's own energy: what hour 0 costs beyond a fleet that stays at one replica
    _, flat = _idle_fleet(small, [1, 1], power={"wake_s": 100.0, "wake_w": 250.0, "standby_w": 5.0})
    extra_kwh = _col(res, "energy_gpu_kwh")[0] - _col(flat, "energy_gpu_kwh")[0]
    assert extra_kwh == pytest.approx((250.0 - 5.0) * 100.0 * tp / J_PER_KWH, rel=1e-9)


def test_schedule_powers_exactly_replicas_by_hour(small):
    sched = [2, 0, 3, 1, 3, 3]
    _rs, res = _idle_fleet(small, sched, power={"wake_s": 0.0})
    np.testing.assert_array_equal(_col(res, "gpus_powered_mean"), np.array(sched) * 2.0)
    # with a cold start, pre-warming adds wake_s of the replicas that come up to the hour before
    _rs, res = _idle_fleet(small, sched, power={"wake_s": 90.0})
    up = [max(sched[h + 1] - sched[h], 0) if h + 1 < len(sched) else 0 for h in range(len(sched))]
    want = [(s * 3600 + u * 90.0) * 2 / 3600 for s, u in zip(sched, up)]
    np.testing.assert_allclose(_col(res, "gpus_powered_mean"), want, rtol=1e-12)


def test_rented_cost_follows_powered_hours_owned_does_not(small):
    sched = [3, 1, 0, 2]
    costs = {}
    for hw in ("rented", "owned"):
        for policy in ("schedule", "static"):
            rs, res = _idle_fleet(
                small, sched, policy, cost={"hardware": hw}, power={"wake_s": 0.0}
            )
            costs[hw, policy] = _col(res, "hardware_cost_usd")
    g = rs.gpu
    np.testing.assert_allclose(
        costs["rented", "schedule"], np.array(sched) * 2 * g.rent_usd_per_gpu_hour, rtol=1e-12
    )
    np.testing.assert_allclose(
        costs["rented", "static"], np.full(4, 3 * 2 * g.rent_usd_per_gpu_hour), rtol=1e-12
    )
    per_h = 3 * 2 * g.capex_usd / (5.0 * 8760)
    np.testing.assert_allclose(costs["owned", "schedule"], np.full(4, per_h), rtol=1e-12)
    np.testing.assert_array_equal(costs["owned", "schedule"], costs["owned", "static"])


def test_cold_start_delays_service(small):
    """Scale from zero: nothing serves until the replica is up, wake_s after the first arrival."""
    wake = 45.0
    d = merge(
        small,
        simulation={"hours": 1},
        fleet={"replicas": 2},
        traffic={"requests_per_day": 40_000},
        power={"wake_s": wake},
        autoscaler={
            "policy": "reactive",
            "min_replicas": 0,
            "initial_replicas": 0,
            "target_requests_per_replica": 1000,
            "idle_timeout_s": 3600,
        },
    )
    sink = ListSink()
    res = simulate(resolved(d), request_sink=sink)
    rows = sorted(sink.rows.values())
    t_up = rows[0][0] + wake  # the first arrival wakes one replica
    early = [r for r in rows if r[0] < t_up]
    assert len(early) >= 5  # about 0.46/s x 45 s = 21 expected
    for arr, _rep, _p, _o, first, _fin, _status in early:
        assert first >= t_up - 1e-9, (arr, first, t_up)
        assert first - arr >= t_up - arr
    # it powered exactly one replica from the first arrival on, the other stayed off
    p = res.pods[0]
    assert p.waking_gpu_s[0] == pytest.approx(wake, rel=1e-12)
    assert p.powered_gpu_s[0] == pytest.approx(3600 - rows[0][0], rel=1e-12)
    assert p.off_gpu_s[0] == pytest.approx(3600 + rows[0][0], rel=1e-12)


def test_reactive_scales_up_under_load_and_down_when_idle(small):
    # hours 0 and 2 without traffic, hour 1 heavy: the whole day's 40,000 requests (11 req/s)
    diurnal = [0.0] * 24
    diurnal[1] = 1.0
    d = merge(
        small,
        simulation={"hours": 3},
        # the eager stack's step times: the bounds below assume the replicas stay loaded to the
        # end of hour 1 (vllm-v1's faster steps drain the queue sooner, so the autoscaler's
        # scale-down starts earlier; the idle-timeout rule itself is what this test holds)
        fleet={"replicas": 4, "router": "least_loaded", "serving_stack": "eager"},
        traffic={"requests_per_day": 40_000, "diurnal": diurnal},
        power={"wake_s": 30.0},
        autoscaler={
            "policy": "reactive",
            "min_replicas": 1,
            "initial_replicas": 1,
            "target_requests_per_replica": 6,
            "interval_s": 10,
            "idle_timeout_s": 300,
        },
    )
    res = simulate(resolved(d))
    on = _col(res, "gpus_powered_mean")
    assert on[0] == 1.0  # nothing happened: one replica, exactly
    assert on[1] > 2.5  # the load woke more
    # ... and the three extra ones went off after the idle timeout (300 s) and a tick or two
    assert 1.0 <= on[2] <= 1.0 + 3 * (300 + 2 * 10) / 3600
    assert on[2] > 1.0 + 3 * 250 / 3600  # not before the idle timeout
    assert res.totals.requests_completed > 39_000
    assert res.totals.slo_attainment > 0.9


def test_tariff_and_carbon_follow_utc_hour_of_day(small):
    price = [0.10 + 0.01 * h for h in range(24)]
    carbon = [0.30 + 0.02 * h for h in range(24)]
    d = merge(
        small,
        simulation={"hours": 4, "start_utc": "2026-03-01T21:00:00Z"},
        cost={"electricity_usd_per_kwh": price, "carbon_kg_per_kwh": carbon},
    )
    res = simulate(resolved(d))
    hod = [21, 22, 23, 0]
    np.testing.assert_allclose(_col(res, "price_usd_per_kwh"), [price[x] for x in hod], rtol=0)
    fac = _col(res, "energy_facility_kwh")
    np.testing.assert_allclose(
        _col(res, "energy_cost_usd"), fac * [price[x] for x in hod], rtol=1e-12
    )
    np.testing.assert_allclose(_col(res, "carbon_kg"), fac * [carbon[x] for x in hod], rtol=1e-12)
    assert res.totals.carbon_kg == pytest.approx(
        float(np.sum(fac * [carbon[x] for x in hod])), rel=1e-12
    )


def test_schedule_file_and_errors(small, tmp_path):
    f = tmp_path / "plan.json"
    f.write_text(
        json.dumps({"gpu": "h100-sxm", "tensor_parallel": 2, "replicas_by_hour": [1, 2] * 12})
    )
    base = merge(small, fleet={"replicas": 2, "tensor_parallel": 2})
    rs = resolved(merge(base, autoscaler={"policy": "schedule", "schedule_file": str(f)}))
    assert rs.replicas_by_hour == (1, 2) * 12
    bad = [
        ({"policy": "schedule"}, "exactly one"),
        ({"policy": "schedule", "replicas_by_hour": [3] * 24}, "fleet.replicas >= 3"),
        ({"policy": "schedule", "schedule_file": str(tmp_path / "nope.json")}, "no such file"),
        ({"policy": "reactive", "max_replicas": 5}, "set it <= 2"),
        ({"policy": "reactive", "min_replicas": 2, "max_replicas": 1}, "above max_replicas"),
    ]
    for section, text in bad:
        with pytest.raises(ScenarioError, match=text):
            resolved(merge(base, autoscaler=section))
    with pytest.raises(ScenarioError, match="tensor_parallel"):
        resolved(
            merge(
                base,
                fleet={"tensor_parallel": 1},
                autoscaler={"policy": "schedule", "schedule_file": str(f)},
            )
        )
    assert math.isfinite(rs.hourly_rate_per_s[0])
