"""Start-up benchmark: what fleetsim costs before (and around) the first simulated event.

Each figure is a whole process, timed from its start to its exit, repeated ``--repeat`` times;
the minimum is the figure (the least disturbed run: other load only ever adds time), the
median is printed beside it. Wall seconds and CPU seconds (user + system of the child, from
``getrusage``) are both printed: on a shared machine the CPU seconds move far less with the
load than the wall seconds do.

* ``python -c pass``: the interpreter alone (the floor);
* ``import fleetsim``: the package (the Python API imports lazily);
* ``fleetsim validate scenarios/default.toml``: load, resolve, print (goal < 0.25 s);
* ``fleetsim run`` of a small day: the default scenario at 21,556 requests a day on one
  replica (goal < 0.6 s), ``--quiet``, output to a temporary folder;

then that run by phase (CPU seconds inside one process: imports, loading, resolving,
simulating, writing), the CPU seconds of the import groups (numpy, pyarrow, pydantic, the
schema...), and the slowest imports of ``validate`` and of the run (``python -X importtime``,
cumulative, one run each; wall time, so noisy on a loaded machine) with the heavy modules each
one imports.

    python bench/bench_startup.py
    python bench/bench_startup.py --repeat 20 --pythonpath /tmp/old   # another tree beside

``--instructions``: each case's instruction count as well (``valgrind --tool=callgrind``, one
run per tree, ~50x slower than the run itself): unlike the seconds it does not move with the
machine's load (within ~0.3 % run to run), so a change of a few ms shows on a shared machine.

``--pythonpath OLD``: a folder holding another ``fleetsim`` package (e.g. ``git archive`` of an
older commit with ``simulator/`` renamed ``fleetsim/`` and ``calibrate/`` moved into it as
``fleetsim/calibrate``); every case then runs for both trees, alternating old and new run by
run so that a change of load hits both alike, and the table shows old, new and the ratio.

Bytecode: the children run with their own ``PYTHONPYCACHEPREFIX`` (a temporary folder, or
``--pycache DIR``) after one untimed warm-up run of each case, so both trees run from cached
bytecode, as an installed package does, and neither tree is written to.
``PYTHONDONTWRITEBYTECODE=1`` without a ``__pycache__`` in the tree instead compiles
fleetsim's modules on every start (validate: ~0.03 CPU s more; bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = str(ROOT / "scenarios" / "default.toml")
SMALL_DAY = ["--set", "traffic.requests_per_day=21556", "--set", "fleet.replicas=1", "--quiet"]
#: modules that a command should import only when it needs them
HEAVY = ("numpy", "pyarrow", "pyarrow.compute", "pandas", "pydantic", "rich", "simpy", "scipy")


def timed_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run of ``argv`` (which must exit 0)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def import_profile(argv: list[str], env: dict[str, str], n: int) -> tuple[list, list[str]]:
    """The ``n`` largest cumulative import times of ``argv`` run with ``-X importtime``
    (seconds, module), and which of :data:`HEAVY` it imported."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", *argv[1:]],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    rows = []
    names = set()
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = (x.strip() for x in line[len("import time:") :].split("|"))
        rows.append((int(cum) / 1e6, name))
        names.add(name)
    return sorted(rows, reverse=True)[:n], [m for m in HEAVY if m in names]


