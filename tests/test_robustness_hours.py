"""An iteration longer than one hour (issue #16 item 14).

On a slow device (the CPU profile in tests/data, see SOURCE.md) one prefill of 16,000 tokens
takes over an hour. Its busy time, energy, FLOPs and bytes must go to every hour it overlaps,
by the share of its time in each; before the fix the part after the first boundary all went to
the next hour, which then had more than 3,600 busy seconds ("utilization above 1").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetsim.apps import cli
from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

DATA = Path(__file__).resolve().parent / "data"
PROFILE = DATA / "cpu-quick-llama-3.1-8b.json"


def _scenario(tmp_path: Path, arrival_s: float, prompt: int, hours: int) -> dict:
    (tmp_path / "t.csv").write_text(
        f"arrival_s,prompt_tokens,output_tokens\n{arrival_s},{prompt},1\n"
    )
    return {
        "name": "long-iteration",
        "seed": 1,
        "simulation": {"hours": hours, "engine": "iteration"},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm", "profile": str(PROFILE)},
        "fleet": {"replicas": 1, "max_batch_size": 8, "max_batched_tokens": 16384},
        "traffic": {"trace": str(tmp_path / "t.csv"), "diurnal": "flat"},
        "power": {"pue": 1.0},
    }


@pytest.mark.parametrize("engine", ["iteration", "macro"])
def test_an_iteration_spanning_several_hours_is_split_by_time(tmp_path, engine):
    d = _scenario(tmp_path, arrival_s=3000.0, prompt=16000, hours=5)
    d["simulation"]["engine"] = engine
    rs = resolve(scenario_from_dict(d))
    t_prefill = rs.latency_model().prefill_time(16000)
    end = 3000.0 + t_prefill
    assert 2 * 3600 + 600 < end < 3 * 3600  # one iteration over hours 0, 1 and 2
    res = simulate(rs)
    busy = res.hourly.column("gpu_busy_s").to_pylist()
    expect = [max(0.0, min(end, (g + 1) * 3600.0) - max(3000.0, g * 3600.0)) for g in range(5)]
    assert expect[:2] == [600.0, 3600.0] and expect[3:] == [0.0, 0.0]
    assert busy[:2] == pytest.approx(expect[:2], rel=1e-9)
    # (+ the one decode step of the single output token, a fraction of a second, after the end)
    assert 0 <= busy[2] - expect[2] < 5.0 and busy[3:] == [0.0, 0.0]
    assert sum(busy) == pytest.approx(t_prefill, abs=5.0)
    util = res.hourly.column("utilization").to_pylist()
    assert max(util) <= 1.0 + 1e-12 and util[1] == pytest.approx(1.0)
    # energy follows the busy time: the dynamic energy per busy second is the same in each hour
    dyn = res.hourly.column("energy_gpu_dynamic_kwh").to_pylist()
    assert dyn[0] / busy[0] == pytest.approx(dyn[1] / busy[1], rel=1e-9)
    assert dyn[2] / busy[2] == pytest.approx(dyn[1] / busy[1], rel=1e-3)


def test_the_reported_repro_runs(tmp_path, capsys):
    """The command of the issue (default scenario, CPU profile, 2,000 requests a day), cut to
    6 hours: exit 0 instead of "invariant violated: utilization above 1"."""
    root = Path(__file__).resolve().parent.parent
    rc = cli.main(
        [
            "run",
            str(root / "scenarios" / "default.toml"),
            "--set",
            f'hardware.profile="{PROFILE}"',
            "--set",
            'model.name="llama-3.1-8b"',
            "--set",
            "fleet.tensor_parallel=1",
            "--set",
            "fleet.max_batch_size=8",
            "--set",
            "fleet.max_batched_tokens=16384",
            "--set",
            "traffic.requests_per_day=2000",
            "--set",
            "simulation.hours=6",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "o" / "hourly.parquet")
    assert max(t.column("utilization").to_pylist()) <= 1.0 + 1e-9
