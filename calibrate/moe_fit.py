"""Fit the fused MoE kernel's loop latency to ML.ENERGY's MoE / expert-parallel rows.

    python -m fleetsim.calibrate.moe_fit [--workers 1] [--write]

What the rows show (``data/mlenergy-v3``, vLLM 0.11.1): without it the simulated MoE
servers are too fast at small and mid batch wherever the layer has no tuned kernel
configuration (Qwen3-235B-A22B under EP4/EP8, Qwen3-Coder-480B, the fp8 checkpoints), by a
nearly constant time per step (e.g. Qwen3-235B-A22B-FP8 on 4 H100s: 18-22 ms at every batch
from 8 to 192), while the single-GPU Qwen3-30B-A3B rows, whose layer shape vLLM ships tuned
configurations for (``fused_moe/configs/E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json``
and ``..._B200.json``), are within a few per cent. The model for it
(:class:`fleetsim.device.moe.FusedMoeFit`): each grouped-GEMM launch of the fused MoE kernel
adds ``ceil(K / BLOCK_SIZE_K)`` serial loop steps of one program per wave of programs to its
throughput-bound time, with vLLM's default block configuration (``get_default_config``: 16-bit
K 64 while the tokens are at most the local experts, else K 32; fp8 block-quantised K 128, per
whole wave of a grid over every local expert, touched or not:
:func:`fleetsim.device.moe.fp8_default_grid_waves`), and each MoE layer pays a fixed routing
time.

Where the benchmark's server ran FlashInfer's TensorRT-LLM fp8 MoE kernel instead of Triton's
(``fleet.fp8_moe_kernel``, set by the harness from ``data/mlenergy-v3/server_env.csv``: DeepSeek
on the B200), that kernel's two constants are fitted with the rest, to those rows only:
``fi_layer_s`` (its fixed time per MoE layer) and ``fi_bw_frac`` (the bandwidth fraction at
which it streams the experts; :func:`fleetsim.device.moe.flashinfer_moe_gemm_s`).

Per GPU (H100, B200) three constants are fitted by coordinate search, minimising the mean
absolute log error of the median ITL over the non-suspect MoE rows: ``k_step_s`` (16-bit
experts), ``k_step_fp8_s`` (fp8 experts) and ``layer_s``. The simulated ITL of each row comes
from one end-to-end simulation (:func:`fleetsim.calibrate.mlenergy.simulate_config`) with the
catalog's constants; a candidate's ITL is that plus the change of the decode step at the row's
mean batch and context (``P + E[L^2] / (2 E[L])``), which is what the median inter-token gap
is made of. Leave-one-model-out: each model is predicted with the constants fitted to the
others. ``--write`` stores the all-model fit in ``simulator/device/catalog/moe.toml``; the
other catalog GPUs (A100, H200) get the H100's constants, tagged derived.

``--mma GPU`` fits one more constant, ``mma_frac`` (:data:`MMA_FRAC`, written with the rest):
the fused-MoE kernel's own MMA rate, which bounds the grouped GEMMs of prefill-carrying steps
(thousands of routed rows) and not decode steps, so it is fitted to what those steps set, the
rows' output tokens/s over the benchmark's steady-state window, by a grid of end-to-end
simulations (:func:`fit_mma`, 5-10 minutes per GPU on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from statistics import median

from fleetsim.base import io as fio
from fleetsim.calibrate import mlenergy as ml
from fleetsim.device.moe import NO_MOE_FIT, FusedMoeFit

CATALOG = Path(__file__).resolve().parent.parent / "simulator" / "device" / "catalog" / "moe.toml"
#: the fit's inputs cached by ``--write``: each row's end-to-end simulated median ITL under the
#: catalog's constants, so that ``--targets`` (and tests/test_moe_drift.py) refit in seconds
#: without the simulations
TARGETS = Path(__file__).resolve().parent.parent / "tests" / "data" / "moe_fit_targets.csv"
PARAMS = ("k_step_s", "k_step_fp8_s", "k_step_fp8_default_s", "layer_s")
#: the constants of FlashInfer's TensorRT-LLM fp8 block-scale MoE kernel (FusedMoeFit
#: fi_layer_s, fi_bw_frac), fitted with the rest to the rows whose servers ran it
#: (``fleet.fp8_moe_kernel = "flashinfer-trtllm"``: DeepSeek-V3.1 and R1 on the B200, from the
#: benchmark's server environment, data/mlenergy-v3/server_env.csv); 0 on a GPU without such rows
FI_PARAMS = ("fi_layer_s", "fi_bw_frac")
ALL_PARAMS = PARAMS + FI_PARAMS
#: coordinate-search grid of each constant (seconds)
GRID = {
    "k_step_s": [i * 0.05e-6 for i in range(0, 61)],
    "k_step_fp8_s": [i * 0.1e-6 for i in range(0, 81)],
    "k_step_fp8_default_s": [i * 0.1e-6 for i in range(0, 101)],
    "layer_s": [i * 2e-6 for i in range(0, 51)],
    "fi_layer_s": [i * 2e-6 for i in range(0, 151)],
    "fi_bw_frac": [round(0.2 + i * 0.025, 3) for i in range(0, 33)],
}
DERIVED = {"a100-80gb": "h100-sxm", "h200": "h100-sxm"}
#: FusedMoeFit.mma_frac by catalog GPU: the fraction of the experts' dense tensor-core peak at
#: which vLLM 0.11.1's Triton ``fused_moe_kernel`` computes its routed rows. ``--mma`` scores a
#: grid by end-to-end simulations (:func:`fit_mma`: mean |log error| of the output tokens/s of
#: the non-suspect single-engine MoE rows). That loss is flat below ~0.34 PFLOP/s on both GPUs
#: (B200 0.1305 at 0.15 of its 2,250 TFLOP/s, 0.1286 at 0.10; H100 0.0511 at 0.34 of its 989,
#: 0.0475 at 0.22) while the H100's median-ITL worst grows past its 40 % floor below it
#: (Qwen3-Coder-30B-A3B EP2 at 256 sequences and up, whose decode steps then reach the bound:
#: 32.7 % at 0.34, 41.4 % at 0.22), so the catalog takes the one rate both GPUs share at
#: ~0.34 PFLOP/s: the kernel does not gain the B200's faster tensor cores, as the measured rows
#: say (the mean-minus-median step of a model at a batch is the same on both GPUs,
#: docs/accuracy-log.md). H200: the H100's (same GH100 chip, derived); A100: 1, no bound (no MoE
#: rows on it; its kernel fit's GEMMs stand).
MMA_FRAC = {"h100-sxm": 0.34, "b200": 0.15, "h200": 0.34, "a100-80gb": 1.0}
#: FusedMoeFit.fp8_wave_frac, every catalog GPU: the share of a program's K loop that each whole
#: wave of an fp8 block-quantised fused-MoE launch adds after the first
#: (moe.fp8_default_loop_latency_s). Fitted on this module's surrogate (the rows' ITL minus
#: their simulated fp8 loop, each candidate's loop added back with the step times refitted),
#: leaving out the data-parallel rows at 128+ sequences (their median ITL sits on
#: prefill-carrying steps): the B200 is the one GPU whose rows hold one kernel class at two
#: local-expert counts (default tiles: Qwen3-235B-A22B-FP8 EP2 / EP4; tuned: Coder-480B-FP8 DP4
#: / DP8), |ITL error| median default / tuned rows 3.8 / 19.0 % at 1 (every wave the whole
#: loop), 2.9 / 3.4 % at 0.4, 2.0 / 6.3 % at 0.5, 3.5 / 5.0 % at 0.3; the H100's rows (one
#: local-expert count per class) cannot tell it from the step times and take the same (with
#: one fp8 step for both classes they pick 0.25-0.4 too: 2.3-3.0 %)
FP8_WAVE_FRAC = 0.4
#: the --mma search grid per GPU (fractions of the experts' dense peak)
MMA_GRID = {
    "h100-sxm": (1.0, 0.5, 0.4, 0.34, 0.28, 0.22, 0.17),
    "b200": (1.0, 0.3, 0.2, 0.15, 0.12, 0.1, 0.08),
}
#: 16-bit (E, N) layer shapes that vLLM ships a tuned fused_moe configuration for, per catalog
#: GPU: files ``vllm/model_executor/layers/fused_moe/configs/E={E},N={N},device_name={dev}.json``
#: of vllm-project/vllm, each seen at the commit named (the v0.11.1 tag itself not checked):
#: H100 (NVIDIA_H100_80GB_HBM3) E=128,N=768 (4466f1b5), E=64,N=768 (47c44391), E=8,N=7168
#: (4652ef5d); B200 (NVIDIA_B200) E=128,N=768 (bd66a975); H200 (NVIDIA_H200) E=128,N=768
#: (4652ef5d), E=8,N=7168 (c6991a3b), E=8,N=14336 (432a38c4); A100 (NVIDIA_A100-SXM4-80GB)
#: E=8,N=7168 (10efe946). Not found: E=16 or 32,N=1536 (Qwen3-235B-A22B under EP8/EP4) and
#: E=20,N=2560 (Qwen3-Coder-480B under EP8) on H100 or B200, E=8,N=7168 (Mixtral-8x7B under TP2)
#: on B200.
TUNED = {
    "h100-sxm": [(128, 768), (64, 768), (8, 7168)],
    "b200": [(128, 768)],
    "h200": [(128, 768), (8, 7168), (8, 14336)],
    "a100-80gb": [(8, 7168)],
}
#: fp8 [128, 128] block-quantised (E, N) shapes vLLM ships a tuned configuration for, per catalog
#: GPU: files ``vllm/model_executor/layers/fused_moe/configs/E={E},N={N},device_name={dev},
#: dtype=fp8_w8a8,block_shape=[128,128].json`` of vllm-project/vllm, each seen at the commit named
#: (the v0.11.1 tag itself not checked): H100 E=16,N=1536 (a5766486: Qwen3-235B-A22B under EP8),
#: E=32,N=2048 (fa42f12b: DeepSeek-V3 under EP8); B200 E=32,N=2048 (432a38c4), E=20,N=2560
#: (93e5a576), E=40,N=2560 (0f17ee06: Qwen3-Coder-480B under EP8 / EP4); H200 E=32,N=2048
#: (dd30740a). Not found: E=32 or 64,N=1536 (Qwen3-235B-A22B under EP4 / EP2) on H100 or B200,
#: E=16,N=1536 on B200 or H200.
TUNED_FP8 = {
    "h100-sxm": [(16, 1536), (32, 2048)],
    "b200": [(32, 2048), (20, 2560), (40, 2560)],
    "h200": [(32, 2048)],
}
#: the tuned fp8 files' entry at their largest token key, per catalog GPU: ``(E, N, key_below,
#: key_top, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps)``, which
#: ``try_get_optimal_moe_config`` (nearest key to the kernel's tokens) gives every launch of more
#: than (3,072 + 4,096) / 2 = 3,584 tokens (``FusedMoeFit.tuned_fp8_large_m``,
#: ``device.moe.tuned_fp8_tiles``). Read from the same files of vllm-project/vllm (key "4096";
#: commits: B200 E=20,N=2560 93e5a576, E=40,N=2560 0f17ee06, E=32,N=2048 432a38c4; H100
#: E=16,N=1536 a5766486, E=32,N=2048 fa42f12b; H200 E=32,N=2048 c6991a3b; the v0.11.1 tag itself
#: not checked)
TUNED_FP8_LARGE_M = {
    "h100-sxm": [
        (16, 1536, 3072, 4096, 128, 128, 64, 3, 8),
        (32, 2048, 3072, 4096, 64, 128, 128, 3, 4),
    ],
    "b200": [
        (32, 2048, 3072, 4096, 64, 256, 128, 4, 8),
        (20, 2560, 3072, 4096, 64, 128, 128, 4, 4),
        (40, 2560, 3072, 4096, 64, 128, 128, 3, 4),
    ],
    "h200": [(32, 2048, 3072, 4096, 64, 128, 128, 3, 4)],
}
#: streaming multiprocessors and shared memory per SM of each catalog GPU (not fitted)
HARDWARE = {
    "a100-80gb": (
        108,
        164 * 1024,
        "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): 108 SMs; CUDA C++ "
        "Programming Guide, compute capability 8.0: 164 KB shared memory per SM",
    ),
    "h100-sxm": (
        132,
        228 * 1024,
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 132 SMs (SXM5); CUDA C++ "
        "Programming Guide, compute capability 9.0: 228 KB shared memory per SM",
    ),
    "h200": (
        132,
        228 * 1024,
        "the H100 SXM's GH100 configuration (NVIDIA H200 product brief: same Hopper GPU, more "
        "and faster memory)",
    ),
    "b200": (
        148,
        228 * 1024,
        "148 SMs (TechPowerUp GPU database, b200-sxm-192-gb; confidence M); NVIDIA Blackwell "
        "Tuning Guide: 228 KB shared memory per SM, as the H100",
    ),
}


@dataclass
class FitRow:
    """One non-suspect MoE row: measured and simulated median ITL, and its surrogate."""

    config: ml.Config
    sim_itl_s: float
    lm: object  # the row's LatencyModel
    batch: int
    ctx: int
    base_fit: FusedMoeFit
    base_step_s: float = 0.0

    #: the decode step by the constants it depends on (:meth:`step_s`): the coordinate search
    #: and its leave-one-model-out refits visit the same candidates many times
    memo: dict = field(default_factory=dict, repr=False)

    def step_s(self, fit: FusedMoeFit) -> float:
        key = _relevant(fit, self.lm)
        v = self.memo.get(key)
        if v is None:
            lm = self.lm
            was = lm._moe_fit  # type: ignore[attr-defined]
            lm.use_moe_fit(fit)  # type: ignore[attr-defined]
            v = self.memo[key] = lm.decode_time(self.batch, self.ctx)  # type: ignore[attr-defined]
            lm.use_moe_fit(was)  # type: ignore[attr-defined]  # (the row's model as it was)
        return v

    def itl_s(self, fit: FusedMoeFit) -> float:
        return self.sim_itl_s + self.step_s(fit) - self.base_step_s

    @property
    def meas_s(self) -> float:
        return self.config.itl_median_ms / 1e3


def _relevant(fit: FusedMoeFit, lm) -> FusedMoeFit:
    """``fit`` with the constants a row's MoE layers never read zeroed (the key of
    :attr:`FitRow.memo`): a 16-bit layer reads no fp8 or FlashInfer constant
    (``moe.k_loop_latency_s`` takes ``k_step_s`` unless the experts are fp8), an fp8 one not
    ``k_step_s``, and only a FlashInfer row reads ``fi_layer_s`` / ``fi_bw_frac``."""
    if not lm._fp8_block:
        return replace(
            fit, k_step_fp8_s=0.0, k_step_fp8_default_s=0.0, fi_layer_s=0.0, fi_bw_frac=0.0
        )
    if lm._fp8_kernel != "flashinfer-trtllm":
        return replace(fit, k_step_s=0.0, fi_layer_s=0.0, fi_bw_frac=0.0)
    return replace(fit, k_step_s=0.0)


def latency_model(c: ml.Config, profile_fields: dict | None = None):
    """The latency model of row ``c`` as the harness resolves it; ``profile_fields`` replaces
    fields of its profile (a folder's fitted constants, :func:`mlenergy.simulate_config`)."""
    from fleetsim.api import load
    from fleetsim.config.scenario import resolve

    with tempfile.TemporaryDirectory(prefix="fleetsim-moefit-") as tmp:
        tr = Path(tmp) / "t.csv"
        tr.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,100\n")
        rs = resolve(load(ml.scenario_dict(c, str(tr), 1)), "")
    if profile_fields:
        rs = replace(rs, profile=replace(rs.profile, **profile_fields))
    return rs.latency_model()


def build_rows(
    workers: int = 1, data_dir: Path | None = None, fields: dict[str, dict] | None = None
) -> list[FitRow]:
    """Simulate every non-suspect MoE / expert-parallel row of ``data_dir`` (default
    data/mlenergy-v3) once, with the catalog's constants or, by GPU (``"B200"``), the profile
    fields ``fields`` (a folder's fitted serving-stack constants, and its MoE constants as
    ``moe_fit``: the surrogate then starts from those)."""
    configs = fit_configs(data_dir)
    fs = fields or {}
    runs = ml.simulate_all(configs, workers, fields=fs)
    return [
        _row(c, r.itl_median_s, profile_fields=fs.get(c.gpu_model))
        for c, r in zip(configs, runs, strict=True)
        if not r.error
    ]


def _row(
    c: ml.Config,
    sim_itl_s: float,
    simulated_with: dict | None = None,
    profile_fields: dict | None = None,
) -> FitRow:
    """A fit row; ``simulated_with`` the constants its ``sim_itl_s`` was simulated with (default:
    the catalog's, which the latency model carries, or ``profile_fields``' ``moe_fit``)."""
    lm = latency_model(c, profile_fields)
    ctx = int(ml.PROMPT_TOKENS[c.task] + ml.length_biased_half(c))
    base = lm._moe_fit
    if simulated_with is not None:
        base = replace(base, **simulated_with)
    row = FitRow(c, sim_itl_s, lm, max(1, round(c.avg_batch_size)), ctx, base)
    row.base_step_s = row.step_s(row.base_fit)
    return row


def fit_configs(data_dir: Path | None = None) -> list[ml.Config]:
    """The rows the fit uses: every simulated, non-suspect MoE / expert-parallel row of
    ``data_dir`` (default data/mlenergy-v3)."""
    configs, _ = ml.select(ml.read_configs(data_dir or ml.DATA_DIR))
    return [c for c in configs if c.moe_or_ep and not c.suspect]


def constants_line(gpu: str, fit: FusedMoeFit) -> str:
    """How the targets file records the constants one GPU's rows were simulated with."""
    return (
        f"# {gpu} k_step_s={fit.k_step_s!r} k_step_fp8_s={fit.k_step_fp8_s!r} "
        f"k_step_fp8_default_s={fit.k_step_fp8_default_s!r} layer_s={fit.layer_s!r} "
        f"fi_layer_s={fit.fi_layer_s!r} fi_bw_frac={fit.fi_bw_frac!r} "
        f"fp8_wave_frac={fit.fp8_wave_frac!r}"
    )


def write_targets(rows: list[FitRow], path: Path = TARGETS) -> None:
    """Store each row's simulated median ITL (exact float) and the constants it was simulated
    with (one header line per GPU)."""
    lines = [
        "# GENERATED by `python -m fleetsim.calibrate.moe_fit --write`: the end-to-end simulated",
        "# median ITL of every non-suspect MoE row of data/mlenergy-v3 under the constants below",
        "# (catalog/moe.toml); the fit's surrogate starts from these (moe_fit.FitRow.itl_s).",
    ]
    seen: dict[str, FusedMoeFit] = {}
    for r in rows:
        seen.setdefault(r.config.gpu_model, r.base_fit)
    lines += [constants_line(g, f) for g, f in sorted(seen.items())]
    lines.append("source_file,config_index,gpu,sim_itl_s")
    lines += [
        f"{r.config.source_file},{r.config.config_index},{r.config.gpu_model},{r.sim_itl_s!r}"
        for r in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_targets(path: Path = TARGETS) -> tuple[dict[tuple[str, int], float], dict[str, dict]]:
    """``({(source_file, config_index): sim_itl_s}, {gpu: the constants it was simulated
    with})``."""
    consts: dict[str, dict] = {}
    out = {}
    for line in fio.read_text(path, "", fio.MAX_TRACE_BYTES).splitlines():
        if line.startswith("# ") and " k_step_s=" in line:
            gpu, *kv = line[2:].split()
            consts[gpu] = {k: float(v) for k, v in (x.split("=") for x in kv)}
        elif line and not line.startswith(("#", "source_file,")):
            src, idx, _gpu, itl = line.split(",")
            out[(src, int(idx))] = float(itl)
    return out, consts


def rows_from_targets(path: Path = TARGETS) -> list[FitRow]:
    """The fit's rows from the stored targets (no simulation), each relative to the constants
    its target was simulated with. Raises ValueError when a fit row has no target (rerun
    ``python -m fleetsim.calibrate.moe_fit --write``)."""
    targets, consts = read_targets(path)
    rows = []
    for c in fit_configs():
        key = (c.source_file, c.config_index)
        if key not in targets or c.gpu_model not in consts:
            raise ValueError(f"{path.name}: no target for {c.key} (rerun moe_fit --write)")
        rows.append(_row(c, targets[key], consts[c.gpu_model]))
    return rows


def _with(fit: FusedMoeFit, name: str, value: float) -> FusedMoeFit:
    if name not in ALL_PARAMS:
        raise KeyError(name)
    return replace(fit, **{name: value})  # type: ignore[arg-type]


def _fi(r: FitRow) -> bool:
    """Whether the row's server runs FlashInfer's TensorRT-LLM fp8 MoE kernel."""
    return bool(r.lm._fp8_block) and r.lm._fp8_kernel == "flashinfer-trtllm"  # type: ignore[attr-defined]


def hardware_fit(gpu: str) -> FusedMoeFit:
    """No loop latency, with the GPU's SM count, shared memory and tuned shapes (:data:`HARDWARE`,
    :data:`TUNED`)."""
    sms, smem, _ = HARDWARE[gpu]
    return replace(
        NO_MOE_FIT,
        sms=sms,
        smem_per_sm_bytes=float(smem),
        tuned=tuple(TUNED.get(gpu, ())),
        tuned_fp8=tuple(TUNED_FP8.get(gpu, ())),
        tuned_fp8_large_m=tuple(TUNED_FP8_LARGE_M.get(gpu, ())),
        mma_frac=MMA_FRAC.get(gpu, 1.0),
        fp8_wave_frac=FP8_WAVE_FRAC,
    )


def mma_configs(gpu_model: str) -> list[ml.Config]:
    """The rows the MMA-rate fit uses: :func:`fit_configs` of one GPU (``"B200"``), single
    engine (``dp = 1``: the data-parallel rows' slow padded steps are not explained yet,
    docs/accuracy-log.md)."""
    return [c for c in fit_configs() if c.gpu_model == gpu_model and c.dp == 1]


@contextmanager
def mma_override(gpu: str, frac: float) -> Iterator[None]:
    """Simulate with ``FusedMoeFit.mma_frac = frac`` on catalog GPU ``gpu`` (the latency
    model reads the catalog's fit when it is built, inside the engine)."""
    from fleetsim.device import latency

    orig = latency.catalog_moe_fit

    def patched(profile_name: str, catalog_gpu: str | None = None) -> FusedMoeFit:
        f = orig(profile_name, catalog_gpu)
        return replace(f, mma_frac=frac) if (catalog_gpu or profile_name).startswith(gpu) else f

    latency.catalog_moe_fit = patched
    try:
        yield
    finally:
        latency.catalog_moe_fit = orig


def tokens_s_errors(configs: list[ml.Config], gpu: str, frac: float) -> list[float]:
    """Log error of each row's simulated output tokens/s (its steady-state window, as the
    accuracy harness measures it) with ``mma_frac = frac``; NaN for a failed run."""
    with mma_override(gpu, frac):
        runs = ml.simulate_all(configs, 1)
    return [
        math.nan if r.error else math.log(r.tokens / r.window_s / c.tokens_per_s)
        for c, r in zip(configs, runs, strict=True)
    ]


def _loss_without(loss_at: Callable[[float, str], float], model: str, v: float) -> float:
    return loss_at(v, model)


def fit_mma(gpu_model: str, grid: tuple[float, ...] | None = None) -> dict:
    """Grid search of ``mma_frac`` for one GPU (``"B200"``) on the mean |log error| of the
    output tokens/s of :func:`mma_configs`, in sample and leave-one-model-out (each model's
    rows scored at the value fitted to the others)."""
    gpu = ml.GPUS[gpu_model]
    configs = mma_configs(gpu_model)
    grid = grid or MMA_GRID[gpu]
    errs = {v: tokens_s_errors(configs, gpu, v) for v in grid}

    def loss_at(v: float, left_out: str = "") -> float:
        e = [
            abs(x)
            for c, x in zip(configs, errs[v], strict=True)
            if c.model_id != left_out and x == x
        ]
        return sum(e) / max(len(e), 1)

    best = min(grid, key=loss_at)
    lomo: list[float] = []
    for m in sorted({c.model_id for c in configs}):
        v = min(grid, key=partial(_loss_without, loss_at, m))
        lomo += [x for c, x in zip(configs, errs[v], strict=True) if c.model_id == m and x == x]
    return {
        "gpu": gpu,
        "rows": len(configs),
        "best": best,
        "loss": {v: loss_at(v) for v in grid},
        "lomo": [math.expm1(x) for x in lomo],
        "by_value": {v: [math.expm1(x) for x in errs[v] if x == x] for v in grid},
    }


def _fp8_tuned(r: FitRow, fit: FusedMoeFit) -> bool:
    """Whether the row's MoE layer shape (local experts, columns per GPU) is one of the GPU's
    tuned fp8 shapes (``FusedMoeFit.tuned_fp8``: it runs at ``k_step_fp8_s``, else at
    ``k_step_fp8_default_s``)."""
    m = r.lm.model  # type: ignore[attr-defined]
    lay = r.lm.layout  # type: ignore[attr-defined]
    if lay.expert_parallel:
        shape = (round(m.n_experts / lay.ep), round(m.d_ff_expert))
    else:
        shape = (round(m.n_experts), round(m.d_ff_expert / lay.ep))
    return shape in fit.tuned_fp8


def family(r: FitRow) -> tuple:
    """A row's architecture and expert precision (models that differ only in their weights)."""
    m = r.lm.model  # type: ignore[attr-defined]
    return (m.n_layers, m.d_model, m.n_experts, m.d_ff_expert, r.lm._fp8_block)  # type: ignore[attr-defined]


def loss(rows: list[FitRow], fit: FusedMoeFit) -> float:
    return sum(abs(math.log(r.itl_s(fit) / r.meas_s)) for r in rows) / max(len(rows), 1)


def fit_rows(rows: list[FitRow], base: FusedMoeFit, sweeps: int = 3) -> FusedMoeFit:
    """Coordinate search over :data:`GRID` of the fitted constants, from ``base`` with them at
    0 (``base`` gives the GPU's SM count and shared memory). A constant no row depends on (no
    fp8 row, say) stays 0."""
    fit = base
    # the Triton kernel's fp8 steps are fitted to fp8 rows that run it (the tuned step to the
    # tuned shapes', the default tiles' to the others); FlashInfer's constants to those that run
    # that (a constant no row depends on stays at base's value)
    triton8 = [r for r in rows if r.lm._fp8_block and not _fi(r)]  # type: ignore[attr-defined]
    has_tuned8 = any(_fp8_tuned(r, base) for r in triton8)
    has_default8 = any(not _fp8_tuned(r, base) for r in triton8)
    has_16 = any(not r.lm._fp8_block for r in rows)  # type: ignore[attr-defined]
    has_fi = any(_fi(r) for r in rows)
    skip = {
        "k_step_s": not has_16,
        "k_step_fp8_s": not has_tuned8,
        "k_step_fp8_default_s": not has_default8,
    }
    for _ in range(sweeps):
        for p in ALL_PARAMS:
            if skip.get(p, False) or (p in FI_PARAMS and not has_fi):
                continue
            scored = [(loss(rows, _with(fit, p, v)), v) for v in GRID[p]]
            fit = _with(fit, p, min(scored)[1])
    # a layer with a tuned fp8 file runs at least as fast as the default tiles: without rows of
    # one kind (a model left out), that step is the other's
    if triton8 and not has_tuned8:
        fit = _with(fit, "k_step_fp8_s", fit.k_step_fp8_default_s)
    if triton8 and not has_default8:
        fit = _with(fit, "k_step_fp8_default_s", fit.k_step_fp8_s)
    return fit


def stats(errs: list[float]) -> tuple[float, float, float]:
    a = sorted(abs(e) for e in errs)
    return median(a), a[-1], median(errs)


def fitted_keys(rows: list[FitRow]) -> tuple[str, ...]:
    """The constants of :data:`ALL_PARAMS` that ``rows`` (one GPU's) determine in
    :func:`fit_rows`: ``layer_s`` with any Triton-kernel row, ``k_step_s`` with a 16-bit one,
    both fp8 steps with an fp8 one (a kind without rows takes the other's step), FlashInfer's
    two with a row that runs it. The rest would stay at the search's start (0), not a fit: a
    profile leaves them to the catalog."""
    triton8 = [r for r in rows if r.lm._fp8_block and not _fi(r)]  # type: ignore[attr-defined]
    has_16 = any(not r.lm._fp8_block for r in rows)  # type: ignore[attr-defined]
    keys: list[str] = []
    if has_16:
        keys.append("k_step_s")
    if triton8:
        keys += ["k_step_fp8_s", "k_step_fp8_default_s"]
    if has_16 or triton8:
        keys.append("layer_s")
    if any(_fi(r) for r in rows):
        keys += list(FI_PARAMS)
    return tuple(k for k in ALL_PARAMS if k in keys)


@dataclass
class GpuFit:
    """One GPU's constants fitted to its rows (:func:`fit_gpu`): the median ITL's |error|
    median / worst / signed median (:func:`stats`) with the constants the rows were simulated
    with (``before``), in sample and leave-one-model-out (None with one model)."""

    gpu_model: str
    fit: FusedMoeFit
    keys: tuple[str, ...]
    rows: int
    models: list[str]
    before: tuple[float, float, float]
    insample: tuple[float, float, float]
    lomo: tuple[float, float, float] | None
    lomo_rows: list[tuple[FitRow, float]]

    def constants(self) -> dict[str, float]:
        """The fitted constants (:attr:`keys`) as a profile's ``moe_constants`` (to 6
        significant digits: the grid's values without their float noise, 8.5e-07 not
        8.499999999999999e-07)."""
        return {k: float(f"{getattr(self.fit, k):.6g}") for k in self.keys}

    def summary(self) -> dict:
        def d(s: tuple[float, float, float] | None) -> dict | None:
            return None if s is None else {"median": s[0], "worst": s[1], "signed_median": s[2]}

        return {
            "provenance": "fitted",
            "method": "calibrate/moe_fit.py: coordinate search, mean |log error| of the median ITL",
            "rows": self.rows,
            "models": self.models,
            "constants": self.constants(),
            "simulated_with_itl": d(self.before),
            "fitted_itl": d(self.insample),
            "lomo_itl": d(self.lomo),
        }


def fit_gpu(rows: list[FitRow], gpu_model: str) -> GpuFit:
    """The constants of GPU ``gpu_model`` (``"B200"``) fitted to its ``rows``, in sample and
    each model predicted with the constants fitted to the others."""
    gr = [r for r in rows if r.config.gpu_model == gpu_model]
    base = hardware_fit(ml.GPUS[gpu_model])
    full = fit_rows(gr, base)
    models = sorted({r.config.model_id for r in gr})
    lomo: list[tuple[FitRow, float]] = []
    if len(models) > 1:
        for m in models:
            f = fit_rows([r for r in gr if r.config.model_id != m], base)
            lomo += [(r, r.itl_s(f) / r.meas_s - 1.0) for r in gr if r.config.model_id == m]
    return GpuFit(
        gpu_model,
        full,
        fitted_keys(gr),
        len(gr),
        models,
        stats([r.itl_s(r.base_fit) / r.meas_s - 1.0 for r in gr]),
        stats([r.itl_s(full) / r.meas_s - 1.0 for r in gr]),
        stats([e for _, e in lomo]) if lomo else None,
        lomo,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleetsim.calibrate.moe_fit", description=__doc__)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--write", action="store_true", help=f"write {CATALOG.name}")
    ap.add_argument("--rows", action="store_true", help="print every row's LOMO error")
    ap.add_argument(
        "--targets",
        action="store_true",
        help=f"refit from the stored simulated ITLs ({TARGETS.name}) instead of simulating",
    )
    ap.add_argument(
        "--mma",
        metavar="GPU",
        help="fit FusedMoeFit.mma_frac of GPU (H100 or B200) on the MoE rows' tokens/s "
        "(end-to-end simulations on MMA_GRID; prints the grid, keeps the catalog as it is)",
    )
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.mma:
        res = fit_mma(a.mma)
        print(
            f"{res['gpu']}: mma_frac fit on {res['rows']} rows' output tokens/s: best {res['best']}"
        )
        for v, lo in res["loss"].items():
            s = stats(res["by_value"][v])
            print(
                f"  mma_frac {v:5.2f}: mean |log error| {lo:.4f}; |error| median {s[0]:6.1%}"
                f" worst {s[1]:6.1%} signed {s[2]:+6.1%}"
            )
        s = stats(res["lomo"])
        print(f"  LOMO: |error| median {s[0]:6.1%} worst {s[1]:6.1%} signed {s[2]:+6.1%}")
        print(f"({time.perf_counter() - t0:.0f} s)")
        return 0
    rows = rows_from_targets() if a.targets else build_rows(a.workers)
    out: dict[str, tuple[FusedMoeFit, int, list[str], tuple, tuple]] = {}
    for g in sorted({r.config.gpu_model for r in rows}):
        gr = [r for r in rows if r.config.gpu_model == g]
        base = hardware_fit(ml.GPUS[g])
        gf = fit_gpu(gr, g)
        full, models, lomo = gf.fit, gf.models, gf.lomo_rows
        # stricter: leave out every model of the same architecture and precision (the
        # Instruct / Thinking twins, the 30B-A3B family, R1 and V3.1)
        arch = {r.config.model_id: family(r) for r in gr}
        loao = []
        for fam in sorted(set(arch.values())):
            f = fit_rows([r for r in gr if arch[r.config.model_id] != fam], base)
            loao += [r.itl_s(f) / r.meas_s - 1.0 for r in gr if arch[r.config.model_id] == fam]
        before = [r.itl_s(r.base_fit) / r.meas_s - 1.0 for r in gr]
        insample = [r.itl_s(full) / r.meas_s - 1.0 for r in gr]
        out[g] = (full, len(gr), models, stats([e for _, e in lomo]), stats(insample))
        print(
            f"{g}: {len(gr)} rows, {len(models)} models; k_step {full.k_step_s * 1e6:.2f} us, "
            f"k_step_fp8 {full.k_step_fp8_s * 1e6:.2f} us (tuned) / "
            f"{full.k_step_fp8_default_s * 1e6:.2f} us (default tiles), "
            f"layer {full.layer_s * 1e6:.1f} us; FlashInfer TRTLLM fp8: layer "
            f"{full.fi_layer_s * 1e6:.1f} us, bandwidth x {full.fi_bw_frac:.3f}"
        )
        print("  median ITL |error| median / worst / signed median:")
        for name, e in (("catalog", before), ("in sample", insample)):
            s = stats(e)
            print(f"    {name:10} {s[0]:6.1%} {s[1]:7.1%} {s[2]:+6.1%}")
        s = out[g][3]
        print(f"    {'LOMO':10} {s[0]:6.1%} {s[1]:7.1%} {s[2]:+6.1%}")
        s = stats(loao)
        print(f"    {'LOAO':10} {s[0]:6.1%} {s[1]:7.1%} {s[2]:+6.1%}  (leave one architecture out)")
        if a.rows:
            for r, x in lomo:
                b = r.itl_s(r.base_fit) / r.meas_s - 1.0
                print(f"      {r.config.key:72} catalog {b:+6.1%}  LOMO {x:+6.1%}")
        for m in models:
            e = [x for r, x in lomo if r.config.model_id == m]
            s2 = stats(e)
            print(f"      {m:42} n={len(e):3} LOMO median {s2[0]:6.1%} worst {s2[1]:6.1%}")
    if a.write:
        write(out)
        print(f"wrote {CATALOG}")
        if not a.targets:
            write_targets(rows)
            print(f"wrote {TARGETS}")
    print(f"({len(rows)} rows in {time.perf_counter() - t0:.0f} s)")
    return 0


def mma_note(name: str) -> str:
    """The provenance comment of a GPU's ``mma_frac`` in the catalog."""
    if name in MMA_GRID:
        return "fitted (L): moe_fit --mma, the MoE rows' output tokens/s (MMA_FRAC)"
    if name == "h200":
        return "derived (L): the h100-sxm's (same GH100 chip)"
    return "none: no MoE rows on this GPU (its kernel fit's GEMMs stand)"


def write(out: dict) -> None:
    lines = [
        "# Fused mixture-of-experts kernel constants by GPU (fleetsim.device.moe.FusedMoeFit).",
        "# GENERATED by `python -m fleetsim.calibrate.moe_fit --write` from the non-suspect",
        "# MoE / expert-parallel rows of data/mlenergy-v3 (vLLM 0.11.1; see its SOURCE.md).",
        "# k_step_s / k_step_fp8_s: one serial K-loop step of a fused-MoE program (16-bit / fp8",
        "# block-quantised experts); layer_s: fixed time per MoE layer (routing kernels);",
        "# k_step_fp8_default_s: one K step of an fp8 block-quantised layer without a tuned",
        "# configuration (tuned_fp8), per whole wave of the grid over the local experts",
        "# (moe.fp8_default_loop_latency_s).",
        "# provenance 'fitted': coordinate search on the mean |log error| of the median ITL;",
        "# 'derived': another GPU's fit (confidence L). mma_frac: the fused-MoE kernel's own",
        "# MMA rate, a fraction of the experts' dense peak (moe.grouped_gemm_time_s), fitted",
        "# by `moe_fit --mma GPU` to the MoE rows' output tokens/s (moe_fit.MMA_FRAC).",
        "# fi_layer_s / fi_bw_frac: FlashInfer's TensorRT-LLM fp8 block-scale MoE kernel",
        "# (fleet.fp8_moe_kernel = 'flashinfer-trtllm', moe.flashinfer_moe_gemm_s): its fixed",
        "# time per MoE layer and the fraction of the bandwidth it streams the experts at,",
        "# fitted with the rest to the rows whose servers ran it (server_env.csv); 0: none.",
        "# fp8_wave_frac: the share of the K loop each fp8 launch wave after the first adds",
        "# (moe.fp8_default_loop_latency_s; moe_fit.FP8_WAVE_FRAC).",
        "# tuned_fp8_large_m: [E, N, key_below, key_top, BLOCK_SIZE_M, BLOCK_SIZE_N,",
        "# BLOCK_SIZE_K, num_stages, num_warps] of vLLM's tuned fp8 file at its largest key,",
        "# the tiles of every launch past (key_below + key_top) / 2 tokens (moe.tuned_fp8_tiles;",
        "# moe_fit.TUNED_FP8_LARGE_M; not fitted).",
    ]
    fits = {ml.GPUS[g]: v for g, v in out.items()}
    for name in sorted(set(fits) | set(DERIVED)):
        if name in fits:
            f, n, models, lomo, ins = fits[name]
            lines += [
                "",
                f'["{name}"]',
                'provenance = "fitted"',
                f'source = "fitted to {n} ML.ENERGY v3 MoE rows ({", ".join(models)})"',
                f"lomo_median_err = {lomo[0]:.4f}  # leave-one-model-out |error| of the median"
                f" ITL, worst {lomo[1]:.4f}, signed median {lomo[2]:+.4f}",
                f"fit_median_err = {ins[0]:.4f}  # in sample, worst {ins[1]:.4f}",
            ]
        else:
            src = DERIVED[name]
            if src not in fits:
                continue
            f = fits[src][0]
            lines += ["", f'["{name}"]', 'provenance = "derived"']
            lines.append(f'source = "the {src} fit (no ML.ENERGY MoE rows for {name})"')
        sms, smem, src = HARDWARE[name]
        lines += [
            f"k_step_s = {f.k_step_s:.4e}",
            f"k_step_fp8_s = {f.k_step_fp8_s:.4e}",
            f"k_step_fp8_default_s = {f.k_step_fp8_default_s:.4e}",
            f"layer_s = {f.layer_s:.4e}",
            f"mma_frac = {MMA_FRAC.get(name, 1.0)}  # {mma_note(name)}",
            f"fi_layer_s = {f.fi_layer_s:.4e}",
            f"fi_bw_frac = {f.fi_bw_frac:.4g}",
            f"fp8_wave_frac = {FP8_WAVE_FRAC}  # fitted (M): moe_fit.FP8_WAVE_FRAC, B200 rows",
            f"sms = {sms}",
            f"smem_per_sm_bytes = {smem}",
            "tuned = [" + ", ".join(f"[{e}, {n}]" for e, n in TUNED.get(name, ())) + "]",
            "tuned_fp8 = [" + ", ".join(f"[{e}, {n}]" for e, n in TUNED_FP8.get(name, ())) + "]",
            "tuned_fp8_large_m = ["
            + ", ".join(
                "[" + ", ".join(str(v) for v in x) + "]" for x in TUNED_FP8_LARGE_M.get(name, ())
            )
            + "]",
            f'hardware_source = "{src}"',
        ]
    tmp = CATALOG.with_name(CATALOG.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(CATALOG)


if __name__ == "__main__":
    sys.exit(main())
