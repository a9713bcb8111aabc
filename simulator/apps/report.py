"""``fleetsim report DIR``: plots and a page for a finished run, with a peak-hour analysis.

From ``DIR/hourly.parquet`` (and the scenario in its metadata), or from a :class:`Result` in
memory (``fleetsim run --report``), this writes into ``DIR``:

* ``cost.png``: hourly cost stacked by part (energy, hardware);
* ``power.png``: hourly facility power (mean kW over the hour, numerically its kWh) by part:
  GPU idle (the static draw: idle while on, waking, standby while off), GPU dynamic (the
  iterations' work) and node overhead, each x PUE, with the electricity price;
* ``utilization.png``: utilisation and the GPUs powered (autoscaling shows here);
* ``latency.png``: p99 TTFT and TPOT against the SLO lines;
* ``report.html`` (self-contained: the PNGs are embedded as base64) and ``report.md`` (links).

The peak-hour analysis gives the busiest hour's share of the day's cost, the cost per request
at the busiest and the quietest hour, and the *marginal cost of the peak*: the day's cost minus
the cost of the same day with the same requests spread evenly over it (``traffic.diurnal =
"flat"``), re-simulated from the scenario when it is available. The re-simulation takes as long
as the run itself, so its result is kept in ``DIR/flat-day.json``, keyed by the flat scenario
(its canonical JSON, the seed included) and the fleetsim version: a later report of the same run
reads it instead of simulating again (``fleetsim run --report`` writes it too). Every file is
written atomically.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fleetsim.apps.common import OneLineParser, description, not_a_run
from fleetsim.base.errors import UserError
from fleetsim.base.units import fmt_num, per_sim_hour, run_span
from fleetsim.results.output import write_bytes_atomic, write_text_atomic
from fleetsim.results.result import DayTotals

PLOTS = ("cost", "power", "utilization", "latency")


@dataclass
class RunData:
    """What the report needs of a run, from memory or from disk."""

    cols: dict[str, np.ndarray]
    totals: DayTotals
    config: dict[str, Any] | None  # the validated scenario as a dict (None if unknown)
    name: str = "run"
    source: str = ""
    notes: list[str] = field(default_factory=list)
    pools: Any = None  # pools.parquet of a disaggregated run (a pyarrow Table), or None
    latency: dict[str, float] = field(default_factory=dict)  # day-wide (empty if unknown)
    pod_ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # sampled pods' 95%


def _from_result(res) -> RunData:
    t = res.hourly
    cols = {n: t.column(n).to_numpy(zero_copy_only=False) for n in t.schema.names}
    cfg = json.loads(res.scenario.model_dump_json())
    return RunData(
        cols,
        res.totals,
        cfg,
        res.scenario.name,
        pools=res.pools,
        latency=dict(res.day_latency),
        pod_ci=dict(res.pod_ci),
    )


REQUIRED_COLUMNS = (
    "hour",
    "total_cost_usd",
    "energy_facility_kwh",
    "energy_cost_usd",
    "hardware_cost_usd",
    "energy_it_kwh",
    "energy_gpu_kwh",
    "price_usd_per_kwh",
    "utilization",
    "gpus_powered_mean",
    "ttft_p99_s",
    "tpot_p99_s",
    "requests_arrived",
    "requests_completed",
)


def _from_dir(out_dir: Path) -> RunData:
    """The run in ``out_dir/hourly.parquet``; anything that is not a fleetsim hourly table (no
    rows, a missing or non-numeric column, metadata that is not a JSON object) is one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fleetsim.base import io

    path = out_dir / "hourly.parquet"
    if not path.is_file():
        raise UserError(f"{io.clean(str(out_dir))}: {not_a_run(out_dir)}")
    where = io.clean(str(path))
    bad = f"{where}: not a fleetsim hourly table"
    raw = io.read_bytes(path, "", io.MAX_TRACE_BYTES)
    try:
        t = pq.read_table(pa.BufferReader(raw))
        meta = {
            k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in (t.schema.metadata or {}).items()
            if not k.startswith(b"ARROW")
        }
    except Exception as exc:
        raise UserError(f"{where}: cannot read it as Parquet ({io.clean(str(exc), 120)})") from None
    missing = [c for c in ("hour_start", *REQUIRED_COLUMNS) if c not in t.schema.names]
    if missing:
        raise UserError(f"{bad} (missing column(s) {', '.join(missing)})")
    if t.num_rows == 0:
        raise UserError(f"{bad} (it has no rows)")
    for c in REQUIRED_COLUMNS:
        ty = t.schema.field(c).type
        if not (pa.types.is_integer(ty) or pa.types.is_floating(ty)):
            raise UserError(f"{bad} (column {c} is {ty}, not numbers)")
    if not pa.types.is_timestamp(t.schema.field("hour_start").type):
        raise UserError(f"{bad} (column hour_start is not a timestamp)")
    cols = {n: t.column(n).to_numpy(zero_copy_only=False) for n in t.schema.names}

    def obj(key: str) -> dict | None:
        if key not in meta:
            return None
        v = io.parse_json(meta[key], f"{where}: metadata {key}")
        if not isinstance(v, dict):
            raise UserError(f"{where}: metadata {key} is a JSON {type(v).__name__}, not an object")
        return v

    cfg = obj("fleetsim.config")
    totals = DayTotals.from_dict(obj("fleetsim.totals") or {})
    name = str((cfg or {}).get("name", out_dir.name))
    if cfg is not None:
        from fleetsim.config.loading import scenario_from_dict

        try:  # only a valid scenario is re-simulated or read for its SLO
            cfg = json.loads(scenario_from_dict(cfg, where).model_dump_json())
        except UserError:
            cfg = None
    lat = obj("fleetsim.latency") or {}
    latency = {k: float(v) for k, v in lat.items() if isinstance(v, (int, float))}
    pod_ci = {
        k: (float(v[0]), float(v[1]))
        for k, v in (obj("fleetsim.pod_ci95") or {}).items()
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
    }
    pools = None
    if (out_dir / "pools.parquet").is_file():  # a disaggregated run
        try:
            pools = pq.read_table(
                pa.BufferReader(io.read_bytes(out_dir / "pools.parquet", "", io.MAX_TRACE_BYTES))
            )
        except Exception as exc:
            raise UserError(
                f"{io.clean(str(out_dir / 'pools.parquet'))}: cannot read it as Parquet "
                f"({io.clean(str(exc), 120)})"
            ) from None
    return RunData(cols, totals, cfg, name, pools=pools, latency=latency, pod_ci=pod_ci)


