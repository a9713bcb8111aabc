"""Disaggregated prefill/decode fleets: conservation across pools, the KV link, backpressure,
per-pool accounting and validation (serving/disagg.py, config/pools.py)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, ListSink, crossover_row, merge, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.base.errors import ScenarioError
from fleetsim.results.accounting import pools_table
from fleetsim.serving.disagg import DisaggPod


def disagg(base: dict | None = None, **pools) -> dict:
    d = {"link": "infiniband-ndr", "prefill": {"replicas": 1}, "decode": {"replicas": 1}}
    for k, v in pools.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return merge(base or SMALL, disaggregation=d)


class Tap(DisaggPod):
    """A DisaggPod that keeps every request whose KV arrived, and the conservation terms at
    every hand-off and arrival (not only at the end)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.arrived_kv: list = []
        self.balance_checks = 0

    def _balance(self) -> None:
        a = sum(self.rec.arrived)
        done = sum(self.rec.completed) + sum(self.rec.rejected)
        assert a == done + self.in_prefill + self.in_transfer + self.in_decode
        self.balance_checks += 1

    def handoff(self, r, t, rep) -> None:
        super().handoff(r, t, rep)
        self._balance()

    def _kv_arrived(self, ev) -> None:
        self.arrived_kv.append(ev.value)
        super()._kv_arrived(ev)
        self._balance()


def run_pod(d: dict, hours: int = 1) -> Tap:
    rs = resolved(merge(d, simulation={"hours": hours}))
    pod = Tap(rs, 0, 1)  # its replicas call the Tap's hooks (bound at construction)
    pod.run()
    return pod


