"""The eager MoE host floor of the vllm-v1 stack (fleetsim.device.stack, calibrate/eager_host):
an iteration of a mixture of experts above the CUDA-graph capture size takes at least
``eager_moe_layer_host_s`` per MoE layer plus ``eager_seq_host_s`` per sequence, counted by
hand; the GPU's work is unchanged, so the exposed host time draws the active-idle level and
the mean power falls."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fleetsim.calibrate import eager_host
from fleetsim.calibrate.mlenergy import catalog_power
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile, run_sums
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

H_LAYER_S = 7.0e-4  # the B200's committed constants (catalog/stacks.toml)
H_SEQ_S = 5.0e-5
H_MLA_S = 6.0e-4


def _b200(max_num_seqs: int = 1024) -> RooflineProfile:
    p = apply_stack(catalog_profile("b200", catalog.gpu("b200")), "vllm-v1", "b200", max_num_seqs)
    assert isinstance(p, RooflineProfile)
    return p


def _bare(p: RooflineProfile) -> RooflineProfile:
    return dataclasses.replace(p, eager_moe_layer_host_s=0.0, eager_seq_host_s=0.0)


def test_the_b200_carries_the_fitted_floor_and_the_h100_none():
    p = _b200()
    assert p.eager_moe_layer_host_s == H_LAYER_S and p.eager_seq_host_s == H_SEQ_S
    assert p.eager_mla_layer_host_s == H_MLA_S
    h = apply_stack(catalog_profile("h100-sxm", catalog.gpu("h100-sxm")), "vllm-v1", "h100-sxm", 64)
    assert isinstance(h, RooflineProfile) and h.eager_moe_layer_host_s == 0.0


def test_an_eager_moe_decode_step_takes_its_host_floor():
    """Qwen3-30B-A3B (48 MoE layers) on one B200, 1,024 sequences at 300 tokens each: above the
    capture size (512), its GPU work is shorter than 48 x 0.70 ms + 1,024 x 0.05 ms =
    84.8 ms, so the step takes exactly that; its FLOPs and bytes are the GPU's, unchanged."""
    m = model_from_catalog("qwen3-30b-a3b")
    assert m.n_moe_layers == 48
    p = _b200()
    lm, bare = LatencyModel(m, p, 1), LatencyModel(m, _bare(p), 1)
    n, ctx = 1024, 1024 * 300.0
    t0, f0, b0 = bare.decode_step(n, ctx)
    floor = 48 * H_LAYER_S + 1024 * H_SEQ_S
    assert floor == pytest.approx(84.8e-3, rel=1e-12)
    assert t0 < floor  # (the GPU would be faster: the floor binds)
    t, f, b = lm.decode_step(n, ctx)
    assert t == pytest.approx(floor, rel=1e-12)
    assert (f, b) == (f0, b0)
    # the general iteration (the engine's mixed path) gives the same step
    assert lm.iteration(0, 0.0, 0, n, ctx) == (t, f, b)
    assert lm.breakdown(0, 0.0, 0, n, ctx)["eager_host"] == pytest.approx(floor - t0, rel=1e-9)


def test_latent_attention_adds_its_host_time_per_attention_layer():
    """DeepSeek-V3 (61 layers, 58 of them MoE, latent attention) on 8 B200s with expert
    parallelism, 1,024 sequences: 58 x 0.70 ms + 61 x 0.60 ms + 1,024 x 0.05 ms = 128.4 ms."""
    m = model_from_catalog("deepseek-v3", "fp8")
    assert m.is_mla and m.n_moe_layers == 58 and m.n_attn_layers == 61
    p = _b200()
    lm = LatencyModel(m, p, 8, 1, True)
    assert lm.eager_host_s(1024) == pytest.approx(128.4e-3, rel=1e-12)
    assert lm.eager_host_s(1024) == pytest.approx(
        58 * H_LAYER_S + 61 * H_MLA_S + 1024 * H_SEQ_S, rel=1e-12
    )


def test_a_captured_step_and_a_dense_model_keep_their_gpu_time():
    m = model_from_catalog("qwen3-30b-a3b")
    p = _b200()
    lm, bare = LatencyModel(m, p, 1), LatencyModel(m, _bare(p), 1)
    # 512 sequences: replayed from a graph (the capture size is 512), no floor
    assert lm.decode_step(512, 512 * 300.0) == bare.decode_step(512, 512 * 300.0)
    # a dense model above the capture size: no MoE layer, no floor
    d = model_from_catalog("qwen3-8b")
    assert LatencyModel(d, p, 1).decode_step(1024, 1024 * 300.0) == LatencyModel(
        d, _bare(p), 1
    ).decode_step(1024, 1024 * 300.0)


