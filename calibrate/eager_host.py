"""The eager MoE host floor of the ``vllm-v1`` stack, fitted to the ML.ENERGY rows.

vLLM 0.11 replays a CUDA graph only for iterations of at most the largest capture size,
``min(2 x max_num_seqs, 512)`` tokens (vllm/v1/cudagraph_dispatcher.py ``dispatch``: a batch
with no captured key runs with ``CUDAGraphMode.NONE``). A larger iteration runs the compiled
model with every kernel launched from the host, and a mixture of experts' layers run their
fused-MoE layer as an opaque custom op (``torch.ops.vllm.moe_forward``,
vllm/model_executor/layers/fused_moe/layer.py ``direct_register_custom_op``): its Python body
(routing, ``moe_align_block_size``, the Triton or FlashInfer expert kernels, the expert-parallel
dispatch and combine) runs once per layer per step. On the B200 the measured rows above the
capture size (every ``max_num_seqs`` of 768 and more; prompt-carrying steps at any batch) are
slower than the GPU work and draw less power (Qwen3-30B-A3B on one B200: 910 W at b256, 601 W
at b1024), i.e. the GPU waits for the host. The form fitted here: such an iteration takes at
least ``eager_moe_layer_host_s`` per MoE layer plus ``eager_seq_host_s`` per sequence (each
engine's), the host's launch path plus its per-request work, which the launch path no longer
leaves time to hide (fleetsim.device.stack). A model with latent attention (MLA: DeepSeek) takes
``eager_mla_layer_host_s`` more per attention layer: its rows above the capture size ask for
about twice the Qwen3 MoE models' host time per layer, fitted to its rows alone (the only MLA
architecture in the data; its servers also run FlashInfer's fused MoE and CUTLASS MLA kernels,
server_env.csv, which the rows cannot tell apart from the architecture: confidence L).

The fit: every non-suspect row of a mixture of experts on one GPU is simulated once without the
floor (the iteration engine, as the accuracy harness runs it), keeping every iteration of the
run: its time, the output tokens it gives, its sequences and the tokens its layers run. The
benchmark sends every request at t = 0, so which sequences run in which iteration does not
depend on how long the iterations take (the scheduler admits by queue order and KV blocks, not
by time): the run with the floor has the same iterations, each above the capture size at
``max(its time, the floor)``. The floor's median ITL (token-weighted median of every iteration
of the run) and mean step (``batch / tokens/s`` of the steady window = its token-weighted mean
iteration) are therefore computed exactly from the one run, equal to the harness's simulation
with the floor to rounding (``tests/test_eager_host.py``). The constants are the grid point
that minimises the mean |relative error| of both over the rows (a grid, not a gradient: the
floor's max() makes the error piecewise), first the per-MoE-layer and per-sequence constants
over the rows without latent attention, then the per-MLA-layer one over the rows with it.
Leave-one-model-out: each model's rows from the constants fitted to the others.

(Before the ninth session the fit applied the floor at the window's mean batch to the median
step; the median ITL counts the whole run, whose last steps run fewer sequences under a lower
floor: Qwen3-30B-A3B b1536 predicted 110.4 ms (-10.5 %) where the harness simulates 100.5 ms
(-18.5 %).)

    python -m fleetsim.calibrate.eager_host [--gpu B200] [--workers 2] [--data DIR] [--write]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: the grid (seconds): per MoE layer 0 .. 2 ms by 0.05 ms, per sequence 0 .. 0.12 ms by 5 us
LAYER_GRID_S = tuple(round(i * 5e-5, 12) for i in range(41))
SEQ_GRID_S = tuple(round(i * 5e-6, 12) for i in range(25))
#: the profile's (and catalog/stacks.toml's) fields of the floor
FLOOR_FIELDS = ("eager_moe_layer_host_s", "eager_seq_host_s", "eager_mla_layer_host_s")


@dataclass(frozen=True, eq=False)
class FloorRow:
    """One row simulated without the floor: its measured and simulated median ITL and mean
    step (s), and the iterations of the run the floor can lift (more tokens than the capture
    size) apart from the others. Iterations without an output token weigh nothing in either
    figure and are left out."""

    key: str
    model: str
    moe_layers: int
    mla_layers: int  # latent-attention layers (0 without MLA)
    meas_median_s: float
    meas_mean_s: float
    sim_median_s: float
    sim_mean_s: float
    #: the iterations above the capture size: time without the floor (s), sequences per engine
    #: (the floor's count), output tokens, in the steady window
    eager_s: np.ndarray
    eager_seqs: np.ndarray
    eager_tokens: np.ndarray
    eager_in_window: np.ndarray
    #: the other iterations' times, sorted, and their output tokens' running sum in that order
    fixed_s: np.ndarray
    fixed_cum_tokens: np.ndarray
    total_tokens: float  # output tokens of the whole run (the median's weights)
    window_tokens: float  # of the steady window (the mean's)
    window_fixed_token_s: float  # sum of tokens x time of the window's other iterations


def row_from_run(c: Any, run: Any) -> FloorRow:
    """The :class:`FloorRow` of configuration ``c`` (calibrate/mlenergy.py ``Config``) and its
    run simulated without the floor with ``record_steps`` (``simulate_config``)."""
    from fleetsim.calibrate import mlenergy as ml

    s = ml.step_split(c, run)
    w = run.step_tokens
    keep = w > 0
    eager = keep & (run.step_lin_tokens > run.graph_tokens) & bool(run.moe_layers)
    fixed = keep & ~eager
    o = np.argsort(run.step_s[fixed], kind="stable")
    fw = w[fixed][o]
    win = run.step_in_window
    return FloorRow(
        key=c.key,
        model=c.model_id,
        moe_layers=run.moe_layers,
        mla_layers=run.mla_layers,
        meas_median_s=s.meas_median_s,
        meas_mean_s=s.meas_mean_s,
        sim_median_s=s.sim_median_s,
        sim_mean_s=s.sim_mean_s,
        eager_s=run.step_s[eager],
        eager_seqs=np.ceil(run.step_seqs[eager] / c.dp),
        eager_tokens=w[eager],
        eager_in_window=win[eager],
        fixed_s=run.step_s[fixed][o],
        fixed_cum_tokens=np.cumsum(fw),
        total_tokens=float(w[keep].sum()),
        window_tokens=float(w[keep & win].sum()),
        window_fixed_token_s=float((w[fixed & win] * run.step_s[fixed & win]).sum()),
    )


def _cum_at(vals: np.ndarray, cum: np.ndarray, x: float) -> float:
    """Running sum ``cum`` (over sorted ``vals``) of the values at most ``x``."""
    i = int(np.searchsorted(vals, x, "right"))
    return float(cum[i - 1]) if i else 0.0


def weighted_median(
    fixed_s: np.ndarray, fixed_cum: np.ndarray, vals: np.ndarray, weights: np.ndarray
) -> float:
    """The weighted median of two sets of values (one sorted with its running weights): the
    smallest value ``x`` of either with at least half the weight at or below it, the harness's
    (calibrate/mlenergy.py ``_weighted_median``) without sorting the first set again."""
    total = (float(fixed_cum[-1]) if len(fixed_cum) else 0.0) + float(weights.sum())
    if total <= 0.0:
        return math.nan
    half = 0.5 * total
    o = np.argsort(vals, kind="stable")
    ev = vals[o]
    ecum = np.cumsum(weights[o])
    best = math.inf
    if len(ev):
        # weight at or below each value: its own set's (ties included) and the other's
        c_e = ecum[np.searchsorted(ev, ev, "right") - 1]
        i_f = np.searchsorted(fixed_s, ev, "right")
        c_f = np.where(i_f > 0, fixed_cum[np.maximum(i_f - 1, 0)] if len(fixed_cum) else 0.0, 0.0)
        ok = np.flatnonzero(c_e + c_f >= half)
        if len(ok):
            best = float(ev[ok[0]])
    lo, hi = 0, len(fixed_s)  # the first fixed value with half the weight at or below it
    while lo < hi:
        mid = (lo + hi) // 2
        x = float(fixed_s[mid])
        if _cum_at(fixed_s, fixed_cum, x) + _cum_at(ev, ecum, x) >= half:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(fixed_s):
        best = min(best, float(fixed_s[lo]))
    return best


def floor_of(r: FloorRow, h_layer_s: float, h_seq_s: float, h_mla_s: float = 0.0) -> np.ndarray:
    """The floor of each of row ``r``'s iterations above the capture size (s)."""
    a = r.moe_layers * h_layer_s + r.mla_layers * h_mla_s
    return a + r.eager_seqs * h_seq_s


