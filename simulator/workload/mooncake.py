"""Mooncake JSONL request traces (FAST'25 release): arrivals, sizes and prompt block ids.

One JSON object per line: ``timestamp`` (ms from the start of the trace), ``input_length`` and
``output_length`` (tokens) and ``hash_ids``, the ids of the prompt's blocks of 512 tokens (the
last one may be partial). Two requests whose ``hash_ids`` start with the same k ids share their
first k x 512 prompt tokens (scenarios/data/mooncake-2025/SOURCE.md). ``traffic.trace`` set to
a ``.jsonl`` file replays such a trace; the engine's prefix cache uses the ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fleetsim.base.errors import UserError


@dataclass(frozen=True)
class MooncakeTrace:
    """The columns of a Mooncake trace; ``ids[i]`` are request i's prompt block ids."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    ids: tuple[list[int], ...]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@lru_cache(maxsize=4)
def read_mooncake(path: str) -> MooncakeTrace:
    """Read and check a Mooncake JSONL trace; a bad line is a UserError that names it."""
    p = Path(path)
    try:
        fh = p.open()
    except OSError as exc:
        raise UserError(f"traffic.trace = {path!r}: cannot read it ({exc.strerror})") from None
    t: list[float] = []
    pr: list[int] = []
    out: list[int] = []
    ids: list[list[int]] = []
    with fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"traffic.trace = {path!r}: line {i}"
            try:
                d = json.loads(line)
            except ValueError:
                raise UserError(f"{where} is not a JSON object (fix or remove that line)") from None
            if not isinstance(d, dict):
                raise UserError(f"{where} is not a JSON object (fix or remove that line)")
            h = d.get("hash_ids")
            if h is None:
                raise UserError(
                    f"{where} has no 'hash_ids' (a Mooncake trace names each prompt's 512-token "
                    "blocks; use a CSV trace for requests without them)"
                )
            if not isinstance(h, list) or not all(_int(x) for x in h):
                raise UserError(f"{where}: 'hash_ids' = {h!r} is not a list of integers")
            ts, a, b = d.get("timestamp"), d.get("input_length"), d.get("output_length")
            if not (isinstance(ts, int | float) and not isinstance(ts, bool) and ts >= 0):
                raise UserError(f"{where}: 'timestamp' = {ts!r} must be milliseconds >= 0")
            if (
                not (isinstance(a, int) and _int(a) and a >= 1 and isinstance(b, int) and _int(b))
                or b < 1
            ):
                raise UserError(
                    f"{where}: 'input_length' = {a!r}, 'output_length' = {b!r} must be "
                    "integers >= 1"
                )
            s = ts / 1000.0
            if t and s < t[-1]:
                raise UserError(f"{where}: timestamps must not decrease (fix: sort the file)")
            t.append(s)
            pr.append(a)
            out.append(b)
            ids.append(h)
    if not t:
        raise UserError(f"traffic.trace = {path!r}: no requests")
    return MooncakeTrace(
        np.array(t), np.array(pr, dtype=np.int64), np.array(out, dtype=np.int64), tuple(ids)
    )


def is_mooncake(path: str) -> bool:
    """Whether ``traffic.trace`` names a Mooncake JSONL trace (by its extension)."""
    return str(path).endswith(".jsonl")


def prefix_hit_oracle(tr: MooncakeTrace, block_tokens: int = 512) -> tuple[int, int]:
    """(prompt tokens served from a prefix cache that never evicts, prompt tokens) when the
    requests are prefilled one after another in trace order: each request hits its longest run
    of leading full blocks that an earlier request had as full blocks, capped so that at least
    one prompt token is computed. Computed from the ids alone, for tests and reports."""
    seen: set[int] = set()
    hit = 0
    for ids, p in zip(tr.ids, tr.prompt_tokens.tolist()):
        full = min(len(ids), p // block_tokens)
        cap = min(full, (p - 1) // block_tokens)
        h = 0
        while h < cap and ids[h] in seen:
            h += 1
        hit += h * block_tokens
        seen.update(ids[:full])
    return hit, int(tr.prompt_tokens.sum())
