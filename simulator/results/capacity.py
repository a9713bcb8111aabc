"""The rate one replica can carry: where the capacity planner starts its search, and the
SLO-bound capacity the run summary and the report compare the peak hour with.

The KV a running sequence holds, weighted by its time in flight
-----------------------------------------------------------------
A replica's decode batch is bounded by its KV budget divided by the KV tokens a running
sequence holds *on average over the time it is in flight*, not at its mean size. By Little's
law over token-iterations, the KV tokens in flight are ``lambda x E[sum over a request's
iterations of the tokens it holds]`` and the sequences in flight ``lambda x E[its iterations]``,
so the KV per running sequence is the ratio of the two expectations: a long request holds more
KV *and* holds it for longer (weighting by time in flight, as issue 21 item 5 states for vLLM's
full cache). Counting time in engine iterations (under chunked prefill a prompt's chunks ride in
the same mixed iterations as the decodes, vLLM v1 ``Scheduler.schedule``), a request of prompt
``P`` and output ``L`` tokens, prefilled in ``n = ceil(P / C)`` chunks of ``C =
max_num_batched_tokens`` (``n = 1`` without chunked prefill), holds ``min(j C, P)`` tokens in
its ``j``-th prefill iteration (the last one also samples the first output token) and ``P + k``
in its ``k``-th decode iteration (``k = 1 .. L - 1``: vLLM allocates the slot of the token being
computed, ``KVCacheManager.allocate_slots``). Summed::

    tokens x iterations = C n (n - 1) / 2 + P L + L (L - 1) / 2,   iterations = n + L - 1

    KV per running sequence = E[C n (n-1)/2 + P L + L (L-1)/2] / E[n + L - 1]

For one-chunk prompts (``n = 1``) this is ``E[P L] / E[L] + E[L^2] / (2 E[L]) - 1/2`` (with
independent sizes ``E[P] + E[L^2] / (2 E[L]) - 1/2``): geometric outputs of mean ``m`` (``E[L^2]
= 2 m^2 - m``) give ``E[P] + m - 1``; constant outputs ``E[P] + (m - 1) / 2``, the mean-size
estimate ``E[P] + E[L] / 2`` it replaces (which understates long-tailed outputs: DeepSeek-R1's
lognormal outputs hold ~20 % more). With ``kv_allocation = "reserve"`` a request holds ``P + L``
from admission to the end: ``E[(P + L)(n + L - 1)] / E[n + L - 1]``. Moments are empirical:
20,000 draws of the traffic's size distributions, or the timed trace's own requests. Block
rounding (on average ``(block - 1) / 2`` tokens per sequence) and prefix sharing are left out.
The same sums with each iteration's tokens capped at a sliding window ``W``
(:func:`token_iterations`) give a window model's KV bytes per token held (config/resolved.py
``typical_kv_bytes_per_token``), what its KV budget in tokens is counted at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import Scenario
from fleetsim.workload.inflight import token_iterations

#: the draws of the traffic's size distributions the moments are taken over
SIZE_DRAWS = 20_000


def kv_tokens_per_sequence(
    prompt: np.ndarray,
    output: np.ndarray,
    chunk_tokens: int | None = None,
    reserve: bool = False,
    weights: np.ndarray | None = None,
) -> float:
    """The KV tokens a running sequence holds, averaged over its iterations in flight (see the
    module docstring for the closed form) of the requests ``prompt`` / ``output`` (token counts,
    the same length): ``chunk_tokens``: the prompt tokens of one prefill iteration (chunked
    prefill), None for a whole prompt in one; ``reserve``: the KV of prompt + output is held from
    admission (``kv_allocation = "reserve"``); ``weights``: the requests' probabilities (an
    exact distribution; default: equally likely, empirical moments)."""
    held, iters = token_iterations(prompt, output, chunk_tokens, reserve)
    if not len(held):
        return math.nan
    return float(np.average(held, weights=weights) / np.average(iters, weights=weights))


def size_draws(sc: Scenario, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output token counts of the scenario's requests: a timed trace's own
    (``traffic.trace``), else :data:`SIZE_DRAWS` draws of its size distributions on a stream of
    their own (so every candidate of a plan sees the same)."""
    from fleetsim.workload.sampling import SizeSampler, _resolve_path, read_arrival_trace

    if sc.traffic.trace:
        _, p, o = read_arrival_trace(str(_resolve_path(sc.traffic.trace, source)))
        return np.asarray(p, dtype=float), np.asarray(o, dtype=float)
    p, o = SizeSampler(sc.traffic.prompt, sc.traffic.output, source).draw(
        SIZE_DRAWS, np.random.default_rng(np.random.SeedSequence(sc.seed, spawn_key=(2**31,)))
    )
    return np.asarray(p, dtype=float), np.asarray(o, dtype=float)