def predict(
    r: FloorRow, h_layer_s: float, h_seq_s: float, h_mla_s: float = 0.0
) -> tuple[float, float]:
    """(median ITL, mean step) of row ``r`` with the floor: each iteration above the capture
    size at max(its time, the floor), exactly as the simulation with the floor runs it."""
    if not len(r.eager_s):
        return r.sim_median_s, r.sim_mean_s
    d = np.maximum(r.eager_s, floor_of(r, h_layer_s, h_seq_s, h_mla_s))
    if np.array_equal(d, r.eager_s):
        return r.sim_median_s, r.sim_mean_s
    med = weighted_median(r.fixed_s, r.fixed_cum_tokens, d, r.eager_tokens)
    win = r.eager_in_window
    mean = (r.window_fixed_token_s + float((r.eager_tokens[win] * d[win]).sum())) / max(
        r.window_tokens, 1e-300
    )
    return med, mean


def errors(
    rows: Sequence[FloorRow], h_layer_s: float, h_seq_s: float, h_mla_s: float = 0.0
) -> np.ndarray:
    """Relative errors, (rows, 2): median ITL and mean step."""
    out = np.empty((len(rows), 2))
    for i, r in enumerate(rows):
        med, mean = predict(r, h_layer_s, h_seq_s, h_mla_s)
        out[i] = (med / r.meas_median_s - 1.0, mean / r.meas_mean_s - 1.0)
    return out


