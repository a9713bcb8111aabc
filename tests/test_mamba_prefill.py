"""The Mamba-2 prefill path: the SSD chunked scan's FLOPs and bytes (fleetsim.device.moe) and the
fitted time per linear-state layer of a prompt-carrying step (calibrate/mamba_prefill.py)."""

from __future__ import annotations

import dataclasses

import pytest

from fleetsim.calibrate import mamba_prefill as mp
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile
from fleetsim.device.moe import (
    SSD_CHUNK_TOKENS,
    linear_state_scan_bytes,
    ssd_scan_bytes_per_token,
    ssd_scan_flops_per_token,
)

#: Nemotron Nano 9B v2 (data/models/.../config.json): 27 Mamba-2 layers ('M' in
#: hybrid_override_pattern) of H = 128 heads x P = 80, state N = 128, G = 8 groups; chunk Q = 128
LAYERS, H, P, N, G, Q = 27, 128, 80, 128, 8, 128


def _nemotron(
    gpu: str = "h100-sxm", prefill_layer_s: float | None = None, serial_s: float | None = None
) -> LatencyModel:
    from conftest import one_gpu_latency_model

    lm = one_gpu_latency_model("nemotron-nano-9b-v2", gpu)
    if prefill_layer_s is None and serial_s is None:
        return lm
    p = lm.profile
    assert isinstance(p, RooflineProfile)
    h = p.linear_state_prefill_layer_s if prefill_layer_s is None else prefill_layer_s
    a = p.linear_state_prefill_step_s if serial_s is None else serial_s
    p = dataclasses.replace(p, linear_state_prefill_layer_s=h, linear_state_prefill_step_s=a)
    return LatencyModel(lm.model, p, 1)


def test_ssd_flops_of_one_layer_and_chunk_by_hand():
    """One chunk of Q = 128 prompt tokens through one layer, the SSD algorithm's matmuls (Dao &
    Gu 2024, §6) counted by hand: C B^T per group, Q x N by N x Q: 2 x 128 x 128 x 128 =
    4,194,304, x 8 groups = 33,554,432; the masked Q x Q matrix times x per head, Q x Q by
    Q x P: 2 x 128 x 128 x 80 = 2,621,440, x 128 heads = 335,544,320; the chunk's state B^T x
    per head, N x Q by Q x P: 2,621,440 x 128 = 335,544,320; C times the entering state per
    head, Q x N by N x P: the same 335,544,320; the state passing, a multiply-add per state
    element: 2 x 80 x 128 x 128 heads = 2,621,440. Sum 1,042,808,832 per chunk: 8,146,944 per
    token (vs the 5 x 10,240 x 128 = 6,553,600 of a recurrent scan's elementwise count)."""
    m = _nemotron().model
    assert SSD_CHUNK_TOKENS == Q
    assert (m.ssm_n_heads, m.ssm_head_dim, m.ssm_state_size, m.ssm_n_groups) == (H, P, N, G)
    chunk = 33_554_432 + 335_544_320 + 335_544_320 + 335_544_320 + 2_621_440
    assert chunk == 1_042_808_832
    assert Q * ssd_scan_flops_per_token(m, 1) == pytest.approx(chunk, rel=1e-12)
    assert ssd_scan_flops_per_token(m, 1) == pytest.approx(8_146_944, rel=1e-12)
    # tensor parallelism splits heads and groups: each GPU does half of it on two
    assert ssd_scan_flops_per_token(m, 2) == pytest.approx(8_146_944 / 2, rel=1e-12)


def test_ssd_bytes_touch_the_state_once_per_chunk():
    """Per prompt token of one layer: x, B, C twice and z, y once in bf16, 2 x (4 x 10,240 + 4 x
    1,024) = 90,112; the chunk's state (1,310,720 elements) written fp32, read fp32, written
    bf16, read bf16 (12 bytes) per chunk of 128 tokens: 122,880; C B^T in fp32 written and read,
    8 x 128 x 8 = 8,192: 221,184 bytes, against 4 x 1,310,720 = 5,242,880 for a per-token state
    read and write (24x less)."""
    m = _nemotron().model
    assert ssd_scan_bytes_per_token(m, 1) == pytest.approx(90_112 + 122_880 + 8_192, rel=1e-12)
    assert linear_state_scan_bytes(m, 1) == 5_242_880
    assert ssd_scan_bytes_per_token(m, 1) * 23 < linear_state_scan_bytes(m, 1)


