"""Prompt lengths of the ML.ENERGY harness (calibrate/mlenergy.py ``draw_prompts``, ``--prompts``):
``constant`` gives every request its task's mean (PROMPT_TOKENS); ``azure`` draws the chat
prompts from the Azure LLM inference trace 2023's conversation service (data/azure-llm-2023,
ContextTokens), rescaled to that mean, as the benchmark's list of 1,024 prompts sent in order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleetsim.calibrate import mlenergy as ml

CONV = ml.AZURE_PROMPT_TRACES["lm-arena-chat"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 7, 11]))


@pytest.fixture(scope="module")
def chat() -> ml.Config:
    configs, _ = ml.select(ml.read_configs())
    return ml.find_config("Qwen/Qwen3-8B", "H100", 1, 256, configs=configs)


def test_the_trace_read_is_the_published_one():
    """19,366 conversation requests; mean 1,154.7, median 1,020 and max 14,050 prompt tokens
    (data/README.md: "median 1,020 prompt"); coefficient of variation 0.960."""
    x = ml.trace_context_tokens(CONV)
    assert len(x) == 19366
    assert x.mean() == pytest.approx(1154.70, abs=0.01)
    assert np.median(x) == 1020
    assert x.max() == 14050
    assert x.std() / x.mean() == pytest.approx(0.960, abs=0.001)


def test_azure_draw_has_the_trace_shape_at_the_task_mean(chat, monkeypatch):
    """With a list long enough to read the shape off (200,000 prompts): the mean is the task's
    250 tokens within 1 %, the coefficient of variation the trace's 0.960 within 0.02, and the
    quantile ratios the trace's: p90 / p50 2,734.5 / 1,020 = 2.68, p99 / p50 4,142 / 1,020 =
    4.06 (within 3 %); the constant shape has none of that spread."""
    monkeypatch.setitem(ml.REQUESTS_PER_TASK, "lm-arena-chat", 200_000)
    p = ml.draw_prompts(chat, 200_000, _rng(), "azure").astype(float)
    assert p.mean() == pytest.approx(250.0, rel=0.01)
    assert p.std() / p.mean() == pytest.approx(0.960, abs=0.02)
    q50, q90, q99 = np.percentile(p, [50, 90, 99])
    assert q90 / q50 == pytest.approx(2734.5 / 1020, rel=0.03)
    assert q99 / q50 == pytest.approx(4142 / 1020, rel=0.03)
    c = ml.draw_prompts(chat, 1000, _rng(), "constant")
    assert set(c.tolist()) == {250}


def test_azure_draw_is_reproducible_and_repeats_its_list(chat):
    """The same row stream gives the same prompts, another seed others; 4,096 requests carry
    the 1,024-prompt list four times in order (request i and i + 1,024 the same length), as the
    benchmark repeats it; the listed 1,024 average the task's 250 within 10 %."""
    a = ml.draw_prompts(chat, 4096, _rng(0), "azure")
    b = ml.draw_prompts(chat, 4096, _rng(0), "azure")
    other = ml.draw_prompts(chat, 4096, _rng(1), "azure")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other)
    listed = a[:1024]
    assert np.array_equal(a, np.tile(listed, 4))
    assert len(set(listed.tolist())) > 200  # a spread, not a constant
    assert listed.mean() == pytest.approx(250.0, rel=0.10)
    assert a.min() >= 1


def test_only_chat_draws_from_the_trace(chat):
    """GPQA and fim keep their constant under ``azure`` (no published source for their spread);
    an unknown shape is refused."""
    from dataclasses import replace

    for task in ("gpqa", "sourcegraph-fim"):
        p = ml.draw_prompts(replace(chat, task=task), 300, _rng(), "azure")
        assert set(p.tolist()) == {ml.PROMPT_TOKENS[task]}
    with pytest.raises(ValueError, match="prompt shape"):
        ml.draw_prompts(chat, 10, _rng(), "lognormal")


