"""The terminal summary of a run: the day's requests, energy, cost by part, and latency."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fleetsim.base.io import json_safe, term
from fleetsim.base.units import HOUR_S, fmt_num, run_span

if TYPE_CHECKING:  # (imported where used: ``fleetsim validate`` needs serving_stack only)
    import numpy as np
    from rich.console import Console

    from fleetsim.config.resolved import Resolved
    from fleetsim.results.result import Result

_f = fmt_num  # (short: used in every row below)


#: below this share of requests meeting the SLO, a run is flagged (summary line, ``--json``,
#: ``--strict``)
SLO_ATTAINMENT_WARN_BELOW = 0.9

#: above this peak-hour load of a fleet whose estimated batch the KV budget bounds, a run is
#: flagged (a warning line; not ``overloaded``: the estimate is a best case without queueing)
KV_LOAD_WARN_ABOVE = 0.9


def serving_stack(rs: Resolved) -> str:
    """The serving stack the run's step times represent (``fleet.serving_stack`` as applied to
    the catalog profile; a measured profile file is the stack it was measured on), with the
    fp8 fused-MoE kernel where ``fleet.fp8_moe_kernel`` is not the default Triton one."""
    from fleetsim.device.latency import RooflineProfile

    p = rs.profile
    if isinstance(p, RooflineProfile) and p.serving_stack != "eager":
        name = p.serving_stack
    elif rs.scenario.hardware.profile:
        name = "as measured (profile file)"
    else:
        name = "eager"
    if isinstance(p, RooflineProfile) and p.fp8_moe_kernel != "triton":
        return f"{name}, fp8 MoE kernel {p.fp8_moe_kernel}"  # fleet.fp8_moe_kernel
    return name


def kv_kinds(model, bytes_per_token: float | None = None, sizes_from_file: bool = False) -> str:
    """What a sequence's KV holds, by layer kind, for the summaries ("" for a model whose every
    layer holds its whole context in plain K and V): a sliding window's layers, a latent
    attention's cached latent, a hybrid's linear-state layers; ``bytes_per_token``: the KV
    budget's bytes per token at the traffic's typical sequence (what its token count divides);
    ``sizes_from_file``: the traffic's sizes come from a trace or a CSV column, so the typical
    sequences are the trace's own requests or the column's draws (config/resolved.py
    ``typical_sizes``), which the line then says (the engine itself counts the windows' blocks
    exactly)."""
    parts = []
    if model.is_mla:
        parts.append(
            f"latent attention: {model.kv_lora_rank} + {model.qk_rope_head_dim} cached per "
            f"token in each of {model.n_attn_layers} layers"
        )
    if model.n_sliding_layers:
        w = f"{model.sliding_window_tokens:,}"
        parts.append(
            f"{model.n_global_attn_layers} full-attention + {model.n_sliding_layers} "
            f"sliding-window layers of {w} tokens"
            if model.n_global_attn_layers
            else f"all {model.n_sliding_layers} layers sliding-window, of {w} tokens"
        )
    if model.n_linear_layers:
        parts.append(
            f"{model.n_attn_layers} attention + {model.n_linear_layers} linear-state layers"
        )
    if not model.kv_uniform and bytes_per_token and sizes_from_file:
        parts.append(
            f"{round(bytes_per_token):,} bytes per token at the traffic's typical sequence (its "
            "requests' sizes from the file, each weighted by its time in flight)"
        )
    elif not model.kv_uniform and bytes_per_token:
        parts.append(
            f"{round(bytes_per_token):,} bytes per token at the traffic's typical sequence"
        )
    elif bytes_per_token and bytes_per_token > model.kv_bytes_per_token * (1 + 1e-9):
        # tensor parallelism beyond the KV heads copies them; latent attention's on every GPU
        copied = "the latent on every GPU" if model.is_mla else "KV heads copied on several GPUs"
        parts.append(f"{round(bytes_per_token):,} bytes per token on the replica ({copied})")
    return "; ".join(parts)


def backlog_limit(res: Result) -> float:
    """The requests in flight at the end that a fleet keeping up can hold: by Little's law a
    fleet meeting the SLO holds on average ``m = rate x (TTFT target + mean output tokens x TPOT
    target)`` requests at the last hour's arrival rate; allow ``m + 4 sqrt(m) + 10`` (Poisson
    spread). A queue that grows without bound exceeds it by far (the rule of ``fleetsim plan``)."""
    from fleetsim.results.arrow import to_numpy

    sc = res.scenario
    t = res.totals
    arrived = to_numpy(res.hourly.column("requests_arrived"))
    last_rate = float(arrived[-1]) / HOUR_S if len(arrived) else 0.0
    mean_out = t.output_tokens / max(t.requests_completed, 1.0)
    m = last_rate * (sc.slo.ttft_s + mean_out * sc.slo.tpot_s)
    return m + 4.0 * math.sqrt(m) + 10.0


def health(res: Result) -> dict:
    """Whether the run is overloaded: ``queue_unbounded`` (more requests in flight at the end
    than :func:`backlog_limit`), ``slo_attainment_low`` (below
    :data:`SLO_ATTAINMENT_WARN_BELOW`), ``overloaded`` (either), ``kv_near_full`` (the peak
    hour's load of :func:`headroom` at or above :data:`KV_LOAD_WARN_ABOVE` with the KV budget
    bounding the estimated batch; a warning, not ``overloaded``), and one-line ``warnings``."""
    t = res.totals
    limit = backlog_limit(res)
    unbounded = t.requests_in_flight > limit
    att = t.slo_attainment
    low = not math.isnan(att) and att < SLO_ATTAINMENT_WARN_BELOW
    warnings = []
    if unbounded:
        warnings.append(
            f"OVERLOADED: the queue grows without bound: {t.requests_in_flight:,.0f} of "
            f"{t.requests_arrived:,.0f} requests still in flight at the end (a fleet that "
            f"keeps up holds about {limit:,.0f}); add replicas or lower the rate"
        )
    if low:
        warnings.append(
            f"SLO MISSED: only {att:.1%} of requests met the TTFT and TPOT targets (warning "
            f"below {SLO_ATTAINMENT_WARN_BELOW:.0%})"
        )
    hr = headroom(res)
    kv_full = (
        hr["capacity_bound"] == "kv"
        and hr["peak_hour_load"] is not None
        and hr["peak_hour_load"] >= KV_LOAD_WARN_ABOVE
    )
    if kv_full:
        warnings.append(
            f"KV NEAR FULL: the busiest hour's arrivals need {hr['peak_hour_load']:.0%} of the "
            f"rate the KV budget carries (an estimate: {hr['batch_bound']:,} sequences of "
            f"{hr['kv_tokens_per_sequence']:,.0f} KV tokens each, weighted by time in flight; "
            f"warning above {KV_LOAD_WARN_ABOVE:.0%}): expect preemptions and queueing; add "
            "replicas (`fleetsim plan` sizes the fleet)"
        )
    return {
        "overloaded": unbounded or low,
        "queue_unbounded": bool(unbounded),
        "slo_attainment_low": bool(low),
        "kv_near_full": bool(kv_full),
        "backlog_limit_requests": limit,
        "warnings": warnings,
    }


def headroom(res: Result, source: str = "") -> dict:
    """How much of the fleet the day used, by the measures that matter under continuous
    batching (``busy`` is near 100% at modest load: a replica with anything in flight is busy):

    * ``batch_occupancy``: mean sequences per iteration / ``max_num_seqs`` (day and busiest hour);
    * ``kv_use``: KV blocks held, averaged over time, / the KV budget (day mean, and the
      highest hourly mean; serving/kv_paged.py ``_held_block_s``);
    * ``flops_utilization`` / ``bandwidth_utilization``: achieved / peak of the powered GPUs;
    * ``peak_hour_load``: the busiest hour's arrival rate / the rate the powered fleet can carry
      within the TPOT target (an estimate at the run's mean prompt and output tokens per
      request: steady batches at the largest size whose decode step meets the target, and whole
      ``max_num_batched_tokens`` prefills; no queueing, so a fleet
      near 100% may still miss the TTFT target; ``fleetsim plan`` sizes it by simulation).
      The KV a running sequence holds is weighted by its time in flight
      (``kv_tokens_per_sequence``: :mod:`fleetsim.results.capacity`, from the scenario's size
      distributions or trace, read relative to ``source``); ``batch_bound``: the batch of the
      estimate and ``capacity_bound`` what bounds it (``"kv"``, ``"max_num_seqs"``,
      ``"tpot"``). None for a disaggregated fleet."""
    import numpy as np

    from fleetsim.results.arrow import to_numpy

    t = res.totals
    hr = res.hourly
    occ = to_numpy(hr.column("batch_occupancy")).astype(float)
    kv = to_numpy(hr.column("kv_utilization")).astype(float)
    arrived = to_numpy(hr.column("requests_arrived")).astype(float)
    powered = to_numpy(hr.column("gpus_powered_mean")).astype(float)

    def top(a: np.ndarray) -> float:
        return float(np.nanmax(a)) if np.isfinite(a).any() else math.nan

    out: dict = {
        "batch_occupancy": t.batch_occupancy,
        "batch_occupancy_peak_hour": top(occ),
        "max_num_seqs": res.scenario.fleet.max_batch_size,
        "kv_use_mean": float(np.nanmean(kv)) if np.isfinite(kv).any() else math.nan,
        "kv_use_peak_hour": top(kv),
        "flops_utilization": t.flops_utilization,
        "bandwidth_utilization": t.bandwidth_utilization,
        "busy_fraction": t.utilization,
        "peak_hour": None,
        "peak_hour_rate_per_s": None,
        "slo_capacity_per_s": None,
        "peak_hour_load": None,
        "capacity_bound": None,
        "kv_tokens_per_sequence": None,
        "batch_bound": None,
    }
    rs = res.resolved
    if rs.pools is None and len(arrived) and arrived.max() > 0:
        from fleetsim.results.capacity import replica_capacity, run_sizes

        h = int(np.argmax(arrived))
        done = max(t.requests_completed, 1.0)  # the run's own mean sizes (traces included)
        c = replica_capacity(
            rs,
            source,
            tpot_s=res.scenario.slo.tpot_s,
            sizes=run_sizes(rs, source, t.prompt_tokens / done, t.output_tokens / done),
        )
        replicas = powered[h] / rs.tp if math.isfinite(powered[h]) else 0.0
        cap = c.rps * replicas
        rate = float(arrived[h]) / HOUR_S
        out.update(
            peak_hour=h,
            peak_hour_rate_per_s=rate,
            slo_capacity_per_s=cap,
            peak_hour_load=rate / cap if cap > 0 else math.nan,
            capacity_bound=c.bound,
            kv_tokens_per_sequence=c.sizes.kv_per_seq,
            batch_bound=c.batch,
        )
    return out


def summary_dict(res: Result, paths: dict[str, str] | None = None) -> dict:
    """The run as one JSON-ready document (``fleetsim run --json``, ``Run.summary()``): the
    scenario's identity, the fleet, the day's totals and latency, health flags and the paths
    written. NaN is None."""
    from fleetsim.base.version import __version__

    sc, rs = res.scenario, res.resolved
    return json_safe(
        {
            "fleetsim_version": __version__,
            "scenario": sc.name,
            "seed": sc.seed,
            "hours": sc.simulation.hours,
            "start_utc": sc.simulation.start_utc,
            "model": rs.model.name,
            "gpu": rs.gpu.name,
            "profile": rs.profile_id,
            "serving_stack": serving_stack(rs),
            "fleet": {
                "pods": sc.fleet.pods,
                "pods_simulated": len(res.pods),
                "replicas_per_pod": sc.fleet.replicas,
                "tensor_parallel": rs.tp,
                "gpus": sc.fleet.pods * sc.fleet.replicas * rs.tp,
            },
            "totals": res.totals.as_dict(),
            "latency": res.day_latency,
            "pod_ci95": {k: list(v) for k, v in res.pod_ci.items()},
            "headroom": headroom(res),
            "health": health(res),
            "wall_s": res.wall_s,
            "paths": paths or {},
        }
    )


def print_warnings(res: Result, console: Console) -> None:
    """The health warnings, one prominent line each."""
    for w in health(res)["warnings"]:
        console.print(f"[bold red]WARNING[/bold red] {w}", soft_wrap=True)


def print_summary(res: Result, console: Console | None = None, source: str = "") -> None:
    """Print the day's figures with the energy -> cost breakdown (``source``: the scenario
    file, which a relative ``[model] config`` is read from)."""
    from rich.console import Console

    from fleetsim.base.tables import print_rows

    c = console or Console()
    _print_headline(res, c, source)
    tab = _Rows()
    _headroom_rows(res, tab, source)
    _volume_rows(res, tab)
    _kv_rows(res, tab)
    _cost_rows(res, tab)
    _latency_rows(res, tab)
    _peak_row(res, tab)
    print_rows(c, tab)
    if res.pools is not None:
        print_pools(res, c)
    for name, (lo, hi) in res.pod_ci.items():
        c.print(f"95% CI over pods, {name}: [{lo:,.2f}, {hi:,.2f}]")


class _Rows(list):
    """The summary's ``(label, value, detail)`` rows (``add_row`` as a rich table's)."""

    def add_row(self, label: str, value: str, detail: str) -> None:
        self.append((label, value, detail))


def _print_headline(res: Result, c: Console, source: str = "") -> None:
    """The scenario, model, precision and fleet in one line (and the pod sampling)."""
    sc = res.scenario
    rs = res.resolved
    hours = sc.simulation.hours
    # rs.tp is the replica's GPUs: tensor_parallel x data_parallel
    shape = f"TP{rs.tp}" if rs.dp == 1 else f"(TP{rs.tp // rs.dp} x DP{rs.dp})"
    if rs.expert_parallel:
        shape += f" EP{rs.tp}"
    fleet = (
        f"{sc.fleet.pods} pod(s) x {sc.fleet.replicas} replica(s) x {shape} = "
        f"{sc.fleet.pods * sc.fleet.replicas * rs.tp} x {rs.gpu.name}"
    )
    if rs.pools is not None:
        ps = rs.pools
        fleet = f"{sc.fleet.pods} pod(s) of " + " + ".join(
            f"{p.name} {p.replicas} x TP{p.tp} {p.gpu_name}" for p in (ps.prefill, ps.decode)
        )
        fleet += f", KV over {ps.link.name}"
    from fleetsim.device.latency import compute_peak

    dt = f"{rs.model.weights_label}, KV cache {rs.model.kv_dtype_resolved}"
    m = rs.model
    if m.n_moe_layers:  # the experts and how they are split
        dt += (
            f"; MoE {m.n_experts} experts, top {m.n_active_experts}"
            + (f" + {m.n_shared_experts} shared" if m.n_shared_experts else "")
            + (
                f", in {m.n_moe_layers} of {m.n_layers} layers"
                if m.n_moe_layers < m.n_layers
                else ""
            )
            + (
                f", {m.n_experts // rs.tp} whole experts per GPU (EP{rs.tp})"
                if rs.expert_parallel
                else f", each split over {rs.tp} GPUs"
                if rs.tp > 1
                else ""
            )
        )
    if compute_peak(rs.profile, rs.model.dtype)[1]:
        dt += f"; weight-only: {rs.gpu.name} has no {rs.model.dtype} compute, GEMMs at 16-bit peak"
    from fleetsim.config.aggregated import model_source_note

    note = model_source_note(sc.model, source, rs.model)
    dt += f"; {note}" if note else ""
    c.print(  # user text is escaped for the console (names are data, not markup)
        f"[bold]{term(sc.name)}[/bold]: {term(rs.model.name)} ({dt}) on "
        f"{term(fleet)}; {hours} h, seed {sc.seed}, profile {term(rs.profile_id)}, "
        f"serving stack {serving_stack(rs)}"
    )
    if res.scale != 1:
        c.print(
            f"simulated {len(res.pods)} of {sc.fleet.pods} pods; extensive figures x {res.scale:g}"
        )


def _pct(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{_f(v * 100, fmt)}%"


_BOUND = {"kv": "the KV budget", "max_num_seqs": "max_num_seqs", "tpot": "the TPOT target"}


def _headroom_rows(res: Result, tab: _Rows, source: str = "") -> None:
    """Capacity headroom first (:func:`headroom`): the peak hour's load against the SLO-bound
    capacity, batch occupancy, KV use, FLOP/s and bandwidth against peak."""
    h = headroom(res, source)
    if h["peak_hour_load"] is not None:
        from fleetsim.results.arrow import row as table_row

        row = table_row(res.hourly, h["peak_hour"])
        tab.add_row(
            "peak-hour load",
            _pct(h["peak_hour_load"], ".0f"),
            f"the busiest hour by arrivals ({row['hour_start']:%H:00} UTC, "
            f"{row['requests_arrived']:,} requests) used "
            f"{_pct(h['peak_hour_load'], '.0f')} of the SLO-bound capacity: "
            f"{_f(h['peak_hour_rate_per_s'], ',.2f')} req/s of an "
            f"estimated {_f(h['slo_capacity_per_s'], ',.2f')} req/s within the TPOT target "
            f"(no queueing; batches of {h['batch_bound']:,} sequences, bound by "
            f"{_BOUND[h['capacity_bound']]}, at {_f(h['kv_tokens_per_sequence'], ',.0f')} KV "
            "tokens each, weighted by time in flight); `fleetsim plan` sizes it",
        )
    tab.add_row(
        "batch occupancy",
        _pct(h["batch_occupancy"]),
        f"mean sequences per iteration of max_num_seqs ({h['max_num_seqs']}); highest hourly "
        f"mean {_pct(h['batch_occupancy_peak_hour'])}",
    )
    if res.resolved.kv is not None and res.scenario.fleet.kv_allocation == "paged":
        tab.add_row(
            "KV use",
            f"peak {_pct(h['kv_use_peak_hour'])}",
            f"highest hourly mean of the KV blocks in use; day mean {_pct(h['kv_use_mean'])}",
        )
    tab.add_row(
        "FLOP/s",
        _pct(h["flops_utilization"]),
        f"of peak; memory bandwidth {_pct(h['bandwidth_utilization'])} of peak (powered GPUs)",
    )


def _volume_rows(res: Result, tab: _Rows) -> None:
    """Requests, tokens and GPU-hours."""
    t = res.totals
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
        f"busy fraction {t.utilization:.1%} of powered time (an iteration in flight: not "
        f"headroom under continuous batching); {_f(batch, '.1f')} output tokens per iteration "
        "on average",
    )


def _kv_rows(res: Result, tab: _Rows) -> None:
    """The KV budget and the prefix cache (an aggregated fleet); the autoscaler's range."""
    from fleetsim.config.resolved import sizes_from_file

    sc = res.scenario
    t = res.totals
    rs = res.resolved
    kv = rs.kv
    if kv is not None and rs.pools is None:
        f = sc.fleet
        # (the paged engine caches no prefix for a model with linear-state layers, as vLLM 0.11
        # disables it there; window layers' prefixes it caches: serving/kv_paged.py)
        linear = rs.model.n_linear_layers > 0
        mech = (
            f"paged, blocks of {kv.block_size_tokens}"
            + (", chunked prefill" if f.chunked_prefill else "")
            + (", prefix caching" if f.prefix_caching and not linear else "")
            + (
                ", no prefix caching (vLLM 0.11 disables it with linear-state layers)"
                if f.prefix_caching and linear
                else ""
            )
            if f.kv_allocation == "paged"
            else "reserved at admission (prompt + output)"
        )
        kinds = kv_kinds(rs.model, kv.bytes_per_token, sizes_from_file(sc))
        if kinds:
            mech += f"; {kinds}"
        tab.add_row(
            "KV cache",
            f"{kv.tokens:,} tokens",
            f"per replica = {kv.blocks:,} blocks; {mech}; "
            f"{kv.kv_bytes / 1e9:,.1f} GB = {f.gpu_memory_utilization:g} x "
            f"{kv.memory_bytes / 1e9:,.1f} GB - weights {kv.weight_bytes / 1e9:,.1f} GB - "
            f"activations {kv.activation_bytes / 1e9:,.2f} GB",
        )
        if f.kv_allocation == "paged":
            tab.add_row(
                "prefix cache",
                f"{t.prefix_hit_rate:.1%} hit",
                f"{_f(t.prefix_hit_tokens, ',.0f')} prompt tokens served from cache; "
                f"{_f(t.preemptions, ',.0f')} preemptions, "
                f"{_f(t.recomputed_tokens, ',.0f')} tokens recomputed",
            )
    if sc.autoscaler.policy != "static":  # power states: what the autoscaler kept powered
        from fleetsim.results.arrow import to_numpy

        gp = to_numpy(res.hourly.column("gpus_powered_mean"))
        tab.add_row(
            "autoscaler",
            sc.autoscaler.policy,
            f"GPUs powered per hour {gp.min():,.1f} .. {gp.max():,.1f} of "
            f"{sc.fleet.pods * sc.fleet.replicas * rs.tp}; cold start "
            f"{sc.power.wake_s:g} s",
        )


