"""The weights every tensor-parallel rank holds whole (vLLM 0.11; docs/accuracy-log.md, "MLA's
down projections are replicated under tensor parallelism"): multi-head latent attention's down
projections (``DeepseekV2MLAAttention``: ``fused_qkv_a_proj`` a ``MergedColumnParallelLinear``
with ``disable_tp=True``), the MoE routers (``gate``: a ``ReplicatedLinear`` with
``quant_config=None``, 16-bit) and, with more ranks than KV heads, one KV head's K and V
projections on every rank (``QKVParallelLinear``'s ``num_kv_head_replicas``). By hand on
DeepSeek-V3.1's config (d 7,168, q_lora 1,536, kv_lora 512, rope 64, nope 128, v 128, 128
heads, 61 layers of which 58 MoE: 256 experts of 2,048, one shared, dense layers 18,432 wide,
vocabulary 129,280, fp8 block-quantised, embedding bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetsim.config.hf import read_hf_config_named
from fleetsim.device import catalog
from fleetsim.device.kernels import gemm_time_s
from fleetsim.device.latency import LatencyModel
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.moe import attention_block_s, replica_weight_bytes
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"

D = 7168
#: fused_qkv_a_proj: 7,168 x (1,536 + 512 + 64) = 7,168 x 2,112
MLA_DOWN = 7168 * 2112  # 15,138,816
#: kv_b_proj 512 x 128 x (128 + 128) + q_b_proj 1,536 x 128 x (128 + 64): split by column
MLA_UP = 512 * 128 * 256 + 1536 * 128 * 192  # 54,525,952
ROUTER = 7168 * 256  # 1,835,008 a MoE layer
#: a further rank's copies: 61 x 15,138,816 fp8 bytes + 58 x 1,835,008 x 2 bf16 bytes
COPY = 61 * MLA_DOWN * 1 + 58 * ROUTER * 2  # 923,467,776 + 212,860,928 = 1,136,328,704


def _repo(hf_id: str) -> ModelSpec:
    arch, name = read_hf_config_named(MODELS / hf_id / "config.json")
    return ModelSpec(name=name, **arch)


def _ds() -> ModelSpec:
    m = _repo("deepseek-ai/DeepSeek-V3.1")
    assert (m.dtype, m.embed_dtype, m.n_attn_layers, m.n_moe_layers) == ("fp8", "bf16", 61, 58)
    return m


def test_deepseek_v3_weight_bytes_by_hand_at_tp1_and_tp8() -> None:
    """Parameters: attention 187,105,280 a layer (q 7,168 x 1,536 + 1,536 x 128 x 192, kv
    7,168 x 576 + 512 x 128 x 256, o 128 x 128 x 7,168) x 61; dense MLP 3 x 7,168 x 18,432 x 3;
    MoE (256 + 1 shared) x 3 x 7,168 x 2,048 + router 1,835,008, x 58; embedding and LM head 2 x
    129,280 x 7,168: 671,025,397,760 (DeepSeek's 671 B without the MTP layer). Bytes: fp8 but
    the embedding, LM head and routers (106,430,464 parameters) in bf16: 672,985,186,304 at TP1.
    At TP8 each of 7 further ranks holds the down projections and the routers whole: +
    7 x 1,136,328,704 = 7,954,300,928 bytes, 85.1 GB a GPU where 672,985,186,304 / 8 = 84.1."""
    m = _ds()
    assert m.mla_down_params_per_layer == MLA_DOWN
    assert m.router_params_per_layer == ROUTER and m.router_bytes_per_param == 2.0
    attn = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert attn == 187_105_280 == m.attn_params_per_layer == MLA_DOWN + MLA_UP + 128 * 128 * D
    total = 61 * attn + 3 * 3 * 7168 * 18432 + 58 * (257 * 3 * 7168 * 2048 + ROUTER)
    total += 2 * 129280 * 7168
    assert m.total_params == total == 671_025_397_760
    bf16 = 2 * 129280 * 7168 + 58 * ROUTER
    assert m.weight_bytes == (total - bf16) * 1 + bf16 * 2 == 672_985_186_304
    assert m.tp_extra_weight_bytes(1) == 0.0 and m.weight_bytes_tp(1) == m.weight_bytes
    assert COPY == 1_136_328_704
    assert m.tp_extra_weight_bytes(8) == 7 * COPY == 7_954_300_928
    assert m.weight_bytes_tp(8) / 8 == 85_117_435_904  # 85.1 GB a GPU (84.1 split 8 ways)
    # the replica's weights (the KV budget's): one engine of 8
    assert replica_weight_bytes(m, 1, 8) == m.weight_bytes_tp(8)
    # DP2 engines of TP8: the experts once, the rest (and its further copies) once per engine
    experts = 58 * 257 * 3 * 7168 * 2048
    assert replica_weight_bytes(m, 2, 8) == 2 * m.weight_bytes_tp(8) - experts


def test_deepseek_v3_weight_bytes_read_per_step_by_hand() -> None:
    """One decoding token (8 routed experts touched, and the shared one, in each of 58 layers):
    attention 61 x 187,105,280 + dense 3 x 396,361,728 + routers 58 x 1,835,008 x 2 (bf16) +
    experts 58 x 9 x 44,040,192 fp8 bytes + LM head 129,280 x 7,168 x 2 = 37,657,706,496
    bytes on one GPU; on eight the 7 further copies of the down projections and routers too,
    45,612,007,424 (5.70 GB a GPU a step)."""
    m = _ds()
    tp1 = 61 * 187_105_280 + 3 * 396_361_728 + 58 * ROUTER * 2 + 58 * 9 * 44_040_192
    tp1 += 129280 * 7168 * 2
    assert tp1 == 37_657_706_496
    assert m.weight_bytes_read(1.0) == pytest.approx(tp1, rel=1e-12)
    assert m.weight_bytes_read_tp(1.0, 1) == m.weight_bytes_read(1.0)
    assert m.weight_bytes_read_tp(1.0, 8) == pytest.approx(tp1 + 7 * COPY, rel=1e-12)
    assert tp1 + 7 * COPY == 45_612_007_424
    # what the latency model's power split takes as an iteration's weight bytes
    prof = apply_stack(catalog_profile("h200", catalog.gpu("h200")), "vllm-v1", "h200", 256)
    lat = LatencyModel(m, prof, 8)
    assert lat.weight_bytes_per_iteration(1) == pytest.approx(45_612_007_424, rel=1e-12)
    # and every rank multiplies each token by its copies: 2 x 7 x (61 x 15,138,816 + 58 x
    # 1,835,008) FLOPs a token more than one copy
    extra_flops = 2 * 7 * (61 * MLA_DOWN + 58 * ROUTER)
    assert extra_flops == 14_418_575_360
    assert lat.f_lin == m.flops_per_token_linear + extra_flops


def test_the_mla_input_gemm_keeps_the_down_projections_whole() -> None:
    """The kernel model's MLA input GEMM on one GPU of eight: 2,112 columns whole (the down
    projections) + 54,525,952 / 7,168 / 8 = 950.9 columns of the up projections, 3,062.9 in
    all (it charged 69,664,768 / 7,168 / 8 = 1,214.9: every projection split). The output
    projection 128 x 128 / 8 = 2,048 wide."""
    m = _ds()
    prof = apply_stack(catalog_profile("h200", catalog.gpu("h200")), "vllm-v1", "h200", 256)
    lat = LatencyModel(m, prof, 8)
    kf = lat._kern_g
    assert kf is not None
    pre_out = 2112 + MLA_UP / D / 8
    assert pre_out == pytest.approx(3062.857, abs=1e-3)
    for tokens in (1.0, 16.0, 8192.0):
        gemms, _ = attention_block_s(kf, lat._peak_lin, lat._bw, m, lat._shapes, 8, tokens, 1.0)
        want = gemm_time_s(kf, lat._peak_lin, lat._bw, tokens, pre_out, D, 1.0)
        want += gemm_time_s(kf, lat._peak_lin, lat._bw, tokens, D, 2048.0, 1.0)
        assert gemms == pytest.approx(want, rel=1e-12)
    # on one GPU nothing is replicated: the same GEMM as before
    g1, _ = attention_block_s(kf, lat._peak_lin, lat._bw, m, lat._shapes, 1, 16.0, 1.0)
    w1 = gemm_time_s(kf, lat._peak_lin, lat._bw, 16.0, (MLA_DOWN + MLA_UP) / D, D, 1.0)
    w1 += gemm_time_s(kf, lat._peak_lin, lat._bw, 16.0, D, 16384.0, 1.0)
    assert g1 == pytest.approx(w1, rel=1e-12)


def test_kv_heads_fewer_than_the_ranks_and_the_router_by_hand() -> None:
    """Qwen3-235B-A22B-FP8 (4 KV heads of 128, d 4,096, 94 layers, 128 experts) at TP8: every
    rank holds one KV head's K and V (4 further heads: 4 x 94 x 2 x 4,096 x 128 fp8 bytes =
    394,264,576) and the router (7 further copies of 94 x 4,096 x 128 bf16 = 98,566,144 bytes:
    689,963,008); at TP4 no KV head is replicated, 3 router copies."""
    m = _repo("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8")
    assert (m.n_kv_heads, m.head_dim, m.d_model, m.n_attn_layers) == (4, 128, 4096, 94)
    assert m.mla_down_params_per_layer == 0
    router = 94 * 4096 * 128 * 2
    assert router == 98_566_144
    kv = 4 * 94 * 2 * 4096 * 128
    assert kv == 394_264_576
    assert m.tp_extra_weight_bytes(8) == kv + 7 * router == 1_084_227_584
    assert m.tp_extra_weight_bytes(4) == 3 * router
