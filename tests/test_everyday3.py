"""Everyday use, third walk (w45): the run summary's hours say what ranks them, ``fleetsim
latency`` says how mxfp4 experts are timed, and the FinOps walk of sweep / crossover / compare /
report (the sweep's unfit points: tests/test_plan_sweep.py)."""

from __future__ import annotations

import io

from conftest import SMALL, merge
from rich.console import Console

from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

#: a flat three hours at 48,000 requests a day, with electricity at $0.50/kWh in hour 2 and
#: $0.10 otherwise: hour 1 has the most arrivals (2,022 with seed 7), hour 2 the highest cost
TOU = [0.1, 0.1, 0.5] + [0.1] * 21
FLAT3 = merge(
    SMALL,
    simulation={"hours": 3},
    traffic=dict(SMALL["traffic"], requests_per_day=48_000),
    cost={"electricity_usd_per_kwh": TOU},
)


def _wide() -> Console:
    return Console(file=io.StringIO(), width=400, color_system=None)


def test_summary_says_the_busiest_hour_is_by_arrivals_and_the_peak_hour_by_cost():
    from fleetsim.results.summary import print_summary

    res = simulate(resolve(scenario_from_dict(FLAT3)))
    arrived = res.hourly.column("requests_arrived").to_pylist()
    cost = res.hourly.column("total_cost_usd").to_pylist()
    assert arrived.index(max(arrived)) == 1 and max(arrived) == 2_022
    assert res.totals.peak_hour == 2 == cost.index(max(cost))
    c = _wide()
    print_summary(res, c)
    lines = c.file.getvalue().splitlines()
    load = next(ln for ln in lines if ln.startswith("peak-hour load"))
    assert "the busiest hour by arrivals (01:00 UTC, 2,022 requests) used" in load
    peak = " ".join(next(ln for ln in lines if ln.startswith("peak hour ")).split())
    share = cost[2] / sum(cost)
    assert peak == (
        f"peak hour 02:00 UTC (hour 2) the costliest hour: $ {cost[2]:,.2f} = {share:.1%} of "
        f"the day; {arrived[2]:,} requests; p99 TTFT "
        f"{res.hourly.column('ttft_p99_s')[2].as_py():.3f} s; the busiest hour by arrivals is "
        "01:00 UTC (2,022 requests)"
    )
    assert f"$ {cost[2]:,.2f}" == "$ 2.20" and f"{share:.1%}" == "37.1%"
    occ = next(ln for ln in lines if ln.startswith("batch occupancy"))
    assert "; highest hourly mean " in occ and "busiest" not in occ
    # a flat price: the costliest hour is the busiest, and the row names it once
    res = simulate(resolve(scenario_from_dict({k: v for k, v in FLAT3.items() if k != "cost"})))
    assert res.totals.peak_hour == 1
    c = _wide()
    print_summary(res, c)
    peak = next(ln for ln in c.file.getvalue().splitlines() if ln.startswith("peak hour "))
    assert "01:00 UTC (hour 1)" in peak and "by arrivals" not in peak