#: import groups, in a run's order: (label, modules imported together)
GROUPS = (
    ("numpy", "numpy"),
    ("pyarrow", "pyarrow"),
    ("pyarrow._parquet (the writer; not pyarrow.parquet)", "pyarrow._parquet"),
    ("pydantic (pydantic.main)", "pydantic.main"),
    ("the scenario schema (pydantic's first model incl.)", "fleetsim.config.schema"),
    ("config loading and resolve, device model", "fleetsim.config.loading+fleetsim.config.resolve"),
    ("simpy", "simpy"),
    (
        "serving, simulate, results modules",
        "fleetsim.serving.pod+fleetsim.apps.simulate+fleetsim.results.result"
        "+fleetsim.results.summary",
    ),
)
_GROUP_CODE = """
import importlib, resource, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
out = []
for g in sys.argv[1:]:
    c = cpu()
    for m in g.split("+"):
        importlib.import_module(m)
    out.append(cpu() - c)
print(" ".join(repr(x) for x in out))
"""
#: a run timed by phase inside one process: the CLI's own functions wrapped
_PHASE_CODE = """
import atexit, importlib, resource, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
marks = [("start", cpu())]
import fleetsim.apps.cli as cli
if hasattr(cli, "_pause_gc"):  # the program pauses the collector before its imports (main())
    cli._pause_gc()
for mod, fn in (("fleetsim.config.loading", "load_scenario"), ("fleetsim.config.resolve",
        "resolve"), ("fleetsim.apps.simulate", "simulate"), ("fleetsim.apps.simulate",
        "write_outputs")):
    m = importlib.import_module(mod)
    f = getattr(m, fn)
    def w(*a, _f=f, _n=fn, **k):
        marks.append(("before " + _n, cpu()))
        try:
            return _f(*a, **k)
        finally:
            marks.append((_n, cpu()))
    setattr(m, fn, w)
marks.append(("imports", cpu()))
# as the program runs (main() without argv: its start-up and exit as `fleetsim` has them); the
# marks are printed at the exit, which may skip the interpreter's teardown (atexit still runs)
atexit.register(lambda: print(repr(marks + [("end", cpu())]), flush=True))
sys.argv = ["fleetsim", *sys.argv[1:]]
sys.exit(cli.main())
"""
PHASES = ("imports", "load_scenario", "resolve", "simulate", "write_outputs", "rest")


