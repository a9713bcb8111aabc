"""FlashInfer's TensorRT-LLM fp8 block-scale MoE kernel (``fleet.fp8_moe_kernel``).

The ML.ENERGY benchmark started its DeepSeek-V3.1 / R1 servers on the B200 with
``VLLM_USE_FLASHINFER_MOE_FP8=1`` (ml-energy/benchmark ``configs/vllm/.../B200/
monolithic.env.yaml``, copied as ``data/mlenergy-v3/server_env.csv``), which in vLLM 0.11 runs
fp8 block-quantised experts in FlashInfer's ``trtllm_fp8_block_scale_moe`` (``get_fp8_moe_backend``
in ``vllm/model_executor/layers/quantization/fp8.py``), not in the Triton ``fused_moe_kernel``
whose serial K loop the simulator charges (and draws ``moe_loop_w`` in). Checked here:

* the env data file is read (its rows, an absent file, a malformed one);
* the harness gives exactly the DeepSeek B200 rows that kernel, and their steps zero loop seconds;
* the kernel's grouped-GEMM time by hand count (closed form), DeepSeek-V3.1 EP8, one token;
* the field refuses a GPU without the kernel's constants in one line.
"""

from __future__ import annotations

import pytest

from fleetsim.calibrate import mlenergy as M
from fleetsim.device.moe import flashinfer_moe_gemm_s

DS = "deepseek-ai/DeepSeek-V3.1"
R1 = "deepseek-ai/DeepSeek-R1-0528"


def _rs(c: M.Config, tmp_path, **fleet):
    from fleetsim.api import load
    from fleetsim.config.scenario import resolve

    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "0,250,50\n" * 16)
    d = M.scenario_dict(c, str(trace), 1)
    d["fleet"].update(fleet)
    return resolve(load(d), "")


def test_server_env_file_is_read():
    """server_env.csv holds the three DeepSeek B200 servers' two kernel variables, nothing else;
    every row names the benchmark file it was copied from."""
    env = M.server_env()
    assert set(env) == {
        (DS, "lm-arena-chat", "B200"),
        (DS, "gpqa", "B200"),
        (R1, "gpqa", "B200"),
    }
    for v in env.values():
        assert v == {"VLLM_ATTENTION_BACKEND": "CUTLASS_MLA", "VLLM_USE_FLASHINFER_MOE_FP8": "1"}
    text = (M.DATA_DIR / M.SERVER_ENV_FILE).read_text()
    for line in text.splitlines()[1:]:
        assert "/B200/monolithic.env.yaml," in line


def test_server_env_absent_and_malformed(tmp_path, capsys):
    """A folder without the file (a user's own runs) has no server environment: vLLM's
    defaults, the Triton kernel. A file without the columns is one clear error naming it."""
    from fleetsim.base.errors import UserError

    assert M.server_env(tmp_path) == {}
    (tmp_path / M.SERVER_ENV_FILE).write_text("model,var\nx,y\n")
    with pytest.raises(UserError) as e:
        M.server_env(tmp_path)
    msg = str(e.value)
    assert M.SERVER_ENV_FILE in msg and "model_id" in msg and "\n" not in msg


