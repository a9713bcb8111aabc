"""What resolution produces: :class:`Resolved` (a scenario joined with its catalogs, what the
engine and the accounting consume), its :class:`GpuSpec` and :class:`KvBudget`, the KV budget
formula (:func:`kv_budget`, :func:`activation_reserve_bytes`), and :func:`resolved_dict`, the
resolved scenario as a table (``fleetsim validate --resolved``).

The resolution itself is :func:`fleetsim.config.resolve.resolve`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fleetsim.config.schema import Scenario
from fleetsim.device.latency import LatencyModel, PowerSpec, Profile
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.moe import replica_weight_bytes

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class GpuSpec:
    """A GPU as the cost and power layers see it (catalog entry plus overrides)."""

    name: str
    tdp_w: float
    idle_w: float
    node_overhead_w: float  # the node's host while its GPUs serve
    gpus_per_node: int
    capex_usd: float
    rent_usd_per_gpu_hour: float
    power: PowerSpec
    node_idle_w: float = 0.0  # the node's host while powered with no request in flight

    @property
    def overhead_w_per_gpu(self) -> float:
        """Host power per GPU while serving."""
        return self.node_overhead_w / self.gpus_per_node

    @property
    def host_idle_w_per_gpu(self) -> float:
        """Host power per GPU while powered and idle."""
        return self.node_idle_w / self.gpus_per_node


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
    #: blocks x block size (paged) or whole tokens (reserve): for a model with sliding-window or
    #: linear-state layers these are tokens at ``bytes_per_token``, that of the traffic's typical
    #: sequences over their time in flight (:func:`typical_kv_bytes_per_token`), an estimate of
    #: how many tokens of such sequences the cache holds (what the capacity estimates divide);
    #: the engine counts such a model exactly: paged in layer-blocks (``layer_blocks``,
    #: ``state_blocks``), a hybrid under reserve in ``attn_tokens`` and ``state_tokens``
    tokens: int
    #: the longest single request (prompt + output) the cache holds, what the engine itself
    #: admits: ``tokens``; for a windowed or hybrid model under paged KV its layer-blocks
    #: counted per layer kind (:meth:`ModelSpec.max_tokens_in_layer_blocks`), less a hybrid's
    #: constant state (``state_blocks``); for a hybrid under reserve ``attn_tokens`` less
    #: ``state_tokens``
    request_tokens: int
    #: paged KV of a windowed or hybrid model: the pool in layer-blocks (``block_size_tokens``
    #: tokens of one attention layer, summed over the GPUs; serving/kv_paged.py), else 0
    layer_blocks: int = 0
    #: a hybrid's linear-state state per sequence, in those layer-blocks
    #: (:meth:`ModelSpec.state_layer_blocks`), else 0
    state_blocks: int = 0
    #: reserve KV of a hybrid: the cache in tokens of its attention layers (the bytes of one
    #: token in every attention layer), and a sequence's constant state in those tokens
    #: (rounded up), what a request reserves beside its prompt + output; else 0
    attn_tokens: int = 0
    state_tokens: int = 0


def activation_reserve_bytes(model: ModelSpec, tp: int, max_tokens: int, max_seqs: int) -> float:
    """Peak activation memory of one GPU of a ``tp``-way replica, estimated analytically.

    vLLM sizes the KV cache as ``gpu_memory_utilization x total - (weights + peak activations +
    non-torch memory)``, measuring the peak with a profiling forward pass of
    ``max_num_batched_tokens`` tokens and then a dummy sampler run of ``max_num_seqs`` sequences
    (vllm/v1/worker/gpu_worker.py ``Worker.determine_available_memory``, ``profile_run``). The
    peak is PyTorch's peak of live tensors, so it is the larger of the two passes, not their
    sum: the forward pass's intermediates are freed before the sampler runs. We estimate it
    instead of profiling: the forward pass in 16-bit activations holds the MLP's intermediate
    (gate, up and their product: 3 x d_ff / tp per token) plus four d_model-wide buffers
    (residual, normed input, attention output, MLP output) per token; the sampler pass holds the
    fp32 logits, ``max_seqs x vocab x 4`` bytes, beside the forward pass's output (one d_model-wide
    16-bit buffer per token):

        reserve = max(2 B x T x (3 d_ff / tp + 4 d_model),
                      2 B x T x d_model + 4 B x max_seqs x vocab)

    (for a mixture of experts, d_ff is an expert's width times the active experts). vLLM 0.11
    captures its CUDA graphs after sizing the KV cache, out of the ``1 - gpu_memory_utilization``
    headroom, so graph memory is not subtracted (later versions subtract an estimate when
    ``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS`` is set). The ``fleet.activation_reserve_bytes``
    field replaces the estimate with a measured value."""
    d_ff = max(
        model.d_ff if model.n_dense_layers else 0,  # a dense layer's MLP
        model.n_active_experts * model.d_ff_expert + model.n_shared_experts * model.d_ff_shared
        if model.n_moe_layers
        else 0,  # an MoE layer's routed and shared experts
    )
    forward = 2.0 * max_tokens * (3.0 * d_ff / tp + 4.0 * model.d_model)
    sampler = 2.0 * max_tokens * model.d_model + 4.0 * max_seqs * model.vocab_size
    return max(forward, sampler)


def sizes_from_file(sc: Scenario) -> bool:
    """Whether the traffic's request sizes come from a file (a trace or an empirical column):
    :func:`typical_sizes` then takes the trace's own requests or draws the column."""
    from fleetsim.workload.distributions import Empirical

    tr = sc.traffic
    return bool(tr.trace) or isinstance(tr.prompt, Empirical) or isinstance(tr.output, Empirical)


def typical_sizes(sc: Scenario, n: int = 4096, source: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output tokens of the traffic's typical requests: a timed trace's own requests
    (``traffic.trace``, every one, as :func:`fleetsim.results.capacity.size_draws` reads them),
    else ``n`` draws of its size distributions, an empirical column's included (jointly when
    both columns are of one file, as the run samples them: ``SizeSampler``), on a fixed
    SeedSequence stream, so that the budget depends neither on the run's seed nor on anything
    but the scenario. ``source``: the scenario file, what a file's path is relative to
    (default: the file the scenario was loaded from, if any)."""
    import numpy as np

    from fleetsim.workload.sampling import SizeSampler, _resolve_path, read_arrival_trace

    tr = sc.traffic
    source = source or sc._source
    if tr.trace:
        _, p, o = read_arrival_trace(str(_resolve_path(tr.trace, source)))
        return np.asarray(p, dtype=float), np.asarray(o, dtype=float)
    rng = np.random.default_rng(np.random.SeedSequence(0x4B56))  # "KV"
    # (for two analytic distributions the same draws as prompt.draw then output.draw)
    p, o = SizeSampler(tr.prompt, tr.output, source).draw(n, rng)
    return np.asarray(p, dtype=float), np.asarray(o, dtype=float)


def typical_kv_bytes_per_token(sc: Scenario, model: ModelSpec, tp: int, source: str = "") -> float:
    """The KV bytes per token of a replica holding the traffic's typical sequences
    (:func:`typical_sizes`: drawn, or a trace's own), each weighted by its time in flight: the
    bytes they hold summed over their iterations over the tokens they hold summed likewise
    (:meth:`ModelSpec.kv_bytes_per_token_held_tp`; the sums are
    :func:`fleetsim.workload.inflight.token_iterations`', under the fleet's chunked prefill and
    KV allocation), so that ``kv bytes / this`` is the budget in the tokens that the capacity
    estimate's KV per running sequence (results/capacity.py, weighted the same way) divides. A
    window layer holds ``min(L, W)`` of a context ``L``, so a sequence whose life crosses ``W``
    holds less there than its mid-life context would say, and a long output holds its KV
    longer. :meth:`ModelSpec.kv_bytes_per_token_tp` (every token in every layer) for a model
    whose KV is proportional to its context, and under the reserve policy with sizes from a
    file: that engine admits a window model's request against this budget in tokens, so the
    longest request a trace may hold would otherwise depend on the trace's other requests (a
    paged engine counts window models exactly, in layer-blocks)."""
    if model.kv_uniform:
        return model.kv_bytes_per_token_tp(tp)
    if sc.fleet.kv_allocation == "reserve" and sizes_from_file(sc):
        return model.kv_bytes_per_token_tp(tp)
    sizes = typical_sizes(sc, source=source)
    from fleetsim.workload.inflight import token_iterations

    f = sc.fleet
    chunk = f.prompt_token_budget if f.chunked_prefill else None
    reserve = f.kv_allocation == "reserve"
    held, iters = token_iterations(*sizes, chunk, reserve)
    w = model.sliding_window_tokens if model.n_sliding_layers else None
    win = held if w is None else token_iterations(*sizes, chunk, reserve, window=w)[0]
    return model.kv_bytes_per_token_held_tp(
        tp, float(held.mean()), float(win.mean()), float(iters.mean())
    )


def kv_budget(sc: Scenario, model: ModelSpec, mem_bytes: float, source: str = "") -> KvBudget:
    """KV budget of a replica = gpu_memory_utilization x memory - weights - activation reserve.

    Paged: whole blocks of ``block_size_tokens``; reserve (the first engine): whole tokens.
    ``source``: the scenario file (a trace's or a sizes column's path is relative to it: the
    sizes :func:`typical_kv_bytes_per_token` weighs a window or hybrid model's tokens at)."""
    f = sc.fleet
    tp = f.tensor_parallel
    dp = f.data_parallel
    gpus = tp * dp  # a data-parallel replica: dp engines of tp GPUs
    mem = gpus * mem_bytes
    usable = mem * f.gpu_memory_utilization
    act_gpu = (
        # each data-parallel engine runs its share of the replica's batch
        activation_reserve_bytes(
            model, tp, -(-f.max_batched_tokens // dp), -(-f.max_batch_size // dp)
        )
        if f.activation_reserve_bytes is None
        else f.activation_reserve_bytes
    )
    act = gpus * act_gpu
    weights = replica_weight_bytes(model, dp, tp)
    kv = usable - weights - act
    # KV heads replicated when tp exceeds them; a model with sliding-window or linear-state
    # layers holds less than its context: its bytes per token are those of the traffic's
    # typical sequences over their time in flight (typical_kv_bytes_per_token)
    bpt = typical_kv_bytes_per_token(sc, model, tp, source)
    b = f.block_size_tokens
    if f.kv_allocation == "paged":
        blocks = max(0, int(kv // (bpt * b)))
        tokens = blocks * b
    else:
        tokens = max(0, int(kv // bpt))
        blocks = tokens // b
    longest = tokens
    # every data-parallel rank's engine core its own cache (serving/ranks.py): a request is
    # served from one rank's blocks // dp (= floor(kv / dp / (bpt b)))
    ranks = dp if dp > 1 and f.dp_scheduler == f.dp_kv_pool == "per-rank" else 1
    if f.kv_allocation == "paged" and ranks > 1:
        longest = blocks // ranks * b
    layer_blocks = state_blocks = attn_tokens = state_tokens = 0
    hybrid = model.n_linear_layers > 0
    if f.kv_allocation == "paged" and (model.n_sliding_layers or hybrid):
        # the paged policy's pool in layer-blocks (serving/pod.py paged_limits): a sequence
        # holds its attention layers' blocks per layer kind plus its constant state
        layer_block_bytes = b * model.kv_bytes_per_token_tp(tp) / model.n_attn_layers
        layer_blocks = max(0, int(kv // layer_block_bytes))
        state_blocks = model.state_layer_blocks(b, tp)
        longest = model.max_tokens_in_layer_blocks(max(0, layer_blocks // ranks - state_blocks), b)
    elif hybrid:
        # reserve: a request reserves its whole prompt + output in every attention layer and
        # its constant state, counted in tokens of the attention layers
        attn_bpt = model.kv_bytes_per_token_tp(tp)
        attn_tokens = max(0, int(kv // attn_bpt))
        state_tokens = int(-(-model.state_bytes_per_seq_tp(tp) // attn_bpt))
        longest = max(0, attn_tokens - state_tokens)
    return KvBudget(
        mem,
        usable,
        weights,
        act,
        kv,
        bpt,
        b,
        blocks,
        tokens,
        longest,
        layer_blocks,
        state_blocks,
        attn_tokens,
        state_tokens,
    )


@dataclass(frozen=True)
class Resolved:
    """A scenario joined with its catalogs: what the engine and the accounting consume."""

    scenario: Scenario
    model: ModelSpec
    gpu: GpuSpec
    profile: Profile
    profile_id: str
    profile_sha256: str
    #: GPUs per replica: fleet.tensor_parallel x fleet.data_parallel
    tp: int
    kv_capacity_tokens: int
    max_request_tokens: int
    hourly_rate_per_s: tuple[float, ...]  # whole fleet, by simulation hour % 24 (see resolve)
    replicas_by_hour: tuple[int, ...] | None = None  # autoscaler schedule, by simulation hour % 24
    kv: KvBudget | None = None  # the KV budget, in bytes, blocks and tokens (see kv_budget)
    pools: Any = None  # disaggregated fleets: fleetsim.config.pools.Pools (None: aggregated)
    dp: int = 1  # data-parallel attention engines per replica (fleet.data_parallel)
    expert_parallel: bool = False  # fleet.expert_parallel

    def latency_model(self) -> LatencyModel:
        if self.dp == 1 and not self.expert_parallel:
            return LatencyModel(self.model, self.profile, self.tp)
        return LatencyModel(
            self.model, self.profile, self.tp // self.dp, self.dp, self.expert_parallel
        )


def resolved_dict(rs: Resolved) -> dict:
    """The scenario as the run uses it: every ``[model]`` and ``[hardware]`` field resolved from
    the catalog, the profile and the overrides (none left null), and a ``derived`` table with
    the figures computed from them (parameter count, weights, KV budget)."""
    d = rs.scenario.model_dump(mode="json")
    # (a config's name and dtype are left out of the dump when the file gives them: schema.py
    # ModelSection._dump; they are the resolved model's here, in their place)
    d["model"] = {"name": None, "config": None, "dtype": None, **d["model"]}
    m = rs.model
    for k in d["model"]:
        if k != "config" and hasattr(m, k):
            d["model"][k] = getattr(m, k)
    d["model"]["kv_dtype"] = m.kv_dtype_resolved  # what the KV budget uses (not the weights')
    d["model"]["expert_dtype"] = m.expert_dtype or m.dtype
    d["model"]["embed_dtype"] = m.embed_dtype or m.dtype
    d["model"]["state_dtype"] = m.state_dtype or m.kv_dtype_resolved
    d["model"]["ssm_state_dtype"] = m.ssm_state_dtype or d["model"]["state_dtype"]
    g, pw, prof = rs.gpu, rs.gpu.power, rs.profile
    hw = d["hardware"]
    hw.update(
        tdp_w=g.tdp_w,
        idle_w=pw.idle_w,
        active_w=pw.active_w,
        compute_w=pw.compute_w,
        memory_w=pw.memory_w,
        kv_w=pw.kv_w,
        comm_w=pw.comm_w,
        moe_loop_w=pw.moe_loop_w,
        moe_compute_w=pw.moe_compute_w,
        host_w=pw.host_w,
        compute_u0=pw.compute_u0,
        power_confidence=pw.confidence,
        node_overhead_w=g.node_overhead_w,
        node_idle_w=g.node_idle_w,
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
        "serving_stack": getattr(rs.profile, "serving_stack", "eager"),
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