def pool_lines(d: RunData) -> list[tuple[str, str]]:
    """The pools of a disaggregated run and the KV traffic between them, as (label, text)."""
    if d.pools is None:
        return []
    from fleetsim.results.summary import pool_day_totals

    try:
        pt = pool_day_totals(d.pools)
        df = d.pools.to_pandas()
    except Exception as exc:  # a pools.parquet that is not fleetsim's
        raise UserError(f"pools.parquet: not a fleetsim pools table ({exc})") from None
    out = []
    hours = max(1, int(df["hour"].max()) + 1)
    for name, t in pt.items():
        g = df[df.pool == name].iloc[0]
        out.append(
            (
                f"{name} pool",
                f"{int(g.replicas)} x TP{int(g.tensor_parallel)} {g.gpu}: "
                f"{t['gpu_hours']:,.1f} GPU-h, busy {t['utilization']:.1%}, "
                f"{t['energy_facility_kwh']:,.1f} kWh, $ {t['total_cost_usd']:,.2f} "
                f"(energy $ {t['energy_cost_usd']:,.2f}, hardware $ {t['hardware_cost_usd']:,.2f})"
                f"; prefix-cache hits {t['prefix_hit_tokens']:,.0f} tokens, "
                f"{t['preemptions']:,.0f} preemptions",
            )
        )
    x = pt.get("prefill", {})
    if x:
        out.append(
            (
                "KV transfers",
                f"{x['kv_transfers']:,.0f} requests, {x['kv_transfer_bytes'] / 1e9 / hours:,.1f} "
                f"GB per hour; mean {x['kv_transfer_mean_s'] * 1e3:.2f} ms, worst hour's p99 "
                f"{x['kv_transfer_worst_hour_p99_s'] * 1e3:.2f} ms",
            )
        )
    return out


def plain(text: str) -> str:
    """User text on one line: control characters (ANSI escapes, newlines) shown escaped."""
    from fleetsim.base.io import clean

    return clean(str(text), 200)


def for_plot(text: str) -> str:
    """User text for a matplotlib title: ``$`` escaped so that it is never math."""
    return plain(text).replace("$", r"\$")


def for_markdown(text: str) -> str:
    """User text for Markdown: HTML escaped and Markdown punctuation backslash-escaped."""
    out = html.escape(plain(text), quote=False)
    return "".join("\\" + ch if ch in "\\`*_{}[]()#+-.!|~<>$" else ch for ch in out)


def for_heading(text: str) -> str:
    """User text for a Markdown heading or table cell: HTML escaped and only the characters
    that start inline markup escaped (``-``, ``.`` and ``(`` stay as written, so a scenario
    named ``llama70b-h100-conversation`` reads as such in the raw file)."""
    out = html.escape(plain(text), quote=False)
    return "".join("\\" + ch if ch in "\\`*_[]<>|#$~!" else ch for ch in out)


