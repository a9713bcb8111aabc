"""Everyday use, fourth walk (e47): a new user with today's models (the three 2026 scenarios,
data/models' DeepSeek, Llama 4, gemma-3, Qwen3): the fp8 MoE kernel a GPU cannot run, named
in plan / sweep / latency with its fix; which kernel ``fleetsim latency`` times; a model name
that is a data/models id; a windowed model's longest request in ``validate``'s line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fleetsim
from fleetsim.base.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[1]
R1 = ROOT / "scenarios" / "deepseek-r1-b200.toml"
GEMMA = ROOT / "scenarios" / "gemma3-long-context-h100.toml"
QWEN_MOE = ROOT / "scenarios" / "qwen3-moe-vs-dense-h100.toml"

#: the refusal of FlashInfer's TensorRT-LLM fp8 MoE kernel (R1's, as ML.ENERGY ran it on B200)
#: on an H200, which vLLM runs only on Blackwell (the catalog's constants: moe.toml b200)
NO_FI = (
    "fleet.fp8_moe_kernel = 'flashinfer-trtllm': has no fitted constants for hardware.gpu = "
    "'h200' (vLLM runs FlashInfer's TensorRT-LLM fp8 MoE kernel on Blackwell only) (fix: set "
    'fleet.fp8_moe_kernel = "triton" or use a GPU with them: b200)'
)


def test_the_fp8_moe_kernel_a_gpu_cannot_run_is_refused_with_the_fields_fix():
    """R1's scenario on an H200: one line naming the field, the value and a fix that names
    the field as the file writes it (it said ``set fp8_moe_kernel = "triton"``)."""
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved(R1, {"hardware.gpu": "h200"})
    assert str(e.value) == f"{R1}: {NO_FI}"
    assert fleetsim.resolved(R1, {"hardware.gpu": "h200", "fleet.fp8_moe_kernel": "triton"})


def test_latency_names_its_own_flags_in_the_kernel_refusal(capsys):
    """``fleetsim latency --gpu h100-sxm --fp8-moe-kernel flashinfer-trtllm``: the flags, not
    ``fleet.fp8_moe_kernel`` / ``hardware.gpu`` (the line named both the flag and the field)."""
    from fleetsim.apps.cli import main

    argv = ["latency", "--gpu", "h100-sxm", "--model", "deepseek-ai/DeepSeek-R1-0528"]
    argv += ["--tp", "8", "--expert-parallel", "--batch", "1", "--context", "100"]
    assert main([*argv, "--fp8-moe-kernel", "flashinfer-trtllm"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fleetsim: error: --fp8-moe-kernel = 'flashinfer-trtllm': has no fitted constants for "
        "--gpu = 'h100-sxm' (vLLM runs FlashInfer's TensorRT-LLM fp8 MoE kernel on Blackwell "
        "only) (fix: drop --fp8-moe-kernel (triton, the default) or use --gpu b200)"
    )


def test_plan_names_the_kernel_a_candidate_gpu_cannot_run():
    """``fleetsim plan scenarios/deepseek-r1-b200.toml --gpus h200,b200 --tp 8``: the H200 is
    ``not accepted`` with the field, its value and the fix (it read "has no fitted constants
    for hardware.gpu = 'h200'", no subject, no fix); the B200 resolves."""
    from fleetsim.apps.plan import candidate_row, make_candidates

    sc = fleetsim.load(R1)
    h200, b200 = make_candidates(sc.model_dump(mode="json"), sc, ["h200", "b200"], [8], str(R1))
    assert h200.rs is None and h200.problem == f"not accepted: {NO_FI}"
    assert candidate_row(h200, 1)["status"] == "not accepted"
    assert b200.rs is not None and not b200.problem


def test_a_sweep_over_gpus_and_kernels_keeps_the_point_a_gpu_cannot_run():
    """``--grid 'hardware.gpu=["b200","h200"]' --grid 'fleet.fp8_moe_kernel=[...]'``: the
    H200 x FlashInfer point is a ``not accepted`` row, the other three simulated (the whole
    grid was refused); a kernel of fp8 block-quantised experts on a bf16 MoE likewise."""
    from fleetsim.apps.sweep import point_scenarios, unfit_reason
    from fleetsim.config.loading import read_toml

    base, _ = read_toml(R1)
    points = [
        [f'hardware.gpu="{g}"', f'fleet.fp8_moe_kernel="{k}"']
        for g in ("b200", "h200")
        for k in ("triton", "flashinfer-trtllm")
    ]
    out = point_scenarios(base, points, str(R1))
    assert [type(p).__name__ for p in out] == ["dict", "dict", "dict", "str"]
    assert out[3] == f"not accepted: {NO_FI}"
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved(QWEN_MOE, {"fleet.fp8_moe_kernel": "flashinfer-trtllm"})
    assert unfit_reason(e.value) == (
        "not accepted: fleet.fp8_moe_kernel = 'flashinfer-trtllm': is the kernel of fp8 "
        "block-quantised or nvfp4 experts, and Qwen/Qwen3-30B-A3B-Instruct-2507 has bf16 "
        "experts (fix: leave it at triton (the default), or use a model with fp8 "
        "block-quantised or nvfp4 experts (e.g. deepseek-ai/DeepSeek-V3.1, "
        "nvidia/DeepSeek-R1-0528-FP4))"
    )


def _latency(capsys, *argv: str) -> list[str]:
    from fleetsim.apps.latency import main

    assert main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_latency_says_which_fp8_moe_kernel_and_stack_it_times(capsys):
    """R1's scenario runs FlashInfer's kernel; ``fleetsim latency`` defaults to Triton's, a
    third slower a decode step: the header says which (a second line, and ``--json``'s
    ``fp8_moe_kernel``), and a non-default serving stack; a bf16 model has no kernel line."""
    r1 = ("--gpu", "b200", "--model", "deepseek-ai/DeepSeek-R1-0528", "--tp", "8")
    r1 += ("--expert-parallel", "--batch", "1", "--context", "8000")
    how = "(--fp8-moe-kernel, as a scenario's fleet.fp8_moe_kernel: triton or flashinfer-trtllm)"
    lines = _latency(capsys, *r1)
    assert lines[0] == (
        "deepseek-ai/DeepSeek-R1-0528 (fp8 weights, embedding bf16, kv bf16) on 8 x b200 (TP8, "
        "EP8); config: data/models/deepseek-ai/DeepSeek-R1-0528/config.json"
    )
    assert lines[1] == f"serving stack vllm-v1; fp8 MoE kernel triton {how}"
    fi = _latency(capsys, *r1, "--fp8-moe-kernel", "flashinfer-trtllm", "--serving-stack", "eager")
    assert fi[1] == f"serving stack eager; fp8 MoE kernel flashinfer-trtllm {how}"
    doc = json.loads(
        "\n".join(_latency(capsys, *r1, "--fp8-moe-kernel", "flashinfer-trtllm", "--json"))
    )
    assert (doc[0]["fp8_moe_kernel"], doc[0]["serving_stack"]) == ("flashinfer-trtllm", "vllm-v1")
    q8 = ("--gpu", "h100-sxm", "--model", "Qwen/Qwen3-8B", "--batch", "8", "--context", "100")
    assert _latency(capsys, *q8)[1].startswith("┏")  # the table: no kernel, default stack
    assert _latency(capsys, *q8, "--serving-stack", "eager")[1] == "serving stack eager"
    doc = json.loads("\n".join(_latency(capsys, *q8, "--json")))
    assert (doc[0]["fp8_moe_kernel"], doc[0]["serving_stack"]) == (None, "vllm-v1")


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("llama-4-scout", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
        ("llama-4-maverick", "meta-llama/Llama-4-Maverick-17B-128E-Instruct"),
        ("deepseek-r1", "deepseek-ai/DeepSeek-R1-0528"),
        ("deepseek-v3.1", "deepseek-ai/DeepSeek-V3.1"),
        ("gemma-3-27b-it", "google/gemma-3-27b-it"),
        ("qwen3-coder-480b", "Qwen/Qwen3-Coder-480B-A35B-Instruct"),
        # a catalog name still comes first where it begins alike
        ("qwen3-235b", "qwen3-235b-a22b"),
        ("gpt-oss-120", "gpt-oss-120b"),
        ("nemotron-nano-9b", "nemotron-nano-9b-v2"),
    ],
)
def test_an_unknown_model_name_suggests_the_data_models_id_it_meant(typed, meant):
    """Today's models are data/models' Hugging Face ids, not catalog names: ``[model] name =
    "llama-4-scout"`` suggested nothing (no catalog name is close) and did not say that such
    ids are accepted."""
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved(ROOT / "scenarios/default.toml", {"model.name": typed})
    assert e.value.field == "model.name" and e.value.value == typed
    assert e.value.fix.startswith(f"did you mean {meant!r}? catalog: llama-3.1-8b, ")
    assert e.value.fix.endswith(
        "; or a Hugging Face id of data/models (ORG/NAME, e.g. deepseek-ai/DeepSeek-R1-0528); "
        "or give n_layers, d_model, n_heads, n_kv_heads, d_ff, vocab_size"
    )


