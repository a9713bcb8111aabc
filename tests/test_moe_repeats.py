"""Repeated prompts in the ML.ENERGY harness (calibrate/mlenergy.py): a run of more requests than
its task's list sends the list again (the benchmark's ``num_request_repeats``), and vLLM's
prefix cache (on by default) shares a running copy's prompt blocks. The harness names each
prompt's 16-token blocks so the engine's prefix cache does the same, dense or MoE; data-parallel
runs too (one prefix cache per engine: a repeat hits only a copy on its own rank, and the later
passes arrive in a random order, as vLLM's front end routes them by load, not by prompt), and
sliding-window models (vLLM's hybrid KV cache manager, h46); Mamba hybrids keep unique prompts
(prefix caching disabled by vLLM 0.11)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fleetsim.calibrate import mlenergy as ml


def _row(model: str, gpu: str, n_gpus: int, batch: int, dp: int = 1) -> ml.Config:
    configs, _ = ml.select(ml.read_configs())
    return ml.find_config(model, gpu, n_gpus, batch, "sourcegraph-fim", dp, configs)


def test_which_runs_repeat_their_prompts():
    """4,096 requests of a 1,024-prompt list on one engine repeat it, and so do 3,072 over eight
    data-parallel engines; the 1,024-request run does not."""
    big = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 1024)
    assert big.num_requests == 4096
    assert ml.repeated_prompts(big)
    small = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 256)
    assert small.num_requests == 1024
    assert not ml.repeated_prompts(small)
    dp8 = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "B200", 8, 1024, dp=8)
    assert dp8.num_requests == 3072
    assert ml.repeated_prompts(dp8)
    dp8_small = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "B200", 8, 512, dp=8)
    assert dp8_small.num_requests == 1024
    assert not ml.repeated_prompts(dp8_small)


def test_a_data_parallel_runs_later_passes_arrive_in_a_random_order():
    """DP8 b1024 (3,072 requests, the list sent three times): the first pass in list order; each
    later pass holds every listed prompt once, in an order of its own, each request with its own
    output; so the simulated router (arrival k to rank k mod 8 in a burst) puts a repeat on its
    first copy's rank about 1 / 8 of the time (1,024 draws: 128 +- 10.6). One engine: in order."""
    c = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "B200", 8, 1024, dp=8)
    n = c.num_requests
    outs = np.arange(1, n + 1)
    lines = [json.loads(x) for x in ml.repeat_trace_jsonl(c, 1500, outs).splitlines()]
    assert len(lines) == n == 3072
    # a request's prompt, by its first id (94 ids of 16 tokens per prompt), and its index
    prompt = [d["hash_ids"][0] // 94 for d in lines]
    req = [d["output_length"] - 1 for d in lines]
    assert prompt[:1024] == list(range(1024)) and req[:1024] == list(range(1024))
    assert all(p == r % 1024 for p, r in zip(prompt, req, strict=True))
    for p0 in (1024, 2048):
        assert sorted(prompt[p0 : p0 + 1024]) == list(range(1024))
        assert prompt[p0 : p0 + 1024] != list(range(1024))
        same_rank = sum(1 for j in range(1024) if prompt[p0 + j] % 8 == j % 8)
        assert 96 <= same_rank <= 160
    assert prompt[1024:2048] != prompt[2048:]
    # the same row gives the same trace (a fixed stream per row)
    assert ml.repeat_trace_jsonl(c, 1500, outs) == ml.repeat_trace_jsonl(c, 1500, outs)
    one = replace(c, dp=1)
    lines1 = [json.loads(x) for x in ml.repeat_trace_jsonl(one, 1500, outs).splitlines()]
    assert [d["hash_ids"][0] // 94 for d in lines1] == [i % 1024 for i in range(n)]


def test_repeat_trace_names_the_same_blocks_for_the_same_prompt():
    """Request i and i + 1,024 carry the same ids, ceil(1,500 / 16) = 94 of them; different
    prompts share none; lengths and arrivals as drawn."""
    c = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 1024)
    outs = np.arange(1, c.num_requests + 1)
    lines = [json.loads(x) for x in ml.repeat_trace_jsonl(c, 1500, outs).splitlines()]
    assert len(lines) == 4096
    assert all(len(d["hash_ids"]) == 94 for d in lines)
    assert lines[5]["hash_ids"] == lines[5 + 1024]["hash_ids"] == lines[5 + 3 * 1024]["hash_ids"]
    assert not set(lines[5]["hash_ids"]) & set(lines[6]["hash_ids"])
    assert [d["output_length"] for d in lines[:3]] == [1, 2, 3]
    assert {d["input_length"] for d in lines} == {1500}
    assert {d["timestamp"] for d in lines} == {0}


@pytest.mark.parametrize("shared", [True, False])
def test_shared_prompts_let_the_kv_cache_hold_the_measured_batch(monkeypatch, shared):
    """Qwen3-Coder-480B on 8 B200s at 1,024 sequences held 1,009.5 on average. Its KV budget
    (1.65 M tokens) holds 1,024 sequences of 1,500 + ~415 tokens only when the repeated prompts
    share their blocks: with them the simulated batch is the measured one within 2 % and the
    median step a decode step (measured 98 ms); with every prompt unique the server is KV-bound
    (about 856 held) and its median step carries a prefill (over 200 ms)."""
    c = _row("Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 1024)
    if not shared:
        monkeypatch.setattr(ml, "repeated_prompts", lambda _c: False)
    run = ml.simulate_config(replace(c), engine="iteration")
    assert not run.error
    if shared:
        assert run.avg_batch == pytest.approx(c.avg_batch_size, rel=0.02)
        assert run.itl_median_s * 1e3 == pytest.approx(c.itl_median_ms, rel=0.15)
    else:
        assert run.avg_batch < 0.9 * c.avg_batch_size
        assert run.itl_median_s * 1e3 > 2.0 * c.itl_median_ms


def test_hybrid_models_keep_unique_prompts_and_window_models_share_them(tmp_path, monkeypatch):
    """vLLM 0.11 disables prefix caching for Mamba hybrids (serving/kv_paged.py), so a repeating
    Nemotron-Nano-v2 run replays unique prompts (CSV); a sliding-window model's prefix caching is
    modelled as vLLM's hybrid KV cache manager (h46), so a repeating gemma-3 run shares them, as
    a plain model's repeating run, dense as MoE (the same server shares either's repeats), with
    the JSONL trace of 16-token block ids: Qwen3-8B chat at 1,024 sequences sends its
    1,024-prompt list four times."""
    configs, _ = ml.select(ml.read_configs())
    qwen = next(
        c
        for c in configs
        if c.model_id == "Qwen/Qwen3-8B" and c.max_num_seqs == 1024 and c.gpu_model == "B200"
    )
    assert not qwen.moe_or_ep and qwen.num_requests == 4096 and ml.repeated_prompts(qwen)
    nemo = next(
        c
        for c in configs
        if c.model_id == "nvidia/NVIDIA-Nemotron-Nano-9B-v2"
        and c.gpu_model == "H100"
        and c.max_num_seqs == 256
    )
    assert nemo.num_requests == 396 and ml.repeated_prompts(nemo)
    outs = np.full(qwen.num_requests, 100)
    csv = tmp_path / "trace.csv"
    csv.write_text("arrival_s,prompt_tokens,output_tokens\n0,250,100\n")
    sc = ml._run_scenario(nemo, csv, 250, outs[: nemo.num_requests], 1, "iteration")
    assert sc.traffic.trace.endswith(".csv")
    # the --implied-prompt table's "share" label says the same (shares_repeated_prompts)
    assert ml.shares_repeated_prompts(qwen) and not ml.shares_repeated_prompts(nemo)
    # no gemma-3 row repeats its list: as if one did
    gemma = next(c for c in configs if c.model_id.startswith("google/gemma-3") and c.dp == 1)
    with monkeypatch.context() as m:
        m.setattr(ml, "repeated_prompts", lambda _c: True)
        sc = ml._run_scenario(gemma, csv, 250, outs[: gemma.num_requests], 1, "iteration")
        assert ml.shares_repeated_prompts(gemma)
    assert sc.traffic.trace.endswith(".jsonl")
    sc = ml._run_scenario(qwen, csv, 250, outs, 1, "iteration")
    assert sc.traffic.trace.endswith(".jsonl")
    assert sc.traffic.trace_block_tokens == ml.PROMPT_BLOCK_TOKENS == 16
