"""The tuned fp8 fused-MoE configuration of a prefill-sized launch (fleetsim.device.moe.
tuned_fp8_tiles): vLLM's nearest-key lookup gives every launch past 3,584 tokens the tuned file's
4,096 entry, whose staged tiles set the programs an SM holds. On the B200 that entry has 4 stages
for Qwen3-Coder-480B-FP8 under EP8 (``E=20,N=2560``: 2 programs per SM) and 3 under EP4
(``E=40,N=2560``: 3, the default tiles'), which is why eight data-parallel B200 engines serve
fewer tokens/s than four (docs/accuracy-log.md, "Why eight data-parallel B200 engines serve
fewer tokens/s than four")."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest

from fleetsim.calibrate import moe_fit
from fleetsim.device.moe import (
    FusedMoeFit,
    MoeLayout,
    catalog_moe_fit,
    fp8_default_grid_waves,
    fp8_default_loop_latency_s,
    fp8_default_tiles,
    fp8_programs_per_sm,
    moe_layer_parts_s,
    tuned_fp8_tiles,
)


def test_programs_per_sm_by_hand():
    """(BM x BK + BK x BN) x stages bytes of fp8 tiles against the B200's 233,472 bytes
    (228 KB), at most 64 warps / num_warps: the default 64 x 128 x 128, 3 stages: 73,728 bytes ->
    3; E=20's 4 stages: 98,304 -> 2; the B200 E=32,N=2048 entry (64 x 256 x 128, 4 stages, 8
    warps): 163,840 -> 1; the H100 E=16,N=1536 entry (128 x 128 x 64, 3 stages, 8 warps):
    49,152 -> 4 (the warp cap is 8)."""
    b200 = catalog_moe_fit("b200")
    assert b200.smem_per_sm_bytes == 233472
    assert fp8_default_tiles() == (64, 128, 128, 3, 4)
    assert fp8_programs_per_sm(b200, fp8_default_tiles()) == 3
    assert fp8_programs_per_sm(b200, (64, 128, 128, 4, 4)) == 2
    assert fp8_programs_per_sm(b200, (64, 256, 128, 4, 8)) == 1
    assert fp8_programs_per_sm(catalog_moe_fit("h100-sxm"), (128, 128, 64, 3, 8)) == 4
    # small tiles: the warp cap, 64 / 4 = 16
    assert fp8_programs_per_sm(b200, (16, 16, 16, 1, 4)) == 16


def test_nearest_key_rule():
    """``min(keys, key=lambda x: abs(x - M))`` over keys ending 3,072, 4,096: M = 3,584 is a tie,
    which goes to the smaller key (the first in the file's order), so the 4,096 entry starts at
    3,585 tokens; below it the fitted step stands (None)."""
    b200 = catalog_moe_fit("b200")
    keys = [1024, 1536, 2048, 3072, 4096]
    for m, want in ((3584, 3072), (3585, 4096), (12128, 4096)):
        assert min(keys, key=lambda x: abs(x - m)) == want
    assert tuned_fp8_tiles(b200, (20, 2560), 3584) is None
    assert tuned_fp8_tiles(b200, (20, 2560), 3585) == (64, 128, 128, 4, 4)
    assert tuned_fp8_tiles(b200, (40, 2560), 12128) == (64, 128, 128, 3, 4)
    assert tuned_fp8_tiles(b200, (64, 1536), 12128) is None  # no tuned file


def test_catalog_entries_are_the_generators():
    """moe.toml's ``tuned_fp8_large_m`` is calibrate/moe_fit.py's table (read from vLLM's
    files), one entry per tuned fp8 shape."""
    for gpu, entries in moe_fit.TUNED_FP8_LARGE_M.items():
        fit = catalog_moe_fit(gpu)
        assert fit.tuned_fp8_large_m == tuple(entries)
        assert {(e[0], e[1]) for e in entries} == set(moe_fit.TUNED_FP8.get(gpu, ()))
        assert moe_fit.hardware_fit(gpu).tuned_fp8_large_m == tuple(entries)


def test_dp8_prompt_step_waves_by_hand():
    """A DP8 prompt step of Qwen3-Coder-480B-FP8 (fullest engine 1,516 tokens): the kernel sees
    8 x 1,516 = 12,128 tokens, 12,128 routed rows per GPU (top-8 of 160 experts over 8 GPUs), 20
    local experts of 606.4 rows: 10 row blocks of 64 each. Gate+up (N 5,120): 20 x 10 x 40 =
    8,000 programs; down (N 6,144): 9,600. At 2 per SM (296 on 148 SMs) 28 and 33 waves, at the
    default's 3 (444) 19 and 22. The loop: K / 128 steps (48 up, 20 down) x the step x (1 +
    0.4 x (waves - 1))."""
    b200 = catalog_moe_fit("b200")
    tiles = tuned_fp8_tiles(b200, (20, 2560), 12128)
    rows = 12128.0
    assert fp8_default_grid_waves(b200, 20, rows, 5120, tiles) == 28
    assert fp8_default_grid_waves(b200, 20, rows, 6144, tiles) == 33
    assert fp8_default_grid_waves(b200, 20, rows, 5120) == 19
    assert fp8_default_grid_waves(b200, 20, rows, 6144) == 22
    step, frac = b200.k_step_fp8_s, b200.fp8_wave_frac
    up = fp8_default_loop_latency_s(b200, 6144, 20, rows, 5120, True, tiles)
    down = fp8_default_loop_latency_s(b200, 2560, 20, rows, 6144, True, tiles)
    assert up == pytest.approx(48 * step * (1 + frac * 27), rel=1e-12)
    assert down == pytest.approx(20 * step * (1 + frac * 32), rel=1e-12)


@functools.cache
def _configs() -> list:
    from fleetsim.calibrate import mlenergy as M

    return M.select(M.read_configs(M.DATA_DIR))[0]


@functools.cache
def _coder_fp8_latency(dp: int):
    """The harness's latency model of Qwen3-Coder-480B-A35B-Instruct-FP8 on the B200 under DP
    ``dp`` x EP ``dp`` (its model, profile and fp8 experts)."""
    from fleetsim.calibrate import dp_ranks

    c = next(
        c
        for c in _configs()
        if c.model_id.endswith("Coder-480B-A35B-Instruct-FP8")
        and c.dp == dp
        and c.gpu_model == "B200"
    )
    return dp_ranks.row_latency(c)


def _coder_fp8_layer(mf: FusedMoeFit, dp: int, tokens: float) -> dict[str, float]:
    """One MoE layer's parts (seconds) of :func:`_coder_fp8_latency`'s model with the fit
    ``mf``."""
    lat = _coder_fp8_latency(dp)
    return moe_layer_parts_s(
        lat._kern,  # type: ignore[attr-defined]
        lat._peak_lin,  # type: ignore[attr-defined]
        lat._bw,  # type: ignore[attr-defined]
        lat.model,
        MoeLayout(1, dp, True),
        tokens,
        lat._wb,  # type: ignore[attr-defined]
        *lat._link,  # type: ignore[attr-defined]
        lat._ewb,  # type: ignore[attr-defined]
        lat._epeak,  # type: ignore[attr-defined]
        mf,
        True,
    )


def test_tiles_slow_the_dp8_prompt_step_not_the_dp4_one():
    """The same padded prompt step with and without the large-M entries: DP4 (E=40, 3 stages, the
    default's residency) is unchanged to the bit; DP8 (E=20, 4 stages) pays the hand-counted loop
    difference and a kernel MMA rate at 2/3, so its fused-MoE time rises by more than the loop's
    part alone; decode steps (64 tokens) do not move."""
    b200 = catalog_moe_fit("b200")
    bare = dataclasses.replace(b200, tuned_fp8_large_m=())
    for dp, t_pad in ((4, 4 * 1516), (8, 8 * 1516)):
        new, old = _coder_fp8_layer(b200, dp, t_pad), _coder_fp8_layer(bare, dp, t_pad)
        if dp == 4:
            assert new == old
            continue
        step, frac = b200.k_step_fp8_s, b200.fp8_wave_frac
        d_loop = 48 * step * frac * (27 - 18) + 20 * step * frac * (32 - 21)
        assert new["moe_fp8_loop"] - old["moe_fp8_loop"] == pytest.approx(d_loop, rel=1e-9)
        gemm_new = new["moe_gemm_up"] + new["moe_gemm_down"]
        gemm_old = old["moe_gemm_up"] + old["moe_gemm_down"]
        assert gemm_new - gemm_old > d_loop * 1.5
        assert _coder_fp8_layer(b200, dp, 64.0) == _coder_fp8_layer(bare, dp, 64.0)
    assert math.isclose(2 / 3, fp8_programs_per_sm(b200, (64, 128, 128, 4, 4)) / 3)


def test_dp8_serves_fewer_tokens_per_s_than_dp4_at_64_sequences():
    """The measured rows (data/mlenergy-v3, sourcegraph-fim): DP8 b64 520 tokens/s, DP4 b64 721.
    Per-rank simulation (calibrate/dp_ranks.py, as the engine schedules): DP8 now reads 579
    (+11.5 %; 588, +13.2 %, before the B200's ``k_step_fp8_s`` 2.4 -> 2.5 us refit after h47;
    577, +11.1 %, before the serving stack's per-sequence time was charged per engine,
    branch h47; 583, +12.2 %, before prompt attention was timed at the fullest engine, branch
    g40; 576, +10.8 %, before the B200's GEMMs streamed at 0.75 of the peak with moe.toml
    refitted on it, branch b38; 716, +37.7 %, before the tuned tiles), below DP4's 643 (-10.9 %;
    654, -9.4 %, before the refit; 642, -11.0 %, before h47; 648, -10.1 %, before g40; 650,
    -9.9 %, before b38), the measured order."""
    from fleetsim.calibrate import dp_ranks

    got = {}
    for c in _configs():
        if (
            c.model_id.endswith("Coder-480B-A35B-Instruct-FP8")
            and c.gpu_model == "B200"
            and c.max_num_seqs == 64
        ):
            got[c.dp] = (dp_ranks.simulate_row(c).tokens_per_s, c.tokens_per_s)
    assert got[8][1] < got[4][1]  # measured: 520 < 721
    assert got[8][0] < got[4][0]
    assert got[8][0] / got[8][1] - 1.0 == pytest.approx(0.115, abs=0.01)
    assert got[4][0] / got[4][1] - 1.0 == pytest.approx(-0.109, abs=0.01)
