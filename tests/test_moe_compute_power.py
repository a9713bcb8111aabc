"""The power of the routed experts' FLOPs (PowerSpec.moe_compute_w, issue 21).

The multi-GPU MoE rows of ML.ENERGY v3 draw more power than their FLOPs and bytes explain with
a dense GEMM's energy per FLOP: Qwen3-235B-A22B (bf16) on four B200s draws 750-817 W at 32 to
3,072 sequences while the simulated FLOP and byte rates fall with the batch, and at the same
batch it draws 30-40 % more than on eight B200s, whose GPUs each hold half the experts. The
power model charges the routed experts' grouped-GEMM FLOPs ``moe_compute_w`` per unit of the
peak FLOP/s on top of ``compute_w``. The engine counts those FLOPs per iteration as it counts
communication seconds:

* the FLOPs by hand count (Qwen3-235B-A22B: 94 MoE layers, top-8 experts of width 1,536,
  d_model 4,096), with the data-parallel padding of a DP replica;
* the engine's energy moves by exactly moe_compute_w / peak x those FLOPs, in both engines, and
  a dense model records none;
* power_w and dynamic_j agree with the new term;
* the fit recovers a synthetic moe_compute_w and, blind to it, leaves the MoE rows low.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlenergy_resolved as _rs
from conftest import synthetic_power_run

from fleetsim.calibrate import mlenergy as M
from fleetsim.device import catalog
from fleetsim.device.latency import PowerSpec

BF16 = "Qwen/Qwen3-235B-A22B-Instruct-2507"
#: Qwen3-235B-A22B's config.json: 94 layers (all MoE), hidden 4,096, moe_intermediate 1,536,
#: 8 experts per token, a gated (SwiGLU) expert of 3 matrices
QWEN235_EXPERT_FLOPS_PER_TOKEN = 2.0 * 94 * 8 * 3 * 4096 * 1536


def test_routed_expert_flops_by_hand_count(tmp_path):
    """One token of Qwen3-235B-A22B passes 8 experts of 3 x 4,096 x 1,536 weights in each of 94
    layers: 2 x 94 x 8 x 3 x 4,096 x 1,536 = 28.4 GFLOPs, about two thirds of the 2 x 22 B
    active parameters' (attention projections and router are the rest). An iteration of 250
    prompt tokens and 7 decoding sequences counts 257 tokens' worth; a decode run's step of 8
    sequences 8 tokens'. Under data parallelism (Qwen3-Coder-480B-FP8, DP4 of one GPU each:
    62 layers, top-8 of width 2,560, d_model 6,144) every engine runs the fullest one's
    tokens: 7 decoding sequences and a prompt of 100 on one engine are 4 x (2 + 100) tokens'
    worth."""
    c = M.find_config(BF16, "B200", 4, 8)
    lat = _rs(c, tmp_path).latency_model()
    assert lat.model.routed_expert_flops_per_token == QWEN235_EXPERT_FLOPS_PER_TOKEN
    assert lat.expert_flops_iter(250, 1, 7) == pytest.approx(257 * QWEN235_EXPERT_FLOPS_PER_TOKEN)
    assert lat.run_coeffs(8).expert_flops == pytest.approx(8 * QWEN235_EXPERT_FLOPS_PER_TOKEN)
    # a part of the iteration's FLOPs: of its linear layers' (f_lin per token), about 2/3
    assert 0.6 < QWEN235_EXPERT_FLOPS_PER_TOKEN / lat.f_lin < 0.7
    f = lat.iteration(250, 250.0 * 250.0, 1, 7, 7 * 300.0)[1]
    assert lat.expert_flops_iter(250, 1, 7) < 257 * lat.f_lin < f
    dp = M.find_config(
        "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "B200", 4, 8, "sourcegraph-fim", dp=4
    )
    lat4 = _rs(dp, tmp_path).latency_model()
    assert lat4.dp == 4
    per_tok = 2.0 * 62 * 8 * 3 * 6144 * 2560
    assert lat4.model.routed_expert_flops_per_token == per_tok
    assert lat4.expert_flops_iter(100, 1, 7) == pytest.approx(4 * (2 + 100) * per_tok)
    # a dense model has none
    dense = _rs(M.find_config("Qwen/Qwen3-8B", "B200", 1, 8), tmp_path).latency_model()
    assert dense.expert_flops_iter(250, 1, 7) == 0.0 and dense.run_coeffs(8).expert_flops == 0.0


def test_engine_energy_adds_the_routed_expert_flops(tmp_path):
    """The engine's dynamic energy with moe_compute_w = 900 W exceeds the one with 0 by exactly
    900 / peak FLOP/s x the routed-expert FLOPs it recorded, in both engines (one iteration
    per step and macro-steps), and those FLOPs are the tokens its layers ran times the hand
    count per token; the timing does not move. A dense model's energy ignores the term."""
    import fleetsim.serving.pod as pod_mod

    c = M.find_config(BF16, "B200", 4, 8)
    peak = catalog.gpu("b200")["peak_flops"]
    out = {}
    for engine in ("iteration", "macro"):
        for w in (0.0, 900.0):
            rs = _rs(c, tmp_path, engine, moe_compute_w=w)
            assert rs.gpu.power.moe_compute_w == w
            rec = pod_mod.Pod(rs, 0, 1).run()
            out[engine, w] = (
                sum(rec.dyn_j),
                sum(rec.expert_flops),
                sum(rec.busy_s),
                sum(rec.prompt_tokens),
                sum(rec.output_tokens),
            )
    for engine in ("iteration", "macro"):
        e0, x0, b0, pt, ot = out[engine, 0.0]
        e1, x1, b1, _, _ = out[engine, 900.0]
        assert b0 == b1 and x0 == x1
        assert e1 - e0 == pytest.approx(900.0 / peak * x1, rel=1e-9)
        # 24 prompts of 250 tokens (no prefix sharing counted here: all computed) and every
        # output token but each request's first (sampled by its prefill) is a decode token
        assert pt == 24 * 250
        assert x1 == pytest.approx((pt + ot - 24) * QWEN235_EXPERT_FLOPS_PER_TOKEN, rel=1e-9)
    assert out["macro", 900.0][1] == pytest.approx(out["iteration", 900.0][1], rel=1e-9)
    dense = M.find_config("Qwen/Qwen3-8B", "B200", 1, 8)
    recs = [pod_mod.Pod(_rs(dense, tmp_path, moe_compute_w=w), 0, 1).run() for w in (0.0, 900.0)]
    assert sum(recs[0].expert_flops) == 0.0 and sum(recs[0].dyn_j) == sum(recs[1].dyn_j)


