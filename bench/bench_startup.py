"""Start-up benchmark: what fleetsim costs before (and around) the first simulated event.

Each figure is a whole process, timed from its start to its exit, repeated ``--repeat`` times;
the minimum is the figure (the least disturbed run: other load only ever adds time), the
median is printed beside it:

* ``python -c pass``: the interpreter alone (the floor);
* ``import fleetsim``: the package (the Python API imports lazily);
* ``fleetsim validate scenarios/default.toml``: load, resolve, print (goal < 0.25 s);
* ``fleetsim run`` of a small day: the default scenario at 21,556 requests a day on one
  replica (goal < 0.6 s), output to a temporary folder;

then the slowest imports of ``validate`` (``python -X importtime``, cumulative, one run).

    python bench/bench_startup.py
    python bench/bench_startup.py --repeat 20 --pythonpath /tmp/old-tree   # another tree

``--pythonpath``: a folder holding a ``fleetsim`` package, put first on the children's
PYTHONPATH, to time another version of the code in the same sitting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = str(ROOT / "scenarios" / "default.toml")
SMALL_DAY = ["--set", "traffic.requests_per_day=21556", "--set", "fleet.replicas=1", "--quiet"]


def timed(argv: list[str], env: dict[str, str], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` runs of ``argv`` (each must exit 0)."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return out


def slowest_imports(env: dict[str, str], n: int) -> list[tuple[float, str]]:
    """The ``n`` largest cumulative import times of ``validate`` (seconds, module)."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fleetsim", "validate", SCENARIO],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = (x.strip() for x in line[len("import time:") :].split("|"))
        rows.append((int(cum) / 1e6, name))
    return sorted(rows, reverse=True)[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=10, help="runs per figure (default 10)")
    ap.add_argument("--pythonpath", help="a folder with another fleetsim package to time")
    ap.add_argument("--imports", type=int, default=15, help="slowest imports listed")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, env.get("PYTHONPATH", "")])
    py = [sys.executable]
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            ("python -c pass", [*py, "-c", "pass"]),
            ("import fleetsim", [*py, "-c", "import fleetsim"]),
            ("fleetsim validate default.toml", [*py, "-m", "fleetsim", "validate", SCENARIO]),
            (
                "fleetsim run default.toml, 21,556 req/day, 1 replica",
                [*py, "-m", "fleetsim", "run", SCENARIO, *SMALL_DAY, "--out", tmp, "--force"],
            ),
        ]
        print(f"{'':54} {'min s':>7} {'median s':>9}   ({args.repeat} runs each)")
        for name, cmd in cases:
            ts = timed(cmd, env, args.repeat)
            print(f"{name:54} {min(ts):7.3f} {statistics.median(ts):9.3f}")
    print(f"\nslowest imports of validate (cumulative s, one run, {sys.executable}):")
    for s, name in slowest_imports(env, args.imports):
        print(f"  {s:7.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
