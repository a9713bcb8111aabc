"""The analytic model: parameter counts against published ones, and closed-form run sums."""

from __future__ import annotations

import numpy as np
import pytest

from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.device import catalog
from fleetsim.device.latency import (
    LatencyModel,
    LinearProfile,
    RunCoeffs,
    run_sums,
    run_time,
    step_time,
    steps_to_reach,
)
from fleetsim.device.modelspec import model_from_catalog


@pytest.mark.parametrize("name", list(catalog.models()))
def test_parameter_counts_match_published(name):
    m = model_from_catalog(name)
    assert m.total_params == pytest.approx(catalog.models()[name]["published_params"], rel=0.005)


def test_mixtral_active_parameters():
    m = model_from_catalog("mixtral-8x7b")
    # 12.9B active per token (Mixtral paper), embeddings excluded here, LM head included
    assert (m.active_params_per_token + m.lm_head_params) == pytest.approx(12.9e9, rel=0.02)


def _lat(model="llama-3.1-70b", gpu="h100-sxm", tp=4):
    rs = resolve(
        scenario_from_dict(
            {"model": {"name": model}, "hardware": {"gpu": gpu}, "fleet": {"tensor_parallel": tp}}
        )
    )
    return rs.latency_model()


@pytest.mark.parametrize(
    "model,gpu,tp",
    [
        ("llama-3.1-70b", "h100-sxm", 4),
        ("llama-3.1-8b", "a100-80gb", 1),
        ("mixtral-8x7b", "h200", 2),
    ],
)
def test_run_sums_equal_step_by_step(model, gpu, tp):
    lat = _lat(model, gpu, tp)
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 300))
        c0 = float(rng.integers(n, n * 5000))
        m = int(rng.integers(1, 3000))
        c = lat.run_coeffs(n)
        t = f = b = 0.0
        for i in range(m):
            ctx = c0 + n * i
            t += step_time(c, ctx)
            f += c.fa + c.fb * ctx
            b += c.ba + c.bb * ctx
        T, F, B = run_sums(c, c0, n, m)
        assert pytest.approx(t, rel=1e-11) == T and run_time(c, c0, n, m) == pytest.approx(
            t, rel=1e-11
        )
        assert pytest.approx(f, rel=1e-11) == F and pytest.approx(b, rel=1e-11) == B
        # the first step count that reaches a target, exactly against run_time
        base = float(rng.uniform(0, 1e5))
        target = base + float(rng.uniform(0, T * 1.1))
        k, rt = steps_to_reach(c, c0, n, m, base, target)
        assert rt == run_time(c, c0, n, k)
        assert (base + run_time(c, c0, n, k) >= target) or k == m
        assert k == 0 or base + run_time(c, c0, n, k - 1) < target


def _reach_by_run_time(c, c0, n, m_max, base, target, m):
    """steps_to_reach's nudge from a first guess ``m``, on run_time itself (the reference)."""
    rt = run_time(c, c0, n, m)
    if base + rt >= target:
        while m > 0:
            prev = run_time(c, c0, n, m - 1)
            if base + prev < target:
                break
            m -= 1
            rt = prev
    else:
        while m < m_max:
            m += 1
            rt = run_time(c, c0, n, m)
            if base + rt >= target:
                break
    return m, rt


def test_steps_to_reach_inlined_branch_is_run_time():
    """steps_to_reach evaluates run_time's one-line branch (both lines through the origin, the
    kernel model's) inline: the same step count and the same float as the nudge on run_time
    itself, from every first guess, on either line (slope of either sign), m_max 0 included."""
    rng = np.random.default_rng(5)
    for i in range(3000):
        b1, b2 = (float(x) for x in rng.uniform(1e-9, 1e-6, 2))
        if i % 2:
            b1, b2 = b2, b1
        c = RunCoeffs(float(rng.uniform(0.0, 0.03)), 0.0, b1, 0.0, b2, 1.0, 1.0, 1.0, 1.0)
        n = int(rng.integers(1, 300)) if i % 3 else float(rng.uniform(0.5, 300.0))
        c0 = float(rng.integers(0, 2_000_000))
        m_max = int(rng.integers(0, 4000))
        base = float(rng.uniform(0.0, 86400.0))
        T = run_time(c, c0, n, m_max)
        target = base + float(rng.uniform(-0.01, 1.1 * T + 1e-9))
        k, rt = steps_to_reach(c, c0, n, m_max, base, target)
        if base >= target:
            assert (k, rt) == (0, 0.0)
            continue
        assert rt == run_time(c, c0, n, k) and (base + rt >= target or k == m_max)
        assert k == 0 or base + run_time(c, c0, n, k - 1) < target
        for guess in {1, k, max(1, k - 1), min(m_max, k + 1)} - {0}:
            if guess <= m_max:
                ref = _reach_by_run_time(c, c0, n, m_max, base, target, guess)
                assert ref == (k, rt) or (m_max == 0 and ref[0] == 0)