# ---------------------------------------------------------------------------------------------
# plots
def _hours_axis(ax, cols) -> np.ndarray:
    h = cols["hour"].astype(int)
    starts = cols["hour_start"]
    labels = [
        f"{np.datetime64(s, 'h').astype(object).hour:02d}" if not isinstance(s, str) else s
        for s in starts
    ]
    step = max(1, len(h) // 12)
    ax.set_xticks(h[::step])
    ax.set_xticklabels(labels[::step])
    ax.set_xlabel("hour of day (UTC)")
    ax.grid(axis="y", alpha=0.3)
    return h


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def make_plots(d: RunData, slo: dict[str, float] | None) -> dict[str, bytes]:
    """The four figures as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = d.cols
    with plt.rc_context({"figure.figsize": (9, 4), "font.size": 9}):
        return {
            "cost": _plot_cost(plt, d, c),
            "power": _plot_power(plt, d, c),
            "utilization": _plot_utilization(plt, d, c),
            "latency": _plot_latency(plt, d, c, slo),
        }


def _plot_cost(plt: Any, d: RunData, c: dict[str, Any]) -> bytes:
    """Hourly cost, hardware and energy stacked."""
    fig, ax = plt.subplots()
    h = _hours_axis(ax, c)
    e, hw = c["energy_cost_usd"], c["hardware_cost_usd"]
    mode = ((d.config or {}).get("cost") or {}).get("hardware")
    how = {"owned": "owned: amortised capex", "rented": "rented: rent while powered"}
    ax.bar(h, hw, color="#7f7f7f", label=f"hardware ({how.get(str(mode), 'amortised or rented')})")
    ax.bar(h, e, bottom=hw, color="#1f77b4", label="energy (facility kWh x price)")
    ax.set_ylabel("cost per hour ($)")
    ax.set_title(
        f"{for_plot(d.name)}: hourly cost by part (day: \\${np.nansum(e + hw):,.2f} = "
        f"energy \\${np.nansum(e):,.2f} + hardware \\${np.nansum(hw):,.2f})"
    )
    ax.set_ylim(0, float(np.nanmax(e + hw)) * 1.3 or 1.0)
    ax.legend(loc="upper left", ncol=2)
    png = _png(fig)
    plt.close(fig)
    return png


def power_parts(c: dict[str, Any]) -> list[tuple[str, str, np.ndarray]]:
    """The hourly facility kWh by part, bottom to top, as (label, colour, kWh): the GPUs'
    static draw (idle while on, waking, standby while off), their dynamic energy (the
    iterations' work) and the node overhead, each x the hour's PUE (facility / IT energy). An
    hourly table without the GPU split (an older run) has one GPU part."""
    fac = np.asarray(c["energy_facility_kwh"], dtype=float)
    it = np.asarray(c["energy_it_kwh"], dtype=float)
    pue = np.divide(fac, it, out=np.zeros_like(fac), where=it > 0)
    gpu = np.asarray(c["energy_gpu_kwh"], dtype=float)
    idle, dyn = c.get("energy_gpu_idle_kwh"), c.get("energy_gpu_dynamic_kwh")
    if idle is not None and dyn is not None and np.isfinite(idle).all() and np.isfinite(dyn).all():
        parts = [
            ("GPU idle (x PUE)", "#f4a582", np.asarray(idle, dtype=float) * pue),
            ("GPU dynamic (x PUE)", "#d62728", np.asarray(dyn, dtype=float) * pue),
        ]
    else:
        parts = [("GPUs (x PUE)", "#d62728", gpu * pue)]
    return [*parts, ("node overhead (x PUE)", "#bababa", (it - gpu) * pue)]


def _plot_power(plt: Any, d: RunData, c: dict[str, Any]) -> bytes:
    """Facility power and energy per hour by part (GPU idle, GPU dynamic, node overhead, each
    x PUE), with the price."""
    fig, ax = plt.subplots()
    h = _hours_axis(ax, c)
    fac = c["energy_facility_kwh"]
    bottom = np.zeros(len(h))
    for label, color, part in power_parts(c):
        ax.bar(h, part, bottom=bottom, color=color, label=label)
        bottom = bottom + part
    ax.set_ylabel("facility power, mean kW (= kWh in the hour)")
    ax.set_ylim(0, float(np.nanmax(fac)) * 1.45 or 1.0)
    ax.set_title(
        f"{for_plot(d.name)}: facility power and energy per hour (day: {np.nansum(fac):,.1f} kWh)"
    )
    ax2 = ax.twinx()
    ax2.step(
        h, c["price_usd_per_kwh"], where="mid", color="black", lw=1.2, label="electricity price"
    )
    ax2.set_ylabel("$ per kWh")
    ax2.set_ylim(0, max(float(np.nanmax(c["price_usd_per_kwh"])) * 1.3, 1e-9))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", ncol=2)
    png = _png(fig)
    plt.close(fig)
    return png


def _plot_utilization(plt: Any, d: RunData, c: dict[str, Any]) -> bytes:
    """Headroom (KV use, batch occupancy, FLOP/s and bandwidth vs peak), the busy fraction
    and the powered GPUs."""
    fig, ax = plt.subplots()
    h = _hours_axis(ax, c)
    # headroom: under continuous batching "busy" means "any request in flight", so the busy
    # fraction sits near 1; how full the batches are and how much of the GPUs' peak compute
    # and memory bandwidth the work uses show what is left (older files lack the columns)
    for col, style, color, label in (
        ("kv_utilization", "D-", "#d62728", "KV use (blocks in use / KV budget)"),
        ("batch_occupancy", "s-", "#ff7f0e", "batch occupancy (sequences / max_num_seqs)"),
        ("flops_utilization", "^-", "#1f77b4", "FLOP/s / peak"),
        ("bandwidth_utilization", "v-", "#8c564b", "memory bandwidth / peak"),
    ):
        if col in c:
            ax.plot(h, c[col], style, color=color, ms=3, label=label)
    ax.plot(
        h,
        c["utilization"],
        ":",
        color="#2ca02c",
        label="busy fraction (an iteration in flight; not headroom)",
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax2 = ax.twinx()
    ax2.step(
        h,
        c["gpus_powered_mean"],
        where="mid",
        color="#9467bd",
        lw=1.5,
        label="GPUs powered (mean)",
    )
    ax2.set_ylim(0, max(float(np.nanmax(c["gpus_powered_mean"])) * 1.15, 1))
    ax2.set_ylabel("GPUs powered")
    ax.set_title(f"{for_plot(d.name)}: headroom (KV, batch, FLOP/s, bandwidth) and GPUs")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(
        lines[0] + lines2[0],
        lines[1] + lines2[1],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        fontsize=8,
        ncol=3,
    )
    png = _png(fig)
    plt.close(fig)
    return png


def _plot_latency(plt: Any, d: RunData, c: dict[str, Any], slo: dict[str, float] | None) -> bytes:
    """p99 (and p50) TTFT and TPOT per hour against the SLO."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, key, label, unit, name in (
        (a1, "ttft_p99_s", "ttft_s", "p99 TTFT", 1.0, "s"),
        (a2, "tpot_p99_s", "tpot_s", "p99 TPOT", 1000.0, "ms"),
    ):
        h = _hours_axis(ax, c)
        ax.plot(h, c[col] * unit, "o-", label=label)
        if col.replace("99", "50") in c:
            ax.plot(
                h,
                c[col.replace("99", "50")] * unit,
                ".--",
                alpha=0.6,
                label=label.replace("p99", "p50"),
            )
        if slo and key in slo:
            ax.axhline(
                slo[key] * unit, color="red", ls=":", label=f"SLO {slo[key] * unit:g} {name}"
            )
        ax.set_ylabel("seconds" if unit == 1.0 else "milliseconds")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best")
        ax.set_title(f"{label} per hour (requests completed in it)")
    fig.suptitle(f"{for_plot(d.name)}: latency against the SLO")
    png = _png(fig)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------
# peak-hour analysis
FLAT_FILE = "flat-day.json"


def flat_day_key(flat: dict[str, Any], run_cost_usd: float | None = None) -> str:
    """The cache key of a flat-day scenario: SHA-256 of its canonical JSON, the version and the
    run's own day cost (a run whose data files changed under the same scenario text has another
    cost, so it does not reuse the flat day of the old data)."""
    import hashlib

    from fleetsim.base.version import __version__

    text = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{__version__}\n{run_cost_usd!r}\n{text}".encode()).hexdigest()


MAX_FLAT_DAY_COST_USD = 1e15  # a day's cost above this (world GDP is ~3e14 $/day) is no cache


def _cached_flat(path: Path | None, key: str) -> float | None:
    """The cost in ``path`` (a flat-day.json) if its key is ``key`` and the cost a finite
    number in [0, MAX_FLAT_DAY_COST_USD]; None otherwise (absent, a link, unreadable, not an
    object, another scenario or version, an impossible cost: then the day is simulated
    again)."""
    if path is None or not os.path.lexists(path):
        return None
    from fleetsim.base import io

    try:  # (fleetsim's own file in the output folder: a link or a second hard link is refused)
        d, _ = io.load_json(path, "", io.MAX_CONFIG_BYTES, nofollow=True)
    except UserError:
        return None
    if not isinstance(d, dict) or d.get("key") != key:
        return None
    v = d.get("flat_day_cost_usd")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) and 0.0 <= v <= MAX_FLAT_DAY_COST_USD else None


