"""A pod of a disaggregated fleet: a prefill pool, a decode pool and the KV link between them.

The request path (DistServe, Splitwise, vLLM's disaggregated prefill):

1. A request arrives and the prefill pool's router sends it to a prefill replica. That replica
   runs the replica core with the prefill role (:class:`fleetsim.serving.roles.PrefillRole`)
   and the request's output set to one token, under the paged KV policy (chunked prefill,
   prefix caching) or, with ``kv_allocation = "reserve"``, the reserve policy. The iteration
   that computes the prompt's last chunk yields the first token, which ends the TTFT.
2. The replica then hands the request to the pod (``handoff``) instead of completing it. Its
   KV (prompt tokens x KV bytes per token; per layer kind for a model with sliding windows or
   linear-state layers: the prompt in the global layers, at most the window in the window
   layers, the constant state once per request, :meth:`fleetsim.config.pools.Pools.
   transfer_bytes`) stays in the prefill replica's memory (paged: its layer-blocks, the state's
   included, until ``release``; reserve: prompt + 1 tokens and the state). The decode
   router chooses a decode replica now (least loaded counts requests in transfer), and the KV
   goes over the prefill replica's link: a FIFO server, so a transfer that finds the link busy
   waits for the ones before it. Its time on an idle link is ``latency + bytes / bandwidth``.
3. When the KV has arrived, the request joins the decode replica's queue like an arrival (a
   composition change: the current decode run is cut at the first iteration boundary where it
   fits, so macro-stepping stays exact). The decode replica admits it when its batch, token
   budget and KV blocks allow, straight into the decode set (no prefill compute); the next
   iteration makes its second token (:class:`fleetsim.serving.roles.DecodeRole`: a
   preempted request is recomputed there).
4. Only at that admission does the prefill replica free the request's KV (``release``). A slow
   link or a full decode pool therefore holds KV in the prefill pool and backs up into it.

A request with a single output token completes at step 2 (nothing to transfer).

Counted at every moment: ``in_prefill`` (routed to the prefill pool, first token not out),
``in_transfer`` (handed off, KV not yet at the decode replica) and ``in_decode`` (KV arrived,
not finished), so that arrived = completed + rejected + in_prefill + in_transfer + in_decode.

Work, energy and tokens of each pool go to that pool's recorder (``rec_prefill``, and
``rec`` for the decode pool, which also holds the pod's arrivals, completions and latencies).
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from heapq import heappush
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from fleetsim.base.units import HOUR_S
from fleetsim.config.pools import Pools, PoolSpec
from fleetsim.config.resolved import Resolved
from fleetsim.serving.admission import EnginePlan, Limits, PagedLimits
from fleetsim.serving.autoscale import make_autoscaler
from fleetsim.serving.energy import energy_coeffs
from fleetsim.serving.events import NORMAL, Wake, queue_of, run_until
from fleetsim.serving.pod import paged_limits, reserve_kv, untimed_after
from fleetsim.serving.recorder import Recorder
from fleetsim.serving.request import Request
from fleetsim.serving.roles import PrefillRole, Replica, replica_class
from fleetsim.serving.routers import LeastLoaded, least_outstanding, make_router
from fleetsim.workload.sampling import SizeSampler, hourly_arrivals, trace_arrivals

if TYPE_CHECKING:
    from fleetsim.serving.ports import RouterPort


class DisaggRequest(Request):
    """A request of a disaggregated pod: its true output length while the prefill replica
    sees one token, the prefill replica that holds its KV, and its transfer."""

    __slots__ = (
        "dst",
        "kv_held",
        "kv_tokens",
        "kv_wlo",
        "link_wait_s",
        "out_total",
        "pf_need",
        "src",
        "xfer_bytes",
        "xfer_s",
    )

    def __init__(
        self, rid: int, arrival_s: float, prompt: int, out: int, ids: list[int] | None = None
    ) -> None:
        # Request.__init__ with out = 1 (the prefill pool makes the first token), inlined: once
        # per request on the disaggregated hot path
        self.rid = rid
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.out = 1
        self.need = prompt + 1
        self.join_it = -1
        self.first_token_s = math.nan
        self.ids = ids
        self.eff = prompt
        self.done = 0
        self.held = 0
        self.gen = 0
        self.adm = 0
        self.rho = 0
        self.preemptions = 0
        self.cached = 0
        self.rank = 0
        self.wlo = 0
        self.session = None
        self.out_total = out
        self.pf_need = self.need  # reserve policy: prompt + 1 tokens of KV held in prefill
        self.kv_tokens = 0  # paged policy: KV tokens held in the prefill replica after hand-off
        self.kv_held = 0  # paged policy: cached prefix blocks it references there
        self.kv_wlo = 0  # (and with windows its first referenced window part's id)
        self.src: PrefillRole | None = None
        self.dst: Replica | None = None
        self.xfer_s = math.nan  # hand-off to KV arrival: link wait + latency + bytes / bw
        self.xfer_bytes = 0.0  # the KV it sends over the link
        self.link_wait_s = math.nan  # time spent queued behind earlier transfers


def _request_cap(spec: PoolSpec) -> int:
    """The longest request (prompt + output tokens) a replica of pool ``spec`` holds."""
    kv = spec.rs.kv
    if kv is not None and (spec.rs.scenario.fleet.kv_allocation == "paged" or kv.state_tokens):
        return kv.request_tokens  # (per layer kind; a hybrid's with its state)
    return spec.kv_capacity_tokens


class _NoRouter:
    """The decode pool's replicas never see a shared queue (the KV travels to one replica)."""

    def dispatch(self) -> None:
        """Nothing to dispatch."""

    def route(self, r: Request) -> None:  # pragma: no cover - never called
        raise AssertionError("the decode pool is routed by DisaggPod")

    def active_changed(self) -> None:
        """Static pools."""


