"""The chat list drawn as conversations (calibrate/mlenergy.py, prompt shape ``azure-conv``): a
conversation of T turns gives T adjacent requests, request t's prompt = request t - 1's prompt
+ that turn's answer + a new user message, named as block-id chains so that the engine's prefix
cache computes a conversation's history once (docs/accuracy-log.md, "Conversation histories
share their prefix")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import resolved

from fleetsim.apps.simulate import simulate
from fleetsim.calibrate import mlenergy as ml
from fleetsim.calibrate import stack


def test_block_id_chains_by_hand():
    """Turns 1, 2, 3 | 1, 2 holding 40, 100, 150 | 20, 33 tokens, blocks of 16: request t's ids
    start with request t - 1's full blocks' ids (floor(P / 16): 2, then 6; 1 in the second
    conversation), then new ids up to ceil(P / 16); a first turn shares nothing."""
    turn = np.array([1, 2, 3, 1, 2])
    held = np.array([40, 100, 150, 20, 33])
    ids = ml.conversation_block_ids(turn, held, 16)
    assert ids == [
        [0, 1, 2],
        [0, 1, 3, 4, 5, 6, 7],
        [0, 1, 3, 4, 5, 6, 8, 9, 10, 11],
        [12, 13],
        [12, 14, 15],
    ]


def test_a_conversation_is_computed_once_by_hand(tmp_path):
    """The list above replayed (all at time 0, room for all five at once): request 2 finds 2
    blocks of request 1 cached (32 tokens), request 3 six (96), request 5 one (16): 144 prefix-hit
    tokens of 343, i.e. 199 computed = 40 + (100 - 32) + (150 - 96) + 20 + (33 - 16), each
    conversation's text once (its last answer excepted: no request carries it)."""
    turn = np.array([1, 2, 3, 1, 2])
    held = np.array([40, 100, 150, 20, 33])
    ids = ml.conversation_block_ids(turn, held, 16)
    trace = tmp_path / "conv.jsonl"
    trace.write_text(ml.ids_trace_jsonl(held, np.full(5, 4), ids))
    assert json.loads(trace.read_text().splitlines()[2])["hash_ids"] == ids[2]
    sc = {
        "simulation": {"hours": 1},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"replicas": 1, "max_batch_size": 8, "max_batched_tokens": 8192},
        "traffic": {"trace": str(trace), "trace_block_tokens": 16},
    }
    T = simulate(resolved(sc)).totals
    assert T.requests_completed == 5 and T.preemptions == 0
    assert T.prompt_tokens == 343
    assert T.prefix_hit_tokens == 144


def test_conversation_means_closed_form():
    """Geometric turns of mean 1.6 at 250 computed tokens per request and answers 269 / 95 of a
    user message: u = 250 / (1 + (269 / 95) (1 - 1 / 1.6)) = 121.25, a = 343.3, held
    u 1.6 + a 0.6 = 400 = 1.6 x 250 (exactly tau x the computed mean, whatever the split)."""
    u, a, held = ml.conversation_means(250.0, 1.6, 269.0 / 95.0)
    assert u == pytest.approx(250.0 / (1.0 + 269.0 / 95.0 * 0.375))
    assert u == pytest.approx(121.25, abs=0.01)
    assert a == pytest.approx(343.33, abs=0.01)
    assert held == pytest.approx(400.0)
    for tau, r in ((1.3, 0.0), (2.0, 2.0), (2.9, 5.0)):
        assert ml.conversation_means(300.0, tau, r)[2] == pytest.approx(300.0 * tau)


@pytest.mark.parametrize("tau", [1.3, 1.6, 2.0])
def test_drawn_list_means_against_the_closed_form(tau):
    """200,000 requests of unit shape (every draw 1): a request is its conversation's first with
    probability 1 / tau; the computed tokens per request average 250 and the held ones tau x
    250 (within 1 %: the rounding of u and u + a, and the draw)."""
    rng = np.random.default_rng(5)
    n = 200_000
    turn, held = ml.draw_chat_conversations(n, rng, np.ones(n), 250.0, tau)
    assert len(turn) == len(held) == n and turn[0] == 1
    assert (turn == 1).mean() == pytest.approx(1.0 / tau, rel=0.01)
    computed = np.where(turn == 1, held, held - np.concatenate(([0], held[:-1])))
    assert computed.mean() == pytest.approx(250.0, rel=0.01)
    assert held.mean() == pytest.approx(250.0 * tau, rel=0.01)
    # a later turn holds its predecessor's prompt and more
    later = turn > 1
    assert np.all(held[later] > np.concatenate(([0], held[:-1]))[later])