def test_a_prompt_token_costs_the_chunked_scan_not_a_state_round_trip():
    """With the prefill path's fixed time left out, 256 more prompt tokens in a step of 64
    decoding sequences add their chunked scan's FLOPs (8,146,944 per token and layer, beyond
    the recurrent count f_lin carries) and bytes (221,184), and take less time than 27 layers'
    per-token state read and write alone would (256 x 141.6 MB at the full bandwidth: 10.8 ms
    on an H100); the old charge (the state round trip per prompt token at the elementwise
    efficiency) took longer than that."""
    lm = _nemotron(prefill_layer_s=0.0)
    n, ctx = 64, 64 * 500.0
    t1, f1, b1 = lm.iteration(256, 256 * 256 / 2, 1, n, ctx)
    t2, f2, b2 = lm.iteration(512, 512 * 512 / 2, 1, n, ctx)
    m = lm.model
    rec = 5.0 * H * P * N  # the recurrent scan's per-layer FLOPs in f_lin
    per_tok_f = m.flops_per_token_linear + LAYERS * (8_146_944 - rec)
    pairs_f = (512 * 512 / 2 - 256 * 256 / 2) * m.attn_flops_per_pair
    assert f2 - f1 == pytest.approx(256 * per_tok_f + pairs_f, rel=1e-9)
    assert b2 - b1 == pytest.approx(256 * (lm.kvb + LAYERS * 221_184), rel=1e-9)
    round_trip_s = 256 * LAYERS * 5_242_880 / lm.profile.mem_bw_bytes_per_s
    assert round_trip_s == pytest.approx(10.8e-3, rel=0.01)
    assert t2 - t1 < round_trip_s


@pytest.mark.parametrize("gpu", ["h100-sxm", "b200"])
def test_a_small_prompt_step_takes_the_host_floor_exactly(gpu):
    """A prompt step of one 270-token prompt beside 8 decoding sequences, whose GPU time plus the
    serial time (catalog: H100 26.4 ms, B200 0) is under the floor, takes 27 x
    linear_state_prefill_layer_s (the catalog's, fitted) exactly: the host launching the
    Mamba-2 mixers' prefill path sets the step. A decode step takes the same as without either
    term, and neither draws FLOPs or bytes. The breakdown shows the serial time as
    ``prefill_metadata`` and the rest of the floor as ``prefill_host``, and sums to the step."""
    st = catalog.stacks()["vllm-v1"][gpu]
    h, a = st["linear_state_prefill_layer_s"], st["linear_state_prefill_step_s"]
    assert 1e-3 < h < 5e-3 and 0.0 <= a < LAYERS * h
    lm, lm0 = _nemotron(gpu), _nemotron(gpu, 0.0, 0.0)
    n, ctx = 8, 8 * 500.0
    x = (270, 270 * 135.0, 1, n, ctx)
    t, t0 = lm.iteration(*x), lm0.iteration(*x)
    assert t0[0] + a < 0.8 * LAYERS * h  # the GPU's own time and the serial: under the floor
    assert t[0] == pytest.approx(LAYERS * h, rel=1e-12)
    assert t[1:] == t0[1:]  # no FLOPs, no bytes
    assert lm.iteration(0, 0.0, 0, n, ctx) == lm0.iteration(0, 0.0, 0, n, ctx)
    parts, parts0 = lm.breakdown(*x), lm0.breakdown(*x)
    assert "prefill_host" not in parts0 and "prefill_metadata" not in parts0
    assert parts.get("prefill_metadata", 0.0) == pytest.approx(a, rel=1e-12)
    assert parts["prefill_host"] == pytest.approx(LAYERS * h - t0[0] - a, rel=1e-9)
    assert sum(parts.values()) == pytest.approx(t[0], rel=1e-9)
    assert "prefill_host" not in lm.breakdown(0, 0.0, 0, n, ctx)  # a decode step: no floor


@pytest.mark.parametrize("gpu", ["h100-sxm", "b200"])
def test_a_large_prompt_step_hides_the_floor(gpu):
    """A prompt step whose GPU time passes the floor (a 16,384-token prompt beside 256 decoding
    sequences) takes its GPU time plus the serial time: the floor adds nothing (the additive
    form of branch m35 at 7b395db added 27 x 1.05 ms on the H100, 27 x 1.79 on the B200)."""
    st = catalog.stacks()["vllm-v1"][gpu]
    h, a = st["linear_state_prefill_layer_s"], st["linear_state_prefill_step_s"]
    lm, lm0 = _nemotron(gpu), _nemotron(gpu, 0.0, 0.0)
    p, n, ctx = 16_384, 256, 256 * 1_000.0
    x = (p, p * p / 2.0, 1, n, ctx)
    t, t0 = lm.iteration(*x), lm0.iteration(*x)
    assert t0[0] > 1.5 * LAYERS * h
    assert t[0] == pytest.approx(t0[0] + a, rel=1e-12)
    assert t[1:] == t0[1:]
    assert "prefill_host" not in lm.breakdown(*x)
    # the floor alone: exactly the GPU time
    assert _nemotron(gpu, serial_s=0.0).iteration(*x) == t0


