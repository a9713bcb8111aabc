"""One reader, enforced (issue #23): every file a user names reaches fleetsim through
``fleetsim.base.io`` (regular file only, no blocking, size limit, UTF-8 with its line named).

The test walks the syntax tree of every module of the installed package (``simulator/`` and
``calibrate/``) and lists each call that opens or reads a file by itself: ``open()``,
``os.open``, ``Path.open``/``read_text``/``read_bytes``, ``json.load``, ``tomllib.load``, numpy,
pandas and pyarrow file readers. A call outside ``base/io.py`` must be in :data:`ALLOWED` (file,
function, call) with the reason it is not a user's file; a new one fails the test, and so does
an entry that no longer matches anything (the list stays exact). A pyarrow reader given the
bytes that ``io`` read (``pa.BufferReader(...)``) or a file ``io.open_binary`` opened is fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("simulator", "calibrate")
READER = "simulator/base/io.py"

# method names that open or read a file whatever the receiver is
OPENERS = {"open", "read_text", "read_bytes"}
# module.function pairs that read a file named by their first argument
MODULE_READERS = {
    "json": {"load"},
    "tomllib": {"load"},
    "np": {"load", "loadtxt", "genfromtxt", "fromfile", "memmap"},
    "numpy": {"load", "loadtxt", "genfromtxt", "fromfile", "memmap"},
    "pd": {"read_csv", "read_json", "read_parquet", "read_table", "read_pickle"},
    "pq": {"read_table", "read_schema", "read_metadata", "ParquetFile", "read_pandas"},
    "pacsv": {"read_csv", "open_csv"},
    "pa": {"memory_map", "OSFile"},
    "codecs": {"open"},
    "pickle": {"load"},
}
# a first argument built by one of these holds bytes fleetsim.base.io already read or opened
SAFE_SOURCES = {"BufferReader", "py_buffer", "BytesIO", "StringIO", "open_binary"}
# receivers whose read_text/read_bytes/open ARE the bounded reader (fleetsim.base.io as io/fio)
SAFE_RECEIVERS = {"io", "fio"}

ALLOWED: dict[tuple[str, str, str], str] = {
    ("simulator/results/output.py", "RunOutput._lock", "os.open"): (
        "creates/opens fleetsim's own lock file with O_EXCL/O_NOFOLLOW, one link checked"
    ),
    ("simulator/results/output.py", "_write_probe", "os.open"): (
        "writes a new probe file in fleetsim's own staging folder (O_EXCL, O_NOFOLLOW)"
    ),
    ("simulator/api.py", "simulate", "pq.read_table"): (
        "reads back the request table it has just written into its own TemporaryDirectory"
    ),
    ("simulator/apps/crossover.py", "scaled_trace", ".open"): (
        "writes fleetsim's own copy of the trace into its own TemporaryDirectory"
    ),
    ("simulator/device/catalog/__init__.py", "_text", "open"): (
        "reads a catalog TOML shipped inside the package, beside the module: no user path"
    ),
    ("simulator/device/catalog/__init__.py", "_text", ".read_bytes"): (
        "the same packaged file through importlib.resources where the package is not a folder"
    ),
    ("calibrate/power.py", "RaplMeter.__init__", ".read_text"): (
        "reads the kernel's RAPL counters under /sys/class/powercap, no user path"
    ),
    ("calibrate/power.py", "RaplMeter.read", ".read_text"): "reads the RAPL energy counter",
    ("calibrate/run.py", "device_name", ".read_text"): "reads /proc/cpuinfo, no user path",
    ("calibrate/mlenergy.py", "simulate_config", "open"): (
        "writes fleetsim's own trace into its own TemporaryDirectory"
    ),
    ("simulator/results/output.py", "RunOutput.__enter__", ".open"): (
        "RunOutput.open(): opens an output folder (lock, checks), not a file"
    ),
}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    return ""


def _is_safe_arg(call: ast.Call, safe_names: set[str]) -> bool:
    if not call.args:
        return False
    a = call.args[0]
    return _name(a) in SAFE_SOURCES or (isinstance(a, ast.Name) and a.id in safe_names)


def file_reads(source: str) -> list[tuple[str, str, int]]:
    """(enclosing function, call, line) of every call in ``source`` that opens or reads a file
    by itself (not through fleetsim.base.io)."""
    tree = ast.parse(source)
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: list[str], safe: set[str]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            scope, safe = [*scope, node.name], set()
        if isinstance(node, ast.With):  # with io.open_binary(...) as fh: fh is io's file
            for item in node.items:
                v = item.optional_vars
                if isinstance(v, ast.Name) and _name(item.context_expr) in SAFE_SOURCES:
                    safe.add(v.id)
        if isinstance(node, ast.Call):
            f = node.func
            what = ""
            if isinstance(f, ast.Name) and f.id == "open":
                what = "open"
            elif isinstance(f, ast.Attribute):
                recv = f.value
                mod = recv.id if isinstance(recv, ast.Name) else ""
                if mod in MODULE_READERS and f.attr in MODULE_READERS[mod]:
                    what = "" if _is_safe_arg(node, safe) else f"{mod}.{f.attr}"
                elif f.attr == "open" and mod == "os":
                    what = "os.open"
                elif (
                    f.attr in OPENERS
                    and mod not in SAFE_RECEIVERS
                    # RunOutput(...).open() opens an output folder (locked, checked), not a file
                    and not (f.attr == "open" and _name(recv) == "RunOutput")
                ):
                    what = f".{f.attr}"
            if what:
                found.append((".".join(scope) or "<module>", what, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, safe)

    visit(tree, [], set())
    return found


def scan() -> dict[tuple[str, str, str], list[int]]:
    hits: dict[tuple[str, str, str], list[int]] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if rel == READER:
                continue
            for scope, what, line in file_reads(f.read_text()):
                hits.setdefault((rel, scope, what), []).append(line)
    return hits


def test_every_file_read_goes_through_base_io():
    """No module outside base/io.py opens or reads a file by itself, except the listed,
    justified cases (fleetsim's own files, packaged data, /proc and /sys)."""
    hits = scan()
    new = {k: v for k, v in hits.items() if k not in ALLOWED}
    assert not new, "files read outside fleetsim.base.io (route them through it): " + "; ".join(
        f"{f}:{lines[0]} in {scope}: {what}" for (f, scope, what), lines in sorted(new.items())
    )
    stale = [k for k in ALLOWED if k not in hits]
    assert not stale, f"ALLOWED entries that match nothing (remove them): {stale}"


def test_the_scan_finds_a_deliberate_open():
    """The scanner flags each way of opening a user's path and passes the sanctioned ones."""
    src = """
import json, os
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pathlib import Path
from fleetsim.base import io

def read_user(path):
    with open(path) as fh:
        a = fh.read()
    b = Path(path).read_text()
    c = json.load(open(path))
    d = np.load(path)
    e = pq.read_table(path)
    f = os.open(path, os.O_RDONLY)
    g = Path(path).open("rb")
    return a, b, c, d, e, f, g

def fine(path):
    x = io.read_text(path, "scenario")
    y = pq.read_table(pa.BufferReader(io.read_bytes(path, "t")))
    with io.open_binary(path, "t") as fh:
        z = pq.read_schema(fh)
    return x, y, z, RunOutput(path).open()
"""
    got = [(s, w) for s, w, _ in file_reads(src)]
    assert got == [
        ("read_user", "open"),
        ("read_user", ".read_text"),
        ("read_user", "json.load"),
        ("read_user", "open"),
        ("read_user", "np.load"),
        ("read_user", "pq.read_table"),
        ("read_user", "os.open"),
        ("read_user", ".open"),
    ]
