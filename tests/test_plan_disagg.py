"""``fleetsim plan`` over disaggregated fleets (apps/plan_disagg.py): the pools it finds meet
the SLO in every hour, and one replica fewer in either pool does not."""

from __future__ import annotations

import json
import tomllib

import pyarrow.parquet as pq
from conftest import SMALL, merge

from fleetsim.apps.cli import main as cli_main
from fleetsim.apps.executors import LocalExecutor, RunSummary, run_task
from fleetsim.apps.plan_disagg import disagg_base
from fleetsim.apps.plan_search import Slo, passes


def _toml(d: dict) -> str:
    """TOML of a scenario dict (sections of scalars and inline tables)."""

    def val(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    top = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    secs = [
        f"[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items())
        for k, v in d.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top + secs) + "\n"


def test_plan_finds_minimal_pools(tmp_path):
    d = merge(
        SMALL,
        simulation={"hours": 2},
        traffic={
            "requests_per_day": 1_000_000,
            "diurnal": "flat",
            "prompt": {"dist": "fixed", "value": 4000},  # ~0.1 s of prefill on an H100
            "output": {"dist": "fixed", "value": 16},
        },
        slo={"ttft_s": 0.3, "tpot_s": 0.05},
        disaggregation={"link": "infiniband-ndr"},
    )
    sc = tmp_path / "s.toml"
    sc.write_text(_toml(d))
    out = tmp_path / "plan"
    args = ["plan", str(sc), "--out", str(out), "--workers", "1", "--no-schedule", "--quiet"]
    rc = cli_main([*args, "--designs", "disaggregated"])
    assert rc == 0
    assert pq.read_table(out / "plan.parquet").num_rows == 0  # no aggregated candidates asked
    dis = pq.read_table(out / "plan_disaggregated.parquet").to_pylist()
    assert dis[0]["status"] == "ok"
    best = dis[0]
    P, D = best["prefill_replicas"], best["decode_replicas"]
    assert best["gpus"] == P + D
    assert best["screened_prefill"] is not None and best["screened_decode"] is not None
    slo = Slo(0.3, 0.05)
    base = disagg_base(tomllib.loads(_toml(d)), "h100-sxm", "h100-sxm")

    def day(p: int, q: int) -> RunSummary:
        x = merge(base)
        x["disaggregation"]["prefill"]["replicas"] = p
        x["disaggregation"]["decode"]["replicas"] = q
        return LocalExecutor(1).map(run_task, [(x, str(sc))])[0]

    hours = list(range(2))
    assert passes(day(P, D), slo, hours)
    assert best["worst_hour_ttft_p99_s"] <= 0.3 and best["worst_hour_tpot_p99_s"] <= 0.05
    if P > 1:
        assert not passes(day(P - 1, D), slo, hours)
    if D > 1:
        assert not passes(day(P, D - 1), slo, hours)
    assert P + D >= 3  # the load needs more than one replica in some pool (the test has teeth)
