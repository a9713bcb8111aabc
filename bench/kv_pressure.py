"""The saturated KV-bound case of issue 20 under ``kv_allocation = "paged"`` and ``"reserve"``.

    python bench/kv_pressure.py [--hours H]

Runs ``scenarios/kv-pressure-70b-a100.toml`` (Llama-3.1-70B TP4 on A100-80GB, prompts 1-2k,
outputs 200-600, arrivals at 1.2x a replica's saturated throughput) under both KV policies and
prints, for each: preemptions per replica-hour, goodput (completed requests meeting the TTFT and
TPOT targets, per second), the completed fraction, the share of prefill tokens (and of prefill
FLOPs, whose linear part is the same share) that were recomputed after a preemption, the mean
KV use, and the mechanism's figures: the tokens a victim held when it was preempted (recomputed
tokens / re-admissions) and the preemptions of the requests that completed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fleetsim.api import simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "kv-pressure-70b-a100.toml"


def measure(kv: str, hours: int | None = None) -> dict[str, float]:
    """The case's figures under KV policy ``kv`` (``"paged"`` or ``"reserve"``)."""
    ov: dict[str, object] = {"fleet.kv_allocation": kv}
    if hours is not None:
        ov["simulation.hours"] = hours
    run = simulate(str(SCENARIO), ov, requests=True)
    T = run.totals
    sc = run.scenario
    req = run.requests
    assert req is not None
    status = np.asarray(req.column("status").cast("string").to_pylist())
    done = status == "completed"
    ttft = req.column("ttft_s").to_numpy(zero_copy_only=False)
    tpot = req.column("tpot_s").to_numpy(zero_copy_only=False)
    pre = req.column("preemptions").to_numpy(zero_copy_only=False)
    prompt = req.column("prompt_tokens").to_numpy(zero_copy_only=False)
    out = req.column("output_tokens").to_numpy(zero_copy_only=False)
    ok = done & (ttft <= sc.slo.ttft_s) & (np.nan_to_num(tpot) <= sc.slo.tpot_s)
    horizon_s = sc.simulation.hours * 3600.0
    replica_h = sc.fleet.replicas * sc.fleet.pods * sc.simulation.hours
    recomputed = T["recomputed_tokens"]
    kv_use = run.hourly.column("kv_utilization").to_numpy()  # (paged only; 0 under reserve)
    return {
        "arrived": float(len(status)),
        "completed": float(done.sum()),
        "in_flight": float((status == "in_flight").sum()),
        "rejected": float((status == "rejected").sum()),
        "completed_fraction": float(done.mean()),
        "goodput_rps": float(ok.sum()) / horizon_s,
        "throughput_rps": float(done.sum()) / horizon_s,
        "preemptions_per_replica_h": T["preemptions"] / replica_h,
        "recomputed_tokens_per_replica_h": recomputed / replica_h,
        "recomputed_share_of_prefill": recomputed / (T["prompt_tokens"] + recomputed)
        if recomputed
        else 0.0,
        "tokens_per_readmission": recomputed / max(1.0, float(pre.sum())),
        # the victims' prompts (weighted by their preemptions): what a victim had generated
        # when preempted is about tokens_per_readmission - this
        "victim_prompt_mean": float((pre * prompt).sum()) / max(1.0, float(pre.sum())),
        "mean_batch_seqs": T["batch_occupancy"] * sc.fleet.max_batch_size,
        "preempted_completed_share": float((pre[done] > 0).mean()) if done.any() else 0.0,
        "max_preemptions_one_request": float(pre.max()) if len(pre) else 0.0,
        "kv_use_mean": float(np.mean(kv_use)),
        "ttft_p50_s": float(np.nanpercentile(ttft[done], 50)) if done.any() else np.nan,
        # the bounds the test holds the run to
        "recompute_low": float((pre[done] * prompt[done]).sum()),
        "recompute_high": float((pre * (prompt + out)).sum()),
        "recomputed_tokens": recomputed,
        "preemptions": T["preemptions"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=int, default=None, help="override simulation.hours")
    a = ap.parse_args()
    rows = {kv: measure(kv, a.hours) for kv in ("paged", "reserve")}
    keys = list(rows["paged"])
    print(f"{'':34s} {'paged':>14s} {'reserve':>14s}")
    for k in keys:
        print(f"{k:34s} {rows['paged'][k]:14,.4g} {rows['reserve'][k]:14,.4g}")


if __name__ == "__main__":
    main()
