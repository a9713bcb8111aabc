"""ModelOpt checkpoints (NVFP4, FP8) as vLLM 0.11 runs them (issue 22, helper N47): the reader
(config/hf.py ``_modelopt``, ``with_hf_quant_config``), the weights' bytes at 4.5 bits a
parameter, the B200's FP4 peak against Hopper's weight-only fallback, and the experts' own
grouped GEMMs (docs/accuracy-log.md, "NVFP4 checkpoints (ModelOpt) on the B200")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetsim.apps.latency import _model
from fleetsim.apps.latency import main as latency_main
from fleetsim.base.errors import ScenarioError
from fleetsim.config.hf import architecture_from_hf, read_hf_config_named
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, compute_peak
from fleetsim.device.modelspec import DTYPE_BYTES, ModelSpec
from fleetsim.device.moe import MoeLayout, moe_layer_parts_s, mxfp4_moe_gemm_s
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

R1_FP4 = Path(__file__).resolve().parents[1] / "data/models/nvidia/DeepSeek-R1-0528-FP4"

#: a Llama-3.1-8B-shaped config.json with ModelOpt's config.json form of the quantization
#: (ModelOpt 0.31 and after: quant_method "modelopt", quant_algo, ignore, group_size)
LLAMA8 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_scheme": None,
        "ignore": ["lm_head"],
    },
}


def _arch(quant: dict | None = None, **over: object) -> dict:
    cfg = {**LLAMA8, **over}
    if quant is not None:
        cfg["quantization_config"] = quant
    return architecture_from_hf(cfg, "config.json")


def _refusal(quant: dict, cfg: dict | None = None) -> str:
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf({**(cfg or LLAMA8), "quantization_config": quant}, "config.json")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_nvfp4_is_four_bits_and_one_e4m3_scale_per_16():
    """16 e2m1 weights (8 bytes) and one e4m3 block scale (1 byte): 9 bytes per 16 weights."""
    assert DTYPE_BYTES["nvfp4"] * 16 == 9.0
    assert DTYPE_BYTES["nvfp4"] == 0.5625


def test_a_dense_nvfp4_config_json_by_hand():
    """Llama-3.1-8B shapes, every linear layer NVFP4, the LM head excluded, the embedding never
    quantised: 6,979,321,856 parameters at 0.5625 bytes, 2 x 525,336,576 at 2 bytes."""
    f = _arch()
    assert (f["dtype"], f["embed_dtype"]) == ("nvfp4", "bf16")
    m = ModelSpec(name="llama-8b-nvfp4", **f)
    attn = 4096 * 4096 * 2 + 2 * 4096 * 1024  # q, o; k, v (8 KV heads x 128)
    mlp = 3 * 4096 * 14336
    assert 32 * (attn + mlp) == 6_979_321_856
    emb = 128256 * 4096
    assert emb == 525_336_576
    assert m.weight_bytes == 6_979_321_856 * 0.5625 + 2 * emb * 2.0
    # one decode step streams every linear weight once and the LM head (not the embedding)
    assert m.weight_bytes_read(1) == 6_979_321_856 * 0.5625 + emb * 2.0


def test_modelopt_fp8_is_per_tensor_fp8():
    """quant_algo FP8: ModelOptFp8LinearMethod, one fp32 scale a tensor (no 128 x 128 blocks)."""
    f = _arch({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]})
    assert (f["dtype"], f["embed_dtype"], f["fp8_block"]) == ("fp8", "bf16", False)


def test_the_hf_quant_config_json_form_and_its_sidecar_file(tmp_path):
    """ModelOpt 0.29 and before: no quantization_config in config.json, hf_quant_config.json
    beside it (read as vLLM does); a config.json with its own quantization_config keeps it."""
    cfg = {k: v for k, v in LLAMA8.items() if k != "quantization_config"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_hf_config_named(tmp_path / "config.json")[0]["dtype"] == "bf16"
    side = {
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": ["lm_head"],
        },
    }
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(side))
    assert read_hf_config_named(tmp_path / "config.json")[0]["dtype"] == "nvfp4"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA8 | {"quantization_config": None}))
    assert read_hf_config_named(tmp_path / "config.json")[0]["dtype"] == "nvfp4"
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(LLAMA8 | {"quantization_config": fp8}))
    assert read_hf_config_named(tmp_path / "config.json")[0]["dtype"] == "fp8"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quant_algo": "NVFP4"}))
    with pytest.raises(ScenarioError, match=r"is not ModelOpt's hf_quant_config\.json"):
        read_hf_config_named(tmp_path / "config.json")


@pytest.mark.parametrize(
    ("quant", "says"),
    [
        (
            {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"},
            "quant_algo = 'W4A16_NVFP4', which vLLM 0.11 does not run (it reads FP8 and NVFP4)",
        ),
        (
            {"quant_method": "modelopt", "quant_algo": "FP8_PB_WO"},
            "quant_algo = 'FP8_PB_WO', which vLLM 0.11 does not run",
        ),
        (
            {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32},
            "group_size = 32 with NVFP4: NVFP4 scales blocks of 16",
        ),
        (
            {
                "quant_method": "modelopt",
                "quant_algo": "NVFP4",
                "ignore": ["model.layers.0.self_attn*"],
            },
            "keeps attention 16-bit in part only (layers [0]",
        ),
        (
            {
                "quant_method": "modelopt",
                "quant_algo": "NVFP4",
                "ignore": [f"model.layers.{i}.self_attn.q_proj" for i in range(32)],
            },
            "keeps attention 16-bit in part only",
        ),
        (
            {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["model.norm"]},
            "excludes 'model.norm', a module fleetsim cannot place",
        ),
    ],
)
def test_what_is_not_supported_is_refused_in_one_line(quant, says):
    assert says in _refusal(quant)


def test_routers_and_16_bit_parts_are_ignored_in_exclude_modules():
    """Routers (vLLM builds them unquantised), the embedding, vision towers and the MTP layer
    are not parts fleetsim quantises: listing them changes nothing."""
    ignore = ["lm_head", "model.embed_tokens", "model.layers.3.mlp.gate", "*router*"]
    ignore += ["model.layers.0.mlp.shared_expert_gate", "model.visual*", "mtp*"]
    ignore += ["model.layers.40.self_attn*"]  # beyond the 32 layers: an MTP layer
    f = _arch({"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ignore})
    assert (f["dtype"], f["embed_dtype"]) == ("nvfp4", "bf16")


def test_attention_excluded_in_every_layer_stays_16_bit():
    """Whole attention excluded (a wildcard, or every projection of every layer): dtype bf16,
    the experts (none here) and the MLPs' precision is then the attention's too."""
    for ignore in (
        ["lm_head", "*self_attn*"],
        ["lm_head"] + [f"model.layers.{i}.self_attn*" for i in range(32)],
        ["lm_head"]
        + [f"model.layers.{i}.self_attn.{p}" for i in range(32) for p in ("qkv_proj", "o_proj")],
    ):
        f = _arch({"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ignore})
        assert f["dtype"] == "bf16", ignore


def test_deepseek_r1_0528_fp4_precision_per_part_and_weights_by_hand():
    """nvidia/DeepSeek-R1-0528-FP4 as data/models writes it (hf_quant_config.json beside
    config.json: every attention projection and the MTP layer 61 excluded): attention, the
    three dense MLPs and the routers bf16, every expert (58 MoE layers x (256 routed + 1
    shared) x 3 x 7,168 x 2,048) nvfp4, embedding and LM head bf16. 656.46 B expert parameters
    at 0.5625 bytes + 14.56 B at 2 bytes = 398.39 GB = 371.0 GiB."""
    f, name = read_hf_config_named(R1_FP4 / "config.json")
    assert name == "nvidia/DeepSeek-R1-0528-FP4"
    assert (f["dtype"], f["expert_dtype"], f["embed_dtype"]) == ("bf16", "nvfp4", "bf16")
    m = ModelSpec(name=name, **f)
    experts = 58 * 257 * 3 * 7168 * 2048
    assert experts == m.expert_params_total == 656_463_101_952
    rest = m.total_params - experts
    assert rest == 14_562_295_808
    assert m.weight_bytes == experts * 0.5625 + rest * 2.0
    assert m.weight_bytes == pytest.approx(398.385e9, rel=1e-5)
    assert m.weight_bytes / 2**30 == pytest.approx(371.03, abs=0.01)
    # a batch-1 decode step streams the 8 routed experts a token picks and the shared one
    one = 58 * 9 * 3 * 7168 * 2048
    fixed = m.n_attn_layers * m.attn_params_per_layer + 3 * m.dense_mlp_params
    fixed += 58 * m.router_params_per_layer
    assert m.weight_bytes_read(1) == pytest.approx(
        one * 0.5625 + fixed * 2.0 + m.lm_head_params * 2.0, rel=1e-12
    )


def _profile(gpu: str):
    return apply_stack(catalog_profile(gpu, catalog.gpu(gpu)), "vllm-v1", gpu, 256)


def test_the_b200_runs_nvfp4_at_its_fp4_peak_and_hopper_weight_only():
    """B200: DGX B200 data sheet 144 PFLOPS sparse FP4 / 8 GPUs / 2 = 9 PFLOP/s dense, W4A4
    (vLLM quantises the activations: scaled_fp4_quant + cutlass_scaled_fp4_mm); H100 / H200 have
    no FP4 units: Marlin's FP4 kernels, weight-only at the bf16 peak."""
    assert compute_peak(_profile("b200"), "nvfp4") == (9000e12, False)
    for gpu in ("h100-sxm", "h200"):
        p = _profile(gpu)
        assert compute_peak(p, "nvfp4") == (p.peak_flops, True)
    assert compute_peak(_profile("b200"), "mxfp4") == (2250e12, False)  # unchanged (bf16 acts)


