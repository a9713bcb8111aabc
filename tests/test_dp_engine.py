"""The engine's data-parallel replica with one scheduler per rank (serving/ranks.py): requests
bound to a rank on arrival by vLLM's rule, per-rank slots and token budgets, and an iteration
with prompt tokens timed at dp x the fullest rank's tokens."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import resolved

from fleetsim.base.errors import ScenarioError
from fleetsim.serving.pod import Pod
from fleetsim.serving.request import Request

P = 1500  # prompt tokens


class _Sink:
    """Every completed request: rank, first-token and finish times."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, float, float, int]] = {}

    def add(self, r, replica, finish_s, ttft, tpot, e2e, status) -> None:
        assert status == "completed"
        self.rows[r.rid] = (r.rank, r.first_token_s, finish_s, r.out)


def _scenario(tmp_path, reqs, dp: int = 2, max_batch: int = 2, **fleet) -> dict:
    """Mixtral-8x7B on ``dp`` H100s (expert parallel, one GPU per rank), the requests ``reqs``
    ((arrival_s, prompt, output) each) as a trace."""
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in reqs)
    )
    return {
        "seed": 1,
        "model": {"name": "mixtral-8x7b"},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {
            "replicas": 1,
            "tensor_parallel": 1,
            "data_parallel": dp,
            "expert_parallel": True,
            "max_batch_size": max_batch,
            "max_batched_tokens": 16384,
            **fleet,
        },
        "traffic": {"trace": str(trace), "diurnal": "flat"},
        "simulation": {"hours": 1},
        "slo": {"ttft_s": 1e5, "tpot_s": 1e5},
    }


def _run(d: dict) -> tuple[Pod, _Sink]:
    sink = _Sink()
    pod = Pod(resolved(d), 0, 1, request_sink=sink)
    pod.run()
    return pod, sink


def test_hand_count_one_rank_prefills_while_the_other_decodes(tmp_path):
    """2 ranks, 1 slot each; requests of outputs 1, 3, 2 at t = 0 go to ranks 0, 1, 0 (the
    third: both ranks at 4 x 0 + 1, the lower index). Step 1: both ranks prefill (t_pad = 2 P);
    request 0 ends at its first token. Step 2: rank 0 prefills request 2 while rank 1's request 1
    decodes one token: every rank runs rank 0's P tokens (t_pad = 2 P), where the merged
    scheduler pads to P + 1 on each rank (dp_padded_tokens). Step 3: both decode and finish."""
    d = _scenario(tmp_path, [(0, P, 1), (0, P, 3), (0, P, 2)])
    pod, sink = _run(d)
    lat = pod.lat
    assert lat.dp == 2 and lat.dp_padded_tokens(P, 1, 1) == 2 * P + 2
    s1 = lat.iteration(2 * P, 2.0 * P * P, 2, 0, 0.0, 2 * P)[0]
    s2 = lat.iteration(P, 1.0 * P * P, 1, 1, P + 1.0, 2 * P)[0]
    # step 3's context: request 1 at P + 2, request 2 (joined a step later) at P + 1
    s3 = lat.decode_step(2, 2.0 * P + 3)[0]
    rows = sink.rows
    assert [rows[i][0] for i in range(3)] == [0, 1, 0]
    assert rows[0][1:3] == (s1, s1)
    assert rows[1][1] == s1 and rows[2][1] == s1 + s2
    assert rows[1][2] == pytest.approx(s1 + s2 + s3, rel=1e-12)
    assert rows[2][2] == rows[1][2]
    assert sum(pod.rec.output_tokens) == 6
    _, ms = _run({**d, "fleet": {**d["fleet"], "dp_scheduler": "merged"}})
    assert ms.rows[2][1] == s1 + lat.iteration(P, 1.0 * P * P, 1, 1, P + 1.0)[0] != rows[2][1]


