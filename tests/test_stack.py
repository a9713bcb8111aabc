"""The serving stack (fleetsim.device.stack): vllm-v1's CUDA-graph floors, exposed overhead and
per-sequence time against hand computation, and eager left as it was."""

from __future__ import annotations

import dataclasses

import pytest

from fleetsim.base.errors import ScenarioError
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile, run_sums
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import (
    STACKS,
    apply_stack,
    capture_max_tokens,
    stack_constants,
)

QWEN3_8B = ModelSpec("qwen3-8b", 36, 4096, 32, 8, 12288, 151936)


def _profile(gpu: str = "h100-sxm") -> RooflineProfile:
    return catalog_profile(gpu, catalog.gpu(gpu))


def test_capture_sizes_follow_vllm():
    # vLLM: max_cudagraph_capture_size = min(2 x max_num_seqs, 512)
    assert capture_max_tokens(1) == 2
    assert capture_max_tokens(8) == 16
    assert capture_max_tokens(256) == 512
    assert capture_max_tokens(4096) == 512


def test_eager_is_the_profile_itself():
    p = _profile()
    assert apply_stack(p, "eager", "h100-sxm", 256) is p
    assert p.serving_stack == "eager" and p.graph_max_tokens == 0


def test_vllm_v1_takes_the_catalog_constants():
    p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 64)
    c = stack_constants("vllm-v1", "h100-sxm")
    assert c is not None
    assert isinstance(p, RooflineProfile)
    assert p.serving_stack == "vllm-v1"
    assert p.overhead_s == c["overhead_s"] and p.per_seq_s == c["per_seq_s"]
    assert p.graph_floor_frac == c["graph_floor_frac"] and p.memory_eff == c["kv_memory_eff"]
    assert p.graph_max_tokens == 128
    for gpu in ("a100-80gb", "h100-sxm", "h200", "b200"):  # every catalog GPU has constants
        assert stack_constants("vllm-v1", gpu) is not None


def test_unknown_stack_names_the_field():
    with pytest.raises(ScenarioError) as e:
        apply_stack(_profile(), "vllm-v0", "h100-sxm", 64)
    assert e.value.field == "fleet.serving_stack" and "vllm-v1" in str(e.value)
    assert STACKS == ("vllm-v1", "eager")


def _floors_s(lm: LatencyModel) -> float:
    """The fixed per-kernel time of one decode iteration under the eager kernel fit, counted by
    hand: per layer four GEMM launches (QKV, output, up, down) and the floors of two norms,
    rope, the residual add and the activation; once the LM head's launch and the embedding."""
    kf = lm._kern
    assert kf is not None
    fx = {op: fixed for op, fixed, _ in kf.elem}
    per_layer = 4 * kf.gemm_launch_s + 2 * fx["norm"] + fx["rope"] + fx["add"] + fx["act"]
    return lm.model.n_layers * per_layer + kf.gemm_launch_s + fx["emb"]


@pytest.mark.parametrize("n", [1, 8, 64, 200])
def test_graph_removes_that_share_of_the_floors(n):
    """Same constants, graph_floor_frac f against 1: a captured decode step is shorter by
    exactly (1 - f) x the kernel floors counted by hand."""
    base = dataclasses.replace(
        _profile(), graph_max_tokens=512, per_seq_s=0.0, overhead_s=0.0, graph_floor_frac=1.0
    )
    f = 0.25
    lm1 = LatencyModel(QWEN3_8B, base, 1)
    lmf = LatencyModel(QWEN3_8B, dataclasses.replace(base, graph_floor_frac=f), 1)
    ctx = n * 700
    d = lm1.decode_time(n, 700) - lmf.decode_time(n, 700)
    assert d == pytest.approx((1 - f) * _floors_s(lm1), rel=1e-9)
    # the FLOPs and bytes of the step do not depend on the stack
    assert lm1.decode_step(n, ctx)[1:] == lmf.decode_step(n, ctx)[1:]


def test_beyond_the_capture_size_the_floors_stay():
    base = dataclasses.replace(_profile(), graph_max_tokens=512, graph_floor_frac=1.0)
    lm1 = LatencyModel(QWEN3_8B, base, 1)
    lmf = LatencyModel(QWEN3_8B, dataclasses.replace(base, graph_floor_frac=0.1), 1)
    # a prefill of 600 tokens with 10 decodes: 610 tokens, above the largest captured graph
    args = (600, 600.0**2, 1, 10, 10 * 900.0)
    assert lm1.iteration(*args) == lmf.iteration(*args)
    # 500 tokens: captured, shorter
    args = (490, 490.0**2, 1, 10, 10 * 900.0)
    assert lmf.iteration(*args)[0] < lm1.iteration(*args)[0]


