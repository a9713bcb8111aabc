"""The serving stack a step-time profile represents.

fleetsim's kernel model (:mod:`fleetsim.device.kernels`) is fitted to Vidur's operator times,
which were taken *eagerly*: every kernel launched one by one from Python, with a fixed
per-iteration CPU time on top (``overhead_s``). That is the ``eager`` stack, kept as it was so
that the comparisons against Vidur (``tests/test_vidur_fit.py``, docs/validation.md) still hold.

vLLM 0.11 (V1 engine, the ML.ENERGY v3 benchmark's engine) runs differently:

* **CUDA graphs.** Decode batches (and the non-attention part of mixed batches) of up to
  ``max_cudagraph_capture_size`` tokens replay a captured graph; vLLM's default capture list
  is ``[1, 2, 4] + range(8, 256, 8) + range(256, max + 1, 16)`` with
  ``max = min(2 x max_num_seqs, 512)`` (vllm/config/vllm.py, ``_set_cudagraph_sizes``; the
  design note docs/design/cuda_graphs.md). A replay drops the launch path that dominates the
  kernel model's per-kernel floors (the GEMM ``launch``, the elementwise ``fixed`` times, the
  all-reduce's latency floor): an iteration of at most ``graph_max_tokens`` tokens keeps only
  ``graph_floor_frac`` of them.
* **Asynchronous scheduling** (``async-scheduling: true`` in the benchmark's server
  configuration, data/mlenergy-v3/SOURCE.md): the scheduler prepares step i+1 while the GPU runs
  step i, so the CPU time per iteration is hidden except for a residual ``overhead_s`` (the
  sampler's synchronisation and the input copy).

* **Decode attention by backend.** On Blackwell (SM 10.0) vLLM 0.11 selects FlashInfer with the
  HND KV layout by default (vllm/platforms/cuda.py, ``get_attn_backend_cls``: "Prefer FlashInfer
  for Blackwell GPUs if installed") and runs decode batches of up to 256 tokens on FlashInfer's
  TRTLLM-gen kernels (vllm/utils/flashinfer.py, ``use_trtllm_attention``); on Hopper it keeps
  FlashAttention, whose decode splits long contexts across thread blocks. TRTLLM-gen splits
  each (sequence, KV head)'s KV across CTAs until the SMs are filled (flashinfer
  include/flashinfer/trtllm/fmha/fmhaKernels.cuh, ``computeCtaAndClusterConfig``), so the KV
  read runs at ``kv_memory_eff`` of the bandwidth at every batch. ``attn_unit_bw_bytes_per_s``
  (a step's KV read capped at (sequence, KV head) units x that bandwidth, one-GPU engines
  only) is kept as a form but is 0 in the catalog: fitted to every B200 row it came from the
  long-context GPQA series that measure slower than two H100s (host-limited,
  calibrate/stack.py ``host_limited_series``) and made long prompts slow at every small batch.
* **One-GPU step floor** (``one_gpu_overhead_s``, B200, confidence L): what the cap supplied,
  the one-GPU rows still ask for, dense and MoE alike: a time per step beyond the kernels
  that the multi-GPU B200 rows (fitted with ``overhead_s`` alone) do not. vLLM runs a one-GPU
  engine's worker inside the engine-core process (UniProcExecutor; two or more GPUs run
  worker processes, MultiprocExecutor: vllm/config/parallel.py); that it is this host path is
  a candidate, not shown. Fitted to the non-host-limited one-GPU dense rows with the other
  constants held, jointly with the dense GEMMs' weight stream below and with the host stall
  in every step as the simulator charges it (calibrate/stack.py ``fit_dense_stream``): 0.1 ms
  (it was 2.0 ms fitted alone, without the stall); 0 on the other GPUs.
* **GEMMs' weight stream** (``dense_gemm_bw_eff``, B200, fitted, confidence L). vLLM
  0.11 runs an unquantised model's linear layers through torch ``F.linear`` (cuBLAS;
  vllm/model_executor/layers/linear.py ``UnquantizedLinearMethod.apply``, utils.py
  ``default_unquantized_gemm``), replayed in the
  decode step's CUDA graph. The B200's kernel fit is the H100's, derived: its GEMMs stream
  weights at 0.958 of 8 TB/s, 7.66 TB/s, the B200's whole theoretical bandwidth (7,680-bit bus
  at 3,996 MHz: 7.67 TB/s, pytorch/ao PR #4002), more than a streaming kernel reaches there
  (CUB's DeviceTransform 6.04 TB/s, NVIDIA/cccl PR #7391). The serving stack's dense GEMMs
  (attention projections, dense MLPs, Mamba projections, the LM head) stream at this
  fraction instead (0.75: 6.0 TB/s), fitted to the dense rows. A mixture of experts' MoE
  layers stream from the same HBM at the same fraction: the router (``ReplicatedLinear``
  with no quantisation, vllm/model_executor/models/qwen3_moe.py ``Qwen3MoeSparseMoeBlock``)
  and the shared experts are ``F.linear`` GEMMs too, and the Triton ``fused_moe_kernel``
  (vllm/model_executor/layers/fused_moe/fused_moe.py) loads each expert's weight tiles from
  the same memory, which no kernel streams faster than a plain copy; the fused-MoE
  constants (catalog moe.toml: the K-loop steps, FlashInfer's fp8 kernel, which keeps its
  own fitted ``fi_bw_frac``) are fitted on this stream (``moe_fit --write``, b38). 0 on the
  other GPUs (the kernel fit's: the H100's own, fitted to Vidur's operator times).
* **Eager MoE host floor** (``eager_moe_layer_host_s``, ``eager_seq_host_s``,
  ``eager_mla_layer_host_s``; B200, fitted, confidence L). An iteration of more tokens than the
  capture size has no captured graph (vllm/v1/cudagraph_dispatcher.py ``dispatch`` returns
  ``CUDAGraphMode.NONE``): the compiled model runs with every kernel launched from the host, and
  a mixture of experts' fused-MoE layer is an opaque custom op (``torch.ops.vllm.moe_forward``,
  vllm/model_executor/layers/fused_moe/layer.py) whose Python body (routing,
  ``moe_align_block_size``, the expert kernels, the expert-parallel dispatch and combine) runs
  once per layer per step. The same host thread then also does the per-request work (the
  model runner's input preparation and ``_bookkeeping_sync``, vllm/v1/worker/
  gpu_model_runner.py) that a graph replay leaves it time to hide. Such an iteration of a MoE
  model takes ``max(its GPU time, n_moe_layers x eager_moe_layer_host_s + sequences per engine
  x eager_seq_host_s [+ attention layers x eager_mla_layer_host_s with latent attention])``;
  the GPU idles for the rest at the active-idle level (the FLOPs and bytes are the GPU's, so
  the power model's utilisations and the mean power fall). Evidence, B200 measured rows:
  Qwen3-30B-A3B on one GPU 26.3 ms / 910 W at 256 sequences, 88.7 ms / 601 W at 1,024;
  Qwen3-235B EP8 takes longer at 1,024 sequences than EP4 (112.5 vs 103.9 ms: not GPU-bound);
  the prompt-carrying steps of DeepSeek-V3.1 at 512 sequences (above the capture size) cost
  about as much as its eager decode steps at 768. Dense models are left out (their rows above
  the capture size are not slower than the simulation); fitted by
  ``python -m fleetsim.calibrate.eager_host``. 0 on the other GPUs: the H100's rows fit the
  same form with nearly the same constants (0.75 ms per MoE layer, 45 us per sequence: the
  host's, not the GPU's), but there they move only the mean step, by less (MoE rows 4.0 ->
  3.3 % in sample) and not leave-one-model-out (mean |error| 4.5 -> 4.6 %, worst 19 -> 47 %).
* **Latent attention's prefill path in an eager step** (``eager_mla_prefill_layer_host_s``;
  B200, fitted, confidence L). A step of a latent-attention model (DeepSeek-V3/R1) that carries
  prompt tokens runs, in every attention layer, the prefill path beside the decode path
  (vllm/v1/attention/backends/mla/common.py, ``MLACommonImpl.forward``: ``_forward_prefill``,
  i.e. the latent up-projection ``kv_b_proj`` of the new tokens, the prefill attention and,
  with cached context, the context chunks and ``merge_attn_states``; then ``_forward_decode``).
  Above the capture size the host launches all of it, so such an iteration's floor takes that
  much more per attention layer (once per step, whatever its prompts). Evidence: DeepSeek-V3.1
  chat on 8 B200s, whose eager decode steps matched the floor of 0.70 / 0.05 / 0.60 ms (113 /
  127.6 ms measured at 768 / 1,024 sequences, 115.6 / 128.4 ms simulated) while its
  prompt-carrying steps did not (the 99th percentile ITL at 16-128 sequences 110-130 ms, that
  floor 78-84 ms; the mean step at 768 sequences 18.8 ms above the median, 0.0 simulated).
  Fitted to DeepSeek-V3.1's chat rows on top of the eager floor as committed
  (``python -m fleetsim.calibrate.mla_prefill``): 0.5 ms on that floor, 0.2 ms on the refitted
  one (0.60 / 0.060 / 0.75 ms, whose per-MLA-layer constant took up part of it for every eager
  step); the only latent-attention model whose rows carry prompts, so no leave-one-model-out
  figure. 0 on the other GPUs and
  for grouped-query attention, whose mixed step adds one prefill kernel call per layer
  (vllm/v1/attention/backends/flashinfer.py, ``FlashInferImpl.forward``), not a path of
  several ops: Qwen3-235B on 8 B200s shows no excess over its floor at 16-64 sequences.
* **Custom all-reduce.** Under tensor parallelism vLLM all-reduces messages of up to 8 MiB with
  its own one-/two-shot kernel over NVLink, captured in the graph, not NCCL:
  ``ar_floor_s + 2 (tp - 1) / tp x bytes / ar_bw_bytes_per_s`` per call.

* **Mamba-2 state update.** A decoding sequence's state update in a hybrid model's
  linear-state layers (vLLM's ``selective_state_update``) runs at ``linear_state_eff`` of the
  bandwidth where the catalog fits one (the B200: its Nemotron Nano rows are 19-53 % slower than
  the elementwise scan explains; 0 elsewhere: the kernel fit's elementwise efficiency).

* **Host stalls.** The measured mean gap between tokens (``batch / tokens/s``) is longer than
  the median one by more than the step-time model's own mix of steps explains: fitted 1.13 ms
  per step on the B200, 0.08 ms on the H100 (the engine core's and API server's output
  processing, garbage collection and other host-side stalls, which a median ignores but
  throughput and energy per token do not). ``host_stall_s`` is charged in every step, on top
  of ``overhead_s``, so throughput, energy and latency all see it; the price is a median step
  longer by the same amount. Charged on the H100 (A100, H200 derived) and the B200; on the
  B200 it moves the accuracy harness's W-per-GPU median from 9.1 to 10.2 % while tokens/s goes
  from 15.3 to 10.0 % (docs/accuracy-log.md, "Mean vs median step").

The constants are fitted per GPU to the ML.ENERGY rows' median inter-token latency
(``python -m fleetsim.calibrate.stack``; the values, their provenance and their errors are in
``catalog/stacks.toml``). Iterations of more tokens than the capture size run as in ``eager``
apart from the overhead and, for a mixture of experts, the eager host floor above.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fleetsim.base.errors import ScenarioError
from fleetsim.device.latency import Profile, RooflineProfile

StackName = Literal["vllm-v1", "eager"]
STACKS: tuple[str, ...] = ("vllm-v1", "eager")
DEFAULT_STACK: StackName = "vllm-v1"
#: vLLM's largest captured batch by default (CompilationConfig.max_cudagraph_capture_size)
MAX_CAPTURE_TOKENS = 512


def capture_max_tokens(max_num_seqs: int) -> int:
    """vLLM's largest CUDA-graph capture size for ``max_num_seqs``: min(2 x seqs, 512)."""
    return min(2 * max_num_seqs, MAX_CAPTURE_TOKENS)


