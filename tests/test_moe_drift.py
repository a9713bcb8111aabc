"""Drift of the fused-MoE constants (``catalog/moe.toml``): refit from the committed data.

``python -m fleetsim.calibrate.moe_fit --write`` fits ``k_step_s``, ``k_step_fp8_s``,
``k_step_fp8_default_s`` and ``layer_s`` (and FlashInfer's ``fi_layer_s``, ``fi_bw_frac``)
per GPU to the non-suspect MoE rows of ``data/mlenergy-v3``. Its slow part is one
end-to-end simulation per row; it stores their median ITLs, with the constants they were
simulated under, in ``tests/data/moe_fit_targets.csv``. From those targets the fit itself (the
coordinate search on the decode-step surrogate) reruns in seconds: the catalog must be its
result. A change of the step-time model moves the fitted constants (this test fails: refit with
``--write``); a change of the engine makes the stored targets stale (the re-simulated rows below
fail; the slow test checks every row)."""

from __future__ import annotations

import re

import pytest

from fleetsim.calibrate import mlenergy as ml
from fleetsim.calibrate import moe_fit
from fleetsim.device import catalog
from fleetsim.device.moe import FusedMoeFit


@pytest.fixture(scope="module")
def targets_rows() -> list[moe_fit.FitRow]:
    return moe_fit.rows_from_targets()


@pytest.fixture(scope="module")
def refit(targets_rows) -> dict[str, tuple[FusedMoeFit, list[moe_fit.FitRow]]]:
    out = {}
    for g in sorted({r.config.gpu_model for r in targets_rows}):
        gr = [r for r in targets_rows if r.config.gpu_model == g]
        out[ml.GPUS[g]] = (moe_fit.fit_rows(gr, moe_fit.hardware_fit(ml.GPUS[g])), gr)
    return out


@pytest.mark.parametrize("gpu", ["h100-sxm", "b200"])
def test_committed_moe_constants_are_the_refit(refit, gpu):
    """The catalog's fitted constants are the fit of the stored targets, to the grid value; its
    in-sample median |error| and its row count are the fit's."""
    fit, rows = refit[gpu]
    e = catalog.moe()[gpu]
    assert e["provenance"] == "fitted"
    for k in moe_fit.ALL_PARAMS:
        assert getattr(fit, k) == pytest.approx(e[k], rel=1e-9, abs=1e-12), k
    errs = [r.itl_s(fit) / r.meas_s - 1.0 for r in rows]
    assert moe_fit.stats(errs)[0] == pytest.approx(e["fit_median_err"], abs=5e-4)
    n = re.match(r"fitted to (\d+) ML.ENERGY", e["source"])
    assert n is not None and int(n.group(1)) == len(rows)


def test_targets_cover_every_fit_row(targets_rows):
    """Every non-suspect MoE / expert-parallel row that the harness simulates has a target, on
    both benchmark GPUs, and the surrogate returns the stored ITL at the constants it was
    simulated with."""
    keys = {(r.config.source_file, r.config.config_index) for r in targets_rows}
    assert keys == {(c.source_file, c.config_index) for c in moe_fit.fit_configs()}
    assert {r.config.gpu_model for r in targets_rows} == {"H100", "B200"}
    for r in targets_rows[:5]:
        assert r.itl_s(r.base_fit) == pytest.approx(r.sim_itl_s, rel=1e-12)


def test_a_moved_constant_is_caught(refit):
    """The check can fail: the B200's fp8 steps (tuned and default tiles) moved by one grid step
    are no longer the fit (each scores a worse loss on the stored targets than the committed
    value)."""
    from dataclasses import replace

    fit, rows = refit["b200"]
    moved = replace(fit, k_step_fp8_s=fit.k_step_fp8_s + 0.1e-6)
    assert moe_fit.loss(rows, moved) > moe_fit.loss(rows, fit)
    moved = replace(fit, k_step_fp8_default_s=fit.k_step_fp8_default_s + 0.1e-6)
    assert moe_fit.loss(rows, moved) > moe_fit.loss(rows, fit)
    # FlashInfer's TensorRT-LLM kernel (the DeepSeek rows, server_env.csv): fitted on the B200,
    # each constant a grid step up scores worse; the H100 has none
    assert fit.fi_layer_s > 0.0 and fit.fi_bw_frac > 0.0
    for name, step in (("fi_layer_s", 2e-6), ("fi_bw_frac", 0.025)):
        moved = replace(fit, **{name: getattr(fit, name) + step})
        assert moe_fit.loss(rows, moved) > moe_fit.loss(rows, fit), name
    h100, _ = refit["h100-sxm"]
    assert h100.fi_layer_s == 0.0 and h100.fi_bw_frac == 0.0


#: cheap rows (small batch, a few seconds in all) of each family: one GPU, expert parallelism,
#: fp8 block-quantised experts, data parallelism
QUICK = (
    "Qwen/Qwen3-30B-A3B-Instruct-2507 lm-arena-chat H100 x1 TP1/EP1/DP1 b8",
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8 lm-arena-chat B200 x2 TP1/EP2/DP1 b8",
    "Qwen/Qwen3-235B-A22B-Instruct-2507 lm-arena-chat H100 x8 TP1/EP8/DP1 b16",
    "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8 sourcegraph-fim B200 x8 TP1/EP8/DP8 b8",
)


def _current(rows: list[moe_fit.FitRow], keys) -> None:
    """Each row re-simulated with the catalog's constants against the stored target carried to
    them (exact when the targets were simulated with the catalog's constants)."""
    by_key = {r.config.key: r for r in rows}
    for key in keys:
        r = by_key[key]
        now = ml.simulate_config(r.config, engine="iteration")  # as moe_fit simulates
        assert not now.error, (key, now.error)
        cat = r.lm._moe_fit  # type: ignore[attr-defined]
        same = all(getattr(cat, k) == getattr(r.base_fit, k) for k in moe_fit.PARAMS)
        assert now.itl_median_s == pytest.approx(r.itl_s(cat), rel=1e-9 if same else 0.02), key


def test_stored_targets_are_current(targets_rows):
    """A few cheap rows re-simulated now give their stored ITL: the engine has not changed
    under the targets (else rerun ``python -m fleetsim.calibrate.moe_fit --write``)."""
    _current(targets_rows, QUICK)


@pytest.mark.slow
def test_every_stored_target_is_current(targets_rows):
    """Every row re-simulated (the 2-5 minutes of ``moe_fit``)."""
    _current(targets_rows, [r.config.key for r in targets_rows])


@pytest.mark.slow
@pytest.mark.parametrize("gpu", ["h100-sxm", "b200"])
def test_leave_one_model_out_error_is_the_catalogs(refit, gpu):
    """The leave-one-model-out median |error| the catalog records is the refit's."""
    _, rows = refit[gpu]
    base = moe_fit.hardware_fit(gpu)
    errs = []
    for m in sorted({r.config.model_id for r in rows}):
        f = moe_fit.fit_rows([r for r in rows if r.config.model_id != m], base)
        errs += [r.itl_s(f) / r.meas_s - 1.0 for r in rows if r.config.model_id == m]
    assert moe_fit.stats(errs)[0] == pytest.approx(catalog.moe()[gpu]["lomo_median_err"], abs=5e-4)
