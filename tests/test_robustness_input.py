"""Bounded input (issue #16, items 4, 8, 11, 15, 18): every file fleetsim reads goes through
``fleetsim.base.io`` (a regular file, under a size limit, UTF-8 with a BOM handled, parsers with
a depth limit, numbers with bounds). Each hostile file is one stderr line and exit 2.

The special-file cases (``/dev/zero``, a FIFO, a sparse multi-GB file) run in a child process
under ``RLIMIT_AS`` = 2 GiB: the test asserts the limit is never hit (no MemoryError, a clean
exit, a peak resident set far below the limit). Before the fix each of them read until memory
ran out (or, for the FIFO, blocked forever).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleetsim.apps import cli
from fleetsim.base import io

SCEN = """
name = "in"
seed = 2
[simulation]
hours = 1
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
{hw}
[traffic]
requests_per_day = 2000
diurnal = "flat"
{traffic}
[autoscaler]
{auto}
"""
FIXED = 'prompt = { dist = "fixed", value = 50 }\noutput = { dist = "fixed", value = 20 }'


def _scenario(d: Path, hw: str = "", traffic: str = FIXED, auto: str = "", name="s.toml") -> Path:
    f = d / name
    f.write_text(SCEN.format(hw=hw, traffic=traffic, auto=auto))
    return f


def _cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli.main([str(a) for a in args])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    return rc, err


def _one_line(rc: int, err: list[str], *needles: str) -> str:
    assert rc == 2 and len(err) == 1, (rc, err)
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


# ---------------------------------------------------------------------------------------------
# special and huge files, in a child under a 2 GiB address-space limit
CHILD = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from fleetsim.apps import cli
    out = {}
    for name, argv in json.loads(sys.argv[1]).items():
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(argv)
            except MemoryError:
                rc = "MemoryError"
        out[name] = [rc, [x for x in buf.getvalue().splitlines() if x.strip()]]
    # this process's own peak resident set (VmHWM starts afresh at exec, unlike ru_maxrss,
    # which keeps the forked parent's)
    hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0].split()[1]
    print(json.dumps({"cases": out, "peak_bytes": int(hwm) * 1024}))
    """
)
LIMIT_AS = 2 << 30


def run_limited(cases: dict[str, list[str]], cwd: Path, timeout_s: float = 120.0):
    """Run each ``fleetsim`` argv of ``cases`` in one child under RLIMIT_AS; returns the
    results by case and the child's peak resident set in bytes."""
    err = cwd / "child.err"
    outf = cwd / "child.out"
    with open(outf, "w") as so, open(err, "w") as se:
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(cases)],
            cwd=cwd,
            stdout=so,
            stderr=se,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS)),
        )
        try:
            p.wait(timeout=timeout_s)
        except BaseException:
            p.kill()
            raise
    assert p.returncode == 0, (p.returncode, err.read_text()[-2000:])
    got = json.loads(outf.read_text().splitlines()[-1])
    return got["cases"], got["peak_bytes"]


