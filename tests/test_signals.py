"""SIGINT and SIGTERM stop a ``fleetsim run`` partway: a short message, exit 130/143, and no
partial file in the output folder (no hourly.parquet, no requests.parquet, no temporary files)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# ~400,000 requests: 15-25 s on one core, so a signal 1 s after the start lands mid-run
LONG = """
name = "signal-test"
seed = 1
[simulation]
hours = 24
[model]
name = "llama-3.1-8b"
[fleet]
replicas = 4
[traffic]
requests_per_day = 400000
diurnal = "flat"
prompt = { dist = "uniform", low = 10, high = 400 }
output = { dist = "fixed", value = 50 }
"""


def _started(out: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until the run has begun simulating: the request stream's temporary file exists
    (RequestWriter opens it just before the simulation starts)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if out.exists() and any(p.name.startswith(".fleetsim-tmp-") for p in out.iterdir()):
            time.sleep(1.0)  # well inside the simulation now
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the signal: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("run did not start within the timeout")


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_mid_run_leaves_nothing(tmp_path, sig, code):
    f = tmp_path / "long.toml"
    f.write_text(LONG)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetsim",
            "run",
            str(f),
            "--out",
            str(out),
            "--requests",
            "--quiet",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _started(out, proc)
        t_sig = time.monotonic()
        proc.send_signal(sig)
        _stdout, stderr = proc.communicate(timeout=30)
        stop_s = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (proc.returncode, stderr)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted by " + sig.name in lines[0], stderr
    assert "Traceback" not in stderr
    assert stop_s < 10, f"took {stop_s:.1f} s to stop"
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"partial files left behind: {left}"
    print(f"{sig.name}: exit {proc.returncode} after {stop_s:.2f} s, {lines[0]!r}, left {left}")


# ---------------------------------------------------------------------------------------------
# parallel sweeps and plans (issue #16 item 1): one SIGINT stops them within about a second
# (the workers are terminated, not awaited); a second SIGINT 0.3 s later never hangs.
PARALLEL = """
name = "par"
seed = 1
[simulation]
hours = 24
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 2
[traffic]
requests_per_day = 1200000
diurnal = "flat"
"""


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st != "Z"


@pytest.mark.parametrize(
    "cmd,signals",
    [
        (["sweep", "--grid", "fleet.replicas=1,2,3,4"], 1),
        (["sweep", "--grid", "fleet.replicas=1,2,3,4"], 2),
        (["plan"], 1),
    ],
    ids=["sweep-one-sigint", "sweep-double-sigint", "plan-one-sigint"],
)
def test_parallel_command_stops_within_a_second(tmp_path, cmd, signals):
    f = tmp_path / "par.toml"
    f.write_text(PARALLEL)
    out = tmp_path / "X"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetsim",
            cmd[0],
            str(f),
            *cmd[1:],
            "--workers",
            "2",
            "--out",
            str(out),
            "--quiet",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        workers: set[int] = set()
        while time.monotonic() - t0 < 60:  # wait until both workers are simulating
            kids = _children(proc.pid)
            workers |= {k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()}
            if len(workers) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert len(workers) >= 2, "the workers did not start"
        time.sleep(1.0)
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if signals == 2:  # the second lands while the first is being handled
            time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        stop_s = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert "Traceback" not in stderr, stderr
    assert stop_s < 1.5, f"took {stop_s:.2f} s to stop"  # (1 s + slack for a loaded CI core)
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the command"
    if signals == 1:  # the message tells the truth: the folder this run created is gone
        assert len(lines) == 1, stderr
        assert "nothing was written" in lines[0] and not out.exists(), (lines, out.exists())
    else:  # the first message, the second's, or both; what is left is a stale temporary
        assert 1 <= len(lines) <= 2 and all("interrupted" in x for x in lines), stderr
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert all(n.startswith(".fleetsim-") for n in left), left
    print(f"{cmd[0]} x{signals} SIGINT: exit 130 after {stop_s:.2f} s; {lines[0]!r}")
