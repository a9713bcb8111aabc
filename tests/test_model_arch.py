"""ModelSpec's description of today's architectures: layer kinds, parameter counts by hand,
KV per layer kind (sliding windows, latent attention, linear-state layers), precision per part."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from fleetsim.config.hf import read_hf_config_named
from fleetsim.device import catalog
from fleetsim.device.modelspec import DTYPE_BYTES, ModelSpec, model_from_catalog

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"


def _repo(hf_id: str) -> ModelSpec:
    arch, name = read_hf_config_named(MODELS / hf_id / "config.json")
    return ModelSpec(name=name, **arch)


def test_gemma3_32k_sequence_holds_full_kv_on_one_layer_in_six():
    g = _repo("google/gemma-3-27b-it")
    held = g.kv_tokens_by_layer(32768)
    assert len(held) == 62
    # layers 6, 12, ..., 60 (1-based) are global: 10 of 62; the other 52 hold the 1,024 window
    assert [i for i, t in enumerate(held) if t == 32768] == list(range(5, 62, 6))
    assert held.count(1024) == 52 and held.count(32768) == 10
    per_layer_token = 2 * 16 * 128 * 2  # K and V, 16 KV heads of 128, bf16
    assert g.kv_bytes(32768) == per_layer_token * (10 * 32768 + 52 * 1024)
    # below the window every layer holds everything
    assert g.kv_bytes(1000) == per_layer_token * 62 * 1000 == g.kv_bytes_per_token * 1000
    assert g.kv_bytes_per_token_global == per_layer_token * 10


def test_deepseek_v3_caches_its_latent_and_rotary_key():
    m = _repo("deepseek-ai/DeepSeek-V3.1")
    assert m.is_mla and m.kv_bytes_per_element == 2  # fp8 weights keep a bf16 cache
    assert m.kv_bytes_per_token == (512 + 64) * 61 * 2
    assert m.kv_bytes(10_000) == 10_000 * (512 + 64) * 61 * 2
    # every TP rank holds the whole latent (vLLM's MLA)
    assert m.kv_bytes_per_token_tp(8) == 8 * m.kv_bytes_per_token
    assert m.tp_problem(8) is None  # no KV-head rule for MLA
    # absorbed attention: 2 * heads * (2 * kv_lora_rank + rope) FLOPs per pair and layer
    assert m.attn_flops_per_pair == 2.0 * 128 * (2 * 512 + 64) * 61
    assert (m.first_k_dense, m.n_moe_layers, m.n_dense_layers) == (3, 58, 3)


def test_gpt_oss_holds_a_full_and_a_windowed_kv_on_alternate_layers():
    m = _repo("openai/gpt-oss-120b")
    kinds = [mixer for mixer, _ in m.layer_kinds()]
    assert kinds == ["sliding", "full"] * 18
    held = m.kv_tokens_by_layer(4096)
    assert held == (128, 4096) * 18
    per = 2 * 8 * 64 * 2
    assert m.kv_bytes(4096) == per * 18 * (4096 + 128)
    assert m.attention_sinks and m.attn_params_per_layer == (
        2880 * 64 * 64 * 2 + 2 * 2880 * 8 * 64 + 64  # q, o; k, v; one sink logit per head
    )


def test_nemotron_h_holds_kv_on_its_attention_layers_and_a_constant_state():
    m = _repo("nvidia/NVIDIA-Nemotron-Nano-9B-v2")
    assert (m.n_attn_layers, m.n_linear_layers, m.n_dense_layers, m.n_moe_layers) == (4, 27, 25, 0)
    d_inner, conv_dim = 128 * 80, 128 * 80 + 2 * 8 * 128
    state = 27 * (d_inner * 128 + 3 * conv_dim) * 2  # SSM state + 3 conv taps, bf16
    assert m.state_bytes_per_seq == state
    assert m.kv_bytes(0) == state
    assert m.kv_bytes(1000) - m.kv_bytes(0) == 1000 * 4 * 2 * 8 * 128 * 2
    assert m.tp_problem(3) is not None and m.tp_problem(8) is None  # 40 heads, 8 KV, 128 SSM
    # Mamba-2 mixer: in_proj (z, x, B, C, dt), conv taps, out_proj
    assert m.linear_state_params_per_layer == 4480 * (d_inner + conv_dim + 128) + conv_dim * 4 + (
        d_inner * 4480
    )


@pytest.mark.parametrize(
    ("n", "k", "step"),
    [(n, k, s) for n, k, s in itertools.product([1, 7, 48, 61], [0, 1, 3], [1, 2, 3]) if k <= n],
)
def test_moe_layer_counts_follow_the_layer_rule(n, k, step):
    m = ModelSpec("x", n, 64, 4, 4, 256, 100, n_experts=8, n_active_experts=2,
                  first_k_dense=k, moe_layer_step=step)  # fmt: skip
    ffn = [f for _, f in m.layer_kinds()]
    assert ffn.count("moe") == m.n_moe_layers and ffn.count("dense") == m.n_dense_layers
    assert all(f == "dense" for f in ffn[:k])
    # closed-form counts against a layer-by-layer sum
    by_layer = sum(
        m.attn_params_per_layer + (m.moe_layer_params if f == "moe" else m.dense_mlp_params)
        for f in ffn
    )
    assert m.total_params == by_layer + 2 * 100 * 64


def test_llama4_maverick_interleaves_moe_and_dense_layers_with_a_shared_expert():
    m = _repo("meta-llama/Llama-4-Maverick-17B-128E-Instruct")
    ffn = [f for _, f in m.layer_kinds()]
    assert ffn == ["dense", "moe"] * 24
    assert (m.d_ff, m.d_ff_expert, m.d_ff_shared, m.n_shared_experts) == (16384, 8192, 8192, 1)
    # the chunked attention layers hold at most 8,192 tokens; every 4th layer is global
    assert m.kv_tokens_by_layer(100_000)[:4] == (8192, 8192, 8192, 100_000)


def test_mixed_precision_weight_bytes_by_hand():
    m = _repo("openai/gpt-oss-120b")
    experts = 36 * 128 * 3 * 2880 * 2880
    assert m.expert_params_total == experts
    rest = m.total_params - experts
    assert m.weight_bytes == rest * 2 + experts * 4.25 / 8
    fp8 = _repo("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8")
    emb = 2 * 151936 * 4096
    assert (fp8.dtype, fp8.embed_dtype) == ("fp8", "bf16")
    # the routers unquantized (vLLM's gate: ReplicatedLinear(..., quant_config=None)), 16-bit:
    # 94 layers x 4096 x 128 one byte more each
    router = 94 * 4096 * 128
    assert fp8.weight_bytes == (fp8.total_params - emb - router) * 1 + (emb + router) * 2
    assert DTYPE_BYTES["mxfp4"] == 0.53125


def test_derived_widths_follow_their_sources():
    m = ModelSpec("x", 2, 64, 4, 4, 128, 10)
    assert (m.head_dim, m.d_ff_expert, m.d_ff_shared) == (16, 128, 128)
    r = dataclasses.replace(m, d_model=128, d_ff=512)
    assert (r.head_dim, r.d_ff_expert, r.d_ff_shared) == (32, 512, 512)
    e = m.evolve(head_dim=64, d_ff=256)
    assert (e.head_dim, e.d_ff_expert) == (64, 256)
    assert e.evolve(d_model=256).head_dim == 64  # given, so it stays
    assert ModelSpec("x", 2, 64, 4, 4, 128, 10, head_dim=16) == m


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hybrid_pattern": "M*"}, "hybrid_pattern"),  # 2 characters for 3 layers
        ({"hybrid_pattern": "M*x"}, "hybrid_pattern"),
        ({"hybrid_pattern": "M*-"}, "hybrid_pattern"),  # Mamba without ssm sizes
        # linear-state layers only (the KV pool is counted in attention pages)
        (
            {"hybrid_pattern": "M-M", "ssm_state_size": 8, "ssm_n_heads": 4, "ssm_head_dim": 16},
            "hybrid_pattern",
        ),
        ({"n_active_experts": 9, "n_experts": 8}, "n_active_experts"),
        ({"first_k_dense": 4}, "first_k_dense"),
        ({"expert_dtype": "fp6"}, "expert_dtype"),
        ({"kv_lora_rank": 512}, "kv_lora_rank"),
    ],
)
def test_problems_name_the_field(change, field):
    m = ModelSpec("x", 3, 64, 4, 4, 128, 10, **change)
    assert field in [p[0] for p in m.problems()]


CLASSIC = [n for n, e in catalog.models().items() if "hf_id" not in e]
TODAY = [n for n, e in catalog.models().items() if "hf_id" in e]


@pytest.mark.parametrize("name", CLASSIC)
def test_catalog_models_have_one_kind_of_layer(name):
    m = model_from_catalog(name)
    assert m.n_attn_layers == m.n_global_attn_layers == m.n_layers
    assert m.n_linear_layers == 0 and m.state_bytes_per_seq == 0
    assert m.kv_bytes(1234) == 1234 * m.kv_bytes_per_token
    assert m.n_moe_layers == (m.n_layers if m.n_experts > 1 else 0)


@pytest.mark.parametrize("name", TODAY)
def test_todays_catalog_entries_are_their_config_files(name):
    """Each catalog entry of a current model is what config/hf.py reads from its config.json
    in data/models, and its counts are within 2% of the card (total 0.5%, test_model.py)."""
    entry = catalog.model(name)
    spec = model_from_catalog(name)
    from_file = _repo(entry["hf_id"])
    assert spec == dataclasses.replace(from_file, name=name, dtype="bf16")
    if "published_active_params" in entry:
        assert spec.active_params == pytest.approx(entry["published_active_params"], rel=0.02)


def test_kv_bytes_per_token_of_a_mix_of_sequences():
    """Two sequences held one iteration each, of 1,000 and 32,768 tokens (means per request:
    16,884 token-iterations, 1,012 of them within gemma-3's 1,024-token window): the 10 global
    layers hold every token, the 52 window layers at most 1,024 of each."""
    g = _repo("google/gemma-3-27b-it")
    per = 2 * 16 * 128 * 2
    mixed = g.kv_bytes_per_token_held_tp(1, (1000 + 32768) / 2, (1000 + 1024) / 2, 1.0)
    assert mixed == pytest.approx(per * (62 * 1000 + 10 * 32768 + 52 * 1024) / 33768, rel=1e-12)
    # tp 32 exceeds the 16 KV heads: each is held twice
    assert g.kv_bytes_per_token_held_tp(32, 16_884, 1012, 1.0) == 2 * mixed
    llama = model_from_catalog("llama-3.1-70b")
    assert llama.kv_bytes_per_token_held_tp(4, 35_002, 5, 1.0) == llama.kv_bytes_per_token_tp(4)
    nem = _repo("nvidia/NVIDIA-Nemotron-Nano-9B-v2")  # the state is split over GPUs, not held twice
    assert nem.kv_bytes_tp(100, 2) == nem.kv_bytes(100)
