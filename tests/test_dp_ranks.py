"""Data-parallel engines as vLLM runs them (calibrate/dp_ranks.py): every rank its own queue,
slots and token budget, the ranks in lockstep, a step timed at dp x the fullest rank's tokens
(LatencyModel.iteration's t_pad)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import moe16

from fleetsim.calibrate import dp_ranks as D
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel
from fleetsim.device.profile import catalog_profile

P = 1500  # prompt tokens


def _lat(dp: int) -> LatencyModel:
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    return LatencyModel(moe16(8), p, tp=1, dp=dp, expert_parallel=dp > 1)


def test_t_pad_is_the_padded_count_by_default():
    """t_pad = dp_padded_tokens gives the engine's step bit for bit; more padding, a longer
    step and more FLOPs; one engine ignores it."""
    lat = _lat(8)
    args = (2 * P, 2.0 * P * P, 2, 64, 64 * 800.0)
    base = lat.iteration(*args)
    assert lat.iteration(*args, lat.dp_padded_tokens(2 * P, 2, 64)) == base
    wide = lat.iteration(*args, 8 * (2 * P + 8))  # both prompts on one rank
    assert wide[0] > base[0] * 1.5
    assert wide[1] - base[1] == pytest.approx(8 * P * lat.f_lin, rel=1e-12)
    one = _lat(1)
    assert one.iteration(*args, 99_999) == one.iteration(*args)


def test_hand_count_one_rank_prefills_while_the_other_decodes():
    """2 ranks, 1 slot each; requests 0 and 2 on rank 0, 1 on rank 1 (outputs 1, 3, 2).
    Step 1: both ranks prefill (2 x P padded); request 0 is done at its first token. Step 2:
    rank 0 prefills request 2 while rank 1's request 1 decodes one token: the step is rank 0's
    prompt padded on both ranks (t_pad = 2 x P), not the balanced P + 1 each. Step 3: both
    decode one token and finish. Six output tokens, as the requests asked."""
    lat = _lat(2)
    tr = D.run_ranks(lat, np.array([1, 3, 2]), P, 2, 8192)
    assert tr.step_pad == [2 * P, 2 * P, -1]
    assert tr.step_dec == [0, 1, 2]
    assert tr.step_run == [2, 2, 2]
    s1 = lat.iteration(2 * P, 2.0 * P * P, 2, 0, 0.0, 2 * P)[0]
    s2 = lat.iteration(P, 1.0 * P * P, 1, 1, float(P), 2 * P)[0]
    s3 = lat.decode_step(2, 2.0 * P + 1)[0]
    assert tr.step_s == [s1, s2, s3]
    assert tr.first == [s1, s1, s1 + s2]
    assert tr.finish == [s1, s1 + s2 + s3, s1 + s2 + s3]
    assert tr.output_tokens == 6


def test_a_rank_taking_two_prompts_pads_every_rank_to_both():
    """2 ranks, 2 slots each (requests 0, 2, 4, 6 on rank 0; 1, 3, 5, 7 on rank 1). Requests
    0 and 2 end at their first token, so in step 2 rank 0 prefills two prompts while rank 1
    decodes two sequences: every rank runs 2 x P tokens (t_pad 4 x P), where the merged
    scheduler spreads the two prompts one to a rank (dp_padded_tokens: 2 x (P + 1)). The
    prompt attention is rank 0's, both prompts: 2 x 2P tokens and 2 x 2P^2 pairs (p_full,
    pairs_full); the merged scheduler's split is one prompt to a rank, the even split."""
    lat = _lat(2)
    outs = np.array([1, 5, 1, 5, 3, 3, 3, 3])
    ranks = D.run_ranks(lat, outs, P, 4, 8192)
    merged = D.run_ranks(lat, outs, P, 4, 8192, per_rank=False)
    assert ranks.step_pad[:2] == [4 * P, 4 * P]
    assert lat.dp_padded_tokens(2 * P, 2, 2) == 2 * (P + 1)
    assert (
        ranks.step_s[1]
        == lat.iteration(2 * P, 2.0 * P * P, 2, 2, 2.0 * P, 4 * P, 4 * P, 4.0 * P * P)[0]
    )
    assert lat.fullest_prompts(2 * P, 2.0 * P * P, 2) == (2 * P, 2.0 * P * P)
    assert merged.step_s[1] == lat.iteration(2 * P, 2.0 * P * P, 2, 2, 2.0 * P)[0]
    assert ranks.step_s[1] > merged.step_s[1]


def test_tokens_are_conserved_under_chunking():
    """40 requests over 2 ranks (4 slots each) with a 512-token budget, so 700-token prompts
    are chunked: every request gets its first token and finishes, the output tokens are the
    requests' and the decode gaps one fewer per request; no step runs more than a rank's
    budget on a rank."""
    lat = _lat(2)
    outs = np.random.default_rng(7).integers(1, 60, size=40)
    tr = D.run_ranks(lat, outs, 700, 8, 512)
    assert len(tr.first) == len(tr.finish) == 40
    assert tr.output_tokens == int(outs.sum())
    assert sum(tr.step_dec) == int((outs - 1).sum())
    assert max(tr.step_pad) <= 2 * 512
    assert max(tr.step_run) == 8


def test_per_rank_queues_give_the_measured_batch_fill():
    """Qwen3-Coder-480B-FP8 on 4 B200 (DP4) at 8 sequences: measured avg_batch_size 7.45 of 8.
    With one queue per rank (requests bound on arrival) the ranks drain unevenly and the window
    batch is within 3 % of it; the merged scheduler keeps all 8 slots full."""
    from fleetsim.calibrate import mlenergy as M

    c = M.find_config(
        "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "B200", 4, 8, "sourcegraph-fim", dp=4
    )
    assert c.avg_batch_size == pytest.approx(7.4532, rel=1e-3)
    ranks = D.simulate_row(c)
    merged = D.simulate_row(c, per_rank=False)
    assert ranks.avg_batch == pytest.approx(c.avg_batch_size, rel=0.03)
    assert merged.avg_batch > 7.9


def test_data_parallel_rows_imply_no_prompt():
    """The harness's KV-limited list (implied_prompts) leaves the data-parallel rows out: their
    batch below max_num_seqs is the ranks' uneven drain (test above), not a full KV cache, and
    read as KV-limited they implied prompts of 43,000-106,000 tokens (main's rows)."""
    from fleetsim.calibrate import mlenergy as M

    rows = [
        c
        for c in M.read_configs()
        if c.model_id == "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8" and c.task == "sourcegraph-fim"
    ]
    low = [
        c for c in rows if c.dp > 1 and not c.suspect and c.avg_batch_size < 0.95 * c.max_num_seqs
    ]
    assert len(low) == 4  # DP4 b8, b16; DP8 b32, b64
    assert M.implied_prompts(rows) == []
