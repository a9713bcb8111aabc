"""Every data-parallel engine reads its own copy of the non-expert weights each iteration.

Under ``--data-parallel-size`` each DP rank is its own engine core that runs the whole model
every step, in lockstep with the others (an idle rank runs a dummy batch:
``DPEngineCoreProc.run_busy_loop`` / ``execute_dummy_batch``, ``vllm/v1/engine/core.py``);
attention, dense and shared-expert layers and the LM head are replicated on every rank, the
routed experts are held once across the ranks. So a DP replica's iteration reads the routed
experts its tokens touch once, and everything else ``dp`` times (``LatencyModel._w_dp``): the
bytes the power model's ``memory_w`` term prices."""

from __future__ import annotations

import pytest
from conftest import moe16

from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.profile import catalog_profile


def _moe() -> ModelSpec:
    return moe16()


def _dense() -> ModelSpec:
    return ModelSpec(
        name="dense8",
        n_layers=8,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        d_ff=11008,
        vocab_size=32000,
    )


def _lat(model: ModelSpec, dp: int) -> LatencyModel:
    p = catalog_profile("b200", catalog.gpu("b200"))
    return LatencyModel(model, p, tp=1, dp=dp, expert_parallel=dp > 1 and model.n_experts > 1)


def _non_expert_bytes(m: ModelSpec) -> float:
    """Attention and router weights of every layer and the LM head, by hand (one dtype, no
    shared experts: ``weight_bytes_read``'s simple form without the experts)."""
    return (
        m.n_layers * (m.attn_params_per_layer + m.router_params_per_layer) + m.lm_head_params
    ) * m.bytes_per_param


def test_dp_replica_reads_each_engines_non_expert_weights():
    """dp 4: the experts the 64 tokens touch once, the non-expert weights 4 times (hand count);
    dp 1: the model's own weight_bytes_read."""
    m = _moe()
    ne = _non_expert_bytes(m)
    experts = m.weight_bytes_read(64.0) - ne
    assert experts > 0 and ne > 0
    assert _lat(m, 4).weight_bytes_per_iteration(64) == pytest.approx(4 * ne + experts, rel=1e-12)
    assert _lat(m, 1).weight_bytes_per_iteration(64) == m.weight_bytes_read(64.0)


def test_dense_dp_replica_reads_the_whole_model_per_engine():
    m = _dense()
    lat = _lat(m, 4)
    assert lat.dense_weight_bytes == pytest.approx(4 * m.weight_bytes_read(1.0), rel=1e-12)
    assert _lat(m, 1).dense_weight_bytes == m.weight_bytes_read(1.0)


@pytest.mark.parametrize("dp", [2, 8])
def test_every_path_counts_the_same_bytes_and_the_kv_part_is_unchanged(dp: int):
    """The decode step, the general iteration and the run coefficients count the same bytes
    (the engine's two modes agree), and what is beyond the weights (KV cache: the power
    model's kv_w term) is the same as on one engine: only the weight stream grows."""
    m = _moe()
    lat, one = _lat(m, dp), _lat(m, 1)
    n, ctx = 32, 32 * 900.0
    b_it = lat.iteration(0, 0.0, 0, n, ctx)[2]
    b_dec = lat.decode_step(n, ctx)[2]
    c = lat.run_coeffs(n)
    assert b_it == b_dec == pytest.approx(c.ba + c.bb * ctx, rel=1e-12)
    extra = (dp - 1) * _non_expert_bytes(m)
    assert b_it - one.iteration(0, 0.0, 0, n, ctx)[2] == pytest.approx(extra, rel=1e-9)
    kv = b_it - lat.weight_bytes_per_iteration(n)
    kv_one = one.iteration(0, 0.0, 0, n, ctx)[2] - one.weight_bytes_per_iteration(n)
    assert kv == pytest.approx(kv_one, rel=1e-12)
    # a prompt step: the same extra (the engines' copies do not depend on the tokens)
    p_dp = lat.iteration(1500, 1500.0 * 750, 1, n, ctx)[2]
    p_one = one.iteration(1500, 1500.0 * 750, 1, n, ctx)[2]
    assert p_dp - p_one == pytest.approx(extra, rel=1e-9)
