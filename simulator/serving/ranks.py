"""One scheduler per data-parallel rank: a data-parallel replica as vLLM 0.11 runs it
(``fleet.data_parallel`` = ``dp`` > 1, ``fleet.dp_scheduler = "per-rank"``, the default).

vLLM runs ``dp`` engine cores, each with its own scheduler, and the API server binds every
request to one of them; the ML.ENERGY Benchmark launches its data-parallel servers so
(``data/mlenergy-v3/SOURCE.md``). What this replica does, and where vLLM does it:

* **a request is bound to a rank on arrival**: to the rank with the lowest ``4 x waiting +
  running``, the lowest index on a tie, counted at once; it stays there (no migration), and a
  preempted request goes back to the front of its own rank's queue
  (``DPLBAsyncMPClient.get_core_engine_for_request``, ``vllm/v1/engine/core_client.py``);
* **each rank has its own slots and token budget**: ``max_batch_size / dp`` sequences (the
  replica's ``max_batch_size`` is the server's total, as the benchmark passes ``--max-num-seqs
  max_num_seqs / num_gpus`` per engine: ml-energy/benchmark ``spawn_vllm``; a ``max_batch_size``
  that ``dp`` does not divide is refused) and ``ceil(max_batched_tokens / dp)`` tokens, the
  engine's share that ``config/resolved.py`` ``kv_budget`` already sizes each engine's
  activation reserve by (every ``DPEngineCoreProc`` builds its ``Scheduler`` from one
  ``SchedulerConfig``, ``vllm/v1/engine/core.py``). Per rank, in every iteration: its decodes
  take one token each, its partly prefilled prompts their next chunk, then its waiting
  requests are admitted first come first served while it has a slot and budget; a rank whose
  head does not fit blocks only itself;
* **the ranks step in lockstep**, every rank's batch padded to the fullest one's tokens (the
  MoE layers' all-to-all needs every rank; ``DPEngineCoreProc.run_busy_loop`` runs a dummy
  batch on an idle rank; ``coordinate_batch_across_dp``, ``vllm/v1/worker/dp_utils.py``): an
  iteration with prompt tokens is timed at ``t_pad = dp x`` the fullest rank's tokens (its
  decodes and chunks; :meth:`fleetsim.device.latency.LatencyModel.iteration`), and so are its
  communication, fp8 K-loop and expert FLOPs (``ReplicaCore.tpad``); its prompt attention (the
  chunks' scores and new tokens' KV write) waits for the rank with the most prompt pairs, the
  chunks being their own rank's: ``dp x`` that rank's pairs and of the rank with the most prompt
  tokens its tokens (``ReplicaCore.pairs_full``, ``p_full``; ``rpairs``, ``rp`` per rank).

**Each rank has its own KV cache** (``fleet.dp_kv_pool = "per-rank"``, the default): vLLM's
engine core per rank sizes its own cache from its own GPUs' profiling run and builds its own
scheduler and ``KVCacheManager`` on it (``EngineCore._initialize_kv_caches``,
``vllm/v1/engine/core.py``; ``unify_kv_cache_configs`` agrees only that core's workers), so a
rank has ``blocks // dp`` blocks (the replica's budget is ``dp`` engines' worth, config/
resolved.py ``kv_budget``), its own prefix cache, LRU and free-block queue, and its own decode
residue counts (``pools``; :meth:`RankedPagedKV._use` selects the rank a pool operation acts
for). Per rank, then: the full-sequence admission gate and the watermark (``wm // dp``) test
the rank's free blocks; a rank whose decodes or chunks are short of blocks preempts its own
most recently admitted request, however much room another rank has, and admits nothing more
into that iteration (the others still do); a prefix hits only the rank's own cache; a pure
decode run ends at the first step at which any rank is short of its own blocks; and a request
must fit one rank's cache (``KvBudget.request_tokens``). ``dp_kv_pool = "shared"`` keeps one
pool of the replica's blocks for every rank, as before (a rank could then hold more than its
GPU's KV; the preemption victim is the replica's most recent request, on whichever rank, and a
step that preempted admits nothing on any rank). With a pool per rank, the order in which two
ranks' heads are admitted at one boundary (rank 0 first) no longer matters: neither takes the
other's blocks. A model with window or linear-state layers counts each rank's pool in
layer-blocks, a sequence's window weight on its own rank's residue counts (``_w_saturate``).

What stays merged: the pure decode steps (timed as the merged scheduler times them, the decodes
spread ``ceil(n / dp)`` to a rank: a decode step's time barely depends on the split). A rank
with room and a waiting request ends a macro run at its first boundary, as the merged
scheduler's waiting head does, and is admitted there, with whatever every rank has waiting then
(not ahead of time, as the core admits its one queue's head: ``on_arrival``); with prefix
caching the run is not cut where the decodes would evict a waiting request's cached prefix
(the merged policy's ``_head_cap``): not needed so far: the harness's data-parallel rows with
repeated prompts (branch d46) and 240 scratch DP2 cases of repeated prompts at time 0 in tight
pools ran the same under both engines (tests/test_dp_kv_pools.py holds a hand count).
``pf`` is kept at the front of ``pre`` (the core retires ``pre[:len(pf)]``): with one budget per
rank, a later rank's prompt can complete while an earlier rank's is still partial.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from itertools import chain
from typing import TYPE_CHECKING

from fleetsim.device.latency import run_time
from fleetsim.serving.kv_paged import PagedKV
from fleetsim.serving.request import Request

if TYPE_CHECKING:
    from fleetsim.serving.admission import EnginePlan
    from fleetsim.serving.ports import PodPort


def _adm(r: Request) -> int:
    return r.adm


class RankedWaiting:
    """The waiting requests of a data-parallel replica: one first-come-first-served queue per
    rank (``qs``), ``n`` in all. What the core asks of its waiting deque: length, truth,
    iteration, ``append`` and ``appendleft`` (to the request's rank), and ``popleft`` from the
    rank being admitted (``cur``)."""

    __slots__ = ("cur", "n", "qs")

    def __init__(self, dp: int) -> None:
        self.qs: list[deque[Request]] = [deque() for _ in range(dp)]
        self.n = 0
        self.cur = 0

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator[Request]:
        return chain.from_iterable(self.qs)

    def append(self, r: Request) -> None:
        self.qs[r.rank].append(r)
        self.n += 1

    def appendleft(self, r: Request) -> None:
        self.qs[r.rank].appendleft(r)
        self.n += 1

    def popleft(self) -> Request:
        self.n -= 1
        return self.qs[self.cur].popleft()


# a rank's block pool (a pool per rank): free, cache, lru, lrub, q, qc, qv, cnt2, cum
# (kv_blocks.py)
_Pool = tuple[
    int,
    dict[int, int],
    dict[int, "int | None"],
    int,
    "deque[list[int]] | None",
    int,
    int,
    list[int],
    "list[int] | None",
]

_NOBODY: deque[Request] = deque()  # a waiting queue to hide the ranks' from the merged checks


class RankedPagedKV(PagedKV):
    """The paged KV policy with one scheduler per data-parallel rank (module docstring). The
    core's state: ``ranks`` (dp), ``rcap`` (a rank's slots), ``rtok`` (a rank's token budget),
    ``rrun`` (each rank's running requests: admitted, not finished), ``rb`` (each rank's tokens
    left in the iteration being planned), ``radm`` (each rank's requests admitted into it),
    ``rp`` and ``rpairs`` (each rank's prompt tokens and attention pairs in it), ``tpad`` (its
    padded tokens) and ``p_full`` / ``pairs_full`` (``dp x`` the most of ``rp`` / ``rpairs``)."""

    __slots__ = ()

    def __init__(self, index: int, pod: PodPort, cfg: EnginePlan) -> None:
        super().__init__(index, pod, cfg)
        dp = cfg.dp_ranks
        self.ranks = dp
        self.rcap = self.max_batch // dp
        self.rtok = -(-self.max_tokens // dp)
        self.rrun = [0] * dp
        self.rb = [self.rtok] * dp
        self.radm = [0] * dp
        self.rp = [0] * dp
        self.rpairs = [0.0] * dp
        self.waiting = RankedWaiting(dp)  # type: ignore[assignment]
        self.kcur = 0
        self.rpre = [-1] * dp
        self.pools: list[_Pool] | None = None
        if cfg.dp_kv_per_rank:
            # every rank's engine core its own KV cache: blocks // dp each (the replica's
            # budget is dp engines' worth, kv_budget; the floor of a floor over dp is the
            # engine's own floor), its own prefix cache, its own free-block queue
            # (a model with window or linear-state layers: its pool in layer-blocks, each
            # rank's the same share; the window bookkeeping wsat / wcur is per sequence)
            nb = self.NB // dp
            self.NB = self.free = nb
            self.wm //= dp
            b2 = 2 * self.b
            self.pools = [
                (
                    nb,
                    {},
                    {} if self.uq else OrderedDict(),
                    0,
                    deque() if self.uq else None,
                    0,
                    0,
                    [0] * b2,
                    None,
                )
                for _ in range(dp)
            ]

    def leave_queue(self) -> None:
        self.waiting = RankedWaiting(self.ranks)  # type: ignore[assignment]

    # ---- a KV pool per rank ---------------------------------------------------------------------
    def _use(self, k: int) -> None:
        """Make rank ``k``'s pool the one the paged policy's methods act on: its free blocks,
        prefix cache, LRU, free-block queue and decode residue counts (``pools``; the other
        ranks' states are kept there). No pool is "current" between calls: every method that
        touches a pool first selects the rank it acts for."""
        c = self.kcur
        if k == c:
            return
        pools = self.pools
        assert pools is not None
        pools[c] = (
            self.free, self.cache, self.lru, self.lrub, self.q, self.qc, self.qv, self.cnt2,
            self.cum,
        )  # fmt: skip
        (
            self.free, self.cache, self.lru, self.lrub, self.q, self.qc, self.qv, self.cnt2,
            self.cum,
        ) = pools[k]  # fmt: skip
        self.kcur = k

    def _rank_dec(self) -> int:
        """The decoding sequences of the current rank (its residue counts' sum)."""
        return sum(self.cnt2[: self.b])

    def _rank_blocked(self, k: int) -> bool:
        """Rank ``k`` preempted while scheduling the iteration being planned and runs something
        in it: its scheduler admits nothing into it (vLLM's ``if not preempted_reqs``, per
        engine core). Selects rank ``k``'s pool."""
        self._use(k)
        return self.rpre[k] == self.it and (self._rank_dec() > 0 or self.rp[k] > 0)

    def used_blocks(self) -> int:
        if self.pools is None:
            return super().used_blocks()
        used = 0
        for k in range(self.ranks):
            self._use(k)
            used += super().used_blocks()
        return used

    # ---- binding on arrival ---------------------------------------------------------------------
    def rank_for(self) -> int:
        """The rank a request arriving now is bound to: the lowest ``4 x waiting + running``,
        the lowest index on a tie (vLLM's ``get_core_engine_for_request``)."""
        qs = self.waiting.qs  # type: ignore[attr-defined]
        rrun = self.rrun
        # (nothing is admitted ahead of now: on_arrival admits at the boundary itself)
        best = 0
        score = -1
        for k in range(self.ranks):
            s = 4 * len(qs[k]) + rrun[k]
            if score < 0 or s < score:
                best, score = k, s
        return best

    def on_arrival(self, r: Request) -> None:
        """Bind ``r`` to its rank and queue it there; if it is its rank's head, end the current
        run at the boundary where it can join (the core's rule, per rank), and admit there.

        Unlike the core, which cuts the run at once and admits its head into the boundary ahead
        of time (exact with one first-come-first-served queue), a ranked replica admits at the
        boundary itself: a lower rank's head arriving before the boundary is admitted there
        first, as the per-iteration engine (and each rank's own scheduler) does."""
        self.outstanding += 1
        k = self.rank_for()
        r.rank = k
        w = self.waiting
        w.append(r)
        if not self.busy:
            self.plan(self.env._now)
        elif len(w.qs[k]) == 1:  # type: ignore[attr-defined]
            j = self._cut_point(r)
            if j == 0:
                self.plan(self.T0)
            elif j > 0:
                self._end_at(j)

    def _end_at(self, j: int) -> None:
        """End the current run at its boundary ``j`` (0 < j < k): the run's end, its decode
        time and its end event become boundary ``j``'s, whose commit and plan admit every rank's
        waiting heads then (the same times as the core's cut: ``_commit``'s association)."""
        T = self.T0 + self.t_first
        if j > 1:
            xs = j - 1
            dec = self.cut_rt if xs == self.cut_m else run_time(self.coef, self.c1, self.g1, xs)
            T += dec
        else:
            dec = 0.0
        self.k = j
        self.dec_s = dec
        self.run_end = T
        self._arm(T)

    def _w_pool(self, r: Request) -> None:
        """The paged policy's window saturation takes each sequence's weight off its own
        rank's counts."""
        if self.pools is not None:
            self._use(r.rank)

    # ---- scheduling one iteration -------------------------------------------------------------
    def _schedule_running(self, it: int) -> None:
        """The decodes' blocks (preempting while short, as the merged policy), then each rank's
        partly prefilled prompts their next chunk within that rank's budget."""
        mask = self.mask
        if self.win is not None and self.wsat:
            self._w_saturate(it)
        per_rank = self.pools is not None
        if per_rank:
            # each rank's decodes from its own pool, preempting its own most recent
            for k in range(self.ranks if self.n else 0):
                self._use(k)
                d = self.cnt2[it & mask]
                if d:
                    while d > self.free + self.lrub:
                        self._preempt_last(it, False)
                        d = self.cnt2[it & mask]
                    self._take(d)
        d = self.cnt2[it & mask] if self.n and not per_rank else 0
        if d:
            while d > self.free + self.lrub:
                self._preempt_last(it, False)
                d = self.cnt2[it & mask]
            self._take(d)
        rt = self.rtok
        self.radm = [0] * self.ranks
        self.rp = [0] * self.ranks  # (the iteration's chunks so far: none, as P and pairs)
        self.rpairs = [0.0] * self.ranks
        rb = [rt - c for c in self.rrun]  # less the decodes: running less prefilling
        pre = self.pre
        for r in pre:
            rb[r.rank] += 1
        self.rb = rb
        i = 0
        while i < len(pre):
            r = pre[i]
            k = r.rank
            if rb[k] > 0:
                if per_rank:
                    self._use(k)
                c = self._next_chunk(r, rb[k], it)
                if not c:
                    if per_rank:  # r preempted itself from its rank's pool: the next rank's
                        pre = self.pre  # (r and its rank's later prompts left pre)
                        continue
                    break
                rb[k] -= c
            i += 1
        self._planned()

    def _admit(self, it: int) -> None:
        """Admit each rank's waiting requests, first come first served, while the rank has a
        slot and budget and the pool the blocks (a rank whose head does not fit stops alone)."""
        w: RankedWaiting = self.waiting  # type: ignore[assignment]
        rb = self.rb
        rrun = self.rrun
        cap = self.rcap
        nt = self.n + len(self.pre)
        top = (it * self.ranks) << 40
        admitted = False
        per_rank = self.pools is not None
        for k, q in enumerate(w.qs):
            budget = rb[k]
            if not q or budget <= 0 or rrun[k] >= cap:
                continue
            if per_rank and self._rank_blocked(k):  # (selects rank k's pool)
                continue
            w.cur = k
            while q and rrun[k] < cap and budget > 0:
                r = q[0]
                # (the watermark counts the rank's own sequences when it has its own pool)
                c = self._admit_head(r, it, rrun[k] if per_rank else nt, budget)
                if not c:
                    break
                # the admission order (the preemption victim is the most recent): by iteration,
                # then rank by rank, each first come first served, as one call admits a batch,
                # also when a macro run's first iteration is replanned as requests arrive (its
                # later ranks' heads may have joined it first)
                r.adm = top + (k << 40) + self.adm_seq
                admitted = True
                budget -= c
                nt += 1
                rrun[k] += 1
                self.radm[k] += 1
            rb[k] = budget
        if admitted:
            self.pre.sort(key=_adm)  # (stable, nearly sorted: pf's move is _planned's)
        self._planned()

    def _chunk(self, r: Request, c: int, it: int) -> None:
        """Schedule the chunk (the paged policy's) and count its tokens and pairs on its rank
        (the pairs ``_chunk`` adds to ``pairs``)."""
        pairs0 = self.pairs
        super()._chunk(r, c, it)
        k = r.rank
        self.rp[k] += c
        self.rpairs[k] += self.pairs - pairs0

    def _planned(self) -> None:
        """After scheduling: the budget the core tests (a rank's largest), the padded tokens of
        the iteration (``dp x`` the fullest rank's, if it computes prompt tokens), and the
        prompts completing in it at the front of ``pre``."""
        rb = self.rb
        self.budget = max(rb)
        if self.nchunks:
            dp = self.ranks
            self.tpad = dp * (self.rtok - min(rb))
            self.p_full = dp * max(self.rp)
            self.pairs_full = dp * max(self.rpairs)
        else:
            self.tpad = self.p_full = -1
            self.pairs_full = -1.0
        pf = self.pf
        pre = self.pre
        if pf and len(pf) < len(pre):
            ids = set(pf)
            if any(r not in ids for r in pre[: len(pf)]):
                self.pre = [r for r in pre if r in ids] + [r for r in pre if r not in ids]

    def _preempt_last(self, it: int, after_alloc: bool) -> Request:
        """The replica's most recently admitted running request (one shared pool), or with a
        pool per rank the most recent of the rank whose pool is short (the current one: each
        engine core's scheduler preempts from its own running list, ``Scheduler.schedule``,
        vllm/v1/core/sched/scheduler.py); that rank then admits nothing into the iteration."""
        npre = len(self.pre)
        if self.pools is None:
            r = super()._preempt_last(it, after_alloc)
        else:
            k = self.kcur
            self.rpre[k] = it
            victim = None
            for q in reversed(self.pre):
                if q.rank == k:
                    victim = q
                    break
            dec = None
            for e in self.heap:
                q = e[2]
                if q.rank == k and (dec is None or q.adm > dec.adm):
                    dec = q
            if dec is not None and (victim is None or dec.adm > victim.adm):
                r = self._preempt(dec, True, it, after_alloc)
            else:
                assert victim is not None, "a rank short of blocks runs nothing"
                r = self._preempt(victim, False, it, after_alloc)
        self.rrun[r.rank] -= 1
        if after_alloc and len(self.pre) == npre:  # a decode: it no longer takes its token
            self.rb[r.rank] += 1
        return r

    def _free_kv(self, r: Request, f: int) -> None:
        self.rrun[r.rank] -= 1
        if self.pools is not None:
            self._use(r.rank)
        super()._free_kv(r, f)

    def _commit_kv(self, j: int, it0: int, n: int, x: int, h: int, dt: float) -> None:
        """One shared pool: the paged policy's. A pool per rank: each rank's decodes take
        their blocks of steps ``1 .. j - 1`` from its own pool, and the blocks held are the
        ranks' sum."""
        pools = self.pools
        if pools is None:
            super()._commit_kv(j, it0, n, x, h, dt)
            return
        assert x < 0, "a ranked replica's runs end at a boundary, not at a cut (_end_at)"
        used = 0  # the ranks' blocks held in the run's first iteration
        x = 0  # the blocks their decode steps open
        for k in range(self.ranks):
            self._use(k)
            used += self.NB - self.free - self.lrub
            if j > 1:
                nk = self._rank_dec()
                if nk:
                    xk = self._blocks(it0 + 1, j - 1, nk)
                    self._take(xk)
                    x += xk
        bs = self._held_block_s(used, x, j, dt)
        self.rec.kv_block_s[h] += bs * self.wscale if self.win is not None else bs

    # ---- cut points and run lengths -----------------------------------------------------------
    def _fits_now(self, r: Request) -> bool:
        """Whether ``r`` (its rank's head) joins the iteration being planned."""
        k = r.rank
        if self.pools is not None:
            if self._rank_blocked(k) or self.rrun[k] >= self.rcap:  # (selects k's pool)
                return False
            return self._head_fits(r, self.rrun[k], self.rb[k], 0)
        if self.preempt_it == self.it and (self.n or self.nchunks):
            return False
        if self.rrun[k] >= self.rcap:
            return False
        return self._head_fits(r, self.n + len(self.pre), self.rb[k], 0)

    def _fit_cut(self, r: Request, j: int) -> int:
        """Whether ``r`` (its rank's head) joins boundary ``j`` of the current pure decode run
        (its rank's slots and budget; the pool after the run's decodes' blocks: its rank's own
        with a pool per rank): ``j`` or -1. A later boundary only has fewer free blocks."""
        self.cut_x = -1
        k = r.rank
        m = self.rrun[k]
        if m >= self.rcap:
            return -1
        if self.pools is not None:
            self._use(k)
            x = self._blocks(self.it + 1, j, self._rank_dec())
            return j if self._head_fits(r, m, self.rtok - m, x) else -1
        n1 = self.n + len(self.pf)
        return j if self._head_fits(r, n1, self.rtok - m, self._taken(j, n1)) else -1

    def _run_length(self, it: int, n1: int, k: int) -> int:
        """A rank with room whose head fits ends the run at its first boundary; else the
        merged policy's ends (the first step short of a block), no waiting head considered;
        with a pool per rank, the first step at which any rank's decodes are short of its
        own blocks."""
        w = self.waiting
        pools = self.pools
        if not w and pools is None:
            return super()._run_length(it, n1, k)
        rrun = self.rrun
        cap = self.rcap
        rt = self.rtok
        if w:
            s1 = (it + 1) & self.mask
            x = self.cnt2[s1]
            for kk, q in enumerate(w.qs):  # type: ignore[attr-defined]
                if not q or rrun[kk] >= cap:
                    continue
                if pools is not None:
                    self._use(kk)
                    if self._head_fits(q[0], rrun[kk], rt - rrun[kk], self.cnt2[s1]):
                        return 1
                elif self._head_fits(q[0], n1, rt - rrun[kk], x):
                    return 1
        self.waiting = _NOBODY
        try:
            if pools is None:
                return super()._run_length(it, n1, k)
            for kk in range(self.ranks):
                self._use(kk)
                nk = self._rank_dec()
                if nk:
                    k = super()._run_length(it, nk, k)
            return k
        finally:
            self.waiting = w
