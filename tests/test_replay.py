"""The real engine (calibrate/engine.py), ``fleetsim replay``, and trace replay in the simulator."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import ListSink

from fleetsim.apps.simulate import simulate
from fleetsim.base.errors import UserError
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

TINY = """name = "tiny"
n_layers = 2
d_model = 64
n_heads = 4
n_kv_heads = 2
d_ff = 128
vocab_size = 500
max_context_tokens = 2048
"""


# ---- the simulator side: traffic.trace -----------------------------------------------------------
def test_trace_replay_in_simulator(tmp_path):
    """A timed trace drives simulate(): the same arrivals and sizes, and an isolated request's
    times are the linear profile's closed form."""
    prof = tmp_path / "p.json"
    prof.write_text(
        json.dumps(
            {
                "format": "fleetsim-profile/1",
                "kind": "linear",
                "name": "t",
                "base_s": 0.01,
                "prefill_base_s": 0.02,
                "per_prefill_token_s": 1e-4,
                "per_seq_s": 1e-3,
            }
        )
    )
    trace = tmp_path / "t.csv"
    rows = [(0.5, 100, 10), (100.0, 50, 1), (100.001, 20, 5), (3700.25, 10, 3)]
    trace.write_text(
        "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows)
    )
    d = {
        "simulation": {"hours": 2},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm", "profile": str(prof)},
        "fleet": {"replicas": 1, "router": "round_robin", "max_batch_size": 4},
        "traffic": {"diurnal": "flat", "trace": str(trace)},
    }
    sink = ListSink()
    res = simulate(resolve(scenario_from_dict(d)), request_sink=sink)
    got = sorted(sink.rows.values())
    assert [(g[0], g[2], g[3]) for g in got] == rows
    assert res.totals.requests_arrived == 4 and res.totals.requests_completed == 4
    # the first request is alone: prefill 0.01+0.02+1e-4*100+1e-3 = 0.041 s, then 9 decode
    # steps of 0.01 + 1e-3 s each
    a, _, _, _, first, finish, _ = got[0]
    assert first - a == pytest.approx(0.041, rel=1e-12)
    assert finish - first == pytest.approx(9 * 0.011, rel=1e-12)
    # hourly accounting follows the trace's hours
    assert res.hourly.column("requests_arrived").to_pylist() == [3, 1]


def test_trace_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n1.0,10,5\n0.5,10,5\n")
    d = {"model": {"name": "llama-3.1-8b"}, "traffic": {"trace": str(bad)}}
    with pytest.raises(UserError, match="non-decreasing"):
        resolve(scenario_from_dict(d))
    (tmp_path / "cols.csv").write_text("t,p,o\n1,2,3\n")
    d["traffic"]["trace"] = str(tmp_path / "cols.csv")
    with pytest.raises(UserError, match="missing column"):
        resolve(scenario_from_dict(d))


def test_poisson_trace_argument():
    from fleetsim.calibrate.replay import parse_trace_arg

    tr = parse_trace_arg("poisson:400:5:32:8", seed=3)
    t = np.array([r[0] for r in tr])
    assert len(tr) == 400 and np.all(np.diff(t) >= 0)
    # 399 exponential gaps of mean 0.2 s: their mean within 4 standard errors
    assert abs(np.diff(t).mean() - 0.2) < 4 * 0.2 / math.sqrt(399)
    assert all(4 <= p <= 128 and 4 <= o <= 32 for _, p, o in tr)
    with pytest.raises(UserError, match="poisson:N:RATE"):
        parse_trace_arg("poisson:ten:1", seed=0)


# ---- the real engine -----------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def _tiny_model(tmp_path):
    from fleetsim.calibrate.cli import resolve_model
    from fleetsim.calibrate.model import TorchTransformer

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path, TorchTransformer(resolve_model(str(path), "fp32"), dtype="fp32", seed=0)


@pytest.mark.torch
def test_packed_iteration_matches_model(tmp_path):
    """The engine's packed mixed iteration computes what the model's own prefill / decode do."""
    from fleetsim.calibrate.engine import ServingEngine

    _, m = _tiny_model(tmp_path)
    eng = ServingEngine(
        m, max_batch_size=4, max_batched_tokens=256, kv_budget_tokens=10_000, max_seq_tokens=64
    )
    toks = m.random_tokens(1, 20)
    m.allocate_cache(1, 64)
    with torch.inference_mode():
        tok1 = m.prefill(toks).argmax(-1)
        tok2 = m.decode_step(tok1).argmax(-1)
    a = eng.forward([(2, toks[0])], [])
    # a mixed iteration: a new prompt in slot 0 while slot 2 decodes
    b = eng.forward([(0, toks[0, :7])], [(2, 20, int(tok1[0]))])
    assert int(a[0]) == int(tok1[0])
    assert int(b[1]) == int(tok2[0])


