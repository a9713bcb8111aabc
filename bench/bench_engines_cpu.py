"""CPU time per simulated request of the two engines (robust on a shared machine, where
wall-clock figures swing with the other processes' load).

Runs 4 hours of the default day (about 115k requests) in one process, alternating the first
engine (``kv_allocation = "reserve"``), the paged defaults, and paged KV without chunked prefill
and prefix caching, twice each, and prints simulated requests per CPU-second.

    python bench/bench_engines_cpu.py
"""

from __future__ import annotations

import time

from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import load_scenario
from fleetsim.config.resolve import resolve

SCENARIO = "scenarios/default.toml"
CONFIGS = {
    "reserve (first engine)": ['fleet.kv_allocation="reserve"'],
    "paged defaults": [],
    "paged, no chunking, no prefix caching": [
        "fleet.enable_chunked_prefill=false",
        "fleet.enable_prefix_caching=false",
    ],
}


def main() -> None:
    out: dict[str, list[float]] = {k: [] for k in CONFIGS}
    for _ in range(2):
        for name, sets in CONFIGS.items():
            sc, _text = load_scenario(SCENARIO, ["simulation.hours=4", *sets])
            rs = resolve(sc, SCENARIO)
            t = time.process_time()
            res = simulate(rs, source=SCENARIO)
            out[name].append(res.totals.requests_arrived / (time.process_time() - t))
    for name, v in out.items():
        print(f"{name:>40}: " + " / ".join(f"{x:,.0f}" for x in v) + " requests per CPU-second")


if __name__ == "__main__":
    main()
