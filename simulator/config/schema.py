"""The scenario file's schema: one pydantic section per TOML table (``[simulation]``,
``[model]``, ``[hardware]``, ``[fleet]``, ``[traffic]``, ``[power]``, ``[cost]``, ``[slo]``,
``[autoscaler]``, ``[disaggregation]``) and :class:`Scenario`, the whole file.

Each field is typed and bounded here, and a section's own checks (one field against another of
the same section) are its validators. Reading a file against this schema is
:mod:`fleetsim.config.loading`; the checks across sections and against the catalogs are
:func:`fleetsim.config.resolve.resolve`.
"""

# (no ``from __future__ import annotations``: pydantic would evaluate every field's annotation
# string again when it builds the models, ~0.01 of the ~0.1 CPU s this module costs to import)

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_serializer, model_validator

from fleetsim.base.schema import Section, Tokens, bound
from fleetsim.workload.distributions import Dist, LogNormal

DType = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Hourly24 = Annotated[list[NonNegFloat], Field(min_length=24, max_length=24)]


Watts = Annotated[float, bound(0, 1e5)]  # per GPU; a B200 is 1.2 kW
Usd = Annotated[float, bound(0, 1e9)]  # capex of one GPU
UsdPerHour = Annotated[float, bound(0, 1e6)]  # rent or maintenance per GPU-hour
PricePerKwh = Annotated[float, bound(0, 1e3)]  # $/kWh; wholesale price caps are ~5-10 $/kWh
CarbonPerKwh = Annotated[float, bound(0, 1e2)]  # kg/kWh; coal is ~1
ArchInt = Annotated[int, Field(ge=1, le=10_000_000)]
ArchCount = Annotated[int, Field(ge=0, le=10_000_000)]  # may be 0
#: weight precisions (mxfp4 and nvfp4: 4-bit block formats; mxfp4 for gpt-oss's experts, nvfp4
#: for ModelOpt NVFP4 checkpoints' linear layers and experts)
WeightDType = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "mxfp4", "nvfp4"]


_Section = Section


# ---------------------------------------------------------------------------------------------
class SimulationSection(_Section):
    hours: Annotated[int, Field(ge=1, le=24 * 366)] = 24
    start_utc: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    engine: Literal["macro", "iteration"] = "macro"

    @field_validator("start_utc")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        """In UTC (a time without an offset is taken as UTC), in years 1970..9000 so that the
        hourly timestamps of the run stay representable."""
        v = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
        if not 1970 <= v.year <= 9000:
            raise ValueError(f"year {v.year} is outside 1970..9000")
        return v


class ModelSection(_Section):
    """A catalog model by ``name``, or an inline architecture (all of n_layers..vocab_size)."""

    name: str = "llama-3.1-70b"
    #: a local Hugging Face config.json (relative to the scenario file) for the architecture;
    #: fields given here override it (config/hf.py)
    config: str | None = None
    dtype: DType = "bf16"
    kv_dtype: DType | None = None
    n_layers: ArchInt | None = None
    d_model: ArchInt | None = None
    n_heads: ArchInt | None = None
    n_kv_heads: ArchInt | None = None
    d_ff: ArchInt | None = None
    vocab_size: ArchInt | None = None
    n_experts: ArchInt | None = None
    n_active_experts: ArchInt | None = None
    mlp: Literal["swiglu", "gelu"] | None = None
    tied_embeddings: bool | None = None
    max_context_tokens: Tokens | None = None
    # today's architectures (device/modelspec.py says what each means, 0 or "" as there: none
    # or derived; config/hf.py reads them from a config.json)
    head_dim: ArchCount | None = None
    sliding_window_tokens: Annotated[int, Field(ge=0, le=1_000_000_000)] | None = None
    sliding_global_every: ArchCount | None = None
    attention_sinks: bool | None = None
    kv_lora_rank: ArchCount | None = None
    q_lora_rank: ArchCount | None = None
    qk_nope_head_dim: ArchCount | None = None
    qk_rope_head_dim: ArchCount | None = None
    v_head_dim: ArchCount | None = None
    d_ff_expert: ArchCount | None = None
    n_shared_experts: ArchCount | None = None
    d_ff_shared: ArchCount | None = None
    first_k_dense: ArchCount | None = None
    moe_layer_step: ArchInt | None = None
    hybrid_pattern: Annotated[str, Field(pattern=r"^[-M*E]*$", max_length=100_000)] | None = None
    ssm_state_size: ArchCount | None = None
    ssm_n_heads: ArchCount | None = None
    ssm_head_dim: ArchCount | None = None
    ssm_n_groups: ArchInt | None = None
    ssm_conv_kernel: ArchInt | None = None
    expert_dtype: WeightDType | None = None
    fp8_block: bool | None = None
    embed_dtype: DType | None = None
    state_dtype: DType | None = None
    ssm_state_dtype: DType | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """With ``config``, ``name`` and ``dtype`` are the file's unless the scenario sets them
        (config/aggregated.py ``model_spec``): a dump leaves their defaults out, so that the
        dumped scenario loads back as the same model (plan, sweep, the Python API and the pod
        workers reload dumps; a dump that wrote ``llama-3.1-70b`` / ``bf16`` set them, and
        Qwen3-235B-A22B-FP8 was planned as a 470 GB bf16 model named llama-3.1-70b); ``dtype``
        likewise for a Hugging Face id the checkout ships, read without ``config``."""
        d = handler(self)
        if isinstance(d, dict):
            # ``dtype`` unset is the file's for a checkout id too (``name = "ORG/NAME"`` without
            # ``config``, aggregated.checkout_config): dumped as "bf16", it was set on reload and
            # ``fleetsim plan`` sized Qwen3-235B-A22B-FP8 named by its id as 470 GB of bf16
            # (a catalog model reloads the default "bf16" either way)
            unset = ("name", "dtype") if self.config is not None else ("dtype",)
            for k in unset:
                if k not in self.model_fields_set:
                    d.pop(k, None)
        return d