def _cost_rows(res: Result, tab: _Rows) -> None:
    """Energy, its cost, hardware, the total and the derived per-request figures."""
    sc = res.scenario
    t = res.totals
    # the GPUs' static draw (idle while powered, waking, standby) and the iterations' dynamic
    # energy (PowerSpec), where the result has them (results/result.py)
    gpu_parts = (
        ""
        if math.isnan(t.energy_gpu_idle_kwh) or math.isnan(t.energy_gpu_dynamic_kwh)
        else f" (idle {_f(t.energy_gpu_idle_kwh)} + dynamic {_f(t.energy_gpu_dynamic_kwh)})"
    )
    tab.add_row(
        "energy",
        f"{_f(t.energy_facility_kwh)} kWh",
        f"facility = (GPU {_f(t.energy_gpu_kwh)}{gpu_parts} + node overhead "
        f"{_f(t.energy_overhead_kwh)}) kWh x PUE {sc.power.pue}",
    )
    tab.add_row(
        "energy cost", f"$ {_f(t.energy_cost_usd)}", "facility kWh x the price in each hour"
    )
    hw = "amortised capex" if sc.cost.hardware == "owned" else "rent while provisioned"
    tab.add_row("hardware cost", f"$ {_f(t.hardware_cost_usd)}", f"GPU-hours x {hw}")
    tab.add_row("total cost", f"$ {_f(t.total_cost_usd)}", "")
    if not math.isnan(t.carbon_kg):
        tab.add_row("carbon", f"{_f(t.carbon_kg)} kg CO2e", "")
    tab.add_row("Wh per request", _f(t.wh_per_request, ",.3f"), "facility energy")
    tab.add_row(
        "$ per M output tokens",
        _f(t.usd_per_mtok, ",.3f"),
        f"$ per 1k requests {_f(t.usd_per_1k_requests, ',.4f')}",
    )