def test_power_w_and_dynamic_j_agree_with_the_routed_expert_term():
    """One GPU-second at compute use 0.1, 0.06 of it routed-expert FLOPs: power_w's mean and
    dynamic_j's energy agree, and the term adds 0.06 x moe_compute_w; still capped."""
    kw = dict(active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0)
    p = PowerSpec(100.0, 700.0, **kw)
    q = PowerSpec(100.0, 700.0, moe_compute_w=1000.0, **kw)
    peak_f, peak_b = 1e15, 3e12
    e = q.dynamic_j(
        1.0,
        0.1 * peak_f,
        0.2 * peak_b,
        peak_f,
        peak_b,
        kv_bytes=0.05 * peak_b,
        expert_flops=0.06 * peak_f,
    )
    assert e + q.idle_w == pytest.approx(q.power_w(0.1, 0.2, u_kv=0.05, u_moe=0.06), rel=1e-12)
    assert q.power_w(0.1, 0.2, u_moe=0.06) - p.power_w(0.1, 0.2) == pytest.approx(60.0)
    assert p.power_w(0.1, 0.2, u_moe=0.06) == p.power_w(0.1, 0.2)
    assert q.power_w(0.3, 0.2, u_moe=0.3) == 700.0


def test_fit_recovers_a_synthetic_routed_expert_term():
    """Rows drawn from a power model with moe_compute_w (every other run a mixture of experts,
    60 % of its FLOPs in routed experts) are fitted back exactly; blind to the experts' FLOPs,
    the same rows are fitted with the MoE rows low and the dense ones high."""
    rng = np.random.default_rng(np.random.SeedSequence(2131))
    truth = PowerSpec(100.0, 700.0, active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0)
    truth_moe = PowerSpec(
        100.0,
        700.0,
        active_w=250.0,
        compute_w=500.0,
        memory_w=120.0,
        kv_w=180.0,
        moe_compute_w=900.0,
    )
    runs, meas = [], []
    for i in range(20):
        r = synthetic_power_run(rng, truth)
        if i % 2 == 0:
            r.seg_xflops = 0.6 * r.seg_flops
        runs.append(r)
        meas.append(M.predict_w(r, truth_moe))
    base = PowerSpec(idle_w=100.0, max_w=700.0)
    p = M.fit_power(runs, meas, base)
    for k in ("active_w", "compute_w", "memory_w", "kv_w", "moe_compute_w"):
        assert getattr(p, k) == pytest.approx(getattr(truth_moe, k), abs=1e-3), k
    blind = M.fit_power(runs, meas, base, moe=False)
    assert blind.moe_compute_w == 0.0
    err = [M.predict_w(r, blind) / m - 1.0 for r, m in zip(runs, meas, strict=True)]
    assert float(np.median(err[0::2])) < -0.01 < 0.01 < float(np.median(err[1::2]))