@pytest.mark.parametrize("n", [1, 33, 256])
def test_per_sequence_time_and_overhead_add_exactly(n):
    p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 256)
    assert isinstance(p, RooflineProfile)
    bare = dataclasses.replace(p, per_seq_s=0.0, overhead_s=0.0)
    t = LatencyModel(QWEN3_8B, p, 1).decode_time(n, 500)
    t0 = LatencyModel(QWEN3_8B, bare, 1).decode_time(n, 500)
    assert t - t0 == pytest.approx(p.overhead_s + n * p.per_seq_s, rel=1e-9)


def test_kv_read_at_the_stack_efficiency():
    """The context term of a decode step is the KV cache read at kv_memory_eff of the
    bandwidth: the time per context token is kv_bytes / (bw x eff)."""
    p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 256)
    assert isinstance(p, RooflineProfile)
    lm = LatencyModel(QWEN3_8B, p, 1)
    slope = (lm.decode_time(32, 2000) - lm.decode_time(32, 1000)) / (32 * 1000)
    kvb = 36 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head_dim x 2 bytes
    assert slope == pytest.approx(kvb / (p.mem_bw_bytes_per_s * p.memory_eff), rel=1e-9)


def test_run_sums_hold_under_the_stack():
    """The closed-form run of k decode steps equals the steps one by one (the engine's fast
    path stays exact with graphs and the per-sequence time)."""
    p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 256)
    lm = LatencyModel(QWEN3_8B, p, 1)
    n, c0, k = 48, 48 * 300.0, 40
    total = sum(lm.decode_step(n, c0 + n * i)[0] for i in range(k))
    assert run_sums(lm.run_coeffs(n), c0, n, k)[0] == pytest.approx(total, rel=1e-12)


def test_vllm_v1_is_faster_than_eager_at_small_batch_and_matches_a_row():
    """ML.ENERGY v3, Qwen3-8B on one H100, lm-arena-chat, max_num_seqs 8: median ITL 8.20 ms
    (data/mlenergy-v3/configurations.csv). Eager with its 3 ms CPU time per step predicts
    9.37 ms (+14%); vllm-v1 is within 5% at the row's batch and mean context (250-token
    prompt + E[L^2]/(2E[L]) = 860 tokens)."""
    eager = LatencyModel(QWEN3_8B, _profile(), 1).decode_time(8, 860)
    v1 = LatencyModel(QWEN3_8B, apply_stack(_profile(), "vllm-v1", "h100-sxm", 8), 1)
    t = v1.decode_time(8, 860)
    assert eager == pytest.approx(9.37e-3, abs=0.01e-3)
    assert t == pytest.approx(8.20e-3, rel=0.05)


@pytest.fixture(scope="module")
def stack_fit() -> dict:
    from fleetsim.calibrate import stack

    return stack.fit(stack.load_rows(stack.default_data_dir()))


@pytest.mark.parametrize("gpu", ["h100-sxm", "b200"])
def test_committed_stack_constants_do_not_drift(stack_fit, gpu):
    """Refit from data/mlenergy-v3: the catalog's vllm-v1 constants are that fit."""
    committed = catalog.stacks()["vllm-v1"][gpu]
    new = stack_fit[gpu]
    for k in ("overhead_s", "per_seq_s", "graph_floor_frac", "kv_memory_eff"):
        assert new[k] == pytest.approx(committed[k], rel=1e-3), k
    assert new["lomo"]["median_abs"] == pytest.approx(committed["lomo_median_err"], abs=1e-3)


def test_h100_step_times_meet_the_issue_goal(stack_fit):
    """Issue 21's goal for median ITL, leave-one-model-out: median <= 10%, worst <= 30%,
    signed median within 5% (H100, decode-dominated rows); eager misses the worst-case goal's
    spirit at +22% and its median sits at +6% (too slow)."""
    h = stack_fit["h100-sxm"]
    assert h["rows"] >= 15
    assert h["lomo"]["median_abs"] <= 0.10 and h["lomo"]["worst_abs"] <= 0.30
    assert abs(h["lomo"]["signed_median"]) <= 0.05
    assert h["eager"]["signed_median"] > 0.05  # eager is slower than vLLM 0.11 (issue 21)