def _latency_rows(res: Result, tab: _Rows) -> None:
    """TTFT, TPOT, ITL, e2e, throughput and SLO attainment."""
    sc = res.scenario
    t = res.totals
    lat = res.day_latency
    tab.add_row(
        "TTFT",
        f"p99 {_f(lat['ttft_p99_s'], '.3f')} s",
        f"p50 {_f(lat['ttft_p50_s'], '.3f')} s, p90 {_f(lat['ttft_p90_s'], '.3f')} s, "
        f"mean {_f(lat['ttft_mean_s'], '.3f')} s (SLO {sc.slo.ttft_s} s)",
    )

    def ms(key: str) -> str:
        return _f(lat[key] * 1000, ".1f")

    tab.add_row(
        "TPOT",
        f"p99 {ms('tpot_p99_s')} ms",
        f"p50 {ms('tpot_p50_s')} ms, p90 {ms('tpot_p90_s')} ms, mean {ms('tpot_mean_s')} ms "
        f"(SLO {sc.slo.tpot_s * 1000:g} ms)",
    )
    tab.add_row(
        "ITL",
        f"p99 {ms('itl_p99_s')} ms",
        f"p50 {ms('itl_p50_s')} ms, p90 {ms('itl_p90_s')} ms, mean {ms('itl_mean_s')} ms "
        "(all token gaps; docs/model.md)",
    )
    tab.add_row(
        "e2e",
        f"p99 {_f(lat['e2e_p99_s'], '.3f')} s",
        f"p50 {_f(lat['e2e_p50_s'], '.3f')} s, mean {_f(lat['e2e_mean_s'], '.3f')} s",
    )
    tab.add_row(
        "throughput",
        f"{_f(t.request_throughput_per_s, ',.2f')} req/s",
        f"{_f(t.output_throughput_tokens_per_s, ',.1f')} output tokens/s",
    )
    tab.add_row(
        "SLO attainment",
        _f(t.slo_attainment, ".2%"),
        "requests meeting both TTFT and TPOT targets",
    )


