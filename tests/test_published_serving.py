"""Today's models against published serving measurements beyond ML.ENERGY
(data/published-serving; docs/accuracy-log.md, "Published serving measurements beyond
ML.ENERGY"): gpt-oss-120b on H200s and DeepSeek-V3.1 on eight H200s (vLLM), each row's
decode step (``LatencyModel.decode_time`` at the concurrency and the mean context) against the
measured time per output token, in the band measured. SGLang's and a bug-affected B200 row are
context only (``use = context``), not held."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fleetsim.apps.latency import _model
from fleetsim.config.schema import FleetSection
from fleetsim.device import catalog, moe
from fleetsim.device.latency import LatencyModel
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

_ROWS = Path(__file__).resolve().parents[1] / "data" / "published-serving" / "rows.csv"


def _rows() -> dict[str, dict[str, str]]:
    with _ROWS.open(newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _lat(r: dict[str, str]) -> LatencyModel:
    gpu = r["gpu"]
    prof = apply_stack(catalog_profile(gpu, catalog.gpu(gpu)), "vllm-v1", gpu, 256)
    assert FleetSection().max_batch_size == 256  # what `fleetsim latency` sizes the graphs by
    return LatencyModel(
        _model(r["model"], None), prof, int(r["tp"]), int(r["dp"]), r["expert_parallel"] == "yes"
    )


def _ratio(r: dict[str, str]) -> float:
    step_ms = _lat(r).decode_time(int(r["concurrency"]), int(r["context_tokens"])) * 1e3
    return step_ms / float(r["measured_ms"])


def _parts_ms(r: dict[str, str]) -> dict[str, float]:
    lat, b, c = _lat(r), int(r["concurrency"]), int(r["context_tokens"])
    parts = lat.breakdown(0, 0.0, 0, b, lat.decode_ctx(b, c))  # window layers: min(c, W)
    assert sum(parts.values()) == pytest.approx(lat.decode_time(b, c), rel=1e-9)
    return {k: v * 1e3 for k, v in parts.items()}


def test_the_measured_figures_by_hand() -> None:
    """Where the source quotes a throughput, not a TPOT: concurrency / output tokens/s (each
    sequence's time per output token, the prompt's steps and first token included): 8 /
    1,947.66 = 4.107 ms, 128 / 12,781.05 = 10.015 ms (vllm issue 30326); 160 requests x 100
    tokens in 23.38 s at 16 at once = 23.38 ms (vllm pull request 28992). vllm issue 40838's
    lengths from its rates: (32,416.16 - 16,055.10) / 15.4667 = 1,058 prompt and 16,055.10 /
    15.4667 = 1,038 output tokens a request, mean context 1,058 + 1,038 / 2 = 1,577."""
    rows = _rows()
    assert float(rows["gptoss-h200-tp8-c8"]["measured_ms"]) == pytest.approx(8 / 1947.66e-3, 1e-4)
    assert float(rows["gptoss-h200-tp8-c128"]["measured_ms"]) == pytest.approx(
        128 / 12781.05e-3, rel=1e-4
    )
    assert float(rows["dsv31-h200-tp8-c16"]["measured_ms"]) == pytest.approx(
        16 / (16000 / 23.38) * 1e3, rel=1e-9
    )
    isl, osl = (32416.16 - 16055.10) / 15.4667, 16055.10 / 15.4667
    r = rows["gptoss-h200-tp4-c300"]
    assert (round(isl), round(osl)) == (int(r["isl"]), int(r["osl"])) == (1058, 1038)
    assert int(r["context_tokens"]) == round(isl + osl / 2)


@pytest.mark.parametrize(
    "row", ["gptoss-h200-tp8-c8", "gptoss-h200-tp8-c128", "gptoss-h200-tp4-c300"]
)
def test_gpt_oss_120b_h200_against_vllm(row: str) -> None:
    """gpt-oss-120b on H200s (mxfp4 experts; later vLLM than the 0.11.1 the stack constants are
    fitted on, async scheduling on): the step is slower than measured by 19 / 33 / 40 % (TP8 at 8
    and 128 sequences, TP4 at 300), never faster (as on the H100 against InferenceX, +12 to +26
    %). Band 1.0-1.5."""
    assert 1.0 < _ratio(_rows()[row]) < 1.5


def test_the_h200_excess_at_300_sequences_is_the_per_sequence_host_time() -> None:
    """TP4 at 300 sequences: 26.1 ms against 18.67 measured, 16.3 ms of it the serving stack's
    fitted per-sequence time (``per_seq_s`` 54.5 us, the H100's, fitted to vLLM 0.11.1's
    single-GPU Qwen3-8B/14B rows); without it the step (9.8 ms) is below the measured TPOT. The
    excess is that host-side constant, not the kernels."""
    r = _rows()["gptoss-h200-tp4-c300"]
    parts = _parts_ms(r)
    assert parts["per_sequence"] == pytest.approx(300 * 0.054457, rel=1e-3)
    total = sum(parts.values())
    assert total - parts["per_sequence"] < float(r["measured_ms"]) < total


def test_deepseek_v31_h200_tp8_is_slower_than_measured() -> None:
    """DeepSeek-V3.1 on eight H200s (TP8, fp8 block-quantised experts on vLLM's Triton
    fused_moe_kernel; 16 sequences of 2-token prompts, 100 tokens each): 35.9 ms a step against
    at most 23.4 ms measured (+53 %; a known gap, the log's "Published serving measurements"
    and "DeepSeek-V3.1 on eight H200s: the fused-MoE K loop, checked"), 29.1 ms of it the
    fused-MoE grouped GEMMs alone: their fitted fp8 K-loop (catalog moe.toml, fitted at 16-64
    local experts and K 4,096) priced at 256 local experts and K 7,168. A regression guard
    tight around the figure (1.535; 1.527 on main 0e4983a and branch d47 before m47 kept MLA's
    down projections whole on each rank, +0.185 ms): a change of the MoE loop that
    moves it must update this band and the log; the measured time is an upper bound (the
    duration carries the prompt steps and the client's gaps), so the step may not fall below
    it. The grouped GEMMs are the bulk of the step (most of the gap's mechanism)."""
    r = _rows()["dsv31-h200-tp8-c16"]
    assert 1.50 < _ratio(r) < 1.55
    parts = _parts_ms(r)
    assert parts["moe_grouped_gemm"] > 0.5 * sum(parts.values())


def test_deepseek_v31_h200_tp8_fp8_loop_by_hand() -> None:
    """The fp8 K loop the model charges each of DeepSeek-V3.1's 58 MoE layers on an H200 under
    TP8 at 16 tokens, by hand (``moe.fp8_default_loop_latency_s``: the shape (256 local
    experts, N 256) has no tuned fp8 entry for the H200 in the catalog, so the default tiles, M
    64 / N 128 / K 128, 3 programs an SM, 396 a wave on 132 SMs, at the H100's fitted
    ``k_step_fp8_default_s`` 2.8 us, each wave after the first 0.4 of the loop). Gate/up: 256
    experts x 1 row block (128 routed rows) x 512 / 128 = 1,024 programs, 3 waves, 7,168 / 128 =
    56 K steps: 56 x 1.8 = 100.8 steps. Down: 256 x 7,168 / 128 = 14,336 programs, 37 waves,
    256 / 128 = 2 K steps: 2 x 15.4 = 30.8 steps. (100.8 + 30.8) x 2.8 us = 368.48 us a layer,
    21.37 ms a step. Without it the step (14.3 ms) is below the measured 23.38 ms, with it above:
    the gap is this loop. By the kernel's structure (``fused_moe_kernel`` returns at once for a
    row block past ``num_tokens_post_padded``; ``moe_align_block_size`` pads only the touched
    experts) the programs that run are the ~102 touched experts' blocks, and vLLM's tuned H200
    file of that day gives 16 tokens BLOCK_SIZE_M 16 / N 256 / K 64: gate/up 204 programs in
    one wave of 528 (4 an SM) x 112 K steps, down 2,856 programs in 6 waves x 4 K steps: 124
    serial steps against the model's 131.6, so the wave count does not explain the gap, the
    step time does (docs/accuracy-log.md)."""
    r = _rows()["dsv31-h200-tp8-c16"]
    lat = _lat(r)
    mf = lat._moe_fit
    assert (mf.k_step_fp8_default_s, mf.fp8_wave_frac, mf.sms) == (2.8e-6, 0.4, 132)
    assert (256, 256) not in mf.tuned_fp8
    assert moe.fp8_programs_per_sm(mf, moe.fp8_default_tiles()) == 3
    assert moe.fp8_default_grid_waves(mf, 256, 128, 512) == 3
    assert moe.fp8_default_grid_waves(mf, 256, 128, 7168) == 37
    up = moe.fp8_default_loop_latency_s(mf, 7168, 256, 128, 512)
    down = moe.fp8_default_loop_latency_s(mf, 256, 256, 128, 7168)
    assert up == pytest.approx(56 * 2.8e-6 * 1.8, rel=1e-9)
    assert down == pytest.approx(2 * 2.8e-6 * 15.4, rel=1e-9)
    assert up + down == pytest.approx(368.48e-6, rel=1e-9)
    step_ms = sum(_parts_ms(r).values())
    loop_ms = 58 * (up + down) * 1e3
    assert step_ms - loop_ms < float(r["measured_ms"]) < step_ms


def test_context_rows_are_not_held() -> None:
    """SGLang's DeepSeek-R1 on eight H200s (InferenceX issue 870) and vLLM's DeepSeek-R1 on a
    B200 DP8 decode node whose TPOT triples below 8 sequences (vllm issue 23752, a bug) are
    recorded as context, not as a vLLM measurement to hold."""
    rows = _rows()
    ctx = {k for k, r in rows.items() if r["use"] == "context"}
    assert all(rows[k]["engine"] == "SGLang" or "b200" in k for k in ctx)
    assert {k for k, r in rows.items() if r["use"] == "test"} == {
        "gptoss-h200-tp8-c8", "gptoss-h200-tp8-c128", "gptoss-h200-tp4-c300", "dsv31-h200-tp8-c16",
    }  # fmt: skip
