"""Whole ``fleetsim run`` processes of several source trees, in turn: CPU and wall seconds.

For before/after timings on a shared machine: each repetition runs every tree once, in the order
given, so that the trees see the same load; the minimum over the repetitions is printed.

    python bench/alternate.py 3 scenarios/default.toml -- main=/tmp/old new=
    python bench/alternate.py 2 scenarios/disaggregated.toml --set simulation.hours=4 -- a=/tmp/a b=

Each ``NAME=PATH`` names a tree by the ``PYTHONPATH`` under which ``python -m fleetsim`` runs it
(a folder holding a ``fleetsim`` package, e.g. ``git archive`` of ``simulator/`` renamed, with
``calibrate/`` as ``fleetsim/calibrate``); an empty path is the installed package. CPU is user +
system time of the child process (``getrusage``).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time


def main(argv: list[str]) -> int:
    if len(argv) < 4 or "--" not in argv:
        print(__doc__)
        return 2
    reps = int(argv[0])
    i = argv.index("--")
    run_args = [os.path.abspath(argv[1]), *argv[2:i]]
    trees = [t.split("=", 1) for t in argv[i + 1 :]]
    res: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in trees}
    for rep in range(reps):
        for name, path in trees:
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path
            with tempfile.TemporaryDirectory() as out:
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "fleetsim", "run", *run_args]
                cmd += ["--out", out, "--force", "--quiet"]
                subprocess.run(cmd, env=env, check=True, cwd=tempfile.gettempdir())
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            res[name].append((cpu, wall))
            load = os.getloadavg()[0]
            print(f"{name} run {rep + 1}: CPU {cpu:.2f} s, wall {wall:.2f} s, load {load:.1f}")
    for name, v in res.items():
        cpu_min, wall_min = min(c for c, _ in v), min(w for _, w in v)
        print(f"{name}: min CPU {cpu_min:.2f} s, min wall {wall_min:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