def test_a_full_rank_keeps_its_request_waiting_while_the_other_rank_idles(tmp_path):
    """2 ranks, 1 slot each: request 2 is bound to rank 0 on arrival, behind request 0 (40
    tokens). Request 1 leaves rank 1 empty after its first token, but request 2 waits for
    rank 0 (vLLM binds on arrival, no migration): its first token comes after request 0's last.
    The merged scheduler admits it into the second step."""
    d = _scenario(tmp_path, [(0, P, 40), (0, P, 1), (0, P, 1)])
    _, sink = _run(d)
    rows = sink.rows
    assert [rows[i][0] for i in range(3)] == [0, 1, 0]
    assert rows[2][1] > rows[0][2] > rows[1][2]
    _, ms = _run({**d, "fleet": {**d["fleet"], "dp_scheduler": "merged"}})
    assert ms.rows[2][1] < ms.rows[0][2]


def test_the_rank_rule_weighs_waiting_four_times(tmp_path):
    """vLLM's get_core_engine_for_request: the lowest 4 x waiting + running, the lowest index
    on a tie. Rank 0 with 3 running beats rank 1 with 1 running and 1 waiting (3 < 5), which a
    plain count (3 > 2) would not."""
    d = _scenario(tmp_path, [(0, P, 1)], max_batch=8)
    rep = Pod(resolved(d), 0, 1).replicas[0]
    assert (rep.ranks, rep.rcap, rep.rtok) == (2, 4, 8192)
    rep.rrun = [3, 1]
    assert rep.rank_for() == 1
    r = Request(99, 0.0, P, 5)
    r.rank = 1
    rep.waiting.append(r)
    assert len(rep.waiting) == 1 and list(rep.waiting) == [r]
    assert rep.rank_for() == 0
    rep.rrun = [5, 1]  # 5 = 4 x 1 + 1: the tie goes to rank 0
    assert rep.rank_for() == 0


def test_tokens_are_conserved_and_the_modes_agree(tmp_path, monkeypatch):
    """4 ranks of 4 slots with 1,024-token budgets (prompts of up to 3,000 tokens are chunked),
    300 requests over a minute: no iteration puts more than 4 requests or 1,024 tokens on a
    rank, and some iteration fills a rank's budget (t_pad 4 x 1,024); every request finishes with
    the tokens it asked for, every rank ends empty, and the macro engine (runs cut where a
    rank's head could join) gives the per-iteration engine's first-token and finish times."""
    from fleetsim.serving.ranks import RankedPagedKV

    seen = []
    planned = RankedPagedKV._planned

    def checked(self):
        planned(self)
        assert max(self.rrun) <= self.rcap and min(self.rb) >= 0
        seen.append(self.tpad)

    monkeypatch.setattr(RankedPagedKV, "_planned", checked)
    rng = np.random.default_rng(5)
    reqs = [
        (round(float(a), 4), int(p), int(o))
        for a, p, o in zip(
            np.sort(rng.uniform(0, 60, 300)),
            rng.integers(50, 3000, 300),
            rng.integers(1, 120, 300),
            strict=True,
        )
    ]
    d = _scenario(tmp_path, reqs, dp=4, max_batch=16, max_batched_tokens=4096)
    pod, sink = _run(d)
    rows = sink.rows
    assert len(rows) == 300
    assert sum(pod.rec.output_tokens) == sum(o for _, _, o in reqs)
    assert sum(pod.rec.prompt_tokens) == sum(p for _, p, _ in reqs)
    assert sorted({v[0] for v in rows.values()}) == [0, 1, 2, 3]
    rep = pod.replicas[0]
    assert rep.rrun == [0, 0, 0, 0] and not rep.waiting and rep.n == 0
    assert max(seen) == 4 * 1024
    it_d = {**d, "simulation": {**d["simulation"], "engine": "iteration"}}
    _, it_sink = _run(it_d)
    for rid, v in rows.items():
        w = it_sink.rows[rid]
        assert v[0] == w[0]
        assert v[1] == pytest.approx(w[1], rel=1e-9) and v[2] == pytest.approx(w[2], rel=1e-9)


