"""Sliding-window bookkeeping of a replica's decode set, inherited by the replica core.

**Sliding windows** (a model with window layers of ``W`` tokens on a share ``s`` of its
attention layers; ``xw`` is None without): a step reads ``min(c, W)`` keys of a sequence at
context ``c`` on the window layers, so the step's ``ctx`` (the latency model's attended keys,
:meth:`fleetsim.device.modelspec.ModelSpec.attended_keys`) is ``S + n * it - s * E`` with
``E = xD + xn * it`` the context beyond the window of the ``xn`` sequences past it (``xD``: the
sum of their ``eff - join_it - W``). A sequence passes its window at a known iteration (a heap,
``xheap``); a run ends before the first decode step at which one does, so within a run ``ctx``
still grows by a constant, ``g1 = n1 - s * xn`` (``n1`` without windows), and the closed forms
stay exact.

Every method here is called only when ``xw`` is set (a model with window layers); models
without windows take none of these paths, so their tables are bit-identical to a core without
them.
"""

from __future__ import annotations

from heapq import heappop, heappush

from fleetsim.serving.request import Request


class WindowedDecode:
    """The window methods of :class:`fleetsim.serving.core.ReplicaCore` (state in its slots)."""

    __slots__ = ("xD", "xheap", "xin", "xn", "xw")  # (the only base of the core with slots)

    xw: tuple[int, float] | None  # (W, the share of attention layers with a window)
    xin: dict[Request, int]  # a decoding sequence -> the iteration it passes W (-1: past it)
    xD: int  # sum of eff - join_it - W over the sequences past their window
    xn: int  # how many
    xheap: list[tuple[int, int, Request]]  # (iteration it passes W, rid, r)
    S: float  # sum of eff - join_it over the decode set (ReplicaCore)
    n: int  # sequences in the decode set (ReplicaCore)

    def _x_join(self, r: Request) -> None:
        """``r`` joined the decode set (``join_it`` set): its context ``eff + it - join_it``
        reaches the window ``W`` at iteration ``join_it + W - eff``; past it already if that is
        at or before its first decode step (``join_it + 1``)."""
        assert self.xw is not None
        W = self.xw[0]
        j = r.join_it
        st = j + W - r.eff
        if st <= j + 1:
            self.xin[r] = -1
            self.xD += r.eff - j - W
            self.xn += 1
        else:
            self.xin[r] = st
            heappush(self.xheap, (st, r.rid, r))

    def _x_leave(self, r: Request) -> None:
        """``r`` leaves the decode set (before its ``eff`` or ``join_it`` change)."""
        assert self.xw is not None
        if self.xin.pop(r) < 0:
            self.xD -= r.eff - r.join_it - self.xw[0]
            self.xn -= 1

    def _x_pairs(self, done: int, c: int) -> float:
        """The attention pairs of a prefill chunk of ``c`` tokens after ``done`` (in units of a
        pair in every attention layer): ``c (2 done + c)`` on the global layers (the model's
        full-square convention, ``L^2`` over a whole prompt), and on the window layers the
        growth of ``L min(L, W)`` (:meth:`ModelSpec.prefill_flops`'s window term)."""
        assert self.xw is not None
        W, share = self.xw
        full = c * (2.0 * done + c)
        e = done + c
        win = e * float(e if e < W else W) - done * float(done if done < W else W)
        return full - share * (full - win)

    def _x_ctx(self, it: int) -> float:
        """The decode set's attended keys at iteration ``it`` (the sequences whose context
        reached the window by ``it`` counted past it from now on)."""
        assert self.xw is not None
        W, share = self.xw
        heap = self.xheap
        xin = self.xin
        while heap:
            st, _rid, r = heap[0]
            cur = xin.get(r)
            if st > it and cur == st:
                break  # (the top is a live entry still inside its window)
            heappop(heap)
            if cur == st:  # it reaches its window: stale entries (left, re-joined) skipped
                xin[r] = -1
                self.xD += r.eff - r.join_it - W
                self.xn += 1
        return (self.S + self.n * it) - share * (self.xD + self.xn * it)

    def _x_run(self, it: int, pf: list[Request], n1: int, nxt: int) -> tuple[float, int, int]:
        """For the run planned at ``it`` (after :meth:`_x_ctx`), whose first iteration's last
        chunks ``pf`` join ``n1 - len(pf)`` decoding sequences: the decode steps' ctx growth per
        step, the context beyond the window at the first decode step (``it + 1``), and
        ``nxt`` lowered so that the decode steps end before the first iteration ``q > it + 1``
        at which a sequence reaches its window (``nxt = it`` when one reaches it at
        ``it + 1``: a run of one iteration)."""
        assert self.xw is not None
        W, share = self.xw
        D = self.xD
        ns = self.xn
        heap = self.xheap
        q = heap[0][0] if heap else 1 << 62  # (a live entry, > it: _x_ctx cleaned the top)
        for r in pf:
            st = it + W - r.eff  # _x_join's test with join_it = it
            if st <= it + 1:
                D += r.eff - it - W
                ns += 1
            elif st < q:
                q = st
        if q - 1 < nxt:
            nxt = q - 1
        return n1 - share * ns, D + ns * (it + 1), nxt
