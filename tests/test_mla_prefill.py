"""The latent-attention prefill path of an eager prompt-carrying step (fleetsim.device.stack,
calibrate/mla_prefill): an iteration of a model with latent attention above the CUDA-graph
capture size that carries prompt tokens takes, on top of the eager host floor,
``eager_mla_prefill_layer_host_s`` per attention layer; counted by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import B200_EAGER_LAYER_S as H_LAYER_S
from conftest import B200_EAGER_MLA_PREFILL_S as H_MLA_PREFILL_S
from conftest import B200_EAGER_MLA_S as H_MLA_S
from conftest import B200_EAGER_SEQ_S as H_SEQ_S
from conftest import b200_vllm_profile as _b200

from fleetsim.calibrate import mla_prefill
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack


def _without(p: RooflineProfile) -> RooflineProfile:
    return dataclasses.replace(p, eager_mla_prefill_layer_host_s=0.0)


def _deepseek(p: RooflineProfile) -> LatencyModel:
    m = model_from_catalog("deepseek-v3", "fp8")
    assert m.is_mla and m.n_moe_layers == 58 and m.n_attn_layers == 61
    return LatencyModel(m, p, 8, 1, True)


def test_the_b200_carries_the_constant_and_the_h100_none():
    assert _b200().eager_mla_prefill_layer_host_s == H_MLA_PREFILL_S
    h = apply_stack(catalog_profile("h100-sxm", catalog.gpu("h100-sxm")), "vllm-v1", "h100-sxm", 64)
    assert isinstance(h, RooflineProfile) and h.eager_mla_prefill_layer_host_s == 0.0


def test_an_eager_prompt_step_of_latent_attention_pays_the_prefill_path():
    """DeepSeek-V3 on 8 B200s (expert parallel), max_num_seqs 1,024 (capture size 512): 1,023
    decodes and one 250-token prompt chunk, 1,273 tokens, run eager. Floor: 58 x 0.60 + 61 x
    0.75 + 1,024 x 0.06 = 141.99 ms; the prompt adds 61 x 0.20 = 12.2 ms: 154.19 ms. The decode
    step of the same 1,024 sequences keeps 141.99 ms; FLOPs and bytes do not move."""
    p = _b200()
    lm, bare = _deepseek(p), _deepseek(_without(p))
    assert lm.eager_host_s(1024) == pytest.approx(141.99e-3, rel=1e-12)
    assert lm.eager_host_s(1024, 1) == pytest.approx(154.19e-3, rel=1e-12)
    assert lm.eager_host_s(1024, 3) == lm.eager_host_s(1024, 1)  # per step, not per prompt
    args = (250, 250.0**2 / 2, 1, 1023, 1023 * 900.0)
    t, f, b = lm.iteration(*args)
    t0, f0, b0 = bare.iteration(*args)
    assert t0 == pytest.approx(141.99e-3, rel=1e-12)  # (the floor binds without the term)
    assert t == pytest.approx(58 * H_LAYER_S + 61 * (H_MLA_S + H_MLA_PREFILL_S) + 1024 * H_SEQ_S)
    assert t == pytest.approx(154.19e-3, rel=1e-12)
    assert (f, b) == (f0, b0)
    d = (0, 0.0, 0, 1024, 1024 * 900.0)
    assert lm.iteration(*d)[0] == bare.iteration(*d)[0] == pytest.approx(141.99e-3, rel=1e-12)


def test_a_captured_prompt_step_and_grouped_query_attention_do_not_pay():
    """max_num_seqs 256 (capture 512): 255 decodes + a 250-token chunk = 505 tokens replay a
    graph, no floor and no prefill path; Qwen3-30B-A3B (grouped-query attention) above the
    capture size pays the floor alone: 48 x 0.60 + 8 x 0.06 = 29.28 ms at max_num_seqs 8."""
    p = _b200(256)
    args = (250, 250.0**2 / 2, 1, 255, 255 * 900.0)
    assert _deepseek(p).iteration(*args) == _deepseek(_without(p)).iteration(*args)
    q = model_from_catalog("qwen3-30b-a3b")
    p8 = _b200(8)
    t = LatencyModel(q, p8, 1).iteration(250, 250.0**2, 1, 7, 7 * 400.0)[0]
    assert t == pytest.approx(48 * H_LAYER_S + 8 * H_SEQ_S, rel=1e-12)
    assert t == LatencyModel(q, _without(p8), 1).iteration(250, 250.0**2, 1, 7, 7 * 400.0)[0]


def test_the_latency_breakdown_shows_the_prefill_path_as_eager_host_time():
    p = _b200()
    lm, bare = _deepseek(p), _deepseek(_without(p))
    args = (250, 250.0**2 / 2, 1, 1023, 1023 * 900.0)
    gap = lm.breakdown(*args)["eager_host"] - bare.breakdown(*args)["eager_host"]
    assert gap == pytest.approx(61 * H_MLA_PREFILL_S, rel=1e-9)


def test_the_fit_picks_the_grid_value_of_least_error():
    """Two rows, three grid values: the measured (mean, median) steps are hit exactly at the
    second value, so it wins; the errors are sim / measured - 1."""
    meas = np.array([[0.100, 0.080], [0.200, 0.150]])
    sim = np.array(
        [
            [[0.090, 0.080], [0.100, 0.080], [0.120, 0.080]],
            [[0.180, 0.150], [0.200, 0.150], [0.230, 0.150]],
        ]
    )
    grid = (0.0, 3e-4, 6e-4)
    err = mla_prefill.errors(sim, meas)
    assert err[0, 0, 0] == pytest.approx(-0.1) and err[1, 2, 0] == pytest.approx(0.15)
    assert mla_prefill.best(err, grid) == (3e-4, 0.0)


def test_latent_attention_is_read_from_the_models_config():
    assert mla_prefill.has_latent_attention("deepseek-ai/DeepSeek-V3.1")
    assert mla_prefill.has_latent_attention("deepseek-ai/DeepSeek-R1-0528")
    assert not mla_prefill.has_latent_attention("Qwen/Qwen3-235B-A22B-Instruct-2507")
    assert not mla_prefill.has_latent_attention("no/such-model")


def test_without_the_eager_floor_the_prefill_path_adds_nothing():
    """The term is part of the floor: a profile without one (the floor's constants at 0, as
    calibrate/eager_host.py simulates its rows) runs the prompt step at its GPU time."""
    p = dataclasses.replace(
        _b200(), eager_moe_layer_host_s=0.0, eager_seq_host_s=0.0, eager_mla_layer_host_s=0.0
    )
    assert p.eager_mla_prefill_layer_host_s == H_MLA_PREFILL_S
    lm = _deepseek(p)
    assert lm.eager_host_s(1024, 1) == 0.0
    args = (250, 250.0**2 / 2, 1, 1023, 1023 * 900.0)
    assert lm.iteration(*args) == _deepseek(_without(p)).iteration(*args)
    # (its GPU time, under the 141.99 ms floor and the 154.19 ms the full profile charges)
    assert lm.iteration(*args)[0] < 141.99e-3 < _deepseek(_b200()).iteration(*args)[0]


MLA_ROWS = (
    "deepseek-ai/DeepSeek-V3.1 lm-arena-chat B200 x8 TP1/EP8/DP1 b16",
    "deepseek-ai/DeepSeek-V3.1 lm-arena-chat B200 x8 TP1/EP8/DP1 b32",
)


def test_from_mlenergy_keeps_the_catalogs_prefill_path_without_latent_attention_rows(tmp_path):
    """A folder without a chat or code row of a latent-attention model: no fit, one line."""
    import csv
    from pathlib import Path

    from conftest import mlenergy_folder

    from fleetsim.calibrate import mlenergy as M

    src = Path(__file__).resolve().parent.parent / "data" / "mlenergy-v3" / "configurations.csv"
    with open(src, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model_id"] == "Qwen/Qwen3-8B"][:2]
    d = mlenergy_folder(tmp_path / "dense", rows)
    h, summary, line = M.fit_mla_prefill(d, "B200", {}, workers=1)
    assert (h, summary) == (None, None)
    assert line.startswith("latent attention's eager prefill path: the catalog's (no")


@pytest.mark.slow
def test_from_mlenergy_fits_the_prefill_path_back(tmp_path):
    """A round trip (about a minute): two DeepSeek-V3.1 chat rows on 8 B200s whose mean and
    median steps are the simulator's own with 0.5 ms per attention layer (the catalog has 0.2)
    are fitted back to exactly it by ``mlenergy.fit_mla_prefill`` (the step ``fleetsim
    calibrate --from-mlenergy --fit-moe`` runs on the folder's eager floor); one model, so no
    leave-one-model-out figure."""
    from pathlib import Path

    from conftest import mlenergy_folder, simulated_rows

    from fleetsim.calibrate import mlenergy as M

    src = Path(__file__).resolve().parent.parent / "data" / "mlenergy-v3"
    rows = simulated_rows(MLA_ROWS, {mla_prefill.FIELD: 5e-4})
    d = mlenergy_folder(tmp_path / "deepseek", rows)
    # the servers' environment: DeepSeek on the B200 ran FlashInfer's fp8 MoE kernel
    (d / "server_env.csv").write_bytes((src / "server_env.csv").read_bytes())
    h, summary, line = M.fit_mla_prefill(d, "B200", {}, workers=2)
    assert h == 5e-4 and summary is not None
    assert summary["fitted_median"] < 1e-9 < 0.01 < summary["without_median"]
    assert summary["lomo_median"] is None and "no leave-one-model-out: one model" in line
    assert "0.5 ms per attention layer" in line
