"""``fleetsim crossover``: where does disaggregated serving beat aggregated serving?

One sweep, on one GPU budget. The scenario's fleet of N replicas (N = prefill + decode replicas
of its ``[disaggregation]`` section, or ``fleet.replicas``) serves two workloads:

* **short**: the scenario's own request sizes (the default scenarios: the Azure 2023
  conversation trace's lognormal fit, mean prompt ~1.7k tokens);
* **long**: the Mooncake conversation trace (Qin et al., FAST'25; scenarios/data/mooncake-2025,
  12,031 requests): a lognormal fitted to its input and output lengths (input median 6,909,
  log-sigma 1.199, mean 12,035; output median 350, log-sigma 1.358), prompts capped at 32,768
  tokens (6.9% of the trace's prompts are longer), with ``max_batched_tokens`` raised to match
  (see :func:`point`). Its prefix reuse (~37% of prompt tokens) is **not** used: the sizes are
  drawn, so requests carry no block ids.

Each workload arrives as a flat Poisson stream for ``--hours`` hours at ``--load`` times the
aggregated fleet's measured capacity (its completions per second, after the warm-up, when
offered 1.5 x the planner's optimistic throughput bound: a saturated run). The same stream (same
seed) is served by the aggregated fleet of N replicas and by every disaggregated split
P + D = N (P = 1 .. N - 1), each with the scenario's link. Requests arriving in the first half
hour are not judged (warm-up).

For a grid of latency targets (TTFT = f x the unloaded prefill time of the workload's mean
prompt, TPOT = g x the unloaded decode step of one sequence at the mean context), the **cost per
SLO-meeting request** of a design is the run's total cost divided by the number of judged
requests that completed with both TTFT <= target and TPOT <= target (requests still in flight
at the end do not meet it). For the disaggregated design the best split is taken in every cell.
Both designs own the same GPUs, so the hardware cost is equal and the ratio is essentially the
ratio of goodputs, DistServe's figure of merit.

Engines: both designs run the same engine, like for like. By default it is the scenario's
(paged KV, chunked prefill and prefix caching unless the scenario turns them off): the
aggregated replicas and the prefill pool chunk their prompts, the decode pool admits arrived KV
by blocks (serving/kv_paged.py). ``--engine reserve`` runs both on the reserve policy instead (KV
reserved at admission, whole prefills), the comparison of the previous releases.

Outputs: ``crossover.parquet`` (one row per workload x design x split x target cell) and
``crossover.png`` (per workload, the heat map of disaggregated / aggregated cost per
SLO-meeting request over the two targets: below 1, disaggregation wins).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from fleetsim.apps.executors import add_executor_args, make_executor, progress_label, task_progress
from fleetsim.base import io
from fleetsim.base.errors import UserError
from fleetsim.base.io import term
from fleetsim.base.units import fmt_num
from fleetsim.config.loading import apply_overrides, read_toml, scenario_from_dict
from fleetsim.config.resolve import resolve

# Mooncake conversation trace (FAST'25), lognormal fit computed from its 12,031 requests:
# log-mean/log-sigma of input_length and output_length (median = exp(log-mean)).
MOONCAKE_MAX_PROMPT = 32768  # the long workload's cap (6.9% of the trace's prompts are longer)
MOONCAKE_PROMPT = {
    "dist": "lognormal",
    "median": 6909,
    "sigma": 1.199,
    "min": 891,
    "max": MOONCAKE_MAX_PROMPT,
}
MOONCAKE_OUTPUT = {"dist": "lognormal", "median": 350, "sigma": 1.358, "min": 1, "max": 2000}
FACTORS = (1.5, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0)
WARMUP_S = 1800.0
#: crossover.parquet's metadata key for the run's notes (a JSON list of lines)
NOTES_KEY = "crossover_notes"


def workloads(data: dict) -> dict[str, dict]:
    """The two workloads as traffic sections (and the fleet's token budget)."""
    tr = dict(data.get("traffic", {}))
    short = {"prompt": tr.get("prompt"), "output": tr.get("output")}
    short = {k: v for k, v in short.items() if v is not None}
    return {
        "short": {"traffic": short, "max_batched_tokens": None},
        "long": {
            "traffic": {"prompt": MOONCAKE_PROMPT, "output": MOONCAKE_OUTPUT},
            "max_batched_tokens": 32768,
        },
    }


def point(
    data: dict,
    wl: dict,
    design: str,
    n: int,
    P: int,
    rate: float,
    hours: int,
    engine: str = "scenario",
) -> dict:
    """The scenario dict of one point."""
    d = copy.deepcopy(data)
    d.setdefault("simulation", {})["hours"] = hours
    d["traffic"] = {**d.get("traffic", {}), **wl["traffic"]}
    d["traffic"]["diurnal"] = "flat"
    d["traffic"]["requests_per_day"] = rate * 86400.0
    d["traffic"].pop("trace", None)
    if wl.get("trace"):  # a timed trace (its own arrivals and sizes; see scaled_trace)
        d["traffic"]["trace"] = wl["trace"]
    d.setdefault("fleet", {})
    d["fleet"]["pods"] = 1
    d["fleet"].pop("sample_pods", None)
    d.setdefault("autoscaler", {})["policy"] = "static"
    if engine == "reserve":  # both designs on the first engine (the pools inherit [fleet]'s)
        d["fleet"].update(
            kv_allocation="reserve", enable_chunked_prefill=False, enable_prefix_caching=False
        )
    f = d["fleet"]
    # the longest prompt fits one iteration in both designs and engines: whole prefills need
    # it, and with chunks of the scenario's 16,384 tokens a saturated aggregated paged fleet
    # preempts half-prefilled long prompts (3.6 x fewer completions before the engine took
    # vLLM V1's no-admission-after-preemption rule, still many after), which would make the
    # capacity that sets the load meaningless (docs/disaggregation.md)
    bmt = wl["max_batched_tokens"]
    if bmt:
        f["max_batched_tokens"] = max(bmt, f.get("max_batched_tokens") or 0)
    dis = d.pop("disaggregation", None) or {}
    if design == "aggregated":
        d["fleet"]["replicas"] = n
        return d
    dis = {k: copy.deepcopy(v) for k, v in dis.items() if v is not None}
    for pool, r in (("prefill", P), ("decode", n - P)):
        sec = {k: v for k, v in (dis.get(pool) or {}).items() if v is not None}
        sec["replicas"] = r
        if bmt and pool == "prefill":
            sec["max_batched_tokens"] = max(bmt, sec.get("max_batched_tokens") or 0)
        dis[pool] = sec
    d["disaggregation"] = dis
    return d


def long_trace_rows(path: str, max_prompt: int) -> tuple[np.ndarray, float]:
    """The rows of the Mooncake trace ``path`` whose prompt is at most ``max_prompt`` and the
    time they span (s); the whole file is read and checked (one line naming a bad line), so
    ``crossover`` calls this before it simulates anything."""
    from fleetsim.workload.mooncake import read_mooncake

    tr = read_mooncake(path, "--long-trace")
    keep = np.nonzero(tr.prompt_tokens <= max_prompt)[0]
    t = tr.arrival_s[keep]
    span = float(t[-1] - t[0]) if len(t) > 1 else 0.0
    if span <= 0.0:
        raise UserError(
            f"--long-trace {io.clean(path)!r}: needs requests with prompts of at most "
            f"{max_prompt:,} tokens at two or more distinct times"
        )
    return keep, span


def scaled_trace(path: str, rate: float, max_prompt: int, dest: Path) -> tuple[str, int]:
    """A copy of the Mooncake trace ``path`` at ``dest``, its timestamps stretched so that its
    mean arrival rate is ``rate`` per second (the order, sizes and block ids kept), without the
    requests whose prompt exceeds ``max_prompt`` (the lognormal workload's cap). Returns the
    copy's path and its number of requests."""
    from fleetsim.workload.mooncake import read_mooncake

    tr = read_mooncake(path, "--long-trace")
    keep, span = long_trace_rows(path, max_prompt)
    t = tr.arrival_s[keep]
    stretch = (len(t) - 1) / span / rate  # new time per old time
    with dest.open("w") as f:
        for i, ts in zip(keep, t, strict=True):
            row = {
                "timestamp": round((ts - t[0]) * stretch * 1000.0),
                "input_length": int(tr.prompt_tokens[i]),
                "output_length": int(tr.output_tokens[i]),
                "hash_ids": tr.ids[i],
            }
            f.write(json.dumps(row) + "\n")
    return str(dest), len(keep)


def crossover_task(scenario: dict, source: str) -> dict:
    """Simulate one point; its cost and the judged requests' TTFT and TPOT."""
    from fleetsim.apps.simulate import simulate

    class Sink:
        def __init__(self) -> None:
            self.ttft: list[float] = []
            self.tpot: list[float] = []
            self.unfinished = 0
            self.finished_late = 0  # completions after the warm-up, whenever they arrived

        def add(self, r, replica, finish_s, ttft_s, tpot_s, e2e_s, status) -> None:
            if status == "completed" and finish_s >= WARMUP_S:
                self.finished_late += 1
            if r.arrival_s < WARMUP_S:
                return
            if status == "completed":
                self.ttft.append(ttft_s)
                self.tpot.append(0.0 if math.isnan(tpot_s) else tpot_s)
            else:
                self.unfinished += 1

    rs = resolve(scenario_from_dict(scenario, source), source)
    sink = Sink()
    res = simulate(rs, source=source, request_sink=sink)
    return {
        "total_cost_usd": res.totals.total_cost_usd,
        "energy_facility_kwh": res.totals.energy_facility_kwh,
        "ttft": np.asarray(sink.ttft),
        "tpot": np.asarray(sink.tpot),
        "judged": len(sink.ttft) + sink.unfinished,
        "completed_after_warmup": sink.finished_late,
        "wall_s": res.wall_s,
    }


def base_latencies(rs, source: str) -> tuple[float, float]:
    """Unloaded prefill time of the mean prompt and decode step of one sequence at the mean
    context, on one replica of ``rs``."""
    from fleetsim.workload.sampling import SizeSampler

    sc = rs.scenario
    p, o = SizeSampler(sc.traffic.prompt, sc.traffic.output, source).draw(
        20_000, np.random.default_rng(np.random.SeedSequence(sc.seed, spawn_key=(2**31,)))
    )
    lat = rs.latency_model()
    ep, eo = int(p.mean()), float(o.mean())
    return lat.prefill_time(ep), lat.decode_time(1, int(ep + eo / 2))


def check_no_dp_ep(data: dict) -> None:
    """A scenario of data- or expert-parallel replicas is refused before anything is simulated:
    config/resolve.py refuses them in a disaggregated fleet, with the fix "drop
    [disaggregation]", which is no fix here, and it was said after the saturation runs."""
    fleet = data.get("fleet", {})
    dp, ep = int(fleet.get("data_parallel", 1)), bool(fleet.get("expert_parallel", False))
    if dp > 1 or ep:
        field, value = ("fleet.data_parallel", dp) if dp > 1 else ("fleet.expert_parallel", ep)
        drop = " ".join(
            f"--set {k}"
            for k, on in (("fleet.expert_parallel=false", ep), ("fleet.data_parallel=1", dp > 1))
            if on
        )
        raise UserError(
            f"crossover: {field} = {str(value).lower()}: data and expert parallelism are "
            "simulated for aggregated fleets only, and crossover compares the aggregated fleet "
            f"with disaggregated splits of its replicas (fix: {drop}, to compare "
            f"TP{fleet.get('tensor_parallel', 1)} replicas without them)"
        )


def run_crossover(
    data: dict,
    source: str,
    executor,
    hooks,
    load: float,
    hours: int,
    engine: str = "scenario",
    long_trace: str | None = None,
    tmp: Path | None = None,
    notes: list[str] | None = None,
) -> pa.Table:
    """The sweep (see the module docstring) as one row per workload x design x split x cell.
    The long workload is left out, with a line in ``notes``, where the model cannot take its
    sizes (a context shorter than its longest prompt and output: GPT-3's 4,096 tokens in
    chatgpt-2023.toml); the short one is the scenario's own, and its mistakes are the
    scenario's."""
    from fleetsim.apps.plan import replica_capacity_rps
    from fleetsim.base.errors import ScenarioError

    check_no_dp_ep(data)
    n = fleet_size(data)
    if n < 2:
        raise UserError(
            f"crossover: the fleet has {n} replica; it needs at least 2 to split (fix: --set "
            "fleet.replicas=2 or more, or give the scenario a [disaggregation] section)"
        )
    specs = []
    info = {}
    wls = workloads(data)
    sat = []
    for name, wl in list(wls.items()):
        agg = point(data, wl, "aggregated", n, 0, 1.0, hours, engine)
        try:
            rs = resolve(scenario_from_dict(agg, source), source)
        except ScenarioError as exc:
            if name != "long" or not exc.field.startswith("traffic."):
                raise
            why = (
                f"the long workload (Mooncake sizes: prompts up to {MOONCAKE_MAX_PROMPT:,} "
                f"tokens) does not fit this model: {exc.field} = {exc.value!r}: {exc.problem}"
            )
            if long_trace is not None:
                raise UserError(
                    f"--long-trace: {why} (fix: drop --long-trace, or a model with a longer "
                    "context)"
                ) from None
            if notes is not None:
                notes.append(f"{why}; left out, the short workload only")
            del wls[name]
            continue
        bound = n * replica_capacity_rps(rs, source)
        sat.append(point(data, wl, "aggregated", n, 0, 1.5 * bound, hours, engine))
        info[name] = (0.0, *base_latencies(rs, source))
    if hooks is not None:
        hooks.add(len(sat))
    done = executor.map(
        crossover_task, [(d, source) for d in sat], hooks.done if hooks is not None else None
    )
    for name, o in zip(wls, done):
        capacity = o["completed_after_warmup"] / (hours * 3600.0 - WARMUP_S)  # per second
        rate = load * capacity
        info[name] = (rate, *info[name][1:])
    if long_trace is not None:  # the long workload replays the trace at the measured rate
        assert tmp is not None
        dest = tmp / "long-trace.jsonl"
        path, _ = scaled_trace(long_trace, info["long"][0], MOONCAKE_MAX_PROMPT, dest)
        wls["long"] = {**wls["long"], "trace": path}
    for name, wl in wls.items():
        rate = info[name][0]
        specs.append(
            (name, "aggregated", 0, point(data, wl, "aggregated", n, 0, rate, hours, engine))
        )
        for P in range(1, n):
            specs.append(
                (
                    name,
                    "disaggregated",
                    P,
                    point(data, wl, "disaggregated", n, P, rate, hours, engine),
                )
            )
    if hooks is not None:
        hooks.add(len(specs))
    outs = executor.map(
        crossover_task,
        [(s[3], source) for s in specs],
        hooks.done if hooks is not None else None,
    )
    return _crossover_rows(specs, outs, info, n)


def _crossover_rows(specs: list, outs: list, info: dict, n: int) -> pa.Table:
    """One row per workload x design x split x (TTFT, TPOT) target cell, from the runs'
    per-request latencies."""
    rows: dict[str, list] = {
        k: []
        for k in (
            "workload",
            "design",
            "prefill_replicas",
            "decode_replicas",
            "replicas",
            "rate_per_s",
            "ttft_factor",
            "tpot_factor",
            "ttft_target_s",
            "tpot_target_s",
            "judged_requests",
            "good_requests",
            "total_cost_usd",
            "energy_facility_kwh",
            "usd_per_good_request",
            "ttft_p99_s",
            "tpot_p99_s",
        )
    }
    for (name, design, P, _), o in zip(specs, outs):
        rate, t_pf, t_dec = info[name]
        for f in FACTORS:
            for g in FACTORS:
                good = int(np.count_nonzero((o["ttft"] <= f * t_pf) & (o["tpot"] <= g * t_dec)))
                rows["workload"].append(name)
                rows["design"].append(design)
                rows["prefill_replicas"].append(P if design != "aggregated" else None)
                rows["decode_replicas"].append(n - P if design != "aggregated" else None)
                rows["replicas"].append(n)
                rows["rate_per_s"].append(rate)
                rows["ttft_factor"].append(f)
                rows["tpot_factor"].append(g)
                rows["ttft_target_s"].append(f * t_pf)
                rows["tpot_target_s"].append(g * t_dec)
                rows["judged_requests"].append(o["judged"])
                rows["good_requests"].append(good)
                rows["total_cost_usd"].append(o["total_cost_usd"])
                rows["energy_facility_kwh"].append(o["energy_facility_kwh"])
                rows["usd_per_good_request"].append(
                    o["total_cost_usd"] / good if good else math.inf
                )
                rows["ttft_p99_s"].append(
                    float(np.percentile(o["ttft"], 99)) if len(o["ttft"]) else math.nan
                )
                rows["tpot_p99_s"].append(
                    float(np.percentile(o["tpot"], 99)) if len(o["tpot"]) else math.nan
                )
    return pa.table(rows)


def best_ratio(t: pa.Table, workload: str) -> np.ndarray:
    """Per (TTFT factor, TPOT factor) cell: best disaggregated split's cost per good request
    over the aggregated fleet's: 0 where only the disaggregated fleet meets the targets at all
    ("D only"), inf where only the aggregated one does ("A only"), nan where neither does."""
    df = t.to_pandas()
    df = df[df.workload == workload]
    agg = df[df.design == "aggregated"].set_index(["ttft_factor", "tpot_factor"])[
        "usd_per_good_request"
    ]
    dis = (
        df[df.design == "disaggregated"]
        .groupby(["ttft_factor", "tpot_factor"])["usd_per_good_request"]
        .min()
    )
    out = np.full((len(FACTORS), len(FACTORS)), np.nan)
    for i, f in enumerate(FACTORS):
        for j, g in enumerate(FACTORS):
            a, d = agg.get((f, g), math.inf), dis.get((f, g), math.inf)
            if math.isinf(a) and math.isinf(d):
                continue
            out[i, j] = d / a if not math.isinf(a) else 0.0
    return out


def cell_counts(r: np.ndarray) -> tuple[int, int, int]:
    """Of :func:`best_ratio`'s cells: those where the best split is cheaper (ratio < 1, "D only"
    included), those where either design meets the targets (not nan), and those only the
    aggregated fleet meets ("A only", inf): the terminal's table and the report's page count the
    same cells."""
    return int(np.nansum(r < 1.0)), int(np.sum(~np.isnan(r))), int(np.sum(np.isposinf(r)))


def draw(t: pa.Table) -> bytes:
    """The heat maps of the best disaggregated / aggregated cost per SLO-meeting request."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = list(dict.fromkeys(t.column("workload").to_pylist()))
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        r = best_ratio(t, name)
        shown = np.clip(np.where(np.isnan(r), np.nan, r), 0.25, 4.0)
        im = ax.imshow(shown, origin="lower", cmap="RdBu_r", norm=LogNorm(0.25, 4.0))
        for i in range(len(FACTORS)):
            for j in range(len(FACTORS)):
                v = r[i, j]
                txt = (
                    "-"
                    if np.isnan(v)
                    else "D only"
                    if v == 0
                    else "A only"
                    if np.isinf(v)
                    else f"{v:.2f}"
                )
                ax.text(j, i, txt, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(FACTORS)), [f"{g:g}" for g in FACTORS])
        ax.set_yticks(range(len(FACTORS)), [f"{f:g}" for f in FACTORS])
        ax.set_xlabel("TPOT target / unloaded decode step")
        ax.set_ylabel("TTFT target / unloaded prefill of the mean prompt")
        df = t.to_pandas()
        rate = float(df[df.workload == name].rate_per_s.iloc[0])
        ax.set_title(f"{name} prompts ({rate:.2f} req/s)", fontsize=10)
    fig.suptitle(
        "disaggregated (best split) / aggregated cost per SLO-meeting request; < 1: split wins",
        fontsize=10,
    )
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def fleet_size(data: dict) -> int:
    """N, the replicas both designs share: prefill + decode replicas of ``[disaggregation]``,
    else ``fleet.replicas``."""
    dis = data.get("disaggregation") or {}
    if dis:
        pre, dec = dis.get("prefill") or {}, dis.get("decode") or {}
        return int(pre.get("replicas", 1)) + int(dec.get("replicas", 1))
    return int(data.get("fleet", {}).get("replicas", 2))


def setup_line(data: dict, load: float, hours: int, engine: str) -> str:
    """What the sweep compared, for the terminal: N replicas of the scenario's GPU and TP, the
    splits, the KV link (and that it is the default where the scenario has no
    ``[disaggregation]``), the load and the hours."""
    from fleetsim.config.schema import DisaggregationSection

    n = fleet_size(data)
    f, dis = data.get("fleet") or {}, data.get("disaggregation") or {}
    gpu = (data.get("hardware") or {}).get("gpu", "")
    tp = f.get("tensor_parallel") or 1
    link = dis.get("link") or DisaggregationSection.model_fields["link"].default
    where = "" if dis else " (the default: the scenario has no [disaggregation])"
    # a pool that sets its own tensor_parallel or gpu runs the split's replicas on those (the
    # aggregated fleet keeps [fleet]'s and [hardware]'s: point()); the line said [fleet]'s TP
    # for both designs
    pools = {}
    for name in ("prefill", "decode"):
        sec = dis.get(name) or {}
        pools[name] = (sec.get("tensor_parallel") or tp, sec.get("gpu") or gpu)
    if all(v == (tp, gpu) for v in pools.values()):
        designs = f"{n} replicas of TP{tp} {gpu}: aggregated vs every split P + D = {n}"
    else:
        (tp_p, g_p), (tp_d, g_d) = pools["prefill"], pools["decode"]
        designs = (
            f"{n} replicas: aggregated of TP{tp} {gpu} vs every split P + D = {n} of prefill "
            f"TP{tp_p} {g_p} and decode TP{tp_d} {g_d}"
        )
    return (
        f"{designs}; KV link {link}{where}; each workload flat at {load:g} x the aggregated "
        f"fleet's capacity for {hours} h; engine: "
        + ("the scenario's" if engine == "scenario" else engine)
    )


def lowest_ratio_text(r: np.ndarray) -> str:
    """The outcome table's ``lowest ratio`` of :func:`best_ratio`'s cells: the lowest ratio of
    the cells both designs meet, and the cells only one design meets, counted (they have no
    ratio: a cell only the aggregated fleet meets read ``n/a`` when every cell was one, and a
    cell only the split meets counted as a ratio of 0)."""
    both = r[np.isfinite(r) & (r > 0)]
    parts = [fmt_num(float(both.min()), ".3f")] if len(both) else []
    d_only, a_only = int(np.sum(r == 0)), int(np.sum(np.isposinf(r)))
    if d_only:
        parts.append(f"{d_only} met only by the split")
    if a_only:
        parts.append(f"{a_only} met only by the aggregated fleet")
    return "; ".join(parts) or "n/a: neither design meets any target cell"


def print_outcome(table: pa.Table, c) -> None:
    """For each workload, the target cells where the best split is cheaper per SLO-meeting
    request, as a table (never cut: :mod:`fleetsim.base.tables`)."""
    from fleetsim.base.tables import print_table

    rows = []
    for name in dict.fromkeys(table.column("workload").to_pylist()):
        r = best_ratio(table, name)
        wins, cells, _ = cell_counts(r)
        rows.append((term(name), f"{wins} of {cells}", lowest_ratio_text(r)))
    # a column of numbers is right-aligned; one that holds text ("0.500; 3 met only by the
    # split", "n/a: ...") reads from the left, as the other text columns
    texts = any(not _is_number(row[2]) for row in rows)
    print_table(
        c,
        "disaggregated (best split) vs aggregated, cost per SLO-meeting request",
        ("workload", "target cells where disaggregation is cheaper", "lowest ratio"),
        rows,
        left=("workload", "lowest ratio") if texts else ("workload",),
    )


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    from fleetsim.apps.common import OneLineParser, description

    ap = OneLineParser(prog="fleetsim crossover", description=description(__doc__))
    ap.add_argument("scenario", help="scenario TOML file (its [disaggregation] gives the link)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="override a scenario field, e.g. --set fleet.replicas=6 (value read as TOML; "
        "repeatable)",
    )
    ap.add_argument(
        "--load", type=float, default=0.7, help="arrival rate / the aggregated fleet's capacity"
    )
    ap.add_argument("--hours", type=int, default=2, help="simulated hours per point (flat)")
    ap.add_argument(
        "--engine",
        choices=("scenario", "reserve"),
        default="scenario",
        help="the engine of both designs: the scenario's (default: paged KV, chunked prefill, "
        "prefix caching) or 'reserve' (the first engine: KV reserved, whole prefills)",
    )
    ap.add_argument(
        "--long-trace",
        metavar="JSONL",
        help="replay this Mooncake trace (e.g. scenarios/data/mooncake-2025/"
        "conversation_trace.jsonl) as the long workload: its sizes and prompt block ids (prefix "
        "caching hits), its arrivals stretched to the measured rate, prompts over 32,768 tokens "
        "dropped (default: the lognormal fitted to that trace, no block ids)",
    )
    ap.add_argument(
        "--out",
        help="output folder (default out/<the scenario file's stem>-crossover, "
        "e.g. out/default-crossover)",
    )
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    ap.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, outcome table or notes (a note, e.g. a workload left out, is "
        "also kept in crossover.parquet's metadata, and fleetsim report shows it)",
    )
    add_executor_args(ap)
    return ap


def main(argv: list[str]) -> int:
    """``fleetsim crossover``: see the module docstring."""
    from fleetsim.apps.common import open_output
    from fleetsim.results.output import write_bytes_atomic, write_table_atomic

    args = build_parser().parse_args(argv)
    if not (0 < args.load < 10):
        raise UserError(
            f"--load {args.load:g}: the arrival rate over the aggregated fleet's capacity must be "
            "in (0, 10) (fix: e.g. --load 0.7)"
        )
    if args.hours < 1:
        raise UserError(f"--hours {args.hours}: must be at least 1 (fix: e.g. --hours 2)")
    data, _text = read_toml(args.scenario)
    data = apply_overrides(data, args.overrides)
    sc = scenario_from_dict(data, args.scenario)
    data = sc.model_dump(mode="json", exclude_none=True)
    check_no_dp_ep(data)
    if args.long_trace is not None:  # read and checked whole before anything is simulated
        from fleetsim.workload.mooncake import is_mooncake

        if not is_mooncake(args.long_trace):
            raise UserError(
                f"--long-trace {io.clean(args.long_trace)!r}: not a Mooncake .jsonl trace file "
                "(fix: give e.g. scenarios/data/mooncake-2025/conversation_trace.jsonl)"
            )
        long_trace_rows(os.path.abspath(args.long_trace), MOONCAKE_MAX_PROMPT)
    outp = open_output(
        args, Path(args.scenario).stem + "-crossover", ("crossover.parquet", "crossover.png")
    )
    t0 = time.perf_counter()
    notes: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="fleetsim-crossover-") as tmp,
        make_executor(args.executor, args.workers, args.address) as ex,
        task_progress(progress_label("crossover", ex), args.quiet) as hooks,
    ):
        table = run_crossover(
            data,
            args.scenario,
            ex,
            hooks,
            args.load,
            args.hours,
            args.engine,
            os.path.abspath(args.long_trace) if args.long_trace else None,
            Path(tmp),
            notes,
        )
    # the notes (a workload left out, and why) travel with the table: a --quiet run prints
    # none, and fleetsim report shows them on the page (NOTES_KEY)
    write_table_atomic(
        table, outp.path("crossover.parquet"), {NOTES_KEY: json.dumps(notes)} if notes else None
    )
    write_bytes_atomic(draw(table), outp.path("crossover.png"))
    outp.commit()
    if not args.quiet:
        from fleetsim.apps.common import console

        c = console()
        c.print(term(setup_line(data, args.load, args.hours, args.engine), 400), highlight=False)
        for line in notes:
            c.print(term(f"note: {line}", 600), highlight=False)
        print_outcome(table, c)
        c.print(
            f"wrote {term(outp.out)}/crossover.parquet and crossover.png in "
            f"{time.perf_counter() - t0:.1f} s",
            highlight=False,
        )
    return 0
