"""Kernel-level time of the linear part of an iteration, fitted to measured operator times.

The roofline of :mod:`fleetsim.device.latency` charges a whole iteration's FLOPs at one efficiency
curve in tokens. Measured operator times (Vidur's A100 and H100 profiles, see
``data/vidur-profiling/SOURCE.md``) show why that fails under tensor parallelism: each kernel has
a floor of a few microseconds, and a GEMM's efficiency depends on its shard's shape. This module
times each operator of one layer instead:

* a GEMM of ``M`` tokens by an ``N x K`` weight shard::

      t = launch + (t_c^p + t_m^p)^(1/p)
      t_c = 2 M' N K / (peak eff_max) * (1 + k_half/K + n_half/N + m_half/M + tile_half/M')
      t_m = (N*K*w + (M*K + M*N) * 2) / (bw * bw_eff)

  ``M'`` is M padded to whole tensor-core tiles, the cheapest of three tile heights as cuBLAS
  picks among them: ``m_tile`` rows (below it: a power of two >= 16), ``m_tile/2`` rows at a
  cost of ``(1 + half_tile_cost)`` per row, and ``2 m_tile`` rows at ``(1 - double_tile_gain)``
  per row (larger tiles run closer to peak)::

      M' = min(pad(M, m_tile), pad(M, m_tile/2) * (1 + half_tile_cost),
               pad(M, 2 m_tile) * (1 - double_tile_gain))

  ``w`` is bytes per weight, activations are 16-bit; ``p`` blends the compute and memory
  bounds, a large ``p`` being the plain maximum;
* an elementwise operator (RMSNorm, rotary embedding, activation, residual add, embedding
  lookup): ``fixed + bytes / (bw * eff_op)``, bandwidth-bound;
* the tensor-parallel all-reduce: interpolated in a measured table of time by message size for
  each GPU count inside one node.

A decode step of ``n`` sequences runs ``n`` tokens through these operators whatever their
contexts, so the linear part is a constant of the run and the step stays closed-form in the
context (see :class:`fleetsim.device.latency.RunCoeffs`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from functools import cache
from math import ceil as _ceil
from math import log2 as _log2

from fleetsim.device.modelspec import ModelSpec

#: elementwise operators of the fit, with the bytes each moves per element (16-bit values)
ELEMENTWISE_OPS = ("norm", "rope", "act", "add", "emb")
GEMM_MIN_TILE = 16.0  # rows of the smallest GEMM tile (below ``gemm_m_tile`` tokens)


@dataclass(frozen=True, slots=True)
class KernelFit:
    """Per-GPU parameters of the kernel model (see the module docstring)."""

    gemm_launch_s: float
    gemm_eff_max: float
    gemm_k_half: float
    gemm_n_half: float
    gemm_m_half: float
    gemm_m_tile: int
    gemm_bw_eff: float
    gemm_pnorm: float
    #: per elementwise op: (fixed seconds, fraction of peak bandwidth), keyed by ELEMENTWISE_OPS
    elem: tuple[tuple[str, float, float], ...]
    #: measured all-reduce time by GPU count: ((gpus, ((bytes, seconds), ...)), ...)
    allreduce: tuple[tuple[int, tuple[tuple[float, float], ...]], ...] = ()
    #: tile choice (see the module docstring); the defaults are the single ``m_tile`` tile
    gemm_half_tile_cost: float = math.inf
    gemm_double_tile_gain: float = 0.0
    gemm_tile_half: float = 0.0
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def elem_params(self, op: str) -> tuple[float, float]:
        for name, fixed, eff in self.elem:
            if name == op:
                return fixed, eff
        raise KeyError(op)

    def allreduce_table(self, gpus: int) -> tuple[tuple[float, float], ...] | None:
        for g, table in self.allreduce:
            if g == gpus:
                return table
        return None


def padded_rows(m: float, tile: float) -> float:
    """``m`` rows padded to whole tiles of ``tile`` rows."""
    return float(math.ceil(m / tile) * tile)


def gemm_rows(fit: KernelFit, m: float) -> float:
    """``M'``: the rows a GEMM of ``m`` tokens computes, padded to its cheapest tile (see the
    module docstring). Below one ``m_tile``, small-M kernels use tiles of 16 rows and up,
    padded to a power of two."""
    tile = fit.gemm_m_tile
    if m < tile:
        base = 2.0 ** math.ceil(math.log2(max(m, GEMM_MIN_TILE)))
    else:
        base = padded_rows(m, tile)
    return min(
        base,
        padded_rows(m, tile / 2.0) * (1.0 + fit.gemm_half_tile_cost),
        padded_rows(m, 2.0 * tile) * (1.0 - fit.gemm_double_tile_gain),
    )


def gemm_time_s(
    fit: KernelFit,
    peak_flops: float,
    bw_bytes_per_s: float,
    m: float,
    n: float,
    k: float,
    weight_bytes_per_param: float = 2.0,
) -> float:
    """Time of one GEMM of ``m`` tokens through an ``n x k`` weight shard."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    m_eff = gemm_rows(fit, m)
    shape = (
        1.0
        + fit.gemm_k_half / k
        + fit.gemm_n_half / n
        + fit.gemm_m_half / m
        + fit.gemm_tile_half / m_eff
    )
    t_c = 2.0 * m_eff * n * k / (peak_flops * fit.gemm_eff_max) * shape
    t_m = (n * k * weight_bytes_per_param + (m * k + m * n) * 2.0) / (
        bw_bytes_per_s * fit.gemm_bw_eff
    )
    p = fit.gemm_pnorm
    hi, lo = (t_c, t_m) if t_c >= t_m else (t_m, t_c)
    # (t_c^p + t_m^p)^(1/p) written as hi * (1 + (lo/hi)^p)^(1/p): no overflow for large p
    return fit.gemm_launch_s + hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)


