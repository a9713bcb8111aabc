"""The KV a running sequence holds, weighted by its time in flight (results/capacity.py): hand
values of the closed form, and the engine's own KV in flight against it (Little's law)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import KV_LIGHT_SIZES, one_llama_replica

from fleetsim.config.loading import load_scenario
from fleetsim.config.resolve import resolve
from fleetsim.results.capacity import (
    Sizes,
    kv_tokens_per_sequence,
    replica_capacity,
    scenario_sizes,
)

ROOT = Path(__file__).resolve().parents[1]


def test_two_point_outputs_by_hand():
    """Prompt 100; output 1 or 99 tokens, equally likely. The 1-token request holds its 100
    prompt tokens for its one (prefill) iteration; the 99-token one holds 100 in its prefill
    iteration and 100 + k in decode iteration k = 1..98: 100 + 98 x 100 + 98 x 99 / 2 = 14,751
    token-iterations over 99 iterations. Per running sequence (100 + 14,751) / (1 + 99) =
    148.51 tokens; the mean-size estimate 100 + 50 / 2 = 125 understates it by 16 %."""
    p = np.array([100, 100])
    o = np.array([1, 99])
    assert kv_tokens_per_sequence(p, o) == pytest.approx(148.51, abs=1e-9)
    # the closed form E[PL]/E[L] + E[L^2]/(2 E[L]) - 1/2 with one-chunk prompts
    closed = 100 + (1 + 99**2) / 2 / (2 * 50) - 0.5
    assert closed == pytest.approx(148.51, abs=1e-9)
    # reserved at admission (the first engine): prompt + output from start to end,
    # (101 x 1 + 199 x 99) / 100
    assert kv_tokens_per_sequence(p, o, reserve=True) == pytest.approx(198.02, abs=1e-9)


def test_constant_outputs_give_the_mean_size_estimate():
    """Every request 500 + 200 tokens: the sequences hold 500 + k, k = 0..199 (the prefill
    iteration holds 500), a mean of 500 + 199 / 2 = 599.5: the old estimate 500 + 200 / 2 less
    half a token. Long-tailed outputs are what move it."""
    assert kv_tokens_per_sequence(np.full(4, 500), np.full(4, 200)) == pytest.approx(599.5)


@pytest.mark.parametrize("m", [2.0, 50.0, 1000.0])
def test_geometric_outputs_hold_prompt_plus_mean_output(m):
    """Geometric outputs on {1, 2, ...} of mean m (memoryless, E[L^2] = 2 m^2 - m): E[L^2] /
    (2 E[L]) - 1/2 = m - 1, so a running sequence holds prompt + m - 1 tokens: the whole mean
    output, not half of it (exact pmf, tail beyond 60 m below 1e-26)."""
    q = 1.0 / m
    k = np.arange(1, int(60 * m) + 2, dtype=float)
    w = q * (1.0 - q) ** (k - 1.0)
    p = np.full(len(k), 300.0)
    assert kv_tokens_per_sequence(p, k, weights=w) == pytest.approx(300.0 + m - 1.0, rel=1e-9)


def test_chunked_prefill_counts_each_chunk_iteration():
    """A 20,000-token prompt in 8,192-token chunks takes 3 iterations holding 8,192, 16,384 and
    20,000 tokens (the last samples the one output token): 44,576 / 3 = 14,858.67 per
    iteration; prefilled whole, 20,000."""
    p, o = np.array([20_000]), np.array([1])
    assert kv_tokens_per_sequence(p, o, 8192) == pytest.approx(44_576 / 3)
    assert kv_tokens_per_sequence(p, o) == 20_000
    # with 2 output tokens: + one decode iteration at 20,001 -> 64,577 / 4
    assert kv_tokens_per_sequence(p, np.array([2]), 8192) == pytest.approx(64_577 / 4)


def test_deepseek_r1_day_is_kv_bound_at_eight_nodes():
    """scenarios/deepseek-r1-b200.toml: lognormal outputs (median 9,350, sigma 0.74, cut at
    674 and 32,768) hold ~37 % more KV per running sequence than mean prompt + mean output / 2
    (7,442 tokens): 10,219. The 1,233,072-token node (8.0 GB of its 1,532 GB the further copies
    of MLA's down projections and the routers that each of the 8 ranks holds whole, branch m47;
    1,247,408 before) then holds 120 sequences, fewer than max_num_seqs (128): the estimate is
    bound by the KV budget, as the run is (98.4 % KV use and 42,160 preemptions at 8 nodes)."""
    path = str(ROOT / "scenarios" / "deepseek-r1-b200.toml")
    sc, _ = load_scenario(path, ["fleet.replicas=8"])
    rs = resolve(sc, path)
    s = scenario_sizes(rs, path)
    assert round(s.prompt + s.output / 2) == 7442
    assert round(s.kv_per_seq) == 10_219
    assert rs.kv_capacity_tokens == 1_233_072
    c = replica_capacity(rs, path, tpot_s=sc.slo.tpot_s)
    assert (c.batch, c.bound) == (120, "kv")
    old = replica_capacity(rs, path, sc.slo.tpot_s, Sizes(s.prompt, s.output, 7442.0))
    assert (old.batch, old.bound) == (128, "max_num_seqs")  # what it said before
    assert c.rps < 0.92 * old.rps


@pytest.fixture(scope="module", params=[1, 16])
def light_run(request):
    """One llama-3.1-8b replica on an H100 for an hour at 10 req/s: prompts 200-600 tokens,
    geometric outputs of mean 400 (long-tailed), no prefix caching, KV blocks of 1 and of 16
    tokens: ~58 sequences in flight, nothing queues and nothing is preempted. (At a low rate
    the engine's pure-decode runs grow long: tests/test_kv_time_average.py holds the KV
    utilisation to the blocks held over time there.)"""
    from fleetsim.api import simulate

    d = one_llama_replica({"requests_per_day": 864_000, **KV_LIGHT_SIZES}, request.param)
    return simulate(d, requests=True), request.param


def test_engine_kv_in_flight_matches_the_weighted_estimate(light_run):
    """Little's law, measured: the hour's mean KV tokens in use (kv_utilization x the budget)
    over its mean sequences in flight (the requests' arrival-to-finish times within the hour
    / 3,600 s; nothing waits unadmitted) is the KV a running sequence holds: 795 tokens with
    one-token blocks. The time-weighted estimate of the same requests (796: prompt ~400 +
    geometric mean 400 - 1) matches it within 1 %, and with 16-token blocks it matches once the
    partly filled last block, (16 - 1) / 2 = 7.5 tokens on average, is added (802.5 measured);
    the mean-size estimate prompt + output / 2 (600) is 25 % low."""
    run, block = light_run
    T = run.totals
    assert T["preemptions"] == 0
    req = run.requests
    col = {c: req.column(c).to_numpy(zero_copy_only=False) for c in ("arrival_s", "finish_s")}
    a = col["arrival_s"].astype(float)
    f = np.nan_to_num(col["finish_s"].astype(float), nan=3600.0)
    n_in_flight = float((np.minimum(f, 3600.0) - np.minimum(a, 3600.0)).sum()) / 3600.0
    assert 50 < n_in_flight < 65
    rs = run.result.resolved
    kv_util = float(run.hourly.column("kv_utilization")[0].as_py())
    measured = kv_util * rs.kv_capacity_tokens / n_in_flight
    done = np.asarray(req.column("status").cast("string").to_pylist()) == "completed"
    p = req.column("prompt_tokens").to_numpy(zero_copy_only=False)[done]
    o = req.column("output_tokens").to_numpy(zero_copy_only=False)[done]
    est = kv_tokens_per_sequence(p, o, rs.scenario.fleet.max_batched_tokens)
    assert est == pytest.approx(400 + 400 - 1, rel=0.01)
    assert est + (block - 1) / 2 == pytest.approx(measured, rel=0.01)
    assert p.mean() + o.mean() / 2 < 0.8 * measured


@pytest.mark.parametrize("nodes,warned", [(8, True), (10, False)])
def test_summary_warns_when_the_kv_bound_estimate_is_near_full(nodes, warned):
    """One flat hour of the R1 day at its busiest rate (135,000 a day: 1.5625 req/s, the
    azure-conv peak of 100,000 a day). The estimate's batch is 120 sequences of 10,219 KV
    tokens, bound by the KV budget; at the hour's own mean sizes (its completed requests) 8 nodes
    need ~102 % of it (a KV NEAR FULL warning, not ``overloaded``), 10 nodes ~81 % (none). (9
    nodes need 90.1 %, just over the warning's line since each of a node's 8 ranks holds MLA's
    down projections and the routers whole, branch m47: 122 sequences and 88.9 % before.)"""
    from fleetsim.api import simulate
    from fleetsim.results.summary import headroom, health

    path = str(ROOT / "scenarios" / "deepseek-r1-b200.toml")
    ov = [
        f"fleet.replicas={nodes}",
        "simulation.hours=1",
        "traffic.diurnal=flat",
        "traffic.requests_per_day=135000",
    ]
    res = simulate(path, ov).result
    h = headroom(res, path)
    assert h["capacity_bound"] == "kv" and h["batch_bound"] == 120
    assert h["peak_hour_load"] == h["peak_hour_rate_per_s"] / h["slo_capacity_per_s"]
    assert bool(h["peak_hour_load"] >= 0.9) is warned
    assert h["peak_hour_load"] == pytest.approx(1.018 if warned else 0.808, abs=0.01)
    hl = health(res)
    assert hl["kv_near_full"] is warned and not hl["overloaded"]
    assert any(w.startswith("KV NEAR FULL") for w in hl["warnings"]) is warned
