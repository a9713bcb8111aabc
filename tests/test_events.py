"""serving/events.py: cheap events and the merged arrival stream keep SimPy's order exactly."""

from __future__ import annotations

import heapq
import math

import numpy as np
import simpy

from fleetsim.serving.events import NORMAL, Wake, queue_of, run_until


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


def _run(cheap: bool, times: list[float], horizon: float) -> list:
    env = simpy.Environment()
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