def flat_day_cost(
    cfg: dict[str, Any],
    source: str = "",
    progress=None,
    cache: Path | None = None,
    save: Path | None = None,
    run_cost_usd: float | None = None,
) -> tuple[float | None, str]:
    """The day's cost with the same requests spread evenly (``diurnal = "flat"``) and how it was
    had ("re-simulated", "read from flat-day.json"), or None and why not. ``cache``: a
    flat-day.json to reuse if it was made for the same flat scenario and run; ``save``: where to
    write the one computed (or reused); ``run_cost_usd``: the run's own day cost, part of the
    key."""
    from fleetsim.apps.simulate import simulate
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.loading import scenario_from_dict

    if (cfg.get("traffic") or {}).get("trace"):
        return None, "the run replays a timed trace, which cannot be flattened"
    from fleetsim.config.schedules import diurnal_weights

    flat = json.loads(json.dumps(cfg))
    tr = flat.setdefault("traffic", {})
    # the same expected number of requests over the simulated hours, spread evenly
    w = diurnal_weights(tr.get("diurnal", "azure-conv"))
    hours = int((flat.get("simulation") or {}).get("hours", 24))
    start = str((flat.get("simulation") or {}).get("start_utc", "2026-01-01T00:00:00Z"))
    try:  # the curve is by UTC hour of day; the run starts at this hour
        hod0 = datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC).hour
    except ValueError:
        hod0 = 0
    share = (sum(per_sim_hour(w, hod0, hours)) / hours) / (sum(w) / 24.0)
    tr["requests_per_day"] = float(tr.get("requests_per_day", 1_000_000.0)) * share
    tr["diurnal"] = "flat"
    key = flat_day_key(flat, run_cost_usd)
    cost = _cached_flat(cache, key)
    how = f"read from {FLAT_FILE}" if cost is not None else "re-simulated"
    if cost is None:
        try:
            sc = scenario_from_dict(flat, source or "scenario (from metadata)")
            step = None
            if progress is not None:  # (pod-hours: the simulated pods x the hours)
                from fleetsim.apps.simulate import pods_to_simulate

                step = progress(len(pods_to_simulate(sc)) * sc.simulation.hours)
            res = simulate(sc, source=source, progress=step)
        except (UserError, ScenarioError) as exc:
            # without --scenario, a relative path (a trace, a size file) resolves against the
            # working folder, not the scenario's: name the option that fixes it
            fix = (
                ""
                if source
                else "; fix: fleetsim report DIR --scenario FILE, the scenario file the run "
                "came from, to resolve its relative paths"
            )
            return None, f"the scenario could not be re-simulated here ({exc}{fix})"
        cost = float(res.totals.total_cost_usd)
    if save is not None:
        doc = {"key": key, "flat_day_cost_usd": cost, "requests_per_day": tr["requests_per_day"]}
        write_text_atomic(json.dumps(doc, indent=1) + "\n", save)
    return cost, how


def peak_analysis(
    d: RunData,
    flatten: bool = True,
    progress=None,
    cache: Path | None = None,
    save: Path | None = None,
) -> dict[str, Any]:
    """Peak and trough hours, the peak's share of the cost, and its marginal cost (the flat day
    read from ``cache`` or simulated, and written to ``save``: see :func:`flat_day_cost`)."""
    c = d.cols
    arrived = c["requests_arrived"].astype(float)
    done = c["requests_completed"].astype(float)
    cost = c["total_cost_usd"]
    day = float(np.nansum(cost))
    peak = int(np.argmax(arrived))
    served = np.nonzero(done > 0)[0]
    trough = int(served[np.argmin(arrived[served])]) if len(served) else int(np.argmin(arrived))
    a: dict[str, Any] = {
        "day_cost_usd": day,
        "hours": len(cost),  # what day_cost_usd covers (simulation.hours)
        "peak_hour": peak,
        "trough_hour": trough,
        "peak_hour_utc": hour_of_day(d, peak),
        "trough_hour_utc": hour_of_day(d, trough),
        "peak_requests": int(arrived[peak]),
        "trough_requests": int(arrived[trough]),
        "peak_cost_share": float(cost[peak] / day) if day else math.nan,
        "peak_usd_per_request": float(cost[peak] / done[peak]) if done[peak] else math.nan,
        "trough_usd_per_request": float(cost[trough] / done[trough]) if done[trough] else math.nan,
        "peak_to_mean_traffic": float(arrived[peak] / arrived.mean())
        if arrived.mean()
        else math.nan,
        "flat_day_cost_usd": None,
        "marginal_cost_of_peak_usd": None,
        "flat_note": "",
    }
    if not flatten:
        a["flat_note"] = "not computed (--no-flat)"
    elif d.config is None:
        a["flat_note"] = "not computed: the run's scenario is not in the file's metadata"
    else:
        flat, why = flat_day_cost(d.config, d.source, progress, cache, save, day)
        if flat is None:
            a["flat_note"] = f"not computed: {why}"
        else:
            a["flat_day_cost_usd"] = flat
            a["flat_source"] = why  # re-simulated, or read from flat-day.json
            a["marginal_cost_of_peak_usd"] = day - flat
    return a


