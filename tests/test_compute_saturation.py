"""A saturating compute term in the power model (PowerSpec.compute_u0, issue 21).

Measured power rises concavely with the batch (Qwen3-8B chat on one H100: 427 / 451 / 478 /
514 / 544 / 573 / 600 / 633 W at 8 to 256 sequences), while the model's compute term was linear
in the compute utilisation u_c. With ``compute_u0`` set the FLOP terms take the factor
``(1 + u0) / (u_c + u0)``:

* power_w by hand: ``compute_w`` at u_c = 1, slope ``(1 + u0) / u0`` at 0, the linear model as
  u0 grows, the routed experts' term with the same factor, and unset the linear model bit for
  bit;
* power_w and dynamic_j agree over a span at one utilisation;
* the engine's energy over a run is the sum over its iterations of (power - idle) x their time
  (iteration engine, exact), and the macro engine's (decode runs at their mean utilisation)
  within 0.1 % of it; the timing does not move;
* the fit recovers a synthetic u0 from a grid, and the harness's window mean uses the factor
  per commit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import mlenergy_resolved as _rs
from conftest import synthetic_power_run

from fleetsim.calibrate import mlenergy as M
from fleetsim.device.latency import PowerSpec

KW = dict(active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0)


def test_power_w_by_hand():
    """u0 = 0.2: at u_c = 0.1 the compute term is 500 x 0.1 x 1.2 / 0.3 = 200 W (the linear
    model's 50 W times 4); at u_c = 1 it is the full 500 W; the slope at 0 is 500 x 1.2 / 0.2 =
    3,000 W per unit; the routed experts' 0.06 of u_c at moe_compute_w 1,000 W adds 60 x 4 =
    240 W. Unset, the linear model; u0 = 1e9, the linear model within 1e-6."""
    p = PowerSpec(100.0, 2000.0, **KW)
    q = replace(p, compute_u0=0.2)
    assert p.compute_gain(0.37) == 1.0
    assert q.compute_gain(0.1) == pytest.approx(4.0, rel=1e-12)
    assert q.power_w(0.1, 0.2) == pytest.approx(100 + 250 + 200 + 24, rel=1e-12)
    assert p.power_w(0.1, 0.2) == 100 + 250 + 500 * 0.1 + 120 * 0.2 + 180 * 0.0
    assert q.power_w(1.0, 0.0) == pytest.approx(p.power_w(1.0, 0.0), rel=1e-12)
    eps = 1e-7
    slope = (q.power_w(eps, 0.0) - q.power_w(0.0, 0.0)) / eps
    assert slope == pytest.approx(500 * 1.2 / 0.2, rel=1e-5)
    m = replace(q, moe_compute_w=1000.0)
    assert m.power_w(0.1, 0.2, u_moe=0.06) - q.power_w(0.1, 0.2) == pytest.approx(240.0)
    far = replace(p, compute_u0=1e9)
    for u in (0.01, 0.1, 0.5):
        assert far.power_w(u, 0.3, u_kv=0.1) == pytest.approx(p.power_w(u, 0.3, u_kv=0.1), 1e-6)
    # concave, above the linear model below u_c = 1, capped at the limit
    us = np.linspace(0.0, 1.0, 11)
    w = np.array([q.power_w(u, 0.0) for u in us])
    assert np.all(np.diff(w, 2) < 0) and np.all(w[1:-1] > [p.power_w(u, 0.0) for u in us[1:-1]])
    assert replace(q, max_w=700.0).power_w(0.5, 0.2) == 700.0


def test_power_w_and_dynamic_j_agree():
    """One GPU-second at u_c 0.1 (0.06 routed experts), u_m 0.2, u_kv 0.05, a quarter of it
    waiting on the host: power_w's mean and dynamic_j's energy are the same with the factor,
    and two GPUs doing twice the work draw twice the energy (the same u_c)."""
    q = PowerSpec(100.0, 2000.0, moe_compute_w=1000.0, host_w=20.0, compute_u0=0.15, **KW)
    pf, pb = 1e15, 3e12
    e = q.dynamic_j(
        1.0, 0.1 * pf, 0.2 * pb, pf, pb, kv_bytes=0.05 * pb, expert_flops=0.06 * pf, host_s=0.25
    )
    want = q.power_w(0.1, 0.2, u_kv=0.05, u_moe=0.06, f_host=0.25)
    assert e + q.idle_w == pytest.approx(want, rel=1e-12)
    e2 = q.dynamic_j(
        1.0, 0.2 * pf, 0.4 * pb, pf, pb, 2, kv_bytes=0.1 * pb, expert_flops=0.12 * pf, host_s=0.25
    )
    assert e2 == pytest.approx(2 * e, rel=1e-12)


def _commits(rs):
    """Run ``rs``'s pod and return its recorder and per-commit (seconds, FLOPs, bytes,
    iterations) from the harness's tracker."""
    import fleetsim.serving.pod as pod_mod

    pod = pod_mod.Pod(rs, 0, 1)
    tr = M._Tracker(pod.rec)
    rec = pod.run()
    cum = tr.cumulative()
    d = {k: np.diff(np.concatenate(([0.0], cum[k]))) for k in ("busy", "flops", "bytes", "iters")}
    return rec, d


