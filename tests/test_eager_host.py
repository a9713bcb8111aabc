"""The eager MoE host floor of the vllm-v1 stack (fleetsim.device.stack, calibrate/eager_host):
an iteration of a mixture of experts above the CUDA-graph capture size takes at least
``eager_moe_layer_host_s`` per MoE layer plus ``eager_seq_host_s`` per sequence, counted by
hand; the GPU's work is unchanged, so the exposed host time draws the active-idle level and
the mean power falls."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import B200_EAGER_LAYER_S as H_LAYER_S
from conftest import B200_EAGER_MLA_S as H_MLA_S
from conftest import B200_EAGER_SEQ_S as H_SEQ_S
from conftest import b200_vllm_profile as _b200

from fleetsim.calibrate import eager_host
from fleetsim.calibrate.mlenergy import catalog_power
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile, run_sums
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack


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
    capture size (512), its GPU work is shorter than 48 x 0.60 ms + 1,024 x 0.06 ms =
    90.24 ms, so the step takes exactly that; its FLOPs and bytes are the GPU's, unchanged."""
    m = model_from_catalog("qwen3-30b-a3b")
    assert m.n_moe_layers == 48
    p = _b200()
    lm, bare = LatencyModel(m, p, 1), LatencyModel(m, _bare(p), 1)
    n, ctx = 1024, 1024 * 300.0
    t0, f0, b0 = bare.decode_step(n, ctx)
    floor = 48 * H_LAYER_S + 1024 * H_SEQ_S
    assert floor == pytest.approx(90.24e-3, rel=1e-12)
    assert t0 < floor  # (the GPU would be faster: the floor binds)
    t, f, b = lm.decode_step(n, ctx)
    assert t == pytest.approx(floor, rel=1e-12)
    assert (f, b) == (f0, b0)
    # the general iteration (the engine's mixed path) gives the same step
    assert lm.iteration(0, 0.0, 0, n, ctx) == (t, f, b)
    assert lm.breakdown(0, 0.0, 0, n, ctx)["eager_host"] == pytest.approx(floor - t0, rel=1e-9)


def test_latent_attention_adds_its_host_time_per_attention_layer():
    """DeepSeek-V3 (61 layers, 58 of them MoE, latent attention) on 8 B200s with expert
    parallelism, 1,024 sequences: 58 x 0.60 ms + 61 x 0.75 ms + 1,024 x 0.06 ms = 141.99 ms."""
    m = model_from_catalog("deepseek-v3", "fp8")
    assert m.is_mla and m.n_moe_layers == 58 and m.n_attn_layers == 61
    p = _b200()
    lm = LatencyModel(m, p, 8, 1, True)
    assert lm.eager_host_s(1024) == pytest.approx(141.99e-3, rel=1e-12)
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
    eager; the floor counts its 8 sequences: 48 x 0.60 ms + 8 x 0.06 ms = 29.28 ms."""
    m = model_from_catalog("qwen3-30b-a3b")
    p = _b200(8)
    assert p.graph_max_tokens == 16
    lm, bare = LatencyModel(m, p, 1), LatencyModel(m, _bare(p), 1)
    args = (250, 250.0**2, 1, 7, 7 * 400.0)
    t0 = bare.iteration(*args)[0]
    assert t0 < 29.28e-3
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
    n, c0, k = 1024, 1024 * 1800.0, 400  # the floor gives way near 2,000 tokens each
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


def _row(
    fixed: list[tuple[float, float, bool]],
    eager: list[tuple[float, int, float, bool]],
    meas: tuple[float, float] = (0.1, 0.1),
    moe_layers: int = 48,
    mla_layers: int = 0,
    key: str = "k",
    model: str = "m",
) -> eager_host.FloorRow:
    """A row by hand: iterations below the capture size (time, tokens, in the window) and
    above it (time, sequences per engine, tokens, in the window)."""
    import numpy as np

    fx = sorted(fixed)
    f_s = np.array([t for t, _, _ in fx])
    f_w = np.array([w for _, w, _ in fx])
    f_in = np.array([b for _, _, b in fx], dtype=bool)
    e_s = np.array([t for t, _, _, _ in eager])
    e_n = np.array([n for _, n, _, _ in eager], dtype=float)
    e_w = np.array([w for _, _, w, _ in eager])
    e_in = np.array([b for _, _, _, b in eager], dtype=bool)
    r = eager_host.FloorRow(
        key=key,
        model=model,
        moe_layers=moe_layers,
        mla_layers=mla_layers,
        meas_median_s=meas[0],
        meas_mean_s=meas[1],
        sim_median_s=math.nan,
        sim_mean_s=math.nan,
        eager_s=e_s,
        eager_seqs=e_n,
        eager_tokens=e_w,
        eager_in_window=e_in,
        fixed_s=f_s,
        fixed_cum_tokens=np.cumsum(f_w),
        total_tokens=float(f_w.sum() + e_w.sum()),
        window_tokens=float(f_w[f_in].sum() + e_w[e_in].sum()),
        window_fixed_token_s=float((f_w[f_in] * f_s[f_in]).sum()),
    )
    # the figures without the floor
    med = eager_host.weighted_median(f_s, np.cumsum(f_w), e_s, e_w)
    mean = (r.window_fixed_token_s + float((e_w[e_in] * e_s[e_in]).sum())) / r.window_tokens
    return dataclasses.replace(r, sim_median_s=med, sim_mean_s=mean)


def test_the_fit_predicts_the_median_and_the_mean_step_by_hand():
    """Two captured iterations of 60 ms (10 tokens each, in the window) and two above the
    capture size: 50 ms of 1,000 sequences (20 tokens, in the window) and 80 ms of 400 (10
    tokens, after it). The floor 48 x 0.60 + 1,000 x 0.06 = 88.8 ms lifts the first; the
    second's 48 x 0.60 + 400 x 0.06 = 52.8 ms stays under its 80 ms. Token-weighted median
    (half of 50 tokens): 60 ms before (50 ms x 20, 60 ms x 20), 80 ms after (60 x 20, 80 x 10);
    the window's mean step (1,200 + 20 x t) / 40: 55 ms before, 74.4 ms after."""
    r = _row([(0.06, 10, True), (0.06, 10, True)], [(0.05, 1000, 20, True), (0.08, 400, 10, False)])
    assert (r.sim_median_s, r.sim_mean_s) == pytest.approx((0.06, 0.055), rel=1e-12)
    med, mean = eager_host.predict(r, H_LAYER_S, H_SEQ_S)
    assert med == pytest.approx(0.08, rel=1e-12)
    assert mean == pytest.approx((1.2 + 20 * 0.0888) / 40, rel=1e-12)
    assert mean == pytest.approx(0.0744, rel=1e-12)
    # a floor under every eager iteration moves nothing; a dense model has none to move
    assert eager_host.predict(r, 1e-4, 1e-6) == (r.sim_median_s, r.sim_mean_s)
    d = _row([(0.06, 10, True)], [], moe_layers=0)
    assert eager_host.predict(d, 1e-3, 1e-4) == (d.sim_median_s, d.sim_mean_s)


