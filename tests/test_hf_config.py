"""``[model] config = "config.json"``: architectures from local Hugging Face configs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SMALL, merge

from fleetsim.apps.cli import main
from fleetsim.base.errors import ScenarioError
from fleetsim.config.hf import architecture_from_hf
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.device import catalog
from fleetsim.device.modelspec import model_from_catalog

DATA = Path(__file__).resolve().parent / "data"


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
        ({"num_hidden_layers": None}, "has no n_layers"),
        ({"head_dim": 256}, "head_dim = 256"),
        ({"num_local_experts": 8, "shared_expert_intermediate_size": 5632}, "shared experts"),
        ({"num_experts": 8, "first_k_dense_replace": 1}, "mixes dense and MoE"),
        ({"hidden_size": -4}, "d_model would be -4"),
    ],
)
def test_what_the_model_cannot_express_is_refused(change, words):
    cfg = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(ScenarioError) as e:
        architecture_from_hf(cfg, "config.json")
    assert e.value.field == "model.config" and words in str(e.value)


def test_a_missing_file_names_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScenarioError) as e:
        _spec("nope/config.json")
    assert str(tmp_path / "nope/config.json") in str(e.value)