def instructions(argv: list[str], env: dict[str, str]) -> float | None:
    """Instructions (millions) that ``argv`` executes, counted by callgrind; None without
    valgrind."""
    import shutil

    vg = shutil.which("valgrind")
    if vg is None:
        return None
    p = subprocess.run(
        [vg, "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"callgrind {' '.join(argv)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    for line in p.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1]) / 1e6
    return None


def import_groups(env: dict[str, str], n: int) -> list[float]:
    """CPU seconds of each of :data:`GROUPS`, imported in order in a fresh process (min of n)."""
    best: list[float] = []
    for _ in range(n):
        p = subprocess.run(
            [sys.executable, "-c", _GROUP_CODE, *(m for _, m in GROUPS)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        v = [float(x) for x in p.stdout.split()]
        best = v if not best else [min(a, b) for a, b in zip(best, v)]
    return best


def run_phases(argv: list[str], env: dict[str, str], n: int) -> dict[str, float]:
    """CPU seconds of a run by phase: imports (the interpreter's own start excluded), loading,
    resolving, simulating, writing, the rest (summary, exit); min of n per phase."""
    import ast

    best: dict[str, float] = {}
    for _ in range(n):
        p = subprocess.run(
            [sys.executable, "-c", _PHASE_CODE, *argv],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        marks = dict(ast.literal_eval(p.stdout.strip().splitlines()[-1]))
        d = {"imports": marks["imports"] - marks["start"]}
        prev = marks["imports"]
        for ph in PHASES[1:-1]:
            d["imports"] += marks[f"before {ph}"] - prev  # (the CLI's lazy imports between)
            d[ph] = marks[ph] - marks[f"before {ph}"]
            prev = marks[ph]
        d["rest"] = marks["end"] - prev
        best = d if not best else {k: min(best[k], d[k]) for k in d}
    return best


def _env(base: dict[str, str], pythonpath: str | None, pycache: str) -> dict[str, str]:
    env = dict(base)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # (cached bytecode, in the private prefix)
    env["PYTHONPYCACHEPREFIX"] = pycache
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=10, help="runs per figure (default 10)")
    ap.add_argument("--pythonpath", help="a folder with another fleetsim package to time beside")
    ap.add_argument("--imports", type=int, default=12, help="slowest imports listed")
    ap.add_argument("--pycache", help="the children's bytecode folder (default: a temporary one)")
    ap.add_argument(
        "--instructions", action="store_true", help="instruction counts too (valgrind callgrind)"
    )
    args = ap.parse_args(argv)
    py = [sys.executable]
    with tempfile.TemporaryDirectory() as tmp:
        pycache = args.pycache or str(Path(tmp) / "pycache")
        trees = {"new": _env(dict(os.environ), None, pycache)}
        if args.pythonpath:
            trees = {"old": _env(dict(os.environ), args.pythonpath, pycache), **trees}
        out = str(Path(tmp) / "out")
        cases = [
            ("python -c pass", [*py, "-c", "pass"]),
            ("import fleetsim", [*py, "-c", "import fleetsim"]),
            ("fleetsim validate default.toml", [*py, "-m", "fleetsim", "validate", SCENARIO]),
            (
                "fleetsim run default.toml, 21,556 req/day, 1 replica",
                [*py, "-m", "fleetsim", "run", SCENARIO, *SMALL_DAY, "--out", out, "--force"],
            ),
        ]
        for _, cmd in cases:  # warm-up: bytecode compiled and cached, files in the page cache
            for env in trees.values():
                timed_once(cmd, env)
        print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores shared: see the CPU s)")
        head = "".join(f"{t + ' wall':>10} {t + ' cpu':>9}" for t in trees)
        print(f"{'min of ' + str(args.repeat) + ' runs (s)':54}{head}" + ("   new/old" * 2))
        for name, cmd in cases:
            res: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
            for _ in range(args.repeat):
                for t, env in trees.items():  # alternating: load changes hit both trees
                    res[t].append(timed_once(cmd, env))
            mins = {t: (min(w for w, _ in v), min(c for _, c in v)) for t, v in res.items()}
            row = "".join(f"{mins[t][0]:10.3f} {mins[t][1]:9.3f}" for t in trees)
            if "old" in trees:
                (wo, co), (wn, cn) = mins["old"], mins["new"]
                row += f"{wn / wo:10.2f}{cn / co:10.2f}"
            print(f"{name:54}{row}")
            med = "".join(
                f"{statistics.median(w for w, _ in res[t]):10.3f} "
                f"{statistics.median(c for _, c in res[t]):9.3f}"
                for t in trees
            )
            print(f"{'  (median)':54}{med}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.instructions:
            print("\ninstructions, millions (callgrind, one run each: independent of the load)")
            print(
                f"  {'':52}"
                + "".join(f"{t:>9}" for t in trees)
                + ("   new/old" if "old" in trees else "")
            )
            for name, cmd in cases:
                ins = {t: instructions(cmd, env) for t, env in trees.items()}
                if any(v is None for v in ins.values()):
                    print("  (valgrind not found)")
                    break
                row = "".join(f"{ins[t]:9.1f}" for t in trees)
                if "old" in trees:
                    row += f"{ins['new'] / ins['old']:10.3f}"  # type: ignore[operator]
                print(f"  {name:52}{row}")
        n = min(args.repeat, 5)
        run_argv = cases[-1][1][3:]  # (the run's arguments after `python -m fleetsim`)
        print(f"\nthe run by phase, CPU s, min of {n} (in one process; the CLI's functions timed)")
        phases = {t: run_phases(run_argv, env, n) for t, env in trees.items()}
        print(f"  {'':50}" + "".join(f"{t:>9}" for t in trees))
        for ph in PHASES:
            print(f"  {ph:50}" + "".join(f"{phases[t][ph]:9.3f}" for t in trees))
        print(f"\nimport groups, CPU s, min of {n} (each imported in this order, fresh process)")
        groups = {t: import_groups(env, n) for t, env in trees.items()}
        print(f"  {'':50}" + "".join(f"{t:>9}" for t in trees))
        for i, (label, _) in enumerate(GROUPS):
            print(f"  {label:50}" + "".join(f"{groups[t][i]:9.3f}" for t in trees))
        for t, env in trees.items():
            for name, cmd in cases[2:]:
                top, heavy = import_profile(cmd, env, args.imports)
                print(f"\n{t}: {name}: imports {', '.join(heavy) or 'none of ' + str(HEAVY)}")
                print("  slowest imports (cumulative s, one run, wall):")
                for s, mod in top:
                    print(f"    {s:7.3f}  {mod}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