def elem_time_s(fit: KernelFit, bw_bytes_per_s: float, op: str, nbytes: float) -> float:
    """Time of one bandwidth-bound elementwise operator moving ``nbytes``."""
    if nbytes <= 0:
        return 0.0
    fixed, eff = fit.elem_params(op)
    return fixed + nbytes / (bw_bytes_per_s * eff)


#: id(table) -> (table, its x values, its smallest y): the all-reduce tables have ~200 points
#: and are read once per new iteration size; building the x list and the floor each time was
#: ~0.05 CPU s of a 21,556-request day (bench/bench_startup.py). The table is kept in the value
#: so that its id cannot be reused while cached.
_TABLE_CACHE: dict[int, tuple[tuple[tuple[float, float], ...], list[float], float]] = {}


def _table_info(
    table: tuple[tuple[float, float], ...],
) -> tuple[tuple[tuple[float, float], ...], list[float], float]:
    hit = _TABLE_CACHE.get(id(table))
    if hit is None or hit[0] is not table:
        hit = (table, [p[0] for p in table], min(p[1] for p in table))
        _TABLE_CACHE[id(table)] = hit
    return hit


def interp_table(table: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation of ``((x, y), ...)`` (x increasing): flat below the first
    point, extended beyond the last with the slope of the last half of the table's range (the
    bandwidth of large messages)."""
    xs = _table_info(table)[1]
    if x <= xs[0]:
        return table[0][1]
    if x >= xs[-1]:
        x1, y1 = table[-1]
        j = max(0, bisect_right(xs, x1 / 2.0) - 1)
        x0, y0 = table[j]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        return y1 + max(slope, 0.0) * (x - x1)
    i = bisect_left(xs, x)
    x0, y0 = table[i - 1]
    x1, y1 = table[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True, slots=True)
class LayerShapes:
    """Per-GPU shard shapes of one layer of ``model`` at tensor parallelism ``tp``."""

    d_model: int
    qkv_out: float  # N of the fused QKV projection
    attn_in: float  # K of the output projection
    up_out: float  # N of the (fused gate+)up projection of one expert
    ffn_in: float  # K of the down projection
    rope_heads: float  # query + key heads per GPU
    gated: bool
    n_experts: int
    n_active: int


def layer_shapes(model: ModelSpec, tp: int) -> LayerShapes:
    """Shard shapes as vLLM splits them: heads and FFN columns divided by ``tp``; KV heads
    divided too, or replicated to one per GPU when ``tp`` exceeds them."""
    hd = model.head_dim
    q = model.n_heads / tp
    kv = max(1.0, model.n_kv_heads / tp)
    gated = model.mlp == "swiglu"
    return LayerShapes(
        d_model=model.d_model,
        qkv_out=(q + 2.0 * kv) * hd,
        attn_in=q * hd,
        up_out=(2.0 if gated else 1.0) * model.d_ff / tp,
        ffn_in=model.d_ff / tp,
        rope_heads=(q + kv) * hd,
        gated=gated,
        n_experts=model.n_experts,
        n_active=model.n_active_experts,
    )


def layer_parts_s(
    fit: KernelFit,
    peak_flops: float,
    bw: float,
    s: LayerShapes,
    tokens: float,
    weight_bytes: float,
    experts_touched: float = 1.0,
    two_norms: bool = True,
) -> dict[str, float]:
    """Time of each operator of one layer over ``tokens`` tokens (the Vidur operator names)."""
    m = float(tokens)
    d = s.d_model
    out = {
        "input_layernorm": elem_time_s(fit, bw, "norm", 4.0 * m * d),
        "attn_pre_proj": gemm_time_s(fit, peak_flops, bw, m, s.qkv_out, d, weight_bytes),
        "attn_rope": elem_time_s(fit, bw, "rope", 4.0 * m * s.rope_heads),
        "attn_post_proj": gemm_time_s(fit, peak_flops, bw, m, d, s.attn_in, weight_bytes),
        "post_attention_layernorm": (
            elem_time_s(fit, bw, "norm", 4.0 * m * d) if two_norms else 0.0
        ),
        "add": elem_time_s(fit, bw, "add", 6.0 * m * d),
    }
    if s.n_experts <= 1:
        m_e, e = m, 1.0
        router = 0.0
    else:  # tokens spread over the experts they touch (uniform routing)
        e = max(experts_touched, 1.0)
        m_e = m * s.n_active / e
        router = gemm_time_s(fit, peak_flops, bw, m, s.n_experts, d, 2.0)
    act_elems = m * s.n_active * s.ffn_in if s.n_experts > 1 else m * s.ffn_in
    out["mlp_up_proj"] = e * gemm_time_s(fit, peak_flops, bw, m_e, s.up_out, d, weight_bytes)
    out["mlp_act"] = elem_time_s(fit, bw, "act", (3.0 if s.gated else 2.0) * 2.0 * act_elems)
    out["mlp_down_proj"] = e * gemm_time_s(fit, peak_flops, bw, m_e, d, s.ffn_in, weight_bytes)
    out["mlp_router"] = router
    return out


class DenseLayer:
    """:func:`layer_parts_s` of a dense layer (one expert, both norms), summed into its GEMM and
    its elementwise seconds, with what does not depend on the tokens computed once: the
    shapes' terms, the elementwise ops' parameters, the tile padding shared by the four GEMMs.

    The same float operations in the same order as :func:`gemm_time_s` and
    :func:`elem_time_s` (a left-to-right sum's leading terms are its prefix; ``0 + x`` and
    ``x + 0.0`` are ``x``), so the results are bit-identical (tests/test_kernels.py checks it
    token by token). Why: an iteration of a token count not seen before computes the layer
    again; a 21,556-request day meets ~4,900 of them, and the per-operator calls (dicts, ten
    function calls, the tile padding four times) were ~0.07 of its ~0.43 CPU s of simulation
    (bench/RESULTS.md, start-up)."""

    __slots__ = (
        "_c_act",
        "_d",
        "_el",
        "_elem",
        "_ffn",
        "_fit",
        "_gemms",
        "_rope",
        "_rows",
        "_scal",
    )

    def __init__(
        self, fit: KernelFit, peak_flops: float, bw: float, s: LayerShapes, weight_bytes: float
    ) -> None:
        if s.n_experts > 1:
            raise ValueError("DenseLayer: a mixture of experts takes layer_parts_s")
        self._fit = fit
        self._d = d = s.d_model
        self._rope = s.rope_heads
        self._c_act = (3.0 if s.gated else 2.0) * 2.0
        self._ffn = s.ffn_in
        # per op: (fixed s, bw x eff), as elem_time_s divides by them
        self._elem = {op: (fixed, bw * eff) for op, fixed, eff in fit.elem}
        # per GEMM (n, k): (1 + k_half/k + n_half/n, n, k, n k w); a non-positive n or k is 0 s
        self._gemms = tuple(
            (1.0 + fit.gemm_k_half / k + fit.gemm_n_half / n, n, k, n * k * weight_bytes)
            for n, k in ((s.qkv_out, d), (d, s.attn_in), (s.up_out, d), (d, s.ffn_in))
        )
        if any(n <= 0 or k <= 0 for _, n, k, _ in self._gemms):
            raise ValueError("DenseLayer: a GEMM with no weights takes layer_parts_s")
        # elementwise (fixed s, bw x eff) of norm, rope, add, act, in seconds()'s order
        el = self._elem
        self._el = (*el["norm"], *el["rope"], *el["add"], *el["act"])
        # gemm_rows' constants: the tile, half and double tiles and their cost factors
        tile = fit.gemm_m_tile
        self._rows = (
            tile,
            tile / 2.0,
            1.0 + fit.gemm_half_tile_cost,
            2.0 * tile,
            1.0 - fit.gemm_double_tile_gain,
        )
        self._scal = (
            fit.gemm_m_half,
            fit.gemm_tile_half,
            peak_flops * fit.gemm_eff_max,
            bw * fit.gemm_bw_eff,
            fit.gemm_pnorm,
            1.0 / fit.gemm_pnorm,
            fit.gemm_launch_s,
        )

    def seconds(self, tokens: float) -> tuple[float, float]:
        """(GEMM seconds, elementwise seconds) of one layer over ``tokens`` > 0 tokens: the
        sums that ``layer_parts_s`` (with ``two_norms``) gives, in its operators' order."""
        m = float(tokens)
        m_half, tile_half, den_c, den_m, p, inv_p, launch = self._scal
        # gemm_rows(fit, m), inlined: the same operations on the same values
        tile, half, c_half, dbl, c_dbl = self._rows
        if m < tile:
            base = 2.0 ** _ceil(_log2(m if m > GEMM_MIN_TILE else GEMM_MIN_TILE))
        else:
            base = float(_ceil(m / tile) * tile)
        m_eff = min(
            base,
            float(_ceil(m / half) * half) * c_half,
            float(_ceil(m / dbl) * dbl) * c_dbl,
        )
        mh = m_half / m
        th = tile_half / m_eff
        two_m = 2.0 * m_eff
        t_gemm = 0.0
        for base, n, k, nkw in self._gemms:
            shape = base + mh + th
            t_c = two_m * n * k / den_c * shape
            t_m = (nkw + (m * k + m * n) * 2.0) / den_m
            if t_c >= t_m:  # hi * (1 + (lo / hi) ** p) ** (1 / p), no (hi, lo) tuple
                t_gemm += launch + t_c * (1.0 + (t_m / t_c) ** p) ** inv_p
            else:
                t_gemm += launch + t_m * (1.0 + (t_c / t_m) ** p) ** inv_p
        f_n, b_n, f_r, b_r, f_a, b_a, f_x, b_x = self._el
        d = self._d
        norm = f_n + 4.0 * m * d / b_n
        t_elem = norm + (f_r + 4.0 * m * self._rope / b_r)
        t_elem += norm
        t_elem += f_a + 6.0 * m * d / b_a
        t_elem += f_x + self._c_act * (m * self._ffn) / b_x
        return t_gemm, t_elem


