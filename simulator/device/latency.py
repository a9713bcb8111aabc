"""Step times of one replica's engine iteration: a calibrated roofline, or plain coefficients.

An iteration serves ``n_prefill`` sequences whose prompts (``P`` tokens in all, ``pairs`` = the
sum of squared prompt lengths) are prefilled, and ``n`` decoding sequences that attend ``C`` keys
in all. Its time is

    roofline:  t = overhead + max(F / (tp * peak * eff_c(T)), B / (tp * bw * eff_m)) + comm(T)
    linear:    t = base + [P > 0] * prefill_base + a_tok * P + a_seq * (n_prefill + n) + a_ctx * C

with ``F`` and ``B`` the FLOPs and bytes of :class:`~fleetsim.device.modelspec.ModelSpec`,
``T = P + n`` the tokens in the iteration, ``eff_c(T) = eff_max * T / (T + T_half)`` (or a
measured table of ``eff_c`` by ``T``, interpolated in log T) and ``comm`` two ring all-reduces
per layer under tensor parallelism.

``C`` is counted in keys read by every attention layer: a sequence at context ``c`` adds ``c``
on a full-attention model, and ``c - share x max(c - W, 0)`` on one with sliding windows of ``W``
tokens on ``share`` of its attention layers (:meth:`ModelSpec.attended_keys`: the global layers
read ``c``, the window layers ``min(c, W)``; every attention layer costs the same per key, so
the step's KV read and attention FLOPs are linear in this one sum). Linear-state layers read a
constant state per sequence (in the step's fixed part), latent attention its latent per key.

Between composition changes a replica runs identical decode iterations whose only change is that
``C`` grows by ``n`` per step (with windows: by ``n - share x s``, ``s`` the sequences past their
window, as long as none crosses it: the core cuts a run where one does). Each step time is
then ``base + max(a1 + b1 C, a2 + b2 C)``: the max of two lines, so ``k`` steps sum in closed
form (:func:`run_sums`). That is what lets the engine advance ``k`` iterations with one event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fleetsim.device.kernels import (
    DenseLayer,
    KernelFit,
    allreduce_floor_s,
    elem_time_s,
    gemm_time_s,
    graphed_fit,
    interp_table,
    layer_parts_s,
    layer_shapes,
)
from fleetsim.device.modelspec import DTYPE_BYTES, ModelSpec
from fleetsim.device.moe import (
    FusedMoeFit,
    MoeLayout,
    attention_block_s,
    catalog_moe_fit,
    linear_state_block_s,
    linear_state_update_extra_s,
    mlp_parts_s,
    moe_layer_parts_s,
    ssd_prefill_delta_s,
    ssd_scan_bytes_per_token,
    ssd_scan_flops_per_token,
)

_ceil = math.ceil


#: PowerSpec's busy-time terms (W), after ``idle_w`` and the cap: the fields a profile file and a
#: scenario's ``[hardware]`` carry beside them (device/profile.py, config/aggregated.py)
POWER_TERMS_W = (
    "active_w",
    "compute_w",
    "memory_w",
    "kv_w",
    "comm_w",
    "moe_loop_w",
    "moe_compute_w",
    "host_w",
)


@dataclass(frozen=True, slots=True)
class PowerSpec:
    """Per-GPU power model.

    ``P = min(max_w, idle_w + [busy] * (active_w + compute_w * u_c + memory_w * u_m
    + kv_w * u_kv + moe_compute_w * u_moe))`` with ``u_c`` the fraction of peak FLOP/s (``u_moe``
    its routed experts' grouped-GEMM part, a mixture of experts only) and ``u_m`` the fraction
    of peak bandwidth used in the iteration, and ``u_kv`` the part of ``u_m`` that is per-sequence
    traffic: the KV cache read by attention and the linear-state (Mamba) state read and written
    by the scan, i.e. every byte but the weight stream. Idle with a model loaded, a level while
    kernels run (clocks and HBM active), terms in achieved FLOP/s and bytes/s, capped at the
    power limit (``max_w``, the TDP). The KV term is there because measured power follows it:
    at the same total bandwidth, a decode step that reads a long context draws far more than
    one that streams weights (ML.ENERGY v3 H100: Qwen3-8B at 64 sequences draws 670 W on GPQA,
    ~3,500-token contexts, and 514 W on chat); attention streams paged, scattered KV blocks and
    works on every byte it reads (scores, softmax), a weight GEMV streams contiguous rows. Below
    the cap the dynamic energy is linear in FLOPs and bytes (J per FLOP, J per byte), which is
    both the textbook energy model of a processor and exact to integrate over a run; the cap is
    applied to a run's (and an hour's) mean power, :meth:`dynamic_j`.

    The catalog's constants are fitted to ML.ENERGY v3 measurements for the H100 and B200 and
    derived for the others (``simulator/device/catalog/gpus.toml``, ``fleetsim calibrate
    --from-mlenergy``); ``confidence`` says which.
    """

    idle_w: float
    max_w: float
    active_w: float = 0.0
    compute_w: float = 0.0
    memory_w: float = 0.0
    confidence: str = ""
    #: power at full bandwidth of KV-cache and linear-state traffic (the bytes that are not the
    #: weight stream), on top of ``memory_w``; 0 keeps the older model
    kv_w: float = 0.0
    #: the level above idle, in place of ``active_w``, while a replica's GPUs wait on their
    #: tensor- or expert-parallel communication (the all-reduce's share of an iteration); None
    #: keeps ``active_w`` there (no separate level)
    comm_w: float | None = None
    #: the level above idle, in place of ``active_w``, while fused-MoE kernels with fp8
    #: block-quantised experts run their block-scaled K loop (the serial loop latency of vLLM's
    #: w8a8 block kernel, :func:`fleetsim.device.moe.k_loop_latency_s` for a tuned tile shape,
    #: :func:`fleetsim.device.moe.fp8_default_loop_latency_s` otherwise: each K step loads the
    #: tiles and their fp32 block scales and rescales the accumulator, work that no FLOP or byte
    #: term counts); None keeps ``active_w`` there (no separate level)
    moe_loop_w: float | None = None
    #: power at full peak FLOP/s of the routed experts' grouped-GEMM FLOPs, on top of
    #: ``compute_w`` (the ``u_moe`` part of ``u_c``: FLOPs of
    #: :attr:`~fleetsim.device.modelspec.ModelSpec.routed_expert_flops_per_token`): a fused-MoE
    #: kernel spends more energy per useful FLOP than a dense GEMM (each expert's rows gathered
    #: by token index and padded to the tile, partial results scattered back, the MMA fed at a
    #: fraction of the tensor-core rate, ``FusedMoeFit.mma_frac``); fitted to the ML.ENERGY v3
    #: MoE rows (docs/model.md, "Power"); 0 keeps the older model
    moe_compute_w: float = 0.0
    #: the level above idle, in place of ``active_w``, for the exposed host time of every
    #: iteration (the serving stack's ``overhead_s``, host stall and one-GPU step floor:
    #: :attr:`LatencyModel.host_s_per_iter`), while the GPU waits for the host to schedule and
    #: launch the next step: the part of the host's work per step that vLLM 0.11's
    #: asynchronous scheduling does not hide (``--async-scheduling``, as the ML.ENERGY runs set
    #: it: ``EngineCore.step_with_batch_queue`` with ``max_concurrent_batches`` 2,
    #: ``vllm/v1/engine/core.py``, ``vllm/v1/executor/uniproc_executor.py``, prepares step N+1
    #: while step N runs; what is left over is exposed), so no kernel runs in that time; None
    #: keeps ``active_w`` there (no separate level)
    host_w: float | None = None
    #: the saturation of the compute terms in the compute utilisation: with ``u0`` set, the
    #: FLOP terms ``compute_w * u_c + moe_compute_w * u_moe`` are multiplied by
    #: :meth:`compute_gain` ``(1 + u0) / (u_c + u0)``: the compute term is ``compute_w *
    #: u_c (1 + u0) / (u_c + u0)``, equal to ``compute_w`` at ``u_c = 1`` (a full prefill
    #: iteration at the power limit keeps its meaning), of slope ``compute_w (1 + u0) / u0`` at
    #: ``u_c -> 0``, linear as ``u0 -> inf``; the routed experts' term takes the same factor of
    #: the whole step's ``u_c`` (their grouped GEMMs share the SMs). None keeps the linear
    #: model bit for bit. Mechanism and fit: docs/accuracy-log.md, "A saturating compute term"
    compute_u0: float | None = None

    def compute_gain(self, u_c: Any) -> Any:
        """The factor of the FLOP terms at compute utilisation ``u_c`` (per GPU, >= 0; a float
        or a numpy array): ``(1 + u0) / (u_c + u0)`` with :attr:`compute_u0`, 1 without it."""
        u0 = self.compute_u0
        if u0 is None:
            return 1.0
        return (1.0 + u0) / (u_c + u0)

    def level_w(self, f_comm: Any, f_loop: Any, f_host: Any) -> Any:
        """The busy level above idle: ``active_w``, with ``comm_w`` for the share ``f_comm`` of
        the time in communication, ``moe_loop_w`` for the share ``f_loop`` in the fp8 fused-MoE
        K loop and ``host_w`` for the share ``f_host`` waiting on the host (each level unset:
        ``active_w``); floats or numpy arrays of shares alike (the ML.ENERGY fit's per-commit
        shares, calibrate/mlenergy.py)."""
        level = self.active_w
        if self.comm_w is not None:
            level = self.active_w * (1.0 - f_comm) + self.comm_w * f_comm
        if self.moe_loop_w is not None:
            level = level + (self.moe_loop_w - self.active_w) * f_loop
        if self.host_w is not None:
            level = level + (self.host_w - self.active_w) * f_host
        return level

    def power_w(
        self,
        u_c: float,
        u_m: float,
        busy: bool = True,
        u_kv: float = 0.0,
        f_comm: float = 0.0,
        f_loop: float = 0.0,
        u_moe: float = 0.0,
        f_host: float = 0.0,
    ) -> float:
        """Power per GPU at compute utilisation ``u_c``, bandwidth utilisation ``u_m``, its
        KV/state part ``u_kv`` (<= ``u_m``; fractions of the peaks, >= 0), a share ``f_comm``
        (0..1) of the time in communication, a share ``f_loop`` in the fp8 fused-MoE K loop
        and a share ``f_host`` waiting on the host (0..1 each, ``f_comm + f_loop + f_host <=
        1``), and the routed experts' part ``u_moe`` (<= ``u_c``) of the compute utilisation:
        never below ``idle_w`` (all terms are >= 0), never above ``max_w`` once busy."""
        if not busy:
            return self.idle_w
        level = (
            self.level_w(f_comm, f_loop, f_host) if f_comm or f_loop or f_host else self.active_w
        )
        if self.compute_u0 is not None:
            k = (1.0 + self.compute_u0) / (u_c + self.compute_u0)
            p = (
                self.idle_w
                + level
                + k * (self.compute_w * u_c + self.moe_compute_w * u_moe)
                + self.memory_w * u_m
                + self.kv_w * u_kv
            )
            return p if p < self.max_w else max(self.max_w, self.idle_w)
        p = self.idle_w + level + self.compute_w * u_c + self.memory_w * u_m + self.kv_w * u_kv
        if u_moe:
            p += self.moe_compute_w * u_moe
        return p if p < self.max_w else max(self.max_w, self.idle_w)

    def dynamic_j(
        self,
        busy_s: float,
        flops: float,
        bytes_moved: float,
        peak_flops: float,
        peak_bw: float,
        gpus: int = 1,
        kv_bytes: float = 0.0,
        comm_s: float = 0.0,
        loop_s: float = 0.0,
        expert_flops: float = 0.0,
        host_s: float = 0.0,
    ) -> float:
        """Energy above idle of ``gpus`` GPUs busy for ``busy_s`` seconds, ``comm_s`` of them
        waiting on communication, ``loop_s`` in the fp8 fused-MoE K loop and ``host_s`` waiting
        on the host, doing ``flops`` (``expert_flops`` of them in the routed experts' grouped
        GEMMs) and ``bytes_moved``, of which ``kv_bytes`` KV-cache and linear-state traffic
        (summed over the GPUs): linear in the work, capped so that the mean power stays at or
        below ``max_w``. With :attr:`compute_u0` the FLOP terms take :meth:`compute_gain` at
        the span's mean compute utilisation ``flops / (gpus peak_flops busy_s)``: exact for one
        iteration (or a span at one utilisation), which is how the engine charges it (each
        run's first iteration apart from its decode steps, serving/core.py)."""
        comm = self.comm_w - self.active_w if self.comm_w is not None else 0.0
        loop = self.moe_loop_w - self.active_w if self.moe_loop_w is not None else 0.0
        host = self.host_w - self.active_w if self.host_w is not None else 0.0
        if self.compute_u0 is not None:
            k = self.compute_gain(flops / (gpus * peak_flops * busy_s)) if busy_s > 0 else 1.0
            e = (
                self.active_w * gpus * busy_s
                + comm * gpus * comm_s
                + loop * gpus * loop_s
                + host * gpus * host_s
                + k * (self.compute_w / peak_flops * flops)
                + self.memory_w / peak_bw * bytes_moved
                + self.kv_w / peak_bw * kv_bytes
                + k * (self.moe_compute_w / peak_flops * expert_flops)
            )
            cap = max(self.max_w - self.idle_w, 0.0) * gpus * busy_s
            return e if e < cap else cap
        e = (
            self.active_w * gpus * busy_s
            + comm * gpus * comm_s
            + loop * gpus * loop_s
            + host * gpus * host_s
            + self.compute_w / peak_flops * flops
            + self.memory_w / peak_bw * bytes_moved
            + self.kv_w / peak_bw * kv_bytes
            + self.moe_compute_w / peak_flops * expert_flops
        )
        cap = max(self.max_w - self.idle_w, 0.0) * gpus * busy_s
        return e if e < cap else cap


@dataclass(frozen=True, slots=True)
class RooflineProfile:
    """A device as the roofline sees it (analytic from a catalog, or measured)."""

    name: str
    peak_flops: float
    mem_bw_bytes_per_s: float
    mem_bytes: float
    compute_eff_max: float
    compute_eff_half_tokens: float
    memory_eff: float
    overhead_s: float
    overhead_per_layer_s: float = 0.0
    link_bw_bytes_per_s: float = 450e9
    link_latency_s: float = 5e-6
    power: PowerSpec | None = None
    kind: Literal["roofline"] = "roofline"
    source: str = "analytic"
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    #: measured compute efficiency by tokens per iteration, ``((T, eff), ...)`` with T strictly
    #: increasing; when set it replaces the hyperbolic ``eff_c(T)``: piecewise linear in log(T)
    #: between points, flat beyond the ends (see :func:`eff_from_table`).
    compute_eff_table: tuple[tuple[float, float], ...] | None = None
    #: dense tensor-core peaks in 8-bit precisions (None: the GPU has no such units)
    peak_flops_fp8: float | None = None
    peak_flops_int8: float | None = None
    #: the dense FP4 tensor-core peak (NVFP4 operands: Blackwell's block-scaled e2m1 MMA; None:
    #: the GPU has no such units, and nvfp4 weights run weight-only at the 16-bit peak)
    peak_flops_fp4: float | None = None
    #: the kernel model of the linear layers and the all-reduce (fleetsim.device.kernels); when
    #: set it replaces the roofline for everything but attention
    kernels: KernelFit | None = None
    #: the serving stack these step times represent (:mod:`fleetsim.device.stack`): "eager"
    #: (every kernel launched one by one, as Vidur profiled them) or "vllm-v1"
    serving_stack: str = "eager"
    #: iterations of at most this many tokens replay a captured CUDA graph (0: none)
    graph_max_tokens: int = 0
    #: the fraction of each kernel's fixed time (the kernel model's GEMM launch, elementwise
    #: floors and the all-reduce's latency floor) left in an iteration replayed from a CUDA graph
    graph_floor_frac: float = 1.0
    #: time per sequence in an iteration beyond its kernels (the serving stack's sampling and
    #: per-request host work that asynchronous scheduling does not hide; 0 for eager)
    per_seq_s: float = 0.0
    #: decode attention's achieved KV bandwidth per work unit (one decoding sequence x one KV
    #: head on a GPU), bytes/s, on one-GPU engines: a step reads its KV at ``min(bw x
    #: memory_eff, units x attn_unit_bw)`` (0: no such cap; see fleetsim.device.stack)
    attn_unit_bw_bytes_per_s: float = 0.0
    #: the serving stack's own small-message all-reduce (vLLM's custom all-reduce, used for
    #: messages up to ``CUSTOM_AR_MAX_BYTES``): ``ar_floor_s + 2 (tp - 1) / tp x bytes /
    #: ar_bw_bytes_per_s`` per call; 0: the kernel fit's measured table (NCCL)
    ar_floor_s: float = 0.0
    ar_bw_bytes_per_s: float = 0.0
    #: a decoding sequence's state update in the linear-state (Mamba-2) layers (its state read
    #: and written once per step), as a fraction of the bandwidth (0: the kernel fit's
    #: elementwise efficiency, as the prefill's scan; see fleetsim.device.stack)
    linear_state_eff: float = 0.0
    #: exposed host time per iteration on top of ``overhead_s`` on one-GPU engines only (the
    #: B200's small-batch step floor; see fleetsim.device.stack)
    one_gpu_overhead_s: float = 0.0
    #: the fraction of the bandwidth at which the serving stack's GEMMs stream their weights,
    #: in place of the kernel fit's ``gemm_bw_eff``: the dense GEMMs (torch ``F.linear`` on
    #: cuBLAS: attention projections, dense MLPs, Mamba projections, the LM head, a mixture of
    #: experts' router and shared experts) and the fused-MoE experts (vLLM's Triton
    #: ``fused_moe_kernel``) alike, one HBM; fitted to the dense rows, the fused-MoE constants
    #: (catalog moe.toml) refitted on it. FlashInfer's fp8 MoE kernel keeps its own fitted
    #: ``fi_bw_frac``. 0: the kernel fit's (see fleetsim.device.stack)
    dense_gemm_bw_eff: float = 0.0
    #: host time of an iteration of a mixture of experts that runs without a CUDA graph (more
    #: tokens than ``graph_max_tokens``): ``eager_moe_layer_host_s`` per MoE layer plus
    #: ``eager_seq_host_s`` per sequence (per engine); the iteration takes at least that long,
    #: the GPU idling for the rest (see fleetsim.device.stack; 0: no such floor)
    eager_moe_layer_host_s: float = 0.0
    eager_seq_host_s: float = 0.0
    #: the floor's further host time per latent-attention (MLA) layer of such a model
    eager_mla_layer_host_s: float = 0.0
    #: and per latent-attention layer of such an iteration that carries prompt tokens: the
    #: prefill path each MLA layer runs beside the decode path (vLLM's
    #: ``MLACommonImpl._forward_prefill``: the latent up-projection, the prefill attention, the
    #: cached context's chunks and their merge; see fleetsim.device.stack)
    eager_mla_prefill_layer_host_s: float = 0.0
    #: host floor per linear-state (Mamba-2) layer of an iteration that carries prompt tokens:
    #: such a step takes max(its GPU time, layers x this). vLLM 0.11 runs a mixed step as
    #: piecewise CUDA graphs split at ``vllm.mamba_mixer2`` (``CompilationConfig.splitting_ops``),
    #: so each mixer's prefill path (``MambaMixer2.forward_cuda``: ``causal_conv1d_fn``, the
    #: five SSD kernels, the final states) is launched from the host, which the GPU's own work
    #: hides once it is longer; 0: none
    linear_state_prefill_layer_s: float = 0.0
    #: the serial host time of an iteration of a hybrid (linear-state layers) that carries
    #: prompt tokens, added to its GPU time before the floor above: the Mamba-2 prefill metadata
    #: vLLM builds on the host once per step before the forward (``Mamba2AttentionMetadata
    #: Builder.build``, ``compute_varlen_chunk_metadata``); 0: none
    linear_state_prefill_step_s: float = 0.0
    #: the fused-MoE kernel fp8 block-quantised experts run (``fleet.fp8_moe_kernel``,
    #: fleetsim.device.moe.FP8_MOE_KERNELS): vLLM's Triton kernel, or FlashInfer's TensorRT-LLM
    #: block-scale kernel (Blackwell, ``VLLM_USE_FLASHINFER_MOE_FP8=1``)
    fp8_moe_kernel: str = "triton"
    #: the fused-MoE kernel constants of this device (:class:`fleetsim.device.moe.FusedMoeFit`)
    #: where they were fitted elsewhere (a profile file's ``moe_constants``, ``fleetsim
    #: calibrate --from-mlenergy --fit-moe``): None, the catalog's (``catalog/moe.toml``) by GPU
    moe_fit: FusedMoeFit | None = None

    def fused_moe_fit(self, gpu: str | None = None) -> FusedMoeFit:
        """The fused-MoE kernel constants this device runs: :attr:`moe_fit` where the profile
        carries them, else the catalog's for its GPU (``meta["catalog_gpu"]``, else ``gpu``)."""
        if self.moe_fit is not None:
            return self.moe_fit
        return catalog_moe_fit(self.name, self.meta.get("catalog_gpu") or gpu)


#: vLLM's custom all-reduce handles messages up to 8 MiB (CustomAllreduce max_size, vllm/
#: distributed/device_communicators/custom_all_reduce.py); larger ones go to NCCL
CUSTOM_AR_MAX_BYTES = 8 * 1024 * 1024

#: LatencyModel._dense_tok's entries: (the layer sums, the embedding's fixed s and its bw x
#: eff, the kernel fit)
_DenseTok = tuple[DenseLayer, float, float, KernelFit]

_GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_router")


#: weight precisions that run at their own tensor-core peak where the GPU has one, else
#: weight-only at the 16-bit peak (mxfp4 is not here: vLLM runs gpt-oss's experts with 16-bit
#: activations on every GPU, device/moe.py MXFP4_MOE_PATHS)
_QUANTISED = ("fp8", "int8", "int4", "nvfp4")


def compute_peak(profile: Profile, dtype: str) -> tuple[float, bool]:
    """(peak FLOP/s of the linear layers for weights in ``dtype``, weight_only): fp8, int8 and
    nvfp4 run at the GPU's peak in that precision; where it has none (fp8 on an A100, nvfp4
    on Hopper, int4 anywhere) the weights still shrink but the GEMMs run at the 16-bit peak
    after dequantization (weight-only quantization, as vLLM runs fp8 on Ampere and NVFP4 on
    Hopper: Marlin's FP4 kernels, ``ModelOptNvFp4LinearMethod`` / ``ModelOptNvFp4FusedMoE``
    when ``cutlass_fp4_supported()`` is false). nvfp4 on a GPU with FP4 units is W4A4: vLLM
    quantises the activations to NVFP4 (``scaled_fp4_quant``) and runs FlashInfer's / CUTLASS's
    FP4 GEMM (``cutlass_scaled_fp4_mm``), the FP4 tensor-core peak."""
    base = profile.peak_flops
    if dtype in _QUANTISED and isinstance(profile, RooflineProfile):
        p8 = {
            "fp8": profile.peak_flops_fp8,
            "int8": profile.peak_flops_int8,
            "nvfp4": profile.peak_flops_fp4,
        }.get(dtype)
        if p8:
            return p8, False
        return base, True
    return base, dtype in _QUANTISED


def eff_from_table(table: tuple[tuple[float, float], ...], tokens: float) -> float:
    """Compute efficiency at ``tokens`` from a ``((T, eff), ...)`` table: linear in log(T)
    between points, clamped to the end values outside them."""
    t0, e0 = table[0]
    if tokens <= t0:
        return e0
    tn, en = table[-1]
    if tokens >= tn:
        return en
    lo = 0
    hi = len(table) - 1
    while hi - lo > 1:  # bisection: table[lo][0] < tokens < table[hi][0]
        mid = (lo + hi) // 2
        if table[mid][0] <= tokens:
            lo = mid
        else:
            hi = mid
    ta, ea = table[lo]
    tb, eb = table[hi]
    w = math.log(tokens / ta) / math.log(tb / ta)
    return ea + w * (eb - ea)


@dataclass(frozen=True, slots=True)
class LinearProfile:
    """Step times from plain coefficients (textbook queues in tests, or a fitted engine)."""

    name: str
    base_s: float
    prefill_base_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_seq_s: float = 0.0
    per_context_token_s: float = 0.0
    mem_bytes: float = 80e9
    peak_flops: float = 1e15
    mem_bw_bytes_per_s: float = 3e12
    power: PowerSpec | None = None
    kind: Literal["linear"] = "linear"
    source: str = "linear"
    meta: dict = field(default_factory=dict, compare=False, hash=False)


Profile = RooflineProfile | LinearProfile


@dataclass(frozen=True, slots=True)
class RunCoeffs:
    """A decode run with ``n`` sequences: step ``i`` at context ``C_i`` takes
    ``base + max(a1 + b1*C_i, a2 + b2*C_i)`` seconds and moves ``fa + fb*C_i`` FLOPs and
    ``ba + bb*C_i`` bytes. ``da`` and ``db`` (``a1 - a2``, ``b1 - b2``) are derived, for
    :func:`run_time`."""

    base: float
    a1: float
    b1: float
    a2: float
    b2: float
    fa: float
    fb: float
    ba: float
    bb: float
    da: float = field(init=False, repr=False, compare=False)
    db: float = field(init=False, repr=False, compare=False)
    #: per step, for the energy terms (set by LatencyModel.run_coeffs): seconds in
    #: communication (PowerSpec.comm_w), weight bytes read (the rest of a step's bytes is KV
    #: and state, PowerSpec.kv_w) and seconds in the fp8 fused-MoE K loop
    #: (PowerSpec.moe_loop_w). Kept here so the core's commit reads them once per run.
    comm_s: float = field(default=0.0, compare=False)
    weight_bytes: float = field(default=0.0, compare=False)
    loop_s: float = field(default=0.0, compare=False)
    #: per step: FLOPs of the routed experts' grouped GEMMs (PowerSpec.moe_compute_w)
    expert_flops: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "da", self.a1 - self.a2)
        object.__setattr__(self, "db", self.b1 - self.b2)


