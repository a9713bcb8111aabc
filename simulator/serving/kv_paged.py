"""The ``paged`` KV policy of the replica core (:mod:`fleetsim.serving.core`): paged KV cache
with preemption by recomputation, chunked prefill and prefix caching, as vLLM's V1 engine serves
(``kv_allocation = "paged"``, the default).

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
come first served, until the budget, ``max_batch_size`` or the free blocks run out. A waiting
request is admitted only if the blocks of its whole sequence (its prompt, plus what it had
generated if it was preempted; less its cached prefix) are available above the watermark, though
only its first chunk's are taken then (vLLM's ``scheduler_reserve_full_isl``, on by default:
without it a long prompt's later chunks find no blocks and preempt). A chunk of
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

**Sliding windows and linear-state layers** (a model with window layers or Mamba-2 layers:
``PagedLimits.win_*``, set by serving/pod.py). The pool is counted in layer-blocks (``b``
tokens of one attention layer; ``NB`` = the KV bytes over one layer's block). A sequence of
``L`` tokens holds ``G ceil(L / b) + S min(ceil(L / b), cap) + C`` of them (``G`` global and
``S`` window layers, ``cap = ceil(W / b) + 1``): the window layers release the blocks that fall
out of the window as they open new ones (vLLM's ``SlidingWindowManager.remove_skipped_blocks``);
``C`` is a hybrid's linear-state state, constant in ``L``
(:meth:`fleetsim.device.modelspec.ModelSpec.state_layer_blocks`: each Mamba layer's state
padded to whole pages of an attention layer, the layers to whole groups, one block per request
per group, as vLLM 0.11's ``MambaManager`` and ``_get_kv_cache_groups_uniform_page_size``
allocate it). ``C`` is taken with the first chunk's blocks at admission (``kv_blocks_for(0) =
C``; the full-sequence gate counts it) and given back at finish or preemption with the rest;
a decoding sequence's growth does not involve it, so the runs' closed forms hold unchanged.
vLLM raises a hybrid's attention block size until one page holds a Mamba state (e.g. 672
tokens for Nemotron-Nano-9B-v2) and disables prefix caching for hybrids ("Hybrid or
mamba-based model detected: disabling prefix caching"); here the attention layers keep
``b``-token blocks (``b`` must be a power of two: a sequence's last, partial attention block is
smaller than vLLM's), and a hybrid's replica caches no prefix either.
``cnt2`` then counts weights, not sequences: ``G + S`` for a decoding sequence until its last
opening that reaches ``cap`` (``wsat``, a heap by that iteration; ``wcur`` its current weight),
``G`` after. A run's decode steps end by the first such last opening (the top of ``wsat``,
:meth:`_run_length`), so the weights in ``cnt2`` hold over the run and its blocks keep their
closed forms, with the weights' sum (:meth:`_wsum`) in place of the sequence count. Such a
replica records ``kv_block_s`` in the configured blocks (``wscale``). Without windows ``win``
is None and none of this runs. docs/serving-engine.md gives the measured hand counts.

**Prefix caching with window layers** (no linear-state layers) is vLLM 0.11's hybrid manager's:
an id names a full-attention part (``gf = G g`` layer-blocks) and a window part (``gw = S g``,
key ``id + WKEY``), cached, referenced and evicted apart (``lrub`` counts the unreferenced
entries' blocks); the hit is :meth:`BlockPool._w_hit`'s; a request references the full parts of
its ``held`` ids and the window parts of ids ``wlo .. held - 1``, and as a chunk ends releases
the window parts no longer wholly within its window's last ``cap`` blocks
(:meth:`BlockPool._w_release`): they stay cached, evictable, and its window layers open blocks
in their place (the chunk's need counts those whose parts others hold too, :meth:`_w_shared`).
A decoding sequence keeps its window parts to its finish (the same count as vLLM's release as
the window passes; only which blocks are evictable differs). Every finish (and preemption)
orders what the window passed ahead of the rest, as vLLM leaves them; a session turn's caches
its answer's parts too (:meth:`BlockPool._w_finish`, one path for both).

Size: about 750 lines, over the project's ~600: the block arithmetic above (residues, prefix
blocks, window weights and parts) is one invariant over one pool, kept in one module.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from fleetsim.base.units import HOUR_S
from fleetsim.serving.kv_blocks import WKEY, BlockPool
from fleetsim.serving.request import Request

if TYPE_CHECKING:
    from fleetsim.serving.admission import EnginePlan


class PagedKV(BlockPool):
    """Paged KV with preemption by recomputation, chunked prefill and prefix caching."""

    __slots__ = ()

    # (the block pool's state is declared in kv_blocks.BlockPool)
    adm_seq: int
    chunked: bool
    wm: int
    wsat: list[tuple[int, int, Request]]  # (last opening with window blocks, rid, request)
    wcur: dict[Request, tuple[int, int]]
    wscale: float

    def _init_kv(self, cfg: EnginePlan) -> None:
        kv = cfg.paged
        assert kv is not None
        b = kv.block_tokens
        self.b = b
        self.mask = b - 1
        self.NB = kv.blocks
        self.free = kv.blocks  # blocks holding nothing
        self.wm = kv.watermark_blocks
        self.chunked = kv.chunked
        self.prefix = kv.prefix
        self.ht = kv.hash_tokens
        self.g = max(1, kv.hash_tokens // b)
        self.gf = self.g
        self.gw = self.wn = self.wci = 0
        self.lrub = 0
        self.cache = {}  # resident block id -> references
        # vLLM's one free-block queue (kv_blocks.py, "vLLM's eviction order"); prefix caching only
        self.uq = kv.fifo_eviction and kv.prefix
        # unreferenced resident ids, LRU first (with uq a dict: its insertion order is the same,
        # and the queue, not lru.popitem, evicts)
        self.lru = {} if self.uq else OrderedDict()
        self.q = deque() if self.uq else None  # (built with its first cached entry)
        self.qc = 0  # cached entries in q: none, so every fast path below takes free blocks
        self.qv = 0  # the last version given a queue entry
        # decoding sequences by block residue, written twice (cnt2[i] == cnt2[i + b]) so that a
        # run's partial sum is one slice: sum(cnt2[s : s + rem]) for any s < b, rem <= b
        self.cnt2 = [0] * (2 * b)
        self.cum = None  # cumulative(cnt), None when cnt changed
        self.lb = b.bit_length() - 1  # log2(b)
        self.adm_seq = 0
        self.win = None
        self.wsat = []
        self.wcur = {}
        self.wscale = 1.0
        if kv.win_global_layers + kv.win_sliding_layers:
            # sliding windows or linear-state layers: the pool in layer-blocks; prefix caching
            # with window layers as vLLM's hybrid manager, none with linear-state layers
            self.win = (
                kv.win_global_layers,
                kv.win_sliding_layers,
                kv.win_cap_blocks,
                kv.win_state_blocks,
            )
            self.NB = self.free = kv.win_blocks
            self.wm = kv.win_watermark_blocks
            if kv.win_state_blocks or not kv.win_sliding_layers:
                self.prefix = False  # (vLLM 0.11 disables prefix caching for Mamba hybrids)
                self.uq = False
                self.q = None
                self.g = 1
            else:
                g = self.g
                self.gf = kv.win_global_layers * g
                self.gw = kv.win_sliding_layers * g
                # a window hit needs ceil((W - 1) / b) blocks cached: whole ids of g blocks
                nwb = -(-(kv.win_window_tokens - 1) // b)
                self.wn = max(1, -(-nwb // g))
                self.wci = kv.win_cap_blocks // g
            # kv_block_s in the configured blocks, so that the KV utilisation keeps its meaning
            self.wscale = kv.blocks / kv.win_blocks if kv.win_blocks else 0.0

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
            return self._preempt(dec, True, it, after_alloc)
        assert victim is not None
        return self._preempt(victim, False, it, after_alloc)

    def _preempt(self, r: Request, decoding: bool, it: int, after_alloc: bool) -> Request:
        """Preempt ``r``: a decoding request (its blocks through iteration ``it``'s, if
        ``after_alloc``) or one being prefilled; back to the front of its queue."""
        if decoding:
            self._drop(r, r.eff + (it - r.join_it if after_alloc else it - 1 - r.join_it))
            self.n -= 1
            self.S -= r.eff - r.join_it
            if self.xw is not None:
                self._x_leave(r)
            wt = self._w_leave(r) if self.win is not None else 1
            self.cnt2[r.rho] -= wt
            self.cnt2[r.rho + self.b] -= wt
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
            self._drop(r, r.done)
            pre = self.pre
            if pre[-1] is r:
                pre.pop()
            else:  # (a data-parallel rank's most recent: serving/ranks.py)
                pre.remove(r)
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
        self.pairs += c * (2.0 * done + c) if self.xw is None else self._x_pairs(done, c)
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
            if self.win is not None and r.held:
                self._w_release(r, nd)
        if nd == r.eff:  # the last chunk: it decodes from the next iteration on
            self.pf.append(r)
            rho = (it + 1 - nd) & self.mask
            r.rho = rho
            wt = self._w_enter(r, it, nd) if self.win is not None else 1
            self.cnt2[rho] += wt
            self.cnt2[rho + self.b] += wt
            self.cum = None
            if r.gen == 0:
                self.P_first += r.prompt
                self.hit_tok += r.cached

    # ---- sliding windows ----------------------------------------------------------------------
    def _w_enter(self, r: Request, it: int, eff: int) -> int:
        """``r`` decodes from iteration ``it + 1`` on holding ``eff`` tokens: the layer-blocks
        each of its block openings takes (``G + S`` until its window layers hold ``cap``
        blocks, then ``G``), and the iteration of its last opening that takes ``G + S``."""
        win = self.win
        assert win is not None
        G, S, cap, _C = win
        i_sat = it + (cap - 1) * self.b + 1 - eff
        if i_sat <= it or not S:  # (no window layers: G for good, nothing to cut a run)
            self.wcur[r] = (G, -1)
            return G
        # (the entry is stale once r leaves; a re-entry with the same i_sat is the same event)
        self.wcur[r] = (G + S, i_sat)
        heapq.heappush(self.wsat, (i_sat, r.rid, r))
        return G + S

    def _w_leave(self, r: Request) -> int:
        """``r`` leaves the decode set: its weight in ``cnt2``."""
        return self.wcur.pop(r)[0]

    def _w_saturate(self, it: int) -> None:
        """Sequences whose window layers filled before iteration ``it``: their later block
        openings take the global layers' blocks only (a window layer opens one block as it
        releases the oldest, vLLM's ``remove_skipped_blocks``)."""
        heap = self.wsat
        win = self.win
        assert win is not None
        S = win[1]
        cur = self.wcur
        b = self.b
        while heap and heap[0][0] < it:
            i_sat, _rid, r = heapq.heappop(heap)
            c = cur.get(r)
            if c is None or c[1] != i_sat:
                continue  # it left the decode set (or re-entered) since
            cur[r] = (c[0] - S, -1)
            self._w_pool(r)
            self.cnt2[r.rho] -= S
            self.cnt2[r.rho + b] -= S
            self.cum = None

    def _w_pool(self, r: Request) -> None:
        """Select the pool whose counts ``r``'s weight is in (one pool here; a data-parallel
        replica selects ``r``'s rank's, serving/ranks.py)."""

    def _wsum(self) -> int:
        """The decoding sequences' block openings per ``b`` steps: their weights' sum."""
        return sum(self.cnt2[: self.b])

    def _w_run(self, it: int, k: int) -> int:
        """``k`` capped so that the decode steps of the run from ``it`` (iterations ``it + 1 ..
        it + k - 1``) end by the first live last opening with window blocks (``wsat``'s top;
        :meth:`_w_saturate` dropped those before ``it``): the weights of ``cnt2`` hold up to
        it, and only the global layers' after."""
        heap = self.wsat
        cur = self.wcur
        while heap:
            i_sat, _rid, r = heap[0]
            c = cur.get(r)
            if c is not None and c[1] == i_sat:
                lim = i_sat - it + 1
                return lim if lim < k else k
            heapq.heappop(heap)  # stale: it left the decode set or re-entered
        return k

    def _schedule_running(self, it: int) -> None:
        """Decodes' blocks, then chunks of the partially prefilled requests (preempting the most
        recent running requests while blocks are short)."""
        mask = self.mask
        n = self.n
        if self.win is not None and self.wsat:
            self._w_saturate(it)
        d = self.cnt2[it & mask] if n else 0
        if not self.pre and d <= self.free and not self.qc:
            # the common case: no chunk to continue and the decodes' new blocks (if any) are
            # free ones (_take inlined)
            if d:
                self.free -= d
            self.budget = self.max_tokens - n
            return
        if n and d:
            while d > self.free + self.lrub:
                self._preempt_last(it, False)
                d = self.cnt2[it & mask]
            self._take(d)
        self.budget = self.max_tokens - self.n
        i = 0
        pre = self.pre
        while i < len(pre) and self.budget > 0:
            c = self._next_chunk(pre[i], self.budget, it)
            if not c:
                break
            self.budget -= c
            i += 1

    def _next_chunk(self, r: Request, budget: int, it: int) -> int:
        """Schedule the next prefill chunk of ``r`` (at most ``budget`` > 0 tokens) into
        iteration ``it``: its new blocks taken, preempting from the back of the running set
        while the pool is short. The chunk's tokens, or 0 when ``r`` itself was preempted (the
        caller stops there)."""
        done = r.done
        rem = r.eff - done
        c = rem if rem < budget else budget
        if self.win is None:
            b = self.b
            need = -(-(done + c) // b) - -(-done // b)
        else:
            need = self.kv_blocks_for(done + c) - self.kv_blocks_for(done)
            if r.held:
                # the window parts it releases that others hold too: its window layers open
                # blocks in their place (its own come back as cached, _w_release takes them)
                k = self._w_rel(r.wlo, self._f_at(r, done + c), done + c)
                while need + self.gw * self._w_shared(r, r.wlo, k, r.held, 2) > (
                    self.free + self.lrub
                ):
                    if self._preempt_last(it, True) is r:
                        return 0
        while need > self.free + self.lrub:
            if self._preempt_last(it, True) is r:
                return 0
        self._take(need)
        self._chunk(r, c, it)
        return c

    def _admit(self, it: int) -> None:
        """Admit waiting requests, first come first served, into iteration ``it``."""
        w = self.waiting
        shared = self.pod.shared_queue is not None
        nt = self.n + len(self.pre)
        budget = self.budget
        b = self.b
        max_batch = self.max_batch
        chunked, prefix = self.chunked, self.prefix
        while w and nt < max_batch and budget > 0:
            r = w[0]
            if (r.ids is not None and prefix) or self.win is not None:
                c = self._admit_head(r, it, nt, budget)
                if not c:
                    break
                if shared:
                    self.outstanding += 1
                budget -= c
                nt += 1
                continue
            # no prefix-cache path: _admit_head, _take and _chunk hand-inlined (the default
            # scenario's requests carry no block ids); the same operations in the same order
            eff = r.eff
            c = eff
            if eff > budget:
                if not chunked:
                    break
                c = budget
            need = -(-c // b)  # kv_blocks_for(c)
            free = self.free
            # the whole sequence must fit, not only its first chunk (vLLM's full-ISL gate)
            if -(-eff // b) > free + self.lrub - (self.wm if nt else 0):
                break
            w.popleft()
            if shared:
                self.outstanding += 1
            # (r.held is 0 and r.cached stays 0: it holds no cached blocks on this path)
            pre_n = r.preemptions
            self.adm_seq += 1
            r.adm = self.adm_seq
            self.pre.append(r)
            if need <= free and not self.qc:
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
        self.budget = budget

    def _admit_head(self, r: Request, it: int, nt: int, budget: int) -> int:
        """Admit ``r``, the queue's head, into iteration ``it`` (``nt`` sequences and
        ``budget`` tokens left) with its cached prefix, and schedule its first chunk: the
        chunk's tokens, or 0 if it does not fit (it stays at the head)."""
        H, ev = self._lookup(r)
        c, need = self._head_chunk(r, H, budget)
        full = self._full_need(r, H)
        if not c or max(full, need) > self.free + self.lrub - ev - (self.wm if nt else 0):
            return 0
        if self.win is not None and H:
            lo = self._w_lo(H)
            k = self._w_rel(lo, self._f_at(r, H * self.ht + c), H * self.ht + c)
            need -= self.gw * self._w_shared(r, lo, k, H, 1)  # (taken by _w_release)
        done = H * self.ht
        self.waiting.popleft()
        if H:
            self._acquire(r, H)
        r.held = H
        r.done = done
        if r.gen == 0 and r.preemptions == 0:
            r.cached = done
        self.adm_seq += 1
        r.adm = self.adm_seq
        self.pre.append(r)
        self._take(need)
        self._chunk(r, c, it)
        return c

    def _fits_now(self, r: Request) -> bool:
        """Whether ``r`` (the queue's head) would be admitted into the iteration being planned
        (the test of :meth:`_admit`)."""
        if self.preempt_it == self.it and (self.n or self.nchunks):
            return False  # the rule of plan(): nothing joins a step that preempted
        return self._head_fits(r, self.n + len(self.pre), self.budget, 0)

    def _fit_at(self, r: Request, n: int, x: int) -> bool:
        """Whether ``r``, the queue's head, would be admitted at a boundary of the current pure
        decode run of ``n`` sequences by which the decodes have taken ``x`` more blocks."""
        return self._head_fits(r, n, self.max_tokens - n, x)

    def _head_chunk(self, r: Request, H: int, budget: int) -> tuple[int, int]:
        """``r``'s next chunk when ``H`` of its leading blocks are cached and ``budget`` tokens
        are left: (its tokens, the blocks it needs beyond the cached ones), (0, 0) if none."""
        done = H * self.ht
        rem = r.eff - done
        if rem <= budget:
            c = rem
        elif self.chunked:
            c = budget
        else:
            return 0, 0
        if self.win is not None:
            need = self.kv_blocks_for(done + c)
            if H:
                lo = self._w_lo(H)
                k = self._w_rel(lo, self._f_at(r, done + c), done + c)
                need += self.gw * self._w_shared(r, lo, k, H, 1) - self._w_cached(H)
            return c, need
        return c, -(-(done + c) // self.b) - H * self.g  # kv_blocks_for(done + c) - cached

    def _w_shared(self, r: Request, lo: int, k: int, hi: int, refs: int) -> int:
        """Of the window parts of ``r``'s ids ``lo .. lo + k - 1`` that it releases, those it
        holds (ids below ``hi``; or, admitting, takes) that others hold too: ``refs`` or more
        references now. (The parts of ids it publishes and releases in the same chunk, and those
        it alone holds, come back as cached entries as it releases them.)"""
        ids = r.ids
        assert ids is not None
        cache = self.cache
        n = 0
        for j in range(lo, min(lo + k, hi)):
            if cache.get(ids[j] + WKEY, 0) >= refs:
                n += 1
        return n

    def _w_cached(self, H: int) -> int:
        """With windows: the layer-blocks a hit of ``H`` ids references (their full parts, the
        last ones' window parts)."""
        return H * self.gf + (H - self._w_lo(H)) * self.gw

    def _f_at(self, r: Request, nd: int) -> int:
        """The prompt ids ``r`` has published once it holds ``nd`` tokens (:meth:`_chunk`)."""
        ids = r.ids
        if ids is None or not self.prefix:
            return 0
        f = min(nd // self.ht, len(ids), r.prompt // self.ht)
        return f if f > r.held else r.held

    def _full_need(self, r: Request, H: int) -> int:
        """The blocks that admitting ``r`` with ``H`` cached leading blocks requires to be
        available: its whole sequence's (prompt, plus the tokens it had generated if it was
        preempted), not only its first chunk's, less the cached ones (vLLM's
        ``allocate_slots(full_sequence_must_fit=True)``, ``scheduler_reserve_full_isl``, on by
        default). Only the first chunk's blocks are taken at admission."""
        if self.win is not None:
            return self.kv_blocks_for(r.eff) - (self._w_cached(H) if H else 0)
        return -(-r.eff // self.b) - H * self.g  # kv_blocks_for(eff) - cached

    def _head_fits(self, r: Request, n: int, budget: int, x: int) -> bool:
        """Whether ``r``, the queue's head, joins an iteration with ``n`` sequences and
        ``budget`` tokens left, once the decodes have taken ``x`` more blocks than now (free
        blocks first, then the least recently used cached ones, perhaps some of ``r``'s cached
        prefix)."""
        if n >= self.max_batch or budget <= 0:
            return False
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        # the cached ids that the decodes' x blocks evict: from the head of vLLM's one queue
        # (uq), or, once the x blocks exceed the free ones, the least recently used
        gone: set[int] = set()
        if ev:
            if self.uq:
                for e, off in self._q_entries():
                    if off >= x:
                        break
                    if e[0] >= 0:
                        gone.add(e[0])
            elif x > self.free:
                for h, off in self._lru_order():
                    if off >= x:
                        break
                    gone.add(h)
        if gone:
            H, ev = self._lookup(r, gone)
        c, need = self._head_chunk(r, H, budget)
        if not c:
            return False
        avail = self.free + self.lrub - ev - x
        return max(self._full_need(r, H), need) <= avail - (self.wm if n else 0)

    # ---- the run and its commit ---------------------------------------------------------------
    def _run_length(self, it: int, n1: int, k: int) -> int:
        """A pure decode run of ``n1`` sequences from iteration ``it + 1`` ends at the first
        step short of a free block (the next iteration preempts), or at once if the waiting
        head would join at its first boundary (it cannot join at a later one: the free blocks
        only shrink), or with prefix caching at the step that would evict a block of the
        head's cached prefix."""
        w = self.waiting
        nw = n1  # the block openings per b steps
        if self.win is not None:
            k = self._w_run(it, k)
            if k <= 1:
                return 1
            nw = self._wsum()
        if w and self._fit_at(w[0], n1, self.cnt2[(it + 1) & self.mask]):
            return 1
        free = self.free
        lru = self.lru
        avail = free + self.lrub
        # no sequence needs more than ((k - 1) >> lb) + 1 new blocks in k - 1 steps
        worst = nw * (((k - 1) >> self.lb) + 1)
        if avail < worst or (w and lru and free < worst):
            if w and lru:
                avail = self._head_cap(avail, it + 1, n1, k - 1)
            m = self._short(it + 1, nw, avail)
            if m < k:
                k = m
        return k

    def _commit_kv(self, j: int, it0: int, n: int, x: int, h: int, dt: float) -> None:
        """Take the blocks the ``n`` sequences' decode steps ``1 .. j - 1`` opened (``x`` if
        known, >= 0), and add the blocks held over the ``dt`` seconds to hour ``h``
        (:meth:`_held_block_s`)."""
        used = self.NB - self.free - self.lrub  # the first iteration's (taken when scheduled)
        if j > 1:  # _blocks and _take's common case, inlined
            m = j - 1
            mask = self.mask
            if x < 0:
                x = (m >> self.lb) * (n if self.win is None else self._wsum())
                rem = m & mask
            else:
                rem = 0
            if rem:
                # blocks_in's partial sum as a slice of cnt2, not prefix sums: cnt2 changes
                # about twice per request and rebuilding ``cum`` (2 b + 1 ints) cost more
                s0 = (it0 + 1) & mask
                x += sum(self.cnt2[s0 : s0 + rem])
            free = self.free
            if x <= free and not self.qc:
                self.free = free - x
            else:
                self._take(x)
        bs = self._held_block_s(used, x, j, dt)
        self.rec.kv_block_s[h] += bs * self.wscale if self.win is not None else bs

    def _held_block_s(self, used: int, x: int, j: int, dt: float) -> float:
        """The block-seconds a run of ``j`` iterations over ``dt`` seconds holds: the ``used``
        blocks of its first iteration (prompt chunks and the decodes' blocks, taken when it was
        scheduled) throughout, and the ``x`` blocks its decode steps ``1 .. m = j - 1`` open,
        each from the step that opens it: ``used dt + x ((m + 1) / 2) tau``, the ``m`` decode
        steps at their mean time ``tau = (dt - t_first) / m`` and the openings at their mean
        step ``(m + 1) / 2``. The steps' times grow slowly with the context (a relative error
        of order the run's share of its context); the openings' mean step is exact with
        one-token blocks (every sequence opens one at every step) and for a sequence whose
        openings span whole periods of ``b`` steps on average over its block phase, and off by
        at most ``(b - 1) / 2`` steps per opening otherwise (about half a block per sequence
        per run, unbiased over phases). The exact sum over the openings' residues costs 13 %
        more CPU per simulated request (bench_speed.py, 300k requests); the blocks after the
        run's openings over the whole run, as before 2026-12-08, overstated a sequence's KV by
        half its growth in the run: 13.5 % for one 1,000 + 300-token request at a time
        (tests/test_kv_time_average.py)."""
        if j < 2:
            return used * dt
        m = j - 1
        return used * dt + x * (0.5 * j / m) * (dt - self.t_first)

    def _leave_decode(self, r: Request, f: int) -> int:
        """``r`` (its last iteration ``f``) leaves the decode set: the KV tokens it holds."""
        rho = r.rho
        cnt2 = self.cnt2
        wt = self._w_leave(r) if self.win is not None else 1
        cnt2[rho] -= wt
        cnt2[rho + self.b] -= wt
        self.cum = None
        return r.eff + f - r.join_it  # the last token's KV is never written

    def _free_kv(self, r: Request, f: int) -> None:
        tokens = r.eff + f - r.join_it  # the last token's KV is never written
        # _leave_decode, inlined: once per request (see core._finish_due)
        rho = r.rho
        cnt2 = self.cnt2
        if self.win is not None:
            wt = self._w_leave(r)
            cnt2[rho] -= wt
            cnt2[rho + self.b] -= wt
            self.cum = None
            if r.session is not None and r.ids is not None and self.prefix:
                self._w_finish(r, tokens)  # a session turn: its answer's blocks stay cached
            elif r.held:
                self._drop(r, tokens)
            else:
                self._q_free(self.kv_blocks_for(tokens))
            return
        cnt2[rho] -= 1
        cnt2[rho + self.b] -= 1
        self.cum = None
        ids = r.ids
        if r.session is not None and ids is not None and self.prefix:
            # a session turn's ids cover its answer too: keep the answer's full blocks
            full = tokens // self.ht
            self._register(r, full if full < len(ids) else len(ids))
        if r.held:
            self._drop(r, tokens)
        elif self.qc:
            self._q_free(-(-tokens // self.b))  # kv_blocks_for(tokens)
        else:
            self.free += -(-tokens // self.b)  # kv_blocks_for(tokens)

    def _keep_kv(self, r: Request, f: int) -> None:
        """A prefill replica's hand-off: its blocks and its references to cached prefix blocks
        stay until :meth:`_release_kv`."""
        if self.win is None:  # _leave_decode, inlined: once per request in the prefill pool
            rho = r.rho
            cnt2 = self.cnt2
            cnt2[rho] -= 1
            cnt2[rho + self.b] -= 1
            self.cum = None
            r.kv_tokens = r.eff + f - r.join_it  # type: ignore[attr-defined]
        else:
            r.kv_tokens = self._leave_decode(r, f)  # type: ignore[attr-defined]
        r.kv_held = r.held  # type: ignore[attr-defined]
        r.kv_wlo = r.wlo  # type: ignore[attr-defined]
        r.held = r.wlo = 0

    def _release_kv(self, r: Request) -> None:
        H = r.kv_held  # type: ignore[attr-defined]
        if not H and self.win is None and not self.qc:
            # no cached blocks and no queue to keep: _drop's free blocks, inlined (once per
            # request in a disaggregated fleet's prefill pool)
            self.free += -(-r.kv_tokens // self.b)  # type: ignore[attr-defined]
            return
        r.held = H
        r.wlo = r.kv_wlo  # type: ignore[attr-defined]
        self._drop(r, r.kv_tokens)  # type: ignore[attr-defined]
        r.kv_held = 0  # type: ignore[attr-defined]

    def _fit_cut(self, r: Request, j: int) -> int:
        """The first boundary ``>= j`` of the current run at which ``r`` joins (-1: none
        before the run's end); sets ``cut_x``, the blocks of the cut's decode steps."""
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
            x = (j >> self.lb) * (n1 if self.win is None else self._wsum())
            rem = j & mask
            if rem:  # blocks_in's partial sum as a slice of cnt2 (see _commit)
                s = it1 & mask
                x += sum(self.cnt2[s : s + rem])
            eff = r.eff
            if eff > budget and not self.chunked:
                return -1
            avail = self.free + self.lrub - x
            # the whole sequence must fit (_full_need with nothing cached)
            full = -(-eff // self.b) if self.win is None else self.kv_blocks_for(eff)
            if full > avail - (self.wm if n1 else 0):
                return -1
            # the blocks of the cut's j - 1 decode steps, for _commit (the last one's are taken
            # when the run from boundary j is planned)
            self.cut_x = x - self.cnt2[(it1 + j - 1) & mask]
            return j
        self.cut_x = -1
        if self._fit_at(r, n1, self._blocks(it1, j, n1)):
            return j
        return self._evicting_cut(r, j, k, n1, it1)

    # ---- the decode role (serving/roles.py) ----------------------------------------------------
    def _taken(self, j: int, n1: int) -> int:
        # _blocks(it + 1, j, n) with blocks_in's partial sum as a slice of cnt2 (see _fit_cut):
        # the same integer, without rebuilding ``cum`` after each join or leave
        mask = self.mask
        x = (j >> self.lb) * (n1 if self.win is None else self._wsum())
        rem = j & mask
        if rem:
            s = (self.it + 1) & mask
            x += sum(self.cnt2[s : s + rem])
        return x

    def _join_fits(self, r: Request, n: int, budget: int, x: int) -> bool:
        """Whether ``r``, whose prompt KV arrived, joins a boundary with ``n`` sequences,
        ``budget`` tokens left and ``x`` blocks taken by the decodes since now: its prompt's
        blocks and the one its first decode step may open, ``prompt // b + 1`` (=
        kv_blocks_for(prompt + 1)), above the watermark when others run."""
        if n >= self.max_batch or budget <= 0:
            return False
        avail = self.free + self.lrub - x
        if self.win is not None:
            return self.kv_blocks_for(r.eff + 1) <= avail - (self.wm if n else 0)
        return (r.eff >> self.lb) + 1 <= avail - (self.wm if n else 0)

    def _join_kv(self, r: Request, it: int) -> None:
        """Take the blocks of ``r``'s arrived KV; it decodes from iteration ``it`` on."""
        p = r.eff
        self._take((p >> self.lb) + 1 if self.win is None else self.kv_blocks_for(p + 1))
        self.adm_seq += 1
        r.adm = self.adm_seq
        r.done = p
        rho = (it - p) & self.mask
        r.rho = rho
        wt = 1 if self.win is None else self._w_enter(r, it - 1, p)
        self.cnt2[rho] += wt
        self.cnt2[rho + self.b] += wt
        self.cum = None
