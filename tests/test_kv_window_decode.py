"""The decode step's KV read per layer kind (device/latency.py, serving/core.py "Sliding
windows"): a window layer reads min(c, W) keys of a sequence at context c, a global layer c, a
linear-state layer its constant state; checked against hand counts, and through the engine,
whose runs stay exact (macro-stepped = per iteration) while sequences pass their windows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import ListSink, merge, rel, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.device.latency import LatencyModel, step_time


def _lat(model: str, gpu: str = "h100-sxm", tp: int = 1) -> LatencyModel:
    d = {
        "simulation": {"hours": 1},
        "model": {"name": model},
        "hardware": {"gpu": gpu},
        "fleet": {"tensor_parallel": tp},
        "traffic": {"requests_per_day": 1000},
    }
    return resolved(d).latency_model()


def _attention_hand(lat: LatencyModel, keys_by_layer: float, b: int) -> tuple[float, float, float]:
    """(seconds, FLOPs, KV bytes) of a decode step's attention over ``keys_by_layer`` keys
    summed over the attention layers (one GPU's share), from the model's head counts and the
    profile's constants: scores and sum 4 x heads x head_dim FLOPs per key, K and V of the KV
    heads per key; plus the new tokens' KV written to every attention layer."""
    m, p = lat.model, lat.profile
    flops = keys_by_layer * 4.0 * m.n_heads * m.head_dim
    kv_key_layer = 2.0 * m.n_kv_heads * m.head_dim * m.kv_bytes_per_element
    nbytes = keys_by_layer * kv_key_layer
    t_c = flops / (p.peak_flops * p.compute_eff_max)
    t_m = nbytes / (p.mem_bw_bytes_per_s * p.memory_eff)
    t_new = b * m.n_attn_layers * kv_key_layer / (p.mem_bw_bytes_per_s * p.memory_eff)
    return max(t_c, t_m) + t_new, flops, nbytes


@pytest.mark.parametrize("b,c", [(1, 500), (8, 1024), (8, 1025), (32, 4096), (64, 32_000)])
def test_gemma3_decode_step_reads_the_window_on_window_layers(b, c):
    """Gemma 3 27B (62 layers: 10 global, 52 with a 1,024-token window) at batch b and
    context c: the attention part of the step is the hand count over 10 x c + 52 x min(c, 1024)
    keys per sequence; the rest of the step does not depend on c."""
    lat = _lat("gemma-3-27b")
    m = lat.model
    assert (m.n_global_attn_layers, m.n_sliding_layers, m.sliding_window_tokens) == (10, 52, 1024)
    keys = b * (10 * c + 52 * min(c, 1024))
    t_att, f_att, b_att = _attention_hand(lat, keys, b)
    t0 = step_time(lat.run_coeffs(b), 0.0) - b * lat._att_m  # the step without attention
    assert lat.decode_time(b, c) == pytest.approx(t0 + t_att, rel=1e-12)
    # the engine's own call: decode_step at the ctx the core passes (decode_ctx)
    ctx = lat.decode_ctx(b, c)
    assert ctx == pytest.approx(keys / 62, rel=1e-14)
    t, flops, nbytes = lat.decode_step(b, ctx)
    assert t == pytest.approx(t0 + t_att, rel=1e-12)
    assert flops == pytest.approx(b * (m.flops_per_token_linear + m.flops_lm_head) + f_att)
    assert nbytes == pytest.approx(m.weight_bytes_read(b) + b_att + b * m.kv_bytes_per_token)
    # decode_flops (the model's own count, taken at the mean context) agrees
    assert flops == pytest.approx(m.decode_flops(b, b * c), rel=1e-12)
    if c > 1024:  # the old charge (every layer the whole context) is larger
        assert lat.decode_time(b, c) < step_time(lat.run_coeffs(b), float(b * c))


def test_gpt_oss_alternate_layers_read_full_and_window():
    """gpt-oss-20b: 24 layers alternating full attention and a 128-token window: a sequence at
    context c reads 12 x c + 12 x min(c, 128) keys, half the old charge's excess beyond 128."""
    lat = _lat("gpt-oss-20b")
    m = lat.model
    assert (m.n_global_attn_layers, m.n_sliding_layers, m.sliding_window_tokens) == (12, 12, 128)
    for b, c in ((1, 100), (16, 2000), (128, 8000)):
        keys = b * (12 * c + 12 * min(c, 128))
        assert lat.decode_ctx(b, c) == pytest.approx(keys / 24, rel=1e-14)
        t_att = _attention_hand(lat, keys, b)[0]
        t0 = step_time(lat.run_coeffs(b), 0.0) - b * lat._att_m
        assert lat.decode_time(b, c) == pytest.approx(t0 + t_att, rel=1e-12)


def test_nemotron_state_layers_are_constant_in_the_context():
    """Nemotron Nano 9B v2: 4 attention layers among 56; the step grows with the context by the
    4 attention layers' KV only (the Mamba-2 layers read a constant state per sequence)."""
    lat = _lat("nemotron-nano-9b-v2")
    m = lat.model
    assert (m.n_attn_layers, m.n_linear_layers) == (4, 27)
    b = 16
    for c1, c2 in ((1000, 9000), (100, 30_000)):
        dt = lat.decode_time(b, c2) - lat.decode_time(b, c1)
        t2 = _attention_hand(lat, b * 4 * c2, b)[0]
        t1 = _attention_hand(lat, b * 4 * c1, b)[0]
        assert dt == pytest.approx(t2 - t1, rel=1e-12)
    assert lat.decode_ctx(b, 5000) == b * 5000  # no windows: every attention layer reads c


# ---- through the engine -------------------------------------------------------------------
def _burst(tmp_path: Path, model: str, rows: list[tuple[float, int, int]], **fleet) -> dict:
    f = tmp_path / "trace.csv"
    f.write_text(
        "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows)
    )
    return {
        "simulation": {"hours": 1},
        "model": {"name": model},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"max_batch_size": 256, "max_batched_tokens": 65536, **fleet},
        "traffic": {"trace": str(f)},
        "slo": {"ttft_s": 1e5, "tpot_s": 1e5},
    }


