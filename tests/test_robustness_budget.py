"""Budgets cover every way of making work (issue #23, high 2 and 3).

Long numpy draws are chunked (so SIGINT and SIGTERM are honoured within a second, and chunking
changes no value); ``check_work`` counts a timed trace's arrivals per pod-hour (CSV and JSONL)
and sessions x turns before anything is generated.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fleetsim.workload import distributions as dist


@pytest.mark.parametrize(
    "d",
    [
        dist.Uniform(dist="uniform", low=1, high=2000),
        dist.LogNormal(dist="lognormal", median=300, sigma=1.2, min=1, max=30000),
        dist.Geometric(dist="geometric", mean=40, max=4000),
        dist.Fixed(dist="fixed", value=7),
    ],
    ids=["uniform", "lognormal", "geometric", "fixed"],
)
def test_chunked_draws_equal_one_draw(d, monkeypatch):
    """A draw in chunks of 1,000 gives the values of one draw, bit for bit (numpy's Generator
    draws value by value), and the next draw continues the same stream."""
    one = np.random.default_rng(3)
    a, a2 = d._draw(one, 25_013), d._draw(one, 10)
    monkeypatch.setattr(dist, "DRAW_CHUNK", 1000)
    calls = []
    orig = type(d)._draw
    monkeypatch.setattr(
        type(d), "_draw", lambda self, rng, n: calls.append(n) or orig(self, rng, n)
    )
    many = np.random.default_rng(3)
    b, b2 = d.draw(many, 25_013), d.draw(many, 10)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes() and a2.tobytes() == b2.tobytes()
    assert calls[:26] == [1000] * 25 + [13]


def test_empirical_and_joint_draws_are_chunked_identically(monkeypatch):
    col = np.arange(1, 5001, dtype=np.int64) * 3
    e = dist.Empirical(dist="empirical", file="x.csv", column="c")
    a = e.draw_from(col, np.random.default_rng(9), 12_345)
    monkeypatch.setattr(dist, "DRAW_CHUNK", 512)
    b = e.draw_from(col, np.random.default_rng(9), 12_345)
    assert a.tobytes() == b.tobytes()


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    import numpy as np
    from fleetsim.apps import cli
    from fleetsim.workload.distributions import LogNormal
    for s in cli.SIGNALS:  # fleetsim's own handler: it raises between Python calls
        signal.signal(s, cli._on_signal)
    d = LogNormal(dist="lognormal", median=300, sigma=1.0, min=1, max=30000)
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    try:
        d.draw(rng, int(sys.argv[1]))
    except cli.Interrupted as exc:
        print("interrupted", exc.signum, flush=True)
        sys.exit(128 + exc.signum)
    print("finished", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_long_draw_honours_signals_within_a_second(sig):
    """A 60M-value draw (seconds of numpy in one call before the fix, half a GB) under
    fleetsim's signal handler: SIGINT or SIGTERM stops it within a second of the signal."""
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(60_000_000)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.4)
    t0 = time.monotonic()
    p.send_signal(sig)
    out, _ = p.communicate(timeout=60)
    waited = time.monotonic() - t0
    assert "finished" not in out, "the draw ended before the signal: make it longer"
    assert out.split()[-2:] == ["interrupted", str(int(sig))] and p.returncode == 128 + sig
    assert waited < 1.0, f"the signal took {waited:.2f} s to act"
