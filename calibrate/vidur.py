"""Fit the kernel model of :mod:`fleetsim.device.kernels` to operator times in Vidur's format.

Input: a folder laid out as Vidur's ``data/profiling`` (``compute/GPU/ORG/MODEL/mlp.csv`` and
``network/TOPOLOGY/all_reduce.csv``; see ``data/vidur-profiling/SOURCE.md``). Output, per GPU:

* the elementwise operators' fixed time and bandwidth efficiency (non-negative least squares on
  relative errors, one pair per operator);
* the GEMM parameters (launch time, peak efficiency and its shape terms, memory efficiency, the
  blend exponent, the cost and gain of half- and double-height row tiles), fitted by least
  squares on the log of each measured GEMM time;
* the all-reduce table, for each GPU count inside one node: a running median of the measured
  times (sizes every 1/16 octave, each the median over +-1/8 octave), checked against every
  measurement over the message sizes TP uses, in sample and leaving each measurement out
  (:func:`allreduce_checks`), and beyond the largest size (:func:`allreduce_extrapolation_errors`);
* the leave-one-model-out error: fit on all shapes but one, predict every TP and token count of
  the one left out, with the simulator's own code (:func:`fleetsim.device.kernels.layer_parts_s`).

``python -m fleetsim.calibrate.vidur --write`` regenerates ``simulator/device/catalog/kernels.toml``
from ``data/vidur-profiling``; ``fleetsim calibrate --from-vidur DIR`` writes profile JSON files.
Needs numpy and scipy only (no torch, no pandas).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetsim.device.kernels import (
    ELEMENTWISE_OPS,
    GEMM_MIN_TILE,
    KernelFit,
    interp_table,
    layer_parts_s,
    layer_shapes,
)
from fleetsim.device.modelspec import ModelSpec

#: the per-layer operators of Vidur's mlp.csv that make up the linear part of one layer
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
#: Vidur's folder names -> fleetsim catalog GPUs, and the all-reduce topology of each
VIDUR_GPUS = {"h100": ("h100-sxm", "h100_dgx"), "a100": ("a100-80gb", "a100_dgx")}
GEMM_M_TILE = 128  # rows of a tensor-core tile: token counts are padded to it
#: parameter vector of the GEMM fit: name, start, lower, upper
_GEMM_PARAMS = (
    ("gemm_launch_s", 4e-6, 0.0, 5e-5),
    ("gemm_eff_max", 0.8, 0.1, 1.0),
    ("gemm_k_half", 100.0, 0.0, 1e5),
    ("gemm_n_half", 100.0, 0.0, 1e5),
    ("gemm_m_half", 10.0, 0.0, 1e5),
    ("gemm_bw_eff", 0.85, 0.1, 1.0),
    ("gemm_pnorm", 2.0, 1.0, 20.0),
    ("gemm_half_tile_cost", 0.2, 0.0, 2.0),
    ("gemm_double_tile_gain", 0.05, 0.0, 0.5),
    ("gemm_tile_half", 10.0, 0.0, 1e4),
)
_GEMM_SCALE = (1e-6, 1, 100, 100, 100, 1, 1, 1, 1, 100)  # launch in microseconds internally
ALLREDUCE_GRID_PER_OCTAVE = 16  # sizes of the all-reduce table: 16 per octave
#: message sizes of the tensor-parallel all-reduces of the catalog models (d_model 4,096 to
#: 12,288; bf16 activations: tokens x d_model x 2 bytes). "decode": a step of 1 to 512
#: sequences, 8 KiB to 12 MiB (prefill chunks of that many tokens too); "prefill": larger
#: chunks, up to the largest measured size (64 MiB = 4,096 tokens at d_model 8,192). Prefill
#: chunks above it (max_batched_tokens 16,384 x d_model 8,192 x 2 = 256 MiB) are extrapolated
#: (see :func:`allreduce_extrapolation_errors`).
ALLREDUCE_BANDS = {
    "decode": (1 * 4096 * 2.0, 512 * 12288 * 2.0),
    "prefill": (512 * 12288 * 2.0, 64 * 2.0**20),
}
#: neighbours of a measurement: other measured sizes within this many octaves either side
ALLREDUCE_NEIGHBOUR_OCTAVES = 1.0 / 8.0


@dataclass(frozen=True)
class OpRow:
    """One row of a Vidur mlp.csv: a model shape at one TP and token count, times in seconds."""

    model: str
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_ff: int
    gated: bool
    tokens: int
    tp: int
    times_s: dict[str, float]  # operator -> median seconds; absent operator -> 0

    @property
    def layer_s(self) -> float:
        return sum(self.times_s[o] for o in LAYER_OPS)

    def spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.model,
            n_layers=1,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_ff=self.d_ff,
            vocab_size=1,
            mlp="swiglu" if self.gated else "gelu",
        )


def _lines(f: Path) -> io.StringIO:
    """A profiling CSV of a user's folder, read through the bounded reader (regular file, size
    limit, UTF-8), as a text stream for ``csv``."""
    from fleetsim.base import io as fio

    return io.StringIO(fio.read_text(f, "--from-vidur", fio.MAX_TRACE_BYTES), newline="")


def load_compute(root: Path, gpu: str) -> list[OpRow]:
    """Every row of ``root/compute/gpu/*/*/mlp.csv`` (median times)."""
    files = sorted((Path(root) / "compute" / gpu).glob("*/*/mlp.csv"))
    rows: list[OpRow] = []
    for f in files:
        for r in csv.DictReader(_lines(f)):
            times = {}
            for op in (*LAYER_OPS, "emb"):
                v = r.get(f"time_stats.{op}.median")
                times[op] = float(v) * 1e-3 if v not in (None, "") else 0.0
            rows.append(
                OpRow(
                    model=f.parent.name,
                    n_heads=int(r["n_head"]),
                    n_kv_heads=int(r["n_kv_head"]),
                    d_model=int(r["n_embd"]),
                    d_ff=int(r["n_expanded_embd"]),
                    gated=r["use_gated_mlp"].strip().lower() == "true",
                    tokens=int(r["num_tokens"]),
                    tp=int(r["num_tensor_parallel_workers"]),
                    times_s=times,
                )
            )
    return rows


def load_allreduce(root: Path, topology: str) -> dict[int, list[tuple[float, float]]]:
    """Measured all-reduce (bytes, seconds) by GPU count, inside one node only."""
    f = Path(root) / "network" / topology / "all_reduce.csv"
    out: dict[int, list[tuple[float, float]]] = {}
    for r in csv.DictReader(_lines(f)):
        g = int(r["num_workers"])
        if int(r["devices_per_node"]) != g:
            continue
        out.setdefault(g, []).append(
            (float(r["size"]), float(r["time_stats.all_reduce.median"]) * 1e-3)
        )
    for v in out.values():
        v.sort()
    return out


# ------------------------------------------------------------------------------------------
# elementwise and GEMM fits
def _elem_bytes(row: OpRow) -> dict[str, float]:
    """Bytes each elementwise operator of ``row`` moves (16-bit: read + write)."""
    s = layer_shapes(row.spec(), row.tp)
    m, d = float(row.tokens), float(row.d_model)
    return {
        "input_layernorm": 4.0 * m * d,
        "post_attention_layernorm": 4.0 * m * d,
        "attn_rope": 4.0 * m * s.rope_heads,
        "mlp_act": (3.0 if s.gated else 2.0) * 2.0 * m * s.ffn_in,
        "add": 6.0 * m * d,
        "emb": 4.0 * m * d,
    }


_ELEM_OF = {
    "norm": ("input_layernorm", "post_attention_layernorm"),
    "rope": ("attn_rope",),
    "act": ("mlp_act",),
    "add": ("add",),
    "emb": ("emb",),
}


def fit_elementwise(rows: Sequence[OpRow], bw: float) -> tuple[tuple[str, float, float], ...]:
    """(op, fixed_s, bandwidth efficiency) per elementwise op: ``t = fixed + bytes/(bw*eff)``,
    non-negative least squares on relative errors."""
    from scipy.optimize import nnls

    out = []
    for op in ELEMENTWISE_OPS:
        xs, ys = [], []
        for r in rows:
            b = _elem_bytes(r)
            for vop in _ELEM_OF[op]:
                t = r.times_s[vop]
                if t > 0:
                    xs.append((1.0, b[vop] / bw))
                    ys.append(t)
        a = np.asarray(xs) / np.asarray(ys)[:, None]
        coef, _ = nnls(a, np.ones(len(ys)))
        fixed, inv_eff = float(coef[0]), float(coef[1])
        out.append((op, fixed, 1.0 / inv_eff if inv_eff > 0 else 1.0))
    return tuple(out)


def _gemm_arrays(rows: Sequence[OpRow]) -> tuple[np.ndarray, ...]:
    ms, ns, ks, ts = [], [], [], []
    for r in rows:
        s = layer_shapes(r.spec(), r.tp)
        shapes = {
            "attn_pre_proj": (s.qkv_out, r.d_model),
            "attn_post_proj": (r.d_model, s.attn_in),
            "mlp_up_proj": (s.up_out, r.d_model),
            "mlp_down_proj": (r.d_model, s.ffn_in),
        }
        for op in GEMM_OPS:
            t = r.times_s[op]
            if t > 0:
                n, k = shapes[op]
                ms.append(r.tokens)
                ns.append(n)
                ks.append(k)
                ts.append(t)
    return tuple(np.asarray(v, dtype=float) for v in (ms, ns, ks, ts))


def gemm_time_vec(
    x: Sequence[float], peak: float, bw: float, m: np.ndarray, n: np.ndarray, k: np.ndarray
) -> np.ndarray:
    """:func:`fleetsim.device.kernels.gemm_time_s` over arrays (16-bit weights), parameters in
    the order of ``_GEMM_PARAMS``."""
    launch, eff, k_half, n_half, m_half, bw_eff, p, half_cost, double_gain, tile_half = x
    tile = float(GEMM_M_TILE)
    small = np.exp2(np.ceil(np.log2(np.maximum(m, GEMM_MIN_TILE))))
    m_eff = np.minimum.reduce(
        [
            np.where(m < tile, small, np.ceil(m / tile) * tile),
            np.ceil(m / (tile / 2)) * (tile / 2) * (1.0 + half_cost),
            np.ceil(m / (2 * tile)) * (2 * tile) * (1.0 - double_gain),
        ]
    )
    shape = 1.0 + k_half / k + n_half / n + m_half / m + tile_half / m_eff
    t_c = 2.0 * m_eff * n * k / (peak * eff) * shape
    t_m = (n * k * 2.0 + (m * k + m * n) * 2.0) / (bw * bw_eff)
    hi = np.maximum(t_c, t_m)
    lo = np.minimum(t_c, t_m)
    return launch + hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)


def fit_gemm(rows: Sequence[OpRow], peak: float, bw: float) -> dict[str, float]:
    """GEMM parameters by least squares on log(predicted / measured)."""
    from scipy.optimize import least_squares

    m, n, k, t = _gemm_arrays(rows)
    x0 = [p[1] for p in _GEMM_PARAMS]
    lo = [p[2] for p in _GEMM_PARAMS]
    hi = [p[3] for p in _GEMM_PARAMS]
    scale = np.asarray(_GEMM_SCALE)

    def res(z: np.ndarray) -> np.ndarray:
        return np.log(gemm_time_vec(z * scale, peak, bw, m, n, k) / t)

    sol = least_squares(
        res,
        np.asarray(x0) / scale,
        bounds=(np.asarray(lo) / scale, np.asarray(hi) / scale),
        x_scale="jac",
    )
    return {p[0]: float(v) for p, v in zip(_GEMM_PARAMS, sol.x * scale)}


def fit_kernels(
    rows: Sequence[OpRow],
    peak: float,
    bw: float,
    allreduce: tuple[tuple[int, tuple[tuple[float, float], ...]], ...] = (),
    source: str = "",
) -> KernelFit:
    """The kernel model fitted to ``rows`` of one GPU (peak FLOP/s and bandwidth from its
    data sheet)."""
    g = fit_gemm(rows, peak, bw)
    return KernelFit(
        gemm_launch_s=g["gemm_launch_s"],
        gemm_eff_max=g["gemm_eff_max"],
        gemm_k_half=g["gemm_k_half"],
        gemm_n_half=g["gemm_n_half"],
        gemm_m_half=g["gemm_m_half"],
        gemm_m_tile=GEMM_M_TILE,
        gemm_bw_eff=g["gemm_bw_eff"],
        gemm_pnorm=g["gemm_pnorm"],
        gemm_half_tile_cost=g["gemm_half_tile_cost"],
        gemm_double_tile_gain=g["gemm_double_tile_gain"],
        gemm_tile_half=g["gemm_tile_half"],
        elem=fit_elementwise(rows, bw),
        allreduce=allreduce,
        source=source,
    )


def predict_layer_s(fit: KernelFit, peak: float, bw: float, row: OpRow) -> float:
    """The simulator's time of the linear part of one layer for a Vidur row."""
    parts = layer_parts_s(
        fit,
        peak,
        bw,
        layer_shapes(row.spec(), row.tp),
        row.tokens,
        2.0,
        two_norms=row.times_s["post_attention_layernorm"] > 0,
    )
    return sum(parts.values())