class Pool:
    """One pool as its replicas and router see their pod (serving/ports.py's PodPort). Pools
    are static: every replica is routable for the whole run."""

    def __init__(
        self, role: str, spec: PoolSpec, owner: DisaggPod, rec: Recorder, base: int
    ) -> None:
        rs = spec.rs
        self.role = role
        self.spec = spec
        self.env = owner.env
        self.rec = rec
        self.lat = rs.latency_model()
        self.hours = owner.hours
        self.horizon_s = owner.horizon_s
        self.in_flight = 0
        self.queue_floor = 0.0  # the central queue's floor (serving/core.py)
        paged = paged_limits(rs)  # None: kv_allocation = "reserve"
        self.paged: PagedLimits | None = paged
        self.tp = rs.tp
        self.plan = EnginePlan(
            limits=Limits(
                max_batch=spec.max_batch,
                max_tokens=spec.max_tokens,
                **reserve_kv(rs, spec.kv_capacity_tokens),
            ),
            horizon_s=owner.horizon_s,
            per_iteration=owner.per_iteration,
            paged=paged,
            **energy_coeffs(rs),
        )
        self.handoff = owner.handoff
        self.on_admitted = owner.on_admitted
        shared = role == "prefill" and spec.router == "central_queue"
        self.shared_queue: deque[Request] | None = deque() if shared else None
        cls = replica_class(paged is not None, role)
        self.kv_blocks = 0  # KV blocks of the pool's replicas (paged policy)
        if paged is not None:
            self.kv_blocks = rs.kv.blocks * spec.replicas
            rec.kv_blocks += self.kv_blocks
        self.replicas: list[Any] = [cls(base + i, self, self.plan) for i in range(spec.replicas)]
        self.owner = owner
        self.scaler = make_autoscaler(rs, self)  # None for a static pool
        n_on = len(self.replicas) if self.scaler is None else self.scaler.n_initial
        # the routable replicas, in index order: one list, changed in place by power_on/off
        self.active: list[Any] = self.replicas[:n_on]
        for rep in self.replicas[n_on:]:
            rep.leave_queue()
        self.router: RouterPort = _NoRouter()

    # the rest of the PodPort. A pool keeps at least one replica up in every hour (its schedule
    # is >= 1), so arrivals and KV always find one: nothing is ever held.
    def admit(self, r: Request) -> None:
        self.router.route(r)

    def hold(self) -> None:  # pragma: no cover - a pool's schedule is >= 1
        raise AssertionError("a pool always has a replica up")

    def release(self) -> None:
        """Nothing is held (see hold)."""

    def power_on(self, i: int) -> None:
        """Make replica ``i`` routable (its pool's autoscaler woke or undrained it)."""
        rep = self.replicas[i]
        if self.shared_queue is not None:
            rep.join_queue(self.shared_queue)
        act = self.active
        act.insert(bisect.bisect([r.index for r in act], rep.index), rep)
        self._changed()
        if self.shared_queue is not None:
            self.router.dispatch()

    def power_off(self, i: int) -> None:
        """Route nothing more to replica ``i``; it finishes its work (and, in the prefill pool,
        keeps the KV it holds until the decode pool has admitted it)."""
        rep = self.replicas[i]
        self.active.remove(rep)
        if self.shared_queue is not None:
            rep.leave_queue()
        self._changed()
        if not self.active:  # pragma: no cover - a pool's schedule is >= 1
            self.hold()

    def _changed(self) -> None:
        self.router.active_changed()
        if self.role == "decode":
            self.owner._dbuf = []  # buffered random draws were for the old number of replicas

    def turn_done(self, r: Request, end_s: float) -> None:  # pragma: no cover - no sessions
        raise NotImplementedError("sessions are not simulated on disaggregated pools")


