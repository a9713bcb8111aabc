"""The serving stack (fleetsim.device.stack): vllm-v1's CUDA-graph floors, exposed overhead and
per-sequence time against hand computation, and eager left as it was."""

from __future__ import annotations

import dataclasses

import pytest

from fleetsim.base.errors import ScenarioError
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile, run_sums
from fleetsim.device.modelspec import ModelSpec, model_from_catalog
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
    # the exposed CPU time of a median step plus the mean host stall per step
    assert p.overhead_s == c["overhead_s"] + c["host_stall_s"] and p.per_seq_s == c["per_seq_s"]
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
    keys = ("overhead_s", "per_seq_s", "graph_floor_frac", "kv_memory_eff")
    keys += ("attn_unit_bw_bytes_per_s", "ar_floor_s", "ar_bw_bytes_per_s", "linear_state_eff")
    keys += ("host_stall_s", "one_gpu_overhead_s", "dense_gemm_bw_eff")
    for k in keys:
        assert new.get(k, 0.0) == pytest.approx(committed.get(k, 0.0), rel=1e-3), k
    assert new["lomo"]["median_abs"] == pytest.approx(committed["lomo_median_err"], abs=1e-3)
    lo = new["hs_lomo"]["median_abs"]
    assert lo == pytest.approx(committed["host_stall_lomo_median_err"], abs=1e-3)
    lo = new["ls_lomo"]["median_abs"]
    assert lo == pytest.approx(committed["linear_state_lomo_median_err"], abs=1e-3)
    if gpu == "b200":
        lo = new["og_lomo"]["median_abs"]
        assert lo == pytest.approx(committed["one_gpu_lomo_median_err"], abs=1e-3)
    if gpu == "h100-sxm":
        lo = new["ar_lomo"]["median_abs"]
        assert lo == pytest.approx(committed["ar_lomo_median_err"], abs=1e-3)


def test_derived_gpus_take_the_h100_constants_and_their_own_nvlink():
    """A100 and H200 have no ML.ENERGY rows: the H100's fitted constants, the all-reduce's
    bus bandwidth at the GPU's own NVLink rate (catalog link_bw)."""
    st = catalog.stacks()["vllm-v1"]
    h = st["h100-sxm"]
    for gpu in ("a100-80gb", "h200"):
        d = st[gpu]
        assert d["provenance"] == "derived"
        for k in ("overhead_s", "per_seq_s", "kv_memory_eff", "ar_floor_s", "host_stall_s"):
            assert d[k] == h[k], k
        assert d["ar_bw_bytes_per_s"] == pytest.approx(_profile(gpu).link_bw_bytes_per_s)
    assert h["attn_unit_bw_bytes_per_s"] == 0.0  # FlashAttention's split-KV decode: no cap
    # TRTLLM-gen's split-KV decode on the B200: no cap either; its one-GPU step floor instead
    assert st["b200"]["attn_unit_bw_bytes_per_s"] == 0.0
    assert 0.0 < st["b200"]["one_gpu_overhead_s"] < 0.5e-3
    assert st["b200"]["dense_gemm_bw_eff"] == pytest.approx(0.75)
    for g in ("h100-sxm", "a100-80gb", "h200"):
        assert st[g].get("one_gpu_overhead_s", 0.0) == 0.0
        assert st[g].get("dense_gemm_bw_eff", 0.0) == 0.0  # the kernel fit's stream


def test_h100_step_times_meet_the_issue_goal(stack_fit):
    """Issue 21's goal for median ITL, leave-one-model-out: median <= 10%, worst <= 30%,
    signed median within 5% (H100, decode-dominated rows); eager misses the worst-case goal's
    spirit at +22% and its median sits at +6% (too slow)."""
    h = stack_fit["h100-sxm"]
    assert h["rows"] >= 15
    assert h["lomo"]["median_abs"] <= 0.10 and h["lomo"]["worst_abs"] <= 0.30
    assert abs(h["lomo"]["signed_median"]) <= 0.05
    assert h["eager"]["signed_median"] > 0.05  # eager is slower than vLLM 0.11 (issue 21)


# -- decode attention's per-unit bandwidth (B200, FlashInfer/TRTLLM-gen decode) ---------------

QWEN3_32B = ModelSpec("qwen3-32b", 64, 5120, 64, 8, 25600, 151936, head_dim=128)


@pytest.mark.parametrize("n", [1, 8, 16, 64, 300])
def test_kv_read_is_capped_by_the_work_units(n):
    """With attn_unit_bw u, a decode step reads its KV at min(bw x eff, n x kv_heads x u):
    the time per context token is kv_bytes / that bandwidth, by hand."""
    p = dataclasses.replace(
        apply_stack(_profile("b200"), "vllm-v1", "b200", 512), attn_unit_bw_bytes_per_s=7e9
    )
    lm = LatencyModel(QWEN3_32B, p, 1)
    kvb = 64 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head_dim x 2 bytes
    bw = min(p.mem_bw_bytes_per_s * p.memory_eff, n * 8 * 7e9)
    slope = (lm.decode_time(n, 3000) - lm.decode_time(n, 1000)) / (n * 2000)
    assert slope == pytest.approx(kvb / bw, rel=1e-9)


