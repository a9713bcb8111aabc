"""Everyday use, third walk (w45): the run summary's hours say what ranks them, ``fleetsim
latency`` says how mxfp4 experts are timed, and the FinOps walk of sweep / crossover / compare /
report (the sweep's unfit points: tests/test_plan_sweep.py)."""

from __future__ import annotations

import io

from conftest import SMALL, merge
from rich.console import Console

from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

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
        f"the day; {arrived[2]:,} requests; p99 TTFT "
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
        assert lat._mxfp4 and lat._epeak == peak
    # a MoE whose experts are the weights' precision: no line, and --json says ""
    head = _latency_head(capsys, "--gpu", "h100-sxm", "--model", "qwen3-30b-a3b", *argv[2:])
    assert head[0] == "qwen3-30b-a3b (bf16 weights, kv bf16) on 2 x h100-sxm"
    assert not head[1].startswith("experts")
    assert main(["--gpu", "h100-sxm", "--model", "qwen3-30b-a3b", *argv[2:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["experts_note"] == ""
