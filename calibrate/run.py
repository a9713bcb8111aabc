"""One calibration, end to end: build, check FLOPs, benchmark, time the grid, fit, write.

:func:`calibrate` returns the profile dict it wrote; :func:`render` prints the summary with rich.
The profile JSON follows :mod:`fleetsim.device.profile` (``fleetsim-profile/1``), with extra keys:
``device``, ``model``, ``model_config`` (the :class:`ModelSpec` that was timed, after
``--layers``), ``micro``, ``flop_check``, ``fit``, ``power``/``power_fit``, ``grid_file``
(Parquet beside the JSON, one row per grid point), ``notes`` and ``created_utc``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from fleetsim.device.latency import RooflineProfile
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.profile import profile_to_dict

from . import bench, fit
from .model import TorchTransformer, flop_check
from .power import open_meter

if TYPE_CHECKING:
    from rich.console import Console


def device_name(device: torch.device) -> str:
    """Human name of the device (GPU product name, or the CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def slug(text: str) -> str:
    """Lower-case file-name-safe form of ``text``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "device"


def catalog_gpu_for(name: str) -> str | None:
    """The catalog GPU whose short name ("h200", "a100", ...) appears in the device name."""
    from fleetsim.device import catalog

    low = name.lower().replace(" ", "")
    for key in catalog.gpus():
        short = key.split("-")[0]
        if short in low:
            return key
    return None


def device_mem_bytes(device: torch.device) -> float:
    """Memory capacity of the device in bytes."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return float(psutil.virtual_memory().total)


def choose_grid(
    device: torch.device, spec: ModelSpec, quick: bool, free_bytes: float
) -> bench.GridSpec:
    """The timing grid for this device and mode (see the module docstring of :mod:`bench`)."""
    layers = spec.n_layers
    two = (layers, max(1, layers // 2)) if layers >= 2 else (layers,)
    kv_cap = int(max(1024, 0.4 * free_bytes / max(spec.kv_bytes_per_token, 1.0)))
    if device.type == "cuda":
        if quick:
            return bench.GridSpec(
                (128, 512, 2048),
                (1, 4),
                8192,
                (1, 8, 64),
                (512, 4096),
                min(kv_cap, 1 << 18),
                (layers,),
                warmup=2,
                repeats=5,
            )
        return bench.GridSpec(
            (64, 256, 1024, 2048, 4096, 8192),
            (1, 2, 4, 8, 16),
            32768,
            (1, 4, 16, 32, 64, 128, 256),
            (512, 2048, 8192),
            min(kv_cap, 1 << 20),
            two,
            warmup=2,
            repeats=5,
        )
    if quick:
        # T = B * L or B covers 1, 2, 4, ..., 128 (the tabulated efficiency's points)
        return bench.GridSpec(
            (16, 64, 128),
            (1, 2),
            128,
            (1, 2, 4, 8, 16, 32),
            (128, 1024),
            min(kv_cap, 4096),
            (layers,),
            warmup=1,
            repeats=2,
        )
    # T covers 1, 2, 4, ..., 1024 (decode for T <= 32, prefill from 16 up)
    return bench.GridSpec(
        (16, 64, 256, 512),
        (1, 2, 4),
        1024,
        (1, 2, 4, 8, 16, 32),
        (128, 1024, 4096),
        min(kv_cap, 65536),
        two,
        warmup=1,
        repeats=3,
    )


def retime_outliers(
    spec: ModelSpec,
    model: TorchTransformer,
    grid: bench.GridSpec,
    rows: list[dict],
    micro: dict,
    mem: float,
    *,
    until: float,
    log: Callable[[str], None],
    threshold: float = 0.2,
) -> list[str]:
    """Re-time, worst first and until ``until``, the rows that a preliminary fit (tabulated,
    falling back to hyperbolic) misses by more than ``threshold``; a row keeps the lower
    median (``time_s``) and records the first one (``time_first_s``). Returns one note per
    re-timed row."""
    if not rows:
        return []
    prof_h, _ = fit.fit_roofline(
        spec,
        rows,
        name="pre",
        peak_flops=micro["peak_flops"],
        mem_bw_bytes_per_s=micro["mem_bw_bytes_per_s"],
        mem_bytes=mem,
    )
    prof_t, _ = fit.fit_roofline_table(spec, rows, prof_h)
    pred = fit.predict(spec, prof_t, rows)
    errs = [
        (abs(p / r["time_s"] - 1.0), i) for i, (r, p) in enumerate(zip(rows, pred, strict=True))
    ]
    out: list[str] = []
    for err, i in sorted(errs, reverse=True):
        if err <= threshold or time.perf_counter() > until:
            break
        r = rows[i]
        times = bench.time_point(model, grid, r)
        second = float(np.median(times))
        r["time_first_s"] = r["time_s"]
        r["time_s"] = min(r["time_s"], second)
        r["time_min_s"] = min(r["time_min_s"], min(times))
        r["time_max_s"] = max(r["time_max_s"], max(times))
        out.append(
            f"{r['phase']} layers={r['n_layers']} B={r['batch']} L={r['prompt_tokens']} "
            f"ctx={r['context_tokens']}: {r['time_first_s'] * 1e3:.1f} -> "
            f"{second * 1e3:.1f}"
        )
        log(f"  re-timed {out[-1]} ms")
    for r in rows:
        r.setdefault("time_first_s", r["time_s"])
    return out


def _loadavg() -> float | None:
    """1-minute load average (other processes competing for the CPU skew CPU timings)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def write_outputs(profile: dict, rows: list[dict], out: Path) -> None:
    """Write the grid Parquet, then the profile JSON, both atomically."""
    import pyarrow as pa

    from fleetsim.results.output import write_table_atomic, write_text_atomic

    grid_path = out.with_name(profile["grid_file"])
    write_table_atomic(
        pa.Table.from_pylist(rows),
        grid_path,
        {"fleetsim.profile": profile["name"], "fleetsim.created_utc": profile["created_utc"]},
    )
    text = json.dumps(profile, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_text_atomic(text, out)


def _clean(x: object) -> object:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def calibrate(
    spec: ModelSpec,
    *,
    device: torch.device,
    out: Path | None,
    quick: bool,
    seed: int = 0,
    budget_s: float | None = None,
    dtype_requested: str | None = None,
    grid: bench.GridSpec | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Calibrate ``spec`` (already sliced to the layers to build, ``spec.dtype`` = timed dtype).

    ``grid`` replaces the timing grid of :func:`choose_grid` (``fleetsim replay`` passes one fitted
    to its trace's shapes: every small decode batch, the trace's prompt lengths).

    Returns the profile dict (with ``"_path"`` and ``"_rows"`` for the caller) after writing it.
    The steps: time the device's peaks, build the model, check its FLOPs, measure idle power,
    time the grid, fit the roofline (and power), write the profile.
    """
    t_start = time.perf_counter()
    load_start = _loadavg()
    dtype = spec.dtype
    dname = device_name(device)
    dev_slug = "cpu" if device.type == "cpu" else slug(dname)
    # the micro-benchmarks first: their buffers (512 MB on a CPU) are freed before the weights
    # exist, so the two never add up in the peak memory
    micro = _micro_peaks(device, dtype, quick, log)
    log(f"building {spec.name} ({spec.n_layers} layers, {dtype}) on {dname}")
    embed_rows = 4096 if device.type == "cpu" else None
    t_build = time.perf_counter()
    model = TorchTransformer(spec, device=device, dtype=dtype, seed=seed, embed_rows=embed_rows)
    log(f"  built in {time.perf_counter() - t_build:.1f} s")

    # 1. FLOPs: counted vs analytic, on a small prefill and decode step
    fc = flop_check(
        model, batch=2, prompt_tokens=16 if quick else 64, context_tokens=64 if quick else 256
    )
    log(f"FLOP check: prefill {fc['prefill_rel_err']:+.3%}, decode {fc['decode_rel_err']:+.3%}")
    meter, power_method = open_meter(device.type, device.index or 0)
    idle_w = _idle_power(meter, power_method, device, log)  # 3. power meter and idle power
    # 4. the timing grid
    mem_bytes = device_mem_bytes(device)
    if budget_s is None:
        budget_s = 40.0 if quick else math.inf
    grid, rows, notes = _time_grid(
        spec, model, device, grid, quick, meter, micro, mem_bytes, t_start + budget_s, budget_s, log
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not rows:
        raise RuntimeError("no grid point could be timed")
    notes += _load_notes(device, load_start)
    # 5. fits
    prof, quality = _fit_roofline(
        spec, rows, f"{dev_slug}-{spec.name}-l{spec.n_layers}", micro, mem_bytes, notes
    )
    power_d = power_fit = None
    if meter is not None and math.isfinite(idle_w):
        prof, power_d, power_fit = _fit_power(
            spec, rows, prof, meter, idle_w, micro, power_method, notes
        )
    else:
        log(f"power was not measured ({power_method})")
    # 6. write
    out = Path(out) if out is not None else Path("profiles") / f"{dev_slug}-{spec.name}.json"
    facts = _device_facts(device, dname, dtype, dtype_requested or dtype, load_start)
    profile = _profile_dict(
        prof, spec, facts, embed_rows, device, dname, micro, fc, quality, grid, quick, notes, out
    )
    profile["wall_s"] = time.perf_counter() - t_start
    profile["power"] = power_d
    if power_fit is not None:
        profile["power_fit"] = power_fit
    if power_d is None:
        profile["power_note"] = f"power was not measured ({power_method})"
    profile = cast(dict[str, Any], _clean(profile))  # (a dict stays a dict)
    write_outputs(profile, rows, out)
    profile["_path"] = str(out)
    profile["_rows"] = rows
    return profile


def _profile_dict(
    prof, spec, facts, embed_rows, device, dname, micro, fc, quality, grid, quick, notes, out
) -> dict:
    """The profile's JSON dict with its provenance (device, model, grid, fit quality, notes)."""
    return profile_to_dict(
        prof,
        device=facts,
        embed_rows=embed_rows,
        catalog_gpu=catalog_gpu_for(dname) if device.type == "cuda" else None,
        model=spec.name,
        model_config=dataclasses.asdict(spec),
        micro=micro,
        flop_check=fc,
        fit=quality,
        power_fit=None,
        grid=dataclasses.asdict(grid),
        quick=quick,
        wall_s=0.0,
        notes=notes,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        grid_file=out.stem + ".grid.parquet",
    )


def _device_facts(
    device: torch.device, dname: str, dtype: str, dtype_requested: str, load_start: float | None
) -> dict[str, Any]:
    """The profile's ``device`` section: what timed it, and how busy the machine was."""
    return {
        "type": device.type,
        "name": dname,
        "torch_version": torch.__version__,
        "dtype": dtype,
        "dtype_requested": dtype_requested,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "timer": bench.make_timer(device).method,  # cuda-events or perf_counter
        "cpus": os.cpu_count(),
        "loadavg_1min_start": load_start,
        "loadavg_1min_end": _loadavg(),
    }


def _micro_peaks(
    device: torch.device, dtype: str, quick: bool, log: Callable[[str], None]
) -> dict[str, float]:
    """The device's matmul and copy peaks (micro-benchmarks)."""
    if device.type == "cuda":
        micro = bench.matmul_peak(device, dtype, 8192, repeats=20)
        micro.update(bench.copy_bandwidth(device, 2 << 30, repeats=20))
    else:
        micro = bench.matmul_peak(device, dtype, 1536 if quick else 3072, repeats=3 if quick else 5)
        micro.update(bench.copy_bandwidth(device, 256 << 20, repeats=5 if quick else 10))
    log(
        f"peaks: matmul {micro['peak_flops'] / 1e12:.3f} TFLOP/s ({dtype}), "
        f"copy {micro['mem_bw_bytes_per_s'] / 1e9:.1f} GB/s"
    )
    return micro


def _idle_power(
    meter: Any, power_method: str, device: torch.device, log: Callable[[str], None]
) -> float:
    """The idle draw (W) over a quiet second or two; NaN without a meter."""
    if meter is None:
        return math.nan
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    time.sleep(3.0 if device.type == "cuda" else 1.5)
    idle_w = float(meter.mean_w(t0 + 1.0, time.perf_counter()))
    log(f"idle power ({power_method}): {idle_w:.1f} W")
    return idle_w


def _time_grid(
    spec: ModelSpec,
    model: TorchTransformer,
    device: torch.device,
    grid: bench.GridSpec | None,
    quick: bool,
    meter: Any,
    micro: dict[str, float],
    mem_bytes: float,
    deadline: float,
    budget_s: float,
    log: Callable[[str], None],
) -> tuple[bench.GridSpec, list[dict], list[str]]:
    """Time the grid (chosen for the free memory unless given) until ``deadline``, then re-time
    its outliers; returns the grid, its rows and notes."""
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
    else:
        import psutil

        free = float(psutil.virtual_memory().available)
    if grid is None:
        grid = choose_grid(device, spec, quick, free)
    if meter is not None:
        grid = dataclasses.replace(grid, min_time_s=1.0 if device.type == "cuda" else 0.5)
    rows, notes = bench.run_grid(
        model, grid, meter=meter, deadline=deadline, progress=lambda s: log("  " + s)
    )
    if meter is not None:
        meter.stop()
    # a CPU shared with anything else (the host's other guests included) slows a 2-thread
    # GEMM ~2x for seconds at a time: re-time the points furthest from a first fit, once, and
    # keep the lower of the two medians (both are kept in the grid file and listed in the notes)
    if rows:
        retime_until = time.perf_counter() + 0.25 * (budget_s if math.isfinite(budget_s) else 120.0)
        retimed = retime_outliers(
            spec, model, grid, rows, micro, mem_bytes, until=retime_until, log=log
        )
        if retimed:
            notes.append("re-timed (first -> second median, ms): " + "; ".join(retimed))
    return grid, rows, notes


def _load_notes(device: torch.device, load_start: float | None) -> list[str]:
    """A note when the CPU was busy as the run started (its timings are noisy)."""
    load_end = _loadavg()
    # the load before the run (the run's own threads raise the load at its end by ~their count)
    if device.type == "cpu" and (load_start or 0.0) > 0.5 * (os.cpu_count() or 1):
        return [
            f"the CPU was busy when the run started (1-min load {load_start}, "
            f"{load_end} at the end of the grid, on {os.cpu_count()} cores): timings are "
            "noisy; rerun on an idle machine"
        ]
    return []


def _fit_roofline(
    spec: ModelSpec,
    rows: list[dict],
    name: str,
    micro: dict[str, float],
    mem_bytes: float,
    notes: list[str],
) -> tuple[RooflineProfile, dict]:
    """Fit the roofline with a hyperbolic and a tabulated compute efficiency, keep the better,
    and add each row's work and predictions (in place)."""
    prof_h, q_h = fit.fit_roofline(
        spec,
        rows,
        name=name,
        peak_flops=micro["peak_flops"],
        mem_bw_bytes_per_s=micro["mem_bw_bytes_per_s"],
        mem_bytes=mem_bytes,
    )
    prof_t, q_t = fit.fit_roofline_table(spec, rows, prof_h)
    use_table = prof_t.compute_eff_table is not None and q_t["rms_rel_err"] < q_h["rms_rel_err"]
    prof, quality = (prof_t, dict(q_t)) if use_table else (prof_h, dict(q_h))
    quality["compute_eff"] = "table" if use_table else "hyperbolic"
    quality["hyperbolic"] = q_h
    quality["table"] = q_t
    if q_t["filled_tokens"] and use_table:
        notes.append(
            f"compute_eff_table: T = {q_t['filled_tokens']} only had memory-bound points; "
            "their efficiency is not measured (set to the nearest measured T's value, or "
            "the floor that keeps those points memory-bound)"
        )
    pred = fit.predict(spec, prof, rows)
    pred_h = fit.predict(spec, prof_h, rows)
    for r, p, ph in zip(rows, pred, pred_h, strict=True):
        f, b = fit.work(spec, r)
        r.update(
            flops=f,
            bytes=b,
            predicted_s=float(p),
            rel_err=float(p) / r["time_s"] - 1.0,
            predicted_hyperbolic_s=float(ph),
            tokens=fit.tokens_of(r),
            u_compute=f / (r["time_s"] * micro["peak_flops"]),
            u_memory=b / (r["time_s"] * micro["mem_bw_bytes_per_s"]),
        )
    return prof, quality


def _fit_power(
    spec: ModelSpec,
    rows: list[dict],
    prof: RooflineProfile,
    meter: Any,
    idle_w: float,
    micro: dict[str, float],
    power_method: str,
    notes: list[str],
) -> tuple[RooflineProfile, dict | None, dict | None]:
    """Fit the power model to the measured draw of the grid's points: the profile with its
    power, the power section and the fit's quality (None, None and a note if it fails)."""
    try:
        max_w = meter.max_w or max(float(r["power_w"]) for r in rows if math.isfinite(r["power_w"]))
        pspec, power_fit = fit.fit_power(
            spec,
            rows,
            idle_w=idle_w,
            max_w=max_w,
            peak_flops=micro["peak_flops"],
            mem_bw_bytes_per_s=micro["mem_bw_bytes_per_s"],
        )
    except ValueError as exc:
        notes.append(f"power fit skipped: {exc}")
        return prof, None, None
    power_d = {**dataclasses.asdict(pspec), "method": power_method}
    return dataclasses.replace(prof, power=pspec), power_d, power_fit


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _grid_table(profile: dict):
    """The timed grid, measured against predicted, as a rich table."""
    from rich.table import Table

    rows = profile["_rows"]
    t = Table(title=f"calibration grid: {profile['name']}")
    for col in (
        "phase",
        "layers",
        "B",
        "L",
        "ctx",
        "measured ms",
        "predicted ms",
        "rel err",
        "u_c",
        "u_m",
        "W",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        p = r.get("power_w")
        t.add_row(
            r["phase"],
            str(r["n_layers"]),
            str(r["batch"]),
            str(r["prompt_tokens"]),
            str(r["context_tokens"]),
            f"{r['time_s'] * 1e3:.2f}",
            f"{r['predicted_s'] * 1e3:.2f}",
            f"{r['rel_err']:+.1%}",
            f"{r['u_compute']:.3f}",
            f"{r['u_memory']:.3f}",
            "-" if p is None or not math.isfinite(p) else f"{p:.0f}",
        )
    return t


def _fit_items(profile: dict) -> list[tuple[str, str]]:
    """The fitted parameters and the fit's quality, as (name, value) rows."""
    q = profile["fit"]
    fc = profile["flop_check"]
    items = [
        ("device", f"{profile['device']['name']} ({profile['device']['dtype']})"),
        ("peak_flops (matmul)", f"{profile['peak_flops'] / 1e12:.3f} TFLOP/s"),
        ("mem_bw_bytes_per_s (copy)", f"{profile['mem_bw_bytes_per_s'] / 1e9:.1f} GB/s"),
        ("compute_eff_max (hyperbolic)", f"{profile['compute_eff_max']:.3f}"),
        ("compute_eff_half_tokens (hyperbolic)", f"{profile['compute_eff_half_tokens']:.1f}"),
        ("memory_eff", f"{profile['memory_eff']:.3f}"),
        ("overhead_s", f"{profile['overhead_s'] * 1e3:.3f} ms"),
        (
            "overhead_per_layer_s",
            f"{profile['overhead_per_layer_s'] * 1e6:.1f} us"
            + ("" if q["overhead_per_layer_fitted"] else " (fixed: one layer count)"),
        ),
    ]
    for kind in ("hyperbolic", "table"):
        qk = q.get(kind)
        if qk is None:
            continue
        used = " (used)" if q.get("compute_eff") == kind else ""
        items.append((f"fit {kind}{used}: R² / R² log", f"{_fmt(qk['r2'])} / {_fmt(qk['r2_log'])}"))
        items.append(
            (
                f"fit {kind}{used}: max / rms rel err",
                f"{qk['max_rel_err']:.1%} / {qk['rms_rel_err']:.1%} over {qk['n_points']} points",
            )
        )
    if "hyperbolic" not in q:
        items.append(("fit R² / R² log", f"{_fmt(q['r2'])} / {_fmt(q['r2_log'])}"))
        items.append(
            (
                "max / rms rel err",
                f"{q['max_rel_err']:.1%} / {q['rms_rel_err']:.1%} over {q['n_points']} points",
            )
        )
    if profile.get("compute_eff_table"):
        items.append(
            (
                "compute_eff_table (T: eff)",
                ", ".join(f"{t:g}: {e:.3f}" for t, e in profile["compute_eff_table"]),
            )
        )
    items += [
        (
            "FLOP check (prefill, decode)",
            f"{fc['prefill_rel_err']:+.3%}, {fc['decode_rel_err']:+.3%}",
        ),
        (
            "power",
            "not measured"
            if profile["power"] is None
            else ", ".join(
                f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in profile["power"].items()
            ),
        ),
        ("wall time", f"{profile['wall_s']:.1f} s"),
        ("written", f"{profile['_path']} (+ {profile['grid_file']})"),
    ]
    return items


def render(profile: dict, console: Console) -> None:
    """Print the grid (measured vs predicted) and the fitted parameters as rich tables."""
    from rich.table import Table

    console.print(_grid_table(profile))
    s = Table(title="fitted roofline profile", show_header=False)
    items = _fit_items(profile)
    for k, v in items:
        s.add_row(k, v)
    console.print(s)
    for n in profile.get("notes", []):
        console.print(f"note: {n}")
