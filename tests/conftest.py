"""Shared helpers: small scenarios built in code, and an in-memory request sink."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

SMALL = {
    "name": "small",
    "seed": 7,
    "simulation": {"hours": 2},
    "model": {"name": "llama-3.1-8b"},
    "hardware": {"gpu": "h100-sxm"},
    "fleet": {"replicas": 2, "tensor_parallel": 1, "router": "round_robin"},
    "traffic": {
        "requests_per_day": 200_000,
        "diurnal": "flat",
        "prompt": {"dist": "lognormal", "median": 500, "sigma": 0.8, "min": 4, "max": 4000},
        "output": {"dist": "lognormal", "median": 100, "sigma": 0.8, "min": 1, "max": 1000},
    },
}


def merge(base: dict, **sections) -> dict:
    """A deep copy of ``base`` with ``sections`` merged in (section -> dict of fields)."""
    out = copy.deepcopy(base)
    for sec, fields in sections.items():
        if isinstance(fields, dict) and isinstance(out.get(sec), dict):
            out[sec].update(fields)
        else:
            out[sec] = fields
    return out


def resolved(d: dict):
    return resolve(scenario_from_dict(d))


def one_gpu_latency_model(model: str, gpu: str):
    """The latency model of catalog ``model`` on one catalog ``gpu`` (the default serving
    stack), as a one-hour scenario resolves it."""
    d = {
        "simulation": {"hours": 1},
        "model": {"name": model},
        "hardware": {"gpu": gpu},
        "traffic": {"requests_per_day": 1000},
    }
    return resolved(d).latency_model()


class ListSink:
    """Collects request records in memory (the RequestWriter interface)."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple] = {}

    def add(self, r, replica, finish_s, ttft_s, tpot_s, e2e_s, status) -> None:
        self.rows[r.rid] = (
            r.arrival_s,
            replica,
            r.prompt,
            r.out,
            r.first_token_s,
            finish_s,
            status,
        )


@pytest.fixture
def small() -> dict:
    return copy.deepcopy(SMALL)


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return (
        abs(a - b) / max(abs(a), abs(b), 1e-300)
        if math.isfinite(a) and math.isfinite(b)
        else math.inf
    )


def tables_equal(a, b) -> bool:
    """Column-by-column equality with NaN == NaN (pyarrow's equals treats NaN as unequal)."""
    import numpy as np

    if a.schema.names != b.schema.names or a.num_rows != b.num_rows:
        return False
    for name in a.schema.names:
        x, y = a.column(name).to_numpy(), b.column(name).to_numpy()
        if x.dtype.kind == "f":
            if not np.array_equal(x, y, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def moe16(n_layers: int = 8):
    """A 16-expert top-2 mixture of experts (issue 22's example; d_model 4,096, 32 heads, 8 KV
    heads, expert width 4,096) of ``n_layers`` layers."""
    from fleetsim.device.modelspec import ModelSpec

    return ModelSpec(
        name="moe16",
        n_layers=n_layers,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        d_ff=4096,
        vocab_size=32000,
        n_experts=16,
        n_active_experts=2,
    )


#: the B200's committed eager host floor (catalog/stacks.toml ["vllm-v1"."b200"]): per MoE layer,
#: per sequence, per latent-attention layer, and the latent-attention prefill path per layer
B200_EAGER_LAYER_S = 6.0e-4
B200_EAGER_SEQ_S = 6.0e-5
B200_EAGER_MLA_S = 7.5e-4
B200_EAGER_MLA_PREFILL_S = 2.0e-4


def b200_vllm_profile(max_num_seqs: int = 1024):
    """The catalog B200's roofline profile as the ``vllm-v1`` stack runs it at ``max_num_seqs``."""
    from fleetsim.device import catalog
    from fleetsim.device.latency import RooflineProfile
    from fleetsim.device.profile import catalog_profile
    from fleetsim.device.stack import apply_stack

    p = apply_stack(catalog_profile("b200", catalog.gpu("b200")), "vllm-v1", "b200", max_num_seqs)
    assert isinstance(p, RooflineProfile)
    return p


def mlenergy_resolved(c, tmp_path, engine: str = "iteration", n: int = 24, **hw):
    """The resolved scenario of ML.ENERGY configuration ``c`` (calibrate.mlenergy.Config) as the
    harness runs it, on a trace of ``n`` requests of 250 prompt and 120 output tokens all at
    t = 0, with ``hw`` overriding its ``[hardware]`` fields."""
    from fleetsim.api import load
    from fleetsim.calibrate import mlenergy as M
    from fleetsim.config.scenario import resolve as resolve_scenario

    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "0,250,120\n" * n)
    d = M.scenario_dict(c, str(trace), 1, engine)
    d["hardware"].update(hw)
    return resolve_scenario(load(d), "")


