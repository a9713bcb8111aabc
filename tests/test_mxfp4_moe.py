"""gpt-oss's mxfp4 experts: their own grouped-GEMM time (fleetsim.device.moe.mxfp4_moe_gemm_s),
without the Triton fused_moe_kernel's fitted K-loop latency (docs/accuracy-log.md, "gpt-oss's
mxfp4 experts")."""

from __future__ import annotations

import dataclasses

import pytest

from fleetsim.apps.latency import _model
from fleetsim.config.schema import FleetSection
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel
from fleetsim.device.moe import MoeLayout, moe_layer_parts_s, mxfp4_moe_gemm_s
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

MODEL = "data/models/openai/gpt-oss-120b"


def _lat(gpu: str = "h100-sxm", tp: int = 1) -> LatencyModel:
    prof = apply_stack(catalog_profile(gpu, catalog.gpu(gpu)), "vllm-v1", gpu, 256)
    assert FleetSection().max_batch_size == 256  # what `fleetsim latency` sizes the graphs by
    return LatencyModel(_model(MODEL, None), prof, tp)


def _hand_gemm(lat: LatencyModel, tokens: int, n: float, k: float) -> float:
    """One mxfp4 grouped GEMM by hand: 128 experts, top-4, the touched experts' packed weights
    (4.25 bits a parameter) and the rows' bf16 input and output over the bandwidth at the kernel
    fit's GEMM efficiency, one launch floor (decode: memory-bound, the compute bound is below)."""
    kf = lat._kern_g
    touched = 128.0 * (1.0 - (1.0 - 4.0 / 128.0) ** tokens)
    rows = 4.0 * tokens
    nbytes = touched * n * k * 4.25 / 8.0 + (rows * k + rows * n) * 2.0
    t_m = nbytes / (lat._bw * kf.gemm_bw_eff)
    t_c = 2.0 * rows * n * k / (lat._epeak * kf.gemm_eff_max)
    assert t_c < t_m
    return kf.gemm_launch_s + t_m


@pytest.mark.parametrize("tokens, touched", [(1, 4.0), (64, 111.22)])
def test_gpt_oss_120b_expert_gemms_by_hand(tokens: int, touched: float) -> None:
    """H100, gpt-oss-120b (d 2,880, expert width 2,880, gated: gate+up 5,760 columns), TP1: the
    up GEMM streams touched x 5,760 x 2,880 x 0.53125 bytes (batch 64: 111.2 experts, 0.98 GB a
    layer, 0.306 ms at 3.35 TB/s x 0.958, plus 4.4 MB of bf16 rows and the launch: 0.308 ms),
    the down GEMM half that."""
    lat = _lat()
    kf = lat._kern_g
    parts = moe_layer_parts_s(
        kf, lat._peak_lin, lat._bw, lat.model, MoeLayout(1, 1, False), tokens, lat._wb,
        1e11, 0.0, lat._ewb, lat._epeak, lat._moe_fit, False, "triton", True,
    )  # fmt: skip
    assert 128.0 * (1.0 - (1.0 - 4.0 / 128.0) ** tokens) == pytest.approx(touched, abs=0.01)
    up, down = _hand_gemm(lat, tokens, 5760, 2880), _hand_gemm(lat, tokens, 2880, 2880)
    assert parts["moe_gemm_up"] == pytest.approx(up, rel=1e-12)
    assert parts["moe_gemm_down"] == pytest.approx(down, rel=1e-12)
    if tokens == 64:
        assert touched * 5760 * 2880 * 4.25 / 8 == pytest.approx(0.980e9, rel=1e-3)
        assert up == pytest.approx(0.308e-3, rel=0.005)


