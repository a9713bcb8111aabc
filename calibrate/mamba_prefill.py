"""The Mamba-2 prefill path of a prompt-carrying step (``vllm-v1``; Nemotron Nano v2 hybrids).

A step of a Mamba-2 hybrid that carries prompt tokens runs, in every linear-state layer, the
prefill path beside the decode path (vLLM 0.11 ``vllm/model_executor/layers/mamba/
mamba_mixer2.py``, ``MambaMixer2.forward_cuda``: the prompt tokens through
``causal_conv1d_fn`` and ``mamba_chunk_scan_combined_varlen``, i.e. the five SSD kernels of
``ops/ssd_combined.py`` (``_chunk_cumsum_fwd``, ``_chunk_state_fwd``, ``_state_passing_fwd``,
``_bmm_chunk_fwd``, ``_chunk_scan_fwd``) and ``chunk_state_varlen``; the decoding tokens
through ``causal_conv1d_update`` and ``selective_state_update``). The simulator charges the
prompt tokens the chunked scan's FLOPs and bytes (:func:`fleetsim.device.moe.
ssd_prefill_delta_s`: ~8 MFLOP and ~0.22 MB per token and layer for the 9B, under a
millisecond for a 300-token prompt over its 27 layers); such a step then takes max(its GPU
time + ``linear_state_prefill_step_s``, linear-state layers x ``linear_state_prefill_layer_s``),
the two fitted here: the mixers' prefill path launched from the host between the piecewise CUDA
graphs of a mixed step (vLLM 0.11 splits them at ``vllm.mamba_mixer2``,
``CompilationConfig.splitting_ops``), a floor the GPU hides once its own work is longer, after
a serial part per step (the Mamba-2 metadata, ``Mamba2AttentionMetadataBuilder.build``, built
on the host before the forward; or GPU time the kernel model misses: not shown).

Evidence (data/mlenergy-v3, one-GPU Nemotron Nano 9B/12B v2 lm-arena-chat): the measured mean
step (batch / tokens/s) exceeds the median ITL by 0.8-16.7 ms, the p90 / p99 ITL of the rows
whose prompt steps pass 10 % / 1 % of the steps sit 31-50 ms above the median (9B H100 b64:
16.8 / 50.7 ms), and the time each prompt-carrying step must add (``python -m
fleetsim.calibrate.mlenergy --beyond``) is about the same on the H100 and on the 2.4x faster
B200: a fixed time per prompt step, not a per-token one (a per-token state round trip would
halve on the B200). The split at the mixer is in vLLM's code (a mixed batch replays piecewise
graphs, ``vllm.mamba_mixer2`` being a splitting op), so its ~10 kernel launches per layer come
from the host; that they carry the fitted times is a candidate, not shown.

The fit: each non-suspect chat row of a hybrid on the GPU is simulated once without either
term, giving its prompt-carrying steps' GPU times ``g_i`` and the time per step its mean step
misses beyond the median (:class:`RowNeed`); the pair ``(h, a)`` minimises the rows' summed
|relative error| of the mean step, the gain per step being ``sum_i max(g_i + a, L h) - g_i`` over
the steps (:func:`best_pair`, on a grid), over the rows whose prompt-carrying share of steps is
at least :data:`MIN_PROMPT_SHARE`; the serial ``a`` is kept only where it cuts the floor-alone
error by :data:`SERIAL_MIN_GAIN`, and each model is predicted from the other's rows (two models:
9B from 12B and back). Committed: H100 floor 2.01 ms per layer, serial 26.4 ms (12 rows; 12B
from the 9B's rows 2.01 / 25.5 ms, 9B from the 12B's 2.21 / 28.2 ms); B200 floor 3.08 ms, no
serial (5 rows; 3.08 / 0 and 2.89 / 38.0 ms; 3.12 / 0 and 2.93 / 37.8 when fitted, before the
B200's dense weight stream and one-GPU floor were refitted: g41 refitted it).
docs/accuracy-log.md, "Mamba-2 prefill".

    python -m fleetsim.calibrate.mamba_prefill [--gpu H100] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the profile's (and catalog/stacks.toml's) field
FIELD = "linear_state_prefill_layer_s"
#: the serial time per prompt-carrying step (the profile's and the catalog's field)
SERIAL_FIELD = "linear_state_prefill_step_s"
#: the rows the fit reads: prompt-carrying steps at least this share of the simulated steps
MIN_PROMPT_SHARE = 0.05


def linear_layers(model_id: str) -> int:
    """The linear-state (Mamba-2) layers of ``model_id`` by its config.json (data/models):
    the ``M`` of its ``hybrid_override_pattern``; 0 for any other model."""
    from fleetsim.base import io
    from fleetsim.calibrate import mlenergy as ml

    path = ml.MODELS_DIR / model_id / "config.json"
    if not path.is_file():
        return 0
    cfg = io.load_json(path, "the model's config.json")[0]
    return str(cfg.get("hybrid_override_pattern", "")).count("M")


def hybrid_configs(gpu: str, data_dir=None) -> list:
    """The non-suspect, expressible lm-arena-chat rows of ``gpu`` whose model has
    linear-state (Mamba-2) layers."""
    from fleetsim.calibrate import mlenergy as ml

    return [
        c
        for c in ml.read_configs(data_dir or ml.DATA_DIR)
        if c.gpu_model == gpu
        and c.task == "lm-arena-chat"
        and not c.suspect
        and not ml.skip_reason(c)
        and linear_layers(c.model_id)
    ]


@dataclass(frozen=True)
class RowNeed:
    """What one simulated chat row (simulated without the floor) asks of the prefill floor."""

    key: str
    model: str
    prompt_share: float  # prompt-carrying share of the simulated window's steps
    layers: int  # linear-state (Mamba-2) layers
    steps: float  # iterations of the simulated window
    prompt_steps_s: np.ndarray  # the simulated time of each prompt-carrying step (no floor)
    missing_per_step_s: float  # measured - simulated time beyond the median, per step
    meas_mean_s: float  # measured mean step

    def added_per_step_s(self, h: float, a: float = 0.0) -> float:
        """The mean step's gain when every prompt step ``g`` takes ``max(g + a, layers x h)``
        (a serial ``a``, then the floor)."""
        g = self.prompt_steps_s
        return float((np.maximum(g + a, self.layers * h) - g).sum() / self.steps)

    @property
    def asked_serial_s(self) -> float:
        """The serial time per prompt step at which the row's mean step reaches the measured
        one without a floor (0 where the row asks for nothing)."""
        n = len(self.prompt_steps_s)
        return max(self.missing_per_step_s * self.steps / n, 0.0) if n else 0.0

    @property
    def asked_s(self) -> float:
        """The floor per layer at which the row's mean step reaches the measured one (the
        smallest; 0 where the row asks for nothing or is already too slow)."""
        need = self.missing_per_step_s * self.steps
        if not need > 0.0 or not len(self.prompt_steps_s):
            return 0.0
        # sum max(0, F - g_i) is piecewise linear in F: walk the sorted g_i
        g = np.sort(self.prompt_steps_s)
        k = np.arange(1, len(g) + 1)
        # the total gained at F = g_k: sum over i < k of g_k - g_i
        at = k * g - np.cumsum(g)
        # the first breakpoint with at >= need (at[0] = 0 < need: idx >= 1); between
        # breakpoints k - 1 and k the idx steps below F gain F - g_i each
        idx = int(np.searchsorted(at, need))
        f = g[idx - 1] + (need - at[idx - 1]) / idx
        return float(f) / self.layers


def row_values(pairs: Sequence) -> list[RowNeed]:
    """:class:`RowNeed` of each simulated row ``(config, run)`` (simulated without the floor):
    its prompt-carrying steps' times (a commit's prompt tokens are in its first iteration, the
    rest of it decodes at the window's mean decode step, :func:`mlenergy.step_split`) and the
    time per step its mean step misses."""
    from fleetsim.calibrate import mlenergy as ml

    out = []
    for c, r in pairs:
        n_lin = linear_layers(c.model_id)
        s = ml.step_split(c, r)
        if not n_lin or math.isnan(s.prompt_share):
            continue
        has_p = r.seg_prompt > 0
        g = np.asarray(r.seg_s[has_p] - (r.seg_iters[has_p] - 1.0) * s.decode_step_s, float)
        out.append(
            RowNeed(
                key=c.key,
                model=c.model_id,
                prompt_share=s.prompt_share,
                layers=n_lin,
                steps=s.steps,
                prompt_steps_s=g,
                missing_per_step_s=s.meas_beyond_s - s.sim_beyond_s,
                meas_mean_s=s.meas_mean_s,
            )
        )
    return out


def summed_error(rows: Sequence[RowNeed], h: float, a: float = 0.0) -> float:
    """The rows' summed |relative error| of the mean step under a floor of ``h`` per layer and a
    serial ``a`` per prompt step."""
    return sum(abs(r.added_per_step_s(h, a) - r.missing_per_step_s) / r.meas_mean_s for r in rows)


#: the fit's grids: the floor per layer and the serial time per step, coarse then fine (s)
H_STEPS_S = (20e-6, 1e-6)
A_STEPS_S = (0.5e-3, 0.02e-3)
#: a serial time is kept only where it lowers the summed error of the floor alone by at least
#: this share (where the GPU's own steps are under the floor it is not identified)
SERIAL_MIN_GAIN = 0.05


def _grid_errors(rows: Sequence[RowNeed], hs: np.ndarray, a: float) -> np.ndarray:
    """:func:`summed_error` at each floor of ``hs`` (one serial time ``a``)."""
    e = np.zeros(len(hs))
    for r in rows:
        g = r.prompt_steps_s
        add = (np.maximum(g[None, :] + a, r.layers * hs[:, None]) - g[None, :]).sum(axis=1)
        e += np.abs(add / r.steps - r.missing_per_step_s) / r.meas_mean_s
    return e


def _best_pair(rows: Sequence[RowNeed], serial: bool) -> tuple[float, float, float]:
    """``(floor per layer, serial per step)`` of least :func:`summed_error`: a grid of
    :data:`H_STEPS_S` / :data:`A_STEPS_S` up to the largest a row asks for (the floor alone, or
    the serial time alone), refined around its best point; ``serial=False``: the floor alone."""
    if not rows:
        return 0.0, 0.0, 0.0
    top_h = max(r.asked_s for r in rows)
    top_a = max(r.asked_serial_s for r in rows) if serial else 0.0
    best = (math.inf, 0.0, 0.0)
    hs = np.arange(0.0, top_h + H_STEPS_S[0], H_STEPS_S[0])
    for a in np.arange(0.0, top_a + A_STEPS_S[0], A_STEPS_S[0]) if serial else [0.0]:
        e = _grid_errors(rows, hs, float(a))
        i = int(np.argmin(e))
        if e[i] < best[0]:
            best = (float(e[i]), float(hs[i]), float(a))
    _, h0, a0 = best
    hs = np.arange(max(h0 - H_STEPS_S[0], 0.0), h0 + H_STEPS_S[0], H_STEPS_S[1])
    a_fine = (
        np.arange(max(a0 - A_STEPS_S[0], 0.0), a0 + A_STEPS_S[0], A_STEPS_S[1]) if serial else [0.0]
    )
    for a in a_fine:
        e = _grid_errors(rows, hs, float(a))
        i = int(np.argmin(e))
        if e[i] < best[0] - 1e-15:
            best = (float(e[i]), float(hs[i]), float(a))
    return best


def best_pair(rows: Sequence[RowNeed], serial: bool = True) -> tuple[float, float]:
    """``(floor per layer, serial per step)`` of least :func:`summed_error` (:func:`_best_pair`):
    the floor alone unless the serial time lowers the error by :data:`SERIAL_MIN_GAIN`."""
    e0, h0, _ = _best_pair(rows, False)
    if not serial:
        return h0, 0.0
    e, h, a = _best_pair(rows, True)
    return (h, a) if e0 - e > max(SERIAL_MIN_GAIN * e0, 1e-9) else (h0, 0.0)


def fit(values: Sequence[RowNeed], serial: bool = True) -> dict:
    """The floor per layer and the serial time per step (of least summed |relative error| of
    the mean steps of the rows of prompt share >= :data:`MIN_PROMPT_SHARE`) and, by model, the
    pair fitted without it."""
    use = [v for v in values if v.prompt_share >= MIN_PROMPT_SHARE]
    if not use:
        return {"value_s": 0.0, "serial_s": 0.0, "rows": 0, "models": [], "lomo": {}}
    models = sorted({v.model for v in use})
    lomo = {}
    for m in models:
        rest = [v for v in use if v.model != m]
        lomo[m] = best_pair(rest, serial) if rest else (math.nan, math.nan)
    h, a = best_pair(use, serial)
    return {"value_s": h, "serial_s": a, "rows": len(use), "models": models, "lomo": lomo}


def simulate(configs: Sequence, workers: int = 2, fields: dict | None = None) -> list:
    """``(config, run)`` of each row simulated without the term: with each model's
    leave-one-model-out host stall (the harness's), or with ``fields`` (a folder's fitted
    constants as profile fields) as ``fleetsim calibrate --from-mlenergy`` runs it."""
    from fleetsim.calibrate import mlenergy as ml

    by_gpu = {c.gpu_model for c in configs}
    stalls = {} if fields is not None else ml.lomo_host_stalls(ml.DATA_DIR, configs)
    runs = ml.simulate_all(
        configs,
        workers,
        engine="iteration",
        stalls=stalls,
        fields={g: {**(fields or {}), FIELD: 0.0, SERIAL_FIELD: 0.0} for g in by_gpu},
        prompts=ml.HARNESS_PROMPTS,
    )
    return [(c, r) for c, r in zip(configs, runs, strict=True) if not r.error]


def fit_folder(
    data_dir, gpu: str, fields: dict, workers: int = 2
) -> tuple[dict[str, float] | None, str]:
    """The floor and serial time fitted to ``data_dir``'s hybrid chat rows on ``gpu``, simulated
    with the profile fields ``fields`` (the folder's stack): ``({field: value}, line)``;
    ``(None, line)`` without such rows (the catalog's stay)."""
    configs = hybrid_configs(gpu, data_dir)
    f = fit(row_values(simulate(configs, workers, fields))) if configs else None
    if f is None or not f["rows"]:
        return None, "Mamba-2 prefill floor: the catalog's (no hybrid chat row to fit it)"
    by_model: dict[str, tuple[float, float]] = f["lomo"]
    lomo = ", ".join(
        f"{m.split('/')[-1]} {1e3 * h:.2f} / {1e3 * a:.1f}" for m, (h, a) in by_model.items()
    )
    return {FIELD: f["value_s"], SERIAL_FIELD: f["serial_s"]}, (
        f"Mamba-2 prefill floor {1e3 * f['value_s']:.2f} ms per layer, serial "
        f"{1e3 * f['serial_s']:.1f} ms per step ({f['rows']} rows; each model from the "
        f"others: {lomo} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleetsim.calibrate.mamba_prefill")
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    pairs = simulate(hybrid_configs(a.gpu), a.workers)
    vals = row_values(pairs)
    for v in vals:
        print(f"  {v.key:70} share {v.prompt_share:4.2f} asks {1e3 * v.asked_s:6.3f} ms per layer")
    use = [v for v in vals if v.prompt_share >= MIN_PROMPT_SHARE]
    for serial in (False, True):
        f = fit(vals, serial)
        err = summed_error(use, f["value_s"], f["serial_s"])
        print(
            f"{a.gpu}: {FIELD} = {f['value_s']:.4e} s, {SERIAL_FIELD} = {f['serial_s']:.4e} s "
            f"({f['rows']} rows of share >= {MIN_PROMPT_SHARE}; summed |error| "
            f"{err:.3f}); "
            "leave-one-model-out: "
            + ", ".join(f"{m} {1e3 * h:.3f} / {1e3 * s:.2f} ms" for m, (h, s) in f["lomo"].items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