def synthetic_power_run(rng, truth, n: int = 50, loop: bool = False):
    """A synthetic power-fit run (calibrate.mlenergy.SimRun) of ``n`` commits under the cap:
    0-0.3 of the peak FLOP/s, one iteration per commit reading 10 GB of weights plus 0 to 0.5 of
    the bandwidth of KV (the weight share of the bandwidth varies with the commit's length), a
    prefill anchor consistent with the PowerSpec ``truth``, and with ``loop`` 0.1-0.5 of each
    commit in the fp8 fused-MoE K loop (drawn last)."""
    import numpy as np

    from fleetsim.calibrate.mlenergy import SimRun

    r = SimRun("x", tp=1, peak_flops=1e15, peak_bw=3e12)
    r.seg_s = rng.uniform(0.01, 0.05, n)
    r.seg_flops = rng.uniform(0.0, 0.3, n) * r.seg_s * 1e15
    r.seg_iters = np.ones(n)
    r.weight_bytes = 10e9
    r.seg_bytes = 10e9 + rng.uniform(0.0, 0.5, n) * r.seg_s * 3e12
    if loop:
        r.seg_loop_s = rng.uniform(0.1, 0.5, n) * r.seg_s
    pf = (truth.max_w - truth.idle_w - truth.active_w - 0.02 * truth.memory_w) / truth.compute_w
    r.prefill_u = (pf, 0.02, 0.0)
    return r


def mlenergy_folder(d: Path, rows: list[dict]) -> Path:
    """A folder in the ML.ENERGY v3 format holding ``rows`` of data/mlenergy-v3's
    configurations.csv, the histograms as the leaderboard's JSON files (rebuilt from
    output_lengths.csv)."""
    src = Path(__file__).resolve().parent.parent / "data" / "mlenergy-v3"
    (d / "models").mkdir(parents=True)
    with open(d / "configurations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by_file: dict[str, list] = {}
    with open(src / "output_lengths.csv", newline="") as f:
        for r in csv.DictReader(f):
            lo, hi = float(r["min_tokens"]), float(r["max_tokens"])
            cfg = {
                "output_length_distribution": {
                    "bins": list(np.linspace(lo, hi, 51)),
                    "counts": [int(x) for x in r["counts"].split()],
                }
            }
            by_file.setdefault(r["source_file"], []).append(cfg)
    for name in {r["source_file"] for r in rows}:
        (d / name).write_text(json.dumps({"configurations": by_file[name]}))
    return d


def simulated_rows(keys: list, profile_fields: dict) -> list[dict]:
    """The rows ``keys`` of data/mlenergy-v3's configurations.csv with their median ITL and
    output tokens/s replaced by the simulator's own (iteration engine) under
    ``profile_fields``: the measured side of a round-trip fit whose answer is known."""
    from fleetsim.calibrate import mlenergy as M

    by_key = {c.key: c for c in M.read_configs()}
    src = Path(__file__).resolve().parent.parent / "data" / "mlenergy-v3"
    with open(src / "configurations.csv", newline="") as f:
        all_rows = list(csv.DictReader(f))
    rows = []
    for key in keys:
        c = by_key[key]
        run = M.simulate_config(c, engine="iteration", profile_fields=profile_fields)
        assert not run.error, run.error
        s = M.step_split(c, run)
        (r,) = (
            dict(x)
            for x in all_rows
            if (x["source_file"], int(x["config_index"])) == (c.source_file, c.config_index)
        )
        assert r["model_id"] == c.model_id and int(r["max_num_seqs"]) == c.max_num_seqs
        r["itl_median_ms"] = repr(1e3 * s.sim_median_s)
        r["output_tokens_per_s"] = repr(c.avg_batch_size / s.sim_mean_s)
        rows.append(r)
    return rows


def crossover_row(f: float, g: float, design: str, P: int | None, usd: float) -> dict:
    """One row of a crossover table (``crossover.parquet``): the short workload's cell at TTFT
    factor ``f`` and TPOT factor ``g``, ``design`` with ``P`` prefill replicas, its dollars per
    SLO-meeting request ``usd``; the rest fixed."""
    return dict(
        workload="short",
        design=design,
        prefill_replicas=P,
        decode_replicas=None if P is None else 1,
        replicas=2,
        rate_per_s=3.0,
        ttft_factor=f,
        tpot_factor=g,
        usd_per_good_request=usd,
        ttft_p99_s=0.5,
        tpot_p99_s=0.03,
        total_cost_usd=10.0,
        energy_facility_kwh=5.0,
    )


def one_llama_replica(traffic: dict, block: int = 16) -> dict:
    """One llama-3.1-8b replica on an H100, no prefix caching, static, 1 hour, seed 7: the
    scenario of the KV-in-flight checks (tests/test_kv_in_flight.py, test_kv_time_average.py),
    with ``traffic`` and a block of ``block`` tokens."""
    return {
        "seed": 7,
        "simulation": {"hours": 1},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {
            "replicas": 1,
            "tensor_parallel": 1,
            "block_size_tokens": block,
            "enable_prefix_caching": False,
        },
        "traffic": traffic,
        "autoscaler": {"policy": "static"},
    }


#: the flat light traffic of the KV-in-flight checks (requests_per_day set by each)
KV_LIGHT_SIZES = {
    "diurnal": "flat",
    "prompt": {"dist": "uniform", "low": 200, "high": 600},
    "output": {"dist": "geometric", "mean": 400, "max": 4000},
}


def linear_profile(path: Path, weight_bytes: float, kv_bytes: float) -> Path:
    """A linear step profile (tests/test_theory.py ``write_profile``: 10 ms a step, 2 ms + 1 us
    a prompt token, 10 us a sequence, 1 ns a context token) whose memory at 0.9 utilisation
    holds ``weight_bytes`` and ``kv_bytes`` of KV: the KV engine tests' replica."""
    from test_theory import write_profile

    return write_profile(
        path,
        base_s=0.01,
        prefill_base_s=0.002,
        per_prefill_token_s=1e-6,
        per_seq_s=1e-5,
        per_context_token_s=1e-9,
        mem_bytes=(weight_bytes + kv_bytes) / 0.9,
    )