# ---------------------------------------------------------------------------------------------
# the page
_fmt = fmt_num


def _marginal_usd(m: float) -> str:
    """The marginal cost of the peak as the page and the terminal print it: cents from a dollar
    up, four decimals below (a flat day within a cent of the real one is not '$ -0.00')."""
    return f"$ {_fmt(m, ',.2f' if abs(m) >= 1 else '.4f')}"


def _rows(d: RunData, a: dict[str, Any]) -> list[tuple[str, str]]:
    t = d.totals

    def hod(i: int) -> str:
        return hour_of_day(d, i)

    rows = [
        *_headroom_rows(d),
        ("requests completed", _fmt(t.requests_completed, ",.0f")),
        ("facility energy", _energy_split(t)),
        ("energy cost", f"$ {_fmt(t.energy_cost_usd)}"),
        ("hardware cost", f"$ {_fmt(t.hardware_cost_usd)}"),
        ("total cost", f"$ {_fmt(t.total_cost_usd)}"),
        *_ci_rows(d),
        ("GPU-hours powered", _fmt(t.gpu_hours, ",.1f")),
        (
            "busy fraction of powered time",
            f"{_fmt(t.utilization, '.1%')} (an iteration in flight: not headroom under "
            "continuous batching)",
        ),
        ("Wh per request", _fmt(t.wh_per_request, ",.3f")),
        ("$ per M output tokens", _fmt(t.usd_per_mtok, ",.3f")),
        ("SLO attainment", _fmt(t.slo_attainment, ".2%") + _slo_targets(d)),
        *_latency_rows(d),
        (
            "busiest hour (by arrivals)",
            f"{hod(a['peak_hour'])}: {a['peak_requests']:,} requests "
            f"({_fmt(a['peak_to_mean_traffic'], '.2f')} x the hourly mean)",
        ),
        (
            f"busiest hour's share of the cost of {run_span(a.get('hours', 24))}"
            if a.get("hours", 24) != 24
            else "busiest hour's share of the day's cost",
            _fmt(a["peak_cost_share"], ".2%"),
        ),
        ("cost per request, busiest hour", f"$ {_fmt(a['peak_usd_per_request'], '.6f')}"),
        (
            "cost per request, quietest hour",
            f"$ {_fmt(a['trough_usd_per_request'], '.6f')} "
            f"({hod(a['trough_hour'])}, {a['trough_requests']:,} requests)",
        ),
    ]
    if a["marginal_cost_of_peak_usd"] is not None:
        m = a["marginal_cost_of_peak_usd"]
        rows.append(("same requests, flat day", f"$ {_fmt(a['flat_day_cost_usd'])}"))
        rows.append(
            (
                "marginal cost of the peak",
                f"{_marginal_usd(m)} "
                f"({_fmt(m / a['day_cost_usd'] if a['day_cost_usd'] else math.nan, '.2%')} "
                f"of {run_span(a.get('hours', 24))})",
            )
        )
    else:
        rows.append(("marginal cost of the peak", a["flat_note"]))
    return rows


def _ci_rows(d: RunData) -> list[tuple[str, str]]:
    """A sampled fleet's 95% interval over the simulated pods for the day's energy and cost
    (the terminal summary's; none when every pod was simulated)."""
    rows = []
    for key, label, pre, unit in (
        ("energy_facility_kwh", "facility energy, 95% interval over pods", "", " kWh"),
        ("total_cost_usd", "total cost, 95% interval over pods", "$ ", ""),
    ):
        if key in d.pod_ci:
            lo, hi = d.pod_ci[key]
            rows.append((label, f"{pre}{_fmt(lo)} .. {pre}{_fmt(hi)}{unit}"))
    return rows


def _slo_targets(d: RunData) -> str:
    """`` (TTFT <= 2 s and TPOT <= 200 ms)``: the scenario's targets, when it is known."""
    slo = (d.config or {}).get("slo") or {}
    if not isinstance(slo.get("ttft_s"), (int, float)) or not isinstance(
        slo.get("tpot_s"), (int, float)
    ):
        return ""
    return f" of requests with TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s'] * 1e3:g} ms"


def _energy_split(t: DayTotals) -> str:
    """The day's facility kWh and its parts, as the terminal summary writes them."""
    total = f"{_fmt(t.energy_facility_kwh)} kWh"
    if not t.energy_it_kwh > 0:
        return total
    gpu = _fmt(t.energy_gpu_kwh)
    if math.isfinite(t.energy_gpu_idle_kwh) and math.isfinite(t.energy_gpu_dynamic_kwh):
        gpu = (
            f"GPU idle {_fmt(t.energy_gpu_idle_kwh)} + GPU dynamic {_fmt(t.energy_gpu_dynamic_kwh)}"
        )
    else:
        gpu = f"GPU {gpu}"
    return (
        f"{total} = ({gpu} + node overhead {_fmt(t.energy_overhead_kwh)}) kWh "
        f"x PUE {_fmt(t.energy_facility_kwh / t.energy_it_kwh, '.3g')}"
    )