def _peak_row(res: Result, tab: _Rows) -> None:
    """The most expensive hour (``DayTotals.peak_hour``, sweep.parquet's ``peak_hour``), said to
    be ranked by total cost: the ``peak-hour load`` row's busiest hour is ranked by arrivals,
    and on a flat day (or under a time-of-use price) the two can be different hours, named here
    when they are."""
    import numpy as np

    from fleetsim.results.arrow import row as table_row
    from fleetsim.results.arrow import to_numpy

    t = res.totals
    ph = t.peak_hour
    row = table_row(res.hourly, ph)
    arrived = to_numpy(res.hourly.column("requests_arrived")).astype(float)
    busiest = int(np.argmax(arrived)) if len(arrived) and arrived.max() > 0 else ph
    other = ""
    if busiest != ph:
        b = table_row(res.hourly, busiest)
        other = (
            f"; the busiest hour by arrivals is {b['hour_start']:%H:00} UTC "
            f"({b['requests_arrived']:,} requests)"
        )
    tab.add_row(
        "peak hour",
        f"{row['hour_start']:%H:00} UTC (hour {ph})",
        f"the costliest hour: $ {_f(row['total_cost_usd'])} = "
        f"{row['total_cost_usd'] / t.total_cost_usd:.1%} of "
        f"{run_span(res.scenario.simulation.hours)}; "
        f"{row['requests_arrived']:,} requests; p99 TTFT {_f(row['ttft_p99_s'], '.3f')} s{other}"
        if t.total_cost_usd
        else "",
    )


