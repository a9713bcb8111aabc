"""Linear-state (Mamba-2) layers hold a constant state per sequence (issue 22): in the paged
pool a hybrid's sequence of L tokens holds its attention layers' layer-blocks plus the state's
(serving/kv_paged.py, "Sliding windows and linear-state layers"), allocated at admission and
freed at finish or preemption; the reserve policy reserves prompt + output and the state; the
longest request is counted the same way. Hand counts for NVIDIA Nemotron-Nano-9B-v2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import ListSink, linear_profile, resolved
from test_kv_window import _spy

from fleetsim.apps.simulate import simulate
from fleetsim.base.errors import ScenarioError
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.serving.kv_reserve import ReserveKV

MODEL = "nemotron-nano-9b-v2"
B = 16
# One Mamba-2 layer's state, from the model's config.json (data/models/nvidia/...): the SSM
# state 128 heads x 80 x 128 and the convolution window (4 - 1) x (10,240 + 2 x 8 x 128), bf16
STATE_LAYER_BYTES = (128 * 80 * 128 + 3 * (10_240 + 2 * 8 * 128)) * 2  # 2,695,168
# one attention layer's KV of a token: K and V of 8 heads of 128, bf16; its 16-token block
LAYER_BLOCK_BYTES = 16 * 2 * 8 * 128 * 2  # 65,536
# a layer's state in layer-blocks: ceil(41.125) = 42 (vLLM pads it to one 672-token page);
# 27 Mamba layers in groups of 4 (the attention layers' count) -> 7 groups, 28 layers
STATE_BLOCKS = 28 * 42  # 1,176


def _scenario(tmp_path: Path, rows: list[tuple[float, int, int]], kv_gb: float, **fleet) -> dict:
    m = model_from_catalog(MODEL)
    prof = linear_profile(tmp_path / "lin.json", m.weight_bytes, kv_gb * 1e9)
    f = tmp_path / "trace.csv"
    f.write_text(
        "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows)
    )
    return {
        "simulation": {"hours": 1},
        "model": {"name": MODEL},
        "hardware": {"profile": prof},
        "fleet": {
            "max_batch_size": 1024,
            "max_batched_tokens": 16384,
            "block_size_tokens": B,
            "activation_reserve_bytes": 0,
            **fleet,
        },
        "traffic": {"trace": str(f)},
        "slo": {"ttft_s": 1e5, "tpot_s": 1e5},
    }


def test_state_blocks_hand_count():
    """Nemotron-Nano-9B-v2 (4 attention, 27 Mamba-2 layers): a layer's state is 2,695,168
    bytes, 41.125 layer-blocks of 16 tokens, padded to 42; the 27 layers padded to 7 groups of
    4: 1,176 layer-blocks per sequence, at any tensor parallelism (the state is split by heads
    as the attention KV is). Nano-12B-v2 (6 attention, 28 Mamba): 5 groups of 6, 1,260."""
    m = model_from_catalog(MODEL)
    assert (m.n_attn_layers, m.n_linear_layers, m.n_sliding_layers) == (4, 27, 0)
    assert m.state_bytes_per_seq == 27 * STATE_LAYER_BYTES
    assert m.kv_bytes_per_token * B / 4 == LAYER_BLOCK_BYTES
    assert math.ceil(STATE_LAYER_BYTES / LAYER_BLOCK_BYTES) == 42
    assert m.state_layer_blocks(B, 1) == m.state_layer_blocks(B, 2) == STATE_BLOCKS
    assert m.state_layer_blocks(32, 1) == 28 * 21  # 20.56 -> 21 blocks of 32 tokens
    assert model_from_catalog("nemotron-nano-12b-v2").state_layer_blocks(B, 1) == 30 * 42
    assert model_from_catalog("gemma-3-27b").state_layer_blocks(B, 1) == 0


def test_long_request_holds_attention_blocks_plus_the_state(tmp_path, monkeypatch):
    """3 GB of KV = 45,776 layer-blocks: the longest request is (45,776 - 1,176) // 4 x 16 =
    178,400 tokens (the context window caps it lower). A 60,000-token request completes holding
    4 ceil(L / 16) + 1,176 layer-blocks and gives all back; the old accounting charged it 4
    ceil(L / 16) alone, the state amortised over a guessed length."""
    d = _scenario(tmp_path, [(1.0, 59_990, 10)], kv_gb=3.0)
    rs = resolved(d)
    kv = rs.kv
    assert kv is not None
    nb = int(3e9 // LAYER_BLOCK_BYTES)
    assert (kv.layer_blocks, kv.state_blocks) == (nb, STATE_BLOCKS) == (45_776, 1_176)
    assert kv.request_tokens == (nb - STATE_BLOCKS) // 4 * B == 178_400
    seen = _spy(monkeypatch)
    sink = ListSink()
    simulate(rs, request_sink=sink)
    (row,) = sink.rows.values()
    assert row[6] == "completed"
    ((tokens, used),) = seen["at_free"]
    assert tokens == 59_999  # prompt + 10 outputs, the last one's KV never written
    assert used == 4 * math.ceil(tokens / B) + STATE_BLOCKS
    assert seen["after_free"] == [0]


def test_a_batch_is_bound_by_the_constant_state(tmp_path, monkeypatch):
    """300 requests of 10 prompt + 5 output tokens arrive together: each holds one 16-token
    block in 4 attention layers plus the state, 1,180 layer-blocks, so 45,776 // 1,180 = 38 run
    at once (the blocks of their tokens alone would allow 11,444); N sequences hold N x 1,180,
    and all 300 complete."""
    rows = [(1.0, 10, 5)] * 300
    rs = resolved(_scenario(tmp_path, rows, kv_gb=3.0))
    seen = _spy(monkeypatch)
    sink = ListSink()
    res = simulate(rs, request_sink=sink)
    per_seq = 4 + STATE_BLOCKS
    n_max = 45_776 // per_seq
    assert n_max == 38
    assert seen["n"] == n_max
    assert max(seen["used"]) == n_max * per_seq
    assert all(u % per_seq == 0 for u in seen["used"])  # whole sequences, nothing else held
    for (tokens, used), after in zip(seen["at_free"], seen["after_free"], strict=True):
        assert used % per_seq == 0 and used <= n_max * per_seq
        assert tokens == 14 and used - after == per_seq
    assert seen["after_free"][-1] == 0
    assert res.totals.requests_completed == 300
    assert res.totals.preemptions == 0


def test_preemption_frees_the_state(tmp_path, monkeypatch):
    """24 requests of 2,000 + 3,000 tokens on 2 GB (30,517 layer-blocks): sequences that
    outgrow the pool preempt; the blocks in use never exceed the pool, each finish gives back
    exactly 4 ceil(L / 16) + 1,176, and every request completes with the pool empty."""
    rows = [(1.0 + 0.001 * i, 2000, 3000) for i in range(24)]
    rs = resolved(_scenario(tmp_path, rows, kv_gb=2.0))
    nb = rs.kv.layer_blocks
    seen = _spy(monkeypatch)
    res = simulate(rs)
    assert res.totals.preemptions > 0
    assert res.totals.requests_completed == 24
    assert max(seen["used"]) <= nb
    assert seen["after_free"][-1] == 0
    # each finish gives back exactly its hand count, the state included
    for (tokens, before), after in zip(seen["at_free"], seen["after_free"], strict=True):
        assert before - after == 4 * math.ceil(tokens / B) + STATE_BLOCKS


def test_reserve_policy_reserves_the_state(tmp_path, monkeypatch):
    """reserve: 3 GB hold 183,105 tokens of the 4 attention layers (16,384 bytes each) and a
    state is ceil(72,769,536 / 16,384) = 4,442 of them, so requests of 10 + 5 tokens run 41 at
    once ((183,105 // (15 + 4,442)), each reserving 4,457; the longest request is 183,105 -
    4,442 tokens."""
    rows = [(1.0, 10, 5)] * 100
    rs = resolved(_scenario(tmp_path, rows, kv_gb=3.0, kv_allocation="reserve"))
    kv = rs.kv
    assert kv is not None
    assert (kv.attn_tokens, kv.state_tokens) == (int(3e9 // 16_384), 4_442)
    assert kv.request_tokens == kv.attn_tokens - 4_442
    peak = {"kv": 0}
    admit = ReserveKV._admit

    def spy(self, it):
        admit(self, it)
        peak["kv"] = max(peak["kv"], self.kv_used)

    monkeypatch.setattr(ReserveKV, "_admit", spy)
    res = simulate(rs)
    n_max = kv.attn_tokens // (15 + 4_442)
    assert n_max == 41
    assert peak["kv"] == n_max * (15 + 4_442)
    assert res.totals.requests_completed == 100


@pytest.mark.parametrize("kv", ["paged", "reserve"])
def test_longer_than_the_state_leaves_is_refused(tmp_path, kv):
    """A request longer than the cache holds beside its state is refused at validation, one
    line naming the KV budget."""
    m = model_from_catalog(MODEL)
    d = _scenario(tmp_path, [(1.0, 100, 10)], kv_gb=0.1, kv_allocation=kv)
    rs = resolved(d)
    longest = rs.kv.request_tokens
    if kv == "paged":
        assert longest == (int(0.1e9 // LAYER_BLOCK_BYTES) - STATE_BLOCKS) // 4 * B == 1_392
    else:
        assert longest == int(0.1e9 // 16_384) - math.ceil(m.state_bytes_per_seq / 16_384)
    (tmp_path / "long").mkdir()
    with pytest.raises(ScenarioError, match="exceeds the KV budget"):
        resolved(_scenario(tmp_path / "long", [(1.0, longest, 1)], kv_gb=0.1, kv_allocation=kv))


def test_sessions_on_a_hybrid_run_without_prefix_caching():
    """Session traffic names prompt blocks, and prefix caching is on by default; vLLM 0.11
    disables it for hybrid models ("Hybrid or mamba-based model detected: disabling prefix
    caching"), and so does the engine: the scenario validates, nothing is taken from a cache,
    every prompt token is computed, and macro-stepping equals the per-iteration run (the
    sessions' shared system prompt would give Llama-3.1-8B over half its tokens from the
    cache: tests/test_paged.py)."""
    from conftest import merge
    from test_engine_modes import assert_modes_equal
    from test_paged import SESSIONS

    d = merge(
        SESSIONS,
        model={"name": MODEL},
        simulation={"hours": 1},
        traffic={**SESSIONS["traffic"], "requests_per_day": 8_000},
    )
    macro = assert_modes_equal(d)
    assert macro.totals.prefix_hit_tokens == 0
    assert macro.totals.requests_completed > 200


def test_disaggregated_pools_hold_the_state_once_each(tmp_path, monkeypatch):
    """A disaggregated pair: the prefill replica holds a prompt's attention blocks and the
    state until the KV has left (4 ceil(p / 16) + 1,176 given back at release), the decode
    replica takes 4 (p // 16 + 1) + 1,176 when the KV joins (its first decode step's block
    included), and the link carries the state once: the attention layers' p x 16,384 bytes +
    72,769,536."""
    from fleetsim.serving.kv_paged import PagedKV

    rows = [(1.0 + 0.5 * i, p, 30) for i, p in enumerate((17, 300, 1024, 4000, 9001))]
    d = _scenario(tmp_path, rows, kv_gb=3.0)
    d["disaggregation"] = {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}
    seen: dict[str, list] = {"join": [], "release": []}
    join, release = PagedKV._join_kv, PagedKV._release_kv

    def spy_join(self, r, it):
        before = self.NB - self.free
        join(self, r, it)
        seen["join"].append((r.eff, self.NB - self.free - before))

    def spy_release(self, r):
        before, tokens = self.NB - self.free, r.kv_tokens
        release(self, r)
        seen["release"].append((tokens, before - (self.NB - self.free)))

    monkeypatch.setattr(PagedKV, "_join_kv", spy_join)
    monkeypatch.setattr(PagedKV, "_release_kv", spy_release)
    res = simulate(resolved(d))
    assert res.totals.requests_completed == 5
    assert sorted(p for p, _ in seen["join"]) == [17, 300, 1024, 4000, 9001]
    for p, taken in seen["join"]:
        assert taken == 4 * (p // B + 1) + STATE_BLOCKS
    assert len(seen["release"]) == 5
    for tokens, given in seen["release"]:
        assert given == 4 * math.ceil(tokens / B) + STATE_BLOCKS
    sent = float(res.pools.column("kv_transfer_bytes").to_numpy().sum())
    assert sent == pytest.approx(16_384 * sum(p for _, p, _ in rows) + 5 * 72_769_536, rel=1e-12)


def test_validate_says_what_the_state_holds():
    """`fleetsim validate` on a hybrid names the state per sequence (72.8 MB, 1,176
    layer-blocks) and the longest request beside the KV budget."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "fleetsim", "validate", "scenarios/default.toml", "--set"]
    r = subprocess.run(
        [*cmd, f'model.name="{MODEL}"'], cwd=root, capture_output=True, text=True, check=True
    )
    line = next(x for x in r.stderr.splitlines() if x.startswith("# model"))
    assert "linear-state state, 72.8 MB (1,176 layer-blocks of 16 tokens" in line
    assert "longest request" in line


def test_a_trace_of_tiny_requests_is_not_refused_for_its_typical_tokens(tmp_path):
    """0.3 GB of KV on Nemotron-Nano-9B-v2 holds 4,577 layer-blocks: 3 sequences' states
    (1,176 each) and their attention blocks. A trace of 1 + 1-token requests makes the typical
    sequence's bytes per token its whole state (72.8 MB for 2 tokens held over 1 + 1
    iterations: branch t48), so the budget in typical tokens is less than one 16-token block
    (0 tokens) while the engine holds 3 such requests at once; the replica is refused only when
    the engine cannot hold one request (the longest request: (4,577 - 1,176) // 4 x 16 =
    13,600 tokens), and all 12 complete."""
    rows = [(0.01 * i, 1, 1) for i in range(12)]
    rs = resolved(_scenario(tmp_path, rows, 0.3))
    assert rs.kv.layer_blocks == int(0.3e9 // LAYER_BLOCK_BYTES) == 4577
    assert rs.kv.tokens == 0
    assert rs.kv.request_tokens == (4577 - STATE_BLOCKS) // 4 * B == 13_600
    res = simulate(rs)
    assert res.totals.requests_completed == 12
