"""The 2026 models' scenarios of the library (scenarios/deepseek-r1-b200.toml,
scenarios/qwen3-moe-vs-dense-h100.toml, scenarios/gemma3-long-context-h100.toml): their KV
budgets by hand from the shipped config.json files, their fleets against Little's law and a
measured ML.ENERGY row, and the cost identity on a shortened run. (Validation and a one-hour run
of every shipped file: tests/test_everyday.py.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import fleetsim
from fleetsim.base.errors import ScenarioError
from fleetsim.device import catalog

ROOT = Path(__file__).resolve().parents[1]
R1 = ROOT / "scenarios/deepseek-r1-b200.toml"
GEMMA = ROOT / "scenarios/gemma3-long-context-h100.toml"
QWEN = ROOT / "scenarios/qwen3-moe-vs-dense-h100.toml"
DENSE = [
    'model.config="../data/models/Qwen/Qwen3-32B"',
    "fleet.tensor_parallel=2",
    "fleet.replicas=3",
]
HOURS_PER_YEAR = 8760.0


def _config(org_name: str) -> dict:
    cfg = json.loads((ROOT / "data/models" / org_name / "config.json").read_text())
    return cfg.get("text_config", cfg)


def _mlenergy_row(model: str, gpu: str, gpus: int, batch: int, task: str) -> dict:
    with (ROOT / "data/mlenergy-v3/configurations.csv").open() as f:
        for r in csv.DictReader(f):
            key = (r["model_id"], r["gpu_model"], int(r["num_gpus"]), int(r["max_num_seqs"]))
            if key == (model, gpu, gpus, batch) and r["task"] == task:
                return r
    raise AssertionError(f"no ML.ENERGY row {model} {gpu} x{gpus} b{batch} {task}")


def _lognormal_mean(median: float, sigma: float, lo: float, hi: float) -> float:
    """Mean of a lognormal cut to [lo, hi] (clipped: the tails pile up at the bounds)."""
    from scipy import stats

    d = stats.lognorm(s=sigma, scale=median)
    mu = math.log(median)
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inner = (
        median * math.exp(sigma**2 / 2) * (stats.norm.cdf(b - sigma) - stats.norm.cdf(a - sigma))
    )
    return inner + lo * d.cdf(lo) + hi * d.sf(hi)


# ---- DeepSeek-R1 on 8 x B200 -----------------------------------------------------------------
def test_r1_kv_budget_is_the_latent_by_hand():
    """MLA caches the compressed latent (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim)
    per token and layer, in bf16, on every GPU of the TP8 replica (vLLM keeps the latent whole
    on each rank): 576 x 61 x 2 = 70,272 bytes per token per GPU, x 8 on the node; the budget is
    whole blocks of 16 of what 0.9 x 8 B200s leave beside the weights and activations."""
    c = _config("deepseek-ai/DeepSeek-R1-0528")
    per_gpu = (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * c["num_hidden_layers"] * 2
    assert per_gpu == 70_272
    doc = fleetsim.resolved(R1)
    kv = doc["derived"]["kv_budget"]
    assert doc["derived"]["kv_bytes_per_token"] == per_gpu
    assert kv["bytes_per_token"] == 8 * per_gpu == 562_176
    mem = catalog.gpu("b200")["mem_bytes"]
    assert kv["memory_bytes"] == 8 * mem
    free = 0.9 * 8 * mem - kv["weight_bytes"] - kv["activation_bytes"]
    assert kv["tokens"] == 16 * math.floor(free / (16 * 562_176))
    # ~1.25M tokens: about 100 finished reasoning sequences (~12,500 tokens) per node
    assert 1.2e6 < kv["tokens"] < 1.3e6


def test_r1_fleet_against_littles_law_and_the_measured_row():
    """At the peak hour (1.35 x the mean rate, azure-conv) the fleet holds, by Little's law,
    rate x mean output x ITL sequences; at ML.ENERGY's measured ITL of the b128 row (R1 gpqa
    on 8 B200s: 44.8 ms) that needs at least 7 nodes of 128 sequences; the file's 9 leave the
    headroom the KV cache needs (fleetsim plan: 8 miss the SLO at the peak)."""
    sc = fleetsim.load(R1)
    row = _mlenergy_row("deepseek-ai/DeepSeek-R1-0528", "B200", 8, 128, "gpqa")
    itl = float(row["itl_median_ms"]) / 1e3
    assert itl == pytest.approx(0.0448, abs=1e-4)
    out = sc.traffic.output
    mean_out = _lognormal_mean(out.median, out.sigma, out.min, out.max)
    # the fit's mean against the measured mean output of the five R1 gpqa runs (11,080-11,850)
    assert mean_out == pytest.approx(11_450, rel=0.10)
    peak_rate = 1.35 * sc.traffic.requests_per_day / 86_400
    in_flight = peak_rate * mean_out * itl
    nodes = math.ceil(in_flight / sc.fleet.max_batch_size)
    assert nodes == 7
    assert sc.fleet.replicas == 9 > nodes
    assert sc.fleet.tensor_parallel * sc.fleet.replicas == 72


def test_r1_cost_identity_on_a_short_run():
    """Owned: energy $ = facility kWh x price (flat), hardware $ = GPU-h x capex / (5 x 8,760 h)
    with GPU-h = 72 GPUs x the hours."""
    run = fleetsim.simulate(R1, ["simulation.hours=1", "traffic.requests_per_day=20000"])
    t = run.totals
    assert t["gpu_hours"] == 72.0
    capex = catalog.gpu("b200")["capex_usd"]
    assert t["hardware_cost_usd"] == pytest.approx(72.0 * capex / (5 * HOURS_PER_YEAR), rel=1e-9)
    assert t["energy_cost_usd"] == pytest.approx(0.0806 * t["energy_facility_kwh"], rel=1e-9)
    assert t["total_cost_usd"] == pytest.approx(
        t["energy_cost_usd"] + t["hardware_cost_usd"], rel=1e-9
    )
    assert t["usd_per_mtok"] == pytest.approx(t["total_cost_usd"] / t["output_tokens"] * 1e6)


# ---- Qwen3-30B-A3B against Qwen3-32B on H100 -------------------------------------------------
def test_qwen_kv_bytes_and_budgets_by_hand():
    """KV per token = 2 (K, V) x layers x KV heads x head_dim x 2 bytes: 98,304 for the MoE
    (48 x 4 x 128), 262,144 for the dense model (64 x 8 x 128). On one H100 the budget is
    0.9 x 85.0 GB less the weights and the activation reserve (the MoE's, by hand: its
    8,192-token forward pass holds 2 B x 8,192 x (3 x 8 x 768 + 4 x 2,048) bytes, more than the
    sampler's logits of 96 sequences), in blocks of 16: 152,848 tokens against 35,888."""
    moe, dense = _config("Qwen/Qwen3-30B-A3B-Instruct-2507"), _config("Qwen/Qwen3-32B")

    def bpt(c: dict) -> int:
        return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2

    assert (bpt(moe), bpt(dense)) == (98_304, 262_144)
    mem = catalog.gpu("h100-sxm")["mem_bytes"]
    d_ff = moe["num_experts_per_tok"] * moe["moe_intermediate_size"]
    act = max(
        2 * 8192 * (3 * d_ff + 4 * moe["hidden_size"]),
        2 * 8192 * moe["hidden_size"] + 4 * 96 * moe["vocab_size"],
    )
    doc = fleetsim.resolved(QWEN)
    kv = doc["derived"]["kv_budget"]
    assert kv["activation_bytes"] == act
    blocks = math.floor((0.9 * mem - doc["derived"]["weight_bytes"] - act) / (16 * 98_304))
    assert kv["tokens"] == 16 * blocks == 152_848
    one_gpu_dense = fleetsim.resolved(QWEN, [DENSE[0]])["derived"]["kv_budget"]
    assert one_gpu_dense["tokens"] == 35_888
    assert kv["tokens"] > 4 * one_gpu_dense["tokens"]


def test_qwen_dense_day_and_cost_identity_on_a_short_run():
    """The dense variant the page quotes is 3 x TP2 = 6 H100s against the MoE's 2; on a
    shortened run its cost is kWh x price + GPU-h x capex / (5 x 8,760 h)."""
    moe = fleetsim.load(QWEN)
    dense = fleetsim.load(QWEN, DENSE)
    gpus = {
        k: s.fleet.replicas * s.fleet.tensor_parallel for k, s in (("moe", moe), ("dense", dense))
    }
    assert gpus == {"moe": 2, "dense": 6}
    run = fleetsim.simulate(QWEN, [*DENSE, "simulation.hours=1", "traffic.requests_per_day=100000"])
    t = run.totals
    assert t["gpu_hours"] == 6.0
    capex = catalog.gpu("h100-sxm")["capex_usd"]
    assert t["total_cost_usd"] == pytest.approx(
        0.0806 * t["energy_facility_kwh"] + 6.0 * capex / (5 * HOURS_PER_YEAR), rel=1e-9
    )
    assert t["slo_attainment"] == 1.0


# ---- gemma-3-27b long-context chat on H100 ----------------------------------------------------
def test_gemma_windows_by_hand_one_h100_holds_the_longest_request_only_with_them():
    """A layer-token of gemma-3-27b's K and V is 2 x 16 KV heads x 128 x 2 B = 8,192 bytes. On
    one H100 the paged pool is floor(KV bytes / (16 x 8,192)) layer-blocks; a sequence of L
    tokens takes ceil(L / 16) blocks in each of the 10 global layers and at most 1,024 / 16 + 1
    (the window and its open block) in each of the 52 window layers, so the longest request the
    pool holds is 16 x floor((blocks - 52 x 65) / 10) = 252,176 tokens: the trace's longest
    (126,527 with its output) fits. With every layer global a token costs 62 x 8,192 bytes and
    the same memory holds 41,536 tokens: the longest request is refused."""
    c = _config("google/gemma-3-27b-it")
    layer_token = 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    assert layer_token == 8192
    n_global = c["num_hidden_layers"] // c["sliding_window_pattern"]
    assert (n_global, c["num_hidden_layers"] - n_global) == (10, 52)
    one = ["fleet.tensor_parallel=1"]
    doc = fleetsim.resolved(GEMMA, one)
    kv = doc["derived"]["kv_budget"]
    blocks = math.floor(kv["kv_bytes"] / (16 * layer_token))
    assert kv["layer_blocks"] == blocks
    window_blocks = c["sliding_window"] // 16 + 1
    longest = 16 * ((blocks - 52 * window_blocks) // 10)
    assert kv["request_tokens"] == longest == 252_176
    assert doc["derived"]["max_request_tokens"] == 126_527 < longest
    # the token count (an estimate; the engine counts the layer-blocks) weighs the trace's
    # requests by their time in flight (branch t48; before, every token in all 62 layers:
    # 507,904 B, 41,536 tokens, what the counterfactual below holds)
    assert round(kv["bytes_per_token"]) == 115_025
    assert kv["tokens"] == 16 * math.floor(kv["kv_bytes"] / (16 * kv["bytes_per_token"]))
    assert kv["tokens"] == 183_440
    assert 16 * math.floor(kv["kv_bytes"] / (16 * 62 * layer_token)) == 41_536
    with pytest.raises(
        ScenarioError,
        match=r"126527 tokens\) exceeds the KV budget of a replica "
        r"\(41536 tokens\)",
    ):
        fleetsim.simulate(GEMMA, [*one, "model.sliding_window_tokens=0"])


def test_gemma_cost_identity_and_the_counterfactual_fleet():
    """The file's 5 x TP4 = 20 H100s over its 2 simulated hours are 40 GPU-h (`fleetsim plan
    --gpus h100-sxm --tp 2,4`'s fewest with prefix caching on, as the file runs, are 4 x TP4 at
    the TPOT limit, 174.7 ms of 175: the file keeps one replica of margin); the page's
    counterfactual is 17 x TP4 = 68; cost = kWh x price + GPU-h x capex / (5 x 8,760 h)."""
    sc = fleetsim.load(GEMMA)
    assert (sc.fleet.replicas, sc.fleet.tensor_parallel, sc.simulation.hours) == (5, 4, 2)
    glob = fleetsim.load(GEMMA, ["model.sliding_window_tokens=0", "fleet.replicas=17"])
    assert glob.fleet.replicas * glob.fleet.tensor_parallel == 68
    run = fleetsim.simulate(GEMMA)
    t = run.totals
    assert t["gpu_hours"] == 40.0
    assert t["requests_completed"] == t["requests_arrived"] == 12_031  # the whole trace
    capex = catalog.gpu("h100-sxm")["capex_usd"]
    assert t["total_cost_usd"] == pytest.approx(
        0.0806 * t["energy_facility_kwh"] + 40.0 * capex / (5 * HOURS_PER_YEAR), rel=1e-9
    )


# ---- what a planner tripped over while writing them ------------------------------------------
def test_kv_line_of_a_windowed_model_on_a_trace_weighs_the_trace_requests(tmp_path, capsys):
    """gemma-3-27b replaying the Mooncake trace: the KV budget read ``507,904 bytes per token at
    the traffic's typical sequence``, which is every token in all 62 layers (2 x 16 KV heads x
    128 x 2 B x 62): with sizes from a file the budget drew no typical sequence. Branch t48: the
    trace's own requests are the typical sequences (config/resolved.py ``typical_sizes``), each
    weighted by its time in flight, as drawn sizes are; the line says their bytes per token,
    under the full (its 10 global layers' share and more: the trace's mean prompt is 12,035
    tokens, 12 x the 1,024-token window), and that the sizes come from the file."""
    from fleetsim.apps.cli import main

    gemma = ROOT / "data/models/google/gemma-3-27b-it"
    trace = ROOT / "scenarios/data/mooncake-2025/conversation_trace.jsonl"
    p = tmp_path / "g.toml"
    p.write_text(
        f'[model]\nconfig = "{gemma}"\n[hardware]\ngpu = "h100-sxm"\n'
        "[fleet]\ntensor_parallel = 2\nenable_prefix_caching = false\n"
        f'[traffic]\ntrace = "{trace}"\ntrace_block_tokens = 512\n'
    )
    full = 2 * 16 * 128 * 2 * 62
    assert full == 507_904
    assert main(["validate", str(p)]) == 0
    out = capsys.readouterr().err  # (the "# model" line; stdout is the JSON)
    assert "every token in every layer" not in out
    assert (
        "115,052 bytes per token at the traffic's typical sequence (its requests' sizes from "
        "the file, each weighted by its time in flight)" in out
    )
    assert 2 * 16 * 128 * 2 * 10 < 115_052 < full
    drawn = tmp_path / "d.toml"
    drawn.write_text(
        f'[model]\nconfig = "{gemma}"\n[hardware]\ngpu = "h100-sxm"\n[fleet]\ntensor_parallel = 2\n'
    )
    assert main(["validate", str(drawn)]) == 0
    out = capsys.readouterr().err
    assert "bytes per token at the traffic's typical sequence" in out
    assert "sizes from the file" not in out


def test_gemma_plan_starts_at_the_four_replicas_that_pass():
    """scenarios/gemma3-long-context-h100.toml (5 x TP4; its header: 4 x TP4 are the fewest that
    meet the SLO): the planner's lower bound, ceil(peak / a replica's best-case rate), was 5,
    above the answer, because its KV budget charged the trace's tokens in every layer (507,904
    B per token: 491,472 tokens, a KV batch of 37 sequences of 13,154 tokens held over their
    time in flight). Branch t48 weighs the trace's own requests (115,025 B per token: 2,170,176
    tokens, 164 sequences); the bound is 4. Only the estimates move: the engine counts the
    windows in layer-blocks (1,904,482 per replica, either way)."""
    from fleetsim.config.loading import load_scenario
    from fleetsim.config.resolve import resolve
    from fleetsim.results.capacity import replica_capacity

    sc, _ = load_scenario(str(GEMMA), [], None)
    rs = resolve(sc, str(GEMMA))
    kv = rs.kv
    assert round(kv.bytes_per_token) == 115_025
    assert kv.tokens == int(kv.kv_bytes // (kv.bytes_per_token * 16)) * 16 == 2_170_176
    assert kv.layer_blocks == int(kv.kv_bytes // (16 * 8192)) == 1_904_482
    c = replica_capacity(rs, str(GEMMA))
    assert round(c.sizes.kv_per_seq) == 13_154
    assert c.kv_batch == pytest.approx(2_170_176 / c.sizes.kv_per_seq, rel=1e-12)
    assert (int(c.kv_batch), c.batch, c.bound) == (164, 164, "kv")
    peak = max(rs.hourly_rate_per_s[:2])  # the two simulated hours
    assert math.ceil(peak / c.rps) == 4


def test_refresh_only_refuses_an_unknown_run(capsys):
    """``bench/refresh_docs.py --only``: a name that is not a run is refused with the list of
    runs, before anything is simulated or written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refresh_docs", ROOT / "bench/refresh_docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    new = {"r1_b200", "r1_b200_8", "qwen3_moe", "qwen3_dense", "gemma_lc", "gemma_lc_global"}
    assert new <= set(mod.RUNS)
    before = (ROOT / "docs/figures.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        mod.main(["--only", "r1_b200,nosuch"])
    assert e.value.code == 2
    assert "--only: no run named nosuch (runs: default," in capsys.readouterr().err
    assert (ROOT / "docs/figures.json").read_bytes() == before
