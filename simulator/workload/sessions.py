"""Multi-turn sessions: the workload of chat and agents, whose prompts reuse long prefixes.

Sessions start by the diurnal Poisson process (``traffic.requests_per_day`` counts sessions
then). A session of ``T`` turns (``traffic.sessions.turns``) sends turn 1 at its start and turn
``k + 1`` ``think_s`` seconds after turn ``k``'s answer is complete; a turn that is refused or
still running at the horizon ends the session. Its token stream is

    system prompt (S tokens, shared by every session) | u_1 | o_1 | u_2 | o_2 | ...

with ``u_k`` new user tokens (``traffic.prompt``) and ``o_k`` answer tokens (``traffic.output``),
and turn ``k``'s prompt is the stream up to ``u_k``. Every block of ``block_tokens`` of the
stream has an id: the blocks wholly inside the system prompt share ids across sessions, every
other block is the session's own. A turn carries the ids of its prompt and answer, so a prefix
cache can reuse the earlier turns (and the system prompt) and keep the new answer's blocks.

Everything random about a session (turns, think times, sizes) is drawn when it starts, from the
pod's session stream, so the draws do not depend on how the simulation unfolds.
"""

from __future__ import annotations

import numpy as np

SESSION_SHIFT = 24  # block j of session s has id ((s + 1) << 24) | j; system blocks are j < 2^24


class Session:
    """One session's plan and progress."""

    __slots__ = ("ctx", "k", "outs", "sid", "thinks", "users")

    def __init__(
        self, sid: int, users: list[int], outs: list[int], thinks: list[int], system: int
    ) -> None:
        self.sid = sid
        self.users = users  # new user tokens of turns 1..T
        self.outs = outs  # answer tokens of turns 1..T
        self.thinks = thinks  # seconds before turns 2..T
        self.k = 0  # the current turn (0-based)
        self.ctx = system  # tokens of the stream before the current turn's user tokens


class SessionSource:
    """Plans sessions and builds the prompt, answer and block ids of each turn."""

    def __init__(
        self,
        cfg,
        prompt_dist,
        output_dist,
        sampler,
        seed: np.random.SeedSequence,
        block_tokens: int,
        pod_index: int,
    ) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.rng = np.random.default_rng(seed)
        self.bt = block_tokens
        self.system = cfg.system_prompt_tokens
        self.sys_blocks = cfg.system_prompt_tokens // block_tokens
        self._next = pod_index << 32

    def start(self, user1: int, out1: int) -> Session:
        """A new session whose first turn has ``user1`` user tokens and ``out1`` answer tokens."""
        rng = self.rng
        turns = int(self.cfg.turns.draw(rng, 1)[0])
        more = turns - 1
        if more > 0:
            u, o = self.sampler.draw(more, rng)
            th = self.cfg.think_s.draw(rng, more)
            users = [user1, *u.tolist()]
            outs = [out1, *o.tolist()]
            thinks = th.tolist()
        else:
            users, outs, thinks = [user1], [out1], []
        sid = self._next
        self._next += 1
        return Session(sid, users, outs, thinks, self.system)

    def turn(self, s: Session) -> tuple[int, int, list[int]]:
        """(prompt tokens, answer tokens, block ids of prompt + answer) of the current turn."""
        prompt = s.ctx + s.users[s.k]
        out = s.outs[s.k]
        bt = self.bt
        n = -(-(prompt + out) // bt)
        base = (s.sid + 1) << SESSION_SHIFT
        sb = min(self.sys_blocks, n)
        ids = list(range(sb))
        ids.extend(range(base | sb, base | n))
        return prompt, out, ids

    def advance(self, s: Session) -> float | None:
        """Move to the next turn; its think time, or None when the session is over."""
        k = s.k
        if k + 1 >= len(s.users):
            return None
        s.ctx += s.users[k] + s.outs[k]
        s.k = k + 1
        return float(s.thinks[k])