def test_below_saturation_the_kv_read_does_not_grow_with_the_batch():
    """The B200's GPQA rows: below saturation each work unit streams its own context, so the
    step's KV time is one sequence's context over u, whatever the batch (Qwen3-32B, 5,500
    tokens: 64 layers x 5,500 x 256 bytes per head / u)."""
    u = 7e9
    p = dataclasses.replace(
        apply_stack(_profile("b200"), "vllm-v1", "b200", 512), attn_unit_bw_bytes_per_s=u
    )
    lm = LatencyModel(QWEN3_32B, p, 1)
    per_unit = 64 * 5500 * 2 * 128 * 2 / u  # bytes one (sequence, KV head) reads / u
    for n in (4, 8, 16):
        c = lm.run_coeffs(n)
        assert c.b2 * n * 5500 == pytest.approx(per_unit, rel=1e-9)
    # an uncapped profile (the H100's) reads at the bandwidth: 8 sequences take 1/8 of that
    h = LatencyModel(QWEN3_32B, apply_stack(_profile(), "vllm-v1", "h100-sxm", 512), 1)
    assert h.att_m_for(8) == h.att_m_for(1)


def test_the_cap_holds_in_mixed_steps_and_runs():
    """Mixed steps read the decoders' KV at the same capped rate, and the closed-form run of
    capped decode steps equals the steps one by one."""
    p = dataclasses.replace(
        apply_stack(_profile("b200"), "vllm-v1", "b200", 512), attn_unit_bw_bytes_per_s=7e9
    )
    lm = LatencyModel(QWEN3_32B, p, 1)
    n, c0, k = 8, 8 * 4000.0, 25
    total = sum(lm.decode_step(n, c0 + n * i)[0] for i in range(k))
    assert run_sums(lm.run_coeffs(n), c0, n, k)[0] == pytest.approx(total, rel=1e-12)
    lo = lm.iteration(100, 100.0**2, 1, n, 1000.0 * n)[0]
    hi = lm.iteration(100, 100.0**2, 1, n, 2000.0 * n)[0]
    assert (hi - lo) / (1000.0 * n) == pytest.approx(lm.att_m_for(n), rel=1e-9)


def test_the_cap_is_for_one_gpu_engines():
    """Multi-GPU engines keep the plain read (the multi-GPU B200 rows decode long contexts
    at small batch fast: Qwen3-235B-A22B-Thinking GPQA, 8 sequences, 16.5 ms on 8 GPUs)."""
    p = dataclasses.replace(_profile("b200"), attn_unit_bw_bytes_per_s=1e9)
    one = LatencyModel(QWEN3_32B, p, 1)
    assert one.att_m_for(4) > one.att_m_for(1000)
    for tp in (2, 4, 8):
        lm = LatencyModel(QWEN3_32B, p, tp)
        assert lm.att_m_for(1) == lm.att_m_for(1000)


def test_latent_attention_keeps_the_plain_read():
    """Latent attention (MLA) runs other decode kernels on Blackwell: no per-unit cap."""
    p = dataclasses.replace(_profile("b200"), attn_unit_bw_bytes_per_s=1e9)
    mla = QWEN3_32B.evolve(kv_lora_rank=512, qk_rope_head_dim=64)
    assert mla.is_mla
    lm = LatencyModel(mla, p, 1)
    assert lm.att_m_for(4) == lm.att_m_for(1000) == lm.att_m_for(1)
    gqa = LatencyModel(QWEN3_32B, p, 1)
    assert gqa.att_m_for(4) > gqa.att_m_for(1000)


# -- vLLM's custom all-reduce -------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 64, 256])
def test_custom_allreduce_is_floor_plus_bytes(n):
    """Under vllm-v1 with ar_* set, a TP2 decode step's all-reduces are 2 per layer, each
    ar_floor + 2 (tp - 1) / tp x bytes / ar_bw, by hand."""
    p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 256)
    assert isinstance(p, RooflineProfile) and p.ar_floor_s > 0
    lm = LatencyModel(QWEN3_32B, p, 2)
    comm = lm.linear_parts(n, 0)[2]
    one = p.ar_floor_s + 1.0 * n * 5120 * 2 / p.ar_bw_bytes_per_s
    assert comm == pytest.approx(2 * 64 * one, rel=1e-12)


def test_large_messages_and_eager_use_the_measured_table():
    """Messages over 8 MiB leave the custom all-reduce (vLLM sends them to NCCL): the step's
    all-reduce is then the kernel fit's table, as eager has it."""
    from fleetsim.device.kernels import allreduce_time_s
    from fleetsim.device.latency import CUSTOM_AR_MAX_BYTES

    p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 256)
    lm = LatencyModel(QWEN3_32B, p, 2)
    tokens = CUSTOM_AR_MAX_BYTES // (5120 * 2) + 1  # above 8 MiB, beyond the graphs
    kf = lm._kern
    assert kf is not None
    table = allreduce_time_s(kf, 2, tokens * 5120 * 2.0)
    assert table is not None
    assert lm.linear_parts(tokens, 0)[2] == pytest.approx(2 * 64 * table, rel=1e-12)
    eager = LatencyModel(QWEN3_32B, _profile(), 2)
    t = eager.linear_parts(64, 0)[2]
    assert t == pytest.approx(2 * 64 * allreduce_time_s(kf, 2, 64 * 5120 * 2.0), rel=1e-12)


