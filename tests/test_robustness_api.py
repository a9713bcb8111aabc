"""The Python API raises ``fleetsim.UserError`` (or its documented subclass ``ScenarioError``)
for every bad input (issue #23), with the hostile inputs of the CLI tests: special files, deep
nesting, bad bytes and overflowing numbers in scenarios and traces, and bad arguments to
``load``, ``sweep``, ``plan`` and ``Run.write``. Anything else (a TypeError, RecursionError,
UnicodeDecodeError, AttributeError, NotADirectoryError, ArrowInvalid) fails the test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import fleetsim
from fleetsim.workload.mooncake import read_mooncake

BASE = {
    "name": "api",
    "simulation": {"hours": 1},
    "model": {"name": "llama-3.1-8b"},
    "hardware": {"gpu": "h100-sxm"},
    "fleet": {"replicas": 1},
    "traffic": {
        "requests_per_day": 1000,
        "diurnal": "flat",
        "prompt": {"dist": "fixed", "value": 50},
        "output": {"dist": "fixed", "value": 20},
    },
}
DEEP = "[" * 100_000 + "]" * 100_000


def _toml(tmp_path: Path, traffic: str) -> Path:
    f = tmp_path / "s.toml"
    f.write_text(
        'name = "api"\n[simulation]\nhours = 1\n[model]\nname = "llama-3.1-8b"\n'
        '[hardware]\ngpu = "h100-sxm"\n[fleet]\nreplicas = 1\n[traffic]\n' + traffic + "\n"
    )
    return f


def _file_case(tmp_path: Path, case: str):
    """A scenario path whose file (or the file it names) is hostile."""
    if case == "dev-zero":
        return "/dev/zero"
    if case == "directory":
        return str(tmp_path)
    if case == "fifo":
        os.mkfifo(tmp_path / "f.toml")
        return tmp_path / "f.toml"
    if case == "symlink-loop":
        (tmp_path / "loop.toml").symlink_to("loop.toml")
        return tmp_path / "loop.toml"
    if case == "toml-deep":
        (tmp_path / "d.toml").write_text("x = " + DEEP + "\n")
        return tmp_path / "d.toml"
    if case == "toml-latin-1":
        (tmp_path / "l.toml").write_bytes(b'name = "caf\xe9"\n')
        return tmp_path / "l.toml"
    if case == "toml-400-digits":
        return _toml(tmp_path, "requests_per_day = " + "9" * 400)
    if case == "csv-trace-latin-1":
        (tmp_path / "t.csv").write_bytes(b"arrival_s,prompt_tokens,output_tokens\n0,\xe9,1\n")
        return _toml(tmp_path, 'trace = "t.csv"')
    if case == "csv-trace-overflow":
        (tmp_path / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,1," + "9" * 400)
        return _toml(tmp_path, 'trace = "t.csv"')
    if case == "csv-trace-fifo":
        os.mkfifo(tmp_path / "t.csv")
        return _toml(tmp_path, 'trace = "t.csv"')
    line = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1]}
    bad = {
        "jsonl-deep": '{"timestamp": 0, "x": ' + DEEP + "}",
        "jsonl-10e30": json.dumps({**line, "input_length": 10**30}),
        "jsonl-infinity": json.dumps(line).replace('"timestamp": 0', '"timestamp": Infinity'),
        "jsonl-latin-1": None,
    }[case]
    f = tmp_path / "t.jsonl"
    if bad is None:
        f.write_bytes(json.dumps(line).encode() + b'\n{"n": "caf\xe9"}\n')
    else:
        f.write_text(json.dumps(line) + "\n" + bad + "\n")
    return _toml(tmp_path, 'trace = "t.jsonl"\ntrace_block_tokens = 512')


FILE_CASES = [
    "dev-zero",
    "directory",
    "fifo",
    "symlink-loop",
    "toml-deep",
    "toml-latin-1",
    "toml-400-digits",
    "csv-trace-latin-1",
    "csv-trace-overflow",
    "csv-trace-fifo",
    "jsonl-deep",
    "jsonl-10e30",
    "jsonl-infinity",
    "jsonl-latin-1",
]


@pytest.mark.parametrize("case", FILE_CASES)
def test_hostile_files_raise_user_error(tmp_path, case):
    """``fleetsim.simulate(path)`` over each hostile file of the CLI tests: UserError, one line.
    (Before: jsonl-deep RecursionError, jsonl-10e30 TypeError/OverflowError, jsonl-latin-1
    UnicodeDecodeError; jsonl-infinity ran and dropped the request.)"""
    read_mooncake.cache_clear()
    path = _file_case(tmp_path, case)
    with pytest.raises(fleetsim.UserError) as ei:
        fleetsim.simulate(path)
    assert "\n" not in str(ei.value)


BAD_CALLS = {
    "toml-text-deep": lambda: fleetsim.load("x = " + DEEP + "\n"),
    "toml-text-bad": lambda: fleetsim.load("x = = 1\n"),
    "load-list": lambda: fleetsim.load([1, 2]),
    "load-bytes": lambda: fleetsim.load(b"s.toml"),
    "override-object": lambda: fleetsim.load(BASE, {"fleet.replicas": object()}),
    "override-not-key-value": lambda: fleetsim.load(BASE, [1, 2]),
    "override-deep": lambda: fleetsim.load(BASE, ["fleet.replicas=" + "[" * 100_000]),
    "seed-text": lambda: fleetsim.load(BASE, seed="x"),
    "replicas-nan": lambda: fleetsim.load({**BASE, "fleet": {"replicas": float("nan")}}),
    "replicas-10^400": lambda: fleetsim.load({**BASE, "fleet": {"replicas": 10**400}}),
    "sweep-grid-list": lambda: fleetsim.sweep(BASE, [1, 2]),
    "sweep-grid-object": lambda: fleetsim.sweep(BASE, {"fleet.replicas": [object()]}),
    "sweep-grid-key": lambda: fleetsim.sweep(BASE, {3: [1]}),
    "sweep-grid-empty": lambda: fleetsim.sweep(BASE, {"fleet.replicas": []}),
    "plan-tp-zero": lambda: fleetsim.plan(BASE, tensor_parallel=[0]),
    "plan-tp-text": lambda: fleetsim.plan(BASE, tensor_parallel="x"),
    "plan-gpus-number": lambda: fleetsim.plan(BASE, gpus=[7]),
    "plan-slo-negative": lambda: fleetsim.plan(BASE, slo_ttft_p99_s=-1),
    "plan-slo-nan": lambda: fleetsim.plan(BASE, slo_tpot_p99_s=float("nan")),
    "plan-hours": lambda: fleetsim.plan(BASE, hours="x"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments_raise_user_error(case):
    """Bad arguments: UserError. (Before: toml-text-deep and override-deep RecursionError,
    sweep-grid-list
    AttributeError, sweep-grid-object TypeError, plan-tp-text ArrowInvalid; plan-tp-zero and
    plan-slo-negative ran.)"""
    with pytest.raises(fleetsim.UserError) as ei:
        BAD_CALLS[case]()
    assert "\n" not in str(ei.value)


def test_run_write_into_a_file_or_a_locked_link(tmp_path):
    """``Run.write`` takes the CLI's path: a file as the folder is a UserError (before:
    NotADirectoryError); a symlinked lock is refused; a folder of someone else's files is not
    overwritten without force, and force keeps them."""
    run = fleetsim.simulate(BASE)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(fleetsim.UserError, match="is a file"):
        run.write(f)
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(fleetsim.UserError, match="not empty"):
        run.write(out)
    p = run.write(out, force=True)
    assert p == out / "hourly.parquet" and p.is_file()
    assert (out / "mine.txt").read_text() == "mine"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / ".fleetsim-lock").symlink_to(victim)
    with pytest.raises(fleetsim.UserError, match="symbolic link"):
        run.write(out, force=True)
    assert victim.read_text() == "precious"
