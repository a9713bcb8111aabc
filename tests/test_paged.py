"""The second-generation engine: paged KV, preemption, chunked prefill, prefix caching, sessions.

Exact checks (closed forms, conservation laws, the Mooncake prefix-cache oracle) and the
macro-stepped engine against the per-iteration reference on the prefix-caching workloads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ListSink, merge, resolved
from test_engine_modes import assert_modes_equal
from test_theory import write_profile

from fleetsim.apps.simulate import simulate
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolved import activation_reserve_bytes, kv_budget
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.serving.kv_blocks import blocks_in, cumulative, first_short
from fleetsim.serving.pod import Pod
from fleetsim.workload.mooncake import prefix_hit_oracle, read_mooncake

ROOT = Path(__file__).resolve().parents[1]
MOONCAKE = ROOT / "scenarios/data/mooncake-2025/conversation_trace.jsonl"


# ---- block arithmetic -------------------------------------------------------------------------
def test_block_runs_closed_form_equal_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(300):
        b = int(2 ** rng.integers(0, 6))
        cnt = rng.integers(0, 4, size=b).tolist()
        n = sum(cnt)
        it = int(rng.integers(0, 10_000))
        # brute force: step i needs cnt[(it + i) % b] new blocks
        need = [cnt[(it + i) % b] for i in range(4 * b + 7)]
        for m in range(len(need)):
            assert blocks_in(cnt, it, m, n) == sum(need[:m])
        if n == 0:
            assert first_short(cnt, it, n, 5) == 0
            continue
        avail = int(rng.integers(0, 3 * n + 2))
        acc, m_bf = 0, 0
        while acc <= avail:
            acc += cnt[(it + m_bf) % b]
            m_bf += 1
        assert first_short(cnt, it, n, avail) == m_bf
        # the O(1) / O(log b) forms the engine uses (cumulative sums of cnt twice)
        cum = cumulative(cnt)
        s = it % b
        for m in (0, 1, b - 1, b, 3 * b + 1):
            q, rem = divmod(m, b)
            assert q * n + cum[s + rem] - cum[s] == blocks_in(cnt, it, m, n)


def test_kv_budget_formula():
    """gpu_memory_utilization x memory - weights - activation reserve, in whole blocks."""
    m = model_from_catalog("llama-3.1-70b")
    sc = scenario_from_dict({"fleet": {"tensor_parallel": 2, "max_batched_tokens": 8192}})
    kv = kv_budget(sc, m, 80e9)
    # the profiling run's peak is the larger of its forward pass and its sampler pass (vLLM's
    # torch peak of live tensors): here the forward pass, 2 B x 8192 x (3 x 28672/2 + 4 x 8192)
    forward = 2.0 * 8192 * (3 * m.d_ff / 2 + 4 * m.d_model)
    sampler = 2.0 * 8192 * m.d_model + 4.0 * 256 * m.vocab_size
    assert forward == pytest.approx(1.2415e9, rel=1e-4) and sampler < forward
    act_gpu = forward
    assert activation_reserve_bytes(m, 2, 8192, 256) == act_gpu
    # 4,096 sequences: the sampler's fp32 logits (4 B x 4096 x 128,256 = 2.1 GB) dominate
    big = 2.0 * 8192 * m.d_model + 4.0 * 4096 * m.vocab_size
    assert big == pytest.approx(2.2356e9, rel=1e-4)
    assert activation_reserve_bytes(m, 2, 8192, 4096) == big
    expect = 2 * 80e9 * 0.9 - m.weight_bytes - 2 * act_gpu
    assert kv.kv_bytes == pytest.approx(expect, rel=1e-12)
    assert kv.blocks == int(expect // (m.kv_bytes_per_token * 16))
    assert kv.tokens == 16 * kv.blocks
    assert kv.activation_bytes == pytest.approx(2 * act_gpu)
    # an explicit reserve replaces the estimate; reserve allocation counts whole tokens
    sc0 = scenario_from_dict(
        {"fleet": {"tensor_parallel": 2, "activation_reserve_bytes": 0, "kv_allocation": "reserve"}}
    )
    kv0 = kv_budget(sc0, m, 80e9)
    assert kv0.tokens == int((2 * 80e9 * 0.9 - m.weight_bytes) // m.kv_bytes_per_token)


# ---- chunked prefill ------------------------------------------------------------------------
def _linear(tmp_path: Path) -> str:
    return write_profile(
        tmp_path / "lin.json",
        base_s=0.01,
        prefill_base_s=0.002,
        per_prefill_token_s=1e-5,
        per_seq_s=1e-4,
        per_context_token_s=1e-7,
    )


def _one_request_trace(tmp_path: Path, prompt: int, out: int) -> str:
    f = tmp_path / "one.csv"
    f.write_text(f"arrival_s,prompt_tokens,output_tokens\n1.0,{prompt},{out}\n")
    return str(f)


def test_long_prompt_is_chunked_and_ttft_ends_with_last_chunk(tmp_path):
    """A 10,000-token prompt under a 4,096-token budget: chunks 4096 + 4096 + 1808, each its own
    iteration; TTFT is the three iterations' time (linear profile, exact)."""
    d = {
        "simulation": {"hours": 1},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"profile": _linear(tmp_path)},
        "fleet": {"max_batched_tokens": 4096},
        "traffic": {"trace": _one_request_trace(tmp_path, 10_000, 5)},
    }
    sink = ListSink()
    res = simulate(resolved(d), request_sink=sink)
    (row,) = sink.rows.values()
    assert row[6] == "completed"
    ttft = row[4] - row[0]
    expect = 3 * (0.01 + 0.002 + 1e-4) + 1e-5 * 10_000
    assert ttft == pytest.approx(expect, rel=1e-12)
    assert res.totals.iterations == 3 + 4  # three chunks, then four decode steps
    # without chunking the same prompt is refused (it could never be scheduled)
    with pytest.raises(ScenarioError, match="max_batched_tokens"):
        resolved(merge(d, fleet={"max_batched_tokens": 4096, "enable_chunked_prefill": False}))


