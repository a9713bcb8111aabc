"""Multi-turn sessions on sliding-window models with prefix caching, as vLLM 0.11's hybrid KV
cache manager leaves a finished turn's blocks (serving/kv_blocks.py ``_w_finish``;
docs/serving-engine.md, "Sessions on sliding-window models"). A turn's ids cover its prompt
and its answer; at its finish its full-attention parts of every whole id are cached, and its
window parts: those within the window layers' last ``cap`` blocks from its own blocks, those the
window passed as it decoded as unreferenced cached entries, ahead of the finish's in eviction
order. The next turn's hit is vLLM's (``_w_hit``): the whole turn while the last window's
parts stay cached.

Gemma 3 27B: 10 global layers, 52 window layers of W = 1,024 tokens; blocks of b = 16 and
session ids of 16 tokens (g = 1): a window hit needs ceil(1,023 / 16) = 64 contiguous ids, and
a sequence's window layers hold its last cap = 1,024 / 16 + 1 = 65 blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import linear_profile, merge, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.serving.audit import audited
from fleetsim.serving.kv_blocks import WKEY
from fleetsim.serving.kv_paged import PagedKV
from fleetsim.serving.request import Request

USER = 2000  # new user tokens of every turn


def _sessions(
    tmp_path: Path, monkeypatch, model: str, out: int, probe, bt: int = 16, user: int = USER
) -> tuple[list, object]:
    """Two-turn sessions (``user`` new tokens and ``out`` answer tokens a turn, 10 s apart, no
    system prompt, ids of ``bt`` tokens) on one replica with room for all of them, a few an
    hour: (every finished turn as (turn, prompt, hit tokens)), and what ``probe(replica,
    request, its unreferenced entries in eviction order)`` returns right after the first
    turn 1 finished."""
    m = model_from_catalog(model)
    prof = linear_profile(tmp_path / "lin.json", m.weight_bytes, 8e9)
    d = {
        "seed": 5,
        "simulation": {"hours": 1},
        "model": {"name": model},
        "hardware": {"profile": prof},
        "fleet": {
            "max_batch_size": 64,
            "max_batched_tokens": 16384,
            "block_size_tokens": 16,
            "activation_reserve_bytes": 0,
            "prefix_cache_eviction": "pool-first",
        },
        "traffic": {
            "requests_per_day": 24 * 6,
            "diurnal": "flat",
            "prompt": {"dist": "fixed", "value": user},
            "output": {"dist": "fixed", "value": out},
            "sessions": {
                "turns": {"dist": "fixed", "value": 2},
                "think_s": {"dist": "fixed", "value": 10},
                "system_prompt_tokens": 0,
                "block_tokens": bt,
            },
        },
        "slo": {"ttft_s": 1e5, "tpot_s": 1e5},
    }
    turns: list = []
    first: list = []
    free_kv = PagedKV._free_kv

    def spy(self, r, fin):
        k = r.session.k
        free_kv(self, r, fin)
        turns.append((k, r.prompt, r.cached))
        if k == 0 and not first:
            mine = set(r.ids)
            order = [h for h in self.lru if (h - WKEY if h >= WKEY else h) in mine]
            first.append(probe(self, r, order))

    monkeypatch.setattr(PagedKV, "_free_kv", spy)
    with audited():
        simulate(resolved(d))
    assert first and sum(1 for t in turns if t[0] == 1) >= 2
    return turns, first[0]


def _turn2(r: Request, out: int, bt: int = 16, user: int = USER) -> Request:
    """The session's second turn: its stream so far (turn 1's prompt and answer) and ``user``
    new tokens, its ids those of turn 1 and the session's next ones."""
    assert r.ids is not None
    p = r.prompt + out + user
    base = r.ids[0]  # block 0 of the session (no system prompt): its id is base | 0
    n = -(-(p + out) // bt)
    return Request(10**9, 0.0, p, out, [base | j for j in range(n)])


def test_a_short_answer_turn_2_hits_the_whole_of_turn_1(tmp_path, monkeypatch):
    """Turn 1: 2,000 prompt tokens and 100 answer tokens; its KV holds 2,099 (the last token's
    is never written), so its whole ids are 0 .. 130 (2,096 tokens; turn 1's prompt alone is
    125). The window layers' last 65 blocks at the finish are 67 .. 131, so ids 67 .. 130 (64)
    keep their window parts: turn 2 (4,100 tokens) hits all 131 ids, 2,096 tokens (the prompt's
    125 ids only, 2,000, if the answer were not cached). Turn 1 hits nothing (no system
    prompt)."""

    def probe(rep, r, order):
        assert rep.wn == 64 and rep.gf == 10 and rep.gw == 52 and rep.win[2] == 65
        return r.ids, order, rep._lookup(_turn2(r, 100))[0]

    turns, (ids, order, hit) = _sessions(tmp_path, monkeypatch, "gemma-3-27b", 100, probe)
    assert {(k, p, c) for k, p, c in turns} == {(0, 2000, 0), (1, 4100, 2096)}
    assert hit == 131
    # eviction order: the prompt's window parts 0 .. 59 (left the window as its one chunk
    # ended: 125 blocks, the last 65 kept), 60 .. 66 (passed as it decoded), then the finish's,
    # the last id first: each id's window part before its full part, down to 67, then the full
    # parts 66 .. 0
    want = [ids[j] + WKEY for j in range(67)]
    for j in range(130, 66, -1):
        want += [ids[j] + WKEY, ids[j]]
    want += [ids[j] for j in range(66, -1, -1)]
    assert order == want


def test_a_long_answer_turn_2_hits_all_or_nothing(tmp_path, monkeypatch):
    """Turn 1: 2,000 prompt tokens and 1,500 answer tokens (beyond W): its KV holds 3,499
    tokens, whole ids 0 .. 217 (3,488 tokens); at the finish the window layers hold blocks
    154 .. 218, so ids 154 .. 217 (64) keep their window parts; the window passed the prompt's
    ids 60 .. 124 and the answer's 125 .. 153 as it decoded: their window parts are cached
    but unreferenced, evicted before anything the finish frees. Turn 2 (5,500 tokens) hits
    3,488. Evicting in order: losing every window part the decode passed changes nothing (the
    last 64 are intact); losing the finish's first entry too (id 217's window part) leaves
    63 contiguous window parts (216 .. 154) and none cached before them: vLLM's
    ``SlidingWindowManager`` finds no 64-block run and no run from id 0, so nothing hits,
    though every full-attention part is cached."""

    def probe(rep, r, order):
        nxt = _turn2(r, 1500)
        hits = [rep._lookup(nxt, set(order[:k]))[0] for k in (0, 154, 155)]
        return r.ids, order, hits, all(h in rep.cache for h in r.ids[:218])

    turns, (ids, order, hits, full) = _sessions(tmp_path, monkeypatch, "gemma-3-27b", 1500, probe)
    assert {(k, p, c) for k, p, c in turns} == {(0, 2000, 0), (1, 5500, 3488)}
    assert order[:154] == [ids[j] + WKEY for j in range(154)]
    assert order[154:156] == [ids[217] + WKEY, ids[217]]
    assert hits == [218, 218, 0]
    assert full  # (the full-attention layers alone would hit all 218: the window cuts it)


@pytest.mark.parametrize(
    ("bt", "hit", "why"),
    [
        (16, 37 * 16, "ids 29 .. 36 within the window: 8 = wn"),
        (64, 9 * 64, "id 8 within the window and id 7's part passed as it decoded: 2 = wn"),
    ],
)
def test_gpt_oss_alternating_window_128(tmp_path, monkeypatch, bt, hit, why):
    """gpt-oss-20b: 12 global layers alternating with 12 window layers of W = 128 tokens, so a
    window hit needs ceil(127 / 16) = 8 blocks and the window layers hold cap = 9. Turn 1: 500
    prompt tokens and 100 answer tokens, 599 in its KV; the window's last 9 blocks at the
    finish are 29 .. 37. With 16-token ids turn 2 (1,100 tokens) hits ids 0 .. 36 (592
    tokens), as vLLM. With 64-token ids (g = 4 blocks, a run of wn = 2 ids): whole ids 0 .. 8,
    id 8 (blocks 32 .. 35) within the window, id 7 (28 .. 31) not wholly: the window passed
    its block 28, and its window part is cached unreferenced as vLLM leaves its blocks, so
    the scan finds 8 and 7 and turn 2 hits 9 ids = 576 tokens (only ids 0 .. 6, 448 tokens,
    if the passed part were not cached); vLLM's 16-token blocks would hit 592."""

    def probe(rep, r, _order):
        assert rep.gf == 12 * (bt // 16) and rep.gw == 12 * (bt // 16) and rep.win[2] == 9
        assert rep.wn == (8 if bt == 16 else 2)
        return rep._lookup(_turn2(r, 100, bt, 500))[0] * bt

    turns, got = _sessions(tmp_path, monkeypatch, "gpt-oss-20b", 100, probe, bt=bt, user=500)
    assert {(k, p, c) for k, p, c in turns} == {(0, 500, 0), (1, 1100, hit)}, why
    assert got == hit


def test_window_sessions_macro_equal_per_iteration():
    """Gemma-3-12b (5 window layers of W = 1,024 to 1 global) and gpt-oss-20b in the session
    traffic of tests/test_paged.py with prefix caching (vLLM's default and its one free
    queue): the macro-stepped run equals the per-iteration one, and most prompt tokens come
    from the cache (the 1,000-token system prompt and the earlier turns)."""
    from test_engine_modes import assert_modes_equal
    from test_paged import SESSIONS

    for model in ("gemma-3-12b", "gpt-oss-20b"):
        d = merge(
            SESSIONS,
            model={"name": model},
            simulation={"hours": 1},
            fleet={**SESSIONS["fleet"], "gpu_memory_utilization": 0.5},
            traffic={**SESSIONS["traffic"], "requests_per_day": 8_000},
        )
        assert_modes_equal(d, hits=0.8)


@pytest.mark.parametrize(
    ("model", "pc", "want"),
    [
        ("llama-3.1-8b", True, (7537, 14_520_960, 17_928_979, 1.0691850106780532)),
        ("gemma-3-12b", False, (3663, 0, 8_802_285, 0.7093184061588184)),
    ],
)
def test_sessions_without_window_caching_are_unchanged(model, pc, want):
    """The paths this change leaves alone, bit for bit: the session traffic of
    tests/test_paged.py on Llama-3.1-8B with prefix caching (no window layers: a turn's answer
    is published by ``_register`` as before), 2 h, and on Gemma-3-12B without prefix caching,
    1 h: the completed requests, the prompt tokens hit and computed, and the GPU kWh are those
    of main 0e4983a (before sessions on window models were modelled), but for Gemma's kWh
    (0.7097019938082999 there): branch c47's window budget by time in flight gives 2,788 blocks
    of typical tokens, not 2,771, and the admission watermark is a share of them."""
    from test_paged import SESSIONS

    fleet = {**SESSIONS["fleet"]}
    if not pc:
        fleet.update(gpu_memory_utilization=0.5, enable_prefix_caching=False)
    d = merge(SESSIONS, model={"name": model}, simulation={"hours": 2 if pc else 1}, fleet=fleet)
    res = simulate(resolved(d))
    T = res.totals
    kwh = float(res.hourly.column("energy_gpu_kwh").to_numpy().sum())
    assert (T.requests_completed, T.prefix_hit_tokens, T.prompt_tokens) == want[:3]
    assert kwh == pytest.approx(want[3], rel=1e-12)
