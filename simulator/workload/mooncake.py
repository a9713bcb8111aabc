"""Mooncake JSONL request traces (FAST'25 release): arrivals, sizes and prompt block ids.

One JSON object per line: ``timestamp`` (ms from the start of the trace), ``input_length`` and
``output_length`` (tokens) and ``hash_ids``, the ids of the prompt's blocks of 512 tokens (the
last one may be partial). Two requests whose ``hash_ids`` start with the same k ids share their
first k x 512 prompt tokens (scenarios/data/mooncake-2025/SOURCE.md). ``traffic.trace`` set to
a ``.jsonl`` file replays such a trace; the engine's prefix cache uses the ids.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from fleetsim.base import io
from fleetsim.base.errors import UserError

MAX_LINE_CHARS = 1 << 20  # one request's line (its ids of 512-token blocks: ~100k ids, 51M tokens)
MAX_BLOCK_IDS = 20_000_000  # ids in the whole trace (160 MB as int64; the shipped trace: 182,789)
MAX_TIMESTAMP_MS = 1e12  # 1e9 s, as the CSV reader's arrival_s bound
MAX_BLOCK_ID = (1 << 63) - 1  # ids are 64-bit hashes in other tools


class BlockIds(Sequence[list[int]]):
    """Request i's prompt block ids, stored flat (one int64 array and each request's start and
    end in it, 8 bytes per id rather than ~36 in Python lists). ``ids[i]`` is a list; a slice
    (with a step) is another :class:`BlockIds` over the same array."""

    __slots__ = ("flat", "start", "stop")

    def __init__(self, flat: np.ndarray, start: np.ndarray, stop: np.ndarray) -> None:
        self.flat, self.start, self.stop = flat, start, stop

    def __len__(self) -> int:
        return len(self.start)

    @overload
    def __getitem__(self, i: int) -> list[int]: ...

    @overload
    def __getitem__(self, i: slice) -> BlockIds: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return BlockIds(self.flat, self.start[i], self.stop[i])
        return self.flat[int(self.start[i]) : int(self.stop[i])].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        flat = self.flat
        for a, b in zip(self.start.tolist(), self.stop.tolist()):
            yield flat[a:b].tolist()


@dataclass(frozen=True)
class MooncakeTrace:
    """The columns of a Mooncake trace; ``ids[i]`` are request i's prompt block ids."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    ids: BlockIds


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of ``text`` split at ``\n`` only (as :func:`io.decode` counts)."""
    i, n, k = 0, len(text), 1
    while i < n:
        j = text.find("\n", i)
        if j < 0:
            j = n
        yield k, text[i:j]
        i, k = j + 1, k + 1


@io.cached_by_content_stamp(maxsize=4)
def read_mooncake(path: str, what: str = "traffic.trace") -> MooncakeTrace:
    """Read and check a Mooncake JSONL trace through the bounded reader (a regular file, opened
    without blocking, at most :data:`io.MAX_TRACE_BYTES`; UTF-8 with an optional byte-order mark,
    a bad byte named by its line). Each line: at most :data:`MAX_LINE_CHARS`, JSON nested at most
    :data:`io.MAX_DEPTH` deep with integers of at most :data:`io.MAX_INT_DIGITS` digits; a finite
    ``timestamp`` in [0, 1e12] ms, not decreasing; token counts in 1..MAX_TRACE_TOKENS;
    ``hash_ids`` integers in [0, 2^63). A bad line is a UserError that names it; ``what`` names
    the file's setting (``traffic.trace``, ``--long-trace``)."""
    raw = io.read_bytes(path, what, io.MAX_TRACE_BYTES)
    where0 = f"{what} = {io.clean(path, 160)!r}"
    text = io.decode(raw, where0)  # (a byte-order mark is dropped)
    del raw
    n = text.count("\n") + 1
    t = np.empty(n, dtype=np.float64)
    pr = np.empty(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    start = np.empty(n, dtype=np.int64)
    flat_ids = array("q")  # (8 bytes an id, grown in place)
    n_ids = 0
    rows = 0
    last = 0.0
    hi = io.MAX_TRACE_TOKENS
    for i, line in _lines(text):
        if not line.strip():
            continue
        where = f"{where0}: line {i}"
        if len(line) > MAX_LINE_CHARS:
            raise UserError(
                f"{where} has {len(line):,} characters, above the limit of {MAX_LINE_CHARS:,} "
                "for one request (fix or remove that line)"
            )
        # (integers of any length up to the line's are read; every one used is range-checked)
        d = io.parse_json(line, where, "one JSON object per line", bounded_ints=False)
        if not isinstance(d, dict):
            raise UserError(f"{where} is not a JSON object (fix or remove that line)")
        h = d.get("hash_ids")
        if h is None:
            raise UserError(
                f"{where} has no 'hash_ids' (a Mooncake trace names each prompt's 512-token "
                "blocks; use a CSV trace for requests without them)"
            )
        if (
            type(h) is not list
            or not all(type(x) is int for x in h)  # (not bool, a subclass of int)
            or (h and (min(h) < 0 or max(h) > MAX_BLOCK_ID))
        ):
            raise UserError(
                f"{where}: 'hash_ids' = {io.clean(repr(h), 80)} is not a list of integers in "
                "[0, 2^63)"
            )
        ts, a, b = d.get("timestamp"), d.get("input_length"), d.get("output_length")
        if not (
            isinstance(ts, int | float)
            and not isinstance(ts, bool)
            and np.isfinite(float(ts))
            and 0 <= ts <= MAX_TIMESTAMP_MS
        ):
            raise UserError(
                f"{where}: 'timestamp' = {io.clean(repr(ts), 40)} must be milliseconds in "
                f"[0, {MAX_TIMESTAMP_MS:.0e}] (fix that line)"
            )
        if not (type(a) is int and type(b) is int and 1 <= a <= hi and 1 <= b <= hi):
            raise UserError(
                f"{where}: 'input_length' = {io.clean(repr(a), 40)}, 'output_length' = "
                f"{io.clean(repr(b), 40)} must be integers in 1..{hi:,}"
            )
        s = float(ts) / 1000.0
        if s < last:
            raise UserError(f"{where}: timestamps must not decrease (fix: sort the file)")
        last = s
        n_ids += len(h)
        if n_ids > MAX_BLOCK_IDS:
            raise UserError(
                f"{where}: the trace holds more than {MAX_BLOCK_IDS:,} block ids (fix: replay "
                "a shorter part of it)"
            )
        t[rows], pr[rows], out[rows], start[rows] = s, a, b, n_ids - len(h)
        flat_ids.extend(h)
        rows += 1
    if not rows:
        raise UserError(f"{where0}: no requests")
    flat = np.frombuffer(flat_ids, dtype=np.int64) if n_ids else np.empty(0, dtype=np.int64)
    st = start[:rows].copy()
    stop = np.append(st[1:], n_ids)
    return MooncakeTrace(
        t[:rows].copy(), pr[:rows].copy(), out[:rows].copy(), BlockIds(flat, st, stop)
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
