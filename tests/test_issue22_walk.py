"""Issue 22 as a new user walks it (helper U39): the models of data/models from their
config.json, through ``validate``, ``latency`` and ``run``, and the one-line errors of bad input.
Each test is a failure the walk found (a wrong hint, a misleading header, a missing fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL, merge

from fleetsim.apps.cli import main
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.aggregated import model_spec
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
MAVERICK = MODELS / "meta-llama/Llama-4-Maverick-17B-128E-Instruct/config.json"


def _scenario(tmp_path: Path, **model) -> dict:
    d = merge(SMALL, hardware={"gpu": "h100-sxm"}, fleet={"tensor_parallel": 8})
    d["model"] = dict(model)
    return d


def test_the_tensor_parallel_hint_names_a_degree_vllm_accepts(tmp_path):
    """Llama-4-Maverick (801 GB bf16, 40 query heads, 8 KV heads) on 8 H100s: the hint was
    ``tensor_parallel = 20``, which divides the 40 query heads but neither divides nor is a
    multiple of the 8 KV heads, so validate then refused the degree it had suggested. The
    degrees the head rule accepts are 8 and 40, and 40 does not split its 8,192-wide experts
    (helper M41: the hint said 40, which validate then refused for the experts), so no plain
    degree holds 801 GB at 76.5 GB per GPU: the hint is expert parallelism over two
    data-parallel engines of 8 (the experts once, the rest twice: 823.7 GB on 16 GPUs)."""
    d = _scenario(tmp_path, config=str(MAVERICK))
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(d))
    msg = str(e.value)
    assert "set fleet.data_parallel = 2 with fleet.expert_parallel = true" in msg, msg
    assert "= 20" not in msg and "= 40" not in msg
    # the suggested split is one validate accepts
    d["fleet"].update(data_parallel=2, expert_parallel=True)
    assert (
        resolve(scenario_from_dict(d)).model.name == MAVERICK.parent.relative_to(MODELS).as_posix()
    )


def test_latency_header_counts_the_data_parallel_gpus(capsys):
    """``--tp 1 --dp 2 --expert-parallel`` runs on 2 GPUs: the header said ``on 1 x h100-sxm``."""
    cfg = MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507/config.json"
    argv = ["latency", "--gpu", "h100-sxm", "--model", str(cfg), "--tp", "1", "--dp", "2"]
    assert main([*argv, "--expert-parallel", "--batch", "1", "--context", "100"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.endswith("on 2 x h100-sxm (TP1 x DP2, EP2)"), head
    assert main([*argv, "--batch", "1", "--context", "100"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("on 2 x h100-sxm (TP1 x DP2)")
    assert main([*argv[:-4], "--tp", "2", "--batch", "1", "--context", "100"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("on 2 x h100-sxm")


def test_headers_name_the_experts_precision_of_a_mixed_model(capsys):
    """gpt-oss-20b: mxfp4 experts, bf16 attention (13.7 GB, not 2 x 20.9 GB). The headers said
    ``bf16 weights`` alone."""
    cfg = MODELS / "openai/gpt-oss-20b/config.json"
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(cfg), "--batch", "1",
                 "--context", "100"]) == 0  # fmt: skip
    head = capsys.readouterr().out.splitlines()[0]
    assert "(bf16 weights, experts mxfp4, kv bf16)" in head, head
    # a uniform model keeps the short form
    assert main(["latency", "--gpu", "h100-sxm", "--model", "llama-3.1-8b", "--batch", "1",
                 "--context", "100"]) == 0  # fmt: skip
    assert "(bf16 weights, kv bf16)" in capsys.readouterr().out.splitlines()[0]


def test_the_run_summary_splits_gpu_energy_into_idle_and_dynamic(tmp_path, capsys):
    """Issue 22 promises the day's energy by part (GPU idle / dynamic, host, PUE, $): the
    summary printed the GPU total only. gpt-oss-20b on one H100 for one hour at zero load
    draws the idle power alone: 113 W x 1 h = 0.113 kWh idle, 0 dynamic."""
    d = merge(SMALL, hardware={"gpu": "h100-sxm"}, fleet={"tensor_parallel": 1, "replicas": 1})
    d["model"] = {"config": str(MODELS / "openai/gpt-oss-20b/config.json")}
    d["simulation"] = {**d.get("simulation", {}), "hours": 1}
    d["traffic"] = {**d["traffic"], "requests_per_day": 0}
    p = tmp_path / "s.toml"
    import tomli_w

    p.write_text(tomli_w.dumps(d))
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("energy "))
    assert "GPU 0.11 (idle 0.11 + dynamic 0.00)" in line, line


def test_a_config_json_that_is_not_json_says_how_to_fix_it(tmp_path):
    bad = tmp_path / "m" / "config.json"
    bad.parent.mkdir()
    bad.write_text('{"hidden_size": 4096,')
    with pytest.raises(UserError) as e:
        model_spec(scenario_from_dict({"model": {"config": str(bad)}}), "")
    msg = str(e.value)
    assert "not valid JSON" in msg and "(fix: " in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_a_config_json_given_as_the_scenario_is_told_where_it_goes(cmd, capsys):
    """``fleetsim validate config.json``: it said ``not valid TOML: Invalid statement``."""
    cfg = MODELS / "Qwen/Qwen3-8B/config.json"
    assert main([cmd, str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "JSON" in err and "[model] config" in err and "--model" in err, err


def test_latency_with_a_json_file_named_toml_is_told_what_it_is(tmp_path, capsys):
    p = tmp_path / "config.toml"
    p.write_text((MODELS / "Qwen/Qwen3-8B/config.json").read_text())
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(p), "--batch", "1",
                 "--context", "10"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "JSON" in err and "(fix: " in err, err


def test_latency_with_a_missing_path_says_no_such_file(tmp_path, capsys):
    """``--model /tmp/x/nope`` (a folder that is not there): it said ``model.name =
    '/tmp/x/nope': not in the catalog`` and listed the catalog."""
    missing = tmp_path / "nope"
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(missing), "--batch", "1",
                 "--context", "10"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"--model = {str(missing)!r}: no such file or folder" in err, err
    assert "catalog" in err  # the fix still names the other ways


def test_model_config_may_name_the_models_folder(tmp_path):
    """``fleetsim latency --model FOLDER`` reads FOLDER/config.json; ``[model] config = FOLDER``
    said ``is a directory, not a regular file``."""
    folder = MODELS / "google/gemma-3-12b-it"
    spec = model_spec(scenario_from_dict({"model": {"config": str(folder)}}), "")
    assert spec.name == "google/gemma-3-12b-it"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScenarioError) as e:
        model_spec(scenario_from_dict({"model": {"config": str(empty)}}), "")
    msg = str(e.value)
    assert "a folder with no config.json" in msg, msg


def test_every_repo_model_runs_through_latency_with_its_breakdown(capsys):
    """The walk's loop, kept: each model of data/models on the first of h100-sxm / h200 / b200
    x TP 1, 2, 4, 8 that validate accepts gives a decode breakdown at batch 1..512; the MoE
    ones name their router and grouped GEMM."""
    from fleetsim.config.hf import read_hf_config_named

    for cfg in sorted(MODELS.glob("*/*/config.json")):
        arch, _ = read_hf_config_named(cfg)
        fit = None
        for gpu in ("h100-sxm", "h200", "b200"):
            for tp in (1, 2, 4, 8):
                d = merge(SMALL, hardware={"gpu": gpu}, fleet={"tensor_parallel": tp})
                d["model"] = {"config": str(cfg)}
                try:
                    resolve(scenario_from_dict(d))
                except ScenarioError:
                    continue
                fit = (gpu, tp)
                break
            if fit:
                break
        assert fit, cfg
        assert main(["latency", "--gpu", fit[0], "--model", str(cfg), "--tp", str(fit[1]),
                     "--batch", "1,8,64,512", "--context", "1000", "--json"]) == 0  # fmt: skip
        rows = json.loads(capsys.readouterr().out)
        assert [r["tokens"] for r in rows] == [1, 8, 64, 512]
        if arch.get("n_experts", 1) > 1:
            assert all(r["parts_s"]["moe_router"] > 0 for r in rows), cfg
            assert all(r["parts_s"]["moe_grouped_gemm"] > 0 for r in rows), cfg


def test_a_wrong_kv_head_count_names_the_range_it_may_take():
    """A string or list for num_key_value_heads said ``give it as a whole number in
    0..10000000``, and 0 is then refused."""
    from fleetsim.config.hf import architecture_from_hf

    cfg = json.loads((MODELS / "Qwen/Qwen3-8B/config.json").read_text())
    for bad, words in (
        ("8", "num_key_value_heads = '8' is a string (fix: give num_key_value_heads as a whole "
         "number in 1..10000000)"),
        (0, "num_key_value_heads = 0: a model has at least one KV head"),
        (0.0, "num_key_value_heads = 0: a model has at least one KV head"),
        (-2, "num_key_value_heads = -2 is outside 1..10000000"),
    ):  # fmt: skip
        with pytest.raises(ScenarioError) as e:
            architecture_from_hf({**cfg, "num_key_value_heads": bad}, "config.json")
        assert words in str(e.value), str(e.value)
    assert architecture_from_hf({**cfg, "num_key_value_heads": 8.0}, "c")["n_kv_heads"] == 8


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--tp", "0", "--batch", "1", "--context", "10"],
         "--tp = 0: must be a positive integer (fix: use 1 or more)"),
        (["--batch", "0", "--context", "10"],
         "--batch = '0': expected positive integers separated by commas (fix: e.g. 1,8,64,512)"),
        (["--prefill-tokens", "1.5"], "--prefill-tokens = '1.5': expected positive integers"),
    ],
)  # fmt: skip
def test_latency_usage_mistakes_are_one_line_with_a_fix(flags, line, capsys):
    cfg = MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507/config.json"
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(cfg), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and line in err and "(fix: " in err, err


def test_a_model_toml_that_points_at_a_config_json_keeps_the_files_name(tmp_path, capsys):
    """``--model m.toml`` holding ``[model] config = ...`` was named ``m`` (the TOML's stem)
    over the config's ``_name_or_path``; ``[model] name`` still wins, and an inline
    architecture without a name keeps the stem."""
    cfg = MODELS / "Qwen/Qwen3-8B/config.json"
    names = {}
    for stem, extra in (("m", ""), ("n", 'name = "mine"\n')):
        p = tmp_path / f"{stem}.toml"
        p.write_text(f'[model]\nconfig = "{cfg}"\n{extra}')
        assert main(["latency", "--gpu", "h100-sxm", "--model", str(p), "--batch", "1",
                     "--context", "10", "--json"]) == 0  # fmt: skip
        names[stem] = json.loads(capsys.readouterr().out)[0]["model"]
    assert names == {"m": "Qwen/Qwen3-8B", "n": "mine"}
    inline = tmp_path / "tiny.toml"
    inline.write_text(
        "[model]\nn_layers = 2\nd_model = 256\nn_heads = 4\nn_kv_heads = 4\nd_ff = 512\n"
        "vocab_size = 1000\n"
    )
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(inline), "--batch", "1",
                 "--context", "10", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)[0]["model"] == "tiny"


def test_an_empty_model_config_is_refused_as_empty():
    """``config = ""`` resolved to the scenario's folder and was refused as a folder."""
    with pytest.raises(ScenarioError) as e:
        model_spec(scenario_from_dict({"model": {"config": ""}}), "/tmp/x/s.toml")
    assert "model.config = '': is empty" in str(e.value), str(e.value)


def test_latency_names_a_tensor_parallel_degree_that_holds_the_weights(capsys):
    """Maverick (801.4 GB) at --tp 8 on H100s (8 x 85.0 GB): the fix said ``raise --tp``, and
    --tp 16 is then refused (40 query heads); the degrees the heads accept are 1, 2, 4, 8, 40,
    and 40 does not split the 8,192-wide experts (helper M41: the fix said --tp 40, which
    latency then refused), so the fix is expert parallelism, which then runs."""
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(MAVERICK.parent), "--tp", "8",
                 "--batch", "1", "--context", "10"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "do not fit in 8 x 85.0 GB" in err, err
    assert "(fix: --dp 2 --expert-parallel (the experts over 16 GPUs)" in err, err
    ep = ["--tp", "8", "--dp", "2", "--expert-parallel", "--batch", "1", "--context", "10"]
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(MAVERICK.parent), *ep]) == 0