def test_nvfp4_experts_are_their_own_grouped_gemms_on_the_b200():
    """DeepSeek-R1-0528-FP4, TP8, a batch-1 decode on the B200: each MoE layer's two grouped
    GEMMs are mxfp4_moe_gemm_s over the 8 touched experts' nvfp4 weights (no Triton K-loop),
    at the FP4 peak."""
    lat = LatencyModel(_model(str(R1_FP4), None), _profile("b200"), 8)
    assert lat._fp4_moe and lat._epeak == 9000e12 and lat._ewb == 0.5625
    kf = lat._kern_g
    parts = moe_layer_parts_s(
        kf, lat._peak_lin, lat._bw, lat.model, MoeLayout(8, 1, False), 1, lat._wb,
        1e11, 0.0, lat._ewb, lat._epeak, lat._moe_fit, False, "triton", True,
    )  # fmt: skip
    cols = 2048 / 8
    up = mxfp4_moe_gemm_s(kf, 9000e12, 8.0e12, 8.0, 8.0, 2 * cols, 7168, 0.5625)
    down = mxfp4_moe_gemm_s(kf, 9000e12, 8.0e12, 8.0, 8.0, 7168, cols, 0.5625)
    assert parts["moe_gemm_up"] == pytest.approx(up, rel=1e-12)
    assert parts["moe_gemm_down"] == pytest.approx(down, rel=1e-12)