@dataclass(frozen=True)
class LomoResult:
    """Leave-one-model-out errors: signed relative errors of each held-out row."""

    errors: dict[str, list[float]]  # model -> errors over its rows
    rows: dict[str, list[OpRow]]

    def all_abs(self) -> list[float]:
        return [abs(e) for v in self.errors.values() for e in v]

    @property
    def median(self) -> float:
        return statistics.median(self.all_abs())

    @property
    def worst(self) -> float:
        return max(self.all_abs())


def leave_one_model_out(rows: Sequence[OpRow], peak: float, bw: float) -> LomoResult:
    models = sorted({r.model for r in rows})
    errs: dict[str, list[float]] = {}
    held: dict[str, list[OpRow]] = {}
    for mdl in models:
        train = [r for r in rows if r.model != mdl]
        test = [r for r in rows if r.model == mdl]
        fit = fit_kernels(train, peak, bw)
        errs[mdl] = [predict_layer_s(fit, peak, bw, r) / r.layer_s - 1.0 for r in test]
        held[mdl] = test
    return LomoResult(errs, held)


# ------------------------------------------------------------------------------------------
# all-reduce
def allreduce_table(
    points: Sequence[tuple[float, float]],
    per_octave: int = ALLREDUCE_GRID_PER_OCTAVE,
    half_window_octaves: float = ALLREDUCE_NEIGHBOUR_OCTAVES,
) -> tuple[tuple[float, float], ...]:
    """A running median of the measured times: at sizes ``2^(j/per_octave)`` bytes (integer
    j) from the smallest to the largest measured size, the median time of the measurements
    within ``half_window_octaves`` either side (sizes whose window holds none are left out).
    Below ~1 MiB the measured sizes are 8 KiB apart, so a window holds one to a few
    measurements there and the table follows them; above, dozens."""
    s = np.asarray([p[0] for p in points], dtype=float)
    t = np.asarray([p[1] for p in points], dtype=float)
    ls = np.log2(s)
    lo = math.ceil(float(ls.min()) * per_octave - 1e-9)
    hi = math.floor(float(ls.max()) * per_octave + 1e-9)
    out = []
    for j in range(lo, hi + 1):
        w = np.abs(ls - j / per_octave) <= half_window_octaves + 1e-12
        if w.any():
            out.append((float(round(2.0 ** (j / per_octave))), float(np.median(t[w]))))
    if not out:  # sizes within one grid step: their medians
        out.append((float(np.median(s)), float(np.median(t))))
    return tuple(out)