def run_sums(c: RunCoeffs, c0: float, n: float, m: int) -> tuple[float, float, float]:
    """Total time, FLOPs and bytes of ``m`` decode steps starting at context ``c0`` that grows
    by ``n`` per step (the batch; less the share of window layers times the sequences past
    their window, with sliding windows)."""
    if m <= 0:
        return 0.0, 0.0, 0.0
    xs = c0 * m + n * (m * (m - 1) / 2.0)  # sum of the contexts
    return run_time(c, c0, n, m), m * c.fa + c.fb * xs, m * c.ba + c.bb * xs


def run_time(c: RunCoeffs, c0: float, n: float, m: int) -> float:
    """Total time of ``m`` decode steps starting at context ``c0`` (the time part of
    :func:`run_sums`, inlined: it is on the engine's hot path)."""
    if m <= 0:
        return 0.0
    # the steps before the lines cross (s of them) are on one line, the rest on the other
    db = c.db
    slope = db * n
    if slope != 0.0 and c.da == 0.0 and c0 >= 0.0:
        # both lines through the origin (the kernel model's attention): g0 = db * c0 has the
        # sign of slope, so the crossing s = ceil(-g0 / slope) <= 0 is clamped to 0: every step
        # is on the second line (the same sums as below with s = 0)
        t = m * c.base
        if slope < 0.0:
            b_ = c.b2
            return t + (m * (c.a2 + b_ * c0) + b_ * n * (m * (m - 1) / 2.0))
        b_ = c.b1
        return t + (m * (c.a1 + b_ * c0) + b_ * n * (m * (m - 1) / 2.0))
    g0 = c.da + db * c0
    if slope == 0.0:
        s, first_is_1 = m, g0 >= 0.0
    else:
        s = _ceil(-g0 / slope)
        if s < 0:
            s = 0
        elif s > m:
            s = m
        first_is_1 = slope < 0.0
    t = m * c.base
    r = m - s
    if first_is_1:
        if s > 0:
            b_ = c.b1
            t += s * (c.a1 + b_ * c0) + b_ * n * (s * (s - 1) / 2.0)
        if r > 0:
            b_ = c.b2
            t += r * (c.a2 + b_ * c0) + b_ * n * (r * (s + m - 1) / 2.0)
    else:
        if s > 0:
            b_ = c.b2
            t += s * (c.a2 + b_ * c0) + b_ * n * (s * (s - 1) / 2.0)
        if r > 0:
            b_ = c.b1
            t += r * (c.a1 + b_ * c0) + b_ * n * (r * (s + m - 1) / 2.0)
    return t