def test_engine_energy_is_the_sum_of_power_times_step_time(tmp_path):
    """Qwen3-8B on one H100, 24 requests (a prompt step of 6,000 tokens at u_c ~0.6, then
    decode steps at ~0.01), u0 = 0.2, the limit lifted so that no step is capped: the
    iteration engine's dynamic energy is the sum over its iterations of (power_w - idle) x
    their time at each one's u_c, u_m, u_kv and host share, exactly; the time and work do not
    move with u0; the macro engine's energy is within 0.1 % of it (its decode runs at their
    mean u_c); the factor raises the energy over the linear model's."""
    c = M.find_config("Qwen/Qwen3-8B", "H100", 1, 8)
    out = {}
    for engine in ("iteration", "macro"):
        for u0 in (None, 0.2):
            hw = {"tdp_w": 5000.0} if u0 is None else {"tdp_w": 5000.0, "compute_u0": u0}
            rs = _rs(c, tmp_path, engine, **hw)
            assert rs.gpu.power.compute_u0 == u0
            out[engine, u0] = (rs, *_commits(rs))
    rs, rec, d = out["iteration", 0.2]
    p = rs.gpu.power
    lat = rs.latency_model()
    peak_f, peak_b = rs.profile.peak_flops, rs.profile.mem_bw_bytes_per_s
    assert np.all(d["iters"] == 1.0)
    t = d["busy"]
    uc = d["flops"] / (peak_f * t)
    um = d["bytes"] / (peak_b * t)
    ukv = np.maximum(d["bytes"] - lat.weight_bytes_per_iteration(8), 0.0) / (peak_b * t)
    fh = lat.host_s_per_iter / t
    want = sum(
        (p.power_w(a, b, u_kv=k, f_host=h) - p.idle_w) * s
        for a, b, k, h, s in zip(uc, um, ukv, fh, t, strict=True)
    )
    assert sum(rec.dyn_j) == pytest.approx(want, rel=1e-9)
    assert uc.max() > 0.3 and np.median(uc) < 0.05  # a prompt step and decode steps
    _, rec_lin, d_lin = out["iteration", None]
    assert np.array_equal(d_lin["busy"], t) and np.array_equal(d_lin["flops"], d["flops"])
    assert sum(rec.dyn_j) > sum(rec_lin.dyn_j)
    _, rec_m, _ = out["macro", 0.2]
    _, rec_mlin, _ = out["macro", None]
    assert sum(rec_m.busy_s) == sum(rec_mlin.busy_s)
    assert sum(rec_m.dyn_j) == pytest.approx(sum(rec.dyn_j), rel=1e-3)


def test_harness_window_mean_uses_the_factor_per_commit():
    """Two commits of 10 ms at u_c 0.02 and 0.5 (one GPU): the harness's mean power is the
    time-weighted mean of power_w at each, not power_w at the mean u_c (0.26)."""
    q = PowerSpec(100.0, 2000.0, compute_u0=0.1, **KW)
    r = M.SimRun("x", tp=1, peak_flops=1e15, peak_bw=3e12)
    r.seg_s = np.array([0.01, 0.01])
    r.seg_flops = np.array([0.02, 0.5]) * 1e15 * 0.01
    r.seg_bytes = np.array([0.3, 0.1]) * 3e12 * 0.01
    r.seg_iters = np.ones(2)
    r.weight_bytes = 0.0  # every byte KV traffic (u_kv = u_m)
    want = 0.5 * (q.power_w(0.02, 0.3, u_kv=0.3) + q.power_w(0.5, 0.1, u_kv=0.1))
    assert M.predict_w(r, q) == pytest.approx(want, rel=1e-12)
    assert M.predict_w(r, q) < q.power_w(0.26, 0.2, u_kv=0.2)  # concave: below power at the mean


def test_fit_recovers_a_synthetic_u0():
    """Rows drawn from a power model with u0 = 0.2 (and a prefill anchor at the limit under
    it) are fitted back exactly from a grid that holds 0.2, u0 included; the linear fit of the
    same rows leaves them with a larger error."""
    rng = np.random.default_rng(np.random.SeedSequence(3901))
    truth = PowerSpec(100.0, 700.0, compute_u0=0.2, **KW)
    # the anchor: compute_w g(u) = max - idle - active - 0.02 memory_w, g(u) = u 1.2 / (u + 0.2)
    y = (700.0 - 100.0 - 250.0 - 0.02 * 120.0) / 500.0
    pf = y * 0.2 / (1.2 - y)
    runs, meas = [], []
    for _ in range(20):
        r = synthetic_power_run(rng, truth)
        r.prefill_u = (pf, 0.02, 0.0)
        runs.append(r)
        meas.append(M.predict_w(r, truth))
    assert truth.power_w(pf, 0.02) == pytest.approx(700.0, rel=1e-12)
    base = PowerSpec(idle_w=100.0, max_w=700.0)
    p = M.fit_power(runs, meas, base, u0_grid=(None, 0.05, 0.2, 1.0))
    assert p.compute_u0 == 0.2
    for k in ("active_w", "compute_w", "memory_w", "kv_w"):
        assert getattr(p, k) == pytest.approx(getattr(truth, k), abs=1e-3), k
    lin = M.fit_power(runs, meas, base)
    assert lin.compute_u0 is None

    def rms(q: PowerSpec) -> float:
        e = [M.predict_w(r, q) / m - 1.0 for r, m in zip(runs, meas, strict=True)]
        return float(np.sqrt(np.mean(np.square(e))))

    assert rms(p) < 1e-6 < 1e-3 < rms(lin)
