"""Prefix caching of a sliding-window model, as vLLM 0.11's hybrid KV cache manager does it
(serving/kv_blocks.py, ``_w_hit``; docs/serving-engine.md, "Prefix caching with sliding
windows"). Gemma 3 27B: 10 global layers, 52 window layers of W = 1,024 tokens; blocks of
b = 16 tokens and prompt-block ids of 16 tokens (g = 1), so a window hit needs
ceil((W - 1) / b) = ceil(1,023 / 16) = 64 contiguous cached window blocks before its end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import linear_profile, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.serving.audit import assert_drained, audited
from fleetsim.serving.kv_blocks import WKEY
from fleetsim.serving.kv_paged import PagedKV
from fleetsim.serving.request import Request

B = 16
A_IDS = list(range(250))  # a 4,000-token prompt: 250 blocks of 16 tokens


def _run(
    tmp_path: Path,
    rows: list[tuple[float, int, int, list[int]]],
    monkeypatch,
    eviction: str = "pool-first",
) -> tuple:
    """Simulate ``rows`` (arrival s, prompt, output, ids) on one Gemma-3-27B replica with room
    for a few such prompts; the replica and the totals."""
    m = model_from_catalog("gemma-3-27b")
    prof = linear_profile(tmp_path / "lin.json", m.weight_bytes, 4e9)
    f = tmp_path / "trace.jsonl"
    f.write_text(
        "".join(
            json.dumps(
                {"timestamp": round(a * 1000), "input_length": p, "output_length": o, "hash_ids": i}
            )
            + "\n"
            for a, p, o, i in rows
        )
    )
    d = {
        "simulation": {"hours": 1},
        "model": {"name": "gemma-3-27b"},
        "hardware": {"profile": prof},
        "fleet": {
            "max_batch_size": 64,
            "max_batched_tokens": 16384,
            "block_size_tokens": B,
            "activation_reserve_bytes": 0,
            "enable_prefix_caching": True,
            "prefix_cache_eviction": eviction,
        },
        "traffic": {"trace": str(f), "trace_block_tokens": B},
        "slo": {"ttft_s": 1e5, "tpot_s": 1e5},
    }
    seen: list[PagedKV] = []
    free_kv = PagedKV._free_kv

    def spy(self, r, fin):
        seen.append(self)
        free_kv(self, r, fin)

    monkeypatch.setattr(PagedKV, "_free_kv", spy)
    with audited() as log:
        res = simulate(resolved(d))
    assert_drained(log)
    return seen[-1], res.totals


def test_a_repeated_prompt_hits_all_but_its_last_block(tmp_path, monkeypatch):
    """The same 4,000-token prompt twice, the second after the first finished. The hit is
    capped at (4,000 - 1) // 16 = 249 ids so that one token is computed; the full-attention
    layers hold all 249 cached, and the window layers' last 64 blocks before the hit's end
    (ids 185 .. 248) are cached: the hit is 249 x 16 = 3,984 tokens, as vLLM gives."""
    _rep, T = _run(tmp_path, [(0.0, 4000, 8, A_IDS), (60.0, 4000, 8, A_IDS)], monkeypatch)
    assert T.requests_completed == 2
    assert T.prefix_hit_tokens == 3984


def test_evicted_window_blocks_shorten_the_hit_as_vllm(tmp_path, monkeypatch):
    """After the 4,000-token prompt finished: its one chunk left it holding 4,000 tokens = 250
    blocks, so its window layers released the blocks of ids 0 .. 184 (those wholly before the
    last cap = ceil(1,024 / 16) + 1 = 65 blocks, 185 .. 249) as the chunk ended, and those are
    the first 185 entries in eviction order: evicting them keeps every full-attention part
    cached. Then
    * the same prompt still hits 3,984 tokens: its window run 185 .. 248 is intact;
    * a 3,000-token prompt sharing its first 187 ids (2,992 tokens) hits nothing: the full
      layers hit 187 ids, but scanning the window parts from id 186 down finds 186 and 185
      cached and 184 gone, and no 64 contiguous ones below; without such a run vLLM's
      ``SlidingWindowManager`` keeps only the run starting at id 0, empty here;
    * the same 3,000-token prompt before the eviction hits all 187 ids (2,992 tokens)."""
    rep, _T = _run(tmp_path, [(0.0, 4000, 8, A_IDS)], monkeypatch)
    assert rep.wn == 64 and rep.gf == 10 and rep.gw == 52
    order = list(rep.lru)
    assert order[:185] == [WKEY + j for j in range(185)]
    short = Request(1, 0.0, 3000, 8, A_IDS[:188])  # 187 whole ids and a partial one
    assert rep._lookup(short)[0] == 187
    # evict those 185 window parts (as the next allocations would: they head the LRU)
    for j in range(185):
        del rep.cache[WKEY + j]
        del rep.lru[WKEY + j]
    rep.lrub -= 185 * 52
    rep.free += 185 * 52
    same = Request(2, 0.0, 4000, 8, A_IDS)
    assert rep._lookup(same)[0] == 249
    assert rep._lookup(short)[0] == 0
    # the hit's unreferenced blocks: 249 full parts (10 layer-blocks each) and the window
    # parts of its last 64 ids (52 each)
    assert rep._lookup(same)[1] == 249 * 10 + 64 * 52


def test_a_short_prompt_hits_from_its_first_block(tmp_path, monkeypatch):
    """A prompt of 20 ids (320 tokens) run twice: fewer than the 64 window blocks a run needs,
    so the window layers' hit is the run of cached blocks from id 0, here all of the capped 19
    ids (vLLM's ``num_contiguous_blocks`` when no full run is found): 19 x 16 = 304 tokens."""
    ids = list(range(20))
    _rep, T = _run(tmp_path, [(0.0, 320, 8, ids), (60.0, 320, 8, ids)], monkeypatch)
    assert T.prefix_hit_tokens == 304


@pytest.mark.parametrize("eviction", ["pool-first", "vllm"])
def test_the_window_passed_as_it_decoded_goes_first(tmp_path, monkeypatch, eviction):
    """A request outside sessions (a trace's: its ids cover its prompt only) releases its
    prompt's window parts in vLLM 0.11's order (kv_blocks.py ``_drop`` -> ``_w_finish``, one
    path with a session turn's). A 2,000-token prompt (125 ids) and 500 answer tokens: its one
    chunk left it holding 125 blocks, so the window layers released ids 0 .. 59 (those before
    the last cap = 65 blocks) as it ended; at the finish its KV holds 2,499 tokens = 157
    blocks, the window's last 65 are 92 .. 156, so the window passed ids 60 .. 91 as it
    decoded. vLLM's ``remove_skipped_blocks`` freed those during the decode (to the free
    queue's tail, ahead of the finish's blocks); then ``SingleTypeKVCacheManager.free`` frees
    the rest, the last block first: ids 124 .. 92 (each id's window part before its full part
    here), then the full parts 91 .. 0. Until this branch the passed parts 60 .. 91 were
    released with the finish's, in that last-first order. The same order in LRU (pool-first)
    and in vLLM's one free queue."""
    ids = list(range(125))
    captured: list[list[int]] = []
    free_kv = PagedKV._free_kv

    def probe(self, r, fin):
        free_kv(self, r, fin)
        if self.uq:
            captured.append([e[0] for e, _off in self._q_entries() if e[0] >= 0])
        else:
            captured.append(list(self.lru))

    monkeypatch.setattr(PagedKV, "_free_kv", probe)
    rep, T = _run(tmp_path, [(0.0, 2000, 500, ids)], monkeypatch, eviction)
    assert T.requests_completed == 1
    assert (rep.win[2], rep.wn, rep.gf, rep.gw) == (65, 64, 10, 52)
    want = [WKEY + j for j in range(92)]  # 0 .. 59 at the chunk's end, 60 .. 91 as it decoded
    for j in range(124, 91, -1):
        want += [WKEY + j, j]
    want += list(range(91, -1, -1))
    assert captured == [want]
    assert len(want) == 125 + 125  # every id's full and window part, cached and unreferenced
