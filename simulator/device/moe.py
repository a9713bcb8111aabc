"""Mixture-of-experts layers as vLLM runs them: one fused MoE operator, expert parallelism.

**Distinct experts.** A token routed top-``k`` picks a set of ``k`` distinct experts out of
``n``. Under uniform routing every ``k``-subset is equally likely, so a given expert is *not*
among a token's picks with probability::

    C(n-1, k) / C(n, k) = (n - k) / n = 1 - k/n

(the subsets of the other ``n - 1`` experts among all subsets; sampling without replacement
changes nothing for one expert's marginal). Tokens route independently, so an expert is left
untouched by ``T`` tokens with probability ``(1 - k/n)^T``, and by linearity of expectation the
expected number of distinct experts the batch touches is exactly::

    E[distinct] = n * (1 - (1 - k/n)^T)

Of those, a rank holding ``n / ep`` experts (expert parallelism over ``ep`` ranks) touches
``(n / ep) * (1 - (1 - k/n)^T)``. Each touched expert receives ``Binomial(T, k/n)`` tokens given
it is touched, ``T k / E[distinct]`` on average. ``tests/test_moe.py`` checks the closed form
against a seeded Monte Carlo count of top-``k`` draws without replacement.

**The fused MoE operator** (vLLM ``fused_moe``: ``topk_softmax`` on the router logits,
``moe_align_block_size`` sorting the routed rows by expert and padding each expert's rows to the
kernel's block, then one grouped GEMM launch for the gate+up weights of all experts, the
activation, and one grouped GEMM launch for the down weights, whose ``k`` outputs per token are
summed). Its cost here:

* the router: a GEMM of the tokens by the ``n x d`` gate (16-bit, replicated);
* routing (top-k, align, sum): one elementwise operator reading the fp32 router logits;
* each grouped GEMM: **one launch**; its weight bytes are the distinct experts it touches times
  one expert's matrix; its rows are the ``T k`` routed rows, each expert's rows padded to the GEMM
  tile as for a dense GEMM of ``T k / E[distinct]`` rows (``kernels.gemm_rows``); compute and
  memory bounds blended as in :func:`fleetsim.device.kernels.gemm_time_s`;
* shared experts (``n_shared_experts x d_ff_shared`` columns) run as a dense MLP on every token.

* **the kernel's loop latency** (:class:`FusedMoeFit`, fitted per GPU to the ML.ENERGY v3 MoE
  rows by ``calibrate/moe_fit.py``): where vLLM ships no tuned configuration for the layer's
  shape it runs ``get_default_config``'s small tiles, and each grouped GEMM adds its programs'
  serial K loop (``ceil(K / BLOCK_SIZE_K)`` steps of a fitted step time) per wave of programs
  to its throughput-bound time; plus a fixed routing time per MoE layer. Without it the
  simulated Qwen3-235B-A22B, Qwen3-Coder-480B, DeepSeek-V3.1 and every fp8 server were 25-60%
  too fast at small and mid batch.

This replaces the earlier per-expert timing (one GEMM launch per expert touched, each with its
own launch floor), which made a many-expert decode step pay tens of launches per layer.

**Expert and data parallelism** (vLLM ``--enable-expert-parallel`` with ``--data-parallel-size``):
a server of ``tp x dp`` GPUs runs ``dp`` attention engines of ``tp`` GPUs each; the MoE layers
span all ``ep = tp x dp`` GPUs. With expert parallelism each GPU holds ``n / ep`` whole experts;
without it every expert's columns are split ``ep`` ways (vLLM's MoE tensor parallelism over the
flattened DP x TP group). The attention, dense and shared-expert parts run on each engine's share
of the tokens, ``ceil(T / dp)`` (the engines run in lockstep, so the fuller one sets the pace),
sharded ``tp`` ways. When ``dp > 1`` the MoE layer's tokens are gathered from and returned to the
engines: dispatch is an all-gather and combine a reduce-scatter of the hidden states across the
``dp`` engines (vLLM 0.11's default all-to-all backend, ``allgather_reducescatter``), each priced
on the node's link (the GPU's ``link_bw_bytes_per_s`` per direction, NVLink within one node, the
same figure as ``catalog/links.toml``) as ``latency + (dp - 1) / dp * T * d * 2 bytes / bw``.
With ``dp = 1`` the tokens are already on every GPU of the tensor-parallel group and the MoE output
is summed by the layer's usual all-reduce.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from fleetsim.device.kernels import KernelFit, LayerShapes, elem_time_s, gemm_rows, gemm_time_s
from fleetsim.device.modelspec import ModelSpec


@dataclass(frozen=True, slots=True)
class FusedMoeFit:
    """Per-GPU constants of the fused MoE kernel's loop latency (``catalog/moe.toml``; the
    step times are fitted by ``python -m fleetsim.calibrate.moe_fit``; zeros: none).

    vLLM 0.11's Triton ``fused_moe_kernel`` gives each program one ``BLOCK_SIZE_M x
    BLOCK_SIZE_N`` output tile of one expert and loops over the reduction dimension ``K`` in
    ``BLOCK_SIZE_K`` steps, one after the other, each waiting on its tiles' loads. A launch
    therefore takes ``ceil(K / BLOCK_SIZE_K)`` step latencies of one program, one such span per
    wave of programs when the grid exceeds what the GPU holds at once, on top of its
    throughput-bound time (see :func:`k_loop_latency_s`; adding them fitted the rows better than
    the larger of the two: a loop step's latency is not hidden behind other programs' streaming
    when the small decode grid is about one wave). ``k_step_s`` (16-bit weights) and
    ``k_step_fp8_s`` (fp8 weights with 128 x 128 block scales, whose step also loads and
    applies the scales, in a layer with a tuned fp8 configuration; without one see
    ``k_step_fp8_default_s``) are one step's time, fitted (about one DRAM round trip for 16-bit);
    ``layer_s`` is a fixed time per MoE layer (the launch-bound routing kernels
    ``topk_softmax``, ``moe_align_block_size`` and ``moe_sum``), fitted; ``sms`` and
    ``smem_per_sm_bytes`` are the GPU's streaming multiprocessors and shared memory per SM (data
    sheets, in the catalog file), which bound the programs resident at once."""

    k_step_s: float = 0.0
    k_step_fp8_s: float = 0.0
    layer_s: float = 0.0
    sms: int = 132
    smem_per_sm_bytes: float = 228 * 1024
    #: 16-bit layer shapes ``(local experts E, intermediate columns N per GPU)`` that vLLM ships a
    #: tuned kernel configuration for on this GPU (``fused_moe/configs/E=..,N=..,device_name=
    #: ...json``): their tiles were chosen by benchmarking, so the roofline kernel model stands
    #: and :func:`k_loop_latency_s` is not added (fp8 block-quantised layers always get a loop
    #: latency, their rows are slow with or without a tuned file: ``tuned_fp8`` says which)
    tuned: tuple[tuple[int, int], ...] = ()
    #: one K-loop step (seconds) of the fp8 block-quantised kernel where vLLM ships no tuned
    #: configuration for the layer's shape (``tuned_fp8``) and runs ``get_default_config``'s
    #: 64 x 128 x 128 tiles: charged per whole wave of the grid over every expert this GPU
    #: holds, not the touched ones (:func:`fp8_default_loop_latency_s`); fitted
    k_step_fp8_default_s: float = 0.0
    #: fp8 ``[128, 128]`` block-quantised layer shapes ``(local experts E, intermediate columns N
    #: per GPU)`` that vLLM ships a tuned configuration for on this GPU (``fused_moe/configs/
    #: E=..,N=..,device_name=...,dtype=fp8_w8a8,block_shape=[128,128].json``): their loop
    #: (:func:`fp8_default_loop_latency_s`, the same grid) runs at ``k_step_fp8_s``
    tuned_fp8: tuple[tuple[int, int], ...] = ()
    #: the Triton ``fused_moe_kernel``'s own sustained MMA rate as a fraction of the experts'
    #: dense tensor-core peak (the data sheet's): the grouped GEMMs' routed rows take at least
    #: ``2 x rows x n x k / (mma_frac x peak)`` (:func:`grouped_gemm_time_s`, ``mma_flops``), on
    #: top of the kernel fit's bounds; 1: no such bound. It binds on prefill-sized launches
    #: (thousands of routed rows), not on decode. Fitted to the MoE rows' output tokens/s
    #: (``calibrate/moe_fit.py``, ``--mma``): H100 0.34, B200 0.15, the same ~0.34 PFLOP/s on
    #: both, i.e. the kernel does not gain the B200's faster tensor cores (the measured
    #: prefill-carrying time per step of a model at a batch is the same on both GPUs)
    mma_frac: float = 1.0
    #: FlashInfer's TensorRT-LLM fp8 block-scale MoE kernel (``fp8_moe_kernel =
    #: "flashinfer-trtllm"``, :func:`flashinfer_moe_gemm_s`): the fixed time of one MoE layer's
    #: call (the activations' per-token-group fp8 quantisation, the fused routing, the
    #: permutation, the two grouped GEMMs' launches and the finalize), fitted (0 with
    #: ``fi_bw_frac`` 0: not fitted for this GPU, and ``fleet.fp8_moe_kernel`` refuses it)
    fi_layer_s: float = 0.0
    #: the fraction of the memory bandwidth at which that kernel streams the touched experts'
    #: fp8 weights (and its rows' activations), fitted; 0: the kernel fit's GEMM bandwidth
    #: efficiency
    fi_bw_frac: float = 0.0
    #: the fraction of a program's K loop that each whole wave of an fp8 block-quantised launch
    #: adds after its first (:func:`fp8_default_loop_latency_s`): the first wave pays the whole
    #: serial loop, a later one only this share of it (its programs start as the earlier
    #: wave's finish one by one, their loads overlapping the earlier programs' dots and
    #: rescales); 1: every wave the whole loop. Fitted on the surrogate of ``moe_fit``
    #: (:data:`fleetsim.calibrate.moe_fit.FP8_WAVE_FRAC`), one value for both GPUs
    fp8_wave_frac: float = 1.0
    #: the tiles vLLM's tuned fp8 configuration gives a prefill-sized launch of a ``tuned_fp8``
    #: shape: ``(E, N, key_below, key_top, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
    #: num_stages, num_warps)``, the file's entry at its largest token key ``key_top``, which
    #: ``try_get_optimal_moe_config`` (nearest key to the kernel's tokens ``M``) picks for every
    #: ``M`` above ``(key_below + key_top) / 2`` (:func:`tuned_fp8_tiles`); the files'
    #: values, not fitted (``calibrate/moe_fit.py``, ``TUNED_FP8_LARGE_M``)
    tuned_fp8_large_m: tuple[tuple[int, ...], ...] = ()


NO_MOE_FIT = FusedMoeFit()

#: the weight block of fp8 block-quantised layers (``weight_block_size: [128, 128]`` of every
#: fp8 checkpoint in data/models; the latency model times fp8 experts so)
FP8_BLOCK = 128

#: the tiles of an fp8 block-quantised fused-MoE launch: ``(BLOCK_SIZE_M, BLOCK_SIZE_N,
#: BLOCK_SIZE_K, num_stages, num_warps)``
Fp8Tiles = tuple[int, int, int, int, int]

#: warps one SM holds at once (2,048 resident threads / 32; CUDA C++ Programming Guide,
#: "Compute Capabilities", 8.0-10.0): a program of ``num_warps`` warps, at most 64 / num_warps
MAX_WARPS_PER_SM = 64

#: the fp8 fused-MoE kernels the simulator knows (``fleet.fp8_moe_kernel``): vLLM's Triton
#: ``fused_moe_kernel`` (w8a8 block, :func:`k_loop_latency_s`), or FlashInfer's TensorRT-LLM
#: block-scale kernel that vLLM 0.11 runs on Blackwell (SM100) with
#: ``VLLM_USE_FLASHINFER_MOE_FP8=1`` (:func:`flashinfer_moe_gemm_s`). nvfp4 experts take the
#: same setting: "triton" is then vLLM's default CUTLASS FP4 grouped GEMM
#: (:func:`mxfp4_moe_gemm_s`), "flashinfer-trtllm" the kernel family's FP4 MoE
#: (``VLLM_USE_FLASHINFER_MOE_FP4=1``, ``VLLM_FLASHINFER_MOE_BACKEND=latency``)
FP8_MOE_KERNELS = ("triton", "flashinfer-trtllm")

#: most programs of 4 warps (Triton's default) one SM holds: 2,048 threads / 128 (CUDA C++
#: Programming Guide, "Compute Capabilities": 2,048 resident threads per SM for 8.0-10.0)
MAX_PROGRAMS_PER_SM = 16


def default_block_config(
    tokens: float, local_experts: float, fp8_block: bool
) -> tuple[int, int, int, int]:
    """``(BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages)`` of vLLM's fused MoE kernel
    where no tuned configuration file matches the layer (``vllm/model_executor/layers/
    fused_moe/fused_moe.py``, ``get_default_config``): fp8 with block scales ``[128, 128]``:
    M 64, N 128, K 128, 3 stages; 16-bit weights: M 16, N 32, K 64 while the tokens ``M`` are
    at most the local experts ``E`` (``w1.shape[0]``), else M 64, N 64, K 32 (Triton's default
    of 2 stages)."""
    if fp8_block:
        return 64, 128, 128, 3
    if tokens <= local_experts:
        return 16, 32, 64, 2
    return 64, 64, 32, 2


def fp8_default_tiles() -> Fp8Tiles:
    """The fp8 ``[128, 128]`` block-quantised launch's tiles without a tuned configuration
    (:func:`default_block_config`: M 64, N 128, K 128, 3 stages; Triton's 4 warps)."""
    bm, bn, bk, stages = default_block_config(1.0, 1.0, True)
    return bm, bn, bk, stages, 4


def fp8_programs_per_sm(mf: FusedMoeFit, tiles: Fp8Tiles) -> int:
    """Programs of an fp8 block-quantised fused-MoE launch one SM holds at once: its shared
    memory over a program's staged fp8 tiles, ``(BM x BK + BK x BN) x stages`` bytes, and at most
    :data:`MAX_WARPS_PER_SM` / ``num_warps`` (16 for Triton's 4 warps, as
    :data:`MAX_PROGRAMS_PER_SM`); at least one. The default tiles stage (64 x 128 + 128 x 128) x 3
    = 73,728 bytes: 3 on the H100 and the B200 (228 KB)."""
    bm, bn, bk, stages, warps = tiles
    smem = (bm * bk + bk * bn) * stages
    cap = max(1, MAX_WARPS_PER_SM // max(1, warps))
    return min(cap, max(1, int(mf.smem_per_sm_bytes // smem)))


def tuned_fp8_tiles(mf: FusedMoeFit, shape: tuple[int, int], tokens: float) -> Fp8Tiles | None:
    """The tiles vLLM 0.11's tuned fp8 configuration gives a launch of ``tokens`` tokens (the
    kernel's ``M``: every engine's padded tokens under data parallelism) of the layer ``shape``
    ``(local experts, N)``, where ``M`` lies past the midpoint of the file's two largest keys
    (``FusedMoeFit.tuned_fp8_large_m``); None below it (the fitted step stands for the smaller
    keys' tiles) or for a shape without such an entry.

    ``try_get_optimal_moe_config`` (``vllm/model_executor/layers/fused_moe/fused_moe.py``) reads
    ``E={E},N={N},device_name=...,dtype=fp8_w8a8,block_shape=[128,128].json`` and takes the entry
    whose key is nearest ``M`` (``min(configs, key=lambda x: abs(x - M))``; a tie goes to the
    smaller key); the files end at 4,096, so a padded prompt step (thousands of tokens) runs the
    4,096 entry. On the B200 that entry differs between the two Qwen3-Coder-480B-FP8 layouts:
    ``E=40,N=2560`` (DP4) stages 3 (the default's 73,728 bytes, 3 programs per SM) and
    ``E=20,N=2560`` (DP8) stages 4 (98,304 bytes, 2 per SM)."""
    for e in mf.tuned_fp8_large_m:
        if (e[0], e[1]) == shape and 2.0 * tokens > e[2] + e[3]:
            return e[4], e[5], e[6], e[7], e[8]
    return None


def k_loop_latency_s(
    mf: FusedMoeFit,
    tokens: float,
    local_experts: float,
    touched: float,
    rows: float,
    n: float,
    k: float,
    fp8_block: bool,
) -> float:
    """The serial K-loop latency of one fused-MoE grouped-GEMM launch of ``rows`` routed rows over
    ``touched`` experts (``local_experts`` held here, ``tokens`` in the kernel), each an
    ``n x k`` weight: ``ceil(k / BLOCK_SIZE_K)`` steps x the step time x the waves, where the
    grid is ``touched x ceil(rows per expert / BLOCK_SIZE_M) x ceil(n / BLOCK_SIZE_N)`` programs
    and a wave is ``sms x`` the programs one SM holds (its shared memory over a program's staged
    tiles, ``(BM x BK + BK x BN) x bytes x stages``, at most :data:`MAX_PROGRAMS_PER_SM`), at
    least one."""
    step = mf.k_step_fp8_s if fp8_block else mf.k_step_s
    if step <= 0.0 or touched <= 0.0 or rows <= 0.0:
        return 0.0
    bm, bn, bk, stages = default_block_config(tokens, local_experts, fp8_block)
    programs = touched * math.ceil(rows / touched / bm) * math.ceil(n / bn)
    smem = (bm * bk + bk * bn) * (1.0 if fp8_block else 2.0) * stages
    per_sm = min(MAX_PROGRAMS_PER_SM, max(1, int(mf.smem_per_sm_bytes // smem)))
    waves = programs / (mf.sms * per_sm)
    return math.ceil(k / bk) * step * (waves if waves > 1.0 else 1.0)


def fp8_default_grid_waves(
    mf: FusedMoeFit, local_experts: float, rows: float, n: float, tiles: Fp8Tiles | None = None
) -> int:
    """Whole waves of the program grid an fp8 block-quantised fused-MoE launch with
    ``get_default_config``'s tiles (M 64, N 128, K 128, 3 stages) runs on this GPU: one
    ``64 x 128`` output tile per program over **every expert this GPU holds**
    (``local_experts x ceil(rows per local expert / 64) x ceil(n / 128)`` programs, at least one
    row block per expert, whether the batch touched it or not), ``sms x`` the programs one SM
    holds (its shared memory over a program's staged tiles, ``(64 x 128 + 128 x 128) x 3``
    bytes: 3 on the H100 and the B200) to a wave, rounded up: every program runs the same
    ``ceil(K / 128)`` serial steps, so a partly filled last wave takes a whole program's time.

    Why every local expert: the measured ML.ENERGY rows (vLLM 0.11.1) of Qwen3-235B-A22B-FP8,
    whose layers have no tuned fp8 file on either GPU, take a K-loop time that does not grow
    with the batch but with the experts per GPU: on the B200 the 2-GPU server (64 local
    experts) decodes 8 sequences in 36.9 ms and the 4-GPU one (32) in 24.6 ms, and both grow by
    only 8-14 ms to 64 sequences, while the experts the batch touches grow 2.4x (12.9 -> 31.5
    per GPU under EP4). A grid over the touched experts (:func:`k_loop_latency_s`) makes EP4 at
    64 sequences slower than EP2 at 8 (more programs), against the data; a grid over the local
    experts fits both GPUs with one step time each (docs/accuracy-log.md). Which part of vLLM's
    launch sizes the grid so is not established here (``moe_align_block_size``'s padded bound
    ``numel + E x (BLOCK_SIZE_M - 1)`` rows sizes the launch by experts, not by the batch).

    ``tiles``: a tuned configuration's tiles (:func:`tuned_fp8_tiles`) instead of the default's,
    their ``BLOCK_SIZE_M`` and ``BLOCK_SIZE_N`` in the grid and their programs per SM
    (:func:`fp8_programs_per_sm`) in a wave."""
    if local_experts <= 0 or n <= 0:
        return 0
    t = fp8_default_tiles() if tiles is None else tiles
    bm, bn = t[0], t[1]
    per_expert = max(1, math.ceil(rows / local_experts / bm)) if rows > 0 else 1
    programs = math.ceil(local_experts) * per_expert * math.ceil(n / bn)
    per_sm = fp8_programs_per_sm(mf, t)
    return max(1, math.ceil(programs / (mf.sms * per_sm)))


def fp8_default_loop_latency_s(
    mf: FusedMoeFit,
    k: float,
    local_experts: float = 1.0,
    rows: float = 0.0,
    n: float = 1.0,
    tuned: bool = False,
    tiles: Fp8Tiles | None = None,
) -> float:
    """The loop latency of one fp8 block-quantised fused-MoE launch of ``n`` output columns over
    a reduction of ``k`` where vLLM has no tuned configuration for the layer: ``ceil(k / 128)``
    K steps of ``k_step_fp8_default_s`` for the first whole wave of the grid over the
    ``local_experts`` this GPU holds (:func:`fp8_default_grid_waves`; ``rows`` the routed rows of
    this GPU's experts) and ``fp8_wave_frac`` of that for each further wave.

    With ``get_default_config``'s fp8 tiles (M 64, N 128, K 128; ``vllm/model_executor/layers/
    fused_moe/fused_moe.py``) a decode step fills a 64-row tile with one to a few routed rows
    per expert, and ``fused_moe_kernel``'s block-scaled loop (``accumulator += tl.dot(a, b) *
    a_scale[:, None] * b_scale[None, :]``, the scales of A gathered per row and of B loaded per
    step) waits for each step's dot and rescales the whole 64 x 128 fp32 accumulator before the
    next. Hand count, Qwen3-235B-A22B-FP8 (d 4,096, expert width 1,536) on the B200 (148 SMs x 3
    programs = 444 a wave): EP2 (64 local experts) gate+up 64 x 24 = 1,536 programs, 4 waves, x 32 K
    steps; down 64 x 32 = 2,048, 5 waves, x 12; EP4 (32) 768 -> 2 waves and 1,024 -> 3: with the
    catalog's ``fp8_wave_frac`` 0.4, 32 x 2.2 + 12 x 2.6 = 101.6 against 32 x 1.4 + 12 x 1.8 = 66.4
    step times per layer at every decode batch (1.53x; measured ITL 36.9 vs 24.6 ms at 8 sequences,
    the MoE loop about 23 vs 14 ms of it). Before (main fe1c321) the loop was ``ceil(k / 128)``
    steps once per launch whatever the grid, which priced EP2 and EP4 alike (B200 EP4 ITL +17 to +29
    % at 8-128 sequences).

    ``tuned``: the layer's shape has a tuned fp8 file (``FusedMoeFit.tuned_fp8``); its launch is
    counted on the same grid (the default tiles' count; the tuned tiles' effect is in the step)
    at ``k_step_fp8_s``. Its measured rows are as flat in batch as the untuned ones
    (Qwen3-Coder-480B-FP8 on 4 B200s under DP4, 40 local experts: 36.2 / 37.6 / 40.6 / 42.3 ms
    at 8-64 sequences), where the grid over the touched experts (:func:`k_loop_latency_s`, the
    form before) went from 37 % too fast to 37 % too slow.

    ``tiles``: the tuned configuration's tiles of a prefill-sized launch
    (:func:`tuned_fp8_tiles`): its ``BLOCK_SIZE_K`` sets the K steps and its grid and programs
    per SM the waves (:func:`fp8_default_grid_waves`)."""
    step = mf.k_step_fp8_s if tuned else mf.k_step_fp8_default_s
    if step <= 0.0 or k <= 0:
        return 0.0
    bk = (fp8_default_tiles() if tiles is None else tiles)[2]
    waves = fp8_default_grid_waves(mf, local_experts, rows, n, tiles)
    if waves <= 0:
        return 0.0
    return math.ceil(k / bk) * step * (1.0 + mf.fp8_wave_frac * (waves - 1))


def flashinfer_moe_gemm_s(
    mf: FusedMoeFit,
    fp8_peak_flops: float,
    mma_eff: float,
    bw_bytes_per_s: float,
    rows: float,
    touched: float,
    n: float,
    k: float,
    bw_frac: float = 1.0,
    weight_bytes_per_param: float = 1.0 + 4.0 / (128.0 * 128.0),
    input_bytes_per_elem: float = 1.0,
) -> float:
    """One grouped GEMM of FlashInfer's TensorRT-LLM fp8 block-scale MoE kernel
    (``trtllm_fp8_block_scale_moe``, which vLLM 0.11 calls through
    ``flashinfer_fused_moe_blockscale_fp8`` on SM100 when ``VLLM_USE_FLASHINFER_MOE_FP8=1``):
    ``rows`` routed rows of this GPU's experts over ``touched`` experts, each an ``n x k`` fp8
    weight with ``[128, 128]`` fp32 block scales. A tcgen05 block-scaled grouped GEMM: no
    serial K loop of one program in its time (unlike the Triton kernel,
    :func:`k_loop_latency_s`), the larger of

    * memory: the touched experts' weights (``touched x n x k`` bytes, plus ``4 / 128^2`` of
      that in block scales), the rows' fp8 input (``rows x k``) and 16-bit output (``rows x
      n x 2``) at ``fi_bw_frac`` of the bandwidth (``bw_frac`` where that is not fitted, 0:
      the caller passes the kernel fit's GEMM bandwidth efficiency), and
    * compute: ``2 x rows x n x k`` FLOPs at ``mma_eff`` of the fp8 dense peak (the kernel
      fit's sustained GEMM efficiency: a tuned tensor-core GEMM, not Triton's MMA rate).

    The layer's fixed time (``fi_layer_s``) is charged once per layer by the caller. nvfp4
    experts (the same kernel family's FP4 block-scale MoE, ``trtllm_fp4_block_scale_moe``, which
    vLLM 0.11 runs for ``ModelOptNvFp4FusedMoE`` on SM100 with ``VLLM_USE_FLASHINFER_MOE_FP4=1``
    and ``VLLM_FLASHINFER_MOE_BACKEND=latency``) pass ``weight_bytes_per_param`` 0.5625 and
    ``input_bytes_per_elem`` 0.5625 (NVFP4 activations) and the FP4 peak; the fitted
    ``fi_layer_s`` and ``fi_bw_frac`` are the fp8 kernel's (assumed, L: no measured FP4 row)."""
    if rows <= 0 or touched <= 0 or n <= 0 or k <= 0:
        return 0.0
    w = touched * n * k * weight_bytes_per_param
    t_in = rows * k * input_bytes_per_elem
    t_m = (w + t_in + rows * n * 2.0) / (bw_bytes_per_s * (mf.fi_bw_frac or bw_frac))
    t_c = 2.0 * rows * n * k / (fp8_peak_flops * mma_eff)
    return t_m if t_m > t_c else t_c


def mxfp4_moe_gemm_s(
    fit: KernelFit,
    peak_flops: float,
    bw_bytes_per_s: float,
    rows: float,
    touched: float,
    n: float,
    k: float,
    weight_bytes_per_param: float,
) -> float:
    """One grouped GEMM of mxfp4 experts (gpt-oss: 4-bit e2m1 weights, one e8m0 scale per 32,
    :data:`fleetsim.device.modelspec.DTYPE_BYTES` ``"mxfp4"`` = 4.25 / 8 bytes a parameter) as
    vLLM 0.11 runs them: ``rows`` routed rows of this GPU's experts over ``touched`` experts,
    each an ``n x k`` weight. Not the Triton ``fused_moe_kernel``: ``Mxfp4MoEMethod``
    (``vllm/model_executor/layers/quantization/mxfp4.py``, ``get_mxfp4_backend``) runs the
    ``triton_kernels`` ``matmul_ogs`` grouped GEMM on Hopper (Marlin's fp4 MoE without
    ``triton_kernels``, FlashInfer's CUTLASS kernel with ``VLLM_USE_FLASHINFER_MOE_MXFP4_BF16``)
    and FlashInfer's TensorRT-LLM MoE on Blackwell (bf16 or, with
    ``VLLM_USE_FLASHINFER_MOE_MXFP4_MXFP8``, mxfp8 activations), so neither the fitted K-loop
    latency of :func:`k_loop_latency_s` (fitted on ``fused_moe_kernel``'s
    ``get_default_config`` tiles with 16-bit and fp8 experts) nor the dense GEMM fit's small-tile
    compute shape applies (derived: the kernels differ). The time is one launch floor plus the
    larger of

    * memory: the touched experts' packed weights (``touched x n x k x weight_bytes_per_param``)
      and the rows' 16-bit input (``rows x k``) and output (``rows x n``) at the kernel fit's
      GEMM bandwidth efficiency (the weight stream of a decode step), and
    * compute: ``2 x rows x n x k`` FLOPs at ``gemm_eff_max`` of ``peak_flops`` (the caller's
      experts' peak: the 16-bit one, the weights dequantised in registers; assumed).

    Checked against published H100 decode steps of gpt-oss-120b (docs/accuracy-log.md,
    "gpt-oss's mxfp4 experts"); no ML.ENERGY row has mxfp4 experts."""
    if rows <= 0 or touched <= 0 or n <= 0 or k <= 0:
        return 0.0
    w = touched * n * k * weight_bytes_per_param
    t_m = (w + (rows * k + rows * n) * 2.0) / (bw_bytes_per_s * fit.gemm_bw_eff)
    t_c = 2.0 * rows * n * k / (peak_flops * fit.gemm_eff_max)
    return fit.gemm_launch_s + (t_m if t_m > t_c else t_c)


#: how vLLM runs mxfp4 experts on each catalog GPU (``Mxfp4MoEMethod``, ``get_mxfp4_backend`` in
#: vllm/model_executor/layers/quantization/mxfp4.py), and what :func:`mxfp4_moe_gemm_s` times of
#: it: on every GPU the activations stay bf16 by default, so the GEMMs run at the bf16 peak
#: (``LatencyModel``'s experts' peak, ``compute_peak(profile, "mxfp4")``); only the weight
#: stream shrinks. For ``fleetsim latency``'s header (a user reading "experts mxfp4" should not
#: assume fp4 tensor-core FLOPs). Derived from the source (the backends); the bf16 peak on the
#: B200 is assumed (docs/accuracy-log.md, "gpt-oss's mxfp4 experts").
MXFP4_MOE_PATHS = {
    # SM80: triton_kernels needs SM90, so vLLM falls back to Marlin's fp4 MoE (no fp4 units)
    "a100-80gb": "experts mxfp4, weight-only on this GPU (vLLM runs Marlin's fp4 MoE, the "
    "weights dequantised to bf16 in registers): compute at the bf16 peak; Marlin's own costs "
    "are not modelled",
    # SM90: the Triton backend, triton_kernels' matmul_ogs (no fp4 tensor cores on Hopper)
    "h100-sxm": "experts mxfp4, weight-only on this GPU (vLLM runs triton_kernels' matmul_ogs, "
    "the weights dequantised to bf16 in registers): compute at the bf16 peak",
    "h200": "experts mxfp4, weight-only on this GPU (vLLM runs triton_kernels' matmul_ogs, "
    "the weights dequantised to bf16 in registers): compute at the bf16 peak",
    # SM100: FlashInfer's TensorRT-LLM MoE with bf16 activations (SM100_FI_MXFP4_BF16), the
    # default; mxfp8 activations only with VLLM_USE_FLASHINFER_MOE_MXFP4_MXFP8
    "b200": "experts mxfp4 with bf16 activations (vLLM's default on Blackwell: FlashInfer's "
    "TensorRT-LLM MoE): compute at the bf16 peak, assumed, not the fp4 or fp8 tensor cores' "
    "(VLLM_USE_FLASHINFER_MOE_MXFP4_MXFP8's mxfp8 activations are not modelled)",
}


#: how vLLM 0.11 runs NVFP4 experts (ModelOpt checkpoints: ``ModelOptNvFp4FusedMoE`` in
#: vllm/model_executor/layers/quantization/modelopt.py, its backend from
#: ``detect_nvfp4_moe_support`` in utils/nvfp4_moe_support.py) on each catalog GPU, and the peak
#: :func:`mxfp4_moe_gemm_s` times them at (``compute_peak(profile, "nvfp4")``). Without FP4
#: tensor cores (``cutlass_fp4_supported()`` false: SM80, SM90) vLLM falls back to Marlin's FP4
#: MoE, weight-only; on SM100 it quantises the activations to NVFP4 (``scaled_fp4_quant``) and
#: runs CUTLASS's FP4 grouped GEMM (``cutlass_moe_fp4``), or FlashInfer's CUTLASS / TensorRT-LLM
#: FP4 MoE with ``VLLM_USE_FLASHINFER_MOE_FP4=1``: W4A4 at the dense FP4 peak (gpus.toml
#: ``peak_flops_fp4``). Derived from the source; the kernels' own costs (the activation
#: quantisation, the block-scale loads) are not modelled beyond the packed weight stream.
NVFP4_MOE_PATHS = {
    "a100-80gb": "experts nvfp4, weight-only on this GPU (vLLM falls back to Marlin's FP4 "
    "MoE, the weights dequantised to bf16 in registers): compute at the bf16 peak",
    "h100-sxm": "experts nvfp4, weight-only on this GPU (no FP4 tensor cores: vLLM falls back "
    "to Marlin's FP4 MoE, the weights dequantised to bf16 in registers): compute at the bf16 "
    "peak",
    "h200": "experts nvfp4, weight-only on this GPU (no FP4 tensor cores: vLLM falls back to "
    "Marlin's FP4 MoE, the weights dequantised to bf16 in registers): compute at the bf16 peak",
    "b200": "experts nvfp4 with nvfp4 activations (vLLM's CUTLASS FP4 grouped GEMM; "
    "--fp8-moe-kernel flashinfer-trtllm: FlashInfer's TensorRT-LLM FP4 MoE, "
    "VLLM_USE_FLASHINFER_MOE_FP4=1, with the fp8 kernel's fitted fixed time, assumed): compute "
    "at the dense FP4 peak",
}


def nvfp4_moe_path(gpu: str) -> str:
    """The line :data:`NVFP4_MOE_PATHS` has for catalog GPU ``gpu``; for another GPU what the
    model assumes."""
    return NVFP4_MOE_PATHS.get(
        gpu,
        "experts nvfp4: compute at the GPU's FP4 peak where its profile gives one "
        "(peak_flops_fp4), else weight-only at the bf16 peak (vLLM's Marlin fallback)",
    )


def mxfp4_moe_path(gpu: str) -> str:
    """The line :data:`MXFP4_MOE_PATHS` has for catalog GPU ``gpu``; for another GPU (a profile
    or a catalog entry added later) what the model assumes."""
    return MXFP4_MOE_PATHS.get(
        gpu,
        "experts mxfp4: compute at the bf16 peak (assumed: the weights dequantised to bf16, as "
        "vLLM's mxfp4 MoE kernels run with bf16 activations by default)",
    )


def catalog_moe_fit(profile_name: str, catalog_gpu: str | None = None) -> FusedMoeFit:
    """The catalog's :class:`FusedMoeFit` of a profile: its ``catalog_gpu``, else the catalog GPU
    whose name the profile's name is or starts with (``"b200-analytic"``: ``b200``); none
    for a device the catalog does not know."""
    from fleetsim.device import catalog

    table = catalog.moe()
    key = catalog_gpu if catalog_gpu in table else None
    if key is None:
        for name in sorted(table, key=len, reverse=True):
            if profile_name == name or profile_name.startswith(name + "-"):
                key = name
                break
    if key is None:
        return NO_MOE_FIT
    e = table[key]
    return FusedMoeFit(
        k_step_s=float(e["k_step_s"]),
        k_step_fp8_s=float(e["k_step_fp8_s"]),
        layer_s=float(e["layer_s"]),
        sms=int(e["sms"]),
        smem_per_sm_bytes=float(e["smem_per_sm_bytes"]),
        tuned=tuple((int(a), int(b)) for a, b in e.get("tuned", ())),
        k_step_fp8_default_s=float(e.get("k_step_fp8_default_s", 0.0)),
        tuned_fp8=tuple((int(a), int(b)) for a, b in e.get("tuned_fp8", ())),
        mma_frac=float(e.get("mma_frac", 1.0)),
        fi_layer_s=float(e.get("fi_layer_s", 0.0)),
        fi_bw_frac=float(e.get("fi_bw_frac", 0.0)),
        fp8_wave_frac=float(e.get("fp8_wave_frac", 1.0)),
        tuned_fp8_large_m=tuple(tuple(int(v) for v in x) for x in e.get("tuned_fp8_large_m", ())),
    )


#: the :class:`FusedMoeFit` constants a profile file may carry (``moe_constants``: fitted to a
#: folder of ML.ENERGY-format rows by ``fleetsim calibrate --from-mlenergy --fit-moe``); the
#: GPU's SM count, shared memory and tuned shapes are the catalog's (data sheets, vLLM's files)
MOE_CONSTANT_KEYS = (
    "k_step_s",
    "k_step_fp8_s",
    "k_step_fp8_default_s",
    "layer_s",
    "mma_frac",
    "fi_layer_s",
    "fi_bw_frac",
    "fp8_wave_frac",
)


def moe_constants_problem(constants: dict) -> str | None:
    """What is wrong with a profile's ``moe_constants`` (an unknown key, a value that is not a
    finite non-negative number, ``mma_frac`` outside (0, 1]), or None."""
    for k, v in constants.items():
        if k not in MOE_CONSTANT_KEYS:
            return f"moe_constants has unknown key {k!r} (known: {', '.join(MOE_CONSTANT_KEYS)})"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"moe_constants[{k!r}] = {v!r} must be a finite non-negative number"
        if k == "mma_frac" and not 0.0 < v <= 1.0:
            return f"moe_constants['mma_frac'] = {v!r} must be in (0, 1]"
    return None


def profile_moe_fit(
    profile_name: str, catalog_gpu: str | None, constants: dict | None
) -> FusedMoeFit | None:
    """The :class:`FusedMoeFit` of a profile that carries ``constants`` (its ``moe_constants``):
    the catalog's fit of its GPU (:func:`catalog_moe_fit`) with those constants in place; None
    when it carries none (the latency model then reads the catalog's)."""
    if not constants:
        return None
    base = catalog_moe_fit(profile_name, catalog_gpu)
    return replace(base, **{k: float(v) for k, v in constants.items()})  # type: ignore[arg-type]


def expected_distinct_experts(n_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts that ``tokens`` tokens touch, each routing to ``top_k`` distinct
    experts of ``n_experts`` uniformly: ``n (1 - (1 - k/n)^T)`` (module docstring)."""
    if n_experts <= 1:
        return 1.0
    if tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


@dataclass(frozen=True, slots=True)
class MoeLayout:
    """How one replica lays out a mixture-of-experts model over its GPUs."""

    tp: int  # attention tensor parallelism (GPUs per data-parallel engine)
    dp: int  # data-parallel attention engines
    expert_parallel: bool  # experts whole on ep = tp x dp ranks, else split ep ways

    @property
    def ep(self) -> int:
        """GPUs the MoE layers span (vLLM: EP size = TP x DP)."""
        return self.tp * self.dp


def ep_foreign_rows(tokens: float, top_k: int, layout: MoeLayout) -> float:
    """Rows the fused MoE kernel of one GPU handles for experts held by other GPUs, for
    ``tokens`` tokens in the kernel: ``tokens x top_k x (1 - 1/ep)`` under expert parallelism, 0
    otherwise. vLLM's Triton path (``vllm/model_executor/layers/fused_moe/fused_moe.py``) sorts
    and block-pads every token's ``top_k`` picks (``moe_align_block_size`` over the global
    experts, the ``expert_map`` marking another rank's expert -1); ``fused_moe_kernel``'s
    programs for such a block call ``write_zeros_to_output`` and return, and
    ``fused_experts_impl`` sizes its intermediate caches for ``M x top_k`` rows and runs the
    activation (``silu_and_mul``) and ``moe_sum`` over all of them. Under data parallelism the
    kernel sees every engine's (padded) tokens, so a prompt on one engine costs every GPU
    ``prompt x top_k`` rows of these stores."""
    if not layout.expert_parallel or layout.ep <= 1 or tokens <= 0:
        return 0.0
    return tokens * top_k * (1.0 - 1.0 / layout.ep)


@functools.lru_cache(maxsize=4096)
def ep_touched_balance(n_experts: int, top_k: int, tokens: float, ep: int) -> float:
    """Expected experts an expert-parallel rank's batch touches over the expected largest such
    count among the ``ep`` ranks (at most 1): the share of the busiest rank's grouped-GEMM time
    that the mean rank computes. Each rank holds ``L = n / ep`` experts, each touched with
    probability ``q`` = :func:`expected_distinct_experts` ``/ n``; a rank's count taken as
    ``Binomial(L, q)``, independent across ranks: ``E[max] = sum_{t < L} (1 - F(t)^ep)``
    (within 0.005 of a Monte Carlo of top-k routing for Qwen3's 128 experts at 8-256 tokens
    under EP2-EP8: EP8 0.697 / 0.797 / 0.896 / 0.984 at 8 / 16 / 32 / 64 tokens). 1 without
    expert parallelism or once every rank touches all its experts."""
    if ep <= 1 or n_experts <= 1 or tokens <= 0:
        return 1.0
    loc = n_experts // ep
    if loc <= 0:
        return 1.0
    q = expected_distinct_experts(n_experts, top_k, tokens) / n_experts
    if q >= 1.0:
        return 1.0
    pmf = [math.comb(loc, t) * q**t * (1.0 - q) ** (loc - t) for t in range(loc + 1)]
    cdf, e_max = 0.0, 0.0
    for t in range(loc):
        cdf += pmf[t]
        e_max += 1.0 - min(cdf, 1.0) ** ep
    return loc * q / e_max if e_max > 0.0 else 1.0


def ep_barrier_wait_s(gemm_s: float, n_experts: int, top_k: int, tokens: float, ep: int) -> float:
    """Seconds of one MoE layer's grouped-GEMM time ``gemm_s`` (the part that scales with the
    experts a rank touches: their weights read, their row tiles) that the mean expert-parallel
    rank waits for the busiest one: ``(1 - ep_touched_balance) x gemm_s``. Under TP x EP
    without an all-to-all (vLLM 0.11, ``FusedMoE``, ``vllm/model_executor/layers/fused_moe/
    layer.py``: each rank's ``fused_experts`` runs its own experts' rows, the ``expert_map``
    masking the others', and ``maybe_all_reduce_tensor_model_parallel`` sums the ranks'
    partial outputs) every rank enters the layer's all-reduce when its own experts are done and
    spins there until the slowest arrives. The step is the busiest rank's; the time the others
    wait is communication time (``PowerSpec.comm_w``), not compute (docs/accuracy-log.md, "The EP
    barrier")."""
    if gemm_s <= 0.0:
        return 0.0
    return (1.0 - ep_touched_balance(n_experts, top_k, float(tokens), ep)) * gemm_s


def grouped_gemm_time_s(
    fit: KernelFit,
    peak_flops: float,
    bw_bytes_per_s: float,
    rows: float,
    experts: float,
    n: float,
    k: float,
    weight_bytes_per_param: float = 2.0,
    loop_s: float = 0.0,
    zero_rows: float = 0.0,
    mma_flops: float = 0.0,
) -> float:
    """One grouped-GEMM launch of the fused MoE kernel: ``rows`` routed token rows spread over
    ``experts`` distinct experts, each an ``n x k`` weight. Each expert's rows are padded to the
    GEMM tile (:func:`fleetsim.device.kernels.gemm_rows` of the mean rows per expert); the
    weights read are ``experts`` matrices; one launch floor. ``loop_s`` is the latency of the
    kernel's serial K loop (:func:`k_loop_latency_s`), added: a program's loop steps wait on
    their loads one after the other, which the throughput bounds do not see. ``zero_rows`` are
    rows routed to experts of other ranks (expert parallelism): the launch's programs for them
    store a zero tile of the output's ``n`` 16-bit columns and return (:func:`ep_foreign_rows`),
    bytes added to the memory bound."""
    if rows <= 0 or experts <= 0 or n <= 0 or k <= 0:
        return 0.0
    per = rows / experts
    m_tile = gemm_rows(fit, per)
    m_eff = experts * m_tile
    shape = (
        1.0
        + fit.gemm_k_half / k
        + fit.gemm_n_half / n
        + fit.gemm_m_half / per
        + fit.gemm_tile_half / m_tile
    )
    t_c = 2.0 * m_eff * n * k / (peak_flops * fit.gemm_eff_max) * shape
    if mma_flops > 0.0:  # the kernel's own MMA rate bounds its routed rows' FLOPs
        t_mma = 2.0 * rows * n * k / mma_flops
        t_c = t_mma if t_mma > t_c else t_c
    t_m = (
        experts * n * k * weight_bytes_per_param + (rows * k + rows * n + zero_rows * n) * 2.0
    ) / (bw_bytes_per_s * fit.gemm_bw_eff)
    p = fit.gemm_pnorm
    hi, lo = (t_c, t_m) if t_c >= t_m else (t_m, t_c)
    t = hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)
    return fit.gemm_launch_s + t + loop_s


def mlp_parts_s(
    fit: KernelFit,
    peak_flops: float,
    bw: float,
    tokens: float,
    d_model: int,
    cols: float,
    gated: bool,
    weight_bytes: float,
) -> tuple[float, float, float]:
    """(up GEMM, activation, down GEMM) seconds of a dense MLP of ``cols`` intermediate columns
    on this GPU over ``tokens`` tokens."""
    if cols <= 0 or tokens <= 0:
        return 0.0, 0.0, 0.0
    up = gemm_time_s(
        fit, peak_flops, bw, tokens, (2.0 if gated else 1.0) * cols, d_model, weight_bytes
    )
    act = elem_time_s(fit, bw, "act", (3.0 if gated else 2.0) * 2.0 * tokens * cols)
    down = gemm_time_s(fit, peak_flops, bw, tokens, d_model, cols, weight_bytes)
    return up, act, down


def moe_layer_parts_s(
    fit: KernelFit,
    peak_flops: float,
    bw: float,
    model: ModelSpec,
    layout: MoeLayout,
    tokens: float,
    weight_bytes: float,
    link_bw_bytes_per_s: float,
    link_latency_s: float,
    expert_weight_bytes: float | None = None,
    expert_peak_flops: float | None = None,
    moe_fit: FusedMoeFit = NO_MOE_FIT,
    fp8_block: bool = False,
    fp8_kernel: str = "triton",
    fp4: bool = False,
) -> dict[str, float]:
    """Seconds of each part of one MoE layer's MLP block on one GPU, for ``tokens`` tokens in the
    whole replica (all engines): ``moe_router``, ``moe_route`` (top-k, align, sum),
    ``moe_dispatch``, ``moe_gemm_up``, ``moe_act``, ``moe_gemm_down``, ``moe_combine`` and the
    shared experts' ``shared_mlp`` (see the module docstring); and ``moe_fp8_loop``, not a part
    of its own but the share of ``moe_gemm_up + moe_gemm_down`` that is the block-scaled K loop
    of fp8 block-quantised experts (:func:`k_loop_latency_s` with ``fp8_block``; 0 for other
    experts), the time the power model draws ``PowerSpec.moe_loop_w`` in.
    ``expert_weight_bytes`` and ``expert_peak_flops`` are those of the experts' precision
    (default: the layer's); ``moe_fit`` the GPU's fused-MoE loop latency, ``fp8_block``
    whether the experts are fp8 with block scales (vLLM's w8a8 block kernel configuration);
    ``fp8_kernel`` the fused-MoE kernel such experts run (:data:`FP8_MOE_KERNELS`): with
    ``"flashinfer-trtllm"`` the grouped GEMMs are :func:`flashinfer_moe_gemm_s` (no loop
    latency, ``moe_fp8_loop`` 0), the routing, top-k and weighted sum are inside the kernel
    (its ``fi_layer_s`` in ``moe_route``) and the kernel handles this GPU's experts' rows only
    (no zero tiles for other ranks' rows). ``fp4``: the experts are mxfp4 (gpt-oss) or nvfp4
    (ModelOpt NVFP4 checkpoints), whose grouped GEMMs are not the Triton ``fused_moe_kernel``
    but :func:`mxfp4_moe_gemm_s` (no Triton K-loop latency, no small-tile compute shape;
    ``expert_weight_bytes`` the packed bytes a parameter, ``expert_peak_flops`` the peak the
    backend runs at: :data:`MXFP4_MOE_PATHS`, :data:`NVFP4_MOE_PATHS`)."""
    ewb = weight_bytes if expert_weight_bytes is None else expert_weight_bytes
    epk = peak_flops if expert_peak_flops is None else expert_peak_flops
    d = model.d_model
    n, k = model.n_experts, model.n_active_experts
    gated = model.mlp == "swiglu"
    d_ff_e = model.d_ff_expert
    shared_cols = model.n_shared_experts * model.d_ff_shared
    ep = layout.ep
    t_eng = float(math.ceil(tokens / layout.dp))  # tokens of the fullest attention engine
    m = float(tokens)  # the MoE kernel sees every token of the replica
    if layout.expert_parallel:
        local_experts = n / ep
        cols = float(d_ff_e)
        rows = m * k / ep
    else:
        local_experts = float(n)
        cols = d_ff_e / ep
        rows = m * k
    touched = local_experts * (expected_distinct_experts(n, k, m) / n)
    # the kernel's sorted rows are every token's k picks, this rank's experts' or not
    # (ep_foreign_rows): the activation, the fp8 re-quantisation and the weighted sum run
    # over all of them
    rows_all = m * k
    foreign = ep_foreign_rows(m, k, layout)
    moe_sum = elem_time_s(fit, bw, "add", (rows_all + m) * d * 2.0)
    out = {
        "moe_router": gemm_time_s(fit, peak_flops, bw, t_eng, n, d, 2.0),
        "moe_route": elem_time_s(fit, bw, "act", 4.0 * t_eng * n) + moe_fit.layer_s + moe_sum,
    }
    # the kernel's loop latency: ceil(K / BLOCK_SIZE_K) serial steps of one program, for the
    # tokens the kernel sees (m) and the experts held here (vLLM's w1.shape[0])
    n_up = (2.0 if gated else 1.0) * cols
    loop_up = loop_down = 0.0
    shape = (round(local_experts), round(cols))
    # a prefill-sized launch of a tuned fp8 shape runs the tuned file's largest entry's tiles
    # (tuned_fp8_tiles): their grid, K steps and programs per SM; the kernel's MMA rate follows
    # the programs an SM holds against the default tiles' (occupancy)
    tiles = None
    occupancy = 1.0
    if fp8_block:
        # the block-scaled K loop, per whole wave of the grid over every local expert, at the
        # tuned or the default tiles' step time
        tuned = shape in moe_fit.tuned_fp8
        if tuned:
            tiles = tuned_fp8_tiles(moe_fit, shape, m)
        if tiles is not None:
            occupancy = fp8_programs_per_sm(moe_fit, tiles) / fp8_programs_per_sm(
                moe_fit, fp8_default_tiles()
            )
        loop_up = fp8_default_loop_latency_s(moe_fit, d, local_experts, rows, n_up, tuned, tiles)
        loop_down = fp8_default_loop_latency_s(moe_fit, cols, local_experts, rows, d, tuned, tiles)
    elif not fp4 and shape not in moe_fit.tuned:  # (fp4 experts: no such loop, below)
        loop_up = k_loop_latency_s(moe_fit, m, local_experts, touched, rows, n_up, d, fp8_block)
        loop_down = k_loop_latency_s(moe_fit, m, local_experts, touched, rows, d, cols, fp8_block)
    comm = 0.0
    if layout.dp > 1:
        nbytes = (layout.dp - 1) / layout.dp * m * d * 2.0
        comm = link_latency_s + nbytes / link_bw_bytes_per_s
    out["moe_dispatch"] = comm
    # the fused kernel's sustained MMA rate (FusedMoeFit.mma_frac; 0: no such bound)
    mma = epk * moe_fit.mma_frac * occupancy if moe_fit.mma_frac < 1.0 else 0.0
    if fp4:
        # mxfp4: matmul_ogs (Hopper) / FlashInfer TensorRT-LLM (Blackwell); nvfp4: Marlin's FP4
        # MoE (Hopper) / CUTLASS's FP4 grouped GEMM (Blackwell); not fused_moe_kernel: the
        # touched experts' packed weights streamed, no serial K-loop latency
        out["moe_gemm_up"] = mxfp4_moe_gemm_s(fit, epk, bw, rows, touched, n_up, d, ewb)
    else:
        out["moe_gemm_up"] = grouped_gemm_time_s(
            fit, epk, bw, rows, touched, n_up, d, ewb, loop_up, foreign, mma
        )
    act_bytes = (3.0 if gated else 2.0) * 2.0 * rows_all * cols
    if fp8_block:  # the activation re-quantised for the fp8 down GEMM: 16-bit in, 8-bit out
        act_bytes += 3.0 * rows_all * cols
    out["moe_act"] = elem_time_s(fit, bw, "act", act_bytes)
    if fp4:
        out["moe_gemm_down"] = mxfp4_moe_gemm_s(fit, epk, bw, rows, touched, d, cols, ewb)
    else:
        out["moe_gemm_down"] = grouped_gemm_time_s(
            fit, epk, bw, rows, touched, d, cols, ewb, loop_down, foreign, mma
        )
    out["moe_combine"] = comm
    out["moe_fp8_loop"] = loop_up + loop_down if fp8_block else 0.0
    # FlashInfer's TensorRT-LLM kernel for fp8 block-quantised experts, or its FP4 sibling for
    # nvfp4 experts (fp4 here: fleet.fp8_moe_kernel refuses mxfp4 experts)
    fi = fp8_kernel == "flashinfer-trtllm" and (fp8_block or fp4)
    if fi:
        # FlashInfer's TensorRT-LLM block-scale kernel: routing, top-k and the weighted sum
        # fused in one call of fixed time fi_layer_s, this GPU's experts' rows only, the
        # activation between the two grouped GEMMs inside it, no K loop
        eff = fit.gemm_eff_max
        out["moe_route"] = moe_fit.fi_layer_s
        bwf = fit.gemm_bw_eff
        wpp, ipe = (1.0 + 4.0 / (128.0 * 128.0), 1.0) if fp8_block else (ewb, ewb)
        out["moe_gemm_up"] = flashinfer_moe_gemm_s(
            moe_fit, epk, eff, bw, rows, touched, n_up, d, bwf, wpp, ipe
        )
        out["moe_act"] = 0.0
        out["moe_gemm_down"] = flashinfer_moe_gemm_s(
            moe_fit, epk, eff, bw, rows, touched, d, cols, bwf, wpp, ipe
        )
        out["moe_fp8_loop"] = 0.0
    # the mean rank's wait at the layer's all-reduce for the busiest one (ep_barrier_wait_s):
    # a share of the grouped GEMMs' touched-expert part (the Triton launches' floors and serial
    # K loops run on every rank alike); a part of the GEMM time reported apart, not added to it
    ep_gemm = 0.0
    if layout.expert_parallel and ep > 1:
        ep_gemm = out["moe_gemm_up"] + out["moe_gemm_down"]
        if not fi:
            ep_gemm -= 2.0 * fit.gemm_launch_s + loop_up + loop_down
    out["moe_ep_wait"] = ep_barrier_wait_s(ep_gemm, n, k, m, ep) if ep_gemm > 0.0 else 0.0
    up, act, down = mlp_parts_s(fit, epk, bw, t_eng, d, shared_cols / layout.tp, gated, ewb)
    out["shared_mlp"] = up + act + down
    return out


def attention_block_s(
    fit: KernelFit,
    peak_flops: float,
    bw: float,
    model: ModelSpec,
    s: LayerShapes,
    tp: int,
    tokens: float,
    weight_bytes: float,
) -> tuple[float, float]:
    """(GEMM seconds, elementwise seconds) of one layer's attention block outside the attention
    core (norms, the input and output projections, rotary embedding, residual adds) over
    ``tokens`` tokens: the operators of :func:`fleetsim.device.kernels.layer_parts_s` before the
    MLP. Multi-head latent attention's projections (query and KV down/up) are one input GEMM of
    their parameters' width, its output projection ``n_heads x v_head_dim`` wide; of the input
    GEMM's width the down projections' part is whole on every GPU (vLLM 0.11 replicates them:
    ``ModelSpec.mla_down_params_per_layer``), the up projections' split ``tp`` ways."""
    m = float(tokens)
    d = s.d_model
    if model.is_mla:
        o_in = model.n_heads * model.v_head_dim / tp
        down = model.mla_down_params_per_layer
        up = model.attn_params_per_layer - model.n_heads * model.v_head_dim * d - down
        pre_out = down / d + up / d / tp
        rope = 2.0 * model.n_heads * model.qk_rope_head_dim / tp
    else:
        o_in, pre_out, rope = s.attn_in, s.qkv_out, s.rope_heads
    gemms = gemm_time_s(fit, peak_flops, bw, m, pre_out, d, weight_bytes) + gemm_time_s(
        fit, peak_flops, bw, m, d, o_in, weight_bytes
    )
    elems = (
        2.0 * elem_time_s(fit, bw, "norm", 4.0 * m * d)
        + elem_time_s(fit, bw, "rope", 4.0 * m * rope)
        + elem_time_s(fit, bw, "add", 6.0 * m * d)
    )
    return gemms, elems


def linear_state_block_s(
    fit: KernelFit,
    peak_flops: float,
    bw: float,
    model: ModelSpec,
    tp: int,
    tokens: float,
    weight_bytes: float,
) -> tuple[float, float]:
    """(GEMM seconds, elementwise seconds) of one linear-state (Mamba-2) mixer over ``tokens``
    tokens: its input and output projections as GEMMs (their parameters split ``tp`` ways), the
    norm, the convolution and the scan as bandwidth-bound operators over their state (the scan
    charged :func:`linear_state_scan_bytes` per token at the kernel fit's elementwise
    efficiency: a decoding sequence's state update, which can run at another, fitted efficiency:
    :func:`linear_state_update_extra_s`; a prompt token's scan is the SSD chunked scan, which
    the latency model charges in place of it: :func:`ssd_prefill_delta_s`)."""
    m = float(tokens)
    d = model.d_model
    inner = model.ssm_d_inner
    # (a single Mamba group's B and C columns on every rank: ModelSpec.ssm_groups_tp)
    in_cols = (model.linear_state_params_per_layer_tp(tp) - inner * d) / d / tp
    gemms = gemm_time_s(fit, peak_flops, bw, m, in_cols, d, weight_bytes) + gemm_time_s(
        fit, peak_flops, bw, m, d, inner / tp, weight_bytes
    )
    state = model.ssm_n_heads * model.ssm_head_dim * model.ssm_state_size / tp
    elems = (
        elem_time_s(fit, bw, "norm", 4.0 * m * d)
        + elem_time_s(fit, bw, "act", 4.0 * m * in_cols)  # the convolution over x, B, C
        + elem_time_s(fit, bw, "act", 2.0 * 2.0 * m * state)  # the scan: state read and write
        + elem_time_s(fit, bw, "add", 6.0 * m * d)
    )
    return gemms, elems


def linear_state_scan_bytes(model: ModelSpec, tp: int) -> float:
    """Bytes of SSM state (heads x head dim x state size, split ``tp`` ways) one linear-state
    layer's scan reads and writes per token on one GPU, in 16 bits."""
    state = model.ssm_n_heads * model.ssm_head_dim * model.ssm_state_size / tp
    return 2.0 * 2.0 * state


#: Tokens per chunk of the Mamba-2 SSD chunked scan that vLLM runs a prefill through
#: (``mamba_chunk_scan_combined_varlen``, ``vllm/model_executor/layers/mamba/ops/ssd_combined.py``;
#: the chunk size is the checkpoint's ``chunk_size``, which the Nemotron-H configuration
#: defaults to 128: transformers ``NemotronHConfig``; the Nemotron Nano v2 checkpoints keep it)
SSD_CHUNK_TOKENS = 128


def ssd_scan_flops_per_token(model: ModelSpec, tp: int, chunk: int = SSD_CHUNK_TOKENS) -> float:
    """FLOPs per prompt token of one linear-state (Mamba-2) layer's chunked scan on one GPU of
    ``tp`` (heads and groups split ``tp`` ways), the SSD algorithm of Dao & Gu 2024 ("Transformers
    are SSMs", §6) as vLLM 0.11 runs it (``_mamba_chunk_scan_combined_fwd``): per chunk of
    ``chunk`` = Q tokens, ``_bmm_chunk_fwd`` forms C B^T (Q x Q per group over the state size N:
    2 Q N per token and group), ``_chunk_scan_fwd`` multiplies the masked Q x Q matrix with x
    (2 Q P per token and head, P the head width; the full block counted) and adds C times the
    state entering the chunk (2 N P per token and head), ``_chunk_state_fwd`` forms each chunk's
    state B^T x (2 N P per token and head) and ``_state_passing_fwd`` carries the states across
    chunks (a multiply-add per state element per chunk: 2 N P / Q per token and head)."""
    if not model.n_linear_layers:
        return 0.0
    q, n, p = float(chunk), float(model.ssm_state_size), float(model.ssm_head_dim)
    heads = model.ssm_n_heads / tp
    groups = max(model.ssm_n_groups / tp, 1.0)
    return 2.0 * q * n * groups + 2.0 * heads * p * (q + 2.0 * n + n / q)


def ssd_scan_bytes_per_token(model: ModelSpec, tp: int, chunk: int = SSD_CHUNK_TOKENS) -> float:
    """Bytes per prompt token of one linear-state layer's chunked scan on one GPU of ``tp``
    (the kernels of :func:`ssd_scan_flops_per_token`): x, B and C read twice each, z read and
    y written once, in 16 bits (2 (4 H P + 4 G N)); each chunk's state (H x P x N) written in
    fp32 by ``_chunk_state_fwd`` (``states_in_fp32=True``), read in fp32 and written in 16 bits
    by ``_state_passing_fwd``, read by ``_chunk_scan_fwd`` (12 H P N per chunk); C B^T in fp32,
    written and read (8 Q G per token). Not the per-token state round trip of a recurrent
    scan: the SSD touches the state once per chunk."""
    if not model.n_linear_layers:
        return 0.0
    q, n, p = float(chunk), float(model.ssm_state_size), float(model.ssm_head_dim)
    heads = model.ssm_n_heads / tp
    groups = max(model.ssm_n_groups / tp, 1.0)
    acts = 2.0 * (4.0 * heads * p + 4.0 * groups * n)
    return acts + 12.0 * heads * p * n / q + 8.0 * q * groups


def ssd_prefill_delta_s(
    fit: KernelFit, peak_flops: float, bw: float, model: ModelSpec, tp: int
) -> float:
    """Seconds per prompt token that one linear-state layer's chunked scan (the roofline of
    :func:`ssd_scan_flops_per_token` at the kernel fit's GEMM efficiency and
    :func:`ssd_scan_bytes_per_token` at its elementwise one) takes beyond the per-token state
    read and write that :func:`linear_state_block_s` charges every token (negative: the SSD
    touches the state once per chunk). The decoding tokens keep that charge (vLLM's
    ``selective_state_update``)."""
    if not model.n_linear_layers:
        return 0.0
    act_eff = fit.elem_params("act")[1]
    t_c = ssd_scan_flops_per_token(model, tp) / (peak_flops * fit.gemm_eff_max)
    t_m = ssd_scan_bytes_per_token(model, tp) / (bw * act_eff)
    return max(t_c, t_m) - linear_state_scan_bytes(model, tp) / (bw * act_eff)


def linear_state_update_extra_s(
    fit: KernelFit, bw: float, model: ModelSpec, tp: int, seqs: float, state_eff: float
) -> float:
    """Seconds one linear-state layer adds to :func:`linear_state_block_s` when its decoding
    sequences' state update (vLLM's ``selective_state_update``: each sequence's state read and
    written once per step) runs at ``state_eff`` of the bandwidth instead of the kernel fit's
    elementwise efficiency; 0 when ``state_eff`` is 0 (the serving stack's fitted
    ``linear_state_eff``, :mod:`fleetsim.device.stack`). Prefill tokens run the chunked scan,
    another kernel (:func:`ssd_prefill_delta_s`), so a step of ``seqs`` sequences is charged
    the difference for ``seqs`` of its tokens."""
    if state_eff <= 0.0 or seqs <= 0:
        return 0.0
    act_eff = fit.elem_params("act")[1]
    return seqs * linear_state_scan_bytes(model, tp) * (1.0 / state_eff - 1.0 / act_eff) / bw


def replica_weight_bytes(model: ModelSpec, dp: int, tp: int) -> float:
    """Weights held by a replica of ``dp`` data-parallel engines of ``tp`` GPUs each: the experts
    once (spread over the GPUs, with or without expert parallelism), everything else (attention,
    dense layers, embeddings, LM head) once per engine, and in each engine the parts every
    tensor-parallel rank holds whole once per rank (``ModelSpec.weight_bytes_tp``: latent
    attention's down projections, the routers, KV heads fewer than the ranks)."""
    engine = model.weight_bytes_tp(tp)
    if dp <= 1:
        return engine
    from fleetsim.device.modelspec import DTYPE_BYTES

    experts = model.expert_params_total * DTYPE_BYTES[model.expert_dtype or model.dtype]
    return engine + (dp - 1) * (engine - experts)


def layout_problem(
    model: ModelSpec, tp: int, dp: int, expert_parallel: bool
) -> tuple[str, object, str, str] | None:
    """``(field, value, what is wrong, the fix)`` when ``model`` cannot be split as ``tp``-way
    tensor parallelism x ``dp`` data-parallel engines with or without expert parallelism (vLLM's
    rules: the heads as for tensor parallelism; under expert parallelism the experts divide
    evenly over the ``tp x dp`` ranks), else None. Field names are the scenario's."""
    if tp < 1:
        return ("tensor_parallel", tp, "must be a positive integer", "use 1 or more")
    if dp < 1:
        return ("data_parallel", dp, "must be a positive integer", "use 1 or more")
    why = model.tp_problem(tp)
    if why:
        return ("tensor_parallel", tp, why, model.tp_fix(tp))
    ep = tp * dp
    if expert_parallel:
        if model.n_experts <= 1:
            return (
                "expert_parallel",
                True,
                f"{model.name} is not a mixture of experts",
                "drop expert_parallel",
            )
        if model.n_experts % ep:
            ok = [e for e in range(1, model.n_experts + 1) if model.n_experts % e == 0]
            return (
                "expert_parallel",
                True,
                f"{model.name}'s {model.n_experts} experts do not divide over EP = "
                f"tensor_parallel x data_parallel = {tp} x {dp} = {ep} GPUs (vLLM would give "
                f"the first {model.n_experts % ep} ranks one more expert, determine_expert_map; "
                "fleetsim models an even split)",
                f"make tensor_parallel x data_parallel one of {', '.join(map(str, ok))}",
            )
    elif model.n_moe_layers and ep > 1 and model.d_ff_expert % ep:
        return (
            "data_parallel" if dp > 1 else "tensor_parallel",
            dp if dp > 1 else tp,
            f"{model.name}'s expert width {model.d_ff_expert} does not divide over the "
            f"{ep} GPUs that split each expert without expert parallelism",
            "set expert_parallel = true, or a GPU count that divides it",
        )
    elif (
        model.n_moe_layers and ep > 1 and (model.expert_dtype or model.dtype) == "fp8"
    ) and model.fp8_block:
        # fp8 experts are 128 x 128 block-quantised (as the latency model times them): vLLM
        # refuses a split whose slice of an expert is not whole blocks ("The output_size of
        # gate's and up's weight = 192 is not divisible by weight quantization block_n = 128",
        # vllm/model_executor/layers/quantization/fp8.py Fp8MoEMethod.create_weights)
        part = model.d_ff_expert // ep
        if part % FP8_BLOCK:
            ok = [
                g
                for g in (1, 2, 4, 8, 16, 32)
                if g < ep and model.d_ff_expert % (g * FP8_BLOCK) == 0
            ]
            return (
                "data_parallel" if dp > 1 else "tensor_parallel",
                dp if dp > 1 else tp,
                f"{model.name}'s fp8 experts ({model.d_ff_expert} wide, 128 x 128 blocks) "
                f"split {part} wide on each of {ep} GPUs without expert parallelism, not whole "
                "blocks: vLLM refuses to load them",
                "set expert_parallel = true"
                + (f", or split each expert over {', '.join(map(str, ok))} GPUs" if ok else ""),
            )
    return None
