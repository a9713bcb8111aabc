"""The admission rule of a continuous-batching replica, shared by the simulated engine's reserve
policy (:mod:`fleetsim.serving.kv_reserve`) and the real torch engine
(``fleetsim.calibrate.engine``).

At every iteration boundary the waiting requests are taken first-come-first-served while
:meth:`Limits.admits` holds for the head of the queue; the first that does not fit blocks the
queue (no overtaking). A request that :meth:`Limits.servable` rejects could never be admitted,
even into an empty replica, and is turned away on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """What one iteration of a replica may hold."""

    max_batch: int  # sequences in one iteration (prefilling + decoding)
    max_tokens: int  # tokens in one iteration: prompts being prefilled + one per decoding sequence
    kv_cap: int  # KV-cache tokens a replica can reserve (prompt + output of every sequence)
    #: tokens each sequence reserves beside its prompt + output: a hybrid model's constant
    #: linear-state state (config/resolved.py ``KvBudget.state_tokens``), else 0
    kv_state: int = 0

    def admits(
        self, n_seqs: int, batch_tokens: int, kv_used: int, prompt_tokens: int, need_tokens: int
    ) -> bool:
        """Whether a request of ``prompt_tokens`` that reserves ``need_tokens`` of KV cache
        (prompt + output) joins an iteration that already holds ``n_seqs`` sequences and
        ``batch_tokens`` tokens, on a replica with ``kv_used`` KV tokens reserved."""
        return (
            n_seqs < self.max_batch
            and batch_tokens + prompt_tokens <= self.max_tokens
            and kv_used + need_tokens + self.kv_state <= self.kv_cap
        )

    def servable(self, prompt_tokens: int, output_tokens: int, max_context_tokens: int) -> bool:
        """Whether the request fits an empty replica at all (else it is rejected on arrival)."""
        need = prompt_tokens + output_tokens
        return (
            need + self.kv_state <= self.kv_cap
            and prompt_tokens <= self.max_tokens
            and need <= max_context_tokens
        )


@dataclass(frozen=True, slots=True)
class PagedLimits:
    """What the paged KV policy fixes for a simulation (``EnginePlan.paged``)."""

    blocks: int  # KV blocks of a replica
    block_tokens: int  # tokens per block (a power of two)
    chunked: bool  # chunked prefill
    prefix: bool  # prefix caching
    watermark_blocks: int  # blocks kept free when admitting while others run
    hash_tokens: int  # tokens per prompt block id (prefix caching granularity)
    affinity_margin: int  # prefix_affinity router: the load margin
    #: vLLM V1's single free-block queue for eviction (FleetSection.prefix_cache_eviction)
    fifo_eviction: bool = False
    # sliding-window and hybrid models (kv_paged.py, "Sliding windows"): the pool in
    # layer-blocks (b tokens of one attention layer), its watermark, the global and window
    # layers per sequence and the window's cap in blocks; 0 layers: every layer holds the
    # whole context
    win_blocks: int = 0
    win_watermark_blocks: int = 0
    win_global_layers: int = 0
    win_sliding_layers: int = 0
    win_cap_blocks: int = 0
    win_window_tokens: int = 0  # the window W (prefix caching's hit rule: kv_blocks.py)
    # a hybrid model's linear-state state per sequence, in layer-blocks (held from admission
    # to finish or preemption, whatever the sequence's length)
    win_state_blocks: int = 0


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """What the simulation fixes for every replica of a pod: read, never changed."""

    limits: Limits  # the admission rule
    horizon_s: float  # no run starts at or after it
    per_iteration: bool  # the per-iteration reference mode (every run is one iteration)
    # dynamic energy of a whole replica (see latency.PowerSpec): J = e_active_w * busy seconds
    # + e_flop_j * FLOPs + e_byte_j * bytes moved + e_kv_j * KV/state bytes, the last being the
    # bytes beyond the weights each iteration reads (LatencyModel.weight_bytes_per_iteration)
    e_active_w: float
    e_flop_j: float
    e_byte_j: float
    paged: PagedLimits | None = None  # the paged policy's settings (kv_paged.py), or None
    e_kv_j: float = 0.0
    # per replica-second of communication, in place of e_active_w (comm_w - active_w, x tp),
    # and whether the engine tracks communication seconds at all (a multi-GPU replica)
    e_comm_w: float = 0.0
    track_comm: bool = False
    # per replica-second in the fp8 fused-MoE K loop, in place of e_active_w (moe_loop_w -
    # active_w, x the replica's GPUs), and whether the engine tracks those seconds at all (a
    # model with fp8 block-quantised experts on a GPU with the loop constants)
    e_loop_w: float = 0.0
    track_loop: bool = False
    # per iteration, the exposed host time's energy in place of e_active_w ((host_w -
    # active_w) x the replica's GPUs x LatencyModel.host_s_per_iter; <= 0 when the GPUs wait on
    # the host at a lower level; 0: no separate level)
    e_host_j: float = 0.0
    # per FLOP of the routed experts' grouped GEMMs, on top of e_flop_j (moe_compute_w /
    # peak_flops), and whether the engine counts those FLOPs at all (a mixture of experts)
    e_xf_j: float = 0.0
    track_xf: bool = False
    # the saturation of the two FLOP terms (PowerSpec.compute_u0; None: linear) and the
    # replica's peak FLOP/s (its GPUs'): each iteration's FLOP energy takes the factor
    # PowerSpec.compute_gain at its compute utilisation FLOPs / (e_peak_flops x its time), a
    # run's decode steps theirs at their mean (serving/core.py, Replica._commit)
    e_u0: float | None = None
    e_peak_flops: float = 0.0
    # data-parallel ranks with a scheduler each (serving/ranks.py: fleet.dp_scheduler
    # "per-rank"), or 1: one scheduler for the replica (dp = 1, or "merged")
    dp_ranks: int = 1
    # with dp_ranks > 1: every rank its own block pool and prefix cache of blocks // dp_ranks
    # blocks (fleet.dp_kv_pool "per-rank", vLLM's engine core per rank), or one shared pool
    dp_kv_per_rank: bool = False
