"""What resolution produces: :class:`Resolved` (a scenario joined with its catalogs, what the
engine and the accounting consume), its :class:`GpuSpec` and :class:`KvBudget`, the KV budget
formula (:func:`kv_budget`, :func:`activation_reserve_bytes`), and :func:`resolved_dict`, the
resolved scenario as a table (``fleetsim validate --resolved``).

The resolution itself is :func:`fleetsim.config.resolve.resolve`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fleetsim.config.schema import Scenario
from fleetsim.device.latency import LatencyModel, PowerSpec, Profile
from fleetsim.device.modelspec import ModelSpec


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


def resolved_dict(rs: Resolved) -> dict:
    """The scenario as the run uses it: every ``[model]`` and ``[hardware]`` field resolved from
    the catalog, the profile and the overrides (none left null), and a ``derived`` table with
    the figures computed from them (parameter count, weights, KV budget)."""
    d = rs.scenario.model_dump(mode="json")
    m = rs.model
    for k in d["model"]:
        if k != "config" and hasattr(m, k):
            d["model"][k] = getattr(m, k)
    d["model"]["kv_dtype"] = m.kv_dtype or m.dtype
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
    d["derived"] = {
        "total_params": m.total_params,
        "active_params_per_token": m.active_params_per_token,
        "weight_bytes": m.weight_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "kv_capacity_tokens_per_replica": rs.kv_capacity_tokens,
        "kv_budget": None if rs.kv is None else asdict(rs.kv),
        "max_request_tokens": rs.max_request_tokens,
        "gpus": rs.scenario.fleet.pods * rs.scenario.fleet.replicas * rs.tp,
        "profile": rs.profile_id,
        "profile_sha256": rs.profile_sha256 or None,
    }
    return d


__all__ = [
    "GpuSpec",
    "KvBudget",
    "Resolved",
    "activation_reserve_bytes",
    "kv_budget",
    "resolved_dict",
]
