"""The catalog's analytic profiles and the power model's physical checks, without pydantic.

:func:`catalog_profile` is what a run on a catalog GPU needs of :mod:`fleetsim.device.profile`;
that module builds four pydantic models for profile files when it is imported (~0.005 CPU s of
each ``fleetsim run`` and ``validate``, bench/RESULTS.md), so these live here and it re-exports
them.
"""

from __future__ import annotations

from fleetsim.device.latency import PowerSpec, RooflineProfile

# A GPU's board power limit is its TDP; its draw stays under it. The linear model's busy power
# with every term at full use (idle + active + compute + memory, u_c = u_m = 1, which no real
# iteration reaches together) is an upper envelope: the catalog entries (device/catalog) sit at
# 1.82-1.88 x TDP. Twice TDP is the stated ceiling; anything above is a unit or typing mistake.
# The linear terms at full use (u_c = u_m = 1 together, which no iteration reaches) may exceed
# the TDP: the power model is capped there (PowerSpec). Fitted B200 terms sum to 2.4 x TDP.
MAX_BUSY_OVER_TDP = 3.0
MAX_POWER_W = 1e5  # per GPU: a B200 is 1.2 kW


def power_problem(p: PowerSpec) -> tuple[str, float, str] | None:
    """The first physical impossibility of a power model: (field, value, problem), or None.
    Checks idle <= TDP (``max_w``), idle <= busy, and busy (idle + active + compute + memory + kv,
    at full use) <= MAX_BUSY_OVER_TDP x TDP."""
    busy = p.idle_w + p.active_w + p.compute_w + p.memory_w + p.kv_w
    if p.max_w <= 0:
        return "max_w", p.max_w, "must be positive"
    if p.idle_w > p.max_w:
        return "idle_w", p.idle_w, f"idle power above the maximum (TDP {p.max_w:g} W)"
    if busy > MAX_BUSY_OVER_TDP * p.max_w:
        return (
            "active_w",
            p.active_w,
            f"busy power at full use ({busy:g} W = idle + active + compute + memory + kv) is above "
            f"{MAX_BUSY_OVER_TDP:g} x TDP ({p.max_w:g} W)",
        )
    return None


def catalog_profile(name: str, entry: dict, power: PowerSpec | None = None) -> RooflineProfile:
    """The analytic profile of catalog GPU ``name`` from its (possibly overridden) catalog
    ``entry``, with the committed kernel model (``catalog/kernels.toml``) where it has one."""
    from fleetsim.device.kernels import catalog_kernel_fit

    return RooflineProfile(
        name=f"{name}-analytic",
        peak_flops=entry["peak_flops"],
        mem_bw_bytes_per_s=entry["mem_bw_bytes_per_s"],
        mem_bytes=entry["mem_bytes"],
        compute_eff_max=entry["compute_eff_max"],
        compute_eff_half_tokens=entry["compute_eff_half_tokens"],
        memory_eff=entry["memory_eff"],
        overhead_s=entry["overhead_s"],
        link_bw_bytes_per_s=entry["link_bw_bytes_per_s"],
        link_latency_s=entry["link_latency_s"],
        power=power,
        source="analytic",
        peak_flops_fp8=entry.get("peak_flops_fp8"),
        peak_flops_int8=entry.get("peak_flops_int8"),
        peak_flops_fp4=entry.get("peak_flops_fp4"),
        kernels=catalog_kernel_fit(name),
    )
