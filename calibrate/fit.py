"""Fit the roofline profile and the power model to the timing grid; check a profile's honesty.

The roofline of :class:`fleetsim.device.latency.LatencyModel` predicts a prefill of ``B`` prompts of
``L`` tokens and a decode step of ``B`` sequences at ``ctx`` keys from the analytic FLOPs and
bytes of :class:`fleetsim.device.modelspec.ModelSpec` and five parameters: ``compute_eff_max``,
``compute_eff_half_tokens``, ``memory_eff``, ``overhead_s`` and ``overhead_per_layer_s``
(peaks come from the micro-benchmarks). :func:`fit_roofline` finds them by least squares on the
relative error (``scipy.optimize.least_squares`` with bounds), so a 1 ms decode step weighs as
much as a 1 s prefill. The two overheads can only be told apart when the grid holds two layer
counts; with one, ``overhead_per_layer_s`` is fixed at 0 and ``overhead_s`` absorbs it.

A hyperbolic ``eff_c(T)`` cannot follow a CPU whose small GEMMs are slow in steps (4 rows much
slower per row than 1 or 64), so :func:`fit_roofline_table` also fits one compute efficiency per
distinct ``T`` of the grid (``compute_eff_table``, interpolated in log T by the simulator) jointly
with the overheads and ``memory_eff``. A ``T`` whose points are all memory-bound under the fit
does not identify its efficiency; it gets the larger of its nearest identified neighbour's value
and the floor that keeps its points' compute branch at or below their memory branch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from fleetsim.base.errors import UserError
from fleetsim.device.latency import LatencyModel, PowerSpec, RooflineProfile
from fleetsim.device.modelspec import ModelSpec

_BOUNDS = {  # name: (low, high)
    "compute_eff_max": (1e-3, 2.0),
    "compute_eff_half_tokens": (0.0, 1e5),
    "memory_eff": (1e-3, 2.0),
    "overhead_s": (0.0, 10.0),
    "overhead_per_layer_s": (0.0, 1.0),
}


def work(spec: ModelSpec, row: dict) -> tuple[float, float]:
    """Analytic FLOPs and bytes of one grid point (as :class:`LatencyModel` charges them)."""
    s = dataclasses.replace(spec, n_layers=int(row["n_layers"]))
    b = int(row["batch"])
    if row["phase"] == "prefill":
        n = int(row["prompt_tokens"])
        tokens = b * n
        return s.prefill_flops(n) * b, s.weight_bytes_read(tokens) + s.kv_bytes_per_token * tokens
    c = int(row["context_tokens"])
    return (s.decode_flops(b, b * c), s.weight_bytes_read(b) + s.kv_bytes_per_token * (b * c + b))


def predict(spec: ModelSpec, profile: RooflineProfile, rows: Sequence[dict]) -> np.ndarray:
    """Predicted seconds of each grid row under ``profile`` (tp = 1)."""
    models: dict[int, LatencyModel] = {}
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        k = int(r["n_layers"])
        lm = models.get(k)
        if lm is None:
            lm = models[k] = LatencyModel(dataclasses.replace(spec, n_layers=k), profile, tp=1)
        if r["phase"] == "prefill":
            out[i] = lm.prefill_time(int(r["prompt_tokens"]), int(r["batch"]))
        else:
            out[i] = lm.decode_time(int(r["batch"]), int(r["context_tokens"]))
    return out


def quality(measured: np.ndarray, predicted: np.ndarray) -> dict:
    """R² of the times, R² of their logs, worst and RMS relative error."""
    m = np.asarray(measured, float)
    p = np.asarray(predicted, float)
    rel = p / m - 1.0

    def r2(y: np.ndarray, f: np.ndarray) -> float:
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        return 1.0 - float(np.sum((y - f) ** 2)) / ss_tot if ss_tot > 0 else float("nan")

    return {
        "r2": r2(m, p),
        "r2_log": r2(np.log(m), np.log(p)),
        "max_rel_err": float(np.max(np.abs(rel))),
        "rms_rel_err": float(np.sqrt(np.mean(rel**2))),
        "n_points": int(m.size),
    }


def fit_roofline(
    spec: ModelSpec,
    rows: Sequence[dict],
    *,
    name: str,
    peak_flops: float,
    mem_bw_bytes_per_s: float,
    mem_bytes: float,
    fit_per_layer: bool | None = None,
) -> tuple[RooflineProfile, dict]:
    """Least-squares roofline parameters for the measured ``rows``; returns profile and quality.

    ``fit_per_layer`` (default: whether the rows hold two or more layer counts) decides whether
    ``overhead_per_layer_s`` is fitted or fixed at 0.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no grid points to fit")
    layer_counts = {int(r["n_layers"]) for r in rows}
    if fit_per_layer is None:
        fit_per_layer = len(layer_counts) >= 2
    names = list(_BOUNDS) if fit_per_layer else list(_BOUNDS)[:-1]
    meas = np.array([float(r["time_s"]) for r in rows])

    def make(x: np.ndarray) -> RooflineProfile:
        # (Any: the fitted numbers, passed by name next to the typed fields)
        vals: dict[str, Any] = dict(zip(names, (float(v) for v in x), strict=True))
        vals.setdefault("overhead_per_layer_s", 0.0)
        return RooflineProfile(
            name=name,
            peak_flops=peak_flops,
            mem_bw_bytes_per_s=mem_bw_bytes_per_s,
            mem_bytes=mem_bytes,
            source="measured",
            **vals,
        )

    def resid(x: np.ndarray) -> np.ndarray:
        return predict(spec, make(x), rows) / meas - 1.0

    # starting points from the points' own efficiencies
    fl = np.array([work(spec, r)[0] for r in rows])
    by = np.array([work(spec, r)[1] for r in rows])
    eff_c0 = float(np.clip(np.max(fl / meas / peak_flops), 0.01, 1.5))
    eff_m0 = float(np.clip(np.max(by / meas / mem_bw_bytes_per_s), 0.01, 1.5))
    oh0 = float(np.min(meas)) * 0.05
    lo = np.array([_BOUNDS[n][0] for n in names])
    hi = np.array([_BOUNDS[n][1] for n in names])
    best = None
    for t_half in (1.0, 16.0, 128.0, 1024.0):
        x0 = [eff_c0, t_half, eff_m0, oh0] + ([oh0 / max(layer_counts)] if fit_per_layer else [])
        x0 = np.clip(np.array(x0), lo + 1e-12, hi - 1e-12)
        res = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", method="trf")
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None  # the loop ran
    profile = make(best.x)
    q = quality(meas, predict(spec, profile, rows))
    q["overhead_per_layer_fitted"] = bool(fit_per_layer)
    q["layer_counts"] = sorted(layer_counts)
    return profile, q


