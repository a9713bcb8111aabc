"""``[model] config = "config.json"``: architectures from local Hugging Face configs."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from conftest import SMALL, merge

from fleetsim.apps.cli import main
from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import model_spec
from fleetsim.config.hf import architecture_from_hf, hf_model_name
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.device import catalog
from fleetsim.device.modelspec import model_from_catalog

DATA = Path(__file__).resolve().parent / "data"
MODELS = Path(__file__).resolve().parents[1] / "data" / "models"


def _spec(config: Path | str, **model):
    d = merge(SMALL, fleet={"tensor_parallel": 4})
    d["model"] = {"config": str(config), **model}  # (no catalog name)
    return resolve(scenario_from_dict(d)).model


@pytest.mark.parametrize(
    ("folder", "catalog_name"),
    [("llama-3.1-70b", "llama-3.1-70b"), ("mixtral-8x7b", "mixtral-8x7b")],
)
def test_a_model_cards_config_gives_the_catalog_architecture(folder, catalog_name):
    spec = _spec(DATA / folder / "config.json")
    cat = model_from_catalog(catalog_name)
    assert spec == replace(cat, name=folder)  # every field, not only the count
    assert spec.total_params == cat.total_params
    published = catalog.model(catalog_name)["published_params"]
    assert spec.total_params == pytest.approx(published, rel=2e-3)  # 70.6 B and 46.7 B


def test_validate_prints_the_derived_parameter_count(tmp_path, capsys):
    f = tmp_path / "s.toml"  # the config path is relative to the scenario file
    f.write_text(
        '[model]\nconfig = "cfg/config.json"\n[fleet]\ntensor_parallel = 4\n'
        "[traffic]\nrequests_per_day = 1000\n"
    )
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/config.json").write_text((DATA / "llama-3.1-70b/config.json").read_text())
    assert main(["validate", str(f)]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["derived"]["total_params"] == 70_552_387_584
    assert doc["model"]["n_kv_heads"] == 8 and doc["model"]["name"] == "cfg"
    assert "70.55 B parameters (70,552,387,584)" in cap.err


def test_fields_in_the_scenario_override_the_file_and_the_files_dtype_is_the_default(tmp_path):
    cfg = json.loads((DATA / "llama-3.1-70b/config.json").read_text())
    cfg["torch_dtype"] = "float16"
    f = tmp_path / "config.json"
    f.write_text(json.dumps(cfg))
    spec = _spec(f, n_layers=40)
    assert (spec.n_layers, spec.dtype, spec.d_model) == (40, "fp16", 8192)
    assert _spec(f, dtype="fp8").dtype == "fp8"  # a dtype the scenario gives wins
    assert _spec(f, name="mine").name == "mine"


def test_gpt2_style_configs():
    arch = architecture_from_hf(
        {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
         "n_positions": 1024},
        "gpt2",
    )  # fmt: skip
    assert arch == {
        "n_layers": 12,
        "d_model": 768,
        "n_heads": 12,
        "n_kv_heads": 12,
        "vocab_size": 50257,
        "n_experts": 1,
        "n_active_experts": 1,
        "d_ff": 3072,
        "mlp": "gelu",
        "tied_embeddings": True,  # transformers' default, which GPT-2's file leaves implicit
        "max_context_tokens": 1024,
    }


LLAMA = json.loads((DATA / "llama-3.1-70b/config.json").read_text())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"num_hidden_layers": None}, "has no num_hidden_layers"),
        (
            {"num_local_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [3]},
            "not a leading run of layers",
        ),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window = true"),
        (
            {"sliding_window": 128, "layer_types": ["full_attention", "sliding_attention"] * 40},
            "not periodic",
        ),
        ({"hybrid_override_pattern": "M*"}, "is not 80 characters"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "'bitsandbytes' is not one"),
    ],
)
def test_what_the_model_cannot_express_is_refused(change, words):
    cfg = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert e.value.field == "model.config" and words in str(e.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # issue 22: zero KV heads was read as "no GQA" (4x the KV per token)
        ({"num_key_value_heads": 0}, "num_key_value_heads = 0: a model has at least one KV head"),
        # issue 23: the comparison ran before the type check (TypeError at hf.py:84)
        ({"num_local_experts": "8"}, "num_local_experts = '8' is a string"),
        ({"num_local_experts": [8]}, "num_local_experts = a list of 1 is a list"),
        ({"num_experts_per_tok": {"k": 2}, "num_local_experts": 8}, "is an object"),
        # the message names the real value: a string, not the number it looks like
        ({"head_dim": "128"}, "head_dim = '128' is a string"),
        ({"hidden_size": -4}, "hidden_size = -4 is outside 1..10000000"),
        ({"hidden_size": 8192.5}, "hidden_size = 8192.5 is a float"),
        ({"num_hidden_layers": True}, "num_hidden_layers = True is a boolean"),
        # the inline [model] bounds apply to the file's values
        ({"max_position_embeddings": 10**19}, "max_position_embeddings = about 10^19 is outside"),
        ({"vocab_size": 10**400}, "vocab_size = about 10^400 is outside"),
        ({"num_attention_heads": 64, "num_key_value_heads": 6}, "does not divide"),
        ({"num_local_experts": 8, "num_experts_per_tok": 9}, "more than the 8 experts"),
        ({"text_config": "x"}, "text_config = 'x' is a string"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings = 'no' is a string"),
        ({"sliding_window": 128, "layer_types": ["full_attention", 3]}, "layer_types has 3"),
    ],
)
def test_a_wrong_type_or_value_is_one_clear_line(change, words):
    cfg = {**LLAMA, **change}
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    msg = str(e.value)
    assert e.value.field == "model.config" and words in msg, msg
    assert "\n" not in msg and len(msg) < 400


def test_a_string_head_dim_with_a_billion_heads_builds_no_huge_string():
    cfg = {**LLAMA, "head_dim": "x" * 10_000, "num_attention_heads": 10**9}
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert "num_attention_heads = 1000000000 is outside 1..10000000" in str(e.value)
    cfg["num_attention_heads"] = 64
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert "head_dim = 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' is a string" in str(e.value)


CARDS = list(csv.DictReader((MODELS / "cards.csv").read_text().splitlines()))


def test_the_card_table_covers_every_model_folder():
    folders = {str(p.parent.relative_to(MODELS)) for p in MODELS.glob("*/*/config.json")}
    assert folders == {row["hf_id"] for row in CARDS}
    # every model of the ML.ENERGY v3 rows in the repo (data/mlenergy-v3), all 25 present
    measured = {r["hf_id"] for r in CARDS if r["mlenergy_v3"] == "1"}
    rows = (MODELS.parent / "mlenergy-v3" / "configurations.csv").read_text().splitlines()
    assert measured == {r["model_id"] for r in csv.DictReader(rows)}
    assert len(measured) == 25


@pytest.mark.parametrize("row", CARDS, ids=[r["hf_id"] for r in CARDS])
def test_every_repo_model_validates_and_matches_its_card(row):
    """Derived total and active parameters within 2% of the published model card."""
    sc = scenario_from_dict({"model": {"config": str(MODELS / row["hf_id"] / "config.json")}})
    spec = model_spec(sc, "")  # (the largest do not fit the small scenario's GPUs)
    assert spec.name == row["hf_id"]  # named from _name_or_path
    assert not spec.problems()
    total = float(row["total_params_b"]) * 1e9
    active = spec.active_params if row["active_counts_embedding"] == "1" else (
        spec.active_params_per_token + spec.lm_head_params
    )  # fmt: skip
    assert spec.total_params == pytest.approx(total, rel=0.02)
    assert active == pytest.approx(float(row["active_params_b"]) * 1e9, rel=0.02)


def test_models_are_named_from_name_or_path_or_the_hf_cache_folder(tmp_path):
    cfg = {k: v for k, v in LLAMA.items() if k != "_name_or_path"}
    snap = tmp_path / "hub/models--meta-llama--Llama-3.1-70B/snapshots/0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    assert hf_model_name(cfg, snap / "config.json") == "meta-llama/Llama-3.1-70B"
    # the cache folder is the repository the file came from: it wins over _name_or_path, which
    # a fine-tune carries from its base model (helper M41)
    assert hf_model_name({**cfg, "_name_or_path": "Org/Model-1.5"}, snap / "config.json") == (
        "meta-llama/Llama-3.1-70B"
    )
    assert hf_model_name({**cfg, "_name_or_path": "Org/Model-1.5"}, tmp_path / "m/config.json") == (
        "Org/Model-1.5"
    )
    # a local path in _name_or_path is not a name: the folder is
    assert hf_model_name({**cfg, "_name_or_path": "/data/ckpt"}, tmp_path / "m/config.json") == "m"


def test_a_missing_file_names_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScenarioError) as e:
        _spec("nope/config.json")
    assert str(tmp_path / "nope/config.json") in str(e.value)


def test_a_hugging_face_id_is_told_how_to_point_at_a_local_file(capsys):
    """An id the checkout lacks is refused (never downloaded). One it ships in data/models is
    read from there (helper M42: it was refused with the path of the very file it could read;
    tests/test_issue22_walk3.py)."""
    with pytest.raises(ScenarioError) as e:
        model_spec(scenario_from_dict({"model": {"name": "Qwen/Qwen3-999B"}}), "")
    msg = str(e.value)
    assert "model.name = 'Qwen/Qwen3-999B': a Hugging Face id" in msg and "never downloads" in msg
    assert "[model] config" in msg and len(msg.splitlines()) == 1
    assert model_spec(scenario_from_dict({"model": {"name": "Qwen/Qwen3-8B"}}), "").n_layers == 36
    # a name that is no id keeps the catalog's suggestion
    with pytest.raises(ScenarioError, match="did you mean 'qwen3-8b'"):
        model_spec(scenario_from_dict({"model": {"name": "qwen3-8"}}), "")
    assert (
        main(["latency", "--gpu", "h100-sxm", "--model", "openai/gpt-oss-999b", "--batch", "1"])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "--model = 'openai/gpt-oss-999b': a Hugging Face id" in err and len(err.splitlines()) == 1
    )


def test_latency_reads_a_config_json_or_its_folder(capsys):
    cfg = MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507"
    for arg in (str(cfg / "config.json"), str(cfg)):
        assert main(["latency", "--gpu", "h100-sxm", "--model", arg, "--tp", "2", "--batch", "1",
                     "--context", "1024", "--json"]) == 0  # fmt: skip
        rows = json.loads(capsys.readouterr().out)
        assert rows[0]["model"] == "Qwen/Qwen3-30B-A3B-Instruct-2507"
        assert rows[0]["total_s"] > 0 and rows[0]["context_tokens"] == 1024


def test_inline_fields_describe_todays_architectures():
    inline = {"name": "mine", "n_layers": 12, "d_model": 2048, "n_heads": 32, "n_kv_heads": 4,
              "d_ff": 6144, "vocab_size": 1000, "head_dim": 128, "sliding_window_tokens": 512,
              "sliding_global_every": 4, "n_experts": 16, "n_active_experts": 2,
              "d_ff_expert": 768, "n_shared_experts": 1, "first_k_dense": 2,
              "expert_dtype": "mxfp4"}  # fmt: skip
    spec = model_spec(scenario_from_dict({"model": inline}), "")
    assert (spec.head_dim, spec.n_global_attn_layers, spec.n_moe_layers) == (128, 3, 10)
    assert spec.expert_dtype == "mxfp4" and spec.d_ff_shared == 768
    # a catalog model with an inline change: derived widths follow it
    spec = model_spec(scenario_from_dict({"model": {"name": "llama-3.1-8b", "d_model": 2048}}), "")
    assert spec.head_dim == 64
    with pytest.raises(ScenarioError, match=r"model\.hybrid_pattern = 'M\*': has 2 layers"):
        model_spec(scenario_from_dict({"model": {**inline, "hybrid_pattern": "M*"}}), "")


def test_the_kv_budget_of_a_windowed_model_counts_what_its_sequences_hold():
    d = merge(SMALL, model={"name": "gemma-3-27b"}, fleet={"tensor_parallel": 2})
    d["traffic"] = {**d["traffic"], "prompt": {"dist": "fixed", "value": 8000},
                    "output": {"dist": "fixed", "value": 2}}  # fmt: skip
    rs = resolve(scenario_from_dict(d))
    per = 2 * 16 * 128 * 2  # K and V of 16 heads of 128 in bf16, one layer
    # weighted by time in flight (branch c47): the prompt in one iteration (8,000 tokens under
    # the 16,384-token budget), then one decode step holding 8,001: 16,001 token-iterations on
    # a global layer, 1,024 + 1,024 on a window layer (was the mid-life context 8,001 once)
    full, win = 8000 + 8001, 1024 + 1024
    bpt = per * (10 * full + 52 * win) / full  # 10 global layers, 52 windows of 1,024
    assert rs.kv.bytes_per_token == pytest.approx(bpt, rel=1e-12)
    assert rs.kv.blocks == int(rs.kv.kv_bytes // (rs.kv.bytes_per_token * 16))
    # 3.7 times the tokens that counting every layer at every token would give
    assert rs.kv.bytes_per_token / rs.model.kv_bytes_per_token == pytest.approx(0.2687, abs=1e-4)


def test_sizes_from_a_file_weigh_their_requests(tmp_path):
    """An empirical column's requests are the typical sequences (branch t48; before, without
    analytic sizes the budget charged every token in every layer, 507,904 B). Every row 3,000 +
    200 tokens (both columns of one file): 3,000 tokens in the prefill iteration, 3,000 + k in
    decode step k = 1..199, 619,900 token-iterations over 200 iterations, of which a window
    layer holds 1,024 in each (204,800): 8,192 x (10 + 52 x 204,800 / 619,900) = 222,655 B."""
    sizes = tmp_path / "sizes.csv"
    sizes.write_text("p,o\n3000,200\n3000,200\n")
    d = merge(SMALL, model={"name": "gemma-3-27b"}, fleet={"tensor_parallel": 2})
    d["traffic"] = {**d["traffic"],
                    "prompt": {"dist": "empirical", "file": str(sizes), "column": "p"},
                    "output": {"dist": "empirical", "file": str(sizes), "column": "o"}}  # fmt: skip
    rs = resolve(scenario_from_dict(d))
    assert 3000 + 3000 * 199 + 200 * 199 // 2 == 619_900
    bpt = 8192 * (10 + 52 * 204_800 / 619_900)
    assert rs.kv.bytes_per_token == pytest.approx(bpt, rel=1e-12)
    assert round(bpt) == 222_655 < rs.model.kv_bytes_per_token_tp(2) == 507_904


@pytest.mark.parametrize("name", ["gemma-3-27b", "deepseek-v3", "nemotron-nano-9b-v2"])
def test_a_spec_written_inline_reads_back_the_same(name):
    spec = model_from_catalog(name)
    fields = {
        k: v for k, v in asdict(spec).items() if k not in ("name", "derived") and v is not None
    }
    back = model_spec(scenario_from_dict({"model": {"name": "mine", **fields}}), "")
    assert back == replace(spec, name="mine")


NEMOTRON_9B = json.loads((MODELS / "nvidia/NVIDIA-Nemotron-Nano-9B-v2/config.json").read_text())
GEMMA3_27B = json.loads((MODELS / "google/gemma-3-27b-it/config.json").read_text())


def test_mamba_groups_that_do_not_divide_the_heads_are_refused():
    """Nemotron-Nano-9B-v2: 128 Mamba heads in n_groups = 8 groups of B and C (16 heads share a
    group). 7 groups cannot: vLLM's Mamba-2 kernels assert nheads % ngroups == 0
    (ops/mamba_ssm.py selective_state_update, ops/ssd_chunk_state.py); the reader accepted it
    (a state and a conv window sized with 7 groups)."""
    ok = architecture_from_hf(NEMOTRON_9B, "config.json")
    assert (ok["ssm_n_heads"], ok["ssm_n_groups"]) == (128, 8)
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf({**NEMOTRON_9B, "n_groups": 7}, "config.json")
    assert str(e.value) == (
        "model.config = 'config.json': n_groups = 7 does not divide mamba_num_heads = 128: "
        "vLLM's Mamba-2 kernels give each group of B and C a whole number of heads (fix: check "
        "the file: n_groups is a divisor of mamba_num_heads (8 in Nemotron-H))"
    )


def test_gemma3_sliding_window_pattern_zero_is_refused_not_read_as_no_global_layer():
    """transformers' Gemma3TextConfig makes layer i global when (i + 1) % sliding_window_pattern
    == 0: a pattern of 0 divides by zero (it cannot load the file); the reader took it for "no
    global layer" (62 windowed layers of gemma-3-27b). 6 (the file's) and 1 (every layer
    global) are read as transformers makes them; with layer_types the pattern is not used."""
    text = GEMMA3_27B["text_config"]
    ok = architecture_from_hf(GEMMA3_27B, "config.json")
    assert (ok["sliding_window_tokens"], ok["sliding_global_every"]) == (1024, 6)
    every1 = architecture_from_hf(
        {**GEMMA3_27B, "text_config": {**text, "sliding_window_pattern": 1}}, "config.json"
    )
    assert every1["sliding_global_every"] == 1  # 62 // 1 = 62 global layers: none windowed
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(
            {**GEMMA3_27B, "text_config": {**text, "sliding_window_pattern": 0}}, "config.json"
        )
    assert str(e.value) == (
        "model.config = 'config.json': sliding_window_pattern = 0: transformers makes layer i "
        "global when (i + 1) % sliding_window_pattern == 0 (Gemma3TextConfig), which divides "
        "by zero; it cannot load this file (fix: give sliding_window_pattern >= 1 (6 for "
        "Gemma 3: every 6th layer global; 1: every layer global), or layer_types)"
    )
    types = ["sliding_attention"] * 5 + ["full_attention"]
    listed = architecture_from_hf(
        {
            **GEMMA3_27B,
            "text_config": {
                **text,
                "sliding_window_pattern": 0,
                "layer_types": (types * 11)[:62],
            },
        },
        "config.json",
    )
    assert listed["sliding_global_every"] == 6  # (the layer_types decide; the 0 is unused)


def test_an_empty_quantization_config_is_read_as_none_as_vllm_does():
    """``quantization_config = {}``: vLLM 0.11 reads it as unquantized
    (ModelConfig._verify_quantization, vllm/config/model.py: quant_method "" -> None, so
    self.quantization stays None and the weights load in the file's dtype); the reader does the
    same: the precision is the file's torch_dtype. (transformers' from_pretrained would refuse
    it, AutoHfQuantizer.supports_quant_method: no quant_method; fleetsim simulates vLLM's
    engine, which loads the weights itself.)"""
    plain = architecture_from_hf(LLAMA, "config.json")
    empty = architecture_from_hf({**LLAMA, "quantization_config": {}}, "config.json")
    assert empty == plain and empty["dtype"] == "bf16"
    assert "fp8_block" not in empty and "embed_dtype" not in empty


def test_inline_mamba_groups_that_do_not_divide_the_heads_are_refused():
    """The same rule for an inline or catalog model: nemotron-nano-9b-v2 with ssm_n_groups = 7
    (its 128 heads in 8 groups)."""
    d = merge(SMALL, model={"name": "nemotron-nano-9b-v2", "ssm_n_groups": 7})
    d["fleet"] = {**d.get("fleet", {}), "tensor_parallel": 1}
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(d))
    assert e.value.field == "model.ssm_n_groups" and e.value.problem == (
        "does not divide ssm_n_heads = 128: vLLM's Mamba-2 kernels give each group of B and C "
        "a whole number of heads"
    )
