"""A request's state inside the serving engine (shared by the engine, routers and pod)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetsim.workload.sessions import Session


class Request:
    """One request's state inside the engine.

    The reserve KV policy (``kv_allocation = "reserve"``, serving/kv_reserve.py) uses
    ``need``; the paged policy (serving/kv_paged.py) uses the rest: ``ids`` (block ids of the
    prompt for prefix caching, or None), ``eff`` (tokens to prefill in the current pass: the
    prompt, plus the tokens already generated after a preemption), ``done`` (of those, computed
    or served from cache so far), ``held`` (leading ``ids`` this request references in the
    prefix cache), ``gen`` (tokens generated before the current pass), ``adm`` (admission
    order), ``rho`` (residue mod the block size of the iterations at which the decoding
    sequence needs a new KV block), ``preemptions`` and ``cached`` (prompt tokens served from
    the prefix cache on first admission). A data-parallel replica with one scheduler per rank
    (serving/ranks.py) binds it to ``rank`` on arrival. The core uses ``eff``, ``gen``, ``out`` and
    ``join_it`` under both policies.
    """

    __slots__ = (
        "adm",
        "arrival_s",
        "cached",
        "done",
        "eff",
        "first_token_s",
        "gen",
        "held",
        "ids",
        "join_it",
        "need",
        "out",
        "preemptions",
        "prompt",
        "rank",
        "rho",
        "rid",
        "session",
        "wlo",
    )

    def __init__(
        self, rid: int, arrival_s: float, prompt: int, out: int, ids: list[int] | None = None
    ) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.out = out
        self.need = prompt + out  # KV tokens reserved on admission (reserve policy)
        self.join_it = -1
        self.first_token_s = math.nan
        self.ids = ids
        self.eff = prompt
        self.done = 0
        self.held = 0
        self.wlo = 0  # with window layers: the first of its held ids whose window part it holds
        self.gen = 0
        self.adm = 0
        self.rho = 0
        self.preemptions = 0
        self.cached = 0
        self.rank = 0  # the data-parallel rank it is bound to (serving/ranks.py), else 0
        self.session: Session | None = (
            None  # the session this turn belongs to (workload/sessions.py)
        )
