"""A capacity planner's walk through plan, sweep, report and compare (brief U40): what the
report shows (the energy split, the UTC hour of the worst hours, the SLO with its units) and
the one-line answers to the mistakes a planner makes on these paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMALL, merge, resolved

from fleetsim.apps.simulate import simulate

# the day starts at 22:00 UTC, so hour index and UTC hour of day differ; one replica schedules
# off in the second hour (standby and a cold start land in the GPU idle part)
SCEN = merge(
    SMALL,
    simulation={"hours": 3, "start_utc": "2026-03-01T22:00:00Z"},
    traffic={"requests_per_day": 60_000, "diurnal": "flat"},
    power={"pue": 1.25},
    slo={"ttft_s": 1.5, "tpot_s": 0.08},
    autoscaler={"policy": "schedule", "replicas_by_hour": [2] * 22 + [2, 1]},
)


@pytest.fixture(scope="module")
def day():
    return simulate(resolved(SCEN))


# -- the report ----------------------------------------------------------------------------------
def test_power_chart_parts_are_gpu_idle_dynamic_and_overhead_times_pue(day):
    from fleetsim.apps.report import _from_result, power_parts

    d = _from_result(day)
    c = d.cols
    parts = power_parts(c)
    assert [p[0] for p in parts] == [
        "GPU idle (x PUE)",
        "GPU dynamic (x PUE)",
        "node overhead (x PUE)",
    ]
    np.testing.assert_allclose(parts[0][2], c["energy_gpu_idle_kwh"] * 1.25, rtol=1e-12)
    np.testing.assert_allclose(parts[1][2], c["energy_gpu_dynamic_kwh"] * 1.25, rtol=1e-12)
    np.testing.assert_allclose(parts[2][2], c["energy_overhead_kwh"] * 1.25, rtol=1e-9)
    np.testing.assert_allclose(sum(p[2] for p in parts), c["energy_facility_kwh"], rtol=1e-12)
    # an hourly table of an older run, without the GPU split: one GPU part
    old = {k: v for k, v in c.items() if k not in ("energy_gpu_idle_kwh", "energy_gpu_dynamic_kwh")}
    parts = power_parts(old)
    assert [p[0] for p in parts] == ["GPUs (x PUE)", "node overhead (x PUE)"]
    np.testing.assert_allclose(parts[0][2], c["energy_gpu_kwh"] * 1.25, rtol=1e-12)


def _labels_of(monkeypatch, method: str):
    """pyplot (Agg) and the list of the ``label`` each call of ``Axes.<method>`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    orig = getattr(plt.Axes, method)

    def spy(self, *a, **k):
        labels.append(k.get("label", ""))
        return orig(self, *a, **k)

    monkeypatch.setattr(plt.Axes, method, spy)
    return plt, labels


def test_power_chart_draws_the_three_parts(day, monkeypatch):
    from fleetsim.apps.report import _from_result, _plot_power

    plt, labels = _labels_of(monkeypatch, "bar")
    d = _from_result(day)
    _plot_power(plt, d, d.cols)
    assert labels == ["GPU idle (x PUE)", "GPU dynamic (x PUE)", "node overhead (x PUE)"]


def test_latency_chart_slo_lines_carry_their_units(day, monkeypatch):
    from fleetsim.apps.report import _from_result, _plot_latency

    plt, labels = _labels_of(monkeypatch, "axhline")
    d = _from_result(day)
    _plot_latency(plt, d, d.cols, d.config["slo"])
    assert labels == ["SLO 1.5 s", "SLO 80 ms"]


def test_report_page_splits_the_energy_and_names_utc_hours(day, tmp_path):
    from fleetsim.apps.report import write_report

    write_report(tmp_path, result=day, flatten=False)
    md = (tmp_path / "report.md").read_text()
    rows = dict(
        ln.strip("| ").split(" | ", 1)
        for ln in md.splitlines()
        if ln.startswith("| ") and " | " in ln
    )
    t = day.totals
    assert rows["facility energy"] == (
        f"{t.energy_facility_kwh:,.2f} kWh = (GPU idle {t.energy_gpu_idle_kwh:,.2f} + GPU dynamic "
        f"{t.energy_gpu_dynamic_kwh:,.2f} + node overhead {t.energy_overhead_kwh:,.2f}) kWh "
        "x PUE 1.25"
    )
    assert rows["SLO attainment"].endswith("of requests with TTFT <= 1.5 s and TPOT <= 80 ms")
    ttft = day.hourly.column("ttft_p99_s").to_numpy()
    i = int(np.nanargmax(ttft))
    assert rows["worst hour's p99 TTFT"] == (
        f"{ttft[i]:.3f} s at {(22 + i) % 24:02d}:00 UTC (hour {i})"
    )
    peak = json.loads((tmp_path / "peak.json").read_text())
    assert (
        peak["peak_hour_utc"]
        == f"{(22 + peak['peak_hour']) % 24:02d}:00 UTC (hour {peak['peak_hour']})"
    )


# -- mistakes: one line naming the field, the value and the fix ---------------------------------
@pytest.mark.parametrize(
    "override, line",
    [
        (  # rent is a GPU's figure, under [hardware], not [cost]
            "cost.rent_usd_per_gpu_hour=2.5",
            "cost.rent_usd_per_gpu_hour = 2.5: unknown key "
            "(fix: it belongs to [hardware]: hardware.rent_usd_per_gpu_hour)",
        ),
        (
            "fleet.gpu=h200",
            "fleet.gpu = 'h200': unknown key (fix: it belongs to [hardware]: hardware.gpu)",
        ),
        ("slo.pue=1.3", "slo.pue = 1.3: unknown key (fix: it belongs to [power]: power.pue)"),
        (  # an alias counts: vLLM's name under the wrong header
            "hardware.max_num_seqs=64",
            "hardware.max_num_seqs = 64: unknown key "
            "(fix: it belongs to [fleet]: fleet.max_num_seqs)",
        ),
        ("replicas=3", "replicas = 3: unknown key (fix: it belongs to [fleet]: fleet.replicas)"),
        # a typo still gets its near miss
        (
            "hardware.rent=2",
            "hardware.rent = 2: unknown key (fix: did you mean 'rent_usd_per_gpu_hour'?)",
        ),
    ],
)
def test_a_key_under_the_wrong_header_names_its_section(override, line):
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.loading import apply_overrides, scenario_from_dict

    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(apply_overrides(SMALL, [override]), "s.toml")
    assert str(e.value) == f"s.toml: {line}"


def test_a_key_of_the_top_level_or_a_sub_table_gets_no_section_hint():
    """``name`` is the top level's and model's; ``gpu`` under [disaggregation] is a pool's: no
    single section to name, so the known keys are listed."""
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.loading import apply_overrides, scenario_from_dict

    for override in ("fleet.name=x", 'disaggregation.gpu="h200"'):
        with pytest.raises(ScenarioError) as e:
            scenario_from_dict(apply_overrides(SMALL, [override]), "s.toml")
        assert "unknown key (fix: known keys: " in str(e.value), override


@pytest.mark.parametrize(
    "flags, line",
    [
        (["--gpus", ""], "--gpus '': empty list (fix: e.g. --gpus h100-sxm,h200)"),
        (["--tp", ""], "--tp '': empty list (fix: e.g. --tp 2,4,8)"),
        (["--tp", " , "], "--tp ' , ': empty list (fix: e.g. --tp 2,4,8)"),
        (["--tp", "0,4"], "--tp '0,4': values must be >= 1 (fix: e.g. --tp 2,4,8)"),
        (["--tp", "four"], "--tp 'four': not a list of integers (fix: e.g. --tp 2,4,8)"),
        (
            ["--designs", "both", "--decode-gpus", ""],
            "--decode-gpus '': empty list (fix: e.g. --decode-gpus h100-sxm,h200)",
        ),
        (  # a pool's GPUs on a plan that sizes no pools: was silently ignored
            ["--decode-gpus", "a100-80gb"],
            "--decode-gpus 'a100-80gb': a pool of the disaggregated design, which this plan does "
            "not size (fix: add --designs both, or leave it out)",
        ),
    ],
)
def test_plan_refuses_an_empty_or_bad_list_instead_of_the_default(flags, line, tmp_path, capsys):
    """An empty ``--gpus ''`` (an unset shell variable) used to plan the default candidates."""
    from fleetsim.apps.cli import main

    rc = main(["plan", "scenarios/default.toml", *flags, "--out", str(tmp_path / "p")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"fleetsim: error: {line}"
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "item, axes",
    [
        # bare words in an array are strings, as in the comma form and --set
        ("traffic.diurnal=[flat, azure-conv]", [("traffic.diurnal", ["flat", "azure-conv"])]),
        ('traffic.diurnal=[flat, "azure-code"]', [("traffic.diurnal", ["flat", '"azure-code"'])]),
        ("traffic.diurnal=flat,azure-conv", [("traffic.diurnal", ["flat", "azure-conv"])]),
        ("fleet.replicas=[4, 8]", [("fleet.replicas", ["4", "8"])]),
        (
            "autoscaler.replicas_by_hour=[[1, 2], [3]]",
            [("autoscaler.replicas_by_hour", ["[1, 2]", "[3]"])],
        ),
    ],
)
def test_sweep_grid_arrays(item, axes):
    from fleetsim.apps.sweep import parse_grid

    assert parse_grid([item]) == axes


@pytest.mark.parametrize(
    "item, line",
    [
        (
            "fleet.replicas=",
            "--grid 'fleet.replicas=': no values (fix: e.g. fleet.replicas=[4, 8])",
        ),
        (
            "fleet.replicas=[]",
            "--grid 'fleet.replicas=[]': an empty list (fix: e.g. fleet.replicas=[4, 8])",
        ),
        (
            "fleet.replicas=[4, 8",
            "--grid fleet.replicas=[4, 8: the array is not closed "
            "(fix: e.g. fleet.replicas=[4, 8])",
        ),
        (
            "fleet.replicas=[4,,8]",
            "--grid 'fleet.replicas=[4,,8]': an empty value (fix: remove the stray comma)",
        ),
    ],
)
def test_sweep_grid_mistakes(item, line):
    from fleetsim.apps.sweep import parse_grid
    from fleetsim.base.errors import UserError

    with pytest.raises(UserError) as e:
        parse_grid([item])
    assert str(e.value) == line


def test_report_and_compare_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    from fleetsim.apps.cli import main

    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "sweep.parquet").write_bytes(b"")
    plan = tmp_path / "pl"
    plan.mkdir()
    (plan / "plan.parquet").write_bytes(b"")
    result = tmp_path / "vllm.json"
    result.write_text('{"completed": 1}')
    run_fix = "(fix: give the --out folder of a `fleetsim run`)"
    cases = [
        (
            ["report", str(sweep)],
            f"{sweep}: a `fleetsim sweep` folder (sweep.parquet: one row per point), not a run's "
            "hours (fix: fleetsim run FILE --set KEY=VALUE --report for the point to look at)",
        ),
        (
            ["report", str(plan)],
            f"{plan}: a `fleetsim plan` folder (its candidates), not a run's hours (fix: fleetsim "
            "run FILE --set hardware.gpu=G --set fleet.tensor_parallel=T --set fleet.replicas=N "
            "--report for the candidate to look at: the plan's probe at N is that run)",
        ),
        (["report", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such folder {run_fix}"),
        (["report", str(tmp_path)], f"{tmp_path}: no hourly.parquet in it {run_fix}"),
        (
            ["compare", str(result), str(sweep)],
            f"RUN_DIR = '{result}': a JSON file, not a run's folder (fix: the run's folder first, "
            "then the vLLM result: fleetsim compare RUN_DIR VLLM_RESULT.json)",
        ),
        (["compare", str(plan), str(result)], f"RUN_DIR = '{plan}': a `fleetsim plan` folder"),
    ]
    for argv, line in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fleetsim: error: {line}"), err
        assert len(err.splitlines()) == 1


# -- the sweep's table ------------------------------------------------------------------------
def test_sweep_rows_carry_gpu_hours_the_energy_split_and_rejections(day):
    """What an autoscaling or power-state sweep changes: powered GPU-hours and the static
    (idle) energy; the rows hold the day's totals, and the terminal shows GPU-h and kWh."""
    from fleetsim.apps.executors import RunSummary
    from fleetsim.apps.sweep import RESULT_COLUMNS, SHOWN, point_row

    row = point_row(RunSummary(day.hourly, day.totals, dict(day.day_latency)))
    t = day.totals
    assert set(row) == set(RESULT_COLUMNS)
    assert row["gpu_hours"] == t.gpu_hours
    # 2 GPUs in the first hour, 1 in the second (the schedule) plus the other's 60 s cold
    # start pre-warmed before the third, 2 in the third
    assert row["gpu_hours"] == pytest.approx(2 + 1 + 60 / 3600 + 2, rel=1e-12)
    assert row["requests_rejected"] == 0
    parts = row["energy_gpu_idle_kwh"] + row["energy_gpu_dynamic_kwh"] + row["energy_overhead_kwh"]
    assert parts * 1.25 == pytest.approx(row["energy_facility_kwh"], rel=1e-12)
    assert [s[1] for s in SHOWN[:3]] == ["requests", "GPU-h", "kWh"]


# -- the plan's prices --------------------------------------------------------------------------
def test_plan_names_where_each_gpus_price_comes_from():
    """The scenario's [hardware] price is its own GPU's only; another candidate GPU is priced
    from the catalog (b200: rent $6.50/GPU-h, capex $60,000 in gpus.toml), and the line says so."""
    from fleetsim.apps.plan import Candidate, candidate_base, price_line

    data = merge(SMALL, hardware={"gpu": "h100-sxm", "rent_usd_per_gpu_hour": 2.5})
    data["cost"] = {"hardware": "rented"}

    def cands(d):
        out = []
        for g in ("h100-sxm", "b200", "h100-sxm"):
            base = candidate_base(d, g, 1, "h100-sxm")
            out.append(Candidate(gpu=g, tp=1, base=base, rs=resolved(base)))
        return out

    assert price_line(cands(data)) == (
        "hardware prices: h100-sxm $2.50/GPU-h rent (the scenario's [hardware]); "
        "b200 $6.50/GPU-h rent (catalog)"
    )
    owned = merge(data, cost={"hardware": "owned", "amortization_years": 4})
    assert price_line(cands(owned)) == (
        "hardware prices: h100-sxm $39,000 per GPU over 4 years (catalog); "
        "b200 $60,000 per GPU over 4 years (catalog)"
    )
    assert price_line([Candidate(gpu="h200", tp=3, base={}, problem="does not fit")]) == ""


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--slo-ttft-p99-s", "-1"],
            "--slo-ttft-p99-s -1: must be a positive number of seconds (fix: e.g. 2)",
        ),
        (
            ["--slo-tpot-p99-s", "nan"],
            "--slo-tpot-p99-s nan: must be a positive number of seconds (fix: e.g. 0.05 (50 ms))",
        ),
    ],
)
def test_plan_slo_flags_name_a_fix(flags, line, tmp_path, capsys):
    from fleetsim.apps.cli import main

    rc = main(["plan", "scenarios/default.toml", *flags, "--out", str(tmp_path / "p")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"fleetsim: error: {line}"


def test_report_page_says_what_was_simulated(day, tmp_path):
    from fleetsim.apps.report import write_report

    write_report(tmp_path, result=day, flatten=False)
    md = (tmp_path / "report.md").read_text().splitlines()
    line = (
        "llama-3.1-8b on 2 x h100-sxm (1 pod(s) x 2 replica(s) x TP1); 3 h from 2026-03-01 "
        "22:00 UTC, seed 7; autoscaler schedule; GPUs owned, electricity {}0.0806/kWh, PUE 1.25."
    )
    assert md[2] == line.format("\\$")
    assert f"<p>{line.format('$')}</p>" in (tmp_path / "report.html").read_text()


# -- the Python API names its own arguments, not the command line's flags ------------------------
TINY = """
name = "tiny"
[simulation]
hours = 1
[model]
name = "llama-3.1-8b"
[fleet]
replicas = 1
[traffic]
requests_per_day = 2000
diurnal = "flat"
"""


@pytest.mark.parametrize(
    "call, line",
    [
        (
            lambda f: f.sweep(TINY, {"fleet.replicas": []}),
            "sweep grid 'fleet.replicas': no values (fix: e.g. grid={'fleet.replicas': [4, 8]})",
        ),
        (
            lambda f: f.sweep(TINY, {"fleet.replicas": [1]}, workers=0),
            "workers = 0: must be a whole number >= 1, or None (fix: e.g. workers=2)",
        ),
        (
            lambda f: f.plan(TINY, gpus=["h100-sxm"], tensor_parallel=[1], workers=1.5),
            "workers = 1.5: must be a whole number >= 1, or None (fix: e.g. workers=2)",
        ),
        (
            lambda f: f.plan(TINY, gpus=["h100"], tensor_parallel=[1]),
            "gpus = 'h100': hardware.gpu = 'h100': unknown catalog name (fix: did you mean "
            "'h100-sxm'? known: a100-80gb, b200, h100-sxm, h200)",
        ),
        (
            lambda f: f.plan(TINY, slo_ttft_p99_s=-1),
            "slo_ttft_p99_s = -1: must be a positive number of seconds (fix: e.g. 2.0)",
        ),
        (
            lambda f: f.plan(TINY, slo_tpot_p99_s=0),
            "slo_tpot_p99_s = 0: must be a positive number of seconds (fix: e.g. 0.05 (50 ms))",
        ),
    ],
)
def test_api_mistakes_name_the_argument(call, line):
    import fleetsim

    with pytest.raises(fleetsim.UserError) as e:
        call(fleetsim)
    assert str(e.value) == line


def test_sweep_table_shows_a_24_hour_profile_by_its_range_and_mean():
    """A time-of-use price axis: the terminal cell is its length, range and mean (the whole
    value stays in sweep.parquet); short lists, scalars and strings are shown as written."""
    from fleetsim.apps.sweep import _grid_cell

    tou = [0.08] * 17 + [0.30] * 4 + [0.08] * 3
    assert _grid_cell(tou) == "24 values 0.08..0.3, mean 0.1167"  # (20 x 0.08 + 4 x 0.3) / 24
    assert _grid_cell(json.dumps(tou)) == "24 values 0.08..0.3, mean 0.1167"  # a mixed axis
    assert _grid_cell([1, 2]) == "[1, 2]"
    assert _grid_cell(0.08) == "0.08"
    assert _grid_cell("azure-conv") == "azure-conv"


def test_a_set_mistake_in_a_sweep_is_not_blamed_on_the_first_point():
    from fleetsim.apps.sweep import point_scenarios
    from fleetsim.base.errors import UserError
    from fleetsim.config.loading import apply_overrides

    base = apply_overrides(SMALL, ["fleet.replicaz=2"])
    with pytest.raises(UserError) as e:
        point_scenarios(base, [["fleet.replicas=1"], ["fleet.replicas=2"]], "s.toml")
    assert str(e.value) == (
        "s.toml: fleet.replicaz = 2: unknown key (fix: did you mean 'replicas'?)"
    )
    # a point's own mistake still names the point
    with pytest.raises(UserError) as e:
        point_scenarios(SMALL, [["fleet.replicas=1"], ["fleet.replicas=0"]], "s.toml")
    assert str(e.value) == (
        "sweep point fleet.replicas=0: s.toml: fleet.replicas = 0: should be >= 1 "
        "(fix: use a whole number >= 1 and <= 100,000)"
    )


def test_a_sampled_fleets_report_gives_the_interval_over_pods(tmp_path):
    """k of P pods simulated: the 95% interval the terminal prints is stored with the hourly
    table (fleetsim.pod_ci95) and the page shows it, from memory and from disk."""
    from fleetsim.apps.report import main, write_report
    from fleetsim.apps.simulate import write_outputs

    res = simulate(
        resolved(merge(SMALL, simulation={"hours": 1}, fleet={"pods": 50, "sample_pods": 3}))
    )
    assert set(res.pod_ci) == {"energy_facility_kwh", "total_cost_usd"}
    lo, hi = res.pod_ci["total_cost_usd"]
    want = f"| total cost, 95% interval over pods | $ {lo:,.2f} .. $ {hi:,.2f} |"
    write_outputs(res, tmp_path, "")
    write_report(tmp_path, result=res, flatten=False)
    assert want in (tmp_path / "report.md").read_text().splitlines()
    assert main([str(tmp_path), "--no-flat"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert want in md.splitlines()
    assert "3 of the 50 pods simulated and scaled" in md


def test_cost_chart_names_how_the_gpus_are_paid_for_and_the_days_split(day, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fleetsim.apps.report import _from_result, _plot_cost

    labels, titles = [], []
    orig_bar, orig_title = plt.Axes.bar, plt.Axes.set_title
    monkeypatch.setattr(
        plt.Axes,
        "bar",
        lambda self, *a, **k: (labels.append(k["label"]), orig_bar(self, *a, **k))[1],
    )
    monkeypatch.setattr(
        plt.Axes, "set_title", lambda self, t, *a, **k: (titles.append(t), orig_title(self, t))[1]
    )
    d = _from_result(day)
    _plot_cost(plt, d, d.cols)
    assert labels == ["hardware (owned: amortised capex)", "energy (facility kWh x price)"]
    t = day.totals
    assert titles == [
        f"small: hourly cost by part (day: \\${t.total_cost_usd:,.2f} = energy "
        f"\\${t.energy_cost_usd:,.2f} + hardware \\${t.hardware_cost_usd:,.2f})"
    ]


@pytest.mark.parametrize(
    "override, fix",
    [
        ("slo.tpot_s=50ms", "the field is in seconds, without a unit: 0.05"),
        ('slo.ttft_s="2 s"', "the field is in seconds, without a unit: 2"),
        ("power.wake_s=2min", "the field is in seconds, without a unit: 120"),
        ("slo.tpot_s=fast", "use a number > 0 and <= 1e+06"),  # not a duration: the range
        ("traffic.requests_per_day=5ms", "use a number >= 0"),  # not a field in seconds
    ],
)
def test_a_duration_written_with_its_unit_is_converted_in_the_fix(override, fix):
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.loading import apply_overrides, scenario_from_dict

    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(apply_overrides(SMALL, [override]), "s.toml")
    assert str(e.value).endswith(f": a quoted string where a number goes (fix: {fix})")


@pytest.mark.parametrize(
    "ours, theirs, differ",
    [
        ("llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", False),  # catalog vs HF id
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "/models/Qwen3-30B-A3B-Instruct-2507/", False),
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "meta-llama/Llama-3.1-8B-Instruct", True),
        ("llama-3.1-8b", "llama-3.1-70b", True),
        ("llama-3.1-8b", None, False),
    ],
)
def test_compare_notes_a_run_and_a_vllm_file_of_different_models(ours, theirs, differ):
    from fleetsim.apps.compare import model_note

    note = model_note({"model_id": ours}, {"model_id": theirs} if theirs else {})
    assert bool(note) == differ
    if differ:
        assert note == (
            f"note: different models: the run's {ours!r}, the vLLM file's {theirs!r} "
            "(the comparison is of unlike things)"
        )
