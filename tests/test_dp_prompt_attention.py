"""Prompt attention at the fullest data-parallel engine (LatencyModel.fullest_prompts; the
per-rank engine's p_full / pairs_full): a prompt chunk lives on one engine (vLLM binds its request
to one DP rank) and the ranks step in lockstep, so a step's prompt attention, the chunks' scores
and their new tokens' KV write, is that of the engine holding the most, not 1/dp of the step's."""

from __future__ import annotations

import json

import pytest
from conftest import moe16, resolved
from test_dp_engine import _scenario

from fleetsim.apps.cli import main
from fleetsim.config.schema import FleetSection
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack
from fleetsim.serving.pod import Pod

QWEN3_30B = "data/models/Qwen/Qwen3-30B-A3B-Instruct-2507/config.json"
P = 1500  # prompt tokens


def _lat(dp: int) -> LatencyModel:
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    return LatencyModel(moe16(8), p, tp=1, dp=dp, expert_parallel=dp > 1)


def test_fullest_prompts_hand_counts():
    """dp 8: one 1,500-token chunk (pairs 1,500^2) is all on one engine: 8 x its tokens and
    pairs over the even split; nine chunks of 1,000 put two on the fullest engine, of the mean
    chunk and the mean pairs (the split dp_padded_tokens counts); four chunks, one each. dp 1
    and a step without chunks: the counts themselves."""
    lat = _lat(8)
    assert lat.fullest_prompts(P, P * P * 1.0, 1) == (8 * P, 8.0 * P * P)
    assert lat.fullest_prompts(9 * 1000, 9.0e6, 9) == (8 * 2000, pytest.approx(8 * 2 * 1.0e6))
    assert lat.fullest_prompts(4 * P, 4.0 * P * P, 4) == (8 * P, 8.0 * P * P)
    assert lat.fullest_prompts(0, 0.0, 0) == (0, 0.0)
    assert _lat(1).fullest_prompts(9 * 1000, 9.0e6, 9) == (9 * 1000, 9.0e6)
    # the prompt tokens are the fullest engine's of dp_padded_tokens: (16 + 2,000) - 16 decodes
    assert lat.dp_padded_tokens(9 * 1000, 9, 128) == 8 * 16 + lat.fullest_prompts(9000, 9e6, 9)[0]


