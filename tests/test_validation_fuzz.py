"""Property: whatever a scenario file says, the outcome is a valid run or one clean error.

Valid scenarios are mutated (wrong types, out-of-range and huge values, NaN and infinities,
missing and extra keys, wrong nesting, strings and booleans where numbers go). Each mutant goes
through the in-process path ``scenario_from_dict -> resolve -> simulate``; any exception other
than a UserError (and any warning: pytest turns them into errors) fails the test. A sample also
goes through the ``fleetsim run`` subprocess: exit 0, or exit 2 with exactly one stderr line and
no traceback.

Default run: 300 in-process cases + 6 subprocess cases (``-m slow``: 3,000 + 40).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetsim.apps.simulate import pods_to_simulate, simulate
from fleetsim.base.errors import UserError
from fleetsim.config.scenario import resolve, scenario_from_dict

BASE = {
    "name": "fuzz",
    "seed": 5,
    "simulation": {"hours": 1, "engine": "macro"},
    "model": {"name": "llama-3.1-8b", "dtype": "bf16"},
    "hardware": {"gpu": "h100-sxm"},
    "fleet": {
        "replicas_per_pod": 2,
        "pods": 1,
        "tensor_parallel": 1,
        "router": "least_loaded",
        "max_batch_size": 64,
        "max_batched_tokens": 8192,
        "gpu_memory_utilization": 0.9,
    },
    "traffic": {
        "requests_per_day": 2000.0,
        "diurnal": "flat",
        "prompt": {"dist": "lognormal", "median": 200.0, "sigma": 1.0, "min": 1, "max": 2000},
        "output": {"dist": "geometric", "mean": 50.0, "max": 500},
    },
    "power": {"pue": 1.2},
    "cost": {
        "electricity_usd_per_kwh": 0.08,
        "hardware": "owned",
        "amortization_years": 5.0,
        "carbon_kg_per_kwh": [0.4] * 24,
    },
    "slo": {"ttft_s": 2.0, "tpot_s": 0.2},
}

KEYS = [
    "hours",
    "engine",
    "name",
    "dtype",
    "gpu",
    "replicas",
    "pods",
    "sample_pods",
    "router",
    "requests_per_day",
    "diurnal",
    "prompt",
    "output",
    "dist",
    "median",
    "sigma",
    "min",
    "max",
    "mean",
    "value",
    "low",
    "high",
    "pue",
    "electricity_usd_per_kwh",
    "tdp_w",
    "peak_flops",
    "ttft_s",
    "seed",
    "start_utc",
    "n_layers",
    "kv_dtype",
    "profile",
    "file",
    "medain",
]

nasty_float = st.sampled_from(
    [
        0.0,
        -0.0,
        -1.0,
        1e-300,
        1e300,
        1.7e308,
        math.nan,
        math.inf,
        -math.inf,
        0.5,
        1.0,
        24.0,
        1e6,
        1e9,
        1e12,
        2.0**63,
    ]
)
nasty_int = st.sampled_from([0, 1, -1, 2, 24, 64, 65, 1000, 10**6, 2**31, 2**63 - 1, 2**63, 10**30])
nasty_str = st.sampled_from(
    [
        "",
        "2",
        "1e3",
        "nan",
        "two",
        "flat",
        "azure-code",
        "fixed",
        "lognormal",
        "empirical",
        "h200",
        "llama-3.1-70b",
        "fp8",
        "iteration",
        "central_queue",
        "rented",
        "2026-01-01T00:00:00Z",
        "missing.csv",
        "nope.json",
        "é\u00a0\n\"'",
    ]
)
scalar = st.one_of(
    nasty_float,
    nasty_int,
    nasty_str,
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=8),
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=25),
        st.just([0.1] * 24),
        st.just([0.1] * 23 + [math.nan]),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    ),
    max_leaves=30,
)


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(_paths(v, (*prefix, k)))
    return out


def _get_parent(d: dict, path: tuple):
    node = d
    for p in path[:-1]:
        node = node[p]
    return node


@st.composite
def mutant(draw) -> dict:
    d = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(d)
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "extra", "nest", "unnest"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _get_parent(d, path)
        key = path[-1]
        if kind == "set":
            parent[key] = draw(value)
        elif kind == "delete":
            parent.pop(key, None)
        elif kind == "extra":
            target = parent[key] if isinstance(parent.get(key), dict) else parent
            target[draw(st.sampled_from([*KEYS, "x", "replicass", "Seed"]))] = draw(value)
        elif kind == "nest":  # a value wrapped into a table or a list
            parent[key] = draw(st.sampled_from([{"value": parent[key]}, [parent[key]]]))
        else:  # a table's keys hoisted one level up
            if isinstance(parent.get(key), dict):
                sub = parent.pop(key)
                parent.update({k: v for k, v in sub.items() if k not in parent})
    return d


def _cheap(rs) -> bool:
    """Small enough to simulate inside the property test (a clean validation still counts)."""
    sc = rs.scenario
    pods = len(pods_to_simulate(sc))
    arrivals = (
        sum(rs.hourly_rate_per_s[h % 24] for h in range(sc.simulation.hours))
        * 3600.0
        / sc.fleet.pods
        * pods
    )
    return (
        arrivals <= 5000
        and pods * sc.fleet.replicas <= 64
        and pods * sc.simulation.hours <= 200
        and sc.simulation.engine == "macro"
    ) or (arrivals <= 300 and pods <= 2)


COUNT = {"cases": 0, "valid": 0, "simulated": 0, "errors": 0}


def _outcome(d: dict) -> str:
    """'error', 'valid' or 'simulated'; anything else raises (a test failure)."""
    COUNT["cases"] += 1
    try:
        sc = scenario_from_dict(d, "fuzz.toml")
        rs = resolve(sc, "fuzz.toml")
    except UserError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, msg
        assert "constrained-" not in msg and "literal[" not in msg, msg
        COUNT["errors"] += 1
        return "error"
    COUNT["valid"] += 1
    if not _cheap(rs):
        return "valid"
    res = simulate(rs)
    assert res.hourly.num_rows == sc.simulation.hours
    COUNT["simulated"] += 1
    return "simulated"


def _property(n: int):
    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutant())
    def check(d):
        _outcome(d)

    return check


def test_mutants_run_or_fail_cleanly():
    for k in COUNT:
        COUNT[k] = 0
    _property(300)()
    print(f"\nfuzz (in-process): {COUNT}")
    assert COUNT["cases"] >= 300
    assert COUNT["errors"] > 50 and COUNT["simulated"] > 10  # both outcomes were exercised


@pytest.mark.slow
def test_mutants_run_or_fail_cleanly_long():
    for k in COUNT:
        COUNT[k] = 0
    _property(3000)()
    print(f"\nfuzz (in-process, long): {COUNT}")
    assert COUNT["cases"] >= 3000


# ---------------------------------------------------------------------------------------------
# the same through the command line: exit 0, or exit 2 and exactly one line on stderr
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) if -(2**63) <= v < 2**63 else json.dumps(str(v))  # TOML ints are 64-bit
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
        )
    raise TypeError(v)


def to_toml(d: dict) -> str:
    """A scenario dict as TOML (top-level scalars first, then one table per section)."""
    lines = [
        f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)
    ]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"[{json.dumps(str(k))}]")
            lines += [f"{json.dumps(str(a))} = {_toml_value(b)}" for a, b in v.items()]
    return "\n".join(lines) + "\n"


def _cli_property(n: int, tmp_path_factory):
    seen = {"cases": 0, "exit0": 0, "exit2": 0}

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(mutant())
    def check(d):
        tmp = tmp_path_factory.mktemp("cli")
        d = copy.deepcopy(d)
        f = tmp / "m.toml"
        f.write_text(to_toml(d))
        p = subprocess.run(
            [sys.executable, "-m", "fleetsim", "run", str(f), "--out", str(tmp / "out"), "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp,
        )
        seen["cases"] += 1
        assert "Traceback" not in p.stderr, p.stderr
        if p.returncode == 0:
            seen["exit0"] += 1
            assert (tmp / "out" / "hourly.parquet").exists()
        else:
            seen["exit2"] += 1
            lines = [x for x in p.stderr.splitlines() if x.strip()]
            assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
            assert not (tmp / "out").exists() or not any((tmp / "out").iterdir())

    # the subprocess sample keeps to cases that are cheap to run
    check()
    return seen


def test_cli_sample(tmp_path_factory):
    seen = _cli_property(6, tmp_path_factory)
    print(f"\nfuzz (CLI subprocess): {seen}")
    assert seen["cases"] == 6


@pytest.mark.slow
def test_cli_sample_long(tmp_path_factory):
    seen = _cli_property(40, tmp_path_factory)
    print(f"\nfuzz (CLI subprocess, long): {seen}")
