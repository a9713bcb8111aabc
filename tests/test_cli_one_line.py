"""A usage mistake on any subcommand is one line naming the option, the bad value and the fix
(README's rule), exit code 2 as argparse's; ``--help`` stays argparse's."""

from __future__ import annotations

import pytest

from fleetsim.apps.cli import main as cli_main

S = "scenarios/default.toml"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["run", S, "--hours", "x"],
            "fleetsim run: error: --hours x: not an option of fleetsim run; simulation.hours is a "
            "scenario field (fix: --set simulation.hours=x)",
        ),
        (
            ["validate", S, "--replicas=8"],
            "fleetsim validate: error: --replicas 8: not an option of fleetsim validate; "
            "fleet.replicas is a scenario field (fix: --set fleet.replicas=8)",
        ),
        (
            ["run", S, "--seed", "x"],
            "fleetsim run: error: argument --seed: invalid int value: 'x' (fix: --seed takes a "
            "whole number, e.g. --seed 2)",
        ),
        (
            ["run", S, "--executor", "slurm"],
            "fleetsim run: error: argument --executor: invalid choice: 'slurm' (fix: one of "
            "'local', 'ray')",
        ),
        (
            ["run", S, "--zz"],
            "fleetsim run: error: unrecognized arguments: --zz (fix: fleetsim run --help lists "
            "the options)",
        ),
        (
            ["run"],
            "fleetsim run: error: the following arguments are required: scenario (fix: fleetsim "
            "run --help lists the options)",
        ),
        (
            ["runn"],
            "fleetsim: error: argument cmd: invalid choice: 'runn' (fix: one of 'validate', "
            "'schema', 'run', 'calibrate', 'replay', 'plan', 'latency', 'sweep', 'crossover', "
            "'report', 'compare')",
        ),
        (
            ["sweep", S, "--workers", "two"],
            "fleetsim sweep: error: argument --workers: invalid int value: 'two' (fix: --workers "
            "takes a whole number, e.g. --workers 2)",
        ),
        (
            ["sweep", S, "--hours", "3"],
            "fleetsim sweep: error: --hours 3: not an option of fleetsim sweep; simulation.hours "
            "is a scenario field (fix: --set simulation.hours=3)",
        ),
        (
            ["plan", S, "--hours", "x"],
            "fleetsim plan: error: argument --hours: invalid choice: 'x' (fix: one of 'all', "
            "'peak')",
        ),
        (
            ["plan", S, "--slo-ttft-p99-s", "fast"],
            "fleetsim plan: error: argument --slo-ttft-p99-s: invalid float value: 'fast' (fix: "
            "--slo-ttft-p99-s takes a number, e.g. --slo-ttft-p99-s 2)",
        ),
        (
            ["crossover", S, "--zzz", "1"],
            "fleetsim crossover: error: unrecognized arguments: --zzz 1 (fix: fleetsim crossover "
            "--help lists the options)",
        ),
        (
            ["report"],
            "fleetsim report: error: the following arguments are required: dir (fix: fleetsim "
            "report --help lists the options)",
        ),
        (
            ["latency", "--gpu"],
            "fleetsim latency: error: argument --gpu: expected one argument (fix: give --gpu a "
            "value, e.g. --gpu VALUE; fleetsim latency --help lists the options)",
        ),
        (
            ["calibrate", "--bogus"],
            "fleetsim calibrate: error: unrecognized arguments: --bogus (fix: fleetsim calibrate "
            "--help lists the options)",
        ),
    ],
)
def test_a_usage_mistake_is_one_line_with_the_fix(argv, line, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    cap = capsys.readouterr()
    assert cap.err.splitlines() == [line] and cap.out == ""


@pytest.mark.parametrize("cmd", ["run", "sweep", "plan", "report", "compare", "latency"])
def test_help_is_argparses_own(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fleetsim {cmd} ")
    assert "options:" in out and "-h, --help" in out


def test_run_workers_zero_is_one_line_before_the_folder_and_the_bar(tmp_path):
    """`fleetsim run FILE --workers 0` (progress bar on): the error alone on stderr, exit 2, the
    folder not created (the transient bar's exit printed a blank line ahead of the error)."""
    import subprocess
    import sys

    out = tmp_path / "o"
    p = subprocess.run(
        [sys.executable, "-m", "fleetsim", "run", S, "--workers", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr == "fleetsim: error: --workers 0: must be at least 1 (fix: --workers 2)\n"
    assert p.stdout == "" and not out.exists()


def test_progress_label_counts_workers_in_the_singular_and_plural():
    """The progress bar of sweep / plan / crossover: 'sweep (local, 1 worker)' (it read
    '1 workers')."""
    from fleetsim.apps.executors import LocalExecutor, progress_label

    assert progress_label("sweep", LocalExecutor(1)) == "sweep (local, 1 worker)"
    assert progress_label("plan", LocalExecutor(2)) == "plan (local, 2 workers)"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["crossover", S, "--load", "0"],
            "fleetsim: error: --load 0: the arrival rate over the aggregated fleet's capacity "
            "must be in (0, 10) (fix: e.g. --load 0.7)",
        ),
        (
            ["crossover", S, "--hours", "0"],
            "fleetsim: error: --hours 0: must be at least 1 (fix: e.g. --hours 2)",
        ),
    ],
)
def test_crossover_range_mistakes_name_the_value_and_the_fix(argv, line, capsys):
    """(They read '--load must be in (0, 10) and --hours >= 1' for either, with no value or
    fix.)"""
    assert cli_main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err.splitlines() == [line] and cap.out == ""


def test_set_of_an_alias_and_its_field_is_refused_as_in_a_file(tmp_path, capsys):
    """``--set fleet.max_num_seqs=8 --set fleet.max_batch_size=16`` (vLLM's name and the
    field's) let the later win without a word; the same pair in a file is refused: so is this,
    in one line naming both. The same name twice is an override of an override (the later
    wins), and an alias in the file with the field in --set overrides the file."""
    from fleetsim.config.loading import apply_overrides

    argv = ["validate", S, "--set", "fleet.max_num_seqs=8", "--set", "fleet.max_batch_size=16"]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "fleetsim: error: --set: fleet.max_batch_size = 16: the same field as "
        "fleet.max_num_seqs, which --set also gives (fix: keep one of --set "
        "fleet.max_num_seqs=... and --set fleet.max_batch_size=...)"
    )
    f = tmp_path / "s.toml"
    f.write_text("[fleet]\nmax_num_seqs = 8\nmax_batch_size = 16\n")
    assert cli_main(["validate", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "fleet.max_num_seqs = 8: the same field as fleet.max_batch_size, which is also given "
        "(fix: keep one of fleet.max_batch_size and fleet.max_num_seqs)"
    )
    twice = ["fleet.max_num_seqs=8", "fleet.max_num_seqs=16"]
    assert apply_overrides({}, twice)["fleet"] == {"max_batch_size": 16}
    over = apply_overrides({"fleet": {"max_num_seqs": 8}}, ["fleet.max_batch_size=16"])
    assert over["fleet"] == {"max_batch_size": 16}


def test_validate_power_line_names_only_the_terms_that_apply(capsys):
    """validate's power line named the fp8 fused-MoE K loop (and the routed experts, and the
    communication) for every model: Llama-3.1-8B at TP1 has none of them; Llama-3.1-70B at
    TP4 communicates; Qwen3-30B-A3B fp8 at TP2 has all three (H100 catalog constants)."""

    def line(*sets: str) -> str:
        argv = ["validate", S] + [x for s in sets for x in ("--set", s)]
        assert cli_main(argv) == 0
        err = capsys.readouterr().err
        return next(x for x in err.splitlines() if x.startswith("# power model"))

    head = (
        "# power model (h100-sxm, per GPU): idle 113 W, busy 504 W + 339 W x compute use + "
        "30 W x bandwidth use + 195 W x its KV/state part"
    )
    tail = "; 113 W waiting on the host, capped at 700 W; fitted to ML.ENERGY v3 H100 rows"
    dense1 = line("model.name=llama-3.1-8b", "fleet.tensor_parallel=1")
    assert dense1.startswith(head + tail)
    assert line().startswith(head + "; 113 W while communicating" + tail)  # 70B at TP4
    moe = line("model.name=qwen3-30b-a3b", "model.dtype=fp8", "fleet.tensor_parallel=2")
    assert moe.startswith(
        head + "; 113 W while communicating; 588 W in the fp8 fused-MoE K loop; + 688 W x the "
        "routed experts' compute use" + tail
    )


def test_calibrate_errors_start_as_the_other_commands(capsys):
    """``fleetsim calibrate``'s own errors began "fleetsim calibrate:"; every other command's
    user error begins "fleetsim: error:" (argparse's usage errors keep their
    "fleetsim calibrate: error:")."""
    assert cli_main(["calibrate", "--fit-moe"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fleetsim: error: --fit-moe: only with --from-mlenergy DIR (fix: add --from-mlenergy "
        "data/mlenergy-v3 --out DIR, or leave out --fit-moe)"
    )
    assert cli_main(["calibrate", "--from-mlenergy", "/nonexistent-q46", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fleetsim: error: --from-mlenergy /nonexistent-q46: not a folder (fix: a folder as "
        "data/mlenergy-v3)"
    )