def _headroom_rows(d: RunData) -> list[tuple[str, str]]:
    """Capacity headroom first: the peak hour's load against the SLO-bound capacity (when the
    scenario is known), batch occupancy, peak KV use, FLOP/s and bandwidth against peak."""
    c, t, rows = d.cols, d.totals, []

    def top(col: str) -> float:
        v = np.asarray(c.get(col, []), dtype=float)
        return float(np.nanmax(v)) if np.isfinite(v).any() else math.nan

    load = _peak_load(d)
    if load is not None:
        rows.append(
            (
                "peak hour's load (of the SLO-bound capacity)",
                f"{_fmt(load[0], '.0%')}: {_fmt(load[1], ',.2f')} req/s of an estimated "
                f"{_fmt(load[2], ',.2f')} req/s within the TPOT target (no queueing; "
                "fleetsim plan sizes it)",
            )
        )
    rows.append(
        (
            "batch occupancy (of max_num_seqs)",
            f"{_fmt(t.batch_occupancy, '.1%')}; highest hourly mean "
            f"{_fmt(top('batch_occupancy'), '.1%')}",
        )
    )
    if "kv_utilization" in c and top("kv_utilization") > 0:
        rows.append(("peak KV use (highest hourly mean)", _fmt(top("kv_utilization"), ".1%")))
    rows.append(
        (
            "FLOP/s and memory bandwidth (of peak)",
            f"{_fmt(t.flops_utilization, '.1%')} and {_fmt(t.bandwidth_utilization, '.1%')}",
        )
    )
    return rows


def _peak_load(d: RunData) -> tuple[float, float, float] | None:
    """(load, the peak hour's rate, the estimated SLO-bound capacity) of an aggregated run
    whose scenario is known (:func:`fleetsim.results.summary.headroom`), else None."""
    if d.config is None or d.pools is not None:
        return None
    try:
        from fleetsim.config.loading import scenario_from_dict
        from fleetsim.config.resolve import resolve
        from fleetsim.results.capacity import replica_capacity_rps, run_sizes

        rs = resolve(scenario_from_dict(d.config))
        arrived = np.asarray(d.cols["requests_arrived"], dtype=float)
        h = int(np.argmax(arrived))
        t = d.totals
        done = max(t.requests_completed, 1.0)
        cap = replica_capacity_rps(
            rs,
            "",
            tpot_s=rs.scenario.slo.tpot_s,
            sizes=run_sizes(rs, "", t.prompt_tokens / done, t.output_tokens / done),
        )
        cap *= float(d.cols["gpus_powered_mean"][h]) / rs.tp
        rate = float(arrived[h]) / 3600.0
    except Exception:  # (a scenario this version cannot resolve: no estimate)
        return None
    return (rate / cap, rate, cap) if cap > 0 else None


def hour_of_day(d: RunData, i: int) -> str:
    """Hour ``i`` of the run as its UTC hour of day and its index: ``14:00 UTC (hour 4)``."""
    return (
        f"{np.datetime64(d.cols['hour_start'][i], 'h').astype(object).hour:02d}:00 UTC (hour {i})"
    )


def _latency_rows(d: RunData) -> list[tuple[str, str]]:
    """TTFT, TPOT, ITL and e2e over the day (p50 / p90 / p99 and mean; TPOT and ITL in ms, as
    in the terminal) and the worst hour's p99 TTFT and TPOT."""
    lat, rows = d.latency, []
    for m, label, scale, unit, fmt in (
        ("ttft", "TTFT", 1.0, "s", ".3f"),
        ("tpot", "TPOT", 1000.0, "ms", ".1f"),
        ("itl", "ITL (token gaps)", 1000.0, "ms", ".1f"),
        ("e2e", "end-to-end latency", 1.0, "s", ".2f"),
    ):
        if f"{m}_p99_s" not in lat:
            continue
        p = " / ".join(_fmt(lat.get(f"{m}_p{q}_s", math.nan) * scale, fmt) for q in (50, 90, 99))
        mean = _fmt(lat.get(f"{m}_mean_s", math.nan) * scale, fmt)
        rows.append((f"{label}: p50 / p90 / p99, mean", f"{p} {unit}, mean {mean} {unit}"))
    c = d.cols
    for col, label, scale, unit, fmt in (
        ("ttft_p99_s", "worst hour's p99 TTFT", 1.0, "s", ".3f"),
        ("tpot_p99_s", "worst hour's p99 TPOT", 1000.0, "ms", ".1f"),
    ):
        v = np.asarray(c[col], dtype=float)
        if np.isfinite(v).any():
            i = int(np.nanargmax(v))
            rows.append((label, f"{_fmt(float(v[i]) * scale, fmt)} {unit} at {hour_of_day(d, i)}"))
    return rows


_EXPLAIN = (
    "The marginal cost of the peak is the day's cost minus the cost of the same requests "
    'spread evenly over the day (traffic.diurnal = "flat", re-simulated with the same '
    "fleet, autoscaler and prices). With a static, owned fleet it is only the energy the "
    "peak adds; autoscaling, rented GPUs and time-of-use prices make it larger or smaller."
)


