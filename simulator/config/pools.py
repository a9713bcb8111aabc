"""Disaggregated fleets: the ``[disaggregation]`` section resolved into two pools and a link
(the resolution itself is :func:`resolve_disaggregated`, below).

Each pool is resolved exactly like an aggregated fleet of its own (its GPU, tensor parallelism,
memory utilisation, KV budget, profile), by running
:func:`fleetsim.config.aggregated.resolve_aggregated` on a copy of the scenario whose
``[hardware]`` and ``[fleet]`` are the pool's. The checks therefore stay the ones of the
aggregated fleet, per pool:

* the weights fit in each pool's replica;
* the **prefill** pool's KV budget holds the longest prompt plus its first token (the KV stays
  there until the decode replica has admitted the request);
* the **decode** pool's KV budget holds the longest prompt + output.

An error found in a pool names the pool's field (``disaggregation.decode.tensor_parallel``),
never the ``[fleet]`` field it was checked through.

The link (:class:`LinkSpec`) is a catalog entry of ``device/catalog/links.toml`` (bandwidth per
GPU and direction, fixed latency per transfer), optionally overridden. A prefill replica of TP g
sends over g links at once, so its egress is g x the per-GPU bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import resolve_aggregated
from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import HardwareSection, Scenario
from fleetsim.device import catalog
from fleetsim.workload.distributions import Fixed

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class LinkSpec:
    """The KV-transfer link of one GPU (one direction)."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class PoolSpec:
    """One pool: ``rs`` is the pool resolved as an aggregated fleet of its own."""

    name: str
    rs: Any  # the pool's Resolved (fleetsim.config.resolved)
    replicas: int  # per pod
    max_batch: int
    max_tokens: int
    router: str

    @property
    def tp(self) -> int:
        return self.rs.tp

    @property
    def gpu_name(self) -> str:
        return self.rs.gpu.name

    @property
    def kv_capacity_tokens(self) -> int:
        return self.rs.kv_capacity_tokens


@dataclass(frozen=True)
class Pools:
    """Both pools and the link between them."""

    prefill: PoolSpec
    decode: PoolSpec
    link: LinkSpec
    kv_bytes_per_token: float

    def by_name(self) -> dict[str, PoolSpec]:
        return {"prefill": self.prefill, "decode": self.decode}

    @property
    def egress_bytes_per_s(self) -> float:
        """What one prefill replica sends per second: its tp GPUs' links in parallel."""
        return self.link.bandwidth_bytes_per_s * self.prefill.tp

    def transfer_bytes(self, prompt_tokens: int) -> float:
        """Bytes of a request's KV as its layers hold it (what the engine sends,
        serving/disagg.py): prompt tokens x KV bytes per token when every layer holds the whole
        prompt, else :meth:`ModelSpec.kv_bytes` (the window layers at most the window, a
        hybrid's linear-state state once per request). On an idle link a transfer takes the
        link's latency + these bytes / :attr:`egress_bytes_per_s`."""
        m = self.decode.rs.model
        if m.kv_uniform:
            return prompt_tokens * self.kv_bytes_per_token
        return m.kv_bytes(prompt_tokens)


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
        # the paged KV policy (serving/roles.py PagedPrefillReplica, PagedDecodeReplica): the
        # prefill pool prefills with [fleet]'s chunking and prefix caching; the decode pool
        # recomputes a preempted request by chunks and keeps no prefix cache (decode-side
        # prefix reuse is not modelled: docs/model.md)
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
        return resolve_aggregated(psc, src), psc
    except ScenarioError as exc:
        if name == "decode" and exc.field == "fleet.max_batched_tokens":
            # a decode replica never prefills (one token per sequence per iteration): the
            # longest-prompt check of max_batched_tokens does not apply to it
            psc2 = _pool_scenario(sc, name, bmt_override=1_000_000_000)
            try:
                rs = resolve_aggregated(psc2, src)
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


__all__ = ["POOLS", "LinkSpec", "PoolSpec", "Pools", "resolve_disaggregated"]
