"""Long runs: memory does not grow with the number of simulated days.

Each run happens in a fresh subprocess that reports its peak resident set (``ru_maxrss``) and the
resident set before the simulation (after imports). The simulation's own footprint is the
difference; a run of D days at the same hourly rate must not need more memory than one day,
apart from the per-hour summaries (~20 kB per pod-hour).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import json, resource, sys, time
sys.path.insert(0, {tests!r})
from conftest import SMALL, merge
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.apps.simulate import simulate
d = merge(SMALL, simulation={{"hours": 24 * {days}}},
          traffic={{"requests_per_day": {rpd}, "diurnal": "azure-conv"}})
rs = resolve(scenario_from_dict(d))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = simulate(rs)
print(json.dumps({{"before_kb": before,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "wall_s": time.perf_counter() - t0,
                  "arrived": res.totals.requests_arrived}}))
"""


def _run(days: int, rpd: float) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=str(TESTS), days=days, rpd=rpd)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _compare(short_days: int, long_days: int, rpd: float, tol: float) -> tuple[dict, dict]:
    a, b = _run(short_days, rpd), _run(long_days, rpd)
    print(
        f"\n{short_days}-day: peak RSS {a['peak_kb'] / 1024:.1f} MiB ({a['wall_s']:.1f} s, "
        f"{a['arrived']:.0f} requests); {long_days}-day: peak RSS {b['peak_kb'] / 1024:.1f} MiB "
        f"({b['wall_s']:.1f} s, {b['arrived']:.0f} requests)"
    )
    # the same traffic per day: the long run really simulated long_days days of it
    ratio = b["arrived"] / a["arrived"]
    assert abs(ratio - long_days / short_days) < 0.05 * long_days / short_days
    # peak memory: within tol of the short run's (whole process, imports included)
    assert b["peak_kb"] <= a["peak_kb"] * (1 + tol), (a, b)
    return a, b


def test_three_days_need_no_more_memory_than_one():
    _compare(1, 3, 20_000, tol=0.05)  # dense hourly histograms used to add ~10% here


@pytest.mark.slow
def test_a_week_needs_no_more_memory_than_a_day():
    _a, b = _compare(1, 7, 100_000, tol=0.05)
    assert b["wall_s"] < 60