def test_latency_names_the_flag_of_an_unknown_model(capsys):
    """``fleetsim latency --model llama-4-scout``: the flag, the suggestion, and a fix of this
    command's (a TOML file of [model] fields; it said ``model.name`` and "or give n_layers")."""
    from fleetsim.apps.cli import main

    argv = ["latency", "--gpu", "h100-sxm", "--model", "llama-4-scout"]
    assert main([*argv, "--batch", "1", "--context", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "fleetsim: error: --model = 'llama-4-scout': not in the catalog and no inline "
        "architecture (fix: did you mean 'meta-llama/Llama-4-Scout-17B-16E-Instruct'? "
    )
    assert err.endswith(
        "; or a TOML file of [model] fields: n_layers, d_model, n_heads, n_kv_heads, d_ff, "
        "vocab_size)"
    )
    assert "\n" not in err


def _validate_line(capsys, path: Path, *sets: str) -> str:
    from fleetsim.apps.cli import main

    argv = ["validate", str(path)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return capsys.readouterr().err.splitlines()[0]


def test_validate_says_the_longest_request_a_windowed_model_holds(capsys):
    """scenarios/README.md: one H100 holds the Mooncake trace's longest request of
    gemma-3-27b-it with its windows (252,176 tokens) and refuses it without (41,536 tokens,
    ``fleetsim validate --set fleet.tensor_parallel=1``); validate's line showed 41,536 either
    way (the trace's sizes came from a file: the token count charged every token in every
    layer; since branch t48 it weighs the trace's requests, 183,440 tokens, an estimate; the
    engine counts the layer-blocks). Hand count: 21.10 GB of KV / (16 tokens x 8,192 bytes per
    layer-token: 16 KV heads x 128 x K and V x 2 bytes) = 160,990 layer-blocks; a window layer
    spans at most 65 blocks of 16 (1,024 tokens, unaligned), so 52 x 65 = 3,380 and the 10 full
    layers 15,761 blocks each, 252,176 tokens."""
    line = _validate_line(capsys, GEMMA, "fleet.tensor_parallel=1")
    assert "KV budget 183,440 tokens per replica" in line
    assert "; longest request 252,176 tokens (each layer kind's blocks); profile " in line
    rs = fleetsim.resolved(GEMMA, {"fleet.tensor_parallel": 1})["derived"]["kv_budget"]
    assert (rs["request_tokens"], rs["layer_blocks"]) == (252_176, 160_990)
    assert rs["layer_blocks"] == int(rs["kv_bytes"] // (16 * 8192))
    assert (rs["layer_blocks"] - 52 * 65) // 10 * 16 == 252_176
    # without the windows the two are one figure, and the line says it once
    flat = _validate_line(
        capsys,
        GEMMA,
        "fleet.tensor_parallel=1",
        "model.sliding_window_tokens=0",
        "traffic.trace=''",
    )
    assert "longest request" not in flat
    # a model whose every layer holds its whole context (R1's latent): no second figure
    assert "longest request" not in _validate_line(capsys, R1)


def test_crossover_refuses_expert_parallel_replicas_before_simulating(tmp_path, capsys):
    """``fleetsim crossover scenarios/deepseek-r1-b200.toml``: the disaggregated designs are
    simulated without data / expert parallelism; it failed after the saturation runs with the
    fix "drop it, or drop [disaggregation]" (a section the user never wrote). Now one line
    with crossover's fix, exit 2, and no output folder."""
    from fleetsim.apps.cli import main

    out = tmp_path / "xo"
    assert main(["crossover", str(R1), "--hours", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "fleetsim: error: crossover: fleet.expert_parallel = true: data and expert parallelism "
        "are simulated for aggregated fleets only, and crossover compares the aggregated fleet "
        "with disaggregated splits of its replicas (fix: --set fleet.expert_parallel=false, to "
        "compare TP8 replicas without them)"
    )
    assert not out.exists()
    argv = ["crossover", str(QWEN_MOE), "--set", "fleet.data_parallel=2", "--out", str(out)]
    assert main([*argv, "--set", "fleet.expert_parallel=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleetsim: error: crossover: fleet.data_parallel = 2: ")
    assert err.endswith(
        "(fix: --set fleet.expert_parallel=false --set fleet.data_parallel=1, to compare TP1 "
        "replicas without them)"
    )


def test_plan_of_both_designs_says_the_disaggregated_one_is_not_accepted_with_its_fix():
    """``fleetsim plan scenarios/deepseek-r1-b200.toml --designs both``: the disaggregated
    design of expert-parallel replicas read ``does not fit: scenarios/...toml: ... (fix: drop
    it, or drop )``: the file's name in the reason, a refusal that is not about memory as
    ``does not fit``, a fix for a section the plan added itself, and "[disaggregation]" eaten
    by the console as markup. Now ``not accepted`` with the plan's fix, printed as written."""
    import io

    from rich.console import Console

    from fleetsim.apps.plan_disagg import disagg_table, make_disagg_candidates, print_designs
    from fleetsim.apps.plan_search import Slo
    from fleetsim.config.loading import read_toml

    data, _ = read_toml(QWEN_MOE)
    data["fleet"]["expert_parallel"] = True
    (c,) = make_disagg_candidates(data, ["h100-sxm"], ["h100-sxm"], str(QWEN_MOE))
    want = (
        "not accepted: fleet.expert_parallel = true: data and expert parallelism are simulated "
        "for aggregated fleets only (fix: --set fleet.expert_parallel=false to plan the "
        "disaggregated design without it, or --designs aggregated)"
    )
    assert c.rs is None and c.problem == want
    table = disagg_table([c], 1)
    assert table.column("status").to_pylist() == ["not accepted"]
    # a reason is printed as written, brackets included
    c.problem = "does not fit: [disaggregation] prefill: [red]x[/red]"
    con = Console(file=io.StringIO(), width=400, color_system=None)
    print_designs(None, disagg_table([c], 1), Slo(2.0, 0.2), con, 1)
    assert con.file.getvalue().splitlines()[-1] == (
        "  disaggregated h100-sxm/h100-sxm: does not fit: [disaggregation] prefill: [red]x[/red]"
    )


def test_a_mistyped_data_models_folder_names_the_one_meant(monkeypatch):
    """``[model] config = "../data/models/google/gemma-3-27b"`` (the folder is
    ``gemma-3-27b-it``) said only ``no such file``; a scenario given as a dict (no file) was
    told its path is relative to "the scenario file", though it is read from the working
    directory (workload/sampling.py ``_resolve_path``)."""
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved(GEMMA, {"model.config": "../data/models/google/gemma-3-27b"})
    assert str(e.value) == (
        f"{GEMMA}: model.config = '../data/models/google/gemma-3-27b': no such file: "
        f"{ROOT}/data/models/google/gemma-3-27b (fix: give the path of the model's config.json "
        "(relative to the scenario file); did you mean '../data/models/google/gemma-3-27b-it'?)"
    )
    monkeypatch.chdir(ROOT)
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved({"model": {"config": "data/models/deepseek-ai/DeepSeek-R1"}})
    assert e.value.fix == (
        "give the path of the model's config.json (relative to the working directory); did you "
        "mean 'data/models/deepseek-ai/DeepSeek-R1-0528'?"
    )


def test_a_checkout_id_as_the_name_of_another_config_says_how_to_read_its_file():
    """``fleetsim run scenarios/qwen3-moe-vs-dense-h100.toml --set 'model.name="Qwen/Qwen3-32B"'``
    (the dense model the scenario compares): the scenario's ``config`` names the MoE, so the
    name is refused; its fix said "drop ... model.config", which --set cannot do. It now also
    gives the --set that reads the dense model's file, relative to the scenario file (the
    command scenarios/README.md gives)."""
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved(QWEN_MOE, {"model.name": "Qwen/Qwen3-32B"})
    assert e.value.fix.endswith(
        "or give a name that is not a catalog model; to simulate Qwen/Qwen3-32B: --set "
        "'model.config=\"../data/models/Qwen/Qwen3-32B\"' reads its file"
    )
    ok = fleetsim.resolved(QWEN_MOE, {"model.config": "../data/models/Qwen/Qwen3-32B"})
    assert ok["model"]["name"] == "Qwen/Qwen3-32B" and ok["model"]["n_layers"] == 64
    # a catalog name has no file: the fix as it was
    with pytest.raises(ScenarioError) as e:
        fleetsim.resolved(QWEN_MOE, {"model.name": "qwen3-32b"})
    assert e.value.fix.endswith("or give a name that is not a catalog model")


@pytest.mark.parametrize(
    ("typed", "fix"),
    [
        # it said "model is a scenario field (fix: --set model=x)", which replaces the section
        (["--model", "x"], "; model.name is a scenario field (fix: --set model.name=x)"),
        # plan's and latency's options, and vLLM's names (accepted in [fleet]): "unrecognized"
        (["--tp", "8"], "tensor_parallel is a scenario field (fix: --set fleet.tensor_parallel=8)"),
        (["--dp", "2"], "data_parallel is a scenario field (fix: --set fleet.data_parallel=2)"),
        (["--tensor-parallel-size", "8"], "(fix: --set fleet.tensor_parallel_size=8)"),
        (["--max-num-seqs", "64"], "(fix: --set fleet.max_num_seqs=64)"),
        # a true / false field typed as a flag: it said "=VALUE"
        (["--expert-parallel"], "(fix: --set fleet.expert_parallel=true)"),
        (["--enable-expert-parallel"], "(fix: --set fleet.enable_expert_parallel=true)"),
    ],
)  # fmt: skip
def test_another_commands_option_given_to_run_names_its_field(capsys, typed, fix):
    from fleetsim.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", str(R1), *typed])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"fleetsim run: error: {' '.join(typed)}: not an option of fleetsim run; "
    )
    assert err.endswith(fix) and "\n" not in err