def test_special_and_huge_files_under_a_memory_limit(tmp_path):
    """Item 4: /dev/zero as a scenario, profile, trace, empirical size file, schedule file and
    replay trace; a FIFO as a trace; a 5 GiB (sparse) file as a profile."""
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    big = tmp_path / "checkpoint.json"
    with open(big, "wb") as fh:
        fh.truncate(5 << 30)
    out = str(tmp_path / "o")
    zero = "/dev/zero"
    cases = {
        "scenario": ["validate", zero],
        "profile": [
            "run",
            str(_scenario(tmp_path, hw=f'profile = "{zero}"', name="1.toml")),
            "--out",
            out,
        ],
        "trace": [
            "run",
            str(_scenario(tmp_path, traffic=f'trace = "{zero}"', name="2.toml")),
            "--out",
            out,
        ],
        "sizes": [
            "run",
            str(
                _scenario(
                    tmp_path,
                    traffic='prompt = { dist = "empirical", file = "/dev/zero", column = "a" }',
                    name="3.toml",
                )
            ),
            "--out",
            out,
        ],
        "schedule": [
            "run",
            str(
                _scenario(
                    tmp_path, auto=f'policy = "schedule"\nschedule_file = "{zero}"', name="4.toml"
                )
            ),
            "--out",
            out,
        ],
        "fifo": [
            "run",
            str(_scenario(tmp_path, traffic=f'trace = "{fifo}"', name="5.toml")),
            "--out",
            out,
        ],
        "huge": [
            "run",
            str(_scenario(tmp_path, hw=f'profile = "{big}"', name="6.toml")),
            "--out",
            out,
        ],
        "replay": ["replay", "--trace", zero, "--model", "llama-3.1-8b", "--out", out],
    }
    got, peak = run_limited(cases, tmp_path)
    for name, (rc, lines) in got.items():
        assert rc == 2 and len(lines) == 1, (name, rc, lines)
        assert "not a regular file" in lines[0] or "above the limit" in lines[0], (name, lines)
    assert "is a device" in got["scenario"][1][0] and "a FIFO" in got["fifo"][1][0]
    assert "5,120.0 MiB" in got["huge"][1][0]
    assert peak < LIMIT_AS / 4, f"peak resident set {peak / 2**20:.0f} MiB"
    assert not Path(out).exists()
    print(f"special files: {len(got)} cases, exit 2 each; child peak RSS {peak / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------------------------
# data files: numbers, field sizes, encodings, nesting (item 8, 15, 18)
def _empirical(tmp_path: Path, csv_bytes: bytes) -> Path:
    (tmp_path / "t.csv").write_bytes(csv_bytes)
    return _scenario(
        tmp_path,
        traffic='prompt = { dist = "empirical", file = "t.csv", column = "ContextTokens" }\n'
        'output = { dist = "fixed", value = 20 }',
    )


@pytest.mark.parametrize(
    "data,needles",
    [
        (b"ContextTokens\n" + b"1" * 31 + b"\n", ["row 2", "ContextTokens", "1..1,000,000,000"]),
        (b"ContextTokens\n100\n" + b"7" * 200_000 + b"\n", ["line 3", "at most 4096"]),
        (b"ContextTokens\n100\n\xe9\n", ["line 3", "byte 0xe9 is not UTF-8"]),
        (b"ContextTokens\n12.5\n30\n", ["row 2", "'12.5' is not an integer"]),
    ],
    ids=["31-digits", "200k-field", "latin-1", "float-first-row"],
)
def test_bad_size_file_is_one_line(tmp_path, capsys, data, needles):
    f = _empirical(tmp_path, data)
    rc, err = _cli(capsys, "run", f, "--out", tmp_path / "o", "--quiet")
    _one_line(rc, err, "t.csv", *needles)


def test_bom_in_a_trace_is_handled(tmp_path, capsys):
    """Item 18: a byte-order mark before the header is not part of the first column's name."""
    (tmp_path / "t.csv").write_bytes(
        b"\xef\xbb\xbfarrival_s,prompt_tokens,output_tokens\n0.5,100,10\n1.0,200,20\n"
    )
    f = _scenario(tmp_path, traffic='trace = "t.csv"')
    rc, err = _cli(capsys, "run", f, "--out", tmp_path / "o", "--quiet")
    assert rc == 0, err
    t = pq.read_table(tmp_path / "o" / "hourly.parquet")
    assert sum(t.column("requests_arrived").to_pylist()) == 2


@pytest.mark.parametrize(
    "row,needles",
    [
        ("0.0,1,9223372036854775807", ["row 2", "integers in 1..1,000,000,000"]),
        ("0.0,1," + "9" * 400, ["row 2"]),
        ("1e300,1,1", ["row 2", "arrival_s in [0, 1e9]"]),
    ],
    ids=["int64-max-output", "400-digits", "huge-time"],
)
def test_overflowing_trace_is_one_line(tmp_path, capsys, row, needles):
    """Item 15 (and item 8's overflowing trace with --requests): a token count that would wrap
    prompt + output around 64 bits is refused when the trace is read."""
    (tmp_path / "t.csv").write_text(f"arrival_s,prompt_tokens,output_tokens\n{row}\n")
    f = _scenario(tmp_path, traffic='trace = "t.csv"')
    rc, err = _cli(capsys, "run", f, "--out", tmp_path / "o", "--requests", "--quiet")
    _one_line(rc, err, "traffic.trace", *needles)


def _nested(n: int, toml: bool = False) -> str:
    return ("x = " if toml else "") + "[" * n + "]" * n


@pytest.mark.parametrize("where", ["scenario", "profile", "schedule"])
def test_deep_nesting_is_one_line(tmp_path, capsys, where):
    """Item 8: arrays nested 100,000 deep (a RecursionError in the standard parsers)."""
    deep = _nested(100_000)
    if where == "scenario":
        f = tmp_path / "s.toml"
        f.write_text("name = 'x'\n" + _nested(100_000, toml=True) + "\n")
    elif where == "profile":
        (tmp_path / "p.json").write_text('{"format": "fleetsim-profile/1", "x": ' + deep + "}")
        f = _scenario(tmp_path, hw='profile = "p.json"')
    else:
        (tmp_path / "sch.json").write_text('{"replicas_by_hour": ' + deep + "}")
        f = _scenario(tmp_path, auto='policy = "schedule"\nschedule_file = "sch.json"')
    rc, err = _cli(capsys, "run", f, "--out", tmp_path / "o", "--quiet")
    _one_line(rc, err, "nested deeper than 64")


def test_depth_scanner_ignores_brackets_in_strings():
    """Brackets inside strings and comments are not nesting (so real files are not refused)."""
    io.check_depth('a = "' + "[" * 500 + '"  # ' + "{" * 500 + "\nb = [[1]]\n", "f", toml=True)
    io.check_depth('{"a": "' + "[" * 500 + '\\"[", "b": [[1]]}', "f")
    with pytest.raises(io.UserError):
        io.check_depth("[" * 65 + "]" * 65, "f")


def test_400_digit_integer_in_a_profile(tmp_path, capsys):
    (tmp_path / "p.json").write_text(
        '{"format": "fleetsim-profile/1", "kind": "roofline", "peak_flops": 1' + "0" * 400 + "}"
    )
    f = _scenario(tmp_path, hw='profile = "p.json"')
    rc, err = _cli(capsys, "run", f, "--out", tmp_path / "o", "--quiet")
    _one_line(rc, err, "p.json", "integer of 401 digits")


@pytest.mark.parametrize(
    "body,needles",
    [
        (b"n_heads = 0", ["n_heads = 0", "greater than or equal to 1"]),
        (b'n_heads = "many"', ["n_heads = 'many'"]),
        (b"# caf\xe9\nn_heads = 32", ["line 6", "byte 0xe9"]),
    ],
    ids=["zero-heads", "string", "latin-1"],
)
def test_calibrate_model_file_is_one_line(tmp_path, capsys, body, needles):
    """Item 8: ``fleetsim calibrate --model m.toml`` with a bad architecture."""
    arch = b"n_layers = 2\nd_model = 256\nn_kv_heads = 4\nd_ff = 512\nvocab_size = 1000\n"
    (tmp_path / "m.toml").write_bytes(arch + body + b"\n")
    rc, err = _cli(capsys, "calibrate", "--model", tmp_path / "m.toml", "--device", "cpu")
    _one_line(rc, err, "--model", *needles)


# ---------------------------------------------------------------------------------------------
# fleetsim report on a malformed hourly.parquet (item 11)
def _hourly(out: Path, drop=None, rows=None, meta=None, as_string=None) -> None:
    from fleetsim.apps.report import REQUIRED_COLUMNS

    n = 2 if rows is None else rows
    cols = {"hour_start": pa.array([0, 3600][:n], type=pa.timestamp("s", tz="UTC"))}
    for c in REQUIRED_COLUMNS:
        if c == as_string:
            cols[c] = pa.array(["x"] * n)
        else:
            cols[c] = pa.array([1.0] * n)
    cols.pop(drop, None)
    t = pa.table(cols)
    if meta is not None:
        t = t.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    out.mkdir()
    pq.write_table(t, out / "hourly.parquet")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"rows": 0}, "no rows"),
        ({"drop": "total_cost_usd"}, "missing column(s) total_cost_usd"),
        ({"meta": {"fleetsim.config": "{not json"}}, "not valid JSON"),
        ({"meta": {"fleetsim.config": "[1, 2]"}}, "a JSON list, not an object"),
        ({"as_string": "utilization"}, "column utilization is string"),
    ],
    ids=["zero-rows", "missing-column", "non-json-meta", "list-meta", "string-column"],
)
def test_report_on_a_malformed_table_is_one_line(tmp_path, capsys, kw, needle):
    out = tmp_path / "X"
    _hourly(out, **kw)
    before = sorted(p.name for p in out.iterdir())
    rc, err = _cli(capsys, "report", out, "--no-flat")
    _one_line(rc, err, "hourly.parquet", needle)
    assert sorted(p.name for p in out.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# misleading messages (item 18)
def test_set_of_an_alias_replaces_the_files_name(tmp_path, capsys):
    f = _scenario(tmp_path)
    f.write_text(f.read_text() + "[fleet]\nreplicas = 2\n")
    rc = cli.main(["validate", str(f), "--set", "fleet.replicas_per_pod=3"])
    assert rc == 0
    assert '"replicas": 3' in capsys.readouterr().out
    from fleetsim.config.loading import load_scenario

    sc, _ = load_scenario(f, ["fleet.replicas_per_pod=3"])
    assert sc.fleet.replicas == 3
    f.write_text(f.read_text() + "replicas_per_pod = 4\n")  # both names in the file
    rc, err = _cli(capsys, "validate", f)
    _one_line(rc, err, "also given", "replicas_per_pod")


def test_newline_in_the_scenario_path_keeps_one_line(tmp_path, capsys):
    f = _scenario(tmp_path, name="a\nb.toml")
    rc, err = _cli(capsys, "validate", f, "--set", "fleet.replicas=-1")
    _one_line(rc, err, "a\\nb.toml", "fleet.replicas = -1")