@pytest.mark.parametrize("kv", ["paged", "reserve"])
@pytest.mark.parametrize("engine", ["macro", "iteration"])
def test_engine_burst_matches_the_hand_sum(tmp_path, kv, engine):
    """Eight Gemma 3 27B requests of 1,000 prompt tokens and 100 output tokens arrive together:
    one prefill iteration, then 99 decode steps whose contexts 1,001 .. 1,099 cross the
    1,024-token window at step 24. They finish at the prefill plus the sum of the hand-counted
    steps (window layers reading min(c, 1024)), under both KV policies and both engines."""
    b, P, O = 8, 1000, 100
    d = _burst(tmp_path, "gemma-3-27b", [(1.0, P, O)] * b, kv_allocation=kv)
    d["simulation"]["engine"] = engine
    rs = resolved(d)
    lat = rs.latency_model()
    sink = ListSink()
    simulate(rs, request_sink=sink)
    t_pf = lat.iteration(b * P, float(b * P * P), b, 0, 0.0)[0]
    m = lat.model
    steps = [lat.decode_time(b, P + i) for i in range(1, O)]
    # hand count of the same steps: global layers read c, window layers min(c, 1024)
    t0 = step_time(lat.run_coeffs(b), 0.0) - b * lat._att_m
    for i, t in enumerate(steps, start=1):
        c = P + i
        hand = t0 + _attention_hand(lat, b * (10 * c + 52 * min(c, 1024)), b)[0]
        assert t == pytest.approx(hand, rel=1e-12)
    assert m.sliding_window_tokens - P < O  # the window is crossed inside the run
    want = 1.0 + t_pf + math.fsum(steps)
    for row in sink.rows.values():
        assert row[6] == "completed"
        assert row[4] == pytest.approx(1.0 + t_pf, rel=1e-12)
        assert rel(row[5], want) < 1e-9, (row[5], want)
    # the old charge (every layer the whole context) would have finished later
    old = (
        1.0
        + t_pf
        + math.fsum(step_time(lat.run_coeffs(b), float(b * (P + i))) for i in range(1, O))
    )
    assert want < old


