"""GPU power states and autoscalers: which replicas of a pod are powered, and when.

Each replica (``tp`` GPUs) is in one power state at a time:

* ``off``: draws ``power.standby_w`` per GPU, no node overhead, no hardware rent;
* ``waking``: a cold start of ``power.wake_s`` seconds at ``power.wake_w`` per GPU (the GPU's idle
  draw when unset); it serves nothing until it is up;
* ``on``: routable; idle or busy, accounted by the engine as before;
* ``draining``: powered and finishing its work, but the router sends it nothing new; it is
  switched off at the first autoscaler tick after its batch and queue are empty.

An autoscaler, chosen by ``[autoscaler] policy``, moves replicas between these states:

* ``static`` (default): every replica on all the time. No autoscaler object exists, so the hot
  path costs nothing extra and the accounting is exactly the static one.
* ``schedule``: ``replicas_by_hour[h % 24]`` replicas on in simulation hour ``h`` (the index of
  ``traffic.diurnal``), from the scenario or from the JSON that ``fleetsim plan`` writes
  (``schedule_file``). With ``prewarm`` (default) a scale-up starts its cold start ``wake_s``
  before the hour, so the replicas are up when the hour begins.
* ``reactive``: every ``interval_s`` the pod's requests in flight (queued or running) are divided
  by ``target_requests_per_replica``; more replicas are woken at once when that asks for more,
  and replicas are drained only when the most asked for over the last ``idle_timeout_s`` is
  below what is powered. ``min_replicas`` <= replicas <= ``max_replicas`` (default: all). A
  request that finds no replica up is held and wakes one at once (scale from zero).

An autoscaler acts on its pod only through the pod's port (:class:`fleetsim.serving.ports.PodPort`):
``power_on(i)`` when replica ``i`` is up, ``power_off(i)`` when it starts draining; the pod
holds arrivals while no replica is up and tells the autoscaler (:meth:`Autoscaler.on_held`).

The time each replica spends in each state is integrated exactly per hour
(:class:`PowerLedger`); :func:`fleetsim.results.accounting.hourly_table` turns it into energy
and cost.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

from fleetsim.base.units import HOUR_S

if TYPE_CHECKING:
    from simpy.events import Event

    from fleetsim.config.resolved import Resolved
    from fleetsim.serving.ports import PodPort
OFF, WAKING, ON, DRAINING = "off", "waking", "on", "draining"
_BUCKET = {OFF: 0, WAKING: 1, ON: 2, DRAINING: 2}


# ---------------------------------------------------------------------------------------------
class PowerLedger:
    """GPU-seconds per hour in each power bucket (off, waking, powered-on), split exactly at
    hour boundaries."""

    def __init__(self, hours: int, gpus_per_replica: int) -> None:
        self.hours = hours
        self.tp = gpus_per_replica
        self.gpu_s = [[0.0] * hours for _ in range(3)]  # off, waking, on

    def add(self, bucket: int, t0: float, t1: float) -> None:
        """Credit one replica's ``[t0, t1)`` in ``bucket`` to the hours it covers."""
        arr = self.gpu_s[bucket]
        while t0 < t1:
            h = int(t0 // HOUR_S)
            if h >= self.hours:
                return
            end = min(t1, (h + 1) * HOUR_S)
            arr[h] += (end - t0) * self.tp
            t0 = end


class Autoscaler:
    """Power states of one pod's replicas, and the moves between them (base of the policies)."""

    def __init__(self, rs: Resolved, pod: PodPort) -> None:
        sc = rs.scenario
        self.pod = pod
        self.env = pod.env
        self.cfg = sc.autoscaler
        self.wake_s = sc.power.wake_s
        self.interval_s = self.cfg.interval_s
        self.horizon_s = pod.horizon_s
        self.reps = pod.replicas
        self.ledger = PowerLedger(pod.hours, rs.tp)
        self.n_initial = self.initial_replicas(rs)  # replicas 0 .. n_initial - 1 start on
        self.st = [ON if i < self.n_initial else OFF for i in range(len(self.reps))]
        self.since = [0.0] * len(self.reps)
        self.wakes = 0  # cold starts begun (for reports and tests)

    # ---- policy interface ------------------------------------------------------------------
    def initial_replicas(self, rs: Resolved) -> int:
        return len(self.pod.replicas)

    def start(self) -> None:
        """Arm the periodic tick (and the policy's own events)."""
        self.env.timeout(min(self.interval_s, self.horizon_s)).callbacks.append(self._tick)

    def evaluate(self) -> None:
        """Called every ``interval_s``."""

    def on_held(self) -> None:
        """A request arrived while no replica was up (the pod holds it)."""

    # ---- counts and moves ------------------------------------------------------------------
    def count(self, state: str) -> int:
        return self.st.count(state)

    def capacity(self) -> int:
        """Replicas that are up or coming up (the draining ones are on their way out)."""
        return self.count(ON) + self.count(WAKING)

    def _set(self, i: int, new: str) -> None:
        now = self.env.now
        self.ledger.add(_BUCKET[self.st[i]], self.since[i], now)
        self.st[i] = new
        self.since[i] = now

    def wake(self, i: int) -> None:
        """Begin the cold start of off replica ``i``."""
        self._set(i, WAKING)
        self.wakes += 1
        if self.wake_s <= 0:
            self._up(i)
        else:
            self.env.timeout(self.wake_s).callbacks.append(partial(self._on_up, i))

    def _on_up(self, i: int, _ev: Event) -> None:
        self._up(i)

    def _up(self, i: int) -> None:
        if self.st[i] != WAKING:
            return  # cancelled while waking
        self._set(i, ON)
        self.pod.power_on(i)

    def drain(self, i: int) -> None:
        """Stop routing to on replica ``i``; it powers off once empty."""
        self._set(i, DRAINING)
        self.pod.power_off(i)
        self._try_off(i)

    def _try_off(self, i: int) -> None:
        if self.reps[i].is_empty():
            self._set(i, OFF)

    def scale_to(self, n: int) -> None:
        """Make ``n`` replicas up or coming up: undrain, then wake; or cancel wakes, then drain."""
        cap = self.capacity()
        if n > cap:
            for i in [i for i, s in enumerate(self.st) if s == DRAINING][: n - cap]:
                self._set(i, ON)
                self.pod.power_on(i)
                cap += 1
            for i in [i for i, s in enumerate(self.st) if s == OFF][: max(n - cap, 0)]:
                self.wake(i)
        elif n < cap:
            extra = cap - n
            for i in [i for i, s in enumerate(self.st) if s == WAKING][::-1][:extra]:
                self._set(i, OFF)
                extra -= 1
            if extra > 0:  # the least loaded first, the highest index on ties
                on = sorted(
                    (i for i, s in enumerate(self.st) if s == ON),
                    key=lambda i: (self.reps[i].outstanding, -i),
                )
                for i in on[:extra]:
                    self.drain(i)

    # ---- the clock ---------------------------------------------------------------------------
    def _tick(self, _ev: Event) -> None:
        for i, s in enumerate(self.st):
            if s == DRAINING:
                self._try_off(i)
        self.evaluate()
        nxt = self.env.now + self.interval_s
        if nxt < self.horizon_s:
            self.env.timeout(self.interval_s).callbacks.append(self._tick)

    def finish(self) -> None:
        """Close every replica's last interval at the horizon."""
        for i, s in enumerate(self.st):
            self.ledger.add(_BUCKET[s], self.since[i], self.horizon_s)
            self.since[i] = self.horizon_s

    def gpu_seconds(self) -> tuple[list[float], dict[str, list[float]]]:
        """Powered GPU-seconds per hour, and the waking and off ones (PodSummary fields)."""
        off, waking, on = self.ledger.gpu_s
        powered = [a + b for a, b in zip(on, waking)]
        return powered, {"waking_gpu_s": list(waking), "off_gpu_s": list(off)}


class ScheduleScaler(Autoscaler):
    """``replicas_by_hour[h % 24]`` replicas in simulation hour ``h``."""

    def initial_replicas(self, rs: Resolved) -> int:
        if rs.replicas_by_hour is None:  # resolve() sets it for this policy
            raise ValueError("the schedule autoscaler needs replicas_by_hour")
        self.sched: tuple[int, ...] = rs.replicas_by_hour
        return self.sched[0]

    def start(self) -> None:
        super().start()
        H = self.pod.hours
        for h in range(1, H):
            n, prev = self.sched[h % 24], self.sched[(h - 1) % 24]
            if n == prev:
                continue
            t = h * HOUR_S
            if n > prev and self.cfg.prewarm:
                t = max(t - self.wake_s, 0.0)
            self.env.timeout(t).callbacks.append(partial(self._on_step, n))

    def _on_step(self, n: int, _ev: Event) -> None:
        self.scale_to(n)


class ReactiveScaler(Autoscaler):
    """Requests in flight per replica against ``target_requests_per_replica``."""

    def initial_replicas(self, rs: Resolved) -> int:
        a = self.cfg
        self.lo = a.min_replicas
        self.hi = a.max_replicas if a.max_replicas is not None else len(self.pod.replicas)
        # (time, replicas wanted) over the last idle_timeout_s
        self.window: deque[tuple[float, int]] = deque()
        self.last_up_s = 0.0
        return self.hi if a.initial_replicas is None else a.initial_replicas

    def wanted(self) -> int:
        n = math.ceil(self.pod.in_flight / self.cfg.target_requests_per_replica)
        return min(max(n, self.lo), self.hi)

    def evaluate(self) -> None:
        now = self.env.now
        want = self.wanted()
        win = self.window
        win.append((now, want))
        while win[0][0] < now - self.cfg.idle_timeout_s:
            win.popleft()
        cap = self.capacity()
        if want > cap:
            self.scale_to(want)
            self.last_up_s = now
        elif now - self.last_up_s >= self.cfg.idle_timeout_s:
            keep = max(w for _, w in win)
            if keep < cap:
                self.scale_to(keep)

    def on_held(self) -> None:
        if self.count(WAKING) == 0 and self.hi > 0:
            self.scale_to(max(1, self.capacity()))
            self.last_up_s = self.env.now


AUTOSCALERS: dict[str, type[Autoscaler] | None] = {
    "static": None,
    "schedule": ScheduleScaler,
    "reactive": ReactiveScaler,
}


def make_autoscaler(rs: Resolved, pod: PodPort) -> Autoscaler | None:
    """The pod's autoscaler, or None for ``static`` (all replicas on, nothing to do)."""
    cls = AUTOSCALERS[rs.scenario.autoscaler.policy]
    return None if cls is None else cls(rs, pod)


__all__ = [
    "AUTOSCALERS",
    "Autoscaler",
    "PowerLedger",
    "ReactiveScaler",
    "ScheduleScaler",
    "make_autoscaler",
]
