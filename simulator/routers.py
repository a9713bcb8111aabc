"""Routers: how a pod spreads its arrivals over its replicas. Chosen by name via ``ROUTERS``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .engine import Request
    from .pod import Pod


class Router:
    """Base class: ``route(request)`` hands the request to a replica (or a shared queue)."""

    def __init__(self, pod: "Pod", rng: np.random.Generator) -> None:
        self.pod = pod
        self.replicas = pod.replicas
        self.rng = rng

    def route(self, r: "Request") -> None:  # pragma: no cover - interface
        raise NotImplementedError


class RoundRobin(Router):
    """Replicas in turn."""

    def __init__(self, pod, rng) -> None:
        super().__init__(pod, rng)
        self._i = -1

    def route(self, r) -> None:
        self._i = (self._i + 1) % len(self.replicas)
        self.replicas[self._i].on_arrival(r)


class RandomRouter(Router):
    """A uniformly random replica (draws buffered from the pod's routing stream)."""

    def __init__(self, pod, rng) -> None:
        super().__init__(pod, rng)
        self._buf: list[int] = []

    def route(self, r) -> None:
        if not self._buf:
            self._buf = self.rng.integers(0, len(self.replicas), size=4096).tolist()[::-1]
        self.replicas[self._buf.pop()].on_arrival(r)


class LeastLoaded(Router):
    """The replica with the fewest requests routed and not yet finished (lowest index on ties)."""

    def route(self, r) -> None:
        reps = self.replicas
        best = reps[0]
        load = best.outstanding
        for rep in reps:
            if rep.outstanding < load:
                best, load = rep, rep.outstanding
        best.on_arrival(r)


class CentralQueue(Router):
    """One FIFO queue per pod; whichever replica can take the head of the queue first does.

    An idle replica starts at once; otherwise the busy replica whose next iteration boundary
    comes first and that has room cuts its run there."""

    def route(self, r) -> None:
        q = self.pod.shared_queue
        q.append(r)
        if len(q) != 1:
            return  # requests ahead of it are waiting for room
        for rep in self.replicas:
            if not rep.busy:
                rep.plan(self.pod.env.now)
                return
        best, best_t = None, float("inf")
        for rep in self.replicas:
            t = rep.admission_boundary(r)
            if t < best_t:
                best, best_t = rep, t
        if best is not None:
            best.poke()


ROUTERS: dict[str, type[Router]] = {
    "round_robin": RoundRobin,
    "random": RandomRouter,
    "least_loaded": LeastLoaded,
    "central_queue": CentralQueue,
}


def make_router(name: str, pod: "Pod", rng: np.random.Generator) -> Router:
    """The router registered as ``name``."""
    return ROUTERS[name](pod, rng)
