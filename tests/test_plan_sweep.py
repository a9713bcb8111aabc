"""Capacity planning and sweeps: the planner's answer against independent runs, sweep grids,
and results that do not depend on the executor or the number of workers."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, merge, tables_equal

from fleetsim.apps.cli import main as cli_main
from fleetsim.apps.executors import make_executor
from fleetsim.apps.plan_search import search_min
from fleetsim.apps.simulate import simulate
from fleetsim.apps.sweep import RESULT_COLUMNS, grid_points, parse_grid, run_sweep, split_values
from fleetsim.base.errors import UserError
from fleetsim.base.version import __version__
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.results.output import read_metadata

# Llama-3.1-70B on TP4 H100s, one flat hour at 4.6 requests/s: 3 replicas meet p99 TTFT <= 1 s
# (0.92 s), 2 do not (1.11 s). TP2 holds the weights (2 x 81,559 MiB x 0.9 = 153.9 GB > 141.1 GB)
# but its ~39k-token KV budget meets the SLO at no replica count: infeasible.
PLAN = {
    "name": "plan-small",
    "seed": 3,
    "simulation": {"hours": 1},
    "model": {"name": "llama-3.1-70b"},
    "hardware": {"gpu": "h100-sxm"},
    "fleet": {"replicas": 1, "tensor_parallel": 4},
    "traffic": {
        "requests_per_day": 400_000,
        "diurnal": "flat",
        "prompt": {"dist": "lognormal", "median": 1020, "sigma": 0.985, "min": 2, "max": 14050},
        "output": {"dist": "lognormal", "median": 129, "sigma": 0.859, "min": 7, "max": 1000},
    },
    "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
}

SWEEP_BASE = merge(
    SMALL, simulation={"hours": 1}, traffic=dict(SMALL["traffic"], requests_per_day=48_000)
)
SWEEP_GRID = ["fleet.replicas=1,2", 'fleet.router="round_robin","least_loaded"']


def _meets_slo(res, ttft_s: float, tpot_s: float) -> bool:
    ttft = res.hourly.column("ttft_p99_s").to_numpy()
    tpot = res.hourly.column("tpot_p99_s").to_numpy()
    return bool(
        np.all(ttft <= ttft_s) and np.all(tpot <= tpot_s) and res.totals.requests_rejected == 0
    )


def test_plan_answer_meets_slo_and_one_fewer_fails(tmp_path):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(PLAN))
    out = tmp_path / "plan"
    rc = cli_main(
        [
            "plan",
            str(scen),
            "--gpus",
            "h100-sxm",
            "--tp",
            "2,4",
            "--workers",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    rows = pq.read_table(out / "plan.parquet").to_pylist()
    assert [r["status"] for r in rows if r["tensor_parallel"] == 2] == ["infeasible"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["tensor_parallel"] for r in ok] == [4] and ok[0]["rank"] == 1
    best = ok[0]
    n = best["replicas"]
    assert n >= 2 and best["gpus"] == 4 * n and best["lower_bound_replicas"] <= n
    assert best["below_passes"] is False
    assert math.isclose(best["total_cost_usd"], best["energy_cost_usd"] + best["hardware_cost_usd"])
    # independent runs of the scenario, as a user would run them
    at_n = simulate(scenario_from_dict(merge(PLAN, fleet={"replicas": n, "tensor_parallel": 4})))
    below = simulate(
        scenario_from_dict(merge(PLAN, fleet={"replicas": n - 1, "tensor_parallel": 4}))
    )
    assert _meets_slo(at_n, 1.0, 0.1)
    assert not _meets_slo(below, 1.0, 0.1)
    assert best["total_cost_usd"] == at_n.totals.total_cost_usd  # same seed, same scenario
    sched = json.loads((out / "schedule.json").read_text())
    assert sched["gpu"] == "h100-sxm" and sched["tensor_parallel"] == 4
    assert len(sched["replicas_by_hour"]) == 24
    assert all(isinstance(x, int) and 1 <= x <= n for x in sched["replicas_by_hour"])
    _check_provenance(out / "plan.parquet", scen, PLAN["seed"])


def _check_provenance(path, scen, seed: int) -> None:
    """The file says which fleetsim, scenario, seed and profile made it."""
    md = read_metadata(path)
    assert md["fleetsim.version"] == __version__
    assert md["fleetsim.scenario_text"] == scen.read_text()
    assert json.loads(md["fleetsim.config"])["seed"] == seed
    assert md["fleetsim.seed"] == str(seed)
    rs = resolve(scenario_from_dict(json.loads(md["fleetsim.config"])))
    assert md["fleetsim.profile_id"] == rs.profile_id != ""
    assert md["fleetsim.profile_sha256"] == rs.profile_sha256  # "" for a catalog profile


def test_search_min_finds_the_threshold_in_logarithmic_rounds():
    """The galloping/k-section search against known monotone predicates."""
    for threshold in (1, 2, 7, 40, 333):
        for start in (1, 5, 300):
            for workers in (1, 2, 4):
                rounds = []

                def test(ns, t=threshold, rounds=rounds, workers=workers):
                    rounds.append(len(ns))
                    assert len(ns) <= workers
                    return [n >= t for n in ns]

                assert search_min(test, start, workers) == threshold
                assert len(rounds) <= 2 * (math.log2(abs(threshold - start) + 2) + 2)
    assert search_min(lambda ns: [False] * len(ns), 3, 2, cap=50) is None  # infeasible


def test_plan_errors(tmp_path):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(PLAN))
    with pytest.raises(UserError, match="--gpus 'h1OO'"):
        from fleetsim.apps.plan import main

        main([str(scen), "--gpus", "h1OO", "--out", str(tmp_path / "x")])
    assert cli_main(["plan", str(scen), "--tp", "two", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------
def test_sweep_identical_across_workers():
    axes = parse_grid(SWEEP_GRID)
    with make_executor("local", 1) as ex:
        one = run_sweep(SWEEP_BASE, axes, "", ex)
    with make_executor("local", 2) as ex:
        two = run_sweep(SWEEP_BASE, axes, "", ex)
    assert one.num_rows == 4 and tables_equal(one, two)
    assert one.column("fleet.replicas").to_pylist() == [1, 1, 2, 2]
    assert one.column("fleet.router").to_pylist() == ["round_robin", "least_loaded"] * 2
    # common random numbers: every point sees the same arrivals
    assert len(set(one.column("requests").to_pylist())) == 1
    # twice the replicas (owned) -> twice the hardware cost
    hw = one.column("hardware_cost_usd").to_pylist()
    assert math.isclose(hw[2], 2 * hw[0])


def test_sweep_identical_with_ray():
    pytest.importorskip("ray")
    axes = parse_grid(SWEEP_GRID)
    with make_executor("local", 1) as ex:
        one = run_sweep(SWEEP_BASE, axes, "", ex)
    with make_executor("ray", 2) as ex:
        ray_t = run_sweep(SWEEP_BASE, axes, "", ex)
    assert tables_equal(one, ray_t)


def test_sweep_cli(tmp_path):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(SWEEP_BASE))
    out = tmp_path / "sw"
    assert (
        cli_main(
            [
                "sweep",
                str(scen),
                "--grid",
                "fleet.replicas=1,2",
                "--workers",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    t = pq.read_table(out / "sweep.parquet")
    assert t.column("fleet.replicas").to_pylist() == [1, 2]
    assert t.schema.names[1:5] == ["status", "problem", "requests", "requests_completed"]
    assert t.column("status").to_pylist() == ["ok", "ok"]
    assert t.column("problem").to_pylist() == [None, None]
    _check_provenance(out / "sweep.parquet", scen, SWEEP_BASE["seed"])


def test_sweep_keeps_the_points_that_do_not_fit_as_rows(tmp_path, capsys):
    """A grid of model x TP on H100s where three points cannot run: Llama-3.1-70B's 141.1 GB of
    weights at TP1 (76.5 GB usable: 85.03 GB x 0.9) do not fit, and TP3 divides neither
    model's heads (32 and 64). They are rows with their reason, as ``fleetsim plan`` keeps such
    candidates; the one point that fits is simulated as in a sweep without the others."""
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(SWEEP_BASE))
    out = tmp_path / "sw"
    grid = ['model.name=["llama-3.1-8b", "llama-3.1-70b"]', "fleet.tensor_parallel=[1, 3]"]
    argv = ["sweep", str(scen), "--workers", "1", "--out", str(out), "--json"]
    assert cli_main([*argv, "--grid", grid[0], "--grid", grid[1]]) == 0
    doc = json.loads(capsys.readouterr().out)
    t = pq.read_table(out / "sweep.parquet")
    assert t.schema.names[:4] == ["model.name", "fleet.tensor_parallel", "status", "problem"]
    assert t.column("status").to_pylist() == [
        "ok",
        "not accepted",
        "does not fit",
        "not accepted",
    ]
    problems = t.column("problem").to_pylist()
    assert problems[0] is None
    assert problems[1] == (
        "not accepted: does not divide llama-3.1-8b's 32 attention heads "
        "(fix: use one of 1, 2, 4, 8, 16, 32)"
    )
    assert problems[2].startswith(
        "does not fit: llama-3.1-70b weights need 141.1 GB but a replica has 76.5 GB usable "
        "(1 x 85 GB x 0.9); 64.6 GB missing (fix: set fleet.tensor_parallel = 2 "
    )
    assert problems[3].startswith("not accepted: does not divide llama-3.1-70b's 64 attention")
    rows = t.to_pylist()
    assert all(r["requests"] is None and r["total_cost_usd"] is None for r in rows[1:])
    assert [p["status"] for p in doc["points"]] == t.column("status").to_pylist()
    assert doc["points"][2]["problem"] == problems[2] and doc["points"][2]["requests"] is None
    # the point that fits, exactly as a sweep of it alone
    with make_executor("local", 1) as ex:
        alone = run_sweep(SWEEP_BASE, parse_grid(['model.name=["llama-3.1-8b"]']), "", ex)
    assert alone.column("status").to_pylist() == ["ok"]
    assert rows[0]["requests"] > 0
    assert {k: rows[0][k] for k in RESULT_COLUMNS} == {
        k: alone.to_pylist()[0][k] for k in RESULT_COLUMNS
    }
    # the terminal: a status column, blank figures, the reasons after the table
    assert cli_main([*argv[:-1], "--force", "--grid", grid[0], "--grid", grid[1]]) == 0
    text = capsys.readouterr().out
    assert "4 points, 3 not simulated (why: below the table)" in text
    assert (
        "requests, GPU-h, kWh and $ are over the simulated 1 h (simulation.hours), not a day"
        in (text)
    )
    assert (
        "  model.name=llama-3.1-70b fleet.tensor_parallel=1: does not fit: llama-3.1-70b "
        "weights need 141.1 GB" in text
    )
    line = next(x for x in text.splitlines() if "llama-3.1-70b" in x and "does not fit" in x)
    blank = ["│"] * 13  # the 12 figures' cells, empty
    assert line.split() == ["│", "llama-3.1-70b", "│", "1", *blank, "does", "not", "fit", "│"]


def test_grid_parsing_and_validation(tmp_path):
    assert split_values("1,2, 3") == ["1", "2", "3"]
    assert split_values('"a,b",[1,2],{x=1,y=2}') == ['"a,b"', "[1,2]", "{x=1,y=2}"]
    assert grid_points(parse_grid(["a.b=1,2", "c.d=x"])) == [["a.b=1", "c.d=x"], ["a.b=2", "c.d=x"]]
    for bad, msg in (
        (["fleet.replicas"], "expected section.key=v1"),
        (["fleet.replicas=1,,2"], "empty value"),
        (["fleet.replicas=1", "fleet.replicas=2"], "given twice"),
        ([], "no --grid"),
    ):
        with pytest.raises(UserError, match=msg):
            parse_grid(bad)
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(SWEEP_BASE))
    from fleetsim.apps.sweep import main

    # one bad point among good ones: a clear error before anything runs, naming the point
    with pytest.raises(UserError, match=r"sweep point fleet.replicas=0: .*fleet.replicas = 0"):
        main([str(scen), "--grid", "fleet.replicas=1,0", "--out", str(tmp_path / "o")])
    # a grid none of whose points fits is refused (a point that does not fit among others
    # that do is a row: test_sweep_keeps_the_points_that_do_not_fit_as_rows)
    with pytest.raises(UserError, match=r"fleet.tensor_parallel = 1: llama-3.1-70b weights need"):
        main([str(scen), "--grid", 'model.name="llama-3.1-70b"', "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match=r"none of the 2 points can be simulated; the first: .*"):
        main(
            [
                str(scen),
                "--grid",
                'model.name="llama-3.1-70b"',
                "--grid",
                "fleet.tensor_parallel=1,3",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(UserError, match=r"fleet\.replcas.*did you mean 'replicas'"):
        main([str(scen), "--grid", "fleet.replcas=1", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def _toml(d: dict) -> str:
    """A small TOML writer for the test scenarios (tables of scalars and inline tables)."""

    def val(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    top = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    secs = [
        f"[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items())
        for k, v in d.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top + secs) + "\n"
