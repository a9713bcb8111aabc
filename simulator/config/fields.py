"""What every scenario field means: the ``description`` of each property of the scenario's JSON
Schema (``fleetsim schema``; editors show it on hover) and the source of the field reference.

Each entry is the meaning and the unit, and the vLLM engine argument where one exists;
:func:`describe` appends the default and the allowed range read from the schema itself, so the
two never disagree. Keys are ``"<schema definition>.<property>"`` (``"top.<property>"`` for the
file's top level). A property without an entry fails ``tests/test_everyday2.py``, which lists
it: add the entry here when adding a field.
"""

from __future__ import annotations

import json
from typing import Any

_DIST = (
    "a size distribution: an inline table with `dist` = lognormal, uniform, fixed, geometric or "
    "empirical and its parameters"
)

SCENARIO: dict[str, str] = {
    # the file
    "top.name": "The scenario's name: shown in summaries and reports, and the default output "
    "folder's name is the file's stem.",
    "top.seed": "Root seed of every random stream (numpy SeedSequence): the same seed gives the "
    "same run bit for bit.",
    "top.simulation": "[simulation]: how long and from when to simulate, and the engine mode.",
    "top.model": "[model]: the served model, from the catalog, a Hugging Face config.json or "
    "inline architecture fields.",
    "top.hardware": "[hardware]: the GPU (catalog name) and any of its figures overridden.",
    "top.fleet": "[fleet]: pods, replicas per pod, tensor parallelism, routing and the serving "
    "engine's limits.",
    "top.traffic": "[traffic]: the requests: daily volume, diurnal shape, prompt and output "
    "sizes, or a trace.",
    "top.power": "[power]: facility overhead (PUE) and the power states of unpowered replicas.",
    "top.cost": "[cost]: electricity price, owned or rented hardware, carbon intensity.",
    "top.slo": "[slo]: the latency targets (p99 TTFT and TPOT) runs and plans are judged by.",
    "top.autoscaler": "[autoscaler]: who is powered: all (static), an hourly schedule, or a "
    "reactive policy.",
    "top.disaggregation": "[disaggregation]: a prefill pool and a decode pool joined by a KV "
    "link (absent: every replica does both).",
    # [simulation]
    "SimulationSection.hours": "Simulated hours (integer; 24 = one day). Hourly tables have one "
    "row per hour.",
    "SimulationSection.start_utc": "UTC start time (RFC 3339); 24-value profiles are indexed by "
    "its hour of day.",
    "SimulationSection.engine": "'macro': steps of the same batch are advanced in one event "
    "(exact, fast); 'iteration': one event per engine iteration (the reference).",
    # [model]
    "ModelSection.name": "Model name: a catalog entry (simulator/device/catalog/models.toml), "
    "a Hugging Face id the checkout ships in data/models (read from its config.json, never "
    "downloaded), or any name when the architecture is given by `config` or inline fields.",
    "ModelSection.config": "Path of a Hugging Face config.json to read the architecture from, "
    "or of the folder that holds it (relative to the scenario file).",
    "ModelSection.dtype": "Weight precision; fp8/int8/int4 run at the GPU's native peak where it "
    "has one, else as weight-only quantization. vLLM: --dtype / --quantization.",
    "ModelSection.kv_dtype": "KV cache precision; unset: the activation precision (16-bit for "
    "quantized weights). vLLM: --kv-cache-dtype (auto).",
    "ModelSection.n_layers": "Transformer layers (HF num_hidden_layers).",
    "ModelSection.d_model": "Hidden size (HF hidden_size).",
    "ModelSection.n_heads": "Attention heads (HF num_attention_heads).",
    "ModelSection.n_kv_heads": "Key/value heads, < n_heads for grouped-query attention (HF "
    "num_key_value_heads).",
    "ModelSection.d_ff": "MLP intermediate size (HF intermediate_size; per expert for MoE).",
    "ModelSection.vocab_size": "Vocabulary size (HF vocab_size): the embedding and LM head.",
    "ModelSection.n_experts": "Experts per MoE layer (1: dense; HF num_local_experts).",
    "ModelSection.n_active_experts": "Experts each token is routed to (HF num_experts_per_tok).",
    "ModelSection.head_dim": "Width of one attention head, in elements (HF head_dim); unset: "
    "d_model / n_heads. Qwen3, Gemma 3 and gpt-oss set it explicitly.",
    "ModelSection.sliding_window_tokens": "Sliding-window attention: tokens a window layer attends "
    "and keeps in its KV cache (HF sliding_window); unset or 0: every layer is global.",
    "ModelSection.sliding_global_every": "With a sliding window: every n-th attention layer is "
    "global and the others windowed (Gemma 3: 6; gpt-oss alternating: 2); unset: all windowed.",
    "ModelSection.attention_sinks": "Whether attention has learned sink logits per head (gpt-oss); "
    "costs no KV.",
    "ModelSection.kv_lora_rank": "Multi-head latent attention: width of the cached latent per "
    "token and layer, in elements (DeepSeek-V3: 512; HF kv_lora_rank).",
    "ModelSection.q_lora_rank": "Multi-head latent attention: rank of the query's low-rank "
    "projection (DeepSeek-V3: 1536; HF q_lora_rank); unset: a full query projection.",
    "ModelSection.qk_nope_head_dim": "Multi-head latent attention: per-head query/key width "
    "without rotary embedding (DeepSeek-V3: 128; HF qk_nope_head_dim).",
    "ModelSection.qk_rope_head_dim": "Multi-head latent attention: rotary key width cached per "
    "token and layer beside the latent (DeepSeek-V3: 64; HF qk_rope_head_dim).",
    "ModelSection.v_head_dim": "Multi-head latent attention: per-head value width (DeepSeek-V3: "
    "128; HF v_head_dim).",
    "ModelSection.d_ff_expert": "Intermediate size of one routed expert (HF "
    "moe_intermediate_size); unset: d_ff.",
    "ModelSection.n_shared_experts": "Shared experts that every token runs besides its routed "
    "ones (HF n_shared_experts; Llama 4 and DeepSeek-V3: 1).",
    "ModelSection.d_ff_shared": "Intermediate size of one shared expert (HF "
    "shared_expert_intermediate_size); unset: d_ff_expert.",
    "ModelSection.first_k_dense": "MoE models: the first k layers have a dense MLP (HF "
    "first_k_dense_replace; DeepSeek-V3: 3).",
    "ModelSection.moe_layer_step": "MoE models: after first_k_dense, every n-th layer is MoE "
    "(1: all; Llama 4 Maverick: 2; HF decoder_sparse_step / interleave_moe_layer_step).",
    "ModelSection.hybrid_pattern": "Hybrid stacks (Nemotron-H's hybrid_override_pattern): one "
    "character per layer, M a Mamba-2 mixer, * attention, - a dense MLP, E an MoE MLP.",
    "ModelSection.ssm_state_size": "Mamba-2 layers: state size per head channel (HF "
    "ssm_state_size / mamba_d_state).",
    "ModelSection.ssm_n_heads": "Mamba-2 layers: heads (HF mamba_num_heads).",
    "ModelSection.ssm_head_dim": "Mamba-2 layers: width of one head (HF mamba_head_dim).",
    "ModelSection.ssm_n_groups": "Mamba-2 layers: groups of B and C projections (HF n_groups); "
    "a divisor of ssm_n_heads (vLLM's Mamba-2 kernels give each group whole heads); split "
    "over the tensor-parallel ranks, which must divide it, or one group copied on every rank.",
    "ModelSection.ssm_conv_kernel": "Mamba-2 layers: width of the causal convolution, in tokens "
    "(HF conv_kernel); its last tokens are part of the state.",
    "ModelSection.expert_dtype": "Precision of the routed experts' weights when it differs from "
    "dtype (gpt-oss: mxfp4; NVIDIA's ModelOpt NVFP4 DeepSeek-R1: nvfp4, 4.5 bits a weight, run "
    "at the B200's FP4 peak and weight-only on Hopper); unset: dtype.",
    "ModelSection.fp8_block": "fp8 weights carry 128 x 128 block scales (a config.json's "
    "weight_block_size: DeepSeek-V3, Qwen3 -FP8); false: per-tensor or per-channel scales "
    "(fp8 without weight_block_size, fbgemm_fp8), whose experts split at any width and run "
    "no block-scaled K loop; unset: the config's, else true.",
    "ModelSection.embed_dtype": "Precision of the embedding and LM head when it differs from "
    "dtype; unset: dtype (16-bit for quantized weights).",
    "ModelSection.state_dtype": "Precision of the Mamba-2 state per sequence; unset: the KV "
    "cache's.",
    "ModelSection.ssm_state_dtype": "Precision of the Mamba-2 SSM state alone (vLLM's "
    "--mamba-ssm-cache-dtype, e.g. fp32); the convolution state keeps state_dtype; unset: "
    "state_dtype.",
    "ModelSection.mlp": "MLP kind: 'swiglu' (three matrices) or 'gelu' (two).",
    "ModelSection.tied_embeddings": "Whether the LM head shares the embedding's weights (HF "
    "tie_word_embeddings).",
    "ModelSection.max_context_tokens": "Longest prompt + output a request may have, in tokens "
    "(HF max_position_embeddings). vLLM: --max-model-len.",
    # [hardware]
    "HardwareSection.gpu": "GPU: a catalog entry (simulator/device/catalog/gpus.toml; its "
    "figures cite their sources).",
    "HardwareSection.profile": "Path of a latency/power profile JSON (fleetsim calibrate's "
    "output) used instead of the catalog's analytic roofline.",
    "HardwareSection.peak_flops": "Dense 16-bit peak of one GPU, in FLOP/s (overrides the "
    "catalog).",
    "HardwareSection.mem_bw_bytes_per_s": "HBM bandwidth of one GPU, in bytes/s (overrides the "
    "catalog).",
    "HardwareSection.mem_bytes": "Device memory of one GPU, in bytes (overrides the catalog).",
    "HardwareSection.tdp_w": "Thermal design power of one GPU, in W (overrides the catalog).",
    "HardwareSection.idle_w": "Power of one powered, idle GPU with a model loaded, in W.",
    "HardwareSection.active_w": "Extra power of one GPU while an iteration runs, in W (on top "
    "of idle_w, before the work's dynamic energy).",
    "HardwareSection.compute_w": "Dynamic power of one GPU at its full FLOP rate, in W (energy "
    "per FLOP = compute_w / peak_flops).",
    "HardwareSection.memory_w": "Dynamic power of one GPU at its full memory bandwidth, in W "
    "(energy per byte = memory_w / bandwidth).",
    "HardwareSection.kv_w": "Dynamic power of one GPU at its full memory bandwidth of KV-cache "
    "and linear-state traffic, on top of memory_w, in W (the bytes that are not the weight "
    "stream; fitted to ML.ENERGY v3 for the H100 and B200).",
    "HardwareSection.comm_w": "Power of one GPU above idle while its replica waits on "
    "tensor- or expert-parallel communication, in W, in place of active_w for that share of "
    "the iteration (fitted to the H100's two-GPU ML.ENERGY v3 rows).",
    "HardwareSection.moe_loop_w": "Power of one GPU above idle while the fused mixture-of-experts "
    "kernel of fp8 block-quantised experts runs its block-scaled K loop, in W, in place of "
    "active_w for that share of the iteration (the loop latency of catalog/moe.toml's "
    "k_step_fp8_s; fitted to the fp8 MoE rows of ML.ENERGY v3 for the H100 and B200).",
    "HardwareSection.moe_compute_w": "Dynamic power of one GPU at its full peak FLOP/s of "
    "routed-expert FLOPs (the grouped GEMMs of a mixture of experts), on top of compute_w, in W "
    "(fitted to the MoE rows of ML.ENERGY v3 for the H100 and B200; 0 for dense models).",
    "HardwareSection.host_w": "Power of one GPU above idle while an iteration waits on the "
    "host (the serving stack's exposed host time per iteration: overhead_s, the host stall and "
    "the one-GPU step floor), in W, in place of active_w for that share of the iteration; "
    "unset: active_w (no separate level).",
    "HardwareSection.compute_u0": "Saturation of the compute terms in the compute "
    "utilisation u_c (dimensionless, > 0): the FLOP terms take the factor (1 + u0) / (u_c + u0), "
    "equal to 1 at full use, steeper at low use; unset: linear in the FLOPs.",
    "HardwareSection.node_idle_w": "Host power (CPUs, DRAM, NICs, fans) of a powered node whose "
    "GPUs are idle, in W per node; unset: the catalog's. The serving level is node_overhead_w.",
    "HardwareSection.node_overhead_w": "Power of the rest of the node (CPUs, NICs, fans) per "
    "GPU, in W, while the GPU is powered.",
    "HardwareSection.gpus_per_node": "GPUs per node (8 for HGX/DGX).",
    "HardwareSection.capex_usd": "Purchase price of one GPU with its share of the node, in USD "
    "(owned hardware: amortised over cost.amortization_years).",
    "HardwareSection.rent_usd_per_gpu_hour": "Rent of one GPU, in USD per GPU-hour (rented "
    "hardware, paid while provisioned).",
    # [fleet]
    "FleetSection.replicas": "Model replicas per pod (each = tensor_parallel GPUs). Alias "
    "replicas_per_pod.",
    "FleetSection.pods": "Identical pods (each its own router and replicas); the fleet has "
    "pods x replicas x tensor_parallel GPUs.",
    "FleetSection.sample_pods": "Simulate only this many of the pods and scale the extensive "
    "figures (the summary gives a 95% interval); unset: all.",
    "FleetSection.tensor_parallel": "GPUs per replica (tensor parallelism). vLLM: "
    "--tensor-parallel-size (alias tensor_parallel_size).",
    "FleetSection.router": "How a pod sends requests to its replicas: round_robin, random, "
    "least_loaded (fewest in flight), central_queue (one queue, first free replica), "
    "prefix_affinity (the replica caching the longest prefix).",
    "FleetSection.max_batch_size": "Most sequences in one iteration. vLLM: --max-num-seqs "
    "(alias max_num_seqs).",
    "FleetSection.max_batched_tokens": "Most tokens (prefill + decode) in one iteration. vLLM: "
    "--max-num-batched-tokens (alias max_num_batched_tokens).",
    "FleetSection.gpu_memory_utilization": "Share of GPU memory for weights, activations and "
    "the KV cache (the rest is left free). vLLM: --gpu-memory-utilization.",
    "FleetSection.kv_allocation": "'paged': KV blocks allocated as tokens arrive, preemption by "
    "recomputation (vLLM); 'reserve': prompt + output reserved at admission.",
    "FleetSection.block_size_tokens": "Tokens per KV block (paged). vLLM: --block-size.",
    "FleetSection.enable_chunked_prefill": "Split long prompts over iterations within "
    "max_batched_tokens; unset: on with paged. vLLM: --enable-chunked-prefill.",
    "FleetSection.enable_prefix_caching": "Reuse cached KV blocks of identical prompt prefixes; "
    "unset: on with paged. vLLM: --enable-prefix-caching.",
    "FleetSection.kv_watermark_fraction": "Share of KV blocks kept free when admitting a new "
    "request (paged), as a fraction of the blocks.",
    "FleetSection.activation_reserve_bytes": "Memory per GPU set aside for activations, in "
    "bytes; unset: estimated from max_batched_tokens.",
    "FleetSection.prefix_affinity_margin": "prefix_affinity router: a replica with the longest "
    "cached prefix is chosen unless it has this many more requests in flight than the least "
    "loaded.",
    "FleetSection.prefix_cache_eviction": "Paged KV with prefix caching: 'pool-first' takes "
    "never-cached free blocks before evicting a cached prompt block; 'vllm' keeps vLLM V1's "
    "one free-block queue, a released block (cached or not) joining its tail and new blocks "
    "coming from its head.",
    "FleetSection.replicas_per_pod": "Alias of replicas.",
    "FleetSection.max_num_seqs": "vLLM's name of max_batch_size.",
    "FleetSection.max_num_batched_tokens": "vLLM's name of max_batched_tokens.",
    "FleetSection.tensor_parallel_size": "vLLM's name of tensor_parallel.",
    "FleetSection.data_parallel_size": "vLLM's name of data_parallel.",
    "FleetSection.enable_expert_parallel": "vLLM's name of expert_parallel.",
    "FleetSection.data_parallel": "Data-parallel attention engines per replica (vLLM "
    "--data-parallel-size): a replica has tensor_parallel x data_parallel GPUs, and "
    "max_batch_size / max_batched_tokens are the whole replica's.",
    "FleetSection.dp_scheduler": "How a data-parallel replica schedules: 'per-rank' (vLLM: "
    "every rank its own waiting queue, max_batch_size / data_parallel slots and "
    "max_batched_tokens / data_parallel token budget, a request bound on arrival to the rank "
    "with the lowest 4 x waiting + running, the ranks stepping together padded to the fullest) "
    "or 'merged' (one scheduler for the replica). per-rank needs paged KV, a router other than "
    "central_queue and a max_batch_size that data_parallel divides.",
    "FleetSection.dp_kv_pool": "With dp_scheduler 'per-rank': 'per-rank' (vLLM: every "
    "data-parallel rank its own KV cache of the replica's blocks // data_parallel, and its own "
    "prefix cache; a request must fit one rank's cache) or 'shared' (one pool of the replica's "
    "blocks that every rank allocates from).",
    "FleetSection.expert_parallel": "Spread the experts over the replica's GPUs instead of "
    "splitting each one (vLLM --enable-expert-parallel; EP = tensor_parallel x data_parallel).",
    "FleetSection.serving_stack": "The serving stack the step times represent: 'vllm-v1' (vLLM "
    "0.11: decode under CUDA graphs, asynchronous scheduling; fitted to ML.ENERGY v3) or "
    "'eager' (operator times as Vidur measured them, no graphs).",
    "FleetSection.fp8_moe_kernel": "The fused mixture-of-experts kernel that fp8 "
    "block-quantised experts run: 'triton' (vLLM's default fused_moe kernel, with its serial K "
    "loop) or 'flashinfer-trtllm' (FlashInfer's TensorRT-LLM block-scale kernel, which vLLM "
    "0.11 runs on a B200 with VLLM_USE_FLASHINFER_MOE_FP8=1; B200 only). nvfp4 experts take it "
    "too: 'triton' is then vLLM's CUTLASS FP4 MoE, 'flashinfer-trtllm' FlashInfer's FP4 sibling "
    "(VLLM_USE_FLASHINFER_MOE_FP4=1, VLLM_FLASHINFER_MOE_BACKEND=latency; the fp8 kernel's "
    "fitted fixed time, assumed). Other experts refuse it.",
    # [traffic]
    "TrafficSection.requests_per_day": "Mean requests per day for the whole fleet; the hourly "
    "rate follows `diurnal`.",
    "TrafficSection.diurnal": "Shape of the arrival rate by UTC hour: a named curve "
    "('azure-conv', 'azure-code', 'flat') or 24 relative weights.",
    "TrafficSection.prompt": f"Prompt length in tokens: {_DIST}.",
    "TrafficSection.output": f"Output length in tokens: {_DIST}.",
    "TrafficSection.trace": "Path of a timed trace (CSV of arrival, prompt and output tokens, "
    "or a Mooncake JSONL) replayed instead of the synthetic arrivals.",
    "TrafficSection.trace_block_tokens": "Tokens per prompt block id of a Mooncake trace (512 in "
    "its FAST'25 release).",
    "TrafficSection.sessions": "[traffic.sessions]: multi-turn conversations (turns, think "
    "time, a shared system prompt) instead of independent requests.",
    "SessionSection.turns": f"Turns per session: {_DIST}.",
    "SessionSection.think_s": f"User think time between turns, in seconds: {_DIST}.",
    "SessionSection.system_prompt_tokens": "Tokens of a system prompt every session shares "
    "(prefix caching hits).",
    "SessionSection.block_tokens": "Tokens per prompt block id of the sessions' prompts (a "
    "multiple of fleet.block_size_tokens).",
    "LogNormal.dist": "'lognormal'.",
    "LogNormal.median": "Median, in tokens (or seconds for think_s).",
    "LogNormal.sigma": "Standard deviation of the logarithm.",
    "LogNormal.min": "Draws below are set to this value.",
    "LogNormal.max": "Draws above are set to this value.",
    "Uniform.dist": "'uniform'.",
    "Uniform.low": "Smallest value (inclusive).",
    "Uniform.high": "Largest value (inclusive).",
    "Fixed.dist": "'fixed'.",
    "Fixed.value": "The value of every draw.",
    "Geometric.dist": "'geometric'.",
    "Geometric.mean": "Mean of the draws.",
    "Geometric.max": "Draws above are set to this value.",
    "Empirical.dist": "'empirical': values drawn with replacement from a CSV column.",
    "Empirical.file": "Path of the CSV file (relative to the scenario file).",
    "Empirical.column": "Column of the CSV file to draw from.",
    # [power]
    "PowerSection.pue": "Power usage effectiveness: facility energy = IT energy x pue.",
    "PowerSection.standby_w": "Power of one GPU of a replica that is off, in W (no node "
    "overhead, no rent).",
    "PowerSection.wake_s": "Cold start of a replica powered on, in seconds (serves nothing "
    "meanwhile).",
    "PowerSection.wake_w": "Power of one GPU during a cold start, in W; unset: idle power.",
    # [cost]
    "CostSection.electricity_usd_per_kwh": "Electricity price in USD per kWh of facility "
    "energy: one value, or 24 by UTC hour (time of use).",
    "CostSection.hardware": "'owned': amortised capex every hour; 'rented': rent while "
    "provisioned.",
    "CostSection.amortization_years": "Years over which owned hardware's capex is spread.",
    "CostSection.maintenance_usd_per_gpu_hour": "Extra cost per powered GPU-hour, in USD.",
    "CostSection.carbon_kg_per_kwh": "Grid carbon intensity in kg CO2e per kWh: one value, or 24 "
    "by UTC hour; unset: no carbon figures.",
    # [slo]
    "SloSection.ttft_s": "Target time to first token, in seconds (arrival to first token; "
    "judged at p99 per hour).",
    "SloSection.tpot_s": "Target time per output token after the first, in seconds (judged at "
    "p99 per hour).",
    # [autoscaler]
    "AutoscalerSection.policy": "'static': every replica powered; 'schedule': replicas_by_hour "
    "or schedule_file; 'reactive': follows the requests in flight.",
    "AutoscalerSection.replicas_by_hour": "Replicas per pod powered in each UTC hour of day "
    "(24 integers; schedule policy).",
    "AutoscalerSection.schedule_file": "Path of fleetsim plan's schedule.json (schedule policy).",
    "AutoscalerSection.prewarm": "Start cold starts wake_s before the hour a schedule powers "
    "them for.",
    "AutoscalerSection.interval_s": "Seconds between the reactive policy's decisions.",
    "AutoscalerSection.target_requests_per_replica": "Reactive policy: requests in flight per "
    "powered replica it aims at.",
    "AutoscalerSection.min_replicas": "Fewest replicas per pod the reactive policy keeps powered.",
    "AutoscalerSection.max_replicas": "Most replicas per pod the reactive policy powers; unset: "
    "fleet.replicas.",
    "AutoscalerSection.initial_replicas": "Replicas powered at the start; unset: the policy's "
    "first decision.",
    "AutoscalerSection.idle_timeout_s": "Reactive policy: seconds a replica stays unneeded "
    "before it is drained and powered off.",
    # [disaggregation]
    "DisaggregationSection.link": "The KV link between the pools: a catalog entry "
    "(simulator/device/catalog/links.toml).",
    "DisaggregationSection.link_bandwidth_bytes_per_s": "Link bandwidth per GPU, in bytes/s "
    "(overrides the catalog).",
    "DisaggregationSection.link_latency_s": "Link latency per transfer, in seconds (overrides "
    "the catalog).",
    "DisaggregationSection.prefill": "[disaggregation.prefill]: the prefill pool.",
    "DisaggregationSection.decode": "[disaggregation.decode]: the decode pool.",
    "PoolSection.gpu": "The pool's GPU (catalog name); unset: hardware.gpu.",
    "PoolSection.tensor_parallel": "GPUs per replica of the pool; unset: fleet.tensor_parallel.",
    "PoolSection.replicas": "Replicas of the pool per pod.",
    "PoolSection.max_batch_size": "Most sequences per iteration in the pool; unset: the "
    "fleet's. vLLM: --max-num-seqs.",
    "PoolSection.max_batched_tokens": "Most tokens per iteration in the pool; unset: the "
    "fleet's. vLLM: --max-num-batched-tokens.",
    "PoolSection.gpu_memory_utilization": "Share of GPU memory the pool uses; unset: the "
    "fleet's. vLLM: --gpu-memory-utilization.",
    "PoolSection.router": "How the pool's requests are routed to its replicas; unset: the "
    "fleet's router.",
    "PoolSection.autoscaler": "The pool's power policy: static, schedule or reactive.",
    "PoolSection.replicas_by_hour": "Schedule policy: the pool's replicas per pod in each UTC "
    "hour of day (24 integers).",
    "PoolSection.target_requests_per_replica": "Reactive policy: the pool's requests in flight "
    "per powered replica it aims at.",
    "PoolSection.min_replicas": "Reactive policy: fewest powered replicas of the pool.",
    "PoolSection.initial_replicas": "Replicas of the pool powered at the start.",
}