def test_roofline_regimes_h100_70b_tp4():
    """Decode is bandwidth-bound: ~weights/(tp*bw*eff) per step; long prefills are compute-bound.
    (The plain roofline, without the catalog's kernel model: a measured profile's path.)"""
    import dataclasses

    full = _lat()
    m = full.model
    lat = LatencyModel(m, dataclasses.replace(full.profile, kernels=None), 4)
    w_s = m.weight_bytes / (4 * 3.35e12 * 0.8)
    t1 = lat.decode_time(1, 1000)
    assert w_s < t1 < w_s + 0.01
    # a 4k-token prefill: FLOPs / (4 GPUs x 989 TFLOP/s x efficiency)
    f = m.prefill_flops(4096)
    eff = 0.6 * 4096 / (4096 + 128)
    comm = 2 * m.n_layers * (6e-6 + 2 * 3 / 4 * 4096 * m.d_model * 2 / 450e9)  # ring all-reduces
    # + the serving stack's exposed CPU time per iteration (vllm-v1 by default: 2.43 ms fitted)
    oh = full.profile.overhead_s
    assert 0.002 < oh < 0.003
    assert lat.prefill_time(4096) == pytest.approx(f / (4 * 989e12 * eff) + oh + comm, rel=1e-9)


def test_throughput_anchor_llama8b_h100():
    """TensorRT-LLM reports 28,312 tok/s for Llama-3.1-8B FP8 on one H100 at 128/128 (max
    throughput). Our analytic bf16 roofline at a large batch should be in the same decade."""
    lat = _lat("llama-3.1-8b", "h100-sxm", 1)
    batch = 256
    t = lat.decode_time(batch, 192)
    tok_s = batch / t
    assert 5_000 < tok_s < 40_000


def test_linear_profile_iteration():
    m = model_from_catalog("llama-3.1-8b")
    p = LinearProfile(
        name="lin",
        base_s=0.01,
        prefill_base_s=0.002,
        per_prefill_token_s=1e-5,
        per_seq_s=1e-4,
        per_context_token_s=1e-7,
    )
    lat = LatencyModel(m, p, 1)
    t, _, _ = lat.iteration(100, 100.0**2, 1, 3, 3000.0)
    assert t == pytest.approx(0.01 + 0.002 + 1e-3 + 4e-4 + 3e-4, rel=1e-12)
    assert lat.decode_time(4, 500) == pytest.approx(0.01 + 4e-4 + 2000 * 1e-7, rel=1e-12)


@pytest.mark.parametrize(
    "model,gpu,tp",
    [
        ("llama-3.1-70b", "h100-sxm", 4),  # the fitted kernel model
        ("mixtral-8x7b", "h200", 2),  # weights read depend on the tokens (MoE)
    ],
)
def test_decode_step_is_iteration_without_prefill(model, gpu, tp):
    """The engines' shortcut for a pure decode step gives iteration()'s numbers bit for bit,
    on the kernel model, the plain roofline and a linear profile."""
    import dataclasses

    lat = _lat(model, gpu, tp)
    lats = [lat, LatencyModel(lat.model, dataclasses.replace(lat.profile, kernels=None), tp)]
    lats.append(LatencyModel(lat.model, LinearProfile("lin", 0.01, 0.002, 1e-5, 1e-4, 1e-7), tp))
    rng = np.random.default_rng(1)
    for lm in lats:
        for _ in range(300):
            n = int(rng.integers(1, 512))
            ctx = float(rng.integers(0, n * 20000)) + float(rng.integers(0, 2)) * 0.5
            assert lm.decode_step(n, ctx) == lm.iteration(0, 0.0, 0, n, ctx)
