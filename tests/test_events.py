"""serving/events.py: its environment, cheap events and the merged arrival stream keep SimPy's
order exactly (SimPy is the reference here; the simulator no longer imports it)."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import simpy

from fleetsim.serving.events import NORMAL, Environment, Wake, queue_of, run_until


class _Arrivals:
    """A Stream of arrivals at given times; each one schedules a few follow-up events."""

    def __init__(self, env, times, log, cheap: bool) -> None:
        self.env, self.times, self.log, self.cheap = env, times, log, cheap
        self.i = 0
        self.next_t = math.inf
        self.next_eid = 0

    def schedule(self) -> None:
        env = self.env
        now = env.now
        t = self.times[self.i]
        if self.cheap:
            self.next_t = now + (t - now if t > now else 0.0)
            self.next_eid = next(env._eid)
        else:
            simpy.events.Timeout(env, t - now if t > now else 0.0).callbacks.append(self.fire)

    def fire(self, _ev=None) -> None:
        env = self.env
        self.log.append(("arrival", self.i, env.now))
        # follow-ups at the same time (ties), just after, and at another arrival's time
        for d in (0.0, 0.25, 1.0):
            key = f"f{self.i}+{d}"
            if self.cheap:
                w = Wake([lambda ev: self.log.append((ev.value, env.now))], key)
                now = env._now
                heapq.heappush(queue_of(env), (now + d, NORMAL, next(env._eid), w))
            else:
                simpy.events.Timeout(env, d, key).callbacks.append(
                    lambda ev: self.log.append((ev.value, env.now))
                )
        self.i += 1
        if self.i < len(self.times):
            self.schedule()
        elif self.cheap:
            self.next_t = math.inf


def _run(cheap: bool, times: list[float], horizon: float, ours: bool = True) -> list:
    """The events' log: ``cheap`` the simulator's way (``ours``: on its own Environment, else on
    SimPy's), else plain SimPy."""
    env = Environment() if cheap and ours else simpy.Environment()
    log: list = []
    for h in (1.0, 2.0, 3.0):  # plain SimPy timeouts among them
        env.timeout(h, f"tick{h}").callbacks.append(lambda ev: log.append((ev.value, env.now)))
    src = _Arrivals(env, times, log, cheap)
    src.schedule()
    if cheap:
        run_until(env, horizon, src)
    else:
        env.run(until=horizon)
    return [*log, ("end", env.now)]


def test_cheap_events_and_stream_keep_simpy_order_and_times():
    rng = np.random.default_rng(5)
    # arrival times on a coarse grid: many exact ties with each other, the ticks, the follow-ups
    # and the horizon (an event at the horizon is not processed)
    times = sorted((rng.integers(0, 16, size=40) / 4.0).tolist())
    for horizon in (2.0, 3.75, 4.0, 10.0):
        a, b = _run(True, times, horizon), _run(False, times, horizon)
        assert a == b
        assert len(a) > 20
        assert _run(True, times, horizon, ours=False) == b  # (run_until on SimPy's kernel too)


def test_environment_schedules_as_simpy():
    """Environment.timeout / schedule give SimPy's keys: the same (time, priority, id) entries
    in the same order, and the same error for a negative delay."""
    ours, ref = Environment(), simpy.Environment()
    for env in (ours, ref):
        env._now = 2.5
        env.timeout(1.0, "a")
        env.timeout(0.0)
        env.schedule(Wake(None), 0, 3.0)  # (URGENT)
        env.timeout(0.5, "b")
    assert [e[:3] for e in ours._queue] == [e[:3] for e in ref._queue]
    assert [e[:3] for e in sorted(ours._queue, key=lambda e: e[:3])] == [
        (2.5, 1, 1),
        (3.0, 1, 3),
        (3.5, 1, 0),
        (5.5, 0, 2),
    ]
    assert ours.now == ref.now == 2.5
    assert ours._queue[0][3].value is None and ours._queue[0][3].callbacks == []
    with pytest.raises(ValueError, match="Negative delay"):
        ref.timeout(-1.0)
    with pytest.raises(ValueError, match="Negative delay"):
        ours.timeout(-1.0)
