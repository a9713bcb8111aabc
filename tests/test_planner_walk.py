"""A capacity planner's walk through plan, sweep, report and compare (brief U40): what the
report shows (the energy split, the UTC hour of the worst hours, the SLO with its units) and
the one-line answers to the mistakes a planner makes on these paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMALL, merge, resolved

from fleetsim.apps.simulate import simulate

# the day starts at 22:00 UTC, so hour index and UTC hour of day differ; one replica schedules
# off in the second hour (standby and a cold start land in the GPU idle part)
SCEN = merge(
    SMALL,
    simulation={"hours": 3, "start_utc": "2026-03-01T22:00:00Z"},
    traffic={"requests_per_day": 60_000, "diurnal": "flat"},
    power={"pue": 1.25},
    slo={"ttft_s": 1.5, "tpot_s": 0.08},
    autoscaler={"policy": "schedule", "replicas_by_hour": [2] * 22 + [2, 1]},
)


@pytest.fixture(scope="module")
def day():
    return simulate(resolved(SCEN))


# -- the report ----------------------------------------------------------------------------------
def test_power_chart_parts_are_gpu_idle_dynamic_and_overhead_times_pue(day):
    from fleetsim.apps.report import _from_result, power_parts

    d = _from_result(day)
    c = d.cols
    parts = power_parts(c)
    assert [p[0] for p in parts] == [
        "GPU idle (x PUE)",
        "GPU dynamic (x PUE)",
        "node overhead (x PUE)",
    ]
    np.testing.assert_allclose(parts[0][2], c["energy_gpu_idle_kwh"] * 1.25, rtol=1e-12)
    np.testing.assert_allclose(parts[1][2], c["energy_gpu_dynamic_kwh"] * 1.25, rtol=1e-12)
    np.testing.assert_allclose(parts[2][2], c["energy_overhead_kwh"] * 1.25, rtol=1e-9)
    np.testing.assert_allclose(sum(p[2] for p in parts), c["energy_facility_kwh"], rtol=1e-12)
    # an hourly table of an older run, without the GPU split: one GPU part
    old = {k: v for k, v in c.items() if k not in ("energy_gpu_idle_kwh", "energy_gpu_dynamic_kwh")}
    parts = power_parts(old)
    assert [p[0] for p in parts] == ["GPUs (x PUE)", "node overhead (x PUE)"]
    np.testing.assert_allclose(parts[0][2], c["energy_gpu_kwh"] * 1.25, rtol=1e-12)


def test_power_chart_draws_the_three_parts(day, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fleetsim.apps.report import _from_result, _plot_power

    labels = []
    orig = plt.Axes.bar

    def spy(self, *a, **k):
        labels.append(k.get("label", ""))
        return orig(self, *a, **k)

    monkeypatch.setattr(plt.Axes, "bar", spy)
    d = _from_result(day)
    _plot_power(plt, d, d.cols)
    assert labels == ["GPU idle (x PUE)", "GPU dynamic (x PUE)", "node overhead (x PUE)"]


def test_latency_chart_slo_lines_carry_their_units(day, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fleetsim.apps.report import _from_result, _plot_latency

    labels = []
    orig = plt.Axes.axhline

    def spy(self, *a, **k):
        labels.append(k.get("label", ""))
        return orig(self, *a, **k)

    monkeypatch.setattr(plt.Axes, "axhline", spy)
    d = _from_result(day)
    _plot_latency(plt, d, d.cols, d.config["slo"])
    assert labels == ["SLO 1.5 s", "SLO 80 ms"]


def test_report_page_splits_the_energy_and_names_utc_hours(day, tmp_path):
    from fleetsim.apps.report import write_report

    write_report(tmp_path, result=day, flatten=False)
    md = (tmp_path / "report.md").read_text()
    rows = dict(
        ln.strip("| ").split(" | ", 1)
        for ln in md.splitlines()
        if ln.startswith("| ") and " | " in ln
    )
    t = day.totals
    assert rows["facility energy"] == (
        f"{t.energy_facility_kwh:,.2f} kWh = (GPU idle {t.energy_gpu_idle_kwh:,.2f} + GPU dynamic "
        f"{t.energy_gpu_dynamic_kwh:,.2f} + node overhead {t.energy_overhead_kwh:,.2f}) kWh "
        "x PUE 1.25"
    )
    assert rows["SLO attainment"].endswith("of requests with TTFT <= 1.5 s and TPOT <= 80 ms")
    ttft = day.hourly.column("ttft_p99_s").to_numpy()
    i = int(np.nanargmax(ttft))
    assert rows["worst hour's p99 TTFT"] == (
        f"{ttft[i]:.3f} s at {(22 + i) % 24:02d}:00 UTC (hour {i})"
    )
    peak = json.loads((tmp_path / "peak.json").read_text())
    assert (
        peak["peak_hour_utc"]
        == f"{(22 + peak['peak_hour']) % 24:02d}:00 UTC (hour {peak['peak_hour']})"
    )
