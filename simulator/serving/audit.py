"""Debug-only checks of the engine's KV bookkeeping, recounted from scratch (issue 22's red team).

The paged policy keeps its pool as running counts (``free``, the prefix cache's references,
``cnt2`` by block residue, ``S``), updated in closed form per run; nothing in the engine ever
recounts them. :func:`audited` does, after every commit of every replica of the simulations run
inside it, from the requests each replica holds:

* **blocks**: ``NB == free + g x |cache| + sum over held requests (kv_blocks_for(tokens) -
  g x cached ids referenced)``, where a decoding request holds the tokens written through the
  last committed iteration (``eff + min(f, it - 1) - join_it``, ``f`` its last iteration), a
  partly prefilled one its ``done`` tokens, and a prefill replica's handed-off request its
  ``kv_tokens`` until released; ``0 <= free <= NB``; a data-parallel replica with a pool per
  rank (``fleet.dp_kv_pool = "per-rank"``, serving/ranks.py) recounts each rank's pool from
  the requests bound to that rank, its ``NB`` being one rank's blocks (no rank ever holds more);
* **prefix cache**: every resident id's reference count equals the requests referencing it, and
  the unreferenced ids are exactly ``lru``'s;
* **residues**: ``cnt2`` is two equal copies whose weights sum to the decode set's (1 each, or a
  windowed sequence's ``G + S`` / ``G``), ``n`` is the decode set's size and ``S`` its
  ``sum(eff - join_it)``;
* **reserve policy**: ``kv_used`` equals the reservations of the requests held, within
  ``kv_cap``;
* **batch**: the first iteration of every run holds at most ``max_batch_size`` sequences and
  ``max_batched_tokens`` tokens (its decodes and prefill chunks);
* **clock**: each replica's boundary times never go back, nor behind the event clock (to
  the ulp by which SimPy's ``now + (t - now)`` may round ``t``).

:func:`assert_drained` then checks that a simulation whose traffic drained left every pool
empty but for unreferenced cached blocks.

Off by default and free when off: the engine never imports this module; :func:`audited` patches
the policies' ``_commit_kv``, their hand-off methods and the core's ``plan`` for the duration
of a ``with`` block and restores them. A violation raises :class:`AssertionError` naming the
replica, the iteration and the two counts. tests/test_engine_properties.py runs generated
scenarios under it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fleetsim.serving.core import ReplicaCore
from fleetsim.serving.kv_blocks import WKEY
from fleetsim.serving.kv_paged import PagedKV
from fleetsim.serving.kv_reserve import ReserveKV
from fleetsim.serving.ranks import RankedPagedKV


@dataclass
class AuditLog:
    """What :func:`audited` saw: checks run and the extremes over them."""

    checks: int = 0
    max_used: int = 0  # the most blocks (layer-blocks) in use at a commit, any replica
    max_used_frac: float = 0.0  # of its pool
    replicas: list = field(default_factory=list)  # every replica audited, in first-seen order
    depth: int = 0  # nested audited commits (a ranked replica's calls its paged policy's)
    handed: Any = field(default_factory=weakref.WeakKeyDictionary)  # replica -> {rid: request}
    last_t: Any = field(default_factory=weakref.WeakKeyDictionary)  # replica -> last T0


def _paged_recount(rep: PagedKV, log: AuditLog) -> None:
    pools = getattr(rep, "pools", None)
    if pools is None:
        _pool_recount(rep, log, None)
        return
    # a data-parallel replica with a pool per rank (serving/ranks.py): every rank's pool
    # recounted from its own requests, none above its blocks; the decode set counted whole
    assert rep.n == len(rep.heap), f"replica {rep.index}: n {rep.n} != {len(rep.heap)}"
    assert sum(r.eff - r.join_it for _f, _i, r in rep.heap) == rep.S, f"replica {rep.index}: S"
    for k in range(rep.ranks):  # type: ignore[attr-defined]
        rep._use(k)  # type: ignore[attr-defined]
        _pool_recount(rep, log, k)


def _pool_recount(rep: PagedKV, log: AuditLog, rank: int | None) -> None:
    """One pool's recount: the replica's (``rank`` None) or data-parallel rank ``rank``'s,
    from the requests bound to it."""
    it = rep.it
    win = rep.win is not None
    refs: dict[int, int] = {}
    own = 0

    def hold(r: Any, tokens: int, held: int, wlo: int = 0) -> None:
        # its own blocks: its sequence's less the cached entries it references (the full
        # parts of its held ids; with windows the window parts of ids wlo .. held - 1)
        nonlocal own
        assert tokens >= 0, (rep.index, it, r.rid, tokens)
        mine = rep.kv_blocks_for(tokens) - rep.gf * held
        if win and held:
            mine -= rep.gw * (held - wlo)
            for h in r.ids[wlo:held]:
                refs[h + WKEY] = refs.get(h + WKEY, 0) + 1
        assert mine >= 0, (rep.index, it, r.rid, "references more than it holds")
        own += mine
        if held:
            for h in r.ids[:held]:
                refs[h] = refs.get(h, 0) + 1

    wsum = 0
    S = 0
    for f, _rid, r in rep.heap:
        if rank is not None and r.rank != rank:
            continue
        hold(r, r.eff + min(f, it - 1) - r.join_it, r.held, r.wlo)
        S += r.eff - r.join_it
        wsum += rep.wcur[r][0] if rep.win is not None else 1
    for r in rep.pre:
        if rank is None or r.rank == rank:
            hold(r, r.done, r.held, r.wlo)
    for r in log.handed.get(rep, {}).values():
        hold(r, r.kv_tokens, r.kv_held, r.kv_wlo)
    NB = rep.NB
    expect = NB - own - sum(map(rep._sz, rep.cache))
    where = f"replica {rep.index}" + ("" if rank is None else f" rank {rank}")
    where += f" after iteration {it - 1}"
    assert rep.free == expect, f"{where}: free blocks {rep.free} != recount {expect}"
    assert 0 <= rep.free <= NB, f"{where}: free {rep.free} outside [0, {NB}]"
    assert refs == {h: c for h, c in rep.cache.items() if c}, f"{where}: cache references"
    assert set(rep.lru) == {h for h, c in rep.cache.items() if c == 0}, f"{where}: lru"
    assert rep.lrub == sum(map(rep._sz, rep.lru)), f"{where}: lru blocks {rep.lrub}"
    b = rep.b
    assert rep.cnt2[:b] == rep.cnt2[b:], f"{where}: cnt2 copies differ"
    assert sum(rep.cnt2[:b]) == wsum, f"{where}: cnt2 sums {sum(rep.cnt2[:b])} != {wsum}"
    if rank is None:
        assert rep.n == len(rep.heap), f"{where}: n {rep.n} != decode set {len(rep.heap)}"
        assert rep.S == S, f"{where}: S {rep.S} != {S}"
    used = NB - rep.free - rep.lrub
    log.max_used = max(log.max_used, used)
    if NB:
        log.max_used_frac = max(log.max_used_frac, used / NB)


def _reserve_recount(rep: ReserveKV, log: AuditLog) -> None:
    st = rep.kv_state
    held = sum(r.need + st for r in rep.pre) + sum(r.need + st for _f, _i, r in rep.heap)
    held += sum(r.pf_need + st for r in log.handed.get(rep, {}).values())
    where = f"replica {rep.index} after iteration {rep.it - 1}"
    assert rep.kv_used == held, f"{where}: kv_used {rep.kv_used} != recount {held}"
    assert 0 <= rep.kv_used <= rep.kv_cap, f"{where}: kv_used {rep.kv_used} > {rep.kv_cap}"


def assert_drained(log: AuditLog) -> None:
    """Every replica the block audited holds nothing: no request decoding, prefilling or
    handed off, and no block in use (paged: every block free or an unreferenced cached one;
    reserve: nothing reserved). For simulations whose traffic drained before the horizon."""
    for rep in log.replicas:
        where = f"replica {rep.index} at the end"
        assert not rep.heap and not rep.pre and rep.n == 0, f"{where}: requests held"
        assert not log.handed.get(rep), f"{where}: handed-off KV not released"
        if isinstance(rep, PagedKV):
            assert rep.used_blocks() == 0, f"{where}: {rep.used_blocks()} blocks in use"
            pools = getattr(rep, "pools", None)
            for k in range(1 if pools is None else len(pools)):
                if pools is not None:
                    rep._use(k)  # type: ignore[attr-defined]
                at = where if pools is None else f"{where}, rank {k}"
                assert rep.free + rep.lrub == rep.NB, f"{at}: blocks lost"
                assert not any(rep.cache.values()), f"{at}: cached blocks still referenced"
                assert rep.cnt2 == [0] * (2 * rep.b) and rep.S == 0, f"{at}: decode counts"
        else:
            assert rep.kv_used == 0, f"{where}: {rep.kv_used} tokens reserved"


@contextlib.contextmanager
def audited() -> Iterator[AuditLog]:
    """Recount every replica's KV after each commit of the simulations run in the block."""
    log = AuditLog()
    saved: dict[tuple[type, str], Any] = {
        (cls, name): cls.__dict__[name]
        for cls in (PagedKV, ReserveKV)
        for name in ("_commit_kv", "_keep_kv", "_release_kv")
    }
    saved[(RankedPagedKV, "_commit_kv")] = RankedPagedKV.__dict__["_commit_kv"]
    saved[(ReplicaCore, "plan")] = ReplicaCore.__dict__["plan"]
    plan = saved[(ReplicaCore, "plan")]

    def audited_plan(self: Any, T: float) -> None:
        plan(self, T)
        if self.busy and self.T0 == T:
            # the run's first iteration: its decodes and prefill chunks within the token budget
            tokens = self.P + self.n
            assert tokens <= self.max_tokens, (
                f"replica {self.index} iteration {self.it}: {self.n} decodes + {self.P} prompt "
                f"tokens > max_batched_tokens {self.max_tokens}"
            )
            assert self.n + len(self.pre) <= self.max_batch, (self.index, self.n, self.max_batch)

    def wrap_commit(cls: type, recount: Any) -> Any:
        orig = saved[(cls, "_commit_kv")]

        def _commit_kv(self: Any, *a: Any) -> None:
            log.depth += 1
            try:
                orig(self, *a)
            finally:
                log.depth -= 1
            if log.depth:
                return  # (the outer call recounts)
            last = log.last_t.get(self)
            if last is None:
                log.replicas.append(self)
            assert last is None or last <= self.T0, (self.index, last, self.T0)
            # (an event's time is SimPy's ``now + (t - now)``, which may round an ulp above t)
            now = self.env.now
            assert now - 1e-12 * max(1.0, now) <= self.T0, (self.index, self.T0, now)
            log.last_t[self] = self.T0
            recount(self, log)
            log.checks += 1

        return _commit_kv

    def wrap_keep(cls: type) -> Any:
        orig = saved[(cls, "_keep_kv")]

        def _keep_kv(self: Any, r: Any, f: int) -> None:
            orig(self, r, f)
            log.handed.setdefault(self, {})[r.rid] = r

        return _keep_kv

    def wrap_release(cls: type) -> Any:
        orig = saved[(cls, "_release_kv")]

        def _release_kv(self: Any, r: Any) -> None:
            orig(self, r)
            log.handed.get(self, {}).pop(r.rid, None)

        return _release_kv

    try:
        for cls, recount in ((PagedKV, _paged_recount), (ReserveKV, _reserve_recount)):
            setattr(cls, "_commit_kv", wrap_commit(cls, recount))  # noqa: B010
            setattr(cls, "_keep_kv", wrap_keep(cls))  # noqa: B010
            setattr(cls, "_release_kv", wrap_release(cls))  # noqa: B010
        setattr(RankedPagedKV, "_commit_kv", wrap_commit(RankedPagedKV, _paged_recount))  # noqa: B010
        setattr(ReplicaCore, "plan", audited_plan)  # noqa: B010
        yield log
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