# ---- preemption -------------------------------------------------------------------------------
def test_preemption_conserves_tokens_and_recomputes(tmp_path):
    """Many long requests on a tiny cache: preempted requests are recomputed (their generated
    tokens become prompt), yet every prompt and output token is counted exactly once."""
    m = model_from_catalog("llama-3.1-8b")
    # 16.06 GB of weights; 0.5 GB left = 3,814 tokens = 238 blocks of 16
    prof = write_profile(
        tmp_path / "lin.json",
        base_s=0.01,
        prefill_base_s=0.002,
        per_prefill_token_s=1e-5,
        per_seq_s=1e-4,
        per_context_token_s=1e-7,
        mem_bytes=(m.weight_bytes + 0.5e9) / 0.9,
    )
    d = {
        "simulation": {"hours": 1},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"profile": prof},
        "fleet": {"max_batch_size": 32, "activation_reserve_bytes": 0},
        "traffic": {
            "requests_per_day": 20 * 3600 * 24 / 10,  # 2 per second
            "diurnal": "flat",
            "prompt": {"dist": "uniform", "low": 200, "high": 600},
            "output": {"dist": "uniform", "low": 100, "high": 1500},
        },
    }
    assert resolved(d).kv.blocks == 238
    sink = ListSink()
    res = simulate(resolved(d), request_sink=sink)
    T = res.totals
    assert T.preemptions > 20
    done = [r for r in sink.rows.values() if r[6] == "completed"]
    flight = [r for r in sink.rows.values() if r[6] == "in_flight"]
    assert len(done) > 500
    # each request's prompt is counted once, when its first prefill completes
    started = [r for r in sink.rows.values() if not math.isnan(r[4])]
    assert T.prompt_tokens == sum(r[2] for r in started)
    # output tokens: every completed request's, plus what the unfinished ones had generated
    out_done = sum(r[3] for r in done)
    assert out_done <= T.output_tokens <= out_done + sum(r[3] for r in flight)
    assert T.recomputed_tokens > 0
    assert 0.0 < float(np.max(res.hourly.column("kv_utilization").to_numpy())) <= 1.0


# ---- prefix caching: the Mooncake oracle --------------------------------------------------------
def _mooncake_one_replica(trace: str, hours: int = 2) -> dict:
    # a 100 TB "GPU" that never evicts, fast enough that the hour of traffic drains
    return {
        "simulation": {"hours": hours},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"mem_bytes": 1e14, "peak_flops": 1e17, "mem_bw_bytes_per_s": 1e15},
        "traffic": {"trace": trace},
    }


