"""Regenerate every day figure quoted in the scenario library's README.

    python bench/refresh_docs.py            # simulate, write docs/figures.json, render the page
    python bench/refresh_docs.py --render   # only render scenarios/README.md from the JSON
    python bench/refresh_docs.py --check    # simulate, compare with the stored JSON; write nothing
    python bench/refresh_docs.py --only r1_b200,qwen3_moe   # simulate these runs, keep the rest

Each run below is a shipped scenario (with a few ``--set`` variants the page compares), run
through fleetsim's Python API with the file's own seed. Their figures are stored in
``docs/figures.json`` with the fleetsim version that produced them, and
``scenarios/README.md`` is rendered from its template ``bench/templates/scenarios-README.md``,
where ``[[run.field|format]]`` stands for a figure (``[[version]]``: the version). The test
``tests/test_everyday2.py::test_quoted_figures_are_the_scripts_output`` checks that the page is
this rendering of the stored JSON and that the JSON's version is the installed one; rerun this
script whenever a change moves the figures (about 25 minutes on a loaded 2-core machine).
``--render`` also writes ``docs/scenario-fields.md``, the field reference generated from the
scenario's JSON Schema. ``--check`` simulates every run and compares its figures with
``docs/figures.json`` (all but the wall time, exactly: the runs are deterministic) and both pages
with their rendering, writes nothing and exits 1 naming what differs (``--check --render``: only
the pages, nothing simulated). ``--only NAMES`` simulates the named runs (comma-separated) and keeps
every other run's stored figures: for a new scenario's rows, where no stored figure can have
moved; ``--check`` still simulates all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures.json"
TEMPLATE = ROOT / "bench" / "templates" / "scenarios-README.md"
PAGE = ROOT / "scenarios" / "README.md"
FIELDS = ROOT / "docs" / "scenario-fields.md"

#: run name -> (scenario file in scenarios/, --set overrides)
RUNS: dict[str, tuple[str, list[str]]] = {
    "default": ("default.toml", []),
    "static": ("llama70b-conv-static.toml", []),
    "static_3": ("llama70b-conv-static.toml", ["fleet.replicas=3"]),
    "schedule": ("llama70b-conv-schedule.toml", []),
    "reactive": ("llama70b-conv-reactive.toml", []),
    "rented": ("llama70b-conv-rented.toml", []),
    "coding": ("coding-assistant.toml", []),
    "coding_static": ("coding-assistant.toml", ['autoscaler.policy="static"']),
    "tou": ("tou-peak-price.toml", []),
    "disaggregated": ("disaggregated.toml", []),
    "mooncake": ("mooncake-conversation.toml", []),
    "mooncake_least_loaded": ("mooncake-conversation.toml", ['fleet.router="least_loaded"']),
    "chatgpt2023": ("chatgpt-2023.toml", []),
    "chatgpt2023_2500": ("chatgpt-2023.toml", ["fleet.pods=2500"]),
    "kvp": ("kv-pressure-70b-a100.toml", []),
    "kvp_reserve": ("kv-pressure-70b-a100.toml", ['fleet.kv_allocation="reserve"']),
    "r1_b200": ("deepseek-r1-b200.toml", []),
    "r1_b200_8": ("deepseek-r1-b200.toml", ["fleet.replicas=8"]),
    "qwen3_moe": ("qwen3-moe-vs-dense-h100.toml", []),
    "qwen3_dense": (
        "qwen3-moe-vs-dense-h100.toml",
        [
            'model.config="../data/models/Qwen/Qwen3-32B"',
            "fleet.tensor_parallel=2",
            "fleet.replicas=3",
        ],
    ),
    "gemma_lc": ("gemma3-long-context-h100.toml", []),
    # the same model with every layer global: on the same 20 GPUs, and on the 68 it needs
    "gemma_lc_global_5": ("gemma3-long-context-h100.toml", ["model.sliding_window_tokens=0"]),
    "gemma_lc_global": (
        "gemma3-long-context-h100.toml",
        ["model.sliding_window_tokens=0", "fleet.replicas=17"],
    ),
}


def figures(run) -> dict:
    """The figures of one :class:`fleetsim.Run` that the page may quote."""
    import numpy as np

    from fleetsim.results.summary import health, json_safe

    t = run.result.totals
    hr = run.result.hourly
    lat = run.result.day_latency
    worst = {
        c: float(np.nanmax(hr.column(c).to_numpy(zero_copy_only=False).astype(float)))
        for c in ("ttft_p99_s", "tpot_p99_s")
    }
    prompt_mean = t.prompt_tokens / t.requests_completed if t.requests_completed else math.nan
    out = t.as_dict() | {
        "day_ttft_p99_s": lat.get("ttft_p99_s"),
        "day_tpot_p99_s": lat.get("tpot_p99_s"),
        "worst_hour_ttft_p99_s": worst["ttft_p99_s"],
        "worst_hour_tpot_p99_s": worst["tpot_p99_s"],
        "hardware_share": t.hardware_cost_usd / t.total_cost_usd if t.total_cost_usd else None,
        "mean_prompt_tokens": prompt_mean,
        "warnings": health(run.result)["warnings"],
        "wall_s": run.result.wall_s,
    }
    return json_safe(out)


def derived(runs: dict[str, dict]) -> dict[str, float]:
    """Comparisons the page quotes (relative changes against the static day)."""
    out = {}
    s = runs["static"]
    for name in ("schedule", "reactive"):
        for k in ("gpu_hours", "energy_facility_kwh"):
            out[f"{name}_{k}_change"] = runs[name][k] / s[k] - 1.0
    # the rent a static rented fleet would pay: its GPU-hours at the rented scenario's price
    r = runs["rented"]
    out["rent_usd_per_gpu_hour"] = r["hardware_cost_usd"] / r["gpu_hours"]
    out["static_rent_usd"] = s["gpu_hours"] * out["rent_usd_per_gpu_hour"]
    out["disaggregated_worst_hour_tpot_p99_ms"] = (
        1000.0 * runs["disaggregated"]["worst_hour_tpot_p99_s"]
    )
    for name in ("kvp", "kvp_reserve"):  # the KV-pressure case: share of arrivals served
        out[f"{name}_completed_share"] = (
            runs[name]["requests_completed"] / runs[name]["requests_arrived"]
        )
    # the MoE day against the dense one (same traffic): what the MoE saves
    m, d = runs["qwen3_moe"], runs["qwen3_dense"]
    for k in ("gpu_hours", "energy_facility_kwh", "total_cost_usd"):
        out[f"qwen3_moe_{k}_change"] = m[k] / d[k] - 1.0
    # the reasoning day's energy per million output tokens (facility kWh)
    g, gg = runs["gemma_lc"], runs["gemma_lc_global"]
    for k in ("gpu_hours", "energy_facility_kwh"):
        out[f"gemma_lc_{k}_change"] = g[k] / gg[k] - 1.0
    r = runs["r1_b200"]
    out["r1_kwh_per_m_output_tokens"] = r["energy_facility_kwh"] / r["output_tokens"] * 1e6
    return out


def simulate_runs(names: list[str]) -> dict[str, dict]:
    """The figures of the named runs of :data:`RUNS`, simulated."""
    import fleetsim

    runs = {}
    for name in names:
        path, sets = RUNS[name]
        t0 = time.perf_counter()
        runs[name] = figures(fleetsim.simulate(ROOT / "scenarios" / path, sets))
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return runs


def simulate_all(names: list[str]) -> dict:
    from fleetsim.base.version import __version__

    runs = simulate_runs(names)
    return {
        "fleetsim_version": __version__,
        "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
        "derived": derived(runs),
    }


_FIELD = re.compile(r"\[\[([\w.]+)(?:\|([^\]]*))?\]\]")


def render(template: str, doc: dict) -> str:
    """``template`` with every ``[[run.field|format]]`` replaced by the stored figure
    (``[[derived.name|format]]`` for :func:`derived`'s, ``[[version]]`` for the version); a
    figure that is missing is an error, never an empty cell."""

    def value(m: re.Match) -> str:
        key, fmt = m.group(1), m.group(2) or ""
        if key == "version":
            return str(doc["fleetsim_version"])
        head, _, field = key.partition(".")
        src = doc["derived"] if head == "derived" else doc["runs"].get(head)
        if src is None or field not in src or src[field] is None:
            raise KeyError(f"{key}: not in {FIGURES.name} (fix: rerun bench/refresh_docs.py)")
        v = src[field]
        return format(v, fmt) if fmt else str(v)

    return _FIELD.sub(value, template)


def load_figures() -> dict:
    """docs/figures.json, with :func:`derived`'s comparisons recomputed from its runs."""
    doc = json.loads(FIGURES.read_text(encoding="utf-8"))
    doc["derived"] = derived(doc["runs"])
    return doc


def fields_page() -> str:
    """docs/scenario-fields.md: every scenario field with its description, from the schema."""
    from fleetsim.config.fields import field_reference
    from fleetsim.config.jsonschema import scenario_json_schema as scenario_schema

    return (
        "# Scenario fields\n\n"
        "<!-- Generated by `python bench/refresh_docs.py --render` from the scenario's JSON "
        "Schema (`fleetsim schema`; descriptions in simulator/config/fields.py). -->\n\n"
        "Every field of a scenario file, by section (`FleetSection` is `[fleet]`, `top` the "
        "file's top level; `LogNormal`, `Uniform`, ... are the size distributions' inline "
        "tables).\n\n" + field_reference(scenario_schema()) + "\n"
    )


#: figures that differ from run to run of the same scenario and seed (not simulated results)
UNSTABLE = frozenset({"wall_s"})


def stale_figures(stored: dict, fresh: dict) -> list[str]:
    """``run.field: stored -> fresh`` for every figure of ``fresh``'s runs that differs from the
    stored one (a run or a figure missing on either side included), the wall time aside."""
    out = []
    for name in sorted(set(stored["runs"]) | set(fresh["runs"])):
        a, b = stored["runs"].get(name), fresh["runs"].get(name)
        if a is None or b is None:
            out.append(f"{name}: {'not stored' if a is None else 'not simulated'}")
            continue
        for k in sorted((set(a) | set(b)) - UNSTABLE):
            if a.get(k, "(missing)") != b.get(k, "(missing)"):
                out.append(f"{name}.{k}: {a.get(k, '(missing)')} -> {b.get(k, '(missing)')}")
    return out


def check(simulate: bool) -> int:
    """``--check``: 0 when the pages are the rendering of the stored figures and (``simulate``)
    today's runs give those figures; else 1, each difference on a line. Writes nothing."""
    doc = load_figures()
    problems = []
    if simulate:
        problems += stale_figures(doc, simulate_all(list(RUNS)))
    if PAGE.read_text(encoding="utf-8") != render(TEMPLATE.read_text(encoding="utf-8"), doc):
        problems.append(f"{PAGE.relative_to(ROOT)}: not the rendering of {FIGURES.name}")
    if FIELDS.read_text(encoding="utf-8") != fields_page():
        problems.append(f"{FIELDS.relative_to(ROOT)}: not the rendering of the schema")
    for line in problems:
        print(line)
    what = "figures and pages" if simulate else "pages"
    print(
        f"{what}: {len(problems)} stale (fix: python bench/refresh_docs.py)"
        if problems
        else f"{what}: up to date (fleetsim {doc['fleetsim_version']})",
        file=sys.stderr,
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only render the page from the JSON")
    ap.add_argument(
        "--check",
        action="store_true",
        help="simulate and compare with docs/figures.json and the pages; write nothing, exit 1 "
        "on a difference (with --render: only the pages)",
    )
    ap.add_argument(
        "--only",
        metavar="NAMES",
        help="simulate only these runs (comma-separated names of RUNS) and keep the other runs' "
        "stored figures",
    )
    args = ap.parse_args(argv)
    if args.check:
        return check(simulate=not args.render)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            ap.error(f"--only: no run named {', '.join(unknown)} (runs: {', '.join(RUNS)})")
        from fleetsim.base.version import __version__

        doc = json.loads(FIGURES.read_text(encoding="utf-8"))
        if doc["fleetsim_version"] != __version__:  # one version's figures on the page
            ap.error(
                f"--only: {FIGURES.name} holds fleetsim {doc['fleetsim_version']}'s figures, this "
                f"is {__version__}: rerun every run (python bench/refresh_docs.py)"
            )
        fresh = simulate_runs(names)
        doc["runs"] = {n: fresh.get(n, doc["runs"].get(n)) for n in RUNS}
        doc["runs"] = {n: v for n, v in doc["runs"].items() if v is not None}
        doc["generated_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        doc["derived"] = derived(doc["runs"])
        FIGURES.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {FIGURES.relative_to(ROOT)} ({len(names)} run(s) simulated)", file=sys.stderr)
    elif not args.render:
        doc = simulate_all(list(RUNS))
        FIGURES.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {FIGURES.relative_to(ROOT)}", file=sys.stderr)
    doc = load_figures()
    PAGE.write_text(render(TEMPLATE.read_text(encoding="utf-8"), doc), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)} (fleetsim {doc['fleetsim_version']})", file=sys.stderr)
    FIELDS.write_text(fields_page(), encoding="utf-8")
    print(f"wrote {FIELDS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
