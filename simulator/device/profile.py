"""Profile files: the JSON contract between ``fleetsim calibrate`` and the simulator.

A profile describes a device for the latency model (:mod:`fleetsim.device.latency`)::

    {
      "format": "fleetsim-profile/1",
      "kind": "roofline",                 # or "linear"
      "name": "cpu-llama-3.1-8b-l2",      # free text
      "device": {"type": "cpu", "name": "...", "torch_version": "...", "dtype": "bf16"},
      "catalog_gpu": null,                # or the catalog GPU this device is (e.g. "h200")
      "peak_flops": ..., "mem_bw_bytes_per_s": ..., "mem_bytes": ...,
      "compute_eff_max": ..., "compute_eff_half_tokens": ..., "memory_eff": ...,
      "overhead_s": ..., "overhead_per_layer_s": ...,
      "link_bw_bytes_per_s": ..., "link_latency_s": ...,              # optional
      "compute_eff_table": [[1, 0.05], [16, 0.2], ...] | null,       # optional: eff_c by T
      "power": {"idle_w":..,"max_w":..,"active_w":..,"compute_w":..,"memory_w":..,
                "method": "nvml" | "rapl" | "assumed"} | null,
      "fit": {"r2": ..., "max_rel_err": ..., "n_points": ...},          # optional
      "model": "llama-3.1-8b", "created_utc": "...", "grid_file": "....parquet"
    }

A ``linear`` profile carries ``base_s``, ``prefill_base_s``, ``per_prefill_token_s``,
``per_seq_s`` and ``per_context_token_s`` instead of the roofline fields.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from fleetsim.base.errors import UserError
from fleetsim.device.kernels import kernel_fit_from_dict, kernel_fit_to_dict
from fleetsim.device.latency import LinearProfile, PowerSpec, Profile, RooflineProfile

FORMAT = "fleetsim-profile/1"

_ROOFLINE_REQUIRED = (
    "peak_flops",
    "mem_bw_bytes_per_s",
    "mem_bytes",
    "compute_eff_max",
    "compute_eff_half_tokens",
    "memory_eff",
    "overhead_s",
)
_ROOFLINE_OPTIONAL = (
    "overhead_per_layer_s",
    "link_bw_bytes_per_s",
    "link_latency_s",
    "peak_flops_fp8",
    "peak_flops_int8",
)
_LINEAR_FIELDS = (
    "base_s",
    "prefill_base_s",
    "per_prefill_token_s",
    "per_seq_s",
    "per_context_token_s",
    "mem_bytes",
    "peak_flops",
    "mem_bw_bytes_per_s",
)
_POWER_FIELDS = ("idle_w", "max_w", "active_w", "compute_w", "memory_w")


# Upper bounds of profile fields: orders of magnitude above any device, so that every product
# in the latency and energy model stays finite (times in seconds per iteration or per token).
_MAX = {  # (rates up to 1e30: tests use "infinitely fast" profiles; work / 1e30 stays > 0)
    "peak_flops": 1e30,
    "mem_bw_bytes_per_s": 1e30,
    "mem_bytes": 1e15,
    "link_bw_bytes_per_s": 1e30,
    "compute_eff_max": 1.5,
    "memory_eff": 1.5,
    "compute_eff_half_tokens": 1e9,
}
_MAX_TIME_S = 3600.0  # any *_s field: one iteration, or one token's share of it


def _num(d: dict, key: str, where: str, *, positive: bool = False) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise UserError(f"{where}: field {key!r} = {v!r} must be a finite non-negative number")
    hi = _MAX.get(key, _MAX_TIME_S if key.endswith("_s") else math.inf)
    if v > hi:
        raise UserError(f"{where}: field {key!r} = {v!r} is above the limit {hi:g}")
    if positive and v <= 0:
        raise UserError(f"{where}: field {key!r} = {v!r} must be positive")
    return float(v)


# A GPU's board power limit is its TDP; its draw stays under it. The linear model's busy power
# with every term at full use (idle + active + compute + memory, u_c = u_m = 1, which no real
# iteration reaches together) is an upper envelope: the catalog entries (device/catalog) sit at
# 1.82-1.88 x TDP. Twice TDP is the stated ceiling; anything above is a unit or typing mistake.
MAX_BUSY_OVER_TDP = 2.0
MAX_POWER_W = 1e5  # per GPU: a B200 is 1.2 kW


def power_problem(p: PowerSpec) -> tuple[str, float, str] | None:
    """The first physical impossibility of a power model: (field, value, problem), or None.
    Checks idle <= TDP (``max_w``), idle <= busy, and busy (idle + active + compute + memory,
    at full use) <= MAX_BUSY_OVER_TDP x TDP."""
    busy = p.idle_w + p.active_w + p.compute_w + p.memory_w
    if p.max_w <= 0:
        return "max_w", p.max_w, "must be positive"
    if p.idle_w > p.max_w:
        return "idle_w", p.idle_w, f"idle power above the maximum (TDP {p.max_w:g} W)"
    if busy > MAX_BUSY_OVER_TDP * p.max_w:
        return (
            "active_w",
            p.active_w,
            f"busy power at full use ({busy:g} W = idle + active + compute + memory) is above "
            f"{MAX_BUSY_OVER_TDP:g} x TDP ({p.max_w:g} W)",
        )
    return None


def power_from_dict(d: dict | None, where: str) -> PowerSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise UserError(f"{where}: 'power' must be an object or null, got {d!r}")
    vals = {k: _num(d, k, where + " power") for k in _POWER_FIELDS if k in d}
    for k in ("idle_w", "max_w"):
        if k not in vals:
            raise UserError(f"{where}: power.{k} is missing")
    for k, v in vals.items():
        if v > MAX_POWER_W:
            raise UserError(f"{where}: power.{k} = {v!r} W is above {MAX_POWER_W:g} W per GPU")
    spec = PowerSpec(**vals)
    bad = power_problem(spec)
    if bad is not None:
        raise UserError(f"{where}: power.{bad[0]} = {bad[1]!r}: {bad[2]}")
    return spec


def eff_table_from_json(v: Any, where: str) -> tuple[tuple[float, float], ...] | None:
    """The ``compute_eff_table`` of a profile: ``[[tokens, eff], ...]`` with tokens >= 1 strictly
    increasing and 0 < eff <= 1.5, or null."""
    if v is None:
        return None
    fix = (
        "(fix: a list of [tokens, efficiency] pairs, tokens >= 1 strictly increasing, "
        "0 < efficiency <= 1.5; or regenerate it with `fleetsim calibrate`)"
    )
    if not isinstance(v, list) or not v:
        raise UserError(
            f"{where}: field 'compute_eff_table' = {v!r} must be a non-empty list {fix}"
        )
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(v):
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in pair
            )
        )
        if not ok:
            raise UserError(
                f"{where}: compute_eff_table[{i}] = {pair!r} is not a "
                f"[tokens, efficiency] pair of finite numbers {fix}"
            )
        t, e = float(pair[0]), float(pair[1])
        if t < 1.0 or (out and t <= out[-1][0]):
            raise UserError(
                f"{where}: compute_eff_table[{i}] tokens = {pair[0]!r} must be >= 1 "
                f"and greater than the previous entry's {fix}"
            )
        if not 0.0 < e <= 1.5:
            raise UserError(
                f"{where}: compute_eff_table[{i}] efficiency = {pair[1]!r} must be in "
                f"(0, 1.5] {fix}"
            )
        out.append((t, e))
    return tuple(out)


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise UserError(f"{where}: 'kernels' must be an object (fix: regenerate the profile)")
    return v


def profile_from_dict(d: Any, where: str = "profile") -> Profile:
    """Build a profile from its JSON object; a UserError names the bad field."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise UserError(
            f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT!r} "
            "(fix: regenerate it with `fleetsim calibrate`)"
        )
    kind = d.get("kind")
    name = str(d.get("name", Path(where).stem))
    power = power_from_dict(d.get("power"), where)
    meta = {
        k: d[k]
        for k in ("device", "catalog_gpu", "model", "created_utc", "fit", "grid_file")
        if k in d
    }
    if kind == "roofline":
        missing = [k for k in _ROOFLINE_REQUIRED if k not in d]
        if missing:
            raise UserError(
                f"{where}: roofline profile lacks {', '.join(missing)} "
                "(fix: regenerate it with `fleetsim calibrate`)"
            )
        # (Any: the numeric fields only, passed by name next to the typed ones)
        vals: dict[str, Any] = {k: _num(d, k, where) for k in _ROOFLINE_REQUIRED}
        vals.update({k: _num(d, k, where) for k in _ROOFLINE_OPTIONAL if k in d})
        for k in ("peak_flops", "mem_bw_bytes_per_s", "mem_bytes", "compute_eff_max", "memory_eff"):
            if vals[k] <= 0:
                raise UserError(f"{where}: field {k!r} = {vals[k]!r} must be positive")
        table = eff_table_from_json(d.get("compute_eff_table"), where)
        return RooflineProfile(
            name=name,
            power=power,
            source=str(d.get("source", "measured")),
            meta=meta,
            compute_eff_table=table,
            kernels=(
                None
                if d.get("kernels") is None
                else kernel_fit_from_dict(_dict(d["kernels"], where), f"{where} kernels")
            ),
            **vals,
        )
    if kind == "linear":
        vals = {k: _num(d, k, where) for k in _LINEAR_FIELDS if k in d}  # (numeric: see above)
        if "base_s" not in vals:
            raise UserError(
                f"{where}: linear profile lacks base_s "
                "(fix: regenerate it with `fleetsim calibrate`)"
            )
        return LinearProfile(name=name, power=power, meta=meta, **vals)
    raise UserError(f"{where}: 'kind' is {kind!r}; expected 'roofline' or 'linear'")


