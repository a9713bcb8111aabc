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

The fit: every non-suspect row of one GPU is simulated once without the floor; the floor's
effect on the median step (the decode step when the batch exceeds the capture size) and on
the mean step (batch / tokens/s: the decode steps and the prompt-carrying steps, each at
max(its time, the floor)) is computed from the simulated steps, and the two constants are
the grid point that minimises the mean |relative error| of both over the rows (a grid, not a
gradient: the floor's max() makes the error piecewise), first the per-MoE-layer and
per-sequence constants over the rows without latent attention, then the per-MLA-layer one over
the rows with it. Leave-one-model-out: each model's rows from the constants fitted to the
others.

    python -m fleetsim.calibrate.eager_host [--gpu B200]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the grid (seconds): per MoE layer 0 .. 2 ms by 0.05 ms, per sequence 0 .. 0.12 ms by 5 us
LAYER_GRID_S = tuple(i * 5e-5 for i in range(41))
SEQ_GRID_S = tuple(i * 5e-6 for i in range(25))
#: the profile's (and catalog/stacks.toml's) fields of the floor
FLOOR_FIELDS = ("eager_moe_layer_host_s", "eager_seq_host_s", "eager_mla_layer_host_s")


@dataclass(frozen=True)
class FloorRow:
    """One simulated row without the floor, with what the floor acts on (seconds)."""

    key: str
    model: str
    moe_layers: int
    mla_layers: int  # latent-attention layers (0 without MLA)
    capture_tokens: int  # the replica's largest graphed iteration (dp x the engine's)
    dp: int
    meas_median_s: float
    meas_mean_s: float
    sim_median_s: float
    sim_mean_s: float
    decode_step_s: float  # mean pure-decode step of the window
    prompt_step_s: float  # mean prompt-carrying step
    prompt_share: float
    tokens_per_prompt_step: float
    batch: float  # simulated mean running sequences (at most max_num_seqs)


def floor_s(
    r: FloorRow, h_layer_s: float, h_seq_s: float, seqs: float, h_mla_s: float = 0.0
) -> float:
    """The floor of an iteration of ``seqs`` sequences of row ``r``'s replica."""
    if r.moe_layers == 0:
        return 0.0
    return r.moe_layers * h_layer_s + r.mla_layers * h_mla_s + math.ceil(seqs / r.dp) * h_seq_s


def predict(
    r: FloorRow, h_layer_s: float, h_seq_s: float, h_mla_s: float = 0.0
) -> tuple[float, float]:
    """(median step, mean step) of row ``r`` with the floor: the decode steps of a batch above
    the capture size and the prompt-carrying steps above it at max(their time, the floor)."""
    eager_decode = r.batch > r.capture_tokens
    f = floor_s(r, h_layer_s, h_seq_s, r.batch, h_mla_s)
    dec = max(r.decode_step_s, f) if eager_decode else r.decode_step_s
    med = max(r.sim_median_s, f) if eager_decode else r.sim_median_s
    eager_prompt = r.batch + r.tokens_per_prompt_step > r.capture_tokens
    pst = max(r.prompt_step_s, f) if eager_prompt else r.prompt_step_s
    d_dec = 0.0 if math.isnan(r.decode_step_s) else dec - r.decode_step_s
    d_pst = 0.0 if math.isnan(r.prompt_step_s) else pst - r.prompt_step_s
    mean = r.sim_mean_s + r.prompt_share * d_pst + (1.0 - r.prompt_share) * d_dec
    return med, mean


def errors(
    rows: Sequence[FloorRow], h_layer_s: float, h_seq_s: float, h_mla_s: float = 0.0
) -> np.ndarray:
    """Relative errors, (rows, 2): median step and mean step."""
    out = np.empty((len(rows), 2))
    for i, r in enumerate(rows):
        med, mean = predict(r, h_layer_s, h_seq_s, h_mla_s)
        out[i] = (med / r.meas_median_s - 1.0, mean / r.meas_mean_s - 1.0)
    return out


def fit(rows: Sequence[FloorRow]) -> tuple[float, float, float]:
    """(per MoE layer s, per sequence s, per MLA layer s): the first two the grid point of
    least mean |relative error| over the rows without latent attention, the third then the
    grid point over the rows with it (the others' constants held)."""
    plain = [r for r in rows if not r.mla_layers]
    mla = [r for r in rows if r.mla_layers]
    best = (math.inf, 0.0, 0.0)
    for hl in LAYER_GRID_S:
        for hs in SEQ_GRID_S:
            e = float(np.abs(errors(plain, hl, hs)).mean()) if plain else 0.0
            if e < best[0] - 1e-12:
                best = (e, hl, hs)
    _, hl, hs = best
    hm, e_m = 0.0, math.inf
    for h in LAYER_GRID_S if mla else ():
        e = float(np.abs(errors(mla, hl, hs, h)).mean())
        if e < e_m - 1e-12:
            hm, e_m = h, e
    return hl, hs, hm


def lomo(rows: Sequence[FloorRow]) -> np.ndarray:
    """Each model's rows' errors with the constants fitted to the other models' rows."""
    out = np.empty((len(rows), 2))
    for model in sorted({r.model for r in rows}):
        train = [r for r in rows if r.model != model]
        idx = [i for i, r in enumerate(rows) if r.model == model]
        out[idx] = errors([rows[i] for i in idx], *fit(train))
    return out


def simulate_rows(gpu: str) -> list[FloorRow]:
    """The non-suspect expressible rows of ``gpu``, simulated without the floor."""
    from fleetsim.calibrate import mlenergy as ml
    from fleetsim.device.stack import capture_max_tokens

    rows = []
    zero = dict.fromkeys(FLOOR_FIELDS, 0.0)
    for c in ml.read_configs():
        if c.gpu_model != gpu or c.suspect or ml.skip_reason(c):
            continue
        run = ml.simulate_config(c, engine="iteration", profile_fields=zero)
        if run.error:
            continue
        s = ml.step_split(c, run)
        rows.append(
            FloorRow(
                key=c.key,
                model=c.model_id,
                moe_layers=run.moe_layers,
                mla_layers=run.mla_layers,
                capture_tokens=capture_max_tokens(c.max_num_seqs) * c.dp,
                dp=c.dp,
                meas_median_s=s.meas_median_s,
                meas_mean_s=s.meas_mean_s,
                sim_median_s=s.sim_median_s,
                sim_mean_s=s.sim_mean_s,
                decode_step_s=s.decode_step_s,
                prompt_step_s=s.prompt_step_s,
                prompt_share=s.prompt_share,
                tokens_per_prompt_step=s.tokens_per_prompt_step,
                # (the window's mean tokens per step counts the prompt steps' first tokens)
                batch=min(run.avg_batch, float(c.max_num_seqs)),
            )
        )
    return rows


def _stats(e: np.ndarray) -> str:
    a = np.abs(e)
    return (
        f"median |err| {np.median(a):.4f}, mean {a.mean():.4f}, worst {a.max():.4f},"
        f" signed median {np.median(e):+.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleetsim.calibrate.eager_host")
    ap.add_argument("--gpu", default="B200", help="the benchmark GPU whose rows to fit")
    args = ap.parse_args(argv)
    rows = simulate_rows(args.gpu)
    hl, hs, hm = fit(rows)
    moe = [r for r in rows if r.moe_layers]
    mla = [r for r in rows if r.mla_layers]
    print(
        f"{args.gpu}: {len(rows)} non-suspect rows ({len(moe)} of MoE models, {len(mla)} of"
        f" them with latent attention: {', '.join(sorted({r.model for r in mla}))})"
    )
    print(
        f"eager_moe_layer_host_s = {hl:.4e}  eager_seq_host_s = {hs:.4e}"
        f"  eager_mla_layer_host_s = {hm:.4e}"
    )
    for name, e in (
        ("without the floor", errors(rows, 0.0, 0.0)),
        ("fitted", errors(rows, hl, hs, hm)),
        ("leave-one-model-out", lomo(rows)),
        ("MoE rows, without", errors(moe, 0.0, 0.0)),
        ("MoE rows, fitted", errors(moe, hl, hs, hm)),
    ):
        print(f"  {name:20s} median step: {_stats(e[:, 0])}")
        print(f"  {'':20s} mean step:   {_stats(e[:, 1])}")
    print("rows the floor moves (median step, mean step: measured, without -> with, ms):")
    for r in rows:
        med, mean = predict(r, hl, hs, hm)
        if abs(med - r.sim_median_s) > 1e-4 or abs(mean - r.sim_mean_s) > 1e-4:
            print(
                f"  {r.key:72s} {1e3 * r.meas_median_s:6.1f}: {1e3 * r.sim_median_s:6.1f} ->"
                f" {1e3 * med:6.1f}   {1e3 * r.meas_mean_s:6.1f}: {1e3 * r.sim_mean_s:6.1f} ->"
                f" {1e3 * mean:6.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
