"""Tabulated compute efficiency (``compute_eff_table``): interpolation, the profile contract,
the engine's closed-form runs, and the fit that recovers a known table."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from conftest import ListSink, merge, rel, resolved

from fleetsim.base.errors import UserError
from fleetsim.device.latency import LatencyModel, RooflineProfile, eff_from_table
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.device.profile import load_profile, profile_from_dict, profile_to_dict

TABLE = ((1.0, 0.08), (4.0, 0.02), (64.0, 0.4), (512.0, 0.6))

PROFILE = {
    "format": "fleetsim-profile/1",
    "kind": "roofline",
    "name": "test-h100-table",
    "catalog_gpu": "h100-sxm",
    "peak_flops": 9.89e14,
    "mem_bw_bytes_per_s": 3.35e12,
    "mem_bytes": 8.0e10,
    "compute_eff_max": 0.6,
    "compute_eff_half_tokens": 256,
    "memory_eff": 0.7,
    "overhead_s": 0.004,
    "overhead_per_layer_s": 1e-5,
    "power": None,
    "compute_eff_table": [list(p) for p in TABLE],
}


@pytest.mark.parametrize(
    "tokens, want",
    [
        (1, 0.08),
        (4, 0.02),
        (64, 0.4),
        (512, 0.6),  # the points themselves
        (2, 0.05),  # log-midpoint of 1 and 4
        (16, 0.21),  # log-midpoint of 4 and 64
        (128, 0.4 + 0.2 / 3),  # a third of the way 64 -> 512 in log
        (0.5, 0.08),
        (0, 0.08),
        (1e6, 0.6),  # flat beyond the ends
    ],
)
def test_interpolation_in_log_tokens_and_clamping(tokens, want):
    assert eff_from_table(TABLE, tokens) == pytest.approx(want, rel=1e-12)


def test_single_point_table_is_constant():
    assert eff_from_table(((8.0, 0.3),), 1) == eff_from_table(((8.0, 0.3),), 1e5) == 0.3


def test_latency_model_uses_the_table_and_falls_back_to_the_hyperbola():
    prof = profile_from_dict(PROFILE)
    assert prof.compute_eff_table == TABLE
    spec = model_from_catalog("llama-3.1-8b", "bf16")
    lm = LatencyModel(spec, prof)
    oh = prof.overhead_s + prof.overhead_per_layer_s * spec.n_layers
    for n in (1, 3, 4, 100):  # decode of n sequences at 1000 keys each
        flops = spec.decode_flops(n, n * 1000)
        nbytes = spec.weight_bytes_read(n) + spec.kv_bytes_per_token * (n * 1000 + n)
        want = oh + max(
            flops / (prof.peak_flops * eff_from_table(TABLE, n)),
            nbytes / (prof.mem_bw_bytes_per_s * prof.memory_eff),
        )
        assert lm.decode_time(n, 1000) == pytest.approx(want, rel=1e-12)
    # a 2048-token prefill is compute-bound at the flat end of the table
    t = lm.prefill_time(2048)
    assert t == pytest.approx(oh + spec.prefill_flops(2048) / (prof.peak_flops * 0.6), rel=1e-12)
    hyp = dataclasses.replace(prof, compute_eff_table=None)
    eff_h = 0.6 * 2048 / (2048 + 256)
    assert LatencyModel(spec, hyp).prefill_time(2048) == pytest.approx(
        oh + spec.prefill_flops(2048) / (prof.peak_flops * eff_h), rel=1e-12
    )


def test_profile_round_trip(tmp_path):
    prof = profile_from_dict(PROFILE)
    d = profile_to_dict(prof)
    assert d["compute_eff_table"] == [list(p) for p in TABLE]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(d))
    back, _ = load_profile(f)
    assert back == prof
    # no table: written as null, read back as None
    plain = profile_to_dict(dataclasses.replace(prof, compute_eff_table=None))
    assert plain["compute_eff_table"] is None
    assert profile_from_dict(plain).compute_eff_table is None


@pytest.mark.parametrize(
    "bad, needle",
    [
        ([], "non-empty list"),
        ("fast", "non-empty list"),
        ([[1, 0.1], 2], "compute_eff_table[1]"),
        ([[1, 0.1, 3]], "pair of finite numbers"),
        ([[1, True]], "pair of finite numbers"),
        ([[1, float("nan")]], "pair of finite numbers"),
        ([[0.5, 0.1]], "tokens = 0.5 must be >= 1"),
        ([[1, 0.1], [1, 0.2]], "compute_eff_table[1] tokens = 1"),
        ([[4, 0.1], [2, 0.2]], "greater than the previous"),
        ([[1, 0.0]], "efficiency = 0.0 must be in (0, 1.5]"),
        ([[1, 1.6]], "efficiency = 1.6"),
    ],
)
def test_bad_table_is_one_clear_user_error(bad, needle):
    with pytest.raises(UserError) as exc:
        profile_from_dict({**PROFILE, "compute_eff_table": bad}, "p.json")
    msg = str(exc.value)
    assert needle in msg and "p.json" in msg and "fix:" in msg and "\n" not in msg


def test_macro_equals_per_iteration_with_a_table(small, tmp_path):
    f = tmp_path / "table.json"
    f.write_text(json.dumps(PROFILE))
    d = merge(
        small,
        hardware={"gpu": "h100-sxm", "profile": str(f)},
        traffic={**small["traffic"], "requests_per_day": 30_000},
        fleet={**small["fleet"], "max_batch_size": 6, "max_batched_tokens": 4096},
    )
    runs = {}
    for engine in ("macro", "iteration"):
        sink = ListSink()
        rs = resolved(merge(d, simulation={"hours": 1, "engine": engine}))
        assert rs.profile.compute_eff_table == TABLE
        from fleetsim.apps.simulate import simulate

        runs[engine] = (simulate(rs, request_sink=sink), sink)
    (macro, ms), (_, rs_) = runs["macro"], runs["iteration"]
    assert macro.totals.requests_arrived > 500
    assert ms.rows.keys() == rs_.rows.keys()
    worst = 0.0
    for rid, a in ms.rows.items():
        b = rs_.rows[rid]
        assert a[1] == b[1] and a[6] == b[6], (rid, a, b)
        for i in (4, 5):  # first token, finish
            if not (math.isnan(a[i]) and math.isnan(b[i])):
                worst = max(worst, rel(a[i], b[i]))
    assert worst < 1e-9, worst


def _grid_rows(spec, prof, layer_counts=(2, 1)):
    from fleetsim.calibrate import fit

    rows = []
    for k in layer_counts:
        for b, n in ((1, 16), (2, 16), (1, 64), (2, 64), (4, 64), (1, 256)):
            rows.append(
                {
                    "phase": "prefill",
                    "n_layers": k,
                    "batch": b,
                    "prompt_tokens": n,
                    "context_tokens": 0,
                }
            )
        for b in (1, 2, 4, 8, 16):
            for c in (128, 1024):
                rows.append(
                    {
                        "phase": "decode",
                        "n_layers": k,
                        "batch": b,
                        "prompt_tokens": 0,
                        "context_tokens": c,
                    }
                )
    for r, t in zip(rows, fit.predict(spec, prof, rows), strict=True):
        r["time_s"] = float(t)
    return rows


def test_fit_recovers_a_known_table():
    from fleetsim.calibrate import fit

    spec = dataclasses.replace(model_from_catalog("llama-3.1-8b", "fp32"), n_layers=2)
    # a CPU-like truth: slow 4-row GEMMs, memory-bound single-sequence decode
    true_table = (
        (1.0, 0.1),
        (2.0, 0.04),
        (4.0, 0.066),
        (8.0, 0.12),
        (16.0, 0.2),
        (32.0, 0.24),
        (64.0, 0.48),
        (128.0, 0.55),
        (256.0, 0.6),
    )
    truth = RooflineProfile(
        name="truth",
        peak_flops=1.4e11,
        mem_bw_bytes_per_s=3.2e10,
        mem_bytes=6e10,
        compute_eff_max=0.6,
        compute_eff_half_tokens=10.0,
        memory_eff=0.5,
        overhead_s=0.02,
        overhead_per_layer_s=0.004,
        compute_eff_table=true_table,
    )
    rows = _grid_rows(spec, truth)
    hyp, q_h = fit.fit_roofline(
        spec,
        rows,
        name="fit",
        peak_flops=truth.peak_flops,
        mem_bw_bytes_per_s=truth.mem_bw_bytes_per_s,
        mem_bytes=6e10,
    )
    tab, q_t = fit.fit_roofline_table(spec, rows, hyp)
    assert q_h["max_rel_err"] > 0.2  # the hyperbola cannot follow the dip at T = 4
    assert q_t["max_rel_err"] < 1e-4 and q_t["r2"] > 0.99999
    assert tab.memory_eff == pytest.approx(0.5, rel=1e-3)
    assert tab.overhead_s == pytest.approx(0.02, rel=1e-2)
    assert tab.overhead_per_layer_s == pytest.approx(0.004, rel=1e-2)
    got = dict(tab.compute_eff_table)
    for t in q_t["identified_tokens"]:
        assert got[float(t)] == pytest.approx(dict(true_table)[float(t)], rel=1e-3), t
    # batch-1 decode is memory-bound: T = 1 is not identified and is filled from T = 2's value
    # or the floor, which keeps its points memory-bound (so they are predicted exactly anyway)
    assert 1 in q_t["filled_tokens"] and 16 in q_t["identified_tokens"]
    lm = LatencyModel(spec, tab)
    assert lm.decode_time(1, 128) == pytest.approx(
        LatencyModel(spec, truth).decode_time(1, 128), rel=1e-4
    )