def stack_constants(stack: str, gpu: str) -> dict | None:
    """The catalog's constants of ``stack`` on catalog GPU ``gpu`` (``catalog/stacks.toml``),
    or None when the stack has none (``eager``: the profile as it is)."""
    from fleetsim.device import catalog

    if stack == "eager":
        return None
    table = catalog.stacks().get(stack)
    if table is None:
        raise ScenarioError("fleet.serving_stack", stack, "unknown serving stack", _fix())
    entry = table.get(gpu)
    if entry is None:
        raise ScenarioError(
            "fleet.serving_stack",
            stack,
            f"has no constants for GPU {gpu!r} in the catalog (catalog/stacks.toml)",
            'use serving_stack = "eager" or a GPU with constants: ' + ", ".join(sorted(table)),
        )
    return dict(entry)


def _fix() -> str:
    return "use one of: " + ", ".join(repr(s) for s in STACKS)


def apply_stack(
    profile: Profile, stack: str, gpu: str, max_num_seqs: int, constants: dict | None = None
) -> Profile:
    """``profile`` (a catalog GPU's analytic profile) as ``stack`` runs it on ``gpu`` with a
    batch limit of ``max_num_seqs``. ``eager`` and linear profiles come back unchanged.
    ``constants``: the stack's constants fitted elsewhere (a profile file's
    ``stack_constants``, from ``fleetsim calibrate --from-mlenergy``) in place of the
    catalog's; a key they lack keeps the catalog's value."""
    if stack not in STACKS:
        raise ScenarioError("fleet.serving_stack", stack, "unknown serving stack", _fix())
    c = stack_constants(stack, gpu)
    if c is not None and constants:
        c = {**c, **constants}
    if c is None or not isinstance(profile, RooflineProfile):
        return profile
    return dataclasses.replace(
        profile,
        name=f"{profile.name}+{stack}",
        serving_stack=stack,
        # the exposed CPU time of a median step plus the mean host stall per step
        overhead_s=float(c["overhead_s"]) + float(c.get("host_stall_s", 0.0)),
        overhead_per_layer_s=0.0,
        graph_max_tokens=capture_max_tokens(max_num_seqs),
        graph_floor_frac=float(c["graph_floor_frac"]),
        per_seq_s=float(c["per_seq_s"]),
        memory_eff=float(c["kv_memory_eff"]),
        attn_unit_bw_bytes_per_s=float(c.get("attn_unit_bw_bytes_per_s", 0.0)),
        ar_floor_s=float(c.get("ar_floor_s", 0.0)),
        ar_bw_bytes_per_s=float(c.get("ar_bw_bytes_per_s", 0.0)),
        linear_state_eff=float(c.get("linear_state_eff", 0.0)),
        one_gpu_overhead_s=float(c.get("one_gpu_overhead_s", 0.0)),
        dense_gemm_bw_eff=float(c.get("dense_gemm_bw_eff", 0.0)),
        eager_moe_layer_host_s=float(c.get("eager_moe_layer_host_s", 0.0)),
        eager_seq_host_s=float(c.get("eager_seq_host_s", 0.0)),
        eager_mla_layer_host_s=float(c.get("eager_mla_layer_host_s", 0.0)),
        eager_mla_prefill_layer_host_s=float(c.get("eager_mla_prefill_layer_host_s", 0.0)),
        linear_state_prefill_layer_s=float(c.get("linear_state_prefill_layer_s", 0.0)),
        linear_state_prefill_step_s=float(c.get("linear_state_prefill_step_s", 0.0)),
    )
