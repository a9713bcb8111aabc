"""The ``reserve`` KV policy (``kv_allocation = "reserve"``): a request reserves its whole KV,
prompt + output tokens, when it is admitted, and frees it when it finishes. A hybrid model's
sequence also reserves its constant linear-state state (``kv_state`` tokens of the attention
layers' KV, ``Limits.kv_state``; config/resolved.py ``KvBudget.state_tokens``), in its prefill
replica too when disaggregated; 0 for every other model.

Admission (:class:`fleetsim.serving.admission.Limits`, the rule the real engine of
``fleetsim.calibrate.engine`` shares): waiting requests are taken first come first served while
the batch has fewer than ``max_batch_size`` sequences, the iteration's tokens (its prompts plus
one per decoding sequence) stay within ``max_batched_tokens`` and the reserved KV stays within
the replica's capacity; the first that does not fit blocks the queue. A prompt is prefilled
whole in one iteration (no chunking), the KV never runs short, so nothing is preempted and a
run of decode steps is limited only by the next completion and the hour.

The methods are the KV-policy interface of :mod:`fleetsim.serving.core`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetsim.serving.core import ReplicaCore
from fleetsim.serving.request import Request

if TYPE_CHECKING:
    from fleetsim.serving.admission import EnginePlan


class ReserveKV(ReplicaCore):
    """KV reserved at admission. State: ``kv_used`` (tokens reserved), ``kv_cap``,
    ``kv_state`` (the tokens a sequence reserves beside its prompt + output)."""

    __slots__ = ()

    kv_cap: int
    kv_used: int
    kv_state: int

    def _init_kv(self, cfg: EnginePlan) -> None:
        self.kv_cap = cfg.limits.kv_cap
        self.kv_state = cfg.limits.kv_state
        self.kv_used = 0

    def is_empty(self) -> bool:
        """Also holds no reserved KV (held for, or in transfer to, it in a disaggregated
        fleet)."""
        return ReplicaCore.is_empty(self) and self.outstanding == 0 and self.kv_used == 0

    def _schedule_running(self, it: int) -> None:
        """Nothing to allocate: the decodes' KV was reserved when they were admitted."""
        self.budget = self.max_tokens - self.n

    def _admit(self, it: int) -> None:
        """First come first served while batch, token budget and KV reservation allow (the
        rule of Limits.admits, hand-inlined: the hot path; measured 2% of the run's CPU time,
        default scenario at 300k requests, 4.81 s user inlined against 4.92 s with the calls,
        3 runs each on a loaded machine). Pod._arrive inlines Limits.servable the same way."""
        w = self.waiting
        pre = self.pre
        pf = self.pf
        nt = self.n + len(pf)
        P, pairs = self.P, self.pairs
        budget = self.budget
        kv = self.kv_used
        max_batch, kv_cap, st = self.max_batch, self.kv_cap, self.kv_state
        shared = self.pod.shared_queue is not None
        while w:
            r = w[0]
            prompt = r.prompt
            if nt >= max_batch or prompt > budget or kv + r.need + st > kv_cap:
                break
            w.popleft()
            pre.append(r)
            pf.append(r)
            P += prompt
            pairs += float(prompt) * prompt if self.xw is None else self._x_pairs(0, prompt)
            budget -= prompt
            kv += r.need + st
            nt += 1
            if shared:
                self.outstanding += 1
        self.P_first = self.P = P
        self.pairs = pairs
        self.nchunks = len(pf)
        self.budget = budget
        self.kv_used = kv

    def _run_length(self, it: int, n1: int, k: int) -> int:
        """A run of decode steps needs no KV: it ends at the next completion (or the hour)."""
        return k

    def _commit_kv(self, j: int, it0: int, n: int, x: int, h: int, dt: float) -> None:
        """Nothing to take: the KV of every step was reserved at admission."""

    def _free_kv(self, r: Request, f: int) -> None:
        self.kv_used -= r.need + self.kv_state

    def _keep_kv(self, r: Request, f: int) -> None:
        """A prefill replica keeps the reservation (``r.pf_need``) until :meth:`_release_kv`."""

    def _release_kv(self, r: Request) -> None:
        self.kv_used -= r.pf_need + self.kv_state  # type: ignore[attr-defined]

    def _fits_now(self, r: Request) -> bool:
        n = self.n
        return (
            n + len(self.pf) < self.max_batch
            and self.P + n + r.prompt <= self.max_tokens
            and self.kv_used + r.need + self.kv_state <= self.kv_cap
        )

    def _fit_cut(self, r: Request, j: int) -> int:
        """Batch, tokens and reserved KV are the same at every boundary of a run (its prefills
        have joined the decode set): ``j`` if ``r`` fits there, else none before the run's end."""
        n_all = self.n + len(self.pf)
        ok = (
            n_all < self.max_batch
            and n_all + r.prompt <= self.max_tokens
            and self.kv_used + r.need + self.kv_state <= self.kv_cap
        )
        return j if ok else -1

    # ---- the decode role (serving/roles.py) ----------------------------------------------------
    def _join_fits(self, r: Request, n: int, budget: int, x: int) -> bool:
        return (
            n < self.max_batch
            and budget > 0
            and self.kv_used + r.need + self.kv_state <= self.kv_cap
        )

    def _join_kv(self, r: Request, it: int) -> None:
        self.kv_used += r.need + self.kv_state

    def _taken(self, j: int, n1: int) -> int:
        return 0  # a run's decode steps take no KV
