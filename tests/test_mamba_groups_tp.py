"""Mamba-2's B and C groups under tensor parallelism, as vLLM 0.11's ``MambaMixer2`` shards
them (vllm/model_executor/layers/mamba/mamba_mixer2.py): the groups are split over the ranks
when ``tp`` divides ``n_groups``; a single group is replicated on every rank (``n_groups +
extra_groups_for_head_shards(n_groups, tp)`` = ``tp`` groups in the in_proj and conv widths,
and in the conv state, mamba_utils.py ``mamba2_state_shape``); any other ``n_groups`` that
``tp`` does not divide is refused (an assert). Hand counts on Nemotron-Nano-9B-v2's layout
(d_model 4,480; 128 Mamba heads of 80; state size N = 128; conv kernel 4; 27 Mamba layers)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from fleetsim.device.modelspec import DTYPE_BYTES, ModelSpec, model_from_catalog


def _nemotron(groups: int, **over) -> ModelSpec:
    spec = model_from_catalog("nemotron-nano-9b-v2")
    fields = {
        k: v for k, v in asdict(spec).items() if k not in ("name", "derived") and v is not None
    }
    return ModelSpec(name="nemotron-g", **{**fields, "ssm_n_groups": groups, **over})


def test_the_layout_by_hand():
    m = _nemotron(8)
    assert m.hybrid_pattern.count("M") == m.n_linear_layers == 27
    assert (m.d_model, m.ssm_d_inner, m.ssm_state_size, m.ssm_conv_kernel) == (4480, 10_240, 128, 4)


def test_split_groups_hold_one_copy():
    """8 groups over 2, 4 or 8 ranks: 4, 2 or 1 each; the ranks together hold the model's
    state and weights once (no change from one GPU)."""
    m = _nemotron(8)
    for tp in (1, 2, 4, 8):
        assert m.ssm_groups_tp(tp) == 8
        assert m.state_bytes_per_seq_tp(tp) == m.state_bytes_per_seq
        assert m.linear_state_params_per_layer_tp(tp) == m.linear_state_params_per_layer
    # (8 KV heads: up to TP8 no K and V is copied either)
    assert m.weight_bytes_tp(8) == m.weight_bytes


def test_a_single_group_is_replicated_on_every_rank():
    """One group at TP2: each rank's conv holds d_inner / 2 + 2 N channels (vLLM's conv_dim
    of d_inner + 2 x 2 x N, split two ways), so the conv state (3 inputs of the window, bf16)
    summed over the ranks is 3 x (10,240 + 4 x 128) x 2 B per layer, 3 x 256 x 2 = 1,536 B more
    than one GPU's; the SSM state (128 x 80 x 128 per layer) is split, unchanged. The B and C
    columns of the input projection (d_model wide) and of the convolution (4 taps) are copied:
    2 x 128 x (4,480 + 4) = 1,147,904 parameters per layer, 2.30 MB in bf16, 62.0 MB over the
    27 layers (fleetsim split them: 0)."""
    m = _nemotron(1)
    b = DTYPE_BYTES[m.state_dtype or m.kv_dtype_resolved]
    assert b == 2.0
    ssm = 10_240 * 128 * DTYPE_BYTES[m.ssm_state_dtype or "bf16"]
    one = 27 * (ssm + 3 * (10_240 + 2 * 128) * b)
    assert m.state_bytes_per_seq == m.state_bytes_per_seq_tp(1) == one
    assert m.ssm_groups_tp(2) == 2 and m.ssm_groups_tp(4) == 4
    assert m.state_bytes_per_seq_tp(2) == 27 * (ssm + 3 * (10_240 + 4 * 128) * b)
    assert m.state_bytes_per_seq_tp(2) - one == 27 * 1536
    extra = 2 * 128 * (4480 + 4)
    assert extra == 1_147_904
    assert m.linear_state_params_per_layer_tp(2) - m.linear_state_params_per_layer == extra
    assert m.weight_bytes_tp(2) - m.weight_bytes == 27 * extra * 2.0
    assert m.weight_bytes_tp(4) - m.weight_bytes == 27 * 3 * extra * 2.0
    # every rank multiplies its tokens by its copy: 2 FLOPs per copied parameter
    assert m.tp_extra_flops_per_token(2) == 2.0 * 27 * extra


def test_groups_the_ranks_do_not_divide_are_refused():
    """vLLM asserts ``n_groups % tp == 0 or n_groups == 1``: 8 groups over 16 ranks are refused
    (the heads allow it here: 64 query heads, 8 KV heads copied, 128 Mamba heads); a single
    group is not."""
    m = _nemotron(8, n_heads=64)
    assert m.tp_problem(8) is None
    why = m.tp_problem(16)
    assert why is not None and "8 Mamba groups" in why
    assert "16" not in m.tp_fix(16)
    assert _nemotron(1, n_heads=64).tp_problem(16) is None


def test_a_resolved_replica_holds_the_copies():
    """A TP2 replica of the single-group layout: its weights are the model's plus the copies
    (62.0 MB), and each sequence's state is counted in layer-blocks of 16 tokens of one of the 4
    attention layers (16 x 16,384 B over 4 = 65,536 B, K and V of 8 heads summed over the
    ranks): per Mamba layer 2,685,952 B with the copied conv columns (2,684,416 B split), 41
    blocks either way (40.98 and 40.96: the page's padding absorbs the copies here), the 27
    layers padded to groups of 4: 28 x 41 = 1,148 blocks per sequence."""
    from conftest import resolved

    d = {
        "simulation": {"hours": 1},
        "model": {"name": "nemotron-nano-9b-v2", "ssm_n_groups": 1},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"tensor_parallel": 2},
        "traffic": {"requests_per_day": 1000},
    }
    rs = resolved(d)
    m = rs.model
    assert m.ssm_n_groups == 1
    assert rs.kv.weight_bytes == pytest.approx(m.weight_bytes + 27 * 1_147_904 * 2.0, rel=1e-12)
    assert 16 * m.kv_bytes_per_token_tp(2) / 4 == 65_536
    assert m.state_bytes_per_seq_tp(2) / 27 == 2_685_952 == 2_684_416 + 1536
    assert rs.kv.state_blocks == m.state_layer_blocks(16, 2) == 28 * 41 == 1148
