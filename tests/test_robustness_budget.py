"""Budgets cover every way of making work (issue #23, high 2 and 3).

Long numpy draws are chunked (so SIGINT and SIGTERM are honoured within a second, and chunking
changes no value); ``check_work`` counts a timed trace's arrivals per pod-hour (CSV and JSONL)
and sessions x turns before anything is generated.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_robustness_input import LIMIT_AS, run_limited

from fleetsim.apps import cli
from fleetsim.config import budget
from fleetsim.workload import distributions as dist
from fleetsim.workload.mooncake import read_mooncake


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


# ---------------------------------------------------------------------------------------------
# check_work: sessions x turns, timed traces per pod-hour
SCEN = """
name = "budget"
seed = 1
[simulation]
hours = {hours}
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 2
pods = {pods}
[traffic]
requests_per_day = {rate}
diurnal = "flat"
prompt = {{ dist = "fixed", value = 50 }}
output = {{ dist = "fixed", value = 20 }}
{extra}
"""


def _scenario(d: Path, extra: str = "", rate: float = 2400, hours: int = 1, pods: int = 1):
    f = d / "s.toml"
    f.write_text(SCEN.format(extra=extra, rate=rate, hours=hours, pods=pods))
    return f


def _cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli.main([str(a) for a in args])
    return rc, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def test_a_billion_turns_is_refused_before_drawing(tmp_path):
    """`traffic.sessions = {turns = {dist = "fixed", value = 1e9}}` is one line before anything
    is drawn (before: 7.45 GiB of think times were allocated, deaf to SIGTERM): in a child under
    a 2 GiB address-space limit, exit 2, a small peak resident set, no output folder."""
    f = _scenario(tmp_path, '[traffic.sessions]\nturns = { dist = "fixed", value = 1000000000 }')
    out = tmp_path / "o"
    got, peak = run_limited({"turns": ["run", str(f), "--out", str(out)]}, tmp_path)
    rc, lines = got["turns"]
    assert rc == 2 and len(lines) == 1, (rc, lines)
    assert "traffic.sessions.turns.value" in lines[0] and "per session" in lines[0]
    assert peak < LIMIT_AS / 4 and not out.exists()


def test_sessions_count_their_turns(tmp_path, capsys):
    """Sessions x mean turns count as arrivals: 1,000 sessions/hour within the per-pod-hour
    budget alone, but x 10,000 turns each above it (before: only the sessions were counted)."""
    ses = '[traffic.sessions]\nturns = { dist = "fixed", value = 10000 }'
    f = _scenario(tmp_path, ses, rate=24_000)
    rc, err = _cli(capsys, "validate", f)
    assert rc == 2 and len(err) == 1, err
    assert "1e+07 requests (sessions x their mean turns)" in err[0], err
    assert f"{budget.MAX_ARRIVALS_PER_POD_HOUR:,} per pod-hour" in err[0]
    f = _scenario(tmp_path, ses.replace("10000", "4"), rate=24_000)
    rc, err = _cli(capsys, "validate", f)
    assert rc == 0, err


@pytest.mark.parametrize("name", ["turns", "think_s"])
def test_sessions_from_a_trace_column_are_one_line(tmp_path, capsys, name):
    """An empirical distribution for turns or think times (before: AttributeError traceback
    once the run started)."""
    (tmp_path / "x.csv").write_text("c\n3\n")
    f = _scenario(
        tmp_path,
        f'[traffic.sessions]\n{name} = {{ dist = "empirical", file = "x.csv", column = "c" }}',
    )
    rc, err = _cli(capsys, "run", f, "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1 and f"traffic.sessions.{name}.dist" in err[0], err


def _trace(d: Path, kind: str, times_s: list[float]) -> str:
    if kind == "csv":
        rows = "".join(f"{t},50,20\n" for t in times_s)
        (d / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n" + rows)
        return 'trace = "t.csv"'
    lines = "".join(
        json.dumps(
            {"timestamp": t * 1000, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
        )
        + "\n"
        for t in times_s
    )
    (d / "t.jsonl").write_text(lines)
    return 'trace = "t.jsonl"\ntrace_block_tokens = 512'


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_timed_traces_count_arrivals_per_pod_hour(tmp_path, capsys, monkeypatch, kind):
    """A timed trace counts its rows by the hour they arrive in, per pod (row i -> pod i %
    pods), against the per-pod-hour budget (before: timed traces were exempt: 3M requests in one
    hour took 1.4 GB). The budget is set to 100 here: 150 rows in one hour on one pod are
    refused, on two pods (75 each) accepted; rows past the horizon do not count."""
    monkeypatch.setattr(budget, "MAX_ARRIVALS_PER_POD_HOUR", 100)
    from fleetsim.workload import sampling

    sampling.read_arrival_trace.cache_clear()
    read_mooncake.cache_clear()
    burst = [1800.0 + i * 0.01 for i in range(150)]
    t = _trace(tmp_path, kind, burst)
    rc, err = _cli(capsys, "validate", _scenario(tmp_path, t))
    assert rc == 2 and len(err) == 1, err
    assert "traffic.trace" in err[0] and "brings 150 requests" in err[0], err
    rc, err = _cli(capsys, "validate", _scenario(tmp_path, t, pods=2))
    assert rc == 0, err
    sampling.read_arrival_trace.cache_clear()
    read_mooncake.cache_clear()
    t = _trace(tmp_path, kind, [10.0, *(7200.0 + i * 0.01 for i in range(150))])
    rc, err = _cli(capsys, "validate", _scenario(tmp_path, t, hours=2))
    assert rc == 0, err  # 150 in hour 2, past a 2-hour horizon
    rc, err = _cli(capsys, "validate", _scenario(tmp_path, t, hours=3))
    assert rc == 2 and "brings 150 requests" in err[0], err


def test_trace_counts_by_hour_and_pod():
    """check_work's trace counts: per pod over the horizon and the busiest pod-hour."""
    t = np.array([0.0, 1.0, 2.0, 3700.0, 3701.0, 9000.0])
    assert budget._trace_counts(t, 2, 1) == (5.0, 3.0)
    assert budget._trace_counts(t, 2, 2) == (2.5, 2.0)
    assert budget._trace_counts(t, 3, 4) == (1.5, 1.0)