def allreduce_time_s(fit: KernelFit, gpus: int, nbytes: float) -> float | None:
    """Measured all-reduce time of ``nbytes`` across ``gpus`` GPUs of one node, or None when
    the fit has no table for that GPU count."""
    table = fit.allreduce_table(gpus)
    if table is None:
        return None
    return interp_table(table, nbytes)


def allreduce_floor_s(fit: KernelFit, gpus: int) -> float:
    """The latency floor of the measured all-reduce across ``gpus`` GPUs: its smallest time
    (0 without a table)."""
    table = fit.allreduce_table(gpus)
    return 0.0 if table is None else _table_info(table)[2]


def graphed_fit(fit: KernelFit, floor_frac: float) -> KernelFit:
    """``fit`` as a captured CUDA graph replays it: the fixed time of every kernel (the GEMM
    launch, the elementwise floors) scaled by ``floor_frac``. Vidur timed each operator
    launched eagerly, so its fixed times are mostly the launch path, which a graph replay
    removes; what stays is the kernel's own minimum running time."""
    return dataclasses.replace(
        fit,
        gemm_launch_s=fit.gemm_launch_s * floor_frac,
        elem=tuple((op, fixed * floor_frac, eff) for op, fixed, eff in fit.elem),
    )


def kernel_fit_from_dict(d: dict, where: str = "kernels") -> KernelFit:
    """A :class:`KernelFit` from its catalog or profile form (``elem_OP = [fixed_s, eff]``,
    ``allreduce_tpN = [[bytes, s], ...]``); a UserError names a missing or bad field."""
    from fleetsim.base.errors import UserError

    def num(key: str) -> float:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UserError(f"{where}: field {key!r} = {v!r} must be a finite non-negative number")
        return float(v)

    elem = []
    for op in ELEMENTWISE_OPS:
        v = d.get(f"elem_{op}")
        if not (
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
        ):
            raise UserError(f"{where}: field 'elem_{op}' = {v!r} must be [fixed_s, bandwidth_eff]")
        if v[1] <= 0:
            raise UserError(f"{where}: field 'elem_{op}' efficiency {v[1]!r} must be positive")
        elem.append((op, float(v[0]), float(v[1])))
    tables = []
    for key in sorted(k for k in d if k.startswith("allreduce_tp") and not k.endswith("_err")):
        try:
            gpus = int(key.removeprefix("allreduce_tp"))
            table = tuple((float(s), float(t)) for s, t in d[key])
        except (TypeError, ValueError):
            raise UserError(f"{where}: field {key!r} must be a list of [bytes, seconds]") from None
        if not table or any(b[0] <= a[0] for a, b in itertools.pairwise(table)):
            raise UserError(f"{where}: field {key!r} must have increasing message sizes")
        tables.append((gpus, table))
    for k in ("gemm_eff_max", "gemm_bw_eff", "gemm_pnorm"):
        if num(k) <= 0:
            raise UserError(f"{where}: field {k!r} must be positive")
    # tile choice: optional (absent = the single m_tile tile of earlier profiles)
    half_cost = num("gemm_half_tile_cost") if "gemm_half_tile_cost" in d else math.inf
    double_gain = num("gemm_double_tile_gain") if "gemm_double_tile_gain" in d else 0.0
    if double_gain >= 1.0:
        raise UserError(f"{where}: field 'gemm_double_tile_gain' = {double_gain!r} must be below 1")
    return KernelFit(
        gemm_launch_s=num("gemm_launch_s"),
        gemm_eff_max=num("gemm_eff_max"),
        gemm_k_half=num("gemm_k_half"),
        gemm_n_half=num("gemm_n_half"),
        gemm_m_half=num("gemm_m_half"),
        gemm_m_tile=max(1, int(num("gemm_m_tile"))),
        gemm_bw_eff=num("gemm_bw_eff"),
        gemm_pnorm=num("gemm_pnorm"),
        elem=tuple(elem),
        allreduce=tuple(sorted(tables)),
        gemm_half_tile_cost=half_cost,
        gemm_double_tile_gain=double_gain,
        gemm_tile_half=num("gemm_tile_half") if "gemm_tile_half" in d else 0.0,
        source=str(d.get("source", "")),
        meta={k: d[k] for k in ("provenance",) if k in d},
    )