def test_mxfp4_experts_pay_no_triton_k_loop() -> None:
    """The fitted K-step of vLLM's Triton fused_moe_kernel moves bf16 experts' GEMMs, not the
    mxfp4 ones (vLLM runs matmul_ogs / FlashInfer for them)."""
    lat = _lat()
    kf = lat._kern_g
    args = (kf, lat._peak_lin, lat._bw, lat.model, MoeLayout(1, 1, False), 64, lat._wb, 1e11, 0.0)
    slow = dataclasses.replace(lat._moe_fit, k_step_s=10.0 * lat._moe_fit.k_step_s)
    for mx in (True, False):
        a = moe_layer_parts_s(*args, lat._ewb, lat._epeak, lat._moe_fit, False, "triton", mx)
        b = moe_layer_parts_s(*args, lat._ewb, lat._epeak, slow, False, "triton", mx)
        moved = b["moe_gemm_up"] > a["moe_gemm_up"] * 1.5
        assert moved is (not mx)


def test_gpt_oss_120b_decode_step_h100() -> None:
    """The step's grouped-GEMM part is the 36 MoE layers' hand count (plus the activation), and
    the whole decode step at 2,000 tokens of context: 4.46 ms at batch 1, 25.7 ms at 64 (before:
    7.04 and 56.7 ms, of which the Triton K-loop latency 1.9 and 13.8 ms and the dense GEMM fit's
    small-tile compute shape most of the rest)."""
    lat = _lat()
    for b, total in ((1, 4.461e-3), (64, 25.667e-3)):
        assert lat.decode_time(b, 2000) == pytest.approx(total, rel=2e-3)
    kf = lat._kern_g
    gemms = _hand_gemm(lat, 64, 5760, 2880) + _hand_gemm(lat, 64, 2880, 2880)
    assert 36 * gemms == pytest.approx(16.67e-3, rel=0.005)
    assert kf.gemm_bw_eff == pytest.approx(0.9577, rel=1e-3)


@pytest.mark.parametrize(
    "tp, conc, tpot_ms",
    [(2, 64, 15.21), (4, 64, 9.89), (8, 4, 3.72), (8, 8, 4.05), (8, 16, 4.83)],
)
def test_gpt_oss_120b_h100_against_inferencex(tp: int, conc: int, tpot_ms: float) -> None:
    """Measured (SemiAnalysisAI/InferenceX issue 828, gpt-oss-120b on H100 with vLLM, random 1k
    in / 1k out, TPOT, which also carries the prompts' steps): the decode step at 1.5k context
    is 12-26 % slower than the TPOT (before: +62 to +115 %). The low-batch TP8 rows are mostly the
    stack's fixed step overhead and all-reduces, not the experts."""
    step_ms = _lat(tp=tp).decode_time(conc, 1536) * 1e3
    assert 1.0 < step_ms / tpot_ms < 1.30


def test_mxfp4_prompt_gemm_is_compute_bound() -> None:
    """A prompt of 8,192 tokens: 32,768 routed rows over all 128 experts, gate+up 2 x 32,768 x
    5,760 x 2,880 = 1.087 TFLOP at 0.72 of the H100's 989 TFLOP/s bf16 peak (the weights
    dequantised to bf16 in registers, assumed): 1.52 ms, above the memory bound (1.13 GB of
    weights and 0.57 GB of bf16 rows: 0.53 ms)."""
    lat = _lat()
    kf = lat._kern_g
    t = mxfp4_moe_gemm_s(kf, 989e12, 3.35e12, 32768.0, 128.0, 5760.0, 2880.0, 4.25 / 8.0)
    t_c = 2.0 * 32768 * 5760 * 2880 / (989e12 * kf.gemm_eff_max)
    assert t == pytest.approx(kf.gemm_launch_s + t_c, rel=1e-12)
    assert t_c == pytest.approx(1.52e-3, rel=0.01)
    w = 128 * 5760 * 2880 * 4.25 / 8.0 + 32768 * (5760 + 2880) * 2.0
    assert w / (3.35e12 * kf.gemm_bw_eff) == pytest.approx(0.528e-3, rel=0.01)
