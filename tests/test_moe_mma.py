"""The fused-MoE kernel's own MMA rate (``FusedMoeFit.mma_frac``, ``device/moe.py``).

What the measured rows say (``data/mlenergy-v3``, vLLM 0.11.1): the time a server spends per
step beyond its median step (``batch / tokens/s - median ITL``: the prefill-carrying steps) is
the same on a B200 as on an H100 for the same MoE model and batch (Qwen3-Coder-30B-A3B,
sourcegraph-fim, one GPU: 4.41 vs 4.09 ms at 32 sequences, 5.52 vs 7.13 ms at 64), while the
step model, which gave the fused MoE the B200's 2.3x tensor-core peak, made it half the H100's.
The fitted bound (the routed rows' FLOPs at ``mma_frac`` of the experts' peak, about 0.34
PFLOP/s on both GPUs) restores that; decode launches, far below the bound, do not change."""

from __future__ import annotations

import pytest

from fleetsim.calibrate import mlenergy as ml
from fleetsim.calibrate import moe_fit
from fleetsim.device import catalog
from fleetsim.device.kernels import KernelFit, catalog_kernel_fit
from fleetsim.device.moe import grouped_gemm_time_s


def _fit() -> KernelFit:
    fit = catalog_kernel_fit("b200")
    assert fit is not None
    return fit


B200_PEAK = 2250e12  # dense BF16 (catalog/gpus.toml)
B200_BW = 8e12


def test_bound_is_the_routed_rows_flops_at_the_rate():
    """A prefill-sized launch (8,192 tokens x 8 picks over 128 experts of 1,536 x 2,048, the
    Qwen3-30B-A3B up projection) takes the p-norm blend of ``2 rows n k / rate`` with its
    memory bound once that exceeds the kernel fit's compute bound; without a rate it is
    unchanged."""
    f = _fit()
    rows, experts, n, k = 8192 * 8.0, 128.0, 1536.0, 2048.0
    free = grouped_gemm_time_s(f, B200_PEAK, B200_BW, rows, experts, n, k)
    assert grouped_gemm_time_s(f, B200_PEAK, B200_BW, rows, experts, n, k, mma_flops=0.0) == free
    rate = 0.15 * B200_PEAK
    got = grouped_gemm_time_s(f, B200_PEAK, B200_BW, rows, experts, n, k, mma_flops=rate)
    t_c = 2.0 * rows * n * k / rate
    t_m = (experts * n * k * 2.0 + (rows * k + rows * n) * 2.0) / (B200_BW * f.gemm_bw_eff)
    hi, lo = max(t_c, t_m), min(t_c, t_m)
    p = f.gemm_pnorm
    want = f.gemm_launch_s + hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)
    assert got == pytest.approx(want, rel=1e-12)
    assert got > 1.5 * free  # the bound binds


def test_bound_leaves_a_decode_launch_unchanged():
    """A decode launch (64 tokens x 8 picks) is far below the rate: bit for bit the same."""
    f = _fit()
    args = (f, B200_PEAK, B200_BW, 64 * 8.0, 120.0, 1536.0, 2048.0)
    assert grouped_gemm_time_s(*args, mma_flops=0.15 * B200_PEAK) == grouped_gemm_time_s(*args)


def test_fitted_rates_agree_across_gpus():
    """The two independent fits land on one kernel rate: ``mma_frac x`` the BF16 peak of the
    H100 and of the B200 within 10 % of each other (the Triton kernel does not gain the B200's
    tensor cores); the catalog holds ``moe_fit.MMA_FRAC``; the H200 is the H100's chip."""
    moe, gpus = catalog.moe(), catalog.gpus()
    rate = {g: moe[g]["mma_frac"] * gpus[g]["peak_flops"] for g in ("h100-sxm", "b200")}
    assert rate["b200"] == pytest.approx(rate["h100-sxm"], rel=0.10)
    for g in moe:
        assert moe[g]["mma_frac"] == moe_fit.MMA_FRAC[g], g
    assert moe["h200"]["mma_frac"] == moe["h100-sxm"]["mma_frac"]
    assert moe["b200"]["mma_frac"] < 1.0


def _excess_s(c: ml.Config, profile_fields: dict | None = None) -> tuple[float, float]:
    """(simulated, measured) mean step beyond the median step: batch / tokens/s - median ITL."""
    r = ml.simulate_config(c, 0, "iteration", profile_fields=profile_fields)
    assert not r.error, r.error
    sim = r.avg_batch / (r.tokens / r.window_s) - r.itl_median_s
    return sim, c.avg_batch_size / c.tokens_per_s - c.itl_median_ms / 1e3


@pytest.mark.parametrize("batch", [32, 64])
def test_prefill_carrying_time_is_the_h100s_on_a_b200(batch):
    """Qwen3-Coder-30B-A3B (sourcegraph-fim, 1,500-token prompts, one GPU): the simulated
    excess of the mean step over the median on the B200 is 0.7-1.3x the H100's, as measured
    (1.08x at 32 sequences, 0.77x at 64); with the fused MoE at the B200's full peak it was
    0.43x / 0.49x. The kernels' share: the B200 without its eager MoE host floor (the H100 has
    none; the floor lengthens the B200's prompt-carrying steps, above the capture size, toward
    the B200's measured excess: 4.2 -> 5.4 ms against 5.5 at 64 sequences)."""
    from fleetsim.calibrate.eager_host import FLOOR_FIELDS

    model = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    cb = ml.find_config(model, "B200", 1, batch, "sourcegraph-fim")
    sb, mb = _excess_s(cb, dict.fromkeys(FLOOR_FIELDS, 0.0))
    sh, mh = _excess_s(ml.find_config(model, "H100", 1, batch, "sourcegraph-fim"))
    assert 0.7 <= mb / mh <= 1.3
    assert 0.7 <= sb / sh <= 1.3, (sb, sh)
    sb_floor, _ = _excess_s(cb)
    assert sb < sb_floor <= mb * 1.05  # toward the measured excess, not past it


def test_coder_480b_tokens_per_s_at_256():
    """Qwen3-Coder-480B (bf16, 8 B200s, EP8, sourcegraph-fim, unique prompts) at 256
    sequences: output tokens/s within 15 % of the measured (was +31 %: its prefill-carrying
    steps ran the grouped GEMMs at the B200's full tensor-core peak)."""
    c = ml.find_config("Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 256, "sourcegraph-fim")
    r = ml.simulate_config(c, 0, "iteration")
    assert not r.error, r.error
    assert r.tokens / r.window_s / c.tokens_per_s - 1.0 == pytest.approx(0.0, abs=0.15)


def test_fit_scores_a_row_at_each_grid_value():
    """``moe_fit --mma``'s scoring: the override reaches the engine's latency model (the row
    at the B200's full peak is the old +31 %, at the catalog's 0.15 within 15 %), and it is
    undone afterwards (the catalog's value is back)."""
    import math

    c = ml.find_config("Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 256, "sourcegraph-fim")
    full, fitted = (moe_fit.tokens_s_errors([c], "b200", v)[0] for v in (1.0, 0.15))
    assert math.expm1(full) == pytest.approx(0.31, abs=0.03)
    assert abs(math.expm1(fitted)) < 0.15
    from fleetsim.device import latency

    assert latency.catalog_moe_fit("b200").mma_frac == catalog.moe()["b200"]["mma_frac"]