def _mixed(tmp_path: Path, model: str, n: int, seed: int, **fleet) -> dict:
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    t = np.cumsum(rng.exponential(0.05, n))
    p = rng.integers(50, 3000, n)
    o = rng.integers(10, 1500, n)
    rows = [(1.0 + float(a), int(x), int(y)) for a, x, y in zip(t, p, o, strict=True)]
    dis = fleet.pop("disaggregation", None)
    d = _burst(tmp_path, model, rows, **fleet)
    if dis is not None:
        d["disaggregation"] = dis
    return d


@pytest.mark.parametrize(
    "model,fleet",
    [
        ("gemma-3-27b", {}),
        ("gemma-3-27b", {"kv_allocation": "reserve"}),
        ("gemma-3-12b", {"max_batch_size": 16, "max_batched_tokens": 2048}),
        ("gpt-oss-20b", {}),
        (
            "gemma-3-12b",
            {"disaggregation": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
        ),
        ("gemma-3-27b", {"gpu_memory_utilization": 0.66, "activation_reserve_bytes": 0}),
        # a hybrid: the constant state taken at admission, given back at finish / preemption
        ("nemotron-nano-9b-v2", {}),
        ("nemotron-nano-9b-v2", {"kv_allocation": "reserve"}),
        ("nemotron-nano-9b-v2", {"max_batch_size": 16, "max_batched_tokens": 2048}),
        (
            "nemotron-nano-9b-v2",
            {"disaggregation": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
        ),
        (
            "nemotron-nano-9b-v2",
            {"gpu_memory_utilization": 0.222, "activation_reserve_bytes": 0},
        ),
    ],
)
def test_windowed_macro_equals_per_iteration(tmp_path, model, fleet):
    """Arrivals joining and leaving while sequences pass their windows at different steps:
    macro-stepped and per-iteration runs give the same first-token and finish times (rel.
    1e-9), the same busy time and energy, and macro-stepping takes fewer events."""
    d = _mixed(tmp_path, model, 400, 22, **fleet)
    out = {}
    for engine in ("macro", "iteration"):
        sink = ListSink()
        res = simulate(
            resolved(merge(d, simulation={"hours": 1, "engine": engine})), request_sink=sink
        )
        out[engine] = (res, sink)
    (a, sa), (b, sb) = out["macro"], out["iteration"]
    assert sa.rows.keys() == sb.rows.keys()
    assert len(sa.rows) == 400
    worst = 0.0
    for rid, x in sa.rows.items():
        y = sb.rows[rid]
        assert x[6] == y[6] == "completed"
        worst = max(worst, rel(x[4], y[4]), rel(x[5], y[5]))
    assert worst < 1e-9, worst
    for col in ("gpu_busy_s", "energy_gpu_kwh", "output_tokens"):
        assert (
            rel(
                float(a.hourly.column(col).to_numpy().sum()),
                float(b.hourly.column(col).to_numpy().sum()),
            )
            < 1e-9
        )
    assert a.totals.iterations == b.totals.iterations
    # macro-stepping is on; a disaggregated fleet's prefill pool takes one event per step in
    # both engines (the hybrid's: 1,507 of 3,368 since its prompt steps run the SSD chunked
    # scan, device/moe.py ssd_prefill_delta_s; 1,654 of 3,422 without the fitted prefill path)
    hybrid_pd = "disaggregation" in fleet and model.startswith("nemotron")
    assert a.totals.events < b.totals.events / (2 if hybrid_pd else 3)
    if fleet.get("gpu_memory_utilization"):
        assert a.totals.preemptions > 0


@pytest.mark.parametrize("model", ["gemma-3-12b", "nemotron-nano-9b-v2"])
def test_disaggregated_transfer_sends_the_kv_by_layer_kind(tmp_path, model):
    """A disaggregated pod sends each prompt's KV as its layers hold it: Gemma 3 12B's 8
    global layers the whole prompt and its 40 window layers at most 1,024 tokens; Nemotron Nano
    9B v2's 4 attention layers the prompt and its 27 Mamba-2 layers their constant state. On an
    idle link a transfer takes latency + those bytes / bandwidth; the hourly table sums them."""
    from test_disagg import Tap

    rows = [(1.0 + 2.0 * i, p, 20) for i, p in enumerate((300, 1024, 1500, 4000, 9000))]
    d = _mixed(
        tmp_path,
        model,
        1,
        1,
        disaggregation={
            "prefill": {"replicas": 1},
            "decode": {"replicas": 1},
            "link_bandwidth_bytes_per_s": 1e9,
            "link_latency_s": 1e-3,
        },
    )
    f = tmp_path / "trace.csv"
    f.write_text(
        "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows)
    )
    rs = resolved(d)
    pod = Tap(rs, 0, 1)
    pod.run()
    m = rs.model
    per_layer = 2 * m.n_kv_heads * m.head_dim * m.kv_bytes_per_element
    assert len(pod.arrived_kv) == 5
    total = 0.0
    for r in pod.arrived_kv:
        p = r.prompt
        if model.startswith("gemma"):
            hand = per_layer * (8 * p + 40 * min(p, 1024))
        else:
            hand = per_layer * 4 * p + m.state_bytes_per_seq
            assert m.state_bytes_per_seq > 0
        assert r.xfer_bytes == pytest.approx(hand, rel=1e-12)
        assert r.link_wait_s == 0.0
        assert r.xfer_s == pytest.approx(1e-3 + hand / pod.pools.egress_bytes_per_s, rel=1e-12)
        total += hand
    res = simulate(rs)
    got = sum(float(x) for x in res.pools.column("kv_transfer_bytes").to_numpy())
    assert got == pytest.approx(total, rel=1e-12)


def test_prefix_caching_of_a_windowed_model_on_a_trace_and_in_sessions_validates(tmp_path):
    """Traffic that names prompt blocks (Mooncake's trace) with a sliding-window model and
    prefix caching on (the paged default) validates: the engine caches its prompts as vLLM's
    hybrid manager does (tests/test_kv_window_prefix.py). Sessions, whose turns cache their
    answers at the finish too, validate as well (tests/test_kv_window_sessions.py; refused
    before branch s47)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    base = [sys.executable, "-m", "fleetsim", "validate", "scenarios/mooncake-conversation.toml"]
    sets = ["--set", 'model.name="gemma-3-27b"', "--set", "fleet.tensor_parallel=2"]
    r = subprocess.run(base + sets, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f = tmp_path / "s.toml"
    f.write_text(
        '[model]\nname = "gemma-3-27b"\n[hardware]\ngpu = "h100-sxm"\n'
        "[fleet]\ntensor_parallel = 2\n[traffic]\nrequests_per_day = 1000\n"
        "[traffic.sessions]\nblock_tokens = 64\n"
    )
    base = [sys.executable, "-m", "fleetsim", "validate", str(f)]
    r = subprocess.run(base, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_longest_request_is_counted_per_layer_kind(tmp_path, monkeypatch):
    """With 6 GB of KV, Gemma 3 27B holds 45,776 layer-blocks of 16 tokens (131,072 bytes
    each): a sequence of L tokens takes 10 ceil(L / 16) + 52 x 65 of them past its window, so
    the longest request is (45,776 - 3,380) // 10 x 16 = 67,824 tokens, not the 11,808 that
    the bytes of a full-attention token would allow. A 60,000-token request is admitted and
    completes holding the hand count; 70,000 tokens are refused at validation. The budget in
    tokens, an estimate at the trace's request weighted by its time in flight (branch t48;
    11,808 when a trace's tokens were charged in every layer), is 66,624: under the exact
    count, which the request's last iterations reach."""
    from test_kv_window import _scenario, _spy

    from fleetsim.base.errors import ScenarioError

    d = _scenario(tmp_path, [(1.0, 59_990, 10)], kv_gb=6.0)
    rs = resolved(d)
    kv = rs.kv
    assert kv is not None
    nb = int(kv.kv_bytes // (16 * 507_904 / 62))
    assert kv.request_tokens == (nb - 52 * 65) // 10 * 16
    assert nb // 62 * 16 == 11_808  # every token in every layer
    assert kv.tokens == int(kv.kv_bytes // (kv.bytes_per_token * 16)) * 16 == 66_624
    assert 60_000 < kv.tokens < kv.request_tokens < 70_000
    seen = _spy(monkeypatch)
    sink = ListSink()
    simulate(rs, request_sink=sink)
    (row,) = sink.rows.values()
    assert row[6] == "completed"
    ((tokens, used),) = seen["at_free"]
    assert used == 10 * math.ceil(tokens / 16) + 52 * 65 <= nb
    with pytest.raises(ScenarioError, match="exceeds the KV budget"):
        (tmp_path / "long").mkdir()
        resolved(_scenario(tmp_path / "long", [(1.0, 69_990, 10)], kv_gb=6.0))


@pytest.mark.parametrize("kv", ["paged", "reserve"])
def test_prefill_pairs_of_window_layers(tmp_path, monkeypatch, kv):
    """A 5,000-token Gemma 3 27B prompt, in chunks of 2,048 (paged) or whole (reserve): its
    prefill's attention pairs sum to the model's convention, 5,000^2 on the 10 global layers
    and 5,000 x 1,024 on the 52 window layers (in units of a pair in all 62 layers), so the
    prefill's FLOPs are ModelSpec.prefill_flops."""
    seen: list[tuple[int, float, int]] = []
    orig = LatencyModel.iteration

    def spy(self, p_tokens, pairs, n_prefill, n, ctx, t_pad=-1, p_full=-1, pairs_full=-1.0):
        if p_tokens:
            seen.append((p_tokens, pairs, n_prefill))
        return orig(self, p_tokens, pairs, n_prefill, n, ctx, t_pad, p_full, pairs_full)

    monkeypatch.setattr(LatencyModel, "iteration", spy)
    budget = 2048 if kv == "paged" else 8192
    d = _burst(tmp_path, "gemma-3-27b", [(1.0, 5000, 2)], kv_allocation=kv)
    d["fleet"]["max_batched_tokens"] = budget
    rs = resolved(d)
    simulate(rs)
    P = 5000
    assert [s[0] for s in seen] == ([2048, 2048, 904] if kv == "paged" else [P])
    pairs = math.fsum(s[1] for s in seen)
    assert pairs == pytest.approx((10 * P * P + 52 * P * 1024) / 62, rel=1e-12)
    m = rs.model
    flops = P * m.flops_per_token_linear + pairs * m.attn_flops_per_pair + m.flops_lm_head
    assert flops == pytest.approx(m.prefill_flops(P), rel=1e-12)


def test_latency_command_reads_per_layer_kind():
    """`fleetsim latency` for Gemma 3 27B at 32,000 tokens of context: the decode rows read
    10 x c + 52 x 1,024 keys per sequence (in units of a key in all 62 layers) and take the
    engine's step time; a 5,000-token prefill charges the window layers 5,000 x 1,024 pairs."""
    from fleetsim.apps.latency import build_parser, rows

    c = 32_000
    out = rows(
        build_parser().parse_args(
            ["--gpu", "h100-sxm", "--model", "gemma-3-27b", "--batch", "1,64", "--context", str(c)]
        )
    )
    lat = _lat("gemma-3-27b")
    for row, b in zip(out, (1, 64), strict=True):
        assert row["kv_tokens_read"] == pytest.approx(b * (10 * c + 52 * 1024) / 62, rel=1e-14)
        assert row["total_s"] == pytest.approx(lat.decode_time(b, c), rel=1e-12)
    (pf,) = rows(
        build_parser().parse_args(
            ["--gpu", "h100-sxm", "--model", "gemma-3-27b", "--prefill-tokens", "5000"]
        )
    )
    m = lat.model
    assert pf["flops"] == pytest.approx(m.prefill_flops(5000), rel=1e-12)
