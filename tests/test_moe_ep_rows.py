"""Expert parallelism in vLLM's fused MoE kernel: every GPU's kernel handles every token's top-k
rows, its own experts' and the others' (fleetsim.device.moe.ep_foreign_rows), and a data-parallel
step runs every engine as the fullest one, eager when that one's batch is past the CUDA-graph
capture size."""

from __future__ import annotations

import dataclasses

import pytest

from fleetsim.device import catalog
from fleetsim.device.kernels import elem_time_s
from fleetsim.device.latency import LatencyModel
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.moe import (
    MoeLayout,
    ep_foreign_rows,
    grouped_gemm_time_s,
    moe_layer_parts_s,
)
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack


def _model(n_experts: int = 128, top_k: int = 8) -> ModelSpec:
    # a Qwen3-30B-A3B-sized MoE layer: 128 experts, top-8, 768 intermediate columns
    return ModelSpec(
        name="moe128",
        n_layers=4,
        d_model=2048,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        d_ff=6144,
        d_ff_expert=768,
        vocab_size=32000,
        n_experts=n_experts,
        n_active_experts=top_k,
    )


def _profile(gpu: str = "b200"):
    return catalog_profile(gpu, catalog.gpu(gpu))


def test_foreign_rows_closed_form():
    """T tokens routed top-k over ep ranks: the kernel sorts all T k rows and (ep-1)/ep of them
    belong to other ranks' experts; none without expert parallelism or on one rank."""
    assert ep_foreign_rows(1000, 8, MoeLayout(1, 8, True)) == pytest.approx(1000 * 8 * 7 / 8)
    assert ep_foreign_rows(1000, 8, MoeLayout(4, 1, True)) == pytest.approx(1000 * 8 * 3 / 4)
    assert ep_foreign_rows(1000, 8, MoeLayout(2, 2, True)) == pytest.approx(1000 * 8 * 3 / 4)
    assert ep_foreign_rows(1000, 8, MoeLayout(8, 1, False)) == 0.0  # experts split, not placed
    assert ep_foreign_rows(1000, 8, MoeLayout(1, 1, True)) == 0.0
    assert ep_foreign_rows(0, 8, MoeLayout(1, 8, True)) == 0.0


def test_activation_and_sum_do_not_shrink_with_ep():
    """vLLM's fused_experts_impl runs silu_and_mul and moe_sum over its caches of M x top_k rows,
    whichever rank's experts the rows went to: at a fixed token count each GPU's activation and
    routing/sum time is the same under EP 2, 4 and 8 (the GEMMs' own rows shrink 1/ep). Hand
    count: the activation reads 2 x 768 and writes 768 16-bit columns per row; the sum reads the
    k rows of d_model and writes one."""
    m = _model()
    p = _profile()
    kf = p.kernels
    assert kf is not None
    bw = p.mem_bw_bytes_per_s
    T = 4096.0
    parts = {
        ep: moe_layer_parts_s(kf, p.peak_flops, bw, m, MoeLayout(ep, 1, True), T, 2.0, 9e11, 5e-6)
        for ep in (2, 4, 8)
    }
    act = elem_time_s(kf, bw, "act", 3.0 * 2.0 * T * 8 * 768)
    for ep, pt in parts.items():
        assert pt["moe_act"] == pytest.approx(act, rel=1e-12), ep
        assert pt["moe_route"] == pytest.approx(parts[2]["moe_route"], rel=1e-12), ep
    s = elem_time_s(kf, bw, "add", (T * 8 + T) * 2048 * 2.0)
    assert parts[8]["moe_route"] >= s
    # the GEMMs' own work does shrink with the experts held
    assert parts[8]["moe_gemm_up"] < parts[2]["moe_gemm_up"]


def test_foreign_rows_store_zero_tiles():
    """The programs of another rank's rows store a zero tile of the output's n 16-bit columns:
    in the memory-bound limit (rows of zeros only), each row adds n x 2 bytes at the GEMM's
    bandwidth."""
    kf = _profile().kernels
    assert kf is not None
    bw = 8e12
    args = (kf, 2.25e15, bw, 64.0, 4.0, 1536.0, 2048.0, 2.0)
    base = grouped_gemm_time_s(*args)
    z = 4.0e6
    more = grouped_gemm_time_s(*args, zero_rows=z)
    assert more - base == pytest.approx(z * 1536 * 2.0 / (bw * kf.gemm_bw_eff), rel=0.02)
    assert grouped_gemm_time_s(*args, zero_rows=0.0) == base


