"""Bad input gets one clear line; a failed run writes nothing; the same seed gives the same data.

* scenario validation: the file, the field path, the bad value and what is accepted;
* bad data files (trace CSV, profile JSON) through the command line;
* invariants at the end of every run: a violation is exit 3 and no file;
* reproducibility of the hourly table and of requests.parquet.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pyarrow.parquet as pq
import pytest
from conftest import SMALL, merge, tables_equal

from fleetsim.apps import cli
from fleetsim.apps import simulate as simulate_mod
from fleetsim.apps.simulate import simulate
from fleetsim.base.errors import InvariantError, ScenarioError, UserError
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

TINY = merge(SMALL, simulation={"hours": 1}, traffic={"requests_per_day": 5000})


def _error(d: dict) -> str:
    with pytest.raises(UserError) as ei:
        resolve(scenario_from_dict(d, "s.toml"), "s.toml")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("s.toml: ")
    return msg


LOG = {"dist": "lognormal", "median": 100, "sigma": 1.0}
CASES = [
    # (id, scenario sections, needles that must all appear in the one line)
    (
        "price-str",
        {"cost": {"electricity_usd_per_kwh": "cheap"}},
        ["cost.electricity_usd_per_kwh = 'cheap'", "a number >= 0", "list of 24"],
    ),
    (
        "price-quoted-number",
        {"cost": {"electricity_usd_per_kwh": "0.1"}},
        ["cost.electricity_usd_per_kwh = '0.1'", "without quotes"],
    ),
    (
        "price-23",
        {"cost": {"electricity_usd_per_kwh": [0.1] * 23}},
        ["cost.electricity_usd_per_kwh = [0.1", "has 23 values", "list of 24"],
    ),
    (
        "price-nan-in-list",
        {"cost": {"electricity_usd_per_kwh": [0.1] * 23 + [math.nan]}},
        ["cost.electricity_usd_per_kwh[23] = nan", "finite"],
    ),
    (
        "price-huge",
        {"cost": {"electricity_usd_per_kwh": 1e300}},
        ["cost.electricity_usd_per_kwh = 1e+300", "<= 1000"],
    ),
    ("carbon-neg", {"cost": {"carbon_kg_per_kwh": -1}}, ["cost.carbon_kg_per_kwh = -1", ">= 0"]),
    (
        "diurnal-name",
        {"traffic": {"diurnal": "weekly"}},
        ["traffic.diurnal = 'weekly'", "not an accepted value", "'azure-conv'"],
    ),
    (
        "diurnal-number",
        {"traffic": {"diurnal": 5}},
        ["traffic.diurnal = 5", "a number is not accepted", "list of 24"],
    ),
    (
        "diurnal-neg",
        {"traffic": {"diurnal": [1] * 23 + [-1]}},
        ["traffic.diurnal[23] = -1", ">= 0"],
    ),
    ("diurnal-zero", {"traffic": {"diurnal": [0] * 24}}, ["traffic.diurnal", "not all be zero"]),
    (
        "dist-typo",
        {"traffic": {"prompt": {**LOG, "medain": 5}}},
        ["traffic.prompt.medain = 5", "unknown key", "did you mean 'median'"],
    ),
    (
        "dist-missing",
        {"traffic": {"prompt": {"dist": "lognormal", "sigma": 1.0}}},
        ["traffic.prompt.median", "is required", "add median = a number > 0"],
    ),
    (
        "dist-no-tag",
        {"traffic": {"prompt": {"median": 5, "sigma": 1}}},
        ["traffic.prompt", "no 'dist' key", "'lognormal'"],
    ),
    (
        "dist-bad-tag",
        {"traffic": {"prompt": {"dist": "poisson", "mean": 3}}},
        ["traffic.prompt.dist = 'poisson'", "'geometric'"],
    ),
    ("dist-not-table", {"traffic": {"prompt": "big"}}, ["traffic.prompt = 'big'", "table"]),
    (
        "sigma-huge",
        {"traffic": {"prompt": {**LOG, "sigma": 1e300}}},
        ["traffic.prompt.sigma = 1e+300", "<= 10"],
    ),
    ("section-list", {"fleet": [1, 2]}, ["fleet = [1, 2]", "table", "[fleet]"]),
    ("top-typo", {"fleeet": {}}, ["fleeet", "did you mean 'fleet'"]),
    (
        "bool-number",
        {"traffic": {"requests_per_day": True}},
        ["traffic.requests_per_day = True", "boolean where a number goes"],
    ),
    ("quoted-int", {"fleet": {"replicas": "2"}}, ["fleet.replicas = '2'", "without quotes"]),
    ("alias-quoted", {"fleet": {"replicas_per_pod": "two"}}, ["fleet.replicas_per_pod = 'two'"]),
    ("fraction-int", {"simulation": {"hours": 1.5}}, ["simulation.hours = 1.5", "whole number"]),
    ("rate-inf", {"traffic": {"requests_per_day": math.inf}}, ["requests_per_day = inf", "finite"]),
    (
        "rate-huge",
        {"traffic": {"requests_per_day": 1e300}},
        ["traffic.requests_per_day = 1e+300", "per pod-hour", "fleet.pods"],
    ),
    ("tdp-huge", {"hardware": {"tdp_w": 1e300}}, ["hardware.tdp_w = 1e+300", "<= 100000"]),
    ("flops-tiny", {"hardware": {"peak_flops": 1e-300}}, ["hardware.peak_flops", ">= 1e+06"]),
    (
        "start-far",
        {"simulation": {"start_utc": "9999-12-31T23:00:00Z"}},
        ["simulation.start_utc", "1970..9000"],
    ),
    ("hours-zero", {"simulation": {"hours": 0}}, ["simulation.hours = 0", ">= 1", "<= 8,784"]),
    ("layers-huge", {"model": {"n_layers": 10**30}}, ["model.n_layers", "<= 10,000,000"]),
    (
        "gmu-tiny",
        {"fleet": {"gpu_memory_utilization": 1e-9}},
        ["fleet.tensor_parallel", "no tensor-parallel degree up to 64"],
    ),
    (
        "output-too-long",
        {"traffic": {"output": {"dist": "geometric", "mean": 100, "max": 999_000}}},
        ["traffic.output.max = 999000", "KV budget"],
    ),
    ("sample-gt-pods", {"fleet": {"pods": 2, "sample_pods": 3}}, ["fleet", "sample_pods (3)"]),
]


@pytest.mark.parametrize("sections,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_message(sections, needles):
    msg = _error(merge(TINY, **sections))
    for n in needles:
        assert n in msg, (n, msg)
    assert "constrained-" not in msg and "list[" not in msg and "literal[" not in msg


def test_start_utc_is_converted_to_utc():
    sc = scenario_from_dict(merge(TINY, simulation={"start_utc": "2026-01-01T05:00:00+05:00"}))
    assert (
        sc.simulation.start_utc.hour == 0
        and sc.simulation.start_utc.utcoffset().total_seconds() == 0
    )


# ---------------------------------------------------------------------------------------------
# bad data files, through the command line (in-process: exit code and the one stderr line)
SCEN = """
name = "files"
seed = 2
[simulation]
hours = 1
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
{extra_hw}
[traffic]
requests_per_day = 2000
diurnal = "flat"
prompt = {prompt}
output = {{ dist = "fixed", value = 20 }}
"""


def _cli(tmp_path, capsys, *args):
    rc = cli.main(list(args))
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    return rc, err


def _scenario(tmp_path, prompt='{ dist = "fixed", value = 50 }', extra_hw=""):
    f = tmp_path / "s.toml"
    f.write_text(SCEN.format(prompt=prompt, extra_hw=extra_hw))
    return f


def test_trace_with_a_bad_row_names_the_row(tmp_path, capsys):
    (tmp_path / "trace.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\nt0,100,20\nt1,200,30\nt2,abc,40\n"
    )
    f = _scenario(
        tmp_path, prompt='{ dist = "empirical", file = "trace.csv", column = "ContextTokens" }'
    )
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1, err
    assert "row 4" in err[0] and "'ContextTokens'" in err[0] and "'abc'" in err[0], err
    assert not (tmp_path / "o").exists()
    # and a good trace runs
    (tmp_path / "trace.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\nt0,100,20\nt1,200,30\n"
    )
    from fleetsim.workload.sampling import read_trace

    read_trace.cache_clear()
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(tmp_path / "o2"), "--quiet")
    assert rc == 0, err


GOOD_PROFILE = {
    "format": "fleetsim-profile/1",
    "kind": "roofline",
    "name": "test-h100",
    "catalog_gpu": "h100-sxm",
    "peak_flops": 9.89e14,
    "mem_bw_bytes_per_s": 3.35e12,
    "mem_bytes": 8.0e10,
    "compute_eff_max": 0.6,
    "compute_eff_half_tokens": 256,
    "memory_eff": 0.7,
    "overhead_s": 0.004,
    "power": None,
}
PROFILES = [
    ("bad-json", "{not json", ["not valid JSON", "fleetsim calibrate"]),
    ("wrong-format", {**GOOD_PROFILE, "format": "other/9"}, ["'format' is 'other/9'"]),
    (
        "missing-field",
        {k: v for k, v in GOOD_PROFILE.items() if k != "memory_eff"},
        ["lacks memory_eff", "fleetsim calibrate"],
    ),
    ("negative", {**GOOD_PROFILE, "peak_flops": -1.0}, ["'peak_flops' = -1.0", "non-negative"]),
    ("not-object", [1, 2], ["expected a JSON object"]),
    (
        "other-gpu",
        {**GOOD_PROFILE, "catalog_gpu": "h200"},
        ["hardware.profile = 'p.json'", "measured on 'h200'", "hardware.gpu = 'h200'"],
    ),
]


@pytest.mark.parametrize("content,needles", [p[1:] for p in PROFILES], ids=[p[0] for p in PROFILES])
def test_bad_profile_is_one_clear_line(tmp_path, capsys, content, needles):
    (tmp_path / "p.json").write_text(content if isinstance(content, str) else json.dumps(content))
    f = _scenario(tmp_path, extra_hw='profile = "p.json"')
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1, err
    assert "p.json" in err[0] and "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    assert not (tmp_path / "o").exists()


def test_good_profile_runs(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps(GOOD_PROFILE))
    f = _scenario(tmp_path, extra_hw='profile = "p.json"')
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 0, err
    assert (tmp_path / "o" / "hourly.parquet").exists()


# ---------------------------------------------------------------------------------------------
# --force and invariants
def test_existing_output_needs_force(tmp_path, capsys):
    f = _scenario(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(out), "--quiet")
    assert rc == 2 and len(err) == 1 and "--force" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(out), "--quiet", "--force")
    assert rc == 0 and (out / "hourly.parquet").exists()


def _break_totals(monkeypatch):
    real = simulate_mod.day_totals

    def wrong(*args):
        t = real(*args)
        return dataclasses.replace(t, energy_facility_kwh=t.energy_facility_kwh * 1.01)

    monkeypatch.setattr(simulate_mod, "day_totals", wrong)


def _break_conservation(monkeypatch):
    real = simulate_mod.simulate_pod

    def lossy(*a, **k):
        p = real(*a, **k)
        p.arrived[0] += 1
        return p

    monkeypatch.setattr(simulate_mod, "simulate_pod", lossy)


@pytest.mark.parametrize(
    "breaker,name",
    [(_break_totals, "hourly sums != day totals"), (_break_conservation, "request conservation")],
    ids=["sums", "conservation"],
)
def test_invariant_violation_is_exit_3_and_writes_nothing(
    tmp_path, capsys, monkeypatch, breaker, name
):
    breaker(monkeypatch)
    with pytest.raises(InvariantError, match=name):
        simulate(resolve(scenario_from_dict(TINY)))
    f = _scenario(tmp_path)
    out = tmp_path / "o"
    rc, err = _cli(tmp_path, capsys, "run", str(f), "--out", str(out), "--requests", "--quiet")
    assert rc == 3 and len(err) == 1 and name in err[0], err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_hourly_sums_hold_with_sampled_pods():
    res = simulate(resolve(scenario_from_dict(merge(TINY, fleet={"pods": 5, "sample_pods": 2}))))
    assert res.scale == 2.5
    assert res.totals.requests_arrived > 0


# ---------------------------------------------------------------------------------------------
# reproducibility
def test_same_seed_same_files(tmp_path, capsys):
    f = _scenario(tmp_path, prompt='{ dist = "lognormal", median = 200, sigma = 1.0, max = 2000 }')
    tables = []
    for run in ("a", "b"):
        rc, err = _cli(
            tmp_path, capsys, "run", str(f), "--out", str(tmp_path / run), "--requests", "--quiet"
        )
        assert rc == 0, err
        tables.append(
            (
                pq.read_table(tmp_path / run / "hourly.parquet"),
                pq.read_table(tmp_path / run / "requests.parquet"),
            )
        )
    (h1, r1), (h2, r2) = tables
    assert h1.num_rows == 1 and r1.num_rows > 50
    assert tables_equal(h1, h2)
    assert tables_equal(r1.drop_columns(["status"]), r2.drop_columns(["status"]))
    assert r1.column("status").to_pylist() == r2.column("status").to_pylist()
    # a different seed gives different data (the test can fail)
    rc, err = _cli(
        tmp_path, capsys, "run", str(f), "--out", str(tmp_path / "c"), "--quiet", "--seed", "99"
    )
    assert rc == 0
    assert not tables_equal(h1, pq.read_table(tmp_path / "c" / "hourly.parquet"))


def test_scenario_error_fields():
    with pytest.raises(ScenarioError) as ei:
        scenario_from_dict(merge(TINY, fleet={"replicas": 0}), "x.toml")
    e = ei.value
    assert (e.field, e.value, e.source) == ("fleet.replicas", 0, "x.toml")
    assert "use a whole number >= 1" in e.fix