def test_tp2_rows_meet_the_goal_with_the_fitted_floor(stack_fit):
    """H100 dense TP2 rows (Qwen3-32B, gemma-3-27b): leave-one-model-out median ITL error
    <= 10% and worst <= 30% with the custom all-reduce; without any all-reduce time the
    model runs fast (the floor is real time)."""
    h = stack_fit["h100-sxm"]
    assert h["ar_rows"] >= 15
    assert h["ar_lomo"]["median_abs"] <= 0.10 and h["ar_lomo"]["worst_abs"] <= 0.30
    assert abs(h["ar_lomo"]["signed_median"]) <= 0.05
    assert h["ar_free"]["signed_median"] < -0.05
    assert 2e-6 < h["ar_floor_s"] < 50e-6  # a few to tens of microseconds per call


def test_b200_fit_over_all_dense_models(stack_fit):
    """The B200 is fitted to every expressible dense model's non-suspect rows (5 models), and
    the per-unit attention cap is what the rows ask for: the fit without it is worse."""
    from fleetsim.calibrate import stack

    b = stack_fit["b200"]
    assert b["rows"] >= 40 and len(b["models"]) == 5
    assert b["lomo"]["median_abs"] <= 0.15  # issue 21's floor for the median
    assert abs(b["lomo"]["signed_median"]) <= 0.05
    runs = stack.load_runs(stack.default_data_dir(), "B200")
    c = {k: b[k] for k in ("overhead_s", "per_seq_s", "kv_memory_eff")}
    all_rows = stack.fit_runs(runs)  # (the catalog replaces its cap: fit_one_gpu_floor)
    assert all_rows["attn_unit_bw_bytes_per_s"] == pytest.approx(7.5e9)
    with_cap = [
        stack.run_err(r, {**c, "attn_unit_bw_bytes_per_s": all_rows["attn_unit_bw_bytes_per_s"]})
        for r in runs
    ]
    no_cap = all_rows
    no_cap_errs = [stack.run_err(r, {**no_cap, "attn_unit_bw_bytes_per_s": 0.0}) for r in runs]
    assert sum(e * e for e in with_cap) < sum(e * e for e in no_cap_errs)


def test_run_steps_conserve_tokens():
    """The benchmark's run in steps: every output token is one sequence-step, at most
    ``slots`` run at once, the first step holds the first wave at its prompts, and every
    request after the first wave is admitted once."""
    import numpy as np

    from fleetsim.calibrate.stack import run_steps

    outs = np.array([5, 3, 8, 1, 4, 6, 2])
    n, ctx, adm = run_steps(outs, 3, 100)
    assert n.sum() == outs.sum()
    assert n.max() == 3 and n[0] == 3
    assert ctx[0] == 3 * 100  # three sequences at their prompts
    assert ctx[1] == 3 * 101
    assert adm.sum() == len(outs) - 3


# -- the linear-state (Mamba-2) state update (B200: fitted linear_state_eff) -------------------


def _nemotron(gpu: str, eff: float | None = None, prefill_floor: bool = True) -> LatencyModel:
    """Nemotron Nano 9B v2 (catalog model) on one ``gpu`` under vllm-v1, its state update at
    the catalog's efficiency or at ``eff``; ``prefill_floor=False``: without the Mamba-2 prefill
    floor and serial time of its prompt steps (tests/test_mamba_prefill.py)."""
    from conftest import one_gpu_latency_model

    lm = one_gpu_latency_model("nemotron-nano-9b-v2", gpu)
    if eff is None and prefill_floor:
        return lm
    p = lm.profile
    assert isinstance(p, RooflineProfile)
    if eff is not None:
        p = dataclasses.replace(p, linear_state_eff=eff)
    if not prefill_floor:
        p = dataclasses.replace(
            p, linear_state_prefill_layer_s=0.0, linear_state_prefill_step_s=0.0
        )
    return LatencyModel(lm.model, p, 1)


#: Nemotron Nano 9B v2 (its config.json): 27 Mamba-2 layers of 128 heads x 80 x 128 SSM state;
#: a sequence's state read and written once per layer per step in 16 bits
NEMOTRON_9B_UPDATE_BYTES = 27 * 128 * 80 * 128 * 2 * 2


@pytest.mark.parametrize("n", [1, 8, 64, 256])
def test_state_update_at_the_fitted_efficiency_adds_its_bytes_exactly(n):
    """A decode step of n sequences at the B200's fitted linear_state_eff is longer than at
    the kernel fit's elementwise efficiency by exactly n x the state bytes x (1/eff - 1/act)
    / bandwidth; the weights, the KV read and everything else stay."""
    lm = _nemotron("b200")
    eff = lm.profile.linear_state_eff
    assert eff == catalog.stacks()["vllm-v1"]["b200"]["linear_state_eff"] > 0.0
    base = _nemotron("b200", 0.0)
    act = base._kern.elem_params("act")[1]
    bw = lm.profile.mem_bw_bytes_per_s
    extra = n * NEMOTRON_9B_UPDATE_BYTES * (1.0 / eff - 1.0 / act) / bw
    for ctx in (0.0, 1000.0 * n):
        t, f, b = lm.iteration(0, 0.0, 0, n, ctx)
        t0, f0, b0 = base.iteration(0, 0.0, 0, n, ctx)
        assert t - t0 == pytest.approx(extra, rel=1e-9)
        assert (f, b) == (f0, b0)
    assert lm.decode_time(n, 500) - base.decode_time(n, 500) == pytest.approx(extra, rel=1e-9)
    # the report's parts still sum to the step, the extra time in the linear-state part
    parts, parts0 = lm.breakdown(0, 0.0, 0, n, 500.0 * n), base.breakdown(0, 0.0, 0, n, 500.0 * n)
    assert sum(parts.values()) == pytest.approx(lm.iteration(0, 0.0, 0, n, 500.0 * n)[0])
    assert parts["linear_state"] - parts0["linear_state"] == pytest.approx(extra, rel=1e-9)
    assert parts["lm_head"] == pytest.approx(parts0["lm_head"], rel=1e-12)


