"""Sliding-window layers in the paged KV policy (serving/kv_paged.py, "Sliding windows"): a
window layer holds at most ceil(W / b) + 1 blocks of a sequence, a global layer its whole
context; the pool is counted in layer-blocks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from conftest import ListSink, linear_profile, merge, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.serving.kv_paged import PagedKV

B = 16  # block_size_tokens
_COMMIT, _FREE = PagedKV._commit_kv, PagedKV._free_kv


def _scenario(tmp_path: Path, trace_rows: list[tuple[float, int, int]], kv_gb: float) -> dict:
    m = model_from_catalog("gemma-3-27b")
    prof = linear_profile(tmp_path / "lin.json", m.weight_bytes, kv_gb * 1e9)
    f = tmp_path / "trace.csv"
    f.write_text(
        "arrival_s,prompt_tokens,output_tokens\n"
        + "".join(f"{a},{p},{o}\n" for a, p, o in trace_rows)
    )
    return {
        "simulation": {"hours": 1},
        "model": {"name": "gemma-3-27b"},
        "hardware": {"profile": prof},
        "fleet": {
            "max_batch_size": 1024,
            "max_batched_tokens": 16384,
            "block_size_tokens": B,
            "activation_reserve_bytes": 0,
        },
        "traffic": {"trace": str(f)},
    }


def _spy(monkeypatch) -> dict:
    """Record the layer-blocks in use and the decoding sequences after every commit, and the
    blocks in use when each request finishes."""
    seen: dict = {"used": [], "n": 0, "at_free": [], "after_free": [], "min_free": 1 << 62}
    commit, free_kv = _COMMIT, _FREE

    def spy_commit(self, *a):
        commit(self, *a)
        seen["used"].append(self.NB - self.free)
        seen["min_free"] = min(seen["min_free"], self.free)
        seen["n"] = max(seen["n"], self.n)

    def spy_free(self, r, f):
        seen["at_free"].append((r.eff + f - r.join_it, self.NB - self.free))
        free_kv(self, r, f)
        seen["after_free"].append(self.NB - self.free)

    monkeypatch.setattr(PagedKV, "_commit_kv", spy_commit)
    monkeypatch.setattr(PagedKV, "_free_kv", spy_free)
    return seen


def test_gemma3_long_request_holds_the_hand_count(tmp_path, monkeypatch):
    """One 32,000-token prompt with 100 output tokens on Gemma 3 27B (62 layers, every 6th
    global, W = 1,024): at its end it holds ceil(32,099 / 16) = 2,007 blocks on each of the 10
    global layers and ceil(1,024 / 16) + 1 = 65 on each of the 52 window layers."""
    m = model_from_catalog("gemma-3-27b")
    assert (m.n_global_attn_layers, m.n_sliding_layers) == (10, 52)
    seen = _spy(monkeypatch)
    d = _scenario(tmp_path, [(1.0, 32_000, 100)], kv_gb=20.0)
    sink = ListSink()
    simulate(resolved(d), request_sink=sink)
    (row,) = sink.rows.values()
    assert row[6] == "completed"
    ((tokens, used),) = seen["at_free"]
    assert tokens == 32_000 + 100 - 1  # the last token's KV is never written
    cap = math.ceil(1024 / B) + 1
    assert used == 10 * math.ceil(tokens / B) + 52 * cap == 23_450
    assert max(seen["used"]) == used  # it only grows: the window layers release as they open
    # while the prompt is being computed (two chunks of 16,384 and 15,616) the window layers
    # already hold no more than the cap
    assert seen["used"][0] == 10 * (16_384 // B) + 52 * cap
    # the same request with the windows removed holds every token in every layer
    seen2 = _spy(monkeypatch)
    simulate(resolved(merge(d, model={"name": "gemma-3-27b", "sliding_window_tokens": 0})))
    ((tokens2, used2),) = seen2["at_free"]
    assert (tokens2, used2) == (tokens, math.ceil(tokens / B))  # blocks of all 62 layers


def test_windows_admit_more_sequences_by_the_bytes_ratio(tmp_path, monkeypatch):
    """A burst of identical 4,000-token prompts on a small cache: the windowed model runs as
    many more sequences at once as a sequence's KV bytes shrink, 62 x 4,000 / (10 x 4,000 +
    52 x 1,024) = 2.66 (to the blocks' rounding and the watermark)."""
    P, O = 4000, 32
    rows = [(1.0 + 1e-3 * i, P, O) for i in range(400)]
    d = _scenario(tmp_path, rows, kv_gb=40.0)
    win = _spy(monkeypatch)
    res_w = simulate(resolved(d))
    full = _spy(monkeypatch)
    res_f = simulate(resolved(merge(d, model={"name": "gemma-3-27b", "sliding_window_tokens": 0})))
    assert res_w.totals.requests_completed == res_f.totals.requests_completed == 400
    m = model_from_catalog("gemma-3-27b")
    bytes_ratio = 62 * P / (10 * P + 52 * 1024)
    assert m.kv_bytes(P) * bytes_ratio == m.kv_bytes_per_token * P
    ratio = win["n"] / full["n"]
    assert full["n"] >= 10  # memory-bound: far below max_batch_size and the token budget
    assert abs(ratio / bytes_ratio - 1.0) < 0.05, (win["n"], full["n"], ratio, bytes_ratio)
    # the windowed run finishes the burst sooner: more sequences per decode step
    assert res_w.totals.iterations < res_f.totals.iterations


def test_windowed_preemption_conserves_blocks(tmp_path, monkeypatch):
    """Mixed lengths on a cache too small for them: sequences are preempted and recomputed,
    yet the free layer-blocks never go negative and the pool is whole again at the end (every
    weight a sequence added to the residue counts, G + S then G once its windows fill, is taken
    back when it leaves)."""
    rng = np.random.default_rng(np.random.SeedSequence(22))
    rows = [
        (1.0 + 0.05 * i, int(p), int(o))
        for i, (p, o) in enumerate(
            zip(rng.integers(200, 6000, 300), rng.integers(50, 1500, 300), strict=True)
        )
    ]
    d = _scenario(tmp_path, rows, kv_gb=6.0)
    seen = _spy(monkeypatch)
    res = simulate(resolved(d))
    assert res.totals.preemptions > 10
    assert res.totals.requests_completed == 300
    assert seen["min_free"] >= 0
    assert seen["after_free"][-1] == 0