def allreduce_leave_one_out(points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Each measured size's time as the table predicts it when that measurement is left out
    of the table. Only the table's sizes near it change, so the table is rebuilt from the
    measurements within a quarter octave, or out to the next measured size on each side."""
    pts = sorted(points)
    s = np.asarray([p[0] for p in pts], dtype=float)
    ls = np.log2(s)
    step = 2.0 / ALLREDUCE_GRID_PER_OCTAVE
    pred = np.empty(len(s))
    for i in range(len(s)):
        gap_lo = ls[i] - ls[i - 1] if i > 0 else 0.0
        gap_hi = ls[i + 1] - ls[i] if i + 1 < len(s) else 0.0
        reach = max(2.0 * ALLREDUCE_NEIGHBOUR_OCTAVES, gap_lo, gap_hi) + step
        near = [pts[j] for j in np.nonzero(np.abs(ls - ls[i]) <= reach)[0] if j != i]
        pred[i] = interp_table(allreduce_table(near), s[i])
    order = np.argsort([p[0] for p in points], kind="stable")
    out = np.empty(len(s))
    out[order] = pred
    return out


@dataclass(frozen=True)
class AllreduceCheck:
    """The all-reduce table against the measurements in one band of message sizes.

    ``within10``: the fraction of measured sizes whose time the committed table gives within
    10%. ``loo_*``: the same with each measurement left out of the table in turn (the
    table's accuracy at sizes it was not built from: message sizes between measurements).
    Below ~1 MiB a single measurement's repetitions scatter by a median 19% (std / mean in the
    file) and neighbouring sizes by 2-5x, so the leave-one-out fraction cannot reach 1 there:
    it measures how well neighbouring measurements agree, which is all a table can do."""

    band: str
    lo_bytes: float
    hi_bytes: float
    n: int
    median_err: float
    within10: float
    loo_median_err: float
    loo_within10: float
    loo_worst: float


def allreduce_checks(
    points: Sequence[tuple[float, float]],
    table: tuple[tuple[float, float], ...],
    bands: dict[str, tuple[float, float]] | None = None,
) -> list[AllreduceCheck]:
    """The table (interpolated as the simulator does, :func:`interp_table`) against every
    measured point of each band of :data:`ALLREDUCE_BANDS`, in and out of sample."""
    s = np.asarray([p[0] for p in points])
    t = np.asarray([p[1] for p in points])
    err = np.abs(np.asarray([interp_table(table, x) for x in s]) / t - 1.0)
    loo = np.abs(allreduce_leave_one_out(points) / t - 1.0)
    out = []
    for band, (lo, hi) in (bands or ALLREDUCE_BANDS).items():
        sel = (s >= lo) & (s <= hi)
        if not sel.any():
            continue
        out.append(
            AllreduceCheck(
                band,
                lo,
                hi,
                int(sel.sum()),
                float(np.median(err[sel])),
                float(np.mean(err[sel] <= 0.10)),
                float(np.median(loo[sel])),
                float(np.mean(loo[sel] <= 0.10)),
                float(loo[sel].max()),
            )
        )
    return out


def allreduce_extrapolation_errors(
    points: Sequence[tuple[float, float]], octaves: float = 1.0
) -> tuple[float, float]:
    """(most negative, most positive) relative error of the table's extrapolation beyond its
    largest size, tested by building the table without the top ``octaves`` of measured sizes
    and predicting them."""
    top = max(p[0] for p in points)
    cut = top / 2.0**octaves
    table = allreduce_table([p for p in points if p[0] <= cut])
    errs = [interp_table(table, s) / t - 1.0 for s, t in points if s > cut]
    return min(errs), max(errs)


# ------------------------------------------------------------------------------------------
# the catalog file
@dataclass
class GpuFit:
    catalog_gpu: str
    fit: KernelFit
    lomo: LomoResult | None
    allreduce_checks: dict[int, list[AllreduceCheck]]
    allreduce_extrapolation: dict[int, tuple[float, float]]
    n_rows: int
    models: list[str]


def fit_folder(
    root: Path,
    gpus: Iterable[str] | None = None,
    lomo: bool = True,
    catalog_names: dict | None = None,
) -> list[GpuFit]:
    """Fit every GPU folder under ``root/compute`` (or the given ones)."""
    from fleetsim.device import catalog

    root = Path(root)
    names = sorted(p.name for p in (root / "compute").glob("*") if p.is_dir())
    out = []
    for g in names:
        if gpus is not None and g not in gpus:
            continue
        cat_name, topo = VIDUR_GPUS.get(g, (g, f"{g}_dgx"))
        if catalog_names and g in catalog_names:
            cat_name = catalog_names[g]
        entry = catalog.gpu(cat_name, "--gpu")
        peak, bw = float(entry["peak_flops"]), float(entry["mem_bw_bytes_per_s"])
        rows = load_compute(root, g)
        ar: dict[int, list[tuple[float, float]]] = {}
        if (root / "network" / topo / "all_reduce.csv").exists():
            ar = load_allreduce(root, topo)
        tables = tuple((n, allreduce_table(pts)) for n, pts in sorted(ar.items()))
        fit = fit_kernels(
            rows,
            peak,
            bw,
            allreduce=tables,
            source=f"fitted to Vidur operator times ({g}); all-reduce measured ({topo})",
        )
        checks = {n: allreduce_checks(ar[n], t) for n, t in tables}
        extrap = {n: allreduce_extrapolation_errors(ar[n]) for n, _ in tables}
        several = len({r.model for r in rows}) > 1
        res = leave_one_model_out(rows, peak, bw) if lomo and several else None
        models = sorted({r.model for r in rows})
        out.append(GpuFit(cat_name, fit, res, checks, extrap, len(rows), models))
    return out


def derive(fit: KernelFit, link_ratio: float, name: str, basis: str) -> KernelFit:
    """A GPU without measurements: the efficiencies and fixed times of ``fit`` (applied by the
    simulator to the GPU's own data-sheet peak FLOP/s and bandwidth), the all-reduce table with
    message sizes scaled by ``link_ratio`` (its NVLink bandwidth over the fitted GPU's)."""
    tables = tuple((n, tuple((s * link_ratio, t) for s, t in table)) for n, table in fit.allreduce)
    return KernelFit(
        gemm_launch_s=fit.gemm_launch_s,
        gemm_eff_max=fit.gemm_eff_max,
        gemm_k_half=fit.gemm_k_half,
        gemm_n_half=fit.gemm_n_half,
        gemm_m_half=fit.gemm_m_half,
        gemm_m_tile=fit.gemm_m_tile,
        gemm_bw_eff=fit.gemm_bw_eff,
        gemm_pnorm=fit.gemm_pnorm,
        gemm_half_tile_cost=fit.gemm_half_tile_cost,
        gemm_double_tile_gain=fit.gemm_double_tile_gain,
        gemm_tile_half=fit.gemm_tile_half,
        elem=fit.elem,
        allreduce=tables,
        source=f"derived from the {basis} fit by data-sheet peak FLOP/s, memory and NVLink "
        f"bandwidth ratios (confidence L): {name} has no measurements here",
    )


#: GPUs derived from a fitted one: name -> (basis GPU, reason)
DERIVED = {"h200": "h100-sxm", "b200": "h100-sxm"}


def _size(b: float) -> str:
    return f"{b / 2**10:.0f} KiB" if b < 2**20 else f"{b / 2**20:.0f} MiB"


def _band_text(c: AllreduceCheck) -> str:
    return (
        f"{c.band} sizes {_size(c.lo_bytes)}-{_size(c.hi_bytes)}: median error, fraction "
        "within 10%; the same leaving each measurement out"
    )


def _fmt(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def kernels_toml(fits: Sequence[GpuFit]) -> str:
    """The text of ``catalog/kernels.toml``."""
    from fleetsim.device import catalog

    lines = [
        "# Kernel model of each catalog GPU (fleetsim.device.kernels). GENERATED by",
        "#   python -m fleetsim.calibrate.vidur --write",
        "# from data/vidur-profiling (Vidur's measured A100/H100 operator times, MIT; see its",
        "# SOURCE.md). Do not edit by hand: tests/test_vidur_fit.py refits and compares.",
        "# provenance: 'fitted' = least squares on measured operator times; 'measured' =",
        "# medians of measured all-reduce times; 'derived' = another GPU's fit applied to this",
        "# GPU's data-sheet peak FLOP/s and bandwidth (NVLink for the all-reduce), confidence L.",
        "",
    ]
    by_name = {f.catalog_gpu: f for f in fits}
    entries: list[tuple[str, KernelFit, str, GpuFit | None]] = [
        (f.catalog_gpu, f.fit, "fitted", f) for f in fits
    ]
    for name, basis in DERIVED.items():
        if basis in by_name and name not in by_name:
            ratio = float(catalog.gpu(name)["link_bw_bytes_per_s"]) / float(
                catalog.gpu(basis)["link_bw_bytes_per_s"]
            )
            entries.append((name, derive(by_name[basis].fit, ratio, name, basis), "derived", None))
    for name, fit, prov, gf in entries:
        lines.append(f'["{name}"]')
        lines.append(f'provenance = "{prov}"')
        lines.append(f"source = {fit.source!r}".replace("'", '"'))
        for k in (
            "gemm_launch_s",
            "gemm_eff_max",
            "gemm_k_half",
            "gemm_n_half",
            "gemm_m_half",
            "gemm_m_tile",
            "gemm_bw_eff",
            "gemm_pnorm",
            "gemm_half_tile_cost",
            "gemm_double_tile_gain",
            "gemm_tile_half",
        ):
            v = getattr(fit, k)
            lines.append(f"{k} = {_fmt(round(v, 9) if isinstance(v, float) else v)}")
        for op, fixed, eff in fit.elem:
            lines.append(f"elem_{op} = [{_fmt(round(fixed, 10))}, {_fmt(round(eff, 6))}]")
        if gf is not None and gf.lomo is not None:
            lines.append(
                f"lomo_median_err = {round(gf.lomo.median, 4)}  # leave-one-model-out, "
                f"{gf.n_rows} rows, models {', '.join(gf.models)}"
            )
            lines.append(f"lomo_worst_err = {round(gf.lomo.worst, 4)}")
        for n, table in fit.allreduce:
            pts = ", ".join(f"[{s:.0f}, {t:.4g}]" for s, t in table)
            tag = "derived" if prov == "derived" else "measured"
            lines.append(f"allreduce_tp{n} = [{pts}]  # [bytes, s] ({tag})")
        if gf is not None:
            for n, checks in sorted(gf.allreduce_checks.items()):
                for c in checks:
                    lines.append(
                        f"allreduce_tp{n}_{c.band}_err = [{round(c.median_err, 4)}, "
                        f"{round(c.within10, 4)}, {round(c.loo_median_err, 4)}, "
                        f"{round(c.loo_within10, 4)}]  # {_band_text(c)}"
                    )
                lo, hi = gf.allreduce_extrapolation[n]
                lines.append(
                    f"allreduce_tp{n}_extrapolation_err = [{round(lo, 4)}, {round(hi, 4)}]  "
                    "# beyond the largest size: table without the top octave vs its points"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fleetsim.calibrate.vidur",
        description="Fit the kernel model to Vidur-format operator times and print the "
        "leave-one-model-out errors.",
    )
    p.add_argument("dir", nargs="?", type=Path, default=None, help="default: data/vidur-profiling")
    p.add_argument(
        "--write", action="store_true", help="rewrite simulator/device/catalog/kernels.toml"
    )
    a = p.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    root = a.dir or repo / "data" / "vidur-profiling"
    fits = fit_folder(root)
    for f in fits:
        assert f.lomo is not None
        print(
            f"{f.catalog_gpu}: leave-one-model-out median {f.lomo.median:.1%}, "
            f"worst {f.lomo.worst:.1%} over {f.n_rows} rows"
        )
        for n, checks in sorted(f.allreduce_checks.items()):
            for c in checks:
                print(
                    f"  all-reduce TP{n} {c.band} sizes {_size(c.lo_bytes)}-{_size(c.hi_bytes)} "
                    f"({c.n} measured): median error {c.median_err:.1%}, {c.within10:.1%} "
                    f"within 10%; leaving each out: {c.loo_median_err:.1%}, "
                    f"{c.loo_within10:.1%} (worst {c.loo_worst:.0%})"
                )
            lo, hi = f.allreduce_extrapolation[n]
            print(
                f"  all-reduce TP{n} extrapolated one octave beyond the table: "
                f"{lo:+.1%} to {hi:+.1%}"
            )
    text = kernels_toml(fits)
    if a.write:
        out = repo / "simulator" / "device" / "catalog" / "kernels.toml"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
