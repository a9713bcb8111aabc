"""One pod: a SimPy environment, its replicas, its router and its share of the traffic.

Pods are independent simulations (a Poisson stream split at random between pods gives
independent Poisson streams), so a fleet of many pods is simulated pod by pod, possibly on
different processes or machines, and the results are summed.

The pod owns the wiring of its parts and changes it only through its port
(:class:`fleetsim.serving.ports.PodPort`): an arrival is admitted (handed to the router) or held
(while no replica is up); an autoscaler powers replicas on and off, and the pod updates its list
of routable replicas, the shared queue's users and its router. Routers and the autoscaler never
touch each other or another object's attributes.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from heapq import heappush

import numpy as np
import simpy
from simpy.events import Timeout

from fleetsim.base.units import HOUR_S
from fleetsim.config.resolved import Resolved
from fleetsim.serving.admission import EnginePlan, Limits, PagedLimits
from fleetsim.serving.autoscale import make_autoscaler
from fleetsim.serving.energy import energy_coeffs
from fleetsim.serving.events import NORMAL, Wake, queue_of, run_until
from fleetsim.serving.ports import RequestSink
from fleetsim.serving.recorder import Recorder
from fleetsim.serving.request import Request
from fleetsim.serving.roles import Replica, make_replica
from fleetsim.serving.routers import make_router
from fleetsim.workload.sampling import HourChunk, SizeSampler, hourly_arrivals, trace_arrivals
from fleetsim.workload.sessions import Session, SessionSource


def pod_seed(seed: int, pod: int) -> np.random.SeedSequence:
    """The seed of pod ``pod``: derived from the scenario seed and the pod's identity only, so
    results do not depend on the executor, the number of workers or the order of tasks."""
    return np.random.SeedSequence(seed, spawn_key=(pod,))


def paged_limits(rs: Resolved) -> PagedLimits | None:
    """The paged KV policy's settings of a scenario (None: the reserve policy)."""
    f = rs.scenario.fleet
    if f.kv_allocation != "paged" or rs.kv is None:
        return None
    ses = rs.scenario.traffic.sessions
    m = rs.model
    b = f.block_size_tokens
    win: dict[str, int] = {}
    kv = rs.kv
    if m.n_sliding_layers or m.n_linear_layers:
        # a windowed or hybrid model: the pool in layer-blocks (config/resolved.py kv_budget),
        # a sequence holding its attention layers' blocks per kind plus its constant state
        nb = kv.layer_blocks
        win = {
            "win_blocks": nb,
            "win_watermark_blocks": int(f.kv_watermark_fraction * nb),
            "win_global_layers": m.n_global_attn_layers,
            "win_sliding_layers": m.n_sliding_layers,
            "win_cap_blocks": -(-m.sliding_window_tokens // b) + 1 if m.n_sliding_layers else 0,
            "win_window_tokens": m.sliding_window_tokens if m.n_sliding_layers else 0,
            "win_state_blocks": kv.state_blocks,
        }
    return PagedLimits(
        blocks=rs.kv.blocks,
        block_tokens=f.block_size_tokens,
        chunked=f.chunked_prefill,
        prefix=f.prefix_caching,
        watermark_blocks=int(f.kv_watermark_fraction * rs.kv.blocks),
        hash_tokens=ses.block_tokens if ses is not None else rs.scenario.traffic.trace_block_tokens,
        affinity_margin=f.prefix_affinity_margin,
        fifo_eviction=f.prefix_cache_eviction == "vllm",
        **win,
    )


def reserve_kv(rs: Resolved, kv_cap: int) -> dict[str, int]:
    """The reserve policy's ``Limits.kv_cap`` and ``kv_state``: ``kv_cap`` tokens (the
    replica's KV budget) and none per sequence, or for a hybrid model the cache in tokens of
    its attention layers and its constant state in those tokens (``KvBudget.attn_tokens``,
    ``state_tokens``)."""
    kv = rs.kv
    if kv is not None and kv.state_tokens:
        return {"kv_cap": kv.attn_tokens, "kv_state": kv.state_tokens}
    return {"kv_cap": kv_cap, "kv_state": 0}


def engine_plan(rs: Resolved, horizon_s: float) -> EnginePlan:
    """What every replica of the pod shares for the whole simulation: admission limits, the
    horizon, the mode and the dynamic-energy coefficients of one replica."""
    sc = rs.scenario
    return EnginePlan(
        limits=Limits(
            max_batch=sc.fleet.max_batch_size,
            max_tokens=sc.fleet.max_batched_tokens,
            **reserve_kv(rs, rs.kv_capacity_tokens),
        ),
        horizon_s=horizon_s,
        per_iteration=sc.simulation.engine == "iteration",
        paged=paged_limits(rs),
        dp_ranks=rs.dp if sc.fleet.dp_scheduler == "per-rank" else 1,
        dp_kv_per_rank=sc.fleet.dp_kv_pool == "per-rank",
        **energy_coeffs(rs),
    )


def untimed_after(r: Request, horizon_s: float) -> None:
    """A request in flight at the horizon whose first token came in the iteration that
    straddles it (``ReplicaCore.stop`` commits that iteration whole, its work past the horizon
    going to the dropped spill-over hour): the day did not see that token, so its record has no
    first token and no TTFT, as a request still queued."""
    if r.first_token_s > horizon_s:
        r.first_token_s = math.nan


class Pod:
    """Simulates one pod for the scenario's horizon."""

    def __init__(
        self,
        rs: Resolved,
        pod_index: int,
        n_pods: int,
        *,
        keep_hist: bool = False,
        request_sink: RequestSink | None = None,
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
        self.plan = engine_plan(rs, self.horizon_s)
        self.limits = self.plan.limits
        self.paged = self.plan.paged
        paged = self.paged is not None
        # without chunked prefill a prompt longer than the token budget can never be scheduled
        chunked = sc.fleet.chunked_prefill
        # (a data-parallel rank's share with a scheduler per rank: serving/ranks.py)
        self.max_prompt = sc.fleet.prompt_token_budget if not chunked else 1 << 62
        self.queue_floor = 0.0  # central queue: the latest boundary at which a head left it
        self.max_context = rs.model.max_context_tokens
        # prompt + output above this is refused: the KV capacity or the context window
        # (a windowed or hybrid model's longest request is counted per layer kind, a hybrid's
        # with its state: KvBudget.request_tokens; == kv_cap for every other reserve replica)
        cap = rs.kv.request_tokens if rs.kv is not None else self.limits.kv_cap
        self._max_tokens = min(cap, self.max_context)
        if paged and not chunked:
            # a request preempted as it decodes is prefilled again whole with the tokens it
            # generated (at most prompt + output - 1): longer could never be scheduled again
            # (config/resolve.py _check_recompute_fits; session turns grow past the check)
            self._max_tokens = min(self._max_tokens, self.max_prompt + 1)
        self.rec = Recorder(self.hours, sc.slo.ttft_s, sc.slo.tpot_s, keep_hist, request_sink)
        self.sink = request_sink
        self.in_flight = 0
        self.shared_queue: deque[Request] | None = (
            deque() if sc.fleet.router == "central_queue" else None
        )
        base = pod_index * sc.fleet.replicas  # global replica index = pod * replicas + i
        self.replicas: list[Replica] = [
            make_replica(base + i, self, self.plan) for i in range(sc.fleet.replicas)
        ]
        if paged and rs.kv is not None:
            self.rec.kv_blocks = rs.kv.blocks * len(self.replicas)
        self.scaler = make_autoscaler(rs, self)  # None for a static fleet
        n_on = len(self.replicas) if self.scaler is None else self.scaler.n_initial
        # the routable replicas, in index order: one list for the pod's life, changed in place
        # by power_on and power_off only (routers may keep a reference to it)
        self.active: list[Replica] = self.replicas[:n_on]
        for rep in self.replicas[n_on:]:
            rep.leave_queue()
        seeds = pod_seed(sc.seed, pod_index).spawn(3)  # (the first two as spawn(2) gives)
        self.router = make_router(sc.fleet.router, self, np.random.default_rng(seeds[1]))
        # arrivals go to the router, or are held while no replica is up (see hold/release)
        self.held: deque[Request] = deque()
        self.holding = False
        self._route: Callable[[Request], None] = self.router.route
        if self.scaler is None:  # (a static fleet: the routable replicas never change)
            self._route = self.router.direct() or self._route
        self._chunks: Iterator[HourChunk]
        self.sessions: SessionSource | None = None
        self._open_arrivals(rs, n_pods, source, seeds)
        self._progress = progress
        self._rid_base = pod_index << 40
        self._next = 0
        self._times: list[float] = []
        self._p: list[int] = []
        self._o: list[int] = []
        self._ids: list[list[int]] | None = None
        self._i = 0
        self._hour = -1
        # the next arrival, as a serving.events.Stream: processed by run_until in its turn
        # as if it were an event in the queue with key (next_t, NORMAL, next_eid)
        self.next_t = math.inf
        self.next_eid = 0
        self._ticks: list[tuple[float, int, int, Wake]] = []

    def _open_arrivals(
        self, rs: Resolved, n_pods: int, source: str, seeds: list[np.random.SeedSequence]
    ) -> None:
        """The pod's arrival stream: a timed trace, or the diurnal Poisson process (of
        requests, or of sessions whose later turns the pod schedules itself)."""
        sc = rs.scenario
        ses = sc.traffic.sessions
        pod_index = self.index
        rates = [rs.hourly_rate_per_s[h % 24] / n_pods for h in range(self.hours)]
        sampler = SizeSampler(sc.traffic.prompt, sc.traffic.output, source)
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

    # ---- the port (fleetsim.serving.ports.PodPort) --------------------------------------------
    def admit(self, r: Request) -> None:
        """Hand an arrival to the router, or hold it while no replica is up."""
        self._route(r)

    def hold(self) -> None:
        """No replica is up: from now on arrivals wait (in the shared queue under
        central_queue, else in ``held``) and each one tells the autoscaler."""
        if not self.holding:
            self.holding = True
            self._route = self._hold_one

    def release(self) -> None:
        """A replica is up again: arrivals go to the router, and so do the held ones."""
        if self.holding:
            self.holding = False
            self._route = self.router.route
            held, self.held = self.held, deque()
            for r in held:
                self._route(r)

    def _hold_one(self, r: Request) -> None:
        sq = self.shared_queue
        (sq if sq is not None else self.held).append(r)
        if self.scaler is not None:
            self.scaler.on_held()

    def power_on(self, i: int) -> None:
        """Make replica ``i`` routable (an autoscaler woke or undrained it)."""
        rep = self.replicas[i]
        if self.shared_queue is not None:
            rep.join_queue(self.shared_queue)
        act = self.active
        act.insert(bisect.bisect([r.index for r in act], rep.index), rep)
        self.release()
        self.router.active_changed()
        if self.shared_queue is not None:
            self.router.dispatch()

    def power_off(self, i: int) -> None:
        """Route nothing more to replica ``i`` (an autoscaler drains it); it finishes its work."""
        rep = self.replicas[i]
        self.active.remove(rep)
        if self.shared_queue is not None:
            rep.leave_queue()  # a draining replica stops taking from the central queue
        self.router.active_changed()
        if not self.active:
            self.hold()

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
        """Set the next arrival (the key a Timeout(t - now) would get; counted as an event)."""
        env = self.env
        now = env._now
        t = self._times[self._i]
        self.next_t = now + (t - now if t > now else 0.0)
        self.next_eid = next(env._eid)
        self.rec.events += 1

    def _arrive(self) -> None:
        """The next arrival is due (``fire``: called by run_until, the pod is its Stream)."""
        i = self._i
        times = self._times
        t = times[i]
        p = self._p[i]
        o = self._o[i]
        rid = self._rid_base | self._next
        self._next += 1
        h = self._hour
        rec = self.rec
        rec.arrived[h] += 1
        ids = self._ids[i] if self._ids is not None else None
        ses: Session | None = None
        if self.sessions is not None:
            ses = self.sessions.start(p, o)
            p, o, ids = self.sessions.turn(ses)
        # not Limits.servable, inlined: once per arrival (the gain: see ReserveKV._admit); with
        # chunked prefill a prompt longer than the token budget is served in chunks
        if p + o > self._max_tokens or p > self.max_prompt:
            rec.rejected[h] += 1
            if self.sink is not None:
                r = Request(rid, t, p, o)
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "rejected")
        else:
            self.in_flight += 1
            r = Request(rid, t, p, o, ids)
            if ses is not None:
                r.session = ses
            self._route(r)
        i += 1
        self._i = i
        if i < len(times):  # _schedule_arrival(), inlined
            t = times[i]
            env = self.env
            now = env._now
            self.next_t = now + (t - now if t > now else 0.0)
            self.next_eid = next(env._eid)
            rec.events += 1
        elif self._next_chunk():
            self._schedule_arrival()
        else:
            self.next_t = math.inf

    fire = _arrive

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

    def _next_turn(self, ev: Timeout) -> None:
        ses = ev.value
        assert isinstance(ses, Session)
        src = self.sessions
        assert src is not None
        t = self.env.now
        p, o, ids = src.turn(ses)
        rid = self._rid_base | self._next
        self._next += 1
        h = int(t // HOUR_S)
        self.rec.arrived[h] += 1
        if p + o > self._max_tokens or p > self.max_prompt:
            self.rec.rejected[h] += 1  # the session ends here
            if self.sink is not None:
                r = Request(rid, t, p, o)
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "rejected")
            return
        self.in_flight += 1
        r = Request(rid, t, p, o, ids)
        r.session = ses
        self._route(r)

    # ---- hours --------------------------------------------------------------------------------
    def _tick(self, h: int, _ev: Wake) -> None:
        self.rec.flush_until(h)
        if self._progress is not None:
            self._progress(1)
        if h + 1 < self.hours:  # the next hour's tick, with the key reserved for it in run()
            heappush(queue_of(self.env), self._ticks[h])

    # ---- run ----------------------------------------------------------------------------------
    def run(self) -> Recorder:
        env = self.env
        # the hour ticks: keys (time, priority, event id) drawn now, as env.timeout(h * HOUR_S)
        # would, but each pushed onto the queue only when the one before has fired: the same
        # order of events, with a queue 23 entries shorter (each push and pop is cheaper)
        self._ticks = [
            (env._now + h * HOUR_S, NORMAL, next(env._eid), Wake([partial(self._tick, h)]))
            for h in range(1, self.hours)
        ]
        if self._ticks:
            heappush(queue_of(env), self._ticks[0])
        if self._next_chunk():
            self._schedule_arrival()
        if not self.active:
            self.hold()
        if self.scaler is not None:
            self.scaler.start()
        run_until(env, self.horizon_s, self)
        for rep in self.replicas:  # work still running at the horizon: account it, finish nothing
            rep.stop()
        if self.scaler is not None:  # close the power-state intervals
            self.scaler.finish()
        if self.sink is not None:
            for r in self.held:
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "in_flight")
        self.rec.flush_until(self.hours)
        if self._progress is not None:
            self._progress(1)
        if self.sink is not None:
            for rep in self.replicas:
                for r in rep.pending():
                    untimed_after(r, self.horizon_s)
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
