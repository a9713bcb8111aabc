"""Scenario files: a typed, frozen, validated tree loaded from TOML.

``load_scenario(path, overrides)`` reads the file, applies ``--set section.key=value`` overrides,
validates every field (unknown keys are rejected with a "did you mean"), and returns a
:class:`Scenario`. :func:`resolve` then joins it with the catalogs and the profile into the
objects the engine needs (:class:`Resolved`), and runs the cross-field checks (the model fits,
the KV budget holds a maximum-length request). Every problem is a :class:`ScenarioError` that
names the file, the field path, the value and the fix.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.base.names import closest
from fleetsim.base.schema import Section, Tokens, bound
from fleetsim.base.units import DAY_S, HOUR_S, rotate_to_start
from fleetsim.config.pools import POOLS, LinkSpec, Pools, PoolSpec
from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, PowerSpec, Profile
from fleetsim.device.modelspec import DTYPE_BYTES, ModelSpec, model_from_catalog
from fleetsim.workload.distributions import Dist, Empirical, Fixed, LogNormal

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
    node_overhead_w: Annotated[float, bound(0, 1e6)] | None = None
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
    }

    replicas: Annotated[int, Field(ge=1, le=100_000)] = 1
    pods: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    sample_pods: Annotated[int, Field(ge=1)] | None = None
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    router: Literal["round_robin", "random", "least_loaded", "central_queue", "prefix_affinity"] = (
        "least_loaded"
    )
    max_batch_size: Annotated[int, Field(ge=1)] = 256
    max_batched_tokens: Annotated[int, Field(ge=1)] = 16384
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    # ---- second-generation engine (serving/paged.py). Defaults follow vLLM's V1 engine as of
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

    @model_validator(mode="after")
    def _sample(self) -> FleetSection:
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


# ---------------------------------------------------------------------------------------------
# loading and error messages
def _format_validation(exc: ValidationError, source: str, data: Any = None) -> ScenarioError:
    """One clear line for a pydantic error (see :mod:`fleetsim.config.validation`)."""
    from fleetsim.config.validation import format_validation_error

    return format_validation_error(exc, Scenario, data, source)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is read as TOML, else as a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value (e.g. fleet.replicas=8)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _section_aliases(section: str) -> dict[str, str]:
    f = Scenario.model_fields.get(section)
    return dict(getattr(f.annotation, "ALIASES", {})) if f is not None else {}


def canonical_keys(data: dict, source: str = "") -> tuple[dict, dict[str, str]]:
    """``data`` with the aliases of every section's keys (``replicas_per_pod``, vLLM's
    ``max_num_seqs``...) renamed to the fields' own names; and {canonical path: path as written}
    for error messages. A field given under two of its names is an error."""
    out = dict(data)
    written: dict[str, str] = {}
    for section, sec in data.items():
        aliases = _section_aliases(section) if isinstance(section, str) else {}
        if not aliases or not isinstance(sec, dict):
            continue
        sec = dict(sec)
        for alias, name in aliases.items():
            if alias not in sec:
                continue
            if name in sec:
                raise ScenarioError(
                    f"{section}.{alias}",
                    sec[alias],
                    f"the same field as {section}.{name}, which is also given",
                    f"keep one of {section}.{name} and {section}.{alias}",
                    source,
                )
            sec[name] = sec.pop(alias)
            written[f"{section}.{name}"] = f"{section}.{alias}"
        out[section] = sec
    return out, written


def canonical_path(path: list[str]) -> list[str]:
    """An override's key path with a section alias renamed (``fleet.max_num_seqs`` ->
    ``fleet.max_batch_size``)."""
    if len(path) == 2:
        return [path[0], _section_aliases(path[0]).get(path[1], path[1])]
    return path


def toml_value(v: Any) -> str:
    """``v`` as TOML value text (what ``--set section.key=<text>`` parses back to ``v``), on
    one line: scalars and arrays written by ``tomli_w`` (any string round-trips: newlines,
    quotes, backslashes, control characters), tables as inline tables with quoted keys where a
    key is not bare."""
    import re

    import tomli_w

    if isinstance(v, Mapping):
        items = (
            f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', str(k)) else toml_value(str(k))} = "
            f"{toml_value(x)}"
            for k, x in v.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, float) and v != v:
        return "nan"
    try:
        return tomli_w.dumps({"v": v}).strip()[len("v = ") :]
    except TypeError:
        raise TypeError(type(v).__name__) from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """A copy of ``data`` with each ``section.key=value`` applied. Keys are matched by the
    fields' own names, whichever alias the file or the override uses."""
    import copy

    out = copy.deepcopy(data)
    if overrides:
        out, _ = canonical_keys(out)
    for item in overrides or []:
        path, value = parse_override(item)
        path = canonical_path(path)
        node = out
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: {p!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def scenario_from_dict(data: dict, source: str = "scenario") -> Scenario:
    """Validate a scenario dict; a ScenarioError on the first problem."""
    from fleetsim.config.validation import check_scalar_types

    if not isinstance(data, dict):
        raise ScenarioError(
            "(top level)",
            data,
            "a scenario is a table of sections",
            "start from a scenario in scenarios/ (e.g. scenarios/default.toml)",
            source,
        )
    check_scalar_types(data, Scenario, source)
    data, written = canonical_keys(data, source)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = _format_validation(exc, source, data)
        if err.field in written:  # name the field as the file spells it
            err = ScenarioError(written[err.field], err.value, err.problem, err.fix, source)
        raise err from None


def read_toml(path: str | Path) -> tuple[dict, str]:
    """The parsed TOML and its text; a UserError if unreadable, too large or malformed
    (bounded reading: :mod:`fleetsim.base.io`)."""
    from fleetsim.base import io

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise UserError(f"{io.clean(str(p))}: no such scenario file")
    text = io.read_text(p, "scenario")
    return io.parse_toml(text, io.clean(str(p))), text


def load_scenario(
    path: str | Path, overrides: list[str] | None = None, seed: int | None = None
) -> tuple[Scenario, str]:
    """Read, override and validate a scenario file. Returns the scenario and the file text."""
    data, text = read_toml(path)
    if seed is not None:
        data["seed"] = seed
    data = apply_overrides(data, overrides)
    return scenario_from_dict(data, str(path)), text


# ---------------------------------------------------------------------------------------------
# resolution: catalogs, profile, cross-field checks
@dataclass(frozen=True)
class GpuSpec:
    """A GPU as the cost and power layers see it (catalog entry plus overrides)."""

    name: str
    tdp_w: float
    idle_w: float
    node_overhead_w: float
    gpus_per_node: int
    capex_usd: float
    rent_usd_per_gpu_hour: float
    power: PowerSpec

    @property
    def overhead_w_per_gpu(self) -> float:
        return self.node_overhead_w / self.gpus_per_node


@dataclass(frozen=True)
class KvBudget:
    """One replica's KV cache (see :func:`kv_budget`)."""

    memory_bytes: float  # tp x device memory
    usable_bytes: float  # x gpu_memory_utilization
    weight_bytes: float
    activation_bytes: float  # the activation reserve, all GPUs of the replica
    kv_bytes: float
    bytes_per_token: float
    block_size_tokens: int
    blocks: int
    tokens: int  # blocks x block size (paged) or whole tokens (reserve)


def activation_reserve_bytes(model: ModelSpec, tp: int, max_tokens: int, max_seqs: int) -> float:
    """Peak activation memory of one GPU of a ``tp``-way replica, estimated analytically.

    vLLM sizes the KV cache as ``gpu_memory_utilization x total - (weights + peak activations +
    non-torch memory)``, measuring the peak with a profiling forward pass of
    ``max_num_batched_tokens`` tokens and a dummy sampler run of ``max_num_seqs`` sequences
    (vllm/v1/worker/gpu_worker.py ``Worker.determine_available_memory``, ``profile_run``). We
    estimate that peak instead of profiling: in 16-bit activations, the MLP's intermediate
    (gate, up and their product: 3 x d_ff / tp per token) plus four d_model-wide buffers
    (residual, normed input, attention output, MLP output) per token, and the fp32 logits of
    the sampler pass, ``max_seqs x vocab x 4`` bytes:

        reserve = 2 B x T x (3 d_ff / tp + 4 d_model) + 4 B x max_seqs x vocab

    (for a mixture of experts, d_ff is an expert's width times the active experts). The
    ``fleet.activation_reserve_bytes`` field replaces the estimate with a measured value."""
    d_ff = model.d_ff * max(1, model.n_active_experts if model.n_experts > 1 else 1)
    return 2.0 * max_tokens * (3.0 * d_ff / tp + 4.0 * model.d_model) + 4.0 * max_seqs * (
        model.vocab_size
    )


def kv_budget(sc: Scenario, model: ModelSpec, mem_bytes: float) -> KvBudget:
    """KV budget of a replica = gpu_memory_utilization x memory - weights - activation reserve.

    Paged: whole blocks of ``block_size_tokens``; reserve (the first engine): whole tokens."""
    f = sc.fleet
    tp = f.tensor_parallel
    mem = tp * mem_bytes
    usable = mem * f.gpu_memory_utilization
    act_gpu = (
        activation_reserve_bytes(model, tp, f.max_batched_tokens, f.max_batch_size)
        if f.activation_reserve_bytes is None
        else f.activation_reserve_bytes
    )
    act = tp * act_gpu
    kv = usable - model.weight_bytes - act
    bpt = model.kv_bytes_per_token_tp(tp)  # KV heads replicated when tp exceeds them
    b = f.block_size_tokens
    if f.kv_allocation == "paged":
        blocks = max(0, int(kv // (bpt * b)))
        tokens = blocks * b
    else:
        tokens = max(0, int(kv // bpt))
        blocks = tokens // b
    return KvBudget(mem, usable, model.weight_bytes, act, kv, bpt, b, blocks, tokens)


@dataclass(frozen=True)
class Resolved:
    """A scenario joined with its catalogs: what the engine and the accounting consume."""

    scenario: Scenario
    model: ModelSpec
    gpu: GpuSpec
    profile: Profile
    profile_id: str
    profile_sha256: str
    tp: int
    kv_capacity_tokens: int
    max_request_tokens: int
    hourly_rate_per_s: tuple[float, ...]  # whole fleet, by simulation hour % 24 (see resolve)
    replicas_by_hour: tuple[int, ...] | None = None  # autoscaler schedule, by simulation hour % 24
    kv: KvBudget | None = None  # the KV budget, in bytes, blocks and tokens (see kv_budget)
    pools: Any = None  # disaggregated fleets: fleetsim.config.pools.Pools (None: aggregated)

    def latency_model(self) -> LatencyModel:
        return LatencyModel(self.model, self.profile, self.tp)


# ---------------------------------------------------------------------------------------------
# The work budget of one run (check_work). Memory: a request held by a pod costs ~150 bytes (its
# Request object and its slots in the hour's arrival lists and the queue). Time: the engines
# simulate ~2e4 requests per second on one core (bench/bench_speed.py, README).
MAX_ARRIVALS_PER_POD_HOUR = 2_000_000  # one hour of a pod's arrivals is generated at once (~0.3 GB)
MAX_ARRIVALS_PER_POD = 20_000_000  # an overloaded pod holds every arrival not yet served (~3 GB)
MAX_SIMULATED_ARRIVALS = 100_000_000  # all simulated pods together: ~1.5 h of one core
MAX_SIMULATED_POD_HOURS = 200_000  # per-pod-hour summaries (a few kB each) and set-up time
MAX_AUTOSCALER_TICKS = 20_000_000  # reactive autoscaler ticks, all simulated pods together
MAX_ITERATIONS = 2_000_000_000  # engine iterations (iteration engine), an upper estimate


def check_work(
    sc: Scenario,
    rates: tuple[float, ...],
    lat: LatencyModel,
    src: str,
    trace_rows: int | None = None,
) -> None:
    """Refuse a scenario whose work (arrivals per pod-hour and per pod, pods and pod-hours
    simulated, autoscaler ticks, engine iterations) exceeds the budget above, before anything
    is generated; the message says how to get the same answer within it."""
    f, hours = sc.fleet, sc.simulation.hours
    sim_pods = min(f.sample_pods or f.pods, f.pods)
    hint_pods = (
        "set fleet.sample_pods (e.g. 16: pods are exchangeable, the totals are scaled and get a "
        "confidence interval)"
    )
    if sim_pods * hours > MAX_SIMULATED_POD_HOURS:
        raise ScenarioError(
            "fleet.sample_pods" if f.sample_pods else "fleet.pods",
            f.sample_pods or f.pods,
            f"{sim_pods:,} simulated pods x {hours:,} hours = {sim_pods * hours:,} pod-hours, "
            f"above the budget of {MAX_SIMULATED_POD_HOURS:,}",
            f"{hint_pods}, or simulate fewer hours",
            src,
        )
    if trace_rows is not None:  # a timed trace: its rows, split over the pods
        per_pod = trace_rows / f.pods
        peak_pod_hour = 0.0
    else:
        per_pod = sum(rates[h % 24] for h in range(hours)) * HOUR_S / f.pods
        peak_pod_hour = max(rates) * HOUR_S / f.pods
    if peak_pod_hour > MAX_ARRIVALS_PER_POD_HOUR:
        raise ScenarioError(
            "traffic.requests_per_day",
            sc.traffic.requests_per_day,
            f"the busiest hour brings {peak_pod_hour:.3g} requests to each of the "
            f"{f.pods} pod(s), above the budget of {MAX_ARRIVALS_PER_POD_HOUR:,} per pod-hour "
            "(one hour of a pod's arrivals is held in memory)",
            "split the fleet into more, smaller pods (fleet.pods, and fleet.sample_pods to "
            "simulate a few of them) or lower the rate",
            src,
        )
    if per_pod > MAX_ARRIVALS_PER_POD:
        raise ScenarioError(
            "simulation.hours",
            hours,
            f"each pod gets {per_pod:.3g} requests over the run, above the budget of "
            f"{MAX_ARRIVALS_PER_POD:,} (an overloaded pod holds every request it has not served)",
            f"simulate fewer hours (e.g. {max(1, int(hours * MAX_ARRIVALS_PER_POD / per_pod))}), "
            "or "
            "split the fleet into more, smaller pods with fleet.sample_pods",
            src,
        )
    total = per_pod * sim_pods
    if total > MAX_SIMULATED_ARRIVALS:
        raise ScenarioError(
            "fleet.sample_pods" if f.sample_pods else "simulation.hours",
            f.sample_pods or hours,
            f"{total:.3g} requests would be simulated, above the budget of "
            f"{MAX_SIMULATED_ARRIVALS:,} (about 1.5 hours of one core)",
            f"{hint_pods} with fewer pods, or simulate fewer hours",
            src,
        )
    _check_ticks_and_iterations(sc, lat, src, sim_pods, total, trace_rows)


def _check_ticks_and_iterations(
    sc: Scenario,
    lat: LatencyModel,
    src: str,
    sim_pods: int,
    total: float,
    trace_rows: int | None,
) -> None:
    """The work budget's reactive-autoscaler ticks and per-iteration engine iterations."""
    f, hours = sc.fleet, sc.simulation.hours
    a = sc.autoscaler
    if a.policy == "reactive":
        ticks = hours * HOUR_S / a.interval_s * sim_pods
        if ticks > MAX_AUTOSCALER_TICKS:
            need = hours * HOUR_S * sim_pods / MAX_AUTOSCALER_TICKS
            raise ScenarioError(
                "autoscaler.interval_s",
                a.interval_s,
                f"{ticks:.3g} autoscaler ticks over the run, above the budget of "
                f"{MAX_AUTOSCALER_TICKS:,}",
                f"a coarser interval (>= {need:.3g} s; 30 s is typical), fewer hours or "
                "fewer simulated pods",
                src,
            )
    if sc.simulation.engine == "iteration":
        t_min = lat.decode_time(1, 1)  # the shortest iteration the profile allows
        by_time = f.replicas * sim_pods * hours * HOUR_S / max(t_min, 1e-12)
        max_out = float(sc.traffic.output.max_tokens({})) if trace_rows is None else 1e9
        by_tokens = total * (1.0 + max_out)
        its = min(by_time, by_tokens)
        if its > MAX_ITERATIONS:
            raise ScenarioError(
                "simulation.engine",
                sc.simulation.engine,
                f"up to {its:.3g} engine iterations (shortest iteration {t_min:.3g} s), above "
                f"the budget of {MAX_ITERATIONS:,}",
                'use engine = "macro", fewer hours or fewer simulated pods',
                src,
            )


# shape of the diurnal curves (hourly weights, normalised to mean 1 when used)


def diurnal_weights(d: list[float] | str) -> list[float]:
    """24 hourly weights of a named shape or a list (not normalised)."""
    if isinstance(d, list):
        return [float(x) for x in d]
    if d == "flat":
        return [1.0] * 24
    if d == "azure-conv":
        # Azure 2024 conversation week (shared/REFERENCES.md): peak/mean ~1.35, peak/trough ~2,
        # peak ~14:00 UTC -> 1 + 0.35 cos(2 pi (h + 0.5 - 14.5)/24), peak/trough = 1.35/0.65.
        return [1.0 + 0.35 * math.cos(2 * math.pi * (h - 14) / 24) for h in range(24)]
    if d == "azure-code":
        # Azure 2024 coding week: peak/mean ~2.25, peak/trough ~9-11, peak ~19:00 UTC. A von Mises
        # shape exp(k cos(...)) with k = 1.15 gives peak/trough e^2.3 = 10 and peak/mean ~2.3.
        return [math.exp(1.15 * math.cos(2 * math.pi * (h - 19) / 24)) for h in range(24)]
    raise ValueError(d)


def _longest_field(tr: TrafficSection, trace_max: dict[str, int]) -> tuple[str, Any]:
    """The field that sets the longest requests (the larger of the prompt and output maxima),
    for error messages: (path, value)."""
    if tr.trace:
        return "traffic.trace", tr.trace
    longer_output = tr.output.max_tokens(trace_max) > tr.prompt.max_tokens(trace_max)
    which = "output" if longer_output else "prompt"
    d = getattr(tr, which)
    return f"traffic.{which}.{d.max_field}", getattr(d, d.max_field)


def _model_spec(sc: Scenario, src: str) -> ModelSpec:
    m = sc.model
    inline = {
        k: v
        for k, v in m.model_dump().items()
        if k not in ("name", "dtype", "kv_dtype", "config") and v is not None
    }
    required = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")
    if m.config is not None:  # a Hugging Face config.json; inline fields override it
        from fleetsim.config.hf import read_hf_config
        from fleetsim.workload.sampling import _resolve_path

        path = _resolve_path(m.config, src)
        arch = read_hf_config(path, src, m.config)
        file_dtype = arch.pop("dtype", None)
        dtype = m.dtype if "dtype" in m.model_fields_set or file_dtype is None else file_dtype
        name = m.name if "name" in m.model_fields_set else path.parent.name or path.stem
        spec = ModelSpec(name=name, dtype=dtype, kv_dtype=m.kv_dtype, **{**arch, **inline})
    elif m.name in catalog.models():
        spec = model_from_catalog(m.name, m.dtype)
        if inline or m.kv_dtype:
            spec = replace(spec, **inline, kv_dtype=m.kv_dtype)
    else:
        missing = [k for k in required if k not in inline]
        if missing:
            close = closest(m.name, catalog.models())
            hint = f"did you mean {close!r}? " if close else ""
            raise ScenarioError(
                "model.name",
                m.name,
                "not in the catalog and no inline architecture",
                f"{hint}catalog: {', '.join(catalog.models())}; or give {', '.join(missing)}",
                src,
            )
        spec = ModelSpec(name=m.name, dtype=m.dtype, kv_dtype=m.kv_dtype, **inline)
    if spec.d_model % spec.n_heads or spec.n_heads % spec.n_kv_heads:
        raise ScenarioError(
            "model.n_heads",
            spec.n_heads,
            "d_model must divide by n_heads and n_heads by n_kv_heads",
            "check the architecture",
            src,
        )
    if spec.n_active_experts > spec.n_experts:
        raise ScenarioError(
            "model.n_active_experts",
            spec.n_active_experts,
            f"more than n_experts ({spec.n_experts})",
            "lower it",
            src,
        )
    return spec


def _check_prefix_blocks(sc: Scenario, model: ModelSpec, src: str) -> None:
    """Sessions and Mooncake traces name prompt blocks that must be whole KV blocks."""
    tr = sc.traffic
    b = sc.fleet.block_size_tokens
    ses = tr.sessions
    if ses is not None:
        if ses.system_prompt_tokens >= model.max_context_tokens:
            raise ScenarioError(
                "traffic.sessions.system_prompt_tokens",
                ses.system_prompt_tokens,
                f"not shorter than {model.name}'s context of {model.max_context_tokens} tokens",
                "shorten the system prompt",
                src,
            )
        if ses.block_tokens % b:
            raise ScenarioError(
                "traffic.sessions.block_tokens",
                ses.block_tokens,
                f"not a multiple of fleet.block_size_tokens ({b})",
                f"use a multiple of {b}",
                src,
            )
    if tr.trace and tr.trace.endswith(".jsonl") and tr.trace_block_tokens % b:
        raise ScenarioError(
            "traffic.trace_block_tokens",
            tr.trace_block_tokens,
            f"not a multiple of fleet.block_size_tokens ({b})",
            f"use a multiple of {b}",
            src,
        )


def resolve(sc: Scenario, source: str = "") -> Resolved:
    """Join the scenario with the catalogs and profile, and run the cross-field checks, in the
    order a reader would: the GPU and its profile, the weights, the KV budget, the requests'
    sizes, the prefix blocks, the hourly rates, the work budget and the autoscaler."""
    if sc.disaggregation is not None:  # two pools, each resolved like a fleet (config/pools.py)
        return resolve_disaggregated(sc, source)
    src = source
    model = _model_spec(sc, src)
    gpu, profile, profile_id, sha = _resolve_gpu(sc, src)
    tp = sc.fleet.tensor_parallel
    _check_weights_fit(sc, model, profile, src)
    kvb = _checked_kv_budget(sc, model, profile, src)
    kv_tokens = kvb.tokens
    tr = sc.traffic
    max_req, trace_rows = _check_request_sizes(sc, model, kv_tokens, src)
    _check_prefix_blocks(sc, model, src)
    rates = _hourly_rates(tr, src)
    check_work(sc, rates, LatencyModel(model, profile, tp), src, trace_rows)

    # Every 24-value profile is given by UTC hour of day. The engine indexes by simulation hour
    # (h % 24), so rotate them to start at the scenario's starting hour.
    hod0 = sc.simulation.start_utc.hour
    sched = check_autoscaler(sc, src)
    return Resolved(
        scenario=sc,
        model=model,
        gpu=gpu,
        profile=profile,
        profile_id=profile_id,
        profile_sha256=sha,
        tp=tp,
        kv_capacity_tokens=kv_tokens,
        max_request_tokens=max_req,
        hourly_rate_per_s=rotate_to_start(rates, hod0),
        replicas_by_hour=None if sched is None else rotate_to_start(sched, hod0),
        kv=kvb,
    )


def _resolve_gpu(sc: Scenario, src: str) -> tuple[GpuSpec, Profile, str, str]:
    """The GPU (catalog entry plus overrides, power checked) and its step-time profile: the
    scenario's measured profile file or the catalog's analytic one; (gpu, profile, id, sha256)."""
    from fleetsim.device.profile import catalog_profile, load_profile

    hw = sc.hardware
    try:
        entry = catalog.gpu(hw.gpu)
    except ScenarioError as exc:
        raise ScenarioError(exc.field, exc.value, exc.problem, exc.fix, src) from None
    over = {
        k: v for k, v in hw.model_dump().items() if k not in ("gpu", "profile") and v is not None
    }
    entry.update(over)
    power = PowerSpec(
        idle_w=entry["idle_w"],
        max_w=entry["tdp_w"],
        active_w=entry["active_w"],
        compute_w=entry["compute_w"],
        memory_w=entry["memory_w"],
    )
    from fleetsim.device.profile import power_problem

    bad = power_problem(power)  # idle <= TDP, busy <= MAX_BUSY_OVER_TDP x TDP (device/profile.py)
    if bad is not None:
        fld = {"max_w": "tdp_w"}.get(bad[0], bad[0])
        raise ScenarioError(
            f"hardware.{fld}",
            bad[1],
            bad[2],
            "check the hardware power fields (watts per GPU) against the GPU's TDP",
            src,
        )
    sha = ""
    if hw.profile:
        ppath = Path(hw.profile)
        if not ppath.is_absolute() and src:
            cand = Path(src).parent / ppath
            ppath = cand if cand.exists() or not ppath.exists() else ppath
        ppath = Path(os.path.abspath(ppath))  # errors show where the file was looked for
        profile, sha = load_profile(ppath)
        cat_gpu = profile.meta.get("catalog_gpu")
        if cat_gpu and cat_gpu != hw.gpu:
            raise ScenarioError(
                "hardware.profile",
                hw.profile,
                f"was measured on {cat_gpu!r} but hardware.gpu is {hw.gpu!r}",
                f"set hardware.gpu = {cat_gpu!r} or use a profile of {hw.gpu}",
                src,
            )
        if profile.power is not None:
            power = profile.power
        profile_id = f"{profile.name} ({ppath.name})"
    else:
        profile = catalog_profile(hw.gpu, entry, power)
        profile_id = profile.name
    gpu = GpuSpec(
        name=hw.gpu,
        tdp_w=entry["tdp_w"],
        idle_w=power.idle_w,
        node_overhead_w=entry["node_overhead_w"],
        gpus_per_node=entry["gpus_per_node"],
        capex_usd=entry["capex_usd"],
        rent_usd_per_gpu_hour=entry["rent_usd_per_gpu_hour"],
        power=power,
    )

    return gpu, profile, profile_id, sha


def _check_weights_fit(sc: Scenario, model: ModelSpec, profile: Profile, src: str) -> None:
    """vLLM's tensor-parallel rule, and the weights fit in a replica's usable memory."""
    tp = sc.fleet.tensor_parallel
    tp_problem = model.tp_problem(tp)
    if tp_problem:
        raise ScenarioError("fleet.tensor_parallel", tp, tp_problem, model.tp_fix(tp), src)
    usable = tp * profile.mem_bytes * sc.fleet.gpu_memory_utilization
    if model.weight_bytes >= usable:
        per_gpu = profile.mem_bytes * sc.fleet.gpu_memory_utilization
        # the smallest degree that holds the weights and that vLLM accepts (it divides the
        # attention heads)
        fits = [
            k
            for k in range(tp + 1, 65)
            if model.n_heads % k == 0 and model.weight_bytes < k * per_gpu
        ]
        tp_fix = (
            f"set fleet.tensor_parallel = {fits[0]} (the smallest degree that holds the weights "
            f"and divides the {model.n_heads} attention heads), a larger GPU, or a smaller dtype"
            if fits
            else "no tensor-parallel degree up to 64 that divides the attention heads holds "
            "the weights: use a larger GPU, a smaller dtype or a higher "
            "fleet.gpu_memory_utilization"
        )
        raise ScenarioError(
            "fleet.tensor_parallel",
            tp,
            f"{model.name} weights need {model.weight_bytes / 1e9:.1f} GB but a replica has "
            f"{usable / 1e9:.1f} GB usable ({tp} x {profile.mem_bytes / 1e9:.0f} GB x "
            f"{sc.fleet.gpu_memory_utilization}); "
            f"{(model.weight_bytes - usable) / 1e9:.1f} GB missing",
            tp_fix,
            src,
        )


def _checked_kv_budget(sc: Scenario, model: ModelSpec, profile: Profile, src: str) -> KvBudget:
    """The replica's KV budget; an error when nothing is left for it."""
    usable = sc.fleet.tensor_parallel * profile.mem_bytes * sc.fleet.gpu_memory_utilization
    kvb = kv_budget(sc, model, profile.mem_bytes)
    kv_tokens = kvb.tokens
    if kv_tokens <= 0:
        raise ScenarioError(
            "fleet.gpu_memory_utilization",
            sc.fleet.gpu_memory_utilization,
            f"no memory left for the KV cache: {usable / 1e9:.1f} GB usable - "
            f"{model.weight_bytes / 1e9:.1f} GB weights - {kvb.activation_bytes / 1e9:.2f} GB "
            f"activation reserve (fleet.max_batched_tokens = {sc.fleet.max_batched_tokens})",
            "raise it, raise fleet.tensor_parallel, or lower fleet.max_batched_tokens",
            src,
        )
    return kvb


def _check_request_sizes(
    sc: Scenario, model: ModelSpec, kv_tokens: int, src: str
) -> tuple[int, int | None]:
    """The longest request fits the KV budget and the context, and the longest prompt can be
    scheduled; (the longest request in tokens, the trace's row count or None)."""
    from fleetsim.workload.sampling import trace_columns_max

    tr = sc.traffic
    trace_max: dict[str, int] = {}
    for d in (tr.prompt, tr.output):
        if isinstance(d, Empirical):
            trace_max.update(trace_columns_max(d.file, src))
            if d.column not in trace_max:  # (checked here, before anything is simulated)
                from fleetsim.workload.sampling import _trace_column

                _trace_column(d, src)
    max_req = tr.prompt.max_tokens(trace_max) + tr.output.max_tokens(trace_max)
    pmax = tr.prompt.max_tokens(trace_max)
    trace_rows: int | None = None
    if tr.trace:  # a timed trace replaces the size distributions: check its own requests
        from fleetsim.workload.sampling import _resolve_path, read_arrival_trace

        _, tp_, to_ = read_arrival_trace(str(_resolve_path(tr.trace, src)))
        trace_rows = len(tp_)
        max_req, pmax = int((tp_ + to_).max()), int(tp_.max())
    big_field, big_value = _longest_field(tr, trace_max)
    if max_req > kv_tokens:
        raise ScenarioError(
            big_field,
            big_value,
            f"a maximum-length request ({max_req} tokens) exceeds the KV budget of a replica "
            f"({kv_tokens} tokens)",
            "lower the prompt/output maximum, raise fleet.tensor_parallel or "
            "fleet.gpu_memory_utilization",
            src,
        )
    if max_req > model.max_context_tokens:
        raise ScenarioError(
            big_field,
            big_value,
            f"prompt + output ({max_req} tokens) exceeds {model.name}'s context of "
            f"{model.max_context_tokens} tokens",
            "lower the maxima",
            src,
        )
    if pmax > sc.fleet.max_batched_tokens and not sc.fleet.chunked_prefill:
        raise ScenarioError(
            "fleet.max_batched_tokens",
            sc.fleet.max_batched_tokens,
            f"smaller than the longest prompt ({pmax} tokens); such prompts could "
            "never be scheduled",
            f"set it >= {pmax}, or fleet.enable_chunked_prefill = true",
            src,
        )
    return max_req, trace_rows


def _hourly_rates(tr: TrafficSection, src: str) -> tuple[float, ...]:
    """The fleet's arrival rate (1/s) by UTC hour of day, from requests_per_day and the diurnal
    curve."""
    w = diurnal_weights(tr.diurnal)
    w = [x / max(w) for x in w]  # (scaled to a peak of 1 first: 24 huge weights must not overflow)
    mean_w = sum(w) / 24.0
    base = tr.requests_per_day / DAY_S
    rates = tuple(base * x / mean_w for x in w)
    if not all(math.isfinite(r) for r in rates):
        raise ScenarioError(
            "traffic.requests_per_day",
            tr.requests_per_day,
            "rate is not finite",
            "use a finite rate",
            src,
        )
    return rates


def resolved_dict(rs: Resolved) -> dict:
    """The scenario as the run uses it: every ``[model]`` and ``[hardware]`` field resolved from
    the catalog, the profile and the overrides (none left null), and a ``derived`` table with
    the figures computed from them (parameter count, weights, KV budget)."""
    d = rs.scenario.model_dump(mode="json")
    m = rs.model
    for k in d["model"]:
        if k != "config" and hasattr(m, k):
            d["model"][k] = getattr(m, k)
    d["model"]["kv_dtype"] = m.kv_dtype_resolved  # what the KV budget uses (not the weights')
    g, pw, prof = rs.gpu, rs.gpu.power, rs.profile
    hw = d["hardware"]
    hw.update(
        tdp_w=g.tdp_w,
        idle_w=pw.idle_w,
        active_w=pw.active_w,
        compute_w=pw.compute_w,
        memory_w=pw.memory_w,
        node_overhead_w=g.node_overhead_w,
        gpus_per_node=g.gpus_per_node,
        capex_usd=g.capex_usd,
        rent_usd_per_gpu_hour=g.rent_usd_per_gpu_hour,
        peak_flops=getattr(prof, "peak_flops", None),
        mem_bw_bytes_per_s=getattr(prof, "mem_bw_bytes_per_s", None),
        mem_bytes=getattr(prof, "mem_bytes", None),
    )

    def whole(v: float) -> int:  # byte counts are printed as integers (not 159131264614.40002)
        return round(v)

    kv = None
    if rs.kv is not None:
        kv = {k: whole(v) if k.endswith("_bytes") else v for k, v in asdict(rs.kv).items()}
        kv["bytes_per_token"] = whole(rs.kv.bytes_per_token)
    d["derived"] = {
        "total_params": m.total_params,
        "active_params_per_token": m.active_params_per_token,
        "weight_bytes": whole(m.weight_bytes),
        "kv_dtype": m.kv_dtype_resolved,
        "kv_bytes_per_token": whole(m.kv_bytes_per_token),
        "kv_capacity_tokens_per_replica": rs.kv_capacity_tokens,
        "kv_budget": kv,
        "max_request_tokens": rs.max_request_tokens,
        "gpus": rs.scenario.fleet.pods * rs.scenario.fleet.replicas * rs.tp,
        "profile": rs.profile_id,
        "profile_sha256": rs.profile_sha256 or None,
    }
    return d


def scenario_json_schema() -> dict:
    """The scenario file's JSON Schema (draft 2020-12), with the names the documentation uses.
    Aliases a section accepts (``fleet.max_num_seqs``...) are listed as properties too, each
    pointing at its field, so that editors complete and check them."""
    schema = json.loads(
        json.dumps(Scenario.model_json_schema(mode="validation")).replace("``", "`")
    )  # (docstrings' RST literals as the single backticks editors show as code)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fleetsim scenario"
    defs = schema.get("$defs", {})
    for name, f in Scenario.model_fields.items():
        aliases = getattr(f.annotation, "ALIASES", {})
        sec = defs.get(getattr(f.annotation, "__name__", ""), {})
        props = sec.get("properties", {})
        for alias, field in aliases.items():
            if field in props:
                props[alias] = {
                    **props[field],
                    "description": f"another name of {name}.{field} (give one of them)",
                }
    return schema


# ---------------------------------------------------------------------------------------------
# disaggregated fleets (the dataclasses and the rules are described in config/pools.py)
def _pool_scenario(sc: Scenario, name: str, *, bmt_override: int | None = None) -> Scenario:
    """The scenario as an aggregated fleet of pool ``name`` (no validation needed: every field
    comes from an already validated section)."""
    d = sc.disaggregation
    assert d is not None
    p = getattr(d, name)
    f = sc.fleet
    upd = {
        "replicas": p.replicas,
        "tensor_parallel": p.tensor_parallel
        if p.tensor_parallel is not None
        else f.tensor_parallel,
        "max_batch_size": p.max_batch_size if p.max_batch_size is not None else f.max_batch_size,
        "max_batched_tokens": (
            p.max_batched_tokens if p.max_batched_tokens is not None else f.max_batched_tokens
        ),
        "gpu_memory_utilization": (
            p.gpu_memory_utilization
            if p.gpu_memory_utilization is not None
            else f.gpu_memory_utilization
        ),
        "router": p.router if p.router is not None else f.router,
    }
    if f.kv_allocation == "paged":
        # the paged engine (serving/paged.py PrefillReplica, DecodeReplica): the prefill pool
        # prefills with [fleet]'s chunking and prefix caching; the decode pool recomputes a
        # preempted request by chunks and keeps no prefix cache (decode-side prefix reuse is
        # not modelled: docs/model.md)
        if name == "decode":
            upd["enable_chunked_prefill"] = True
            upd["enable_prefix_caching"] = False
    else:
        # the first engine (KV reserved at admission, whole prefills) with its KV budget,
        # without the activation reserve of kv_budget() unless one is given (the decode pool's
        # token budget below is a placeholder, not a size)
        upd["enable_chunked_prefill"] = False
        upd["enable_prefix_caching"] = False
        upd["activation_reserve_bytes"] = (
            f.activation_reserve_bytes if f.activation_reserve_bytes is not None else 0.0
        )
    if bmt_override is not None:
        upd["max_batched_tokens"] = bmt_override
    gpu = p.gpu if p.gpu is not None else sc.hardware.gpu
    hw = sc.hardware if gpu == sc.hardware.gpu else HardwareSection(gpu=gpu)
    if p.autoscaler == "schedule":
        if p.replicas_by_hour is None:
            raise ScenarioError(
                f"disaggregation.{name}.replicas_by_hour",
                None,
                "the schedule autoscaler of a pool needs 24 replica counts (each >= 1: a pool "
                "always keeps one replica up)",
                f"give disaggregation.{name}.replicas_by_hour = [24 integers >= 1]",
            )
        scaler = sc.autoscaler.model_copy(
            update={"policy": "schedule", "replicas_by_hour": p.replicas_by_hour}
        )
    elif p.autoscaler == "reactive":
        a = sc.autoscaler
        scaler = a.model_copy(
            update={
                "policy": "reactive",
                "min_replicas": p.min_replicas,
                "max_replicas": p.replicas,
                "initial_replicas": p.initial_replicas,
                "target_requests_per_replica": (
                    p.target_requests_per_replica
                    if p.target_requests_per_replica is not None
                    else a.target_requests_per_replica
                ),
            }
        )
    else:
        scaler = sc.autoscaler.model_copy(update={"policy": "static"})
    traffic = sc.traffic
    if name == "prefill" and traffic.trace is None:
        # the prefill pool holds a prompt and its first token (out = 1), never the output
        traffic = traffic.model_copy(update={"output": Fixed(dist="fixed", value=1)})
    return sc.model_copy(
        update={
            "fleet": f.model_copy(update=upd),
            "hardware": hw,
            "traffic": traffic,
            "autoscaler": scaler,
            "disaggregation": None,
        }
    )


_FLEET_FIELDS = (
    "replicas",
    "tensor_parallel",
    "max_batch_size",
    "max_batched_tokens",
    "gpu_memory_utilization",
    "router",
)


def _renamed(exc: ScenarioError, name: str, src: str) -> ScenarioError:
    """The pool's own field names in an error found through the pool's [fleet]/[hardware]."""
    pre = f"disaggregation.{name}."
    field = exc.field
    for k in _FLEET_FIELDS:
        if field == f"fleet.{k}":
            field = pre + k
    if field == "hardware.gpu":
        field = pre + "gpu"
    if field == "autoscaler.replicas_by_hour":
        field = pre + "replicas_by_hour"
    for k in ("min_replicas", "initial_replicas", "max_replicas"):
        if field == f"autoscaler.{k}":
            field = pre + (k if k != "max_replicas" else "replicas")
    fix = exc.fix
    for k in _FLEET_FIELDS:
        fix = fix.replace(f"fleet.{k}", pre + k)
    problem = exc.problem if field.startswith(pre) else f"{exc.problem} in the {name} pool"
    return ScenarioError(field, exc.value, problem, fix, src)


def _resolve_pool(sc: Scenario, name: str, src: str) -> tuple[Resolved, Scenario]:
    try:
        psc = _pool_scenario(sc, name)
    except ScenarioError as exc:
        raise ScenarioError(exc.field, exc.value, exc.problem, exc.fix, src) from None
    try:
        return resolve(psc, src), psc
    except ScenarioError as exc:
        if name == "decode" and exc.field == "fleet.max_batched_tokens":
            # a decode replica never prefills (one token per sequence per iteration): the
            # longest-prompt check of max_batched_tokens does not apply to it
            psc2 = _pool_scenario(sc, name, bmt_override=1_000_000_000)
            try:
                rs = resolve(psc2, src)
            except ScenarioError as exc2:
                raise _renamed(exc2, name, src) from None
            return rs, psc
        raise _renamed(exc, name, src) from None


def resolve_disaggregated(sc: Scenario, source: str = "") -> Resolved:
    """Resolve both pools and the link; the returned :class:`Resolved` describes the decode
    pool in its aggregate fields (gpu, tp, kv budget) and carries both in ``pools``."""
    d = sc.disaggregation
    assert d is not None
    if sc.autoscaler.policy != "static":
        raise ScenarioError(
            "autoscaler.policy",
            sc.autoscaler.policy,
            "with [disaggregation] each pool has its own autoscaler; the fleet-wide one must be "
            "static",
            "set autoscaler.policy = 'static' and e.g. disaggregation.decode.autoscaler = "
            "'schedule' with disaggregation.decode.replicas_by_hour",
            source,
        )
    dr = d.decode.router if d.decode.router is not None else sc.fleet.router
    if dr in ("central_queue", "prefix_affinity"):
        why = (
            "a central queue: a request's KV is sent to one decode replica, chosen when its "
            "prefill ends"
            if dr == "central_queue"
            else "prefix_affinity: decode replicas keep no prefix cache (not modelled)"
        )
        raise ScenarioError(
            "disaggregation.decode.router",
            dr,
            f"the decode pool cannot use {why}",
            "use least_loaded, round_robin or random for the decode pool",
            source,
        )
    if sc.traffic.sessions is not None:
        raise ScenarioError(
            "traffic.sessions",
            "(a table)",
            "multi-turn sessions are not simulated on a disaggregated fleet",
            "remove [traffic.sessions] or [disaggregation]",
            source,
        )
    try:
        entry = catalog.link(d.link)
    except ScenarioError as exc:
        raise ScenarioError(exc.field, exc.value, exc.problem, exc.fix, source) from None
    link = LinkSpec(
        name=d.link,
        bandwidth_bytes_per_s=float(
            d.link_bandwidth_bytes_per_s
            if d.link_bandwidth_bytes_per_s is not None
            else entry["bandwidth_bytes_per_s"]
        ),
        latency_s=float(d.link_latency_s if d.link_latency_s is not None else entry["latency_s"]),
    )
    specs = {}
    rs_dec = None
    for name in POOLS:
        rs, psc = _resolve_pool(sc, name, source)
        specs[name] = PoolSpec(
            name=name,
            rs=rs,
            replicas=psc.fleet.replicas,
            max_batch=psc.fleet.max_batch_size,
            max_tokens=psc.fleet.max_batched_tokens,
            router=psc.fleet.router,
        )
        if name == "decode":
            rs_dec = rs
    assert rs_dec is not None
    pools = Pools(
        prefill=specs["prefill"],
        decode=specs["decode"],
        link=link,
        kv_bytes_per_token=float(rs_dec.model.kv_bytes_per_token),
    )
    return replace(rs_dec, scenario=sc, pools=pools)


def hourly_values(v: float | list[float] | None, hours: int) -> list[float] | None:
    """A flat value or a 24-value daily profile, expanded to ``hours`` hours."""
    if v is None:
        return None
    if isinstance(v, list):
        return [float(v[h % 24]) for h in range(hours)]
    return [float(v)] * hours


# ---------------------------------------------------------------------------------------------
# validation (called by scenario.resolve)
def load_schedule_file(path: str, source: str) -> dict:
    """The JSON schedule ``{"gpu", "tensor_parallel", "replicas_by_hour": [24 ints]}``;
    a relative path resolves against the scenario file's folder."""
    from fleetsim.base import io

    p = Path(path)
    if not p.is_absolute() and source:
        cand = Path(source).parent / p
        p = cand if cand.exists() else p
    if not p.exists():
        raise ScenarioError(
            "autoscaler.schedule_file",
            path,
            "no such file",
            "give the path of a schedule JSON (relative to the scenario file)",
            source,
        )
    data, _ = io.load_json(p, "autoscaler.schedule_file")
    r = data.get("replicas_by_hour") if isinstance(data, dict) else None
    if not (
        isinstance(r, list)
        and len(r) == 24
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r)
    ):
        raise ScenarioError(
            "autoscaler.schedule_file",
            path,
            "has no 'replicas_by_hour' list of 24 non-negative integers",
            'use {"gpu": ..., "tensor_parallel": ..., "replicas_by_hour": [...]}',
            source,
        )
    return data


def check_autoscaler(sc: Scenario, source: str = "") -> tuple[int, ...] | None:
    """Cross-field checks of ``[autoscaler]``; the schedule's 24 replica counts (or None)."""
    a = sc.autoscaler
    n = sc.fleet.replicas
    if a.policy == "schedule":
        if (a.replicas_by_hour is None) == (a.schedule_file is None):
            raise ScenarioError(
                "autoscaler.replicas_by_hour",
                a.replicas_by_hour,
                "the schedule policy needs exactly one of replicas_by_hour and schedule_file",
                "give one of them",
                source,
            )
        if a.schedule_file is not None:
            data = load_schedule_file(a.schedule_file, source)
            for key, mine in (
                ("gpu", sc.hardware.gpu),
                ("tensor_parallel", sc.fleet.tensor_parallel),
            ):
                if key in data and data[key] != mine:
                    raise ScenarioError(
                        "autoscaler.schedule_file",
                        a.schedule_file,
                        f"was planned for {key} {data[key]!r} but the scenario has {mine!r}",
                        f"set {key} to {data[key]!r} or re-plan",
                        source,
                    )
            sched = tuple(int(x) for x in data["replicas_by_hour"])
        else:
            assert a.replicas_by_hour is not None  # exactly one of the two (checked above)
            sched = tuple(a.replicas_by_hour)
        if max(sched) > n:
            raise ScenarioError(
                "autoscaler.replicas_by_hour",
                max(sched),
                f"more replicas than a pod has (fleet.replicas = {n})",
                f"set fleet.replicas >= {max(sched)}",
                source,
            )
        return sched
    if a.policy == "reactive":
        hi = a.max_replicas if a.max_replicas is not None else n
        if hi > n:
            raise ScenarioError(
                "autoscaler.max_replicas",
                hi,
                f"more than the pod's replicas (fleet.replicas = {n})",
                f"set it <= {n} or raise fleet.replicas",
                source,
            )
        if a.min_replicas > hi:
            raise ScenarioError(
                "autoscaler.min_replicas",
                a.min_replicas,
                f"above max_replicas ({hi})",
                f"set it <= {hi}",
                source,
            )
        if a.initial_replicas is not None and not a.min_replicas <= a.initial_replicas <= hi:
            raise ScenarioError(
                "autoscaler.initial_replicas",
                a.initial_replicas,
                f"outside [min_replicas, max_replicas] = [{a.min_replicas}, {hi}]",
                "choose a value in that range",
                source,
            )
    return None


__all__ = [
    "DTYPE_BYTES",
    "GpuSpec",
    "KvBudget",
    "Resolved",
    "Scenario",
    "activation_reserve_bytes",
    "apply_overrides",
    "canonical_keys",
    "diurnal_weights",
    "hourly_values",
    "kv_budget",
    "load_scenario",
    "parse_override",
    "resolve",
    "resolved_dict",
    "scenario_from_dict",
    "scenario_json_schema",
    "toml_value",
]