def fit_power(
    spec: ModelSpec,
    rows: Sequence[dict],
    *,
    idle_w: float,
    max_w: float,
    peak_flops: float,
    mem_bw_bytes_per_s: float,
) -> tuple[PowerSpec, dict]:
    """``PowerSpec`` by non-negative least squares of the busy excess over idle.

    Busy power = idle_w + active_w + compute_w * u_c + memory_w * u_m with u_c = flops /
    (t * peak) and u_m = bytes / (t * bandwidth) of each grid point (mean power over its repeats).
    """
    pts = [r for r in rows if math.isfinite(float(r.get("power_w", math.nan)))]
    if len(pts) < 3:
        raise ValueError("fewer than 3 grid points with a power reading")
    a = np.empty((len(pts), 3))
    y = np.empty(len(pts))
    for i, r in enumerate(pts):
        f, b = work(spec, r)
        t = float(r["time_s"])
        a[i] = (1.0, min(f / (t * peak_flops), 1.5), min(b / (t * mem_bw_bytes_per_s), 1.5))
        y[i] = float(r["power_w"]) - idle_w
    res = lsq_linear(a, y, bounds=(0.0, np.inf))
    active_w, compute_w, memory_w = (float(v) for v in res.x)
    pred = a @ res.x
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    spec_out = PowerSpec(
        idle_w=idle_w, max_w=max_w, active_w=active_w, compute_w=compute_w, memory_w=memory_w
    )
    return spec_out, {
        "r2": r2,
        "max_abs_err_w": float(np.max(np.abs(y - pred))),
        "n_points": len(pts),
    }


