"""Everyday use, third walk (w45): the run summary's hours say what ranks them, ``fleetsim
latency`` says how mxfp4 experts are timed, and the FinOps walk of sweep / crossover / compare /
report (the sweep's unfit points: tests/test_plan_sweep.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import SMALL, crossover_row, merge
from rich.console import Console

from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]

#: a flat three hours at 48,000 requests a day, with electricity at $0.50/kWh in hour 2 and
#: $0.10 otherwise: hour 1 has the most arrivals (2,022 with seed 7), hour 2 the highest cost
TOU = [0.1, 0.1, 0.5] + [0.1] * 21
FLAT3 = merge(
    SMALL,
    simulation={"hours": 3},
    traffic=dict(SMALL["traffic"], requests_per_day=48_000),
    cost={"electricity_usd_per_kwh": TOU},
)


def _wide() -> Console:
    return Console(file=io.StringIO(), width=400, color_system=None)


def test_summary_says_the_busiest_hour_is_by_arrivals_and_the_peak_hour_by_cost():
    from fleetsim.results.summary import print_summary

    res = simulate(resolve(scenario_from_dict(FLAT3)))
    arrived = res.hourly.column("requests_arrived").to_pylist()
    cost = res.hourly.column("total_cost_usd").to_pylist()
    assert arrived.index(max(arrived)) == 1 and max(arrived) == 2_022
    assert res.totals.peak_hour == 2 == cost.index(max(cost))
    c = _wide()
    print_summary(res, c)
    lines = c.file.getvalue().splitlines()
    load = next(ln for ln in lines if ln.startswith("peak-hour load"))
    assert "the busiest hour by arrivals (01:00 UTC, 2,022 requests) used" in load
    peak = " ".join(next(ln for ln in lines if ln.startswith("peak hour ")).split())
    share = cost[2] / sum(cost)
    assert peak == (
        f"peak hour 02:00 UTC (hour 2) the costliest hour: $ {cost[2]:,.2f} = {share:.1%} of "
        f"the 3 h simulated; {arrived[2]:,} requests; p99 TTFT "
        f"{res.hourly.column('ttft_p99_s')[2].as_py():.3f} s; the busiest hour by arrivals is "
        "01:00 UTC (2,022 requests)"
    )
    assert f"$ {cost[2]:,.2f}" == "$ 2.20" and f"{share:.1%}" == "37.1%"
    occ = next(ln for ln in lines if ln.startswith("batch occupancy"))
    assert "; highest hourly mean " in occ and "busiest" not in occ
    # a flat price: the costliest hour is the busiest, and the row names it once
    res = simulate(resolve(scenario_from_dict({k: v for k, v in FLAT3.items() if k != "cost"})))
    assert res.totals.peak_hour == 1
    c = _wide()
    print_summary(res, c)
    peak = next(ln for ln in c.file.getvalue().splitlines() if ln.startswith("peak hour "))
    assert "01:00 UTC (hour 1)" in peak and "by arrivals" not in peak


# -- fleetsim latency: how mxfp4 experts are computed -------------------------------------------
def _latency_head(capsys, *argv: str) -> list[str]:
    from fleetsim.apps.latency import main

    assert main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()[:2]


def test_latency_header_says_mxfp4_experts_compute_at_the_bf16_peak(capsys):
    """gpt-oss's experts are mxfp4 and vLLM keeps the activations bf16 on every GPU (Marlin on
    an A100, triton_kernels' matmul_ogs on Hopper, FlashInfer's TensorRT-LLM MoE on a B200):
    the header says so, and the latency model does time them at the bf16 peak (989 TFLOP/s on
    an H100, 2,250 on a B200: gpus.toml), not at the fp8 one."""
    import json

    from fleetsim.apps.latency import _model, main
    from fleetsim.device import catalog
    from fleetsim.device.latency import LatencyModel
    from fleetsim.device.moe import MXFP4_MOE_PATHS
    from fleetsim.device.profile import catalog_profile

    assert set(MXFP4_MOE_PATHS) == set(catalog.gpus())  # every catalog GPU has its line
    argv = ("--model", "gpt-oss-120b", "--tp", "2", "--batch", "1", "--context", "1000")
    head = _latency_head(capsys, "--gpu", "h100-sxm", *argv)
    assert head == [
        "gpt-oss-120b (bf16 weights, experts mxfp4, kv bf16) on 2 x h100-sxm",
        "experts mxfp4, weight-only on this GPU (vLLM runs triton_kernels' matmul_ogs, the "
        "weights dequantised to bf16 in registers): compute at the bf16 peak",
    ]
    a100 = _latency_head(capsys, "--gpu", "a100-80gb", *argv)[1]
    assert a100.startswith("experts mxfp4, weight-only on this GPU (vLLM runs Marlin's fp4 MoE")
    b200 = _latency_head(capsys, "--gpu", "b200", *argv)[1]
    assert b200.startswith(
        "experts mxfp4 with bf16 activations (vLLM's default on Blackwell: FlashInfer's "
        "TensorRT-LLM MoE): compute at the bf16 peak, assumed"
    )
    # the claim holds in the model: the experts' peak is the 16-bit one
    model = _model("gpt-oss-120b", None)
    for gpu, peak in (("h100-sxm", 989e12), ("b200", 2250e12)):
        lat = LatencyModel(model, catalog_profile(gpu, catalog.gpu(gpu)), 2)
        assert lat._fp4_moe and lat._epeak == peak
    # a MoE whose experts are the weights' precision: no line, and --json says ""
    head = _latency_head(capsys, "--gpu", "h100-sxm", "--model", "qwen3-30b-a3b", *argv[2:])
    assert head[0] == "qwen3-30b-a3b (bf16 weights, kv bf16) on 2 x h100-sxm"
    assert not head[1].startswith("experts")
    assert main(["--gpu", "h100-sxm", "--model", "qwen3-30b-a3b", *argv[2:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["experts_note"] == ""


# -- the FinOps walk: sweep and crossover ---------------------------------------------------------
def test_sweep_says_when_its_figures_are_not_a_days():
    """A sweep of a 2-hour scenario printed "total $ 15.10" with nothing saying it was two
    hours' (plan heads its columns $/2 h); a grid over simulation.hours mixes horizons."""
    from fleetsim.apps.sweep import horizon_note

    assert horizon_note({24}) == "" and horizon_note(set()) == ""
    assert horizon_note({2}) == (
        "requests, GPU-h, kWh and $ are over the simulated 2 h (simulation.hours), not a day"
    )
    assert horizon_note({24, 1, 2}) == (
        "requests, GPU-h, kWh and $ are over each point's simulation.hours (1 h, 2 h, 24 h), "
        "not a day; $/Mtok and Wh/req compare across points"
    )


