"""The ports between a pod's parts: what routers, autoscalers and replicas may use of each other.

A :class:`PodPort` is what a replica, a router or an autoscaler sees of its pod; a
:class:`ReplicaPort` is what a router or an autoscaler sees of a replica; a :class:`RouterPort`
is what the pod and a replica see of the router. The concrete classes are
``serving.pod.Pod``, ``serving.core.ReplicaCore`` and the routers of ``serving.routers``; the
protocols keep the modules free of import cycles (routers and the autoscaler never import the
pod) and document the contract in one place.

The rules of the contract:

* only the pod changes its wiring. An autoscaler asks for a replica to be powered on
  (:meth:`PodPort.power_on`, made routable) or off (:meth:`PodPort.power_off`, routed nothing
  more); the pod updates ``active``, the replicas' use of the shared queue and the router, and
  holds arrivals while no replica is up (:meth:`PodPort.hold`, :meth:`PodPort.release`);
* ``PodPort.active`` is one list for the pod's whole life, changed in place (in index order) by
  the pod only: a router may keep a reference to it;
* routers hand requests to replicas (:meth:`ReplicaPort.on_arrival`) or, under a shared queue,
  start and cut their runs (:meth:`ReplicaPort.plan`, :meth:`ReplicaPort.cut_for`); nobody
  assigns another object's attributes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import simpy

    from fleetsim.device.latency import LatencyModel
    from fleetsim.serving.admission import PagedLimits
    from fleetsim.serving.recorder import Recorder
    from fleetsim.serving.request import Request


class RequestSink(Protocol):
    """Where per-request records go (``results.output.RequestWriter``)."""

    def add(
        self,
        r: Request,
        replica: int,
        finish_s: float,
        ttft_s: float,
        tpot_s: float,
        e2e_s: float,
        status: str,
    ) -> None:
        """One request's record (NaN for what did not happen)."""


class ReplicaPort(Protocol):
    """A replica as routers and autoscalers see it."""

    @property
    def index(self) -> int:
        """Its global index (pod * replicas + i)."""
        ...

    @property
    def outstanding(self) -> int:
        """Requests routed to it and not finished."""
        ...

    @property
    def busy(self) -> bool:
        """A run is in progress."""
        ...

    def on_arrival(self, r: Request) -> None:
        """Take ``r`` into its queue (cutting the current run if ``r`` can join earlier)."""

    def plan(self, T: float) -> None:
        """Start the next run from the queue at time ``T`` (an idle replica)."""

    def admission_time(self, r: Request) -> tuple[float, bool]:
        """The earliest iteration boundary with room for ``r``, and whether it cuts the run."""
        ...

    def cut_for(self, r: Request) -> None:
        """Cut the current run at the boundary where ``r`` can join."""

    def is_empty(self) -> bool:
        """Nothing running, admitted or queued (it can be powered off)."""
        ...


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
    in_flight: int  # requests admitted and not finished (queued or running)
    shared_queue: deque[Request] | None  # the central queue, or None
    queue_floor: float  # central queue: no admission from it before this time
    paged: PagedLimits | None  # the paged KV policy's settings (None: reserve)

    def turn_done(self, r: Request, end_s: float) -> None:
        """A session's turn finished at ``end_s``: schedule its next turn."""

    @property
    def replicas(self) -> Sequence[ReplicaPort]:
        """All its replicas, in index order."""
        ...

    @property
    def active(self) -> Sequence[ReplicaPort]:
        """The routable replicas, in index order (one list, changed in place by the pod)."""
        ...

    @property
    def router(self) -> RouterPort:
        """Its router."""
        ...

    def admit(self, r: Request) -> None:
        """Hand an arrival to the router, or hold it while no replica is up."""

    def hold(self) -> None:
        """Hold arrivals (no replica is up)."""

    def release(self) -> None:
        """Route arrivals again, the held ones first."""

    def power_on(self, i: int) -> None:
        """Make replica ``replicas[i]`` routable."""

    def power_off(self, i: int) -> None:
        """Route nothing more to replica ``replicas[i]``; it finishes what it has."""