def load_profile(path: str | Path) -> tuple[Profile, str]:
    """Read a profile file; returns the profile and the SHA-256 of the file's bytes."""
    from fleetsim.base import io

    p = Path(path)
    d, raw = io.load_json(p, "hardware.profile", fix="regenerate it with `fleetsim calibrate`")
    return profile_from_dict(d, str(p)), hashlib.sha256(raw).hexdigest()


def profile_to_dict(p: Profile, **extra: Any) -> dict:
    """The JSON object of a profile (for writing), with ``extra`` keys added."""
    d: dict[str, Any] = {"format": FORMAT, "kind": p.kind, "name": p.name}
    if isinstance(p, RooflineProfile):
        for k in _ROOFLINE_REQUIRED + _ROOFLINE_OPTIONAL:
            if getattr(p, k) is not None:
                d[k] = getattr(p, k)
        d["kernels"] = None if p.kernels is None else kernel_fit_to_dict(p.kernels)
        d["compute_eff_table"] = (
            None if p.compute_eff_table is None else [[t, e] for t, e in p.compute_eff_table]
        )
        d["source"] = p.source
    else:
        for k in _LINEAR_FIELDS:
            d[k] = getattr(p, k)
    d["power"] = None if p.power is None else {k: getattr(p.power, k) for k in _POWER_FIELDS}
    d.update(p.meta)
    d.update(extra)
    return d


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
        kernels=catalog_kernel_fit(name),
    )