@pytest.mark.torch
def test_replay_end_to_end(tmp_path):
    """fleetsim replay on a tiny model: both sides serve every request, the table is complete."""
    from fleetsim.calibrate.replay import COLUMNS, main

    model_path, _ = _tiny_model(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "--trace",
            "poisson:30:20:16:6",
            "--model",
            str(model_path),
            "--layers",
            "2",
            "--device",
            "cpu",
            "--max-batch-size",
            "4",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    with (out / "replay.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["metric"], r["stat"]) for r in rows] == [
        (m, s) for m in ("ttft", "tpot", "e2e") for s in ("mean", "p50", "p90")
    ]
    for r in rows:
        assert float(r["real_s"]) > 0 and float(r["sim_s"]) > 0
        assert math.isfinite(float(r["rel_err"]))
    facts = json.loads((out / "replay.json").read_text())
    assert facts["completed_real"] == facts["completed_sim"] == 30
    with (out / "requests.csv").open() as fh:
        req = list(csv.DictReader(fh))
    for r in req:  # causality on both sides
        for side in ("real", "sim"):
            first, fin = float(r[f"{side}_first_token_s"]), float(r[f"{side}_finish_s"])
            assert float(r["arrival_s"]) < first <= fin
    # the engine obeyed the batch cap
    with (out / "iterations.csv").open() as fh:
        its = list(csv.DictReader(fh))
    assert max(int(i["n_prefill"]) + int(i["n_decode"]) for i in its) <= 4


def test_replay_grid_covers_the_trace_shapes():
    """The replay's roofline grid times decode at every batch size up to max(8, the cap) (powers
    of two above 16) and one-prompt prefills at the trace's prompt-length quantiles and maximum;
    the warm-up burst is synthetic (not the trace) and staggers its outputs so that every decode
    batch size from the cap down to 1 occurs."""
    from fleetsim.calibrate.replay import poisson_trace, replay_grid, warmup_trace
    from fleetsim.device.modelspec import ModelSpec

    spec = ModelSpec(
        name="t",
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        vocab_size=500,
        max_context_tokens=2048,
    )
    trace = poisson_trace(50, 1.0, 64, 16, seed=0)
    g = replay_grid(spec, trace, max_batch_size=8, max_batched_tokens=2048)
    assert g.decode_batches == tuple(range(1, 9))
    assert g.prefill_batches == (1,) and g.layer_counts == (2,)
    prompts = [p for _, p, _ in trace]
    assert max(g.prompt_tokens) == max(prompts) and min(g.prompt_tokens) >= min(prompts)
    assert max(g.decode_contexts) == max(p + o for _, p, o in trace)
    assert len(g.decode_points()) == 8 * len(g.decode_contexts)  # none cut by the cache budget
    g64 = replay_grid(spec, trace, max_batch_size=64, max_batched_tokens=2048)
    assert g64.decode_batches == (*range(1, 17), 32, 64)
    burst = warmup_trace(trace, 4, 2048, 4096)
    assert len(burst) == 8 and all(a == 0.0 for a, _, _ in burst)
    assert sorted({o for _, _, o in burst}) == [4, 7, 10, 13]  # distinct finishing steps
    assert burst != trace[:8]


@pytest.mark.torch
def test_engine_overhead_added_to_profile(tmp_path):
    """The engine-loop overhead is the median excess of the warm-up iterations over the
    profile: against a profile that predicts ~0 s per iteration, it is the median iteration
    time itself, and it is added to overhead_s with a note."""
    from fleetsim.calibrate.engine import ServingEngine
    from fleetsim.calibrate.replay import add_engine_overhead
    from fleetsim.device.profile import load_profile

    _, m = _tiny_model(tmp_path)
    eng = ServingEngine(
        m, max_batch_size=4, max_batched_tokens=256, kv_budget_tokens=10_000, max_seq_tokens=64
    )
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "format": "fleetsim-profile/1",
                "kind": "roofline",
                "name": "fast",
                "peak_flops": 1e30,
                "mem_bw_bytes_per_s": 1e30,
                "mem_bytes": 8e10,
                "compute_eff_max": 1.0,
                "compute_eff_half_tokens": 0.0,
                "memory_eff": 1.0,
                "overhead_s": 1e-6,
                "overhead_per_layer_s": 0.0,
                "power": None,
            }
        )
    )
    facts = add_engine_overhead(eng, m.spec, path, [(0.0, 16, 4)] * 3, rounds=1)
    prof, _ = load_profile(path)
    assert facts["iterations"] > 4
    assert facts["engine_overhead_s"] > 0
    assert prof.overhead_s == pytest.approx(1e-6 + facts["engine_overhead_s"], rel=1e-9)
    assert "engine bookkeeping" in json.loads(path.read_text())["notes"][-1]


def test_replay_bad_input(tmp_path):
    from fleetsim.calibrate.replay import main

    with pytest.raises(UserError, match="--profile"):
        main(["--trace", "poisson:3:1", "--profile", str(tmp_path / "nope.json")])
    with pytest.raises(UserError, match="--max-batch-size"):
        main(["--trace", "poisson:3:1", "--max-batch-size", "0"])


@pytest.mark.torch
def test_engine_admits_by_the_kv_budget_set_before_the_replay(tmp_path):
    """``fleetsim replay`` sets the engine's KV budget to the simulator's after building it: the
    admission rule (serving.admission.Limits, shared with the simulator) must use that budget.
    Two requests of 10 + 6 tokens at once with a 20-token budget: the second waits for the first
    to leave, so it is admitted only after the first's last token."""
    from fleetsim.calibrate.engine import ServingEngine, TraceRequest

    _, m = _tiny_model(tmp_path)
    eng = ServingEngine(
        m, max_batch_size=4, max_batched_tokens=256, kv_budget_tokens=1 << 62, max_seq_tokens=64
    )
    eng.kv_cap = 20
    res = eng.replay([TraceRequest(0.0, 10, 6), TraceRequest(0.0, 10, 6)])
    a, b = res.requests
    assert a.status == b.status == "completed"
    assert b.admit_s >= a.finish_s
    assert all(it.n_prefill + it.n_decode == 1 for it in res.iterations)  # never two at once
    # with the budget it was built with, both run together from the first iteration
    eng.kv_cap = 1 << 62
    res = eng.replay([TraceRequest(0.0, 10, 6), TraceRequest(0.0, 10, 6)])
    assert res.iterations[0].n_prefill == 2