def test_harness_gives_the_deepseek_b200_rows_the_flashinfer_kernel():
    """Every DeepSeek B200 row, and only those, runs FlashInfer's TensorRT-LLM kernel; the
    scenario the harness builds carries it (and no other row's scenario names a kernel)."""
    cs = M.read_configs()
    fi = {c.key for c in cs if c.fp8_moe_kernel == "flashinfer-trtllm"}
    ds = {c.key for c in cs if c.model_id in (DS, R1) and c.gpu_model == "B200"}
    assert fi == ds and len(ds) == 22
    c = M.find_config(DS, "B200", 8, 8, configs=cs)
    assert M.scenario_dict(c, "t.csv", 1)["fleet"]["fp8_moe_kernel"] == "flashinfer-trtllm"
    q = M.find_config("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "B200", 2, 8, configs=cs)
    assert q.fp8_moe_kernel == "triton"
    assert "fp8_moe_kernel" not in M.scenario_dict(q, "t.csv", 1)["fleet"]
    # the same env on an H100 (SM90) keeps the Triton kernel (FlashInfer's TRTLLM MoE is SM100)
    h = M.Config(**{**c.__dict__, "gpu_model": "H100"})
    assert M.fp8_moe_kernel({"VLLM_USE_FLASHINFER_MOE_FP8": "1"}, h) == "triton"
    assert M.fp8_moe_kernel({"VLLM_USE_FLASHINFER_MOE_FP8": "0"}, c) == "triton"


def test_deepseek_rows_record_no_loop_seconds(tmp_path):
    """DeepSeek-V3.1 on 8 B200s (EP8) at 1 to 512 sequences (graph-captured): with the
    benchmark's kernel the steps spend no time in the Triton K loop (so the power model draws
    no ``moe_loop_w``), with the Triton kernel they did (about half the step); one end-to-end
    run of the harness records zero loop seconds in its window."""
    # the b512 configuration: every batch here is within its CUDA-graph capture size (512), so
    # no step is lifted to the eager host floor and the loop's share is the GPU step's
    c = M.find_config(DS, "B200", 8, 512)
    fi = _rs(c, tmp_path).latency_model()
    tri = _rs(c, tmp_path, fp8_moe_kernel="triton").latency_model()
    for n in (1, 8, 64, 512):
        assert fi.run_coeffs(n).loop_s == 0.0
        assert fi.moe_loop_s(n) == 0.0
        assert tri.run_coeffs(n).loop_s > 0.2 * tri.decode_time(n, 600)
    run = M.simulate_config(M.find_config(DS, "B200", 8, 8))
    assert not run.error
    assert len(run.seg_loop_s) > 100 and float(run.seg_loop_s.sum()) == 0.0


def test_flashinfer_grouped_gemm_by_hand_count(tmp_path):
    """DeepSeek-V3.1 (config.json: 61 layers, the first 3 dense, d_model 7,168, 256 routed
    experts of width 2,048, top-8) on 8 B200s with expert parallelism, one decoding token: each
    GPU holds 32 experts; the token's 8 picks are a 8/256 share of them, so 32 x 8 / 256 = 1
    expert is touched per GPU with 1 routed row. The gate+up GEMM reads that expert's 2 x
    2,048 x 7,168 fp8 weights plus their 128 x 128 fp32 block scales (4 bytes per 16,384
    weights), the row's 7,168 fp8 inputs and writes its 4,096 16-bit outputs; the down GEMM
    2,048 x 7,168 weights, 2,048 inputs, 7,168 outputs; both at ``fi_bw_frac`` of the B200's
    bandwidth (their one row's FLOPs are far below the memory time). The iteration's MoE GEMM
    part is 58 layers x both, with no activation kernel (inside FlashInfer's call) and no loop;
    the routing part holds the call's fixed ``fi_layer_s`` per layer."""
    c = M.find_config(DS, "B200", 8, 8)
    lat = _rs(c, tmp_path).latency_model()
    mf = lat._moe_fit
    assert mf.fi_layer_s > 0 and mf.fi_bw_frac > 0
    bw = lat.profile.mem_bw_bytes_per_s * mf.fi_bw_frac
    scale = 1.0 + 4.0 / 16384.0
    up = (2 * 2048 * 7168 * scale + 7168 + 4096 * 2) / bw
    down = (7168 * 2048 * scale + 2048 + 7168 * 2) / bw
    parts = lat.breakdown(0, 0.0, 0, 1, 300.0)
    # (the mean rank's wait for the busiest at the layer's all-reduce, ep_barrier_wait_s, is
    # that time reported apart: tests/test_moe_ep_barrier.py)
    assert parts["moe_ep_wait"] > 0.0
    assert parts["moe_grouped_gemm"] + parts["moe_ep_wait"] == pytest.approx(
        58 * (up + down), rel=1e-9
    )
    assert lat.moe_loop_s(1) == 0.0
    # the closed form itself, and its compute bound: 2 x rows x n x k FLOPs at the GEMM
    # efficiency of the fp8 peak once the rows are many
    peak, eff = 4.5e15, 0.7
    assert flashinfer_moe_gemm_s(mf, peak, eff, 8e12, 1, 1, 4096, 7168) == pytest.approx(
        (4096 * 7168 * scale + 7168 + 8192) / (8e12 * mf.fi_bw_frac), rel=1e-12
    )
    rows = 60_000.0
    assert flashinfer_moe_gemm_s(mf, peak, eff, 8e12, rows, 32, 4096, 7168) == pytest.approx(
        2 * rows * 4096 * 7168 / (peak * eff), rel=1e-12
    )
    assert flashinfer_moe_gemm_s(mf, peak, eff, 8e12, 0, 32, 4096, 7168) == 0.0


def test_flashinfer_kernel_needs_its_constants(tmp_path):
    """The H100 has no FlashInfer TensorRT-LLM constants (vLLM runs that MoE kernel on SM100
    only): the field is refused in one line naming it, the value and the fix."""
    from fleetsim.api import load
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.scenario import resolve

    c = M.find_config("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "H100", 4, 8)
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,250,50\n")
    d = M.scenario_dict(c, str(trace), 1)
    d["fleet"]["fp8_moe_kernel"] = "flashinfer-trtllm"
    with pytest.raises(ScenarioError) as e:
        resolve(load(d), "")
    msg = str(e.value)
    assert "fleet.fp8_moe_kernel" in msg and "flashinfer-trtllm" in msg and "b200" in msg
    assert "\n" not in msg


def test_validate_and_the_summary_name_the_fp8_moe_kernel(tmp_path):
    """``validate`` and the run summary print the serving stack (issue 21); with
    ``fleet.fp8_moe_kernel`` set they name the kernel too, and the default says nothing more."""
    from fleetsim.results.summary import serving_stack

    c = M.find_config(DS, "B200", 8, 8)  # the harness sets the benchmark's kernel on this row
    assert serving_stack(_rs(c, tmp_path, fp8_moe_kernel="triton")) == "vllm-v1"
    rs = _rs(c, tmp_path)
    assert serving_stack(rs) == "vllm-v1, fp8 MoE kernel flashinfer-trtllm"
    eager = _rs(c, tmp_path, serving_stack="eager")
    assert serving_stack(eager) == "eager, fp8 MoE kernel flashinfer-trtllm"


def test_latency_cli_runs_the_fp8_moe_kernel(capsys):
    """``fleetsim latency --fp8-moe-kernel flashinfer-trtllm`` prints the step of that kernel:
    the same total as the latency model on a profile with the kernel set, unlike Triton's, and
    the H100 (no constants) is refused in one line naming the flag."""
    import json
    from dataclasses import replace

    from fleetsim.apps.cli import main
    from fleetsim.config.schema import FleetSection
    from fleetsim.device import catalog
    from fleetsim.device.latency import LatencyModel
    from fleetsim.device.profile import catalog_profile
    from fleetsim.device.stack import apply_stack

    model = "data/models/deepseek-ai/DeepSeek-V3.1"
    argv = ["latency", "--gpu", "b200", "--model", model, "--tp", "8", "--expert-parallel"]
    argv += ["--batch", "8", "--context", "1000", "--json"]
    assert main(argv) == 0
    triton = json.loads(capsys.readouterr().out)[0]["total_s"]
    assert main([*argv, "--fp8-moe-kernel", "flashinfer-trtllm"]) == 0
    fi = json.loads(capsys.readouterr().out)[0]["total_s"]
    from fleetsim.apps.latency import _model

    m = _model(model, None)
    prof = apply_stack(
        catalog_profile("b200", catalog.gpu("b200")),
        "vllm-v1",
        "b200",
        FleetSection().max_batch_size,
    )
    want = LatencyModel(m, replace(prof, fp8_moe_kernel="flashinfer-trtllm"), 8, dp=1,
                        expert_parallel=True).iteration(0, 0.0, 0, 8, 8000.0)[0]  # fmt: skip
    assert fi == pytest.approx(want, rel=1e-12)
    assert abs(fi - triton) > 1e-4  # 19.6 vs 18.9 ms: a different kernel
    code = main([*argv[:2], "h100-sxm", *argv[3:], "--fp8-moe-kernel", "flashinfer-trtllm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--fp8-moe-kernel" in err and "\n" not in err
