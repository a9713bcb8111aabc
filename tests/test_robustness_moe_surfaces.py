"""A new user's mistakes on the newest surfaces (red-team pass R45): the Hugging Face config
reader, the MoE / expert-parallel / data-parallel fields, true/false fields, ``calibrate
--from-mlenergy``; and the MoE path's reproducibility and all-or-nothing output.

Every mistake is one line naming the field, the value and the fix, exit code 2, no traceback.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import fleetsim
from fleetsim.apps import cli
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.hf import architecture_from_hf
from fleetsim.results import output

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "data" / "models"

MOE = """
seed = 1
[simulation]
hours = 1
[model]
name = "Qwen/Qwen3-30B-A3B-Instruct-2507"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 1
tensor_parallel = 2
data_parallel = 2
expert_parallel = true
[traffic]
requests_per_day = 20000
diurnal = "flat"
prompt = { dist = "lognormal", median = 1020, sigma = 0.985, min = 2, max = 14050 }
output = { dist = "lognormal", median = 129, sigma = 0.859, min = 7, max = 1000 }
"""


def _cli(capsys, *args) -> tuple[int, list[str]]:
    rc = cli.main([str(a) for a in args])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("#")]
    return rc, err


def _moe(tmp_path: Path, text: str = MOE) -> Path:
    f = tmp_path / "moe.toml"
    f.write_text(text)
    return f


def _cfg(name: str) -> dict:
    return json.loads((MODELS / name / "config.json").read_text())


# ---- true/false fields ---------------------------------------------------------------------
# pydantic's lax mode read "yes" / "no" / "false" / 0 / 1 as booleans: `--set
# fleet.expert_parallel="no"` ran *with* expert parallelism refused silently, and
# `enable_chunked_prefill = "no"` surfaced as an unrelated max_batched_tokens error.


@pytest.mark.parametrize(
    ("override", "field", "fix"),
    [
        ('fleet.expert_parallel="yes"', "fleet.expert_parallel", "write true without quotes"),
        ('fleet.expert_parallel="false"', "fleet.expert_parallel", "write false without quotes"),
        ('fleet.enable_chunked_prefill="no"', "fleet.enable_chunked_prefill", "write false"),
        ("fleet.enable_chunked_prefill=0", "fleet.enable_chunked_prefill", "use true or false"),
        ("model.attention_sinks=1", "model.attention_sinks", "use true or false"),
        ('model.tied_embeddings="maybe"', "model.tied_embeddings", "use true or false"),
    ],
)
def test_true_false_fields_refuse_strings_and_numbers(tmp_path, override, field, fix):
    with pytest.raises(ScenarioError) as exc:
        fleetsim.load(_moe(tmp_path), [override])
    assert exc.value.field == field
    assert "where true or false goes" in exc.value.problem
    assert fix in exc.value.fix


def test_true_false_alias_in_a_file_is_named_as_written(tmp_path):
    """vLLM's name in the file (enable_expert_parallel) is checked before it is renamed, and
    the message names it as the file spells it."""
    f = _moe(tmp_path, MOE.replace("expert_parallel = true", 'enable_expert_parallel = "yes"'))
    with pytest.raises(ScenarioError) as exc:
        fleetsim.load(f)
    assert exc.value.field == "fleet.enable_expert_parallel"
    assert exc.value.value == "yes"


def test_true_false_cli_is_one_line_exit_2(tmp_path, capsys):
    rc, err = _cli(capsys, "validate", _moe(tmp_path), "--set", 'fleet.expert_parallel="no"')
    assert rc == 2 and len(err) == 1, err
    assert "fleet.expert_parallel = 'no': a quoted string where true or false goes" in err[0]
    assert "(fix: write false without quotes)" in err[0]


def test_real_booleans_still_pass(tmp_path):
    sc = fleetsim.load(_moe(tmp_path), ["fleet.expert_parallel=false", "fleet.data_parallel=1"])
    assert sc.fleet.expert_parallel is False


# ---- config.json: what is not a decoder ----------------------------------------------------
BERT = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
}


@pytest.mark.parametrize(
    ("cfg", "said"),
    [
        # bert-base-uncased as published: every key a decoder has, so it was read as a
        # 12-layer decoder and simulated without a word
        (BERT, "architectures = ['BertForMaskedLM']: a model that does not generate text"),
        ({**BERT, "architectures": ["BertModel"]}, "model_type = 'bert': an encoder"),
        # a reward / classifier head on a decoder body (Qwen3ForSequenceClassification)
        (
            {**_cfg("Qwen/Qwen3-8B"), "architectures": ["Qwen3ForSequenceClassification"]},
            "a model that does not generate text",
        ),
        (
            {"model_type": "t5", "is_encoder_decoder": True, "d_model": 512, "num_layers": 6},
            "is_encoder_decoder = true: an encoder-decoder model",
        ),
    ],
)
def test_non_decoder_configs_are_refused(cfg, said):
    with pytest.raises(ScenarioError) as exc:
        architecture_from_hf(cfg, "config.json")
    assert exc.value.field == "model.config"
    assert said in exc.value.problem
    assert "which fleetsim (decoder-only generation) does not simulate" in exc.value.problem
    assert "ForCausalLM" in exc.value.fix


def test_every_shipped_config_is_still_read():
    """The refusal leaves the checkout's decoders alone (ForCausalLM, ForConditionalGeneration
    of the multimodal files, Nemotron's NemotronH_Nano_VL_V2)."""
    files = sorted(MODELS.glob("*/*/config.json"))
    assert len(files) == 30  # (29 + nvidia/DeepSeek-R1-0528-FP4, helper N47)
    for p in files:
        arch = architecture_from_hf(json.loads(p.read_text()), str(p))
        assert arch["n_layers"] > 0, p