@pytest.mark.parametrize(
    ("written", "words"),
    [
        ("Qwen/Qwen3-8B", "'Qwen/Qwen3-8B' looks like a Hugging Face id, and fleetsim never "
         "downloads; this checkout has "),
        ("mistralai/Mistral-7B-v0.1", "like a Hugging Face id, and fleetsim never downloads)"),
        ("data/models/Qwen/Qwen3-8B/config.json", "scenario file); this checkout has "),
        ("nope/config.json", "relative to the scenario file))"),
    ],
)  # fmt: skip
def test_a_missing_model_config_names_the_checkouts_file(tmp_path, monkeypatch, written, words):
    """A scenario outside the checkout with ``config = "Qwen/Qwen3-8B"`` (an id where the path
    belongs) or ``config = "data/models/..."`` said only ``no such file``. ``[model] config``
    stays a path, read as written (helper M42): reading another file for a path that does not
    exist would hide a typo; the id as ``[model] name`` reads the checkout's copy, and the fix
    says so."""
    monkeypatch.chdir(tmp_path)  # (a path relative to the working folder is read from there)
    with pytest.raises(ScenarioError) as e:
        model_spec(scenario_from_dict({"model": {"config": written}}), str(tmp_path / "s.toml"))
    msg = str(e.value)
    assert "no such file" in msg and words in msg, msg
    if "checkout has" in words:
        assert str(MODELS / "Qwen/Qwen3-8B/config.json") in msg
    if written == "Qwen/Qwen3-8B":
        assert msg.endswith(' (or [model] name = "Qwen/Qwen3-8B" reads it))'), msg


def test_a_bad_dtype_flag_is_named_as_the_flag(capsys):
    """``--dtype int3`` with a config.json was reported as the file's ``model.dtype``."""
    cfg = MODELS / "Qwen/Qwen3-8B/config.json"
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(cfg), "--dtype", "int3",
                 "--batch", "1", "--context", "10"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(cfg) not in err, err
    assert "--dtype = 'int3': not a weight precision (fix: use one of fp32, bf16" in err, err
    assert main(["latency", "--gpu", "h100-sxm", "--model", str(cfg), "--dtype", "fp8",
                 "--batch", "1", "--context", "10", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)[0]["dtype"] == "fp8"
