"""Calibration: torch model FLOPs vs the analytic count, KV-cache decoding, a quick CPU run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetsim.device.modelspec import ModelSpec

REPO = Path(__file__).resolve().parents[1]

GQA = ModelSpec(
    "tiny-gqa",
    n_layers=2,
    d_model=128,
    n_heads=8,
    n_kv_heads=2,
    d_ff=344,
    vocab_size=1000,
    dtype="fp32",
)
MOE = ModelSpec(
    "tiny-moe",
    n_layers=2,
    d_model=128,
    n_heads=8,
    n_kv_heads=2,
    d_ff=96,
    vocab_size=1000,
    n_experts=4,
    n_active_experts=2,
    dtype="fp32",
)
GELU_TIED = ModelSpec(
    "tiny-gelu",
    n_layers=2,
    d_model=128,
    n_heads=4,
    n_kv_heads=4,
    d_ff=512,
    vocab_size=1000,
    mlp="gelu",
    tied_embeddings=True,
    dtype="fp32",
)

# a small dense model with enough work per call that timings are not pure noise
SMALL = ModelSpec(
    "small-gqa",
    n_layers=2,
    d_model=512,
    n_heads=8,
    n_kv_heads=2,
    d_ff=1536,
    vocab_size=8000,
    max_context_tokens=4096,
    dtype="fp32",
)


def test_import_does_not_import_torch():
    code = (
        "import sys, fleetsim, fleetsim.calibrate.cli; "
        "raise SystemExit(1 if 'torch' in sys.modules else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_missing_torch_prints_install_hint():
    code = (
        "import sys; sys.modules['torch'] = None; from fleetsim.calibrate.cli import main; "
        "raise SystemExit(main(['--model', 'llama-3.1-8b']))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "fleetsim: error: fleetsim calibrate needs torch (fix: pip install -e '.[calibrate]', "
        "or pip install torch==2.13.0)"
    ]


@pytest.mark.torch
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "llama-9000"], "unknown catalog name"),
        (["--model", "llama-3.1-8b", "--layers", "0"], "--layers 0"),
        (["--model", "llama-3.1-8b", "--layers", "33"], "between 1 and"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys):
    pytest.importorskip("torch")
    from fleetsim.calibrate.cli import main

    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.torch
def test_cuda_unavailable_is_a_user_error(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from fleetsim.calibrate.cli import main

    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.torch
def test_model_from_toml_file(tmp_path):
    pytest.importorskip("torch")
    from fleetsim.calibrate.cli import _Usage, resolve_model

    f = tmp_path / "mine.toml"
    f.write_text(
        "n_layers = 2\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nd_ff = 128\nvocab_size = 100\n"
    )
    spec = resolve_model(str(f), "fp32")
    assert spec.name == "mine" and spec.n_kv_heads == 2 and spec.dtype == "fp32"
    f.write_text("n_layers = 2\nbogus = 1\n")
    with pytest.raises(_Usage, match="bogus"):
        resolve_model(str(f), "fp32")


@pytest.mark.torch
@pytest.mark.parametrize("spec", [GQA, MOE, GELU_TIED], ids=lambda s: s.name)
@pytest.mark.parametrize("batch, prompt, ctx", [(1, 7, 9), (3, 33, 100)])
def test_flop_counter_matches_modelspec(spec, batch, prompt, ctx):
    pytest.importorskip("torch")
    from fleetsim.calibrate.model import TorchTransformer, flop_check

    fc = flop_check(TorchTransformer(spec, dtype="fp32"), batch, prompt, ctx)
    assert abs(fc["prefill_rel_err"]) < 0.02, fc
    assert abs(fc["decode_rel_err"]) < 0.02, fc


@pytest.mark.torch
@pytest.mark.parametrize("spec", [GQA, MOE, GELU_TIED], ids=lambda s: s.name)
def test_kv_cache_decoding_matches_full_forward(spec):
    torch = pytest.importorskip("torch")
    from fleetsim.calibrate.model import TorchTransformer

    m = TorchTransformer(spec, dtype="fp32", seed=3)
    prompt, extra, batch = 11, 6, 2
    with torch.inference_mode():
        toks = m.random_tokens(batch, prompt + extra, seed=5)
        m.allocate_cache(batch, prompt + extra)
        got = [m.prefill(toks[:, :prompt])]
        for j in range(prompt, prompt + extra):
            got.append(m.decode_step(toks[:, j]))
        for j, logits in enumerate(got):
            ref_model_tokens = toks[:, : prompt + j]
            m2 = TorchTransformer(spec, dtype="fp32", seed=3)
            m2.allocate_cache(batch, prompt + extra)
            ref = m2.prefill(ref_model_tokens)
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    assert m.pos == prompt + extra


@pytest.mark.torch
def test_quick_cpu_calibration_writes_an_honest_profile(tmp_path):
    pytest.importorskip("torch")
    import torch

    from fleetsim.calibrate import run
    from fleetsim.calibrate.fit import predicted_vs_measured
    from fleetsim.device.latency import LatencyModel
    from fleetsim.device.profile import load_profile

    out = tmp_path / "profiles" / "cpu-small.json"
    prof = run.calibrate(
        SMALL, device=torch.device("cpu"), out=out, quick=True, budget_s=20.0, log=lambda s: None
    )
    assert out.exists() and (out.parent / prof["grid_file"]).exists()
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave nothing behind
    raw = json.loads(out.read_text())
    assert raw["device"]["type"] == "cpu" and raw["device"]["dtype"] == "fp32"
    assert raw["model_config"]["n_layers"] == SMALL.n_layers
    assert raw["power"] is None or raw["power"]["method"] == "rapl"
    assert abs(raw["flop_check"]["prefill_rel_err"]) < 0.02
    assert raw["fit"]["n_points"] >= 6
    # both fits are reported; the one used is the better by rms relative error
    q = raw["fit"]
    assert q["compute_eff"] in ("table", "hyperbolic")
    assert q["n_points"] == q["hyperbolic"]["n_points"] == q["table"]["n_points"]
    assert q["rms_rel_err"] == min(q["hyperbolic"]["rms_rel_err"], q["table"]["rms_rel_err"])
    assert (raw["compute_eff_table"] is not None) == (q["compute_eff"] == "table")

    profile, sha = load_profile(out)
    assert len(sha) == 64 and profile.peak_flops > 0 and profile.mem_bw_bytes_per_s > 0
    rows = predicted_vs_measured(out)
    assert len(rows) == raw["fit"]["n_points"]
    worst = max(abs(r["rel_err"]) for r in rows)
    assert worst <= raw["fit"]["max_rel_err"] * (1 + 1e-9) + 1e-12  # the report is honest
    # and it is the LatencyModel the simulator uses
    lm = LatencyModel(ModelSpec(**raw["model_config"]), profile)
    r0 = next(r for r in rows if r["phase"] == "decode" and r["n_layers"] == SMALL.n_layers)
    assert lm.decode_time(r0["batch"], r0["context_tokens"]) == pytest.approx(r0["predicted_s"])
    # a CPU under a shared test runner is noisy; the roofline should still be in the right ballpark
    assert raw["fit"]["max_rel_err"] < 1.0, raw["fit"]


@pytest.mark.torch
def test_cli_standalone_quick(tmp_path):
    pytest.importorskip("torch")
    spec_file = tmp_path / "small.toml"
    fields = {
        k: v
        for k, v in dataclasses.asdict(SMALL).items()
        if k not in ("name", "dtype", "kv_dtype", "derived") and v is not None
    }
    spec_file.write_text(
        "".join(
            f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
            for k, v in fields.items()
        )
    )
    out = tmp_path / "p.json"
    env = {**os.environ, "COLUMNS": "120"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "calibrate",
            "--model",
            str(spec_file),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--budget-s",
            "10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "power was not measured" in r.stdout or "power" in json.loads(out.read_text())
    assert json.loads(out.read_text())["model"] == "small"