def kernel_fit_to_dict(f: KernelFit) -> dict:
    """The catalog/profile form of ``f`` (inverse of :func:`kernel_fit_from_dict`)."""
    d: dict = {
        "source": f.source,
        "gemm_launch_s": f.gemm_launch_s,
        "gemm_eff_max": f.gemm_eff_max,
        "gemm_k_half": f.gemm_k_half,
        "gemm_n_half": f.gemm_n_half,
        "gemm_m_half": f.gemm_m_half,
        "gemm_m_tile": f.gemm_m_tile,
        "gemm_bw_eff": f.gemm_bw_eff,
        "gemm_pnorm": f.gemm_pnorm,
        "gemm_tile_half": f.gemm_tile_half,
        "gemm_double_tile_gain": f.gemm_double_tile_gain,
    }
    if math.isfinite(f.gemm_half_tile_cost):
        d["gemm_half_tile_cost"] = f.gemm_half_tile_cost
    for op, fixed, eff in f.elem:
        d[f"elem_{op}"] = [fixed, eff]
    for gpus, table in f.allreduce:
        d[f"allreduce_tp{gpus}"] = [[s, t] for s, t in table]
    d.update(f.meta)
    return d


@cache
def catalog_kernel_fit(gpu: str) -> KernelFit | None:
    """The committed kernel model of catalog GPU ``gpu``, or None if it has none (cached: a
    plan or a sweep resolves many scenarios on the same GPUs)."""
    from fleetsim.device import catalog

    d = catalog.kernel(gpu)
    return None if d is None else kernel_fit_from_dict(d, f"catalog kernels.toml [{gpu}]")
