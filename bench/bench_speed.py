"""Speed benchmark: simulated requests per wall-second for days of 10k .. 10M requests.

Each size runs as its own process, timed from process start to the written hourly.parquet
(the whole `fleetsim run` command), on the default scenario's model and traffic shape with the
fleet scaled to the load (8 replicas per million requests a day, 1 at least). It prints wall
seconds, simulated requests per wall-second (and per CPU-second of the process: the figure to
compare on a loaded machine), SimPy events and engine iterations per request and
peak RSS; it also times the per-iteration reference mode at 100k and prints the ratio.

    python bench/bench_speed.py                 # 10k, 100k, 1M, 10M  (about 6 minutes here)
    python bench/bench_speed.py --sizes 1e5,1e6 --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from fleetsim.apps.cli import main
from fleetsim.results.output import read_metadata
args = json.loads(sys.argv[1])
rc = main(args["argv"])
wall = time.perf_counter() - t0
md = read_metadata(args["out"] + "/hourly.parquet")
tot = json.loads(md["fleetsim.totals"])
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "totals": tot,
                  "rss_mib": ru.ru_maxrss / 1024}))
"""


def run_one(n: int, engine: str, scenario: str, sets: tuple[str, ...] = ()) -> dict:
    replicas = max(1, round(8 * n / 1e6))
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "run",
            scenario,
            "--out",
            tmp,
            "--force",
            "--quiet",
            "--set",
            f"traffic.requests_per_day={n}",
            "--set",
            f"fleet.replicas={replicas}",
            "--set",
            f'simulation.engine="{engine}"',
        ]
        for kv in sets:
            argv += ["--set", kv]
        p = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps({"argv": argv, "out": tmp})],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        out = json.loads(p.stdout.strip().splitlines()[-1])
    t = out["totals"]
    req = t["requests_arrived"]
    return {
        "requests": int(req),
        "replicas": replicas,
        "engine": engine,
        "wall_s": out["wall_s"],
        "req_per_s": req / out["wall_s"],
        "cpu_s": out["cpu_s"],  # user + system CPU of the process (what a loaded machine spares)
        "req_per_cpu_s": req / out["cpu_s"],
        "events_per_req": t["events"] / req,
        "iterations_per_req": t["iterations"] / req,
        "rss_mib": out["rss_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--scenario", default="scenarios/default.toml")
    ap.add_argument("--no-reference", action="store_true", help="skip the per-iteration run")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="scenario overrides, e.g. --set fleet.kv_allocation='\"reserve\"'",
    )
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; one process per size"
    )
    print(
        f"{'requests':>10} {'replicas':>8} {'engine':>9} {'wall s':>8} {'req/s':>9} "
        f"{'events/req':>10} {'iter/req':>8} {'RSS MiB':>8} {'CPU s':>7} {'req/CPU s':>9}"
    )
    rows = []
    for n in sizes:
        rows.append(run_one(n, "macro", args.scenario, tuple(args.set)))
        r = rows[-1]
        print(
            f"{r['requests']:>10,} {r['replicas']:>8} {r['engine']:>9} {r['wall_s']:>8.2f} "
            f"{r['req_per_s']:>9,.0f} {r['events_per_req']:>10.2f} {r['iterations_per_req']:>8.1f} "
            f"{r['rss_mib']:>8.0f} {r['cpu_s']:>7.2f} {r['req_per_cpu_s']:>9,.0f}",
            flush=True,
        )
    if not args.no_reference:
        ref = run_one(100_000, "iteration", args.scenario, tuple(args.set))
        rows.append(ref)
        mac = next(
            (r for r in rows if r["engine"] == "macro" and abs(r["requests"] - 1e5) < 2e4), None
        )
        mac = mac or run_one(100_000, "macro", args.scenario, tuple(args.set))
        print(
            f"{ref['requests']:>10,} {ref['replicas']:>8} {'iteration':>9} {ref['wall_s']:>8.2f} "
            f"{ref['req_per_s']:>9,.0f} {ref['events_per_req']:>10.2f} "
            f"{ref['iterations_per_req']:>8.1f} {ref['rss_mib']:>8.0f}"
        )
        print(
            f"macro-stepping is {mac['req_per_s'] / ref['req_per_s']:.1f}x the per-iteration mode "
            f"at 100k requests: {ref['events_per_req']:.1f} vs {mac['events_per_req']:.2f} events "
            f"per request ({ref['iterations_per_req']:.0f} iterations per request)"
        )
    per_req = {r["requests"]: r["wall_s"] / r["requests"] for r in rows if r["engine"] == "macro"}
    big = [v for k, v in per_req.items() if k >= 90_000]
    if len(big) >= 2:
        print(f"time per request, max/min over >=100k: {max(big) / min(big):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