def test_a_small_batch_prompt_step_above_the_capture_size_pays_the_floor():
    """max_num_seqs 8 (capture size 16): a step of 7 decodes and a 250-token prompt chunk runs
    eager; the floor counts its 8 sequences: 48 x 0.70 ms + 8 x 0.05 ms = 34.0 ms."""
    m = model_from_catalog("qwen3-30b-a3b")
    p = _b200(8)
    assert p.graph_max_tokens == 16
    lm, bare = LatencyModel(m, p, 1), LatencyModel(m, _bare(p), 1)
    args = (250, 250.0**2, 1, 7, 7 * 400.0)
    t0 = bare.iteration(*args)[0]
    assert t0 < 34.0e-3
    assert lm.iteration(*args)[0] == pytest.approx(48 * H_LAYER_S + 8 * H_SEQ_S, rel=1e-12)
    # a pure decode step of the 8 sequences is captured: no floor
    assert lm.decode_step(8, 8 * 400.0) == bare.decode_step(8, 8 * 400.0)


def test_the_floor_is_per_engine_under_data_parallelism():
    """Four data-parallel engines of 1,024 sequences: each engine's host handles 256."""
    m = model_from_catalog("qwen3-30b-a3b")
    p = _b200(128)  # the engine's capture size 256, the replica's 4 x 256
    lm = LatencyModel(m, p, 1, 4, True)
    assert lm.eager_host_s(1024) == pytest.approx(48 * H_LAYER_S + 256 * H_SEQ_S, rel=1e-12)
    assert lm.eager_host_s(1023) == lm.eager_host_s(1024)  # ceil(1023 / 4) = 256


def test_run_sums_hold_across_the_floor():
    """The closed-form run of k decode steps equals the steps one by one when the run starts
    on the floor and its growing context takes it past the floor onto the KV read."""
    m = model_from_catalog("qwen3-30b-a3b")
    lm = LatencyModel(m, _b200(), 1)
    bare = LatencyModel(m, _bare(_b200()), 1)
    n, c0, k = 1024, 1024 * 1500.0, 400  # the floor gives way near 1,700 tokens each
    steps = [lm.decode_step(n, c0 + n * i)[0] for i in range(k)]
    bare_steps = [bare.decode_step(n, c0 + n * i)[0] for i in range(k)]
    on_floor = [abs(s - b) > 1e-12 for s, b in zip(steps, bare_steps, strict=True)]
    assert on_floor[0] and not on_floor[-1]  # the run crosses from the floor to the GPU
    assert run_sums(lm.run_coeffs(n), c0, n, k)[0] == pytest.approx(math.fsum(steps), rel=1e-12)


def test_the_exposed_host_time_draws_the_active_idle_level():
    """The same work in a longer step: the step's energy grows by exactly (idle + active_w) x
    the exposed host time (no FLOP or byte term moves), so its mean power falls."""
    m = model_from_catalog("qwen3-30b-a3b")
    p = _b200()
    pw = catalog_power("B200")  # the catalog's B200 power model
    n, ctx = 1024, 1024 * 300.0
    t, f, b = LatencyModel(m, p, 1).decode_step(n, ctx)
    t0, f0, b0 = LatencyModel(m, _bare(p), 1).decode_step(n, ctx)

    def energy(dt: float, fl: float, by: float) -> float:
        return pw.idle_w * dt + pw.dynamic_j(dt, fl, by, p.peak_flops, p.mem_bw_bytes_per_s)

    assert energy(t, f, b) - energy(t0, f0, b0) == pytest.approx(
        (pw.idle_w + pw.active_w) * (t - t0), rel=1e-9
    )
    assert energy(t, f, b) / t < energy(t0, f0, b0) / t0


