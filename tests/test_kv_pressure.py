"""The saturated KV-bound case of issue 20 (scenarios/kv-pressure-70b-a100.toml), one replica,
one hour: conservation of requests and the bounds on the recomputed tokens that preemption by
recomputation implies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetsim.api import simulate

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "kv-pressure-70b-a100.toml"
ONE_HOUR = {"fleet.replicas": 1, "simulation.hours": 1, "traffic.requests_per_day": 236_000}


@pytest.fixture(scope="module")
def paged():
    return simulate(str(SCENARIO), {**ONE_HOUR, "fleet.kv_allocation": "paged"}, requests=True)


def _cols(run):
    req = run.requests
    status = np.asarray(req.column("status").cast("string").to_pylist())
    pre = req.column("preemptions").to_numpy(zero_copy_only=False).astype(np.int64)
    prompt = req.column("prompt_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
    out = req.column("output_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
    return status, pre, prompt, out


def test_requests_are_conserved_and_preemptions_add_up(paged):
    """arrived = completed + in flight + rejected, in the totals and in the per-request table;
    the hourly preemptions are the sum of the requests' preemption counts."""
    T = paged.totals
    status, pre, _, _ = _cols(paged)
    assert set(status) <= {"completed", "in_flight", "rejected"}
    n_done = int((status == "completed").sum())
    n_flight = int((status == "in_flight").sum())
    n_rej = int((status == "rejected").sum())
    assert n_done + n_flight + n_rej == len(status) == T["requests_arrived"]
    assert T["requests_completed"] == n_done
    assert T["requests_rejected"] == n_rej == 0  # every request fits an empty replica
    assert n_flight > 0  # saturated: the queue grows over the hour
    assert T["preemptions"] == pre.sum() > 100  # KV-bound: it does preempt


def test_recomputed_tokens_lie_between_the_preempted_prompts_and_their_whole_lengths(paged):
    """A victim is re-prefilled with its prompt plus the tokens it had generated (vLLM V1
    recomputation), so over the hour: sum over completed requests of preemptions x prompt <=
    recomputed tokens <= sum over all requests of preemptions x (prompt + output). The victims
    are the most recently admitted requests, so the recomputed tokens per re-admission sit close
    to the mean prompt (1,500), far below prompt + output."""
    T = paged.totals
    status, pre, prompt, out = _cols(paged)
    done = status == "completed"
    low = int((pre[done] * prompt[done]).sum())
    high = int((pre * (prompt + out)).sum())
    rec = T["recomputed_tokens"]
    assert 0 < low <= rec <= high
    per_victim = rec / pre.sum()
    assert 1000 <= per_victim < 1500 + 400  # prompts U(1000, 2000); outputs U(200, 600)


def test_reserve_never_preempts_and_conserves_requests():
    run = simulate(str(SCENARIO), {**ONE_HOUR, "fleet.kv_allocation": "reserve"}, requests=True)
    T = run.totals
    status, pre, _, _ = _cols(run)
    assert T["preemptions"] == T["recomputed_tokens"] == pre.sum() == 0
    assert (status == "completed").sum() + (status == "in_flight").sum() == T["requests_arrived"]


def test_a_long_prompt_waits_until_its_whole_sequence_fits(tmp_path):
    """vLLM's full-ISL admission gate (``scheduler_reserve_full_isl``): a 6,000-token prompt
    under a 4,096-token budget arrives while a 3,000-token request decodes on a 500-block
    replica. Its first chunk (4,095 tokens, 256 blocks) would fit the ~310 free blocks, its whole
    prompt (375 blocks) not: it waits, unpreempted, until the first request has finished.
    (Admitted on its first chunk, its second chunk found no blocks and it was preempted, and
    re-admitted and preempted again, until the first request finished.)"""
    from conftest import ListSink, resolved
    from test_theory import write_profile

    from fleetsim.apps.simulate import simulate as run_resolved
    from fleetsim.device.modelspec import model_from_catalog

    m = model_from_catalog("llama-3.1-8b")
    prof = write_profile(
        tmp_path / "lin.json",
        base_s=0.01,
        prefill_base_s=0.002,
        per_prefill_token_s=1e-5,
        per_seq_s=1e-4,
        per_context_token_s=1e-7,
        mem_bytes=(m.weight_bytes + 500 * 16 * m.kv_bytes_per_token + 1e6) / 0.9,
    )
    trace = tmp_path / "two.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n1.0,3000,1000\n1.5,6000,5\n")
    d = {
        "simulation": {"hours": 1},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"profile": prof},
        "fleet": {"max_batched_tokens": 4096, "activation_reserve_bytes": 0},
        "traffic": {"trace": str(trace)},
    }
    rs = resolved(d)
    assert rs.kv.blocks == 500
    sink = ListSink()
    res = run_resolved(rs, request_sink=sink)
    first, second = sorted(sink.rows.values(), key=lambda r: r[0])
    assert first[6] == second[6] == "completed"
    assert res.totals.preemptions == 0
    assert res.totals.recomputed_tokens == 0
    assert second[4] > first[5]  # its first token comes after the first request has finished
