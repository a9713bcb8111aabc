"""The power level while an iteration waits on the host (PowerSpec.host_w).

Each step's exposed host time (the serving stack's ``overhead_s``, host stall and one-GPU
step floor, ``LatencyModel.host_s_per_iter``: the part of vLLM 0.11's host work per step that
asynchronous scheduling, ``EngineCore.step_with_batch_queue`` in ``vllm/v1/engine/core.py``,
does not hide) is time in which no kernel runs. The engine charges it at ``host_w`` in place
of ``active_w``:

* the host seconds per iteration by hand (the catalog's vllm-v1 constants), and they are a part
  of every step's time (a profile without them steps exactly that much faster);
* the engine's energy moves by exactly GPUs x (host_w - active_w) x host seconds x iterations
  in both engines, and is the old integral with the level unset or at active_w;
* power_w / dynamic_j agree with each other over a second with a host share;
* the harness's host share is iterations x host seconds / commit time, and the fit recovers a
  synthetic host level, capped at active_w.

The node's host (CPUs, DRAM, NICs, NVSwitches, fans) by state, ``node_idle_w`` /
``node_overhead_w``: the A100's two levels and the bracket on the others' idle level are
recomputed from the measured DGX A100 (data/flagperf-dgx-a100).
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import mlenergy_resolved as _rs
from conftest import synthetic_power_run

from fleetsim.calibrate import mlenergy as M
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, LinearProfile, PowerSpec
from fleetsim.device.stack import stack_constants


def _h100_host_s(one_gpu: bool) -> float:
    c = stack_constants("vllm-v1", "h100-sxm")
    assert c is not None
    return c["overhead_s"] + c["host_stall_s"] + (c.get("one_gpu_overhead_s", 0.0) * one_gpu)


def test_host_seconds_by_hand_and_inside_every_step(tmp_path):
    """Qwen3-8B on one H100 (vllm-v1): overhead_s 2.4306 ms + host stall 0.0774 ms (stacks.toml;
    the H100 has no one-GPU floor); Qwen3-32B on two: the same (the floor is one-GPU only). The
    time is inside the step: the same model with those constants at 0 decodes each step exactly
    that much faster."""
    c8 = M.find_config("Qwen/Qwen3-8B", "H100", 1, 8)
    lat = _rs(c8, tmp_path).latency_model()
    assert lat.host_s_per_iter == pytest.approx(_h100_host_s(True), rel=1e-12)
    assert lat.host_s_per_iter == pytest.approx(2.4306e-3 + 7.7416e-5, rel=1e-9)
    prof = lat.profile
    bare = LatencyModel(lat.model, replace(prof, overhead_s=0.0, one_gpu_overhead_s=0.0), 1)
    assert bare.host_s_per_iter == 0.0
    for n, ctx in ((1, 300.0), (8, 2400.0), (64, 30000.0)):
        t, _, _ = lat.decode_step(n, ctx)
        t0, _, _ = bare.decode_step(n, ctx)
        assert t - t0 == pytest.approx(lat.host_s_per_iter, rel=1e-9)
    c32 = M.find_config("Qwen/Qwen3-32B", "H100", 2, 8)
    lat32 = _rs(c32, tmp_path).latency_model()
    assert lat32.tp == 2
    assert lat32.host_s_per_iter == pytest.approx(_h100_host_s(False), rel=1e-12)
    # a linear profile's step has no host part
    lin = LinearProfile("lin", base_s=0.01, per_seq_s=1e-4)
    assert LatencyModel(lat.model, lin).host_s_per_iter == 0.0


def test_engine_energy_moves_by_the_host_seconds(tmp_path):
    """Qwen3-32B on two H100s: with host_w at active_w the energy is the old integral (the
    level changes nothing); at 200 W below it the dynamic energy falls by exactly 2 GPUs x 200 W
    x the host seconds per iteration x the iterations run, in both engines (one iteration per
    step and macro-steps), and no time moves; the catalog's level (0 W above idle) lies below
    both by exactly its own difference."""
    import fleetsim.serving.pod as pod_mod

    c = M.find_config("Qwen/Qwen3-32B", "H100", 2, 8)
    active = catalog.gpu("h100-sxm")["active_w"]
    host_s = _h100_host_s(False)
    for engine in ("iteration", "macro"):
        out = {}
        for level in (active, active - 200.0, None):
            rs = (
                _rs(c, tmp_path, engine)
                if level is None
                else _rs(c, tmp_path, engine, host_w=level)
            )
            want = catalog.gpu("h100-sxm")["host_w"] if level is None else level
            assert rs.tp == 2 and rs.gpu.power.host_w == want
            rec = pod_mod.Pod(rs, 0, 1).run()
            out[level] = (sum(rec.dyn_j), sum(rec.busy_s), rec.iterations)
        e_act, b0, it = out[active]
        assert it > 100 and b0 > 0.0
        e_low, b1, it1 = out[active - 200.0]
        assert (b1, it1) == (b0, it)
        assert e_act - e_low == pytest.approx(2 * 200.0 * host_s * it, rel=1e-9)
        e_cat, b2, it2 = out[None]
        assert (b2, it2) == (b0, it)
        cat_host_w = catalog.gpu("h100-sxm")["host_w"]
        assert e_act - e_cat == pytest.approx(2 * (active - cat_host_w) * host_s * it, rel=1e-9)
        # a sizeable share of a small-batch step: 8 sequences of Qwen3-32B on TP2 take ~13 ms
        assert 0.05 < host_s * it / b0 < 0.4


def test_power_w_and_dynamic_j_agree_with_a_host_share():
    """One GPU-second with a share f of it waiting on the host: power_w's mean and dynamic_j's
    energy are the same, and the share moves them by f x (host_w - active_w)."""
    p = PowerSpec(100.0, 700.0, active_w=250.0, compute_w=500.0, memory_w=120.0, kv_w=180.0)
    q = replace(p, host_w=20.0)
    f = 0.25
    peak_f, peak_b = 1e15, 3e12
    e = q.dynamic_j(
        1.0, 0.1 * peak_f, 0.2 * peak_b, peak_f, peak_b, kv_bytes=0.05 * peak_b, host_s=f
    )
    assert e + q.idle_w == pytest.approx(q.power_w(0.1, 0.2, u_kv=0.05, f_host=f), rel=1e-12)
    assert q.power_w(0.1, 0.2, f_host=f) - p.power_w(0.1, 0.2) == pytest.approx(-f * 230.0)
    assert p.power_w(0.1, 0.2, f_host=f) == p.power_w(0.1, 0.2)  # no level: active_w there


def test_harness_host_share_by_hand():
    """A commit of 3 iterations lasting 30 ms with 2.5 ms of host time each: 0.25 of it waits on
    the host; the share never exceeds what communication and the K loop leave."""
    r = M.SimRun("x", tp=1, peak_flops=1e15, peak_bw=3e12, host_s_per_iter=2.5e-3)
    r.seg_s = np.array([0.03, 0.004])
    r.seg_flops = np.zeros(2)
    r.seg_bytes = np.zeros(2)
    r.seg_iters = np.array([3.0, 1.0])
    r.seg_comm_s = np.array([0.0, 0.003])
    u = M.utilisation(r)
    assert u[7][0] == pytest.approx(0.25, rel=1e-12)
    assert u[7][1] == pytest.approx(0.25, rel=1e-12)  # 1 - 0.75 in communication, not 0.625


def test_fit_recovers_a_synthetic_host_level():
    """Rows drawn from a power model with a host level (1.5-3 ms of host time per iteration of
    10-50 ms commits) are fitted back, the level included; blind to the host time (no level)
    the fit leaves the rows with the largest host share high. A host level above active_w in
    the data stops at active_w."""
    rng = np.random.default_rng(np.random.SeedSequence(41))
    truth = PowerSpec(
        100.0, 700.0, active_w=300.0, compute_w=500.0, memory_w=120.0, kv_w=180.0, host_w=30.0
    )
    runs, meas = [], []
    for _ in range(18):
        r = synthetic_power_run(rng, truth)
        r.host_s_per_iter = float(rng.uniform(1.5e-3, 3e-3))
        r.prefill_u = (*r.prefill_u, 0.0, 0.0)
        runs.append(r)
        meas.append(M.predict_w(r, truth))
    base = PowerSpec(idle_w=100.0, max_w=700.0)
    p = M.fit_power(runs, meas, base)
    for k in ("active_w", "compute_w", "memory_w", "kv_w", "host_w"):
        assert getattr(p, k) == pytest.approx(getattr(truth, k), abs=0.05), k
    blind = M.fit_power(runs, meas, base, host=False)
    assert blind.host_w is None
    share = [M.utilisation(r)[7].mean() for r in runs]
    err = [M.predict_w(r, blind) / m - 1.0 for r, m in zip(runs, meas)]
    hi, lo = np.argsort(share)[-4:], np.argsort(share)[:4]
    assert np.mean([err[i] for i in hi]) > np.mean([err[i] for i in lo]) + 0.005
    # a host level above the active one in the data: bounded at active_w
    hot = replace(truth, host_w=600.0)
    meas_hot = [M.predict_w(r, hot) for r in runs]
    ph = M.fit_power(runs, meas_hot, base)
    assert ph.host_w is not None and ph.host_w <= ph.active_w + 1e-9


#: FlagPerf's DGX A100 readings (data/flagperf-dgx-a100/SOURCE.md): BMC node input power with one
#: GPU busy (seven idle, no process on them) or all eight in an NCCL all-reduce
_FLAGPERF = Path(__file__).resolve().parents[1] / "data" / "flagperf-dgx-a100" / "readings.csv"
#: an A100's bare idle (no CUDA context), gpus.toml's a100-80gb idle_w comment: 50 W bare + 38 W
#: loaded context
_A100_BARE_IDLE_W = 50.0


def _flagperf_rows() -> list[dict]:
    with _FLAGPERF.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_unused_flagperf_row_straddles_its_load():
    """bmm FP16's system mean is left out: 1,579.5 W mean, 1,872 W maximum and 168.87 W
    deviation are four 120 s BMC samples in 26 W steps, three at 1,482 W (57 steps) and one at
    1,872 W (72 steps), so the mean mixes the loaded node with an unloaded one."""
    rows = _flagperf_rows()
    out = [r for r in rows if r["used"] != "yes"]
    assert [r["run"] for r in out] == ["bmm FP16 nativetorch"]
    samples = np.array([57, 57, 57, 72]) * 26.0
    assert samples.mean() == pytest.approx(float(out[0]["system_w"]))
    assert samples.max() == 1872.0 and samples.std() == pytest.approx(168.87, abs=0.01)
    assert len([r for r in rows if r["used"] == "yes"]) == 17


def test_node_host_levels_from_the_measured_dgx_a100():
    """The A100's host levels by hand from the 15 one-GPU runs and the two eight-GPU runs:
    idle = mean of (median of node - busy GPU) - 7 x 50 W = 1,016.7 W and the line node =
    1,156.3 + 1.880 x GPU at eight idle GPUs less 8 x 50 W = 850.3 W: 933.5 -> 930 W; serving
    floor = 2,574 - 8 x 151.42 = 1,362.6 -> 1,360 W. The H100, H200 and B200 keep 2/3 of their
    serving level, inside the measured bracket idle / eight-busy-GPU host = 0.62-0.80."""
    rows = [r for r in _flagperf_rows() if r["used"] == "yes"]
    one = [r for r in rows if r["gpus_busy"] == "1"]
    eight = {r["run"]: r for r in rows if r["gpus_busy"] == "8"}
    assert len(one) == 15 and len(eight) == 2
    assert all(float(r["cpu_util_pct"]) < 5.0 for r in rows)  # the host's CPUs idle throughout
    gpu = np.array([float(r["gpu_w"]) for r in one])
    node = np.array([float(r["system_w"]) for r in one])
    by_median = float(np.median(node - gpu)) - 7 * _A100_BARE_IDLE_W
    assert by_median == pytest.approx(1016.7, abs=0.05)
    slope, intercept = np.polyfit(gpu, node, 1)
    assert (intercept, slope) == (pytest.approx(1156.3, abs=0.1), pytest.approx(1.880, abs=1e-3))
    by_line = intercept + slope * _A100_BARE_IDLE_W - 8 * _A100_BARE_IDLE_W
    assert by_line == pytest.approx(850.3, abs=0.1)
    idle = (by_median + by_line) / 2
    hosts = {k: float(r["system_w"]) - 8 * float(r["gpu_w"]) for k, r in eight.items()}
    intra = hosts["ncclAllReduce in one node"]
    inter = hosts["ncclAllReduce across two nodes"]
    assert (intra, inter) == (pytest.approx(1362.64), pytest.approx(1273.36))
    a100 = catalog.gpu("a100-80gb")
    assert a100["node_idle_w"] == round(idle, -1) == 930
    assert a100["node_overhead_w"] == round(intra, -1) == 1360
    # the bracket: idle over the eight-busy-GPU host; serving draws at least that host
    lo, hi = by_line / intra, by_median / inter
    assert (lo, hi) == (pytest.approx(0.624, abs=1e-3), pytest.approx(0.798, abs=1e-3))
    for name in ("h100-sxm", "h200", "b200", "a100-80gb"):
        g = catalog.gpu(name)
        ratio = g["node_idle_w"] / g["node_overhead_w"]
        assert lo <= ratio <= hi, name
        if name != "a100-80gb":  # assumed: two thirds of the serving level, to 10 W
            assert g["node_idle_w"] == round(g["node_overhead_w"] * 2 / 3, -1), name
