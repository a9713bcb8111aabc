"""Disaggregated fleets: the ``[disaggregation]`` section resolved into two pools and a link
(the resolution itself is :func:`fleetsim.config.scenario.resolve_disaggregated`).

Each pool is resolved exactly like an aggregated fleet of its own (its GPU, tensor parallelism,
memory utilisation, KV budget, profile), by running :func:`fleetsim.config.scenario.resolve` on
a copy of the scenario whose ``[hardware]`` and ``[fleet]`` are the pool's. The checks therefore
stay the ones of the aggregated fleet, per pool:

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

from dataclasses import dataclass
from typing import Any

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
    rs: Any  # fleetsim.config.scenario.Resolved (this module is imported by scenario.py)
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
        """Bytes of a request's KV: prompt tokens x KV bytes per token (all layers)."""
        return prompt_tokens * self.kv_bytes_per_token

    def transfer_s(self, prompt_tokens: int) -> float:
        """Time of one transfer on an idle link: latency + bytes / bandwidth."""
        return self.link.latency_s + self.transfer_bytes(prompt_tokens) / self.egress_bytes_per_s


__all__ = ["POOLS", "LinkSpec", "PoolSpec", "Pools"]
