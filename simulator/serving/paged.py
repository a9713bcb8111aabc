"""The second-generation engine of one replica: paged KV cache with preemption by recomputation,
chunked prefill and prefix caching, as vLLM's V1 engine serves (``kv_allocation = "paged"``).

**Paged KV.** The cache is ``blocks`` of ``b = block_size_tokens``. A sequence holding ``L``
tokens holds ``ceil(L / b)`` blocks, allocated as its tokens are written: a prefill chunk's
blocks when the chunk is scheduled, and one more block when a decoding sequence writes the first
token of a block. A decoding sequence that joined at iteration ``j`` with ``eff`` tokens writes
position ``eff + (it - j) - 1`` at iteration ``it``, so it needs a new block exactly at the
iterations ``it = rho (mod b)`` with ``rho = (j + 1 - eff) mod b``. The replica keeps the count
of decoding sequences per residue (``cnt``), so the blocks a run of ``m`` decode steps needs are
``(m // b) * n`` plus a partial sum of ``cnt``, and the first step at which they exceed the free
blocks is computed, not searched (:func:`first_short`). That step ends the run, like an
arrival's cut point; the next iteration preempts.

**Preemption by recomputation** (vLLM V1). When the running requests need blocks and none are
free (nor evictable), the most recently admitted running request loses its blocks and goes back
to the front of the waiting queue; when prefilled again its prompt is the original prompt plus
the tokens it had generated. Each is counted, and so are the recomputed tokens.

**Chunked prefill.** Each iteration has ``max_batched_tokens``: the running decodes take one
token each, then the partially prefilled requests and then the waiting ones take chunks, first
come first served, until the budget, ``max_batch_size`` or the free blocks run out. A chunk of
``c`` tokens after ``d`` tokens already in the cache is charged ``c x (2 d + c)`` attention
pairs, which sums to ``L^2`` over a whole prompt of ``L``: the model's full-square convention
(modelspec.py). TTFT ends with the iteration that processes the last chunk. Without chunking a
prompt is prefilled whole, and admitted only if it fits the iteration's budget.

**Prefix caching.** A request may carry ids of its prompt's blocks of ``hash_tokens`` tokens
(``g = hash_tokens / b`` KV blocks each; the id of a block stands for its tokens and all tokens
before it). Its cached prefix is its longest run of leading ids resident on the replica, capped
so that at least one prompt token is computed; only full blocks are cached. The scheduled
chunks' full blocks are published at once (as V1's ``allocate_slots`` caches blocks when it
allocates them). Resident blocks are reference counted; when no request references one it stays
cached, in LRU order, until space is needed: new blocks come from the free blocks first, then
from evicting the least recently released cached block. A hit skips the prefill compute of its
tokens, but the computed tokens still attend to them (the ``2 d`` in the pair count).

**Macro-stepping stays exact.** An iteration with a chunk (or a preemption) is a general
iteration and its own run; the pure decode iterations after it run as one macro-step until the
next completion, the hour boundary, the first step short of a block, or (with prefix caching)
the first step that would evict a block of the waiting head's cached prefix (the one event that
could let the head in mid-run). A waiting head that does not fit at a boundary cannot fit at a
later boundary of the same run: batch, budget and hits are constant and the free blocks only
shrink. ``engine = "iteration"`` runs every iteration as its own run with the same code, and
tests/test_engine_modes.py holds the two together.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import OrderedDict, deque
from heapq import heappop, heappush
from itertools import accumulate, islice
from typing import TYPE_CHECKING

import simpy

from fleetsim.device.latency import (
    LatencyModel,
    RunCoeffs,
    run_time,
    step_time,
    steps_to_reach,
)
from fleetsim.serving.events import NORMAL, Wake, queue_of, wake_at
from fleetsim.serving.request import Request

if TYPE_CHECKING:
    from fleetsim.serving.engine import EnginePlan
    from fleetsim.serving.ports import PodPort

HOUR_S = 3600.0
_NO_COEFFS = RunCoeffs(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # a run with no decode steps


def blocks_in(cnt: list[int], it: int, m: int, n: int) -> int:
    """New KV blocks that ``n`` decoding sequences with residue counts ``cnt`` need over the
    ``m`` iterations ``it .. it + m - 1`` (``len(cnt)`` is the block size, a power of two)."""
    b = len(cnt)
    q, rem = divmod(m, b)
    s = q * n
    mask = b - 1
    for i in range(rem):
        s += cnt[(it + i) & mask]
    return s


def first_short(cnt: list[int], it: int, n: int, avail: int) -> int:
    """The smallest ``m >= 1`` with ``blocks_in(cnt, it, m, n) > avail`` (0 if ``n == 0``): the
    first iteration, counted from ``it``, whose new blocks would exceed ``avail``."""
    if n == 0:
        return 0
    b = len(cnt)
    q, R = divmod(avail, n)
    acc = 0
    mask = b - 1
    for i in range(b):
        acc += cnt[(it + i) & mask]
        if acc > R:
            return q * b + i + 1
    raise AssertionError("cnt does not sum to n")  # pragma: no cover


def cumulative(cnt: list[int]) -> list[int]:
    """Prefix sums of ``cnt`` repeated twice: ``blocks_in`` and ``first_short`` in O(1) and
    O(log b) with them (:meth:`PagedReplica._blocks`, :meth:`PagedReplica._short`)."""
    return list(accumulate(cnt + cnt, initial=0))


class PagedReplica:
    """One model replica (``tp`` GPUs) with the paged, chunked, prefix-caching engine."""

    __slots__ = (
        "B_first",
        "F_first",
        "NB",
        "P",
        "P_first",
        "S",
        "T0",
        "__weakref__",
        "_coeffs",
        "_eid",
        "_queue",
        "_wake_cbs",
        "adm_seq",
        "armed_t",
        "b",
        "budget",
        "busy",
        "c1",
        "cache",
        "cfg",
        "chunked",
        "cnt2",
        "coef",
        "cum",
        "cut_m",
        "cut_rt",
        "cut_x",
        "dec_s",
        "env",
        "free",
        "g",
        "h_cur",
        "h_end",
        "heap",
        "hit_tok",
        "ht",
        "index",
        "it",
        "k",
        "lat",
        "lb",
        "lru",
        "mask",
        "max_batch",
        "max_tokens",
        "n",
        "n1",
        "nchunks",
        "outstanding",
        "pairs",
        "pf",
        "planned",
        "pod",
        "pre",
        "preempt_it",
        "prefix",
        "re_tok",
        "rec",
        "run_end",
        "t_first",
        "token",
        "waiting",
        "wm",
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
        kv = cfg.paged
        assert kv is not None
        b = kv.block_tokens
        self.b = b
        self.mask = b - 1
        self.NB = kv.blocks
        self.free = kv.blocks  # blocks holding nothing
        self.wm = kv.watermark_blocks
        self.chunked: bool = kv.chunked
        self.prefix: bool = kv.prefix
        self.ht = kv.hash_tokens
        self.g = max(1, kv.hash_tokens // b)
        self.cache: dict[int, int] = {}  # resident block id -> references
        self.lru: OrderedDict[int, None] = OrderedDict()  # unreferenced resident ids, LRU first
        # decoding sequences by block residue, written twice (cnt2[i] == cnt2[i + b]) so that a
        # run's partial sum is one slice: sum(cnt2[s : s + rem]) for any s < b, rem <= b
        self.cnt2 = [0] * (2 * b)
        self.cum: list[int] | None = None  # cumulative(cnt), None when cnt changed
        self.lb = b.bit_length() - 1  # log2(b)
        self.waiting: deque[Request] = pod.shared_queue if pod.shared_queue is not None else deque()
        self.it = 0
        self.n = 0
        self.S = 0.0  # sum(eff - join_it) over decoding sequences
        self.heap: list = []  # (finish_it, rid, request)
        self.pre: list[Request] = []  # admitted, prefill not complete (admission order)
        self.pf: list[Request] = []  # of those, the ones whose last chunk is in iteration 0
        self.outstanding = 0
        self.adm_seq = 0
        self.busy = False
        self.planned = False  # iteration 0 of the current run is (partly) scheduled
        self.budget = 0
        self.P = 0  # chunk tokens computed in iteration 0
        self.pairs = 0.0
        self.nchunks = 0
        self.P_first = 0  # prompt tokens of first-pass prefills completing in iteration 0
        self.hit_tok = 0  # their cached tokens
        self.re_tok = 0  # tokens recomputed (after a preemption) in iteration 0
        # the last iteration whose scheduling preempted: nothing is admitted into it (vLLM V1's
        # scheduler takes waiting requests only ``if not preempted_reqs``), so a victim is not
        # taken back at once only to be preempted again (thrashing under KV pressure)
        self.preempt_it = -1
        self.T0 = 0.0
        self.k = 0
        self.t_first = self.F_first = self.B_first = 0.0
        self.n1 = 0
        self.c1 = 0.0
        self.coef: RunCoeffs = _NO_COEFFS  # set with n1 and c1 when a run has decode steps
        self.run_end = 0.0
        self.dec_s = 0.0
        self.cut_m = -1
        self.cut_rt = 0.0
        self.cut_x = -1  # _cut_point's block count for _commit(j) (-1: none)
        self.armed_t: float | None = None
        self.token = 0
        self.h_cur = 0  # _commit's cache: the hour h_cur = [h_end - HOUR_S, h_end) of its T0
        self.h_end = HOUR_S
        # run-end events go straight onto the environment's queue (serving/events.py)
        self._queue = queue_of(self.env)
        self._eid = self.env._eid
        self._wake_cbs = [self._on_wake]
        self._coeffs = self.lat.coeff_cache  # run coefficients by batch size (filled by lat)

    # ---- blocks -------------------------------------------------------------------------------
    def used_blocks(self) -> int:
        """Blocks referenced by running requests (not counting unreferenced cached blocks)."""
        return self.NB - self.free - self.g * len(self.lru)

    def _take(self, x: int) -> None:
        """Allocate ``x`` blocks: free ones first, then evict least recently used cached ones."""
        f = self.free
        if x <= f:
            self.free = f - x
            return
        x -= f
        g = self.g
        e = -(-x // g)
        lru = self.lru
        cache = self.cache
        for _ in range(e):
            h, _v = lru.popitem(last=False)
            del cache[h]
        self.free = e * g - x

    def _blocks(self, it: int, m: int, n: int) -> int:
        """:func:`blocks_in` of the replica's decoding sequences (``n`` of them)."""
        cum = self.cum
        if cum is None:
            cum = self.cum = list(accumulate(self.cnt2, initial=0))
        s = it & self.mask
        return (m >> self.lb) * n + cum[s + (m & self.mask)] - cum[s]

    def _short(self, it: int, n: int, avail: int) -> int:
        """:func:`first_short` of the replica's decoding sequences (``n`` of them)."""
        if n == 0:
            return 0
        cum = self.cum
        if cum is None:
            cum = self.cum = list(accumulate(self.cnt2, initial=0))
        q, R = divmod(avail, n)
        s = it & self.mask
        return (q << self.lb) + bisect_right(cum, cum[s] + R, s) - s

    def _lookup(self, r: Request) -> tuple[int, int]:
        """(cached leading blocks of ``r``, how many of them are unreferenced)."""
        ids = r.ids
        if ids is None or not self.prefix:
            return 0, 0
        ht = self.ht
        cap = min(len(ids), r.prompt // ht, (r.eff - 1) // ht)
        cache = self.cache
        H = ev = 0
        while cap > H:
            ref = cache.get(ids[H])
            if ref is None:
                break
            if ref == 0:
                ev += 1
            H += 1
        return H, ev

    def _acquire(self, ids: list[int], H: int) -> None:
        cache = self.cache
        lru = self.lru
        for j in range(H):
            h = ids[j]
            ref = cache[h]
            if ref == 0:
                del lru[h]
            cache[h] = ref + 1

    def _register(self, r: Request, f: int) -> None:
        """Publish ``r``'s full blocks ``held .. f - 1``; one already resident (published by a
        concurrent request) is shared and the copy just computed is released."""
        ids = r.ids
        assert ids is not None
        cache = self.cache
        for j in range(r.held, f):
            h = ids[j]
            ref = cache.get(h)
            if ref is None:
                cache[h] = 1
            else:
                if ref == 0:
                    del self.lru[h]
                cache[h] = ref + 1
                self.free += self.g
        r.held = f

    def _drop(self, r: Request, tokens: int) -> None:
        """Free the blocks of ``r``, which holds ``tokens`` tokens of KV: its own blocks become
        free, its cached blocks lose a reference (the last block first, as vLLM frees them)."""
        H = r.held
        self.free += -(-tokens // self.b) - H * self.g
        if H:
            ids = r.ids
            assert ids is not None
            cache = self.cache
            lru = self.lru
            for j in range(H - 1, -1, -1):
                h = ids[j]
                ref = cache[h] - 1
                cache[h] = ref
                if ref == 0:
                    lru[h] = None
            r.held = 0

    # ---- preemption ---------------------------------------------------------------------------
    def _preempt_last(self, it: int, after_alloc: bool) -> Request:
        """Preempt the most recently admitted running request (vLLM V1's policy); ``after_alloc``:
        the decodes' blocks of iteration ``it`` are already allocated."""
        self.preempt_it = it
        victim = self.pre[-1] if self.pre else None
        dec = None
        for e in self.heap:
            r = e[2]
            if dec is None or r.adm > dec.adm:
                dec = r
        if dec is not None and (victim is None or dec.adm > victim.adm):
            r = dec
            self._drop(r, r.eff + (it - r.join_it if after_alloc else it - 1 - r.join_it))
            self.n -= 1
            self.S -= r.eff - r.join_it
            self.cnt2[r.rho] -= 1
            self.cnt2[r.rho + self.b] -= 1
            self.cum = None
            self.heap = [e for e in self.heap if e[2] is not r]
            heapq.heapify(self.heap)
            r.gen += it - r.join_it
            r.eff = r.prompt + r.gen
            if after_alloc:
                self.budget += 1  # it no longer decodes in this iteration
            if self.n == 0:
                self.S = 0.0
        else:
            assert victim is not None
            r = victim
            self._drop(r, r.done)
            self.pre.pop()
        r.done = 0
        r.preemptions += 1
        self.waiting.appendleft(r)
        pod = self.pod
        if pod.shared_queue is not None:
            self.outstanding -= 1
        h = int(self.env._now // HOUR_S)
        rec = self.rec
        rec.preemptions[h if h < rec.hours else rec.hours] += 1
        return r

    # ---- scheduling one iteration -------------------------------------------------------------
    def _chunk(self, r: Request, c: int, it: int) -> None:
        """Schedule ``c`` prefill tokens of ``r`` (its blocks already allocated)."""
        done = r.done
        self.P += c
        self.pairs += c * (2.0 * done + c)
        self.nchunks += 1
        if r.preemptions:
            self.re_tok += c
        nd = done + c
        r.done = nd
        ids = r.ids
        if ids is not None and self.prefix:
            f = nd // self.ht
            fmax = min(len(ids), r.prompt // self.ht)
            if f > fmax:
                f = fmax
            if f > r.held:
                self._register(r, f)
        if nd == r.eff:  # the last chunk: it decodes from the next iteration on
            self.pf.append(r)
            rho = (it + 1 - nd) & self.mask
            r.rho = rho
            self.cnt2[rho] += 1
            self.cnt2[rho + self.b] += 1
            self.cum = None
            if r.gen == 0:
                self.P_first += r.prompt
                self.hit_tok += r.cached

    def _schedule_running(self, it: int) -> None:
        """Decodes' blocks, then chunks of the partially prefilled requests (preempting the most
        recent running requests while blocks are short)."""
        mask = self.mask
        g = self.g
        if self.n:
            d = self.cnt2[it & mask]
            if d:
                while d > self.free + g * len(self.lru):
                    self._preempt_last(it, False)
                    d = self.cnt2[it & mask]
                self._take(d)
        self.budget = self.max_tokens - self.n
        b = self.b
        i = 0
        pre = self.pre
        while i < len(pre) and self.budget > 0:
            r = pre[i]
            done = r.done
            rem = r.eff - done
            budget = self.budget
            c = rem if rem < budget else budget
            need = -(-(done + c) // b) - -(-done // b)
            preempted = False
            while need > self.free + g * len(self.lru):
                if self._preempt_last(it, True) is r:
                    preempted = True
                    break
            if preempted:
                break
            self._take(need)
            self.budget -= c
            self._chunk(r, c, it)
            i += 1

    def _admit(self, it: int) -> None:
        """Admit waiting requests, first come first served, into iteration ``it``."""
        w = self.waiting
        shared = self.pod.shared_queue is not None
        nt = self.n + len(self.pre)
        budget = self.budget
        b = self.b
        g = self.g
        ht = self.ht
        max_batch = self.max_batch
        chunked = self.chunked
        prefix = self.prefix
        while w and nt < max_batch and budget > 0:
            r = w[0]
            if r.ids is None or not prefix:
                # no prefix-cache path: _lookup, _take and _chunk hand-inlined (the default
                # scenario's requests carry no block ids); the same operations in the same order
                eff = r.eff
                c = eff
                if eff > budget:
                    if not chunked:
                        break
                    c = budget
                need = -(-c // b)
                free = self.free
                lru = self.lru
                if need > free + (g * len(lru) if lru else 0) - (self.wm if nt else 0):
                    break
                w.popleft()
                if shared:
                    self.outstanding += 1
                # (r.held is 0 and r.cached stays 0: it holds no cached blocks on this path)
                pre_n = r.preemptions
                self.adm_seq += 1
                r.adm = self.adm_seq
                self.pre.append(r)
                if need <= free:
                    self.free = free - need
                else:
                    self._take(need)
                self.P += c
                self.pairs += c * (2.0 * 0 + c)
                self.nchunks += 1
                if pre_n:
                    self.re_tok += c
                r.done = c
                if c == eff:  # the last chunk: it decodes from the next iteration on
                    self.pf.append(r)
                    rho = (it + 1 - c) & self.mask
                    r.rho = rho
                    cnt2 = self.cnt2
                    cnt2[rho] += 1
                    cnt2[rho + b] += 1
                    self.cum = None
                    if r.gen == 0:
                        self.P_first += r.prompt
                        self.hit_tok += r.cached
                budget -= c
                nt += 1
                continue
            H, ev = self._lookup(r)
            done = H * ht
            rem = r.eff - done
            if rem <= budget:
                c = rem
            elif chunked:
                c = budget
            else:
                break
            need = -(-(done + c) // b) - H * g
            if need > self.free + g * (len(self.lru) - ev) - (self.wm if nt else 0):
                break
            w.popleft()
            if shared:
                self.outstanding += 1
            if H:
                assert r.ids is not None
                self._acquire(r.ids, H)
            r.held = H
            r.done = done
            if r.gen == 0 and r.preemptions == 0:
                r.cached = done
            self.adm_seq += 1
            r.adm = self.adm_seq
            self.pre.append(r)
            self._take(need)
            self._chunk(r, c, it)
            budget -= c
            nt += 1
        self.budget = budget

    def _fits_now(self, r: Request) -> bool:
        """Whether ``r`` (the queue's head) would be admitted into the iteration being planned
        (the test of :meth:`_admit`)."""
        nt = self.n + len(self.pre)
        budget = self.budget
        if nt >= self.max_batch or budget <= 0:
            return False
        if self.preempt_it == self.it and (self.n or self.nchunks):
            return False  # the rule of plan(): nothing joins a step that preempted
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        done = H * self.ht
        rem = r.eff - done
        if rem <= budget:
            c = rem
        elif self.chunked:
            c = budget
        else:
            return False
        need = -(-(done + c) // self.b) - H * self.g
        return need <= self.free + self.g * (len(self.lru) - ev) - (self.wm if nt else 0)

    def _fit_at(self, r: Request, n: int, x: int) -> bool:
        """Whether ``r``, the queue's head, would be admitted at a boundary of the current pure
        decode run of ``n`` sequences by which the decodes have taken ``x`` more blocks (taking
        free blocks first, then evicting the least recently used cached ones, perhaps some of
        ``r``'s cached prefix)."""
        if n >= self.max_batch:
            return False
        budget = self.max_tokens - n
        if budget <= 0:
            return False
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        g = self.g
        over = x - self.free
        if over > 0 and ev:
            gone = set(islice(self.lru, -(-over // g)))
            ids = r.ids
            assert ids is not None
            cache = self.cache
            h = e = 0
            while h < H:
                key = ids[h]
                if key in gone:
                    break
                if cache[key] == 0:
                    e += 1
                h += 1
            H, ev = h, e
        done = H * self.ht
        rem = r.eff - done
        if rem <= budget:
            c = rem
        elif self.chunked:
            c = budget
        else:
            return False
        need = -(-(done + c) // self.b) - H * g
        avail = self.free + g * (len(self.lru) - ev) - x
        return need <= avail - (self.wm if n else 0)

    def _head_cap(self, avail: int, it: int, n: int, m: int) -> int:
        """With prefix caching: the blocks a decode run may take before it would evict a cached
        block of the waiting head's prefix (``avail`` if it never would in ``m`` steps)."""
        r = self.waiting[0]
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        if not ev:
            return avail
        x = self._blocks(it, m, n) - self.free
        if x <= 0:
            return avail
        chain = set(r.ids[:H]) if r.ids is not None else set()
        limit = -(-x // self.g)
        for p, h in enumerate(self.lru):
            if p >= limit:
                break
            if h in chain:
                return min(avail, self.free + self.g * p)
        return avail

    # ---- planning -----------------------------------------------------------------------------
    def plan(self, T: float) -> None:
        """Plan the run that starts at boundary time ``T`` and arm its end event."""
        # hot path (once per run): attributes read once into locals; bit-identical arithmetic
        # (same operations in the same order). Gain: see bench/RESULTS.md "paged hot path".
        pod = self.pod
        cfg = self.cfg
        if cfg.horizon_s <= T:
            self.busy = False
            return
        it = self.it
        mask = self.mask
        sq = pod.shared_queue
        if not self.planned:
            self.planned = True
            n = self.n
            d = self.cnt2[it & mask] if n else 0
            if self.pre or d > self.free:
                self._schedule_running(it)
            else:
                # no chunk to continue and the decodes' new blocks (if any) are free ones:
                # _schedule_running and _take inlined for this common case
                if d:
                    self.free -= d
                self.budget = self.max_tokens - n
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
        if nchunks:
            t1, F1, B1 = lat.iteration(self.P, self.pairs, nchunks, n, S + n * it)
        else:  # no prefill token (P == 0): the same numbers, cheaper
            t1, F1, B1 = lat.decode_step(n, S + n * it)
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
        k = 1
        if (
            not cfg.per_iteration
            and nxt > it
            and len(self.pre) == len(pf)
            and not (w and self._fit_at(w[0], n1, self.cnt2[(it + 1) & mask]))
        ):
            k = nxt - it + 1
            # the first decode step that finds no block ends the run (it preempts)
            free = self.free
            lru = self.lru
            avail = free + self.g * len(lru) if lru else free
            # no sequence needs more than ((k - 1) >> lb) + 1 new blocks in k - 1 steps
            worst = n1 * (((k - 1) >> self.lb) + 1)
            if avail < worst or (w and lru and free < worst):
                if w and lru:
                    avail = self._head_cap(avail, it + 1, n1, k - 1)
                m = self._short(it + 1, n1, avail)
                if m < k:
                    k = m
        end = T + t1
        dec = 0.0
        if k > 1:
            c1 = S1 + n1 * (it + 1)
            coef = self._coeffs.get(n1)
            if coef is None:
                coef = lat.run_coeffs(n1)
            self.n1 = n1
            self.c1 = c1
            self.coef = coef
            H = self.h_end  # the end of T's hour (cached by _commit), else computed
            if T >= H:
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
        if armed is None or end < armed:
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
            pod.router.dispatch()

    def _boundary(self, j: int) -> float:
        if j == 0:
            return self.T0
        t = self.T0 + self.t_first
        return t + run_time(self.coef, self.c1, self.n1, j - 1) if j > 1 else t

    # ---- events -------------------------------------------------------------------------------
    def _arm(self, t: float) -> None:
        if self.armed_t is not None and self.armed_t <= t:
            return
        self.token += 1
        self.armed_t = t
        wake_at(self.env, t, self._wake_cbs, self.token)
        self.rec.events += 1

    def _on_wake(self, ev: Wake) -> None:
        if ev.value != self.token:
            return
        fired = self.armed_t
        self.armed_t = None
        if not self.busy:
            if self.waiting and self.pod.shared_queue is not None:
                self.plan(self.env.now)  # an idle replica waiting for the central queue's floor
            return
        end = self.run_end
        if end != fired:  # the run end moved later (a cut): _arm(end), inlined
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
            return
        self._commit(self.k)
        self.plan(end)

    # ---- committing iterations ----------------------------------------------------------------
    def _commit(self, j: int, finish: bool = True, x: int = -1) -> None:
        """Account iterations [0, j) of the current run and advance the state past them;
        ``x``: the new blocks of its decode steps if known (>= 0), else computed here."""
        # hot path (once per run): attributes read once into locals, _finish_due inlined into
        # locals too; the same float operations in the same order (bit-identical results)
        rec = self.rec
        pod = self.cfg  # (the energy coefficients)
        T0 = self.T0
        it0 = self.it
        k = self.k
        pf = self.pf
        t_first = self.t_first
        ft = T0 + t_first
        npf = len(pf)
        n_first = self.n + npf
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
        mask = self.mask
        if j > 1:  # the decode steps' new blocks (_blocks and _take's common case, inlined)
            if x < 0:
                m = j - 1
                x = (m >> self.lb) * n_first
                rem = m & mask
            else:
                rem = 0
            if rem:
                # blocks_in's partial sum as a slice of cnt2, not prefix sums: cnt2 changes
                # about twice per request and rebuilding ``cum`` (2 b + 1 ints) cost more
                s0 = (it0 + 1) & mask
                x += sum(self.cnt2[s0 : s0 + rem])
            free = self.free
            if x <= free:
                self.free = free - x
            else:
                self._take(x)
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
                if xs == k - 1:
                    rt = self.dec_s
                elif xs == self.cut_m:
                    rt = self.cut_rt
                else:
                    rt = run_time(c, c1, n1, xs)
                t_sum += rt
                sc = c1 * xs + n1 * (xs * (xs - 1) / 2.0)
                f_sum += xs * c.fa + c.fb * sc
                b_sum += xs * c.ba + c.bb * sc
                rec.output_tokens[h] += n1 * xs
            rec.busy_s[h] += t_sum
            rec.dyn_j[h] += pod.e_active_w * t_sum + pod.e_flop_j * f_sum + pod.e_byte_j * b_sum
            rec.flops[h] += f_sum
            rec.bytes_moved[h] += b_sum
            rec.iters_h[h] += m_full
        if last_straddles:
            if k == 1:
                t_l, f_l, b_l = t_first, self.F_first, self.B_first
                start = T0
            else:
                ctx = self.c1 + self.n1 * (k - 2)
                c = self.coef
                t_l = step_time(c, ctx)
                f_l = c.fa + c.fb * ctx
                b_l = c.ba + c.bb * ctx
                start = self._boundary(k - 1)
                rec.add_tokens(start + t_l, 0, self.n1)
            e_l = pod.e_active_w * t_l + pod.e_flop_j * f_l + pod.e_byte_j * b_l
            # into every hour it overlaps, by time share (it may span several: issue #16)
            rec.add_work_spread(h, start, t_l, e_l, f_l, b_l)
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
        # KV in use over the committed iterations (blocks after their allocations x time)
        lru = self.lru  # (empty without prefix caching: no len() call then)
        used = self.NB - self.free - (self.g * len(lru) if lru else 0)
        rec.kv_block_s[h] += used * (T1 - T0)
        if j >= k and finish:
            # _finish_due, inlined (it runs once per run)
            heap = self.heap
            if heap and heap[0][0] < it:
                self._finish_due()

    def _finish_due(self) -> None:
        heap = self.heap
        it = self.it
        end = self.run_end
        cnt2 = self.cnt2
        b = self.b
        pod = self.pod
        complete = pod.rec.complete
        index = self.index
        prefix = self.prefix
        n = self.n
        S = self.S
        free = self.free
        while heap and heap[0][0] < it:
            f, _, r = heappop(heap)
            n -= 1
            eff = r.eff
            join_it = r.join_it
            S -= eff - join_it
            rho = r.rho
            cnt2[rho] -= 1
            cnt2[rho + b] -= 1
            tokens = eff + f - join_it  # the last token's KV is never written
            ids = r.ids
            session = r.session
            if session is not None and ids is not None and prefix:
                # a session turn's ids cover its answer too: keep the answer's full blocks
                full = tokens // self.ht
                self.free = free
                self._register(r, full if full < len(ids) else len(ids))
                free = self.free
            if r.held:
                self.free = free
                self._drop(r, tokens)
                free = self.free
            else:
                free += -(-tokens // b)
            self.outstanding -= 1
            complete(r, end, index)
            pod.in_flight -= 1
            if session is not None:
                pod.turn_done(r, end)
        self.cum = None
        self.free = free
        self.n = n
        self.S = 0.0 if n == 0 else S

    # ---- arrivals -----------------------------------------------------------------------------
    def on_arrival(self, r: Request) -> None:
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

    def _first_boundary(self, r: Request, ta: float) -> int:
        """The first boundary of the current run at or after time ``ta``: 0 if ``r`` is
        admitted into the run's first iteration (replan it), -1 if none is left before the
        run's end (a cut point's first step, shared by the subclasses)."""
        T0 = self.T0
        if ta <= T0:
            if self._fits_now(r):
                return 0
            j = 1
        elif ta <= T0 + self.t_first:
            j = 1
        else:
            k = self.k
            m, rt = steps_to_reach(self.coef, self.c1, self.n1, k - 1, T0 + self.t_first, ta)
            self.cut_m = m
            self.cut_rt = rt
            j = 1 + m
        return -1 if j >= self.k else j

    def _cut_point(self, r: Request) -> int:
        """The boundary j of the current run at which ``r`` (the queue's head, arriving now)
        could be admitted: 0 = into the first iteration (replan it), 1..k-1 = a cut, -1 = not
        before the run's end."""
        ta = self.env._now
        pod = self.pod
        if pod.shared_queue is not None and pod.queue_floor > ta:
            ta = pod.queue_floor
        j = self._first_boundary(r, ta)
        if j <= 0:
            return j
        k = self.k
        n1 = self.n + len(self.pf)
        it1 = self.it + 1
        prefix = self.prefix
        if r.ids is None or not prefix:
            # no prefix-cache path: _blocks and _fit_at hand-inlined (once per arrival that
            # finds the replica busy); the same integer tests as theirs
            if n1 >= self.max_batch:
                return -1
            budget = self.max_tokens - n1
            if budget <= 0:
                return -1
            mask = self.mask
            x = (j >> self.lb) * n1
            rem = j & mask
            if rem:  # blocks_in's partial sum as a slice of cnt2 (see _commit)
                s = it1 & mask
                x += sum(self.cnt2[s : s + rem])
            eff = r.eff
            if eff > budget:
                if not self.chunked:
                    return -1
                eff = budget
            lru = self.lru
            avail = self.free + (self.g * len(lru) if lru else 0) - x
            if -(-eff // self.b) > avail - (self.wm if n1 else 0):
                return -1
            # the blocks of the cut's j - 1 decode steps, for _commit (the last one's are taken
            # when the run from boundary j is planned)
            self.cut_x = x - self.cnt2[(it1 + j - 1) & mask]
            return j
        self.cut_x = -1
        if self._fit_at(r, n1, self._blocks(it1, j, n1)):
            return j
        if not (self.lru):
            return -1  # the free blocks only shrink: no later boundary of the run admits it
        # ... unless a decode step evicts part of its cached prefix: the boundaries where one
        # of its cached blocks goes are the only ones where it may come to fit
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        total = self._blocks(it1, k - 1, n1) - self.free
        if not ev or total <= 0:
            return -1
        g = self.g
        limit = -(-total // g)
        chain = set(r.ids[:H]) if r.ids is not None else set()
        cands = []
        for p, h in enumerate(self.lru):
            if p >= limit:
                break
            if h in chain:
                m = self._short(it1, n1, self.free + g * p)  # its eviction's iteration
                if j < m < k:
                    cands.append(m)
        for m in sorted(cands):
            if self._fit_at(r, n1, self._blocks(it1, m, n1)):
                return m
        return -1

    def admission_time(self, r: Request) -> tuple[float, bool]:
        if not self.busy:
            return max(self.env.now, self.pod.queue_floor), True
        j = self._cut_point(r)
        return (self.run_end, False) if j < 0 else (self._boundary(j), True)

    def cut_for(self, r: Request) -> None:
        j = self._cut_point(r)
        if j < 0:
            return
        if j > 0:
            self._commit(j, True, self.cut_x)
        self.plan(self.T0)

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


# ---- disaggregated pools (serving/disagg.py) --------------------------------------------
# Both subclasses override methods of PagedReplica that its hot paths call by name: plan calls
# _admit and _fit_at, _commit calls _finish_due, on_arrival and cut_for call _cut_point, which
# calls _fits_now. An aggregated fleet runs PagedReplica itself and never pays for them.
class PrefillReplica(PagedReplica):
    """A replica of a disaggregated fleet's prefill pool (``kv_allocation = "paged"``).

    Its requests carry ``out = 1``: the iteration of a prompt's last chunk (chunked prefill,
    prefix caching as in an aggregated fleet) yields the first token. Instead of completing, the
    request is then handed to the pool (``pod.handoff``) and its KV stays: its own blocks and its
    references to cached prefix blocks, until the pool calls :meth:`release` (the decode replica
    admitted it). Until then those blocks are not free, so a slow link or a full decode pool
    backs up into prefill. Handed-off requests are neither running nor waiting: never preempted.
    """

    __slots__ = ()

    def _finish_due(self) -> None:
        heap = self.heap
        it = self.it
        end = self.run_end
        cnt2 = self.cnt2
        b = self.b
        hand = self.pod.handoff  # type: ignore[attr-defined]
        while heap and heap[0][0] < it:
            f, _, r = heappop(heap)
            self.n -= 1
            self.S -= r.eff - r.join_it
            cnt2[r.rho] -= 1
            cnt2[r.rho + b] -= 1
            r.kv_tokens = r.eff + f - r.join_it  # the prompt (the first token's KV is not written)
            r.kv_held = r.held  # its cached prefix blocks stay referenced until release()
            r.held = 0
            hand(r, end, self)
        self.cum = None
        if self.n == 0:
            self.S = 0.0

    def release(self, r: Request) -> None:
        """The KV of handed-off request ``r`` has left (the decode replica admitted it): free its
        blocks and drop its references to cached ones (those stay cached, in LRU order); start
        the next run if the replica was waiting for the space."""
        r.held = r.kv_held  # type: ignore[attr-defined]
        self._drop(r, r.kv_tokens)  # type: ignore[attr-defined]
        r.kv_held = 0  # type: ignore[attr-defined]
        self.outstanding -= 1
        if not self.busy:
            if self.pod.shared_queue is not None:
                self.pod.router.dispatch()
            elif self.waiting:
                self.plan(self.env.now)

    def is_empty(self) -> bool:
        """Also holds no KV of handed-off requests (``outstanding`` counts them)."""
        return PagedReplica.is_empty(self) and self.outstanding == 0


class DecodeReplica(PagedReplica):
    """A replica of a disaggregated fleet's decode pool (``kv_allocation = "paged"``).

    A request whose prompt KV has arrived (``gen == 0``) is admitted, first come first served,
    while the batch has room, the iteration's token budget has one token for it and the free
    blocks hold its prompt's KV plus the token it writes in its first iteration,
    ``prompt // b + 1`` blocks (above the watermark when others run). It joins the decode set
    with no prefill compute: its first token came from the prefill pool, so the iteration it
    joins makes its second token at context prompt + 1 (``join_it = it - 1``). The pod is told
    which requests joined at which boundary (``pod.on_admitted``) and frees their KV in the
    prefill pool then.

    **Preemption.** Decode growth that finds no free block preempts as in an aggregated fleet
    (the most recently admitted request, vLLM V1's policy). The victim is recomputed on this
    replica: it goes back to the front of the queue and is prefilled again (chunked) over its
    prompt plus the tokens it has generated (``gen > 0``), as vLLM's decode instance of a
    disaggregated deployment recomputes locally; its KV is not fetched again from the prefill
    pool. Decode-side prefix caching is not modelled (the pool runs with it off).
    """

    __slots__ = ("joined",)

    def __init__(self, index: int, pod: PodPort, cfg: EnginePlan) -> None:
        super().__init__(index, pod, cfg)
        self.joined: list[Request] = []  # admitted while planning the current boundary

    def plan(self, T: float) -> None:
        PagedReplica.plan(self, T)
        joined = self.joined
        if joined:
            self.joined = []
            self.pod.on_admitted(joined, T, self)  # type: ignore[attr-defined]

    def _admit(self, it: int) -> None:
        """Admit waiting requests into iteration ``it``: arrived KV joins the decode set,
        a preempted request (at the front) is recomputed by chunks; first come first served.
        Nothing is admitted into an iteration whose scheduling preempted (vLLM V1's scheduler:
        ``if not preempted_reqs`` before it takes waiting requests), so the victim is not
        taken back at once only to be preempted again (plan() applies the rule)."""
        w = self.waiting
        nt = self.n + len(self.pre)
        budget = self.budget
        b = self.b
        lb = self.lb
        g = self.g
        max_batch = self.max_batch
        while w and nt < max_batch and budget > 0:
            r = w[0]
            wm = self.wm if nt else 0
            if r.gen:  # preempted here: recompute prompt + generated tokens
                eff = r.eff
                c = eff
                if eff > budget:
                    if not self.chunked:
                        break
                    c = budget
                need = -(-c // b)
                if need > self.free + g * len(self.lru) - wm:
                    break
                w.popleft()
                r.held = 0
                r.done = 0
                self.adm_seq += 1
                r.adm = self.adm_seq
                self.pre.append(r)
                self._take(need)
                self._chunk(r, c, it)
                budget -= c
                nt += 1
                continue
            p = r.eff  # the prompt, whose KV arrived
            need = (p >> lb) + 1  # its blocks and the one its first decode step may open
            if need > self.free + g * len(self.lru) - wm:
                break
            w.popleft()
            self._take(need)
            self.adm_seq += 1
            r.adm = self.adm_seq
            r.done = p
            r.join_it = it - 1
            rho = (it - p) & self.mask
            r.rho = rho
            self.cnt2[rho] += 1
            self.cnt2[rho + b] += 1
            self.cum = None
            self.S += p - (it - 1)
            heappush(self.heap, (it + r.out - 2, r.rid, r))
            self.n += 1
            budget -= 1
            nt += 1
            self.joined.append(r)
        self.budget = budget

    def _join_fits(self, r: Request, n: int, budget: int, x: int) -> bool:
        """Whether arrived request ``r`` joins a boundary with ``n`` sequences, ``budget``
        tokens left and ``x`` blocks taken by the decodes since now."""
        if n >= self.max_batch or budget <= 0:
            return False
        avail = self.free + self.g * len(self.lru) - x
        return (r.eff >> self.lb) + 1 <= avail - (self.wm if n else 0)

    def _fits_now(self, r: Request) -> bool:
        if self.preempt_it == self.it and (self.n or self.nchunks):
            return False
        if r.gen:
            return PagedReplica._fits_now(self, r)
        return self._join_fits(r, self.n + len(self.pre), self.budget, 0)

    def _fit_at(self, r: Request, n: int, x: int) -> bool:
        if r.gen:
            return PagedReplica._fit_at(self, r, n, x)
        return self._join_fits(r, n, self.max_tokens - n, x)

    def _cut_point(self, r: Request) -> int:
        """As :meth:`PagedReplica._cut_point` (no central queue, no prefix cache here): the free
        blocks only shrink during a run, so the first boundary after the arrival is the only
        one to test."""
        j = self._first_boundary(r, self.env._now)
        if j <= 0:
            return j
        n1 = self.n + len(self.pf)
        self.cut_x = -1  # (on_arrival passes it to _commit: none computed here)
        return j if self._fit_at(r, n1, self._blocks(self.it + 1, j, n1)) else -1

    def is_empty(self) -> bool:
        """Also expects no KV in transfer to it (``outstanding`` counts those)."""
        return PagedReplica.is_empty(self) and self.outstanding == 0
