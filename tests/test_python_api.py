"""The notebook session of docs/python-api.md runs, block by block, through ``import fleetsim``;
and the API's own contract (inputs it accepts, what it returns)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

import fleetsim

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_documented_session_runs(monkeypatch, capsys):
    blocks = code_blocks(DOC.read_text())
    assert len(blocks) >= 8
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), ns)
        except Exception as exc:  # name the block that failed
            raise AssertionError(f"block {i + 1} of {DOC.name} failed: {exc!r}\n{block}") from exc
    out = capsys.readouterr().out
    # what the session printed and built is what the page says it is
    assert "hardware.gpu -> did you mean 'h100-sxm'" in out
    # a scenario of [model] config only: the section's name is the default, the resolved one
    # the config's (docs/python-api.md says which is which)
    assert "llama-3.1-70b -> deepseek-ai/DeepSeek-R1-0528\n" in out
    assert "OVERLOADED" in out
    assert isinstance(ns["run"], fleetsim.Run) and ns["run"].hourly.num_rows == 2
    assert ns["table"].num_rows == 4
    assert ns["plan"].column("status").to_pylist() == ["ok"]
    assert ns["r"].requests.num_rows > 0


def test_simulate_accepts_a_path_text_dict_and_scenario(monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "scenarios/default.toml"
    a = fleetsim.simulate("scenarios/default.toml", {"simulation.hours": 1})
    b = fleetsim.simulate(path, ["simulation.hours=1"])
    sc = fleetsim.load(path, {"simulation.hours": 1})
    c = fleetsim.simulate(sc)
    d = fleetsim.simulate(sc.model_dump(mode="json"))
    e = fleetsim.simulate(path.read_text(), {"simulation.hours": 1})
    for run in (a, c, d, e):
        assert run.hourly.equals(b.hourly)  # same scenario and seed: the same numbers
    assert isinstance(b.hourly, pa.Table)
    assert b.to_pandas().shape[0] == 1


def test_a_relative_trace_resolves_against_the_scenario_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repository: the file's own folder counts
    run = fleetsim.simulate(
        ROOT / "scenarios/coding-assistant.toml",
        {"simulation.hours": 1, "traffic.requests_per_day": 20000},
    )
    assert run.totals["requests_completed"] > 0


def test_bad_input_raises_user_errors():
    with pytest.raises(fleetsim.UserError, match="no such scenario file"):
        fleetsim.load("does/not/exist.toml")
    with pytest.raises(fleetsim.ScenarioError, match="did you mean 'replicas'"):
        fleetsim.load({"fleet": {"replicass": 2}})
    with pytest.raises(fleetsim.UserError, match="not valid TOML"):
        fleetsim.load("name = \n")
    with pytest.raises(fleetsim.UserError, match="not a TOML value"):
        fleetsim.load({}, {"fleet.replicas": object()})


def test_import_fleetsim_is_light_and_names_load_on_use():
    import subprocess
    import sys

    code = (
        "import sys, fleetsim; heavy = [m for m in ('pyarrow', 'pydantic', 'simpy') "
        "if m in sys.modules]; print(heavy); print(fleetsim.simulate.__module__)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.split("\n")[:2] == ["[]", "fleetsim.api"]
    assert set(fleetsim.__all__) <= set(dir(fleetsim))
    with pytest.raises(AttributeError):
        fleetsim.no_such_name  # noqa: B018
