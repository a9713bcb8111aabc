"""The power level of the fp8 fused-MoE kernel's block-scaled K loop (PowerSpec.moe_loop_w).

vLLM runs fp8 block-quantised experts (128 x 128 weight scales) in its Triton w8a8 block kernel,
whose every K step loads the tiles and their fp32 scales and rescales the accumulator. The step
time model charges that loop as latency (``k_step_fp8_s``, catalog/moe.toml), time without FLOPs
or bytes; the measured servers draw 880-960 W per B200 through it. The engine records those
seconds per iteration as it records communication seconds, and the power model draws
``moe_loop_w`` in place of ``active_w`` for them:

* the loop seconds by hand count (Qwen3-235B-A22B-FP8, EP4 on H100s, one token);
* the engine's energy is the integral with the new term (exactly), and both engines (one
  iteration per step, macro-steps) record the same loop seconds;
* power_w / dynamic_j agree with each other over a second with a loop share;
* the fit recovers a synthetic loop level; a model without fp8 experts records none.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import mlenergy_resolved as _rs
from conftest import synthetic_power_run

from fleetsim.calibrate import mlenergy as M
from fleetsim.device import catalog
from fleetsim.device.latency import PowerSpec


def _config(model: str, gpu: str = "H100", gpus: int = 4, batch: int = 8) -> M.Config:
    return M.find_config(model, gpu, gpus, batch)


FP8 = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
BF16 = "Qwen/Qwen3-235B-A22B-Instruct-2507"


def test_loop_seconds_by_hand_count(tmp_path):
    """Qwen3-235B-A22B-FP8 (config.json: 94 MoE layers, d_model 4,096, expert width 1,536, 128
    experts, top-8) on 4 H100s with expert parallelism, one token: each GPU holds 32 experts.
    vLLM has no tuned fp8 file for 32 local experts of width 1,536, so the launch runs
    ``get_default_config``'s fp8 block tiles (64 x 128 x 128, 3 stages: 72 KiB of shared memory,
    3 per SM, 132 x 3 = 396 a wave) over a grid of every local expert (device/moe.py
    ``fp8_default_grid_waves``): the up GEMM (N = 2 x 1,536) 32 x 24 = 768 programs, 2 waves,
    the down GEMM (N = 4,096) 32 x 32 = 1,024, 3 waves. Each program loops over K in 128-wide
    steps: 4,096 / 128 = 32 (up) and 1,536 / 128 = 12 (down), the first wave the whole loop and
    each later one the catalog's ``fp8_wave_frac`` a of it, so the iteration spends 94 x (32 x
    (1 + a) + 12 x (1 + 2 a)) K steps in the loop, each of the default tiles'
    ``k_step_fp8_default_s``. The bf16 twin records none."""
    c = _config(FP8)
    lat = _rs(c, tmp_path).latency_model()
    step = catalog.moe()["h100-sxm"]["k_step_fp8_default_s"]
    assert step > 0.0
    a = catalog.moe()["h100-sxm"]["fp8_wave_frac"]
    steps = 32 * (1 + a) + 12 * (1 + 2 * a)
    assert lat.moe_loop_s(1) == pytest.approx(94 * steps * step, rel=1e-12)
    # a part of the iteration's time, not added to it: the grouped GEMMs hold it
    assert 0.0 < lat.moe_loop_s(1) < lat.decode_time(1, 300)
    assert lat.run_coeffs(1).loop_s == lat.moe_loop_s(1)
    bf = _rs(_config(BF16, gpus=8), tmp_path).latency_model()
    assert bf.moe_loop_s(1) == 0.0 and bf.run_coeffs(8).loop_s == 0.0


def test_engine_energy_is_the_integral_with_the_loop_level(tmp_path):
    """The engine records the seconds its iterations spend in the fp8 K loop (a part of the busy
    time) and charges them at moe_loop_w in place of active_w: with the level at active_w the
    energy is the old integral; at another level it moves by exactly GPUs x (moe_loop_w -
    active_w) x those seconds. The macro-step engine records the same seconds as the
    one-iteration-per-step engine (its decode runs' loop time is steps x the step's)."""
    import fleetsim.serving.pod as pod_mod

    c = _config(FP8)
    active = catalog.gpu("h100-sxm")["active_w"]
    out = {}
    for engine in ("iteration", "macro"):
        for level in (active, active + 200.0):
            rs = _rs(c, tmp_path, engine, moe_loop_w=level)
            assert rs.tp == 4 and rs.gpu.power.moe_loop_w == level
            rec = pod_mod.Pod(rs, 0, 1).run()
            out[engine, level] = (
                sum(rec.dyn_j),
                sum(rec.moe_loop_s),
                sum(rec.busy_s),
                sum(rec.comm_s),
            )
    e0, l0, b0, c0 = out["iteration", active]
    e1, l1, b1, _ = out["iteration", active + 200.0]
    assert l0 == l1 and b0 == b1  # the timing does not depend on the power model
    assert 0.1 * b0 < l0 < b0 - c0  # a large part of the busy time, beside the communication
    assert e1 - e0 == pytest.approx(4 * 200.0 * l0, rel=1e-9)
    em0, lm, bm, _ = out["macro", active]
    em1 = out["macro", active + 200.0][0]
    assert lm == pytest.approx(l0, rel=1e-9) and bm == pytest.approx(b0, rel=1e-9)
    assert em1 - em0 == pytest.approx(4 * 200.0 * lm, rel=1e-9)
    # without the level (None) the energy is the level-at-active_w integral
    from dataclasses import replace

    rs = _rs(c, tmp_path, "iteration")
    none = replace(rs, gpu=replace(rs.gpu, power=replace(rs.gpu.power, moe_loop_w=None)))
    rec = pod_mod.Pod(none, 0, 1).run()
    assert sum(rec.dyn_j) == pytest.approx(e0, rel=1e-12)
    assert sum(rec.moe_loop_s) == pytest.approx(l0, rel=1e-12)  # recorded all the same
    # a bf16 model records no loop seconds and its energy ignores the level
    bf = [
        pod_mod.Pod(_rs(_config(BF16, gpus=8), tmp_path, moe_loop_w=w), 0, 1).run()
        for w in (active, active + 200.0)
    ]
    assert sum(bf[0].moe_loop_s) == 0.0 and sum(bf[0].dyn_j) == sum(bf[1].dyn_j)


def test_power_w_and_dynamic_j_agree_with_a_loop_share():
    """One GPU-second with a share f of it in the loop: power_w's mean and dynamic_j's energy
    are the same, and the loop moves them by f x (moe_loop_w - active_w)."""
    p = PowerSpec(100.0, 700.0, active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0)
    q = PowerSpec(
        100.0, 700.0, active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0, moe_loop_w=400.0
    )
    f = 0.3
    peak_f, peak_b = 1e15, 3e12
    e = q.dynamic_j(
        1.0, 0.1 * peak_f, 0.2 * peak_b, peak_f, peak_b, kv_bytes=0.05 * peak_b, loop_s=f
    )
    assert e + q.idle_w == pytest.approx(q.power_w(0.1, 0.2, u_kv=0.05, f_loop=f), rel=1e-12)
    assert q.power_w(0.1, 0.2, f_loop=f) - p.power_w(0.1, 0.2) == pytest.approx(f * 150.0)
    assert p.power_w(0.1, 0.2, f_loop=f) == p.power_w(0.1, 0.2)  # no level: active_w there
    # still capped at the limit
    hot = PowerSpec(100.0, 700.0, active_w=250.0, compute_w=500.0, moe_loop_w=2000.0)
    assert hot.power_w(0.5, 0.2, f_loop=1.0) == 700.0


def test_fit_recovers_a_synthetic_loop_level():
    """Rows drawn from a power model with a loop level (a third of the runs with fp8 experts,
    10-50 % of their time in the loop) are fitted back exactly, the level included; without
    the loop term the same rows are fitted with a bias (the loop rows low)."""
    rng = np.random.default_rng(np.random.SeedSequence(31))
    truth = PowerSpec(
        100.0, 700.0, active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0, moe_loop_w=420.0
    )
    runs, meas = [], []
    for i in range(18):
        r = synthetic_power_run(rng, truth, loop=i % 3 == 0)
        runs.append(r)
        meas.append(M.predict_w(r, truth))
    base = PowerSpec(idle_w=100.0, max_w=700.0)
    p = M.fit_power(runs, meas, base)
    for k in ("active_w", "compute_w", "memory_w", "kv_w", "moe_loop_w"):
        assert getattr(p, k) == pytest.approx(getattr(truth, k), abs=1e-4), k
    assert p.comm_w is None  # no row communicates
    # the same rows with the loop seconds hidden: the loop rows come out low
    for r in runs:
        r.seg_loop_s = np.zeros(len(r.seg_s))
    blind = M.fit_power(runs, meas, base)
    assert blind.moe_loop_w is None
    low = [
        M.predict_w(r, blind) / m - 1.0 for i, (r, m) in enumerate(zip(runs, meas)) if i % 3 == 0
    ]
    assert float(np.median(low)) < -0.02


def test_fit_bounds_the_loop_level_at_the_power_limit():
    """Measured power far above what any level below the limit explains: the fitted loop level
    stops at max_w - idle_w (a GPU draws at most its limit)."""
    rng = np.random.default_rng(np.random.SeedSequence(37))
    truth = PowerSpec(100.0, 700.0, active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0)
    runs, meas = [], []
    for i in range(12):
        r = synthetic_power_run(rng, truth, loop=i % 2 == 0)
        runs.append(r)
        w = M.predict_w(r, truth)
        meas.append(min(700.0, w * 2.0) if i % 2 == 0 else w)
    p = M.fit_power(runs, meas, PowerSpec(idle_w=100.0, max_w=700.0))
    assert p.moe_loop_w is not None and p.moe_loop_w <= 600.0 + 1e-9
    assert math.isfinite(p.active_w)