class HardwareSection(_Section):
    """A catalog GPU, optionally with field overrides and a calibrated profile."""

    gpu: str = "h100-sxm"
    profile: str | None = None
    peak_flops: Annotated[float, bound(1e6, 1e19)] | None = None  # an H100 is ~1e15 (dense bf16)
    mem_bw_bytes_per_s: Annotated[float, bound(1e6, 1e16)] | None = None  # an H200 is 4.8e12
    mem_bytes: Annotated[float, bound(1e6, 1e14)] | None = None  # an H200 is 1.41e11
    tdp_w: Annotated[float, bound(0, 1e5, strict_lo=True)] | None = None
    idle_w: Watts | None = None
    active_w: Watts | None = None
    compute_w: Watts | None = None
    memory_w: Watts | None = None
    kv_w: Watts | None = None
    comm_w: Watts | None = None
    moe_loop_w: Watts | None = None
    moe_compute_w: Watts | None = None
    host_w: Watts | None = None
    compute_u0: Annotated[float, bound(0, 1e6, strict_lo=True)] | None = None
    node_overhead_w: Annotated[float, bound(0, 1e6)] | None = None
    node_idle_w: Annotated[float, bound(0, 1e6)] | None = None
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] | None = None
    capex_usd: Usd | None = None
    rent_usd_per_gpu_hour: UsdPerHour | None = None


