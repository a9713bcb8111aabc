"""The terminal summary of a run: the day's requests, energy, cost by part, and latency."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from fleetsim.results.result import Result


def _f(x: float, fmt: str = ",.2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_summary(res: Result, console: Console | None = None) -> None:
    """Print the day's figures with the energy -> cost breakdown."""
    c = console or Console()
    sc = res.scenario
    t = res.totals
    lat = res.day_latency
    rs = res.resolved
    hours = sc.simulation.hours
    fleet = (
        f"{sc.fleet.pods} pod(s) x {sc.fleet.replicas} replica(s) x TP{rs.tp} = "
        f"{sc.fleet.pods * sc.fleet.replicas * rs.tp} x {rs.gpu.name}"
    )
    c.print(
        f"[bold]{sc.name}[/bold]: {rs.model.name} ({rs.model.dtype}) on {fleet}; "
        f"{hours} h, seed {sc.seed}, profile {rs.profile_id}"
    )
    if res.scale != 1:
        c.print(
            f"simulated {len(res.pods)} of {sc.fleet.pods} pods; extensive figures x {res.scale:g}"
        )
    tab = Table(show_header=False, box=None, pad_edge=False)
    tab.add_column(style="bold")
    tab.add_column(justify="right")
    tab.add_column()
    tab.add_row(
        "requests",
        _f(t.requests_arrived, ",.0f"),
        f"completed {_f(t.requests_completed, ',.0f')}, rejected "
        f"{_f(t.requests_rejected, ',.0f')}, in flight at the end "
        f"{_f(t.requests_in_flight, ',.0f')}",
    )
    tab.add_row(
        "tokens", _f(t.output_tokens, ",.0f"), f"output; prompt {_f(t.prompt_tokens, ',.0f')}"
    )
    iters = sum(p.iterations for p in res.pods)
    batch = sum(sum(p.output_tokens) for p in res.pods) / iters if iters else math.nan
    tab.add_row(
        "GPU-hours",
        _f(t.gpu_hours, ",.1f"),
        f"busy {t.utilization:.1%} of powered time; {_f(batch, '.1f')} output tokens "
        "per iteration on average",
    )
    if sc.autoscaler.policy != "static":  # power states: what the autoscaler kept powered
        gp = res.hourly.column("gpus_powered_mean").to_numpy()
        tab.add_row(
            "autoscaler",
            sc.autoscaler.policy,
            f"GPUs powered per hour {gp.min():,.1f} .. {gp.max():,.1f} of "
            f"{sc.fleet.pods * sc.fleet.replicas * rs.tp}; cold start "
            f"{sc.power.wake_s:g} s",
        )
    tab.add_row(
        "energy",
        f"{_f(t.energy_facility_kwh)} kWh",
        f"facility = (GPU {_f(t.energy_gpu_kwh)} + node overhead "
        f"{_f(t.energy_overhead_kwh)}) kWh x PUE {sc.power.pue}",
    )
    tab.add_row(
        "energy cost", f"$ {_f(t.energy_cost_usd)}", "facility kWh x the price in each hour"
    )
    hw = "amortised capex" if sc.cost.hardware == "owned" else "rent while provisioned"
    tab.add_row("hardware cost", f"$ {_f(t.hardware_cost_usd)}", f"GPU-hours x {hw}")
    tab.add_row("total cost", f"$ {_f(t.total_cost_usd)}", "")
    if not math.isnan(t.carbon_kg) and t.carbon_kg:
        tab.add_row("carbon", f"{_f(t.carbon_kg)} kg CO2e", "")
    tab.add_row("Wh per request", _f(t.wh_per_request, ",.3f"), "facility energy")
    tab.add_row(
        "$ per M output tokens",
        _f(t.usd_per_mtok, ",.3f"),
        f"$ per 1k requests {_f(t.usd_per_1k_requests, ',.4f')}",
    )
    tab.add_row(
        "TTFT",
        f"p99 {_f(lat['ttft_p99_s'], '.3f')} s",
        f"p50 {_f(lat['ttft_p50_s'], '.3f')} s, mean {_f(lat['ttft_mean_s'], '.3f')} s "
        f"(SLO {sc.slo.ttft_s} s)",
    )
    tab.add_row(
        "TPOT",
        f"p99 {_f(lat['tpot_p99_s'] * 1000, '.1f')} ms",
        f"p50 {_f(lat['tpot_p50_s'] * 1000, '.1f')} ms (SLO {sc.slo.tpot_s * 1000:g} ms)",
    )
    tab.add_row(
        "SLO attainment",
        f"{t.slo_attainment:.2%}" if not math.isnan(t.slo_attainment) else "n/a",
        "requests meeting both TTFT and TPOT targets",
    )
    ph = t.peak_hour
    row = res.hourly.slice(ph, 1).to_pylist()[0]
    tab.add_row(
        "peak hour",
        f"{row['hour_start']:%H:00} UTC (hour {ph})",
        f"$ {_f(row['total_cost_usd'])} = {row['total_cost_usd'] / t.total_cost_usd:.1%}"
        f" of the day; {row['requests_arrived']:,} requests; p99 TTFT "
        f"{_f(row['ttft_p99_s'], '.3f')} s"
        if t.total_cost_usd
        else "",
    )
    c.print(tab)
    for name, (lo, hi) in res.pod_ci.items():
        c.print(f"95% CI over pods, {name}: [{lo:,.2f}, {hi:,.2f}]")
