"""The Mooncake JSONL reader has the CSV reader's guarantees (issue #23, high 2 and medium).

``workload/mooncake.py`` reads through ``fleetsim.base.io``: a regular file only, opened without
blocking, under the trace size limit; UTF-8 with a byte-order mark accepted and a bad byte
named by its line; each line's JSON nested at most 64 deep, integers range-checked, tokens in
1..10^9, finite timestamps in [0, 1e12] ms. Every bad file is one line and exit 2, through the
CLI, ``crossover --long-trace`` (before anything is simulated) and the Python API
(``fleetsim.UserError``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_robustness_input import LIMIT_AS, run_limited

import fleetsim
from fleetsim.apps import cli
from fleetsim.workload.mooncake import MAX_LINE_CHARS, read_mooncake

SCEN = """
name = "mc"
seed = 1
[simulation]
hours = 1
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 2
[traffic]
trace = "{trace}"
trace_block_tokens = 512
"""


def _line(ts=0, a=600, b=5, ids=(1, 2)) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": a, "output_length": b, "hash_ids": list(ids)}
    )


GOOD = "\n".join(_line(ts=1000 * i, ids=(1, 2 + i)) for i in range(3)) + "\n"


def _scenario(d: Path, trace: str | Path) -> Path:
    f = d / "s.toml"
    f.write_text(SCEN.format(trace=trace))
    return f


def _cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli.main([str(a) for a in args])
    return rc, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def _one_line(rc: int, err: list[str], *needles: str) -> str:
    assert rc == 2 and len(err) == 1, (rc, err)
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


# each case: the bytes of the file, and what its one line must say
HOSTILE = {
    "deep-100k": (
        GOOD + '{"timestamp": 9000, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        ["line 4", "nested deeper than 64"],
    ),
    "input-10e30": (GOOD + _line(ts=9000, a=10**30) + "\n", ["line 4", "1..1,000,000,000"]),
    "output-2e9": (GOOD + _line(ts=9000, b=2 * 10**9) + "\n", ["line 4", "output_length"]),
    "tokens-zero": (GOOD + _line(ts=9000, a=0) + "\n", ["line 4", "input_length"]),
    "tokens-float": (GOOD + _line(ts=9000, a=600.0) + "\n", ["line 4", "integers"]),
    "tokens-bool": (GOOD + _line(ts=9000, a=True) + "\n", ["line 4", "integers"]),
    "latin-1": (GOOD.encode() + b'{"timestamp": 9000, "n": "caf\xe9"}\n', ["line 4", "0xe9"]),
    "ts-1e30": (GOOD + _line(ts=1e30) + "\n", ["line 4", "'timestamp' = 1e+30"]),
    "ts-infinity": (GOOD + _line(ts=9000).replace("9000", "Infinity") + "\n", ["line 4", "inf"]),
    "ts-nan": (GOOD + _line(ts=9000).replace("9000", "NaN") + "\n", ["line 4", "timestamp"]),
    "ts-negative": (_line(ts=-1) + "\n", ["line 1", "timestamp"]),
    "ts-string": (_line(ts=9000).replace("9000", '"9000"') + "\n", ["line 1", "timestamp"]),
    "ts-decreasing": (GOOD + _line(ts=1) + "\n", ["line 4", "must not decrease"]),
    "id-2^64": (GOOD + _line(ts=9000, ids=(2**64,)) + "\n", ["line 4", "hash_ids"]),
    "id-negative": (GOOD + _line(ts=9000, ids=(-1,)) + "\n", ["line 4", "hash_ids"]),
    "id-400-digits": (
        GOOD + _line(ts=9000).replace("[1, 2]", "[" + "9" * 400 + "]") + "\n",
        ["line 4", "hash_ids"],
    ),
    "int-5000-digits": (
        GOOD + '{"timestamp": 9000, "x": ' + "7" * 5000 + "}\n",
        ["line 4", "not valid JSON"],
    ),
    "long-line": (
        GOOD + _line(ts=9000)[:-1] + ', "pad": "' + "x" * (MAX_LINE_CHARS + 10) + '"}\n',
        ["line 4", "characters, above the limit"],
    ),
    "not-an-object": (GOOD + "[1, 2, 3]\n", ["line 4", "not a JSON object"]),
    "not-json": (GOOD + "{oops\n", ["line 4", "not valid JSON"]),
    "empty": ("\n\n", ["no requests"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_mooncake_line_is_one_line(tmp_path, capsys, case):
    """Each bad line is one stderr line naming the file's setting and the line, exit 2. (Before:
    RecursionError, OverflowError and UnicodeDecodeError tracebacks; 1e30, Infinity and NaN
    accepted and the request silently dropped; ids and token counts unbounded.)"""
    data, needles = HOSTILE[case]
    f = tmp_path / "t.jsonl"
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    s = _scenario(tmp_path, f.name)
    read_mooncake.cache_clear()
    rc, err = _cli(capsys, "run", s, "--out", tmp_path / "o", "--quiet")
    _one_line(rc, err, "traffic.trace", "t.jsonl", *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["deep-100k", "input-10e30", "latin-1", "ts-infinity"])
def test_hostile_mooncake_through_the_python_api(tmp_path, case):
    """The Python API raises the documented fleetsim.UserError (before: UnicodeDecodeError,
    TypeError, RecursionError, OverflowError)."""
    data, needles = HOSTILE[case]
    f = tmp_path / "t.jsonl"
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    read_mooncake.cache_clear()
    with pytest.raises(fleetsim.UserError) as ei:
        fleetsim.simulate(_scenario(tmp_path, f.name))
    for n in needles:
        assert n in str(ei.value)


def test_bom_is_accepted_and_changes_nothing(tmp_path, capsys):
    """A byte-order mark before the first line (before: "line 1 is not a JSON object") gives the
    same hourly table as the file without it."""
    plain, bom = tmp_path / "a", tmp_path / "b"
    tables = []
    for d, data in ((plain, GOOD.encode()), (bom, b"\xef\xbb\xbf" + GOOD.encode())):
        d.mkdir()
        (d / "t.jsonl").write_bytes(data)
        rc, err = _cli(capsys, "run", _scenario(d, "t.jsonl"), "--out", d / "o", "--quiet")
        assert rc == 0, err
        tables.append(pq.read_table(d / "o" / "hourly.parquet").drop(["hour_start"]))
    assert tables[0].column("requests_arrived").to_pylist() == [3]
    assert tables[0].equals(tables[1])


def test_special_and_huge_jsonl_under_a_memory_limit(tmp_path):
    """/dev/zero named as a .jsonl trace (before: grew to 2 GB, MemoryError traceback), a FIFO
    (before: hung for good), and a 300 MB file holding one line (before: accepted): one line
    each, exit 2, in a child under a 2 GiB address-space limit, a small peak resident set."""
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:  # sparse: 300 MB of one line, costs no disk
        fh.truncate(300 * 10**6)
    cases = {}
    for name, f in (("zero", zero), ("fifo", fifo), ("big", big)):
        d = tmp_path / name
        d.mkdir()
        cases[name] = ["run", str(_scenario(d, f)), "--out", str(d / "o")]
    got, peak = run_limited(cases, tmp_path, timeout_s=120)
    for name, (rc, lines) in got.items():
        assert rc == 2 and len(lines) == 1, (name, rc, lines)
    assert "is a device" in got["zero"][1][0]
    assert "a FIFO" in got["fifo"][1][0]
    assert "above the limit" in got["big"][1][0]
    assert peak < LIMIT_AS / 4, f"peak resident set {peak / 2**20:.0f} MiB"


def test_block_ids_round_trip_the_shipped_trace():
    """The compact id store gives every request's ids as the file lists them, slices with a
    step included (pods take every n-th request)."""
    path = Path(__file__).parents[1] / "scenarios/data/mooncake-2025/conversation_trace.jsonl"
    tr = read_mooncake(str(path))
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    assert len(tr.ids) == len(lines) == 12031
    assert [d["hash_ids"] for d in lines[:50]] == [tr.ids[i] for i in range(50)]
    sub = tr.ids[3::7]
    assert list(sub)[:20] == [d["hash_ids"] for d in lines[3::7][:20]]
    assert sum(len(x) for x in tr.ids) == sum(len(d["hash_ids"]) for d in lines)
    assert np.array_equal(tr.prompt_tokens, [d["input_length"] for d in lines])


def test_crossover_long_trace_fails_before_simulating(tmp_path, capsys, monkeypatch):
    """`crossover --long-trace BAD.jsonl` is one line before the short workload is simulated
    (before: the traceback came after 4 to 14 s of simulation)."""
    from fleetsim.apps import crossover

    def no_simulation(*_a, **_k):
        raise AssertionError("simulated before checking --long-trace")

    monkeypatch.setattr(crossover, "crossover_task", no_simulation)
    scen = Path(__file__).parents[1] / "scenarios/disaggregated.toml"
    for case in ("latin-1", "deep-100k", "ts-1e30"):
        data, needles = HOSTILE[case]
        f = tmp_path / f"{case}.jsonl"
        f.write_bytes(data if isinstance(data, bytes) else data.encode())
        rc, err = _cli(capsys, "crossover", scen, "--long-trace", f, "--out", tmp_path / "o")
        _one_line(rc, err, "--long-trace", *needles)
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    rc, err = _cli(
        capsys, "crossover", scen, "--long-trace", tmp_path / "zero.jsonl", "--out", tmp_path / "o"
    )
    _one_line(rc, err, "--long-trace", "is a device")
    assert not (tmp_path / "o").exists()