def test_a_file_without_architectures_is_read_as_before():
    cfg = _cfg("Qwen/Qwen3-8B")
    del cfg["architectures"]
    assert architecture_from_hf(cfg, "c.json") == architecture_from_hf(_cfg("Qwen/Qwen3-8B"), "c")


def test_missing_keys_are_named_as_the_file_spells_them():
    cfg = _cfg("Qwen/Qwen3-8B")
    del cfg["num_hidden_layers"], cfg["vocab_size"]
    with pytest.raises(ScenarioError) as exc:
        architecture_from_hf(cfg, "c.json")
    assert exc.value.problem == "has no num_hidden_layers, vocab_size"  # (was: n_layers)


def test_a_whole_number_is_named_as_one():
    cfg = {**_cfg("Qwen/Qwen3-8B"), "quantization_config": {"quant_method": 4}}
    with pytest.raises(ScenarioError) as exc:
        architecture_from_hf(cfg, "c.json")
    assert exc.value.problem == "quant_method = 4 is a whole number"  # (was: "is int")


# ---- config.json: experts but no MoE layer --------------------------------------------------
@pytest.mark.parametrize(
    ("model", "key", "value", "field"),
    [
        # Qwen3-MoE: layer i is MoE when (i + 1) % decoder_sparse_step == 0 (vLLM
        # qwen3_moe.py): a step past the 48th layer leaves every layer dense
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "decoder_sparse_step", 49, "model.moe_layer_step"),
        # DeepSeek-V3: layers below first_k_dense_replace are dense; 61 of 61
        ("deepseek-ai/DeepSeek-V3.1", "first_k_dense_replace", 61, "model.first_k_dense"),
    ],
)
def test_experts_without_a_moe_layer_are_refused(tmp_path, model, key, value, field):
    cfg = {**_cfg(model), key: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    text = MOE.replace('name = "Qwen/Qwen3-30B-A3B-Instruct-2507"', 'config = "config.json"')
    with pytest.raises(ScenarioError) as exc:
        fleetsim.resolved(_moe(tmp_path, text))
    assert exc.value.field == field
    assert exc.value.value == value
    assert "leaves none of the" in exc.value.problem and "a mixture of experts" in exc.value.problem


def test_inline_experts_without_a_moe_layer_are_refused(tmp_path):
    text = MOE.replace(
        'name = "Qwen/Qwen3-30B-A3B-Instruct-2507"',
        'name = "qwen3-30b-a3b"\nmoe_layer_step = 64',
    )
    with pytest.raises(ScenarioError) as exc:
        fleetsim.resolved(_moe(tmp_path, text))
    assert exc.value.field == "model.moe_layer_step"
    assert "leaves none of the 48 layers a mixture of experts, though n_experts is 128" in (
        exc.value.problem
    )


def test_a_moe_step_that_leaves_some_moe_layers_is_kept():
    arch = architecture_from_hf(
        {**_cfg("Qwen/Qwen3-30B-A3B-Instruct-2507"), "decoder_sparse_step": 48}, "c.json"
    )
    assert arch["moe_layer_step"] == 48  # one MoE layer (the 48th): vLLM runs it


# ---- calibrate --from-mlenergy ---------------------------------------------------------------
def test_mlenergy_short_row_names_the_row_and_its_columns(tmp_path):
    from fleetsim.calibrate.mlenergy import read_configs

    src = REPO / "data" / "mlenergy-v3" / "configurations.csv"
    header = src.read_text().splitlines()[0]
    (tmp_path / "configurations.csv").write_text(header + "\nQwen/Qwen3-14B,gpqa\n")
    with pytest.raises(UserError) as exc:
        read_configs(tmp_path)
    msg = str(exc.value)
    assert "row 2: 2 of the header's 29 columns" in msg  # (was: "config_index = None")
    assert "\n" not in msg


# ---- the MoE / EP path: reproducible, all or nothing ------------------------------------------
def _table_bytes(p: Path) -> bytes:
    """The table's Parquet bytes without its metadata."""
    buf = io.BytesIO()
    pq.write_table(pq.read_table(p).replace_schema_metadata(None), buf)
    return buf.getvalue()


def test_same_seed_twice_gives_the_same_files_on_the_ep_path(tmp_path, capsys):
    """Qwen3-30B-A3B, TP2 x DP2 with expert parallelism, per-rank schedulers: two runs of one
    seed write the same tables and the same metadata, but for the run's wall time
    (``fleetsim.wall_s``, by design); a third with another seed differs."""
    f = _moe(tmp_path)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        rc, err = _cli(capsys, "run", f, "--out", tmp_path / name, "--requests", "--seed", seed)
        assert rc == 0, err
    for table in ("hourly.parquet", "requests.parquet"):
        a, b, c = (tmp_path / n / table for n in "abc")
        assert _table_bytes(a) == _table_bytes(b)
        assert _table_bytes(a) != _table_bytes(c)
        ma, mb = (dict(pq.read_schema(p).metadata or {}) for p in (a, b))
        assert {k for k in ma if ma[k] != mb.get(k)} <= {b"fleetsim.wall_s"}
        assert set(ma) == set(mb)
    assert b"fleetsim.seed" in pq.read_schema(tmp_path / "a" / "hourly.parquet").metadata


def test_sigint_mid_run_on_the_ep_path_keeps_the_previous_files(tmp_path, capsys):
    """gpt-oss-120b TP1 x DP2 with expert parallelism, two pods on two workers: SIGINT while it
    simulates leaves the previous run's files byte for byte and nothing temporary, exit 130."""
    text = (
        MOE.replace('name = "Qwen/Qwen3-30B-A3B-Instruct-2507"', 'name = "openai/gpt-oss-120b"')
        .replace("tensor_parallel = 2", "tensor_parallel = 1\npods = 2")
        .replace("hours = 1", "hours = 6")
        .replace("requests_per_day = 20000", "requests_per_day = 3000000")
    )
    f = _moe(tmp_path, text)
    out = tmp_path / "X"
    rc, err = _cli(capsys, "run", f, "--out", out, "--set", "simulation.hours=1", "--set",
                   "traffic.requests_per_day=20000")  # fmt: skip
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    a = subprocess.Popen(
        [sys.executable, "-m", "fleetsim", "run", str(f), "--out", str(out), "--force",
         "--requests", "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        while not (out / output.LOCK_NAME).exists() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        time.sleep(1.0)  # (the pods are being simulated: the day takes tens of seconds)
        assert a.poll() is None
    finally:
        a.send_signal(signal.SIGINT)
        _, stderr = a.communicate(timeout=60)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert a.returncode == 130, stderr
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shutil.rmtree(out)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # a misspelt GPU simulated nothing and printed an empty goal table, exit 0
        (["--gpu", "H999"], "--gpu H999: no simulated row of that GPU in"),
        (["--workers", "0"], "--workers 0: must be at least 1"),
    ],
)
def test_accuracy_harness_refuses_before_simulating(capsys, args, said):
    from fleetsim.calibrate import mlenergy

    t0 = time.monotonic()
    assert mlenergy.main(args) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and said in err[0], err
    assert time.monotonic() - t0 < 30  # (nothing simulated: the whole table takes minutes)


# ---- [model] name beside [model] config -------------------------------------------------------
def _named(tmp_path: Path, name: str, config: Path) -> Path:
    return _moe(
        tmp_path,
        MOE.replace(
            'name = "Qwen/Qwen3-30B-A3B-Instruct-2507"', f'name = "{name}"\nconfig = "{config}"'
        ),
    )


@pytest.mark.parametrize(
    ("name", "config", "said"),
    [
        # a checkout id left in while switching to another file: the errors called Qwen3-8B
        # "Qwen/Qwen3-30B-A3B-Instruct-2507 ... is not a mixture of experts"
        (
            "Qwen/Qwen3-30B-A3B-Instruct-2507",
            "Qwen/Qwen3-8B",
            "names this checkout's Qwen3-30B-A3B-Instruct-2507 config (n_layers = 48), but "
            "model.config = ",
        ),
        # a catalog name over another model's config: "model qwen3-8b: 30.53 B parameters"
        ("qwen3-8b", "Qwen/Qwen3-30B-A3B-Instruct-2507", "names the catalog model (n_layers = 36)"),
    ],
)
def test_a_name_that_means_another_architecture_is_refused(tmp_path, name, config, said):
    with pytest.raises(ScenarioError) as exc:
        fleetsim.resolved(_named(tmp_path, name, MODELS / config / "config.json"))
    assert exc.value.field == "model.name" and exc.value.value == name
    assert said in exc.value.problem and "the name would only label it" in exc.value.problem
    assert "drop [model] name" in exc.value.fix


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("my-finetune", "Qwen/Qwen3-30B-A3B-Instruct-2507"),  # a label
        ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B-Thinking-2507"),  # the catalog's shape
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-Coder-30B-A3B-Instruct"),  # same shape
    ],
)
def test_a_name_that_labels_the_configs_shape_is_kept(tmp_path, name, config):
    info = fleetsim.resolved(_named(tmp_path, name, MODELS / config / "config.json"))
    assert info["model"]["name"] == name and info["model"]["n_layers"] == 48


