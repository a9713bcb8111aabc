"""Bounded input: the one way fleetsim reads a file the user names.

Every read goes through :func:`read_bytes` / :func:`read_text`, which

* open without blocking (a FIFO cannot hang the run) and accept a regular file only (not
  ``/dev/zero``, a FIFO, a socket or a directory);
* refuse a file above a stated size limit *before* reading it (a multi-GB checkpoint named as a
  profile is one clear line, not an out-of-memory kill), and never read more than the limit even
  if the file grows meanwhile;
* decode UTF-8 with an optional byte-order mark; any other byte is one line naming the file, the
  line and the byte.

The parsers get limits too: :func:`check_depth` bounds the nesting of JSON and TOML (the
standard parsers recurse, so 100,000 nested arrays would be a ``RecursionError``), and
:func:`parse_json` reads integers of at most :data:`MAX_INT_DIGITS` digits. Every problem is a
:class:`~fleetsim.base.errors.UserError` (one line, exit 2).
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from fleetsim.base.errors import UserError

MiB = 1 << 20
# Stated limits (bytes). A scenario, a model file, a schedule or a profile is a few KB; the
# largest real trace we ship (Azure 2024 conversation, one week) is ~30 MB of CSV.
_F = TypeVar("_F", bound=Callable[..., Any])

MAX_CONFIG_BYTES = 4 * MiB  # scenario TOML, model TOML, schedule JSON, profile JSON
MAX_TRACE_BYTES = 256 * MiB  # CSV traces (timed arrivals, empirical sizes)
MAX_DEPTH = 64  # nesting of arrays/tables in JSON and TOML (a scenario needs 3)
MAX_INT_DIGITS = 20  # an integer in a JSON file: 2**64 has 20 digits
CSV_FIELD_LIMIT = 4096  # characters of one CSV field (a number needs < 30)
MAX_TRACE_TOKENS = 1_000_000_000  # a token count above this is a broken file, not a request


def clean(text: str, limit: int = 200) -> str:
    """``text`` fit for one terminal line: control characters (newlines, ANSI escapes) shown
    escaped, and cut to ``limit`` characters."""
    out = "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _name(path: str | Path) -> str:
    return clean(str(path), 160)


def _open_checked(
    path: str | Path, what: str, limit: int | None, nofollow: bool
) -> tuple[int, str]:
    """An open descriptor of the regular file ``path`` (without blocking; under ``limit`` bytes
    unless None) and the file as errors name it."""
    p = str(path)
    where = f"{what} = {_name(p)!r}" if what else repr(_name(p))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags | (os.O_NOFOLLOW if nofollow else 0))
    except FileNotFoundError:
        if os.path.islink(p):
            raise UserError(
                f"{where}: is a symbolic link to {_name(os.readlink(p))!r}, which does not "
                "exist (fix: name the file itself)"
            ) from None
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a directory, not a file (fix: name the file)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            if nofollow and os.path.islink(p):
                raise UserError(
                    f"{where}: is a symbolic link, which fleetsim does not follow here "
                    "(fix: remove it)"
                ) from None
            raise UserError(
                f"{where}: is a symbolic link loop (a link that leads back to itself; fix: "
                "name the file itself)"
            ) from None
        raise UserError(f"{where}: cannot read it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if nofollow and stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
            raise UserError(
                f"{where}: has {st.st_nlink} hard links, which fleetsim does not read here "
                "(fix: remove it)"
            )
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket"
                if stat.S_ISSOCK(st.st_mode)
                else "not a regular file"
            )
            raise UserError(f"{where}: is {kind}, not a regular file (fix: name a file)")
        if limit is not None and st.st_size > limit:
            raise UserError(
                f"{where}: is {st.st_size / MiB:,.1f} MiB, above the limit of "
                f"{limit / MiB:,.0f} MiB for this kind of file (fix: name the right file)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, where


def read_bytes(
    path: str | Path, what: str, limit: int = MAX_CONFIG_BYTES, *, nofollow: bool = False
) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``); ``what`` names it in errors
    (e.g. ``"hardware.profile"``). ``nofollow``: refuse a symbolic link or a file with more than
    one hard link (for the files fleetsim itself keeps in an output folder: its manifest and
    caches)."""
    fd, where = _open_checked(path, what, limit, nofollow)
    try:
        chunks: list[bytes] = []
        got = 0
        while True:
            b = os.read(fd, min(1 << 20, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
            if got > limit:
                raise UserError(f"{where}: grew above the limit of {limit / MiB:,.0f} MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise UserError(f"{where}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)


def open_binary(path: str | Path, what: str, *, nofollow: bool = False) -> BinaryIO:
    """The regular file ``path`` open for reading in binary (checked as :func:`read_bytes`
    checks, without a size limit): for a reader that takes only a part of a large file, such as
    a Parquet file's footer. The caller closes it."""
    fd, _ = _open_checked(path, what, None, nofollow)
    return os.fdopen(fd, "rb")


def decode(raw: bytes, where: str) -> str:
    """UTF-8 text of ``raw`` without a leading byte-order mark; a bad byte names its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start : exc.start + 1]
        raise UserError(
            f"{where}: line {line}: byte 0x{bad.hex()} is not UTF-8 (fix: save the file as UTF-8)"
        ) from None


def read_text(path: str | Path, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a regular file (see :func:`read_bytes`)."""
    return decode(
        read_bytes(path, what, limit), f"{what} = {_name(path)!r}" if what else _name(path)
    )


def check_depth(
    text: str, where: str, limit: int = MAX_DEPTH, toml: bool = False, fix: str = "flatten the file"
) -> None:
    """Refuse ``text`` (JSON, or TOML with ``toml=True``) whose arrays/tables nest deeper than
    ``limit``. Brackets inside strings (and TOML comments) do not count."""
    if text.count("[") + text.count("{") <= limit:
        return  # cannot be deeper than the number of openers (the usual, fast case)
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"' or (toml and ch == "'"):
            triple = toml and text.startswith(ch * 3, i)
            end = ch * 3 if triple else ch
            j = i + len(end)
            while j < n:
                if text.startswith(end, j):
                    break
                if ch == '"' and text[j] == "\\":
                    j += 1
                elif not triple and text[j] == "\n":
                    break
                j += 1
            i = j + len(end)
            continue
        if toml and ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    line = text.count("\n", 0, i) + 1
                    at = f"{where}: line {line}:" if "\n" in text else f"{where}:"
                    raise UserError(
                        f"{at} arrays or tables nested deeper than {limit} levels (fix: {fix})"
                    )
        elif ch in "]}":
            depth = max(0, depth - 1)
        i += 1


def _bounded_int(s: str) -> int:
    digits = s.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})")
    return int(s)


