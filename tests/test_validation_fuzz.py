"""Property: whatever a scenario file says, the outcome is a valid run or one clean error.

Valid scenarios are mutated (wrong types, out-of-range and huge values, NaN and infinities,
missing and extra keys, wrong nesting, strings and booleans where numbers go). Each mutant goes
through the in-process path ``scenario_from_dict -> resolve -> simulate``; any exception other
than a UserError (and any warning: pytest turns them into errors) fails the test. A sample also
goes through the ``fleetsim run`` subprocess: exit 0, or exit 2 with exactly one stderr line and
no traceback.

The mutants start from bases with each autoscaler policy (static, reactive, schedule), so the
mutations reach every [autoscaler] and [power] field. A second property corrupts the files a
scenario names (timed traces, empirical size files, profiles, schedule files: flipped, inserted
and deleted bytes, truncation, Latin-1, a BOM, 31-digit numbers, deep nesting, NUL).

Default run: 300 in-process scenario cases + 6 subprocess cases + 200 file cases (``-m slow``:
3,000 + 40 + 2,000).
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
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

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
    # [autoscaler] and [power] (issue #16: the fuzzing covers the autoscaler sections)
    "policy",
    "interval_s",
    "target_requests_per_replica",
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "idle_timeout_s",
    "replicas_by_hour",
    "schedule_file",
    "prewarm",
    "standby_w",
    "wake_s",
    "wake_w",
    "trace",
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


# bases with each autoscaler policy: the mutations then reach every [autoscaler] field
AUTOSCALERS = [
    None,
    {"policy": "reactive", "interval_s": 60.0, "target_requests_per_replica": 8.0},
    {
        "policy": "reactive",
        "min_replicas": 0,
        "max_replicas": 2,
        "initial_replicas": 1,
        "idle_timeout_s": 120.0,
        "prewarm": False,
    },
    {"policy": "schedule", "replicas_by_hour": [1] * 12 + [2] * 12},
]
POWER = {"pue": 1.2, "standby_w": 10.0, "wake_s": 60.0, "wake_w": 300.0}


@st.composite
def mutant(draw) -> dict:
    d = copy.deepcopy(BASE)
    auto = draw(st.sampled_from(AUTOSCALERS))
    if auto is not None:
        d["autoscaler"] = copy.deepcopy(auto)
        d["power"] = dict(POWER)
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


# ---------------------------------------------------------------------------------------------
# the files a scenario names (issue #16): timed traces, empirical size files, profiles and
# schedule files, valid ones with random corruption (flipped, inserted and deleted bytes,
# truncation, hostile tokens: Latin-1, a BOM, 31-digit and 64-bit numbers, deep nesting, NUL).
# Each goes through scenario_from_dict -> resolve -> simulate: a valid run or one UserError line.
def _trace_csv() -> bytes:
    rows = [f"{i * 40.0 + 0.5},{50 + 37 * i % 400},{5 + 11 * i % 60}" for i in range(60)]
    return ("arrival_s,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n").encode()


def _sizes_csv() -> bytes:
    rows = [
        f"2024-05-10 0{i % 10}:00:00,{20 + 53 * i % 1500},{3 + 17 * i % 400}" for i in range(80)
    ]
    return ("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n").encode()


def _profile_json() -> bytes:
    return json.dumps(
        {
            "format": "fleetsim-profile/1",
            "kind": "roofline",
            "name": "fuzz-h100-like",
            "peak_flops": 9.9e14,
            "mem_bw_bytes_per_s": 3.35e12,
            "mem_bytes": 8.0e10,
            "compute_eff_max": 0.7,
            "compute_eff_half_tokens": 64.0,
            "memory_eff": 0.8,
            "overhead_s": 0.004,
            "compute_eff_table": [[1, 0.05], [64, 0.4], [4096, 0.7]],
            "power": {
                "idle_w": 113,
                "max_w": 700,
                "active_w": 67,
                "compute_w": 600,
                "memory_w": 200,
            },
            "catalog_gpu": "h100-sxm",
        },
        indent=1,
    ).encode()


def _schedule_json() -> bytes:
    return json.dumps(
        {"gpu": "h100-sxm", "tensor_parallel": 1, "replicas_by_hour": [1] * 8 + [2] * 16}
    ).encode()


FILES = {
    # kind -> (valid bytes, how the scenario names the file)
    "trace": (_trace_csv(), lambda d, p: d["traffic"].update(trace=p)),
    "sizes": (
        _sizes_csv(),
        lambda d, p: d["traffic"].update(
            prompt={"dist": "empirical", "file": p, "column": "ContextTokens"},
            output={"dist": "empirical", "file": p, "column": "GeneratedTokens"},
        ),
    ),
    "profile": (_profile_json(), lambda d, p: d["hardware"].update(profile=p)),
    "schedule": (
        _schedule_json(),
        lambda d, p: d.update(autoscaler={"policy": "schedule", "schedule_file": p}),
    ),
}
HOSTILE = [
    b"\xe9",
    b"\xef\xbb\xbf",
    b"\x00",
    b"9" * 31,
    b"9223372036854775807",
    b"-1",
    b"0",
    b"1e309",
    b"nan",
    b"1.5",
    b"[" * 200,
    b"{" * 70 + b"}" * 70,
    b'"',
    b",",
    b"\n",
    b"\r\n",
    b"x" * 5000,
]


@st.composite
def corrupted(draw, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup-line"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from(HOSTILE))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 40))]
        elif op == "truncate":
            del data[i:]
        else:
            lines = bytes(data).split(b"\n")
            j = draw(st.integers(0, len(lines) - 1))
            lines.insert(j, lines[j])
            data = bytearray(b"\n".join(lines))
    return bytes(data)


@st.composite
def file_mutant(draw) -> tuple[dict, str, bytes]:
    kind = draw(st.sampled_from(sorted(FILES)))
    valid, _ = FILES[kind]
    d = copy.deepcopy(BASE)
    if draw(st.booleans()) and kind != "schedule":  # with an autoscaler section as well
        d["autoscaler"] = copy.deepcopy(draw(st.sampled_from(AUTOSCALERS[1:])))
        d["power"] = dict(POWER)
    return d, kind, draw(corrupted(valid))


FILE_COUNT = {"cases": 0, "errors": 0, "valid": 0, "simulated": 0}


def _file_property(n: int, folder):
    serial = iter(range(10**9))

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(file_mutant())
    def check(case):
        d, kind, data = case
        path = folder / f"{kind}-{next(serial)}.{'csv' if kind in ('trace', 'sizes') else 'json'}"
        path.write_bytes(data)  # a fresh name each time (the trace readers cache by path)
        FILES[kind][1](d, str(path))
        FILE_COUNT["cases"] += 1
        out = _outcome(d)  # raises on anything but a run or one clean UserError line
        FILE_COUNT["errors" if out == "error" else out] += 1

    return check


def test_file_mutants_run_or_fail_cleanly(tmp_path):
    for k in FILE_COUNT:
        FILE_COUNT[k] = 0
    _file_property(200, tmp_path)()
    print(f"\nfuzz (files): {FILE_COUNT}")
    assert FILE_COUNT["cases"] >= 200
    assert FILE_COUNT["errors"] > 20 and FILE_COUNT["simulated"] > 20


@pytest.mark.slow
def test_file_mutants_run_or_fail_cleanly_long(tmp_path):
    for k in FILE_COUNT:
        FILE_COUNT[k] = 0
    _file_property(2000, tmp_path)()
    print(f"\nfuzz (files, long): {FILE_COUNT}")
    assert FILE_COUNT["cases"] >= 2000
