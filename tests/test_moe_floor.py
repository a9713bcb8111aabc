"""The fused MoE kernel's loop latency (fleetsim.device.moe.FusedMoeFit, catalog/moe.toml):
vLLM's default block configuration, hand-counted loop latencies, the catalog lookup, the tuned
shapes, and the step time against measured ML.ENERGY MoE rows."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from fleetsim.device.kernels import catalog_kernel_fit
from fleetsim.device.moe import (
    NO_MOE_FIT,
    FusedMoeFit,
    MoeLayout,
    catalog_moe_fit,
    default_block_config,
    fp8_default_grid_waves,
    fp8_default_loop_latency_s,
    grouped_gemm_time_s,
    k_loop_latency_s,
    moe_layer_parts_s,
)


def test_default_block_config_is_vllms():
    """vLLM ``get_default_config``: 16-bit M 16 / N 32 / K 64 while the tokens are at most the
    local experts (M <= E), else M 64 / N 64 / K 32; fp8 with [128, 128] block scales M 64 /
    N 128 / K 128 whatever the tokens."""
    assert default_block_config(8, 16, False) == (16, 32, 64, 2)
    assert default_block_config(16, 16, False) == (16, 32, 64, 2)  # M == E: still the small one
    assert default_block_config(17, 16, False) == (64, 64, 32, 2)
    assert default_block_config(8, 16, True) == (64, 128, 128, 3)
    assert default_block_config(4096, 16, True) == (64, 128, 128, 3)


def test_loop_latency_is_the_k_loop_of_one_wave():
    """4 touched experts, 8 rows each, a 3,072 x 4,096 weight, 8 tokens on 16 local experts:
    tiles 16 x 32 x 64, so 4 x 1 x 96 = 384 programs; a program stages (16x64 + 64x32) x 2 bytes
    x 2 stages = 12,288 bytes, 18 fit in 228 KiB, capped at 16 per SM: 2,112 at once on 132 SMs,
    one wave. The latency is the 4,096 / 64 = 64 K steps: 64 us at 1 us a step."""
    mf = FusedMoeFit(k_step_s=1e-6, sms=132, smem_per_sm_bytes=228 * 1024)
    assert k_loop_latency_s(mf, 8, 16, 4, 32, 3072, 4096, False) == pytest.approx(64e-6, rel=1e-12)
    # fp8 on the same shape: K 128, so 32 steps of its own step time
    mf8 = FusedMoeFit(k_step_fp8_s=3e-6, sms=132, smem_per_sm_bytes=228 * 1024)
    assert k_loop_latency_s(mf8, 8, 16, 4, 32, 3072, 4096, True) == pytest.approx(96e-6, rel=1e-12)
    assert k_loop_latency_s(NO_MOE_FIT, 8, 16, 4, 32, 3072, 4096, False) == 0.0


def test_loop_latency_grows_with_the_waves():
    """16 experts with 200 rows each (tiles 64 x 64 x 32: 4 row blocks), n = 3,072 (48 column
    blocks): 16 x 4 x 48 = 3,072 programs; a program stages (64x32 + 32x64) x 2 x 2 = 16,384
    bytes, 14 per SM, 1,848 at once on 132 SMs: 3,072 / 1,848 waves of 4,096 / 32 = 128 steps."""
    mf = FusedMoeFit(k_step_s=1e-6, sms=132, smem_per_sm_bytes=228 * 1024)
    want = 128 * 1e-6 * 3072 / (132 * 14)
    got = k_loop_latency_s(mf, 3200, 16, 16, 16 * 200, 3072, 4096, False)
    assert got == pytest.approx(want, rel=1e-12)


def test_grouped_gemm_adds_the_loop_latency():
    kf = catalog_kernel_fit("h100-sxm")
    assert kf is not None
    args = (kf, 989e12, 3.35e12, 32.0, 4.0, 3072.0, 4096.0, 2.0)
    free = grouped_gemm_time_s(*args)
    assert grouped_gemm_time_s(*args, 0.0) == free
    assert grouped_gemm_time_s(*args, 1e-3) == pytest.approx(free + 1e-3, rel=1e-12)
    assert grouped_gemm_time_s(*args, 2e-3) - grouped_gemm_time_s(*args, 1e-3) == pytest.approx(
        1e-3, rel=1e-9
    )


def test_catalog_lookup():
    b200 = catalog_moe_fit("b200-analytic")
    assert b200.sms == 148 and b200.k_step_s > 0.0 and b200.k_step_fp8_s > 0.0
    assert catalog_moe_fit("b200") == b200
    assert catalog_moe_fit("my-device", catalog_gpu="b200") == b200
    h100 = catalog_moe_fit("h100-sxm-mlenergy")
    assert h100.sms == 132 and (8, 7168) in h100.tuned
    assert catalog_moe_fit("tpu-v5e") == NO_MOE_FIT


def test_tuned_shapes_keep_the_roofline():
    """Mixtral-8x7B under TP2 on an H100 is an (E 8, N 7,168) layer, one vLLM ships a tuned
    configuration for: its grouped GEMMs are those without the loop latency, bit for bit; with
    the shape taken off the tuned list they get it."""
    from fleetsim.device.modelspec import model_from_catalog

    m = model_from_catalog("mixtral-8x7b")
    kf = catalog_kernel_fit("h100-sxm")
    assert kf is not None
    lay = MoeLayout(2, 1, False)
    mf = catalog_moe_fit("h100-sxm")
    for t in (1, 8, 64):
        base = moe_layer_parts_s(kf, 989e12, 3.35e12, m, lay, t, 2.0, 450e9, 5e-6)
        tuned = moe_layer_parts_s(kf, 989e12, 3.35e12, m, lay, t, 2.0, 450e9, 5e-6, None, None, mf)
        assert tuned["moe_gemm_up"] == base["moe_gemm_up"]
        assert tuned["moe_gemm_down"] == base["moe_gemm_down"]
        untuned = FusedMoeFit(k_step_s=mf.k_step_s, sms=mf.sms, smem_per_sm_bytes=2e5)
        slow = moe_layer_parts_s(
            kf, 989e12, 3.35e12, m, lay, t, 2.0, 450e9, 5e-6, None, None, untuned
        )
        assert slow["moe_gemm_down"] > base["moe_gemm_down"]


def test_fp8_default_loop_is_the_k_steps_of_one_launch():
    """Without a tuned fp8 file the launch pays ceil(K / 128) steps of ``k_step_fp8_default_s``
    once: K 4,096 is 32 steps (128 us at 4 us), K 1,536 is 12 (48 us), K 1,537 is 13; no step
    time, no latency."""
    mf = FusedMoeFit(k_step_fp8_default_s=4e-6)
    assert fp8_default_loop_latency_s(mf, 4096) == pytest.approx(128e-6, rel=1e-12)
    assert fp8_default_loop_latency_s(mf, 1536) == pytest.approx(48e-6, rel=1e-12)
    assert fp8_default_loop_latency_s(mf, 1537) == pytest.approx(52e-6, rel=1e-12)
    assert fp8_default_loop_latency_s(NO_MOE_FIT, 4096) == 0.0


def _qwen3_235b():
    from fleetsim.config.hf import read_hf_config_named
    from fleetsim.device.modelspec import ModelSpec

    cfg = Path(__file__).resolve().parent.parent / "data" / "models" / "Qwen"
    arch, name = read_hf_config_named(cfg / "Qwen3-235B-A22B-Instruct-2507-FP8" / "config.json")
    return ModelSpec(name=name, **arch)


def test_untuned_fp8_layer_pays_the_local_experts_waves_at_every_batch():
    """Qwen3-235B-A22B-FP8 under EP4 on the H100 is an fp8 (E 32, N 1,536) layer, which vLLM ships
    no tuned file for: the default tiles' grid over the 32 local experts is 32 x 24 = 768 gate+up
    programs (132 SMs x 3 = 396 a wave: 2 waves) and 32 x 32 = 1,024 down programs (3 waves), so the
    grouped GEMMs add exactly 2 x 32 and 3 x 12 K steps (with every wave the whole loop; with
    ``fp8_wave_frac`` 0.25 a later wave adds a quarter of it: 32 x 1.25 + 12 x 1.5), at 8 and at 256
    tokens alike (at most 64 rows per expert). Listed as tuned, the same layer pays the same waves
    at the tuned step ``k_step_fp8_s`` (before, the per-wave latency of ``k_loop_latency_s`` over
    the touched experts, which grew with them)."""
    m = _qwen3_235b()
    kf = catalog_kernel_fit("h100-sxm")
    assert kf is not None
    lay = MoeLayout(4, 1, True)
    step = 4e-6
    untuned = FusedMoeFit(k_step_fp8_s=3e-6, k_step_fp8_default_s=step)
    tuned = FusedMoeFit(k_step_fp8_s=3e-6, k_step_fp8_default_s=step, tuned_fp8=((32, 1536),))
    args = (kf, 989e12, 3.35e12, m, lay)
    for t in (8, 256):
        bare = moe_layer_parts_s(*args, t, 1.0, 450e9, 5e-6, 1.0, 1979e12, NO_MOE_FIT, True)
        slow = moe_layer_parts_s(*args, t, 1.0, 450e9, 5e-6, 1.0, 1979e12, untuned, True)
        up = slow["moe_gemm_up"] - bare["moe_gemm_up"]
        assert up == pytest.approx(2 * 32 * step, rel=1e-9)
        assert slow["moe_gemm_down"] - bare["moe_gemm_down"] == pytest.approx(
            3 * 12 * step, rel=1e-9
        )
        assert slow["moe_fp8_loop"] == pytest.approx((64 + 36) * step, rel=1e-9)
        # each wave after the first at 0.25 of the loop: 32 x 1.25 + 12 x 1.5 K steps
        part = replace(untuned, fp8_wave_frac=0.25)
        fr = moe_layer_parts_s(*args, t, 1.0, 450e9, 5e-6, 1.0, 1979e12, part, True)
        assert fr["moe_fp8_loop"] == pytest.approx((40 + 18) * step, rel=1e-9)
        fast = moe_layer_parts_s(*args, t, 1.0, 450e9, 5e-6, 1.0, 1979e12, tuned, True)
        assert fast["moe_gemm_up"] - bare["moe_gemm_up"] == pytest.approx(2 * 32 * 3e-6, rel=1e-9)
        assert fast["moe_fp8_loop"] == pytest.approx((64 + 36) * 3e-6, rel=1e-9)


def test_fp8_default_grid_waves_by_hand():
    """The default fp8 tiles' grid over every local expert, hand-counted. A program stages (64 x 128
    + 128 x 128) x 3 = 73,728 bytes: 3 in 228 KB (233,472 bytes) on both GPUs. B200 (148 x 3 = 444 a
    wave), Qwen3-235B-A22B-FP8 (d 4,096, expert width 1,536): EP2, 64 local experts, gate+up 64 x 24
    = 1,536 programs = 3.46 -> 4 waves, down 64 x 32 = 2,048 = 4.61 -> 5; EP4, 32: 768 = 1.73 -> 2,
    1,024 = 2.31 -> 3. H100 (132 x 3 = 396): EP4 768 = 1.94 -> 2, 1,024 = 2.59 -> 3. Past 64 rows
    per expert each expert takes a second row block. A prefill of 8,192 tokens under EP4 routes
    8,192 x 8 / 4 = 16,384 rows, 512 per local expert = 8 row blocks: 8 x 768 = 6,144 programs =
    13.8 -> 14 waves on the B200. No experts: no waves."""
    b200 = FusedMoeFit(sms=148, smem_per_sm_bytes=233472)
    h100 = FusedMoeFit(sms=132, smem_per_sm_bytes=233472)
    assert fp8_default_grid_waves(b200, 64, 32, 3072) == 4
    assert fp8_default_grid_waves(b200, 64, 32, 4096) == 5
    assert fp8_default_grid_waves(b200, 32, 16, 3072) == 2
    assert fp8_default_grid_waves(b200, 32, 16, 4096) == 3
    assert fp8_default_grid_waves(b200, 32, 2048, 3072) == 2  # 64 rows per expert: one block
    assert fp8_default_grid_waves(b200, 32, 2049, 3072) == 4  # 65: two, 1,536 programs
    assert fp8_default_grid_waves(h100, 32, 16, 3072) == 2
    assert fp8_default_grid_waves(h100, 32, 16, 4096) == 3
    assert fp8_default_grid_waves(b200, 32, 8192 * 8 / 4, 3072) == 14
    assert fp8_default_grid_waves(b200, 0, 16, 3072) == 0


def test_untuned_fp8_loop_follows_the_local_experts_on_the_b200():
    """The brief's gap (issues 21/22): Qwen3-235B-Thinking-FP8 on the B200 measures 36.9 ms on
    2 GPUs (64 local experts) and 24.6 ms on 4 (32) at 8 sequences, 50.6 and 32.7 ms at 64.
    With the catalog's constants the untuned fp8 loop of one MoE layer is 32 K steps x (1 + 3
    a) + 12 x (1 + 4 a) under EP2 (4 and 5 waves) and 32 x (1 + a) + 12 x (1 + 2 a) under EP4 (2
    and 3 waves), ``a`` the catalog's ``fp8_wave_frac`` (0.4: 101.6 and 66.4 step times), at 8
    and at 64 tokens alike (before: 44 steps once per launch for both, so the simulated EP4 step
    was only 1.12x faster than EP2's and 25-29 % too slow); and the catalog's decode steps at
    the rows' mean batch and context are within 12 % of the measured ITL on both servers."""
    from fleetsim.calibrate import mlenergy as ml

    m = _qwen3_235b()
    kf = catalog_kernel_fit("b200")
    mf = catalog_moe_fit("b200")
    assert kf is not None and mf.k_step_fp8_default_s > 0.0
    assert (64, 1536) not in mf.tuned_fp8 and (32, 1536) not in mf.tuned_fp8
    a = mf.fp8_wave_frac
    assert a == pytest.approx(0.4)
    for ep, steps in (
        (2, 32 * (1 + 3 * a) + 12 * (1 + 4 * a)),
        (4, 32 * (1 + a) + 12 * (1 + 2 * a)),
    ):
        for t in (8, 64):
            args = (kf, 2250e12, 8e12, m, MoeLayout(ep, 1, True), t, 1.0, 900e9, 5e-6, 1.0)
            loop = moe_layer_parts_s(*args, 4500e12, mf, True)["moe_fp8_loop"]
            assert loop == pytest.approx(steps * mf.k_step_fp8_default_s, rel=1e-9)
    for gpus in (2, 4):
        for batch in (8, 64):
            c = ml.find_config(
                "Qwen/Qwen3-235B-A22B-Thinking-2507-FP8", "B200", gpus, batch, "gpqa"
            )
            lm, b, ctx = _decode_at_the_rows_mean(c)
            err = lm.decode_time(b, ctx) / (c.itl_median_ms / 1e3) - 1.0
            assert err == pytest.approx(0.0, abs=0.12), (gpus, batch, err)


def _row(model: str, gpu: str, gpus: int, batch: int):
    from fleetsim.calibrate import mlenergy as ml

    return ml.find_config(model, gpu, gpus, batch)


def _decode_at_the_rows_mean(c):
    """The row's latency model (as calibrate/moe_fit.py builds it), its mean batch and its mean
    context (prompt + the output's length-biased half)."""
    from fleetsim.calibrate import mlenergy as ml
    from fleetsim.calibrate.moe_fit import latency_model

    ctx = int(ml.PROMPT_TOKENS[c.task] + ml.length_biased_half(c))
    return latency_model(c), max(1, round(c.avg_batch_size)), ctx


@pytest.mark.parametrize(
    ("model", "gpu", "gpus", "batch"),
    [
        ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "H100", 8, 64),  # fp8, EP8: was -42%
        ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "B200", 2, 16),  # fp8, EP2: was -47%
        ("Qwen/Qwen3-235B-A22B-Instruct-2507", "B200", 4, 128),  # bf16 EP4, M > E: was -33%
        ("deepseek-ai/DeepSeek-V3.1", "B200", 8, 128),  # fp8 MLA, EP8, FlashInfer: was -34%
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "H100", 1, 32),  # tuned shape: unchanged, +0%
    ],
)
def test_moe_decode_step_matches_the_measured_itl(model, gpu, gpus, batch):
    """The catalog's step time of a decode step at the row's mean batch and mean context
    (prompt + the output's length-biased half) against the measured median inter-token
    latency of ML.ENERGY v3 (vLLM 0.11.1), within 25% (the issue's floor allows 40% on the
    worst row; the DeepSeek row, whose server ran FlashInfer's TensorRT-LLM MoE kernel
    (server_env.csv), is +1%). Without the fused-MoE kernel constants (the catalog before; for
    DeepSeek the FlashInfer kernel's fixed time and bandwidth fraction) the first four were
    33-47% too fast (DeepSeek -42%)."""
    c = _row(model, gpu, gpus, batch)
    lm, b, ctx = _decode_at_the_rows_mean(c)
    step = lm.decode_time(b, ctx)
    assert step / (c.itl_median_ms / 1e3) - 1.0 == pytest.approx(0.0, abs=0.25)
    lm.use_moe_fit(NO_MOE_FIT)  # without the loop latency: too fast on the untuned rows
    bare = lm.decode_time(b, ctx)
    if "30B" in model:
        assert bare == pytest.approx(step, rel=1e-12)
    else:
        assert bare / (c.itl_median_ms / 1e3) - 1.0 < -0.25


