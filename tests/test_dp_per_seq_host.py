"""The serving stack's per-sequence time is each data-parallel engine's own.

Under ``--data-parallel-size`` every DP rank is its own engine-core process
(``DPEngineCoreProc``, vllm/v1/engine/core.py, one per rank launched by
``CoreEngineProcManager``, vllm/v1/engine/utils.py) with its own scheduler, input preparation
and sampler (a TP1 rank's worker runs inline, ``UniProcExecutor``); the ranks meet once per
step at the token-count all-reduce (``coordinate_batch_across_dp``,
vllm/v1/worker/dp_utils.py) and at the MoE collectives. So the per-sequence time of a step
(``RooflineProfile.per_seq_s``: sampling and per-request host work) runs in parallel on the
ranks, each over its own ``ceil(n / dp)`` sequences, as the LM head's rows already were;
before branch h47 it was charged over all ``n`` of the replica (docs/accuracy-log.md,
"The host time of data-parallel engines")."""

from __future__ import annotations

import math

import pytest
from conftest import moe16

from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack


def _lat(dp: int) -> LatencyModel:
    p = apply_stack(catalog_profile("b200", catalog.gpu("b200")), "vllm-v1", "b200", 256)
    return LatencyModel(moe16(), p, tp=1, dp=dp, expert_parallel=dp > 1)


def test_the_per_sequence_time_is_the_fullest_engines():
    """The B200's fitted 37.1 us per sequence (catalog/stacks.toml): 256 decodes on 8 engines
    charge 32 x 37.1 us = 1.19 ms (not 256 x = 9.49 ms); 250 on 8 charge ceil(250 / 8) = 32 of
    them; one engine all 256. The breakdown names the same part."""
    per_seq = catalog.stacks()["vllm-v1"]["b200"]["per_seq_s"]
    assert per_seq == pytest.approx(37.069e-6, rel=1e-4)
    for dp, n, k in ((8, 256, 32), (8, 250, 32), (4, 250, 63), (1, 256, 256)):
        b = _lat(dp).breakdown(0, 0.0, 0, n, 1000.0 * n)
        assert b["per_sequence"] == pytest.approx(k * per_seq, rel=1e-12), (dp, n)
        assert k == (n if dp == 1 else math.ceil(n / dp))


def test_a_decode_step_is_faster_by_the_other_engines_share():
    """With the stack's per-sequence time set to 0 the DP8 step loses exactly 32 x 37.1 us at
    256 decodes (the fullest engine's share): the term is the step's only per-sequence host
    time, charged once per step, not once per rank."""
    lat = _lat(8)
    zero = _lat(8)
    zero._per_seq = 0.0  # (the same model without the stack's per-sequence time)
    per_seq = lat.profile.per_seq_s
    n, ctx = 256, 256 * 1500.0
    assert lat.decode_time(n, 1500) - zero.decode_time(n, 1500) == pytest.approx(
        32 * per_seq, rel=1e-9
    )
    t, _, _ = lat.iteration(0, 0.0, 0, n, ctx)
    t0, _, _ = zero.iteration(0, 0.0, 0, n, ctx)
    assert t - t0 == pytest.approx(32 * per_seq, rel=1e-9)