def test_mooncake_prefix_cache_oracle():
    """One replica with a cache that never evicts serves, from cache, exactly the prompt tokens
    that the trace's hash_ids say an earlier request already had (full 512-token blocks, at
    least one token computed): hit fraction 0.3734 of 144.8M prompt tokens."""
    res = simulate(resolved(_mooncake_one_replica(str(MOONCAKE))))
    T = res.totals
    hit, prompt = prefix_hit_oracle(read_mooncake(str(MOONCAKE)))
    assert T.requests_completed == T.requests_arrived == 12_031
    assert T.prompt_tokens == prompt
    assert T.prefix_hit_tokens == hit
    assert hit / prompt == pytest.approx(0.37338, abs=1e-5)
    assert T.preemptions == 0


def _head(tmp_path: Path, n: int) -> str:
    f = tmp_path / "head.jsonl"
    with MOONCAKE.open() as src:
        f.write_text("".join(next(src) for _ in range(n)))
    return str(f)


def test_realistic_cache_evicts_and_hits_less(tmp_path):
    """An 8B replica on a real H100: the cache evicts and the hit rate falls below the oracle."""
    trace = _head(tmp_path, 3000)
    big = simulate(resolved(_mooncake_one_replica(trace, hours=1)))
    d = {
        "simulation": {"hours": 1},
        "model": {"name": "llama-3.1-8b"},
        "fleet": {"replicas": 4, "router": "least_loaded"},
        "traffic": {"trace": trace},
    }
    real = simulate(resolved(d))
    rate_big = big.totals.prefix_hit_tokens / big.totals.prompt_tokens
    rate_real = real.totals.prefix_hit_tokens / real.totals.prompt_tokens
    assert rate_big > 0.3
    assert 0.0 < rate_real < rate_big - 0.05


@pytest.mark.parametrize(
    "router,eviction",
    [
        ("least_loaded", "pool-first"),
        ("prefix_affinity", "pool-first"),
        ("central_queue", "pool-first"),
        ("least_loaded", "vllm"),
        ("central_queue", "vllm"),
    ],
)
def test_prefix_caching_macro_equals_per_iteration(tmp_path, router, eviction):
    """Mooncake requests on 2 replicas with a small cache: hits, evictions and preemptions,
    macro-stepped and per iteration, agree (in either eviction order: the decode runs' cut
    points follow the order's evictions)."""
    d = {
        "seed": 5,
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm", "peak_flops": 4e15, "mem_bw_bytes_per_s": 1.2e13},
        # 0.45 = 36 GB - 16 GB weights - 2 GB activations: ~137k tokens per replica
        "fleet": {
            "replicas": 2,
            "router": router,
            "gpu_memory_utilization": 0.45,
            "max_batch_size": 64,
            "prefix_cache_eviction": eviction,
        },
        "traffic": {"trace": _head(tmp_path, 1000)},
    }
    # (a cache of ~35 prompts against a working set of ~1000: 3.7% hit, most blocks evicted)
    macro = assert_modes_equal(d, hits=0.02, fewer_events=False)
    assert macro.totals.requests_completed > 300


def test_prefix_affinity_beats_least_loaded_on_hits(tmp_path):
    """8 replicas, realistic caches: routing to the replica that holds the prefix hits more."""
    trace = _head(tmp_path, 4000)
    rates = {}
    for router in ("least_loaded", "prefix_affinity"):
        d = {
            "simulation": {"hours": 1},
            "model": {"name": "llama-3.1-8b"},
            # eager step times (as designed: slower replicas hold longer queues, which is where
            # routing by prefix pays; under vllm-v1 the margin is 0.11 vs 0.06)
            "fleet": {"replicas": 8, "router": router, "serving_stack": "eager"},
            "traffic": {"trace": trace},
        }
        T = simulate(resolved(d)).totals
        rates[router] = T.prefix_hit_tokens / T.prompt_tokens
    assert rates["prefix_affinity"] > rates["least_loaded"] + 0.05, rates


