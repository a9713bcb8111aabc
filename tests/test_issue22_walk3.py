"""Issue 22's config reader, the m41 walk's leftovers (helper M42): a Hugging Face id the
checkout ships, torch_dtype / dtype values and precedence, GPTQ / AWQ 8-bit weights, and the
sliding window of Mistral-7B-v0.1 and Phi-3-mini-4k. Each test is a failure the walk left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL, merge
from test_issue22_walk2 import LLAMA8B  # the same Llama-3.1-8B file as the m41 walk

from fleetsim.apps.cli import main
from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import model_spec
from fleetsim.config.hf import architecture_from_hf
from fleetsim.config.loading import scenario_from_dict
from fleetsim.device.modelspec import model_from_catalog

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
QWEN8B = MODELS / "Qwen/Qwen3-8B/config.json"


def _spec(**model):
    return model_spec(scenario_from_dict({"model": model}), "")


def _latency_head(capsys, model: str, *flags: str) -> str:
    assert main(["latency", "--gpu", "h100-sxm", "--model", model, *flags, "--batch", "1",
                 "--context", "100"]) == 0  # fmt: skip
    return capsys.readouterr().out.splitlines()[0]


# ---- 1. a Hugging Face id the checkout ships ----------------------------------------------


def test_an_id_the_checkout_ships_reads_its_copy(tmp_path, capsys):
    """``[model] name = "Qwen/Qwen3-8B"`` was refused with the path of the very file it could
    read. It reads data/models/Qwen/Qwen3-8B/config.json, as ``config = ...`` does, and the
    summaries say so."""
    by_id = _spec(name="Qwen/Qwen3-8B")
    assert by_id == _spec(config=str(QWEN8B))
    assert (by_id.name, by_id.n_layers, by_id.head_dim, by_id.d_ff) == ("Qwen/Qwen3-8B", 36, 128,
                                                                        12288)  # fmt: skip
    # inline fields override the copy, as they override a config file
    assert _spec(name="Qwen/Qwen3-8B", n_layers=4).n_layers == 4
    head = _latency_head(capsys, "Qwen/Qwen3-8B")
    assert head == (
        "Qwen/Qwen3-8B (bf16 weights, kv bf16) on 1 x h100-sxm; "
        "config: data/models/Qwen/Qwen3-8B/config.json"
    ), head
    d = merge(SMALL, model={"name": "Qwen/Qwen3-8B"}, simulation={"hours": 1})
    p = tmp_path / "s.toml"
    import tomli_w

    p.write_text(tomli_w.dumps(d))
    assert main(["validate", str(p)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "# model Qwen/Qwen3-8B (config: data/models/Qwen/Qwen3-8B/config.json): 8.19 B "
    ), err
    # a path keeps its own header (no note)
    assert (
        _latency_head(capsys, str(QWEN8B))
        == "Qwen/Qwen3-8B (bf16 weights, kv bf16) on 1 x h100-sxm"
    )


def test_a_catalog_name_keeps_meaning_the_catalog_entry(capsys):
    """A catalog name is looked up first: ``qwen3-8b`` is the catalog's entry (named so), not
    the file its ``hf_id`` names; the two describe one architecture."""
    cat = _spec(name="qwen3-8b")
    assert cat == model_from_catalog("qwen3-8b", "bf16")
    assert cat.name == "qwen3-8b"
    assert _latency_head(capsys, "qwen3-8b") == "qwen3-8b (bf16 weights, kv bf16) on 1 x h100-sxm"
    by_id = _spec(name="Qwen/Qwen3-8B")
    assert (cat.total_params, cat.kv_bytes_per_token) == (by_id.total_params,
                                                          by_id.kv_bytes_per_token)  # fmt: skip


def test_an_id_with_every_field_inline_keeps_its_inline_architecture():
    inline = dict(n_layers=2, d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, vocab_size=1000)
    spec = _spec(name="Qwen/Qwen3-8B", **inline)
    assert (spec.n_layers, spec.d_model, spec.vocab_size) == (2, 256, 1000)


def test_an_id_the_checkout_lacks_is_still_refused(capsys):
    with pytest.raises(ScenarioError) as e:
        _spec(name="mistralai/Mistral-7B-v0.1")
    assert str(e.value) == (
        "model.name = 'mistralai/Mistral-7B-v0.1': a Hugging Face id that is neither a catalog "
        "name nor in this checkout's data/models; fleetsim never downloads (fix: point at a "
        'local config.json: [model] config = "path/to/config.json" or --model '
        "path/to/config.json (huggingface-cli download ID config.json fetches it))"
    )


# ---- 2. an unknown torch_dtype / dtype ------------------------------------------------------


def test_an_unknown_torch_dtype_is_refused_in_one_line():
    """``torch_dtype = "bfloat61"`` was read as bf16 without a word."""
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf({**LLAMA8B, "torch_dtype": "bfloat61"}, "config.json")
    assert str(e.value) == (
        "model.config = 'config.json': torch_dtype = 'bfloat61' is not a precision fleetsim "
        "reads (bfloat16, float16, half, float32, float) (fix: give [model] dtype (--dtype for "
        "fleetsim latency): bf16, fp16, fp32, fp8, int8 or int4)"
    )
    with pytest.raises(ScenarioError, match="dtype = 'auto' is not a precision"):
        architecture_from_hf({**LLAMA8B, "dtype": "auto"}, "config.json")


def test_an_unknown_torch_dtype_is_read_when_something_else_sets_the_precision(tmp_path):
    bad = {**LLAMA8B, "torch_dtype": "float8_e4m3fn"}
    # a quantization_config that sets the linear layers' precision
    fp8 = architecture_from_hf({**bad, "quantization_config": {"quant_method": "fp8"}}, "c")
    assert fp8["dtype"] == "fp8"
    # the user's [model] dtype
    assert "dtype" not in architecture_from_hf(bad, "c", dtype_given=True)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(bad))
    assert _spec(config=str(cfg), dtype="fp16").dtype == "fp16"
    # mxfp4 sets the experts' precision only: the rest still needs a known one
    with pytest.raises(ScenarioError, match="torch_dtype = 'float8_e4m3fn' is not a precision"):
        architecture_from_hf({**bad, "quantization_config": {"quant_method": "mxfp4"}}, "c")


# ---- 3. dtype and torch_dtype both ------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "dtype"),
    [
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, "fp32"),  # dtype wins
        ({"torch_dtype": "float16", "dtype": "bfloat16"}, "bf16"),  # whatever the key order
        ({"dtype": None, "torch_dtype": "float16"}, "fp16"),  # a null dtype falls back
        ({"dtype": "float16"}, "fp16"),
    ],
)
def test_dtype_is_read_before_torch_dtype_as_transformers_does(keys, dtype):
    """transformers' PretrainedConfig keeps ``dtype`` when a file has both (its
    configuration_utils.py: "If both are provided, keep `dtype`"); the reader read
    ``torch_dtype`` whenever the key was present."""
    cfg = {k: v for k, v in LLAMA8B.items() if k != "torch_dtype"}
    assert architecture_from_hf({**cfg, **keys}, "config.json")["dtype"] == dtype


# ---- 4. GPTQ / AWQ 8-bit ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_eight_bit_gptq_and_awq_name_their_approximation(method, tmp_path, capsys):
    """vLLM runs GPTQ / AWQ int8 checkpoints weight-only (16-bit activations: gptq.py,
    gptq_marlin.py W8A16, awq.py); fleetsim's precision model has one dtype for the bytes and
    the compute peak, so int8 runs at the int8 peak (the bytes are right: int8 linear layers,
    bf16 embedding and LM head); the header names the approximation."""
    cfg = tmp_path / "m" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({**LLAMA8B, "quantization_config": {
        "quant_method": method, "bits": 8, "group_size": 128}}))  # fmt: skip
    spec = _spec(config=str(cfg))
    assert (spec.dtype, spec.embed_dtype) == ("int8", "bf16")
    head = _latency_head(capsys, str(cfg))
    assert head.endswith(
        "; GPTQ/AWQ int8 weights timed at the int8 peak, though vLLM runs them weight-only "
        "(16-bit GEMMs): compute-bound steps read fast (docs/model.md)"
    ), head
    # 4-bit weights are weight-only already (no int4 peak), and --dtype decides for itself
    cfg.write_text(json.dumps({**LLAMA8B, "quantization_config": {"quant_method": method,
                                                                   "bits": 4}}))  # fmt: skip
    assert "GPTQ/AWQ" not in _latency_head(capsys, str(cfg))
    assert "GPTQ/AWQ" not in _latency_head(capsys, str(cfg), "--dtype", "fp8")


def test_the_run_and_validate_headers_name_it_for_a_relative_config(tmp_path, monkeypatch, capsys):
    """A scenario's ``config = "m/config.json"`` is relative to the scenario's folder: the run
    summary, which kept no path, reads it from there too."""
    cfg = tmp_path / "m" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({**LLAMA8B, "quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": 128}}))  # fmt: skip
    d = merge(SMALL, model={"config": "m/config.json"}, simulation={"hours": 1})
    d["traffic"]["requests_per_day"] = 0
    import tomli_w

    (tmp_path / "s.toml").write_text(tomli_w.dumps(d))
    monkeypatch.chdir(tmp_path.parent)  # (not the scenario's folder)
    scenario = str(tmp_path / "s.toml")
    note = "GPTQ/AWQ int8 weights timed at the int8 peak, though vLLM runs them weight-only"
    assert main(["validate", scenario]) == 0
    assert note in capsys.readouterr().err.splitlines()[0]
    assert main(["run", scenario, "--out", str(tmp_path / "out")]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "(int8 weights, embedding bf16, KV cache bf16; " + note in head, head


# ---- 5. a sliding window without layer_types --------------------------------------------------

#: the keys that matter of the public config.json files (mistralai/Mistral-7B-v0.1,
#: microsoft/Phi-3-mini-4k-instruct)
MISTRAL = {
    **LLAMA8B,
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
}
PHI3 = {**LLAMA8B, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 3072, "intermediate_size": 8192, "num_key_value_heads": 32,
        "vocab_size": 32064, "max_position_embeddings": 4096, "sliding_window": 2047}  # fmt: skip


@pytest.mark.parametrize(("cfg", "window"), [(MISTRAL, 4096), (PHI3, 2047)])
def test_a_window_without_layer_types_holds_on_every_layer_as_in_vllm(cfg, window):
    """vLLM 0.11 gives a model whose config has no layer_types one model-level window
    (``is_interleaved`` is false: EngineArgs.create_engine_config sets
    CacheConfig.sliding_window = ModelConfig.get_sliding_window()), and every Attention layer
    without a per-layer window takes it (vllm/attention/layer.py): all 32 layers hold at most
    W tokens, as the reader says."""
    arch = architecture_from_hf(cfg, "config.json")
    assert (arch["sliding_window_tokens"], arch.get("sliding_global_every", 0)) == (window, 0)
    spec = _spec(name="m", **{k: v for k, v in arch.items() if k != "dtype"})
    assert spec.n_layers == 32 and spec.sliding_window_tokens == window