def steps_to_reach(
    c: RunCoeffs, c0: float, n: float, m_max: int, base: float, target: float
) -> tuple[int, float]:
    """The smallest m in [0, m_max] with ``base + run_time(c, c0, n, m) >= target`` (m_max if
    none), and ``run_time(c, c0, n, m)``: the first decode step of a run started at ``base``
    that ends at or after ``target``, and the time it ends after ``base``.

    Solved as a quadratic on the steeper branch of the max, then nudged so that the answer is
    exact with respect to the very expression ``base + run_time(...)`` that places boundaries."""
    if base >= target:
        return 0, 0.0
    b = c.b1 if c.b1 > c.b2 else c.b2
    x1 = c.a1 + c.b1 * c0
    x2 = c.a2 + c.b2 * c0
    a = c.base + (x1 if x1 > x2 else x2)
    alpha = b * n / 2.0
    beta = a - alpha
    gap = target - base
    if alpha > 0.0:
        m = math.ceil((-beta + math.sqrt(beta * beta + 4.0 * alpha * gap)) / (2.0 * alpha))
    elif a > 0.0:
        m = math.ceil(gap / a)
    else:
        m = m_max
    if m > m_max:
        m = m_max
    elif m < 1:
        m = 1
    db = c.db
    slope = db * n
    if slope != 0.0 and c.da == 0.0 and c0 >= 0.0:
        # run_time's first branch (every step on one line), inlined with its very expression
        # ``m * base + (m * (a + b * c0) + b * n * (m * (m - 1) / 2.0))`` and its constant
        # parts computed once: this search calls it two or three times (once per arrival
        # that cuts a run)
        if slope < 0.0:
            b_ = c.b2
            u = c.a2 + b_ * c0
        else:
            b_ = c.b1
            u = c.a1 + b_ * c0
        bn = b_ * n
        cb = c.base
        rt = m * cb + (m * u + bn * (m * (m - 1) / 2.0)) if m > 0 else 0.0
        if base + rt >= target:
            while m > 0:
                p = m - 1
                prev = p * cb + (p * u + bn * (p * (p - 1) / 2.0)) if p > 0 else 0.0
                if base + prev < target:
                    break
                m = p
                rt = prev
        else:
            while m < m_max:
                m += 1
                rt = m * cb + (m * u + bn * (m * (m - 1) / 2.0))
                if base + rt >= target:
                    break
        return m, rt
    rt = run_time(c, c0, n, m)
    if base + rt >= target:
        while m > 0:
            prev = run_time(c, c0, n, m - 1)
            if base + prev < target:
                break
            m -= 1
            rt = prev
    else:
        while m < m_max:
            m += 1
            rt = run_time(c, c0, n, m)
            if base + rt >= target:
                break
    return m, rt


