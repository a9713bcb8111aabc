"""The interface between the replica core (:mod:`fleetsim.serving.core`) and a KV policy.

A KV policy decides what KV cache a request holds and when: how much a waiting request needs to
be admitted, what the running requests take as they grow, what a finished one gives back, and
so whether a request fits at a given iteration boundary. The core runs the iteration loop and
asks the policy only through the methods below; a policy is a class placed before the core in a
replica's bases (:mod:`fleetsim.serving.roles` builds the replica classes) that overrides all of
them. Two exist: :class:`fleetsim.serving.kv_reserve.ReserveKV` and
:class:`fleetsim.serving.kv_paged.PagedKV`.

The state a policy keeps lives in the replica's slots (declared by the core, as slots can live
in only one class of the bases). What the core's state means to a policy: ``waiting`` (the
queue), ``pre`` (admitted, prefill not complete, in admission order), ``pf`` (of those, the ones
whose last chunk is in the iteration being planned), ``n``/``heap``/``S`` (the decode set),
``budget`` (tokens left in the iteration being planned), ``P``, ``pairs``, ``nchunks``,
``P_first``, ``hit_tok``, ``re_tok`` (that iteration's prefill work and what the recorder is told
of it) and ``preempt_it`` (the last iteration whose scheduling preempted: nothing is admitted
into it).

How much KV a context holds is one function of the policy (``PagedKV.kv_blocks_for``): for
models whose layers hold less than their context (sliding-window layers at most W tokens, Mamba
layers a constant state) it counts layer-blocks per layer kind, and the decodes' growth follows
from it (kv_paged.py, "Sliding windows and linear-state layers").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetsim.serving.admission import EnginePlan
    from fleetsim.serving.request import Request


class KVPolicy:
    """The methods the core calls on its KV policy (each raises here: a policy overrides all)."""

    __slots__ = ()

    def _init_kv(self, cfg: EnginePlan) -> None:
        """Set the policy's state (once, at the end of the core's ``__init__``)."""
        raise NotImplementedError  # pragma: no cover

    def _schedule_running(self, it: int) -> None:
        """At a fresh boundary: the running requests' KV for iteration ``it`` (preempting if it
        is short) and the chunks that continue partial prefills; sets ``budget``."""
        raise NotImplementedError  # pragma: no cover

    def _admit(self, it: int) -> None:
        """Admit waiting requests, first come first served, into iteration ``it`` (into
        ``pre``, ``pf``, ``P``, ``pairs``, ``nchunks``, ``P_first``; ``budget`` shrinks)."""
        raise NotImplementedError  # pragma: no cover

    def _run_length(self, it: int, n1: int, k: int) -> int:
        """The number of iterations of a run whose first iteration is ``it`` and whose ``k - 1``
        later ones are pure decode steps of ``n1`` sequences up to the next completion: ``k``,
        or fewer where the policy must look again (KV runs short, a waiting request fits)."""
        raise NotImplementedError  # pragma: no cover

    def _commit_kv(self, j: int, it0: int, n: int, x: int, h: int, dt: float) -> None:
        """Iterations ``it0 .. it0 + j - 1`` are committed: take the KV that the ``n``
        sequences' decode steps ``1 .. j - 1`` wrote (``x`` if the policy computed it at the
        cut, else -1), and account the KV in use over their ``dt`` seconds in hour ``h``."""
        raise NotImplementedError  # pragma: no cover

    def _free_kv(self, r: Request, f: int) -> None:
        """``r`` finished (its last iteration ``f``) on an aggregated replica: free its KV."""
        raise NotImplementedError  # pragma: no cover

    def _fits_now(self, r: Request) -> bool:
        """Whether ``r``, the queue's head, joins the iteration being planned."""
        raise NotImplementedError  # pragma: no cover

    def _fit_cut(self, r: Request, j: int) -> int:
        """The first boundary ``>= j`` (``1 <= j < k``) of the current run at which ``r``, the
        queue's head, joins; -1 if none before the run's end. May set ``cut_x`` (the KV the
        decode steps before it take, for ``_commit_kv``)."""
        raise NotImplementedError  # pragma: no cover

    def _fit_at(self, r: Request, n: int, x: int) -> bool:
        """Whether ``r`` joins a boundary of a pure decode run of ``n`` sequences by which the
        decodes have taken ``x`` more KV than now."""
        raise NotImplementedError  # pragma: no cover

    def _taken(self, j: int, n1: int) -> int:
        """The KV that ``n1`` decoding sequences take over the run's first ``j`` decode steps."""
        raise NotImplementedError  # pragma: no cover

    def _admit_head(self, r: Request, it: int, nt: int, budget: int) -> int:
        """Admit ``r``, the queue's head, into iteration ``it`` (``nt`` sequences, ``budget``
        tokens left) and schedule its first chunk: its tokens, or 0 if it does not fit."""
        raise NotImplementedError  # pragma: no cover

    # ---- for the pool roles (serving/roles.py) ----------------------------------------------
    def _keep_kv(self, r: Request, f: int) -> None:
        """``r`` finished its prefill on a prefill-only replica: it leaves the decode set but
        keeps its KV until :meth:`_release_kv`."""
        raise NotImplementedError  # pragma: no cover

    def _release_kv(self, r: Request) -> None:
        """The KV that handed-off ``r`` kept has left: free it."""
        raise NotImplementedError  # pragma: no cover

    def _join_fits(self, r: Request, n: int, budget: int, x: int) -> bool:
        """Whether ``r``, whose prompt KV arrived, joins a decode-only replica's boundary with
        ``n`` sequences, ``budget`` tokens left and ``x`` more KV taken than now."""
        raise NotImplementedError  # pragma: no cover

    def _join_kv(self, r: Request, it: int) -> None:
        """Take the KV of ``r``'s arrived prompt; it decodes from iteration ``it`` on."""
        raise NotImplementedError  # pragma: no cover