class _Table:
    """Each row's mean |relative error| (of the median ITL and the mean step) at every grid
    point of the per-MoE-layer and per-sequence constants (rows without latent attention; the
    per-MLA-layer constant at 0), computed once for the fit and every leave-one-out fold."""

    def __init__(self, rows: Sequence[FloorRow]) -> None:
        self.rows = list(rows)
        self.err = np.empty((len(self.rows), len(LAYER_GRID_S), len(SEQ_GRID_S)))
        for k, r in enumerate(self.rows):
            if r.mla_layers:
                self.err[k] = np.nan  # fitted in the second stage
                continue
            for i, hl in enumerate(LAYER_GRID_S):
                for j, hs in enumerate(SEQ_GRID_S):
                    self.err[k, i, j] = np.abs(errors([r], hl, hs)[0]).mean()

    def fit(self, keep: Sequence[int]) -> tuple[float, float, float]:
        """The constants fitted to rows ``keep`` (indices into the table's rows)."""
        plain = [k for k in keep if not self.rows[k].mla_layers]
        mla = [self.rows[k] for k in keep if self.rows[k].mla_layers]
        hl = hs = 0.0
        if plain:
            m = self.err[plain].mean(axis=0)
            # the first grid point of least error in the grids' order (a later one must be
            # better by 1e-12: rounding does not pick among equals)
            best = math.inf
            for i, hl_i in enumerate(LAYER_GRID_S):
                for j, hs_j in enumerate(SEQ_GRID_S):
                    if m[i, j] < best - 1e-12:
                        best, hl, hs = float(m[i, j]), hl_i, hs_j
        hm, e_m = 0.0, math.inf
        for h in LAYER_GRID_S if mla else ():
            e = float(np.abs(errors(mla, hl, hs, h)).mean())
            if e < e_m - 1e-12:
                hm, e_m = h, e
        return hl, hs, hm