def test_harness_list_chains_and_repeats():
    """The harness's azure-conv draw for a chat row: the same Azure draws as ``azure`` (unit
    shape), request i's ids start with request i - 1's full blocks' wherever it holds more than
    it (a later turn), and a repeated list (Qwen3-8B B200 b1536: 4 x 1,024) carries its first
    copy's ids and lengths; fim rows draw no ids."""
    configs, _ = ml.select(ml.read_configs())
    c = ml.find_config("Qwen/Qwen3-8B", "B200", 1, 1536, "lm-arena-chat", 1, configs)
    assert c.num_requests == 4096
    outs = np.full(c.num_requests, 100)
    p, ids = ml.draw_prompt_list(
        c, c.num_requests, np.random.default_rng(3), "azure-conv", 40960, outs
    )
    assert ids is not None and len(ids) == len(p) == 4096
    assert np.array_equal(p[:1024], p[1024:2048]) and ids[7] == ids[7 + 3072]
    chained = 0
    for i in range(1, 1024):
        if ids[i][0] == ids[i - 1][0]:
            assert ids[i][: int(p[i - 1]) // 16] == ids[i - 1][: int(p[i - 1]) // 16]
            chained += 1
        assert len(ids[i]) == -(-int(p[i]) // 16)
    # a request is a later turn with probability 1 - 1 / 1.6 = 0.375
    assert chained / 1023 == pytest.approx(1.0 - 1.0 / ml.CHAT_TURNS_MEAN, abs=0.06)
    # the same unit draws as azure: a first turn's prompt is the azure draw x u / 250
    q = ml.draw_prompts(c, c.num_requests, np.random.default_rng(3), "azure", 40960, outs)
    u = ml.conversation_means(250.0, ml.CHAT_TURNS_MEAN, ml.CHAT_ANSWER_PER_USER)[0]
    assert abs(p[0] - q[0] * u / 250.0) <= 1.0
    fim = ml.find_config(
        "Qwen/Qwen3-Coder-480B-A35B-Instruct", "B200", 8, 1024, "sourcegraph-fim", 1, configs
    )
    assert ml.draw_prompt_list(fim, 10, np.random.default_rng(3), "azure-conv")[1] is None


def test_stack_fit_means():
    """calibrate/stack.py with the conversations on: contexts at the held mean (1.6 x 250 =
    400), prefill at the computed 250 after 150 cached tokens (pairs 250 (2 x 400 - 250));
    off (the default): 250 and 250 x 250."""
    assert stack.CHAT_TURNS_MEAN is None
    assert stack._prefill_args("lm-arena-chat") == (250, None)
    try:
        stack.CHAT_TURNS_MEAN = 1.6
        assert stack.prompt_means("lm-arena-chat") == pytest.approx((400.0, 250.0))
        assert stack.prompt_means("gpqa") == (250.0, 250.0)
        assert stack._prefill_args("lm-arena-chat") == (250, pytest.approx(400.0))
    finally:
        stack.CHAT_TURNS_MEAN = None


def test_pool_workers_get_the_command_lines_options_under_spawn(monkeypatch):
    """A spawned worker does not inherit module state: ``_pool``'s initializer hands it the
    chat prompt mean (--chat-prompt-mean) and the turns mean (--chat-turns-mean) the parent set,
    so a harness run reads the same options whatever the platform's start method."""
    import multiprocessing

    monkeypatch.setitem(ml.PROMPT_TOKENS, "lm-arena-chat", 333)
    monkeypatch.setattr(ml, "CHAT_TURNS_MEAN", 2.0)
    monkeypatch.setattr(stack, "CHAT_TURNS_MEAN", 2.0)
    with ml._pool(1, multiprocessing.get_context("spawn")) as ex:
        tokens, turns, stack_turns = ex.submit(ml._harness_options).result()
    assert tokens["lm-arena-chat"] == 333
    assert tokens["gpqa"] == ml.PROMPT_TOKENS["gpqa"]
    assert (turns, stack_turns) == (2.0, 2.0)
