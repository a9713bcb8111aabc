"""Cheap scheduled callbacks for the engine's hot path, and the pod's run loop.

A :class:`Wake` is what ``simpy.Environment.step`` needs of an event and no more: a list of
callbacks, ``_ok`` (always true) and a ``value``. Scheduling one is a single ``heappush`` onto
the environment's queue with the key a ``Timeout`` would get (``now + delay``, normal priority,
the environment's next event id), so events are processed in exactly the order, and at exactly
the times, that SimPy's own ``Timeout`` gives: results are bit-for-bit those of the plain SimPy
code, without ``Timeout.__init__`` and ``Environment.schedule`` on every arrival and run end
(about 2.7 events per request). :func:`run_until` is ``Environment.run(until=t)`` with the step
loop inlined, and it merges in a :class:`Stream` of events kept out of the queue altogether (the
pod's arrivals: one per request).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, Protocol

import simpy
from simpy.events import URGENT, Event

#: SimPy's priority of a Timeout (simpy.events.NORMAL)
NORMAL = 1


class Wake:
    """A scheduled call of ``callbacks`` with ``value`` (see the module docstring)."""

    __slots__ = ("callbacks", "value")
    _ok = True

    def __init__(self, callbacks: list[Any] | None, value: Any = None) -> None:
        self.callbacks = callbacks
        self.value = value


def queue_of(env: simpy.Environment) -> list[Any]:
    """The environment's event queue, a heap of ``(time, priority, event id, event)``: push a
    :class:`Wake` onto it with the key ``Timeout(env, t - now)`` would get, i.e.
    ``(now + (t - now if t > now else 0.0), NORMAL, next(env._eid), wake)``."""
    return env._queue


def wake_at(env: simpy.Environment, t: float, callbacks: list[Any] | None, value: Any) -> None:
    """Schedule ``Wake(callbacks, value)`` at ``t`` (``now`` if ``t`` is past), with the key
    ``Timeout(env, t - now)`` would get. The engines' once-per-run paths (``plan``, the run
    end's re-arm) push the same tuple inline, to save the call."""
    now = env._now
    heappush(
        queue_of(env),
        (now + (t - now if t > now else 0.0), NORMAL, next(env._eid), Wake(callbacks, value)),
    )


class Stream(Protocol):
    """A source of events kept out of the queue (the pod's arrivals): ``next_t`` is the time of
    its next event (``math.inf``: none), ``next_eid`` the event id it drew from the environment
    when it scheduled it, and ``fire()`` processes it (and sets the next one)."""

    next_t: float
    next_eid: int

    def fire(self) -> None: ...


def run_until(env: simpy.Environment, at: float, stream: Stream | None = None) -> None:
    """``env.run(until=at)``: process events until simulated time ``at`` (the events at ``at``
    scheduled before this call with normal priority are not processed, as in SimPy).

    With a ``stream``, its events are processed in their turn too, as if each were in the queue
    with key ``(next_t, NORMAL, next_eid)``: the order and the times are those of scheduling
    them as events, without a push and a pop per event."""
    if at <= env._now:
        raise ValueError(f"until ({at}) must be greater than the current simulation time")
    until = Event(env)
    until._ok = True
    until._value = None
    env.schedule(until, URGENT, at - env._now)
    q = queue_of(env)
    pop = heappop
    fire = stream.fire if stream is not None else None
    while q:
        if stream is not None:
            top = q[0]
            ta = stream.next_t
            t0 = top[0]
            if ta < t0 or (
                ta == t0 and (top[1] > NORMAL or (top[1] == NORMAL and stream.next_eid < top[2]))
            ):
                env._now = ta
                fire()  # type: ignore[misc]
                continue
        now, _, _, ev = pop(q)
        env._now = now
        if ev is until:
            return
        callbacks = ev.callbacks
        ev.callbacks = None
        for cb in callbacks:
            cb(ev)
        if not ev._ok and not hasattr(ev, "_defused"):
            exc = type(ev._value)(*ev._value.args)
            exc.__cause__ = ev._value
            raise exc
    raise RuntimeError(f'No scheduled events left but "until" event was not triggered: {until}')