def test_fleetsim_latency_prints_the_nvfp4_parts(capsys):
    args = ["--tp", "8", "--model", str(R1_FP4), "--context", "2048"]
    assert latency_main(["--gpu", "b200", *args, "--batch", "1,64"]) == 0
    out = capsys.readouterr().out
    assert "nvidia/DeepSeek-R1-0528-FP4 (bf16 weights, experts nvfp4, kv bf16) on 8 x b200" in out
    assert "experts nvfp4 with nvfp4 activations" in out and "dense FP4 peak" in out
    assert "moe_grouped_gemm" in out
    assert latency_main(["--gpu", "h200", *args, "--batch", "1"]) == 0
    assert "weight-only on this GPU (no FP4 tensor cores" in capsys.readouterr().out


def test_flashinfer_trtllm_takes_nvfp4_experts_and_refuses_mxfp4():
    """--fp8-moe-kernel flashinfer-trtllm on nvfp4 experts: FlashInfer's TensorRT-LLM FP4 MoE
    (VLLM_USE_FLASHINFER_MOE_FP4=1), its fitted fixed time per layer (fi_layer_s, the fp8
    kernel's: assumed) in moe_route and the grouped GEMMs' packed nvfp4 weights and nvfp4 rows at
    its fitted bandwidth fraction; mxfp4 experts refuse it (vLLM runs no such kernel for them)."""
    from fleetsim.device.moe import flashinfer_moe_gemm_s

    lat = LatencyModel(_model(str(R1_FP4), None), _profile("b200"), 8)
    kf, mf = lat._kern_g, lat._moe_fit
    args = (kf, lat._peak_lin, lat._bw, lat.model, MoeLayout(8, 1, False), 64, lat._wb, 1e11, 0.0)
    fi = moe_layer_parts_s(*args, 0.5625, 9000e12, mf, False, "flashinfer-trtllm", True)
    assert fi["moe_route"] == mf.fi_layer_s == 162e-6
    touched = 256 * (1.0 - (1.0 - 8 / 256) ** 64)
    rows, cols = 64 * 8.0, 2048 / 8
    w = touched * 2 * cols * 7168 * 0.5625
    t_m = (w + rows * 7168 * 0.5625 + rows * 2 * cols * 2.0) / (8.0e12 * mf.fi_bw_frac)
    assert fi["moe_gemm_up"] == pytest.approx(t_m, rel=1e-12)  # memory-bound at 64 tokens
    up = flashinfer_moe_gemm_s(
        mf, 9000e12, kf.gemm_eff_max, 8.0e12, rows, touched, 2 * cols, 7168, kf.gemm_bw_eff,
        0.5625, 0.5625,
    )  # fmt: skip
    assert fi["moe_gemm_up"] == up and fi["moe_act"] == 0.0
    # the fp8 call is unchanged by the new arguments' defaults
    fp8 = flashinfer_moe_gemm_s(mf, 4500e12, 0.7, 8.0e12, rows, touched, 512, 7168, 0.9)
    w8 = touched * 512 * 7168 * (1.0 + 4.0 / 128**2)
    assert fp8 == pytest.approx((w8 + rows * 7168 + rows * 512 * 2.0) / (8.0e12 * 0.6), 1e-12)
    with pytest.raises(ScenarioError, match="openai/gpt-oss-120b has mxfp4 experts"):
        gpt = ["--model", "data/models/openai/gpt-oss-120b", "--batch", "1", "--context", "64"]
        latency_main(["--gpu", "b200", *gpt, "--fp8-moe-kernel", "flashinfer-trtllm"])