def step_time(c: RunCoeffs, ctx: float) -> float:
    """Time of one decode step at total context ``ctx``."""
    x1 = c.a1 + c.b1 * ctx
    x2 = c.a2 + c.b2 * ctx
    return c.base + (x1 if x1 > x2 else x2)


class LatencyModel:
    """Iteration times of one replica serving ``model`` under ``profile``: ``tp`` GPUs, or for a
    data-parallel server ``dp`` attention engines of ``tp`` GPUs each whose mixture-of-experts
    layers span all ``tp x dp`` GPUs, experts whole on each (``expert_parallel``) or split (see
    :mod:`fleetsim.device.moe`). The replica's batch is the engines' batches summed: an
    iteration of ``T`` tokens gives each engine ``ceil(T / dp)``."""

    def __init__(
        self,
        model: ModelSpec,
        profile: Profile,
        tp: int = 1,
        dp: int = 1,
        expert_parallel: bool = False,
    ) -> None:
        self.model = model
        self.profile = profile
        self.tp = tp
        self.dp = dp
        self.expert_parallel = expert_parallel
        self.layout = MoeLayout(tp, dp, expert_parallel)
        #: the layer-stack kernel path (fleetsim.device.moe: MoE, data parallelism, latent
        #: attention, linear-state layers); plain dense tp-only models keep the per-layer
        #: operator sum of fleetsim.device.kernels
        self._moe_path = model.n_experts > 1 or dp > 1 or model.is_mla or bool(model.hybrid_pattern)
        self.kind = profile.kind
        m = model
        #: (with the further copies' FLOPs of the parts every tensor-parallel rank holds whole:
        #: ModelSpec.tp_extra_flops_per_token)
        self.f_lin = m.flops_per_token_linear + m.tp_extra_flops_per_token(tp)
        #: the routed experts' part of f_lin (PowerSpec.moe_compute_w; 0 for a dense model)
        self.f_exp = m.routed_expert_flops_per_token
        self.f_head = m.flops_lm_head
        self.f_pair = m.attn_flops_per_pair
        self.kvb = m.kv_bytes_per_token
        self._dense = m.n_experts <= 1
        #: the weights each further data-parallel engine reads in its own copy every iteration:
        #: attention, dense and shared-expert layers and the LM head (``weight_bytes_read(0)``,
        #: no routed expert), ``dp - 1`` times. Every DP rank runs the whole model each step,
        #: the ranks in lockstep and an idle one on a dummy batch (``DPEngineCoreProc.
        #: run_busy_loop`` / ``execute_dummy_batch``, ``vllm/v1/engine/core.py``); the routed
        #: experts are held once across the ranks and read once. 0 on one engine.
        #: Within an engine each of the ``tp`` ranks reads its own copy of the parts vLLM holds
        #: whole on every rank (``ModelSpec.weight_bytes_read_tp``: latent attention's down
        #: projections, the routers, KV heads fewer than the ranks).
        self._w_dp = (dp - 1) * m.weight_bytes_read_tp(0.0, tp) if dp > 1 else 0.0
        self._w_dense = m.weight_bytes_read_tp(1.0, tp) + self._w_dp
        #: the weight bytes of every iteration of a dense model (None for a mixture of experts,
        #: whose iterations read the experts their tokens touch: weight_bytes_per_iteration)
        self.dense_weight_bytes: float | None = self._w_dense if self._dense else None
        #: bytes of linear-state (Mamba) state read and written per sequence per iteration (the
        #: scan reads and writes each sequence's state once: 0 for attention-only models)
        self._sb = 2.0 * m.state_bytes_per_seq_tp(tp)
        #: a prompt token's FLOPs and bytes in the linear-state layers' chunked scan (the SSD
        #: algorithm, fleetsim.device.moe.ssd_scan_flops_per_token), the FLOPs beyond the
        #: recurrent scan's that f_lin counts (linear_state_flops_per_token); 0: no such layers
        self._pf_flops = 0.0
        self._pf_bytes = 0.0
        if m.n_linear_layers:
            per_layer_rec = m.linear_state_flops_per_token / m.n_linear_layers
            self._pf_flops = m.n_linear_layers * (ssd_scan_flops_per_token(m, 1) - per_layer_rec)
            self._pf_bytes = m.n_linear_layers * ssd_scan_bytes_per_token(m, 1)
        #: the exposed host time of every iteration (s): the serving stack's overhead, host stall
        #: and one-GPU step floor, in which no kernel runs (PowerSpec.host_w); 0 for a linear
        #: profile, whose step has no such part
        self.host_s_per_iter = 0.0
        if isinstance(profile, RooflineProfile):
            p = profile
            self._roof = p  # (the roofline's own fields, typed for the roofline-only helpers)
            self._oh = p.overhead_s + p.overhead_per_layer_s * m.n_layers
            if tp * dp == 1:
                self._oh += p.one_gpu_overhead_s
            self.host_s_per_iter = self._oh
            self._rc_peak = tp * dp * p.peak_flops
            self._rm = tp * dp * p.mem_bw_bytes_per_s * p.memory_eff
            if tp > 1:
                ring = 2.0 * (tp - 1) / tp
                act_bytes = m.d_model * 2.0  # activations travel in 16-bit
                self._comm_a = 2.0 * m.n_layers * p.link_latency_s
                self._comm_b = 2.0 * m.n_layers * ring * act_bytes / p.link_bw_bytes_per_s
            else:
                self._comm_a = self._comm_b = 0.0
        #: :meth:`run_coeffs` by batch size (read directly by the engines' hot paths)
        self.coeff_cache: dict[int, RunCoeffs] = {}
        #: :meth:`comm_s` by token count (every profile kind: 0 without a kernel fit)
        self._comm_cache: dict[int, float] = {}
        #: :meth:`moe_loop_s` by token count (filled by _moe_linear)
        self._loop_cache: dict[int, float] = {}
        #: id(kernel fit) -> (the fit, its all-reduce table across tp GPUs or None, that
        #: table's floor): read once per fit, not per message size (_allreduce_s)
        self._ar_tables: dict[
            int, tuple[KernelFit, tuple[tuple[float, float], ...] | None, float]
        ] = {}
        self._kern: KernelFit | None = None
        self._eh = False  # the eager MoE host floor (set by _init_kernels)
        self._pf_tok_s = 0.0  # the linear-state layers' prefill path (set by _init_kernels)
        self._pf_iter_s = 0.0
        self._pf_step_s = 0.0
        if isinstance(profile, RooflineProfile) and profile.kernels is not None:
            self._init_kernels(profile, profile.kernels)

    # -- the kernel model ------------------------------------------------------------------
    def _init_kernels(self, p: RooflineProfile, kf: KernelFit) -> None:
        m, tp = self.model, self.tp
        if p.dense_gemm_bw_eff > 0.0:
            # the GEMMs' weight stream at the serving stack's efficiency: the dense GEMMs and
            # the MoE layers' (router, shared experts, the fused-MoE experts) alike, one HBM
            kf = replace(kf, gemm_bw_eff=p.dense_gemm_bw_eff)
        self._kern = kf
        self._peak_lin, self.weight_only = compute_peak(p, m.dtype)
        self._bw = p.mem_bw_bytes_per_s
        self._shapes = layer_shapes(m, tp)
        self._wb = m.bytes_per_param
        # attention: FLOPs at the 16-bit peak x compute_eff_max, the KV cache (this GPU's
        # share, replicas included) read at memory_eff of the bandwidth
        # under data parallelism each engine attends its own sequences: a GPU does 1/(tp dp)
        # of the scores and holds 1/dp of the sequences' KV when the engines are balanced; a
        # decode step then waits for the fullest engine (dp_att_scale scales these per n)
        dp = self.dp
        kvb_gpu = m.kv_bytes_per_token_tp(tp) / tp
        self._att_c = m.attn_flops_per_pair / (tp * dp * p.peak_flops * p.compute_eff_max)
        self._att_m = kvb_gpu / (dp * p.mem_bw_bytes_per_s * p.memory_eff)
        # the per-unit KV-read cap (attn_unit_bw_bytes_per_s) holds on one-GPU engines, where
        # it was fitted; multi-GPU B200 servers decode long contexts at small batch without it
        # (device/stack.py); latent attention (MLA) runs other kernels and keeps the plain read
        one_gpu = tp * dp == 1
        self._unit_bw = p.attn_unit_bw_bytes_per_s if one_gpu and not m.is_mla else 0.0
        self._kvh_gpu = max(1, m.n_kv_heads // tp)
        self._full_bw = p.mem_bw_bytes_per_s * p.memory_eff
        self._att_m_n: dict[int, float] = {}
        self._ar_floor = p.ar_floor_s
        self._ar_bw = p.ar_bw_bytes_per_s
        self._link = (p.link_bw_bytes_per_s, p.link_latency_s)
        # the experts' and the LM head's own precisions (expert_dtype, embed_dtype)
        e_dt, h_dt = m.expert_dtype or m.dtype, m.embed_dtype or m.dtype
        self._epeak = compute_peak(p, e_dt)[0]
        self._ewb = DTYPE_BYTES[e_dt]
        self._hpeak = compute_peak(p, h_dt)[0]
        self._hwb = DTYPE_BYTES[h_dt]
        #: the fused MoE kernel's latency floor on this GPU (catalog moe.toml); fp8 experts are
        #: block-quantised (128 x 128 scales, as every fp8 MoE checkpoint the catalog reads)
        #: unless the checkpoint scales them per tensor or channel (ModelSpec.fp8_block: the
        #: 16-bit default tiles and K-loop step, assumed)
        self._moe_fit = p.fused_moe_fit()
        self._fp8_block = e_dt == "fp8" and m.fp8_block
        #: mxfp4 experts (gpt-oss) and nvfp4 experts (ModelOpt NVFP4) run their own grouped
        #: GEMMs, not the Triton fused-MoE kernel (device/moe.py mxfp4_moe_gemm_s)
        self._fp4_moe = e_dt in ("mxfp4", "nvfp4")
        self._fp8_kernel = p.fp8_moe_kernel
        self.kvb = m.kv_bytes_per_token_tp(tp)
        self._lin_cache: dict[tuple[int, int], tuple[float, float, float]] = {}
        self._tok_cache: dict[int, float] = {}
        self._head_cache: dict[int, float] = {}
        # CUDA graphs (serving stack vllm-v1): iterations of up to _gmax tokens run a kernel fit
        # whose fixed per-kernel times are scaled by graph_floor_frac; -1 = no graphs, and the
        # graphed head cache is then the eager one
        self._kern_g: KernelFit | None = None
        self._gmax = -1
        self._head_cache_g = self._head_cache
        self._per_seq = p.per_seq_s
        self._ls_eff = p.linear_state_eff
        #: a prompt token's chunked scan over the linear-state layers beyond the per-token state
        #: charge of linear_state_block_s (s, <= 0), and the prompt-carrying iteration's host
        #: floor (s): the Mamba-2 mixers' prefill path, launched eagerly between the piecewise
        #: CUDA graphs of a mixed step, which the GPU's own work hides (step = max(GPU, floor));
        #: 0 (set in __init__) without linear-state layers
        if m.n_linear_layers:
            self._pf_tok_s = m.n_linear_layers * ssd_prefill_delta_s(
                kf, self._peak_lin, self._bw, m, tp
            )
            self._pf_iter_s = m.n_linear_layers * p.linear_state_prefill_layer_s
            self._pf_step_s = p.linear_state_prefill_step_s
        self._ar_floor_g = 0.0
        #: the eager MoE host floor (see RooflineProfile.eager_moe_layer_host_s): its per-layer
        #: part and per-sequence rate; 0: none
        self._eh = False
        self._eh_a = 0.0
        self._eh_s = 0.0
        #: its further part in an iteration that carries prompt tokens (latent attention)
        self._eh_p = 0.0
        if p.graph_max_tokens > 0 and p.graph_floor_frac != 1.0:
            self._kern_g = graphed_fit(kf, p.graph_floor_frac)
            # each data-parallel engine replays its own graph for its (padded) share: the
            # replica's padded dp x share tokens are graphed when the share is, i.e. up to
            # dp x the engine's largest capture (graph_max_tokens is an engine's)
            self._gmax = p.graph_max_tokens * self.dp
            self._head_cache_g = {}
            self._ar_floor_g = 1.0 - p.graph_floor_frac
            h_mla = p.eager_mla_layer_host_s if m.is_mla else 0.0
            h_mla_p = p.eager_mla_prefill_layer_host_s if m.is_mla else 0.0
            # (the prefill path's time is part of the floor: none without one)
            if m.n_moe_layers and (p.eager_moe_layer_host_s or p.eager_seq_host_s or h_mla):
                self._eh = True
                self._eh_a = m.n_moe_layers * p.eager_moe_layer_host_s + m.n_attn_layers * h_mla
                self._eh_s = p.eager_seq_host_s
                self._eh_p = m.n_attn_layers * h_mla_p
        #: linear_parts' layer sums of a plain dense model, by ``graphed`` (kernels.DenseLayer)
        self._dense_layers: dict[bool, DenseLayer] = {}
        if not self._moe_path:
            for g, f in ((False, kf), (True, self._kern_g or kf)):
                self._dense_layers[g] = DenseLayer(
                    f, self._peak_lin, self._bw, self._shapes, self._wb
                )
        # the GEMMs' ridge point in tokens (linear_parts: peak x w / 2 bw)
        self._ridge = self._peak_lin * self._wb / (2.0 * self._bw)
        #: linear_time's first timing of a token count on that path, by ``graphed``: the
        #: layer sums and the constants of the embedding (see _dense_tok_s)
        self._dense_tok: dict[bool, _DenseTok] = {}
        if self._dense_layers:
            for g, dl in self._dense_layers.items():
                f = (self._kern_g or kf) if g else kf
                if not any(op == "emb" for op, _, _ in f.elem):
                    continue  # (linear_parts says so)
                emb_fixed, emb_eff = f.elem_params("emb")
                # bw x eff: as elem_time_s divides by it
                self._dense_tok[g] = (dl, emb_fixed, self._bw * emb_eff, f)

    def att_m_for(self, n: int) -> float:
        """Seconds per context token of the KV read in a step with ``n`` decoding sequences:
        the bandwidth ``bw x memory_eff``, or ``units x attn_unit_bw`` when that is lower
        (units = sequences per engine x KV heads per GPU)."""
        if self._unit_bw <= 0.0 or n <= 0:
            return self._att_m
        v = self._att_m_n.get(n)
        if v is None:
            units = _ceil(n / self.dp) * self._kvh_gpu
            cap = units * self._unit_bw
            v = self._att_m if cap >= self._full_bw else self._att_m * (self._full_bw / cap)
            self._att_m_n[n] = v
        return v

    def dp_att_scale(self, n: int) -> float:
        """The decode attention of the fullest data-parallel engine over the even split, in a
        step of ``n`` decoding sequences: ``dp x ceil(n / dp) / n`` (1 for ``dp = 1`` or
        ``n = 0``). A sequence lives on one engine (vLLM 0.11 binds a request to a DP rank on
        arrival, ``DPLBAsyncMPClient.get_core_engine_for_request`` in
        ``vllm/v1/engine/core_client.py``) and the ranks step in lockstep (the MoE layers'
        collectives need every rank, an idle one runs ``execute_dummy_batch``), so the step
        waits for the engine with ``ceil(n / dp)`` sequences: the same count
        :meth:`dp_padded_tokens` gives the linear layers. ``_att_c`` and ``_att_m`` are the
        even split (1/dp of the scores and of the KV); times this factor they are the fullest
        engine's ``ceil(n / dp)`` sequences at the mean context. Derived, no constant."""
        return self.fullest_decodes(n) / n if n > 0 else 1.0

    def fullest_decodes(self, n: int) -> int:
        """The decoding sequences of a step of ``n``, times ``dp``, that the fullest
        data-parallel engine holds: ``dp x ceil(n / dp)`` (``n`` for ``dp = 1``): the count
        the decode attention is timed at (:meth:`dp_att_scale`)."""
        dp = self.dp
        return n if dp <= 1 else dp * _ceil(n / dp)

    def fullest_prompts(self, p_tokens: int, pairs: float, n_prefill: int) -> tuple[int, float]:
        """The prompt tokens and attention pairs of a step's ``n_prefill`` prompt chunks
        (``p_tokens`` tokens and ``pairs`` pairs in all), times ``dp``, that the fullest
        data-parallel engine holds: the prompt attention (scores and the new tokens' KV
        write) is timed at these, as the decodes' at :meth:`fullest_decodes`. A request and
        its chunks live on one engine (vLLM 0.11 binds it to a DP rank on arrival,
        ``DPLBAsyncMPClient.get_core_engine_for_request`` in ``vllm/v1/engine/core_client.py``;
        each rank's ``Scheduler`` schedules its own chunks) and the ranks step in lockstep (an
        idle rank runs ``execute_dummy_batch``, ``DPEngineCoreProc.run_busy_loop`` in
        ``vllm/v1/engine/core.py``), so the step waits for the engine whose attention kernel
        runs the most prompt pairs: a 1,500-token chunk alone costs its engine all of its
        pairs, not ``1/dp`` of them. Where the ranks' batches are not known (the merged
        scheduler, the latency CLI, :meth:`breakdown`), the derived split of
        :meth:`dp_padded_tokens`: the chunks go one to an engine, the fullest taking
        ``ceil(n_prefill / dp)`` of them, of the mean chunk and the mean pairs (exact for one
        chunk: ``dp x`` its own); the per-rank engine passes the actual fullest rank's
        (:meth:`iteration`'s ``p_full``, ``pairs_full``, serving/ranks.py). ``(p_tokens,
        pairs)`` for ``dp = 1`` or no chunk. Derived, no constant."""
        dp = self.dp
        if dp <= 1 or n_prefill <= 0:
            return p_tokens, pairs
        k = _ceil(n_prefill / dp)
        return dp * self._engine_prompt_tokens(p_tokens, n_prefill), dp * k * pairs / n_prefill

    def _allreduce_s(self, kf: KernelFit, nbytes: float, graphed: bool) -> float:
        """One all-reduce of ``nbytes`` across the ``tp`` GPUs: the serving stack's own
        (``ar_floor_s``, ``ar_bw_bytes_per_s``) for messages up to ``CUSTOM_AR_MAX_BYTES``,
        else the kernel fit's measured table (or the ring model without one), whose latency
        floor shrinks under a CUDA graph like the kernels' floors."""
        tp = self.tp
        if self._ar_bw > 0.0 and nbytes <= CUSTOM_AR_MAX_BYTES:
            return self._ar_floor + 2.0 * (tp - 1) / tp * nbytes / self._ar_bw
        ar = self._ar_tables.get(id(kf))
        if ar is None or ar[0] is not kf:
            table = kf.allreduce_table(tp)
            ar = (kf, table, 0.0 if table is None else allreduce_floor_s(kf, tp))
            self._ar_tables[id(kf)] = ar
        _, table, floor = ar
        if table is None:  # no measured table for this GPU count: the ring model
            m = self.model
            d = nbytes / (m.d_model * 2.0)
            one = self._comm_a / (2.0 * m.n_layers) + self._comm_b * d / (2.0 * m.n_layers)
            floor = self._roof.link_latency_s
        else:
            one = interp_table(table, nbytes)  # (kernels.allreduce_time_s)
        if graphed:  # the latency floor shrinks with the kernels' (launch-bound) floors
            one -= self._ar_floor_g * floor
        return one

    def linear_parts(self, tokens: int, seqs: int) -> tuple[float, float, float]:
        """(compute, memory-bound, communication) seconds of the kernel model's non-attention
        work of an iteration over ``tokens`` tokens of ``seqs`` sequences: the layers' GEMMs and
        elementwise ops, the embedding, the LM head over ``seqs`` rows, two all-reduces per
        layer. A GEMM counts as compute when its compute bound exceeds its memory bound."""
        key = (tokens, seqs)
        v = self._lin_cache.get(key)
        if v is not None:
            return v
        if self._moe_path:
            comp, mem, comm, _ = self._moe_linear(tokens, seqs)
            v = (comp, mem, comm)
            self._lin_cache[key] = v
            return v
        graphed = tokens <= self._gmax
        kf = self._kern_g if graphed else self._kern
        assert kf is not None
        m, tp, bw, peak = self.model, self.tp, self._bw, self._peak_lin
        dl = self._dense_layers.get(graphed)
        if dl is not None and tokens > 0:  # the same sums, cheaper (kernels.DenseLayer)
            t_gemm, t_elem = dl.seconds(tokens)
        else:
            touched = m.expected_experts_touched(tokens) if not self._dense else 1.0
            parts = layer_parts_s(
                kf, peak, bw, self._shapes, tokens, self._wb, experts_touched=touched
            )
            gemm_ops = _GEMM_OPS
            t_gemm = sum(parts[k] for k in gemm_ops)
            t_elem = sum(v for k, v in parts.items() if k not in gemm_ops)
        head = gemm_time_s(kf, peak, bw, seqs, m.vocab_size / tp, m.d_model, self._wb)
        if self._per_seq:
            head += seqs * self._per_seq
        emb = elem_time_s(kf, bw, "emb", 4.0 * tokens * m.d_model)
        # reported as compute when the tokens exceed the GEMMs' ridge point (peak x w / 2 bw)
        ridge = peak * self._wb / (2.0 * bw)
        lin = m.n_layers * t_gemm + head
        comp = lin if tokens >= ridge else 0.0
        mem = (lin - comp) + m.n_layers * t_elem + emb
        comm = 0.0
        if tp > 1:
            comm = 2.0 * m.n_layers * self._allreduce_s(kf, tokens * m.d_model * 2.0, graphed)
        v = (comp, mem, comm)
        self._lin_cache[key] = v
        return v

    def _moe_linear(self, tokens: int, seqs: int) -> tuple[float, float, float, dict[str, float]]:
        """:meth:`linear_parts` on the layer-stack path (a mixture of experts, a data-parallel
        replica, latent attention, linear-state layers), with the named parts (seconds per
        iteration on one GPU) that they sum: each layer kind counted by the model's layers."""
        graphed = tokens <= self._gmax  # a CUDA-graph replay (serving stack vllm-v1)
        kf = self._kern_g if graphed else self._kern
        assert kf is not None
        m, tp, bw, peak, wb = self.model, self.tp, self._bw, self._peak_lin, self._wb
        lay = self.layout
        t_eng = float(_ceil(tokens / lay.dp)) if tokens > 0 else 0.0
        n_moe, n_dense = m.n_moe_layers, m.n_dense_layers
        n_attn, n_lin = m.n_attn_layers, m.n_linear_layers
        a_gemm, a_elem = attention_block_s(kf, peak, bw, m, self._shapes, tp, t_eng, wb)
        up, act, down = mlp_parts_s(
            kf, peak, bw, t_eng, m.d_model, m.d_ff / tp, m.mlp == "swiglu", wb
        )
        parts = {
            "attention_linear": n_attn * (a_gemm + a_elem),
            "dense_mlp": n_dense * (up + act + down),
        }
        gemm = n_attn * a_gemm + n_dense * (up + down)
        elem = n_attn * a_elem + n_dense * act
        if n_lin:
            l_gemm, l_elem = linear_state_block_s(kf, peak, bw, m, tp, t_eng, wb)
            parts["linear_state"] = n_lin * (l_gemm + l_elem)
            gemm += n_lin * l_gemm
            elem += n_lin * l_elem
        comm = 0.0
        if n_moe and tokens > 0:
            link_bw, link_lat = self._link
            mo = moe_layer_parts_s(
                kf,
                peak,
                bw,
                m,
                lay,
                tokens,
                wb,
                link_bw,
                link_lat,
                self._ewb,
                self._epeak,
                self._moe_fit,
                self._fp8_block,
                self._fp8_kernel,
                self._fp4_moe,
            )
            parts["shared_mlp"] = n_moe * mo["shared_mlp"]
            parts["moe_router"] = n_moe * (mo["moe_router"] + mo["moe_route"])
            parts["moe_dispatch"] = n_moe * mo["moe_dispatch"]
            parts["moe_grouped_gemm"] = n_moe * (
                mo["moe_gemm_up"] + mo["moe_act"] + mo["moe_gemm_down"]
            )
            parts["moe_combine"] = n_moe * mo["moe_combine"]
            # the mean expert-parallel rank's wait for the busiest at each layer's all-reduce
            # (device/moe.py ep_barrier_wait_s): moved from the grouped GEMMs' time to the
            # communication's, the step's time unchanged (PowerSpec.comm_w draws it)
            ep_wait = n_moe * mo["moe_ep_wait"]
            parts["moe_grouped_gemm"] -= ep_wait
            parts["moe_ep_wait"] = ep_wait
            gemm += n_moe * (
                mo["shared_mlp"] + mo["moe_router"] + mo["moe_gemm_up"] + mo["moe_gemm_down"]
            )
            gemm -= ep_wait
            elem += n_moe * (mo["moe_route"] + mo["moe_act"])
            comm += n_moe * (mo["moe_dispatch"] + mo["moe_combine"]) + ep_wait
            self._loop_cache[tokens] = n_moe * mo["moe_fp8_loop"]
        ar = 0.0
        if tp > 1 and tokens > 0:
            # after each mixer and each feed-forward block
            ar = 2.0 * m.n_layers * self._allreduce_s(kf, t_eng * m.d_model * 2.0, graphed)
        parts["allreduce"] = ar
        comm += ar
        head = self._head_time(seqs, graphed)
        emb = elem_time_s(kf, bw, "emb", 4.0 * t_eng * m.d_model) if tokens > 0 else 0.0
        # the decoding sequences' state update at the fitted efficiency (in _head_time's
        # per-sequence part)
        scan = self._state_update_s(seqs)
        if n_lin:
            parts["linear_state"] += scan
        parts["lm_head"] = head - scan
        parts["embedding"] = emb
        ridge = peak * wb / (2.0 * bw)
        lin = gemm + head - scan
        comp = lin if t_eng >= ridge else 0.0
        mem = (lin - comp) + elem + emb + scan
        return comp, mem, comm, parts

    def _state_update_s(self, seqs: int) -> float:
        """What the linear-state layers' state update of ``seqs`` sequences (each engine's
        share under data parallelism) adds at the serving stack's ``linear_state_eff``
        (:func:`~fleetsim.device.moe.linear_state_update_extra_s`); 0 without linear-state
        layers or without that constant."""
        m = self.model
        if seqs <= 0 or not m.n_linear_layers or self._ls_eff <= 0.0:
            return 0.0
        assert self._kern is not None
        rows = _ceil(seqs / self.dp) if self.dp > 1 else seqs
        return m.n_linear_layers * linear_state_update_extra_s(
            self._kern, self._bw, m, self.tp, rows, self._ls_eff
        )

    def _head_time(self, seqs: int, graphed: bool = False) -> float:
        """The LM head over ``seqs`` sequences (each engine's share under data parallelism),
        with the linear-state layers' state update at the serving stack's efficiency and the
        serving stack's per-sequence time."""
        if seqs <= 0:
            return 0.0
        kf = self._kern_g if graphed else self._kern
        assert kf is not None
        m = self.model
        rows = _ceil(seqs / self.dp) if self.dp > 1 else seqs
        h = gemm_time_s(
            kf, self._hpeak, self._bw, rows, m.vocab_size / self.tp, m.d_model, self._hwb
        )
        if self._ls_eff > 0.0:
            h += self._state_update_s(seqs)
        # the serving stack's per-sequence time is each engine core's own (every data-parallel
        # rank its own scheduler, input preparation and sampler, in its own process): the
        # engine's share, as the head's rows (docs/accuracy-log.md, h47)
        return h + rows * self._per_seq if self._per_seq else h

    def dp_padded_tokens(self, p_tokens: int, n_prefill: int, n: int) -> int:
        """The tokens a data-parallel replica's layers run in an iteration of ``p_tokens`` prompt
        tokens over ``n_prefill`` prompts and ``n`` decoding sequences: ``dp`` times those of the
        fullest engine. vLLM pads every DP rank's batch to the largest one before the forward
        pass (``get_dp_padding`` in ``vllm/v1/worker/gpu_model_runner.py``: "pad ... to the max
        across DP ranks", with the maintainers' note that prefills cause "excessive padding of
        activations"; ``coordinate_batch_across_dp`` in ``vllm/v1/worker/dp_utils.py`` later), and
        the MoE layers then gather every rank's padded tokens. The decodes spread evenly
        (``ceil(n / dp)`` each, as the DP load balancer keeps the engines' running counts level);
        the prompts go one to an engine, so the fullest takes ``ceil(n_prefill / dp)`` of them, of
        the mean chunk. ``p_tokens + n`` on one engine (``dp = 1``)."""
        dp = self.dp
        if dp <= 1:
            return p_tokens + n
        eng = _ceil(n / dp)
        if p_tokens > 0 and n_prefill > 0:
            eng += _ceil(_ceil(n_prefill / dp) * p_tokens / n_prefill)
        return dp * eng

    def linear_time(self, tokens: int, seqs: int) -> float:
        """The sum of :meth:`linear_parts`, cached by tokens and by sequences separately (the
        engine's hot path: an iteration's token and sequence counts vary independently)."""
        t = self._tok_cache.get(tokens)
        graphed = tokens <= self._gmax
        if t is None:
            dt = self._dense_tok.get(graphed)
            if dt is not None and tokens > 0:
                t = self._dense_tok_s(dt, tokens, graphed)
            else:
                c, mm, cm = self.linear_parts(tokens, 0)
                t = c + mm + cm
            self._tok_cache[tokens] = t
        hc = self._head_cache_g if graphed else self._head_cache
        h = hc.get(seqs)
        if h is None:
            if self._moe_path:
                h = self._head_time(seqs, graphed)
            else:
                kf = self._kern_g if graphed else self._kern
                assert kf is not None
                m = self.model
                h = gemm_time_s(
                    kf, self._peak_lin, self._bw, seqs, m.vocab_size / self.tp, m.d_model, self._wb
                )
                if self._per_seq:
                    h += seqs * self._per_seq
            hc[seqs] = h
        return t + h

    def _dense_tok_s(self, dt: _DenseTok, tokens: int, graphed: bool) -> float:
        """``sum(linear_parts(tokens, 0))`` of a plain dense model (``tokens`` > 0), its
        communication part cached as :meth:`comm_s`'s: the same float operations in the same
        order (bit-identical), with the embedding's constants read once (``_dense_tok``) and
        no LM head (0 rows: 0 s). Why: the first timing of each of the
        ~4,900 token counts of a 21,556-request day (bench/RESULTS.md, start-up, fourth pass)."""
        dl, emb_fixed, emb_den, kf = dt
        m = self.model
        nl = m.n_layers
        t_gemm, t_elem = dl.seconds(tokens)
        d = m.d_model
        emb = emb_fixed + 4.0 * tokens * d / emb_den
        lin = nl * t_gemm  # + the head's 0.0
        comp = lin if tokens >= self._ridge else 0.0
        mem = (lin - comp) + nl * t_elem + emb
        comm = 0.0
        if self.tp > 1:
            comm = 2.0 * nl * self._allreduce_s(kf, tokens * d * 2.0, graphed)
        # what comm_s(tokens) gives (linear_parts(tokens, 0)[2]; 0 on one GPU), for plan's read
        self._comm_cache[tokens] = comm
        return comp + mem + comm

    # -- helpers ---------------------------------------------------------------------------
    def _weights(self, tokens: float) -> float:
        if self._dense:
            return self._w_dense
        return self.model.weight_bytes_read_tp(tokens, self.tp) + self._w_dp

    def comm_s(self, tokens: int, seqs: int) -> float:
        """Seconds of an iteration over ``tokens`` tokens of ``seqs`` sequences spent in the
        replica's communication (the kernel model's all-reduces, MoE dispatch and combine; 0
        on one GPU or without a kernel fit): the share PowerSpec.comm_w applies to."""
        v = self._comm_cache.get(tokens)
        if v is None:
            # It does not depend on the sequences (the LM head is not in it): the (tokens, 0)
            # entry that linear_time caches, not the layer parts again for every new (tokens,
            # seqs) pair (that made a 21,556-request day's simulation 60 % slower).
            if self._kern is None or (self.tp <= 1 and self.dp <= 1):
                v = 0.0
            else:
                v = self.linear_parts(tokens, 0)[2]
            self._comm_cache[tokens] = v
        return v

    def use_moe_fit(self, fit: FusedMoeFit) -> None:
        """Time the fused MoE kernels with ``fit`` from now on (calibrate/moe_fit.py's search,
        tests): the caches of everything it enters are emptied (the layer sums, the token and
        head times, the run coefficients and the fp8 loop seconds)."""
        self._moe_fit = fit
        for cache in (
            self._lin_cache,
            self._tok_cache,
            self._head_cache,
            self._head_cache_g,
            self.coeff_cache,
            self._loop_cache,
        ):
            cache.clear()

    def moe_loop_s(self, tokens: int) -> float:
        """Seconds of an iteration whose layers run ``tokens`` tokens (a data-parallel
        replica's padded count, :meth:`dp_padded_tokens`) spent in the block-scaled K loop of
        the fused MoE kernels of fp8 block-quantised experts (``moe_fp8_loop`` of
        :func:`~fleetsim.device.moe.moe_layer_parts_s`, summed over the MoE layers; part of the
        iteration's time): the share PowerSpec.moe_loop_w applies to. 0 for any other model,
        and without a kernel fit or the GPU's fused-MoE loop constants."""
        v = self._loop_cache.get(tokens)
        if v is None:
            v = 0.0
            if self._kern is not None and self._moe_path and self._fp8_block and tokens > 0:
                self.linear_parts(tokens, 0)  # (its _moe_linear fills the cache)
                v = self._loop_cache.get(tokens, 0.0)
            self._loop_cache[tokens] = v
        return v

    def moe_loop_iter_s(self, p_tokens: int, n_prefill: int, n: int, t_pad: int = -1) -> float:
        """:meth:`moe_loop_s` of an iteration of ``p_tokens`` prompt tokens over ``n_prefill``
        prompts and ``n`` decoding sequences (its layers' tokens: padded under data
        parallelism, as :meth:`iteration` times them, ``t_pad`` the same)."""
        t = p_tokens + n if self.dp <= 1 else self.padded_tokens(p_tokens, n_prefill, n, t_pad)
        return self.moe_loop_s(t)

    def padded_tokens(self, p_tokens: int, n_prefill: int, n: int, t_pad: int) -> int:
        """The tokens of a data-parallel iteration: ``t_pad`` where given (an iteration with
        prompt tokens, one scheduler per rank: serving/ranks.py), else
        :meth:`dp_padded_tokens`."""
        if t_pad >= 0 and p_tokens > 0:
            return t_pad
        return self.dp_padded_tokens(p_tokens, n_prefill, n)

    def expert_flops_iter(self, p_tokens: int, n_prefill: int, n: int, t_pad: int = -1) -> float:
        """FLOPs of the routed experts' grouped GEMMs in an iteration of ``p_tokens`` prompt
        tokens over ``n_prefill`` prompts and ``n`` decoding sequences (part of
        :meth:`iteration`'s FLOPs; its layers' tokens, padded under data parallelism as
        :meth:`iteration` counts them): what ``PowerSpec.moe_compute_w`` prices. 0 for a dense
        model."""
        if not self.f_exp:
            return 0.0
        t = p_tokens + n if self.dp <= 1 else self.padded_tokens(p_tokens, n_prefill, n, t_pad)
        return self.f_exp * t

    def weight_bytes_per_iteration(self, tokens: float) -> float:
        """Weight bytes the replica reads in an iteration of ``tokens`` tokens (all of them for
        a dense model; a mixture of experts reads the experts those tokens touch): an
        iteration's bytes beyond these are KV cache and linear state (PowerSpec.kv_w)."""
        return self._weights(tokens)

    def _eff_c(self, tokens: float) -> float:
        p = self._roof
        if p.compute_eff_table is not None:
            return eff_from_table(p.compute_eff_table, tokens)
        return p.compute_eff_max * tokens / (tokens + p.compute_eff_half_tokens)

    # -- one general iteration -------------------------------------------------------------
    def iteration(
        self,
        p_tokens: int,
        pairs: float,
        n_prefill: int,
        n: int,
        ctx: float,
        t_pad: int = -1,
        p_full: int = -1,
        pairs_full: float = -1.0,
    ) -> tuple[float, float, float]:
        """Time (s), FLOPs and bytes of one iteration (see the module docstring). ``t_pad``
        (data parallelism only) replaces :meth:`dp_padded_tokens` as the tokens its layers run:
        ``dp`` times those of the fullest rank when the ranks' batches are known
        (``calibrate/dp_ranks.py``, every rank its own scheduler); ``p_full`` and
        ``pairs_full`` (likewise, with ``t_pad``) replace :meth:`fullest_prompts`: ``dp`` times
        the prompt tokens and the attention pairs of the rank with the most of each, which the
        prompt attention is timed at."""
        # the engine's hot path (once per run): attributes and caches read directly, the
        # helpers (_weights, step_time, run_coeffs, linear_time) inlined where their values are
        # cached; the same float operations in the same order as theirs (bit-identical)
        f_lin = self.f_lin
        f_head = self.f_head
        f_pair = self.f_pair
        flops = (
            p_tokens * f_lin
            + pairs * f_pair
            + n_prefill * f_head
            + n * (f_lin + f_head)
            + ctx * f_pair
        )
        tokens = p_tokens + n
        if self.dp > 1:  # the padding tokens every engine runs (dp_padded_flops)
            if t_pad < 0:
                t_pad = self.dp_padded_tokens(p_tokens, n_prefill, n)
            flops += (t_pad - tokens) * f_lin
        wd = self.dense_weight_bytes  # (_weights inlined for a dense model)
        nbytes = (
            (wd if wd is not None else self._weights(tokens))
            + self.kvb * (ctx + tokens)
            + self._sb * (n_prefill + n)
        )
        if p_tokens and self._pf_bytes:  # the prompt tokens' chunked scan (SSD)
            flops += p_tokens * self._pf_flops
            nbytes += p_tokens * self._pf_bytes
        if p_tokens == 0:  # a pure decode step: the run formula, so both modes agree exactly
            c = self.coeff_cache.get(n)
            if c is None:
                c = self.run_coeffs(n)
            x1 = c.a1 + c.b1 * ctx
            x2 = c.a2 + c.b2 * ctx
            return c.base + (x1 if x1 > x2 else x2), flops, nbytes
        if self._kern is not None:
            att_m = self._att_m
            if self.dp <= 1:
                n_e, ctx_e, p_e, pairs_e = n, ctx, p_tokens, pairs
            else:
                # the decodes and the prompt chunks of the fullest data-parallel engine
                # (dp_att_scale, fullest_prompts; the ranks' own where the engine knows them)
                n_e = self.fullest_decodes(n)
                ctx_e = ctx if n_e == n else ctx * (n_e / n)
                if pairs_full >= 0.0 and p_tokens > 0:
                    p_e, pairs_e = p_full, pairs_full
                else:
                    p_e, pairs_e = self.fullest_prompts(p_tokens, pairs, n_prefill)
            att = (pairs_e + ctx_e) * self._att_c
            kv = ctx_e * (att_m if self._unit_bw <= 0.0 else self.att_m_for(n))
            new_tok = (p_e + n_e) * att_m
            # a data-parallel replica's layers run every engine padded to the fullest one
            t_lin = tokens if self.dp <= 1 else t_pad
            lt = self._tok_cache.get(t_lin)
            hd = (self._head_cache_g if t_lin <= self._gmax else self._head_cache).get(
                n_prefill + n
            )
            lt = (
                lt + hd
                if lt is not None and hd is not None
                else self.linear_time(t_lin, n_prefill + n)
            )
            t = self._oh + lt + (att if att > kv else kv) + new_tok
            if self._pf_tok_s:  # the prompt tokens' chunked scan over the linear-state layers
                # (the fullest engine's: p_e / dp under data parallelism)
                p_eng = p_e if self.dp <= 1 else p_e // self.dp
                t += p_eng * self._pf_tok_s
            if self._pf_step_s:  # the serial prefill metadata (host, before the forward)
                t += self._pf_step_s
            if self._pf_iter_s > t:  # the Mamba-2 mixers' eager prefill path: a host floor
                t = self._pf_iter_s
            if self._eh and t_lin > self._gmax:  # an eager MoE iteration's host floor
                f = self.eager_host_s(n_prefill + n, n_prefill)
                if f > t:
                    t = f
            return t, flops, nbytes
        prof = self.profile
        if isinstance(prof, LinearProfile):
            t = (
                prof.base_s
                + prof.prefill_base_s
                + prof.per_prefill_token_s * p_tokens
                + prof.per_seq_s * (n_prefill + n)
                + prof.per_context_token_s * ctx
            )
        else:
            t_c = flops / (self._rc_peak * self._eff_c(tokens))
            t_m = nbytes / self._rm
            t = self._oh + (t_c if t_c > t_m else t_m) + self._comm_a + self._comm_b * tokens
        return t, flops, nbytes

    def _engine_prompt_tokens(self, p_tokens: int, n_prefill: int) -> int:
        """The prompt tokens of the fullest engine of an iteration of ``p_tokens`` prompt tokens
        over ``n_prefill`` prompts: all of them on one engine; under data parallelism the
        prompts go one to an engine (:meth:`dp_padded_tokens`)."""
        if self.dp <= 1 or n_prefill <= 0:
            return p_tokens
        return _ceil(_ceil(n_prefill / self.dp) * p_tokens / n_prefill)

    def eager_host_s(self, seqs: int, n_prefill: int = 0) -> float:
        """The host time of an iteration of ``seqs`` sequences that runs without a CUDA graph:
        the MoE layers' part plus the per-sequence part, each engine's share of the sequences,
        plus, when ``n_prefill`` of them carry prompt tokens, the latent-attention layers'
        prefill path (0 where the serving stack has no such floor)."""
        if not self._eh:
            return 0.0
        per_engine = seqs if self.dp <= 1 else _ceil(seqs / self.dp)
        t = self._eh_a + per_engine * self._eh_s
        return t + self._eh_p if n_prefill > 0 else t

    def decode_step(self, n: int, ctx: float) -> tuple[float, float, float]:
        """:meth:`iteration` of a pure decode step of ``n`` sequences at context ``ctx`` (no
        prefill): the same three numbers from the same operations, for the engine's hot path."""
        c = self.coeff_cache.get(n)
        if c is None:
            c = self.run_coeffs(n)
        x1 = c.a1 + c.b1 * ctx
        x2 = c.a2 + c.b2 * ctx
        # c.fa is n * (f_lin + f_head): iteration's FLOPs with its zero prefill terms dropped;
        # c.weight_bytes is _weights(n) (run_coeffs)
        nbytes = c.weight_bytes + self.kvb * (ctx + n) + self._sb * n
        return c.base + (x1 if x1 > x2 else x2), c.fa + ctx * self.f_pair, nbytes

    # -- decode runs -----------------------------------------------------------------------
    def run_coeffs(self, n: int) -> RunCoeffs:
        """Coefficients of a decode step of ``n`` sequences (cached per ``n``)."""
        c = self.coeff_cache.get(n)
        if c is not None:
            return c
        fa = n * (self.f_lin + self.f_head)
        if self.dp > 1:  # the padding tokens every engine runs (dp_padded_flops)
            fa += (self.dp_padded_tokens(0, 0, n) - n) * self.f_lin
        fb = self.f_pair
        ba = self._weights(n) + self.kvb * n + self._sb * n
        bb = self.kvb
        prof = self.profile
        if self._kern is not None:
            t_lin = n if self.dp <= 1 else self.dp_padded_tokens(0, 0, n)
            b_c = self._att_c
            b_kv = self.att_m_for(n)
            n_e = self.fullest_decodes(n)  # the fullest engine's decodes (dp_att_scale)
            base = self._oh + self.linear_time(t_lin, n) + n_e * self._att_m
            if n_e != n:
                b_c *= n_e / n
                b_kv *= n_e / n
            f = self.eager_host_s(n) if self._eh and t_lin > self._gmax else 0.0
            if f > base:
                # the eager host floor: max(f, base + slope x C) as the run's two lines, the
                # floor (f - base, flat in the context) and the attention's steeper slope
                c = RunCoeffs(base, f - base, 0.0, 0.0, b_c if b_c > b_kv else b_kv, fa, fb, ba, bb)
            else:
                c = RunCoeffs(base, 0.0, b_c, 0.0, b_kv, fa, fb, ba, bb)
        elif isinstance(prof, LinearProfile):
            a = prof.per_seq_s * n
            c = RunCoeffs(
                prof.base_s,
                a,
                prof.per_context_token_s,
                a,
                prof.per_context_token_s,
                fa,
                fb,
                ba,
                bb,
            )
        else:
            rc = self._rc_peak * self._eff_c(n)
            base = self._oh + self._comm_a + self._comm_b * n
            c = RunCoeffs(base, fa / rc, fb / rc, ba / self._rm, bb / self._rm, fa, fb, ba, bb)
        object.__setattr__(
            c, "comm_s", self.comm_s(n if self.dp <= 1 else self.dp_padded_tokens(0, 0, n), n)
        )
        object.__setattr__(c, "weight_bytes", self.weight_bytes_per_iteration(n))
        object.__setattr__(
            c, "loop_s", self.moe_loop_s(n if self.dp <= 1 else self.dp_padded_tokens(0, 0, n))
        )
        object.__setattr__(
            c,
            "expert_flops",
            self.f_exp * (n if self.dp <= 1 else self.dp_padded_tokens(0, 0, n)),
        )
        self.coeff_cache[n] = c
        return c

    # -- convenience for reports and tests --------------------------------------------------
    def breakdown(
        self, p_tokens: int, pairs: float, n_prefill: int, n: int, ctx: float
    ) -> dict[str, float]:
        """The named parts (seconds) of :meth:`iteration`'s time, in the order a report shows
        them; they sum to it (up to rounding). With the kernel model: ``attention_linear``
        (norms, projections, rotary, adds), ``attention_core`` (scores and the KV read),
        ``dense_mlp``, for a mixture of experts ``shared_mlp``, ``moe_router``,
        ``moe_dispatch``, ``moe_grouped_gemm``, ``moe_combine``, under expert parallelism
        ``moe_ep_wait`` (the mean rank's wait for the busiest at the MoE all-reduce, part of the
        communication time), then ``allreduce``,
        ``lm_head``, ``embedding``, ``per_sequence`` (the serving stack's time per sequence:
        sampling and host work, when the stack has one) and ``overhead``. Without it:
        ``overhead``, ``comm`` and the roofline's winning bound as ``compute`` or
        ``memory``."""
        total, flops, nbytes = self.iteration(p_tokens, pairs, n_prefill, n, ctx)
        tokens = p_tokens + n
        seqs = n_prefill + n
        if self._kern is None:
            prof = self.profile
            if isinstance(prof, LinearProfile):
                return {"linear": total}
            comm = self._comm_a + self._comm_b * tokens
            rest = total - self._oh - comm
            bound = "compute" if flops / self._rc_peak > nbytes / self._rm else "memory"
            return {bound: rest, "comm": comm, "overhead": self._oh}
        if self._moe_path:
            t_lin = tokens if self.dp <= 1 else self.dp_padded_tokens(p_tokens, n_prefill, n)
            lin = dict(self._moe_linear(t_lin, seqs)[3])
        else:
            kf = self._kern_g if tokens <= self._gmax else self._kern
            assert kf is not None
            m = self.model
            lp = layer_parts_s(
                kf, self._peak_lin, self._bw, self._shapes, tokens, self._wb, experts_touched=1.0
            )
            mlp = ("mlp_up_proj", "mlp_act", "mlp_down_proj", "mlp_router")
            comm = self.linear_parts(tokens, 0)[2]
            head = self.linear_time(tokens, seqs) - self._tok_cache[tokens]
            lin = {
                "attention_linear": m.n_layers * sum(v for k, v in lp.items() if k not in mlp),
                "dense_mlp": m.n_layers * sum(lp[k] for k in mlp),
                "allreduce": comm,
                "lm_head": head,
                "embedding": elem_time_s(kf, self._bw, "emb", 4.0 * tokens * m.d_model),
            }
        if "linear_state" in lin and p_tokens > 0:  # the prefill path (iteration)
            p_eng = self._engine_prompt_tokens(p_tokens, n_prefill)
            lin["linear_state"] += p_eng * self._pf_tok_s
            if self._pf_step_s:
                lin["prefill_metadata"] = self._pf_step_s
        if self._per_seq and seqs > 0:  # the serving stack's per-sequence time, on its own
            # (each data-parallel engine's share, as _head_time charges it)
            per_seq = (seqs if self.dp <= 1 else _ceil(seqs / self.dp)) * self._per_seq
            lin["lm_head"] -= per_seq
            lin["per_sequence"] = per_seq
        # the fullest data-parallel engine's decodes and prompt chunks, as iteration times
        # them (dp_att_scale, fullest_prompts)
        n_e = self.fullest_decodes(n)
        ctx_e = ctx if n_e == n else ctx * (n_e / n)
        p_e, pairs_e = self.fullest_prompts(p_tokens, pairs, n_prefill)
        att = (pairs_e + ctx_e) * self._att_c
        kv = ctx_e * self.att_m_for(n)
        out = {"attention_linear": lin.pop("attention_linear")}
        out["attention_core"] = (att if att > kv else kv) + (p_e + n_e) * self._att_m
        out.update(lin)
        out["overhead"] = self._oh
        gap = total - sum(out.values())
        if self._eh and gap > 1e-12:  # the eager host floor's exposed part
            out["eager_host"] = gap
        elif self._pf_iter_s and p_tokens > 0 and gap > 1e-12:  # the Mamba-2 prefill floor's
            out["prefill_host"] = gap
        return out

    def prefill_time(self, prompt_tokens: int, batch: int = 1) -> float:
        """Time of one iteration prefilling ``batch`` prompts of ``prompt_tokens`` each."""
        return self.iteration(
            prompt_tokens * batch, float(batch * prompt_tokens**2), batch, 0, 0.0
        )[0]

    def decode_ctx(self, batch: int, context_tokens: float) -> float:
        """The ``ctx`` of a decode step of ``batch`` sequences at ``context_tokens`` each: their
        attended keys (:meth:`ModelSpec.attended_keys`; ``batch x context_tokens`` without
        sliding windows)."""
        m = self.model
        if m.sliding_window_tokens <= 0:
            return float(batch * context_tokens)
        return batch * m.attended_keys(context_tokens)

    def decode_time(self, batch: int, context_tokens: int) -> float:
        """Time of one decode step of ``batch`` sequences, each with ``context_tokens`` of
        context (a window layer reads at most its window of each)."""
        return step_time(self.run_coeffs(batch), self.decode_ctx(batch, context_tokens))