class FleetSection(_Section):
    #: other spellings accepted in files and ``--set`` (vLLM's engine arguments among them); they
    #: are renamed to the field's own name before validation (:func:`canonical_keys`)
    ALIASES: ClassVar[dict[str, str]] = {
        "replicas_per_pod": "replicas",
        "max_num_seqs": "max_batch_size",
        "max_num_batched_tokens": "max_batched_tokens",
        "tensor_parallel_size": "tensor_parallel",
        "data_parallel_size": "data_parallel",
        "enable_expert_parallel": "expert_parallel",
    }

    replicas: Annotated[int, Field(ge=1, le=100_000)] = 1
    pods: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    sample_pods: Annotated[int, Field(ge=1)] | None = None
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    #: data-parallel attention engines of ``tensor_parallel`` GPUs each in one replica (vLLM
    #: --data-parallel-size): a replica has tensor_parallel x data_parallel GPUs, and
    #: max_batch_size / max_batched_tokens are the whole replica's (see fleetsim.device.moe)
    data_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    #: experts whole on the replica's GPUs instead of split (vLLM --enable-expert-parallel)
    expert_parallel: bool = False
    #: how a data-parallel replica schedules (serving/ranks.py): "per-rank" (vLLM: every rank
    #: its own queue, max_batch_size / data_parallel slots and max_batched_tokens /
    #: data_parallel budget, a request bound to a rank on arrival) or "merged" (one scheduler
    #: for the replica, its prompt steps padded as if their prompts went one to a rank)
    dp_scheduler: Literal["per-rank", "merged"] = "per-rank"
    #: with a scheduler per rank, whose KV blocks a rank allocates (serving/ranks.py):
    #: "per-rank" (vLLM: every engine core its own KV cache, blocks // data_parallel blocks,
    #: and its own prefix cache) or "shared" (one pool of the replica's blocks for all ranks)
    dp_kv_pool: Literal["per-rank", "shared"] = "per-rank"
    router: Literal["round_robin", "random", "least_loaded", "central_queue", "prefix_affinity"] = (
        "least_loaded"
    )
    max_batch_size: Annotated[int, Field(ge=1)] = 256
    max_batched_tokens: Annotated[int, Field(ge=1)] = 16384
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    # the serving stack the step times represent (device/stack.py): "vllm-v1" (vLLM 0.11: CUDA
    # graphs, asynchronous scheduling; fitted to ML.ENERGY v3) or "eager" (Vidur's operator times)
    serving_stack: Literal["vllm-v1", "eager"] = "vllm-v1"
    # the fused-MoE kernel of fp8 block-quantised experts (device/moe.py FP8_MOE_KERNELS):
    # vLLM's Triton kernel, or FlashInfer's TensorRT-LLM one (B200, VLLM_USE_FLASHINFER_MOE_FP8=1)
    fp8_moe_kernel: Literal["triton", "flashinfer-trtllm"] = "triton"
    # ---- the paged KV policy (serving/kv_paged.py). Defaults follow vLLM's V1 engine as of
    # v0.10 (vllm/config CacheConfig.block_size = 16; EngineArgs._set_default_args_v1: chunked
    # prefill always on, prefix caching on by default; V1's KVCacheManager.allocate_slots admits
    # while the free blocks cover the chunk, no watermark; preemption by recomputation).
    kv_allocation: Literal["paged", "reserve"] = "paged"
    block_size_tokens: Annotated[int, Field(ge=1, le=4096)] = 16
    enable_chunked_prefill: bool | None = None  # None: on with paged KV, off with reserve
    enable_prefix_caching: bool | None = None  # None: on with paged KV, off with reserve
    kv_watermark_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # peak activation memory per GPU reserved off the KV budget; None = estimated (see
    # kv_budget()); 0 = none (the first engine's budget)
    activation_reserve_bytes: Annotated[float, Field(ge=0, le=1e13)] | None = None
    # prefix_affinity router: go to the replica with the longest cached prefix unless its
    # outstanding requests exceed the least loaded replica's by more than this margin
    prefix_affinity_margin: Annotated[int, Field(ge=0)] = 8
    # which free KV block a new one comes from (paged, prefix caching): "vllm" (the default)
    # keeps vLLM V1's single free-block queue (a released block, cached or not, joins its tail;
    # a new block comes from its head and evicts the cached prefix it held:
    # serving/kv_blocks.py); "pool-first" takes never-cached free blocks before evicting a
    # cached prompt block (the default before the eighth session: cached prompts live longer)
    prefix_cache_eviction: Literal["pool-first", "vllm"] = "vllm"

    @model_validator(mode="after")
    def _sample(self) -> "FleetSection":
        if self.sample_pods is not None and self.sample_pods > self.pods:
            raise ValueError(f"sample_pods ({self.sample_pods}) must be <= pods ({self.pods})")
        if self.kv_allocation == "reserve" and (
            self.enable_chunked_prefill or self.enable_prefix_caching
        ):
            raise ValueError(
                'kv_allocation = "reserve" is the first-generation engine, without chunked '
                "prefill or prefix caching: set enable_chunked_prefill = false and "
                'enable_prefix_caching = false, or kv_allocation = "paged"'
            )
        return self

    @field_validator("block_size_tokens")
    @classmethod
    def _pow2(cls, b: int) -> int:
        if b & (b - 1):
            raise ValueError("not a power of two (use 16, vLLM's default)")
        return b

    @property
    def chunked_prefill(self) -> bool:
        c = self.enable_chunked_prefill
        return self.kv_allocation == "paged" if c is None else c

    @property
    def prompt_token_budget(self) -> int:
        """The most prompt tokens one scheduler gives a prompt in one iteration:
        ``max_batched_tokens``, or a data-parallel rank's share ``ceil(max_batched_tokens /
        data_parallel)`` with a scheduler per rank (serving/ranks.py). Without chunked prefill
        a longer prompt can never be scheduled."""
        dp = self.data_parallel
        if dp > 1 and self.dp_scheduler == "per-rank":
            return -(-self.max_batched_tokens // dp)
        return self.max_batched_tokens

    @property
    def prefix_caching(self) -> bool:
        c = self.enable_prefix_caching
        return self.kv_allocation == "paged" if c is None else c


class SessionSection(_Section):
    """Multi-turn sessions (workload/sessions.py): sessions start by the diurnal Poisson process
    (``traffic.requests_per_day`` then counts sessions); each has ``turns`` turns separated by
    ``think_s`` seconds after the previous answer; a turn's prompt is the session's previous
    prompts and answers plus ``traffic.prompt`` new user tokens, after a system prompt of
    ``system_prompt_tokens`` shared by every session. ``block_tokens``: granularity of the
    prompt's block ids (a multiple of fleet.block_size_tokens)."""

    turns: Dist = LogNormal(dist="lognormal", median=3, sigma=0.8, min=1, max=40)
    think_s: Dist = LogNormal(dist="lognormal", median=30, sigma=1.0, min=1, max=3600)
    system_prompt_tokens: Annotated[int, Field(ge=0, le=1_000_000_000)] = 0
    block_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 512


class TrafficSection(_Section):
    requests_per_day: NonNegFloat = 1_000_000.0
    diurnal: Hourly24 | Literal["flat", "azure-conv", "azure-code"] = "azure-conv"
    prompt: Dist = LogNormal(dist="lognormal", median=1020, sigma=0.985, min=2, max=14050)
    output: Dist = LogNormal(dist="lognormal", median=129, sigma=0.859, min=1, max=2000)
    trace: str | None = None
    # a Mooncake JSONL trace (traffic.trace = "....jsonl") names its prompt blocks by hash ids of
    # this many tokens (512 in the FAST'25 release; scenarios/data/mooncake-2025/SOURCE.md)
    trace_block_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 512
    sessions: SessionSection | None = None

    @field_validator("diurnal")
    @classmethod
    def _positive_day(cls, v: Any) -> Any:
        if isinstance(v, list) and sum(v) <= 0:
            raise ValueError("the 24 values must not all be zero")
        return v


class PowerSection(_Section):
    """Facility overhead and the GPU power states used by the autoscalers (simulator/autoscale.py).

    Defaults of the power states are assumptions (confidence L), labelled in README.md:
    ``standby_w`` 10 W per GPU for a powered-off node's BMC and PSU standby (about 80 W per
    8-GPU node; no measurement found); ``wake_s`` 60 s of cold start (container, weights into HBM,
    CUDA graphs: reports range from about 10 s with weight streamers to minutes for 70B models);
    ``wake_w`` during a cold start: the GPU's loaded idle draw when unset."""

    pue: Annotated[float, Field(ge=1.0, le=5.0)] = 1.2
    standby_w: Watts = 10.0
    wake_s: Annotated[float, bound(0, 86400.0)] = 60.0  # a cold start longer than a day is a typo
    wake_w: Watts | None = None


class AutoscalerSection(_Section):
    """Which replicas are powered when (simulator/autoscale.py): ``static`` (all on), ``schedule``
    (``replicas_by_hour`` or ``schedule_file``) or ``reactive`` (in-flight requests per replica)."""

    policy: Literal["static", "schedule", "reactive"] = "static"
    replicas_by_hour: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=24, max_length=24)] | None
    ) = None
    schedule_file: str | None = None
    prewarm: bool = True
    interval_s: Annotated[float, bound(0, 86400.0, strict_lo=True)] = 30.0
    # (at least 1e-3 requests per replica: 5e-324 would overflow the replica count)
    target_requests_per_replica: Annotated[float, bound(1e-3, 1e9)] = 32.0
    min_replicas: Annotated[int, Field(ge=0, le=100_000)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=100_000)] | None = None
    initial_replicas: Annotated[int, Field(ge=0, le=100_000)] | None = None
    idle_timeout_s: Annotated[float, bound(0, 1e7)] = 600.0