# ---- sessions ---------------------------------------------------------------------------------
SESSIONS = {
    "seed": 3,
    "model": {"name": "llama-3.1-8b"},
    "fleet": {"replicas": 2, "router": "prefix_affinity", "gpu_memory_utilization": 0.3},
    "traffic": {
        "requests_per_day": 20_000,
        "diurnal": "flat",
        "prompt": {"dist": "lognormal", "median": 200, "sigma": 0.8, "min": 4, "max": 3000},
        "output": {"dist": "lognormal", "median": 150, "sigma": 0.8, "min": 1, "max": 1000},
        "sessions": {
            "turns": {"dist": "uniform", "low": 1, "high": 8},
            "think_s": {"dist": "uniform", "low": 5, "high": 60},
            "system_prompt_tokens": 1000,
            "block_tokens": 64,
        },
    },
}


def test_sessions_central_queue_macro_equals_per_iteration():
    d = merge(SESSIONS, fleet={**SESSIONS["fleet"], "router": "central_queue"})
    assert_modes_equal(d, hits=0.5)


def test_sessions_macro_equals_per_iteration():
    macro = assert_modes_equal(dict(SESSIONS), hits=0.5)
    T = macro.totals
    # turns come back: more requests than sessions started (~20k/day x 2 h = 1,667)
    assert T.requests_arrived > 1.5 * 20_000 / 12
    # the shared system prompt alone is 15 of 16 blocks of 64 (1000 tokens) of the first turn
    assert T.prefix_hit_tokens / T.prompt_tokens > 0.5


def test_session_turns_extend_the_previous_turn():
    sink = ListSink()
    simulate(resolved(merge(SESSIONS, simulation={"hours": 1})), request_sink=sink)
    rows = sorted(sink.rows.values())
    # every turn's prompt holds at least the system prompt and one user token
    assert min(r[2] for r in rows) >= 1001