#: vllm-project/vllm pull request 20578 (benchmarks/kernels/bench_nvfp4_gemm.py, 2025-07-07, a
#: B200): Llama-3.1-8B's N 6,144 x K 4,096 GEMM, TFLOP/s by M: torch bf16, vLLM's CUTLASS NVFP4
#: with the activations' quantisation, and without it
PR20578 = {
    1: (5.924, 3.738, 4.439),
    16: (94.81, 59.96, 71.16),
    128: (729.1, 454.2, 549.5),
    1024: (1325.6, 2221.4, 2895.0),
    16384: (1360.1, 3038.8, 3904.3),
}


def test_published_fp4_gemm_table_against_the_kernel_model():
    """The dense GEMM on the B200 at bf16 and nvfp4 weights (kernels.gemm_time_s, the catalog's
    kernel fit): bf16 within -38..+26 % of the measured TFLOP/s; nvfp4 at M 1-128 +43..+46 %
    faster than the kernel without its quantisation, and at M 16,384 1.69x it: the July-2025
    CUTLASS kernel reached 43 % of the 9 PFLOP/s FP4 peak (noquant; 34 % with the activations'
    quantisation), fleetsim assumes gemm_eff_max (72 %). Recorded, not fitted (docs/accuracy-log.md,
    "NVFP4 checkpoints (ModelOpt) on the B200")."""
    from fleetsim.device.kernels import catalog_kernel_fit, gemm_time_s

    kf = catalog_kernel_fit("b200")
    assert kf is not None
    n, k = 6144, 4096
    for m, (bf16, _, noquant) in PR20578.items():
        fl = 2.0 * m * n * k
        sim16 = fl / gemm_time_s(kf, 2250e12, 8.0e12, m, n, k, 2.0) / 1e12
        sim4 = fl / gemm_time_s(kf, 9000e12, 8.0e12, m, n, k, 0.5625) / 1e12
        assert -0.38 < sim16 / bf16 - 1 < 0.26, m
        if m <= 128:
            assert 0.40 < sim4 / noquant - 1 < 0.50, m
    assert sim4 / noquant == pytest.approx(1.685, abs=0.01)  # M 16,384
    assert noquant / 9000 == pytest.approx(0.434, abs=0.001)


