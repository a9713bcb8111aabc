"""``fleetsim plan``: a candidate on which even one sequence alone misses the TPOT target says
so (no replica count can help, and the fix), and a plan in which no candidate meets the SLO
exits with code 4 (README), its files written."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
from conftest import SMALL, merge
from test_plan_sweep import _toml

import fleetsim
from fleetsim.apps.cli import main as cli_main
from fleetsim.apps.plan import one_sequence_tpot_s
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

# Llama-3.1-8B on one H100, 0.23 requests/s: its prompts are drawn >= 4 tokens, so the fastest
# decode step a request can see is one sequence at 5 tokens of context, 7.51 ms (h100-sxm TP1);
# on TP2 it is 6.18 ms
BASE = merge(
    SMALL,
    simulation={"hours": 1},
    traffic=dict(SMALL["traffic"], requests_per_day=20_000),
    slo={"ttft_s": 2.0, "tpot_s": 0.007},
)


def _resolved(**fleet):
    return resolve(scenario_from_dict(merge(BASE, fleet=dict(BASE["fleet"], **fleet))))


def test_one_sequence_step_is_the_decode_step_of_batch_one_at_the_shortest_prompt():
    rs = _resolved()
    step = one_sequence_tpot_s(rs)
    assert step == rs.latency_model().decode_time(1, 5)  # prompt min 4, + the first output token
    assert math.isclose(step, 7.51e-3, rel_tol=1e-3)
    assert math.isclose(one_sequence_tpot_s(_resolved(tensor_parallel=2)), 6.18e-3, rel_tol=1e-3)


def test_no_request_is_faster_than_the_one_sequence_step():
    """The bound the reason rests on, against the simulator itself: every request's TPOT on 8
    replicas at 0.23 requests/s (mostly alone on its replica) is at least the step."""
    rs = _resolved(replicas=8)
    run = fleetsim.simulate(rs.scenario.model_dump(mode="json"), requests=True)
    tpot = run.requests.column("tpot_s").to_numpy(zero_copy_only=False)
    tpot = tpot[np.isfinite(tpot)]
    assert len(tpot) > 500
    step = one_sequence_tpot_s(rs)
    assert tpot.min() >= step and tpot.min() < step * 1.01  # a request alone: the step itself


def test_a_hopeless_candidate_names_the_step_and_the_fix(tmp_path, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(BASE))
    argv = ["plan", str(scen), "--gpus", "h100-sxm", "--workers", "1", "--hours", "peak"]
    argv += ["--no-schedule", "--out", str(tmp_path / "o")]
    # TP1 is hopeless (7.5 > 7.0 ms), TP2 meets the SLO: an answer, exit 0
    assert cli_main([*argv, "--tp", "1,2"]) == 0
    rows = {
        r["tensor_parallel"]: r for r in pq.read_table(tmp_path / "o" / "plan.parquet").to_pylist()
    }
    assert rows[2]["status"] == "ok"
    assert rows[1]["status"] == "infeasible"
    assert rows[1]["problem"] == (
        "even one sequence alone decodes at 7.5 ms per token on h100-sxm TP1 (its one-sequence "
        "decode step), above the TPOT SLO of 7.0 ms: no replica count can meet it (fix: a faster "
        "GPU (--gpus), more tensor parallelism (--tp), or a looser TPOT (--slo-tpot-p99-s))"
    )
    capsys.readouterr()
    # every candidate infeasible: the files are written and the exit code is 4, with one line
    assert cli_main([*argv, "--tp", "1", "--force", "--quiet"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fleetsim: plan: no candidate meets the SLO, so the exit code is 4; plan.parquet "
        "(column problem) and the lines under the table give each candidate's reason and fix"
    ]
    assert pq.read_table(tmp_path / "o" / "plan.parquet").column("status").to_pylist() == [
        "infeasible"
    ]


def test_a_candidate_that_can_make_it_keeps_the_search_reason(tmp_path):
    """A TPOT target above the one-sequence step: more replicas could help, and the reason is
    the search's (here the cap is not reached: TTFT 1 ms is what no count meets)."""
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(merge(BASE, slo={"ttft_s": 0.001, "tpot_s": 0.05})))
    assert (
        cli_main(
            [
                "plan",
                str(scen),
                "--gpus",
                "h100-sxm",
                "--tp",
                "1",
                "--workers",
                "1",
                "--hours",
                "peak",
                "--no-schedule",
                "--quiet",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 4
    )
    (row,) = pq.read_table(tmp_path / "o" / "plan.parquet").to_pylist()
    assert row["problem"].startswith("no replica count up to ")


def test_a_hopeless_decode_pool_names_its_step_and_the_fix(tmp_path, capsys):
    """The disaggregated design: a request's TPOT is its decode replica's steps, so a decode
    pool on which one sequence alone takes 7.5 ms (h100-sxm TP1) cannot meet 7 ms at any size;
    the reason names the decode pool's step and its own fix, and the plan exits 4."""
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(merge(BASE, disaggregation={"link": "infiniband-ndr"})))
    argv = ["plan", str(scen), "--designs", "disaggregated", "--workers", "1", "--hours", "peak"]
    argv += ["--no-schedule", "--quiet", "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 4
    (row,) = pq.read_table(tmp_path / "o" / "plan_disaggregated.parquet").to_pylist()
    assert row["status"] == "infeasible"
    assert row["problem"] == (
        "even one sequence alone decodes at 7.5 ms per token on h100-sxm TP1 (its one-sequence "
        "decode step), above the TPOT SLO of 7.0 ms: no replica count can meet it (fix: a faster "
        "decode GPU (--decode-gpus), more tensor parallelism in the decode pool "
        "(disaggregation.decode.tensor_parallel), or a looser TPOT (--slo-tpot-p99-s))"
    )