class CostSection(_Section):
    electricity_usd_per_kwh: (
        PricePerKwh | Annotated[list[PricePerKwh], Field(min_length=24, max_length=24)]
    ) = 0.0806
    hardware: Literal["owned", "rented"] = "owned"
    amortization_years: Annotated[float, bound(0.01, 30)] = 5.0
    maintenance_usd_per_gpu_hour: UsdPerHour = 0.0
    carbon_kg_per_kwh: (
        CarbonPerKwh | Annotated[list[CarbonPerKwh], Field(min_length=24, max_length=24)] | None
    ) = None


class SloSection(_Section):
    ttft_s: Annotated[float, bound(0, 1e6, strict_lo=True)] = 2.0
    tpot_s: Annotated[float, bound(0, 1e6, strict_lo=True)] = 0.2


Router = Literal["round_robin", "random", "least_loaded", "central_queue", "prefix_affinity"]


class PoolSection(_Section):
    """One pool of a disaggregated fleet (``[disaggregation.prefill]`` or ``.decode``). Unset
    fields take the value of ``[fleet]`` (limits, router) or ``[hardware]`` (gpu); a pool on
    ``hardware.gpu`` keeps that section's overrides and profile, any other GPU is the bare
    catalog entry. ``replicas`` is per pod, like ``fleet.replicas``."""

    gpu: str | None = None
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] | None = None
    replicas: Annotated[int, Field(ge=1, le=100_000)] = 1
    max_batch_size: Annotated[int, Field(ge=1)] | None = None
    max_batched_tokens: Annotated[int, Field(ge=1)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    router: Router | None = None
    # "schedule": replicas_by_hour[h % 24] replicas of this pool powered in hour h (by UTC hour of
    # day, as every 24-value profile), with [power] wake_s cold starts and [autoscaler] prewarm
    # "reactive": the pool's requests in flight per powered replica against
    # target_requests_per_replica (prefill pool: routed, first token not out; decode pool: KV
    # arrived, not finished), between min_replicas (>= 1) and ``replicas``; [autoscaler]'s
    # interval_s and idle_timeout_s, [power] wake_s
    autoscaler: Literal["static", "schedule", "reactive"] = "static"
    replicas_by_hour: (
        Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=24, max_length=24)] | None
    ) = None
    target_requests_per_replica: Annotated[float, bound(1e-3, 1e9)] | None = None
    min_replicas: Annotated[int, Field(ge=1, le=100_000)] = 1
    initial_replicas: Annotated[int, Field(ge=1, le=100_000)] | None = None


