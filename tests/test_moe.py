"""The fused mixture-of-experts kernel and expert / data parallelism (fleetsim.device.moe)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import moe16

from fleetsim.device import catalog
from fleetsim.device.kernels import elem_time_s, gemm_time_s, layer_parts_s, layer_shapes
from fleetsim.device.latency import LatencyModel
from fleetsim.device.modelspec import ModelSpec, model_from_catalog
from fleetsim.device.moe import (
    MoeLayout,
    expected_distinct_experts,
    grouped_gemm_time_s,
    layout_problem,
    mlp_parts_s,
    moe_layer_parts_s,
)
from fleetsim.device.profile import catalog_profile


def _profile(gpu: str = "h100-sxm"):
    return catalog_profile(gpu, catalog.gpu(gpu))


def _markov_distinct(n: int, k: int, tokens: int) -> float:
    """E[distinct experts] from the exact distribution of the touched count: a token that finds
    ``j`` experts touched adds ``i`` new ones with the hypergeometric probability
    ``C(n-j, i) C(j, k-i) / C(n, k)`` (its ``k`` distinct picks)."""
    p = np.zeros(n + 1)
    p[0] = 1.0
    total = math.comb(n, k)
    for _ in range(tokens):
        q = np.zeros(n + 1)
        for j in range(n + 1):
            if p[j] == 0.0:
                continue
            for i in range(0, min(k, n - j) + 1):
                w = math.comb(n - j, i) * math.comb(j, k - i) / total
                q[j + i] += p[j] * w
        p = q
    return float(np.dot(np.arange(n + 1), p))


@pytest.mark.parametrize(("n", "k"), [(8, 2), (16, 2), (64, 6), (128, 8)])
@pytest.mark.parametrize("tokens", [1, 2, 7, 32, 200])
def test_distinct_experts_closed_form_is_exact(n, k, tokens):
    exact = _markov_distinct(n, k, tokens)
    assert expected_distinct_experts(n, k, tokens) == pytest.approx(exact, rel=1e-11, abs=1e-11)


@pytest.mark.parametrize(("n", "k", "tokens"), [(16, 2, 4), (16, 2, 16), (128, 8, 8), (128, 8, 64)])
def test_distinct_experts_monte_carlo(n, k, tokens):
    """Top-k without replacement drawn per token (a seeded SeedSequence stream): the mean count
    of distinct experts is within 4 standard errors of the closed form."""
    rng = np.random.default_rng(np.random.SeedSequence([22, n, k, tokens]))
    trials = 2000
    counts = np.empty(trials)
    for t in range(trials):
        picks = rng.random((tokens, n)).argsort(axis=1)[:, :k]  # k distinct experts per token
        counts[t] = np.unique(picks).size
    se = counts.std(ddof=1) / math.sqrt(trials)
    want = expected_distinct_experts(n, k, tokens)
    assert abs(counts.mean() - want) < 4.0 * se + 1e-9
    # and not the all-experts count when the batch is small (the point of counting)
    if tokens * k < n:
        assert want < 0.9 * tokens * k


def test_modelspec_uses_the_same_expectation():
    m = model_from_catalog("mixtral-8x7b")
    for t in (1, 3, 17, 500):
        assert m.expected_experts_touched(t) == pytest.approx(
            expected_distinct_experts(8, 2, t), rel=1e-14
        )


def test_grouped_gemm_is_one_launch():
    """E experts of r rows each in one grouped launch cost one launch floor plus E times a dense
    GEMM of r rows without its floor: both bounds scale by E, and the blend is homogeneous."""
    p = _profile()
    kf = p.kernels
    assert kf is not None
    for rows_per, experts, n, k in [(1.0, 16.0, 1536.0, 2048.0), (40.0, 8.0, 4096.0, 14336.0)]:
        one = gemm_time_s(kf, p.peak_flops, p.mem_bw_bytes_per_s, rows_per, n, k, 2.0)
        fused = grouped_gemm_time_s(
            kf, p.peak_flops, p.mem_bw_bytes_per_s, rows_per * experts, experts, n, k, 2.0
        )
        assert fused == pytest.approx(kf.gemm_launch_s + experts * (one - kf.gemm_launch_s))
        # the per-expert kernels of before paid the floor once per expert
        assert experts * one - fused == pytest.approx((experts - 1) * kf.gemm_launch_s)


def _sixteen_expert_model(n_layers: int = 96) -> ModelSpec:
    # a 16-expert top-2 model (the example), 96 layers
    return moe16(n_layers)


def test_fused_kernel_drops_the_per_expert_floors():
    """A 16-expert decode step: the old per-expert timing paid (touched - 1) extra launch floors
    per GEMM per layer; the fused kernel pays one. The difference is exactly those floors."""
    m = _sixteen_expert_model()
    p = _profile()
    kf = p.kernels
    assert kf is not None
    lat = LatencyModel(m, p, 1)
    batch = 64
    touched = expected_distinct_experts(16, 2, batch)
    old = layer_parts_s(
        kf, p.peak_flops, p.mem_bw_bytes_per_s, layer_shapes(m, 1), batch, 2.0, touched
    )
    old_mlp = old["mlp_up_proj"] + old["mlp_down_proj"]
    new = moe_layer_parts_s(
        kf, p.peak_flops, p.mem_bw_bytes_per_s, m, MoeLayout(1, 1, False), batch, 2.0, 1.0, 0.0
    )
    new_mlp = new["moe_gemm_up"] + new["moe_gemm_down"]
    saved = m.n_layers * (old_mlp - new_mlp)
    assert saved == pytest.approx(m.n_layers * 2 * (touched - 1) * kf.gemm_launch_s, rel=1e-9)
    assert saved > 0.015  # the "about 18 ms" per decode step of this size
    br = lat.breakdown(0, 0.0, 0, batch, batch * 512.0)
    assert sum(br.values()) == pytest.approx(lat.decode_time(batch, 512), rel=1e-12)
    assert br["moe_grouped_gemm"] > 0 and br["moe_dispatch"] == 0.0


def test_expert_parallel_weights_per_gpu():
    """EP over tp GPUs (dp = 1): each GPU reads its n/ep experts' touched share, whole experts,
    and routes T k / ep rows (storing zero tiles for the other (ep-1)/ep of the T k rows: see
    tests/test_moe_ep_rows.py); without EP every GPU reads every touched expert's 1/tp
    columns."""
    m = _sixteen_expert_model(4)
    p = _profile()
    kf = p.kernels
    assert kf is not None
    T = 256
    touched = expected_distinct_experts(16, 2, T)
    ep = moe_layer_parts_s(
        kf, p.peak_flops, p.mem_bw_bytes_per_s, m, MoeLayout(4, 1, True), T, 2.0, 450e9, 6e-6
    )
    want = grouped_gemm_time_s(
        kf,
        p.peak_flops,
        p.mem_bw_bytes_per_s,
        T * 2 / 4,
        touched / 4,
        2 * 4096,
        4096,
        2.0,
        zero_rows=T * 2 * 3 / 4,
    )
    assert ep["moe_gemm_up"] == pytest.approx(want, rel=1e-12)
    assert ep["moe_dispatch"] == 0.0 and ep["moe_combine"] == 0.0  # dp = 1: the TP all-reduce
    tp = moe_layer_parts_s(
        kf, p.peak_flops, p.mem_bw_bytes_per_s, m, MoeLayout(4, 1, False), T, 2.0, 450e9, 6e-6
    )
    want_tp = grouped_gemm_time_s(
        kf, p.peak_flops, p.mem_bw_bytes_per_s, T * 2, touched, 2 * 4096 / 4, 4096, 2.0
    )
    assert tp["moe_gemm_up"] == pytest.approx(want_tp, rel=1e-12)


def test_data_parallel_dispatch_and_attention():
    """dp = 2 attention engines of tp = 1 with EP 2: the MoE dispatch and combine each move
    (dp-1)/dp of the replica's hidden states over NVLink; the attention side of a batch of 2n
    costs what one engine's batch of n costs."""
    m = _sixteen_expert_model(8)
    p = _profile()
    lat2 = LatencyModel(m, p, tp=1, dp=2, expert_parallel=True)
    lat1 = LatencyModel(m, p, tp=1)
    n, ctx = 48, 700.0
    b2 = lat2.breakdown(0, 0.0, 0, 2 * n, 2 * n * ctx)
    b1 = lat1.breakdown(0, 0.0, 0, n, n * ctx)
    assert b2["attention_linear"] == pytest.approx(b1["attention_linear"], rel=1e-12)
    assert b2["attention_core"] == pytest.approx(b1["attention_core"], rel=1e-12)
    one = p.link_latency_s + 0.5 * (2 * n) * m.d_model * 2.0 / p.link_bw_bytes_per_s
    assert b2["moe_dispatch"] == pytest.approx(m.n_layers * one, rel=1e-12)
    assert b2["moe_combine"] == pytest.approx(m.n_layers * one, rel=1e-12)
    assert sum(b2.values()) == pytest.approx(lat2.decode_time(2 * n, int(ctx)), rel=1e-12)