def _row(model, share, layers, steps, prompt_steps_s, missing_per_step_s, meas_mean_s=1.0):
    import numpy as np

    return mp.RowNeed(
        key=f"{model}{share}",
        model=model,
        prompt_share=share,
        layers=layers,
        steps=steps,
        prompt_steps_s=np.asarray(prompt_steps_s, dtype=float),
        missing_per_step_s=missing_per_step_s,
        meas_mean_s=meas_mean_s,
    )


def test_a_row_asks_the_floor_that_adds_its_missing_time():
    """A row of 10 steps and 2 layers whose two prompt steps take 2 and 6 ms on the GPU and
    which misses 0.4 ms per step (4 ms in all) asks a 6 ms floor (3 ms per layer): the first step
    gains 4 ms, the second none; missing 0.6 ms per step (6 ms) asks 7 ms (3.5 ms per layer): 5
    + 1 ms. An additive term would ask 2 and 3 ms (1 and 1.5 per layer). A row that misses
    nothing, or runs slow, asks 0."""
    r = _row("A", 0.2, 2, 10.0, [6e-3, 2e-3], 0.4e-3)
    assert r.asked_s == pytest.approx(3.0e-3, rel=1e-12)
    assert r.added_per_step_s(3.0e-3) == pytest.approx(0.4e-3, rel=1e-12)
    assert _row("A", 0.2, 2, 10.0, [6e-3, 2e-3], 0.6e-3).asked_s == pytest.approx(3.5e-3)
    assert _row("A", 0.2, 2, 10.0, [6e-3, 2e-3], 0.05e-3).asked_s == pytest.approx(1.25e-3)
    assert _row("A", 0.2, 2, 10.0, [6e-3, 2e-3], 0.0).asked_s == 0.0
    assert _row("A", 0.2, 2, 10.0, [6e-3, 2e-3], -1e-3).asked_s == 0.0
    # under its GPU steps the floor adds nothing
    assert r.added_per_step_s(1e-3) == 0.0


def test_the_fit_is_the_least_summed_error_and_each_model_from_the_other():
    """Rows of one layer and one step whose prompt step takes no GPU time: the floor adds h to
    the mean step, so the summed |relative error| is sum |h - asked| / measured mean step, and
    the fit is the weighted median of the asked values (0.8, 1.0, 1.2 ms of weights 2, 1, 4:
    1.2 ms; at 1.2 ms the error is 2 x 0.4 + 1 x 0.2 = 1.0, at 1.0 ms 2 x 0.2 + 4 x 0.2 = 1.2, in
    1e-3); a row under the prompt-share threshold is left out; each model's value is the
    others' best (A from B's one row: 1.2 ms; B from A's two of weights 1 and 2: 0.8 ms). A row
    whose GPU prompt step is longer than every candidate floor asks nothing and moves
    nothing."""
    vals = [
        _row("A", 0.10, 1, 1.0, [0.0], 1.0e-3),
        _row("A", 0.20, 1, 1.0, [0.0], 0.8e-3, meas_mean_s=0.5),
        _row("A", 0.01, 1, 1.0, [0.0], 9.0e-3),  # share under MIN_PROMPT_SHARE: left out
        _row("B", 0.30, 1, 1.0, [0.0], 1.2e-3, meas_mean_s=0.25),
    ]
    f = mp.fit(vals)
    assert f["rows"] == 3
    assert f["value_s"] == pytest.approx(1.2e-3, abs=mp.H_STEPS_S[1] / 2)
    assert mp.summed_error(vals[:2] + vals[3:], 1.2e-3) == pytest.approx(1.0e-3, rel=1e-9)
    assert mp.summed_error(vals[:2] + vals[3:], 1.0e-3) == pytest.approx(1.2e-3, rel=1e-9)
    assert f["serial_s"] == 0.0  # the floor alone fits as well: no serial time
    assert f["lomo"]["A"][0] == pytest.approx(1.2e-3, abs=mp.H_STEPS_S[1] / 2)
    assert f["lomo"]["B"][0] == pytest.approx(0.8e-3, abs=mp.H_STEPS_S[1] / 2)
    hidden = _row("B", 0.30, 1, 1.0, [5e-3], 0.0)
    assert mp.fit([*vals, hidden])["value_s"] == pytest.approx(1.2e-3, abs=mp.H_STEPS_S[1] / 2)
    assert mp.fit([_row("A", 0.5, 1, 1.0, [0.0], -1e-3)])["value_s"] == 0.0
    assert mp.linear_layers("nvidia/NVIDIA-Nemotron-Nano-9B-v2") == LAYERS
    assert mp.linear_layers("Qwen/Qwen3-8B") == 0