def test_azure_code_draws_fim_from_the_code_service(chat):
    """``azure-code`` draws fim's prompts from the code service (8,819 requests, mean 2,047.8,
    median 1,469) rescaled to fim's 1,500: its list's median near 1,469 x 1,500 / 2,047.8 =
    1,076 (within 10 %), its mean 1,500 within 10 %; the chat prompts as ``azure`` draws them;
    GPQA constant."""
    from dataclasses import replace

    x = ml.trace_context_tokens(ml.AZURE_CODE_PROMPT_TRACES["sourcegraph-fim"])
    assert len(x) == 8819
    assert x.mean() == pytest.approx(2047.85, abs=0.01)
    fim = ml.draw_prompts(replace(chat, task="sourcegraph-fim"), 1024, _rng(), "azure-code")
    assert np.median(fim) == pytest.approx(1469 * 1500 / x.mean(), rel=0.10)
    assert fim.mean() == pytest.approx(1500.0, rel=0.10)
    a = ml.draw_prompts(chat, 1024, _rng(), "azure-code")
    assert np.array_equal(a, ml.draw_prompts(chat, 1024, _rng(), "azure"))
    g = ml.draw_prompts(replace(chat, task="gpqa"), 100, _rng(), "azure-code")
    assert set(g.tolist()) == {250}


def test_prompts_are_clipped_to_the_context(chat):
    """Prompt + output never passes the model's context: with a 1,000-token context and 800-token
    outputs every prompt is at most 200 (the draw's longer ones cut there), never below 1."""
    outs = np.full(1024, 800)
    free = ml.draw_prompts(chat, 1024, _rng(), "azure")
    cut = ml.draw_prompts(chat, 1024, _rng(), "azure", max_context_tokens=1000, outs=outs)
    assert (free > 200).any()
    assert cut.max() == 200
    assert np.array_equal(cut, np.minimum(free, 200))


def test_repeat_trace_keeps_each_copy_at_its_first_length(chat):
    """With per-request lengths the JSONL trace of the repeated runs gives request i and
    i + 1,024 the same length and the same ceil(length / 16) block ids, and two listed prompts
    no common id; a constant length writes the trace as before (1,500: 94 ids each)."""
    outs = np.arange(1, 2049)
    p = ml.draw_prompts(chat, 2048, _rng(), "azure")
    lines = [json.loads(x) for x in ml.repeat_trace_jsonl(chat, p, outs).splitlines()]
    assert [d["input_length"] for d in lines] == p.tolist()
    for i in (0, 5, 1023):
        assert lines[i]["hash_ids"] == lines[i + 1024]["hash_ids"]
        assert len(lines[i]["hash_ids"]) == -(-int(p[i]) // 16)
    ids = [set(d["hash_ids"]) for d in lines[:1024]]
    assert sum(len(s) for s in ids) == len(set().union(*ids))
    const = [json.loads(x) for x in ml.repeat_trace_jsonl(chat, 1500, outs[:3]).splitlines()]
    assert [d["hash_ids"] for d in const] == [list(range(k * 94, (k + 1) * 94)) for k in range(3)]


def test_azure_prompts_lift_the_p99_not_the_median(chat):
    """Qwen3-8B on one H100 at 256 sequences (measured median / p99 ITL 31.4 / 72.2 ms): the
    constant 250-token prompts give a p99 of 46 ms, every prompt step alike; the Azure shape
    at the same mean gives its prompt steps a spread and the p99 rises past 52 ms, while the
    median (a decode step) and the batch stay within 2 %. The outputs are the same draw."""
    const = ml.simulate_config(chat, engine="iteration", prompts="constant")
    azure = ml.simulate_config(chat, engine="iteration", prompts="azure")
    assert not const.error and not azure.error
    assert const.itl_p99_s * 1e3 < 50.0
    assert azure.itl_p99_s * 1e3 > 52.0
    assert azure.itl_median_s == pytest.approx(const.itl_median_s, rel=0.02)
    assert azure.avg_batch == pytest.approx(const.avg_batch, rel=0.02)
