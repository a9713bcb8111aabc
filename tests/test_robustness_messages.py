"""Messages that name the right thing (issue #23, low): a symbolic link loop is called one
(not "no such file"), ``latency --model /dev/zero`` names ``--model`` (not ``scenario``),
``latency --context -5`` names ``--context`` (not "--batch needs --context"), and latency's
numbers are bounded (a 20-digit context was printed as a 10^16 ms step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetsim.apps import cli

SCEN = """
name = "msg"
[simulation]
hours = 1
[model]
{model}
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 1
[traffic]
requests_per_day = 1000
diurnal = "flat"
{traffic}
"""
FIXED = 'prompt = { dist = "fixed", value = 50 }\noutput = { dist = "fixed", value = 20 }'


def _cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli.main([str(a) for a in args])
    return rc, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def _one_line(rc: int, err: list[str], *needles: str, absent: tuple[str, ...] = ()) -> str:
    assert rc == 2 and len(err) == 1, (rc, err)
    for n in needles:
        assert n in err[0], (n, err[0])
    for n in absent:
        assert n not in err[0], (n, err[0])
    return err[0]


@pytest.mark.parametrize("where", ["model.config", "traffic.trace", "scenario"])
def test_symlink_loop_is_called_one(tmp_path, capsys, where):
    """A link that leads back to itself: "symbolic link loop" (before, for model.config: "no
    such file")."""
    loop = tmp_path / ("config.json" if where == "model.config" else "t.csv")
    loop.symlink_to(loop.name)
    model, traffic = 'name = "llama-3.1-8b"', FIXED
    if where == "model.config":
        model = f'config = "{loop.name}"'
    elif where == "traffic.trace":
        traffic = f'trace = "{loop.name}"'
    f = tmp_path / "s.toml"
    if where == "scenario":
        f = tmp_path / "loop.toml"
        f.symlink_to(f.name)
    else:
        f.write_text(SCEN.format(model=model, traffic=traffic))
    rc, err = _cli(capsys, "validate", f)
    _one_line(rc, err, "symbolic link loop", absent=("no such file",))


LAT = ["latency", "--gpu", "h100-sxm"]


M = ["--model", "llama-3.1-8b"]
B1 = ["--batch", "1", "--context", "5"]
LATENCY_CASES = {
    "dev-zero": (["--model", "/dev/zero", *B1], ["--model"], ["scenario"]),
    "loop": (["--model", "LOOP", *B1], ["link loop"], ["catalog"]),
    "context-neg": ([*M, "--batch", "4", "--context", "-5"], ["--context = -5"], ["needs"]),
    "context-0": ([*M, "--batch", "4", "--context", "0"], ["--context = 0"], []),
    "context-20-digits": ([*M, "--batch", "4", "--context", "9" * 20], ["--context", "1..131"], []),
    "prefill-20-digits": ([*M, "--prefill-tokens", "9" * 20], ["--prefill-tokens", "131,072"], []),
    "batch-huge": ([*M, "--batch", "9" * 14, "--context", "9"], ["--batch", "1,000,000"], []),
    "no-context": ([*M, "--batch", "4"], ["--batch needs --context"], []),
    "batch-40k-chars": ([*M, "--batch", "1," * 20_000, "--context", "9"], ["--batch"], []),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LATENCY_CASES))
def test_latency_messages_name_the_flag(tmp_path, capsys, case):
    """`fleetsim latency` errors name the flag at fault, one line, exit 2."""
    args, needles, absent = LATENCY_CASES[case]
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop.name)
    args = [str(loop) if a == "LOOP" else a for a in args]
    rc, err = _cli(capsys, *LAT, *args)
    _one_line(rc, err, *needles, absent=tuple(absent))


def test_latency_in_range_still_answers(capsys):
    """The bounds leave the ordinary questions alone: a decode step at the model's full context
    and a full-context prefill."""
    rc, err = _cli(capsys, *LAT, "--model", "llama-3.1-8b", "--batch", "1,8", "--context", "131072")
    assert rc == 0, err
    rc, err = _cli(capsys, *LAT, "--model", "llama-3.1-8b", "--prefill-tokens", "131072")
    assert rc == 0, err


def test_model_file_that_is_not_a_table(tmp_path, capsys):
    """`--model m.toml` holding `model = 3`: one line naming --model."""
    f = tmp_path / "m.toml"
    f.write_text("model = 3\n")
    rc, err = _cli(capsys, *LAT, "--model", f, "--batch", "1", "--context", "5")
    _one_line(rc, err, "--model")
    assert Path(f).exists()


@pytest.mark.parametrize("cmd", ["validate", "sweep"])
def test_deeply_nested_flag_values_are_one_line(tmp_path, capsys, cmd):
    """`--set key=[[[[...` and `--grid key=[[[[...` 100,000 deep (before: RecursionError
    traceback from the TOML parser)."""
    scen = Path(__file__).parents[1] / "scenarios/default.toml"
    deep = "fleet.replicas=" + "[" * 100_000
    flag = "--set" if cmd == "validate" else "--grid"
    extra = ["--out", tmp_path / "o"] if cmd == "sweep" else []
    rc, err = _cli(capsys, cmd, scen, flag, deep, *extra)
    _one_line(rc, err, "nested deeper than 64")
