"""Workload: non-homogeneous Poisson arrivals and request sizes, generated hour by hour.

The arrival rate is piecewise constant per hour (the diurnal curve). Within hour ``h`` the number
of arrivals is Poisson(``rate_h * 3600``) and, given the count, their times are i.i.d. uniform in
the hour: this is exactly a Poisson process of rate ``rate_h``. Generating one hour at a time keeps
memory bounded whatever the length of the run. Pods split the fleet's traffic at random; a thinned
Poisson process is again Poisson, so each pod draws its own process at ``rate / pods``.
"""

from __future__ import annotations

import csv
import io as _io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fleetsim.base.errors import UserError
from fleetsim.base.units import HOUR_S
from fleetsim.workload.distributions import Empirical
from fleetsim.workload.mooncake import is_mooncake, read_mooncake


@dataclass(frozen=True, slots=True)
class HourChunk:
    """The arrivals of one hour: times (s from start) and sizes, as Python lists for speed."""

    hour: int
    arrival_s: list[float]
    prompt_tokens: list[int]
    output_tokens: list[int]
    ids: list[list[int]] | None = None  # prompt block ids (a Mooncake trace), else None


def _resolve_path(file: str, source: str) -> Path:
    """The absolute path of a data file named in a scenario: relative to the scenario file's
    folder (else to the working folder, where it exists there only). Absolute, so that an error
    about the file shows where it was looked for."""
    p = Path(file)
    if not p.is_absolute() and source:
        cand = Path(source).parent / p
        if cand.exists() or not p.exists():
            p = cand
    return Path(os.path.abspath(p))


MAX_TRACE_TOKENS = 1_000_000_000  # a token count above this is a broken file, not a request