def test_the_two_set_median_is_the_harness_weighted_median():
    """``weighted_median`` over a sorted set and an unsorted one is calibrate/mlenergy.py's
    ``_weighted_median`` of both together (ties and integer token weights included)."""
    import numpy as np

    from fleetsim.calibrate.mlenergy import _weighted_median

    rng = np.random.default_rng(7)
    for _ in range(300):
        n_f, n_e = rng.integers(0, 30), rng.integers(1, 30)
        a = rng.integers(1, 12, n_f) * 1e-3  # ties on purpose
        b = rng.integers(1, 12, n_e) * 1e-3
        wa = rng.integers(0, 5, n_f).astype(float)
        wb = rng.integers(1, 5, n_e).astype(float)
        o = np.argsort(a, kind="stable")
        got = eager_host.weighted_median(a[o], np.cumsum(wa[o]), b, wb)
        assert got == _weighted_median(np.concatenate((a, b)), np.concatenate((wa, wb)))


def test_the_fit_recovers_constants_on_its_grid():
    """Rows made from known constants (on the grid) are fitted back to them, and so is each
    model from the others (leave-one-model-out error 0)."""
    rows = []
    for i, (layers, batch) in enumerate([(48, 1024), (94, 1024), (94, 2048), (61, 768)]):
        f = layers * 5e-4 + batch * 4e-5
        r = _row([], [(0.5 * f, batch, 10.0, True)], moe_layers=layers, key=str(i), model=str(i))
        rows.append(dataclasses.replace(r, meas_median_s=f, meas_mean_s=f))
    assert eager_host.fit(rows) == pytest.approx((5e-4, 4e-5, 0.0), abs=1e-12)
    assert abs(eager_host.lomo(rows)).max() < 1e-9
    f = eager_host.fit_gpu(rows, "B200")
    assert f.adopted and abs(f.err_fitted).max() < 1e-9 and abs(f.err_without).min() > 0.49


B1536 = "Qwen/Qwen3-30B-A3B-Instruct-2507 lm-arena-chat B200 x1 TP1/EP1/DP1 b1536"


