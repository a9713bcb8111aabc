"""Start-up: what ``fleetsim validate`` and a small run import, and the Arrow helpers that keep
pandas out of a run (simulator/results/arrow.py) against pyarrow's own conversions."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetsim.results import arrow

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "pyarrow", "pyarrow.compute", "pandas", "rich", "simpy", "scipy", "torch")
HEAVY += ("concurrent.futures", "fleetsim.results.output", "numpy.ma", "fleetsim.device.profile")
# (disaggregated pools and Mooncake traces only: an aggregated run without a trace builds neither
# module's dataclasses)
HEAVY += ("fleetsim.config.pools", "fleetsim.workload.mooncake")
HEAVY += ("pyarrow.parquet", "pyarrow.fs", "ssl")


def _imported_by(args: list[str]) -> tuple[set[str], str]:
    """The modules of :data:`HEAVY` that ``fleetsim <args>`` imports in a fresh interpreter,
    and its stderr."""
    code = (
        "import sys\n"
        "from fleetsim.apps.cli import main\n"
        f"rc = main({args!r})\n"
        f"print(rc, *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rc, *mods = p.stdout.strip().splitlines()[-1].split()
    assert rc == "0", p.stderr[-2000:]
    return set(mods), p.stderr


def test_validate_imports_no_numpy_pyarrow_pandas_or_rich():
    mods, err = _imported_by(["validate", "scenarios/default.toml"])
    assert mods == set(), mods
    assert "# model llama-3.1-70b" in err  # (it did validate and print)


def test_a_quiet_run_imports_neither_pandas_nor_pyarrow_compute_nor_rich(tmp_path):
    args = ["run", "scenarios/default.toml", "--set", "simulation.hours=1", "--set"]
    args += ["traffic.requests_per_day=20000", "--quiet", "--requests", "--out", str(tmp_path)]
    mods, _ = _imported_by(args)
    assert {"numpy", "pyarrow", "simpy"} <= mods  # (a run does need these)
    assert not mods & {"pandas", "pyarrow.compute", "rich", "scipy", "torch"}, mods
    # it writes Parquet without pyarrow.parquet's pyarrow.fs (ssl, socket)
    assert not mods & {"pyarrow.parquet", "pyarrow.fs", "ssl"}, mods
    assert "numpy.ma" not in mods  # (np.percentile's np.unique imports it: recorder.percentiles)
    assert "fleetsim.device.profile" not in mods  # (profile files' pydantic models: not needed)
    assert "concurrent.futures" not in mods  # (the process pool's module: --workers only)
    assert not mods & {"fleetsim.config.pools", "fleetsim.workload.mooncake"}, mods
    assert (tmp_path / "hourly.parquet").exists() and (tmp_path / "requests.parquet").exists()


# ---- the helpers, value by value against pyarrow ---------------------------------------------
def _same(a: pa.Array, b: pa.Array) -> None:
    """Equal type, nulls and values bit for bit (NaN equals NaN, -0.0 differs from 0.0)."""
    assert a.type == b.type
    assert len(a) == len(b) and a.null_count == b.null_count
    if pa.types.is_dictionary(a.type):
        _same(a.indices, b.indices)
        _same(a.dictionary, b.dictionary)
        return
    for x, y in zip(a.to_pylist(), b.to_pylist()):
        if isinstance(x, float) and isinstance(y, float):
            assert struct.pack("<d", x) == struct.pack("<d", y), (x, y)
        else:
            assert x == y and type(x) is type(y), (x, y)


FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-9, 9))


@settings(max_examples=60, deadline=None)
@given(st.lists(FLOATS, max_size=30), st.booleans())
def test_float_lists_equal_pyarrows_own(values, nan_is_null):
    want = pa.array(values, type=pa.float64(), from_pandas=nan_is_null or None)
    got = arrow.array(values, pa.float64(), nan_is_null=nan_is_null)
    _same(got, want)
    # NaN stays a value unless asked (pa.array's default), and is null when asked
    nan_at = [i for i, v in enumerate(values) if isinstance(v, float) and math.isnan(v)]
    assert all(got[i].is_valid != nan_is_null for i in nan_at)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-(2**40), 2**40)), max_size=30))
def test_int_lists_equal_pyarrows_own_or_raise_its_error(values):
    for t in (pa.int64(), pa.int32()):
        try:
            want = pa.array(values, type=t)
        except (OverflowError, pa.ArrowInvalid) as exc:
            with pytest.raises(type(exc)):
                arrow.array(values, t)
            continue
        _same(arrow.array(values, t), want)


def test_numpy_columns_are_zero_conversion_and_equal():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50)
    x[[3, 7]] = np.nan
    for a, t in (
        (x, pa.float64()),
        (np.rint(x[~np.isnan(x)] * 1e6).astype(np.int64), pa.int64()),
        (np.arange(24, dtype=np.int32), pa.int32()),
        (x[::2], pa.float64()),  # not contiguous
    ):
        _same(arrow.array(a, t), pa.array(a, type=t))
    _same(arrow.array(x, pa.float64(), nan_is_null=True), pa.array(x, from_pandas=True))
    # another dtype goes to pyarrow's own conversion (the same value, or its error)
    _same(arrow.array(np.arange(5), pa.int32()), pa.array(np.arange(5), type=pa.int32()))
    with pytest.raises(pa.ArrowTypeError):
        arrow.array([True, 2], pa.int64())  # (pyarrow refuses a bool as an integer)


def test_timestamps_and_strings_equal_pyarrows_own():
    t0 = datetime(2026, 3, 1, 5, 30, 15, 999_999, tzinfo=UTC)
    aware = [t0 + timedelta(hours=h) for h in range(30)] + [None]
    aware.append(datetime(2026, 3, 1, 7, tzinfo=timezone(timedelta(hours=-5))))
    naive = [datetime(2026, 1, 1) + timedelta(minutes=7 * i) for i in range(10)]
    for unit in ("s", "ms", "us"):
        for tz, vals in (("UTC", aware), (None, naive)):
            t = pa.timestamp(unit, tz=tz)
            _same(arrow.array(vals, t), pa.array(vals, type=t))
    words = ["prefill", "decode", "", None, "é ü 日本", "prefill"]
    _same(arrow.array(words, pa.string()), pa.array(words, type=pa.string()))
    status = ["ok", "rejected", "ok", "ok", "cut_at_end", "rejected"]
    typ = pa.dictionary(pa.int8(), pa.string())
    want = pa.array(status, type=pa.string()).dictionary_encode().cast(typ)
    _same(arrow.dictionary(status, typ), want)


def test_to_numpy_and_row_equal_pyarrows_own():
    a = pa.chunked_array(
        [
            pa.array([1.5, None, 3.0, float("nan")]),
            pa.array([4.0, 5.0]),
        ]
    )
    i = pa.chunked_array([pa.array([1, 2, None], type=pa.int64()), pa.array([7], type=pa.int64())])
    j = pa.chunked_array([pa.array(np.arange(10, dtype=np.int32)).slice(3, 4)])  # an offset
    for col in (a, i, j, a.slice(2, 3), pa.chunked_array([], type=pa.float64())):
        want = col.to_numpy()
        got = arrow.to_numpy(col)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    ts = pa.array([datetime(2026, 1, 1, h, tzinfo=UTC) for h in range(3)], pa.timestamp("s", "UTC"))
    tab = pa.table({"t": ts, "x": pa.array([1.0, None, 2.0]), "s": pa.array(["a", "b", None])})
    for r in range(3):
        assert arrow.row(tab, r) == tab.slice(r, 1).to_pylist()[0]


def test_a_runs_tables_equal_the_ones_pa_table_builds(monkeypatch):
    """The hourly and per-pool tables of a small disaggregated run: built from buffers, equal
    to ``pa.table`` of the same columns."""
    import fleetsim

    built = []
    fast = arrow.table

    def checked(columns, schema):
        got = fast(columns, schema)
        assert got.equals(pa.table({f.name: columns[f.name] for f in schema}, schema=schema))
        built.append(schema.names[2])
        return got

    monkeypatch.setattr(arrow, "table", checked)
    run = fleetsim.simulate(
        str(ROOT / "scenarios" / "disaggregated.toml"),
        {"simulation.hours": 2, "traffic.requests_per_day": 20000, "fleet.pods": 1},
    )
    assert run.hourly.num_rows == 2 and run.result.pools is not None
    assert len(built) >= 2  # the hourly table and the pools table


def test_parquet_files_are_the_bytes_pyarrow_parquet_writes(tmp_path):
    """results/output.py writes through pyarrow's file writer without pyarrow.parquet: the
    files are byte for byte pyarrow.parquet's (write_table, and ParquetWriter in row groups with
    key-value metadata as RequestWriter uses it)."""
    import io

    import pyarrow.parquet as pq

    from fleetsim.results.output import parquet_writer, request_schema, write_parquet

    ts = pa.array([datetime(2026, 1, 1, h, tzinfo=UTC) for h in range(4)], pa.timestamp("s", "UTC"))
    tab = pa.table(
        {
            "t": ts,
            "x": pa.array([1.5, math.nan, None, -0.0]),
            "n": pa.array([1, None, 3, 2**40], pa.int64()),
            "i": pa.array([1, 2, 3, 4], pa.int32()),
            "s": pa.array(["a", "b", None, "a"]),
            "d": pa.array(["on", "off", "on", "on"]).dictionary_encode(),
        }
    ).replace_schema_metadata({b"fleetsim.scenario": b"x = 1", b"k": b"v"})
    want, got = io.BytesIO(), io.BytesIO()
    pq.write_table(tab, want)
    write_parquet(tab, got)
    assert got.getvalue() == want.getvalue() and len(want.getvalue()) > 1000
    # the request stream's way: row groups, then key-value metadata, then close
    schema = request_schema()
    rows = pa.table(
        {f.name: pa.array([None, None], f.type) for f in schema if f.name != "status"}
        | {"status": pa.array(["completed", "rejected"]).dictionary_encode().cast(schema[-1].type)},
        schema=schema,
    )
    files = []
    for make in (lambda fh: pq.ParquetWriter(fh, schema), lambda fh: parquet_writer(fh, schema)):
        fh = io.BytesIO()
        w = make(fh)
        w.write_table(rows)
        w.write_table(rows)
        w.add_key_value_metadata({"fleetsim.version": "1"})
        w.close()
        files.append(fh.getvalue())
    assert files[0] == files[1]
    assert pq.read_table(io.BytesIO(files[1])).num_rows == 4


def test_the_program_runs_openblas_on_one_thread_unless_told():
    """numpy's OpenBLAS pool (threads spinning beside a run that does no linear algebra) is
    one thread when fleetsim is the program; a value in the environment is kept, and in-process
    callers' environment is left alone."""
    code = (
        "import os, sys\n"
        "sys.argv = ['fleetsim', 'validate', 'scenarios/default.toml']\n"
        "import atexit\n"
        "blas = lambda: print('blas', os.environ.get('OPENBLAS_NUM_THREADS'), flush=True)\n"
        "atexit.register(blas)\n"
        "from fleetsim.apps.cli import main\n"
        "sys.exit(main())\n"
    )
    for env_value, want in ((None, "1"), ("3", "3")):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        if env_value is not None:
            env["OPENBLAS_NUM_THREADS"] = env_value
        p = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.splitlines()[-1] == f"blas {want}"
    code = (
        "import os\n"
        "from fleetsim.apps.cli import main\n"
        "rc = main(['validate', 'scenarios/default.toml'])\n"
        "print(rc, os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.stdout.splitlines()[-1] == "0 None", p.stderr[-2000:]


def test_pool_day_totals_equal_the_pandas_groupby_it_replaces():
    pd = pytest.importorskip("pandas")  # (a dev dependency: present wherever the tests run)
    from fleetsim.results.accounting import POOLS_SCHEMA
    from fleetsim.results.summary import pool_day_totals

    rng = np.random.default_rng(11)
    n = 48
    cols = {}
    for f in POOLS_SCHEMA:
        if pa.types.is_floating(f.type):
            v = list(rng.lognormal(size=n) * 1e3)
            if f.name.startswith("kv_transfer_") and f.name != "kv_transfer_bytes":
                v = [None if k % 3 == 0 else x for k, x in enumerate(v)]
        elif pa.types.is_integer(f.type):
            v = [int(x) for x in rng.integers(0, 10_000, size=n)]
        elif pa.types.is_timestamp(f.type):
            v = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=k // 2) for k in range(n)]
        else:
            v = ["prefill" if k % 2 == 0 else "decode" for k in range(n)]
        cols[f.name] = v
    table = pa.table(cols, schema=POOLS_SCHEMA)

    def old(pools):  # the pandas version this replaces (summary.py before the start-up work)
        df = pools.to_pandas()
        out = {}
        for name, g in df.groupby("pool", sort=False):
            d = {
                c: float(g[c].sum())
                for c in (
                    "gpu_busy_s",
                    "energy_facility_kwh",
                    "energy_cost_usd",
                    "hardware_cost_usd",
                    "total_cost_usd",
                    "kv_transfers",
                    "kv_transfer_bytes",
                    "prefix_hit_tokens",
                    "preemptions",
                )
            }
            d["gpu_hours"] = float(g["gpus_powered_mean"].sum())
            d["utilization"] = d["gpu_busy_s"] / (d["gpu_hours"] * 3600.0)
            n_ = g["kv_transfers"].to_numpy()
            mean = g["kv_transfer_mean_s"].to_numpy(dtype=float, na_value=math.nan)
            p99 = g["kv_transfer_p99_s"].to_numpy(dtype=float, na_value=math.nan)
            d["kv_transfer_mean_s"] = float((n_ * np.nan_to_num(mean)).sum() / n_.sum())
            d["kv_transfer_worst_hour_p99_s"] = float(np.nanmax(p99))
            out[str(name)] = d
        return out

    assert isinstance(pd.__version__, str)
    want, got = old(table), pool_day_totals(table)
    assert list(got) == list(want) == ["prefill", "decode"]
    for name in want:
        assert got[name] == want[name]  # bit for bit (the same sums in the same order)


# ---- the program's exit (apps/cli.py _exit_now) -----------------------------------------------
_PROGRAM = """
import atexit, gc, os, sys
real = os._exit
def traced(rc):
    print("os._exit", rc, flush=True)
    print("gc", gc.isenabled(), gc.get_freeze_count() > 0, flush=True)
    real(rc)
os._exit = traced
atexit.register(lambda: print("atexit handler ran", flush=True))
sys.argv = ["fleetsim", *sys.argv[1:]]
from fleetsim.apps.cli import main
sys.exit(main())
"""


def _program(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PROGRAM, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_program_exits_at_once_with_its_output_flushed_and_atexit_run(tmp_path):
    import json

    args = ["run", "scenarios/default.toml", "--set", "simulation.hours=1", "--set"]
    args += ["traffic.requests_per_day=2000", "--json", "--out", str(tmp_path)]
    p = _program(args)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    # the JSON document whole, then the atexit handler, then the exit without teardown; the
    # garbage collector, paused for the start, ran for the simulation with the start frozen
    assert lines[-3:] == ["atexit handler ran", "os._exit 0", "gc True True"]
    doc = json.loads("\n".join(lines[:-3]))
    assert doc["hours"] == 1 and doc["totals"]["requests_completed"] > 0
    assert (tmp_path / "hourly.parquet").exists()
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "hourly.parquet").num_rows == 1


def test_a_refused_input_exits_with_its_code_the_same_way():
    p = _program(["validate", "scenarios/default.toml", "--set", "fleet.replicas=0"])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout.splitlines()[-3:] == ["atexit handler ran", "os._exit 2", "gc False False"]
    assert p.stderr.count("\n") == 1 and "replicas" in p.stderr  # one line naming the field


def test_in_process_callers_keep_their_garbage_collector():
    """Only the program pauses the collector for its start (cli._pause_gc): main(argv) from
    Python leaves it as it was, enabled and with nothing frozen."""
    import gc

    from fleetsim.apps.cli import main

    frozen = gc.get_freeze_count()
    assert main(["validate", "scenarios/default.toml", "--json"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen


# ---- the version without importlib.metadata; pydantic's plugin loader stood in for ----------
def test_the_version_constant_is_the_installed_distributions_and_pyprojects():
    """base/version.py is the one source: pyproject.toml reads it (dynamic version), so the
    installed metadata (what pip shows) says the same."""
    import importlib.metadata
    import tomllib

    from fleetsim.base.version import __version__

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in py["project"] and "version" in py["project"]["dynamic"]
    attr = py["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "fleetsim.base.version.__version__"
    assert importlib.metadata.version("fleetsim") == __version__
    assert __version__.count(".") == 2 and all(p.isdigit() for p in __version__.split("."))


def _plugins_child(code: str, env_value: str | None) -> list[str]:
    """The last stdout line of ``code`` run after ``pydantic_plugins.install()`` in a fresh
    interpreter with PYDANTIC_DISABLE_PLUGINS = ``env_value`` (None: unset), split."""
    import os

    env = dict(os.environ)
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    if env_value is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = env_value
    head = "import sys\nfrom fleetsim.apps import pydantic_plugins as pp\nok = pp.install()\n"
    p = subprocess.run(
        [sys.executable, "-c", head + code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1].split()


_BUILD = (
    "from pydantic import BaseModel\n"
    "class M(BaseModel):\n    x: int = 1\n"
    "assert M(x=2).x == 2\n"
    "from pydantic.plugin import _schema_validator as sv\n"
)


def test_with_plugins_off_models_build_without_importlib_metadata():
    out = _plugins_child(
        _BUILD + "print(ok, 'importlib.metadata' in sys.modules, "
        "sys.modules['pydantic.plugin._loader'] is pp, type(M.__pydantic_validator__).__name__)",
        "__all__",
    )
    # installed, used by pydantic (the module it imports get_plugins from), no metadata import,
    # and the plain validator that pydantic builds when no plugin is installed
    assert out == ["True", "False", "True", "SchemaValidator"]


def test_with_plugins_on_pydantics_own_loader_is_kept_or_taken_back():
    """Not installed unless every plugin is off; turned back on later, pydantic's own loader
    takes over (and looks for plugins, i.e. reads the installed distributions' metadata)."""
    code = _BUILD + "print(ok, 'importlib.metadata' in sys.modules)"
    assert _plugins_child(code, None) == ["False", "True"]
    assert _plugins_child(code, "") == ["False", "True"]
    assert _plugins_child(code, "some_plugin") == ["False", "True"]
    later = (
        "import os\nos.environ['PYDANTIC_DISABLE_PLUGINS'] = ''\n" + _BUILD + "print(ok, "
        "'importlib.metadata' in sys.modules, sys.modules['pydantic.plugin._loader'] is pp, "
        "sys.modules['pydantic.plugin._loader']._plugins == {})"
    )
    assert _plugins_child(later, "1") == ["True", "True", "False", "True"]


def test_the_program_stands_in_for_the_loader_and_main_argv_does_not():
    """``fleetsim validate`` (the program) skips importlib.metadata; a caller of ``main(argv)``
    keeps pydantic's own loader (and whatever plugins its environment enables)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    code = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('META', 'importlib.metadata' in sys.modules, "
        "type(sys.modules.get('pydantic.plugin._loader')).__name__, flush=True))\n"
        "from fleetsim.apps.cli import main\n"
        "sys.argv = ['fleetsim', 'validate', 'scenarios/default.toml']\n"
        "sys.exit(main())\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.decode().strip().splitlines()[-1] == "META False module"
    code2 = (
        "import sys\nfrom fleetsim.apps.cli import main\n"
        "rc = main(['validate', 'scenarios/default.toml'])\n"
        "print(rc, sys.modules['pydantic.plugin._loader'].__name__)\n"
    )
    p2 = subprocess.run([sys.executable, "-c", code2], cwd=ROOT, env=env, capture_output=True)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert p2.stdout.decode().strip().splitlines()[-1].split() == ["0", "pydantic.plugin._loader"]
