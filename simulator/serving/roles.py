"""Pool roles of a replica, and the replica classes: a KV policy and a role on the core.

A replica is :class:`fleetsim.serving.core.ReplicaCore` (the iteration loop) with a KV policy
(:class:`fleetsim.serving.kv_reserve.ReserveKV` or :class:`fleetsim.serving.kv_paged.PagedKV`)
and a role:

* **aggregated** (the core's own behaviour): a finished request completes and its KV is freed;
* **prefill-only** (:class:`PrefillRole`, a disaggregated fleet's prefill pool): requests carry
  ``out = 1``, so the iteration of a prompt's last chunk yields the first token; instead of
  completing, the request is handed to the pool (``pod.handoff``) and its KV stays (the policy's
  ``_keep_kv``) until the pool calls :meth:`PrefillRole.release` (the decode replica admitted
  it). Until then the KV is not free, so a slow link or a full decode pool backs up into
  prefill. Handed-off requests are neither running nor waiting: never preempted.
* **decode-only** (:class:`DecodeRole`, the decode pool): a request whose prompt KV has arrived
  (``gen == 0``) is admitted, first come first served, while the batch has room, the
  iteration's token budget has one token for it and the policy has KV for it
  (``_join_fits``); it joins the decode set with no prefill compute: its first token came from
  the prefill pool, so the iteration it joins makes its second token at context prompt + 1
  (``join_it = it - 1``). The pod is told which requests joined at which boundary
  (``pod.on_admitted``) and frees their KV in the prefill pool then. A request preempted here
  (paged KV: the most recently admitted, vLLM V1's policy) is recomputed here: back to the
  front of the queue, prefilled again (chunked) over prompt + generated tokens, as vLLM's
  decode instance of a disaggregated deployment recomputes locally; its KV is not fetched
  again from the prefill pool. Decode-side prefix caching is not modelled.

:func:`replica_class` picks the class for a KV allocation and a role; :func:`make_replica` a
data-parallel replica with a scheduler per rank (:class:`RankedPagedReplica`, aggregated and
paged only: serving/ranks.py).
"""

from __future__ import annotations

from heapq import heappush
from typing import TYPE_CHECKING

from fleetsim.serving.core import ReplicaCore
from fleetsim.serving.kv_paged import PagedKV
from fleetsim.serving.kv_reserve import ReserveKV
from fleetsim.serving.ranks import RankedPagedKV
from fleetsim.serving.request import Request

if TYPE_CHECKING:
    from fleetsim.serving.admission import EnginePlan
    from fleetsim.serving.ports import PodPort


class PrefillRole(ReplicaCore):
    """A prefill-only replica: hands finished prompts to its pool, keeping their KV."""

    __slots__ = ()

    def _init_kv(self, cfg: EnginePlan) -> None:
        super()._init_kv(cfg)
        self.hand = self.pod.handoff  # type: ignore[attr-defined]  # (core._finish_due)

    def release(self, r: Request) -> None:
        """The KV of handed-off request ``r`` has left (the decode replica admitted it): free
        it; start the next run if the replica was waiting for the space."""
        self._release_kv(r)
        self.outstanding -= 1
        if not self.busy:
            if self.pod.shared_queue is not None:
                self.pod.router.dispatch()
            elif self.waiting:
                self.plan(self.env._now)

    def is_empty(self) -> bool:
        """Also holds no KV of handed-off requests (``outstanding`` counts them)."""
        return ReplicaCore.is_empty(self) and self.outstanding == 0


