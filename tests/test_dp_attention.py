"""Decode attention at the fullest data-parallel engine (LatencyModel.dp_att_scale): a sequence
lives on one engine and the ranks step in lockstep, so a decode step's attention (scores, KV
read and the new tokens' term) is that of the engine with ceil(n / dp) sequences, as the linear
layers already are (dp_padded_tokens)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import moe16

from fleetsim.apps.cli import main
from fleetsim.config.schema import FleetSection
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

QWEN3_30B = "data/models/Qwen/Qwen3-30B-A3B-Instruct-2507/config.json"


def _cli(capsys, dp: int, batch: str) -> list[dict]:
    argv = ["latency", "--gpu", "h100-sxm", "--model", QWEN3_30B, "--tp", "1", "--dp", str(dp)]
    if dp > 1:
        argv.append("--expert-parallel")
    assert main([*argv, "--batch", batch, "--context", "100000", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _lat(dp: int) -> LatencyModel:
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    return LatencyModel(moe16(8), p, tp=1, dp=dp, expert_parallel=dp > 1)


def test_qwen3_30b_dp2_attention_is_the_fullest_engines(capsys):
    """Qwen3-30B-A3B on 2 x H100 (DP2, EP), 100,000-token contexts, by hand: the KV read of
    48 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes = 98,304 bytes per token at bw x
    memory_eff (memory-bound: 786,432 FLOPs per pair are ~40x less time). Batch 1: one engine
    holds the sequence, 100,001 tokens of it (the DP1 value, not half of it); batch 3: the
    fullest engine holds 2, 200,002 tokens (not 1.5 sequences' worth)."""
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    p = apply_stack(p, "vllm-v1", "h100-sxm", FleetSection().max_batch_size)
    per_tok = 48 * 4 * 128 * 2 * 2 / (p.mem_bw_bytes_per_s * p.memory_eff)
    b1, b3 = _cli(capsys, 2, "1,3")
    assert b1["parts_s"]["attention_core"] == pytest.approx(100_001 * per_tok, rel=1e-12)
    assert b3["parts_s"]["attention_core"] == pytest.approx(200_002 * per_tok, rel=1e-12)
    assert b1["parts_s"]["attention_core"] == pytest.approx(3.089e-3, abs=5e-7)
    assert b3["parts_s"]["attention_core"] == pytest.approx(6.178e-3, abs=5e-7)
    (one,) = _cli(capsys, 1, "1")
    assert b1["parts_s"]["attention_core"] == pytest.approx(
        one["parts_s"]["attention_core"], rel=1e-12
    )
    for r in (b1, b3):  # the parts still sum to the step
        assert sum(r["parts_s"].values()) == pytest.approx(r["total_s"], rel=1e-12)


def test_a_batch_dp_divides_is_the_even_split_bit_for_bit():
    """dp 4 at batch 8: the fullest engine holds 8 / 4 = 2, the even split itself; the run
    coefficients' slopes are the unscaled _att_c and _att_m, bit for bit."""
    lat = _lat(4)
    c = lat.run_coeffs(8)
    assert c.b1 == lat._att_c  # type: ignore[attr-defined]
    assert c.b2 == lat._att_m  # type: ignore[attr-defined]
    base = lat._oh + lat.linear_time(8, 8) + 8 * lat._att_m  # type: ignore[attr-defined]
    assert c.base == base
    assert lat.dp_att_scale(8) == 1.0
    br = lat.breakdown(0, 0.0, 0, 8, 8 * 5000.0)
    att_c, att_m = lat._att_c, lat._att_m  # type: ignore[attr-defined]
    even = max(8 * 5000.0 * att_c, 8 * 5000.0 * att_m) + 8 * att_m
    assert br["attention_core"] == even


def test_a_batch_dp_does_not_divide_pays_the_fullest_engine():
    """dp 4 at batch 5 (fullest engine: 2): the same decode attention as batch 8 at the same
    per-sequence context, 8/5 of the even split; the run formula (the macro engine) and the
    general iteration agree, and a mixed step's one prompt chunk is the fullest engine's whole
    (4 x its pairs and tokens over the even split: LatencyModel.fullest_prompts)."""
    lat = _lat(4)
    assert lat.dp_att_scale(5) == pytest.approx(8 / 5, rel=1e-15)
    assert lat.dp_att_scale(1) == 4.0
    assert lat.dp_att_scale(0) == 1.0
    b5 = lat.breakdown(0, 0.0, 0, 5, 5 * 5000.0)["attention_core"]
    b8 = lat.breakdown(0, 0.0, 0, 8, 8 * 5000.0)["attention_core"]
    assert b5 == pytest.approx(b8, rel=1e-12)
    c5, c8 = lat.run_coeffs(5), lat.run_coeffs(8)
    assert c5.b1 == pytest.approx(c8.b1 * 8 / 5, rel=1e-12)
    assert c5.b2 == pytest.approx(c8.b2 * 8 / 5, rel=1e-12)
    t = lat.decode_step(5, 5 * 5000.0)[0]
    t_it = lat.iteration(0, 0.0, 0, 5, 5 * 5000.0)[0]
    assert t == t_it
    br = lat.breakdown(0, 0.0, 0, 5, 5 * 5000.0)
    assert sum(br.values()) == pytest.approx(t, rel=1e-12)
    # a mixed step: 1,500 prompt tokens (pairs as given) plus 5 decodes at 5,000
    att_c, att_m = lat._att_c, lat._att_m  # type: ignore[attr-defined]
    pairs = 1500.0 * 1500 / 2
    ctx = 5 * 5000.0
    mixed = lat.breakdown(1500, pairs, 1, 5, ctx)
    want = max((4 * pairs + ctx * 8 / 5) * att_c, ctx * 8 / 5 * att_m) + (4 * 1500 + 8) * att_m
    assert mixed["attention_core"] == pytest.approx(want, rel=1e-12)
    assert sum(mixed.values()) == pytest.approx(lat.iteration(1500, pairs, 1, 5, ctx)[0], rel=1e-12)


def test_dp1_is_main_formula_bit_for_bit():
    """dp 1: three hundred random decode and mixed steps time their attention with the even
    (whole) coefficients exactly as before: run coefficients _att_c / att_m_for(n), base
    n x _att_m, and the mixed iteration's max(scores, KV) + tokens x _att_m."""
    lat = _lat(1)
    att_c, att_m = lat._att_c, lat._att_m  # type: ignore[attr-defined]
    rng = random.Random(39)
    for _ in range(300):
        n = rng.randint(1, 512)
        ctx = n * rng.uniform(1.0, 32_000.0)
        c = lat.run_coeffs(n)
        assert c.b1 == att_c and c.b2 == lat.att_m_for(n)
        assert c.base == lat._oh + lat.linear_time(n, n) + n * att_m  # type: ignore[attr-defined]
        p_tok = rng.randint(1, 4096)
        pairs = float(rng.randint(0, p_tok * p_tok))
        att = (pairs + ctx) * att_c
        kv = ctx * att_m
        tok = p_tok + n
        lt = lat.linear_time(tok, 1 + n)
        want = lat._oh + lt + (att if att > kv else kv) + tok * att_m  # type: ignore[attr-defined]
        assert lat.iteration(p_tok, pairs, 1, n, ctx)[0] == want