def predicted_vs_measured(profile_path: str | Path) -> list[dict]:
    """Each grid point of a calibrated profile with its measured and predicted seconds.

    Reads the profile with :func:`fleetsim.device.profile.load_profile`, the model it timed from its
    ``model_config`` key and the grid from its ``grid_file`` (Parquet, beside the JSON), and
    predicts with ``LatencyModel(spec, profile)``. Rows carry ``measured_s``, ``predicted_s`` and
    ``rel_err`` = predicted / measured - 1.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fleetsim.base import io
    from fleetsim.device.profile import load_profile

    path = Path(profile_path)
    profile, _ = load_profile(path)
    if not isinstance(profile, RooflineProfile):
        raise UserError(f"{path}: a {profile.kind} profile has no roofline grid to compare with")
    raw, _ = io.load_json(path, "profile")
    spec = ModelSpec(**raw["model_config"])
    grid = path.parent / str(raw["grid_file"])
    try:
        rows = pq.read_table(pa.BufferReader(io.read_bytes(grid, "grid_file", io.MAX_TRACE_BYTES)))
    except pa.ArrowException as exc:
        raise UserError(f"{path}: grid_file {grid}: not a Parquet table ({exc})") from None
    rows = rows.to_pylist()
    pred = predict(spec, profile, rows)
    out = []
    for r, p in zip(rows, pred, strict=True):
        out.append(
            {
                **r,
                "measured_s": float(r["time_s"]),
                "predicted_s": float(p),
                "rel_err": float(p) / float(r["time_s"]) - 1.0,
            }
        )
    return out


def tokens_of(row: dict) -> int:
    """Tokens ``T`` of one grid point's iteration: ``B * L`` for a prefill, ``B`` for a decode."""
    b = int(row["batch"])
    return b * int(row["prompt_tokens"]) if row["phase"] == "prefill" else b


