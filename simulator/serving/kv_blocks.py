"""The paged KV policy's block pool (:class:`fleetsim.serving.kv_paged.PagedKV` builds on it):
free blocks, the prefix cache, and the decodes' growth counted by block residue.

**Blocks.** A sequence holding ``L`` tokens of context holds ``kv_blocks_for(L)`` blocks
(ceil(L / b) for full-attention layers). Decoding sequences open a new block every ``b``
iterations, at iterations ``it = rho (mod b)``; ``cnt2`` counts them per residue (written
twice, so a run's partial sum is one slice), so the blocks ``m`` decode steps open, and the
first step at which they exceed the free blocks, are computed, not searched (:func:`blocks_in`,
:func:`first_short`, and their O(1) / O(log b) forms :meth:`BlockPool._blocks`,
:meth:`BlockPool._short`).

**Prefix cache.** Resident prompt blocks are named by ids (of ``hash_tokens`` tokens, ``g``
blocks each) and reference counted; a block no request references stays cached in LRU order
(``lru``) until space is needed: new blocks come from the free ones first, then from evicting
the least recently released cached block (:meth:`BlockPool._take`).

**vLLM's eviction order** (``uq``, ``FleetSection.prefix_cache_eviction = "vllm"``). vLLM V1
keeps every free block, cached or not, in one queue (vllm/v1/core/kv_cache_utils.py,
``FreeKVCacheBlockQueue``): a finished request's blocks join its tail, its last block first
(``BlockPool.free_blocks``), a new block comes from its head and drops the cached hash that
block held (``get_new_blocks``, ``_maybe_evict_cached_block``), and a cache hit takes its block
out of the queue (``touch``). A released prompt block therefore survives only until the free
blocks ahead of it have been allocated, however many never-cached blocks are released after it.
``q`` is that queue in entries ``[key, blocks, version]``: ``key < 0`` a run of uncached blocks,
else a cached id (``g`` blocks), stale when its id left ``lru`` or re-entered it since: each
entry gets a new version (``qv`` counts them) and ``lru`` maps a cached id to its entry's, so an
entry is live iff ``lru.get(key) == version``; ``free`` stays the count of the uncached free
blocks.
``qc`` counts the queue's cached entries (live or stale). While it is 0 the queue holds only
uncached runs, which the allocation order cannot tell apart from one run of ``free`` blocks
(runs are taken from the head in turn, and the offsets :meth:`BlockPool._q_entries` gives a
cached entry are the uncached blocks ahead of it, however they are split): the queue is then
not kept at all, ``free`` is the whole of it (allocation and release are the pool-first
policy's ``free -= x``, ``free += n``), and the first cached entry rebuilds it as that one
run (:meth:`BlockPool._q_cached`). The default day's requests carry no block ids, so their
replicas never build it (bench/RESULTS.md, 2026-12-07).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from itertools import accumulate, takewhile
from typing import TYPE_CHECKING

from fleetsim.serving.core import ReplicaCore

#: the cache key of an id's window part (models with window layers): ``id + WKEY`` (the ids are
#: int64 prompt-block names, well below it)
WKEY = 1 << 62

if TYPE_CHECKING:
    from fleetsim.serving.request import Request


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


class BlockPool(ReplicaCore):
    """Free blocks, the prefix cache and the decodes' residue counts (state: ``NB``, ``free``,
    ``b``, ``mask``, ``lb``, ``g``, ``ht``, ``cache``, ``lru``, ``cnt2``, ``cum``, ``prefix``;
    set by ``PagedKV._init_kv``)."""

    __slots__ = ()

    NB: int
    b: int
    cache: dict[int, int]
    cnt2: list[int]
    cum: list[int] | None
    free: int
    g: int
    ht: int
    lb: int
    # with uq a dict (same order), mapping an id to its queue entry's version; else an
    # OrderedDict of None
    lru: dict[int, int | None]
    mask: int
    prefix: bool
    win: tuple[int, int, int, int] | None
    q: deque[list[int]] | None
    qc: int
    qv: int  # the last version given a queue entry (uq)
    uq: bool
    gf: int  # layer-blocks of a cached id's full-attention part (g without windows)
    gw: int  # layer-blocks of a cached id's window part (windows only)
    wn: int  # ids of window parts a hit needs before its end (windows only)
    wci: int  # most window parts a sequence references: cap // g (windows only)
    lrub: int  # blocks of the unreferenced cached entries (lru)

    def kv_blocks_for(self, tokens: int) -> int:
        """KV blocks that a sequence holding ``tokens`` tokens of context occupies: the one
        place that says so (full-attention layers: ceil(tokens / b)). The hot paths inline it
        (marked ``kv_blocks_for``), and the decodes' growth (one block every ``b`` tokens,
        ``cnt2``) follows from it; a model whose layers hold less (sliding-window layers at
        most W tokens, Mamba layers a constant state) changes this and those places: with
        ``win = (G, S, cap, C)`` the layer-blocks ``G ceil(L / b) + S min(ceil(L / b), cap) +
        C`` (``C`` a hybrid's state, held from admission: ``kv_blocks_for(0) = C``)."""
        q = -(-tokens // self.b)
        win = self.win
        if win is None:
            return q
        G, S, cap, C = win
        return G * q + S * (q if q < cap else cap) + C

    def used_blocks(self) -> int:
        """Blocks referenced by running requests (not counting unreferenced cached blocks)."""
        return self.NB - self.free - self.lrub

    def _sz(self, h: int) -> int:
        """Blocks of cached entry ``h``: an id's full-attention part (``gf``), or with windows
        its window part (key ``h + WKEY``, ``gw``)."""
        return self.gw if h >= WKEY else self.gf

    # -- vLLM's single free-block queue (uq) -------------------------------------------------------
    def _q_free(self, n: int) -> None:
        """``n`` uncached blocks released: ``free`` grows, and with ``uq`` they join the queue
        (kept only while it holds a cached entry, ``qc``)."""
        self.free += n
        if self.qc and n > 0:
            q = self.q
            assert q is not None
            q.append([-1, n, 0])

    def _q_cached(self, h: int) -> None:
        """Cached id ``h`` lost its last reference: into ``lru`` and, with ``uq``, the queue
        (the queue's first cached entry: the queue is first rebuilt as its one uncached run)."""
        sz = self.gw if h >= WKEY else self.gf
        self.lrub += sz
        if self.uq:
            v = self.qv = self.qv + 1
            self.lru[h] = v
            q = self.q
            assert q is not None
            if not self.qc:
                q.clear()
                if self.free:
                    q.append([-1, self.free, 0])
            self.qc += 1
            q.append([h, sz, v])
        else:
            self.lru[h] = None

    def _unrefs(self, keys) -> None:
        """Entries ``keys`` (in that order) each lose a reference: :meth:`_unref` over them,
        inlined (a finish releases every id's parts: ~1.7 M an hour of sessions on Gemma 3)."""
        cache = self.cache
        lru = self.lru
        gw, gf = self.gw, self.gf
        if not self.uq:
            n = 0
            for h in keys:
                ref = cache[h] - 1
                cache[h] = ref
                if ref == 0:
                    lru[h] = None
                    n += gw if h >= WKEY else gf
            self.lrub += n
            return
        q = self.q
        assert q is not None
        append = q.append
        v = self.qv
        n = c = 0
        built = self.qc > 0
        for h in keys:
            ref = cache[h] - 1
            cache[h] = ref
            if ref == 0:
                if not built:  # the queue's first cached entry: rebuilt as its one run
                    q.clear()
                    if self.free:
                        append([-1, self.free, 0])
                    built = True
                sz = gw if h >= WKEY else gf
                v += 1
                lru[h] = v
                append([h, sz, v])
                n += sz
                c += 1
        self.qv = v
        self.qc += c
        self.lrub += n

    def _q_live(self, e: list[int]) -> bool:
        h = e[0]
        return h < 0 or self.lru.get(h) == e[2]

    def _q_entries(self):
        """The queue's live entries from its head, each with the free blocks ahead of it."""
        off = 0
        q = self.q
        assert q is not None
        for e in q:
            if self._q_live(e):
                yield e, off
                off += e[1]

    def _q_take(self, x: int) -> None:
        """Allocate ``x`` blocks from the queue's head, evicting the cached ids met."""
        q = self.q
        assert q is not None
        cache = self.cache
        lru = self.lru
        popleft = q.popleft
        free = self.free
        qc = self.qc
        lrub = self.lrub
        while x > 0:
            e = q[0]
            h = e[0]
            if h < 0:
                use = e[1] if e[1] < x else x
                e[1] -= use
                free -= use
                x -= use
                if e[1] == 0:
                    popleft()
                continue
            popleft()
            qc -= 1
            if lru.get(h) != e[2]:
                continue  # stale: hit again since, or released again later in the queue
            del lru[h]
            del cache[h]
            g = e[1]
            lrub -= g
            if g <= x:
                x -= g
            else:  # the rest of its blocks are the next free ones
                free += g - x
                q.appendleft([-1, g - x, 0])
                x = 0
        self.free = free
        self.qc = qc
        self.lrub = lrub

    def _take(self, x: int) -> None:
        """Allocate ``x`` blocks: free ones first, then evict least recently used cached ones
        (with ``uq``: from the head of vLLM's one free queue, while it holds a cached entry;
        else ``lru`` is empty and the free ones suffice)."""
        if self.qc:
            self._q_take(x)
            return
        f = self.free
        if x <= f:
            self.free = f - x
            return
        x -= f
        lru = self.lru
        cache = self.cache
        got = 0
        while got < x:
            assert isinstance(lru, OrderedDict)  # (pool-first: with uq the queue evicts)
            h, _v = lru.popitem(last=False)
            del cache[h]
            got += self.gw if h >= WKEY else self.gf
        self.lrub -= got
        self.free = got - x

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

    def _lookup(self, r: Request, gone: set[int] | None = None) -> tuple[int, int]:
        """(cached leading ids of ``r``, the blocks of the entries a hit on them takes that
        are unreferenced); ``gone``: cached entries to count as evicted. With windows the hit
        is vLLM 0.11's hybrid one (:meth:`_w_hit`)."""
        ids = r.ids
        if ids is None or not self.prefix:
            return 0, 0
        ht = self.ht
        cap = min(len(ids), r.prompt // ht, (r.eff - 1) // ht)
        cache = self.cache
        if gone:
            H = 0
            while cap > H:
                if ids[H] not in cache or ids[H] in gone:
                    break
                H += 1
        elif cap > 0:
            # (the leading cached ids, counted at C speed: once per admission and replan)
            H = len(list(takewhile(cache.__contains__, ids[:cap])))
        else:
            H = 0
        get = cache.__getitem__
        if self.win is None:
            return H, list(map(get, ids[:H])).count(0) * self.g
        H = self._w_hit(ids, H, gone)
        ev = list(map(get, ids[:H])).count(0) * self.gf
        lo = self._w_lo(H)
        if lo < H:
            ev += list(map(get, [ids[j] + WKEY for j in range(lo, H)])).count(0) * self.gw
        return H, ev

    def _w_hit(self, ids: list[int], H: int, gone: set[int] | None) -> int:
        """The hit of a model with window layers, ``H`` ids of whose full-attention parts lead
        cached: vLLM 0.11's ``HybridKVCacheCoordinator.find_longest_cache_hit`` (vllm/v1/core/
        kv_cache_coordinator.py) takes the full-attention hit, then the window layers' within
        it, and cuts the first to the second. ``SlidingWindowManager.find_longest_cache_hit``
        (single_type_kv_cache_manager.py) scans from the right for ``ceil((W - 1) / b)``
        contiguous cached blocks (``wn`` ids here) and ends the hit after the first such run;
        without one, the run of cached blocks from the first is the hit."""
        cache = self.cache
        wn = self.wn
        run = 0
        for j in range(H - 1, -1, -1):
            k = ids[j] + WKEY
            if k in cache and not (gone and k in gone):
                run += 1
                if run >= wn:
                    return j + run
            else:
                run = 0
        return run

    def _w_lo(self, H: int) -> int:
        """The first id whose window part a hit of ``H`` ids references: the last ``wn`` (at
        most ``wci``, so that they fit the window's ``cap`` blocks)."""
        lo = H - (self.wn if self.wn < self.wci else self.wci)
        return lo if lo > 0 else 0

    def _w_rel(self, wlo: int, f: int, nd: int) -> int:
        """Window parts a sequence referencing ids ``wlo .. f - 1`` releases once it holds
        ``nd`` tokens: those not wholly within its window layers' last ``cap`` blocks (vLLM's
        ``remove_skipped_blocks`` frees them; a freed block keeps its hash until evicted)."""
        win = self.win
        assert win is not None
        q = -(-nd // self.b)  # its blocks; its window layers hold the last cap = win[2]
        t = -(-(q - win[2]) // self.g)
        lo = t if t < f else f
        return lo - wlo if lo > wlo else 0

    def _acquire(self, r: Request, H: int) -> None:
        """``r`` takes its hit of ``H`` ids (with windows: their full parts, and the window
        parts of the last ones, :meth:`_w_lo`)."""
        ids = r.ids
        assert ids is not None
        cache = self.cache
        lru = self.lru
        keys = list(ids[:H])
        if self.win is not None:
            r.wlo = self._w_lo(H)
            keys += [ids[j] + WKEY for j in range(r.wlo, H)]
        for h in keys:
            ref = cache[h]
            if ref == 0:
                del lru[h]
                self.lrub -= self.gw if h >= WKEY else self.gf
            cache[h] = ref + 1

    def _register(self, r: Request, f: int) -> None:
        """Publish ``r``'s full blocks ``held .. f - 1``; one already resident (published by a
        concurrent request) is shared and the copy just computed is released."""
        ids = r.ids
        assert ids is not None
        cache = self.cache
        if self.win is None:
            g = self.g
            for j in range(r.held, f):
                h = ids[j]
                ref = cache.get(h)
                if ref is None:
                    cache[h] = 1
                else:
                    if ref == 0:
                        del self.lru[h]
                        self.lrub -= g
                    cache[h] = ref + 1
                    self._q_free(g)
            r.held = f
            return
        for j in range(r.held, f):
            for h in (ids[j], ids[j] + WKEY):  # its full and its window part
                ref = cache.get(h)
                if ref is None:
                    cache[h] = 1
                else:
                    sz = self.gw if h >= WKEY else self.gf
                    if ref == 0:
                        del self.lru[h]
                        self.lrub -= sz
                    cache[h] = ref + 1
                    self._q_free(sz)
        r.held = f

    def _unref(self, h: int) -> None:
        """Entry ``h`` loses a reference: into ``lru`` (and vLLM's queue) at its last."""
        ref = self.cache[h] - 1
        self.cache[h] = ref
        if ref == 0:
            if self.uq:
                self._q_cached(h)
            else:
                self.lru[h] = None
                self.lrub += self.gw if h >= WKEY else self.gf

    def _w_release(self, r: Request, nd: int) -> None:
        """``r`` holds ``nd`` tokens: its window parts that left the window are released
        (:meth:`_w_rel`; the blocks its window layers open in their place were taken with the
        chunk's, :meth:`PagedKV._next_chunk`)."""
        k = self._w_rel(r.wlo, r.held, nd)
        if k:
            ids = r.ids
            assert ids is not None
            self._unrefs([ids[j] + WKEY for j in range(r.wlo, r.wlo + k)])
            r.wlo += k
            # its window layers' blocks in their place: those it alone held came back (as
            # cached, at the LRU's / vLLM queue's tail), the others' were counted in the need
            self._take(self.gw * k)

    def _drop(self, r: Request, tokens: int) -> None:
        """Free the blocks of ``r``, which holds ``tokens`` tokens of KV: its own blocks become
        free, its cached blocks lose a reference (the last block first, as vLLM frees them)."""
        if self.win is not None:
            if r.held:
                # the window parts the window passed first, as vLLM freed them (one path with
                # a session turn's finish, which also publishes its answer: _w_finish)
                self._w_finish(r, tokens, False)
            else:
                self._q_free(self.kv_blocks_for(tokens))
            return
        H = r.held
        self._q_free(self.kv_blocks_for(tokens) - H * self.g)
        if H:
            ids = r.ids
            assert ids is not None
            self._unrefs(ids[H - 1 :: -1])  # the last first
            r.held = 0

    def _w_finish(self, r: Request, tokens: int, answer: bool = True) -> None:
        """A request of a window model finishes (or is preempted, or hands its KV off) holding
        ``tokens`` tokens: its blocks left cached and freed as vLLM 0.11's hybrid manager leaves
        them, in its order (docs/serving-engine.md, "Sessions on sliding-window models").
        ``answer``: a session turn, whose ids cover its answer too (steps 2 and 3 publish it);
        else only its ``held`` prompt ids are released, steps 1 and 4 (:meth:`_drop`).
        vLLM hashes every group's blocks as they fill, the answer's too
        (``Request.append_output_token_ids`` extends ``block_hashes``, ``allocate_slots``
        caches each step's full blocks; ``cache_full_blocks`` skips a window group's null
        blocks); as it decodes, a window group frees each block the window has passed
        (``remove_skipped_blocks``: the hash kept, to the free queue's tail) and takes a new
        one; at the finish it frees the rest, the last block first
        (``SingleTypeKVCacheManager.free``). Here a decoding sequence kept its prompt's window
        parts to its finish, so, in vLLM's order: (1) the prompt's window parts that the
        window passed lose their reference; (2) the answer's ids that the window passed get
        an unreferenced cached window part; (3) the answer's whole ids publish their full
        parts and, those wholly within the window's last ``cap`` blocks, their window parts;
        (4) its own blocks are freed, then its references, the last id first (as
        :meth:`_drop`); (5) the blocks the new entries hold beyond its own (the window layers'
        exchanges as it decoded) are taken from the pool's head. The window parts within the
        window are its last ``wn`` ids or more (the last ``cap`` blocks span ``ceil((W - 1) /
        b)``), so while they stay cached the next turn hits the whole turn (:meth:`_w_hit`)."""
        ids = r.ids
        win = self.win
        assert ids is not None and win is not None
        H, wlo = r.held, r.wlo
        if answer:
            f = tokens // self.ht
            if f > len(ids):
                f = len(ids)
        else:
            f = H
        # the first id wholly within the window layers' last cap blocks (as _w_rel)
        t = -(-(-(-tokens // self.b) - win[2]) // self.g)
        t = 0 if t < 0 else (t if t < f else f)
        gf, gw = self.gf, self.gw
        # its own blocks (the pool's recount: NB - free = own blocks + cached entries' blocks)
        own = self.kv_blocks_for(tokens) - H * gf - (H - wlo) * gw
        cache = self.cache
        # (1) the prompt's window parts that the window passed as it decoded
        self._unrefs([ids[j] + WKEY for j in range(wlo, t if t < H else H)])
        # (2) the answer's ids that the window passed: cached as filled, freed as passed
        passed = []
        for j in range(H, t):
            h = ids[j] + WKEY
            if h not in cache:
                cache[h] = 1
                passed.append(h)
                own -= gw
        self._unrefs(passed)
        # (3) the answer's ids: full parts, and window parts within the window
        wl = wlo if wlo > t else t
        keys = list(ids[H:f])
        keys += [ids[j] + WKEY for j in range(wl if wl > H else H, f)]
        for h in keys:
            ref = cache.get(h)
            if ref is None:
                cache[h] = 1
                own -= gw if h >= WKEY else gf
            else:  # resident already: shared, its own copy freed with the rest
                if ref == 0:
                    del self.lru[h]
                    self.lrub -= gw if h >= WKEY else gf
                cache[h] = ref + 1
        # (4) its own blocks, then its references, the last id first
        if own > 0:
            self._q_free(own)
        m = wl if wl < f else f
        rel: list[int] = []
        for j in range(f - 1, m - 1, -1):
            h = ids[j]
            rel += (h + WKEY, h)
        if m:
            rel += ids[m - 1 :: -1]
        self._unrefs(rel)
        r.held = r.wlo = 0
        # (5) the exchanges' blocks: free ones first, then the oldest cached (never short:
        # the new entries, unreferenced now, hold more than that)
        if own < 0:
            self._take(-own)

    def _head_cap(self, avail: int, it: int, n: int, m: int) -> int:
        """With prefix caching: the blocks a decode run may take before it would evict a cached
        block of the waiting head's prefix (``avail`` if it never would in ``m`` steps)."""
        r = self.waiting[0]
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        if not ev:
            return avail
        chain = self._chain(r, H)
        if self.uq:
            total = self._blocks(it, m, n)
            for e, off in self._q_entries():
                if off >= total:
                    break
                if e[0] in chain:
                    return min(avail, off)
            return avail
        x = self._blocks(it, m, n) - self.free
        if x <= 0:
            return avail
        off = 0
        for h in self.lru:
            if off >= x:
                break
            if h in chain:
                return min(avail, self.free + off)
            off += self.gw if h >= WKEY else self.gf
        return avail

    def _chain(self, r: Request, H: int) -> set[int]:
        """The cached entries whose eviction may shorten ``r``'s hit of ``H`` ids (with
        windows, their window parts too)."""
        ids = r.ids
        if ids is None:
            return set()
        chain = set(ids[:H])
        if self.win is not None:
            chain.update(h + WKEY for h in ids[:H])
        return chain

    def _lru_order(self):
        """The unreferenced cached entries in eviction order (pool-first), each with the blocks
        taken before it goes."""
        off = self.free
        for h in self.lru:
            yield h, off
            off += self.gw if h >= WKEY else self.gf

    def _evicting_cut(self, r: Request, j: int, k: int, n1: int, it1: int) -> int:
        """``r`` does not fit at boundary ``j`` of the run (``k`` iterations, ``n1`` decoding
        sequences from iteration ``it1``): the first later boundary where it does because a
        decode step evicted part of its cached prefix, or -1."""
        if not (self.lru):
            return -1  # the free blocks only shrink: no later boundary of the run admits it
        # ... unless a decode step evicts part of its cached prefix: the boundaries where one
        # of its cached blocks goes are the only ones where it may come to fit
        H, ev = self._lookup(r) if r.ids is not None else (0, 0)
        # the cached blocks in eviction order, each with the free blocks taken before it goes:
        # vLLM's one queue (uq), or the never-cached pool first and then the LRU in g-block steps
        if self.uq:
            total = self._blocks(it1, k - 1, n1)
            base = 0
            order = ((e[0], off) for e, off in self._q_entries())
        else:
            total = self._blocks(it1, k - 1, n1) - self.free
            base = self.free
            order = self._lru_order()
        if not ev or total <= 0:
            return -1
        chain = self._chain(r, H)
        cands = []
        for h, off in order:
            if off - base >= total:
                break
            if h in chain:
                m = self._short(it1, n1, off)  # its eviction's iteration
                if j < m < k:
                    cands.append(m)
        for m in sorted(cands):
            if self._fit_at(r, n1, self._blocks(it1, m, n1)):
                return m
        return -1