def parse_json(text: str, where: str, fix: str = "", bounded_ints: bool = True) -> Any:
    """``json.loads`` with a depth limit and bounded integers (``bounded_ints=False``: Python's
    own limit of 4,300 digits, for a caller that range-checks every integer it uses and bounds
    the text's length); a UserError names the problem."""
    check_depth(text, where)
    try:
        return json.loads(text, parse_int=_bounded_int if bounded_ints else None)
    except (ValueError, RecursionError) as exc:
        tail = f" (fix: {fix})" if fix else ""
        raise UserError(f"{where}: not valid JSON ({clean(str(exc), 120)}){tail}") from None


def load_json(
    path: str | Path,
    what: str,
    limit: int = MAX_CONFIG_BYTES,
    fix: str = "",
    *,
    nofollow: bool = False,
) -> tuple[Any, bytes]:
    """The parsed JSON file and its bytes (``nofollow``: see :func:`read_bytes`)."""
    raw = read_bytes(path, what, limit, nofollow=nofollow)
    where = f"{what} = {_name(path)!r}" if what else _name(path)
    return parse_json(decode(raw, where), where, fix), raw


def parse_toml(text: str, where: str) -> dict:
    """``tomllib.loads`` with a depth limit; a UserError names the problem."""
    import tomllib

    check_depth(text, where, toml=True)
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        if text.lstrip().startswith("{"):  # (no TOML document starts with a brace)
            raise UserError(
                f"{where}: is JSON, not TOML (fix: a Hugging Face config.json is read from a "
                'scenario\'s [model] config = "path/to/config.json" or by '
                "fleetsim latency --model path/to/config.json)"
            ) from None
        raise UserError(f"{where}: not valid TOML: {clean(str(exc), 160)}") from None


def term(text: object, limit: int = 200) -> str:
    """User text for a rich console: control characters escaped (:func:`clean`) and console
    markup escaped, so that ``"[/]oops"`` or ``"[red]x[/red]"`` prints as written."""
    from rich.markup import escape

    return escape(clean(str(text), limit))