class DecodeRole(ReplicaCore):
    """A decode-only replica: admits requests whose prompt KV arrived into the decode set."""

    __slots__ = ()

    joined: list[Request]  # admitted while planning the current boundary

    def _init_kv(self, cfg: EnginePlan) -> None:
        super()._init_kv(cfg)
        self.joined = []

    def plan(self, T: float) -> None:
        ReplicaCore.plan(self, T)
        joined = self.joined
        if joined:
            self.joined = []
            self.pod.on_admitted(joined, T, self)  # type: ignore[attr-defined]

    def _admit(self, it: int) -> None:
        """Admit waiting requests into iteration ``it``, first come first served: arrived KV
        joins the decode set, a request preempted here (at the front) is recomputed by chunks.
        (Nothing is admitted into an iteration whose scheduling preempted: core.plan's rule.)"""
        w = self.waiting
        nt = self.n + len(self.pre)
        budget = self.budget
        max_batch = self.max_batch
        heap = self.heap
        while w and nt < max_batch and budget > 0:
            r = w[0]
            if r.gen:  # preempted here: recompute prompt + generated tokens
                c = self._admit_head(r, it, nt, budget)
                if not c:
                    break
                budget -= c
                nt += 1
                continue
            if not self._join_fits(r, nt, budget, 0):
                break
            w.popleft()
            self._join_kv(r, it)
            r.join_it = it - 1
            self.S += r.eff - (it - 1)
            if self.xw is not None:
                self._x_join(r)
            heappush(heap, (it + r.out - 2, r.rid, r))
            self.n += 1
            budget -= 1
            nt += 1
            self.joined.append(r)
        self.budget = budget

    def _fits_now(self, r: Request) -> bool:
        if self.preempt_it == self.it and (self.n or self.nchunks):
            return False
        if r.gen:
            return super()._fits_now(r)
        return self._join_fits(r, self.n + len(self.pre), self.budget, 0)

    def _fit_cut(self, r: Request, j: int) -> int:
        """No central queue and no prefix cache here: the policy's KV only shrinks during a
        run, so the first boundary after the arrival is the only one to test."""
        if r.gen:
            return super()._fit_cut(r, j)
        n1 = self.n + len(self.pf)
        self.cut_x = -1  # (on_arrival passes it to _commit: none computed here)
        return j if self._join_fits(r, n1, self.max_tokens - n1, self._taken(j, n1)) else -1

    def _fit_at(self, r: Request, n: int, x: int) -> bool:
        if r.gen:
            return super()._fit_at(r, n, x)
        return self._join_fits(r, n, self.max_tokens - n, x)

    def is_empty(self) -> bool:
        """Also expects no KV in transfer to it (``outstanding`` counts those)."""
        return ReplicaCore.is_empty(self) and self.outstanding == 0


# ---- the replica classes: a role and a KV policy on the core (slots: the policy's state) ----
class ReserveReplica(ReserveKV):
    """Aggregated, KV reserved at admission."""

    __slots__ = ()


class PagedReplica(PagedKV):
    """Aggregated, paged KV (the default)."""

    __slots__ = ()


class ReservePrefillReplica(PrefillRole, ReserveKV):
    __slots__ = ()


class PagedPrefillReplica(PrefillRole, PagedKV):
    __slots__ = ()


class ReserveDecodeReplica(DecodeRole, ReserveKV):
    __slots__ = ()


