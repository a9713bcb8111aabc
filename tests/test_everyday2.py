"""Everyday use, round two (issue 24): terminal tables that never cut a value, headroom first,
vLLM-compatible results, self-documenting schema, docs that stand alone, and the small fixes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, merge

from fleetsim.apps.cli import main as cli_main
from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """SMALL for one hour, with its requests (the module's one simulation)."""
    from fleetsim.results.output import RequestWriter

    tmp = tmp_path_factory.mktemp("small")
    rs = resolve(scenario_from_dict(merge(SMALL, simulation={"hours": 1})))
    sink = RequestWriter(tmp / "requests.parquet")
    res = simulate(rs, request_sink=sink)
    sink.close()
    return res, pq.read_table(tmp / "requests.parquet").to_pandas()


# -- vLLM-compatible results ----------------------------------------------------------------
def test_vllm_block_follows_benchmark_serving_formulas_on_the_requests(small_run):
    """vLLM's calculate_metrics over the same requests: ttft, tpot = (latency - ttft) /
    (output - 1) over requests with output > 1, itl = every token gap, e2el = latency; means
    and std of the values, in ms; throughputs = count / duration."""
    res, r = small_run
    v = res.vllm()
    done = r[r.status == "completed"]
    assert v["completed"] == len(done)
    assert v["duration"] == 3600.0
    assert v["request_throughput"] == pytest.approx(len(done) / 3600.0, rel=1e-12)
    assert v["total_output_tokens"] == pytest.approx(res.totals.output_tokens, abs=0.5)
    assert v["total_token_throughput"] == pytest.approx(
        (res.totals.prompt_tokens + res.totals.output_tokens) / 3600.0, rel=1e-12
    )
    many = done[done.output_tokens > 1]
    tpot = ((many.e2e_s - many.ttft_s) / (many.output_tokens - 1)).to_numpy()
    gaps = np.repeat(tpot, (many.output_tokens - 1).to_numpy())  # the engine's gaps are even
    series = {"ttft": done.ttft_s.to_numpy(), "tpot": tpot, "itl": gaps, "e2el": done.e2e_s}
    for m, x in series.items():
        x = np.asarray(x, dtype=float)
        assert v[f"mean_{m}_ms"] == pytest.approx(1000 * x.mean(), rel=1e-6), m
        # median, percentiles and std from the log-histograms (bins of 0.46%: +-0.23%), the
        # percentile by rank (between the neighbouring order statistics)
        for key, q in ((f"median_{m}_ms", 50), (f"p90_{m}_ms", 90), (f"p99_{m}_ms", 99)):
            lo = 1000 * np.percentile(x, q, method="lower")
            hi = 1000 * np.percentile(x, q, method="higher")
            assert lo * 0.995 <= v[key] <= hi * 1.005, (key, lo, v[key], hi)
        assert v[f"std_{m}_ms"] == pytest.approx(1000 * x.std(), rel=0.02, abs=0.002), m


def test_run_json_format_vllm_and_the_python_api(tmp_path, capsys):
    import fleetsim

    scen = tmp_path / "s.toml"
    scen.write_text(_toml(merge(SMALL, simulation={"hours": 1})))
    assert (
        cli_main(
            [
                "run",
                str(scen),
                "--out",
                str(tmp_path / "o"),
                "--json",
                "--quiet",
                "--format",
                "vllm",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    for k in (
        "mean_ttft_ms",
        "median_tpot_ms",
        "std_itl_ms",
        "p99_e2el_ms",
        "completed",
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
    ):
        assert isinstance(doc[k], (int, float)), k
    assert doc["fleetsim"]["latency"]["ttft_p99_s"] * 1000 == pytest.approx(doc["p99_ttft_ms"])
    run = fleetsim.simulate(scen)
    assert run.vllm() == {k: doc[k] for k in run.vllm()}
    assert run.summary(format="vllm")["p99_ttft_ms"] == doc["p99_ttft_ms"]
    # without --json, --format is one clear line
    assert cli_main(["run", str(scen), "--out", str(tmp_path / "p"), "--format", "vllm"]) == 2
    assert "--format vllm" in capsys.readouterr().err


def test_compare_reads_a_vllm_result_file_and_prints_relative_errors(tmp_path, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(merge(SMALL, simulation={"hours": 1})))
    assert cli_main(["run", str(scen), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    ours = json.loads(pq.read_schema(tmp_path / "o" / "hourly.parquet").metadata[b"fleetsim.vllm"])
    # the documented file, its values replaced by ours x known factors
    sample = json.loads((ROOT / "tests/data/vllm/serving-result.json").read_text())
    from fleetsim.results.vllm import COUNTS, latency_keys

    shared = set(COUNTS) | set(latency_keys())
    factor = {k: 1.0 + 0.01 * (i + 1) for i, k in enumerate(sample) if k in shared}
    measured = dict(sample)
    for k, f in factor.items():
        measured[k] = ours[k] * f
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(measured))
    assert cli_main(["compare", str(tmp_path / "o"), str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == set(factor)  # p99 only (vLLM's default), no e2el; setup keys ignored
    assert {"mean_ttft_ms", "std_tpot_ms", "p99_itl_ms", "completed"} <= set(rows)
    for k, f in factor.items():
        assert rows[k]["relative_error"] == pytest.approx(1.0 / f - 1.0, rel=1e-9), k
    # the human table at 80 columns: every key and its error, no value cut
    assert cli_main(["compare", str(tmp_path / "o"), str(path)]) == 0
    out = capsys.readouterr().out
    assert "p99_ttft_ms" in out and f"{1 / factor['p99_ttft_ms'] - 1:+.1%}" in out
    # the file exactly as written by vLLM (made-up values): read as is
    assert (
        cli_main(
            ["compare", str(tmp_path / "o"), str(ROOT / "tests/data/vllm/serving-result.json")]
        )
        == 0
    )
    # not a vLLM file: one clear line
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    assert cli_main(["compare", str(tmp_path / "o"), str(bad)]) == 2
    assert "none of benchmark_serving's keys" in capsys.readouterr().err


def _toml(d: dict) -> str:
    import tomli_w

    return tomli_w.dumps(d)


# -- docs stand alone ---------------------------------------------------------------------------
_LINK = r"\]\(([^)\s]+)\)"
_PATH = (
    r"(?<![\w/.$-])((?:\.ci|bench|calibrate|data|docs|profiles|scenarios|simulator|tests|shared)"
    r"/[\w./-]*[\w/])(?![\w*<{])"
)


def doc_references(root: Path) -> list[tuple[str, int, str, bool]]:
    """Every Markdown link target and repository path named in README.md, docs/*.md,
    scenarios/README.md and scenarios/*.toml: (file, line, target, whether it exists in the
    repository, relative to the file's folder or to the root). ``shared/...`` never counts
    (a clone has no shared/); ``FILE``-style placeholders and URLs are skipped."""
    import re

    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    files += [root / "scenarios/README.md", *sorted((root / "scenarios").glob("*.toml"))]
    out = []
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            targets = [m.group(1).split("#")[0] for m in re.finditer(_LINK, line)]
            targets = [t for t in targets if t and not re.match(r"[a-z]+:", t)]
            targets += [m.group(1) for m in re.finditer(_PATH, line)]
            targets += re.findall(r"(?<![\w.])((?:\.\./)+[\w.-][\w./-]*)", line)  # ../x
            for t in targets:
                if Path(t).stem in ("FILE", "NAME", "DIR"):  # a placeholder: scenarios/FILE.toml
                    continue
                ok = not t.startswith("shared/") and (
                    (f.parent / t).exists() or (root / t).exists()
                )
                out.append((str(f.relative_to(root)), i, t, ok))
    return out


def test_every_reference_in_the_docs_resolves_inside_the_repository():
    refs = doc_references(ROOT)
    assert len(refs) > 50  # (the scan finds the docs' many paths)
    missing = [f"{f}:{i}: {t}" for f, i, t, ok in refs if not ok]
    assert not missing, "references that a clone does not have:\n" + "\n".join(missing)


def test_the_reference_check_fails_on_a_missing_path(tmp_path):
    # the folder a clone does not have, spelled in pieces so that no file of the repository
    # names it: the check must flag it in a doc
    outside = "shared"
    (tmp_path / "docs").mkdir()
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios/README.md").write_text("see `scenarios/FILE.toml`\n")
    (tmp_path / "docs/a.md").write_text(f"[b](b.md) and `docs/a.md`, ../{outside}/data/x/\n")
    (tmp_path / "README.md").write_text(
        f"see {outside}/REFERENCES.md, [a](docs/a.md), [web](https://x.org)\n"
    )
    bad = [(f, t) for f, _, t, ok in doc_references(tmp_path) if not ok]
    assert bad == [
        ("README.md", f"{outside}/REFERENCES.md"),
        ("docs/a.md", "b.md"),
        ("docs/a.md", f"../{outside}/data/x/"),
    ]


# -- quoted figures are generated --------------------------------------------------------------
def _refresh_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("refresh_docs", ROOT / "bench/refresh_docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quoted_figures_are_the_scripts_output():
    """scenarios/README.md is bench/refresh_docs.py's rendering of docs/figures.json, which
    carries the version that produced it: the installed one (cheap: nothing is simulated)."""
    from fleetsim.base.version import __version__

    mod = _refresh_module()
    doc = mod.load_figures()
    assert doc["fleetsim_version"] == __version__, "rerun python bench/refresh_docs.py"
    assert set(doc["runs"]) == set(mod.RUNS)
    page = (ROOT / "scenarios/README.md").read_text()
    assert page == mod.render((ROOT / "bench/templates/scenarios-README.md").read_text(), doc), (
        "scenarios/README.md is not the rendering of docs/figures.json: edit the template and "
        "run python bench/refresh_docs.py --render"
    )
    assert f"generated by fleetsim\n{__version__}" in page or f"fleetsim {__version__}" in page
    # the default day as quoted is the stored run's (e.g. 683 kWh and $739 were stale)
    d = doc["runs"]["default"]
    assert f"{d['energy_facility_kwh']:,.1f} kWh, ${d['total_cost_usd']:,.2f}" in page
    # a run that prints a warning says so on the page
    for name, run in doc["runs"].items():
        if run["warnings"] and name == "mooncake":
            assert "SLO warning" in page


def test_render_refuses_a_missing_figure():
    mod = _refresh_module()
    doc = {"fleetsim_version": "9", "runs": {"a": {"x": 1.5}}, "derived": {}}
    assert mod.render("[[a.x|.2f]] by [[version]]", doc) == "1.50 by 9"
    with pytest.raises(KeyError, match=r"a\.y"):
        mod.render("[[a.y]]", doc)


# -- a schema that documents itself --------------------------------------------------------------
@pytest.mark.parametrize("which", ["scenario", "profile"])
def test_every_schema_property_has_a_description(which, capsys):
    from fleetsim.config.fields import undescribed

    assert cli_main(["schema"] + (["--profile"] if which == "profile" else [])) == 0
    schema = json.loads(capsys.readouterr().out)
    missing = undescribed(schema)
    assert not missing, (
        f"{which} schema properties without a description (add them to "
        f"simulator/config/fields.py): {', '.join(missing)}"
    )
    groups = [schema, *list(schema.get("$defs", {}).values())]
    n = sum(len(g.get("properties", {})) for g in groups)
    assert n > (100 if which == "scenario" else 40)


def test_descriptions_carry_default_range_and_vllm_name(capsys):
    from fleetsim.config.fields import field_reference
    from fleetsim.config.jsonschema import scenario_json_schema as scenario_schema

    s = scenario_schema()
    fleet = s["$defs"]["FleetSection"]["properties"]
    mb = fleet["max_batch_size"]["description"]
    assert "--max-num-seqs" in mb and "Default: 256." in mb
    gmu = fleet["gpu_memory_utilization"]["description"]
    assert "--gpu-memory-utilization" in gmu and "Default: 0.9." in gmu and "Range:" in gmu
    assert "one of 'paged', 'reserve'" in fleet["kv_allocation"]["description"]
    ref = field_reference(s)
    assert "| `FleetSection.max_batch_size` |" in ref and ref.count("\n") > 100


def test_an_undescribed_property_is_named():
    from fleetsim.config.fields import undescribed

    s = {"properties": {"a": {"description": "x"}}, "$defs": {"S": {"properties": {"b": {}}}}}
    assert undescribed(s) == ["S.b"]


# -- terminal tables never cut a value -----------------------------------------------------------
WIDTHS = (60, 80, 200)


def _terminal(width: int):
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)


def _check(c, width: int, values: list[str]) -> str:
    out = c.file.getvalue()
    assert "…" not in out
    too_long = [line for line in out.splitlines() if len(line) > width]
    assert not too_long, too_long
    tokens = set(out.split())
    for v in values:
        assert v in tokens, (v, out)
    return out


def _plan_table():
    import pyarrow as pa

    from fleetsim.apps.plan import PLAN_COLUMNS

    cols = [("rank", pa.int32()), *PLAN_COLUMNS]  # (ranked_table adds the rank column)
    rows = []
    for i, (gpu, tp, n) in enumerate((("h100-sxm", 4, 3), ("h200", 2, 5), ("a100-80gb", 8, 12))):
        r = {k: None for k, _ in cols}
        r.update(
            rank=i + 1, gpu=gpu, tensor_parallel=tp, status="ok", problem="", replicas=n,
            pods=1, gpus=n * tp, energy_facility_kwh=653.6 * (i + 1),
            energy_cost_usd=52.68 * (i + 1), hardware_cost_usd=683.84 * (i + 1),
            total_cost_usd=736.52 * (i + 1), usd_per_mtok=4.011, wh_per_request=0.653,
            worst_hour_ttft_p99_s=0.916, worst_hour_tpot_p99_s=0.042,
        )  # fmt: skip
        rows.append(r)
    return pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in cols})


@pytest.mark.parametrize("width", WIDTHS)
def test_plan_table_is_never_cut(width):
    from fleetsim.apps.plan import Slo, print_plan

    c = _terminal(width)
    print_plan(_plan_table(), Slo(2.0, 0.2), None, c)
    out = _check(c, width, ["h100-sxm", "a100-80gb", "736.52", "2,209.56", "1,960.8", "42.0"])
    if width == 200:  # wide enough: one boxed table, a row per candidate
        assert "┃ #" in out and len([ln for ln in out.splitlines() if "h200" in ln]) == 1


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_table_is_never_cut(width):
    import pyarrow as pa

    from fleetsim.apps.sweep import print_sweep

    table = pa.table(
        {
            "fleet.replicas": [8, 12],
            "traffic.requests_per_day": [1e6, 2.5e6],
            "requests": [1001035.0, 2502588.0],
            "gpu_hours": [768.0, 1152.0],
            "energy_facility_kwh": [653.6, 980.4],
            "energy_cost_usd": [52.68, 79.02],
            "hardware_cost_usd": [683.84, 1025.76],
            "total_cost_usd": [736.52, 1104.78],
            "usd_per_mtok": [4.011, 2.407],
            "wh_per_request": [0.653, 0.4],
            "ttft_p99_s": [0.885, 1.2345],
            "tpot_p99_s": [0.042, 0.0551],
            "itl_p99_s": [0.0374, 0.0501],
            "slo_attainment": [1.0, 0.9987],
        }
    )
    c = _terminal(width)
    print_sweep(table, ["fleet.replicas", "traffic.requests_per_day"], "sweep of x.toml", c)
    _check(
        c,
        width,
        [
            "1,001,035",
            "2,502,588",
            "1,152.0",
            "980.4",
            "79.02",
            "1,025.76",
            "1,104.78",
            "1.234",
            "55.1",
            "99.87",
        ],
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_crossover_outcome_is_never_cut(width):
    import pyarrow as pa

    from fleetsim.apps.crossover import FACTORS, print_outcome

    rows = []
    for w, ratio in (("short", 1.25), ("long", 0.8)):
        for f in FACTORS:
            for g in FACTORS:
                rows.append((w, "aggregated", f, g, 1.0))
                rows.append((w, "disaggregated", f, g, ratio))
    cols = ("workload", "design", "ttft_factor", "tpot_factor", "usd_per_good_request")
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(cols)})
    c = _terminal(width)
    print_outcome(table, c)
    n = len(FACTORS) ** 2
    _check(c, width, ["short", "long", "1.250", "0.800", str(n)])


@pytest.mark.parametrize("width", WIDTHS)
def test_latency_table_is_never_cut(width, monkeypatch, capsys):
    from fleetsim.apps import common

    c = _terminal(width)
    monkeypatch.setattr(common, "console", lambda **_: c)
    argv = ["latency", "--gpu", "h100-sxm", "--model", "llama-3.1-70b", "--tp", "4"]
    assert cli_main([*argv, "--batch", "1,256", "--context", "1000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert cli_main([*argv, "--batch", "1,256", "--context", "1000"]) == 0
    vals = [f"{r[k] * 1e3:.3f}" for r in rows for k in ("total_s", "compute_s", "memory_s")]
    out = _check(c, width, [*vals, "1,000", "256", "memory"])
    assert "256,000" not in out  # the context column is per sequence


@pytest.mark.parametrize("width", WIDTHS)
def test_run_summary_is_never_cut_and_leads_with_headroom(width, small_run):
    from fleetsim.results.summary import headroom, print_summary

    res, _ = small_run
    c = _terminal(width)
    print_summary(res, c)
    t = res.totals
    h = headroom(res)
    out = _check(
        c,
        width,
        [
            f"{t.energy_facility_kwh:,.2f}",
            f"{t.total_cost_usd:,.2f}",
            f"{res.day_latency['ttft_p99_s']:.3f}",
            f"{h['batch_occupancy'] * 100:.1f}%",
        ],
    )
    lines = out.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("peak-hour load"))
    assert first < next(i for i, ln in enumerate(lines) if ln.startswith("requests"))
    assert "busy fraction" in out and "not" in out  # the busy fraction, labelled


def test_piped_tables_stay_as_before(capsys):
    """Piped (not a terminal): the one rich table, never wrapped, whatever the width."""
    from fleetsim.apps.common import console
    from fleetsim.apps.plan import Slo, print_plan

    print_plan(_plan_table(), Slo(2.0, 0.2), None, console())
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "a100-80gb" in ln)
    assert row.startswith("│ 3 │ a100-80gb │  8 │") and "2,209.56" in row


# -- headroom -------------------------------------------------------------------------------------
def test_headroom_figures_are_the_hourly_columns_and_the_capacity_bound(small_run):
    """Batch occupancy and KV use are the hourly columns' day figures; the peak hour's load is
    its arrival rate over powered replicas x the TPOT-bound capacity of one replica, which is
    never above the plain throughput bound and shrinks with a tighter TPOT target."""
    from fleetsim.results.capacity import replica_capacity_rps, run_sizes
    from fleetsim.results.summary import headroom

    res, _ = small_run
    h = headroom(res)
    hr = res.hourly.to_pydict()
    assert h["kv_use_peak_hour"] == pytest.approx(max(hr["kv_utilization"]))
    assert h["batch_occupancy"] == pytest.approx(res.totals.batch_occupancy)
    rs = res.resolved
    t = res.totals
    ep, eo = t.prompt_tokens / t.requests_completed, t.output_tokens / t.requests_completed
    sizes = run_sizes(rs, "", ep, eo)  # (the KV per running sequence: the size distributions')
    assert h["kv_tokens_per_sequence"] == sizes.kv_per_seq > ep + eo / 2 - 1
    one = replica_capacity_rps(rs, "", tpot_s=rs.scenario.slo.tpot_s, sizes=sizes)
    assert one <= replica_capacity_rps(rs, "", sizes=sizes) * (1 + 1e-12)
    replicas = hr["gpus_powered_mean"][h["peak_hour"]] / rs.tp
    rate = max(hr["requests_arrived"]) / 3600.0
    assert h["peak_hour_load"] == pytest.approx(rate / (one * replicas), rel=1e-12)
    # a TPOT target below any step's time leaves batches of one: max_num_seqs = 1's capacity
    one_seq = resolve(
        scenario_from_dict(
            merge(SMALL, simulation={"hours": 1}, fleet=dict(SMALL["fleet"], max_batch_size=1))
        )
    )
    assert replica_capacity_rps(rs, "", 1e-9, sizes) == replica_capacity_rps(
        one_seq, "", None, sizes
    )


# -- the report: headings as written, headroom first, KV use in the utilisation chart -----------
def test_report_heading_is_not_escaped_and_headroom_leads(tmp_path, small_run):
    import dataclasses

    from fleetsim.apps.report import _from_result, render_markdown, write_report

    res, _ = small_run
    named = dataclasses.replace(
        res,
        resolved=dataclasses.replace(
            res.resolved, scenario=res.scenario.model_copy(update={"name": "llama70b-h100-conv"})
        ),
    )
    write_report(tmp_path, result=named, flatten=False)
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[0] == "# fleetsim report: llama70b-h100-conv"  # was llama70b\-h100\-...
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "figure" not in ln]
    assert rows[0].startswith("| peak hour's load (of the SLO-bound capacity) |")
    assert rows[1].startswith("| batch occupancy (of max_num_seqs) |")
    assert any(r.startswith("| busy fraction of powered time |") for r in rows)
    # markup in a name is still escaped
    d = _from_result(named)
    d.name = "a*b_[c]"
    page = render_markdown(d, {"peak_hour": 0, "peak_requests": 1, "peak_to_mean_traffic": 1.0,
                               "peak_cost_share": 1.0, "peak_usd_per_request": 0.1,
                               "trough_usd_per_request": 0.1, "trough_hour": 0,
                               "trough_requests": 1, "marginal_cost_of_peak_usd": None,
                               "flat_note": "skipped"})  # fmt: skip
    assert page.splitlines()[0] == "# fleetsim report: a\\*b\\_\\[c\\]"


def test_utilisation_chart_draws_kv_use_and_batch_occupancy(small_run, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fleetsim.apps.report import _from_result, _plot_utilization

    res, _ = small_run
    d = _from_result(res)
    labels = []
    orig = plt.Axes.plot

    def spy(self, *a, **k):
        labels.append(k.get("label", ""))
        return orig(self, *a, **k)

    monkeypatch.setattr(plt.Axes, "plot", spy)
    _plot_utilization(plt, d, d.cols)
    assert any(lbl.startswith("KV use") for lbl in labels)
    assert any(lbl.startswith("batch occupancy") for lbl in labels)
    assert any("busy fraction" in lbl and "not headroom" in lbl for lbl in labels)


# -- plan's progress lines ------------------------------------------------------------------------
def test_plan_log_lines_go_through_the_progress_bar(tmp_path, monkeypatch):
    """Each candidate's line is printed by the progress bar's own console (above the bar), not
    by a second console that the bar's redraw runs into."""
    from fleetsim.apps import executors

    seen = []
    real = executors.task_progress

    from contextlib import contextmanager

    @contextmanager
    def spy(label, quiet=False):
        with real(label, quiet) as hooks:
            orig = hooks.log
            hooks.log = lambda text: (seen.append(text), orig(text))
            yield hooks

    import fleetsim.apps.plan as plan

    monkeypatch.setattr(plan, "task_progress", spy)
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(merge(SMALL, simulation={"hours": 1})))
    argv = [str(scen), "--gpus", "h100-sxm", "--tp", "1", "--workers", "1"]
    assert plan.main([*argv, "--out", str(tmp_path / "p"), "--no-schedule"]) == 0
    assert seen and seen[0].startswith("h100-sxm TP1: ")


def test_field_reference_is_generated_from_the_schema():
    page = (ROOT / "docs/scenario-fields.md").read_text()
    assert page == _refresh_module().fields_page(), (
        "docs/scenario-fields.md is stale: run python bench/refresh_docs.py --render"
    )
    assert "| `FleetSection.max_batch_size` |" in page


# -- validate: kv_dtype as the budget uses it, integer byte counts --------------------------------
def test_validate_prints_the_kv_dtype_the_budget_uses_and_integer_bytes(tmp_path, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(_toml(merge(SMALL, model={"name": "llama-3.1-70b", "dtype": "int8"},
                                fleet=dict(SMALL["fleet"], tensor_parallel=4))))  # fmt: skip
    assert cli_main(["validate", str(scen), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # int8 weights keep a 16-bit KV cache (vLLM's kv_cache_dtype="auto"): 2 bytes per element
    assert doc["model"]["kv_dtype"] == "bf16" and doc["derived"]["kv_dtype"] == "bf16"
    from fleetsim.device.modelspec import model_from_catalog

    m = model_from_catalog("llama-3.1-70b")
    assert doc["derived"]["kv_bytes_per_token"] == 2 * m.n_layers * 2 * m.n_kv_heads * m.head_dim
    kv = doc["derived"]["kv_budget"]
    for k in ("memory_bytes", "usable_bytes", "weight_bytes", "activation_bytes", "kv_bytes"):
        assert isinstance(kv[k], int), (k, kv[k])
    assert isinstance(doc["derived"]["weight_bytes"], int)


# -- TOML values: any string round-trips ------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["two\nlines", 'a "quoted" name', "back\\slash", "tab\there", "bell\x07", "ünï"]
)
def test_overrides_round_trip_any_string(name):
    import tomllib

    import fleetsim
    from fleetsim.config.loading import toml_value

    assert tomllib.loads(f"x = {toml_value(name)}")["x"] == name
    sc = fleetsim.load(merge(SMALL, simulation={"hours": 1}), {"name": name})
    assert sc.name == name  # (a newline used to leave the quotes in the name)
    nested = {"k y": [name, 1.5, True], "z": {"w": name}}
    assert tomllib.loads(f"x = {toml_value(nested)}")["x"] == nested


# -- help texts -----------------------------------------------------------------------------------
def test_help_texts_are_for_users(capsys):
    from fleetsim.apps import crossover, plan, sweep

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert "fleetsim run scenarios/default.toml" in top
    assert "subcommands of the other modules" not in top  # (the developer docstring)
    for mod, suffix in ((crossover, "-crossover"), (plan, "-plan"), (sweep, "-sweep")):
        ap = mod.build_parser()
        text = " ".join(ap.format_help().split())
        assert "``" not in text
        assert f"out/<the scenario file's stem>{suffix}" in text
        for flag in ("--set", "--quiet"):
            opt = next(a for a in ap._actions if flag in a.option_strings)
            assert opt.help, (mod.__name__, flag)
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    assert "out/<the scenario file's stem>" in " ".join(capsys.readouterr().out.split())


def test_refresh_check_names_each_stale_figure_and_ignores_the_wall_time(capsys):
    """`python bench/refresh_docs.py --check`: a figure that moved is named with both values, a
    run missing on either side too; the wall time is not a figure. `--check --render` on the
    checkout: the pages are the stored figures' rendering (exit 0, nothing written)."""
    mod = _refresh_module()
    stored = {"runs": {"a": {"kwh": 1.5, "wall_s": 3.0}, "b": {"x": 1}}}
    same = {"runs": {"a": {"kwh": 1.5, "wall_s": 9.0}, "b": {"x": 1}}}
    assert mod.stale_figures(stored, same) == []
    moved = {"runs": {"a": {"kwh": 1.25, "wall_s": 3.0, "new": 2}, "c": {}}}
    assert mod.stale_figures(stored, moved) == [
        "a.kwh: 1.5 -> 1.25",
        "a.new: (missing) -> 2",
        "b: not simulated",
        "c: not stored",
    ]
    before = (ROOT / "scenarios/README.md").read_bytes(), (ROOT / "docs/figures.json").read_bytes()
    assert mod.main(["--check", "--render"]) == 0
    assert "pages: up to date" in capsys.readouterr().err
    after = (ROOT / "scenarios/README.md").read_bytes(), (ROOT / "docs/figures.json").read_bytes()
    assert after == before