class DisaggPod:
    """Simulates one pod of a disaggregated fleet for the scenario's horizon."""

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
        from fleetsim.serving.pod import pod_seed

        sc = rs.scenario
        pools: Pools = rs.pools
        self.rs = rs
        self.pools = pools
        self.index = pod_index
        self.hours = sc.simulation.hours
        self.horizon_s = self.hours * HOUR_S
        self.env = simpy.Environment()
        self.per_iteration = sc.simulation.engine == "iteration"
        self.rec = Recorder(self.hours, sc.slo.ttft_s, sc.slo.tpot_s, keep_hist, request_sink)
        self.rec_prefill = Recorder(self.hours, sc.slo.ttft_s, sc.slo.tpot_s, False, None)
        self.sink = request_sink
        P, D = pools.prefill.replicas, pools.decode.replicas
        base = pod_index * (P + D)  # global replica index: prefill first, then decode
        self.prefill = Pool("prefill", pools.prefill, self, self.rec_prefill, base)
        self.decode = Pool("decode", pools.decode, self, self.rec, base + P)
        seeds = pod_seed(sc.seed, pod_index).spawn(3)
        self.prefill.router = make_router(
            pools.prefill.router, self.prefill, np.random.default_rng(seeds[1])
        )
        self._proute = self.prefill.router.route  # (the router is set once, here)
        # least_loaded: its pick called directly on the routable replicas (LeastLoaded.route)
        self._pll: Sequence[Any] | None = (
            self.prefill.router.replicas if type(self.prefill.router) is LeastLoaded else None
        )
        self._drng = np.random.default_rng(seeds[2])
        self._dbuf: list[int] = []
        self._rr = -1
        self._droute = pools.decode.router
        self.max_context = rs.model.max_context_tokens
        # the KV link of each prefill replica: when it is next free (FIFO)
        self._link_free = [0.0] * P
        self._lat_s = pools.link.latency_s
        #: a prompt's KV bytes by layer kind (Pools.transfer_bytes)
        self._kv_of: Callable[[int], float] = pools.transfer_bytes
        #: its bytes per prompt token when every layer holds the whole prompt (Pools.
        #: transfer_bytes's first branch, without its lookups per request), else None
        self._kv_tok: float | None = (
            pools.kv_bytes_per_token if pools.decode.rs.model.kv_uniform else None
        )
        self._p0 = self.prefill.replicas[0].index  # the prefill pool's first replica index
        # the hand-off's events (serving/events.py Wakes, pushed inline; one list each)
        self._queue = queue_of(self.env)
        self._eid = self.env._eid
        self._arrived_cbs = [self._kv_arrived]
        self._release_cbs = [self._release]
        self._bw = pools.egress_bytes_per_s
        # transfer statistics by the hour in which the KV arrives
        n = self.hours + 1
        self.xfer_count = [0] * n
        self.xfer_bytes = [0.0] * n
        self.xfer_sum_s = [0.0] * n
        self.xfer_times: list[array] = [array("d") for _ in range(n)]
        self.in_prefill = 0
        self.in_transfer = 0
        self._moving: dict[int, DisaggRequest] = {}
        # arrivals (as serving.pod.Pod)
        rates = [rs.hourly_rate_per_s[h % 24] / n_pods for h in range(self.hours)]
        sampler = SizeSampler(sc.traffic.prompt, sc.traffic.output, source)
        if sc.traffic.trace:
            self._chunks = trace_arrivals(sc.traffic.trace, source, self.hours, pod_index, n_pods)
        else:
            self._chunks = hourly_arrivals(rates, sampler, seeds[0])
        self._progress = progress
        self._rid_base = pod_index << 40
        self._next = 0
        self._times: list[float] = []
        self._p: list[int] = []
        self._o: list[int] = []
        self._i = 0
        self._hour = -1
        # the next arrival, as a serving.events.Stream (see _schedule)
        self.next_t = math.inf
        self.next_eid = 0
        # the longest request each pool holds (per layer kind for a windowed model, paged)
        self.kv_cap_p = _request_cap(pools.prefill)
        self.kv_cap_d = _request_cap(pools.decode)
        # without chunked prefill a prompt longer than the prefill pool's token budget can never
        # be scheduled (with it, it is prefilled in chunks)
        pf_sc = pools.prefill.rs.scenario.fleet
        # (a data-parallel rank's share with a scheduler per rank: FleetSection.prompt_token_budget)
        self.max_tokens_p = pf_sc.prompt_token_budget if not pf_sc.chunked_prefill else 1 << 62
        self._ids: list[list[int]] | None = None

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

    def _schedule(self) -> None:
        """Set the next arrival: the pod is a serving.events.Stream that run_until processes in
        its turn, as if it were a Timeout(t - now) in the queue (counted as an event)."""
        env = self.env
        now = env._now
        t = self._times[self._i]
        self.next_t = now + (t - now if t > now else 0.0)
        self.next_eid = next(env._eid)
        self.rec.events += 1

    def _arrive(self) -> None:
        i = self._i
        t = self._times[i]
        p = self._p[i]
        o = self._o[i]
        rid = self._rid_base | self._next
        self._next += 1
        h = self._hour
        self.rec.arrived[h] += 1
        if (
            p + o > self.kv_cap_d
            or p + 1 > self.kv_cap_p
            or p > self.max_tokens_p
            or p + o > self.max_context
        ):
            self.rec.rejected[h] += 1
            if self.sink is not None:
                r = Request(rid, t, p, o)
                self.sink.add(r, -1, math.nan, math.nan, math.nan, math.nan, "rejected")
        else:
            self.in_prefill += 1
            self.prefill.in_flight += 1  # (what a reactive prefill pool scales on)
            ids = self._ids[i] if self._ids is not None else None
            pll = self._pll
            if pll is not None:
                least_outstanding(pll).on_arrival(DisaggRequest(rid, t, p, o, ids))
            else:
                self._proute(DisaggRequest(rid, t, p, o, ids))
        i += 1
        self._i = i
        times = self._times
        if i < len(times):  # _schedule(), inlined (as serving.pod.Pod._arrive's)
            t = times[i]
            env = self.env
            now = env._now
            self.next_t = now + (t - now if t > now else 0.0)
            self.next_eid = next(env._eid)
            self.rec.events += 1
        elif self._next_chunk():
            self._schedule()
        else:
            self.next_t = math.inf

    fire = _arrive

    # ---- the hand-off from prefill to decode -------------------------------------------------
    def _pick_decode(self) -> Replica:
        reps = self.decode.active
        rule = self._droute
        if rule == "least_loaded":
            return least_outstanding(reps)
        if rule == "round_robin":
            self._rr = (self._rr + 1) % len(reps)
            return reps[self._rr]
        if not self._dbuf:  # random
            self._dbuf = self._drng.integers(0, len(reps), size=4096).tolist()[::-1]
        return reps[self._dbuf.pop()]

    def handoff(self, r: DisaggRequest, t: float, rep: PrefillRole) -> None:
        """A prefill replica produced ``r``'s first token at ``t`` (now). Complete it if that was
        its only token, else start its KV transfer to the decode replica chosen now."""
        self.in_prefill -= 1
        self.prefill.in_flight -= 1
        r.src = rep
        out = r.out_total
        if out == 1:
            self.rec.complete(r, t, rep.index)
            rep.release(r)
            return
        r.out = out
        r.need = r.prompt + out
        # the decode replica: _pick_decode, its least_loaded rule called directly
        dst = least_outstanding(self.decode.active) if self._droute == "least_loaded" else None
        if dst is None:
            dst = self._pick_decode()
        dst.outstanding += 1  # counted from now, so that least_loaded sees transfers
        r.dst = dst
        k = rep.index - self._p0
        link_free = self._link_free
        free = link_free[k]
        start = free if free > t else t
        kv_tok = self._kv_tok
        nbytes = r.prompt * kv_tok if kv_tok is not None else self._kv_of(r.prompt)
        r.xfer_bytes = nbytes
        dur = self._lat_s + nbytes / self._bw  # on the link, FIFO
        end = start + dur
        link_free[k] = end
        wait = start - t
        r.link_wait_s = wait
        r.xfer_s = wait + dur  # (not end - t: that would round in the clock's digits)
        self.in_transfer += 1
        self._moving[r.rid] = r
        # wake_at(env, end, [_kv_arrived], r), inlined
        now = self.env._now
        key = now + (end - now if end > now else 0.0)
        heappush(self._queue, (key, NORMAL, next(self._eid), Wake(self._arrived_cbs, r)))
        self.rec.events += 1

    def _kv_arrived(self, ev) -> None:
        r: DisaggRequest = ev.value
        self.in_transfer -= 1
        del self._moving[r.rid]
        self.decode.in_flight += 1
        h = int(self.env._now // HOUR_S)
        if h > self.hours:
            h = self.hours
        self.xfer_count[h] += 1
        self.xfer_bytes[h] += r.xfer_bytes
        self.xfer_sum_s[h] += r.xfer_s
        self.xfer_times[h].append(r.xfer_s)
        dst = r.dst
        assert dst is not None
        # dst.on_arrival(r), inlined (once per request; its outstanding was counted at the
        # hand-off): start a run if idle, else (alone in the queue) cut the current run
        w = dst.waiting
        w.append(r)
        if not dst.busy:
            dst.plan(self.env._now)
        elif len(w) == 1:
            j = dst._cut_point(r)
            if j >= 0:
                if j > 0:
                    dst._commit(j, True, dst.cut_x)
                dst.plan(dst.T0)

    def on_admitted(self, joined: list, T: float, _rep: Replica) -> None:
        """A decode replica admitted ``joined`` at boundary ``T``: their KV leaves the prefill
        replicas then (now, or by an event at ``T`` when the boundary lies ahead)."""
        now = self.env._now
        if now >= T:
            for r in joined:
                r.src.release(r)
        else:  # wake_at(env, T, [_release], joined), inlined: its key, as T > now
            key = now + (T - now)
            heappush(self._queue, (key, NORMAL, next(self._eid), Wake(self._release_cbs, joined)))
            self.rec.events += 1

    @staticmethod
    def _release(ev) -> None:
        for r in ev.value:
            r.src.release(r)

    # ---- hours and the run --------------------------------------------------------------------
    def _tick(self, ev) -> None:
        self.rec.flush_until(ev.value)
        if self._progress is not None:
            self._progress(1)

    @property
    def replicas(self) -> list[Replica]:
        return self.prefill.replicas + self.decode.replicas

    @property
    def in_decode(self) -> int:
        return self.decode.in_flight

    def run(self) -> Recorder:
        env = self.env
        for h in range(1, self.hours):
            env.timeout(h * HOUR_S, h).callbacks.append(self._tick)
        if self._next_chunk():
            self._schedule()
        for pool in (self.prefill, self.decode):
            if pool.scaler is not None:
                pool.scaler.start()
        run_until(env, self.horizon_s, self)
        for rep in self.replicas:  # work still running at the horizon: account it
            rep.stop()
        for pool in (self.prefill, self.decode):
            if pool.scaler is not None:  # close the power-state intervals
                pool.scaler.finish()
        self.rec.flush_until(self.hours)
        if self._progress is not None:
            self._progress(1)
        if self.sink is not None:
            self._sink_in_flight()
        self.rec.in_flight = self.in_prefill + self.in_transfer + self.in_decode
        self.rec.iterations += self.rec_prefill.iterations
        self.rec.events += self.rec_prefill.events
        return self.rec

    def _sink_in_flight(self) -> None:
        sink = self.sink
        rows: list[tuple[Request, int]] = []
        for rep in self.replicas:
            rows += [(r, rep.index) for r in rep.pending()]
        rows += [(r, -1) for r in self.prefill.shared_queue or ()]
        rows += [(r, r.dst.index if r.dst else -1) for r in self._moving.values()]
        for r, idx in rows:
            untimed_after(r, self.horizon_s)
            sink.add(
                r, idx, math.nan, r.first_token_s - r.arrival_s, math.nan, math.nan, "in_flight"
            )

    def _power(self, pool: Pool) -> dict[str, list[float]]:
        """A pool's powered (on + waking), waking and off GPU-seconds per hour."""
        H = self.hours
        if pool.scaler is None:
            return {
                "powered_gpu_s": [pool.spec.replicas * pool.tp * HOUR_S] * H,
                "waking_gpu_s": [0.0] * H,
                "off_gpu_s": [0.0] * H,
            }
        powered, states = pool.scaler.gpu_seconds()
        return {"powered_gpu_s": powered[:H], **{k: v[:H] for k, v in states.items()}}

    def pool_state(self) -> dict:
        """Per-pool hourly work and the link's traffic, for the accounting (plain lists)."""
        H = self.hours
        xp99 = []
        xhist = []
        from fleetsim.serving.recorder import SparseHist, _hist

        for h in range(H):
            x = np.frombuffer(self.xfer_times[h], dtype=np.float64)
            xp99.append(float(np.percentile(x, 99)) if len(x) else math.nan)
            xhist.append(SparseHist(_hist(x)))
        out: dict = {}
        for name, pool in (("prefill", self.prefill), ("decode", self.decode)):
            rec = pool.rec
            out[name] = {
                "busy_s": rec.busy_s[:H],
                "dyn_j": rec.dyn_j[:H],
                "prompt_tokens": rec.prompt_tokens[:H],
                "output_tokens": rec.output_tokens[:H],
                **self._power(pool),
                "flops": rec.flops[:H],
                "bytes_moved": rec.bytes_moved[:H],
                "iters_h": rec.iters_h[:H],
                "prefix_hit_tokens": rec.prefix_hit_tokens[:H],
                "preemptions": rec.preemptions[:H],
                "kv_block_s": rec.kv_block_s[:H],
                "kv_blocks": pool.kv_blocks,
            }
        out["transfer"] = {
            "count": self.xfer_count[:H],
            "bytes": self.xfer_bytes[:H],
            "time_sum_s": self.xfer_sum_s[:H],
            "p99_s": xp99,
            "hist": xhist,
        }
        out["in_prefill"] = self.in_prefill
        out["in_transfer"] = self.in_transfer
        out["in_decode"] = self.in_decode
        return out