@dataclass(frozen=True)
class Sizes:
    """The request sizes a capacity estimate needs: mean prompt and output tokens and the KV
    tokens a running sequence holds (:func:`kv_tokens_per_sequence`)."""

    prompt: float
    output: float
    kv_per_seq: float

    @classmethod
    def of(cls, sc: Scenario, p: np.ndarray, o: np.ndarray) -> Sizes:
        """The sizes of requests ``p`` / ``o`` served under ``sc``'s fleet settings."""
        f = sc.fleet
        kv = kv_tokens_per_sequence(
            p,
            o,
            f.prompt_token_budget if f.chunked_prefill else None,
            reserve=f.kv_allocation == "reserve",
        )
        return cls(float(np.mean(p)), float(np.mean(o)), kv)


def scenario_sizes(rs: Resolved, source: str) -> Sizes:
    """:class:`Sizes` of the scenario's requests (:func:`size_draws`)."""
    return Sizes.of(rs.scenario, *size_draws(rs.scenario, source))


@dataclass(frozen=True)
class Capacity:
    """A replica's best-case rate (:func:`replica_capacity`) and what bounds its batch:
    ``"kv"`` (the KV budget), ``"max_num_seqs"`` or ``"tpot"`` (the TPOT target)."""

    rps: float
    batch: int
    bound: str
    kv_batch: float  # the sequences the KV budget holds at kv_per_seq
    sizes: Sizes


def replica_capacity(
    rs: Resolved, source: str, tpot_s: float | None = None, sizes: Sizes | None = None
) -> Capacity:
    """Best-case requests/s of one replica: prefill in full ``max_batched_tokens`` chunks and
    decode at the largest batch the KV budget (at the KV a running sequence holds, weighted by
    its time in flight: the module docstring) and ``max_batch_size`` allow. An optimistic
    bound: real batches are smaller and mixed, so it is only where the search starts.
    ``tpot_s``: also no larger a batch than one whose decode step stays within this time per
    output token (the SLO-bound capacity the run summary compares the peak hour with).
    ``sizes``: default :func:`scenario_sizes`."""
    sc = rs.scenario
    s = sizes if sizes is not None else scenario_sizes(rs, source)
    ep, eo, per_seq = s.prompt, s.output, s.kv_per_seq
    lat = rs.latency_model()
    kv_batch = rs.kv_capacity_tokens / max(per_seq, 1.0)
    batch = int(max(1, min(sc.fleet.max_batch_size, kv_batch)))
    bound = "kv" if kv_batch < sc.fleet.max_batch_size else "max_num_seqs"
    if tpot_s is not None:  # the largest batch whose step meets the TPOT target (monotone)
        lo, hi = 1, batch
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if lat.decode_time(mid, int(per_seq)) <= tpot_s:
                lo = mid
            else:
                hi = mid - 1
        if lo < batch:
            bound = "tpot"
        batch = lo
    t_dec = lat.decode_time(batch, int(per_seq)) / batch
    chunk = max(1, sc.fleet.max_batched_tokens // max(int(ep), 1))
    t_pf = lat.prefill_time(max(int(ep), 1), chunk) / (chunk * max(ep, 1.0))
    return Capacity(1.0 / (ep * t_pf + eo * t_dec), batch, bound, kv_batch, s)


def replica_capacity_rps(
    rs: Resolved, source: str, tpot_s: float | None = None, sizes: Sizes | None = None
) -> float:
    """:func:`replica_capacity`'s requests/s."""
    return replica_capacity(rs, source, tpot_s, sizes).rps


def run_sizes(rs: Resolved, source: str, prompt_mean: float, output_mean: float) -> Sizes:
    """:class:`Sizes` of a finished run: its own mean prompt and output tokens (a trace's
    requests within the horizon included) with the KV per running sequence of the scenario's
    size distributions or trace (:func:`scenario_sizes`, which the run drew from); where the
    sizes file cannot be read here (a relative path and no ``source``), the mean-size estimate
    ``prompt + output / 2``, which understates a long-tailed output's KV."""
    from fleetsim.base.errors import UserError

    try:
        kv = scenario_sizes(rs, source or rs.scenario._source).kv_per_seq
    except (OSError, UserError):
        kv = prompt_mean + output_mean / 2.0
    return Sizes(prompt_mean, output_mean, kv)