def test_prefill_tokens_keep_the_elementwise_scan():
    """A prefill chunk of 2,000 prompt tokens of one sequence (vLLM's chunked scan, another
    kernel) is charged the state update's difference for its one sequence, not per token; at
    linear_state_eff equal to the elementwise efficiency nothing changes (without the prefill
    floor, which would hide both: 27 x 3.08 ms on the B200)."""
    lm = _nemotron("b200", prefill_floor=False)
    base = _nemotron("b200", 0.0, prefill_floor=False)
    eff = lm.profile.linear_state_eff
    act = base._kern.elem_params("act")[1]
    bw = lm.profile.mem_bw_bytes_per_s
    one = NEMOTRON_9B_UPDATE_BYTES * (1.0 / eff - 1.0 / act) / bw
    t = lm.iteration(2000, 2000.0**2, 1, 0, 0.0)[0]
    t0 = base.iteration(2000, 2000.0**2, 1, 0, 0.0)[0]
    assert t - t0 == pytest.approx(one, rel=1e-9)
    same = _nemotron("b200", act, prefill_floor=False)
    assert same.iteration(2000, 2000.0**2, 1, 8, 8000.0)[0] == pytest.approx(
        base.iteration(2000, 2000.0**2, 1, 8, 8000.0)[0], rel=1e-12
    )


def test_h100_keeps_the_elementwise_state_update(stack_fit):
    """The H100's Nemotron rows are met with the kernel fit's elementwise efficiency (median
    ITL within 5%); the fit finds about the same efficiency and keeps the default."""
    h = stack_fit["h100-sxm"]
    assert h["linear_state_eff"] == 0.0
    assert catalog.stacks()["vllm-v1"]["h100-sxm"]["linear_state_eff"] == 0.0
    assert h["ls_rows"] >= 25 and len(h["ls_models"]) == 2
    assert h["ls_default"]["median_abs"] <= 0.05 and h["ls_default"]["worst_abs"] <= 0.10
    assert _nemotron("h100-sxm").decode_time(64, 800) == _nemotron("h100-sxm", 0.0).decode_time(
        64, 800
    )


def test_b200_nemotron_rows_need_the_slower_state_update(stack_fit):
    """ML.ENERGY v3, Nemotron Nano 9B and 12B v2 on one B200: with the elementwise efficiency
    every non-suspect row runs 19-53% too fast (median -43%); the fitted state update, each
    model predicted from the other's rows alone, brings the median |error| under issue 21's
    15% floor, its signed median within 6%."""
    b = stack_fit["b200"]
    assert b["ls_rows"] >= 12 and len(b["ls_models"]) == 2
    assert b["ls_default"]["signed_median"] < -0.35
    assert 0.05 < b["linear_state_eff"] < 0.3
    assert b["ls_lomo"]["median_abs"] <= 0.15
    assert abs(b["ls_lomo"]["signed_median"]) <= 0.06


# -- the B200's long-context GPQA rows: host-limited, no step model fits them -----------------


def test_host_limited_series_are_the_flagged_b200_gpqa_series():
    """The harness's second table sets apart the non-suspect rows of every series flagged
    "B200 slower than H100" at other batch sizes: Qwen3-8B and -14B GPQA on one B200 at 128
    sequences (and the Nemotron GPQA rows of flagged series); no H100 row, no chat row."""
    from fleetsim.calibrate import mlenergy as ml

    rows = [ml.Row(c, ml.SimRun(c.key)) for c in ml.read_configs() if not ml.skip_reason(c)]
    apart = ml.flagged_series(rows)
    clean = {r.config.key for r in rows if not r.config.suspect} & apart
    assert "Qwen/Qwen3-8B gpqa B200 x1 TP1/EP1/DP1 b128" in clean
    assert "Qwen/Qwen3-14B gpqa B200 x1 TP1/EP1/DP1 b128" in clean
    assert all(" gpqa B200 " in k for k in clean)
    assert not any(" H100 " in k or "lm-arena" in k for k in apart)


def test_the_b200_step_fit_leaves_out_the_series_slower_than_weaker_h100_servers():
    """calibrate/stack.host_limited_series: a one-GPU B200 series that measures, at some batch,
    a longer median ITL than the same model and task on an H100 server with no more HBM
    bandwidth and FLOP/s in total (two H100s: 6.7 TB/s and 1,978 TFLOP/s against the B200's
    8.0 TB/s and 2,250) is bound by neither, i.e. host-limited. Among the dense rows that is
    exactly the GPQA series of Qwen3-8B, -14B (flagged by the benchmark at one H100) and -32B
    (44.1 ms at 8 sequences against 16.7 ms on two H100s); no chat series; the B200 fit keeps
    the other 40 rows of the 46."""
    from fleetsim.calibrate import mlenergy as ml
    from fleetsim.calibrate import stack

    assert stack._weaker_h100_gpus() == 2
    configs = ml.read_configs()
    bad = stack.host_limited_series(configs)
    dense = {
        (c.model_id, c.task)
        for c in configs
        if c.gpu_model == "B200"
        and c.num_gpus == 1
        and not c.moe_or_ep
        and "Hybrid" not in c.architecture  # (the hybrids have their own fit)
        and not ml.skip_reason(c)
    }
    assert bad & dense == {
        ("Qwen/Qwen3-8B", "gpqa"),
        ("Qwen/Qwen3-14B", "gpqa"),
        ("Qwen/Qwen3-32B", "gpqa"),
    }
    q32 = {
        c.max_num_seqs: c.itl_median_ms
        for c in configs
        if c.model_id == "Qwen/Qwen3-32B" and c.task == "gpqa" and c.gpu_model == "H100"
    }
    assert q32[8] == pytest.approx(16.72, abs=0.01)  # two H100s (TP2), vs 44.1 ms on one B200
    data = stack.default_data_dir()
    kept = stack.load_runs(data, "B200", drop_host_limited=True)
    assert len(kept) == 40 and len(stack.load_runs(data, "B200")) == 46
    assert not any(r.config.task == "gpqa" for r in kept)


