"""Routers: how a pod spreads its arrivals over its replicas. Chosen by name via ``ROUTERS``.

A router sees its pod and the replicas through the ports of :mod:`fleetsim.serving.ports`: it
reads the pod's list of routable replicas (``PodPort.active``, which only the pod changes, in
place, and announces with :meth:`Router.active_changed`) and hands each request to one of them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from itertools import takewhile
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

_LOAD = attrgetter("outstanding")

if TYPE_CHECKING:
    from fleetsim.serving.ports import PodPort, ReplicaPort
    from fleetsim.serving.request import Request


class _Outstanding(Protocol):
    @property
    def outstanding(self) -> int: ...


_R = TypeVar("_R", bound=_Outstanding)


class Router:
    """Base class: ``route(request)`` hands the request to a replica (or a shared queue)."""

    def __init__(self, pod: PodPort, rng: np.random.Generator) -> None:
        self.pod = pod
        self.replicas: Sequence[ReplicaPort] = pod.active  # the routable ones (changed in place)
        self.rng = rng

    def route(self, r: Request) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def active_changed(self) -> None:
        """The pod changed its list of routable replicas (an autoscaler powered one on or off)."""

    def direct(self) -> Callable[[Request], None] | None:
        """For a pod whose routable replicas never change: the one call ``route`` always ends
        in (a replica's ``on_arrival``), if there is one and the router keeps no state, else
        None."""
        return None

    def dispatch(self) -> None:
        """Offer the head of a shared queue to the replicas (only the central queue has one)."""


class RoundRobin(Router):
    """Replicas in turn."""

    def __init__(self, pod: PodPort, rng: np.random.Generator) -> None:
        super().__init__(pod, rng)
        self._i = -1

    def route(self, r: Request) -> None:
        self._i = (self._i + 1) % len(self.replicas)
        self.replicas[self._i].on_arrival(r)


class RandomRouter(Router):
    """A uniformly random replica (draws buffered from the pod's routing stream)."""

    def __init__(self, pod: PodPort, rng: np.random.Generator) -> None:
        super().__init__(pod, rng)
        self._buf: list[int] = []

    def active_changed(self) -> None:
        self._buf = []  # buffered draws were for the old number of replicas

    def route(self, r: Request) -> None:
        if not self._buf:
            self._buf = self.rng.integers(0, len(self.replicas), size=4096).tolist()[::-1]
        self.replicas[self._buf.pop()].on_arrival(r)


def least_outstanding(reps: Sequence[_R]) -> _R:
    """``min(reps, key=_LOAD)`` as a loop (twice as fast for a few replicas): the first of the
    replicas with the fewest requests outstanding, as min() keeps the first of equals."""
    best = reps[0]
    least = best.outstanding
    for rep in reps:
        o = rep.outstanding
        if o < least:
            best = rep
            least = o
    return best


class LeastLoaded(Router):
    """The replica with the fewest requests routed and not yet finished (lowest index on ties)."""

    def route(self, r: Request) -> None:
        least_outstanding(self.replicas).on_arrival(r)

    def direct(self) -> Callable[[Request], None] | None:
        # one replica is the least loaded of one: the pod hands it its arrivals itself (a call
        # less per request, ~0.8 % of a 21,556-request day on one replica; bench/RESULTS.md,
        # start-up, fifth pass)
        return self.replicas[0].on_arrival if len(self.replicas) == 1 else None


class CentralQueue(Router):
    """One FIFO queue per pod; whichever replica can take the head of the queue first does.

    The head goes to an idle replica at once, else to the busy replica whose earliest iteration
    boundary with room for it comes first (cutting its run there). When that is some replica's
    run end, nothing is done now: the replica admits from the queue when it gets there. After
    every admission and every run end the new head is dispatched the same way, so no boundary
    with room is ever skipped (the per-iteration reference mode checks this)."""

    def __init__(self, pod: PodPort, rng: np.random.Generator) -> None:
        super().__init__(pod, rng)
        if pod.shared_queue is None:
            raise ValueError("central_queue needs the pod's shared queue")
        self.queue: deque[Request] = pod.shared_queue
        self._busy = False

    def route(self, r: Request) -> None:
        self.queue.append(r)
        self.dispatch()

    def dispatch(self) -> None:
        if self._busy:
            return  # an outer dispatch loop is running and will look again
        self._busy = True
        try:
            q = self.queue
            now = self.pod.env.now
            while q:
                r = q[0]
                idle = next((rep for rep in self.replicas if not rep.busy), None)
                if idle is not None:
                    idle.plan(now)
                    if q and q[0] is r:
                        break  # could not start even on an idle replica (cannot happen)
                    continue
                best: ReplicaPort | None = None
                best_t, best_cut = float("inf"), False
                for rep in self.replicas:
                    t, cut = rep.admission_time(r)
                    if t < best_t:
                        best, best_t, best_cut = rep, t, cut
                if best is None or not best_cut:
                    break  # the earliest chance is a run end: that replica admits it then
                best.cut_for(r)
                if q and q[0] is r:
                    break
        finally:
            self._busy = False


class PrefixAffinity(Router):
    """SGLang's cache-aware routing: the replica that holds the longest prefix of the request's
    prompt blocks, unless its load (requests routed and not finished) exceeds the least loaded
    replica's by more than ``fleet.prefix_affinity_margin``; then, and when no replica holds
    any of the prefix, the least loaded one (ties: the less loaded, then the lower index).

    Like SGLang's router (sgl-router's cache-aware policy keeps an approximate radix tree per
    worker of the prefixes it sent there, evicting the least recently used), the router does
    not look into the replicas: it remembers, per replica, the block ids of the requests it
    routed there, in LRU order, up to the blocks that replica's KV cache holds."""

    def __init__(self, pod, rng) -> None:
        super().__init__(pod, rng)
        kv = pod.paged
        if kv is None:  # the reserve policy keeps no prefix cache: remember a little anyway
            self.margin, self.capacity = 8, 1 << 16
        else:
            self.margin = kv.affinity_margin
            self.capacity = max(1, kv.blocks // max(1, kv.hash_tokens // kv.block_tokens))
        self.trees: dict[int, OrderedDict[int, None]] = {}

    def route(self, r) -> None:
        reps = self.replicas
        least = min(reps, key=_LOAD)
        ids = r.ids
        if ids is None:
            least.on_arrival(r)
            return
        best = None
        best_h = 0
        trees = self.trees
        for rep in reps:
            tree = trees.get(rep.index)
            if tree is None:
                continue
            h = len(list(takewhile(tree.__contains__, ids)))  # its leading ids in the tree
            if h > best_h or (
                h == best_h and best is not None and rep.outstanding < best.outstanding
            ):
                best, best_h = rep, h
        if best is None or best_h == 0 or best.outstanding - least.outstanding > self.margin:
            best = least
        tree = trees.get(best.index)
        if tree is None:
            tree = trees[best.index] = OrderedDict()
        for x in ids:  # remember the prompt's blocks there, most recent last
            if x in tree:
                tree.move_to_end(x)
            else:
                tree[x] = None
        while len(tree) > self.capacity:
            tree.popitem(last=False)
        best.on_arrival(r)


ROUTERS: dict[str, type[Router]] = {
    "round_robin": RoundRobin,
    "random": RandomRouter,
    "least_loaded": LeastLoaded,
    "central_queue": CentralQueue,
    "prefix_affinity": PrefixAffinity,
}


def make_router(name: str, pod: PodPort, rng: np.random.Generator) -> Router:
    """The router registered as ``name``."""
    return ROUTERS[name](pod, rng)
