"""The reported KV utilisation (hourly ``kv_utilization``, the summary's "KV use") is the
time-average of the KV blocks held over the pool's blocks (serving/kv_paged.py
``PagedKV._held_block_s``): hand counts with one request at a time, and Little's law at low
load, where the engine's pure-decode runs are long."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import KV_LIGHT_SIZES, ListSink, one_llama_replica, resolved

from fleetsim.apps.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]

P, O = 1000, 300  # one request's prompt and output tokens


def _one_at_a_time(tmp_path, block: int):
    """59 requests of 1,000 + 300 tokens, one a minute from t = 10 s, on one llama-3.1-8b
    replica of an H100 (each is done in ~2.6 s: never two at once), no prefix caching."""
    trace = tmp_path / "trace.csv"
    rows = [f"{10 + 60 * i},{P},{O}" for i in range(59)]
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    d = one_llama_replica({"trace": str(trace)}, block)
    rs = resolved(d)
    sink = ListSink()
    res = simulate(rs, request_sink=sink)
    return rs, res, sink.rows


@pytest.mark.parametrize("block", [1, 16])
def test_one_request_at_a_time_by_hand(tmp_path, block):
    """A request holds ceil(1,000 / b) blocks in its prefill iteration (arrival to first
    token) and ceil((1,000 + k) / b) in decode step k = 1..299 (the last token's KV is never
    written), each step at its own time (the latency model at context 1,000 + k; their sum is
    first token to finish). The hour's block-seconds over (blocks x 3,600 s) is the reported
    utilisation: with one-token blocks the engine's equals the hand count to the steps' slow
    growth (the engine times a run's decode steps at their mean: 3.5e-5); with 16-token blocks
    to the openings' phase within the run (at most half a block per sequence per run; +0.26 %
    here). The blocks after a run's openings over the whole run, what was reported before
    (ceil(1,299 / b) from arrival to finish), are 13.5 % more."""
    rs, res, rows = _one_at_a_time(tmp_path, block)
    assert len(rows) == 59
    lat = rs.latency_model()
    steps = [lat.iteration(0, 0.0, 0, 1, float(P + k))[0] for k in range(1, O)]
    held = old = 0.0
    for a, _, p, o, ft, fin, status in rows.values():
        assert (p, o, status) == (P, O, "completed")
        assert fin - ft == pytest.approx(sum(steps), rel=1e-12)
        held += math.ceil(P / block) * (ft - a)
        held += sum(math.ceil((P + k) / block) * t for k, t in zip(range(1, O), steps))
        old += math.ceil((P + O - 1) / block) * (fin - a)
    u = res.hourly.column("kv_utilization").to_pylist()[0]
    pool_s = rs.kv.blocks * 3600.0
    assert u == pytest.approx(held / pool_s, rel=1e-4 if block == 1 else 5e-3)
    assert old / pool_s > 1.13 * u


def test_littles_law_at_low_load():
    """One llama-3.1-8b replica at 0.5 req/s (prompts 200-600, geometric outputs of mean 400):
    ~1.6 sequences in flight, each decoding alone for long runs. The hour's mean KV tokens held
    (utilisation x the budget) over its mean sequences in flight is the KV a running sequence
    holds: the time-weighted estimate of results/capacity.py (801 tokens) plus the last block's
    unfilled half, (16 - 1) / 2, within 0.1 % (-0.03 %). The end-of-run count overstated it by
    13 %: 915 tokens."""
    from fleetsim.api import simulate as run_scenario
    from fleetsim.results.capacity import kv_tokens_per_sequence

    d = one_llama_replica({"requests_per_day": 43_200, **KV_LIGHT_SIZES})
    run = run_scenario(d, requests=True)
    assert run.totals["preemptions"] == 0
    req = run.requests
    a = req.column("arrival_s").to_numpy(zero_copy_only=False).astype(float)
    f = req.column("finish_s").to_numpy(zero_copy_only=False).astype(float)
    f = np.nan_to_num(f, nan=3600.0)
    n_in_flight = float((np.minimum(f, 3600.0) - np.minimum(a, 3600.0)).sum()) / 3600.0
    assert 1.4 < n_in_flight < 1.7
    rs = run.result.resolved
    u = float(run.hourly.column("kv_utilization")[0].as_py())
    measured = u * rs.kv_capacity_tokens / n_in_flight
    done = np.asarray(req.column("status").cast("string").to_pylist()) == "completed"
    p = req.column("prompt_tokens").to_numpy(zero_copy_only=False)[done]
    o = req.column("output_tokens").to_numpy(zero_copy_only=False)[done]
    est = kv_tokens_per_sequence(p, o, rs.scenario.fleet.max_batched_tokens)
    assert est == pytest.approx(801.4, abs=0.1)
    assert measured == pytest.approx(est + 7.5, rel=1e-3)


# ---- a window model's KV budget in tokens: its typical sequences over their time in flight ----
def test_window_token_iterations_against_the_iterations():
    """``token_iterations`` (results/capacity.py) against each iteration's context listed: a
    prompt's chunks hold min(j C, P), decode step k holds P + k (k = 1..L-1), reserved P + L
    throughout; with a window each is capped at W. 300 random (P, L, W, C) cases, chunk sizes
    above and below the window."""
    from fleetsim.results.capacity import token_iterations

    rng = np.random.default_rng(1)
    for case in range(300):
        p, n_out, w = (int(x) for x in rng.integers(1, 3000, 3))
        c = None if case % 2 else int(rng.integers(1, 1500))
        reserve = case % 3 == 0
        n = -(-p // c) if c else 1
        ctx = [min(j * c, p) for j in range(1, n + 1)] if c else [p]
        ctx += [p + k for k in range(1, n_out)]
        if reserve:
            ctx = [p + n_out] * len(ctx)
        held, iters = token_iterations(np.array([p]), np.array([n_out]), c, reserve)
        win, _ = token_iterations(np.array([p]), np.array([n_out]), c, reserve, window=w)
        assert (held[0], iters[0]) == (sum(ctx), len(ctx))
        assert win[0] == sum(min(x, w) for x in ctx), (p, n_out, w, c, reserve)


def test_gpt_oss_two_point_outputs_by_hand():
    """gpt-oss-120b (18 global + 18 window layers of 128 tokens, 2,048 B per token and layer):
    prompt 100, output 1 or 99 equally likely. The 1-token request holds 100 tokens for one
    iteration (all within the window); the 99-token one 100 + 9,800 + 4,851 = 14,751
    token-iterations over 99, of which the window keeps 100 + (28 x 100 + 28 x 29 / 2) + 70 x
    128 = 12,266 (decode steps 1..28 still within it). Per token held: 36,864 x (1 + 6,183 /
    7,425.5) = 67,560 B; the mid-life contexts unweighted (100.5 and 149.5, the old estimate)
    said 36,864 x (1 + 228.5 / 250) = 70,558 B."""
    from fleetsim.config.hf import read_hf_config_named
    from fleetsim.device.modelspec import ModelSpec
    from fleetsim.results.capacity import token_iterations

    arch, name = read_hf_config_named(ROOT / "data/models/openai/gpt-oss-120b/config.json")
    m = ModelSpec(name=name, **arch)
    assert (m.n_global_attn_layers, m.n_sliding_layers, m.sliding_window_tokens) == (18, 18, 128)
    p, o = np.array([100, 100]), np.array([1, 99])
    held, iters = token_iterations(p, o)
    win, _ = token_iterations(p, o, window=128)
    assert held.tolist() == [100, 14_751] and win.tolist() == [100, 12_266]
    assert iters.tolist() == [1, 99]
    bpt = m.kv_bytes_per_token_held_tp(1, held.mean(), win.mean(), iters.mean())
    assert bpt == pytest.approx(36_864 * (1 + 6183 / 7425.5), rel=1e-12)
    assert round(bpt) == 67_560


def test_gemma_budget_of_a_sequence_crossing_its_window():
    """gemma-3-27b (10 global + 52 window layers of 1,024 tokens, 8,192 B per token and layer),
    every request 500 + 1,000 tokens on one H100: a sequence holds 500 .. 1,499 tokens, 999,500
    token-iterations over 1,000 iterations, of which the window keeps 500 + (524 x 500 + 524 x
    525 / 2) + 475 x 1,024 = 886,450 (decode steps 1..524 within it). The KV budget's bytes per
    token are 8,192 x (10 + 52 x 886,450 / 999,500) = 459,722, 9.5 % under every token in every
    layer (507,904), which the mid-life context, 500 + 1,000 / 2 = 1,000 < 1,024, said."""
    d = {
        "simulation": {"hours": 1},
        "model": {"config": str(ROOT / "data/models/google/gemma-3-27b-it")},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"tensor_parallel": 1},
        "traffic": {
            "requests_per_day": 1000,
            "prompt": {"dist": "fixed", "value": 500},
            "output": {"dist": "fixed", "value": 1000},
        },
    }
    rs = resolved(d)
    assert rs.kv.bytes_per_token == pytest.approx(8192 * (10 + 52 * 886_450 / 999_500), 1e-12)
    assert round(rs.kv.bytes_per_token) == 459_722
    assert 8192 * 62 == 507_904
    # the budget in tokens: the KV bytes over them (its whole blocks)
    b = rs.kv.block_size_tokens
    assert rs.kv_capacity_tokens == int(rs.kv.kv_bytes // (rs.kv.bytes_per_token * b)) * b


def _gemma_sizes(traffic: dict, seed: int = 0):
    d = {
        "seed": seed,
        "simulation": {"hours": 1},
        "model": {"config": str(ROOT / "data/models/google/gemma-3-27b-it")},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"tensor_parallel": 1},
        "traffic": traffic,
    }
    return resolved(d)


def test_gemma_budget_of_a_trace_weighs_its_requests(tmp_path):
    """Branch t48: a trace's window model had its budget charged every token in every layer
    (507,904 B per token: the trace drew no typical sequence). Now the trace's own requests
    are the typical sequences. A trace of 500 + 1,000-token requests only gives the budget of
    the same sizes drawn (fixed distributions: 459,722 B, the test above), and so does an
    empirical CSV column of them; a trace of one such request and one of 2,000 + 1 tokens, by
    hand: the second holds 2,000 tokens for one iteration, 1,024 of them in a window layer (one
    prefill chunk: the default budget is larger), so the means are (999,500 + 2,000) / 2 held,
    (886,450 + 1,024) / 2 within the window over (1,000 + 1) / 2 iterations, and the bytes per
    token 8,192 x (10 + 52 x 887,474 / 1,001,500) = 459,403."""
    head = "arrival_s,prompt_tokens,output_tokens\n"
    same = tmp_path / "same.csv"
    same.write_text(head + "".join(f"{10 * i},500,1000\n" for i in range(50)))
    rs = _gemma_sizes({"trace": str(same)})
    assert rs.kv.bytes_per_token == pytest.approx(8192 * (10 + 52 * 886_450 / 999_500), 1e-12)
    assert round(rs.kv.bytes_per_token) == 459_722  # not 8,192 x 62 = 507,904
    fixed = {
        "requests_per_day": 1000,
        "prompt": {"dist": "fixed", "value": 500},
        "output": {"dist": "fixed", "value": 1000},
    }
    assert _gemma_sizes(fixed).kv == rs.kv  # the same budget, blocks and tokens
    # an empirical column (both sizes of one file: sampled jointly)
    col = tmp_path / "sizes.csv"
    col.write_text("p,o\n" + "500,1000\n" * 7)
    emp = {
        "requests_per_day": 1000,
        "prompt": {"dist": "empirical", "file": str(col), "column": "p"},
        "output": {"dist": "empirical", "file": str(col), "column": "o"},
    }
    assert _gemma_sizes(emp).kv == rs.kv
    two = tmp_path / "two.csv"
    two.write_text(head + "10,500,1000\n20,2000,1\n")
    bpt = _gemma_sizes({"trace": str(two)}).kv.bytes_per_token
    assert bpt == pytest.approx(8192 * (10 + 52 * 887_474 / 1_001_500), rel=1e-12)
    assert round(bpt) == 459_403


def test_window_budget_of_an_empirical_column_is_seed_independent(tmp_path):
    """An empirical column's draws for the budget come from a fixed stream (config/resolved.py
    ``typical_sizes``): the scenario's seed moves the run's requests, not its KV budget; and
    the column's sizes do move it (mostly 100-token prompts under the window, against mostly
    4,000: more bytes per token held where the window keeps the whole context)."""
    col = tmp_path / "sizes.csv"
    col.write_text("p,o\n" + "100,50\n" * 3 + "4000,50\n")
    emp = {
        "requests_per_day": 1000,
        "prompt": {"dist": "empirical", "file": str(col), "column": "p"},
        "output": {"dist": "fixed", "value": 50},
    }
    a, b = _gemma_sizes(emp, seed=1).kv, _gemma_sizes(emp, seed=2).kv
    assert a == b
    col.write_text("p,o\n" + "100,50\n" + "4000,50\n" * 3)
    c = _gemma_sizes(emp, seed=1).kv
    assert 8192 * 10 < c.bytes_per_token < a.bytes_per_token < 8192 * 62
