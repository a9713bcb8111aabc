"""Issue 22 walked a second time (helper M41): splits vLLM refuses, quantization formats a user's
config.json has, contradictory MoE and layer-type fields, and the Hugging Face cache as it lies
on disk. Each test is a failure the walk found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL, merge

from fleetsim.apps.cli import main
from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import model_spec
from fleetsim.config.hf import architecture_from_hf
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
Q235_FP8 = MODELS / "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8/config.json"
LLAMA8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _latency(capsys, model: str, *flags: str) -> tuple[int, str]:
    rc = main(["latency", "--gpu", "h200", "--model", model, *flags, "--batch", "1",
               "--context", "100"])  # fmt: skip
    cap = capsys.readouterr()
    return rc, cap.err if rc else cap.out.splitlines()[0]


def test_fp8_experts_split_into_partial_blocks_are_refused_as_vllm_does(capsys):
    """Qwen3-235B-A22B-FP8 at TP8 without expert parallelism: each 1,536-wide expert splits 192
    wide per GPU, not whole 128-column blocks, and vLLM refuses to load it ("The output_size of
    gate's and up's weight = 192 is not divisible by weight quantization block_n = 128",
    Fp8MoEMethod.create_weights); fleetsim simulated it. TP4 (384 = 3 x 128) and EP8 load."""
    rc, err = _latency(capsys, str(Q235_FP8), "--tp", "8")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--tp = 8: " in err and "split 192 wide on each of 8 GPUs" in err, err
    assert "(fix: add --expert-parallel, or split each expert over 1, 2, 4 GPUs)" in err
    assert _latency(capsys, str(Q235_FP8), "--tp", "4")[0] == 0
    assert _latency(capsys, str(Q235_FP8), "--tp", "8", "--expert-parallel")[0] == 0
    # the scenario checks it too (it checked expert splits only with DP or EP)
    d = merge(SMALL, hardware={"gpu": "h200"}, fleet={"tensor_parallel": 8})
    d["model"] = {"config": str(Q235_FP8)}
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(d))
    assert str(e.value).startswith("fleet.tensor_parallel = 8: "), str(e.value)
    assert "(fix: set expert_parallel = true, or split each expert over 1, 2, 4 GPUs)" in str(
        e.value
    )
    d["fleet"]["expert_parallel"] = True
    assert resolve(scenario_from_dict(d)).tp == 8


def test_a_given_dtype_reads_a_quantization_the_reader_does_not(tmp_path):
    """The refusal of an unknown quant_method said ``(fix: give [model] dtype, ...)``, and with
    ``[model] dtype`` given it refused the same way."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**LLAMA8B, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))  # fmt: skip
    with pytest.raises(ScenarioError) as e:
        model_spec(scenario_from_dict({"model": {"config": str(cfg)}}), "")
    assert "'bitsandbytes' is not one fleetsim reads" in str(e.value)
    assert "(fix: give [model] dtype (--dtype for fleetsim latency)" in str(e.value)
    spec = model_spec(scenario_from_dict({"model": {"config": str(cfg), "dtype": "int4"}}), "")
    assert spec.dtype == "int4" and spec.embed_dtype is None


@pytest.mark.parametrize(
    ("quant", "dtype"),
    [
        # Meta's Llama-3.1-405B-Instruct-FP8: fp8 weights per channel, lm_head not converted
        ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
          "modules_to_not_convert": ["lm_head"]}, "fp8"),
        # compressed-tensors FP8 ("float-quantized") was read as int8 from its 8 bits
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}},
         "fp8"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}},
         "int4"),
        ({"quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"weights": {"num_bits": 8, "type": "int"}}}}, "int8"),
    ],
)  # fmt: skip
def test_quantization_formats_read_as_their_number_type(quant, dtype):
    arch = architecture_from_hf({**LLAMA8B, "quantization_config": quant}, "config.json")
    assert (arch["dtype"], arch["embed_dtype"]) == (dtype, "bf16")


