"""Macro-stepping against the per-iteration reference: the same requests, the same times."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from conftest import ListSink, merge, rel, resolved

from fleetsim.apps.simulate import simulate

# llama-3.1-8b on one H100: about 20 ms per decode step; 2 hours keep an hour boundary inside.
CASES = {
    "light": {"traffic": {"requests_per_day": 8_000}},
    "heavy": {"traffic": {"requests_per_day": 30_000}, "fleet": {"max_batch_size": 4}},
    "kv_pressure": {
        "traffic": {"requests_per_day": 30_000},
        "fleet": {"gpu_memory_utilization": 0.25},
    },
    "random": {"traffic": {"requests_per_day": 40_000}, "fleet": {"router": "random"}},
    "least_loaded": {"traffic": {"requests_per_day": 40_000}, "fleet": {"router": "least_loaded"}},
    "central_queue": {
        "traffic": {"requests_per_day": 40_000},
        "fleet": {"router": "central_queue", "max_batch_size": 4},
    },
    "moe_tp2": {
        "model": {"name": "mixtral-8x7b"},
        "traffic": {"requests_per_day": 40_000},
        "fleet": {"tensor_parallel": 2},
    },
    "token_budget": {
        "traffic": {"requests_per_day": 30_000},
        "fleet": {"max_batched_tokens": 4000},
    },
    # power states: replicas wake (cold start), drain and power off while requests flow
    "reactive": {
        "traffic": {"requests_per_day": 40_000, "diurnal": "azure-code"},
        "fleet": {"replicas": 3, "router": "random"},
        "power": {"wake_s": 20.0},
        "autoscaler": {
            "policy": "reactive",
            "min_replicas": 0,
            "initial_replicas": 1,
            "target_requests_per_replica": 3,
            "interval_s": 15,
            "idle_timeout_s": 120,
        },
    },
    # disaggregated prefill/decode (serving/disagg.py): KV arrivals cut decode runs like arrivals
    "disagg": {
        "traffic": {"requests_per_day": 60_000},
        "disaggregation": {"prefill": {"replicas": 1}, "decode": {"replicas": 2}},
    },
    "disagg_backpressure": {  # slow link (FIFO queueing) and a decode pool short of KV
        "traffic": {"requests_per_day": 120_000},
        "disaggregation": {
            "link_bandwidth_bytes_per_s": 4e9,
            "link_latency_s": 2e-3,
            "prefill": {"replicas": 2, "router": "random"},
            "decode": {
                "replicas": 2,
                "router": "round_robin",
                "gpu_memory_utilization": 0.215,
                "max_batch_size": 8,
            },
        },
    },
    "disagg_central_prefill_moe": {
        "model": {"name": "mixtral-8x7b"},
        "traffic": {"requests_per_day": 60_000},
        "fleet": {"tensor_parallel": 2},
        "disaggregation": {
            "link": "nvlink-4",
            "prefill": {"replicas": 2, "router": "central_queue", "max_batch_size": 2},
            "decode": {"replicas": 1, "gpu": "h200", "tensor_parallel": 1},
        },
    },
    "disagg_pool_schedules": {  # each pool's own schedule: drains and wakes during the run
        "traffic": {"requests_per_day": 80_000},
        "power": {"wake_s": 20.0},
        "disaggregation": {
            "prefill": {
                "replicas": 2,
                "router": "central_queue",
                "autoscaler": "schedule",
                "replicas_by_hour": [2, 1] * 12,
            },
            "decode": {
                "replicas": 3,
                "router": "random",
                "autoscaler": "schedule",
                "replicas_by_hour": [1, 3] * 12,
            },
        },
    },
    "schedule_central": {
        "traffic": {"requests_per_day": 40_000},
        "fleet": {"replicas": 3, "router": "central_queue"},
        "power": {"wake_s": 30.0},
        "autoscaler": {"policy": "schedule", "replicas_by_hour": [3, 1] * 12},
    },
}
# Every case above runs the default engine (paged KV, chunked prefill, prefix caching on but no
# block ids). The first engine, and each mechanism alone and combined:
RESERVE = {"kv_allocation": "reserve"}
for _name in ("light", "heavy", "kv_pressure", "central_queue", "token_budget", "reactive"):
    _c = CASES[_name]
    CASES[f"{_name}_reserve"] = dict(_c, fleet={**_c.get("fleet", {}), **RESERVE})
# llama-3.1-8b: 128 KiB of KV per token; 0.215 x 80 GB - weights - activations (2048-token
# budget) leaves 411 blocks of 16 (6.6k tokens) for requests of up to 5k tokens: preemptions
# (the device memory pinned at 80e9 bytes, so that the fractions below keep their meaning)
HW_80GB = {"hardware": {"gpu": "h100-sxm", "mem_bytes": 80e9}}
PREEMPT = {"gpu_memory_utilization": 0.215, "max_batch_size": 64, "max_batched_tokens": 2048}
CASES.update(
    {
        "paged_no_chunk": {
            **HW_80GB,
            "traffic": {"requests_per_day": 200_000},
            "fleet": {
                **PREEMPT,
                "gpu_memory_utilization": 0.217,  # (the larger budget's activation reserve)
                # without chunking a preempted request is prefilled again whole, with what it
                # had generated: up to the longest prompt + output - 1 = 4,999 tokens (a
                # smaller budget is refused, as vLLM refuses it: config/resolve.py)
                "max_batched_tokens": 5000,
                "enable_chunked_prefill": False,
            },
        },
        # (the loads below doubled when admission began to require the whole sequence's
        # blocks, vLLM's full-ISL gate: at the old loads most preemptions had been long prompts
        # admitted on their first chunk)
        "paged_preempt": {**HW_80GB, "traffic": {"requests_per_day": 300_000}, "fleet": PREEMPT},
        "paged_preempt_central": {
            **HW_80GB,
            "traffic": {"requests_per_day": 520_000},
            "fleet": {**PREEMPT, "router": "central_queue", "replicas": 3},
        },
        "chunk_small_budget": {
            **HW_80GB,
            "traffic": {"requests_per_day": 40_000},
            "fleet": {"max_batched_tokens": 300},
        },
        "chunk_budget_preempt": {
            **HW_80GB,
            "traffic": {"requests_per_day": 300_000},
            "fleet": {
                **PREEMPT,
                "gpu_memory_utilization": 0.2115,
                "max_batched_tokens": 700,
                "block_size_tokens": 32,
            },
        },
        "paged_watermark_block1": {
            **HW_80GB,
            "traffic": {"requests_per_day": 300_000},
            "fleet": {**PREEMPT, "kv_watermark_fraction": 0.02, "block_size_tokens": 1},
        },
    }
)
# disaggregated pools on the paged KV policy (serving/roles.py PagedPrefillReplica and
# PagedDecodeReplica):
# the prefill pool prefills in chunks of a small budget; the decode pool is short of blocks, so
# it preempts and recomputes there. And the earlier disaggregated cases on the first engine.
CASES["disagg_paged_chunk_preempt"] = {
    **HW_80GB,
    "traffic": {"requests_per_day": 400_000},
    "disaggregation": {
        "prefill": {"replicas": 1, "max_batched_tokens": 512},
        "decode": {
            "replicas": 2,
            "gpu_memory_utilization": 0.215,
            "max_batched_tokens": 2048,
            "max_batch_size": 64,
        },
    },
}
# each pool's own reactive autoscaler: wakes (cold starts) and drains while KV flows
CASES["disagg_pool_reactive"] = {
    "traffic": {"requests_per_day": 60_000, "diurnal": "azure-code"},
    "power": {"wake_s": 20.0},
    "autoscaler": {"interval_s": 15, "idle_timeout_s": 120},
    "disaggregation": {
        "prefill": {"replicas": 3, "autoscaler": "reactive", "target_requests_per_replica": 1},
        "decode": {
            "replicas": 3,
            "router": "random",
            "autoscaler": "reactive",
            "target_requests_per_replica": 6,
            "initial_replicas": 1,
        },
    },
}
for _name in ("disagg", "disagg_backpressure", "disagg_pool_schedules"):
    _c = CASES[_name]
    CASES[f"{_name}_reserve"] = copy.deepcopy(dict(_c, fleet={**_c.get("fleet", {}), **RESERVE}))
# paged: the decode pool's budget after its activation reserve (2048-token budget): ~6.7k tokens
CASES["disagg_backpressure"]["disaggregation"]["decode"].update(
    gpu_memory_utilization=0.2, max_batched_tokens=2048
)
# cases that must show the mechanism they test
EXPECT_PREEMPTIONS = (
    "disagg_paged_chunk_preempt",
    "paged_no_chunk",
    "paged_preempt",
    "paged_preempt_central",
    "chunk_budget_preempt",
    "paged_watermark_block1",
)


def _run(d: dict, engine: str):
    sink = ListSink()
    res = simulate(resolved(merge(d, simulation={"hours": 2, "engine": engine})), request_sink=sink)
    return res, sink


def assert_modes_equal(
    d: dict, *, preemptions: bool = False, hits: float = 0.0, fewer_events: bool = True
):
    """Run ``d`` macro-stepped and per iteration; every request's replica, status, first-token
    and finish time, and the hourly work, energy and counts must agree (rel. 1e-9). With
    ``preemptions`` the run must preempt; with ``hits`` > 0 at least that fraction of its prompt
    tokens must come from the prefix cache."""
    macro, ms = _run(d, "macro")
    ref, rs_ = _run(d, "iteration")
    assert macro.totals.requests_arrived > 200
    if preemptions:
        assert macro.totals.preemptions > 10, macro.totals.preemptions
        assert macro.totals.recomputed_tokens > 0
    if hits:
        assert macro.totals.prefix_hit_tokens > hits * macro.totals.prompt_tokens
    assert ms.rows.keys() == rs_.rows.keys()
    worst = 0.0
    for rid, a in ms.rows.items():
        b = rs_.rows[rid]
        assert a[1] == b[1] and a[6] == b[6], (rid, a, b)  # replica and status
        for i in (4, 5):  # first token, finish
            if math.isnan(a[i]) and math.isnan(b[i]):
                continue
            worst = max(worst, rel(a[i], b[i]))
    assert worst < 1e-9, worst
    for col in (
        "energy_gpu_kwh",
        "gpu_busy_s",
        "output_tokens",
        "prompt_tokens",
        "requests_completed",
        "prefix_hit_tokens",
        "preemptions",
        "recomputed_tokens",
    ):
        x = macro.hourly.column(col).to_numpy()
        y = ref.hourly.column(col).to_numpy()
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=0)
    assert macro.totals.iterations == ref.totals.iterations
    if fewer_events:  # the point of macro-stepping: far fewer events than iterations
        assert macro.totals.events < ref.totals.events / 3
    return macro


@pytest.mark.parametrize("case", list(CASES))
def test_macro_equals_per_iteration(small, case):
    assert_modes_equal(merge(small, **CASES[case]), preemptions=case in EXPECT_PREEMPTIONS)