class DisaggregationSection(_Section):
    """Disaggregated prefill/decode serving (DistServe, Splitwise, Mooncake, vLLM's disaggregated
    prefill): a prefill pool computes each prompt and its first token, the prompt's KV moves over
    ``link`` (a catalog entry of simulator/device/catalog/links.toml, per GPU and direction) to a
    decode replica chosen by the decode pool's router. Absent: the aggregated fleet of
    ``[fleet]``."""

    link: str = "infiniband-ndr"
    link_bandwidth_bytes_per_s: Annotated[float, bound(1e3, 1e15, strict_lo=True)] | None = None
    link_latency_s: Annotated[float, bound(0, 1e3)] | None = None
    prefill: PoolSection = PoolSection()
    decode: PoolSection = PoolSection()


class Scenario(_Section):
    """The whole scenario file."""

    #: the file it was read from (relative paths inside it resolve against its folder); set by
    #: ``fleetsim.load``, not part of the scenario's fields
    _source: str = PrivateAttr("")

    name: str = "scenario"
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    simulation: SimulationSection = SimulationSection()
    model: ModelSection = ModelSection()
    hardware: HardwareSection = HardwareSection()
    fleet: FleetSection = FleetSection()
    traffic: TrafficSection = TrafficSection()
    power: PowerSection = PowerSection()
    cost: CostSection = CostSection()
    slo: SloSection = SloSection()
    autoscaler: AutoscalerSection = AutoscalerSection()
    disaggregation: DisaggregationSection | None = None


__all__ = [
    "AutoscalerSection",
    "CostSection",
    "DisaggregationSection",
    "FleetSection",
    "HardwareSection",
    "ModelSection",
    "PoolSection",
    "PowerSection",
    "Scenario",
    "SessionSection",
    "SimulationSection",
    "SloSection",
    "TrafficSection",
]
