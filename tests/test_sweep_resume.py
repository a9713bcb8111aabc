"""``fleetsim sweep --resume``: a sweep stopped after some points keeps them in its output
folder's cache; ``--resume`` simulates only the others and writes the same sweep.parquet as an
uninterrupted sweep (same numbers, same order). The final files stay all or nothing."""

from __future__ import annotations

import json
import os
import signal

import pyarrow.parquet as pq
import pytest
from conftest import SMALL, merge
from test_plan_sweep import _toml

from fleetsim.apps import executors, sweep
from fleetsim.apps.cli import Interrupted
from fleetsim.apps.cli import main as cli_main
from fleetsim.results.output import SWEEP_CACHE_NAME

BASE = merge(
    SMALL, simulation={"hours": 1}, traffic=dict(SMALL["traffic"], requests_per_day=48_000)
)
GRID = [
    "--grid",
    "fleet.replicas=[1, 2, 3]",
    "--grid",
    'fleet.router=["round_robin", "least_loaded"]',
]


class _Counted:
    """``run_task`` that counts its calls and, after ``stop_after`` of them, stops the sweep as
    a SIGINT would (the CLI's Interrupted exception)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: list[dict] = []
        self.stop_after = stop_after
        self.real = executors.run_task

    def __call__(self, scenario: dict, source: str):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise Interrupted(signal.SIGINT)
        self.calls.append(scenario)
        return self.real(scenario, source)


def _sweep(scen, out, *extra: str) -> int:
    return cli_main(
        ["sweep", str(scen), *GRID, "--workers", "1", "--out", str(out), "--quiet", *extra]
    )


def _data(path) -> object:
    return pq.read_table(path).replace_schema_metadata(None)  # (wall_s differs)


def test_resume_reruns_only_the_missing_points(tmp_path, monkeypatch, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(BASE))
    whole = _Counted()
    monkeypatch.setattr(sweep, "run_task", whole)
    assert _sweep(scen, tmp_path / "whole") == 0
    assert len(whole.calls) == 6
    assert sorted(os.listdir(tmp_path / "whole")) == [".fleetsim-manifest.json", "sweep.parquet"]

    out = tmp_path / "cut"
    cut = _Counted(stop_after=4)
    monkeypatch.setattr(sweep, "run_task", cut)
    capsys.readouterr()
    assert _sweep(scen, out) == 130
    err = capsys.readouterr().err
    assert "its 4 finished points are kept in .fleetsim-sweep-cache/" in err
    assert "rerun with --resume" in err
    # no sweep.parquet, no lock, no staging folder: only the 4 finished points
    assert os.listdir(out) == [SWEEP_CACHE_NAME]
    entries = sorted(os.listdir(out / SWEEP_CACHE_NAME))
    assert len(entries) == 4 and all(len(e) == 64 + 5 and e.endswith(".json") for e in entries)

    # without --resume (or --force) the folder is refused in one line that names the fix
    assert _sweep(scen, out) == 2
    err = capsys.readouterr().err
    assert "holds the finished points of an interrupted sweep" in err
    assert "--resume" in err and len(err.strip().splitlines()) == 1

    resumed = _Counted()
    monkeypatch.setattr(sweep, "run_task", resumed)
    assert _sweep(scen, out, "--resume") == 0
    assert len(resumed.calls) == 2  # points 5 and 6 only
    assert [c["fleet"]["replicas"] for c in resumed.calls] == [3, 3]
    assert _data(out / "sweep.parquet").equals(_data(tmp_path / "whole" / "sweep.parquet"))
    # a clean finish removes the cache: the folder is a sweep's, as without --resume
    assert sorted(os.listdir(out)) == [".fleetsim-manifest.json", "sweep.parquet"]


def test_resume_ignores_points_of_another_grid_and_without_cache_is_a_normal_run(
    tmp_path, monkeypatch
):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(BASE))
    out = tmp_path / "o"
    # --resume into a new folder: a normal run
    counted = _Counted()
    monkeypatch.setattr(sweep, "run_task", counted)
    assert _sweep(scen, out, "--resume") == 0
    assert len(counted.calls) == 6
    # an interrupted sweep of the same points with another seed: its points are not reused
    cut = _Counted(stop_after=3)
    monkeypatch.setattr(sweep, "run_task", cut)
    assert _sweep(scen, out, "--force", "--set", "seed=99") == 130
    assert len(os.listdir(out / SWEEP_CACHE_NAME)) == 3
    again = _Counted()
    monkeypatch.setattr(sweep, "run_task", again)
    assert _sweep(scen, out, "--force", "--resume") == 0
    assert len(again.calls) == 6
    assert not (out / SWEEP_CACHE_NAME).exists()


def test_resume_refuses_a_link_and_skips_a_bad_entry(tmp_path, monkeypatch, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(BASE))
    out = tmp_path / "o"
    cut = _Counted(stop_after=2)
    monkeypatch.setattr(sweep, "run_task", cut)
    assert _sweep(scen, out) == 130
    cache = out / SWEEP_CACHE_NAME
    first, second = sorted(cache.iterdir())
    # an entry that is not fleetsim's JSON counts as missing: its point runs again
    first.write_text("not json")
    doc = json.loads(second.read_text())
    assert set(doc) == {"fleetsim", "key", "row"} and doc["key"] == second.stem
    counted = _Counted()
    monkeypatch.setattr(sweep, "run_task", counted)
    assert _sweep(scen, out, "--resume") == 0
    assert len(counted.calls) == 5
    # a link in the cache's place is refused in one line, and its target is untouched
    assert _sweep(scen, tmp_path / "p", "--set", "seed=5") == 0
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.mkdir(tmp_path / "q")
    os.symlink(target, tmp_path / "q" / SWEEP_CACHE_NAME)
    capsys.readouterr()
    monkeypatch.setattr(sweep, "run_task", _Counted())
    assert _sweep(scen, tmp_path / "q", "--resume") == 2
    err = capsys.readouterr().err
    assert "is not the folder fleetsim keeps a sweep's finished points in" in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(target) == []


@pytest.mark.parametrize("flag", ["--resume"])
def test_resume_in_help(flag, capsys):
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["--help"])
    assert flag in capsys.readouterr().out


def test_resume_after_a_kill_clears_its_leftovers(tmp_path, monkeypatch):
    """What a SIGKILL leaves (the lock file, the dead process's staging folder, a half-written
    cache entry under its temporary name) does not stop --resume, and is gone after it."""
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(BASE))
    out = tmp_path / "o"
    monkeypatch.setattr(sweep, "run_task", _Counted(stop_after=5))
    assert _sweep(scen, out) == 130
    dead = 2**22 + 12345  # (above the default pid_max: no such process)
    (out / ".fleetsim-lock").write_text(str(dead))
    (out / f".fleetsim-tmp-{dead}-0badc0de").mkdir()
    (out / SWEEP_CACHE_NAME / f".fleetsim-tmp-{dead}-{'0' * 64}.json.x").write_text("{")
    counted = _Counted()
    monkeypatch.setattr(sweep, "run_task", counted)
    assert _sweep(scen, out, "--resume") == 0
    assert len(counted.calls) == 1
    assert sorted(os.listdir(out)) == [".fleetsim-manifest.json", "sweep.parquet"]
