"""One pod: a SimPy environment, its replicas, its router and its share of the traffic.

Pods are independent simulations (a Poisson stream split at random between pods gives
independent Poisson streams), so a fleet of many pods is simulated pod by pod, possibly on
different processes or machines, and the results are summed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
import simpy
from simpy.events import Timeout

from fleetsim.config.scenario import Resolved
from fleetsim.serving.autoscale import make_autoscaler
from fleetsim.serving.engine import Replica
from fleetsim.serving.paged import PagedReplica
from fleetsim.serving.recorder import Recorder
from fleetsim.serving.request import Request
from fleetsim.serving.routers import make_router
from fleetsim.workload.sampling import SizeSampler, hourly_arrivals, trace_arrivals
from fleetsim.workload.sessions import SessionSource

HOUR_S = 3600.0


def pod_seed(seed: int, pod: int) -> np.random.SeedSequence:
    """The seed of pod ``pod``: derived from the scenario seed and the pod's identity only, so
    results do not depend on the executor, the number of workers or the order of tasks."""
    return np.random.SeedSequence(seed, spawn_key=(pod,))


class Pod:
    """Simulates one pod for the scenario's horizon."""

    def __init__(
        self,
        rs: Resolved,
        pod_index: int,
        n_pods: int,
        *,
        keep_hist: bool = False,
        request_sink=None,
        progress: Callable[[int], None] | None = None,
        source: str = "",
    ) -> None:
        sc = rs.scenario
        self.rs = rs
        self.index = pod_index
        self.hours = sc.simulation.hours
        self.horizon_s = self.hours * HOUR_S
        self.env = simpy.Environment()
        self.lat = rs.latency_model()
        self.tp = rs.tp
        p = rs.gpu.power
        prof = rs.profile
        # dynamic energy coefficients of a whole replica (see latency.PowerSpec)
        self.e_active_w = rs.tp * p.active_w
        self.e_flop_j = p.compute_w / prof.peak_flops
        self.e_byte_j = p.memory_w / prof.mem_bw_bytes_per_s
        self.max_batch = sc.fleet.max_batch_size
        self.max_tokens = sc.fleet.max_batched_tokens
        self.kv_cap = rs.kv_capacity_tokens
        # second-generation engine (serving/paged.py)
        f = sc.fleet
        self.kv = rs.kv
        self.chunked = f.chunked_prefill
        self.prefix = f.prefix_caching
        self.kv_watermark = f.kv_watermark_fraction
        self.affinity_margin = f.prefix_affinity_margin
        ses = sc.traffic.sessions
        self.hash_tokens = ses.block_tokens if ses is not None else sc.traffic.trace_block_tokens
        self.refuse_long_prompts = not self.chunked
        replica_cls = PagedReplica if f.kv_allocation == "paged" else Replica
        self.max_context = rs.model.max_context_tokens
        self.per_iteration = sc.simulation.engine == "iteration"
        self.rec = Recorder(self.hours, sc.slo.ttft_s, sc.slo.tpot_s, keep_hist, request_sink)
        self.sink = request_sink
        self.in_flight = 0
        self.shared_queue: deque | None = deque() if sc.fleet.router == "central_queue" else None
        self.queue_floor = 0.0  # the latest boundary at which a head left the central queue
        base = pod_index * sc.fleet.replicas  # global replica index = pod * replicas + i
        self.replicas = [replica_cls(base + i, self) for i in range(sc.fleet.replicas)]
        if f.kv_allocation == "paged" and rs.kv is not None:
            self.rec.kv_blocks = rs.kv.blocks * len(self.replicas)
        self.active = self.replicas  # the routable replicas; an autoscaler keeps its own list
        self.scaler = make_autoscaler(rs, self)  # None for a static fleet
        seeds = pod_seed(sc.seed, pod_index).spawn(3)  # (the first two as spawn(2) gives)
        self.router = make_router(sc.fleet.router, self, np.random.default_rng(seeds[1]))
        rates = [rs.hourly_rate_per_s[h % 24] / n_pods for h in range(self.hours)]
        sampler = SizeSampler(sc.traffic.prompt, sc.traffic.output, source)
        self.sessions: SessionSource | None = None
        if ses is not None:  # multi-turn sessions: the Poisson process starts sessions
            self.sessions = SessionSource(
                ses,
                sc.traffic.prompt,
                sc.traffic.output,
                sampler,
                seeds[2],
                ses.block_tokens,
                pod_index,
            )
        if sc.traffic.trace:  # replay a timed trace instead of drawing arrivals
            self._chunks = trace_arrivals(sc.traffic.trace, source, self.hours, pod_index, n_pods)
        else:
            self._chunks = hourly_arrivals(rates, sampler, seeds[0])
        self._progress = progress
        self._rid_base = pod_index << 40
        self._next = 0
        self._times: list[float] = []
        self._p: list[int] = []
        self._o: list[int] = []
        self._ids: list[list[int]] | None = None
        self._i = 0
        self._hour = -1

    # ---- arrivals -----------------------------------------------------------------------------
    def _next_chunk(self) -> bool:
        for chunk in self._chunks:
            self._hour = chunk.hour
            if chunk.arrival_s:
                self._times, self._p, self._o, self._ids = (
                    chunk.arrival_s,
                    chunk.prompt_tokens,
                    chunk.output_tokens,
                    chunk.ids,
                )
                self._i = 0
                return True
        return False

    def _schedule_arrival(self) -> None:
        now = self.env.now
        t = self._times[self._i]
        Timeout(self.env, t - now if t > now else 0.0).callbacks.append(self._arrive)
        self.rec.events += 1

    def _arrive(self, _ev) -> None:
        i = self._i
        t = self._times[i]
        p = self._p[i]
        o = self._o[i]
        rid = self._rid_base | self._next
        self._next += 1
        h = self._hour
        self.rec.arrived[h] += 1
        ids = self._ids[i] if self._ids is not None else None
        ses = None
        if self.sessions is not None:
            ses = self.sessions.start(p, o)
            p, o, ids = self.sessions.turn(ses)
        if (
            p + o > self.kv_cap
            or (p > self.max_tokens and self.refuse_long_prompts)
            or p + o > self.max_context
        ):
            self.rec.rejected[h] += 1
            if self.sink is not None:
                r = Request(rid, t, p, o)
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "rejected")
        else:
            self.in_flight += 1
            r = Request(rid, t, p, o, ids)
            if ses is not None:
                r.session = ses
            self.router.route(r)
        i += 1
        self._i = i
        if i < len(self._times):  # _schedule_arrival(), inlined
            t = self._times[i]
            now = self.env.now
            Timeout(self.env, t - now if t > now else 0.0).callbacks.append(self._arrive)
            self.rec.events += 1
        elif self._next_chunk():
            self._schedule_arrival()

    # ---- sessions -----------------------------------------------------------------------------
    def turn_done(self, r: Request, end_s: float) -> None:
        """Turn ``r`` of a session finished at ``end_s``: its next turn comes after the think
        time (one arrival event, like any other)."""
        src = self.sessions
        assert src is not None and r.session is not None
        think = src.advance(r.session)
        if think is None or end_s + think >= self.horizon_s:
            return
        ev = Timeout(self.env, end_s + think - self.env.now, r.session)
        ev.callbacks.append(self._next_turn)
        self.rec.events += 1

    def _next_turn(self, ev) -> None:
        ses = ev.value
        src = self.sessions
        assert src is not None
        t = self.env.now
        p, o, ids = src.turn(ses)
        rid = self._rid_base | self._next
        self._next += 1
        h = int(t // HOUR_S)
        self.rec.arrived[h] += 1
        if (
            p + o > self.kv_cap
            or p + o > self.max_context
            or (p > self.max_tokens and self.refuse_long_prompts)
        ):
            self.rec.rejected[h] += 1  # the session ends here
            if self.sink is not None:
                r = Request(rid, t, p, o)
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "rejected")
            return
        self.in_flight += 1
        r = Request(rid, t, p, o, ids)
        r.session = ses
        self.router.route(r)

    # ---- hours --------------------------------------------------------------------------------
    def _tick(self, ev) -> None:
        h = ev.value
        self.rec.flush_until(h)
        if self._progress is not None:
            self._progress(1)

    # ---- run ----------------------------------------------------------------------------------
    def run(self) -> Recorder:
        env = self.env
        for h in range(1, self.hours):
            env.timeout(h * HOUR_S, h).callbacks.append(self._tick)
        if self._next_chunk():
            self._schedule_arrival()
        if self.scaler is not None:
            self.scaler.start()
        env.run(until=self.horizon_s)
        for rep in self.replicas:  # work still running at the horizon: account it, finish nothing
            if rep.busy and self.horizon_s > rep.T0:
                rep._commit(rep.k, finish=False)
        if self.scaler is not None:  # close the power-state intervals; held requests
            self.scaler.finish(self.sink)
        self.rec.flush_until(self.hours)
        if self._progress is not None:
            self._progress(1)
        if self.sink is not None:
            for rep in self.replicas:
                pending = rep.pending()
                if self.shared_queue is None:
                    pending += list(rep.waiting)
                for r in pending:
                    self.sink.add(
                        r,
                        rep.index,
                        math.nan,
                        r.first_token_s - r.arrival_s,
                        math.nan,
                        math.nan,
                        "in_flight",
                    )
            for r in self.shared_queue or ():
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "in_flight")
        self.rec.in_flight = self.in_flight
        return self.rec