def read_csv(path: str | Path, what: str, limit: int = MAX_TRACE_BYTES) -> CsvText:
    """A CSV file read with ``pyarrow.csv``, every column as strings (the caller converts and
    checks the values, vectorised, and names the line of a bad one).

    The bytes come through :func:`read_bytes` (regular file, size limit) and are checked as
    UTF-8 by :func:`decode` (a bad byte names its line; a byte-order mark is dropped). Blank
    lines are kept as rows and a quoted value may not span lines, so data row ``i`` is always on
    line ``i + 2`` of the file (the header is line 1). A row with more or fewer fields than the
    header, or a field longer than :data:`CSV_FIELD_LIMIT` characters, is one line naming its
    line."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    raw = read_bytes(path, what, limit)
    where = f"{what} = {_name(path)!r}" if what else _name(path)
    decode(raw, where)  # UTF-8 or one line naming the bad byte's line
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise UserError(f"{where}: the file is empty (fix: a header line, then data rows)")
    first_line = raw.split(b"\n", 1)[0]
    n_max = first_line.count(b",") + 1  # an upper bound of the number of columns
    bad_rows: list[Any] = []

    def on_bad_row(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    try:
        table = pacsv.read_csv(
            pa.py_buffer(raw),
            read_options=pacsv.ReadOptions(
                autogenerate_column_names=True,  # the header is row 0: we read it ourselves
                use_threads=False,
                block_size=max(1 << 20, len(raw) + 1),  # one block: no row straddles two
            ),
            parse_options=pacsv.ParseOptions(
                ignore_empty_lines=False,  # a blank line is a row, so row i is line i + 1
                newlines_in_values=True,
                invalid_row_handler=on_bad_row,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={f"f{i}": pa.string() for i in range(n_max)},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        if bad_rows:
            r = bad_rows[0]
            raise UserError(
                f"{where}: line {r.number}: {r.actual_columns} field(s) where the header has "
                f"{r.expected_columns} ({clean(r.text, 60)!r}; fix that line)"
            ) from None
        raise UserError(f"{where}: not a readable CSV file ({clean(str(exc), 120)})") from None
    cols = [table.column(i).combine_chunks() for i in range(table.num_columns)]
    first = -1
    why = ""
    for col in cols:
        too_long = pc.greater(pc.utf8_length(col), CSV_FIELD_LIMIT)
        spans = pc.match_substring_regex(col, "[\r\n]")
        for mask, text in (
            (too_long, f"a field longer than {CSV_FIELD_LIMIT} characters"),
            (spans, "a quoted value spans lines"),
        ):
            i = first_true(mask)
            if i >= 0 and (first < 0 or i < first):
                first, why = i, text
    if first >= 0:
        raise UserError(
            f"{where}: line {first + 1}: {why} (fields are at most {CSV_FIELD_LIMIT} characters "
            "on one line; fix that line)"
        )
    header = [str(c[0].as_py()).strip() for c in cols]
    return CsvText(header, [c.slice(1) for c in cols], where)


def first_true(mask: Any) -> int:
    """The index of the first true value of a pyarrow or numpy boolean array, else -1."""
    import numpy as np

    a = mask if isinstance(mask, np.ndarray) else mask.to_numpy(zero_copy_only=False)
    nz = np.flatnonzero(a)
    return int(nz[0]) if nz.size else -1


@dataclass(frozen=True)
class CsvText:
    """A CSV file as :func:`read_csv` returns it: the header's names (stripped), each column's
    data rows as a pyarrow string array (data row ``i`` is on line ``i + 2``), and ``where``,
    the file as errors name it."""

    header: list[str]
    columns: list[Any]
    where: str

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def row(self, i: int) -> list[str]:
        """Data row ``i``'s fields (for an error message)."""
        return [str(c[i].as_py()) for c in self.columns]


def json_safe(obj):
    """``obj`` with NaN and infinities as None, numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj


def cached_by_content_stamp(maxsize: int) -> Callable[[_F], _F]:
    """Cache a reader ``f(path, *args)`` per (path, *args) AND the file's size and modification
    time: a file rewritten at the same path (a user regenerating a trace between two runs of one
    Python session) is read again instead of answered from the cache. A path that cannot be
    stat'ed goes to the reader uncached, which reports it in its own words."""

    def wrap(f: _F) -> _F:
        @functools.lru_cache(maxsize=maxsize)
        def cached(stamp: tuple[int, int, int], path: str, *args: Any, **kwargs: Any) -> Any:
            return f(path, *args, **kwargs)

        @functools.wraps(f)
        def reader(path: str, *args: Any, **kwargs: Any) -> Any:
            try:
                st = os.stat(path)
            except (OSError, ValueError, TypeError):
                return f(path, *args, **kwargs)
            return cached((st.st_ino, st.st_size, st.st_mtime_ns), path, *args, **kwargs)

        reader.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return reader  # type: ignore[return-value]

    return wrap