def fit_roofline_table(
    spec: ModelSpec,
    rows: Sequence[dict],
    base: RooflineProfile,
    *,
    fit_per_layer: bool | None = None,
) -> tuple[RooflineProfile, dict]:
    """A roofline with a tabulated ``compute_eff_table`` (one efficiency per distinct ``T`` of
    ``rows``), fitted with ``memory_eff``, ``overhead_s`` and ``overhead_per_layer_s`` by least
    squares on the relative error. ``base`` (the hyperbolic fit) gives the peaks, the starting
    point and the ``compute_eff_max`` / ``compute_eff_half_tokens`` kept in the profile.

    Returns the profile and its quality with ``identified_tokens`` (the ``T`` values whose
    efficiency some compute-bound point fixes) and ``filled_tokens`` (the others, see the module
    docstring)."""
    rows = list(rows)
    layer_counts = {int(r["n_layers"]) for r in rows}
    if fit_per_layer is None:
        fit_per_layer = len(layer_counts) >= 2
    meas = np.array([float(r["time_s"]) for r in rows])
    toks = np.array([tokens_of(r) for r in rows])
    t_values = sorted({int(t) for t in toks})
    fl = np.array([work(spec, r)[0] for r in rows])
    by = np.array([work(spec, r)[1] for r in rows])
    peak, bw = base.peak_flops, base.mem_bw_bytes_per_s
    n_head = 3 if fit_per_layer else 2
    lo_e, hi_e = math.log(1e-3), math.log(1.5)
    # memory_eff <= 1: the weights stream no faster than the measured copy. Without the bound a
    # grid of one layer count (--quick) trades overhead_s against memory_eff freely (batch-1
    # decode = overhead + bytes / (bw * memory_eff)) and lands on the upper bound.
    lo = np.array(
        [_BOUNDS["memory_eff"][0], _BOUNDS["overhead_s"][0], _BOUNDS["overhead_per_layer_s"][0]][
            :n_head
        ]
        + [lo_e] * len(t_values)
    )
    hi = np.array(
        [1.0, _BOUNDS["overhead_s"][1], _BOUNDS["overhead_per_layer_s"][1]][:n_head]
        + [hi_e] * len(t_values)
    )

    def make(x: np.ndarray) -> RooflineProfile:
        table = tuple(
            (float(t), float(math.exp(v))) for t, v in zip(t_values, x[n_head:], strict=True)
        )
        return dataclasses.replace(
            base,
            memory_eff=float(x[0]),
            overhead_s=float(x[1]),
            overhead_per_layer_s=float(x[2]) if fit_per_layer else 0.0,
            compute_eff_table=table,
        )

    def resid(x: np.ndarray) -> np.ndarray:
        return predict(spec, make(x), rows) / meas - 1.0

    layers = np.array([int(r["n_layers"]) for r in rows], float)
    best = None
    for oh_scale in (1.0, 0.0):  # from the hyperbolic fit's overheads, and from none
        oh = oh_scale * (base.overhead_s + base.overhead_per_layer_s * layers)
        rest = np.maximum(meas - oh, 0.05 * meas)
        x0 = [
            min(base.memory_eff, 0.99),
            oh_scale * base.overhead_s,
            oh_scale * base.overhead_per_layer_s,
        ][:n_head]
        for t in t_values:
            sel = toks == t
            x0.append(math.log(float(np.clip(np.median(fl[sel] / (rest[sel] * peak)), 2e-3, 1.4))))
        x0 = np.clip(np.array(x0), lo + 1e-12, hi - 1e-12)
        res = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", method="trf")
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None  # the loop ran
    prof = make(best.x)
    # which T values does a compute-bound point identify?
    assert prof.compute_eff_table is not None  # make() fits a table
    effs = dict(prof.compute_eff_table)
    t_c = fl / (peak * np.array([effs[float(t)] for t in toks]))
    t_m = by / (bw * prof.memory_eff)
    # (the optimiser stops a memory-bound T at the kink t_c = t_m, so ask for a 1 % margin: a
    # point whose time would change if its efficiency rose by 1 %)
    identified = [t for t in t_values if np.any(t_c[toks == t] >= 1.01 * t_m[toks == t])]
    filled = [t for t in t_values if t not in identified]
    if not identified:  # every point memory-bound: no efficiency is measured; keep the base
        q = quality(meas, predict(spec, base, rows))
        q.update(
            overhead_per_layer_fitted=bool(fit_per_layer),
            layer_counts=sorted(layer_counts),
            identified_tokens=[],
            filled_tokens=t_values,
        )
        return base, q
    if filled:
        table = dict(effs)
        for t in filled:
            sel = toks == t
            floor = float(np.max(fl[sel] / (peak * t_m[sel])))
            near = min(identified, key=lambda u: (abs(math.log(u / t)), u))
            table[float(t)] = min(max(floor, effs[float(near)]), 1.5)
        prof = dataclasses.replace(prof, compute_eff_table=tuple(sorted(table.items())))
    q = quality(meas, predict(spec, prof, rows))
    q["overhead_per_layer_fitted"] = bool(fit_per_layer)
    q["layer_counts"] = sorted(layer_counts)
    q["identified_tokens"] = identified
    q["filled_tokens"] = filled
    return prof, q