def pool_totals(res: Result) -> dict[str, dict[str, float]]:
    """The day's figures of each pool of a disaggregated fleet, and of the KV link."""
    assert res.pools is not None
    return pool_day_totals(res.pools)


#: the per-pool columns summed over the day (every pools.parquet has them)
_POOL_SUMMED = (
    "gpu_busy_s",
    "energy_facility_kwh",
    "energy_cost_usd",
    "hardware_cost_usd",
    "total_cost_usd",
    "kv_transfers",
    "kv_transfer_bytes",
)


def pool_day_totals(pools) -> dict[str, dict[str, float]]:
    """:func:`pool_totals` of a ``pools.parquet`` table (each pool's rows in table order; the
    sums as pandas' ``groupby(...).sum()`` made them, NaN skipped, without importing pandas)."""
    import numpy as np

    from fleetsim.results.arrow import to_numpy

    names = [str(x) for x in pools.column("pool").to_pylist()]
    have = set(pools.column_names)
    read = (
        *_POOL_SUMMED,
        "gpus_powered_mean",
        "kv_transfer_mean_s",
        "kv_transfer_p99_s",
        "prefix_hit_tokens",
        "preemptions",
    )
    cols = {c: to_numpy(pools.column(c)) for c in read if c in have}
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(names):  # (the pools in order of first appearance)
        rows = np.array([x == name for x in names])
        g = {c: v[rows] for c, v in cols.items()}
        d = {c: float(np.nansum(g[c])) for c in _POOL_SUMMED}
        for c in ("prefix_hit_tokens", "preemptions"):  # (absent from older pools.parquet files)
            d[c] = float(np.nansum(g[c])) if c in g else 0.0
        d["gpu_hours"] = float(np.nansum(g["gpus_powered_mean"]))
        d["utilization"] = d["gpu_busy_s"] / (d["gpu_hours"] * HOUR_S) if d["gpu_hours"] else 0.0
        n = g["kv_transfers"]
        mean = g["kv_transfer_mean_s"].astype(float)
        p99 = g["kv_transfer_p99_s"].astype(float)
        d["kv_transfer_mean_s"] = (
            float((n * np.nan_to_num(mean)).sum() / n.sum()) if n.sum() else math.nan
        )
        d["kv_transfer_worst_hour_p99_s"] = (
            float(np.nanmax(p99)) if np.isfinite(p99).any() else math.nan
        )
        out[name] = d
    return out


