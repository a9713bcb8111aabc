"""Workload: non-homogeneous Poisson arrivals and request sizes, generated hour by hour.

The arrival rate is piecewise constant per hour (the diurnal curve). Within hour ``h`` the number
of arrivals is Poisson(``rate_h * 3600``) and, given the count, their times are i.i.d. uniform in
the hour: this is exactly a Poisson process of rate ``rate_h``. Generating one hour at a time keeps
memory bounded whatever the length of the run. Pods split the fleet's traffic at random; a thinned
Poisson process is again Poisson, so each pod draws its own process at ``rate / pods``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fleetsim.base.errors import UserError
from fleetsim.base.io import MAX_TRACE_TOKENS, cached_by_content_stamp, first_true
from fleetsim.base.units import HOUR_S
from fleetsim.workload.distributions import Empirical, chunked


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


_INT = r"^\+?[0-9]+$"  # a plain decimal integer (no sign but +, no "_", no "0x")
_FLOAT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"  # a decimal number
_NONFINITE = r"^[+-]?(nan|inf|infinity)$"  # parsed (as Python does), then refused as out of range


def token_counts(col: pa.Array) -> tuple[np.ndarray, int]:
    """A string column as token counts: plain integers in 1..MAX_TRACE_TOKENS (surrounding
    whitespace allowed). Returns the values and the index of the first bad one (-1 if none)."""
    import pyarrow.compute as pc  # (~40-90 ms to import: only a CSV trace needs it)

    c = pc.utf8_trim_whitespace(col)
    ok = pc.and_(pc.match_substring_regex(c, _INT), pc.less_equal(pc.utf8_length(c), 12))
    v = pc.cast(pc.if_else(ok, c, "0"), pa.int64()).to_numpy(zero_copy_only=False)
    okn = ok.to_numpy(zero_copy_only=False) & (v >= 1) & (v <= MAX_TRACE_TOKENS)
    return v, first_true(~okn)


def numbers(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string column as floats (Python's ``float`` for decimal numbers, nan and inf); returns
    the values (0 where not a number) and the mask of values that are not numbers."""
    import pyarrow.compute as pc

    c = pc.utf8_trim_whitespace(col)
    ok = pc.or_(
        pc.match_substring_regex(c, _FLOAT),
        pc.match_substring_regex(c, _NONFINITE, ignore_case=True),
    )
    v = pc.cast(pc.if_else(ok, c, "0"), pa.float64()).to_numpy(zero_copy_only=False)
    return v, ~ok.to_numpy(zero_copy_only=False)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@cached_by_content_stamp(maxsize=8)
def read_trace(path: str) -> dict[str, np.ndarray]:
    """Integer columns of a CSV trace (e.g. Azure's TIMESTAMP,ContextTokens,GeneratedTokens),
    read with ``pyarrow.csv`` (:func:`fleetsim.base.io.read_csv`).

    Columns whose first value is not a number are skipped (timestamps); in the others every
    value must be an integer in 1..MAX_TRACE_TOKENS, and a bad value names its row (the line
    of the file: the header is row 1)."""
    from fleetsim.base.io import clean, read_csv

    csv = read_csv(path, "trace")
    if not csv.rows:
        raise UserError(f"trace {clean(path)!r}: no data rows")
    out: dict[str, np.ndarray] = {}
    for name, col in zip(csv.header, csv.columns, strict=True):
        if not _is_number(col[0].as_py()):
            continue  # a non-numeric column (timestamps)
        vals, bad = token_counts(col)
        if bad >= 0:
            raise UserError(
                f"trace {clean(path)!r}: row {bad + 2}, column {clean(name, 40)!r} = "
                f"{clean(col[bad].as_py(), 40)!r} is not an integer token count in "
                f"1..{MAX_TRACE_TOKENS:,} (fix or remove that row)"
            )
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
            m = len(self._cols[id(self.prompt)])
            rows = chunked(lambda k: rng.integers(0, m, size=k), n)
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
        times = np.sort(chunked(lambda k: rng_t.uniform(0.0, HOUR_S, size=k), n)) + h * HOUR_S
        p, o = sampler.draw(n, rng_s)
        yield HourChunk(h, times.tolist(), p.tolist(), o.tolist())


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@cached_by_content_stamp(maxsize=8)
def read_arrival_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A timed trace for ``traffic.trace``: CSV with columns arrival_s (seconds from the start,
    non-decreasing), prompt_tokens and output_tokens (integers in 1..MAX_TRACE_TOKENS), or a
    Mooncake JSONL trace (workload/mooncake.py). Returns the three columns."""
    # (imported here: a run without a trace needs neither the module nor its dataclass)
    from fleetsim.workload.mooncake import is_mooncake, read_mooncake

    if is_mooncake(path):
        tr = read_mooncake(path)
        return tr.arrival_s, tr.prompt_tokens, tr.output_tokens
    from fleetsim.base.io import clean, read_csv

    csv = read_csv(path, "traffic.trace")
    where, header = csv.where, csv.header
    missing = [c for c in TRACE_COLUMNS if c not in header]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {', '.join(missing)} in the header "
            f"{clean(','.join(header), 60)!r} (fix: a header line {','.join(TRACE_COLUMNS)})"
        )
    if not csv.rows:
        raise UserError(f"{where}: no data rows")
    ta, pr, out = (csv.columns[header.index(c)] for c in TRACE_COLUMNS)
    t, not_number = numbers(ta)
    p, bad_p = token_counts(pr)
    o, bad_o = token_counts(out)
    bad_parse = not_number.copy()
    for b in (bad_p, bad_o):
        if b >= 0:
            bad_parse[b] = True  # only the first bad count matters: nothing after it is read
    with np.errstate(invalid="ignore"):
        bad_range = ~(np.isfinite(t) & (t >= 0) & (t <= 1e9))
    bad_order = np.zeros(len(t), dtype=bool)
    bad_order[1:] = t[1:] < t[:-1]
    first = first_true(bad_parse | bad_range | bad_order)
    if first >= 0:
        row = clean(repr(csv.row(first)), 80)
        if bad_parse[first]:
            raise UserError(
                f"{where}: row {first + 2} = {row} is not arrival_s (number), "
                f"prompt_tokens, output_tokens (integers in 1..{MAX_TRACE_TOKENS:,})"
            )
        raise UserError(
            f"{where}: row {first + 2} = {row}: need arrival_s in "
            "[0, 1e9] s and non-decreasing (fix: sort the file)"
        )
    return t, p, o


def trace_arrivals(
    file: str, source: str, hours: int, pod: int = 0, n_pods: int = 1
) -> Iterator[HourChunk]:
    """Replay a timed trace hour by hour (rows past the horizon are dropped). With several pods,
    row ``i`` goes to pod ``i % n_pods`` (a deterministic split of the same trace)."""
    from fleetsim.workload.mooncake import is_mooncake, read_mooncake

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