def test_a_prompt_on_one_engine_costs_every_gpu_its_rows():
    """DP 8 x EP 8: one engine prefilling 1,500 tokens while 128 sequences decode pads every
    engine to 16 + 1,500 tokens, and each GPU's fused MoE then handles all 8 x 1,516 tokens' top-8
    rows, 7/8 of them for other GPUs' experts. Its elementwise and zero-tile bytes alone, at the
    GPU's full bandwidth, are a lower bound on the step's added MoE time per layer."""
    m = _model()
    p = _profile()
    lat = LatencyModel(m, p, tp=1, dp=8, expert_parallel=True)
    dec = lat.breakdown(0, 0.0, 0, 128, 128 * 1500.0)
    pre = lat.breakdown(1500, 1500.0**2 / 2, 1, 127, 127 * 1500.0)
    T = 8 * (16 + 1500)
    foreign = T * 8 * 7 / 8
    zero_b = foreign * (2 * 768 + 2048) * 2.0  # zero tiles of both GEMMs' outputs
    act_b = 3.0 * 2.0 * T * 8 * 768  # silu_and_mul over every row
    sum_b = (T * 8 + T) * 2048 * 2.0  # moe_sum
    bound = m.n_moe_layers * (zero_b + act_b + sum_b) / p.mem_bw_bytes_per_s
    added = (pre["moe_grouped_gemm"] + pre["moe_router"]) - (
        dec["moe_grouped_gemm"] + dec["moe_router"]
    )
    assert added > bound
    assert sum(pre.values()) == pytest.approx(
        lat.iteration(1500, 1500.0**2 / 2, 1, 127, 127 * 1500.0)[0], rel=1e-12
    )


def test_one_engine_past_the_capture_size_runs_every_engine_eager():
    """vLLM (vllm/v1/worker/dp_utils.py, coordinate_batch_across_dp; get_dp_padding in
    gpu_model_runner.py before it) pads every DP rank to the largest rank's token count, so one
    rank's prompt past the CUDA-graph capture size puts every rank past it: all run eager at the
    fullest rank's tokens (later versions also take the minimum graph mode across ranks). Under the
    vllm-v1 stack (graphs up to min(2 x max_num_seqs, 512) tokens per engine): a decode-only
    DP-8 step of 128 sequences (16 per engine) is graphed; one engine's 1,500-token prompt makes
    the step the eager layer time of 8 x 1,516 tokens, the same whichever engine holds it and
    the same as a balanced step of 8 x 1,516 tokens."""
    m = _model()
    p = apply_stack(_profile(), "vllm-v1", "b200", 128)
    lat = LatencyModel(m, p, tp=1, dp=8, expert_parallel=True)
    assert lat._gmax == 8 * 256  # type: ignore[attr-defined]  # 256 per engine
    eager = LatencyModel(
        m, dataclasses.replace(p, graph_max_tokens=-1), tp=1, dp=8, expert_parallel=True
    )
    # decode only: graphed, faster than the same tokens eager
    assert lat.linear_time(128, 128) < eager.linear_time(128, 128)
    # one prompt: the padded 8 x 1,516 tokens, eager on every engine
    t = lat.iteration(1500, 0.0, 1, 127, 0.0)[0]
    padded = 8 * (16 + 1500)
    assert lat.linear_time(padded, 128) == pytest.approx(eager.linear_time(padded, 128), rel=1e-12)
    oh = lat._oh  # type: ignore[attr-defined]
    # the new tokens' KV term at the fullest engine: the prompt's 1,500 all on one engine, 8 x
    # 1,500 over the even split (prompt attention at the fullest engine, g40), and the decodes,
    # 8 x ceil(127 / 8) = 128 (decode attention at the fullest engine, f39): 12,128
    assert t == pytest.approx(oh + lat.linear_time(padded, 128) + 12_128 * lat._att_m, rel=1e-12)  # type: ignore[attr-defined]