def test_a_serial_time_where_the_gpu_hides_the_floor():
    """Two rows of one layer and one step: the first's prompt step takes no GPU time and misses
    2 ms, the second's takes 10 ms and misses 1 ms. A floor alone cannot add to the second
    without 10 ms more on the first: its best, 2 ms, leaves the second 1 ms short (summed error
    1e-3). A serial 1 ms under a 2 ms floor fits both (the first max(0 + 1, 2) = 2 ms, the second
    max(10 + 1, 2) - 10 = 1 ms): error 0, kept."""
    rows = [_row("A", 0.5, 1, 1.0, [0.0], 2e-3), _row("B", 0.5, 1, 1.0, [10e-3], 1e-3)]
    h0, a0 = mp.best_pair(rows, serial=False)
    assert (h0, a0) == (pytest.approx(2e-3), 0.0)
    assert mp.summed_error(rows, h0) == pytest.approx(1e-3, rel=1e-9)
    h, a = mp.best_pair(rows)
    assert (h, a) == (pytest.approx(2e-3), pytest.approx(1e-3))
    assert mp.summed_error(rows, h, a) == pytest.approx(0.0, abs=1e-12)
    assert rows[1].added_per_step_s(h, a) == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.slow
def test_from_mlenergy_fits_the_prefill_path_back(tmp_path):
    """A round trip (about 30 s): two Nemotron chat rows on one H100 whose mean and median steps
    are the simulator's own with a 1.5 ms floor per Mamba-2 layer and no serial time (the
    catalog's H100: 2.0 ms and 26.4 ms) are
    fitted back to it by ``mamba_prefill.fit_folder`` (the step ``fleetsim calibrate
    --from-mlenergy`` runs), each model from the other's row too; a folder without hybrid rows
    keeps the catalog's."""
    import csv
    from pathlib import Path

    from conftest import mlenergy_folder

    from fleetsim.calibrate import mlenergy as M

    keys = (
        "nvidia/NVIDIA-Nemotron-Nano-9B-v2 lm-arena-chat H100 x1 TP1/EP1/DP1 b64",
        "nvidia/NVIDIA-Nemotron-Nano-12B-v2 lm-arena-chat H100 x1 TP1/EP1/DP1 b128",
    )
    by_key = {c.key: c for c in M.read_configs()}
    src = Path(__file__).resolve().parent.parent / "data" / "mlenergy-v3" / "configurations.csv"
    with open(src, newline="") as f:
        all_rows = list(csv.DictReader(f))
    rows = []
    for key in keys:
        c = by_key[key]
        run = M.simulate_config(
            c,
            engine="iteration",
            profile_fields={mp.FIELD: 1.5e-3, mp.SERIAL_FIELD: 0.0},
            prompts=M.HARNESS_PROMPTS,
        )
        s = M.step_split(c, run)
        (r,) = (
            dict(x)
            for x in all_rows
            if (x["source_file"], int(x["config_index"])) == (c.source_file, c.config_index)
        )
        r["itl_median_ms"] = repr(1e3 * s.sim_median_s)
        r["output_tokens_per_s"] = repr(c.avg_batch_size / s.sim_mean_s)
        rows.append(r)
    d = mlenergy_folder(tmp_path / "hybrid", rows)
    h, line = mp.fit_folder(d, "H100", {}, workers=2)
    assert h is not None
    assert h[mp.FIELD] == pytest.approx(1.5e-3, rel=1e-6)
    assert h[mp.SERIAL_FIELD] == 0.0
    assert "1.50 ms per layer, serial 0.0 ms per step (2 rows" in line
    dense = [r for r in all_rows if r["model_id"] == "Qwen/Qwen3-8B"][:2]
    h0, line0 = mp.fit_folder(mlenergy_folder(tmp_path / "dense", dense), "H100", {}, 1)
    assert h0 is None and line0.startswith("Mamba-2 prefill floor: the catalog's")
