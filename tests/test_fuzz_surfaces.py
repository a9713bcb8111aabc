"""Fuzzing of the surfaces added since the last robustness round (issue #23).

Five classes, each from valid inputs mutated by hypothesis (hostile values from
tests/test_validation_fuzz.py's strategy: wrong types, huge and negative numbers, NaN and
infinities, strings, booleans, nested tables and lists; deleted, extra and re-nested keys):

* **mooncake**: JSONL traces, valid lines mixed with mutated lines and raw hostile lines
  (deep nesting, 25-digit and 400-digit integers, Infinity/NaN, Latin-1 bytes, a byte-order
  mark, CRLF, NUL, long lines); read by ``read_mooncake`` and, every 8th, by ``fleetsim
  validate`` on a scenario that replays it;
* **hf**: Hugging Face ``config.json`` files (the Llama-3.1-70B and Mixtral configs of
  tests/data, mutated, sometimes as corrupted bytes) through ``[model] config`` and ``fleetsim
  validate`` (the public entry point; the reader is the models issue's);
* **sessions**: ``[traffic.sessions]`` through ``fleetsim validate``, then ``fleetsim run`` when
  the scenario is valid and small;
* **disaggregation**: ``[disaggregation]`` pools and link through ``validate``, then ``run``
  when valid and small;
* **latency**: ``fleetsim latency`` argument lists (flags dropped, hostile values).

Every case is an in-process call of the CLI's ``main`` (fast) under an address-space limit of
the process's size + 2 GiB (bounded memory: a MemoryError fails the test). It must end in exit
0 (nothing on stderr), or 2, 3 or 4 with exactly one stderr line and no traceback; any
exception out of ``main`` fails the test. Default run: 420 cases; ``-m slow``: 5,800. The
counts per class and outcome are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_validation_fuzz import _get_parent, _paths, to_toml, value

from fleetsim.apps import cli
from fleetsim.base.errors import UserError
from fleetsim.workload import sampling
from fleetsim.workload.mooncake import read_mooncake

DATA = Path(__file__).parent / "data"
COUNTS: dict[str, dict[str, int]] = {}


@contextlib.contextmanager
def bounded_memory(extra_bytes: int = 2 << 30):
    """RLIMIT_AS of this process lowered to its current size + ``extra_bytes`` (restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:  # (this process's own size: not a user file)
        size = int(fh.read().split()[0]) * resource.getpagesize()
    lim = size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        lim = min(lim, hard)
    resource.setrlimit(resource.RLIMIT_AS, (lim, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(argv: list, cls: str, outcome_prefix: str = "") -> int:
    """``fleetsim argv`` in-process: exit 0 with a quiet stderr, or 2/3/4 with one line."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert "Traceback" not in err.getvalue(), err.getvalue()
    assert rc in (0, 2, 3, 4), (rc, argv, lines)
    if rc == 0:
        assert not [x for x in lines if "error" in x.lower()], lines
    else:
        assert len(lines) == 1, (rc, argv, lines)
    c = COUNTS.setdefault(cls, {})
    key = f"{outcome_prefix}exit{rc}"
    c[key] = c.get(key, 0) + 1
    return rc


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
    )


def mutate(draw, d: dict, keys: list[str], rounds: tuple[int, int] = (1, 3)) -> dict:
    """``d`` with 1-3 mutations: a hostile value set, a key deleted, an extra key, a value
    wrapped in a table or a list."""
    d = copy.deepcopy(d)
    for _ in range(draw(st.integers(*rounds))):
        paths = _paths(d)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get_parent(d, path), path[-1]
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "extra", "nest"]))
        if kind == "set":
            parent[key] = draw(value)
        elif kind == "delete":
            parent.pop(key, None)
        elif kind == "extra":
            target = parent[key] if isinstance(parent.get(key), dict) else parent
            target[draw(st.sampled_from([*keys, "x"]))] = draw(value)
        else:
            parent[key] = draw(st.sampled_from([{"value": parent[key]}, [parent[key]]]))
    return d


def _toml_safe(v):
    """None (not TOML) dropped from tables and lists."""
    if isinstance(v, dict):
        return {k: _toml_safe(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_toml_safe(x) for x in v if x is not None]
    return v


BASE = {
    "name": "fuzz",
    "seed": 3,
    "simulation": {"hours": 1},
    "model": {"name": "llama-3.1-8b"},
    "hardware": {"gpu": "h100-sxm"},
    "fleet": {"replicas": 2},
    "traffic": {
        "requests_per_day": 2400.0,
        "diurnal": "flat",
        "prompt": {"dist": "lognormal", "median": 200.0, "sigma": 1.0, "min": 1, "max": 2000},
        "output": {"dist": "geometric", "mean": 30.0, "max": 300},
    },
}


def _small(f: Path) -> bool:
    """Cheap enough to run inside the property (after a clean validation)."""
    import fleetsim
    from fleetsim.config.budget import _session_turns
    from fleetsim.config.resolve import resolve

    sc = fleetsim.load(f)
    rs = resolve(sc, str(f))
    turns = _session_turns(sc, str(f))
    hours = sc.simulation.hours
    arrivals = sum(rs.hourly_rate_per_s[h % 24] for h in range(hours)) * 3600.0 * turns
    return arrivals <= 4000 and hours <= 3 and sc.simulation.engine == "macro"


def _validate_then_run(tmp: Path, d: dict, cls: str) -> None:
    f = tmp / "s.toml"
    try:
        text = to_toml(_toml_safe(d))
    except TypeError:
        return
    f.write_text(text)
    if run_cli(["validate", f, "--json"], cls, "validate-") != 0:
        return
    if _small(f):
        run_cli(["run", f, "--out", tmp / "out", "--quiet", "--force"], cls, "run-")


# ---------------------------------------------------------------------------------------------
# mooncake
GOOD_LINE = {"timestamp": 0, "input_length": 700, "output_length": 20, "hash_ids": [1, 2]}
RAW_LINES = [
    '{"timestamp": 5, "x": ' + "[" * 200 + "]" * 200 + "}",
    '{"timestamp": 5, "input_length": 1' + "0" * 25 + ', "output_length": 3, "hash_ids": [1]}',
    '{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": [' + "9" * 400 + "]}",
    '{"timestamp": Infinity, "input_length": 3, "output_length": 3, "hash_ids": [1]}',
    '{"timestamp": NaN, "input_length": 3, "output_length": 3, "hash_ids": [1]}',
    '{"timestamp": -1e999, "input_length": 3, "output_length": 3, "hash_ids": [1]}',
    '{"timestamp": 1e30, "input_length": 3, "output_length": 3, "hash_ids": [1]}',
    '{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": [1], "z": "\x00"}',
    '{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": [-5]}',
    '{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": [1.0]}',
    '{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": {"a": 1}}',
    "[1, 2, 3]",
    "null",
    '"text"',
    "{",
    "",
    "   ",
    '{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": [1], "p": "'
    + "x" * 20_000
    + '"}',
]
KEYS_MC = ["timestamp", "input_length", "output_length", "hash_ids"]


@st.composite
def jsonl(draw) -> bytes:
    lines: list[bytes] = []
    t = 0
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["good", "good", "mutated", "raw"]))
        t += draw(st.integers(0, 5000))
        if kind == "good":
            lines.append(json.dumps({**GOOD_LINE, "timestamp": t}).encode())
        elif kind == "mutated":
            d = mutate(draw, {**GOOD_LINE, "timestamp": t}, KEYS_MC, (1, 2))
            try:
                lines.append(json.dumps(d, allow_nan=True).encode())
            except (TypeError, ValueError):
                lines.append(b"{}")
        else:
            lines.append(draw(st.sampled_from(RAW_LINES)).encode())
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = sep.join(lines) + sep
    if draw(st.booleans()) and draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 9)) == 0:  # a Latin-1 byte somewhere
        i = draw(st.integers(0, len(data)))
        data = data[:i] + b"\xe9" + data[i:]
    return data


def _mooncake_property(n: int, tmp: Path):
    state = {"i": 0}

    @_settings(n)
    @given(jsonl())
    def check(data):
        state["i"] += 1
        f = tmp / "t.jsonl"
        f.write_bytes(data)
        read_mooncake.cache_clear()
        sampling.read_arrival_trace.cache_clear()
        c = COUNTS.setdefault("mooncake", {})
        try:
            tr = read_mooncake(str(f))
            assert len(tr.ids) == len(tr.arrival_s) >= 1
            assert (tr.prompt_tokens >= 1).all() and (tr.prompt_tokens <= 10**9).all()
            assert np.isfinite(tr.arrival_s).all() and (np.diff(tr.arrival_s) >= 0).all()
            key = "read-ok"
        except UserError as exc:
            assert "\n" not in str(exc), str(exc)
            key = "read-error"
        c[key] = c.get(key, 0) + 1
        if state["i"] % 8 == 0:
            d = copy.deepcopy(BASE)
            d["traffic"] = {"trace": "t.jsonl", "trace_block_tokens": 512}
            read_mooncake.cache_clear()
            _validate_then_run(tmp, d, "mooncake")

    check()


# ---------------------------------------------------------------------------------------------
# HF configs (through [model] config and `fleetsim validate`)
HF_BASES = [
    json.loads((DATA / "llama-3.1-70b" / "config.json").read_text()),
    json.loads((DATA / "mixtral-8x7b" / "config.json").read_text()),
]
HF_KEYS = sorted({k for b in HF_BASES for k in b})


@st.composite
def hf_config(draw) -> bytes:
    base = draw(st.sampled_from(HF_BASES))
    d = mutate(draw, base, HF_KEYS)
    try:
        data = json.dumps(d, allow_nan=True).encode()
    except (TypeError, ValueError):
        data = b"{}"
    if draw(st.integers(0, 7)) == 0:  # corrupted bytes
        i = draw(st.integers(0, max(0, len(data) - 1)))
        data = (
            data[:i] + draw(st.sampled_from([b"\xe9", b"[" * 100, b"}", b"\x00", b""])) + data[i:]
        )
    return data


def _hf_property(n: int, tmp: Path):
    @_settings(n)
    @given(hf_config(), st.sampled_from([1, 2, 4, 8]))
    def check(data, tp):
        (tmp / "config.json").write_bytes(data)
        d = copy.deepcopy(BASE)
        d["model"] = {"config": "config.json"}
        d["fleet"] = {"replicas": 1, "tensor_parallel": tp}
        f = tmp / "s.toml"
        f.write_text(to_toml(d))
        run_cli(["validate", f, "--json"], "hf", "validate-")

    check()


# ---------------------------------------------------------------------------------------------
# [traffic.sessions]
SESSIONS = {
    "turns": {"dist": "lognormal", "median": 3.0, "sigma": 0.8, "min": 1, "max": 40},
    "think_s": {"dist": "lognormal", "median": 30.0, "sigma": 1.0, "min": 1, "max": 600},
    "system_prompt_tokens": 100,
    "block_tokens": 512,
}
SESSION_KEYS = [*SESSIONS, "dist", "value", "median", "sigma", "min", "max", "mean", "low", "high"]


def _dist(draw, hi: int) -> dict:
    """A valid distribution of values in 1..hi."""
    kind = draw(st.sampled_from(["fixed", "uniform", "lognormal", "geometric"]))
    if kind == "fixed":
        return {"dist": "fixed", "value": draw(st.integers(1, hi))}
    if kind == "uniform":
        lo = draw(st.integers(1, hi))
        return {"dist": "uniform", "low": lo, "high": draw(st.integers(lo, hi))}
    if kind == "lognormal":
        return {
            "dist": "lognormal",
            "median": float(draw(st.integers(1, hi))),
            "sigma": draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            "min": 1,
            "max": hi,
        }
    return {"dist": "geometric", "mean": float(draw(st.integers(1, hi))), "max": hi}


def _valid_sessions(draw) -> dict:
    return {
        "turns": _dist(draw, 12),
        "think_s": _dist(draw, 900),
        "system_prompt_tokens": draw(st.sampled_from([0, 16, 100, 511, 512, 2048])),
        "block_tokens": draw(st.sampled_from([16, 32, 512, 1024])),
    }


def _sessions_property(n: int, tmp: Path):
    @_settings(n)
    @given(st.data())
    def check(data):
        d = copy.deepcopy(BASE)
        d["traffic"]["requests_per_day"] = 480.0
        d["fleet"]["router"] = data.draw(st.sampled_from(["least_loaded", "prefix_affinity"]))
        if data.draw(st.integers(0, 2)) == 0:  # a valid one, run
            d["traffic"]["sessions"] = _valid_sessions(data.draw)
            _validate_then_run(tmp, d, "sessions")
            return
        d["traffic"]["sessions"] = copy.deepcopy(SESSIONS)
        d = mutate(data.draw, d, SESSION_KEYS) if data.draw(st.booleans()) else d
        ses = d["traffic"].get("sessions") if isinstance(d.get("traffic"), dict) else None
        if isinstance(ses, dict):
            d["traffic"]["sessions"] = mutate(data.draw, ses, SESSION_KEYS)
        _validate_then_run(tmp, d, "sessions")

    check()


# ---------------------------------------------------------------------------------------------
# [disaggregation]
DISAGG = {
    "link": "infiniband-ndr",
    "prefill": {"replicas": 1, "tensor_parallel": 1},
    "decode": {"replicas": 2, "tensor_parallel": 1, "router": "least_loaded"},
}
POOL_KEYS = [
    "link",
    "link_bandwidth_bytes_per_s",
    "link_latency_s",
    "prefill",
    "decode",
    "gpu",
    "tensor_parallel",
    "replicas",
    "max_batch_size",
    "max_batched_tokens",
    "gpu_memory_utilization",
    "router",
    "autoscaler",
    "replicas_by_hour",
    "target_requests_per_replica",
    "min_replicas",
    "initial_replicas",
]
LINKS = ["nvlink-4", "nvlink-3", "infiniband-hdr", "roce-400g", "roce-100g", "nvlink-5", ""]


ROUTERS = ["round_robin", "random", "least_loaded", "central_queue", "prefix_affinity"]


def _valid_pool(draw) -> dict:
    return {
        "replicas": draw(st.integers(1, 3)),
        "tensor_parallel": draw(st.sampled_from([1, 2])),
        "gpu": draw(st.sampled_from(["h100-sxm", "a100-80gb", "h200"])),
        "max_batch_size": draw(st.sampled_from([8, 64, 256])),
        "router": draw(st.sampled_from(ROUTERS)),
    }


def _disagg_property(n: int, tmp: Path):
    @_settings(n)
    @given(st.data())
    def check(data):
        d = copy.deepcopy(BASE)
        if data.draw(st.integers(0, 2)) == 0:  # a valid layout, run
            d["disaggregation"] = {
                "link": data.draw(st.sampled_from([*LINKS[:-2], "infiniband-ndr"])),
                "prefill": _valid_pool(data.draw),
                "decode": _valid_pool(data.draw),
            }
            _validate_then_run(tmp, d, "disaggregation")
            return
        dis = copy.deepcopy(DISAGG)
        if data.draw(st.booleans()):
            dis["link"] = data.draw(st.sampled_from(LINKS))
        pool = data.draw(st.sampled_from(["prefill", "decode"]))
        if data.draw(st.integers(0, 3)) == 0:
            dis[pool].update(
                {"autoscaler": "reactive", "target_requests_per_replica": 4.0, "min_replicas": 1}
            )
        elif data.draw(st.integers(0, 3)) == 0:
            dis[pool].update({"autoscaler": "schedule", "replicas_by_hour": [1] * 24})
        d["disaggregation"] = mutate(data.draw, dis, POOL_KEYS)
        _validate_then_run(tmp, d, "disaggregation")

    check()


# ---------------------------------------------------------------------------------------------
# latency arguments
TEXT = st.one_of(
    st.sampled_from(["1", "8", "0", "-5", "1,2,4", "1,,2", "9" * 20, "1e3", "x", "", " ", "7\n"]),
    st.text(max_size=12),
    st.integers(-(10**12), 10**12).map(str),
)


MODELS = [
    "llama-3.1-8b",
    "llama-3.1-70b",
    "mixtral-8x7b",
    "llama3",
    "/dev/zero",
    "/nonexistent.toml",
]
MODELS += ["/tmp", "MODELFILE", "HFCONFIG"]


@st.composite
def latency_argv(draw) -> list[str]:
    argv = ["latency"]
    if draw(st.integers(0, 2)) == 0:  # a well-formed question (some do not fit: --tp)
        argv += ["--gpu", draw(st.sampled_from(["h100-sxm", "a100-80gb", "h200", "b200"]))]
        argv += ["--model", draw(st.sampled_from([*MODELS[:3], "MODELFILE"]))]
        argv += ["--tp", str(draw(st.sampled_from([1, 2, 4, 8])))]
        if draw(st.booleans()):
            sizes = draw(st.lists(st.integers(1, 1024), min_size=1, max_size=4))
            argv += ["--batch", ",".join(map(str, sizes))]
            argv += ["--context", str(draw(st.integers(1, 131_072)))]
        else:
            sizes = draw(st.lists(st.integers(1, 131_072), min_size=1, max_size=4))
            argv += ["--prefill-tokens", ",".join(map(str, sizes))]
        return argv + (["--json"] if draw(st.booleans()) else [])
    if draw(st.integers(0, 9)):
        argv += ["--gpu", draw(st.sampled_from(["h100-sxm", "a100-80gb", "h200", "b200", "h1"]))]
    if draw(st.integers(0, 9)):
        argv += [
            "--model",
            draw(st.sampled_from(MODELS)),
        ]
    if draw(st.booleans()):
        argv += ["--tp", draw(st.one_of(st.sampled_from(["1", "2", "4", "8"]), TEXT))]
    if draw(st.integers(0, 4)) == 0:
        argv += ["--dtype", draw(st.sampled_from(["bf16", "fp8", "int8", "fp4", "x", ""]))]
    mode = draw(st.sampled_from(["batch", "batch", "prefill", "both", "none"]))
    if mode in ("batch", "both"):
        argv += ["--batch", draw(TEXT)]
    if mode in ("prefill", "both"):
        argv += ["--prefill-tokens", draw(TEXT)]
    if draw(st.integers(0, 3)):
        argv += ["--context", draw(TEXT)]
    if draw(st.booleans()):
        argv.append("--json")
    return argv


def _latency_property(n: int, tmp: Path):
    (tmp / "m.toml").write_text('[model]\nname = "llama-3.1-8b"\n')
    (tmp / "config.json").write_text((DATA / "llama-3.1-70b" / "config.json").read_text())
    subst = {"MODELFILE": str(tmp / "m.toml"), "HFCONFIG": str(tmp / "config.json")}

    @_settings(n)
    @given(latency_argv())
    def check(argv):
        run_cli([subst.get(a, a) for a in argv], "latency")

    check()


# ---------------------------------------------------------------------------------------------
CLASSES = {
    "mooncake": (_mooncake_property, 150, 1500),
    "hf": (_hf_property, 60, 1000),
    "sessions": (_sessions_property, 60, 1000),
    "disaggregation": (_disagg_property, 50, 800),
    "latency": (_latency_property, 100, 1500),
}


def _run_class(name: str, slow: bool, tmp: Path) -> None:
    prop, n_default, n_slow = CLASSES[name]
    COUNTS.pop(name, None)
    t0 = time.perf_counter()
    with bounded_memory():
        prop(n_slow if slow else n_default, tmp)
    c = COUNTS.get(name, {})
    cases = c.get("read-ok", 0) + c.get("read-error", 0) if name == "mooncake" else None
    if cases is None:
        cases = sum(v for k, v in c.items() if k.startswith(("validate-", "exit")))
    took = time.perf_counter() - t0
    print(f"\nfuzz {name}: {cases} cases in {took:.1f} s: {dict(sorted(c.items()))}")
    assert cases >= (n_slow if slow else n_default) * 0.9, c


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_fuzz_new_surfaces(name, tmp_path):
    _run_class(name, False, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_fuzz_new_surfaces_long(name, tmp_path):
    _run_class(name, True, tmp_path)


def test_bounded_memory_limits_and_restores():
    """The memory bound is real: inside it a 4 GiB allocation fails; after it, the limit is
    back."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    with bounded_memory(256 << 20), pytest.raises(MemoryError):
        bytearray(4 << 30)
    assert resource.getrlimit(resource.RLIMIT_AS) == before