def what_was_simulated(d: RunData, esc=plain, dollar: str = "$") -> str:
    """One sentence on the run: model, fleet, hours from when, seed, how the GPUs are paid
    for and the electricity price ('' when the run's scenario is not known); names (user text)
    pass through ``esc``, and the dollar sign is ``dollar``."""
    if d.config is None:
        return ""
    try:
        from fleetsim.config.loading import scenario_from_dict
        from fleetsim.config.resolve import resolve

        rs = resolve(scenario_from_dict(d.config))
    except Exception:  # (a scenario this version cannot resolve)
        return ""
    sc = rs.scenario
    if rs.pools is not None:
        fleet = f"{sc.fleet.pods} pod(s) of " + " + ".join(
            f"{p.name} {p.replicas} x TP{p.tp} {esc(p.gpu_name)}"
            for p in (rs.pools.prefill, rs.pools.decode)
        )
    else:
        n = sc.fleet.pods * sc.fleet.replicas * rs.tp
        shape = f"TP{rs.tp}" if rs.dp == 1 else f"(TP{rs.tp // rs.dp} x DP{rs.dp})"
        fleet = (
            f"{n:,} x {esc(rs.gpu.name)} ({sc.fleet.pods:,} pod(s) x {sc.fleet.replicas:,} "
            f"replica(s) x {shape})"
        )
    price = sc.cost.electricity_usd_per_kwh
    elec = (
        f"{dollar}{price:g}/kWh"
        if isinstance(price, (int, float))
        else f"{dollar}{min(price):g}-{max(price):g}/kWh by hour"
    )
    k = sc.fleet.sample_pods
    if k is not None and k < sc.fleet.pods:
        fleet += f", {k} of the {sc.fleet.pods:,} pods simulated and scaled"
    start = sc.simulation.start_utc.strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{esc(rs.model.name)} on {fleet}; {sc.simulation.hours} h from {start}, seed {sc.seed}; "
        f"autoscaler {sc.autoscaler.policy}; GPUs {sc.cost.hardware}, electricity {elec}, "
        f"PUE {sc.power.pue:g}."
    )


def render_markdown(d: RunData, a: dict[str, Any]) -> str:
    lines = [f"# fleetsim report: {for_heading(d.name)}", ""]
    what = what_was_simulated(d, for_heading, r"\$")
    if what:
        lines += [what, ""]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _rows(d, a) + pool_lines(d)]
    lines += ["", _EXPLAIN, ""]
    for p in PLOTS:
        lines += [f"![{p}]({p}.png)", ""]
    return "\n".join(lines)


