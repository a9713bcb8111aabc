"""The KV budget of the ML.ENERGY harness's KV-limited rows counted by hand as vLLM 0.11 sizes it
(issue 21 item 5), against the simulator's (``config/resolved.py`` ``kv_budget``).

vLLM's profiling run (vllm/v1/worker/gpu_worker.py ``Worker.determine_available_memory``): the
KV cache is ``requested_memory - (weights + peak activations + non-torch memory)`` with
``requested_memory = total_memory x gpu_memory_utilization``, ``total_memory`` CUDA's total
(``torch.cuda.mem_get_info()[1]``: 79.19 GiB on an H100 80GB HBM3, not nvidia-smi's 81,559 MiB),
then whole blocks (vllm/v1/core/kv_cache_utils.py ``get_num_blocks``). The benchmark's flags:
``max-num-batched-tokens 8192``, gpu-memory-utilization unset (0.9), and for the Mamba-2
hybrids ``mamba-ssm-cache-dtype float32`` (ml-energy/benchmark ``configs/vllm/<task>/<model>/
<GPU>/monolithic.config.yaml``). Numbers from the models' config.json (data/models/)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fleetsim.api import load
from fleetsim.calibrate import mlenergy as M
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import KvBudget
from fleetsim.device.modelspec import ModelSpec

GIB = 2**30
#: CUDA's total on an H100 80GB HBM3 (vLLM: "Free memory on device (78.66/79.19 GiB)")
H100_CUDA_TOTAL_BYTES = round(79.19 * GIB)
UTIL = 0.9  # vLLM's default gpu_memory_utilization (the benchmark does not set it)
TOKENS = 8192  # the benchmark's max-num-batched-tokens: the profiling run's forward pass
BLOCK = 16  # vLLM's block size on CUDA


def _row(model_id: str, task: str, max_num_seqs: int) -> tuple[M.Config, ModelSpec, KvBudget]:
    (c,) = [
        c
        for c in M.read_configs()
        if c.model_id == model_id
        and c.task == task
        and c.gpu_model == "H100"
        and c.num_gpus == 1
        and c.max_num_seqs == max_num_seqs
    ]
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.csv"
        trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,100\n")
        rs = resolve(load(M.scenario_dict(c, str(trace), 1)), "")
    assert rs.kv is not None  # (kv_budget as resolved: the one-request trace is gone)
    return c, rs.model, rs.kv


def test_qwen3_32b_one_h100_budget_by_hand():
    """Qwen3-32B chat on one H100 at 32 sequences (measured batch 29.3): CUDA's total x 0.9,
    less the bf16 weights and the forward pass's activations at 8,192 tokens, in 16-token
    blocks of 64 layers x 8 KV heads x 128 x K and V x 2 bytes."""
    _, _, kb = _row("Qwen/Qwen3-32B", "lm-arena-chat", 32)
    V, d, L, H, K, hd, ff = 151_936, 5_120, 64, 64, 8, 128, 25_600  # config.json
    params = 2 * V * d + L * (d * H * hd + 2 * d * K * hd + H * hd * d + 3 * d * ff)
    assert params == 32_761_446_400  # embeddings and LM head untied; norms left out (0.002 %)
    weights = 2.0 * params
    # the larger of the forward pass (gate, up, product: 3 d_ff, and four d_model buffers per
    # token) and the sampler (fp32 logits of 32 sequences): the forward pass
    act = max(2.0 * TOKENS * (3 * ff + 4 * d), 2.0 * TOKENS * d + 4.0 * 32 * V)
    assert act == 2.0 * 8192 * 97_280
    requested = H100_CUDA_TOTAL_BYTES * UTIL
    kv = requested - weights - act
    per_block = BLOCK * L * K * hd * 2 * 2  # 4 MiB
    assert kb.memory_bytes == H100_CUDA_TOTAL_BYTES
    assert kb.usable_bytes == requested
    assert kb.weight_bytes == weights
    assert kb.activation_bytes == act
    assert kb.blocks == int(kv // per_block) == 2243
    assert kb.tokens == 2243 * BLOCK  # 35,888 tokens: 1,225 per sequence at the measured 29.3
    # nvidia-smi's total (81,559 MiB), what the catalog held before, gave 2,348 blocks: 105
    # more, 4.7 % of the cache
    assert int((81_559 * 2**20 * UTIL - weights - act) // per_block) - kb.blocks == 105


def test_nemotron_12b_one_h100_state_pages_by_hand():
    """NVIDIA-Nemotron-Nano-12B-v2 chat on one H100 at 256 sequences (measured batch 241.2):
    the SSM state in fp32 (the benchmark's ``mamba-ssm-cache-dtype float32``), the convolution
    state in bf16; vLLM raises the attention block until one attention page holds a Mamba
    state (``HybridAttentionMambaModelConfig.verify_and_update_config``, vllm/model_executor/
    models/config.py: 16 x ceil(state / (16 x 4,096)) = 1,312 tokens), pads the state to that
    page, splits the 28 Mamba layers into groups of the 6 attention layers' count (5 groups,
    the last padded: ``_get_kv_cache_groups_uniform_page_size``) and gives every request one
    block per Mamba group. The simulator's state, in 16-token layer-blocks, is the same bytes."""
    _, m, kb = _row("nvidia/NVIDIA-Nemotron-Nano-12B-v2", "lm-arena-chat", 256)
    heads, head_dim, d_state, groups, kernel, inner = 128, 80, 128, 8, 4, 10_240  # config.json
    ssm = heads * head_dim * d_state * 4  # fp32
    conv = (kernel - 1) * (inner + 2 * groups * d_state) * 2  # bf16
    state_layer = ssm + conv
    assert state_layer == 5_316_608
    assert m.ssm_state_dtype == "fp32"
    assert m.state_bytes_per_seq == 28 * state_layer
    attn_token_layer = 2 * 8 * 128 * 2  # K and V, 8 heads of 128, bf16: one attention layer
    vllm_block = 16 * -(-state_layer // (16 * attn_token_layer))
    assert vllm_block == 1_312
    page = vllm_block * attn_token_layer  # 5,373,952 bytes, the unified page
    mamba_groups = -(-28 // 6)
    per_request_state = mamba_groups * 6 * page
    assert per_request_state == 161_218_560
    layer_block = BLOCK * attn_token_layer  # the simulator's unit: 65,536 bytes
    assert kb.state_blocks == 2_460
    assert kb.state_blocks * layer_block == per_request_state
    # vLLM's blocks of the pool (6 tensors of num_blocks pages: get_kv_cache_config's general
    # case) are the simulator's layer-blocks in groups of 6 x 82
    assert kb.layer_blocks == int(kb.kv_bytes // layer_block)
    assert kb.layer_blocks // (6 * 82) == int(kb.kv_bytes // (6 * page)) == 1_568
    # the bf16 cache the harness gave before: 42 layer-blocks a layer (41.1 rounded up), 1,260
    # per request, about half the state the server held for each sequence
    bf16 = (heads * head_dim * d_state + (kernel - 1) * (inner + 2 * groups * d_state)) * 2
    assert -(-bf16 // layer_block) == 42
    assert m.evolve(ssm_state_dtype=None).state_layer_blocks(BLOCK, 1) == 30 * 42


def test_ssm_state_dtype_only_the_temporal_state():
    """``ssm_state_dtype`` widens the SSM state alone; ``state_dtype`` both (vLLM's
    ``MambaStateDtypeCalculator._mamba_state_dtype``: conv at ``mamba_cache_dtype``, temporal at
    ``mamba_ssm_cache_dtype`` unless "auto")."""
    _, m, _ = _row("nvidia/NVIDIA-Nemotron-Nano-12B-v2", "lm-arena-chat", 256)
    ssm, conv = 128 * 80 * 128, 3 * (10_240 + 2 * 8 * 128)
    assert m.evolve(ssm_state_dtype=None).state_bytes_per_seq == 28 * (ssm + conv) * 2
    assert m.state_bytes_per_seq == 28 * (ssm * 4 + conv * 2)
    assert m.evolve(state_dtype="fp32", ssm_state_dtype=None).state_bytes_per_seq == (
        28 * (ssm + conv) * 4
    )


def test_implied_prompt_of_a_hybrid_counts_its_state():
    """The harness's implied prompt (``implied_prompts``) of the Nemotron-12B chat row: each of
    the 241.2 held sequences holds its 2,460 state layer-blocks beside its tokens' blocks in the
    6 attention layers; what is left, in tokens, less the length-biased half output. Counting the
    attention layers' tokens alone (as before) gave 8,145 tokens."""
    c, _, kb = _row("nvidia/NVIDIA-Nemotron-Nano-12B-v2", "lm-arena-chat", 256)
    ((row, prompt),) = M.implied_prompts([c])
    assert row is c
    tokens_per_seq = (kb.layer_blocks / c.avg_batch_size - kb.state_blocks) / 6 * BLOCK
    assert prompt == tokens_per_seq - M.length_biased_half(c)
    assert 1_400 < prompt < 1_600  # 1,511 (the attention tokens alone: 8,000 and more)
    # (the attention layers' tokens alone: the budget's blocks over its 6 attention layers)
    assert kb.layer_blocks / 6 * BLOCK / c.avg_batch_size - M.length_biased_half(c) > 8_000