def _row(**kw) -> eager_host.FloorRow:
    base = {
        "key": "k",
        "model": "m",
        "moe_layers": 48,
        "mla_layers": 0,
        "capture_tokens": 512,
        "dp": 1,
        "meas_median_s": 0.09,
        "meas_mean_s": 0.1,
        "sim_median_s": 0.06,
        "sim_mean_s": 0.065,
        "decode_step_s": 0.06,
        "prompt_step_s": 0.08,
        "prompt_share": 0.25,
        "tokens_per_prompt_step": 20.0,
        "batch": 1024.0,
    }
    return eager_host.FloorRow(**{**base, **kw})


def test_the_fit_predicts_the_median_and_the_mean_step_by_hand():
    r = _row()
    med, mean = eager_host.predict(r, H_LAYER_S, H_SEQ_S)
    f = 48 * H_LAYER_S + 1024 * H_SEQ_S  # 84.8 ms, above both simulated steps
    assert med == pytest.approx(f, rel=1e-12)
    # every step rises to the floor: 0.75 x (f - 60 ms) + 0.25 x (f - 80 ms) on the mean
    assert mean == pytest.approx(0.065 + 0.75 * (f - 0.06) + 0.25 * (f - 0.08), rel=1e-12)
    # below the capture size only the prompt-carrying steps above it pay
    small = _row(
        batch=400.0,
        tokens_per_prompt_step=250.0,
        sim_median_s=0.04,
        decode_step_s=0.04,
        prompt_step_s=0.045,
    )
    med, mean = eager_host.predict(small, H_LAYER_S, H_SEQ_S)
    f = 48 * H_LAYER_S + 400 * H_SEQ_S  # 53.6 ms
    assert med == 0.04 and mean == pytest.approx(0.065 + 0.25 * (f - 0.045), rel=1e-12)
    # a dense model never pays
    assert eager_host.predict(_row(moe_layers=0), 1e-3, 1e-4) == (0.06, 0.065)


def test_the_fit_recovers_constants_on_its_grid():
    """Rows made from known constants (on the grid) are fitted back to them."""
    rows = []
    for i, (layers, batch) in enumerate([(48, 1024), (94, 1024), (94, 2048), (61, 768)]):
        f = layers * 5e-4 + batch * 4e-5
        rows.append(
            _row(
                key=str(i),
                model=str(i),
                moe_layers=layers,
                batch=float(batch),
                meas_median_s=f,
                meas_mean_s=f,
                sim_median_s=0.5 * f,
                sim_mean_s=0.5 * f,
                decode_step_s=0.5 * f,
                prompt_step_s=0.5 * f,
            )
        )
    assert eager_host.fit(rows) == pytest.approx((5e-4, 4e-5, 0.0), abs=1e-12)
    assert abs(eager_host.lomo(rows)).max() < 1e-9


@pytest.mark.slow
def test_committed_eager_host_constants_are_the_refit():
    """Refit from data/mlenergy-v3 (every non-suspect B200 row simulated without the floor,
    about 3 minutes): the catalog's constants are the fit's grid point, and its
    leave-one-model-out mean-step error is the one committed."""
    import numpy as np

    rows = eager_host.simulate_rows("B200")
    fit = eager_host.fit(rows)
    c = catalog.stacks()["vllm-v1"]["b200"]
    assert fit == pytest.approx(tuple(c[k] for k in eager_host.FLOOR_FIELDS), rel=1e-9)
    lomo = float(np.median(np.abs(eager_host.lomo(rows)[:, 1])))
    assert lomo == pytest.approx(c["eager_host_lomo_median_err"], abs=5e-4)


def test_the_latency_cli_shows_the_exposed_host_time():
    """fleetsim latency: at 1,024 sequences the row's overhead column carries the floor's
    exposed part (the parts still sum to the total), at 256 (captured) it has none."""
    from fleetsim.apps import latency

    args = latency.build_parser().parse_args(
        ["--gpu", "b200", "--model", "qwen3-30b-a3b", "--batch", "256,1024", "--context", "300"]
    )
    small, big = latency.rows(args)
    assert big["total_s"] == pytest.approx(48 * H_LAYER_S + 1024 * H_SEQ_S, rel=1e-12)
    eh = big["parts_s"]["eager_host"]
    assert eh > 0.0 and "eager_host" not in small["parts_s"]
    assert big["overhead_s"] - small["overhead_s"] == pytest.approx(eh, rel=1e-12)
    for r in (small, big):
        total = r["compute_s"] + r["memory_s"] + r["comm_s"] + r["overhead_s"]
        assert total == pytest.approx(r["total_s"], rel=1e-12)