def test_crossover_outcome_names_cells_met_by_one_design_only():
    """The default scenario's 2-replica crossover (1 h, load 0.7): on the short workload only
    the aggregated fleet met any target cell, and the table's "lowest ratio" read "n/a"."""
    import math

    import numpy as np

    from fleetsim.apps.crossover import lowest_ratio_text

    inf = math.inf
    assert lowest_ratio_text(np.full((7, 7), inf)) == "49 met only by the aggregated fleet"
    assert lowest_ratio_text(np.full((7, 7), np.nan)) == (
        "n/a: neither design meets any target cell"
    )
    mixed = np.array([[0.0, 0.8, 1.25], [inf, np.nan, 0.5]])
    assert lowest_ratio_text(mixed) == (
        "0.500; 1 met only by the split; 1 met only by the aggregated fleet"
    )
    assert lowest_ratio_text(np.array([[1.25, 0.8]])) == "0.800"  # as before
    # the report's line on the same cells: "(ratio n/a; 49 met only ...)" before
    import pyarrow as pa

    from fleetsim.apps.crossover import FACTORS
    from fleetsim.apps.report import crossover_lines

    rows: dict[str, list] = {}
    for f in FACTORS:
        for g in FACTORS:
            for design, P, usd in (("aggregated", None, 1.0), ("disaggregated", 1, inf)):
                cell = crossover_row(f, g, design, P, usd)
                for k, v in cell.items():
                    rows.setdefault(k, []).append(v)
    line = dict(crossover_lines(pa.table(rows)))["short prompts"]
    assert line.endswith(
        "in 0 of 49 target cells (no cell met by both; 49 met only by the aggregated fleet)"
    )