def _csv_rows(path: str, what: str) -> list[list[str]]:
    """The rows of a CSV file read through :mod:`fleetsim.base.io` (regular file, size limit,
    UTF-8 with or without a BOM, bounded field length); a UserError names the line."""
    from fleetsim.base import io

    text = io.read_text(path, what, io.MAX_TRACE_BYTES)
    where = f"{what} = {io.clean(path)!r}"
    old = csv.field_size_limit(io.CSV_FIELD_LIMIT)
    reader = csv.reader(_io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as exc:
        raise UserError(
            f"{where}: line {reader.line_num}: {io.clean(str(exc), 100)} "
            f"(fields are at most {io.CSV_FIELD_LIMIT} characters; fix that line)"
        ) from None
    finally:
        csv.field_size_limit(old)


def _token_count(cell: str) -> int:
    """A token count: a plain integer in 1..MAX_TRACE_TOKENS (ValueError otherwise)."""
    c = cell.strip()
    if not c.isascii() or len(c) > 12:
        raise ValueError(c)
    v = int(c)
    if not 1 <= v <= MAX_TRACE_TOKENS:
        raise ValueError(c)
    return v


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=8)
def read_trace(path: str) -> dict[str, np.ndarray]:
    """Integer columns of a CSV trace (e.g. Azure's TIMESTAMP,ContextTokens,GeneratedTokens).

    Columns whose first value is not a number are skipped (timestamps); in the others every
    value must be an integer in 1..MAX_TRACE_TOKENS, and a bad value names its row."""
    from fleetsim.base.io import clean

    rows = _csv_rows(path, "trace")
    if not rows:
        raise UserError(f"trace {clean(path)!r}: the file is empty")
    header, rows = [h.strip() for h in rows[0]], rows[1:]
    if not rows:
        raise UserError(f"trace {clean(path)!r}: no data rows")
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        first = rows[0][j] if j < len(rows[0]) else ""
        if not _is_number(first):
            continue  # a non-numeric column (timestamps)
        vals = np.empty(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            cell = row[j] if j < len(row) else "<missing>"
            try:
                vals[i] = _token_count(cell)
            except ValueError:
                raise UserError(
                    f"trace {clean(path)!r}: row {i + 2}, column {clean(name, 40)!r} = "
                    f"{clean(cell, 40)!r} is not an integer token count in "
                    f"1..{MAX_TRACE_TOKENS:,} (fix or remove that row)"
                ) from None
        out[name] = vals
    return out


def trace_columns_max(file: str, source: str = "") -> dict[str, int]:
    """The maximum of every integer column of a trace (used by the KV-budget check)."""
    cols = read_trace(str(_resolve_path(file, source)))
    return {k: int(v.max()) for k, v in cols.items()}


def _trace_column(d: Empirical, source: str) -> np.ndarray:
    cols = read_trace(str(_resolve_path(d.file, source)))
    if d.column not in cols:
        raise UserError(
            f"traffic: empirical column {d.column!r} not in {d.file!r} "
            f"(integer columns: {', '.join(cols)})"
        )
    return cols[d.column]


class SizeSampler:
    """Draws prompt and output lengths. Two empirical columns of the same file are sampled
    jointly (the same rows), which keeps their correlation."""

    def __init__(self, prompt, output, source: str = "") -> None:
        self.prompt = prompt
        self.output = output
        self.source = source
        self._joint = (
            isinstance(prompt, Empirical)
            and isinstance(output, Empirical)
            and prompt.file == output.file
        )
        self._cols = {
            id(d): _trace_column(d, source) for d in (prompt, output) if isinstance(d, Empirical)
        }

    def _draw(self, d, n: int, rng: np.random.Generator, rows: np.ndarray | None) -> np.ndarray:
        if isinstance(d, Empirical):
            return d.draw_from(self._cols[id(d)], rng, n, rows)
        return d.draw(rng, n)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = None
        if self._joint:
            rows = rng.integers(0, len(self._cols[id(self.prompt)]), size=n)
        return self._draw(self.prompt, n, rng, rows), self._draw(self.output, n, rng, rows)


def hourly_arrivals(
    rates_per_s: list[float], sampler: SizeSampler, seed: np.random.SeedSequence
) -> Iterator[HourChunk]:
    """Yield one :class:`HourChunk` per hour (``len(rates_per_s)`` hours)."""
    t_seq, s_seq = seed.spawn(2)
    rng_t = np.random.default_rng(t_seq)
    rng_s = np.random.default_rng(s_seq)
    for h, rate in enumerate(rates_per_s):
        n = int(rng_t.poisson(rate * HOUR_S)) if rate > 0 else 0
        times = np.sort(rng_t.uniform(0.0, HOUR_S, size=n)) + h * HOUR_S
        p, o = sampler.draw(n, rng_s)
        yield HourChunk(h, times.tolist(), p.tolist(), o.tolist())


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@lru_cache(maxsize=8)
def read_arrival_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A timed trace for ``traffic.trace``: CSV with columns arrival_s (seconds from the start,
    non-decreasing), prompt_tokens and output_tokens (integers in 1..MAX_TRACE_TOKENS), or a
    Mooncake JSONL trace (workload/mooncake.py). Returns the three columns."""
    if is_mooncake(path):
        tr = read_mooncake(path)
        return tr.arrival_s, tr.prompt_tokens, tr.output_tokens
    from fleetsim.base.io import clean

    where = f"traffic.trace = {clean(path)!r}"
    rows = _csv_rows(path, "traffic.trace")
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in TRACE_COLUMNS if c not in header]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {', '.join(missing)} in the header "
            f"{clean(','.join(header), 60)!r} (fix: a header line {','.join(TRACE_COLUMNS)})"
        )
    j = [header.index(c) for c in TRACE_COLUMNS]
    n = len(rows) - 1
    t = np.empty(n)
    pr = np.empty(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    last = 0.0
    for i, row in enumerate(rows[1:]):
        try:
            a = float(row[j[0]])
            b, c = _token_count(row[j[1]]), _token_count(row[j[2]])
        except (ValueError, IndexError):
            raise UserError(
                f"{where}: row {i + 2} = {clean(repr(row), 80)} is not arrival_s (number), "
                f"prompt_tokens, output_tokens (integers in 1..{MAX_TRACE_TOKENS:,})"
            ) from None
        if not (np.isfinite(a) and 0 <= a <= 1e9) or (i and a < last):
            raise UserError(
                f"{where}: row {i + 2} = {clean(repr(row), 80)}: need arrival_s in "
                "[0, 1e9] s and non-decreasing (fix: sort the file)"
            )
        t[i], pr[i], out[i], last = a, b, c, a
    if not n:
        raise UserError(f"{where}: no data rows")
    return t, pr, out


def trace_arrivals(
    file: str, source: str, hours: int, pod: int = 0, n_pods: int = 1
) -> Iterator[HourChunk]:
    """Replay a timed trace hour by hour (rows past the horizon are dropped). With several pods,
    row ``i`` goes to pod ``i % n_pods`` (a deterministic split of the same trace)."""
    path = str(_resolve_path(file, source))
    t, p, o = read_arrival_trace(path)
    ids = read_mooncake(path).ids[pod::n_pods] if is_mooncake(path) else None
    t, p, o = t[pod::n_pods], p[pod::n_pods], o[pod::n_pods]
    hour_of = np.floor(t / HOUR_S).astype(np.int64)
    for h in range(hours):
        lo, hi = (int(x) for x in np.searchsorted(hour_of, [h, h + 1]))
        yield HourChunk(
            h,
            t[lo:hi].tolist(),
            p[lo:hi].tolist(),
            o[lo:hi].tolist(),
            None if ids is None else list(ids[lo:hi]),
        )