def print_pools(res: Result, c: Console) -> None:
    """Both pools of a disaggregated fleet side by side, and the KV traffic between them."""
    from rich.table import Table

    rs = res.resolved
    tab = Table(title="pools (pools.parquet)")
    for h in (
        "pool",
        "per pod",
        "GPU-h",
        "busy",
        "kWh",
        "energy $",
        "hardware $",
        "total $",
        "prefix-hit tokens",
        "preemptions",
    ):
        tab.add_column(h, justify="left" if h in ("pool", "per pod") else "right")
    pt = pool_totals(res)
    specs = rs.pools.by_name()
    for name, d in pt.items():
        sp = specs[name]
        tab.add_row(
            name,
            f"{sp.replicas} x TP{sp.tp} {sp.gpu_name}",
            _f(d["gpu_hours"], ",.1f"),
            f"{d['utilization']:.1%}",
            _f(d["energy_facility_kwh"]),
            _f(d["energy_cost_usd"]),
            _f(d["hardware_cost_usd"]),
            _f(d["total_cost_usd"]),
            _f(d["prefix_hit_tokens"], ",.0f"),
            _f(d["preemptions"], ",.0f"),
        )
    c.print(tab)
    x = pt["prefill"]
    hours = res.scenario.simulation.hours
    link = rs.pools.link
    c.print(
        f"KV transfers ({link.name}, {link.bandwidth_bytes_per_s / 1e9:g} GB/s per GPU, "
        f"{link.latency_s * 1e6:g} us): {_f(x['kv_transfers'], ',.0f')} requests, "
        f"{_f(x['kv_transfer_bytes'] / 1e9 / hours, ',.1f')} GB per hour on average; transfer "
        f"time mean {_f(x['kv_transfer_mean_s'] * 1e3, '.2f')} ms, worst hour's p99 "
        f"{_f(x['kv_transfer_worst_hour_p99_s'] * 1e3, '.2f')} ms"
    )