def test_dense_models_keep_their_times():
    """The MoE path leaves a dense tp-only model on the per-layer operator sum (bit-identical
    step times) and its breakdown sums to the step."""
    m = model_from_catalog("llama-3.1-70b")
    p = _profile()
    lat = LatencyModel(m, p, 4)
    kf = p.kernels
    assert kf is not None
    parts = layer_parts_s(kf, p.peak_flops, p.mem_bw_bytes_per_s, layer_shapes(m, 4), 32, 2.0)
    emb = elem_time_s(kf, p.mem_bw_bytes_per_s, "emb", 4.0 * 32 * m.d_model)
    comp, mem, _ = lat.linear_parts(32, 0)
    assert comp == 0.0  # memory-bound at 32 tokens
    assert mem == pytest.approx(m.n_layers * sum(parts.values()) + emb, rel=1e-12)
    br = lat.breakdown(0, 0.0, 0, 32, 32 * 2000.0)
    assert sum(br.values()) == pytest.approx(lat.decode_time(32, 2000), rel=1e-12)
    assert "moe_grouped_gemm" not in br


def test_shared_experts_and_dense_layers_follow_the_model():
    """Shared experts add a dense MLP of n_shared x d_ff_shared columns on every token; the
    first-k dense layers run the dense MLP of d_ff instead of the MoE."""
    base = _sixteen_expert_model(8)
    m = base.evolve(d_ff_expert=1024, n_shared_experts=2, d_ff_shared=2048, first_k_dense=2)
    assert m.n_moe_layers == 6 and m.n_dense_layers == 2
    p = _profile()
    kf = p.kernels
    assert kf is not None
    lat = LatencyModel(m, p, 1)
    br = lat.breakdown(0, 0.0, 0, 16, 16 * 100.0)
    bw = p.mem_bw_bytes_per_s
    shared = sum(mlp_parts_s(kf, p.peak_flops, bw, 16.0, 4096, 2 * 2048, True, 2.0))
    dense = sum(mlp_parts_s(kf, p.peak_flops, bw, 16.0, 4096, 4096, True, 2.0))
    assert br["shared_mlp"] == pytest.approx(6 * shared, rel=1e-12)
    assert br["dense_mlp"] == pytest.approx(2 * dense, rel=1e-12)
    up = grouped_gemm_time_s(
        kf, p.peak_flops, bw, 16 * 2, expected_distinct_experts(16, 2, 16), 2 * 1024, 4096, 2.0
    )
    assert br["moe_grouped_gemm"] > 6 * up