PROFILE: dict[str, str] = {
    "LinearFile.created_utc": "When the profile was written (UTC, RFC 3339).",
    "LinearFile.kind": "'linear': iteration time as a linear function of its tokens and sequences.",
    "RooflineFile.created_utc": "When the profile was written (UTC, RFC 3339).",
    "RooflineFile.kind": "'roofline': iteration time from FLOPs and bytes against the peaks, "
    "with fitted efficiencies.",
}


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else f"'{v}'"


def _range(prop: dict) -> str:
    """The allowed values of a property, from its schema (the non-null branch)."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    parts = []
    for b in branches:
        if "enum" in b:
            parts.append("one of " + ", ".join(_fmt(x) for x in b["enum"]))
            continue
        lo = b.get("minimum", b.get("exclusiveMinimum"))
        hi = b.get("maximum", b.get("exclusiveMaximum"))
        if lo is not None or hi is not None:
            left = "(" if "exclusiveMinimum" in b else "["
            right = ")" if "exclusiveMaximum" in b else "]"
            lo_t = "-inf" if lo is None else (str(lo) if isinstance(lo, int) else f"{lo:g}")
            hi_t = "inf" if hi is None else (str(hi) if isinstance(hi, int) else f"{hi:g}")
            parts.append(f"{left}{lo_t}, {hi_t}{right}")
    return "; ".join(parts)


def describe(schema: dict, table: dict[str, str]) -> None:
    """Set the ``description`` of every property of ``schema`` (in place) that ``table``
    describes: the entry, then ``Default: ...`` and ``Range: ...`` from the schema. A property
    that already has a description (a model's own) gets the default and range appended."""
    groups = [("top", schema), *list(schema.get("$defs", {}).items())]
    for name, d in groups:
        for prop, p in d.get("properties", {}).items():
            text = table.get(f"{name}.{prop}") or p.get("description")
            if not text:
                continue
            extra = []
            if "default" in p and not isinstance(p["default"], dict):
                extra.append(
                    "Default: unset." if p["default"] is None else f"Default: {_fmt(p['default'])}."
                )
            rng = _range(p)
            if rng:
                extra.append(f"Range: {rng}.")
            p["description"] = " ".join([text.rstrip(), *extra])


def undescribed(schema: dict) -> list[str]:
    """``"<definition>.<property>"`` of every property of ``schema`` without a description."""
    groups = [("top", schema), *list(schema.get("$defs", {}).items())]
    return [
        f"{name}.{prop}"
        for name, d in groups
        for prop, p in d.get("properties", {}).items()
        if not p.get("description")
    ]


def field_reference(schema: dict) -> str:
    """A Markdown reference of every field (section, field, description) from the schema."""
    lines = ["| field | description |", "|---|---|"]
    groups = [("top", schema), *list(schema.get("$defs", {}).items())]
    for name, d in groups:
        for prop, p in d.get("properties", {}).items():
            text = (p.get("description") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{name}.{prop}` | {text} |")
    return "\n".join(lines)


def profile_schema() -> dict:
    """The profile file's JSON Schema with every property described (``fleetsim schema
    --profile``)."""
    from fleetsim.device.profile import profile_json_schema

    schema = profile_json_schema()
    describe(schema, PROFILE)
    return schema