def test_a_four_bit_float_format_is_refused_in_one_line():
    """NVFP4 (compressed-tensors ``type: float``, 4 bits) was read as int4."""
    quant = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
             "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}}  # fmt: skip
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf({**LLAMA8B, "quantization_config": quant}, "config.json")
    assert "compressed-tensors with 4-bit float weights (e.g. NVFP4), which fleetsim does not " \
        "read (fix: give [model] dtype" in str(e.value), str(e.value)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # read as one expert per token
        ({"num_experts_per_tok": 0}, "has 128 experts but num_experts_per_tok = 0 (fix: give "
         "num_experts_per_tok"),
        ({"num_experts_per_tok": None}, "has 128 experts but num_experts_per_tok = None"),
        # read as a dense model of intermediate_size
        ({"num_experts": 0}, "has 0 experts but num_experts_per_tok = 8 (fix: give the number "
         "of experts"),
    ],
)  # fmt: skip
def test_contradictory_expert_counts_are_refused(change, words):
    cfg = json.loads((MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507/config.json").read_text())
    cfg = {k: v for k, v in {**cfg, **change}.items() if v is not None}
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("n", [10, 48])
def test_layer_types_of_the_wrong_length_are_refused(n):
    """gpt-oss-20b (24 layers) with 10 or 48 layer types was read as the list's pattern."""
    cfg = json.loads((MODELS / "openai/gpt-oss-20b/config.json").read_text())
    cfg["layer_types"] = (["sliding_attention", "full_attention"] * 24)[:n]
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert f"layer_types has {n} entries for num_hidden_layers = 24" in str(e.value)


def test_a_head_width_that_cannot_be_derived_names_the_files_keys():
    """It said ``model.n_heads = 32: d_model must divide by n_heads (or give head_dim)``: the
    inline fields' names, not the file's, and not the width that fails."""
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf({**LLAMA8B, "hidden_size": 4100}, "config.json")
    assert str(e.value) == (
        "model.config = 'config.json': has no head_dim, and hidden_size = 4100 does not divide "
        "by num_attention_heads = 32 to give one (fix: give head_dim (the width of one "
        "attention head), or check hidden_size)"
    )


def _snapshot(root: Path, repo: str, h: str, cfg: dict) -> Path:
    org, name = repo.split("/")
    snap = root / f"hub/models--{org}--{name}/snapshots/{h}"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    return snap


def test_a_fine_tune_in_the_cache_is_named_after_its_repository(tmp_path, capsys):
    """A fine-tune's config.json carries its base's id (or a training run's relative path) in
    ``_name_or_path``: it was named ``meta-llama/Llama-3.1-8B`` or ``output/checkpoint-500``."""
    a = _snapshot(tmp_path, "myorg/llama-sft", "beef", {
        **LLAMA8B, "_name_or_path": "meta-llama/Llama-3.1-8B"})  # fmt: skip
    b = _snapshot(tmp_path, "myorg/llama-rl", "cafe", {
        **LLAMA8B, "_name_or_path": "output/checkpoint-500"})  # fmt: skip
    assert _latency(capsys, str(a))[1].startswith("myorg/llama-sft (")
    assert _latency(capsys, str(b / "config.json"))[1].startswith("myorg/llama-rl (")
    # [model] name still wins
    sc = scenario_from_dict({"model": {"config": str(a), "name": "mine"}})
    assert model_spec(sc, "").name == "mine"


def test_the_caches_repository_folder_reads_the_snapshot_refs_main_names(tmp_path, capsys):
    """``--model ~/.cache/huggingface/hub/models--Org--Name`` (the repository folder, holding
    refs/ and snapshots/) said ``is a directory, not a regular file``."""
    _snapshot(tmp_path, "meta-llama/Llama-3.1-8B", "0123abcd", LLAMA8B)
    _snapshot(tmp_path, "meta-llama/Llama-3.1-8B", "89ef4567", {**LLAMA8B, "vocab_size": 1000})
    repo = tmp_path / "hub/models--meta-llama--Llama-3.1-8B"
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0123abcd\n")
    rc, out = _latency(capsys, str(repo))
    assert rc == 0 and out.startswith("meta-llama/Llama-3.1-8B ("), out
    spec = model_spec(scenario_from_dict({"model": {"config": str(repo)}}), "")
    assert spec.vocab_size == 128256  # refs/main's snapshot, not the other one
    # a folder with neither
    (tmp_path / "empty").mkdir()
    rc, err = _latency(capsys, str(tmp_path / "empty"))
    assert rc == 2 and len(err.splitlines()) == 1
    assert "a folder with no config.json (fix: " in err, err


def test_latency_with_a_missing_config_json_names_the_flag(tmp_path, capsys):
    """It said ``model.config = ...: no such file ... (relative to the scenario file)``, with no
    scenario file in sight."""
    rc, err = _latency(capsys, str(tmp_path / "x/config.json"))
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--model = '{tmp_path / 'x/config.json'}': no such file (fix: " in err, err
    assert "scenario" not in err


def _day(tmp_path: Path, capsys, config: Path, **fleet) -> str:
    import tomli_w

    d = merge(SMALL, hardware={"gpu": "h100-sxm"}, fleet={"tensor_parallel": 1, **fleet})
    d["model"] = {"config": str(config)}
    d["simulation"] = {**d.get("simulation", {}), "hours": 1}
    d["traffic"] = {**d["traffic"], "requests_per_day": 0}
    p = tmp_path / "s.toml"
    p.write_text(tomli_w.dumps(d))
    assert main(["validate", str(p)]) == 0
    err = capsys.readouterr().err
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 0
    return err + capsys.readouterr().out


def test_the_summaries_name_the_kv_kinds_and_the_experts_split(tmp_path, capsys):
    """gpt-oss-120b on one H100: the KV budget read ``248,816 tokens (KV cache bf16, 73,728
    bytes per token)``, 18.3 GB of KV where 9.8 GB hold it, with no word of its 18 windowed
    layers; the run said ``prefix caching``, which the paged engine did not then model for
    window layers (it does now); neither named the experts."""
    out = _day(tmp_path, capsys, MODELS / "openai/gpt-oss-120b/config.json")
    kinds = (
        "73,728 bytes per token in full; 18 full-attention + 18 sliding-window layers of 128 "
        "tokens; 42,639 bytes per token at the traffic's typical sequence"
    )
    assert kinds in out, out
    # (18 x 2,048 B = 36,864 B in the full layers, + 18 x 2,048 B x the share of the tokens
    # that SMALL's typical sequences hold over their time in flight that the 128-token window
    # keeps: config/resolved.py typical_kv_bytes_per_token; 43,108 at their mid-life contexts,
    # unweighted, before 2026-12-08)
    # (its window layers' prefixes are cached as vLLM's hybrid manager caches them: h46)
    assert ", prefix caching" in out
    assert "no prefix caching" not in out
    assert "(bf16 weights, experts mxfp4, KV cache bf16; MoE 128 experts, top 4) on" in out


def test_the_summaries_name_latent_attention_and_an_expert_parallel_split(tmp_path, capsys):
    """Qwen3-30B-A3B on TP1 x DP2 with EP: 64 whole experts on each GPU."""
    cfg = MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507/config.json"
    out = _day(tmp_path, capsys, cfg, data_parallel=2, expert_parallel=True)
    assert "; MoE 128 experts, top 8, 64 whole experts per GPU (EP2)) on" in out, out
    assert ", prefix caching;" in out  # (no window: the engine caches prefixes)
    # DeepSeek-V3.1's latent, (512 + 64) x 61 layers x 2 B, is on every GPU of a TP8 replica
    from fleetsim.device.modelspec import ModelSpec
    from fleetsim.results.summary import kv_kinds

    sc = scenario_from_dict({"model": {"config": str(MODELS / "deepseek-ai/DeepSeek-V3.1")}})
    ds: ModelSpec = model_spec(sc, "")
    assert ds.kv_bytes_per_token == 70_272
    assert kv_kinds(ds, 8 * 70_272) == (
        "latent attention: 512 + 64 cached per token in each of 61 layers; 562,176 bytes per "
        "token on the replica (the latent on every GPU)"
    )


def test_a_dumped_scenario_loads_back_as_the_configs_model():
    """``Scenario.model_dump`` wrote the defaults ``name = "llama-3.1-70b"`` and ``dtype =
    "bf16"``; loaded back (plan's candidates, sweeps, the Python API, the pods' workers), they
    were set and overrode the file's: Qwen3-235B-A22B-FP8 (236.4 GB of fp8 weights) became a
    470.2 GB bf16 model named llama-3.1-70b, and ``fleetsim plan`` sized that."""
    from fleetsim.apps.plan import make_candidates
    from fleetsim.config.resolved import resolved_dict

    sc = scenario_from_dict({"model": {"config": str(Q235_FP8)}, "hardware": {"gpu": "h200"}})
    again = model_spec(scenario_from_dict(sc.model_dump(mode="json")), "")
    assert (again.name, again.dtype) == ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "fp8")
    assert round(again.weight_bytes / 1e8) == 2364  # 236.4 GB (the routers in bf16)
    # what the scenario sets is kept
    mine = scenario_from_dict({"model": {"config": str(Q235_FP8), "name": "q", "dtype": "bf16"}})
    spec = model_spec(scenario_from_dict(mine.model_dump(mode="json")), "")
    assert (spec.name, spec.dtype) == ("q", "bf16")
    # plan's candidates: TP2 holds the fp8 weights; TP8 splits the experts into partial blocks
    data = sc.model_dump(mode="json")
    tp2, tp8 = make_candidates(data, sc, ["h200"], [2, 8], "")
    assert tp2.rs is not None and tp2.rs.model.dtype == "fp8"
    assert tp2.rs.model.name == "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
    assert tp8.rs is None and "split 192 wide on each of 8 GPUs" in tp8.problem
    # validate's JSON still names the resolved model first
    m = resolved_dict(tp2.rs)["model"]
    assert list(m)[:3] == ["name", "config", "dtype"]
    assert (m["name"], m["dtype"]) == ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "fp8")


def test_an_uneven_expert_split_says_vllm_would_run_it(capsys):
    """128 experts over EP3: vLLM runs it (determine_expert_map gives the first 128 mod 3 = 2
    ranks 43 experts, the last 42); fleetsim's model needs an even split, and said only ``do
    not divide``, as if vLLM refused it."""
    cfg = str(MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507")
    rc, err = _latency(capsys, cfg, "--dp", "3", "--expert-parallel")
    assert rc == 2 and len(err.splitlines()) == 1
    words = (
        "(vLLM would give the first 2 ranks one more expert, determine_expert_map; fleetsim "
        "models an even split) (fix: make --tp x --dp one of 1, 2, 4, 8"
    )
    assert words in err, err


def test_a_window_no_request_can_fill_is_full_attention():
    """Phi-3-mini-128k-instruct: sliding_window = 262,144 over max_position_embeddings =
    131,072. It was read as 32 window layers of 262,144 tokens (the summaries said ``0
    full-attention + 32 sliding-window layers``, and the paged engine dropped prefix caching
    for them); no request can fill the window, so every layer holds its whole context."""
    from fleetsim.device.modelspec import ModelSpec
    from fleetsim.results.summary import kv_kinds

    phi3 = {
        "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "vocab_size": 32064, "max_position_embeddings": 131072, "sliding_window": 262144,
    }  # fmt: skip
    arch = architecture_from_hf(phi3, "config.json")
    assert "sliding_window_tokens" not in arch and arch["max_context_tokens"] == 131072
    m = ModelSpec(name="phi3", **arch)
    assert m.kv_uniform and m.kv_bytes_per_token == 2 * 32 * 96 * 2 * 32  # 393,216 B
    assert kv_kinds(m, m.kv_bytes_per_token) == ""
    # Phi-3-mini-4k's 2,047-token window over 4,096 is a window on every layer
    four_k = {**phi3, "max_position_embeddings": 4096, "sliding_window": 2047}
    short = ModelSpec(name="phi3-4k", **architecture_from_hf(four_k, "config.json"))
    assert short.n_sliding_layers == 32 and short.n_global_attn_layers == 0
    assert kv_kinds(short).startswith("all 32 layers sliding-window, of 2,047 tokens")


QWEN3_NEXT = {  # Qwen3-Next-80B-A3B's shape: Gated DeltaNet on 3 layers in 4
    "model_type": "qwen3_next", "hidden_size": 2048, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "num_hidden_layers": 48, "num_experts": 512,
    "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "intermediate_size": 5120, "vocab_size": 151936,
    "max_position_embeddings": 262144, "full_attention_interval": 4,
    "linear_num_value_heads": 32, "linear_num_key_heads": 16, "decoder_sparse_step": 1,
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({}, "has full_attention_interval = 4: layers that are not attention (model_type "
         "'qwen3_next': linear attention or state-space layers), which the reader does not "
         "place (fix: describe the model inline in [model]"),
        # without a sliding window the layer types were not read at all
        ({"full_attention_interval": None, "linear_num_value_heads": None,
          "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12},
         "layer_types has 'linear_attention' (fix: use full_attention and sliding_attention"),
    ],
)  # fmt: skip
def test_layers_that_are_not_attention_are_refused(change, words):
    """Qwen3-Next was read as 48 attention layers, 4 x the KV it holds (12 full-attention
    layers; the others keep a constant Gated DeltaNet state fleetsim's reader does not place)."""
    cfg = {k: v for k, v in {**QWEN3_NEXT, **change}.items() if v is not None}
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert words in str(e.value), str(e.value)


def test_gemma2_without_layer_types_alternates_its_window():
    """gemma-2-9b's published config.json has sliding_window = 4096 and no layer_types (nor
    sliding_window_pattern): transformers' Gemma2Config alternates sliding and full layers, as
    vLLM then runs them. It was read as 42 window layers, which beyond 4,096 tokens hold half
    the KV the model holds (its 21 full layers keep the whole context)."""
    from fleetsim.device.modelspec import ModelSpec

    gemma2 = {
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "num_hidden_layers": 42, "vocab_size": 256000, "max_position_embeddings": 8192,
        "sliding_window": 4096, "torch_dtype": "float32",
    }  # fmt: skip
    m = ModelSpec(name="gemma-2-9b", **architecture_from_hf(gemma2, "config.json"))
    assert (m.n_global_attn_layers, m.n_sliding_layers) == (21, 21)
    assert m.kv_bytes_per_token == 42 * 2 * 8 * 256 * 4  # fp32, as the file says
    # a file's own pattern still wins
    m3 = ModelSpec(name="g", **architecture_from_hf(
        {**gemma2, "sliding_window_pattern": 3}, "config.json"))  # fmt: skip
    assert m3.n_global_attn_layers == 14


def test_plan_counts_a_data_parallel_replicas_gpus(tmp_path, capsys):
    """Qwen3-30B-A3B on TP1 x DP2 with EP: the plan's GPUs column said 1 per replica while its
    hardware cost counted 2 (plan.parquet ``gpus`` = pods x replicas x tensor_parallel)."""
    import pyarrow.parquet as pq

    p = tmp_path / "s.toml"
    p.write_text(
        f'[model]\nconfig = "{MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507"}"\n'
        '[hardware]\ngpu = "h100-sxm"\n'
        "[fleet]\ntensor_parallel = 1\ndata_parallel = 2\nexpert_parallel = true\n"
        "[simulation]\nhours = 2\n[traffic]\nrequests_per_day = 2000\n"
    )
    out = tmp_path / "plan"
    argv = ["plan", str(p), "--gpus", "h100-sxm", "--tp", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    row = pq.read_table(out / "plan.parquet").to_pylist()[0]
    assert (row["tensor_parallel"], row["replicas"], row["gpus"]) == (1, 1, 2)
    assert "each replica is TP x DP2 GPUs (fleet.data_parallel = 2, expert parallel)" in text


def test_a_home_relative_cache_path_is_read(tmp_path, monkeypatch, capsys):
    """``config = "~/.cache/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/abc"`` (the cache's
    default place) was looked for as ``<scenario folder>/~/.cache/...``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _snapshot(tmp_path / "home/.cache/huggingface", "Qwen/Qwen3-8B", "abc", LLAMA8B)
    written = "~/.cache/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/abc"
    spec = model_spec(scenario_from_dict({"model": {"config": written}}), str(tmp_path / "s.toml"))
    assert spec.name == "Qwen/Qwen3-8B" and spec.n_layers == 32
    rc, out = _latency(capsys, "~/.cache/huggingface/hub/models--Qwen--Qwen3-8B")
    assert rc == 0 and out.startswith("Qwen/Qwen3-8B ("), out