def fit(rows: Sequence[FloorRow]) -> tuple[float, float, float]:
    """(per MoE layer s, per sequence s, per MLA layer s): the first two the grid point of
    least mean |relative error| over the rows without latent attention, the third then the
    grid point over the rows with it (the others' constants held)."""
    return _Table(rows).fit(range(len(rows)))


def lomo(rows: Sequence[FloorRow], table: _Table | None = None) -> np.ndarray:
    """Each model's rows' errors with the constants fitted to the other models' rows."""
    t = table or _Table(rows)
    out = np.empty((len(rows), 2))
    for model in sorted({r.model for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.model == model]
        train = [i for i, r in enumerate(rows) if r.model != model]
        out[idx] = errors([rows[i] for i in idx], *t.fit(train))
    return out


def _simulate(args: tuple) -> Any:
    from fleetsim.calibrate import mlenergy as ml

    c, stall, fields = args
    return ml.simulate_config(
        c, engine="iteration", host_stall_s=stall, profile_fields=fields, record_steps=True
    )


def simulate_rows(
    gpu: str,
    data_dir: Path | None = None,
    workers: int = 1,
    stalls: dict[tuple[str, str], float] | None = None,
    profile_fields: dict[str, float] | None = None,
) -> list[FloorRow]:
    """The non-suspect expressible rows of mixtures of experts (or expert parallelism) of
    ``gpu`` in ``data_dir`` (default data/mlenergy-v3), simulated without the floor in a pool
    of ``workers`` processes. ``stalls``: the host stall per step by (GPU, model) as the
    harness charges it (mlenergy.py ``lomo_host_stalls``; default the catalog's);
    ``profile_fields``: the serving stack's constants fitted elsewhere (a user's folder, as
    profile fields: :func:`stack_profile_fields`)."""
    from fleetsim.calibrate import mlenergy as ml

    data = data_dir or ml.DATA_DIR
    zero = {**(profile_fields or {}), **dict.fromkeys(FLOOR_FIELDS, 0.0)}
    st = stalls or {}
    configs = [
        c
        for c in ml.read_configs(data)
        if c.gpu_model == gpu and c.moe_or_ep and not c.suspect and not ml.skip_reason(c)
    ]
    jobs = [(c, st.get((c.gpu_model, c.model_id)), zero) for c in configs]
    if workers <= 1 or len(jobs) <= 1:
        runs = [_simulate(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            runs = list(ex.map(_simulate, jobs, chunksize=1))
    return [
        row_from_run(c, r)
        for c, r in zip(configs, runs, strict=True)
        if not r.error and r.moe_layers
    ]


def stack_profile_fields(gpu: str, constants: dict) -> dict[str, float]:
    """The profile fields in which the serving stack ``vllm-v1`` run with ``constants`` (a
    folder's fit, calibrate/stack.py) differs from the catalog's on catalog GPU ``gpu``
    (``simulate_config(profile_fields=...)``)."""
    import dataclasses

    from fleetsim.device import catalog
    from fleetsim.device.profile import catalog_profile
    from fleetsim.device.stack import apply_stack

    base = catalog_profile(gpu, catalog.gpu(gpu))
    a = apply_stack(base, "vllm-v1", gpu, 256)
    b = apply_stack(base, "vllm-v1", gpu, 256, constants=constants)
    return {
        f.name: getattr(b, f.name)
        for f in dataclasses.fields(b)
        if f.name != "name" and getattr(a, f.name) != getattr(b, f.name)
    }


@dataclass
class FloorFit:
    """The floor fitted to one GPU's rows, with its errors (median |error| over the rows of
    the median ITL and the mean step; ``objective``: the fit's mean |error| of both)."""

    gpu: str
    rows: list[FloorRow]
    constants: tuple[float, float, float]
    err_without: np.ndarray
    err_fitted: np.ndarray
    err_lomo: np.ndarray

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in self.rows})

    @property
    def adopted(self) -> bool:
        """Whether the floor predicts the models it was not fitted to better than no floor
        (the mean |error| of both figures, leave-one-model-out): the catalog's rule, by which
        the H100 keeps none (its rows ask for nearly the B200's constants but the floor does
        not carry to a model left out)."""
        return float(np.abs(self.err_lomo).mean()) < float(np.abs(self.err_without).mean())

    @property
    def profile_constants(self) -> tuple[float, float, float]:
        """What a profile carries: the fitted constants where :attr:`adopted`, else none (0)."""
        return self.constants if self.adopted else (0.0, 0.0, 0.0)

    def summary(self) -> dict:
        def st(e: np.ndarray) -> dict[str, float]:
            a = np.abs(e)
            return {
                "median_abs": round(float(np.median(a)), 4),
                "worst": round(float(a.max()), 4),
                "signed_median": round(float(np.median(e)), 4),
            }

        return {
            "rows": len(self.rows),
            "models": self.models,
            "adopted": self.adopted,
            **dict(zip(FLOOR_FIELDS, self.constants, strict=True)),
            **{
                f"{name}_{fig}": st(e[:, k])
                for name, e in (
                    ("without", self.err_without),
                    ("fitted", self.err_fitted),
                    ("lomo", self.err_lomo),
                )
                for k, fig in enumerate(("itl_median", "mean_step"))
            },
        }


def fit_gpu(rows: Sequence[FloorRow], gpu: str = "") -> FloorFit:
    """:func:`fit` and :func:`lomo` of one GPU's rows (one table of the grid for both)."""
    t = _Table(rows)
    c = t.fit(range(len(rows)))
    return FloorFit(
        gpu=gpu,
        rows=list(rows),
        constants=c,
        err_without=errors(rows, 0.0, 0.0),
        err_fitted=errors(rows, *c),
        err_lomo=lomo(rows, t),
    )


def _stats(e: np.ndarray) -> str:
    a = np.abs(e)
    return (
        f"median |err| {np.median(a):.4f}, mean {a.mean():.4f}, worst {a.max():.4f},"
        f" signed median {np.median(e):+.4f}"
    )


def report(f: FloorFit) -> list[str]:
    rows = f.rows
    hl, hs, hm = f.constants
    mla = [r for r in rows if r.mla_layers]
    lines = [
        f"{f.gpu}: {len(rows)} non-suspect rows of MoE models ({len(mla)} with latent attention"
        + (f": {', '.join(sorted({r.model for r in mla}))}" if mla else "")
        + ")",
        f"eager_moe_layer_host_s = {hl:.4e}  eager_seq_host_s = {hs:.4e}"
        f"  eager_mla_layer_host_s = {hm:.4e}"
        + ("" if f.adopted else "  (NOT adopted: no better than none leave-one-model-out)"),
    ]
    for name, e in (
        ("without the floor", f.err_without),
        ("fitted", f.err_fitted),
        ("leave-one-model-out", f.err_lomo),
    ):
        lines.append(f"  {name:20s} median ITL: {_stats(e[:, 0])}")
        lines.append(f"  {'':20s} mean step:  {_stats(e[:, 1])}")
    lines.append("rows the floor moves (median ITL, mean step: measured, without -> with, ms):")
    for r in rows:
        med, mean = predict(r, hl, hs, hm)
        if abs(med - r.sim_median_s) > 1e-4 or abs(mean - r.sim_mean_s) > 1e-4:
            lines.append(
                f"  {r.key:72s} {1e3 * r.meas_median_s:6.1f}: {1e3 * r.sim_median_s:6.1f} ->"
                f" {1e3 * med:6.1f}   {1e3 * r.meas_mean_s:6.1f}: {1e3 * r.sim_mean_s:6.1f} ->"
                f" {1e3 * mean:6.1f}"
            )
    return lines


#: the catalog file the fit's ``--write`` updates (its GPU's eager host lines only)
STACKS_TOML = (
    Path(__file__).resolve().parent.parent / "simulator" / "device" / "catalog" / "stacks.toml"
)


def write_catalog(f: FloorFit, gpu: str, path: Path = STACKS_TOML) -> str:
    """Replace the eager host lines of ``["vllm-v1"."<gpu>"]`` in ``path`` (catalog/stacks.toml)
    with fit ``f``'s constants and leave-one-model-out mean-step median (calibrate/stack.py
    writes the rest of the file and keeps these lines). A fit that is not adopted removes
    them (the GPU then has no floor). Returns the line to print."""
    from fleetsim.base import io
    from fleetsim.calibrate.stack import EAGER_HOST_KEYS, eager_host_lines

    keys = (*EAGER_HOST_KEYS, "eager_host_lomo_median_err")
    text = io.read_text(path, "the serving-stack catalog").split("\n")
    head = f'["vllm-v1"."{gpu}"]'
    if head not in text:
        raise ValueError(f"{path}: no section {head}")
    start = text.index(head) + 1
    end = next((i for i in range(start, len(text)) if text[i].startswith("[")), len(text))
    section = [ln for ln in text[start:end] if ln.split(" =")[0] not in keys]
    new: list[str] = []
    if f.adopted:
        lomo = float(np.median(np.abs(f.err_lomo[:, 1])))
        entry = {**dict(zip(EAGER_HOST_KEYS, f.constants, strict=True))}
        entry["eager_host_lomo_median_err"] = lomo
        new = eager_host_lines(entry)
    # the floor's lines where they were (after the one-GPU floor's), else before the section's
    # trailing blank lines
    at = next(
        (i + 1 for i, ln in enumerate(section) if ln.startswith("one_gpu_lomo_median_err")),
        None,
    )
    if at is None:
        at = len(section)
        while at and not section[at - 1].strip():
            at -= 1
    section[at:at] = new
    text[start:end] = section
    path.write_text("\n".join(text))
    return f"wrote {path} ({head}: " + ("the fit" if f.adopted else "no floor: not adopted") + ")"


def main(argv: list[str] | None = None) -> int:
    from fleetsim.base.errors import UserError
    from fleetsim.calibrate import mlenergy as ml

    ap = argparse.ArgumentParser(prog="python -m fleetsim.calibrate.eager_host")
    ap.add_argument("--gpu", default="B200", help="the benchmark GPU whose rows to fit")
    ap.add_argument("--data", type=Path, default=ml.DATA_DIR, help="a folder in that format")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--write",
        action="store_true",
        help="store the fit in simulator/device/catalog/stacks.toml (the GPU's eager host lines)",
    )
    args = ap.parse_args(argv)
    # the host stall per step as the harness charges it (each model's fitted without it)
    configs = [c for c in ml.read_configs(args.data) if c.gpu_model == args.gpu]
    stalls = ml.lomo_host_stalls(args.data, configs)
    rows = simulate_rows(args.gpu, args.data, args.workers, stalls)
    if not rows:
        print(
            UserError(
                f"{args.data}: no non-suspect {args.gpu} row of a mixture of experts to fit the"
                " eager host floor to (fix: --gpu with such rows, e.g. B200)"
            ),
            file=sys.stderr,
        )
        return 2
    f = fit_gpu(rows, args.gpu)
    print("\n".join(report(f)))
    if args.write:
        print(write_catalog(f, ml.GPUS[args.gpu]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