def test_crossover_says_what_it_compared_and_which_link():
    """default.toml has no [disaggregation]: the split runs on the schema's default link, and
    the terminal now says so (it named neither N, the link nor the load)."""

    from fleetsim.apps.crossover import fleet_size, setup_line
    from fleetsim.config.loading import read_toml

    data, _ = read_toml(ROOT / "scenarios/default.toml")
    assert fleet_size(data) == 8
    assert setup_line(data, 0.7, 1, "scenario") == (
        "8 replicas of TP4 h100-sxm: aggregated vs every split P + D = 8; KV link "
        "infiniband-ndr (the default: the scenario has no [disaggregation]); each workload "
        "flat at 0.7 x the aggregated fleet's capacity for 1 h; engine: the scenario's"
    )
    data, _ = read_toml(ROOT / "scenarios/disaggregated.toml")
    assert fleet_size(data) == 6  # 3 prefill + 3 decode
    line = setup_line(data, 1.2, 2, "reserve")
    assert "P + D = 6; KV link infiniband-ndr; each workload flat at 1.2 x" in line
    assert line.endswith("for 2 h; engine: reserve")


def test_sweep_unfit_reasons_cover_the_pools_and_nothing_else():
    """A disaggregated pool's TP that vLLM refuses is a row (``not accepted``) as ``[fleet]``'s
    is; the memory refusals are ``does not fit`` with their fix; a value out of range or a
    typo refuses the grid ('')."""
    from fleetsim.apps.sweep import unfit_reason
    from fleetsim.base.errors import ScenarioError, UserError

    heads = "does not divide llama-3.1-70b's 64 attention heads"
    fix = "use one of 1, 2, 4, 8, 16, 32, 64"
    for field in ("fleet.tensor_parallel", "disaggregation.prefill.tensor_parallel"):
        assert unfit_reason(ScenarioError(field, 3, heads, fix)) == (
            f"not accepted: {heads} (fix: {fix})"
        )
    kv = "no memory left for the KV cache: 76.5 GB usable - 80.0 GB"
    assert unfit_reason(ScenarioError("fleet.gpu_memory_utilization", 0.9, kv, "")) == (
        f"does not fit: {kv}"
    )
    assert unfit_reason(ScenarioError("fleet.replicas", 0, "should be >= 1", "")) == ""
    assert unfit_reason(UserError("--grid: something")) == ""