class PagedDecodeReplica(DecodeRole, PagedKV):
    """Decode-only, paged KV. Without window layers (``win`` None) the role's two per-request
    paths, :meth:`_admit` and :meth:`_fit_cut`, have the policy's ``_join_fits``,
    ``_join_kv`` and ``_taken`` hand-inlined: the same integer tests and updates in the same
    order (a disaggregated day makes them once per request each, bench/RESULTS.md)."""

    __slots__ = ()

    def _admit(self, it: int) -> None:
        """:meth:`DecodeRole._admit` with ``_join_fits(r, nt, budget, 0)`` and
        ``_join_kv(r, it)`` inlined (their common case: free blocks suffice, no queue)."""
        if self.win is not None:
            DecodeRole._admit(self, it)
            return
        w = self.waiting
        nt = self.n + len(self.pre)
        budget = self.budget
        max_batch = self.max_batch
        heap = self.heap
        lb = self.lb
        mask = self.mask
        b = self.b
        cnt2 = self.cnt2
        joined = self.joined
        while w and nt < max_batch and budget > 0:
            r = w[0]
            if r.gen:  # preempted here: recompute prompt + generated tokens
                c = self._admit_head(r, it, nt, budget)
                if not c:
                    break
                budget -= c
                nt += 1
                continue
            # _join_fits: its prompt's blocks and the one its first decode step may open
            # (nt < max_batch and budget > 0 hold here)
            p = r.eff
            need = (p >> lb) + 1
            free = self.free
            if need > free + self.g * len(self.lru) - (self.wm if nt else 0):
                break
            w.popleft()
            # _join_kv: _take(need), then its decode residue
            if need <= free and not self.qc:
                self.free = free - need
            else:
                self._take(need)
            self.adm_seq += 1
            r.adm = self.adm_seq
            r.done = p
            rho = (it - p) & mask
            r.rho = rho
            cnt2[rho] += 1
            cnt2[rho + b] += 1
            self.cum = None
            r.join_it = it - 1
            self.S += r.eff - (it - 1)
            if self.xw is not None:
                self._x_join(r)
            heappush(heap, (it + r.out - 2, r.rid, r))
            self.n += 1
            budget -= 1
            nt += 1
            joined.append(r)
        self.budget = budget

    def _fit_cut(self, r: Request, j: int) -> int:
        """:meth:`DecodeRole._fit_cut` with ``_taken`` (as a slice sum of ``cnt2``, like
        :meth:`PagedKV._fit_cut`'s) and ``_join_fits`` inlined; sets ``cut_x``, the blocks of
        the cut's ``j - 1`` decode steps, for ``_commit`` (PagedKV._fit_cut's formula)."""
        if r.gen or self.win is not None:
            return DecodeRole._fit_cut(self, r, j)
        n1 = self.n + len(self.pf)
        if n1 >= self.max_batch or self.max_tokens - n1 <= 0:
            self.cut_x = -1
            return -1
        mask = self.mask
        cnt2 = self.cnt2
        it1 = self.it + 1
        x = (j >> self.lb) * n1
        rem = j & mask
        if rem:
            s = it1 & mask
            x += sum(cnt2[s : s + rem])
        avail = self.free + self.g * len(self.lru) - x
        if (r.eff >> self.lb) + 1 > avail - (self.wm if n1 else 0):
            self.cut_x = -1
            return -1
        self.cut_x = x - cnt2[(it1 + j - 1) & mask]
        return j


class RankedPagedReplica(RankedPagedKV):
    """Aggregated, paged KV, one scheduler per data-parallel rank (serving/ranks.py)."""

    __slots__ = ()


#: any replica (what pods, pools, routers and autoscalers hold)
Replica = ReplicaCore

_CLASSES: dict[tuple[bool, str], type[ReplicaCore]] = {
    (False, "both"): ReserveReplica,
    (True, "both"): PagedReplica,
    (False, "prefill"): ReservePrefillReplica,
    (True, "prefill"): PagedPrefillReplica,
    (False, "decode"): ReserveDecodeReplica,
    (True, "decode"): PagedDecodeReplica,
}


def replica_class(paged: bool, role: str = "both") -> type[ReplicaCore]:
    """The replica class of a KV policy (``paged``: the paged policy, else reserve) and a pool
    role (``"both"``: aggregated, ``"prefill"``, ``"decode"``)."""
    return _CLASSES[(paged, role)]


def make_replica(index: int, pod: PodPort, cfg: EnginePlan, role: str = "both") -> ReplicaCore:
    """A replica of ``pod`` with the KV policy ``cfg`` names (``cfg.paged``) and ``role``; a
    data-parallel one with a scheduler per rank (``cfg.dp_ranks`` > 1: paged, aggregated, the
    checks of config/aggregated.py) is a :class:`RankedPagedReplica`."""
    if cfg.dp_ranks > 1:
        assert cfg.paged is not None and role == "both"
        return RankedPagedReplica(index, pod, cfg)
    return replica_class(cfg.paged is not None, role)(index, pod, cfg)
