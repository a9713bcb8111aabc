"""The rate one replica can carry: where the capacity planner starts its search, and the
SLO-bound capacity the run summary and the report compare the peak hour with."""

from __future__ import annotations

import numpy as np

from fleetsim.config.resolved import Resolved


def replica_capacity_rps(
    rs: Resolved,
    source: str,
    tpot_s: float | None = None,
    sizes: tuple[float, float] | None = None,
) -> float:
    """Best-case requests/s of one replica: prefill in full ``max_batched_tokens`` chunks and
    decode at the largest batch the KV budget (and ``max_batch_size``) allows. An optimistic
    bound: real batches are smaller and mixed, so it is only where the search starts.
    ``tpot_s``: also no larger a batch than one whose decode step stays within this time per
    output token (the SLO-bound capacity the run summary compares the peak hour with).
    ``sizes``: the mean prompt and output tokens per request (default: drawn from the
    scenario's size distributions)."""
    from fleetsim.workload.sampling import SizeSampler

    sc = rs.scenario
    if sizes is None:
        p, o = SizeSampler(sc.traffic.prompt, sc.traffic.output, source).draw(
            20_000, np.random.default_rng(np.random.SeedSequence(sc.seed, spawn_key=(2**31,)))
        )
        ep, eo = float(p.mean()), float(o.mean())
    else:
        ep, eo = sizes
    lat = rs.latency_model()
    per_seq = ep + eo / 2.0
    batch = int(max(1, min(sc.fleet.max_batch_size, rs.kv_capacity_tokens // max(per_seq, 1.0))))
    if tpot_s is not None:  # the largest batch whose step meets the TPOT target (monotone)
        lo, hi = 1, batch
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if lat.decode_time(mid, int(per_seq)) <= tpot_s:
                lo = mid
            else:
                hi = mid - 1
        batch = lo
    t_dec = lat.decode_time(batch, int(per_seq)) / batch
    chunk = max(1, sc.fleet.max_batched_tokens // max(int(ep), 1))
    t_pf = lat.prefill_time(max(int(ep), 1), chunk) / (chunk * max(ep, 1.0))
    return 1.0 / (ep * t_pf + eo * t_dec)