def test_report_says_its_shares_are_of_the_hours_simulated(tmp_path, capsys):
    """A 3-hour run's busiest hour held "59.1% of the day's cost" (the run summary's peak hour
    the same): the share is of the 3 h simulated, and a day's report still says the day."""
    from fleetsim.apps.report import main
    from fleetsim.apps.simulate import write_outputs
    from fleetsim.base.units import run_span

    assert run_span(24) == "the day" and run_span(3) == "the 3 h simulated"
    res = simulate(resolve(scenario_from_dict(FLAT3)))
    write_outputs(res, tmp_path, "")
    assert main([str(tmp_path), "--no-flat"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    cost = res.hourly.column("total_cost_usd").to_pylist()
    share = cost[1] / sum(cost)  # hour 1: the most arrivals
    assert last.startswith(
        f"busiest hour by arrivals 01:00 UTC (hour 1): {share:.2%} of the cost of the 3 h "
        "simulated; "
    )
    md = (tmp_path / "report.md").read_text()
    assert f"| busiest hour's share of the cost of the 3 h simulated | {share:.2%} |" in md


def test_sweep_names_a_price_axis_no_point_pays():
    """Rent on owned GPUs (the default scenario's way) changes no figure: the two points'
    rows are identical, and the sweep now says why and how to make the axis count; with
    cost.hardware an axis too, the rented points pay it and nothing is said."""
    from fleetsim.apps.executors import make_executor
    from fleetsim.apps.sweep import (
        grid_points,
        parse_grid,
        point_scenarios,
        run_sweep,
        unused_axis_notes,
    )

    base = merge(FLAT3, simulation={"hours": 1}, cost={"hardware": "owned"})
    axes = parse_grid(["hardware.rent_usd_per_gpu_hour=[2.5, 4.25]"])
    with make_executor("local", 1) as ex:
        t = run_sweep(base, axes, "", ex)
    rows = t.drop_columns(["hardware.rent_usd_per_gpu_hour"]).to_pylist()
    assert rows[0] == rows[1] and rows[0]["hardware_cost_usd"] > 0
    points = point_scenarios(base, grid_points(axes), "")
    assert unused_axis_notes(axes, points) == [
        "note: hardware.rent_usd_per_gpu_hour changes no figure: every point has "
        'cost.hardware = "owned", which does not read it (fix: --set cost.hardware="rented", '
        'or add --grid \'cost.hardware=["owned", "rented"]\')'
    ]
    both = parse_grid(
        ["hardware.rent_usd_per_gpu_hour=2.5,4.25", 'cost.hardware=["owned", "rented"]']
    )
    assert unused_axis_notes(both, point_scenarios(base, grid_points(both), "")) == []
    rented = merge(base, cost={"hardware": "rented"})
    capex = parse_grid(["hardware.capex_usd=[20000, 40000]", "cost.amortization_years=[4, 6]"])
    notes = unused_axis_notes(capex, point_scenarios(rented, grid_points(capex), ""))
    assert [n.split(" changes")[0] for n in notes] == [
        "note: hardware.capex_usd",
        "note: cost.amortization_years",
    ]


def test_crossover_leaves_out_a_long_workload_the_model_cannot_take():
    """chatgpt-2023.toml's GPT-3 has a 4,096-token context: the long (Mooncake) workload's
    32,768-token prompts were refused as if the scenario's traffic.prompt.max said so
    ("traffic.prompt.max = 32768", a value the file does not hold). It is left out with a
    note and the short workload is compared; a fleet of one replica names its fix."""
    from fleetsim.apps.crossover import run_crossover
    from fleetsim.apps.executors import make_executor
    from fleetsim.base.errors import UserError
    from fleetsim.config.loading import apply_overrides, read_toml

    src = str(ROOT / "scenarios/chatgpt-2023.toml")
    data, _ = read_toml(src)
    data = scenario_from_dict(apply_overrides(data, ["fleet.replicas=2"]), src).model_dump(
        mode="json", exclude_none=True
    )
    notes: list[str] = []
    with make_executor("local", 1) as ex:
        t = run_crossover(data, src, ex, None, 0.7, 1, notes=notes)
    assert set(t.column("workload").to_pylist()) == {"short"}
    assert t.num_rows == 2 * 49  # aggregated and the one split (1 + 1), 7 x 7 target cells
    assert notes == [
        "the long workload (Mooncake sizes: prompts up to 32,768 tokens) does not fit this "
        "model: traffic.prompt.max = 32768: prompt + output (34768 tokens) exceeds gpt3-175b's "
        "context of 4096 tokens; left out, the short workload only"
    ]
    one = scenario_from_dict(apply_overrides(data, ["fleet.replicas=1"]), src)
    with make_executor("local", 1) as ex, pytest.raises(UserError) as e:
        run_crossover(one.model_dump(mode="json", exclude_none=True), src, ex, None, 0.7, 1)
    assert str(e.value) == (
        "crossover: the fleet has 1 replica; it needs at least 2 to split (fix: --set "
        "fleet.replicas=2 or more, or give the scenario a [disaggregation] section)"
    )


def test_sweep_names_a_traffic_axis_a_trace_replaces():
    """mooncake-conversation.toml replays a timed trace: a grid over the request rate gave two
    identical rows (12,031 requests each, 2 replicas, 2 h). The note says why."""
    from fleetsim.apps.sweep import grid_points, parse_grid, point_scenarios, unused_axis_notes
    from fleetsim.config.loading import apply_overrides, read_toml

    src = str(ROOT / "scenarios/mooncake-conversation.toml")
    data, _ = read_toml(src)
    base = apply_overrides(data, ["fleet.replicas=2"])
    axes = parse_grid(["traffic.requests_per_day=[1000, 2000]", "fleet.replicas=[2, 3]"])
    notes = unused_axis_notes(axes, point_scenarios(base, grid_points(axes), src))
    assert notes == [
        "note: traffic.requests_per_day changes no figure: every point replays traffic.trace, "
        "whose requests bring their own arrival times and sizes (fix: sweep a fleet or cost "
        "field, or --set traffic.trace='' for the distributions)"
    ]
    shape = parse_grid(['traffic.diurnal=["flat", "azure-conv"]'])
    assert len(unused_axis_notes(shape, point_scenarios(base, grid_points(shape), src))) == 1
    # without the trace the rate is read: nothing to say
    flat = apply_overrides(base, ["traffic.trace=''"])
    axes = parse_grid(["traffic.requests_per_day=[1000, 2000]"])
    assert unused_axis_notes(axes, point_scenarios(flat, grid_points(axes), src)) == []


# -- fleetsim compare -----------------------------------------------------------------------------
def test_compare_says_when_the_durations_differ():
    """A 3-hour run against the documented 1,003.42 s benchmark file: completed read +504%
    and the token totals +698% / +531% as if they were the model's errors."""
    import json

    from fleetsim.apps.compare import compare, duration_note

    theirs = json.loads((ROOT / "tests/data/vllm/serving-result.json").read_text())
    ours = {**theirs, "duration": 10_800.0, "completed": 6_038}
    rows = compare(ours, theirs)
    assert duration_note(rows) == (
        "note: the run lasted 10,800 s, the benchmark 1,003 s: duration, completed, "
        "total_input_tokens, total_output_tokens are totals over each duration and differ by "
        "it, not by the model; compare the throughputs and latencies"
    )
    assert duration_note(compare({**theirs, "duration": 1_100.0}, theirs)) == ""  # +9.6%
    assert duration_note(compare(theirs, theirs)) == ""


def test_sweep_names_the_points_that_missed_the_slo():
    """kv-pressure-70b-a100.toml, 1 h, paged vs reserve: both at 0.00% SLO attainment (fleetsim
    run prints "SLO MISSED" below 90%), $/Mtok 0.664 / 0.608; the sweep said nothing."""
    import pyarrow as pa

    from fleetsim.apps.sweep import slo_note

    t = pa.table(
        {
            "fleet.kv_allocation": ["paged", "reserve", "paged"],
            "status": ["ok", "ok", "does not fit"],
            "slo_attainment": [0.0, 0.95, None],
        }
    )
    assert slo_note(t, ["fleet.kv_allocation"]) == (
        'note: 1 of 3 points met the SLO for under 90% of requests (fleetsim run warns "SLO '
        'MISSED"): fleet.kv_allocation=paged 0.00%; such a fleet is overloaded or too slow, and '
        "its $/Mtok and Wh/req are not a cheaper way to serve the same requests (fix: more "
        "replicas, or compare only the points that meet it)"
    )
    assert slo_note(t.slice(1, 2), ["fleet.kv_allocation"]) == ""


def test_grid_text_after_a_closed_array_is_named():
    """`--grid 'power.pue=[1.1, 1.3]x'` said "the array is not closed" (it is) with the
    example [4, 8]; an array of arrays cut short is still "not closed"."""
    from fleetsim.apps.sweep import parse_grid
    from fleetsim.base.errors import UserError

    with pytest.raises(UserError) as e:
        parse_grid(["power.pue=[1.1, 1.3]x"])
    assert str(e.value) == (
        "--grid power.pue=[1.1, 1.3]x: 'x' after the array's closing ']' (fix: end the value "
        "there, e.g. power.pue=[1.1, 1.3])"
    )
    with pytest.raises(UserError, match=r"the array is not closed \(fix: e.g. fleet.x=\[4, 8\]"):
        parse_grid(["fleet.x=[[1, 2], [3"])
    assert parse_grid(['traffic.diurnal=["a]b", "flat"]']) == [
        ("traffic.diurnal", ['"a]b"', '"flat"'])
    ]
    assert parse_grid(["power.pue=[1.1, 1.3] "]) == [("power.pue", ["1.1", "1.3"])]