# ---- fp8 scaled per tensor / channel: not 128 x 128 blocks --------------------------------------
Q30 = "Qwen/Qwen3-30B-A3B-Instruct-2507"
FP8_TENSOR = {"quant_method": "fp8", "activation_scheme": "dynamic"}
FP8_BLOCK = {**FP8_TENSOR, "weight_block_size": [128, 128]}
CT_FP8 = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
        }
    },
}


@pytest.mark.parametrize(
    ("q", "block"),
    [
        (FP8_BLOCK, True),  # Qwen3's -FP8 and DeepSeek's files: the key is left out
        (FP8_TENSOR, False),  # vLLM Fp8Config: weight_block_size None, block_quant False
        ({"quant_method": "fbgemm_fp8"}, False),  # per channel
        (CT_FP8, False),  # RedHatAI's FP8-dynamic: channel strategy
        ({**CT_FP8, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                                        "strategy": "block"}}}}, True),
    ],
)  # fmt: skip
def test_fp8_scales_are_read(q, block):
    arch = architecture_from_hf({**_cfg(Q30), "quantization_config": q}, "c.json")
    assert arch["dtype"] == "fp8"
    assert arch.get("fp8_block", True) is block


def _latency(capsys, cfg: dict, tmp_path: Path, *args) -> tuple[int, str, str]:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    rc = cli.main(["latency", "--model", str(p), "--batch", "8", "--context", "1000", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_fp8_per_tensor_experts_split_at_any_width(tmp_path, capsys):
    """Qwen3-30B-A3B's 768-wide experts over TP8 without EP are 96 wide: whole 128 x 128 blocks
    they are not, which vLLM refuses for block-quantised weights only (Fp8MoEMethod's check
    under ``if self.block_quant``); per-tensor fp8 was refused all the same."""
    gpu = ["--gpu", "h100-sxm", "--tp", "8"]
    rc, _, err = _latency(capsys, {**_cfg(Q30), "quantization_config": FP8_BLOCK}, tmp_path, *gpu)
    assert rc == 2 and "not whole blocks: vLLM refuses to load them" in err
    rc, out, err = _latency(
        capsys, {**_cfg(Q30), "quantization_config": FP8_TENSOR}, tmp_path, *gpu
    )
    assert rc == 0, err
    assert "fp8 weights" in out


def test_fp8_per_tensor_experts_run_no_block_scaled_k_loop():
    """The block-scaled K loop (moe_fp8_loop, the share moe_loop_w draws) is block-quantised
    fp8's; per-tensor fp8 experts run the kernel's default tiles and 16-bit K-loop step
    (assumed: no measured row has them), so at TP2 the same weights take less time."""
    from fleetsim.device import catalog
    from fleetsim.device.latency import LatencyModel
    from fleetsim.device.modelspec import ModelSpec
    from fleetsim.device.profile import catalog_profile

    prof = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    lat = {}
    for name, q in (("block", FP8_BLOCK), ("tensor", FP8_TENSOR)):
        arch = architecture_from_hf({**_cfg(Q30), "quantization_config": q}, "c.json")
        m = ModelSpec(name=name, **arch)
        lm = LatencyModel(m, prof, 2)
        lat[name] = (lm.moe_loop_s(8), lm.iteration(0, 0.0, 0, 8, 8000.0)[0], m.weight_bytes)
    assert lat["block"][2] == lat["tensor"][2] == pytest.approx(31.15e9, rel=1e-3)  # same bytes
    assert lat["block"][0] > 0 and lat["tensor"][0] == 0.0
    assert lat["tensor"][1] < lat["block"][1]


@pytest.mark.parametrize(
    ("model", "q", "said"),
    [
        (Q30, None, "has bf16 experts"),
        (Q30, FP8_TENSOR, "has fp8 experts scaled per tensor or channel"),
        ("Qwen/Qwen3-8B", None, "is not a mixture of experts"),
    ],
)
def test_the_flashinfer_kernel_is_refused_where_it_does_not_apply(tmp_path, capsys, model, q, said):
    """``fp8_moe_kernel = "flashinfer-trtllm"`` times fp8 block-quantised experts only; on a
    bf16 MoE, a dense model or per-tensor fp8 it was ignored without a word (exit 0)."""
    cfg = _cfg(model) if q is None else {**_cfg(model), "quantization_config": q}
    rc, _, err = _latency(
        capsys, cfg, tmp_path, "--gpu", "b200", "--fp8-moe-kernel", "flashinfer-trtllm"
    )
    assert rc == 2 and "\n" not in err
    assert "--fp8-moe-kernel = 'flashinfer-trtllm': is the kernel of fp8 block-quantised" in err
    assert said in err and "leave it at triton" in err
    text = MOE.replace("expert_parallel = true", "").replace("data_parallel = 2", "")
    text = text.replace('gpu = "h100-sxm"', 'gpu = "b200"')
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    text = text.replace(f'name = "{Q30}"', 'config = "config.json"')
    f = _moe(tmp_path, text.replace("[fleet]", '[fleet]\nfp8_moe_kernel = "flashinfer-trtllm"'))
    with pytest.raises(ScenarioError) as exc:
        fleetsim.resolved(f)
    assert exc.value.field == "fleet.fp8_moe_kernel" and said in exc.value.problem


def test_a_cache_folder_with_several_snapshots_and_no_ref_says_so(tmp_path, capsys):
    """Two snapshots and no refs/main: the folder has config.json files, but none is chosen;
    it was reported as "a folder with no config.json"."""
    repo = tmp_path / "models--Qwen--Qwen3-8B"
    for h in ("aaa1111", "bbb2222"):
        (repo / "snapshots" / h).mkdir(parents=True)
        shutil.copy(MODELS / "Qwen/Qwen3-8B/config.json", repo / "snapshots" / h)
    rc = cli.main(["latency", "--gpu", "h100-sxm", "--model", str(repo), "--batch", "1",
                   "--context", "10"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "a Hugging Face cache folder with 2 snapshots and no refs/main naming one" in err
    f = _moe(tmp_path, MOE.replace(f'name = "{Q30}"', f'config = "{repo}"'))
    with pytest.raises(ScenarioError) as exc:
        fleetsim.resolved(f)
    assert exc.value.field == "model.config" and "2 snapshots" in exc.value.problem
    assert "snapshots/HASH" in exc.value.fix
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb2222")  # a ref picks one: read
    assert fleetsim.resolved(f, ["fleet.expert_parallel=false"])["model"]["n_layers"] == 36


def test_fp8_block_is_an_inline_field(tmp_path):
    """An inline (or catalog) model in fp8 is block-quantised unless ``fp8_block = false``."""
    text = (
        MOE.replace(f'name = "{Q30}"', 'name = "qwen3-30b-a3b"\ndtype = "fp8"')
        .replace("tensor_parallel = 2", "tensor_parallel = 8")
        .replace("data_parallel = 2", "data_parallel = 1")
        .replace("expert_parallel = true", "expert_parallel = false")
    )
    with pytest.raises(ScenarioError) as exc:
        fleetsim.resolved(_moe(tmp_path, text))
    assert "not whole blocks" in exc.value.problem
    info = fleetsim.resolved(
        _moe(tmp_path, text.replace('dtype = "fp8"', 'dtype = "fp8"\nfp8_block = false'))
    )
    assert info["model"]["fp8_block"] is False
    with pytest.raises(ScenarioError) as exc:
        fleetsim.load(
            _moe(tmp_path, text.replace('dtype = "fp8"', 'dtype = "fp8"\nfp8_block = "no"'))
        )
    assert exc.value.field == "model.fp8_block"
