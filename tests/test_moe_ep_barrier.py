"""The expert-parallel barrier: under TP x EP each rank runs its own experts' rows and the ranks'
partial outputs are all-reduced, so the mean rank waits at each MoE layer's all-reduce for the
one whose batch touched the most experts (fleetsim.device.moe.ep_barrier_wait_s). The wait is
moved from the grouped GEMMs' time to the communication time (PowerSpec.comm_w); the step's
time does not change."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetsim.device import catalog
from fleetsim.device import moe as moe_mod
from fleetsim.device.latency import LatencyModel
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.moe import ep_barrier_wait_s, ep_touched_balance
from fleetsim.device.profile import catalog_profile


def _model() -> ModelSpec:
    # a Qwen3-235B-A22B-sized MoE layer (128 experts, top-8, 1,536 columns), 4 layers
    return ModelSpec(
        name="moe128",
        n_layers=4,
        d_model=4096,
        n_heads=64,
        n_kv_heads=4,
        head_dim=128,
        d_ff=12288,
        d_ff_expert=1536,
        vocab_size=32000,
        n_experts=128,
        n_active_experts=8,
    )


def test_balance_by_hand():
    """4 experts on 2 ranks, one token routed top-1: each expert is touched with probability
    q = 1/4, a rank's count is Binomial(2, 1/4) (pmf 9/16, 6/16, 1/16), its mean 1/2; the larger
    of two such counts has E = (1 - (9/16)^2) + (1 - (15/16)^2) = 0.8046875."""
    e_max = (1 - (9 / 16) ** 2) + (1 - (15 / 16) ** 2)
    assert ep_touched_balance(4, 1, 1.0, 2) == pytest.approx(0.5 / e_max, rel=1e-12)
    # no expert parallelism, one expert, no tokens: no wait
    assert ep_touched_balance(128, 8, 8.0, 1) == 1.0
    assert ep_touched_balance(1, 1, 8.0, 8) == 1.0
    assert ep_touched_balance(128, 8, 0.0, 8) == 1.0
    assert ep_barrier_wait_s(1e-3, 4, 1, 1.0, 2) == pytest.approx(1e-3 * (1 - 0.5 / e_max))


def test_balance_against_routing_monte_carlo():
    """Top-8 of 128 experts without replacement, 8 tokens, EP8 (16 experts a rank): the mean
    rank's distinct experts over the busiest rank's, sampled, within 0.01 of the closed form
    (which treats the ranks' counts as independent binomials): about 0.70; EP2 about 0.92."""
    rng = np.random.default_rng(0)
    for ep, want in ((8, 0.697), (2, 0.921)):
        means, maxes = [], []
        for _ in range(1500):
            picks = np.argsort(rng.random((8, 128)), axis=1)[:, :8]
            hit = np.zeros(128, bool)
            hit[picks.ravel()] = True
            per = hit.reshape(ep, 128 // ep).sum(1)
            means.append(per.mean())
            maxes.append(per.max())
        mc = float(np.mean(means) / np.mean(maxes))
        assert ep_touched_balance(128, 8, 8.0, ep) == pytest.approx(want, abs=0.002)
        assert mc == pytest.approx(ep_touched_balance(128, 8, 8.0, ep), abs=0.01)
    # every rank touches all its experts at large batches: no wait
    assert ep_touched_balance(128, 8, 256.0, 8) == pytest.approx(1.0, abs=1e-6)


def test_wait_moves_gemm_time_to_communication():
    """H100, TP8 x EP8, 8 decoding sequences: the breakdown's moe_ep_wait is (1 - balance) of
    the grouped GEMMs' touched-expert part per layer, moved out of moe_grouped_gemm; comm_s
    grows by exactly it; the step's time is the one without the move (wait forced to 0)."""
    m = _model()
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    lat = LatencyModel(m, p, tp=8, dp=1, expert_parallel=True)
    bd = lat.breakdown(0, 0.0, 0, 8, 8 * 700.0)
    t = lat.iteration(0, 0.0, 0, 8, 8 * 700.0)[0]
    assert sum(bd.values()) == pytest.approx(t, rel=1e-12)
    wait = bd["moe_ep_wait"]
    assert wait > 0.0
    comm_with = lat.comm_s(8, 8)
    assert comm_with == pytest.approx(bd["allreduce"] + wait, rel=1e-12)

    orig = moe_mod.ep_barrier_wait_s
    try:
        moe_mod.ep_barrier_wait_s = lambda *a, **k: 0.0  # type: ignore[assignment]
        lat0 = LatencyModel(m, p, tp=8, dp=1, expert_parallel=True)
        bd0 = lat0.breakdown(0, 0.0, 0, 8, 8 * 700.0)
        t0 = lat0.iteration(0, 0.0, 0, 8, 8 * 700.0)[0]
        comm0 = lat0.comm_s(8, 8)
    finally:
        moe_mod.ep_barrier_wait_s = orig
    assert t == pytest.approx(t0, rel=1e-12)
    assert comm_with - comm0 == pytest.approx(wait, rel=1e-9)
    assert bd0["moe_grouped_gemm"] - bd["moe_grouped_gemm"] == pytest.approx(wait, rel=1e-9)
    # the wait is (1 - balance) of the GEMMs' part beyond their launch floors, per MoE layer
    share = 1.0 - ep_touched_balance(128, 8, 8.0, 8)
    assert 0.25 < share < 0.35
    assert wait < share * bd0["moe_grouped_gemm"]
    # experts split across the GPUs (no expert parallelism): every GPU works on every expert
    lat_tp = LatencyModel(m, p, tp=8, dp=1, expert_parallel=False)
    assert lat_tp.breakdown(0, 0.0, 0, 8, 8 * 700.0).get("moe_ep_wait", 0.0) == 0.0
    assert math.isfinite(wait)