def test_without_the_host_limited_series_the_unit_cap_gives_way_to_a_step_floor():
    """Fitted without the host-limited series (docs/accuracy-log.md, "B200 data": small-batch
    one-GPU rows), the B200's per-unit KV cap goes to 0 (none: TRTLLM-gen decode splits a
    sequence's KV across CTAs until the SMs are filled) and the per-step overhead rises from
    1.2 to 3.6 ms: the cap had stood in for a one-GPU small-batch floor. gemma-3-12b chat at 8
    sequences (7.73 ms measured) goes from +41 % to within 5 %. Not the catalog's fit: the
    larger overhead slows the multi-GPU B200 rows, whose fused-MoE fit was made with 1.2 ms."""
    from fleetsim.calibrate import stack

    data = stack.default_data_dir()
    c_old = stack.fit_runs(stack.load_runs(data, "B200"))  # every row: main 5456c44's catalog
    assert c_old["attn_unit_bw_bytes_per_s"] == pytest.approx(7.5e9)
    c = stack.fit_runs(stack.load_runs(data, "B200", drop_host_limited=True))
    assert c["attn_unit_bw_bytes_per_s"] == 0.0
    assert c["kv_memory_eff"] == pytest.approx(0.80)
    assert 3.3e-3 < c["overhead_s"] < 3.9e-3 and c_old["overhead_s"] < 1.3e-3
    runs = stack.load_runs(data, "B200")
    g8 = next(
        r
        for r in runs
        if r.config.model_id == "google/gemma-3-12b-it" and r.config.max_num_seqs == 8
    )
    assert stack.run_err(g8, c_old) > 0.35
    assert abs(stack.run_err(g8, c)) < 0.05


def test_b200_small_batch_one_gpu_rows_with_the_one_gpu_floor():
    """The catalog's B200 (per-unit cap 0, one-GPU step floor and the dense GEMMs' weight
    stream, each step with the host stall as the simulator charges it) against the measured
    median ITL of small-batch chat rows that the cap (7.5 GB/s per sequence and KV head, main
    5456c44) made too slow in the step fit: gemma-3-12b at 8 and 16 sequences (7.73 / 8.32
    ms: +41 / +35 %), Qwen3-14B at 8 (7.16 ms: +10 %); each now within 10 %."""
    from fleetsim.calibrate import stack

    c0 = dict(catalog.stacks()["vllm-v1"]["b200"])
    old = {**c0, "attn_unit_bw_bytes_per_s": 7.5e9, "one_gpu_overhead_s": 0.0}
    c = {**c0, "overhead_s": c0["overhead_s"] + c0["host_stall_s"]}
    runs0 = stack.load_runs(stack.default_data_dir(), "B200")
    runs = stack.runs_at_stream(runs0, c["dense_gemm_bw_eff"])
    small0 = {
        (r.config.model_id, r.config.max_num_seqs): r
        for r in runs0
        if r.config.task == "lm-arena-chat" and r.config.max_num_seqs <= 16
    }
    small = {
        (r.config.model_id, r.config.max_num_seqs): r
        for r in runs
        if r.config.task == "lm-arena-chat" and r.config.max_num_seqs <= 16
    }
    for key, before in (
        (("google/gemma-3-12b-it", 8), 0.35),
        (("google/gemma-3-12b-it", 16), 0.30),
        (("Qwen/Qwen3-14B", 8), 0.08),
    ):
        assert stack.run_err(small0[key], old) > before, key
        assert abs(stack.run_err(small[key], c)) < 0.10, key


