"""Bounded work, physics checks and user text as data (issue #16 items 3, 6, 9, 12, 16, 17).

* Validation estimates the work a scenario implies (config/budget.py ``check_work``) and
  refuses what exceeds the stated budget, saying how to get the answer within it. The memory
  bombs of item 3 run in a child under ``RLIMIT_AS`` = 2 GiB that the test asserts is never hit:
  each is refused before anything is generated, within seconds.
* Power: idle <= TDP, busy <= 2 x TDP, every power and time field bounded (exit 2, not 3).
* Names with console markup, ANSI escapes, Markdown/HTML and matplotlib math are printed and
  rendered as written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL, merge
from test_robustness_input import LIMIT_AS, run_limited

from fleetsim.apps import cli
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.budget import (
    MAX_ARRIVALS_PER_POD_HOUR,
    MAX_AUTOSCALER_TICKS,
    MAX_SIMULATED_POD_HOURS,
)
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

S = """
name = "work"
seed = 1
[simulation]
hours = 2
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 2
[traffic]
requests_per_day = 20000
diurnal = "flat"
prompt = { dist = "fixed", value = 50 }
output = { dist = "fixed", value = 20 }
"""


def test_memory_bombs_are_refused_under_a_memory_limit(tmp_path):
    """Item 3: each passed 2 GB within a minute before; now each is one line, exit 2, refused
    before generating anything (the child stays far below its 2 GiB limit)."""
    f = tmp_path / "s.toml"
    f.write_text(S)
    out = str(tmp_path / "o")
    run = ["run", str(f), "--out", out, "--quiet"]
    cases = {
        "rate": [
            *run,
            "--set",
            "fleet.replicas=1",
            "--set",
            "simulation.hours=1",
            "--set",
            "traffic.requests_per_day=2.3e8",
        ],
        "pods": [*run, "--set", "fleet.pods=10000000"],
        "ticks": [
            *run,
            "--set",
            'autoscaler.policy="reactive"',
            "--set",
            "autoscaler.interval_s=1e-6",
        ],
        "long": [*run, "--set", "simulation.hours=8000", "--set", "traffic.requests_per_day=1e6"],
        "replay": [
            "replay",
            "--trace",
            "poisson:300000000:1",
            "--model",
            "llama-3.1-8b",
            "--out",
            out,
        ],
    }
    t0 = time.monotonic()
    got, peak = run_limited(cases, tmp_path)
    wall = time.monotonic() - t0
    needles = {
        "rate": "per pod-hour",
        "pods": "fleet.sample_pods",
        "ticks": "coarser interval",
        "long": "fewer hours",
        "replay": "at most 100,000 requests",
    }
    for name, (rc, lines) in got.items():
        assert rc == 2 and len(lines) == 1, (name, rc, lines)
        assert needles[name] in lines[0], (name, lines[0])
    assert peak < LIMIT_AS / 4, f"peak resident set {peak / 2**20:.0f} MiB"
    assert wall < 60
    print(f"memory bombs: {len(got)} refused in {wall:.1f} s; child peak {peak / 2**20:.0f} MiB")


def _err(d: dict) -> ScenarioError:
    with pytest.raises(ScenarioError) as ei:
        resolve(scenario_from_dict(d, "s.toml"), "s.toml")
    return ei.value


def test_budget_edges_are_exact():
    """Just under a budget is accepted, just over is refused (the estimate is the expectation
    of the Poisson arrivals; flat diurnal: rate x 3600 per hour)."""
    per_hour = MAX_ARRIVALS_PER_POD_HOUR
    ok = merge(SMALL, traffic={"requests_per_day": per_hour * 24 * 0.999}, simulation={"hours": 1})
    resolve(scenario_from_dict(ok))
    bad = merge(SMALL, traffic={"requests_per_day": per_hour * 24 * 1.001}, simulation={"hours": 1})
    assert _err(bad).field == "traffic.requests_per_day"
    pods = MAX_SIMULATED_POD_HOURS // 2
    resolve(scenario_from_dict(merge(SMALL, fleet={"pods": pods, "sample_pods": 4})))
    e = _err(merge(SMALL, fleet={"pods": pods + 1}))
    assert e.field == "fleet.pods" and "sample_pods" in e.fix
    hours = SMALL["simulation"]["hours"]
    interval = hours * 3600 / MAX_AUTOSCALER_TICKS
    reactive = {"policy": "reactive", "interval_s": interval * 1.01}
    resolve(scenario_from_dict(merge(SMALL, autoscaler=reactive)))
    e = _err(merge(SMALL, autoscaler={**reactive, "interval_s": interval * 0.99}))
    assert e.field == "autoscaler.interval_s" and "coarser interval" in e.fix


# ---------------------------------------------------------------------------------------------
# physics (items 9 and 16)
@pytest.mark.parametrize(
    "sections,field",
    [
        ({"hardware": {"gpu": "h100-sxm", "idle_w": 5000}}, "hardware.idle_w"),
        ({"hardware": {"gpu": "h100-sxm", "active_w": 2500}}, "hardware.active_w"),
        ({"hardware": {"gpu": "h100-sxm", "tdp_w": 50}}, "hardware.idle_w"),
        ({"power": {"standby_w": 1.7e308}}, "power.standby_w"),
        ({"power": {"wake_w": 1e308}}, "power.wake_w"),
        ({"power": {"wake_s": 1e300}}, "power.wake_s"),
        ({"autoscaler": {"policy": "reactive", "target_requests_per_replica": 5e-324}}, None),
        ({"autoscaler": {"policy": "reactive", "idle_timeout_s": 1e308}}, None),
    ],
    ids=["idle>tdp", "busy>3tdp", "tdp<idle", "standby", "wake_w", "wake_s", "target", "timeout"],
)
def test_impossible_power_and_time_are_user_errors(sections, field):
    e = _err(merge(SMALL, **sections))
    assert "\n" not in str(e)
    if field:
        assert e.field == field, str(e)


def test_profile_power_is_checked(tmp_path, capsys):
    prof = json.loads(Path("profiles/cpu-llama-3.1-8b.json").read_text())
    prof["power"] = {"idle_w": 300.0, "max_w": 200.0}
    (tmp_path / "p.json").write_text(json.dumps(prof))
    f = tmp_path / "s.toml"
    f.write_text(S.replace('gpu = "h100-sxm"', 'gpu = "h100-sxm"\nprofile = "p.json"'))
    rc = cli.main(["validate", str(f)])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and "power.idle_w = 300.0" in err[0], err


def test_target_requests_overflow_was_exit_3(tmp_path, capsys):
    """Item 9: ``target_requests_per_replica = 5e-324`` was an OverflowError (exit 3)."""
    f = tmp_path / "s.toml"
    f.write_text(S + '[autoscaler]\npolicy = "reactive"\ntarget_requests_per_replica = 5e-324\n')
    rc = cli.main(["run", str(f), "--out", str(tmp_path / "o"), "--quiet"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and "target_requests_per_replica" in err[0], err


# ---------------------------------------------------------------------------------------------
# user text is data (items 6, 12, 17)
NAMES = ["[/]oops", "[red]x[/red]", "\x1b[31mred\x1b[0m", "cost $\\undefinedcmd$ day"]


@pytest.mark.parametrize("name", NAMES, ids=["close-tag", "style", "ansi", "math"])
def test_names_print_as_written(tmp_path, name):
    """Item 6: a scenario name (and an inline model name) with console markup or ANSI escapes
    ends a run with exit 0 and prints as written, escapes shown, never interpreted."""
    f = tmp_path / "s.toml"
    model = (
        f"name = {json.dumps(name)}\nn_layers = 32\nd_model = 4096\nn_heads = 32\n"
        "n_kv_heads = 8\nd_ff = 14336\nvocab_size = 128256"
    )
    text = S.replace('name = "work"', f"name = {json.dumps(name)}")
    text = text.replace('name = "llama-3.1-8b"', model)
    f.write_text(text)
    p = subprocess.run(
        [sys.executable, "-m", "fleetsim", "run", str(f), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "\x1b" not in p.stdout  # no raw escape sequence reaches the terminal
    shown = name.replace("\x1b", "\\x1b")
    assert p.stdout.count(shown) >= 2, p.stdout  # the scenario name and the model name


def test_sweep_grid_values_print_as_written(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(S)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetsim",
            "sweep",
            str(f),
            "--grid",
            'name="[/]a","[b]x[/b]"',
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stderr
    assert "[/]a" in p.stdout and "[b]x[/b]" in p.stdout, p.stdout


def test_report_escapes_names_for_each_medium(tmp_path, capsys):
    """Items 12 and 17: matplotlib math in a name does not crash the plots; Markdown gets no
    raw HTML or heading from the name; the HTML page escapes it."""
    name = "cost $\\undefinedcmd$ day\n# injected <b>bold</b> *x*"
    f = tmp_path / "s.toml"
    f.write_text(S.replace('name = "work"', f"name = {json.dumps(name)}"))
    out = tmp_path / "o"
    rc = cli.main(["run", str(f), "--out", str(out), "--quiet", "--report"])
    assert rc == 0, capsys.readouterr().err
    md = (out / "report.md").read_text()
    assert "<b>" not in md and not re.search(r"^# injected", md, re.M)
    assert md.splitlines()[0].startswith("# fleetsim report: cost \\$\\\\undefinedcmd\\$ day")
    assert "&lt;b&gt;bold&lt;/b&gt;" in md and "\\*x\\*" in md
    page = (out / "report.html").read_text()
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_escape_helpers():
    from fleetsim.apps.report import for_markdown, for_plot
    from fleetsim.base.io import clean, term

    assert term("[/]oops") == "\\[/]oops"
    assert clean("a\nb\x1b[0m") == "a\\nb\\x1b[0m"
    assert for_plot("a $x$") == "a \\$x\\$"
    assert for_markdown("<i>_a_</i>") == "&lt;i&gt;\\_a\\_&lt;/i&gt;"
    with pytest.raises(UserError):
        scenario_from_dict(merge(SMALL, power={"standby_w": float("inf")}))
