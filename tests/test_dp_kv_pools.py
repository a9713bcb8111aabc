"""A KV pool per data-parallel rank (``fleet.dp_kv_pool = "per-rank"``, serving/ranks.py)
against one pool shared by the ranks (``"shared"``), by hand count.

Qwen3-30B-A3B over 2 ranks (``data_parallel = 2``, expert parallel, a scheduler per rank),
16-token blocks, no chunked prefill, and the same device memory under both settings: the
replica has ``NB`` blocks, and with a pool per rank every rank's engine core has ``NB // 2``
(vLLM: each ``EngineCore`` sizes its own KV cache from its own GPUs' profile,
``EngineCore._initialize_kv_caches``, vllm/v1/engine/core.py). Requests arrive 1 ms apart;
the rank with the lowest ``4 x waiting + running`` takes each (the lower index on a tie), so
A goes to rank 0, B (the short one) to rank 1, and C to rank 0 (1 running each)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import resolved
from test_engine_properties import _regression, build, run_case

from fleetsim.base.errors import ScenarioError


def _case(reqs, pool: str, kv_factor: float):
    # per-rank: build() gives every rank kv_factor x the longest request's KV (x 2 in all), so
    # half the factor keeps the device memory of the shared pool
    f = kv_factor if pool == "shared" else kv_factor / 2
    return _regression(
        "moe-ep",
        reqs,
        kv_factor=f,
        dp_kv_pool=pool,
        chunked=False,
        max_batched_tokens=8192,
    )


def test_a_request_waits_for_its_own_ranks_blocks():
    """A (800 + 300) and C (800 + 20) on rank 0, B (1 + 300) on rank 1; 152 blocks.

    Shared: when C arrives A holds 50 blocks and B 1; C's whole prompt (50 blocks, vLLM's
    full-sequence gate) fits the 101 free, so it is admitted at the next boundary, with B's
    first token (0.0502 s), and finishes long before A. Per rank: rank 0 has 152 // 2 = 76
    blocks, 76 - 50 - 1 = 25 < 50 free, and rank 1's free blocks are not its to take: C waits
    until A leaves (A then holds ceil(1,099 / 16) = 69 blocks, 7 free), and its first token
    comes after A's last. Neither preempts."""
    reqs = ((0.0, 800, 300, 0), (0.001, 1, 300, 1), (0.002, 800, 20, 2))
    shared = run_case(_case(reqs, "shared", 2.1), modes=True)
    per = run_case(_case(reqs, "per-rank", 2.1), modes=True)
    for out in (shared, per):
        assert out["res"].resolved.kv.blocks == 152
        assert out["res"].totals.preemptions == 0
    s, p = shared["sink"].rows, per["sink"].rows
    # (status, arrival, prompt, output, first token, finish)
    assert s[2][4] == s[1][4] == pytest.approx(0.050162, abs=1e-6)
    assert s[2][5] < s[0][5]
    assert p[0][5] < p[2][4]  # C's first token after A's last
    assert p[2][4] == pytest.approx(1.678198, abs=1e-6)
    # the most either holds: shared 50 + 1 + 50 + growth; per rank one rank's, at most 76
    assert shared["log"].max_used > 76
    assert per["log"].max_used <= 76


def test_a_rank_short_of_its_blocks_preempts_though_the_other_has_room():
    """A and C (400 + 500 each) on rank 0, B (1 + 500) on rank 1; 156 blocks.

    Shared: all three hold at most ceil(900 / 16) x 2 + ceil(501 / 16) = 57 + 57 + 32 = 146
    blocks: no preemption. Per rank: rank 0 has 78 blocks. A (joined one iteration before C)
    opens its 40th block writing its 625th token while C holds 624 tokens, 39 blocks: 79 > 78,
    so rank 0 preempts its most recent request, C, though rank 1 holds only B's 32; C is
    prefilled again with the 624 tokens it held (recomputed) and finishes last."""
    reqs = ((0.0, 400, 500, 0), (0.001, 1, 500, 1), (0.002, 400, 500, 2))
    shared = run_case(_case(reqs, "shared", 2.6), modes=True)
    per = run_case(_case(reqs, "per-rank", 2.6), modes=True)
    for out in (shared, per):
        assert out["res"].resolved.kv.blocks == 156
    T = shared["res"].totals
    assert T.preemptions == 0 and T.recomputed_tokens == 0
    assert shared["log"].max_used == 146
    T = per["res"].totals
    assert T.preemptions == 1 and T.recomputed_tokens == 624
    assert per["log"].max_used == 78
    p = per["sink"].rows
    assert p[2][5] > max(p[0][5], p[1][5])