def test_max_batch_size_must_split_over_the_ranks(tmp_path):
    """A max_batch_size that data_parallel does not divide is refused, naming the field; the
    merged scheduler takes it; per-rank needs paged KV and binds requests itself (no central
    queue)."""
    d = _scenario(tmp_path, [(0, P, 1)], max_batch=3)
    with pytest.raises(ScenarioError, match=r"fleet\.max_batch_size = 3: .*does not divide"):
        resolved(d)
    resolved({**d, "fleet": {**d["fleet"], "dp_scheduler": "merged"}})
    with pytest.raises(ScenarioError, match=r"fleet\.router = 'central_queue'"):
        resolved({**d, "fleet": {**d["fleet"], "max_batch_size": 4, "router": "central_queue"}})


@pytest.mark.slow
def test_the_engine_reproduces_the_reference_model_on_a_dp_row():
    """Qwen3-Coder-480B-FP8 on 4 B200 (DP4) at 8 sequences, as the harness runs it: the engine
    gives calibrate/dp_ranks.py's per-rank figures (tokens/s, window batch 7.6 of 8 where 7.45
    was measured, median step) within 0.5 % (their context counts differ by a token per
    sequence)."""
    from fleetsim.calibrate import dp_ranks as D
    from fleetsim.calibrate import mlenergy as M

    c = M.find_config(
        "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8", "B200", 4, 8, "sourcegraph-fim", dp=4
    )
    run = M.simulate_config(c, engine="iteration")
    ref = D.simulate_row(c)
    assert run.error == ""
    assert run.tokens / run.window_s == pytest.approx(ref.tokens_per_s, rel=5e-3)
    assert run.avg_batch == pytest.approx(ref.avg_batch, rel=5e-3)
    assert run.itl_median_s == pytest.approx(ref.itl_median_s, rel=5e-3)
    assert run.avg_batch < 7.7


def test_the_ranked_replica_keeps_the_core_slot_layout():
    """The per-rank replica is the paged policy with the rank methods before it, and adds no
    instance dictionary (its state lives in the core's slots: a misspelt attribute fails)."""
    from fleetsim.serving.core import ReplicaCore
    from fleetsim.serving.kv_paged import PagedKV
    from fleetsim.serving.ranks import RankedPagedKV
    from fleetsim.serving.roles import RankedPagedReplica

    mro = RankedPagedReplica.__mro__
    assert mro.index(RankedPagedKV) < mro.index(PagedKV) < mro.index(ReplicaCore)
    assert "__dict__" not in dir(RankedPagedReplica)


@pytest.mark.parametrize(
    ("tp", "dp", "ep", "shape"),
    [
        (1, 2, True, "1 replica(s) x (TP1 x DP2) EP2 = 2 x"),
        (2, 1, False, "1 replica(s) x TP2 = 2 x"),
    ],
)
def test_the_summary_names_the_replicas_tensor_and_data_parallel_split(tmp_path, tp, dp, ep, shape):
    """The run's headline gives a data-parallel replica's shape (tensor x data parallel, and
    expert parallelism), not its GPU count as a tensor-parallel degree."""
    import io

    from rich.console import Console

    from fleetsim.apps.simulate import simulate
    from fleetsim.results.summary import print_summary

    reqs = [(0.0, 100, 4), (0.0, 100, 4)]
    d = _scenario(tmp_path, reqs, dp=dp, tensor_parallel=tp, expert_parallel=ep)
    res = simulate(resolved(d))
    c = Console(file=io.StringIO(), width=240, color_system=None)
    print_summary(res, c)
    out = c.file.getvalue()  # type: ignore[attr-defined]
    assert shape in out and "h100-sxm" in out
