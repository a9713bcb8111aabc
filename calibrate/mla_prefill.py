"""The latent-attention prefill path of an eager prompt-carrying step (``vllm-v1``, B200).

A step of a model with latent attention (MLA: DeepSeek-V3/R1) that carries prompt tokens runs,
in every attention layer, the prefill path beside the decode path (vLLM 0.11
``vllm/v1/attention/backends/mla/common.py``, ``MLACommonImpl.forward``: ``if has_prefill: ...
self._forward_prefill(...)`` then ``if has_decode: ... self._forward_decode(...)``). The
prefill path is the compute-friendly form: the latent up-projection ``kv_b_proj`` of the new
tokens, the split and concatenation of K, the prefill attention (``_run_prefill_new_tokens``)
and, for a prompt with cached context (prefix-cache hits, earlier chunks), the context loop
(``_compute_prefill_context``: gather the cache, up-project it, attend, ``merge_attn_states``)
and a final merge. Above the CUDA-graph capture size the step runs eager (the eager MoE host
floor, :mod:`fleetsim.calibrate.eager_host`), so the host launches each of these per layer:
``eager_mla_prefill_layer_host_s`` per attention layer, on top of the floor, in an eager
iteration with prompt tokens.

Evidence (measured B200 rows, DeepSeek-V3.1 lm-arena-chat on 8 GPUs, data/mlenergy-v3): the
eager steps without prompts take 113 ms at 768 sequences and 127.6 ms at 1,024 (their median
ITL, every step eager): the floor as first fitted (58 x 0.70 + 61 x 0.60 ms + 0.05 ms per
sequence) gives 115.6 and 128.4 ms. The prompt-carrying steps are the rows' slow tail: at
16-128 sequences, where 1.9-15 % of the steps carry a prompt, the 99th percentile ITL is
110-130 ms against a floor of 78-84 ms (+32 to +47 ms, 0.5-0.8 ms per attention layer); at 768
sequences the mean step is 18.8 ms above the median (the simulation without this term: 0.0).
With grouped-query attention a mixed step adds one prefill kernel call per layer
(vllm/v1/attention/backends/flashinfer.py, ``FlashInferImpl.forward``: the prefill call, then
the decode call), not a path of several ops, and Qwen3-235B on 8 B200s shows no excess at small
batches (16-64 sequences: 99th percentile 57-62 ms against its floor of 66-69 ms): the term is
latent attention's.

The fit: every non-suspect chat or code row (:data:`PROMPT_TASKS`) of a latent-attention model
on the GPU is simulated (the accuracy harness's run,
:func:`fleetsim.calibrate.mlenergy.simulate_config`, with each model's leave-one-model-out host
stall) at every grid value; the constant is the value of least mean |relative error| of the
mean step (``batch / tokens/s``) and the median step (median ITL) over those rows.
DeepSeek-V3.1 is the only latent-attention model whose rows carry prompts (R1 runs gpqa only,
under 3 % of its steps), so there is no leave-one-model-out figure: confidence L. The fit holds
the eager floor's constants as committed; :mod:`fleetsim.calibrate.eager_host` fits those
without this term (its prediction of a prompt-carrying eager iteration does not add it), so the
two are fitted in turn, not jointly.

    python -m fleetsim.calibrate.mla_prefill [--gpu B200] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

#: the grid (seconds per attention layer): 0 .. 1.0 ms by 0.1 ms
GRID_S = tuple(round(i * 1e-4, 6) for i in range(11))
#: the profile's (and catalog/stacks.toml's) field
FIELD = "eager_mla_prefill_layer_host_s"


def has_latent_attention(model_id: str) -> bool:
    """Whether the model's config.json (data/models) describes latent attention
    (``kv_lora_rank``, as fleetsim.config.hf reads DeepSeek-V3/R1)."""
    from fleetsim.base import io
    from fleetsim.calibrate import mlenergy as ml

    path = ml.MODELS_DIR / model_id / "config.json"
    if not path.is_file():
        return False
    return bool(io.load_json(path, "the model's config.json")[0].get("kv_lora_rank"))


#: the tasks whose runs carry prompts in a measurable share of their steps (gpqa's ~9,000-token
#: outputs leave under 3 % of its steps with a prompt: the term cannot show there)
PROMPT_TASKS = ("lm-arena-chat", "sourcegraph-fim")


def mla_configs(gpu: str, data_dir=None) -> list:
    """The non-suspect, expressible rows of ``gpu`` in ``data_dir`` (default
    data/mlenergy-v3) whose model has latent attention, of the :data:`PROMPT_TASKS`."""
    from fleetsim.calibrate import mlenergy as ml

    return [
        c
        for c in ml.read_configs(data_dir or ml.DATA_DIR)
        if c.gpu_model == gpu
        and c.task in PROMPT_TASKS
        and not c.suspect
        and not ml.skip_reason(c)
        and has_latent_attention(c.model_id)
    ]


def _one(args: tuple) -> tuple[float, float]:
    """(simulated mean step, simulated median step) of one row at one grid value."""
    from fleetsim.calibrate import mlenergy as ml

    c, h, stall, fields = args
    run = ml.simulate_config(
        c, engine="iteration", host_stall_s=stall, profile_fields={**(fields or {}), FIELD: h}
    )
    if run.error:
        return math.nan, math.nan
    s = ml.step_split(c, run)
    return s.sim_mean_s, s.sim_median_s


def simulate_grid(
    configs: Sequence, grid: Sequence[float], workers: int = 2, fields: dict | None = None
) -> np.ndarray:
    """(rows, grid, 2): each row's simulated mean and median step at each grid value: with
    each model's leave-one-model-out host stall (the harness's), or with ``fields`` (a
    folder's fitted constants as profile fields, ``mlenergy.folder_profile_fields``) as
    ``fleetsim calibrate --from-mlenergy`` runs it."""
    from fleetsim.calibrate import mlenergy as ml

    stalls = {} if fields is not None else ml.lomo_host_stalls(ml.DATA_DIR, configs)
    jobs = [(c, h, stalls.get((c.gpu_model, c.model_id)), fields) for c in configs for h in grid]
    if workers <= 1:
        out = [_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            out = list(ex.map(_one, jobs, chunksize=1))
    return np.asarray(out, dtype=float).reshape(len(configs), len(grid), 2)


def errors(sim: np.ndarray, meas: np.ndarray) -> np.ndarray:
    """Relative errors (rows, grid, 2) of the simulated (mean, median) steps against the
    measured ``meas`` (rows, 2)."""
    return sim / meas[:, None, :] - 1.0


def best(err: np.ndarray, grid: Sequence[float]) -> tuple[float, float]:
    """(grid value, its mean |relative error|) of least mean |error| over rows and both
    steps; the smaller value on a tie."""
    score = np.nanmean(np.abs(err), axis=(0, 2))
    i = int(np.nanargmin(score))
    return float(grid[i]), float(score[i])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleetsim.calibrate.mla_prefill")
    ap.add_argument("--gpu", default="B200", help="the benchmark GPU whose rows to fit")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    configs = mla_configs(a.gpu)
    from fleetsim.calibrate.mlenergy import measured_steps_s

    meas = np.array([measured_steps_s(c) for c in configs])
    sim = simulate_grid(configs, GRID_S, a.workers)
    err = errors(sim, meas)
    h, score = best(err, GRID_S)
    i0, ib = 0, GRID_S.index(h)
    print(f"{a.gpu}: {len(configs)} non-suspect rows with latent attention")
    print(f"{FIELD} = {h:.4e}  (mean |error| of the mean and median steps {score:.4f})")
    for name, i in (("without", i0), ("fitted", ib)):
        for k, what in ((0, "mean step"), (1, "median step")):
            e = err[:, i, k]
            print(
                f"  {name:8s} {what:11s} median |err| {np.nanmedian(np.abs(e)):.4f}, worst"
                f" {np.nanmax(np.abs(e)):.4f}, signed median {np.nanmedian(e):+.4f}"
            )
    print("rows (mean step: measured, without -> fitted, ms):")
    for c, m, s in zip(configs, meas, sim, strict=True):
        print(f"  {c.key:72s} {1e3 * m[0]:6.1f}: {1e3 * s[i0, 0]:6.1f} -> {1e3 * s[ib, 0]:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
