"""``resolve``: a validated :class:`Scenario` joined with the catalogs and the profile into what
the engine and the accounting consume (:class:`fleetsim.config.resolved.Resolved`), after the
cross-field checks. An aggregated fleet is resolved by :mod:`fleetsim.config.aggregated`; a
disaggregated one (``[disaggregation]``) by :mod:`fleetsim.config.pools`, which resolves each
pool as an aggregated fleet of its own.
"""

from __future__ import annotations

from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import resolve_aggregated
from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import Scenario


def resolve(sc: Scenario, source: str = "") -> Resolved:
    """Join the scenario with the catalogs and profile, and run the cross-field checks (the
    first problem is a :class:`~fleetsim.base.errors.ScenarioError`); ``source`` is the file
    the scenario came from, for messages and relative paths."""
    if sc.disaggregation is not None:  # two pools, each resolved like a fleet (config/pools.py)
        f = sc.fleet
        if f.data_parallel > 1 or f.expert_parallel:
            field, value = (
                ("fleet.data_parallel", f.data_parallel)
                if f.data_parallel > 1
                else ("fleet.expert_parallel", f.expert_parallel)
            )
            raise ScenarioError(
                field,
                value,
                "data and expert parallelism are simulated for aggregated fleets only",
                "drop it, or drop [disaggregation]",
                source,
            )
        # imported here: an aggregated run needs neither the module nor its dataclasses
        from fleetsim.config.pools import resolve_disaggregated

        return resolve_disaggregated(sc, source)
    rs = resolve_aggregated(sc, source)
    _check_recompute_fits(sc, rs, source)
    return rs


def _check_recompute_fits(sc: Scenario, rs: Resolved, source: str) -> None:
    """Paged KV without chunked prefill: a request preempted while decoding is prefilled again
    with the tokens it had generated, in one iteration, so the longest request less its last
    token (whose KV is never written) must fit one scheduler's token budget, or a request
    preempted late could never be scheduled again and its queue would stall behind it for the
    rest of the day. vLLM refuses such a server: ``max_num_batched_tokens`` smaller than
    ``max_model_len`` without chunked prefill is a ValueError (``SchedulerConfig._verify_args``,
    vllm/config/scheduler.py). (A disaggregated fleet's decode pool recomputes by chunks, and its
    prefill pool holds a prompt and one token: the longest-prompt check covers it.)"""
    f = sc.fleet
    if f.kv_allocation != "paged" or f.chunked_prefill:
        return
    longest = rs.max_request_tokens - 1
    budget = f.prompt_token_budget
    if longest <= budget:
        return
    share = (
        ""
        if budget == f.max_batched_tokens
        else f" ({budget} for each of the {f.data_parallel} data-parallel ranks)"
    )
    raise ScenarioError(
        "fleet.max_batched_tokens",
        f.max_batched_tokens,
        f"schedules {budget} tokens per iteration{share}, but without chunked prefill a request "
        f"preempted as it decodes is prefilled again whole, with the tokens it generated (up to "
        f"{longest}: the longest prompt + output - 1), and could never be scheduled (vLLM "
        "refuses max_num_batched_tokens < max_model_len without chunked prefill)",
        f"set it >= {longest * (f.data_parallel if share else 1)}, or "
        "fleet.enable_chunked_prefill = true",
        source,
    )


__all__ = ["resolve"]