def test_the_fit_predicts_what_the_harness_simulates():
    """The fit's median ITL and mean step of a row are the harness's simulation with the floor
    (the iteration engine, ``simulate_config``), to rounding: the run without the floor has
    the same iterations (every request arrives at t = 0), each above the capture size at
    max(its time, the floor). Qwen3-30B-A3B at 1,536 sequences on one B200: 100.5 ms, below
    the floor of a full batch (48 x 0.60 + 1,536 x 0.06 = 120.96 ms), because the median
    counts the whole run, whose last iterations run fewer sequences (the earlier fit, which
    put the full-batch floor on the median, said 110.4 ms where the harness gave 100.5)."""
    from fleetsim.calibrate import mlenergy as ml

    c = next(c for c in ml.read_configs() if c.key == B1536)
    zero = dict.fromkeys(eager_host.FLOOR_FIELDS, 0.0)
    r0 = ml.simulate_config(c, engine="iteration", profile_fields=zero, record_steps=True)
    assert not r0.error and len(r0.step_s) == len(r0.step_tokens) > 1000
    row = eager_host.row_from_run(c, r0)
    med, mean = eager_host.predict(row, H_LAYER_S, H_SEQ_S, H_MLA_S)
    s1 = ml.step_split(c, ml.simulate_config(c, engine="iteration"))
    assert med == pytest.approx(s1.sim_median_s, rel=1e-9)
    assert mean == pytest.approx(s1.sim_mean_s, rel=1e-9)
    assert med < 48 * H_LAYER_S + 1536 * H_SEQ_S - 5e-3 < mean


@pytest.mark.slow
def test_committed_eager_host_constants_are_the_refit():
    """Refit from data/mlenergy-v3 (every non-suspect B200 row of a MoE model simulated without
    the floor, about 3 minutes on 2 workers): the catalog's constants are the fit's grid point,
    and its leave-one-model-out mean-step error is the one committed."""
    import numpy as np

    rows = eager_host.simulate_rows("B200", workers=2)
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


def test_the_fit_says_so_in_one_line_where_a_folder_has_no_moe_rows(tmp_path, capsys):
    """``python -m fleetsim.calibrate.eager_host --data DIR``: a folder without a non-suspect
    row of a mixture of experts on the GPU exits 2 with one line naming the fix."""
    import csv
    import shutil

    from fleetsim.calibrate.mlenergy import DATA_DIR

    with open(DATA_DIR / "configurations.csv", newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["model_id"] == "Qwen/Qwen3-8B" and r["gpu_model"] == "H100"
        ]
    with open(tmp_path / "configurations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    shutil.copy(DATA_DIR / "output_lengths.csv", tmp_path / "output_lengths.csv")
    assert eager_host.main(["--data", str(tmp_path), "--gpu", "B200", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no non-suspect B200 row of a mixture of experts" in err[0]
    assert "fix: --gpu with such rows" in err[0]


def test_write_replaces_only_the_gpus_eager_host_lines(tmp_path):
    """``--write``: the B200 section's four eager host lines take the fit's constants and its
    leave-one-model-out mean-step median, in place; every other line of stacks.toml stays; a
    fit not adopted removes them (no floor)."""
    import tomllib

    import numpy as np

    path = tmp_path / "stacks.toml"
    before = eager_host.STACKS_TOML.read_text()
    path.write_text(before)
    rows = [_row([], [(0.01, 1000, 10.0, True)], key=str(i), model=str(i)) for i in range(2)]
    lomo = np.array([[0.0, 0.01], [0.0, 0.03]])
    f = eager_host.FloorFit("B200", rows, (8e-4, 3e-5, 5e-4), lomo + 0.5, lomo, lomo)
    assert f.adopted
    eager_host.write_catalog(f, "b200", path)
    after = path.read_text()
    b200 = tomllib.loads(after)["vllm-v1"]["b200"]
    assert (b200["eager_moe_layer_host_s"], b200["eager_seq_host_s"]) == (8e-4, 3e-5)
    assert b200["eager_mla_layer_host_s"] == 5e-4 and b200["eager_host_lomo_median_err"] == 0.02
    changed = [(a, b) for a, b in zip(before.split("\n"), after.split("\n"), strict=True) if a != b]
    assert len(changed) == 4 and all(a.startswith("eager_") for a, _ in changed)
    eager_host.write_catalog(dataclasses.replace(f, err_lomo=lomo + 1.0), "b200", path)
    b200 = tomllib.loads(path.read_text())["vllm-v1"]["b200"]
    # (the MLA prefill path's line, calibrate/mla_prefill.py, is not the floor's: it stays)
    assert not any(k.startswith("eager_") and "prefill" not in k for k in b200)
    assert len(path.read_text().split("\n")) == len(before.split("\n")) - 4