def test_latency_cli_shows_the_moe_parts(capsys):
    """``fleetsim latency`` for Mixtral-8x7B at batch 1 to 512: each row's named parts add up to
    its total, the fused MoE is one of them, and it grows with the batch as experts are touched
    (2 of 8 at batch 1, nearly all 8 from batch 8 on)."""
    from fleetsim.apps.cli import main

    argv = ["latency", "--gpu", "h100-sxm", "--model", "mixtral-8x7b", "--tp", "2"]
    assert main([*argv, "--batch", "1,8,64,512", "--context", "1024", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    moe = []
    for r in rows:
        assert sum(r["parts_s"].values()) == pytest.approx(r["total_s"], rel=1e-12)
        assert r["parts_s"]["moe_dispatch"] == 0.0  # dp = 1
        moe.append(r["parts_s"]["moe_grouped_gemm"])
    assert moe == sorted(moe)
    # memory-bound at batch 1 and 8: the weights read follow the experts touched (2 -> 7.3)
    assert moe[1] / moe[0] == pytest.approx(expected_distinct_experts(8, 2, 8) / 2, rel=0.15)
    assert main([*argv, "--batch", "1,512", "--context", "1024"]) == 0
    text = capsys.readouterr().out
    assert "moe_grouped_gemm" in text and "attention_core" in text


@pytest.mark.parametrize(
    ("tp", "dp", "ep", "flag", "words"),
    [
        (2, 3, True, "--expert-parallel", "8 experts do not divide over EP"),
        (3, 1, False, "--tp", "does not divide"),
        (1, 0, False, "--dp", "must be a positive integer"),
    ],
)
def test_split_that_does_not_divide_is_one_clear_line(capsys, tp, dp, ep, flag, words):
    from fleetsim.apps.cli import main

    argv = ["latency", "--gpu", "h100-sxm", "--model", "mixtral-8x7b", "--tp", str(tp)]
    argv += ["--dp", str(dp), "--batch", "1", "--context", "8"]
    rc = main([*argv, "--expert-parallel"] if ep else argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.count(flag) >= 1 and words in err and "fix:" in err


def test_expert_parallel_needs_a_moe_model():
    m = model_from_catalog("llama-3.1-8b")
    got = layout_problem(m, 2, 1, True)
    assert got is not None and got[0] == "expert_parallel" and "not a mixture" in got[2]
    assert layout_problem(model_from_catalog("mixtral-8x7b"), 2, 4, True) is None


def _mixtral_scenario(**fleet) -> dict:
    return {
        "model": {"name": "mixtral-8x7b"},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"replicas": 1, **fleet},
        "traffic": {"requests_per_day": 20_000},
        "simulation": {"hours": 1},
    }


def test_scenario_fields_with_vllms_names():
    """``data_parallel_size`` and ``enable_expert_parallel`` (vLLM's flags) set the replica's
    layout: tp x dp GPUs per replica, the KV budget holds the non-expert weights once per engine,
    and the latency model is the data-parallel one."""
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve

    base = resolve(scenario_from_dict(_mixtral_scenario(tensor_parallel=2)))
    rs = resolve(
        scenario_from_dict(
            _mixtral_scenario(
                tensor_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True
            )
        )
    )
    assert rs.scenario.fleet.data_parallel == 2 and rs.scenario.fleet.expert_parallel
    assert rs.tp == 4 and rs.dp == 2 and base.tp == 2 and base.dp == 1
    m = rs.model
    experts_b = m.expert_params_total * 2.0
    assert rs.kv is not None and base.kv is not None
    # each engine's second rank holds the router whole (vLLM's ReplicatedLinear gate): 32
    # layers x 4,096 x 8 bf16 = 2,097,152 bytes an engine; 8 KV heads: none replicated at TP2
    router_b = 32 * 4096 * 8 * 2.0
    assert m.tp_extra_weight_bytes(2) == router_b
    assert rs.kv.weight_bytes == pytest.approx(
        2 * (m.weight_bytes + router_b) - experts_b, rel=1e-12
    )
    assert rs.kv.memory_bytes == pytest.approx(2 * base.kv.memory_bytes, rel=1e-12)
    assert rs.kv.bytes_per_token == base.kv.bytes_per_token  # a token lives in one engine
    lat = rs.latency_model()
    assert (lat.tp, lat.dp, lat.expert_parallel) == (2, 2, True)
    b_dp = lat.breakdown(0, 0.0, 0, 64, 64 * 500.0)
    b_tp = base.latency_model().breakdown(0, 0.0, 0, 32, 32 * 500.0)
    assert b_dp["attention_linear"] == pytest.approx(b_tp["attention_linear"], rel=1e-12)
    assert b_dp["moe_dispatch"] > 0


@pytest.mark.parametrize(
    ("fleet", "words"),
    [
        (
            {"tensor_parallel": 2, "data_parallel": 3, "expert_parallel": True},
            "fleet.expert_parallel",
        ),
        ({"tensor_parallel": 3, "data_parallel": 2}, "fleet.tensor_parallel = 3"),
        ({"tensor_parallel": 1, "expert_parallel": True}, "weights need"),
    ],
)
def test_scenario_split_errors_are_one_line(tmp_path, capsys, fleet, words):
    from fleetsim.apps import cli

    lines = ['[model]\nname = "mixtral-8x7b"\n[hardware]\ngpu = "h100-sxm"\n[fleet]\n']
    lines += [f"{k} = {str(v).lower()}\n" for k, v in fleet.items()]
    f = tmp_path / "s.toml"
    f.write_text("".join(lines))
    rc = cli.main(["validate", str(f)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert words in err and "fix:" in err


def test_data_parallel_is_refused_with_disaggregation():
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve

    d = _mixtral_scenario(tensor_parallel=2, data_parallel=2)
    d["disaggregation"] = {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}
    with pytest.raises(ScenarioError, match=r"fleet\.data_parallel = 2: data and expert"):
        resolve(scenario_from_dict(d))


def test_a_data_parallel_day_runs_and_counts_its_gpus():
    """An hour of Mixtral on 2 engines x TP2 with expert parallelism: the run completes, its
    powered GPUs are replicas x tp x dp, and the tokens come out."""
    import fleetsim

    run = fleetsim.simulate(
        _mixtral_scenario(tensor_parallel=2, data_parallel=2, expert_parallel=True)
    )
    totals = run.totals
    gp = run.hourly.column("gpus_powered_mean").to_numpy()
    assert gp.tolist() == [4.0]
    assert totals["requests_completed"] > 0 and totals["gpu_hours"] == 4.0


def test_latency_cli_qwen3_30b_a3b_parts(capsys):
    """Qwen3-30B-A3B (128 experts, top-8, expert width 768, read from the catalog entry made from
    its config.json) at batch 1 to 512: the parts add up, and the grouped GEMMs follow the
    experts touched while memory-bound: 8 at batch 1, E[distinct] = 51.6 at batch 8."""
    from fleetsim.apps.cli import main

    argv = ["latency", "--gpu", "h100-sxm", "--model", "qwen3-30b-a3b"]
    assert main([*argv, "--batch", "1,8,64,512", "--context", "1024", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        assert sum(r["parts_s"].values()) == pytest.approx(r["total_s"], rel=1e-12)
    g = [r["parts_s"]["moe_grouped_gemm"] for r in rows]
    from fleetsim.device.kernels import graphed_fit
    from fleetsim.device.stack import apply_stack

    prof = apply_stack(_profile(), "vllm-v1", "h100-sxm", 256)  # what the command uses
    assert prof.kernels is not None and prof.graph_max_tokens >= 8
    kf = graphed_fit(prof.kernels, prof.graph_floor_frac)  # batches 1 and 8 replay a graph
    # two launch floors and the activation's fixed cost per layer, 48 MoE layers
    floor = 48 * (2 * kf.gemm_launch_s + kf.elem_params("act")[0])
    ratio = expected_distinct_experts(128, 8, 8) / 8.0
    assert ratio == pytest.approx(6.45, abs=0.01)
    assert (g[1] - floor) / (g[0] - floor) == pytest.approx(ratio, rel=0.1)
    assert g[0] < g[1] < g[2] < g[3]
