"""The replica core: one replica's continuous-batching iteration loop on SimPy's event kernel.

A replica runs iteration-level continuous batching (Orca/vLLM style). At every iteration
boundary its KV policy schedules the running requests (the decodes' KV, the next chunks of
partly prefilled prompts) and admits waiting requests first come first served; a request is
prefilled (in one iteration or in chunks), its last chunk's iteration yields its first token,
every later iteration one more, and it leaves after its last token. This module holds what
every replica does the same way, whatever its KV policy and its pool role:

* **planning a run** (:meth:`ReplicaCore.plan`): the general first iteration (with the
  prefill chunks) followed by ``k - 1`` identical decode steps, ending at the next completion,
  the hour boundary, or where the policy says the run must end (a step short of KV blocks, a
  waiting request that could join); ``k`` steps of ``n`` sequences whose context grows by ``n``
  per step take a closed-form time (:func:`fleetsim.device.latency.run_sums`), so one SimPy
  event marks the run's end. ``engine = "iteration"`` caps every run at one iteration (the
  per-iteration reference mode; everything else is shared);
* **cut points**: an arrival that could join mid-run cuts the run at the first boundary at or
  after its arrival where the policy admits it (:meth:`ReplicaCore._cut_point`);
* **committing** iterations ``[0, j)`` of a run (:meth:`ReplicaCore._commit`): first tokens,
  the decode set, and the work, energy and tokens of each hour (a step that straddles an hour
  is split by time share);
* **finishing** the sequences whose last token came out (:meth:`ReplicaCore._finish_due`);
* the run-end **events** (:mod:`fleetsim.serving.events`: light ``Wake`` entries on SimPy's
  queue, superseded by a token when a run is cut) and the port routers and autoscalers see
  (:class:`fleetsim.serving.ports.ReplicaPort`).

Bookkeeping is O(1) per iteration: the decoding sequences sit in a heap keyed by the global
iteration index at which they finish, and their total context is ``S + n * it`` with ``S`` the
sum of ``eff - join_it`` over the decode set.

**Sliding windows**: the decode set's attended keys of a model with window layers are kept by
the :class:`fleetsim.serving.windows.WindowedDecode` methods the core inherits (``xw`` is None
without windows, and none of them is called).

**The KV policy** (a class before the core in the replica's bases) decides what KV a request
holds and when: :class:`fleetsim.serving.kv_reserve.ReserveKV` (prompt + output reserved at
admission, ``kv_allocation = "reserve"``) or :class:`fleetsim.serving.kv_paged.PagedKV` (blocks
as written, preemption by recomputation, chunked prefill, prefix caching; the default). The core
calls only the methods of :class:`fleetsim.serving.kv_policy.KVPolicy`, which documents each. A
data-parallel replica with one scheduler per rank (the default) runs
:class:`fleetsim.serving.ranks.RankedPagedKV`, the paged policy per rank; it sets ``tpad``, the
tokens every rank runs in an iteration with prompt tokens, and ``p_full`` / ``pairs_full``, its
fullest rank's prompt tokens and pairs (-1 elsewhere: ``LatencyModel``'s own).

**The pool role** (:mod:`fleetsim.serving.roles`) decides what a finished request does: an
aggregated replica completes it (:meth:`ReplicaCore._finish_due`, here); a prefill-only replica
hands it to its pool and keeps its KV until the pool calls ``release``; a decode-only replica
admits requests whose prompt KV has arrived straight into the decode set.

Size: about 690 lines, over the project's ~600, because :meth:`ReplicaCore.plan` and
:meth:`ReplicaCore._commit` (about 300 lines together) are the engine's hand-inlined hot path,
one pass each with attributes read into locals (bench/RESULTS.md: the inlining pays); splitting
them would add calls per run. The window bookkeeping lives in :mod:`fleetsim.serving.windows`.

What a replica knows is in two parts: the
:class:`~fleetsim.serving.admission.EnginePlan`, fixed for the simulation (admission limits,
horizon, engine mode, energy coefficients), which the pod makes once and shares with its
replicas; and the replica's own mutable state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from heapq import heappop, heappush
from typing import TYPE_CHECKING

import simpy

from fleetsim.base.units import HOUR_S
from fleetsim.device.latency import LatencyModel, RunCoeffs, run_time, step_time, steps_to_reach
from fleetsim.serving.admission import EnginePlan
from fleetsim.serving.events import NORMAL, Wake, queue_of, wake_at
from fleetsim.serving.kv_policy import KVPolicy
from fleetsim.serving.request import Request
from fleetsim.serving.windows import WindowedDecode

if TYPE_CHECKING:
    from fleetsim.serving.ports import PodPort

_NO_COEFFS = RunCoeffs(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # a run with no decode steps


def _flop_j(cfg: EnginePlan, t: float, flops: float, expert_flops: float) -> float:
    """The FLOP terms' energy of a replica's span of ``t`` seconds at one compute utilisation
    (an iteration, or a run's decode steps at their mean) doing ``flops`` (``expert_flops``
    of them the routed experts'): ``(e_flop_j flops + e_xf_j expert_flops)`` times
    ``PowerSpec.compute_gain`` at ``u_c = flops / (e_peak_flops t)``, ``(1 + u0) / (u_c +
    u0)``; only with ``cfg.e_u0`` set."""
    u0 = cfg.e_u0
    assert u0 is not None
    e = cfg.e_flop_j * flops + cfg.e_xf_j * expert_flops
    if t <= 0.0:
        return e
    return e * (1.0 + u0) / (flops / (cfg.e_peak_flops * t) + u0)


class ReplicaCore(KVPolicy, WindowedDecode):
    """One model replica (``tp`` GPUs): the iteration loop its KV policy and role plug into
    (see the module's docstring for the methods they provide). Not used alone: the replica
    classes of :mod:`fleetsim.serving.roles` put a policy and a role before it."""

    __slots__ = (  # noqa: RUF023 (grouped by what they hold, not sorted)
        # fixed for the simulation
        "__weakref__",
        "_coeffs",
        "_eid",
        "_queue",
        "_wake_cbs",
        "cfg",
        "env",
        "index",
        "lat",
        "max_batch",
        "max_tokens",
        "pod",
        "rec",
        # the queue, the admitted requests and the decode set
        "S",
        "heap",
        "it",
        "n",
        "outstanding",
        "pre",
        "preempt_it",
        "waiting",
        # the iteration being planned (iteration 0 of the run)
        "P",
        "P_first",
        "budget",
        "hit_tok",
        "nchunks",
        "pairs",
        "pf",
        "planned",
        "re_tok",
        "tpad",
        "p_full",
        "pairs_full",
        # the run in progress: its first iteration and its k - 1 decode steps
        "B_first",
        "C_first",
        "L_first",
        "X_first",
        "W_first",
        "F_first",
        "T0",
        "busy",
        "c1",
        "coef",
        "cut_m",
        "cut_rt",
        "cut_x",
        "dec_s",
        "k",
        "n1",
        "run_end",
        "t_first",
        "g1",
        # (sliding windows: their five slots are WindowedDecode's, serving/windows.py)
        # _commit's cache: the hour h_cur = [h_end - HOUR_S, h_end) of its T0
        "h_cur",
        "h_end",
        # the pending SimPy event
        "armed_t",
        "token",
        # the pool role: a prefill-only replica's hand-off (serving/roles.py), else None
        "hand",
        # the KV policy's state (serving/kv_reserve.py, serving/kv_paged.py) and the decode
        # role's (serving/roles.py): declared here, as slots live in one class of the bases
        "NB",
        "adm_seq",
        "b",
        "cache",
        "chunked",
        "cnt2",
        "cum",
        "free",
        "g",
        "ht",
        "joined",
        "kv_cap",
        "kv_state",
        "kv_used",
        "lb",
        "lru",
        "lrub",
        "gf",
        "gw",
        "wn",
        "wci",
        "mask",
        "prefix",
        "q",
        "qc",
        "qv",
        "uq",
        "wm",
        "win",
        "wsat",
        "wcur",
        "wscale",
        # one scheduler per data-parallel rank (serving/ranks.py; unused on other replicas)
        "radm",
        "ranks",
        "rb",
        "rcap",
        "rp",
        "rpairs",
        "rrun",
        "rtok",
        # ... with a KV pool per rank (fleet.dp_kv_pool "per-rank"; else pools is None): the
        # ranks' pool states, the rank whose pool the pool attributes hold, the last iteration
        # each rank preempted in
        "kcur",
        "pools",
        "rpre",
    )

    def __init__(self, index: int, pod: PodPort, cfg: EnginePlan) -> None:
        self.index = index
        self.pod = pod
        self.cfg = cfg
        self.lat: LatencyModel = pod.lat
        self.env: simpy.Environment = pod.env
        self.rec = pod.rec
        self.max_batch = cfg.limits.max_batch
        self.max_tokens = cfg.limits.max_tokens
        self.waiting: deque[Request] = pod.shared_queue if pod.shared_queue is not None else deque()
        self.it = 0  # index of the next iteration to start
        self.n = 0  # decoding sequences
        self.S = 0.0  # sum(eff - join_it) over the decode set
        self.heap: list[tuple[int, int, Request]] = []  # (finish_it, rid, request)
        self.pre: list[Request] = []  # admitted, prefill not complete (admission order)
        self.pf: list[Request] = []  # of those, the ones whose last chunk is in iteration 0
        self.outstanding = 0  # routed and not finished (for least_loaded)
        # the last iteration whose scheduling preempted: nothing is admitted into it (vLLM V1's
        # scheduler takes waiting requests only ``if not preempted_reqs``), so a victim is not
        # taken back at once only to be preempted again (thrashing under KV pressure)
        self.preempt_it = -1
        self.busy = False
        self.planned = False  # iteration 0 of the current run is (partly) scheduled
        self.budget = 0  # tokens left in iteration 0
        self.P = 0  # prefill (chunk) tokens computed in iteration 0
        self.pairs = 0.0  # their attention pairs
        self.nchunks = 0
        self.P_first = 0  # prompt tokens of first-pass prefills completing in iteration 0
        self.hit_tok = 0  # their cached tokens
        self.re_tok = 0  # tokens recomputed (after a preemption) in iteration 0
        # the tokens every data-parallel rank runs in iteration 0 (LatencyModel.iteration's
        # t_pad); -1: the latency model's own padding (one rank, or the merged scheduler)
        self.tpad = -1
        # dp x the prompt tokens and pairs of its rank with the most (LatencyModel.iteration's
        # p_full, pairs_full: the prompt attention's fullest engine); -1: the model's split
        self.p_full = -1
        self.pairs_full = -1.0
        self.T0 = 0.0
        self.k = 0
        self.t_first = self.F_first = self.B_first = self.C_first = self.W_first = 0.0
        self.L_first = 0.0
        self.X_first = 0.0
        self.n1 = 0
        self.c1 = 0.0
        self.g1: float = 0  # the decode steps' ctx growth per step (n1 without windows)
        self.coef: RunCoeffs = _NO_COEFFS  # set with n1 and c1 when a run has decode steps
        self.run_end = 0.0
        self.dec_s = 0.0  # time of the run's decode steps 1..k-1
        self.cut_m = -1  # decode steps to the last cut point found, and their time
        self.cut_rt = 0.0
        self.cut_x = -1  # the policy's KV count for _commit(j) of that cut (-1: none)
        self.h_cur = 0
        self.h_end = HOUR_S
        self.armed_t: float | None = None
        self.token = 0
        # run-end events go straight onto the environment's queue (serving/events.py)
        self._queue = queue_of(self.env)
        self._eid = self.env._eid
        self._wake_cbs = [self._on_wake]
        self._coeffs = self.lat.coeff_cache  # run coefficients by batch size (filled by lat)
        self.hand: Callable[[Request, float, ReplicaCore], None] | None = None
        m = self.lat.model
        self.xw: tuple[int, float] | None = (
            (m.sliding_window_tokens, m.sliding_share) if m.sliding_share > 0.0 else None
        )
        self.xD = 0  # sum of eff - join_it - W over the sequences past their window
        self.xn = 0  # how many
        self.xheap: list[tuple[int, int, Request]] = []  # (iteration it passes W, rid, r)
        self.xin: dict[Request, int] = {}  # decode set -> that iteration (-1: past it)
        self._init_kv(cfg)

    # ---- the port (fleetsim.serving.ports.ReplicaPort) ----------------------------------------
    def join_queue(self, q: deque[Request]) -> None:
        """Take work from the pod's shared queue ``q`` (central_queue: a replica powered on)."""
        self.waiting = q

    def leave_queue(self) -> None:
        """Stop taking from the shared queue (a replica draining or off); a queue of its own."""
        self.waiting = deque()

    def is_empty(self) -> bool:
        """Nothing running, nothing admitted, nothing queued: it can be powered off."""
        return not self.busy and self.n == 0 and not self.pre and not self.waiting

    def stop(self) -> None:
        """The horizon: account the work of the run in progress, and finish nothing."""
        if self.busy and self.cfg.horizon_s > self.T0:
            self._commit(self.k, finish=False)

    def pending(self) -> list[Request]:
        """The requests it holds (admitted, decoding, and its own queue) at the horizon."""
        out = list(self.pre) + [e[2] for e in self.heap]
        if self.pod.shared_queue is None:
            out += list(self.waiting)
        return out

    # ---- planning -----------------------------------------------------------------------------
    def plan(self, T: float) -> None:
        """Plan the run that starts at boundary time ``T`` and arm its end event."""
        # hot path (once per run): attributes read once into locals; the same float operations
        # in the same order as every earlier version (bit-identical results)
        pod = self.pod
        cfg = self.cfg
        if cfg.horizon_s <= T:
            self.busy = False
            return
        it = self.it
        sq = pod.shared_queue
        if not self.planned:
            self.planned = True
            self._schedule_running(it)
        w = self.waiting
        # vLLM V1 admits no waiting request into a step that preempted; a step that preempted
        # every running request is empty, and the next one (at the same time) admits
        if w and self.budget > 0 and (self.preempt_it != it or not (self.n or self.nchunks)):
            if sq is None:
                self._admit(it)
            elif pod.queue_floor <= T:
                # a central queue is first come first served in time too: no admission before
                # the boundary at which an earlier head was admitted (it may lie ahead of now)
                q = len(w)
                self._admit(it)
                if len(w) < q:
                    pod.queue_floor = T
        pf = self.pf
        n = self.n
        nchunks = self.nchunks
        if not nchunks and n == 0:
            self.planned = False
            self.busy = False
            if w and sq is not None and pod.queue_floor > T:
                self._arm(pod.queue_floor)  # idle until the queue may move (see _on_wake)
            if sq:
                pod.router.dispatch()
            return
        self.busy = True
        self.T0 = T
        lat = self.lat
        S = self.S
        xw = self.xw
        ctx = S + n * it if xw is None else self._x_ctx(it)
        if nchunks:
            t1, F1, B1 = lat.iteration(
                self.P, self.pairs, nchunks, n, ctx, self.tpad, self.p_full, self.pairs_full
            )
            if cfg.track_comm:  # seconds of it in communication (PowerSpec.comm_w)
                # at the tokens its layers run: padded under data parallelism, as iteration()
                # times them
                tc = self.P + n if lat.dp <= 1 else lat.padded_tokens(self.P, nchunks, n, self.tpad)
                cm = lat._comm_cache.get(tc)  # (lat.comm_s, its cache read inline)
                self.C_first = cm if cm is not None else lat.comm_s(tc, nchunks + n)
            if cfg.track_loop:  # seconds of it in the fp8 fused-MoE K loop (PowerSpec.moe_loop_w)
                self.L_first = lat.moe_loop_iter_s(self.P, nchunks, n, self.tpad)
            if cfg.track_xf:  # its routed experts' FLOPs (PowerSpec.moe_compute_w)
                self.X_first = lat.expert_flops_iter(self.P, nchunks, n, self.tpad)
            if cfg.e_kv_j:  # its weight bytes: the rest of B1 is KV and state (PowerSpec.kv_w)
                # a dense model reads all its weights in every iteration (no call on the hot path)
                wd = lat.dense_weight_bytes
                self.W_first = wd if wd is not None else lat.weight_bytes_per_iteration(self.P + n)
        else:  # no prefill token (P == 0): the same numbers, cheaper
            t1, F1, B1 = lat.decode_step(n, ctx)
            # a pure decode step's communication seconds, fp8 K-loop seconds, routed-expert
            # FLOPs and weight bytes are its run coefficients' (LatencyModel.run_coeffs: the
            # same calls at the same token count, dp_padded_tokens(0, 0, n) under data
            # parallelism, as the branch above makes with P == 0); each is read only where its
            # term is on (cfg.track_comm, track_loop, track_xf, e_kv_j), so all four are set
            c0 = self._coeffs.get(n)
            if c0 is None:
                c0 = lat.run_coeffs(n)
            self.C_first = c0.comm_s
            self.L_first = c0.loop_s
            self.X_first = c0.expert_flops
            self.W_first = c0.weight_bytes
        self.t_first = t1
        self.F_first = F1
        self.B_first = B1
        heap = self.heap
        nxt = heap[0][0] if heap else 1 << 62
        S1 = S
        for r in pf:
            f = it + r.out - r.gen - 1
            if f < nxt:
                nxt = f
            S1 += r.eff - it
        n1 = n + len(pf)
        g1: float = n1
        e1 = 0
        if xw is not None:  # the decode steps end before the next sequence passes its window
            g1, e1, nxt = self._x_run(it, pf, n1, nxt)
        k = 1
        if not cfg.per_iteration and nxt > it and len(self.pre) == len(pf):
            k = self._run_length(it, n1, nxt - it + 1)
        end = T + t1
        dec = 0.0
        if k > 1:
            c1 = S1 + n1 * (it + 1)
            if xw is not None:  # less the share of the context beyond the window
                c1 -= xw[1] * e1
            coef = self._coeffs.get(n1)
            if coef is None:
                coef = lat.run_coeffs(n1)
            self.n1 = n1
            self.g1 = g1
            self.c1 = c1
            self.coef = coef
            H = self.h_end  # the end of T's hour (cached by _commit), else computed
            if T >= H:
                H = (T // HOUR_S + 1.0) * HOUR_S
            if end >= H:
                k = 1
            else:
                dec = run_time(coef, c1, g1, k - 1)
                if end + dec > H:  # the first decode step that reaches H ends the run
                    m, dec = steps_to_reach(coef, c1, g1, k - 1, end, H)
                    k = 1 + m
                end += dec
        self.dec_s = dec
        self.cut_m = -1
        self.k = k
        self.run_end = end
        armed = self.armed_t
        if armed is None or end < armed:  # _arm(end), inlined
            token = self.token + 1
            self.token = token
            self.armed_t = end
            now = self.env._now
            heappush(
                self._queue,
                (
                    now + (end - now if end > now else 0.0),
                    NORMAL,
                    next(self._eid),
                    Wake(self._wake_cbs, token),
                ),
            )
            self.rec.events += 1
        if sq:
            pod.router.dispatch()  # the new head of a central queue may fit elsewhere

    def _boundary(self, j: int) -> float:
        """Time of the run's iteration boundary ``j`` (0 <= j <= k). Always computed as
        ``(T0 + t_first) + run_time(j - 1)``, the same association as the run's end."""
        if j == 0:
            return self.T0
        t = self.T0 + self.t_first
        return t + run_time(self.coef, self.c1, self.g1, j - 1) if j > 1 else t

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
            if self.waiting and self.pod.shared_queue is not None:
                self.plan(self.env.now)  # an idle replica waiting for the central queue's floor
            return
        end = self.run_end
        if end != fired:  # the run end moved later (a cut): _arm(end) and wake_at, inlined
            # (0.6 per request in the default day: 1.8 calls per request less, bench/RESULTS.md)
            token = self.token + 1
            self.token = token
            self.armed_t = end
            now = self.env._now
            key = now + (end - now if end > now else 0.0)
            heappush(self._queue, (key, NORMAL, next(self._eid), Wake(self._wake_cbs, token)))
            self.rec.events += 1
            return
        self._commit(self.k)
        if self.n or self.pre or self.waiting or self.pod.shared_queue is not None:
            self.plan(end)
        else:  # nothing left to plan: what plan(end) would conclude, without the call (9,290
            self.busy = False  # of the 42,716 plans of the 21,556-request day end so)

    # ---- committing iterations ----------------------------------------------------------------
    def _commit(self, j: int, finish: bool = True, x: int = -1) -> None:
        """Account iterations [0, j) of the current run and advance the state past them.

        ``x``: the policy's KV count for the decode steps if known (>= 0; see ``cut_x``). With
        ``finish`` false (the end of the horizon) nothing completes: what was still running is
        left in flight, and only its work and energy are accounted."""
        # hot path (once per run): attributes read once into locals; the same float
        # operations in the same order (bit-identical results)
        rec = self.rec
        cfg = self.cfg
        T0 = self.T0
        it0 = self.it
        k = self.k
        pf = self.pf
        t_first = self.t_first
        ft = T0 + t_first
        npf = len(pf)
        n_first = self.n + npf
        # iteration 0: its last chunks yield their first token and join the decode set
        if npf:
            heap = self.heap
            S = self.S
            for r in pf:
                if r.gen == 0:
                    r.first_token_s = ft
                r.join_it = it0
                S += r.eff - it0
                heappush(heap, (it0 + r.out - r.gen - 1, r.rid, r))
            self.S = S
            if self.xw is not None:
                for r in pf:
                    self._x_join(r)
            self.n = n_first
            del self.pre[:npf]
            self.pf = []
        hours = rec.hours
        # the hours of T0 and ft: int(t // HOUR_S), from the cached bounds of T0's hour when
        # t lies in it (times only grow; the clamp to ``hours`` is never cached)
        h_end = self.h_end
        if h_end > T0:
            h = self.h_cur
        else:
            h = int(T0 // HOUR_S)
            if h > hours:
                h = hours
            else:
                self.h_cur = h
                self.h_end = h_end = (h + 1) * HOUR_S
        if ft < h_end:
            hf = h
        else:
            hf = int(ft // HOUR_S)
            if hf > hours:
                hf = hours
        rec.prompt_tokens[hf] += self.P_first
        rec.output_tokens[hf] += n_first
        hit = self.hit_tok
        if hit:
            rec.prefix_hit_tokens[hf] += hit
            self.hit_tok = 0
        re_tok = self.re_tok
        if re_tok:
            rec.recomputed_tokens[hf] += re_tok
            self.re_tok = 0
        # work of iterations [0, j): those wholly inside hour h, then a straddling last one
        H = (h + 1) * HOUR_S
        run_end = self.run_end
        last_straddles = j == k and run_end > H
        m_full = j - 1 if last_straddles else j
        rt = 0.0
        if m_full >= 1:
            t_sum, f_sum, b_sum = t_first, self.F_first, self.B_first
            if m_full > 1:
                xs = m_full - 1
                c = self.coef
                c1 = self.c1
                n1 = self.n1
                g1 = self.g1
                # the decode steps' time was summed when the run was planned or cut: reuse it
                if xs == k - 1:
                    rt = self.dec_s
                elif xs == self.cut_m:
                    rt = self.cut_rt
                else:
                    rt = run_time(c, c1, g1, xs)
                t_sum += rt
                sc = c1 * xs + g1 * (xs * (xs - 1) / 2.0)  # sum of their contexts
                f_sum += xs * c.fa + c.fb * sc
                b_sum += xs * c.ba + c.bb * sc
                # decode tokens of iterations [1, m_full): all end inside hour h
                rec.output_tokens[h] += n1 * xs
            rec.busy_s[h] += t_sum
            # KV and state bytes (PowerSpec.kv_w): the bytes beyond each iteration's weights
            kv = 0.0
            if cfg.e_kv_j:
                kv = b_sum - self.W_first
                if m_full > 1:
                    kv -= (m_full - 1) * self.coef.weight_bytes
            if cfg.track_comm:  # the communication seconds (PowerSpec.comm_w)
                cm = self.C_first
                if m_full > 1:
                    cm += (m_full - 1) * self.coef.comm_s
            else:
                cm = 0.0
            lp = 0.0
            if cfg.track_loop:  # the fp8 fused-MoE K-loop seconds (PowerSpec.moe_loop_w)
                lp = self.L_first
                if m_full > 1:
                    lp += (m_full - 1) * self.coef.loop_s
            xf = 0.0
            if cfg.track_xf:  # the routed experts' FLOPs (PowerSpec.moe_compute_w)
                xf = self.X_first
                if m_full > 1:
                    xf += (m_full - 1) * self.coef.expert_flops
            # the FLOP terms: linear, or saturating in the compute utilisation
            # (PowerSpec.compute_u0): the first iteration at its own, the decode steps after it
            # at theirs (their mean); the sum's order is the linear model's either way
            if cfg.e_u0 is None:
                e_f = cfg.e_flop_j * f_sum
                e_x = cfg.e_xf_j * xf
            else:
                e_f = _flop_j(cfg, t_first, self.F_first, self.X_first if xf else 0.0)
                if m_full > 1:
                    e_f += _flop_j(cfg, rt, f_sum - self.F_first, xf - self.X_first if xf else 0.0)
                e_x = 0.0
            rec.dyn_j[h] += (
                cfg.e_active_w * t_sum
                + e_f
                + cfg.e_byte_j * b_sum
                + cfg.e_kv_j * kv
                + cfg.e_comm_w * cm
                + cfg.e_loop_w * lp
                + e_x
                + cfg.e_host_j * m_full
            )
            rec.flops[h] += f_sum
            rec.bytes_moved[h] += b_sum
            if cm:
                rec.comm_s[h] += cm
            if lp:
                rec.moe_loop_s[h] += lp
            if xf:
                rec.expert_flops[h] += xf
            rec.iters_h[h] += m_full
        if last_straddles:
            if k == 1:
                t_l, f_l, b_l = t_first, self.F_first, self.B_first
                start = T0
            else:
                ctx = self.c1 + self.g1 * (k - 2)
                c = self.coef
                t_l = step_time(c, ctx)
                f_l = c.fa + c.fb * ctx
                b_l = c.ba + c.bb * ctx
                start = self._boundary(k - 1)
                rec.add_tokens(start + t_l, 0, self.n1)
            kv = 0.0
            if cfg.e_kv_j:
                kv = b_l - (self.W_first if k == 1 else self.coef.weight_bytes)
            cm = 0.0
            if cfg.track_comm:
                cm = self.C_first if k == 1 else self.coef.comm_s
            lp = 0.0
            if cfg.track_loop:
                lp = self.L_first if k == 1 else self.coef.loop_s
            xf = 0.0
            if cfg.track_xf:
                xf = self.X_first if k == 1 else self.coef.expert_flops
            # the FLOP terms: linear, or at this iteration's compute utilisation (compute_u0)
            if cfg.e_u0 is None:
                e_f = cfg.e_flop_j * f_l
                e_x = cfg.e_xf_j * xf
            else:
                e_f = _flop_j(cfg, t_l, f_l, xf)
                e_x = 0.0
            e_l = (
                cfg.e_active_w * t_l
                + e_f
                + cfg.e_byte_j * b_l
                + cfg.e_kv_j * kv
                + cfg.e_comm_w * cm
                + cfg.e_loop_w * lp
                + e_x
                + cfg.e_host_j
            )
            # into every hour it overlaps, by time share (it may span several: issue #16)
            rec.add_work_spread(h, start, t_l, e_l, f_l, b_l)
            if cm:
                rec.comm_s[h] += cm  # (a diagnostic: into the run's first hour)
            if lp:
                rec.moe_loop_s[h] += lp  # (likewise)
            if xf:
                rec.expert_flops[h] += xf  # (likewise)
            # counted in the hour its tokens are credited to (its end), like them
            rec.iters_h[min(int((start + t_l) // HOUR_S), hours)] += 1
        rec.iterations += j
        it = it0 + j
        self.it = it
        self.P = 0
        self.pairs = 0.0
        self.nchunks = 0
        self.P_first = 0
        self.planned = False
        if j < k:
            # boundary j: (T0 + t_first) + rt, with rt = run_time(j - 1) from above (j >= 2)
            T1 = self._boundary(j) if j < 2 else (T0 + t_first) + rt
        else:
            T1 = run_end
        self.T0 = T1
        self._commit_kv(j, it0, n_first, x, h, T1 - T0)
        if j >= k and finish:
            heap = self.heap
            if heap and heap[0][0] < it:
                self._finish_due()

    def _finish_due(self) -> None:
        """Retire every sequence whose last token came out in the iteration just committed: an
        aggregated replica frees its KV (the policy's ``_free_kv``) and completes it; a
        prefill-only replica (``hand``: its pool's hand-off, serving/roles.py) keeps its KV
        (``_keep_kv``) and hands it over."""
        # hot path (once per run that finishes requests): locals, and the role's choice as data
        # (``hand``), not a method call per request
        heap = self.heap
        it = self.it
        end = self.run_end
        n = self.n
        S = self.S
        hand = self.hand
        xw = self.xw
        if hand is not None:  # a prefill-only replica: the role's loop, without the locals below
            keep_kv = self._keep_kv
            while heap and heap[0][0] < it:
                f, _, r = heappop(heap)
                n -= 1
                S -= r.eff - r.join_it
                if xw is not None:
                    self._x_leave(r)
                keep_kv(r, f)
                hand(r, end, self)
            self.n = n
            self.S = 0.0 if n == 0 else S
            return
        free_kv = self._free_kv
        pod = self.pod
        complete = pod.rec.complete
        index = self.index
        while heap and heap[0][0] < it:
            f, _, r = heappop(heap)
            n -= 1
            S -= r.eff - r.join_it
            if xw is not None:
                self._x_leave(r)
            free_kv(r, f)
            self.outstanding -= 1
            complete(r, end, index)
            pod.in_flight -= 1
            if r.session is not None:
                pod.turn_done(r, end)
        self.n = n
        self.S = 0.0 if n == 0 else S  # no drift from float sums over a long day

    # ---- arrivals and cut points ----------------------------------------------------------------
    def on_arrival(self, r: Request) -> None:
        """A request routed to this replica arrives now: start a run if idle, else (alone in the
        queue) cut the current run where it can join; cut_for() inlined, the hot path."""
        self.outstanding += 1
        w = self.waiting
        w.append(r)
        if not self.busy:
            self.plan(self.env._now)
        elif len(w) == 1:
            j = self._cut_point(r)
            if j >= 0:
                if j > 0:
                    self._commit(j, True, self.cut_x)
                self.plan(self.T0)

    def _cut_point(self, r: Request) -> int:
        """The boundary j of the current run at which ``r`` (the queue's head, arriving now)
        could be admitted: 0 = into the first iteration (replan it), 1..k-1 = a cut, -1 = not
        before the run's end."""
        ta = self.env._now
        pod = self.pod
        if pod.shared_queue is not None and pod.queue_floor > ta:
            ta = pod.queue_floor
        # the first boundary at or after ta (0: r joins the run's first iteration: replan it)
        T0 = self.T0
        k = self.k
        if ta <= T0:
            if self._fits_now(r):
                return 0
            j = 1
        elif ta <= T0 + self.t_first:
            j = 1
        else:  # smallest j in [2, k] with boundary(j) >= ta
            m, rt = steps_to_reach(self.coef, self.c1, self.g1, k - 1, T0 + self.t_first, ta)
            self.cut_m = m  # remembered for _commit(j = m + 1): its decode time is rt
            self.cut_rt = rt
            j = 1 + m
        if j >= k:
            return -1  # the run ends first; its end admits the request
        return self._fit_cut(r, j)

    def admission_time(self, r: Request) -> tuple[float, bool]:
        """The earliest boundary at which ``r`` could be admitted here, and whether reaching it
        needs a cut (False: it is this run's end, where the replica looks at the queue anyway)."""
        if not self.busy:
            return max(self.env.now, self.pod.queue_floor), True
        j = self._cut_point(r)
        return (self.run_end, False) if j < 0 else (self._boundary(j), True)

    def cut_for(self, r: Request) -> None:
        """Cut the current run where ``r`` (the head of the queue) can join, and replan."""
        j = self._cut_point(r)
        if j < 0:
            return
        if j > 0:
            self._commit(j, True, self.cut_x)
        self.plan(self.T0)
