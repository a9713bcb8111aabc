"""A request's state inside the serving engine (shared by the engine, routers and pod)."""

from __future__ import annotations

import math


class Request:
    """One request's state inside the engine."""

    __slots__ = ("arrival_s", "first_token_s", "join_it", "need", "out", "prompt", "rid")

    def __init__(self, rid: int, arrival_s: float, prompt: int, out: int) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.out = out
        self.need = prompt + out  # KV tokens reserved on admission
        self.join_it = -1
        self.first_token_s = math.nan
