"""Everyday use (issue 15): aliases and overrides, did-you-mean, resolved output, honest runs,
machine-readable output, vLLM's metric names, the energy split and the shipped scenarios."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, merge

from fleetsim.apps.cli import main
from fleetsim.apps.simulate import simulate, write_outputs
from fleetsim.apps.sweep import grid_points, parse_grid, point_scenarios
from fleetsim.base.errors import ScenarioError
from fleetsim.base.names import closest
from fleetsim.config.loading import load_scenario, read_toml, scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import resolved_dict
from fleetsim.device import catalog
from fleetsim.serving.recorder import weighted_percentile

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))


# ---- overrides and aliases --------------------------------------------------------------------
def test_set_replicas_on_a_scenario_spelling_replicas_per_pod():
    src = ROOT / "scenarios/chatgpt-2023.toml"
    assert "replicas_per_pod" in src.read_text()
    sc, _ = load_scenario(src, ["fleet.replicas=4"])
    assert sc.fleet.replicas == 4
    sc, _ = load_scenario(src, ["fleet.replicas_per_pod=5"])
    assert sc.fleet.replicas == 5
    data, _ = read_toml(src)
    points = point_scenarios(data, grid_points(parse_grid(["fleet.replicas=4,8"])), str(src))
    assert [p["fleet"]["replicas"] for p in points] == [4, 8]


def test_vllm_engine_argument_names_are_accepted():
    fleet = {"replicas": 2, "max_num_seqs": 7, "max_num_batched_tokens": 9000}
    sc = scenario_from_dict({**SMALL, "fleet": {**fleet, "tensor_parallel_size": 2}})
    assert (sc.fleet.max_batch_size, sc.fleet.max_batched_tokens, sc.fleet.tensor_parallel) == (
        7,
        9000,
        2,
    )
    with pytest.raises(ScenarioError) as e:  # one field under two names
        scenario_from_dict(merge(SMALL, fleet={"max_num_seqs": 7, "max_batch_size": 8}))
    assert e.value.field == "fleet.max_num_seqs" and "also given" in str(e.value)
    with pytest.raises(ScenarioError) as e:  # errors name the field as the file spells it
        scenario_from_dict(merge(SMALL, fleet={"max_num_seqs": 0}))
    assert e.value.field == "fleet.max_num_seqs" and ">= 1" in str(e.value)


def test_did_you_mean_prefers_a_catalog_name_by_prefix():
    assert closest("h100", catalog.gpus()) == "h100-sxm"
    assert closest("h100-sxm5", catalog.gpus()) == "h100-sxm"
    assert closest("lama-3.1-8b", catalog.models()) == "llama-3.1-8b"  # spelling fallback
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(merge(SMALL, hardware={"gpu": "h100"})))
    assert "did you mean 'h100-sxm'" in str(e.value)


def test_weights_that_do_not_fit_suggest_the_smallest_valid_tensor_parallel():
    # 70B in bf16 (141 GB) on 80 GB GPUs at 0.9: fits at TP2, which divides 64 heads
    d = merge(SMALL, model={"name": "llama-3.1-70b"}, fleet={"tensor_parallel": 1})
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(d))
    assert "set fleet.tensor_parallel = 2 " in str(e.value)
    # GPT-3 (349 GB, 96 heads): 5 GPUs would hold it but 5 does not divide 96 -> 6
    d = merge(SMALL, model={"name": "gpt3-175b"}, fleet={"tensor_parallel": 2})
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(d))
    assert "set fleet.tensor_parallel = 6 " in str(e.value)


# ---- validate ---------------------------------------------------------------------------------
def test_validate_prints_the_catalog_values_and_the_parameter_count(capsys):
    assert main(["validate", str(ROOT / "scenarios/default.toml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    nulls = [
        f"{sec}.{k}"
        for sec in ("model", "hardware")
        for k, v in doc[sec].items()
        # compute_u0 unset is the catalog's linear compute term (PowerSpec.compute_u0)
        if v is None and k not in ("profile", "config", "compute_u0")
    ]
    assert doc["hardware"]["compute_u0"] is None
    assert nulls == []
    entry = catalog.model("llama-3.1-70b")
    assert doc["model"]["n_layers"] == entry["n_layers"] == 80
    assert doc["hardware"]["tdp_w"] == catalog.gpu("h100-sxm")["tdp_w"]
    # the derived parameter count is the model card's 70.6 B within 0.1%
    assert doc["derived"]["total_params"] == pytest.approx(entry["published_params"], rel=1e-3)


# ---- honest runs and --json -------------------------------------------------------------------
OVERLOAD = [
    "--set",
    "traffic.requests_per_day=6e6",
    "--set",
    "fleet.replicas=1",
    "--set",
    "simulation.hours=1",
]


SMALL_TOML = """
name = "small"
seed = 7
[simulation]
hours = 2
[model]
name = "llama-3.1-8b"
[fleet]
replicas = 2
[traffic]
requests_per_day = 200000
diurnal = "flat"
prompt = { dist = "lognormal", median = 500, sigma = 0.8, min = 4, max = 4000 }
output = { dist = "lognormal", median = 100, sigma = 0.8, min = 1, max = 1000 }
"""


def _small_file(tmp_path: Path) -> Path:
    f = tmp_path / "s.toml"
    f.write_text(SMALL_TOML)
    return f


def test_an_overloaded_run_says_so_and_strict_exits_4(tmp_path, capsys):
    f = _small_file(tmp_path)
    rc = main(["run", str(f), "--out", str(tmp_path / "a"), "--json", *OVERLOAD])
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert rc == 0
    h = doc["health"]
    assert h["overloaded"] and h["queue_unbounded"] and h["slo_attainment_low"]
    assert doc["totals"]["requests_in_flight"] > h["backlog_limit_requests"]
    warn = [ln for ln in cap.err.splitlines() if ln.startswith("WARNING OVERLOADED")]
    assert len(warn) == 1 and "in flight at the end" in warn[0]
    rc = main(["run", str(f), "--out", str(tmp_path / "b"), "--strict", "--quiet", *OVERLOAD])
    assert rc == 4
    assert "WARNING OVERLOADED" in capsys.readouterr().err  # even with --quiet
    # a fleet that keeps up: no flag, exit 0 under --strict
    rc = main(["run", str(f), "--out", str(tmp_path / "c"), "--json", "--strict"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and not doc["health"]["overloaded"] and doc["health"]["warnings"] == []


def test_run_json_pipes_into_json_tool(tmp_path):
    cmd = (
        f"{sys.executable} -m fleetsim run scenarios/default.toml --set simulation.hours=1 "
        f"--out {tmp_path / 'o'} --json | {sys.executable} -m json.tool"
    )
    p = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["paths"]["hourly"] == str((tmp_path / "o" / "hourly.parquet").resolve())
    assert doc["totals"]["carbon_kg"] is None  # no intensity: null, never NaN
    assert "total cost" in p.stderr  # the human summary went to stderr


def test_piped_output_is_not_wrapped(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "fleetsim", "run", str(_small_file(tmp_path)), "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("small:"))
    assert "profile h100-sxm-analytic" in line  # one line, longer than 80 columns
    assert len(line) > 80


# ---- the hourly table: readers, null carbon, new columns --------------------------------------
NEW_COLUMNS = [
    "ttft_mean_s",
    "ttft_p90_s",
    "ttft_p95_s",
    "tpot_mean_s",
    "itl_mean_s",
    "itl_p50_s",
    "itl_p99_s",
    "e2e_p90_s",
    "request_throughput_per_s",
    "output_throughput_tokens_per_s",
    "flops_utilization",
    "bandwidth_utilization",
    "batch_occupancy",
    "energy_gpu_idle_kwh",
    "energy_gpu_dynamic_kwh",
]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    d = merge(SMALL, simulation={"hours": 2})
    rs = resolve(scenario_from_dict(d))
    res = simulate(rs)
    out = tmp_path_factory.mktemp("run")
    return res, write_outputs(res, out)


def test_hourly_parquet_reads_in_pandas_polars_and_duckdb(one_run):
    import duckdb
    import pandas as pd
    import polars as pl

    res, path = one_run
    df = pd.read_parquet(path)
    pf = pl.read_parquet(path)
    for c in NEW_COLUMNS:
        assert c in df.columns and c in pf.columns
    assert df["itl_p99_s"].tolist() == pf["itl_p99_s"].to_list()
    con = duckdb.connect()
    q = f"SELECT SUM(carbon_kg), SUM(energy_gpu_kwh), SUM(itl_mean_s) FROM '{path}'"
    carbon, gpu_kwh, itl = con.execute(q).fetchone()
    assert carbon is None  # null, not NaN, without a grid intensity
    assert gpu_kwh == pytest.approx(res.totals.energy_gpu_kwh, rel=1e-12)
    assert itl == pytest.approx(float(df["itl_mean_s"].sum()), rel=1e-12)
    assert pf["carbon_kg"].null_count() == pf.height
    assert math.isnan(res.totals.carbon_kg)


def test_carbon_with_an_intensity_is_energy_times_intensity():
    rs = resolve(scenario_from_dict(merge(SMALL, cost={"carbon_kg_per_kwh": 0.4})))
    t = simulate(rs).hourly
    assert t.column("carbon_kg").null_count == 0
    np.testing.assert_allclose(
        t.column("carbon_kg").to_numpy(), 0.4 * t.column("energy_facility_kwh").to_numpy()
    )


def test_gpu_energy_splits_into_idle_and_dynamic(one_run):
    res, _ = one_run
    t = res.hourly
    gpu = t.column("energy_gpu_kwh").to_numpy()
    idle = t.column("energy_gpu_idle_kwh").to_numpy()
    dyn = t.column("energy_gpu_dynamic_kwh").to_numpy()
    np.testing.assert_allclose(idle + dyn, gpu, rtol=1e-12)
    # static: every GPU at idle draw all hour (static policy, nothing off)
    g = res.resolved.gpu
    gpus = t.column("gpus_powered_mean").to_numpy()
    np.testing.assert_allclose(idle, g.idle_w * gpus * 3600 / 3.6e6, rtol=1e-12)
    np.testing.assert_allclose(dyn, [sum(p.dyn_j[h] for p in res.pods) / 3.6e6 for h in (0, 1)])


def test_throughput_and_occupancy_columns(one_run):
    res, _ = one_run
    t = res.hourly.to_pydict()
    for h in range(2):
        assert t["request_throughput_per_s"][h] == t["requests_completed"][h] / 3600
        assert t["output_throughput_tokens_per_s"][h] == t["output_tokens"][h] / 3600
        occ = t["output_tokens"][h] / t["iterations"][h] / res.scenario.fleet.max_batch_size
        assert t["batch_occupancy"][h] == pytest.approx(occ, rel=1e-12)
    # every iteration is in some hour (or past the horizon)
    assert sum(t["iterations"]) <= res.totals.iterations


# ---- latency metrics against the per-request records -----------------------------------------
def test_weighted_percentile_is_the_percentile_of_the_repeated_sample():
    rng = np.random.default_rng(1)
    x = rng.lognormal(size=200)
    w = rng.integers(0, 30, size=200)
    for q in (0, 1, 50, 90, 95, 99, 100):
        assert weighted_percentile(x, w, q) == pytest.approx(np.percentile(np.repeat(x, w), q))


def test_latency_columns_match_the_requests(tmp_path):
    from fleetsim.results.output import RequestWriter

    d = merge(SMALL, simulation={"hours": 2})
    rs = resolve(scenario_from_dict(d))
    sink = RequestWriter(tmp_path / "r.parquet")
    res = simulate(rs, request_sink=sink)
    sink.close()
    r = pq.read_table(tmp_path / "r.parquet").to_pandas()
    r = r[r.status == "completed"]
    hour = (r.finish_s // 3600).astype(int)
    t = res.hourly.to_pydict()
    for h in range(2):
        x = r[hour == h]
        gaps = (x.output_tokens - 1).to_numpy()
        tpot = x.tpot_s.to_numpy()
        for m, v in (("ttft", x.ttft_s), ("e2e", x.e2e_s), ("tpot", x.tpot_s.dropna())):
            assert t[f"{m}_mean_s"][h] == pytest.approx(v.mean(), rel=1e-9)
            for q in (50, 90, 95, 99):
                assert t[f"{m}_p{q}_s"][h] == pytest.approx(np.percentile(v, q), rel=1e-9)
        # ITL: all token gaps pooled; mean exact = sum(e2e - ttft) / sum(gaps)
        has = gaps > 0
        itl_mean = float((x.e2e_s - x.ttft_s).to_numpy()[has].sum() / gaps[has].sum())
        assert t["itl_mean_s"][h] == pytest.approx(itl_mean, rel=1e-9)
        rep = np.repeat(tpot[has], gaps[has])
        for q in (50, 90, 95, 99):
            assert t[f"itl_p{q}_s"][h] == pytest.approx(np.percentile(rep, q), rel=1e-9)


def test_flops_and_bytes_of_one_request_are_the_latency_models(tmp_path):
    """One request of P prompt and n output tokens: a prefill iteration, then n - 1 decode steps
    of one sequence with context P + j (the new token's own key included)."""
    trace = tmp_path / "one.csv"
    P, n = 300, 40
    trace.write_text(f"arrival_s,prompt_tokens,output_tokens\n10.0,{P},{n}\n")
    d = merge(SMALL, simulation={"hours": 1}, fleet={"replicas": 1}, traffic={"trace": str(trace)})
    rs = resolve(scenario_from_dict(d))
    res = simulate(rs)
    lm = rs.latency_model()
    _, f0, b0 = lm.iteration(P, float(P * P), 1, 0, 0.0)
    c = lm.run_coeffs(1)
    ctx = np.arange(1, n) + P
    flops = f0 + float(np.sum(c.fa + c.fb * ctx))
    nbytes = b0 + float(np.sum(c.ba + c.bb * ctx))
    t = res.hourly.to_pydict()
    powered_s = t["gpus_powered_mean"][0] * 3600
    prof = rs.profile
    assert t["flops_utilization"][0] * prof.peak_flops * powered_s == pytest.approx(flops, 1e-9)
    assert t["bandwidth_utilization"][0] * prof.mem_bw_bytes_per_s * powered_s == pytest.approx(
        nbytes, 1e-9
    )
    assert t["iterations"][0] == n
    assert t["batch_occupancy"][0] == pytest.approx(1 / rs.scenario.fleet.max_batch_size)


# ---- the shipped scenarios ----------------------------------------------------------------------
def _paths_in(data: dict) -> list[str]:
    out = []
    for v in data.values():
        if isinstance(v, dict):
            out += _paths_in(v)
    for k in ("file", "trace", "profile", "schedule_file"):
        if isinstance(data.get(k), str):
            out.append(data[k])
    return out


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_shipped_scenario_validates_and_runs_inside_the_repository(path, tmp_path):
    data, _ = read_toml(path)
    for f in _paths_in(data):  # a fresh clone has nothing beside the repository
        full = (path.parent / f).resolve()
        assert full.is_relative_to(ROOT) and full.is_file(), f
    sc, _ = load_scenario(path)
    rs = resolve(sc, str(path))
    assert resolved_dict(rs)["derived"]["total_params"] > 0
    # one hour at a reduced rate (a full day of every scenario is too slow for CI)
    small = [
        "simulation.hours=1",
        f"traffic.requests_per_day={min(sc.traffic.requests_per_day, 3e4)}",
    ]
    if sc.fleet.pods > 1:
        small += [f"fleet.pods={min(sc.fleet.pods, 4)}", "fleet.sample_pods=1"]
    rc = main(
        [
            "run",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
            *(arg for s in small for arg in ("--set", s)),
        ]
    )
    assert rc == 0
    assert pq.read_table(tmp_path / "o" / "hourly.parquet").num_rows == 1


# ---- the JSON Schema ------------------------------------------------------------------------
def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x.isoformat() if hasattr(x, "isoformat") else x


def test_schema_accepts_every_shipped_scenario_and_rejects_a_typo(capsys):
    import jsonschema

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    fleet = schema["$defs"]["FleetSection"]["properties"]
    assert {"replicas", "max_batch_size", "max_num_seqs", "replicas_per_pod"} <= set(fleet)
    assert "``" not in json.dumps(schema)
    for path in SCENARIOS:
        data, _ = read_toml(path)
        errors = [e.message for e in v.iter_errors(_jsonable(data))]
        assert errors == [], (path.name, errors)
    assert not v.is_valid({"fleet": {"replicass": 2}})
    assert not v.is_valid({"fleet": {"replicas": 0}})


# ---- sweep and plan: TOML arrays, --json, help ----------------------------------------------
def test_grid_values_are_toml_arrays_parsed_like_set():
    from fleetsim.apps.sweep import parse_grid

    assert parse_grid(["fleet.replicas=[4, 8]"]) == parse_grid(["fleet.replicas=4,8"])
    axes = parse_grid(['cost.hardware=["owned", "rented"]', "traffic.diurnal=[[1.0, 2.0], [3]]"])
    assert axes == [
        ("cost.hardware", ['"owned"', '"rented"']),
        ("traffic.diurnal", ["[1.0, 2.0]", "[3]"]),
    ]


def test_sweep_json_and_units(tmp_path, capsys):
    from fleetsim.apps.sweep import main as sweep_main

    f = _small_file(tmp_path)
    argv = [str(f), "--grid", "fleet.replicas=[1, 2]", "--set", "simulation.hours=1"]
    rc = sweep_main([*argv, "--out", str(tmp_path / "o"), "--workers", "1", "--json"])
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert rc == 0 and [p["fleet.replicas"] for p in doc["points"]] == [1, 2]
    assert doc["paths"]["sweep"] == str((tmp_path / "o/sweep.parquet").resolve())
    assert {"itl_p99_s", "ttft_mean_s", "request_throughput_per_s"} <= set(doc["points"][0])
    # the table (stderr here) shows TPOT in ms as run and plan do, values never cut
    assert "TPOT p99 ms" in cap.err and "…" not in cap.err
    tpot_ms = f"{doc['points'][0]['tpot_p99_s'] * 1000:.1f}"
    assert tpot_ms in cap.err


@pytest.mark.parametrize("cmd", ["plan", "sweep", "report", "run", "validate"])
def test_help_is_complete_and_has_no_rst(cmd):
    p = subprocess.run(
        [sys.executable, "-m", "fleetsim", cmd, "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0
    assert "``" not in p.stdout
    if cmd == "plan":  # the description is the docstring's whole first sentence
        assert "that meets the latency SLO, found by simulation." in " ".join(p.stdout.split())


def test_version():
    p = subprocess.run(
        [sys.executable, "-m", "fleetsim", "--version"], capture_output=True, text=True
    )
    import fleetsim

    assert p.returncode == 0 and p.stdout.strip() == f"fleetsim {fleetsim.__version__}"


# ---- the report ---------------------------------------------------------------------------------
def test_report_has_latency_rows_from_memory_and_from_the_file(tmp_path, capsys):
    from fleetsim.apps.report import main as report_main

    f = _small_file(tmp_path)
    out = tmp_path / "o"
    assert main(["run", str(f), "--out", str(out), "--set", "simulation.hours=1", "--json"]) == 0
    lat = json.loads(capsys.readouterr().out)["latency"]
    itl = " / ".join(f"{lat[f'itl_p{q}_s'] * 1000:.1f}" for q in (50, 90, 99))
    mean = f"{lat['itl_mean_s'] * 1000:.1f}"
    expect = f"| ITL (token gaps): p50 / p90 / p99, mean | {itl} ms, mean {mean} ms |"
    assert report_main([str(out), "--no-flat"]) == 0  # from hourly.parquet and its metadata
    said = capsys.readouterr().out
    assert f"wrote {(out / 'report.html').resolve()}" in said
    md = (out / "report.md").read_text()
    assert expect in md and "| TTFT: p50 / p90 / p99, mean |" in md
    assert "| worst hour's p99 TPOT |" in md


def test_plan_json(tmp_path, capsys):
    from fleetsim.apps.plan import main as plan_main

    f = _small_file(tmp_path)
    argv = [str(f), "--gpus", "h100-sxm", "--tp", "1", "--no-schedule", "--workers", "1"]
    assert (
        plan_main([*argv, "--set", "simulation.hours=1", "--out", str(tmp_path / "p"), "--json"])
        == 0
    )
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["candidates"][0]["status"] == "ok" and doc["candidates"][0]["rank"] == 1
    assert doc["paths"]["plan"] == str((tmp_path / "p/plan.parquet").resolve())
    assert "capacity plan" in cap.err  # the table went to stderr
