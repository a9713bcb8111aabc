"""Output is all or nothing (issue #16, items 2, 5, 7, 10, 13).

A run's files are staged in ``<out>/.fleetsim-tmp-<pid>-<rand>/`` and moved into place together
under the folder's lock (results/output.py ``RunOutput``). These tests break the run at each
point that can fail (a write, the report, the file-size limit, a full or read-only disk, an
interrupt, SIGKILL, a concurrent run) and check the folder byte for byte: the previous run's
files survive, nothing temporary stays, and every problem is one line with exit 2.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetsim.apps import cli
from fleetsim.results import output

SCEN = """
name = "out-test"
seed = 2
[simulation]
hours = 1
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


def _cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    return rc, err


def _scenario(tmp_path: Path) -> Path:
    f = tmp_path / "s.toml"
    f.write_text(SCEN)
    return f


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every entry of ``d`` (recursively) with its bytes: the folder's exact state."""
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(d.rglob("*"))
    }


@pytest.fixture
def run1(tmp_path, capsys):
    """A folder holding a complete first run (hourly + requests), and its exact contents."""
    f = _scenario(tmp_path)
    out = tmp_path / "X"
    rc, err = _cli(capsys, "run", f, "--out", out, "--requests", "--quiet")
    assert rc == 0, err
    snap = _snapshot(out)
    assert {"hourly.parquet", "requests.parquet"} <= set(snap)
    return f, out, snap


def test_failed_write_keeps_the_previous_run(run1, capsys, monkeypatch):
    """Item 2: the new hourly table fails to write (EFBIG) after requests.parquet was done."""
    f, out, snap = run1
    from fleetsim.apps import simulate as simulate_mod

    def efbig(*_a, **_k):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(simulate_mod, "write_outputs", efbig)
    rc, err = _cli(capsys, "run", f, "--out", out, "--force", "--requests", "--seed", 9)
    assert rc == 2 and len(err) == 1 and "file-size limit" in err[0], err
    assert _snapshot(out) == snap  # run 1 intact: both files, same bytes, no temporaries


def test_file_size_limit_is_found_before_simulating(run1, tmp_path):
    """Item 2 as reported: ``ulimit -f 17; fleetsim run S --out X --force --requests``."""
    f, out, snap = run1
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetsim",
            "run",
            str(f),
            "--out",
            str(out),
            "--force",
            "--requests",
            "--seed",
            "2",
            "--quiet",
        ],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (17 * 1024, 17 * 1024)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "file-size limit" in lines[0] and "Traceback" not in p.stderr
    assert _snapshot(out) == snap


def test_interrupt_in_the_report_step_keeps_the_previous_run(run1, capsys, monkeypatch):
    """Item 10: SIGINT while the report is drawn (run --report): nothing of run 2 appears, and
    the message says the folder is unchanged."""
    f, out, snap = run1
    from fleetsim.apps import report

    def interrupted(*_a, **_k):
        raise cli.Interrupted(signal.SIGINT)

    monkeypatch.setattr(report, "make_plots", interrupted)
    rc, err = _cli(capsys, "run", f, "--out", out, "--force", "--report", "--seed", 3)
    assert rc == 130 and len(err) == 1 and "previous contents are unchanged" in err[0], err
    assert _snapshot(out) == snap
    # `fleetsim report X` interrupted after the first plot: no cost.png without report.html
    calls = {"n": 0}
    real = report._png

    def second_png_interrupts(fig):
        calls["n"] += 1
        if calls["n"] == 2:
            raise cli.Interrupted(signal.SIGINT)
        return real(fig)

    monkeypatch.undo()
    monkeypatch.setattr(report, "_png", second_png_interrupts)
    rc, err = _cli(capsys, "report", out, "--no-flat")
    assert rc == 130 and len(err) == 1, err
    assert _snapshot(out) == snap


def test_report_adds_to_the_run_and_run_report_commits_together(run1, capsys):
    _f, out, snap = run1
    rc, err = _cli(capsys, "report", out, "--no-flat")
    assert rc == 0, err
    now = _snapshot(out)
    assert {k: v for k, v in now.items() if k in snap and k != output.MANIFEST_NAME} == {
        k: v for k, v in snap.items() if k != output.MANIFEST_NAME
    }
    assert {"report.html", "report.md", "cost.png", "peak.json"} <= set(now)
    assert not [k for k in now if k.startswith(".fleetsim-tmp-") or k == output.LOCK_NAME]


def test_force_replaces_only_fleetsims_files(run1, capsys):
    """--force: run 1's files (requests.parquet included, which run 2 does not write) go; a
    user's files (notes, their own trace.csv) stay."""
    f, out, _ = run1
    (out / "notes.txt").write_text("mine")
    (out / "trace.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n")
    rc, err = _cli(capsys, "run", f, "--out", out, "--force", "--quiet", "--seed", 4)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == [output.MANIFEST_NAME, "hourly.parquet", "notes.txt", "trace.csv"]
    assert (out / "notes.txt").read_text() == "mine"
    assert output.previous_outputs(out) == [output.MANIFEST_NAME, "hourly.parquet"]
    assert output.remove_previous_outputs(out) == [output.MANIFEST_NAME, "hourly.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "trace.csv"]


def test_stale_temporaries_are_cleaned(tmp_path, capsys):
    """Item 5: temporaries of killed runs (a dead pid in the name, or the old naming) do not
    make the folder "not empty" and are removed; a live process's are left alone."""
    f = _scenario(tmp_path)
    out = tmp_path / "X"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".fleetsim-tmp-{dead.pid}-0a0b0c0d").mkdir()
    (out / f".fleetsim-tmp-{dead.pid}-0a0b0c0d" / "hourly.parquet").write_bytes(b"x" * 100)
    (out / ".fleetsim-tmp-requests.parquet.k2j3h4").write_bytes(b"partial")
    (out / output.LOCK_NAME).write_text(str(dead.pid))  # a lock file nobody holds
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [output.MANIFEST_NAME, "hourly.parquet"]


