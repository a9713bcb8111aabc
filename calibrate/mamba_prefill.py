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
millisecond for a 300-token prompt over its 27 layers) and, per linear-state layer of such a
step, the fixed time ``linear_state_prefill_layer_s`` fitted here.

Evidence (data/mlenergy-v3, one-GPU Nemotron Nano 9B/12B v2 lm-arena-chat): the measured mean
step (batch / tokens/s) exceeds the median ITL by 0.8-16.7 ms, the p90 / p99 ITL of the rows
whose prompt steps pass 10 % / 1 % of the steps sit 31-50 ms above the median (9B H100 b64:
16.8 / 50.7 ms), and the time each prompt-carrying step must add (``python -m
fleetsim.calibrate.mlenergy --beyond``) is about the same on the H100 and on the 2.4x faster
B200: a fixed time per prompt step, not a per-token one (a per-token state round trip would
halve on the B200). Candidate mechanism, not shown: the mixer's prefill path runs outside the
CUDA graph (a mixed batch replays piecewise graphs, the Mamba mixer being a splitting op), so
its ~10 kernel launches and their metadata per layer are host-bound.

The fit, in closed form: each non-suspect chat row of a hybrid on the GPU is simulated once
without the term; the term adds ``n_linear_layers x h`` to each prompt-carrying step, so the
row's value is its missing time per prompt step (``StepSplit.missing_per_prompt_step_s``) over
its linear-state layers; the constant is the value of least summed |relative error| of the
rows' mean steps (a weighted median of those values, :func:`row_values`) over the rows whose
prompt-carrying share of steps is at least :data:`MIN_PROMPT_SHARE` (where the time beyond the
median is carried by the prompt steps), and each model is predicted from the other's rows (two
models: 9B from 12B and back). Committed: H100 1.05 ms (12 rows; 9B from the 12B's rows 1.10
ms, 12B from the 9B's 0.98 ms), B200 1.79 ms (5 rows; 1.35 and 2.06 ms).

    python -m fleetsim.calibrate.mamba_prefill [--gpu H100] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np

#: the profile's (and catalog/stacks.toml's) field
FIELD = "linear_state_prefill_layer_s"
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


def row_values(pairs: Sequence) -> list[tuple[str, str, float, float, float]]:
    """(row key, model, prompt-step share, seconds per linear-state layer the row asks for, its
    weight) of each simulated row ``(config, run)`` (simulated without the term). The term
    moves the row's mean step by ``share x layers x (h - asked)``, so the weight ``share x
    layers / measured mean step`` makes the weighted median of the asked values the value of
    least summed |relative error| of the rows' mean steps."""
    from fleetsim.calibrate import mlenergy as ml

    out = []
    for c, r in pairs:
        n_lin = linear_layers(c.model_id)
        s = ml.step_split(c, r)
        if not n_lin or math.isnan(s.prompt_share):
            continue
        h = s.missing_per_prompt_step_s / n_lin
        out.append((c.key, c.model_id, s.prompt_share, h, s.prompt_share * n_lin / s.meas_mean_s))
    return out


def weighted_median(x: Sequence[float], w: Sequence[float]) -> float:
    """The smallest ``x`` at which the cumulative weight reaches half the total (the minimiser
    of ``sum w |h - x|``)."""
    o = np.argsort(np.asarray(x, dtype=float))
    xs, cw = np.asarray(x, dtype=float)[o], np.cumsum(np.asarray(w, dtype=float)[o])
    return float(xs[np.searchsorted(cw, 0.5 * cw[-1])])


def fit(values: Sequence[tuple[str, str, float, float, float]]) -> dict:
    """The constant (the weighted median over every row of share >= :data:`MIN_PROMPT_SHARE`,
    floored at 0) and, by model, the value fitted without it."""
    use = [v for v in values if v[2] >= MIN_PROMPT_SHARE]
    if not use:
        return {"value_s": 0.0, "rows": 0, "models": [], "lomo": {}}
    models = sorted({v[1] for v in use})
    lomo = {}
    for m in models:
        rest = [v for v in use if v[1] != m]
        lomo[m] = (
            max(weighted_median([v[3] for v in rest], [v[4] for v in rest]), 0.0)
            if rest
            else math.nan
        )
    return {
        "value_s": max(weighted_median([v[3] for v in use], [v[4] for v in use]), 0.0),
        "rows": len(use),
        "models": models,
        "lomo": lomo,
    }


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
        fields={g: {**(fields or {}), FIELD: 0.0} for g in by_gpu},
        prompts=ml.HARNESS_PROMPTS,
    )
    return [(c, r) for c, r in zip(configs, runs, strict=True) if not r.error]


def fit_folder(data_dir, gpu: str, fields: dict, workers: int = 2) -> tuple[float | None, str]:
    """The constant fitted to ``data_dir``'s hybrid chat rows on ``gpu``, simulated with the
    profile fields ``fields`` (the folder's stack): ``(value, line)``; ``(None, line)`` without
    such rows (the catalog's stays)."""
    configs = hybrid_configs(gpu, data_dir)
    f = fit(row_values(simulate(configs, workers, fields))) if configs else None
    if f is None or not f["rows"]:
        return None, "Mamba-2 prefill path: the catalog's (no hybrid chat row to fit it)"
    by_model: dict[str, float] = f["lomo"]
    lomo = ", ".join(f"{m.split('/')[-1]} {1e3 * h:.2f}" for m, h in by_model.items())
    return f["value_s"], (
        f"Mamba-2 prefill path {1e3 * f['value_s']:.2f} ms per layer ({f['rows']} rows; "
        f"each model from the others: {lomo} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleetsim.calibrate.mamba_prefill")
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    pairs = simulate(hybrid_configs(a.gpu), a.workers)
    vals = row_values(pairs)
    for key, _, share, h, _w in vals:
        print(f"  {key:70} share {share:4.2f} asks {1e3 * h:6.3f} ms per layer")
    f = fit(vals)
    print(
        f"{a.gpu}: {FIELD} = {f['value_s']:.4e} s ({f['rows']} rows of share >= "
        f"{MIN_PROMPT_SHARE}); leave-one-model-out: "
        + ", ".join(f"{m} {1e3 * h:.3f} ms" for m, h in f["lomo"].items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
