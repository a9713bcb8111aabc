"""``fleetsim report``: the four plots and the page, from memory and from disk, and the
peak-hour analysis (its marginal cost re-simulates the flat day)."""

from __future__ import annotations

import json

import pytest
from conftest import merge, resolved

from fleetsim.apps.report import PLOTS, _from_result, main, peak_analysis, write_report
from fleetsim.apps.simulate import simulate, write_outputs
from fleetsim.base.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import SMALL

    d = merge(
        SMALL,
        simulation={"hours": 3},
        fleet={"replicas": 2},
        traffic={"requests_per_day": 40_000, "diurnal": "azure-code"},
        cost={"hardware": "rented"},
        autoscaler={"policy": "schedule", "replicas_by_hour": [2, 1, 1] * 8},
    )
    res = simulate(resolved(d))
    out = tmp_path_factory.mktemp("run")
    write_outputs(res, out, "")
    return res, out


def _check_files(out):
    for p in PLOTS:
        data = (out / f"{p}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000, p  # axes, bars and labels, not an empty canvas
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    md = (out / "report.md").read_text()
    assert all(f"]({p}.png)" in md for p in PLOTS)
    assert not list(out.glob(".fleetsim-tmp-*"))  # atomic writes leave no temporaries


def test_report_from_result_writes_plots_and_page(run):
    res, out = run
    page = write_report(out, result=res)
    assert page == out / "report.html"
    _check_files(out)


def test_report_from_disk_and_peak_analysis(run, capsys):
    res, out = run
    assert main([str(out)]) == 0
    _check_files(out)
    a = json.loads((out / "peak.json").read_text())
    cost = res.hourly.column("total_cost_usd").to_numpy()
    arrived = res.hourly.column("requests_arrived").to_numpy()
    done = res.hourly.column("requests_completed").to_numpy()
    h = int(arrived.argmax())
    assert a["peak_hour"] == h
    assert a["peak_cost_share"] == pytest.approx(cost[h] / cost.sum(), rel=1e-12)
    assert a["peak_usd_per_request"] == pytest.approx(cost[h] / done[h], rel=1e-12)
    # the flat day re-simulated from the metadata has the same fleet and schedule: its cost is
    # the same rent plus energy, within a few percent
    assert a["flat_day_cost_usd"] == pytest.approx(cost.sum(), rel=0.05)
    assert a["marginal_cost_of_peak_usd"] == pytest.approx(
        cost.sum() - a["flat_day_cost_usd"], rel=1e-12
    )
    # the terminal line gives the figure as the page does (four decimals under a dollar: a
    # flat day within a cent of the real one printed '$ -0.00')
    m = a["marginal_cost_of_peak_usd"]
    shown = f"$ {m:,.2f}" if abs(m) >= 1 else f"$ {m:.4f}"
    assert f"marginal cost of the peak {shown} (flat day" in capsys.readouterr().out
    assert f"| marginal cost of the peak | {shown} (" in (out / "report.md").read_text()


def test_marginal_cost_under_a_dollar_keeps_its_digits():
    from fleetsim.apps.report import _marginal_usd

    assert _marginal_usd(-0.0004) == "$ -0.0004"  # the default day's 2-hour run: was '$ -0.00'
    assert _marginal_usd(0.25) == "$ 0.2500"
    assert _marginal_usd(-1234.5) == "$ -1,234.50"


def test_report_without_scenario_says_so(run):
    res, _ = run
    d = _from_result(res)
    d.config = None
    a = peak_analysis(d)
    assert a["marginal_cost_of_peak_usd"] is None and "not in the file" in a["flat_note"]


def test_flat_day_that_cannot_load_a_relative_file_names_scenario(tmp_path):
    """A run whose scenario names a file by a relative path (coding-assistant.toml's sizes):
    `fleetsim report DIR` without --scenario cannot re-simulate it and says which option fixes
    it; with the scenario's path the same failure has no such hint."""
    from conftest import SMALL

    from fleetsim.apps.report import flat_day_cost

    sizes = {"dist": "empirical", "file": "no-such-folder/sizes.csv", "column": "tokens"}
    cfg = merge(SMALL, traffic={"requests_per_day": 1000, "prompt": sizes})
    cost, note = flat_day_cost(cfg)
    assert cost is None and "could not be re-simulated here" in note
    assert "fix: fleetsim report DIR --scenario FILE" in note
    cost, note = flat_day_cost(cfg, source=str(tmp_path / "s.toml"))
    assert cost is None and "--scenario" not in note


def test_report_of_a_folder_without_a_run(tmp_path):
    with pytest.raises(UserError, match=r"no hourly\.parquet"):
        main([str(tmp_path)])


def test_flat_day_is_simulated_once_per_run(run, tmp_path, monkeypatch):
    """The flat day is kept in flat-day.json: a second report of the same run reads it (no
    simulation at all); another seed, or a damaged file, simulates again."""
    import shutil

    from fleetsim.apps import simulate as sim_mod
    from fleetsim.apps.report import FLAT_FILE

    res, src = run
    out = tmp_path / "o"
    shutil.copytree(src, out)
    (out / FLAT_FILE).unlink(missing_ok=True)
    calls = []
    real = sim_mod.simulate

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sim_mod, "simulate", counting)
    assert main([str(out)]) == 0
    first = json.loads((out / "peak.json").read_text())
    cached = json.loads((out / FLAT_FILE).read_text())
    assert len(calls) == 1 and cached["flat_day_cost_usd"] == first["flat_day_cost_usd"]
    assert first["flat_source"] == "re-simulated"
    assert main([str(out)]) == 0  # again: read from flat-day.json
    assert len(calls) == 1
    again = json.loads((out / "peak.json").read_text())
    assert again.pop("flat_source") == "read from flat-day.json"
    assert again == {k: v for k, v in first.items() if k != "flat_source"}
    # a file made for another scenario (here: another key) or unreadable is not trusted
    for bad in ({**cached, "key": "0" * 64, "flat_day_cost_usd": 1.0}, "{not json"):
        (out / FLAT_FILE).write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert main([str(out)]) == 0
        assert json.loads((out / "peak.json").read_text()) == first  # (re-simulated)
    assert len(calls) == 3
    # the same scenario text but another day cost (its data files changed): simulated again
    from fleetsim.apps.report import flat_day_cost

    cfg = json.loads(res.scenario.model_dump_json())
    day = float(res.hourly.column("total_cost_usd").to_numpy().sum())
    assert (
        flat_day_cost(cfg, cache=out / FLAT_FILE, run_cost_usd=day)[0]
        == cached["flat_day_cost_usd"]
    )
    assert len(calls) == 3  # (the file main() rewrote last is this run's: reused)
    flat_day_cost(cfg, cache=out / FLAT_FILE, run_cost_usd=day * 1.01)
    assert len(calls) == 4
    # `run --report` keeps it too: write_report with a result saves flat-day.json
    out2 = tmp_path / "o2"
    out2.mkdir()
    write_report(out2, result=res)
    assert json.loads((out2 / FLAT_FILE).read_text())["key"] == cached["key"]
    assert len(calls) == 5
