"""The serving engine of one replica on SimPy's event kernel (its pod is :mod:`.pod`).

A replica runs iteration-level continuous batching (Orca/vLLM style):

* at every iteration boundary, waiting requests are admitted first-come-first-served while the
  batch has fewer than ``max_batch_size`` sequences, the iteration's tokens stay within
  ``max_batched_tokens`` and the KV cache can reserve the request's prompt + output tokens
  (:class:`fleetsim.serving.admission.Limits`, the rule the real engine of
  ``fleetsim.calibrate.engine`` shares);
* an admitted request is prefilled in its first iteration, which also yields its first token;
  every later iteration yields one more token per sequence; a request leaves after its last token.

**Macro-stepping.** Between two composition changes (an admission, a completion, an hour
boundary) every iteration is a decode step of the same ``n`` sequences whose total context grows
by ``n`` per step, so ``k`` steps take a closed-form time
(:func:`fleetsim.device.latency.run_sums`). A replica therefore plans a *run*: one general
iteration (with the prefills) followed by ``k - 1`` identical decode steps ending at the next
completion, and sets one SimPy event at its end. An arrival that could join mid-run cuts the run
at the first iteration boundary at or after its arrival time (:meth:`Replica.on_arrival`).
``engine = "iteration"`` caps every run at one iteration: the per-iteration reference mode,
which shares every other line of code.

Bookkeeping is O(1) per iteration: the running sequences sit in a heap keyed by the global
iteration index at which they finish, and their total context is ``S + n * it`` with ``S`` the
sum of ``prompt - join_iteration`` over the batch.

What a replica knows is in two parts: the :class:`EnginePlan`, fixed for the whole simulation
(admission limits, horizon, engine mode, energy coefficients), which the pod makes once and
shares with its replicas; and the :class:`Replica`'s own mutable state (its queue, its decoding
sequences, and the run in progress). Routers and autoscalers use a replica only through
:class:`fleetsim.serving.ports.ReplicaPort`.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from heapq import heappush
from typing import TYPE_CHECKING

import simpy

from fleetsim.base.units import HOUR_S
from fleetsim.device.latency import LatencyModel, RunCoeffs, run_time, step_time, steps_to_reach
from fleetsim.serving.admission import Limits, PagedLimits
from fleetsim.serving.events import NORMAL, Wake, queue_of, wake_at
from fleetsim.serving.request import Request

if TYPE_CHECKING:
    from fleetsim.serving.ports import PodPort


_NO_COEFFS = RunCoeffs(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # a run with no decode steps


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """What the simulation fixes for every replica of a pod: read, never changed."""

    limits: Limits  # the admission rule
    horizon_s: float  # no run starts at or after it
    per_iteration: bool  # the per-iteration reference mode (every run is one iteration)
    # dynamic energy of a whole replica (see latency.PowerSpec): J = e_active_w * busy seconds
    # + e_flop_j * FLOPs + e_byte_j * bytes moved
    e_active_w: float
    e_flop_j: float
    e_byte_j: float
    paged: PagedLimits | None = None  # the paged engine's settings (serving/paged.py), or None


class Replica:
    """One model replica (``tp`` GPUs) with its continuous-batching engine."""

    __slots__ = (  # noqa: RUF023 (grouped by what they hold, not sorted)
        # fixed for the simulation
        "__weakref__",
        "_eid",
        "_queue",
        "_wake_cbs",
        "cfg",
        "env",
        "index",
        "lat",
        "limits",
        "pod",
        "rec",
        # disaggregated pools (serving/disagg.py); None/False in an aggregated fleet
        "handoff",
        "on_admitted",
        "ready_join",
        # the queue and the decoding sequences
        "S",
        "heap",
        "it",
        "kv_used",
        "n",
        "outstanding",
        "waiting",
        # the run in progress: its first iteration (prefills) and its k - 1 decode steps
        "B_first",
        "F_first",
        "P",
        "T0",
        "busy",
        "c1",
        "coef",
        "cut_m",
        "cut_rt",
        "dec_s",
        "k",
        "n1",
        "pairs",
        "pf",
        "run_end",
        "t_first",
        # the pending SimPy event
        "armed_t",
        "token",
    )

    def __init__(self, index: int, pod: PodPort, cfg: EnginePlan) -> None:
        self.index = index
        self.pod = pod
        self.cfg = cfg
        self.limits = cfg.limits
        self.lat: LatencyModel = pod.lat
        self.env: simpy.Environment = pod.env
        self.rec = pod.rec
        self.waiting: deque[Request] = pod.shared_queue if pod.shared_queue is not None else deque()
        # running decode set
        self.it = 0  # index of the next iteration to start
        self.n = 0  # decoding sequences
        self.S = 0.0  # sum(prompt - join_it) over decoding sequences
        self.heap: list[tuple[int, int, Request]] = []  # (finish_it, rid, request)
        self.kv_used = 0
        self.outstanding = 0  # routed and not finished (for least_loaded)
        # current run
        self.busy = False
        self.pf: list[Request] = []  # prefills of the run's first iteration
        self.P = 0  # their prompt tokens
        self.pairs = 0.0  # sum of squared prompt lengths
        self.T0 = 0.0
        self.k = 0
        self.t_first = self.F_first = self.B_first = 0.0
        self.n1 = 0
        self.c1 = 0.0
        self.coef: RunCoeffs = _NO_COEFFS  # set with n1 and c1 when a run has decode steps
        self.run_end = 0.0
        self.dec_s = 0.0  # time of the run's decode steps 1..k-1
        self.cut_m = -1  # decode steps to the last cut point found, and their time
        self.cut_rt = 0.0
        # the pending SimPy event
        self.armed_t: float | None = None
        self.token = 0
        # run-end events go straight onto the environment's queue (serving/events.py)
        self._queue = queue_of(self.env)
        self._eid = self.env._eid
        self._wake_cbs = [self._on_wake]
        # disaggregated pools (serving/disagg.py): a prefill-only replica hands each request to
        # its pool after the first token, keeping its KV until the pool calls release(); a
        # decode-only replica admits requests whose prompt KV has arrived straight into the
        # decode set, telling its pool which ones at what time. Aggregated: None, False.
        role = getattr(pod, "role", "both")
        self.handoff = pod.handoff if role == "prefill" else None  # type: ignore[attr-defined]
        self.ready_join = role == "decode"
        self.on_admitted = pod.on_admitted if role == "decode" else None  # type: ignore[attr-defined]

    # ---- the port (fleetsim.serving.ports.ReplicaPort) ----------------------------------------
    def join_queue(self, q: deque[Request]) -> None:
        """Take work from the pod's shared queue ``q`` (central_queue: a replica powered on)."""
        self.waiting = q

    def leave_queue(self) -> None:
        """Stop taking from the shared queue (a replica draining or off); a queue of its own."""
        self.waiting = deque()

    def is_empty(self) -> bool:
        """Nothing running, nothing admitted, nothing queued: it can be powered off."""
        # (outstanding and kv_used are 0 then in an aggregated fleet; in a disaggregated one
        # they also count KV held for, or in transfer to, this replica)
        return (
            not self.busy
            and self.n == 0
            and not self.pf
            and not self.waiting
            and self.outstanding == 0
            and self.kv_used == 0
        )

    def stop(self) -> None:
        """The horizon: account the work of the run in progress, and finish nothing."""
        if self.busy and self.cfg.horizon_s > self.T0:
            self._commit(self.k, finish=False)

    def pending(self) -> list[Request]:
        """The requests it holds (admitted, decoding, and its own queue) at the horizon."""
        out = list(self.pf) + [e[2] for e in self.heap]
        if self.pod.shared_queue is None:
            out += list(self.waiting)
        return out

    # ---- disaggregated pools ---------------------------------------------------------------------
    def _join_ready(self, T: float) -> None:
        """Decode-only replica: admit waiting requests whose prompt KV has arrived (first come,
        first served, while the batch, the token budget and the KV budget allow) straight into
        the decode set. Their first token came from the prefill pool, so the iteration starting
        at ``T`` makes their second token at context prompt + 1 (join_it = it - 1)."""
        w = self.waiting
        n = self.n
        kv = self.kv_used
        it = self.it
        lim = self.limits
        S = self.S
        heap = self.heap
        joined = []
        while w:
            r = w[0]
            if not lim.admits(n, n, kv, 1, r.need):  # one token per decoding sequence
                break
            w.popleft()
            kv += r.need
            n += 1
            r.join_it = it - 1
            S += r.prompt - (it - 1)
            heapq.heappush(heap, (it + r.out - 2, r.rid, r))
            joined.append(r)
        if joined:
            self.n = n
            self.S = S
            self.kv_used = kv
            self.on_admitted(joined, T, self)  # type: ignore[misc]

    def release(self, r: Request) -> None:
        """Prefill-only replica: the KV of handed-off request ``r`` (``r.pf_need`` tokens) has
        left; start the next run if the replica was waiting for the space."""
        self.kv_used -= r.pf_need  # type: ignore[attr-defined]
        self.outstanding -= 1
        if not self.busy:
            if self.pod.shared_queue is not None:
                self.pod.router.dispatch()
            elif self.waiting:
                self.plan(self.env.now)

    # ---- planning -----------------------------------------------------------------------------
    def plan(self, T: float) -> None:
        """Plan the run that starts at boundary time ``T`` and arm its end event."""
        pod = self.pod
        cfg = self.cfg
        if cfg.horizon_s <= T:
            self.busy = False
            return
        # admission, first-come-first-served: Limits.admits, hand-inlined here and in Pod._arrive
        # (Limits.servable), the hot path. Measured: 2% of the run's CPU time (default scenario
        # at 300k requests, 3 runs each on a loaded machine: 4.81 s user inlined, 4.92 s with
        # the calls). calibrate/engine.py and _cut_point call Limits.admits itself.
        w = self.waiting
        pf = self.pf
        if self.ready_join and w:
            self._join_ready(T)
        n = self.n
        if w and not self.ready_join:
            P = self.P
            kv = self.kv_used
            nt = n + len(pf)
            lim = self.limits
            max_batch, max_tokens, kv_cap = lim.max_batch, lim.max_tokens, lim.kv_cap
            shared = pod.shared_queue is not None
            while w:
                r = w[0]
                if nt >= max_batch or P + r.prompt + n > max_tokens or kv + r.need > kv_cap:
                    break
                w.popleft()
                pf.append(r)
                P += r.prompt
                self.pairs += float(r.prompt) * r.prompt
                kv += r.need
                nt += 1
                if shared:
                    self.outstanding += 1
            self.P = P
            self.kv_used = kv
        if not pf and n == 0:
            self.busy = False
            if pod.shared_queue:
                pod.router.dispatch()
            return
        self.busy = True
        self.T0 = T
        it = self.it
        lat = self.lat
        t1, F1, B1 = lat.iteration(self.P, self.pairs, len(pf), n, self.S + n * it)
        self.t_first = t1
        self.F_first = F1
        self.B_first = B1
        heap = self.heap
        nxt = heap[0][0] if heap else 1 << 62
        S1 = self.S
        for r in pf:
            f = it + r.out - 1
            if f < nxt:
                nxt = f
            S1 += r.prompt - it
        k = 1 if cfg.per_iteration else nxt - it + 1
        end = T + t1
        dec = 0.0
        if k > 1:
            n1 = n + len(pf)
            c1 = S1 + n1 * (it + 1)
            coef = lat.run_coeffs(n1)
            self.n1 = n1
            self.c1 = c1
            self.coef = coef
            H = (T // HOUR_S + 1.0) * HOUR_S
            if end >= H:
                k = 1
            else:
                dec = run_time(coef, c1, n1, k - 1)
                if end + dec > H:  # the first decode step that reaches H ends the run
                    m, dec = steps_to_reach(coef, c1, n1, k - 1, end, H)
                    k = 1 + m
                end += dec
        self.dec_s = dec
        self.cut_m = -1
        self.k = k
        self.run_end = end
        armed = self.armed_t
        if armed is None or end < armed:  # _arm(end), inlined
            self.token += 1
            self.armed_t = end
            now = self.env._now
            heappush(
                self._queue,
                (
                    now + (end - now if end > now else 0.0),
                    NORMAL,
                    next(self._eid),
                    Wake(self._wake_cbs, self.token),
                ),
            )
            self.rec.events += 1
        if pod.shared_queue:
            pod.router.dispatch()  # the new head of a central queue may fit elsewhere

    def _boundary(self, j: int) -> float:
        """Time of the run's iteration boundary ``j`` (0 <= j <= k). Always computed as
        ``(T0 + t_first) + run_time(j - 1)``, the same association as the run's end."""
        if j == 0:
            return self.T0
        t = self.T0 + self.t_first
        return t + run_time(self.coef, self.c1, self.n1, j - 1) if j > 1 else t

    # ---- events -------------------------------------------------------------------------------
    def _arm(self, t: float) -> None:
        """Make sure an event fires at ``t`` or earlier. An earlier pending event re-arms when
        it fires; a later one is superseded (its token no longer matches)."""
        if self.armed_t is not None and self.armed_t <= t:
            return
        self.token += 1
        self.armed_t = t
        wake_at(self.env, t, self._wake_cbs, self.token)
        self.rec.events += 1

    def _on_wake(self, ev: Wake) -> None:
        if ev.value != self.token:
            return  # superseded by an earlier event
        fired = self.armed_t
        self.armed_t = None
        if not self.busy:
            return
        if self.run_end != fired:
            self._arm(self.run_end)
            return
        end = self.run_end
        self._commit(self.k)
        self.plan(end)

    # ---- committing iterations ------------------------------------------------------------------
    def _commit(self, j: int, finish: bool = True) -> None:
        """Account iterations [0, j) of the current run and advance the state past them.

        With ``finish`` false (the end of the horizon) nothing completes: what was still
        running is left in flight, and only its work and energy are accounted."""
        rec = self.rec
        cfg = self.cfg
        T0 = self.T0
        it0 = self.it
        k = self.k
        pf = self.pf
        # iteration 0: its prefills yield their first token and join the decode set
        ft = T0 + self.t_first
        n_first = self.n + len(pf)
        if pf:
            heap = self.heap
            S = self.S
            for r in pf:
                r.first_token_s = ft
                r.join_it = it0
                S += r.prompt - it0
                heapq.heappush(heap, (it0 + r.out - 1, r.rid, r))
            self.S = S
            self.n = n_first
            self.pf = []
        hf = int(ft // HOUR_S)
        if hf > rec.hours:
            hf = rec.hours
        rec.prompt_tokens[hf] += self.P
        rec.output_tokens[hf] += n_first
        # work of iterations [0, j): those wholly inside hour h, then a straddling last one
        h = int(T0 // HOUR_S)
        if h > rec.hours:
            h = rec.hours
        H = (h + 1) * HOUR_S
        last_straddles = j == k and self.run_end > H
        m_full = j - 1 if last_straddles else j
        if m_full >= 1:
            t_sum, f_sum, b_sum = self.t_first, self.F_first, self.B_first
            if m_full > 1:
                xs = m_full - 1
                c = self.coef
                c1 = self.c1
                n1 = self.n1
                # the decode steps' time was summed when the run was planned or cut: reuse it
                if xs == k - 1:
                    rt = self.dec_s
                elif xs == self.cut_m:
                    rt = self.cut_rt
                else:
                    rt = run_time(c, c1, n1, xs)
                t_sum += rt
                sc = c1 * xs + n1 * (xs * (xs - 1) / 2.0)  # sum of their contexts
                f_sum += xs * c.fa + c.fb * sc
                b_sum += xs * c.ba + c.bb * sc
                # decode tokens of iterations [1, m_full): all end inside hour h
                rec.output_tokens[h] += self.n1 * xs
            rec.busy_s[h] += t_sum
            rec.dyn_j[h] += cfg.e_active_w * t_sum + cfg.e_flop_j * f_sum + cfg.e_byte_j * b_sum
            rec.flops[h] += f_sum
            rec.bytes_moved[h] += b_sum
            rec.iters_h[h] += m_full
        if last_straddles:
            if k == 1:
                t_l, f_l, b_l = self.t_first, self.F_first, self.B_first
                start = T0
            else:
                ctx = self.c1 + self.n1 * (k - 2)
                c = self.coef
                t_l = step_time(c, ctx)
                f_l = c.fa + c.fb * ctx
                b_l = c.ba + c.bb * ctx
                start = self._boundary(k - 1)
                rec.add_tokens(start + t_l, 0, self.n1)
            e_l = cfg.e_active_w * t_l + cfg.e_flop_j * f_l + cfg.e_byte_j * b_l
            # into every hour it overlaps, by time share (it may span several: issue #16)
            rec.add_work_spread(h, start, t_l, e_l, f_l, b_l)
            # counted in the hour its tokens are credited to (its end), like them
            rec.iters_h[min(int((start + t_l) // HOUR_S), rec.hours)] += 1
        rec.iterations += j
        self.it = it0 + j
        self.P = 0
        self.pairs = 0.0
        if j < k:
            # boundary j: (T0 + t_first) + rt, with rt = run_time(j - 1) from above (j >= 2)
            self.T0 = self._boundary(j) if j < 2 else (T0 + self.t_first) + rt
        else:
            self.T0 = self.run_end
            if finish:
                self._finish_due()

    def _finish_due(self) -> None:
        """Retire every sequence whose last token came out in the iteration just committed."""
        heap = self.heap
        it = self.it
        end = self.run_end
        hand = self.handoff
        while heap and heap[0][0] < it:
            _, _, r = heapq.heappop(heap)
            self.n -= 1
            self.S -= r.prompt - r.join_it
            if hand is not None:  # prefill-only: the pool moves the KV on, then release()s it
                hand(r, end, self)
                continue
            self.kv_used -= r.need
            self.outstanding -= 1
            self.pod.rec.complete(r, end, self.index)
            self.pod.in_flight -= 1
            if r.session is not None:
                self.pod.turn_done(r, end)
        if self.n == 0:
            self.S = 0.0  # no drift from float sums over a long day

    # ---- arrivals -----------------------------------------------------------------------------
    def on_arrival(self, r: Request) -> None:
        """A request routed to this replica arrives now: start a run if idle, else (alone in the
        queue) cut the current run where it can join; cut_for() inlined, the hot path."""
        self.outstanding += 1
        w = self.waiting
        w.append(r)
        if not self.busy:
            self.plan(self.env.now)
        elif len(w) == 1:
            j = self._cut_point(r)
            if j >= 0:
                if j > 0:
                    self._commit(j)
                self.plan(self.T0)

    def _cut_point(self, r: Request) -> int:
        """The boundary j of the current run at which ``r`` (arriving now) would be admitted:
        0 = into the first iteration (not started yet), 1..k-1 = a cut, -1 = not before the
        run's end."""
        ta = self.env.now
        T0 = self.T0
        k = self.k
        if ta <= T0:
            if self.limits.admits(
                self.n + len(self.pf), self.P + self.n, self.kv_used, self._tokens(r), r.need
            ):
                return 0
            j = 1
        elif ta <= T0 + self.t_first:
            j = 1
        else:  # smallest j in [2, k] with boundary(j) >= ta
            m, rt = steps_to_reach(self.coef, self.c1, self.n1, k - 1, T0 + self.t_first, ta)
            self.cut_m = m  # remembered for _commit(j = m + 1): its decode time is rt
            self.cut_rt = rt
            j = 1 + m
        if j >= k:
            return -1  # the run ends first; its end admits the request
        n_all = self.n + len(self.pf)
        ok = self.limits.admits(n_all, n_all, self.kv_used, self._tokens(r), r.need)
        return j if ok else -1

    def _tokens(self, r: Request) -> int:
        """Tokens ``r`` adds to its first iteration: its prompt, or one on a decode-only
        replica (the prompt's KV arrived from the prefill pool)."""
        return 1 if self.ready_join else r.prompt

    def admission_time(self, r: Request) -> tuple[float, bool]:
        """The earliest boundary at which ``r`` could be admitted here, and whether reaching it
        needs a cut (False: it is this run's end, where the replica looks at the queue anyway)."""
        if not self.busy:
            return self.env.now, True
        j = self._cut_point(r)
        return (self.run_end, False) if j < 0 else (self._boundary(j), True)

    def cut_for(self, r: Request) -> None:
        """Cut the current run where ``r`` (the head of the queue) can join, and replan."""
        j = self._cut_point(r)
        if j < 0:
            return
        if j > 0:
            self._commit(j)
        self.plan(self.T0)