@pytest.mark.slow
def test_b200_dense_stream_and_floor_fit_small_and_large_models_alike():
    """The one-GPU floor fitted alone (2.04 ms, without the host stall; the derived kernel
    fit's weight stream at 0.958 of 8 TB/s) with the stall the simulator charges in every
    step: in the step fit (median ITL) Qwen3-8B chat at 8 sequences (4.97 ms measured) +41 %,
    Qwen3-14B +22 % (7.16 ms), Qwen3-32B -2 % (14.13 ms). Fitted jointly with the dense
    GEMMs' weight stream, the stall in each step (0.75 of the bandwidth, floor ~0.1 ms:
    calibrate/stack.py fit_dense_stream), the bigger weights take the longer stream: 8B +13 %,
    14B +9 %, 32B within 3 %; over the 40 rows, each model from the others, the median error
    falls from 10.8 to 6.5 %."""
    from fleetsim.calibrate import stack

    c = dict(catalog.stacks()["vllm-v1"]["b200"])
    stall = c["host_stall_s"]
    runs0 = stack.load_runs(stack.default_data_dir(), "B200", drop_host_limited=True)
    runs = stack.runs_at_stream(runs0, c["dense_gemm_bw_eff"])
    cs = {**c, "overhead_s": c["overhead_s"] + stall}
    alone = {**cs, "one_gpu_overhead_s": 2.0426e-3}
    rows = {
        (r.config.model_id.split("/")[1], r.config.max_num_seqs): (r, r0)
        for r, r0 in zip(runs, runs0, strict=True)
        if r.config.task == "lm-arena-chat"
    }
    for key, before, lo, hi in (
        (("Qwen3-8B", 8), (0.38, 0.44), 0.09, 0.16),
        (("Qwen3-14B", 8), (0.19, 0.25), 0.06, 0.10),
        (("Qwen3-32B", 8), (-0.05, 0.0), -0.03, 0.03),
    ):
        r, r0 = rows[key]
        assert before[0] < stack.run_err(r0, alone) < before[1], key
        assert lo < stack.run_err(r, cs) < hi, key
    joint = stack.fit_dense_stream(runs0, {**c, "one_gpu_overhead_s": 0.0}, stall)
    assert joint["dense_gemm_bw_eff"] == pytest.approx(0.75)
    assert joint["one_gpu_overhead_s"] == pytest.approx(c["one_gpu_overhead_s"], abs=3e-5)
    assert joint["og_lomo"]["median_abs"] < 0.65 * joint["ds_none"]["median_abs"]


@pytest.mark.parametrize("eff", [0.6, 0.7, 0.8])
def test_dense_stream_is_the_kernel_fits_gemm_bw_eff_for_every_gemm(eff):
    """``dense_gemm_bw_eff`` times a dense model's GEMMs exactly as a kernel fit with that
    ``gemm_bw_eff``, and a mixture of experts' GEMMs too: its attention projections, router,
    and the fused-MoE experts' grouped GEMMs stream from the same HBM (branch b37 had left
    the MoE layers at the kernel fit's 0.958, the B200's whole bandwidth: fails there)."""
    p = apply_stack(_profile("b200"), "vllm-v1", "b200", 64)
    p0 = dataclasses.replace(p, dense_gemm_bw_eff=0.0)
    assert p0.kernels is not None
    pk = dataclasses.replace(p0, kernels=dataclasses.replace(p0.kernels, gemm_bw_eff=eff))
    pe = dataclasses.replace(p0, dense_gemm_bw_eff=eff)
    for n in (8, 64, 1024):  # graphed, graphed, eager
        a = LatencyModel(QWEN3_8B, pe, 1).linear_time(n, n)
        assert a == LatencyModel(QWEN3_8B, pk, 1).linear_time(n, n)
        assert a > LatencyModel(QWEN3_8B, p0, 1).linear_time(n, n)
    moe = model_from_catalog("qwen3-30b-a3b")
    for b in (64, 8):
        parts = [LatencyModel(moe, q, 1).breakdown(0, 0.0, 0, b, b * 800.0) for q in (p0, pe, pk)]
        for key in ("moe_grouped_gemm", "moe_router", "attention_linear"):
            assert parts[1][key] == parts[2][key]
            assert parts[1][key] > parts[0][key]
    # the experts' weight stream sets the decode step's grouped GEMMs (parts at 8 sequences,
    # the loop's last): 8 sequences touch 128 (1 - (1 - 8/128)^8) = 51.6 of the 128 experts,
    # 48 layers x 51.6 x 3 x 2,048 x 768 x 2 bytes = 23.4 GB per step, at least that over
    # eff x 8 TB/s
    n_touched = 128 * (1 - (1 - 8 / 128) ** 8)
    wbytes = 48 * n_touched * 3 * 2048 * 768 * 2
    bw = p0.mem_bw_bytes_per_s
    assert wbytes / (eff * bw) < parts[1]["moe_grouped_gemm"] < 1.15 * wbytes / (eff * bw)


def test_no_kv_read_model_fits_the_gpqa_b128_rows_and_the_chat_rows():
    """Qwen3-8B/14B GPQA on one B200 at 128 sequences (~5,400 tokens of context, ~100 GB of KV
    per step): 47.6 / 48.8 ms measured, the fitted step 50 % faster. Either KV-read term that
    could slow them breaks other rows of the same GPU: a flat KV efficiency fitted to them
    (about 0.22) makes the large-batch chat rows (b256-b2048, which read as much KV per step
    or more) 45-130 % too slow; a per-unit cap fitted to them (about 2.3 GB/s per sequence and
    KV head) makes Qwen3-32B's GPQA rows at 8-64 sequences, with the same attention geometry
    (8 KV heads of 128), ~100 % too slow. docs/accuracy-log.md, "B200 data"."""
    from fleetsim.calibrate import stack

    runs = stack.load_runs(stack.default_data_dir(), "B200")
    c = dict(catalog.stacks()["vllm-v1"]["b200"])
    g = [r for r in runs if r.config.task == "gpqa" and r.config.max_num_seqs == 128]
    assert len(g) == 2 and all(stack.run_err(r, c) < -0.45 for r in g)

    def loss(cc: dict) -> float:
        return sum(stack.run_err(r, cc) ** 2 for r in g)

    flat = min(
        (
            {**c, "kv_memory_eff": 0.05 + 0.025 * i, "attn_unit_bw_bytes_per_s": 0.0}
            for i in range(37)
        ),
        key=loss,
    )
    unit = min(({**c, "attn_unit_bw_bytes_per_s": i * 0.1e9} for i in range(10, 80)), key=loss)
    for cc in (flat, unit):
        assert all(abs(stack.run_err(r, cc)) < 0.05 for r in g)  # each fits the two rows
    big_chat = [r for r in runs if r.config.task != "gpqa" and r.config.max_num_seqs >= 256]
    assert min(stack.run_err(r, flat) for r in big_chat) > 0.40
    q32 = [r for r in runs if r.config.model_id == "Qwen/Qwen3-32B" and r.config.task == "gpqa"]
    assert len(q32) == 4 and min(stack.run_err(r, unit) for r in q32) > 0.9


