"""``fleetsim latency``, tensor-parallel validation, KV replication, precision peaks and device
memory of the catalog."""

from __future__ import annotations

import json

import pytest

from fleetsim.apps.cli import main
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, compute_peak
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.device.profile import catalog_profile


def _json(capsys, *argv: str) -> list[dict]:
    assert main(["latency", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_decode_rows_add_up_and_grow_with_batch(capsys):
    rows = _json(
        capsys, "--gpu", "h100-sxm", "--model", "llama-3.1-70b", "--tp", "4",
        "--batch", "1,64,256", "--context", "1000",
    )  # fmt: skip
    assert [r["tokens"] for r in rows] == [1, 64, 256]
    # context: per sequence (it printed batch x context before issue 24); the KV read is that
    assert [r["context_tokens"] for r in rows] == [1000, 1000, 1000]
    assert [r["kv_tokens_read"] for r in rows] == [1000, 64000, 256000]
    # compute is the FLOPs' time even where memory bounds the step (it was 0.000 for decode)
    m = model_from_catalog("llama-3.1-70b")
    prof = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    lin = 4 * prof.peak_flops * prof.compute_eff_max
    assert rows[0]["compute_s"] == pytest.approx(
        (m.flops_per_token_linear + m.flops_lm_head) / lin + 1000 * m.attn_flops_per_pair / lin,
        rel=1e-6,
    )
    assert rows[0]["bound"] == "memory" and 0 < rows[0]["compute_s"] < rows[0]["memory_s"]
    for r in rows:
        parts = r["compute_s"] + r["memory_s"] + r["comm_s"] + r["overhead_s"]
        assert parts == pytest.approx(r["total_s"], rel=1e-9)
        # the default serving stack's exposed CPU time per iteration plus its mean host stall
        # per step (vllm-v1, stacks.toml)
        st = catalog.stacks()["vllm-v1"]["h100-sxm"]
        assert r["overhead_s"] == st["overhead_s"] + st["host_stall_s"]
    assert rows[0]["total_s"] < rows[1]["total_s"] < rows[2]["total_s"]
    eager = _json(
        capsys, "--gpu", "h100-sxm", "--model", "llama-3.1-70b", "--tp", "4",
        "--batch", "1", "--context", "1000", "--serving-stack", "eager",
    )[0]  # fmt: skip
    assert eager["overhead_s"] == catalog.gpu("h100-sxm")["overhead_s"]
    # CUDA graphs and the exposed overhead: a one-sequence step is faster under vllm-v1
    assert rows[0]["total_s"] < eager["total_s"]
    # one sequence: the step streams 141 GB of weights over 4 GPUs at about 3.35 TB/s each
    w = model_from_catalog("llama-3.1-70b").weight_bytes / (4 * 3.35e12)
    assert w < rows[0]["memory_s"] < 1.4 * w  # + the floors of ~10 kernels x 80 layers


def test_prefill_is_compute_bound_and_fp8_halves_it_on_h100_not_a100(capsys):
    args = ["--model", "llama-3.1-8b", "--tp", "1", "--prefill-tokens", "8192"]
    h_bf = _json(capsys, "--gpu", "h100-sxm", *args)[0]
    h_f8 = _json(capsys, "--gpu", "h100-sxm", *args, "--dtype", "fp8")[0]
    a_bf = _json(capsys, "--gpu", "a100-80gb", *args)[0]
    a_f8 = _json(capsys, "--gpu", "a100-80gb", *args, "--dtype", "fp8")[0]
    assert h_bf["compute_s"] > 5 * h_bf["memory_s"]
    assert not h_f8["weight_only_quantization"] and a_f8["weight_only_quantization"]
    assert h_f8["kv_dtype"] == "bf16"
    # the linear layers run at twice the peak on H100 (attention stays 16-bit) ...
    assert 0.5 < h_f8["compute_s"] / h_bf["compute_s"] < 0.75
    # ... and at the same peak on A100 (weight-only)
    assert a_f8["compute_s"] == pytest.approx(a_bf["compute_s"], rel=0.02)


def test_bad_tp_and_unknown_model_are_one_line_errors(capsys):
    base = ["latency", "--gpu", "h100-sxm", "--batch", "1", "--context", "8"]
    assert main([*base, "--model", "llama-3.1-70b", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attention heads" in err
    assert main([*base, "--model", "no-such-model", "--tp", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the catalog" in err


def test_tp_rule_and_kv_replication():
    m = model_from_catalog("llama-3.1-70b")  # 64 heads, 8 KV heads
    assert m.tp_problem(8) is None and m.tp_problem(16) is None  # 16: KV heads replicated
    assert "attention heads" in (m.tp_problem(3) or "")
    g = model_from_catalog("gpt3-175b")  # 96 heads, 96 KV heads
    assert g.tp_problem(12) is None
    assert "attention heads" in (g.tp_problem(64) or "")
    import dataclasses

    odd = dataclasses.replace(m, n_heads=48, n_kv_heads=12, d_model=6144)
    assert "KV heads" in (odd.tp_problem(8) or "")  # 12 % 8 and 8 % 12 are both non-zero
    assert m.kv_bytes_per_token_tp(8) == m.kv_bytes_per_token
    assert m.kv_bytes_per_token_tp(16) == 2 * m.kv_bytes_per_token


def test_device_memory_is_what_cuda_reports():
    """CUDA's total (``torch.cuda.mem_get_info``), which vLLM multiplies by
    ``gpu_memory_utilization``: the H100, H200 and B200 as vLLM's startup line prints it
    (docs/accuracy-log.md, "The KV budget against vLLM's"); the A100 80GB keeps nvidia-smi's."""
    gib = {"h100-sxm": 79.19, "h200": 139.81, "b200": 178.35}
    for gpu, v in gib.items():
        assert round(catalog.gpu(gpu)["mem_bytes"] / 2**30, 2) == v
    assert catalog.gpu("a100-80gb")["mem_bytes"] == 81920 * 2**20


def test_compute_peak_by_precision():
    a = catalog_profile("a100-80gb", catalog.gpu("a100-80gb"))
    h = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    assert compute_peak(a, "bf16") == (312e12, False)
    assert compute_peak(a, "int8") == (624e12, False)
    assert compute_peak(a, "fp8") == (312e12, True)
    assert compute_peak(h, "fp8") == (1979e12, False)
    assert compute_peak(h, "int4") == (989e12, True)


def test_decode_run_stays_closed_form():
    """The kernel model keeps the step affine in context: run_sums equals summed steps."""
    from fleetsim.device.latency import run_sums, step_time

    m = model_from_catalog("llama-3.1-70b")
    lat = LatencyModel(m, catalog_profile("h100-sxm", catalog.gpu("h100-sxm")), 4)
    c = lat.run_coeffs(32)
    t, _, _ = run_sums(c, 32 * 500.0, 32, 50)
    assert t == pytest.approx(sum(step_time(c, 32 * 500.0 + 32 * i) for i in range(50)), rel=1e-12)
    it = lat.iteration(0, 0.0, 0, 32, 32 * 500.0)[0]
    assert it == step_time(c, 32 * 500.0)


def test_scenario_tp_checks_and_kv_replicas():
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve

    def rs(tp: int, model: str = "llama-3.1-8b", **extra):
        return resolve(
            scenario_from_dict(
                {
                    "model": {"name": model, **extra},
                    "hardware": {"gpu": "h100-sxm"},
                    "fleet": {"tensor_parallel": tp},
                    "traffic": {"requests_per_day": 1000},
                }
            )
        )

    with pytest.raises(ScenarioError) as e:
        rs(3)
    assert e.value.field == "fleet.tensor_parallel" and "attention heads" in str(e.value)
    # 8 KV heads: TP8 holds one head per GPU, TP16 two replicas of each
    r8, r16 = rs(8), rs(16)
    m = r8.model
    mib = catalog.gpu("h100-sxm")["mem_bytes"]
    assert r8.kv is not None and r16.kv is not None
    assert r8.kv.memory_bytes == 8 * mib and r16.kv.memory_bytes == 16 * mib
    assert r8.kv.bytes_per_token == m.kv_bytes_per_token
    assert r16.kv.bytes_per_token == 2 * m.kv_bytes_per_token
    assert r16.kv_capacity_tokens <= r16.kv.kv_bytes / (2 * m.kv_bytes_per_token)
    # kv_dtype is explicit: int8 weights keep a bf16 cache unless told otherwise
    assert rs(1, dtype="int8").model.kv_bytes_per_element == 2.0
    assert rs(1, dtype="int8", kv_dtype="fp8").model.kv_bytes_per_element == 1.0


def test_dp_batch_is_the_replicas_and_the_figures_add_up_by_hand(capsys):
    """``--dp D --batch B``: B is the replica's batch (all D engines, ceil(B / D) each; --help
    and docs/model.md say so) and every printed figure is the replica's. Llama-3.1-8B on H100,
    context 1,000: DP2 x 8 sequences is two engines of DP1 x 4: its FLOPs, bytes and KV read
    exactly twice theirs, the attention and dense MLP parts the one engine's, and its time
    DP1 x 4's (the serving stack's per-sequence time too is one engine's, ceil(8 / 2) = 4
    sequences: every DP rank is its own engine-core process, branch h47; it was counted over
    the replica's 8 before); 7 sequences pad to 4 per engine: the same
    layer FLOPs, 1,000 fewer KV tokens read."""
    argv = ("--gpu", "h100-sxm", "--model", "llama-3.1-8b", "--context", "1000")
    dp2 = _json(capsys, *argv, "--dp", "2", "--batch", "8,7")
    one = _json(capsys, *argv, "--batch", "4")[0]
    r8, r7 = dp2
    assert (r8["tokens"], r8["kv_tokens_read"], r8["dp"]) == (8, 8000, 2)
    assert r8["flops"] == 2 * one["flops"] and r8["bytes"] == 2 * one["bytes"]
    for part in ("attention_linear", "attention_core", "dense_mlp", "overhead"):
        assert r8["parts_s"][part] == pytest.approx(one["parts_s"][part], rel=1e-12)
    per_seq = one["parts_s"]["per_sequence"] / 4
    assert r8["parts_s"]["per_sequence"] == pytest.approx(4 * per_seq, rel=1e-12)
    assert r8["total_s"] == pytest.approx(one["total_s"], rel=1e-12)
    # 7 sequences: engines of 4 and 3, the layers padded to 2 x 4 tokens; 7,000 KV tokens
    m = model_from_catalog("llama-3.1-8b")
    assert r7["kv_tokens_read"] == 7000
    assert r8["flops"] - r7["flops"] == pytest.approx(
        m.flops_lm_head + 1000 * m.attn_flops_per_pair, rel=1e-9
    )
    assert main(["latency", *argv, "--dp", "2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "on 2 x h100-sxm (TP1 x DP2)" in out
    assert "DP2: the figures are the replica's" in " ".join(out.split())
