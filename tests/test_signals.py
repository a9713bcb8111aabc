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
        stdout, stderr = proc.communicate(timeout=30)
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
