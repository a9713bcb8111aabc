"""The ports between a pod's parts: what routers, autoscalers and replicas may use of each other.

A :class:`PodPort` is what a replica, a router or an autoscaler sees of its pod; a
:class:`ReplicaPort` is what a router or an autoscaler sees of a replica; a :class:`RouterPort`
is what the pod, a replica or an autoscaler sees of the router. The concrete classes are
``serving.pod.Pod``, ``serving.engine.Replica`` and the routers of ``serving.routers``; the
protocols keep the modules free of import cycles (routers and the autoscaler never import the
pod) and document the contract in one place.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import simpy

    from fleetsim.device.latency import LatencyModel
    from fleetsim.serving.recorder import Recorder
    from fleetsim.serving.request import Request


class ReplicaPort(Protocol):
    """A replica as routers and autoscalers see it."""

    index: int
    outstanding: int  # requests routed to it and not finished
    busy: bool  # a run is in progress
    n: int  # decoding sequences
    waiting: deque[Request]  # its queue (the pod's shared queue under central_queue)

    def on_arrival(self, r: Request) -> None:
        """Take ``r`` into its queue (cutting the current run if ``r`` can join earlier)."""

    def plan(self, now: float) -> None:
        """Start the next run from the queue (an idle replica)."""

    def admission_time(self, r: Request) -> tuple[float, bool]:
        """The earliest iteration boundary with room for ``r``, and whether it cuts the run."""
        ...

    def cut_for(self, r: Request) -> None:
        """Cut the current run at the boundary where ``r`` can join."""


class RouterPort(Protocol):
    """The pod's router."""

    def route(self, r: Request) -> None:
        """Hand ``r`` to a replica (or the shared queue)."""

    def active_changed(self) -> None:
        """The list of routable replicas changed."""

    def dispatch(self) -> None:
        """Offer the head of a shared queue to the replicas."""


class PodPort(Protocol):
    """A pod as its replicas, router and autoscaler see it."""

    env: simpy.Environment
    rec: Recorder
    lat: LatencyModel
    hours: int
    horizon_s: float
    in_flight: int
    replicas: list
    active: list  # the routable replicas, in index order
    router: RouterPort
    shared_queue: deque[Request] | None
    max_batch: int
    max_tokens: int
    kv_cap: int
    kv: Any  # KvBudget (config.scenario)
    chunked: bool
    prefix: bool
    kv_watermark: float
    hash_tokens: int
    affinity_margin: int
    queue_floor: float  # central queue: no admission from it before this boundary
    per_iteration: bool
    e_active_w: float
    e_flop_j: float
    e_byte_j: float

    def turn_done(self, r: Request, end_s: float) -> None:
        """A session's turn finished: schedule its next turn (workload/sessions.py)."""
