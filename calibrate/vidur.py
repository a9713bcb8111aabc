"""Fit the kernel model of :mod:`fleetsim.device.kernels` to operator times in Vidur's format.

Input: a folder laid out as Vidur's ``data/profiling`` (``compute/GPU/ORG/MODEL/mlp.csv`` and
``network/TOPOLOGY/all_reduce.csv``; see ``data/vidur-profiling/SOURCE.md``). Output, per GPU:

* the elementwise operators' fixed time and bandwidth efficiency (non-negative least squares on
  relative errors, one pair per operator);
* the GEMM parameters (launch time, peak efficiency and its shape terms, memory efficiency, the
  blend exponent, the cost and gain of half- and double-height row tiles), fitted by least
  squares on the log of each measured GEMM time;
* the all-reduce table: the median measured time in bins of a quarter octave of message size,
  for each GPU count inside one node;
* the leave-one-model-out error: fit on all shapes but one, predict every TP and token count of
  the one left out, with the simulator's own code (:func:`fleetsim.device.kernels.layer_parts_s`).

``python -m fleetsim.calibrate.vidur --write`` regenerates ``simulator/device/catalog/kernels.toml``
from ``data/vidur-profiling``; ``fleetsim calibrate --from-vidur DIR`` writes profile JSON files.
Needs numpy and scipy only (no torch, no pandas).
"""

from __future__ import annotations

import argparse
import csv
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
ALLREDUCE_BINS_PER_OCTAVE = 4
ALLREDUCE_MIN_POINTS = 8  # single measurements below ~1 MiB scatter by 2-5x
#: message sizes TP uses: a decode of 1 sequence of d_model 2,048 (4 KiB) up to the largest
#: measured size (64 MiB, a prefill chunk of 4,096 tokens at d_model 8,192)
ALLREDUCE_CHECK_BYTES = (4096.0, 67108864.0)


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


def load_compute(root: Path, gpu: str) -> list[OpRow]:
    """Every row of ``root/compute/gpu/*/*/mlp.csv`` (median times)."""
    files = sorted((Path(root) / "compute" / gpu).glob("*/*/mlp.csv"))
    rows: list[OpRow] = []
    for f in files:
        with f.open(newline="") as fh:
            for r in csv.DictReader(fh):
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
    with f.open(newline="") as fh:
        for r in csv.DictReader(fh):
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
    per_octave: int = ALLREDUCE_BINS_PER_OCTAVE,
    min_points: int = ALLREDUCE_MIN_POINTS,
) -> tuple[tuple[float, float], ...]:
    """Median time in bins of 1/per_octave octave of message size, a bin with fewer than
    ``min_points`` measurements merged into the next; x = the bin's median size."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for s, t in points:
        bins.setdefault(math.floor(math.log2(s) * per_octave), []).append((s, t))
    groups: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    for b in sorted(bins):
        cur.extend(bins[b])
        if len(cur) >= min_points:
            groups.append(cur)
            cur = []
    if cur:
        if groups:
            groups[-1].extend(cur)
        else:
            groups.append(cur)
    return tuple(
        (float(statistics.median(p[0] for p in g)), float(statistics.median(p[1] for p in g)))
        for g in groups
    )


def allreduce_errors(
    points: Sequence[tuple[float, float]],
    table: tuple[tuple[float, float], ...],
    lo: float = ALLREDUCE_CHECK_BYTES[0],
    hi: float = ALLREDUCE_CHECK_BYTES[1],
) -> tuple[float, float]:
    """(median relative error, fraction of sizes within 10%) of the table against every
    measured point with a size in [lo, hi]. Single measurements below ~1 MiB scatter between
    7 and 40 us at neighbouring sizes, so no smooth table meets 10% at every point."""
    errs = [abs(interp_table(table, s) / t - 1.0) for s, t in points if lo <= s <= hi]
    return statistics.median(errs), sum(e <= 0.10 for e in errs) / len(errs)


# ------------------------------------------------------------------------------------------
# the catalog file
@dataclass
class GpuFit:
    catalog_gpu: str
    fit: KernelFit
    lomo: LomoResult | None
    allreduce_err: dict[int, tuple[float, float]]
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
        errs = {n: allreduce_errors(ar[n], t) for n, t in tables}
        several = len({r.model for r in rows}) > 1
        res = leave_one_model_out(rows, peak, bw) if lomo and several else None
        out.append(GpuFit(cat_name, fit, res, errs, len(rows), sorted({r.model for r in rows})))
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
            for n, (med, worst) in sorted(gf.allreduce_err.items()):
                lines.append(
                    f"allreduce_tp{n}_err = [{round(med, 4)}, {round(worst, 4)}]  "
                    "# median error, fraction within 10%, vs measurements 4 KiB-64 MiB"
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
        for n, (med, worst) in sorted(f.allreduce_err.items()):
            print(f"  all-reduce TP{n}: median error {med:.1%}, {worst:.1%} of sizes within 10%")
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