# ---- bad input: one line with field, value and fix ----------------------------------------------
@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"fleet": {"block_size_tokens": 24}}, "fleet"),
        ({"fleet": {"kv_allocation": "reserve", "enable_chunked_prefill": True}}, "fleet"),
        # the error names the field as written (was "traffic.sessions.fixed.value")
        (
            {"traffic": {"sessions": {"turns": {"dist": "fixed", "value": -2}}}},
            "traffic.sessions.turns.value = -2: should be >= 1",
        ),
        (
            {"traffic": {"sessions": {"think_s": {"dist": "fixed", "value": -1}}}},
            "traffic.sessions.think_s.value = -1: should be >= 1",
        ),
        (
            {"traffic": {"sessions": {"turns": {"dist": "lognormal", "median": -3, "sigma": 1}}}},
            "traffic.sessions.turns.median = -3: should be > 0",
        ),
    ],
)
def test_bad_engine_options(patch, field):
    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(merge({}, **patch))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_system_prompt_longer_than_context():
    d = merge(
        SESSIONS, traffic={**SESSIONS["traffic"], "sessions": {"system_prompt_tokens": 200_000}}
    )
    with pytest.raises(ScenarioError, match="system_prompt_tokens"):
        resolved(d)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"timestamp": 0, "input_length": 5, "output_length": 1}, "no 'hash_ids'"),
        ({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, "a"]}, "integers"),
        ({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1.5]}, "integers"),
    ],
)
def test_bad_mooncake_line_names_it(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    good = {"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}
    f.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    read_mooncake.cache_clear()
    with pytest.raises(UserError, match=f"line 2.*{message}|line 2: .*{message}"):
        read_mooncake(str(f))


@pytest.mark.parametrize("off,pool_first,vllm", [(31, 144, 144), (22, 144, 16), (15, 144, 0)])
def test_vllm_eviction_order_by_hand(tmp_path, off, pool_first, vllm):
    """vLLM V1 keeps one free-block queue (FleetSection.prefix_cache_eviction = "vllm"). One
    sequence at a time on a pool of NB = 114 blocks of 16 tokens: R1 (10 full prompt blocks, ids
    A, and one block of answer) leaves [NB - 11 free, its answer's block, A10 .. A1] (a request's
    blocks are freed last first); R2 (a 1-block prompt and 20 answer blocks) takes 21 from the
    head and appends its 20 uncached blocks and its one cached id; R3 takes y = NB - off blocks:
    the NB - 31 free and uncached ahead of A, then A10 .. A1. R4 repeats R1's prompt and hits
    its leading blocks still cached, at most 9 (the last prompt token is always computed):
    vLLM's order 9 blocks (y = NB - 31), 1 (NB - 22: A1 left), 0 (NB - 15); the pool-first
    order keeps A while never-cached blocks remain (free NB - 11 >= y): 9 blocks each time.
    A scenario that does not set the field runs vLLM's order."""
    trace = tmp_path / "t.jsonl"

    def line(n: int, ids: list[int], out: int) -> str:
        return json.dumps(
            {"timestamp": 0, "input_length": n, "output_length": out, "hash_ids": ids}
        )

    def scenario(ev: str | None) -> dict:
        fleet = {
            "replicas": 1,
            "max_batch_size": 1,
            "gpu_memory_utilization": 1.0,
            "activation_reserve_bytes": 0,
            "max_batched_tokens": 65536,
        }
        if ev is not None:
            fleet["prefix_cache_eviction"] = ev
        return {
            "simulation": {"hours": 1},
            "model": {"name": "llama-3.1-8b"},
            # 16 GB of weights and 114 blocks of 2 MiB of KV
            "hardware": {"mem_bytes": 16.3e9, "peak_flops": 1e15, "mem_bw_bytes_per_s": 3e12},
            "fleet": fleet,
            "traffic": {"trace": str(trace), "trace_block_tokens": 16},
        }

    trace.write_text(line(160, list(range(10)), 16) + "\n")
    assert resolved(scenario("vllm")).kv.blocks == 114
    y = 114 - off
    rows = [
        line(160, list(range(10)), 16),
        line(16, [100], 320),
        line(16, [200], 16 * (y - 1) + 1),  # 16 y tokens of KV: y blocks
        line(160, list(range(10)), 16),
    ]
    trace.write_text("\n".join(rows) + "\n")
    # unset: the default is vLLM's order
    for ev, hit in (("pool-first", pool_first), ("vllm", vllm), (None, vllm)):
        T = simulate(resolved(scenario(ev))).totals
        assert T.requests_completed == 4 and T.preemptions == 0
        assert T.prefix_hit_tokens == hit


def test_vllm_free_queue_is_built_with_its_first_cached_entry(tmp_path):
    """The vLLM order's free-block queue (kv_blocks.py, ``qc``) is kept only while it holds a
    cached entry: until then allocation and release change ``free`` alone; the first cached id
    rebuilds it as one run of the ``free`` uncached blocks ahead of that id; taking more than
    the uncached blocks evicts the id (its remaining blocks back at the head), and the queue is
    then let go again. Hand counts on a 114-block replica (blocks of 16, ids of 2 blocks)."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        json.dumps({"timestamp": 0, "input_length": 64, "output_length": 4, "hash_ids": [0, 1]})
        + "\n"
    )
    rs = resolved(
        {
            "simulation": {"hours": 1},
            "model": {"name": "llama-3.1-8b"},
            "hardware": {"mem_bytes": 16.3e9, "peak_flops": 1e15, "mem_bw_bytes_per_s": 3e12},
            "fleet": {
                "replicas": 1,
                "gpu_memory_utilization": 1.0,
                "activation_reserve_bytes": 0,
                "prefix_cache_eviction": "vllm",
            },
            "traffic": {"trace": str(trace), "trace_block_tokens": 32},
        }
    )
    rep = Pod(rs, 0, 1).replicas[0]
    assert rep.uq and rep.g == 2 and rep.free == 114
    assert rep.qc == 0 and not rep.q  # no cached entry: no queue
    rep._take(30)
    rep._q_free(4)
    assert rep.free == 88 and rep.qc == 0 and not rep.q
    rep.cache[7] = 0
    rep._q_cached(7)  # the first cached entry: the queue is the 88 free blocks, then id 7
    assert rep.qc == 1 and [list(e) for e in rep.q] == [[-1, 88, 0], [7, 2, 1]]
    assert list(rep._q_entries()) == [([-1, 88, 0], 0), ([7, 2, 1], 88)]
    rep._q_free(5)  # released after it: queued behind it
    assert rep.free == 93 and [e[1] for e in rep.q] == [88, 2, 5]
    rep._take(89)  # the 88 ahead of it, then 1 of its 2 blocks: evicted, 1 back at the head
    assert 7 not in rep.cache and 7 not in rep.lru and rep.qc == 0
    assert rep.free == 93 - 88 + 1 == 6 and [e[1] for e in rep.q] == [1, 5]
    rep._take(6)  # no cached entry left: free blocks only
    assert rep.free == 0 and rep.qc == 0