@pytest.mark.parametrize("case", ["file", "under-file", "dangling-link", "hourly-is-dir"])
def test_out_path_problems_are_one_line_before_simulating(tmp_path, capsys, monkeypatch, case):
    """Item 7: each --out problem is one line, exit 2, and found before any simulation."""
    f = _scenario(tmp_path)
    out = tmp_path / "X"
    if case == "file":
        out.write_text("a file")
    elif case == "under-file":
        (tmp_path / "F").write_text("a file")
        out = tmp_path / "F" / "sub"
    elif case == "dangling-link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        (out / "hourly.parquet").mkdir(parents=True)
    from fleetsim.apps import simulate as simulate_mod

    def never(*_a, **_k):
        raise AssertionError("simulated before the --out check")

    monkeypatch.setattr(simulate_mod, "simulate_pod", never)
    rc, err = _cli(capsys, "run", f, "--out", out, "--force", "--quiet")
    assert rc == 2 and len(err) == 1 and err[0].startswith("fleetsim: error: --out"), err


@pytest.mark.parametrize(
    "code,needle",
    [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"), (errno.EACCES, "permission")],
    ids=["read-only", "full", "denied"],
)
def test_unwritable_out_is_one_line_and_leaves_no_folder(
    tmp_path, capsys, monkeypatch, code, needle
):
    """Item 7: a read-only file system, a full disk (the probe write fails; no empty folder is
    left behind), permission denied: one line before simulating."""
    f = _scenario(tmp_path)
    out = tmp_path / "new" / "X"

    def failing_probe(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(output, "_write_probe", failing_probe)
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet")
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "new").exists()  # the folders this run created are gone again


def test_concurrent_runs_into_one_folder(tmp_path):
    """Item 13: a second run into a folder that a running one holds is refused at once (the
    not-empty check and the write are one step under the folder's lock)."""
    slow = _scenario(tmp_path).read_text().replace("hours = 1", "hours = 24")
    slow = slow.replace("requests_per_day = 20000", "requests_per_day = 400000")
    (tmp_path / "slow.toml").write_text(slow)
    out = tmp_path / "X"
    a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetsim",
            "run",
            str(tmp_path / "slow.toml"),
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        while not (out / output.LOCK_NAME).exists() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        b = subprocess.run(
            [
                sys.executable,
                "-m",
                "fleetsim",
                "run",
                str(tmp_path / "s.toml"),
                "--out",
                str(out),
                "--quiet",
                "--force",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [x for x in b.stderr.splitlines() if x.strip()]
        assert b.returncode == 2 and len(lines) == 1, b.stderr
        assert f"another fleetsim run (pid {a.pid})" in lines[0]
        assert a.poll() is None  # the first run was not disturbed
    finally:
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=30)
    assert a.returncode == 130, err
    assert not out.exists()  # the first run created the folder and took it away again


def test_sigkill_leaves_a_temporary_that_the_next_run_cleans(tmp_path):
    """Item 5: SIGKILL mid-run leaves the staging folder; the next run (no --force) recognises
    it as stale, removes it and writes normally."""
    slow = SCEN.replace("hours = 1", "hours = 24").replace("20000", "400000")
    (tmp_path / "slow.toml").write_text(slow)
    out = tmp_path / "X"
    a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetsim",
            "run",
            str(tmp_path / "slow.toml"),
            "--out",
            str(out),
            "--requests",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if out.exists() and any(p.name.startswith(".fleetsim-tmp-") for p in out.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(0.5)
    a.kill()
    a.wait()
    left = sorted(p.name for p in out.iterdir())
    assert any(n.startswith(".fleetsim-tmp-") for n in left), left
    (tmp_path / "s.toml").write_text(SCEN)
    b = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetsim",
            "run",
            str(tmp_path / "s.toml"),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert b.returncode == 0, b.stderr
    assert sorted(p.name for p in out.iterdir()) == [output.MANIFEST_NAME, "hourly.parquet"]


def test_replay_never_overwrites_a_users_trace(tmp_path, capsys):
    """Item 13: ``replay --out DIR`` into a folder with the user's own trace.csv is refused
    before anything runs; a trace.csv that a previous replay wrote (in the manifest) is not
    foreign."""
    out = tmp_path / "R"
    out.mkdir()
    mine = "arrival_s,prompt_tokens,output_tokens\n0.0,5,5\n"
    (out / "trace.csv").write_text(mine)
    rc, err = _cli(
        capsys, "replay", "--trace", "poisson:5:1", "--model", "llama-3.1-8b", "--out", out
    )
    assert rc == 2 and len(err) == 1 and "trace.csv there was not written by fleetsim" in err[0]
    assert (out / "trace.csv").read_text() == mine
    assert sorted(p.name for p in out.iterdir()) == ["trace.csv"]
    (out / output.MANIFEST_NAME).write_text('{"files": ["trace.csv"]}')
    assert "trace.csv" in output.previous_outputs(out)


def test_temporary_names_carry_the_pid(tmp_path):
    """Item 5: single-file temporaries (profiles, reports) name their process, so a killed
    writer's leftovers are recognised as stale."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p = output.temp_path(tmp_path / "profile.json")
    assert p.name.startswith(f".fleetsim-tmp-{os.getpid()}-profile.json.")
    left = tmp_path / f".fleetsim-tmp-{dead.pid}-peak.json.abc123"
    left.write_text("{}")
    assert output.clean_stale(tmp_path) == [left.name]
    assert p.exists()  # ours (a live pid) is kept