CASES = {
    "light": disagg(),
    "two_by_two": disagg(prefill={"replicas": 2}, decode={"replicas": 2, "router": "random"}),
    # a slow link: transfers queue (FIFO) behind each other
    "slow_link": disagg(link_bandwidth_bytes_per_s=2e9, link_latency_s=1e-3),
    # a decode pool with little KV room: KV waits in the prefill replicas (backpressure)
    "decode_full": disagg(decode={"gpu_memory_utilization": 0.22}),
    # paged: the prefill pool chunks (512-token budget), the decode pool preempts and recomputes
    "chunk_and_decode_preempt": disagg(
        prefill={"max_batched_tokens": 512},
        decode={
            "replicas": 2,
            "gpu_memory_utilization": 0.2,
            "max_batched_tokens": 2048,
            "max_batch_size": 64,
        },
    ),
    "central_prefill": disagg(
        prefill={"replicas": 2, "router": "central_queue", "max_batch_size": 2},
        decode={"replicas": 2, "router": "round_robin"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conservation_across_pools(case):
    """arrived = completed + rejected + in prefill + in transfer + in decode, at every hand-off,
    every KV arrival and at the end; and the run's own invariant check agrees."""
    pod = run_pod(CASES[case])
    pod._balance()
    assert pod.balance_checks > 1000
    a = sum(pod.rec.arrived)
    assert a > 5000
    res = simulate(resolved(merge(CASES[case], simulation={"hours": 1})))
    t = res.totals
    assert t.requests_arrived == a
    assert t.requests_completed + t.requests_rejected + t.requests_in_flight == t.requests_arrived
    st = res.pods[0].pools
    assert t.requests_in_flight == st["in_prefill"] + st["in_transfer"] + st["in_decode"]


def test_transfer_time_on_idle_link_is_latency_plus_bytes_over_bandwidth():
    """Exactly (==) when the link was idle; otherwise the FIFO wait is added and transfers
    leave the link in hand-off order."""
    d = CASES["slow_link"]
    pod = run_pod(d)
    pools = pod.pools
    lat, bw, kvb = pools.link.latency_s, pools.egress_bytes_per_s, pools.kv_bytes_per_token
    idle = [r for r in pod.arrived_kv if r.link_wait_s == 0.0]
    queued = [r for r in pod.arrived_kv if r.link_wait_s > 0.0]
    assert len(idle) > 500 and len(queued) > 500  # both kinds occur at this load
    for r in idle:
        assert r.xfer_s == lat + r.prompt * kvb / bw
        assert r.xfer_s == lat + pools.transfer_bytes(r.prompt) / bw
    for r in queued:
        assert math.isclose(r.xfer_s, r.link_wait_s + lat + r.prompt * kvb / bw, rel_tol=1e-12)
    # FIFO: a later hand-off never arrives before an earlier one on the same link
    ends = [r.first_token_s + r.xfer_s for r in pod.arrived_kv]
    assert all(b >= a for a, b in itertools.pairwise(ends))


@pytest.mark.parametrize("engine", ["paged", "reserve"])
def test_backpressure_holds_kv_in_the_prefill_pool(engine):
    """With a decode pool that cannot keep up, requests wait for decode blocks, their KV stays
    in the prefill replica, and the prefill replica stops admitting: prompts queue there."""
    heavy = merge(
        SMALL,
        traffic={**SMALL["traffic"], "requests_per_day": 600_000},
        # eager step times: the load below is sized so that this decode pool cannot keep up
        fleet={**SMALL["fleet"], "kv_allocation": engine, "serving_stack": "eager"},
    )
    # paged: the decode pool's KV budget after the activation reserve is ~8k tokens
    util = 0.24 if engine == "paged" else 0.215
    d = disagg(heavy, decode={"gpu_memory_utilization": util, "max_batch_size": 8})
    pod = run_pod(d)
    pre = pod.prefill.replicas[0]
    dec = pod.decode.replicas[0]
    assert len(dec.waiting) > 0  # KV arrived, waiting for decode room
    assert pod.in_prefill > 100  # prompts backed up in the prefill pool
    waiting_kv = list(dec.waiting) + list(pod._moving.values())
    if engine == "reserve":
        assert pre.kv_used <= pre.kv_cap and dec.kv_used <= dec.kv_cap
        # the prefill replica's KV is mostly held for requests the decode pool has not admitted
        assert pre.kv_used > 0.5 * pre.kv_cap
        held = sum(r.pf_need for r in waiting_kv)
        assert held == pre.kv_used  # exactly the KV of requests not yet admitted by decode
    else:
        b = pre.b
        assert pre.free >= 0 and dec.free >= 0
        # the blocks in use are those of handed-off requests not yet admitted by decode, plus
        # the chunks of the prompts being prefilled; the handed-off ones hold most of them
        held = sum(-(-r.kv_tokens // b) for r in waiting_kv)
        own = sum(-(-r.done // b) for r in pre.pre)
        # and the prompts whose last chunk ran in the iteration the day's end cut: finished, in
        # the run's heap, not yet handed off (one such prompt of 936 tokens at the end of this
        # day since the catalog's H100 holds CUDA's 79.19 GiB)
        due = sum(-(-r.done // b) for _, _, r in pre.heap)
        assert held + own + due == pre.NB - pre.free
        assert held > 0.5 * pre.NB
    # the same load with a decode pool that keeps up leaves nothing behind
    free = run_pod(disagg(heavy, decode={"replicas": 2}))
    assert free.in_prefill < 20
    p0 = free.prefill.replicas[0]
    if engine == "reserve":
        assert p0.kv_used < 0.1 * pre.kv_cap
    else:
        assert p0.NB - p0.free < 0.1 * p0.NB


def test_pools_add_up_to_the_fleet_and_are_priced_per_gpu():
    """hourly.parquet is the sum of pools.parquet; a decode pool on A100s is priced as A100s."""
    d = disagg(prefill={"replicas": 2}, decode={"replicas": 3, "gpu": "a100-80gb"})
    res = simulate(resolved(merge(d, simulation={"hours": 2})))
    pt = pools_table(res.resolved, res.pods, res.scale)
    assert pt is not None and pt.num_rows == 4
    df = pt.to_pandas()
    hr = res.hourly.to_pandas()
    for col in (
        "gpus_powered_mean",
        "gpu_busy_s",
        "energy_gpu_kwh",
        "energy_overhead_kwh",
        "energy_it_kwh",
        "energy_facility_kwh",
        "energy_cost_usd",
        "hardware_cost_usd",
        "total_cost_usd",
        "prompt_tokens",
        "output_tokens",
    ):
        s = df.groupby("hour")[col].sum().to_numpy()
        np.testing.assert_allclose(s, hr[col].to_numpy(), rtol=1e-12, err_msg=col)
    dec = df[df.pool == "decode"].iloc[0]
    pre = df[df.pool == "prefill"].iloc[0]
    assert dec.gpu == "a100-80gb" and pre.gpu == "h100-sxm"
    assert dec.gpus_powered_mean == 3.0 and pre.gpus_powered_mean == 2.0
    # owned hardware: capex / (years x 8760 h) per GPU-hour, from each pool's catalog entry
    per_h = {"a100-80gb": 20000 / (5 * 8760), "h100-sxm": 39000 / (5 * 8760)}
    assert math.isclose(dec.hardware_cost_usd, 3 * per_h["a100-80gb"], rel_tol=1e-12)
    assert math.isclose(pre.hardware_cost_usd, 2 * per_h["h100-sxm"], rel_tol=1e-12)
    # prompts are computed only in the prefill pool; first tokens there, the rest in decode
    assert dec.prompt_tokens == 0 and pre.prompt_tokens > 0
    assert pre.kv_transfers > 0 and dec.kv_transfers == 0
    assert pre.kv_transfer_p99_s >= pre.kv_transfer_mean_s > 0


def test_transfer_bytes_are_prompt_tokens_times_kv_bytes():
    pod = run_pod(disagg())
    kvb = pod.pools.kv_bytes_per_token
    assert kvb == 131072  # llama-3.1-8b bf16: 2 x 32 layers x 8 KV heads x 128 x 2 bytes
    assert sum(pod.xfer_bytes) == pytest.approx(sum(r.prompt for r in pod.arrived_kv) * kvb)
    assert sum(pod.xfer_count) == len(pod.arrived_kv)


def test_single_token_requests_complete_in_the_prefill_pool():
    d = merge(
        disagg(),
        traffic={**SMALL["traffic"], "output": {"dist": "fixed", "value": 1}},
    )
    pod = run_pod(d)
    assert not pod.arrived_kv and sum(pod.xfer_count) == 0
    assert sum(pod.rec.completed) > 5000
    rep = pod.prefill.replicas[0]
    # completed in the prefill pool: their blocks were freed at once (only the prompts still
    # being prefilled hold any)
    assert rep.NB - rep.free == sum(-(-r.done // rep.b) for r in rep.pre)
    assert rep.outstanding == len(rep.pre) + len(rep.waiting)


# ---------------------------------------------------------------------------------------------
# validation: one line naming the pool's own field
def _err(d: dict) -> ScenarioError:
    with pytest.raises(ScenarioError) as ei:
        resolved(d)
    return ei.value


def test_weights_checked_per_pool():
    base = merge(SMALL, model={"name": "llama-3.1-70b"}, fleet={"tensor_parallel": 4})
    e = _err(disagg(base, decode={"tensor_parallel": 1}))
    assert e.field == "disaggregation.decode.tensor_parallel"
    assert "disaggregation.decode.tensor_parallel" in e.fix
    e = _err(disagg(base, prefill={"gpu": "a100-80gb", "tensor_parallel": 1}))
    assert e.field == "disaggregation.prefill.tensor_parallel"


def _util_for(rs, tokens: float) -> float:
    """The gpu_memory_utilization that leaves ``tokens`` of KV after the weights and the
    activation reserve (both pools of these scenarios have the same limits, so the same
    reserve) on one GPU."""
    return (
        rs.model.weight_bytes + rs.kv.activation_bytes + tokens * rs.model.kv_bytes_per_token
    ) / rs.profile.mem_bytes


def test_kv_budget_checked_per_pool():
    """A KV budget of 3,000 tokens cannot hold a 4,000-token prompt, in either pool; the error
    names the traffic field that sets the size and the pool."""
    base = merge(SMALL, traffic={**SMALL["traffic"], "prompt": {"dist": "fixed", "value": 4000}})
    rs = resolved(disagg(base))
    u = _util_for(rs, 3008.5)  # 188 blocks of 16
    for pool in ("prefill", "decode"):
        e = _err(disagg(base, **{pool: {"gpu_memory_utilization": u}}))
        assert e.field.startswith("traffic.") and e.problem.endswith(f"in the {pool} pool")
        assert "3008 tokens" in e.problem
        assert f"disaggregation.{pool}.gpu_memory_utilization" in e.fix


def test_prefill_pool_needs_room_for_the_prompt_only():
    """Prompts up to 4,000 tokens and outputs up to 1,000: a KV budget of 4,500 tokens is
    enough for the prefill pool (prompt + first token), not for the decode pool."""
    u = _util_for(resolved(disagg()), 4500.5)
    ok = resolved(disagg(prefill={"gpu_memory_utilization": u}))
    assert 4001 <= ok.pools.prefill.kv_capacity_tokens < 5000
    e = _err(disagg(decode={"gpu_memory_utilization": u}))
    assert "5000 tokens" in e.problem and "decode pool" in e.problem


def test_bad_link_and_routers():
    e = _err(disagg(link="infiniband-xdr"))
    assert e.field == "disaggregation.link" and "infiniband-ndr" in e.fix
    e = _err(disagg(decode={"router": "central_queue"}))
    assert e.field == "disaggregation.decode.router"
    e = _err(disagg(decode={"router": "prefix_affinity"}))
    assert e.field == "disaggregation.decode.router" and "prefix cache" in e.problem
    assert resolved(disagg(prefill={"router": "prefix_affinity"})).pools.prefill.router == (
        "prefix_affinity"
    )
    ses = merge(disagg(), traffic={**SMALL["traffic"], "sessions": {}})
    e = _err(ses)
    assert e.field == "traffic.sessions" and "disaggregated" in e.problem
    e = _err(merge(disagg(), autoscaler={"policy": "reactive"}))
    assert e.field == "autoscaler.policy"
    e = _err(disagg(decode={"gpu": "h100-pcie-typo"}))
    assert e.field == "disaggregation.decode.gpu"


def test_run_writes_pools_and_the_report_shows_them(tmp_path):
    """`fleetsim run --report` on a disaggregated scenario: pools.parquet has one row per
    (hour, pool) and the report lists both pools and the KV traffic."""
    import pyarrow.parquet as pq
    from test_plan_disagg import _toml

    from fleetsim.apps.cli import main as cli_main

    sc = tmp_path / "d.toml"
    sc.write_text(_toml(merge(CASES["two_by_two"], simulation={"hours": 1})))
    out = tmp_path / "out"
    assert cli_main(["run", str(sc), "--out", str(out), "--report", "--quiet"]) == 0
    pt = pq.read_table(out / "pools.parquet")
    assert pt.num_rows == 2 and pt.column("pool").to_pylist() == ["prefill", "decode"]
    md = (out / "report.md").read_text()
    assert "| prefill pool | 2 x TP1 h100-sxm" in md and "| decode pool | 2 x TP1" in md
    assert "| KV transfers |" in md


@pytest.mark.parametrize("engine", ["scenario", "reserve"])
def test_crossover_points_share_gpus_and_traffic(engine):
    """Every point of the crossover sweep has the same replicas, GPUs, arrival stream and
    engine (paged with chunked prefill, or the first engine, in both designs)."""
    from fleetsim.apps.crossover import point, workloads
    from fleetsim.serving.pod import paged_limits

    data = resolved(CASES["two_by_two"]).scenario.model_dump(mode="json", exclude_none=True)
    for wl in workloads(data).values():
        pts = [point(data, wl, "aggregated", 4, 0, 3.0, 2, engine)] + [
            point(data, wl, "disaggregated", 4, P, 3.0, 2, engine) for P in (1, 2, 3)
        ]
        rss = [resolved(p) for p in pts]
        for rs in rss[:1] + [r.pools.prefill.rs for r in rss[1:]]:
            kv = paged_limits(rs)
            assert (kv is None) == (engine == "reserve")
            assert kv is None or (kv.chunked and kv.prefix)
        assert rss[0].pools is None and all(r.pools is not None for r in rss[1:])
        gpus = [r.scenario.fleet.replicas * r.tp for r in rss[:1]] + [
            r.pools.prefill.replicas * r.pools.prefill.tp
            + r.pools.decode.replicas * r.pools.decode.tp
            for r in rss[1:]
        ]
        assert gpus == [4, 4, 4, 4]
        assert len({r.hourly_rate_per_s for r in rss}) == 1
        assert len({(r.scenario.traffic.prompt, r.scenario.traffic.output) for r in rss}) == 1


def test_pool_schedules_power_each_pool_on_its_own():
    """Each pool's own `schedule` autoscaler: hour 0 powers replicas_by_hour[0] of it, a smaller
    count later drains the others (powered until empty), and pools.parquet prices each pool's
    power states; conservation still holds."""
    d = disagg(
        prefill={
            "replicas": 3,
            "autoscaler": "schedule",
            "replicas_by_hour": [3, 1] * 12,
        },
        decode={"replicas": 2, "autoscaler": "schedule", "replicas_by_hour": [1, 2] * 12},
    )
    d = merge(d, power={"wake_s": 0.0}, simulation={"hours": 2})
    res = simulate(resolved(d))
    df = pools_table(res.resolved, res.pods, res.scale).to_pandas().set_index(["hour", "pool"])
    assert df.loc[(0, "prefill"), "gpus_powered_mean"] == 3.0
    assert df.loc[(0, "decode"), "gpus_powered_mean"] == 1.0
    assert 1.0 <= df.loc[(1, "prefill"), "gpus_powered_mean"] < 1.1  # two drain, then off
    assert df.loc[(1, "decode"), "gpus_powered_mean"] == 2.0  # woken at once (wake_s = 0)
    # owned GPUs: hardware cost every hour for all of the pool's GPUs, on or off
    assert df.loc[(1, "prefill"), "hardware_cost_usd"] == pytest.approx(3 * 39000 / (5 * 8760))
    t = res.totals
    assert t.requests_completed + t.requests_rejected + t.requests_in_flight == (t.requests_arrived)
    e = _err(disagg(decode={"autoscaler": "schedule"}))
    assert e.field == "disaggregation.decode.replicas_by_hour"
    e = _err(disagg(decode={"replicas": 2, "autoscaler": "schedule", "replicas_by_hour": [3] * 24}))
    assert e.field == "disaggregation.decode.replicas_by_hour"


# ---------------------------------------------------------------------------------------------
# the paged engine in both pools (serving/roles.py PagedPrefillReplica, PagedDecodeReplica)
MOONCAKE = Path(__file__).resolve().parent.parent / "scenarios/data/mooncake-2025"


def _mooncake_head(tmp_path: Path, n: int) -> str:
    f = tmp_path / "head.jsonl"
    with (MOONCAKE / "conversation_trace.jsonl").open() as src:
        f.write_text("".join(next(src) for _ in range(n)))
    return str(f)


@pytest.mark.parametrize("router", ["least_loaded", "prefix_affinity"])
def test_prefill_pool_prefix_cache_macro_equals_per_iteration(tmp_path, router):
    """Mooncake requests (block hash ids): the prefill pool chunks and serves prefixes from its
    cache (a small one: hits and evictions), the decode pool is short of blocks and preempts;
    macro-stepped and per iteration agree, and every prompt token is either computed or a hit
    in the prefill pool."""
    from test_engine_modes import assert_modes_equal

    d = {
        "seed": 5,
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm", "peak_flops": 4e15, "mem_bw_bytes_per_s": 1.2e13},
        "fleet": {"max_batch_size": 64, "max_batched_tokens": 4096},
        "traffic": {"trace": _mooncake_head(tmp_path, 1000)},
        "disaggregation": {
            "link": "nvlink-4",
            "prefill": {"replicas": 2, "router": router, "gpu_memory_utilization": 0.45},
            # one decode replica (two before vLLM's full-ISL admission gate, which made two
            # replicas' decode pool preempt only ~3 times)
            "decode": {"replicas": 1, "gpu_memory_utilization": 0.42},
        },
    }
    macro = assert_modes_equal(d, hits=0.02, preemptions=True, fewer_events=False)
    T = macro.totals
    assert T.requests_completed > 300
    pt = pools_table(macro.resolved, macro.pods, macro.scale).to_pandas()
    dec = pt[pt.pool == "decode"]
    pre = pt[pt.pool == "prefill"]
    assert dec.prompt_tokens.sum() == 0  # prompts (and their cache hits) are prefill's only
    assert dec.prefix_hit_tokens.sum() == 0 and pre.prefix_hit_tokens.sum() > 0
    hr = macro.hourly.to_pandas()
    for col in ("prefix_hit_tokens", "preemptions"):
        assert (pt.groupby("hour")[col].sum().to_numpy() == hr[col].to_numpy()).all(), col
    assert dec.preemptions.sum() > 0
    assert ((pt.kv_utilization >= 0) & (pt.kv_utilization <= 1)).all()
    assert (pt[pt.hour == 0].kv_utilization > 0).all()


def test_decode_replica_joins_with_no_prefill_at_context_prompt_plus_one():
    """One request at a time (fixed 1,000-token prompt, 5 output tokens): TTFT is one prefill
    iteration of the prompt in the prefill pool; the decode replica admits the KV when it
    arrives and makes tokens 2..5 in four decode steps at contexts 1,001..1,004 (no prefill
    compute there), so finish = KV arrival + those four step times."""
    p, o = 1000, 5
    d = merge(
        disagg(),
        simulation={"hours": 1},
        traffic={
            **SMALL["traffic"],
            "requests_per_day": 500,
            "prompt": {"dist": "fixed", "value": p},
            "output": {"dist": "fixed", "value": o},
        },
    )
    sink = ListSink()
    pod = Tap(resolved(d), 0, 1, request_sink=sink)
    pod.run()
    lat_p = pod.prefill.lat
    lat_d = pod.decode.lat
    d_pre = lat_p.iteration(p, float(p) ** 2, 1, 0, 0.0)[0]
    n = 0
    for r in pod.arrived_kv:
        row = sink.rows[r.rid]
        assert row[4] - r.arrival_s == pytest.approx(d_pre, rel=1e-12)
        t = r.first_token_s + r.xfer_s
        for i in range(1, o):
            t += lat_d.iteration(0, 0.0, 0, 1, float(p + i))[0]
        assert row[5] == pytest.approx(t, rel=1e-12)
        n += 1
    assert n > 15
    dec = pod.decode.replicas[0]
    # each request held prompt // b + 1 blocks at its first decode step; all freed at the end
    assert dec.free == dec.NB and pod.prefill.replicas[0].free == pod.prefill.replicas[0].NB


def test_report_draws_the_crossover(tmp_path):
    """`fleetsim report` on a `fleetsim crossover` folder: the heat map drawn from
    crossover.parquet and one line per workload with the cells the split wins."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fleetsim.apps.crossover import FACTORS
    from fleetsim.apps.report import main as report_main

    rows: dict[str, list] = {}

    def add(**kw) -> None:
        for k, v in kw.items():
            rows.setdefault(k, []).append(v)

    for f in FACTORS:
        for g in FACTORS:
            # the split costs 0.5 x per good request where TPOT is tight (g <= 2), 1.25 x else
            for design, P, usd in (("aggregated", None, 1.0), ("disaggregated", 1, 0.5)):
                if design == "disaggregated" and g > 2:
                    usd = 1.25
                add(**crossover_row(f, g, design, P, usd))
    out = tmp_path / "xo"
    out.mkdir()
    pq.write_table(pa.table(rows), out / "crossover.parquet")
    assert report_main([str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "in 14 of 49 target cells (ratio 0.50-1.25)" in md
    assert "| short: split 1 + 1 | p99 TTFT 0.50 s, p99 TPOT 30.0 ms" in md
    assert (out / "crossover.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_crossover_report_counts_the_cells_the_terminal_counts():
    """A cell only the aggregated fleet meets (the split has no SLO-meeting request: inf) is a
    cell the split loses: the report's page counts it as the terminal's table does (it read
    '4 of 28' where the terminal read '4 of 49' for the 8B crossover of docs/disaggregation.md)."""
    import io

    import pyarrow as pa
    from rich.console import Console

    from fleetsim.apps.crossover import FACTORS, best_ratio, cell_counts, print_outcome
    from fleetsim.apps.report import crossover_lines

    rows: dict[str, list] = {}
    for f in FACTORS:
        for g in FACTORS:
            # the split meets nothing at the tightest TTFT (7 cells: A only), wins at TPOT <= 2 x
            # (0.5 x) and loses (1.25 x) elsewhere
            split = math.inf if f == FACTORS[0] else (0.5 if g <= 2 else 1.25)
            for design, P, usd in (("aggregated", None, 1.0), ("disaggregated", 1, split)):
                for k, v in crossover_row(f, g, design, P, usd).items():
                    rows.setdefault(k, []).append(v)
    t = pa.table(rows)
    assert cell_counts(best_ratio(t, "short")) == (12, 49, 7)  # 6 TTFT rows x 2 TPOT columns
    line = dict(crossover_lines(t))["short prompts"]
    assert "in 12 of 49 target cells (ratio 0.50-1.25; 7 met only by the aggregated fleet)" in line
    buf = io.StringIO()
    print_outcome(t, Console(file=buf, width=200))
    assert "12 of 49" in buf.getvalue()


def test_crossover_long_trace_is_the_mooncake_trace_at_the_measured_rate(tmp_path):
    """`--long-trace`: the Mooncake trace replayed at a given mean rate, its prompts over the
    cap dropped, its block ids kept, so that the prefill pool's prefix cache hits."""
    from fleetsim.apps.crossover import point, scaled_trace, workloads
    from fleetsim.workload.mooncake import read_mooncake

    head = _mooncake_head(tmp_path, 400)
    src = read_mooncake(head)
    path, n = scaled_trace(head, 2.0, 8000, tmp_path / "scaled.jsonl")
    tr = read_mooncake(path)
    keep = src.prompt_tokens <= 8000
    assert n == len(tr.arrival_s) == int(keep.sum()) < 400
    assert tr.arrival_s[0] == 0.0
    assert (n - 1) / tr.arrival_s[-1] == pytest.approx(2.0, rel=1e-4)  # ms rounding
    assert list(tr.prompt_tokens) == list(src.prompt_tokens[keep])
    assert list(tr.ids) == [src.ids[i] for i in np.nonzero(keep)[0]]
    data = resolved(CASES["two_by_two"]).scenario.model_dump(mode="json", exclude_none=True)
    wl = {**workloads(data)["long"], "trace": path}
    d = point(data, wl, "disaggregated", 4, 2, 2.0, 1)
    assert d["traffic"]["trace"] == path
    res = simulate(resolved(d))
    assert res.totals.requests_arrived == n
    assert res.totals.prefix_hit_tokens > 0


def test_pool_reactive_autoscalers_follow_each_pools_load():
    """Each pool's own `reactive` autoscaler: it powers between min_replicas and the pool's
    replicas, on the pool's own requests in flight (prefill: not yet at the first token;
    decode: KV arrived, not finished); conservation holds and pools.parquet prices the GPUs
    actually powered."""
    d = disagg(
        prefill={"replicas": 3, "autoscaler": "reactive", "target_requests_per_replica": 1},
        decode={
            "replicas": 4,
            "autoscaler": "reactive",
            "target_requests_per_replica": 8,
            "initial_replicas": 1,
        },
    )
    d = merge(
        d,
        power={"wake_s": 10.0},
        autoscaler={"interval_s": 15, "idle_timeout_s": 120},
        simulation={"hours": 2},
        traffic={**SMALL["traffic"], "requests_per_day": 120_000},
    )
    pod = run_pod(d, hours=2)
    pod._balance()
    for pool in (pod.prefill, pod.decode):
        sc = pool.scaler
        assert sc is not None and sc.lo == 1 and sc.hi == pool.spec.replicas
    res = simulate(resolved(d))
    df = pools_table(res.resolved, res.pods, res.scale).to_pandas()
    for name, n in (("prefill", 3), ("decode", 4)):
        g = df[df.pool == name].gpus_powered_mean
        assert ((g >= 1.0) & (g <= n)).all(), (name, g.tolist())
        assert (g < n).any(), name  # it scaled below the pool's size
    t = res.totals
    assert t.requests_completed + t.requests_rejected + t.requests_in_flight == t.requests_arrived
    e = _err(disagg(decode={"autoscaler": "reactive", "min_replicas": 0}))
    assert e.field == "disaggregation.decode.min_replicas"
    e = _err(disagg(decode={"replicas": 2, "autoscaler": "reactive", "initial_replicas": 3}))
    assert e.field == "disaggregation.decode.initial_replicas"


def _generic_taken(self, j: int, n1: int) -> int:
    """PagedKV._taken as it was: blocks_in through the prefix sums (``_blocks``)."""
    return self._blocks(self.it + 1, j, n1 if self.win is None else self._wsum())


def _run_record(d: dict) -> tuple:
    sink = ListSink()
    pod = Tap(resolved(merge(d, simulation={"hours": 1})), 0, 1, request_sink=sink)
    pod.run()
    rec = pod.rec
    per_hour = [
        getattr(r, f)
        for r in (rec, pod.rec_prefill)
        for f in ("arrived", "completed", "busy_s", "dyn_j", "output_tokens", "kv_block_s")
    ]
    xfers = [(r.rid, r.xfer_s, r.link_wait_s, r.xfer_bytes, r.dst.index) for r in pod.arrived_kv]
    st = pod.pool_state()
    st["transfer"]["hist"] = [(h.lo, h.counts.tolist()) for h in st["transfer"]["hist"]]
    return per_hour, rec.events, rec.iterations, sink.rows, xfers, st


@pytest.mark.parametrize("case", ["light", "two_by_two", "decode_full", "chunk_and_decode_preempt"])
def test_hand_inlined_decode_paths_equal_the_generic_ones(case, monkeypatch):
    """The paged decode replica's ``_admit`` and ``_fit_cut`` (the policy's ``_join_fits``,
    ``_join_kv``, ``_taken`` inlined, ``cut_x`` passed to the commit), ``_taken``'s slice sum,
    ``_keep_kv``'s inlined leave, the hand-off's bytes per token and inline Wakes, and the KV
    arrival's inlined ``on_arrival`` (bench/RESULTS.md, 2026-12-07 late): every request's
    times, every hourly figure, the transfers and the event count equal those of the generic
    paths, bit for bit."""
    from fleetsim.serving.kv_paged import PagedKV
    from fleetsim.serving.roles import DecodeRole, PagedDecodeReplica

    fast = _run_record(CASES[case])
    monkeypatch.setattr(PagedDecodeReplica, "_admit", DecodeRole._admit)
    monkeypatch.setattr(PagedDecodeReplica, "_fit_cut", DecodeRole._fit_cut)
    monkeypatch.setattr(PagedKV, "_taken", _generic_taken)
    monkeypatch.setattr(PagedKV, "_keep_kv", _generic_keep_kv)
    monkeypatch.setattr(Tap, "handoff", _generic_handoff)
    monkeypatch.setattr(DisaggPod, "_kv_arrived", _generic_kv_arrived)
    generic = _run_record(CASES[case])
    assert len(fast[3]) > 5000
    assert fast == generic


def _generic_keep_kv(self, r, f: int) -> None:
    r.kv_tokens = self._leave_decode(r, f)
    r.kv_held = r.held
    r.held = 0


def _generic_handoff(self, r, t, rep) -> None:
    """DisaggPod.handoff as it was (_pick_decode, transfer_bytes, wake_at), then Tap's check."""
    from fleetsim.serving.events import wake_at

    self.in_prefill -= 1
    self.prefill.in_flight -= 1
    r.src = rep
    if r.out_total == 1:
        self.rec.complete(r, t, rep.index)
        rep.release(r)
        self._balance()
        return
    r.out = r.out_total
    r.need = r.prompt + r.out_total
    dst = self._pick_decode()
    dst.outstanding += 1
    r.dst = dst
    k = rep.index - self.prefill.replicas[0].index
    free = self._link_free[k]
    start = free if free > t else t
    nbytes = self.pools.transfer_bytes(r.prompt)
    r.xfer_bytes = nbytes
    dur = self._lat_s + nbytes / self._bw
    end = start + dur
    self._link_free[k] = end
    r.link_wait_s = start - t
    r.xfer_s = r.link_wait_s + dur
    self.in_transfer += 1
    self._moving[r.rid] = r
    wake_at(self.env, end, [self._kv_arrived], r)
    self.rec.events += 1
    self._balance()


def _generic_kv_arrived(self, ev) -> None:
    """DisaggPod._kv_arrived as it was: the decode replica's on_arrival called."""
    r = ev.value
    self.in_transfer -= 1
    del self._moving[r.rid]
    self.decode.in_flight += 1
    h = min(int(self.env.now // 3600.0), self.hours)
    self.xfer_count[h] += 1
    self.xfer_bytes[h] += r.xfer_bytes
    self.xfer_sum_s[h] += r.xfer_s
    self.xfer_times[h].append(r.xfer_s)
    r.dst.outstanding -= 1
    r.dst.on_arrival(r)


def test_disagg_request_sets_every_request_field_as_request_does():
    """DisaggRequest's inlined Request.__init__ (out = 1 in the prefill pool): every slot of
    Request holds what Request(rid, t, prompt, 1, ids) gives it (so a field added to Request
    and not to the copy fails here)."""
    from fleetsim.serving.disagg import DisaggRequest
    from fleetsim.serving.request import Request

    for ids in (None, [7, 8]):
        a = DisaggRequest(5, 1.25, 900, 40, ids)
        b = Request(5, 1.25, 900, 1, ids)
        for name in Request.__slots__:
            u, v = getattr(a, name), getattr(b, name)
            assert u == v or (u != u and v != v), name  # (NaN first-token times)
        assert a.out_total == 40 and a.pf_need == 901