# -- the host stall: the measured mean step beyond the median ----------------------------------


def test_host_stall_closes_the_mean_step_gap(stack_fit):
    """The measured mean gap between tokens (batch / tokens/s) exceeds the median by more than
    the simulated steps' own mix explains on the B200 (engine-core/API-server output
    processing, GC: host stalls a median ignores): without a stall the simulated mean step is
    ~5 % short at the median row; with host_stall_s, fitted without the held-out model, the
    signed median is within 1 % and the median |error| drops. On the H100 the simulated mix
    already matches (signed median within 1 % without it) and the fitted stall is small."""
    b, h = stack_fit["b200"], stack_fit["h100-sxm"]
    assert b["hs_none"]["signed_median"] < -0.04
    assert abs(b["hs_lomo"]["signed_median"]) < 0.01
    # the median |error| does not grow (main 5456c44: 5.7 -> 4.9 %; with the one-GPU step
    # floor of branch k29 the rows are closer without it, 4.4 -> 4.3 %)
    assert b["hs_lomo"]["median_abs"] <= b["hs_none"]["median_abs"]
    assert 0.8e-3 < b["host_stall_fitted_s"] < 1.5e-3  # the rows' 0.9-1.9 ms at 16-256 seqs
    assert b["host_stall_s"] == b["host_stall_fitted_s"]  # charged (HOST_STALL_ADOPTED)
    assert abs(h["hs_none"]["signed_median"]) < 0.01
    assert 0.0 < h["host_stall_s"] == h["host_stall_fitted_s"] < 0.2e-3
    assert abs(h["hs_lomo"]["signed_median"]) < 0.01


def test_host_stall_target_of_a_measured_row():
    """Qwen3-8B chat on one B200 at 64 sequences: measured 12.89 ms median ITL and a mean step
    of 14.40 ms (63.8 sequences / 4,431 tokens/s; ratio 0.895); the simulated steps' own ratio
    is ~0.97, so the stall the row asks for is 12.89 x (1 / 0.895 - 1 / 0.97) ~ 1.1 ms, and
    adding it to every simulated step moves the mean step from ~8 % short to within 1 %."""
    from fleetsim.calibrate import stack

    runs = stack.load_runs(stack.default_data_dir(), "B200")
    c = dict(catalog.stacks()["vllm-v1"]["b200"])
    (r,) = [
        r
        for r in runs
        if r.config.model_id == "Qwen/Qwen3-8B"
        and r.config.task == "lm-arena-chat"
        and r.config.max_num_seqs == 64
    ]
    cfg = r.config
    mean_m = cfg.avg_batch_size / cfg.tokens_per_s
    assert stack.meas_ratio(cfg) == pytest.approx(cfg.itl_median_ms / 1e3 / mean_m)
    assert stack.meas_ratio(cfg) == pytest.approx(0.895, abs=0.002)
    assert 0.95 < stack.sim_ratio(r, c) < 0.99
    g = stack.stall_target_s(r, c)
    assert g == pytest.approx(
        cfg.itl_median_ms / 1e3 * (1 / stack.meas_ratio(cfg) - 1 / stack.sim_ratio(r, c))
    )
    assert 0.8e-3 < g < 1.5e-3
    assert stack.stall_err(r, c, 0.0) < -0.06
    assert abs(stack.stall_err(r, c, g)) < 1e-9  # the row's own target closes it exactly
    assert abs(stack.stall_err(r, c, c["host_stall_fitted_s"])) < 0.02
    # a constant per step leaves a ratio of steps closer to 1 (it cannot make the mean longer
    # than the median by itself): the stall is charged on top, not fitted to the ratio
    assert stack.sim_ratio(r, c, g) > stack.sim_ratio(r, c)


def test_host_stall_is_charged_in_every_vllm_v1_step():
    """vllm-v1 steps carry host_stall_s (so throughput, energy and latency all see it);
    eager steps do not."""
    c = stack_constants("vllm-v1", "h100-sxm")
    assert c is not None and c["host_stall_s"] > 0.0
    with_ = LatencyModel(QWEN3_8B, apply_stack(_profile(), "vllm-v1", "h100-sxm", 64), 1)
    bare_p = apply_stack(_profile(), "vllm-v1", "h100-sxm", 64)
    assert isinstance(bare_p, RooflineProfile)
    bare_p = dataclasses.replace(bare_p, overhead_s=c["overhead_s"])
    bare = LatencyModel(QWEN3_8B, bare_p, 1)
    for n, ctx in ((1, 500), (64, 64 * 900), (256, 256 * 700)):
        d = with_.decode_time(n, ctx) - bare.decode_time(n, ctx)
        assert d == pytest.approx(c["host_stall_s"], rel=1e-9)
    assert apply_stack(_profile(), "eager", "h100-sxm", 64).overhead_s == _profile().overhead_s


