"""The simulator's event kernel: SimPy's event queue and no more, and the pod's run loop.

An :class:`Environment` is the part of ``simpy.Environment`` the engine uses: the clock
(``now``), the queue (a heap of ``(time, priority, event id, event)``), the event ids, and
``schedule`` / ``timeout``, with SimPy's keys, so events are processed in exactly the order, and
at exactly the times, that SimPy's own ``Timeout`` gives (tests/test_events.py checks it against
SimPy). Importing SimPy cost a run ~33 M instructions (its ``importlib.metadata`` included, ~1 %
of a 21,556-request run; bench/RESULTS.md, start-up, fifth pass) for these few lines; the
functions here also take a ``simpy.Environment``.

A :class:`Wake` is what the loop needs of an event: a list of callbacks and a ``value``.
Scheduling one is a single ``heappush`` onto the environment's queue with the key a ``Timeout``
would get (``now + delay``, normal priority, the environment's next event id), without
``Timeout.__init__`` and ``Environment.schedule`` on every arrival and run end (about 2.7 events
per request). :func:`run_until` is ``Environment.run(until=t)`` with the step loop inlined, and
it merges in a :class:`Stream` of events kept out of the queue altogether (the pod's arrivals:
one per request).
"""

from __future__ import annotations

from heapq import heappop, heappush
from itertools import count
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import simpy

#: SimPy's priorities (simpy.events.URGENT, NORMAL): a Timeout is NORMAL
URGENT = 0
NORMAL = 1


class Wake:
    """A scheduled call of ``callbacks`` with ``value`` (see the module docstring)."""

    __slots__ = ("callbacks", "value")
    _ok = True
    callbacks: list[Any]  # (None once it has fired, or for run_until's own marker)

    def __init__(self, callbacks: list[Any] | None, value: Any = None) -> None:
        self.callbacks = callbacks  # type: ignore[assignment]
        self.value = value


class Environment:
    """What the simulator uses of ``simpy.Environment`` (see the module docstring): the same
    attributes (``_now``, ``_queue``, ``_eid``) and keys."""

    __slots__ = ("_eid", "_now", "_queue")

    def __init__(self, initial_time: float = 0.0) -> None:
        self._now = initial_time
        self._queue: list[tuple[float, int, int, Any]] = []
        self._eid = count()

    @property
    def now(self) -> float:
        """The current simulated time."""
        return self._now

    def schedule(self, event: Any, priority: int = NORMAL, delay: float = 0.0) -> None:
        """Put ``event`` on the queue ``delay`` after now (``Environment.schedule``)."""
        heappush(self._queue, (self._now + delay, priority, next(self._eid), event))

    def timeout(self, delay: float, value: Any = None) -> Wake:
        """An event ``delay`` from now with ``value`` (``Environment.timeout``): append the
        callbacks to its ``callbacks``, each called with the event."""
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")
        ev = Wake([], value)
        self.schedule(ev, NORMAL, delay)
        return ev


def queue_of(env: Environment | simpy.Environment) -> list[Any]:
    """The environment's event queue, a heap of ``(time, priority, event id, event)``: push a
    :class:`Wake` onto it with the key ``Timeout(env, t - now)`` would get, i.e.
    ``(now + (t - now if t > now else 0.0), NORMAL, next(env._eid), wake)``."""
    return env._queue


def wake_at(
    env: Environment | simpy.Environment, t: float, callbacks: list[Any] | None, value: Any
) -> None:
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


def run_until(
    env: Environment | simpy.Environment, at: float, stream: Stream | None = None
) -> None:
    """``env.run(until=at)``: process events until simulated time ``at`` (the events at ``at``
    scheduled before this call with normal priority are not processed, as in SimPy).

    With a ``stream``, its events are processed in their turn too, as if each were in the queue
    with key ``(next_t, NORMAL, next_eid)``: the order and the times are those of scheduling
    them as events, without a push and a pop per event. Its events never fail (a :class:`Wake`,
    or SimPy's ``Timeout``): there is no failed-event check."""
    if at <= env._now:
        raise ValueError(f"until ({at}) must be greater than the current simulation time")
    until = Wake(None)  # (SimPy's until event: urgent, so it comes before the events at ``at``)
    q = queue_of(env)
    heappush(q, (env._now + (at - env._now), URGENT, next(env._eid), until))  # (schedule())
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
    raise RuntimeError(f'No scheduled events left but "until" event was not triggered: {until}')
