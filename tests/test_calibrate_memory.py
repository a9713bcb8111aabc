"""Memory and time of ``calibrate --quick`` and ``replay`` on a CPU (issue #15).

The fast tests check the pieces: the CPU vocabulary cut keeps every other dimension and counts
the same FLOPs the torch model runs, and ``small-lm`` is the documented small decoder. The slow
ones run the commands as a user does and measure them: peak resident set of ``calibrate --quick``
under 1.5 GB (it was 4.4 GB), and a 30-request ``replay`` under 1.5 GB and a minute of CPU time
(it took 219 s and 3.5 GB).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetsim.calibrate.cli import CPU_VOCAB_ROWS, cpu_sized, resolve_model

GB = 1e9


def test_cpu_vocab_cut_keeps_the_layers_and_counts_the_flops_it_runs():
    torch = pytest.importorskip("torch")
    from fleetsim.calibrate.model import TorchTransformer, flop_check

    spec = dataclasses.replace(resolve_model("llama-3.1-8b", "fp32"), n_layers=1)
    cut = cpu_sized(spec)
    assert cut.vocab_size == CPU_VOCAB_ROWS == 2048
    assert dataclasses.replace(cut, vocab_size=spec.vocab_size) == spec
    # the output projection: 128,256 x 4,096 fp32 = 2.1 GB before, 34 MB after
    assert spec.lm_head_params * 4 == pytest.approx(2.10e9, rel=1e-2)
    assert cut.lm_head_params * 4 == 2048 * 4096 * 4
    assert cpu_sized(cut) == cut  # already small: unchanged
    small = dataclasses.replace(cut, d_model=256, n_heads=4, n_kv_heads=2, d_ff=512)
    m = TorchTransformer(small, dtype="fp32", embed_rows=512)
    with torch.inference_mode():
        fc = flop_check(m, batch=2, prompt_tokens=8, context_tokens=16)
    assert abs(fc["prefill_rel_err"]) < 1e-9 and abs(fc["decode_rel_err"]) < 1e-9


def test_small_lm_is_the_documented_config():
    s = resolve_model("small-lm", "fp32")
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_ff, s.vocab_size) == (
        4,
        512,
        8,
        2,
        1536,
        32000,
    )
    assert s.total_params == 44_826_624 and s.weight_bytes == 4 * 44_826_624
    doc = (Path(__file__).resolve().parents[1] / "docs/validation.md").read_text()
    assert "d_model = 512\nn_heads = 8\nn_kv_heads = 2\nd_ff = 1536\nvocab_size = 32000" in doc


def _measure(args: list[str]) -> tuple[float, float, float]:
    """Run ``fleetsim ARGS`` in a child: its own peak RSS (bytes), CPU and wall seconds."""
    t0 = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "fleetsim", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    ) as p:
        assert p.stderr is not None
        err = p.stderr.read().decode(errors="replace")
        _, status, ru = os.wait4(p.pid, 0)  # this child's own rusage (not the children's max)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, err[-2000:]
    return ru.ru_maxrss * 1024.0, ru.ru_utime + ru.ru_stime, wall


@pytest.mark.slow
def test_quick_calibration_peak_memory(tmp_path):
    pytest.importorskip("torch")
    rss, cpu, wall = _measure(["calibrate", "--quick", "--out", str(tmp_path / "p.json")])
    print(f"\ncalibrate --quick: peak RSS {rss / GB:.2f} GB, CPU {cpu:.1f} s, wall {wall:.1f} s")
    assert rss < 1.5 * GB
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["model_config"]["vocab_size"] == CPU_VOCAB_ROWS and prof["embed_rows"] == 4096


@pytest.mark.slow
def test_thirty_request_replay_is_light(tmp_path):
    pytest.importorskip("torch")
    rss, cpu, wall = _measure(["replay", "--trace", "poisson:30:1", "--out", str(tmp_path / "r")])
    facts = json.loads((tmp_path / "r" / "replay.json").read_text())
    print(f"\nreplay 30: peak RSS {rss / GB:.2f} GB, CPU {cpu:.1f} s, wall {wall:.1f} s")
    assert facts["model"] == "small-lm" and facts["torch_threads"] == 1
    assert facts["completed_real"] == facts["completed_sim"] == 30
    # (the trace alone spans 27 s of wall time: the CPU time is the steadier figure)
    assert rss < 1.5 * GB and cpu < 60.0