def test_published_mistral_24b_bf16_and_nvfp4_on_one_b200():
    """vllm-project/vllm issue 49723 (vLLM 0.25.1 + FlashInfer 0.6.13, one B200, a ModelOpt
    per-tensor FP8 / NVFP4 Mistral-24B, random 300 in / 64 out at concurrency 64): TPOT P50
    BF16 13.7 ms, NVFP4 6.8 ms, 2.01x. fleetsim (Mistral-Small-24B's architecture, the vllm-v1
    stack): a step of 63 decodes at 332 tokens and one 300-token prompt (64 concurrent requests of
    64 tokens: about one prompt a step), bf16 20.44 ms, nvfp4 10.14 ms: 2.02x; both +49 %, the
    offset shared (vLLM 0.25 against the stack's 0.11 fit)."""
    arch = dict(n_layers=40, d_model=5120, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=32768)
    steps = {}
    for dt in ("bf16", "nvfp4"):
        m = ModelSpec(name="mistral-24b", dtype=dt, embed_dtype="bf16", vocab_size=131072, **arch)
        lat = LatencyModel(m, _profile("b200"), 1)
        steps[dt] = lat.iteration(300, m.attended_pairs(300), 1, 63, 63.0 * 332)[0]
    assert steps["bf16"] / steps["nvfp4"] == pytest.approx(13.7 / 6.8, rel=0.02)
    assert steps["bf16"] / 13.7e-3 - 1 == pytest.approx(0.49, abs=0.03)
    assert steps["nvfp4"] / 6.8e-3 - 1 == pytest.approx(0.49, abs=0.03)


def test_experts_excluded_everywhere_or_refused_in_part():
    """DeepSeek-R1's shapes with ModelOpt's config.json form: experts excluded in all 58 MoE
    layers stay bf16 (the rest nvfp4); in one layer only, refused; shared experts alone, refused."""
    cfg = json.loads((R1_FP4 / "config.json").read_text())
    quant = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    f = architecture_from_hf(
        {**cfg, "quantization_config": {**quant, "ignore": ["lm_head", "*mlp.experts*"]}}, "c"
    )
    assert (f["dtype"], f["expert_dtype"], f["embed_dtype"]) == ("nvfp4", "bf16", "bf16")
    one = {**quant, "ignore": ["model.layers.3.mlp.experts*"]}
    assert "keeps the experts 16-bit in 1 of 58 MoE layers" in _refusal(one, cfg)
    shared = {**quant, "ignore": ["model.layers.3.mlp.shared_experts*"]}
    assert "keeps the shared experts 16-bit" in _refusal(shared, cfg)


def test_every_catalog_gpu_has_its_nvfp4_experts_line():
    from fleetsim.device.moe import NVFP4_MOE_PATHS, nvfp4_moe_path

    assert set(NVFP4_MOE_PATHS) == set(catalog.gpus())
    assert "peak_flops_fp4" in nvfp4_moe_path("some-future-gpu")