@pytest.mark.parametrize("batch", [8, 32, 128])
def test_untuned_fp8_step_is_flat_in_batch_as_measured(batch):
    """Qwen3-235B-A22B-FP8 on 4 H100s (EP4: 32 local experts, no tuned fp8 file) measures 35.2 /
    42.8 / 53.1 ms at 8 / 32 / 128 sequences. The catalog's decode step at the row's mean batch
    and context is within 10 % at each, and its fp8 loop is the same at every batch: 94 MoE
    layers x (32 x (1 + a) + 12 x (1 + 2 a)) K steps of ``k_step_fp8_default_s`` (2 and 3 waves of
    :func:`fp8_default_grid_waves` over the 32 local experts, 132 x 3 programs a wave; ``a`` the
    catalog's ``fp8_wave_frac``, the share of the loop each wave after the first adds). With
    the per-wave loop over the touched experts (listed as tuned, as every fp8 layer was before
    main e88b8c5) it was -21 % at 8 and +15 / +20 % at 32 / 128."""
    c = _row("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "H100", 4, batch)
    lm, b, ctx = _decode_at_the_rows_mean(c)
    meas = c.itl_median_ms / 1e3
    assert lm.decode_time(b, ctx) / meas - 1.0 == pytest.approx(0.0, abs=0.10)
    mf = lm._moe_fit
    assert (32, 1536) not in mf.tuned_fp8 and mf.k_step_fp8_default_s > 0.0
    assert lm.model.n_moe_layers == 94
    a = mf.fp8_wave_frac
    steps = 32 * (1 + a) + 12 * (1 + 2 * a)
    assert lm.moe_loop_s(b) == pytest.approx(94 * steps * mf.k_step_fp8_default_s, rel=1e-9)


def test_latency_cli_names_the_per_sequence_part(capsys):
    """The serving stack's per-sequence time is its own part, not inside the LM head: at batch
    256 it is 256 x per_seq_s, and the parts still add up to the total."""
    from fleetsim.apps.cli import main
    from fleetsim.device import catalog

    per_seq = catalog.stacks()["vllm-v1"]["h100-sxm"]["per_seq_s"]
    argv = ["latency", "--gpu", "h100-sxm", "--model", "mixtral-8x7b", "--tp", "2"]
    assert main([*argv, "--batch", "1,256", "--context", "1024", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for r, n in zip(rows, (1, 256), strict=True):
        assert r["parts_s"]["per_sequence"] == pytest.approx(n * per_seq, rel=1e-12)
        assert sum(r["parts_s"].values()) == pytest.approx(r["total_s"], rel=1e-12)
        assert r["parts_s"]["lm_head"] < r["parts_s"]["per_sequence"] or n == 1
    assert math.isfinite(rows[1]["total_s"])


def test_catalog_file_is_the_generators():
    """``catalog/moe.toml`` is what ``calibrate/moe_fit.py --write`` writes: every catalog GPU has
    an entry, with a provenance and a source; its hardware figures and tuned shapes are the
    generator's tables (the fitted step times need the 4-minute simulation to check: run
    ``python -m fleetsim.calibrate.moe_fit``)."""
    from fleetsim.calibrate import moe_fit
    from fleetsim.device import catalog

    table = catalog.moe()
    assert set(table) == set(catalog.gpus())
    for name, e in table.items():
        assert e["provenance"] in ("fitted", "derived") and e["source"]
        sms, smem, src = moe_fit.HARDWARE[name]
        assert (e["sms"], e["smem_per_sm_bytes"], e["hardware_source"]) == (sms, smem, src)
        assert [tuple(x) for x in e["tuned"]] == list(moe_fit.TUNED.get(name, ()))
        assert [tuple(x) for x in e["tuned_fp8"]] == list(moe_fit.TUNED_FP8.get(name, ()))
        if e["provenance"] == "derived":
            src_gpu = moe_fit.DERIVED[name]
            for k in ("k_step_s", "k_step_fp8_s", "k_step_fp8_default_s", "layer_s"):
                assert e[k] == table[src_gpu][k]
    assert table["b200"]["provenance"] == table["h100-sxm"]["provenance"] == "fitted"