def render_html(d: RunData, a: dict[str, Any], pngs: dict[str, bytes]) -> str:
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in _rows(d, a) + pool_lines(d)
    )
    imgs = "\n".join(
        f'<p><img alt="{p}" src="data:image/png;base64,{base64.b64encode(pngs[p]).decode()}"></p>'
        for p in PLOTS
    )
    what = what_was_simulated(d)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fleetsim report: {html.escape(plain(d.name))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
th{{text-align:left;padding-right:2em}} td{{text-align:right}} img{{max-width:100%}}</style>
</head><body><h1>fleetsim report: {html.escape(plain(d.name))}</h1>
{f"<p>{html.escape(what)}</p>" if what else ""}
<table>{rows}</table><p>{html.escape(_EXPLAIN)}</p>
{imgs}
</body></html>
"""


def write_report(
    out_dir: Path,
    result=None,
    *,
    flatten: bool = True,
    source: str = "",
    into: Path | None = None,
    show_progress: bool = False,
) -> Path:
    """Write the four PNGs, ``report.html``, ``report.md`` and ``peak.json``; returns the HTML
    page's path. ``result`` is a finished :class:`~fleetsim.apps.simulate.Result`; without it
    the run is read from ``out_dir/hourly.parquet``. The files go into ``into`` (a staging
    folder of :class:`~fleetsim.results.output.RunOutput`, moved into place with the run's other
    files) or, without it, into ``out_dir`` all together (staged there, then committed)."""
    from fleetsim.results.output import RunOutput

    out_dir = Path(out_dir)
    d = _from_result(result) if result is not None else _from_dir(out_dir)
    d.source = source
    slo = (d.config or {}).get("slo")
    outp = None
    if into is None:  # the folder is locked and probed before the plots are drawn
        outp = RunOutput(out_dir, mode="add", names=REPORT_FILES).open()
        into = outp.path("")
    try:
        with _progress(show_progress) as progress:
            pngs = make_plots(d, slo)
            # the flat-day re-simulation takes as long as the run itself: the bar shows it, and
            # its result is kept in flat-day.json for the next report of this run
            a = peak_analysis(d, flatten, progress, out_dir / FLAT_FILE, into / FLAT_FILE)
        for name, data in pngs.items():
            write_bytes_atomic(data, into / f"{name}.png")
        write_text_atomic(render_markdown(d, a), into / "report.md")
        write_text_atomic(render_html(d, a, pngs), into / "report.html")
        write_text_atomic(json.dumps(a, indent=2, default=str), into / "peak.json")
        if outp is not None:
            outp.commit()
    finally:
        if outp is not None:
            outp.abort()  # (no-op after a commit)
    return out_dir / "report.html"


@contextlib.contextmanager
def _progress(show: bool):
    """A factory of progress callbacks on stderr (None when not shown): ``progress(total)``
    adds a task and returns its ``advance(k)``."""
    if not show:
        yield None
        return
    from rich.progress import Progress

    from fleetsim.apps.common import console

    with Progress(console=console(stderr=True), transient=True) as bar:

        def progress(total: int):
            task = bar.add_task("report: re-simulating the flat day", total=total)
            return lambda k: bar.advance(task, k)

        yield progress


REPORT_FILES = (
    *tuple(f"{p}.png" for p in PLOTS),
    "report.md",
    "report.html",
    "peak.json",
    FLAT_FILE,
)
CROSSOVER_FILES = ("crossover.png", "report.md", "report.html")


def crossover_lines(table) -> list[tuple[str, str]]:
    """Per workload of a ``fleetsim crossover`` table: the rate, where the best split wins and
    by how much, and each design's p99 TTFT and TPOT (as (label, text))."""
    from fleetsim.apps.crossover import NOTES_KEY, best_ratio, cell_counts
    from fleetsim.base.io import clean

    df = table.to_pandas()
    out = []
    # the run's notes (a workload left out, and why: crossover.parquet's metadata)
    raw = (table.schema.metadata or {}).get(NOTES_KEY.encode())
    if raw is not None:
        notes = json.loads(raw)
        if not isinstance(notes, list):
            raise ValueError(f"{NOTES_KEY} is not a list")
        out += [("note", clean(str(line), 600)) for line in notes]
    for wl in dict.fromkeys(df.workload):
        g = df[df.workload == wl]
        r = best_ratio(table, wl)
        # the ratios of the cells both designs meet: a cell only the split meets ("D only",
        # 0 in best_ratio) has none (the range read "ratio 0.00-..."), it is counted apart
        ok = r[np.isfinite(r) & (r > 0)]
        # the cells the terminal's table counts: every cell either design meets (a cell only
        # the aggregated fleet meets is one the split loses, not one left out)
        wins, cells, a_only = cell_counts(r)
        d_only = int(np.sum(r == 0))
        rng = f"ratio {ok.min():.2f}-{ok.max():.2f}" if len(ok) else "no cell met by both"
        if d_only:
            rng += f"; {d_only} met only by the split"
        if a_only:
            rng += f"; {a_only} met only by the aggregated fleet"
        out.append(
            (
                f"{wl} prompts",
                f"{g.rate_per_s.iloc[0]:,.2f} requests/s; the best split is cheaper per "
                f"SLO-meeting request in {wins} of {cells} target cells ({rng})",
            )
        )
        first = g.groupby(["design", "prefill_replicas"], dropna=False).first().reset_index()
        for _, row in first.iterrows():
            name = (
                f"aggregated {int(row.replicas)}"
                if row.design == "aggregated"
                else f"split {int(row.prefill_replicas)} + {int(row.decode_replicas)}"
            )
            out.append(
                (
                    f"{wl}: {name}",
                    f"p99 TTFT {row.ttft_p99_s:,.2f} s, p99 TPOT {row.tpot_p99_s * 1e3:,.1f} ms, "
                    f"$ {row.total_cost_usd:,.2f}, {row.energy_facility_kwh:,.1f} kWh",
                )
            )
    return out


def write_crossover_report(out_dir: Path) -> Path:
    """The report of a ``fleetsim crossover`` folder: its heat map, drawn again from
    ``crossover.parquet``, and the per-design figures behind it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fleetsim.apps.crossover import draw
    from fleetsim.base import io
    from fleetsim.results.output import RunOutput

    path = out_dir / "crossover.parquet"
    try:
        table = pq.read_table(pa.BufferReader(io.read_bytes(path, "", io.MAX_TRACE_BYTES)))
        rows = crossover_lines(table)
        png = draw(table)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{io.clean(str(path))}: not a fleetsim crossover table ({exc})") from None
    title = f"fleetsim crossover report: {out_dir.name}"
    md = [f"# fleetsim crossover report: {for_heading(out_dir.name)}", ""]
    md += ["| figure | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += ["", _CROSSOVER_EXPLAIN, "", "![crossover](crossover.png)", ""]
    trs = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    img = base64.b64encode(png).decode()
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(plain(title))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
th{{text-align:left;padding-right:2em}} img{{max-width:100%}}</style>
</head><body><h1>{html.escape(plain(title))}</h1>
<table>{trs}</table><p>{html.escape(_CROSSOVER_EXPLAIN)}</p>
<p><img alt="crossover" src="data:image/png;base64,{img}"></p>
</body></html>
"""
    outp = RunOutput(out_dir, mode="add", names=CROSSOVER_FILES).open()
    try:
        into = outp.path("")
        write_bytes_atomic(png, into / "crossover.png")
        write_text_atomic("\n".join(md), into / "report.md")
        write_text_atomic(page, into / "report.html")
        outp.commit()
    finally:
        outp.abort()
    return out_dir / "report.html"


_CROSSOVER_EXPLAIN = (
    "Each cell: the best disaggregated split's cost per SLO-meeting request over the "
    "aggregated fleet's, for a TTFT target (rows, x the unloaded prefill of the mean prompt) "
    "and a TPOT target (columns, x the unloaded decode step); below 1 the split wins. Both "
    "designs own the same GPUs and serve the same arrivals (docs/disaggregation.md)."
)


def main(argv: list[str] | None = None) -> int:
    """``fleetsim report DIR [--no-flat]``."""
    ap = OneLineParser(prog="fleetsim report", description=description(__doc__))
    ap.add_argument(
        "dir",
        help="the --out folder of a `fleetsim run` (holds hourly.parquet) or of a `fleetsim "
        "crossover` (holds crossover.parquet: its heat map and per-design figures)",
    )
    ap.add_argument(
        "--no-flat",
        action="store_true",
        help="skip the flat-day re-simulation (no marginal cost of the peak)",
    )
    ap.add_argument(
        "--scenario",
        default="",
        help="the scenario file the run came from, to resolve its relative paths",
    )
    args = ap.parse_args(argv)
    d = Path(args.dir)
    if not (d / "hourly.parquet").is_file() and (d / "crossover.parquet").is_file():
        page = write_crossover_report(d)
        print(f"wrote {page.resolve()}, report.md and crossover.png in {page.parent}")
        return 0
    page = write_report(
        Path(args.dir), flatten=not args.no_flat, source=args.scenario, show_progress=True
    )
    from fleetsim.base import io as fio

    a, _ = fio.load_json(page.parent / "peak.json", "", nofollow=True)
    pngs = ", ".join(p + ".png" for p in PLOTS)
    print(f"wrote {page.resolve()}, report.md and {pngs} in {page.parent}")
    m = a["marginal_cost_of_peak_usd"]
    print(
        f"busiest hour by arrivals {a.get('peak_hour_utc', a['peak_hour'])}: "
        f"{a['peak_cost_share']:.2%} of "
        + (
            "the day's cost; "
            if a.get("hours", 24) == 24
            else f"the cost of {run_span(a['hours'])}; "
        )
        + (
            f"marginal cost of the peak {_marginal_usd(m)} (flat day {a.get('flat_source', '')})"
            if m is not None
            else f"marginal cost of the peak {a['flat_note']}"
        )
    )
    return 0