def test_the_longest_request_fits_one_ranks_pool():
    """With a pool per rank a request is served from one rank's blocks: 152 blocks, 76 a rank,
    so the longest request is 76 x 16 = 1,216 tokens (one pool: 152 x 16 = 2,432); a
    trace whose longest request is longer is refused, naming the rank."""
    reqs = ((0.0, 800, 300, 0), (0.001, 1, 300, 1), (0.002, 800, 20, 2))
    with tempfile.TemporaryDirectory() as tmp:
        d = build(_case(reqs, "per-rank", 2.1), Path(tmp))
        assert resolved(d).kv.request_tokens == 1216
        d["fleet"]["dp_kv_pool"] = "shared"
        assert resolved(d).kv.request_tokens == 2432
        d["fleet"]["dp_kv_pool"] = "per-rank"
        f = Path(d["traffic"]["trace"])
        f.write_text(f.read_text() + "0.003,1000,217\n")  # 1,217 tokens
        with pytest.raises(ScenarioError, match="data-parallel rank"):
            resolved(d)
        d["fleet"]["dp_kv_pool"] = "shared"
        assert resolved(d).kv.request_tokens == 2432


def test_a_windowed_models_longest_request_is_one_ranks_layer_blocks():
    """gpt-oss-20b (alternating 128-token windows) over 2 ranks: the pool is counted in
    layer-blocks, and with a pool per rank the longest request is the one whose blocks fit half
    of them (ModelSpec.max_tokens_in_layer_blocks), not the replica's."""
    d = {
        "simulation": {"hours": 1},
        "model": {"name": "gpt-oss-20b"},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"data_parallel": 2, "max_batch_size": 8},
        "traffic": {"requests_per_day": 100},
    }
    per = resolved(d)
    d["fleet"]["dp_kv_pool"] = "shared"
    shared = resolved(d)
    kv = per.kv
    assert kv.layer_blocks == shared.kv.layer_blocks > 0
    m, b = per.model, kv.block_size_tokens
    assert shared.kv.request_tokens == m.max_tokens_in_layer_blocks(
        kv.layer_blocks - kv.state_blocks, b
    )
    assert kv.request_tokens == m.max_tokens_in_layer_blocks(
        kv.layer_blocks // 2 - kv.state_blocks, b
    )
    assert kv.request_tokens < shared.kv.request_tokens


WINDOW_DP_KINDS = {
    "gpt-oss-dp": ({"name": "gpt-oss-20b"}, {"data_parallel": 2, "expert_parallel": True}),
    "gemma3-dp": ({"name": "gemma-3-12b"}, {"data_parallel": 2}),
    "mamba2-dp": ({"name": "nemotron-nano-9b-v2"}, {"data_parallel": 2}),
}


@pytest.mark.parametrize("seed", range(12))
def test_windowed_and_hybrid_models_keep_the_invariants_per_rank(seed, monkeypatch):
    """Window and linear-state layers with a pool per rank (each sequence's window weight on its
    own rank's residue counts; with prefix caching where drawn, each rank's cache holding
    window parts too): generated cases under the audit, both engines equal."""
    import random
    from dataclasses import replace

    import test_engine_properties as tep

    for k, v in WINDOW_DP_KINDS.items():
        monkeypatch.setitem(tep.KINDS, k, v)
    rng = random.Random(seed)
    c = tep.make_case(tep._Rng(seed), kinds=tuple(WINDOW_DP_KINDS))
    c = replace(
        c,
        kv="paged",
        # prefix caching as drawn: window parts cached per rank (h46); none for the hybrid
        prefix=c.prefix,
        disagg=False,
        dp_scheduler="per-rank",
        dp_kv_pool="per-rank",
        kv_factor=rng.choice([1.05, 1.2, 1.5, 2.0]),
        router="least_loaded" if c.router == "central_queue" else c.router,
        max_batch_size=2 * c.max_batch_size if c.max_batch_size % 2 else c.max_batch_size,
    )
    run_case(c, modes=True)


def test_a_prefix_hits_only_its_own_ranks_cache():
    """Four copies of one 800-token prompt (13 hash ids of 64 tokens, all shared: family 6)
    arrive 1 ms apart: A and C go to rank 0, B and D to rank 1 (lowest ``4 x waiting +
    running``, the lower index on a tie). A copy hits the 12 full 64-token blocks (768 tokens)
    a copy on its own rank published when it was scheduled (vLLM's engine core per rank, its
    own prefix cache). Per rank: C hits A's, D hits B's, 2 x 768 = 1,536 tokens; B, the first
    on rank 1, computes its whole prompt. One shared pool: B, C and D all hit A's, 3 x 768."""
    reqs = tuple((0.001 * k, 800, 40, 6) for k in range(4))
    hits = {}
    for pool in ("per-rank", "shared"):
        f = 4.0 if pool == "shared" else 2.0
        c = _regression(
            "moe-ep",
            reqs,
            kv_factor=f,
            dp_kv_pool=pool,
            prefix=True,
            chunked=False,
            max_batched_tokens=8192,
        )
        out = run_case(c, modes=True)
        T = out["res"].totals
        assert T.requests_completed == 4 and T.preemptions == 0
        assert T.prompt_tokens == 4 * 800
        hits[pool] = T.prefix_hit_tokens
    assert hits == {"per-rank": 2 * 768, "shared": 3 * 768}
