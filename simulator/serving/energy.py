"""The dynamic-energy coefficients of a replica, apart from the engine (``serving.pod``
imports numpy and simpy; ``fleetsim validate`` prints which of these terms a scenario charges
and must not import them)."""

from __future__ import annotations

from typing import Any

from fleetsim.config.resolved import Resolved


def energy_coeffs(rs: Resolved) -> dict[str, Any]:
    """The dynamic-energy coefficients of one replica (see latency.PowerSpec): per busy second,
    per FLOP, per byte, per KV/state byte (an iteration's bytes beyond the weights it reads),
    per second of communication in place of the busy level, and whether the replica
    communicates at all; likewise per second in the fp8 fused-MoE K loop; per FLOP of the
    routed experts' grouped GEMMs on top of the FLOP term (0 for a dense model); per
    iteration, its exposed host time at host_w in place of active_w; and the saturation of the
    FLOP terms in the compute utilisation (compute_u0, with the replica's peak FLOP/s)."""
    p = rs.gpu.power
    prof = rs.profile
    bw = prof.mem_bw_bytes_per_s
    lat = rs.latency_model()
    return {
        "e_active_w": rs.tp * p.active_w,
        "e_flop_j": p.compute_w / prof.peak_flops,
        "e_byte_j": p.memory_w / bw,
        "e_kv_j": p.kv_w / bw,
        "e_comm_w": rs.tp * (p.comm_w - p.active_w) if p.comm_w is not None else 0.0,
        "track_comm": lat.comm_s(1, 1) > 0.0,
        "e_loop_w": rs.tp * (p.moe_loop_w - p.active_w) if p.moe_loop_w is not None else 0.0,
        "track_loop": lat.moe_loop_s(lat.dp) > 0.0,
        "e_xf_j": p.moe_compute_w / prof.peak_flops if lat.f_exp else 0.0,
        "track_xf": lat.f_exp > 0.0,
        "e_host_j": (
            rs.tp * (p.host_w - p.active_w) * lat.host_s_per_iter if p.host_w is not None else 0.0
        ),
        "e_u0": p.compute_u0,
        "e_peak_flops": rs.tp * prof.peak_flops,
    }