@pytest.mark.slow
def test_host_stall_moves_a_simulated_row_toward_its_measured_throughput():
    """The end-to-end run (fleetsim.calibrate.mlenergy) of Qwen3-8B chat on one B200 at 64
    sequences with and without the stall: the mean time per token grows by stall / batch,
    the median ITL by the stall, and tokens/s moves toward the measured."""
    from fleetsim.calibrate import mlenergy as ml

    (cfg,) = [
        c
        for c in ml.read_configs()
        if c.model_id == "Qwen/Qwen3-8B"
        and c.task == "lm-arena-chat"
        and c.gpu_model == "B200"
        and c.num_gpus == 1
        and c.max_num_seqs == 64
    ]
    c = stack_constants("vllm-v1", "b200")
    assert c is not None
    s = c["host_stall_fitted_s"]  # (charged in the catalog: host_stall_s)
    a = ml.simulate_config(cfg, engine="iteration", host_stall_s=0.0)
    b = ml.simulate_config(cfg, engine="iteration", host_stall_s=s)
    assert not a.error and not b.error
    tps_a, tps_b = a.tokens / a.window_s, b.tokens / b.window_s
    assert 1 / tps_b - 1 / tps_a == pytest.approx(s / b.avg_batch, rel=0.05)
    assert b.itl_median_s - a.itl_median_s == pytest.approx(s, rel=0.05)
    assert abs(tps_b / cfg.tokens_per_s - 1) < abs(tps_a / cfg.tokens_per_s - 1)


def test_harness_takes_the_host_stall_leave_one_model_out():
    """The accuracy harness simulates each row with the stall fitted without its model; a model
    outside the fitting set (a hybrid) takes the fit to every row (the catalog's), on both GPUs."""
    from fleetsim.calibrate import mlenergy as ml
    from fleetsim.calibrate import stack

    models = ("Qwen/Qwen3-8B", "nvidia/NVIDIA-Nemotron-Nano-9B-v2")
    cfgs = [c for c in ml.read_configs() if c.model_id in models and c.num_gpus == 1]
    st = ml.lomo_host_stalls(stack.default_data_dir(), cfgs)
    h = catalog.stacks()["vllm-v1"]["h100-sxm"]
    b = catalog.stacks()["vllm-v1"]["b200"]
    assert set(st) == {(g, m) for g in ("H100", "B200") for m in models}
    assert st[("H100", models[1])] == pytest.approx(h["host_stall_fitted_s"], rel=1e-3)
    assert 0.0 <= st[("H100", models[0])] < 0.2e-3
    assert st[("H100", models[0])] != pytest.approx(h["host_stall_fitted_s"], rel=1e-3)
    assert st[("B200", models[1])] == pytest.approx(b["host_stall_fitted_s"], rel=1e-3)
    # the other models' median row: 0.57 ms (0.76 ms before branch k29's one-GPU step floor)
    assert 0.5e-3 < st[("B200", models[0])] < 1.5e-3
    assert st[("B200", models[0])] != pytest.approx(b["host_stall_fitted_s"], rel=1e-3)


def test_stacks_toml_tags_an_all_reduce_fitted_to_the_gpus_own_tp2_rows():
    """The all-reduce floor's tag follows where it came from, not the GPU's name: an H200
    folder with its own TP2 rows writes its floor "fitted" with its own leave-one-model-out
    line; the B200 (the H100's floor, NVLink-scaled) and a GPU without rows (derived from the
    H100) write "derived". Before, every GPU but the H100 was labelled "derived"."""
    from fleetsim.calibrate import stack as S

    summ = {"median_abs": 0.03, "worst_abs": 0.07, "signed_median": 0.001}
    base = {
        "rows": 11,
        "models": ["Qwen/Qwen3-8B"],
        "lomo": summ,
        "in_sample": summ,
        "overhead_s": 1.2e-3,
        "per_seq_s": 3.7e-5,
        "graph_floor_frac": 0.5,
        "kv_memory_eff": 0.9,
        "ar_floor_s": 1.6e-5,
        "ar_bw_bytes_per_s": 4.5e11,
        "ar_rows": 19,
        "ar_models": ["Qwen/Qwen3-32B"],
        "ar_lomo": summ,
    }
    res = {
        "h100-sxm": dict(base),
        "h200": {**base, "ar_floor_s": 2.5e-5},
        "b200": {**base, "ar_bw_bytes_per_s": 9e11, "ar_derived_from": "h100-sxm"},
    }
    blocks = {b.split('"]', 1)[0]: b for b in S.stacks_toml(res).split('["vllm-v1"."')[1:]}
    assert set(blocks) == {"a100-80gb", "b200", "h100-sxm", "h200"}
    for gpu, tag in (("h100-sxm", "fitted"), ("h200", "fitted"), ("b200", "derived")):
        assert f"# {tag}: custom all-reduce, per call" in blocks[gpu], gpu
        assert ("ar_lomo_median_err = 0.0300  # 19 TP2 rows" in blocks[gpu]) == (tag == "fitted")
    assert "ar_floor_s = 2.5000e-05  # fitted" in blocks["h200"]  # its own, not the H100's
    a100 = blocks["a100-80gb"]  # no rows: the H100's constants, derived
    assert 'provenance = "derived"' in a100 and "# derived: custom all-reduce" in a100
    assert "ar_floor_s = 1.6000e-05" in a100