def _cli(capsys, dp: int) -> dict:
    argv = ["latency", "--gpu", "h100-sxm", "--model", QWEN3_30B, "--tp", "1", "--dp", str(dp)]
    if dp > 1:
        argv.append("--expert-parallel")
    assert main([*argv, "--prefill-tokens", "8000", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    return row


def test_a_prompt_on_one_engine_costs_it_a_one_engine_servers_attention(capsys):
    """Qwen3-30B-A3B, one 8,000-token prefill (the latency CLI): on 2 x H100 (DP2, EP) the prompt
    is one engine's, whose attention kernel runs all 64 M pairs and writes all 8,000 tokens' KV:
    the attention_core of one H100 (DP1), not half of it (before: 0.5 x). By hand: 48 layers x
    32 query heads x 128 x 2 (QK^T and PV) x 2 FLOPs = 786,432 per pair at the 16-bit peak x
    compute_eff_max (compute-bound), plus 8,000 x 98,304 KV bytes at bw x memory_eff."""
    one, two = _cli(capsys, 1), _cli(capsys, 2)
    a1, a2 = one["parts_s"]["attention_core"], two["parts_s"]["attention_core"]
    assert a2 == pytest.approx(a1, rel=1e-12)
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    p = apply_stack(p, "vllm-v1", "h100-sxm", FleetSection().max_batch_size)
    want = 8000.0**2 * 786_432 / (p.peak_flops * p.compute_eff_max) + 8000 * 98_304 / (
        p.mem_bw_bytes_per_s * p.memory_eff
    )
    assert a2 == pytest.approx(want, rel=1e-9)
    assert sum(two["parts_s"].values()) == pytest.approx(two["total_s"], rel=1e-12)


def test_iteration_breakdown_and_the_run_formula_agree():
    """dp 4, a mixed step of one 1,500-token chunk and 5 decodes: iteration and breakdown time the
    same prompt attention (4 x the chunk's pairs and tokens over the even split); passing the
    fullest rank's counts explicitly (p_full, pairs_full) equal to the derived ones gives the same
    step bit for bit; a pure decode step is unchanged (the run formula); dp 1 ignores them."""
    lat = _lat(4)
    pairs, ctx = 1500.0 * 1500, 5 * 5000.0
    t = lat.iteration(P, pairs, 1, 5, ctx)[0]
    assert lat.iteration(P, pairs, 1, 5, ctx, -1, 4 * P, 4 * pairs)[0] == t
    br = lat.breakdown(P, pairs, 1, 5, ctx)
    assert sum(br.values()) == pytest.approx(t, rel=1e-12)
    att_c, att_m = lat._att_c, lat._att_m  # type: ignore[attr-defined]
    want = max((4 * pairs + ctx * 8 / 5) * att_c, ctx * 8 / 5 * att_m) + (4 * P + 8) * att_m
    assert br["attention_core"] == pytest.approx(want, rel=1e-12)
    # a rank holding less than the derived split: its own counts, a shorter step
    assert lat.iteration(P, pairs, 1, 5, ctx, -1, 2 * P, 2 * pairs)[0] < t
    assert lat.iteration(0, 0.0, 0, 5, ctx)[0] == lat.decode_step(5, ctx)[0]
    one = _lat(1)
    t1 = one.iteration(P, pairs, 1, 5, ctx)[0]
    assert one.iteration(P, pairs, 1, 5, ctx, -1, 9 * P, 9 * pairs)[0] == t1


class _Sink:
    def __init__(self) -> None:
        self.first: dict[int, float] = {}

    def add(self, r, replica, finish_s, ttft, tpot, e2e, status) -> None:
        self.first[r.rid] = r.first_token_s


def test_the_engine_times_the_prompt_attention_of_its_fullest_rank(tmp_path):
    """2 ranks, 2 slots each; eight requests at t = 0 bound 0, 1, 0, 1, ... (vLLM's rule, ties to
    the lower index): outputs 1, 5, 1, 5, 3, 3, 3, 3. Step 1: each rank prefills two prompts.
    Requests 0 and 2 (rank 0) end at their first token, so in step 2 rank 0 prefills requests 4
    and 6 (2 P tokens, 2 P^2 pairs) while rank 1 decodes requests 1 and 3: the step is timed at
    rank 0's prompts, dp x theirs (p_full 4 P, pairs_full 4 P^2), where the derived split puts
    one prompt on each rank (fullest_prompts: 2 P, 2 P^2); t_pad 2 x 2 P. Request 4's first
    token comes at the end of step 2."""
    reqs = [(0, P, o) for o in (1, 5, 1, 5, 3, 3, 3, 3)]
    sink = _Sink()
    pod = Pod(resolved(_scenario(tmp_path, reqs, max_batch=4)), 0, 1, request_sink=sink)
    lat = pod.lat
    calls: list[tuple] = []
    it = lat.iteration

    def rec(*a):
        calls.append(a)
        return it(*a)

    lat.iteration = rec  # type: ignore[method-assign]
    pod.run()
    # (step 1 is planned as each arrival joins it: its last plan holds all four prompts)
    prompt_calls = [a for a in calls if a[0] > 0]
    assert prompt_calls[3] == (4 * P, 4.0 * P * P, 4, 0, 0.0, 4 * P, 4 * P, 4.0 * P * P)
    p2 = prompt_calls[4]
    assert p2[:4] == (2 * P, 2.0 * P * P, 2, 2) and p2[5:] == (4 * P, 4 * P, 4.0 * P * P)
    assert lat.fullest_prompts(2 * P, 2.0 * P * P, 2) == (2 * P, 2.0 * P * P)
    s1 = it(4 * P, 4.0 * P * P, 4, 0, 0.0, 4 * P, 4 * P, 4.0 * P * P)[0]
    s2 = it(2 * P, 2.0 * P * P, 2, 2, p2[4], 4 * P, 4 * P, 4.0 * P * P)[0]
    assert s2 > it(2 * P, 2.0 * P * P, 2, 2, p2[4], 4 * P)[0]  # the derived split is shorter
    assert sink.first[4] == pytest.approx(s1 + s2, rel=1e-12)
