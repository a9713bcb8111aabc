"""Terminal tables that never cut a value.

Every command's table (``plan``, ``sweep``, ``crossover``, ``latency``, the run summary) goes
through :func:`print_table` or :func:`print_rows`:

* piped or redirected output (a console that is not a terminal) is rendered exactly as before
  (one rich table, lines never wrapped);
* on a terminal, the columns get the width of their longest value; a header wider than its
  values folds onto several lines at its spaces. A table too wide for the terminal with its
  borders drops them (two spaces between columns, then one); when even that does not fit, it
  switches to a record layout: one block per row, one ``header  value`` line per column. A
  value is never shortened to ``…``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from rich.console import Console

#: columns of rich's default table box: one border per column plus one, two padding spaces each
_BORDER = 1
_PAD = 2


def _len(text: str) -> int:
    """The printed width of ``text`` (rich markup, e.g. an escaped ``\\[``, counts as shown)."""
    from rich.text import Text

    return Text.from_markup(text).cell_len if "[" in text else len(text)


def _words(text: str) -> list[str]:
    return text.split() or [""]


def column_widths(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int,
    boxed: bool = True,
    gap: int = 2,
):
    """The width of each column of a table that fits ``width`` with no value cut (headers may
    fold at spaces), or None when no such widths exist. ``boxed``: rich's default box (borders
    and a space each side of a value); else ``gap`` spaces between columns."""
    n = len(headers)
    cells = [max((_len(r[i]) for r in rows), default=0) for i in range(n)]
    natural = [max(_len(headers[i]), cells[i]) for i in range(n)]
    least = [max(max(_len(w) for w in _words(headers[i])), cells[i], 1) for i in range(n)]
    frame = n * (_PAD + _BORDER) + _BORDER if boxed is True else (gap or 2) * n
    if sum(natural) + frame <= width:
        return natural
    if sum(least) + frame > width:
        return None
    widths = list(least)
    spare = width - frame - sum(widths)
    # give the spare columns to the headers that fold, narrowest gap first (fewer header lines)
    for i in sorted(range(n), key=lambda i: natural[i] - least[i]):
        extra = min(spare, natural[i] - widths[i])
        widths[i] += extra
        spare -= extra
    return widths


def print_table(
    console: Console,
    title: str | None,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    left: Sequence[str] = (),
) -> None:
    """``rows`` (already formatted strings) under ``headers``; columns named in ``left`` are
    left-aligned, the others right-aligned. See the module docstring for the layouts."""
    from rich.table import Table

    if not console.is_terminal:  # piped: one table as before (the console never wraps)
        tab = Table(title=title)
        for h in headers:
            tab.add_column(h, justify="left" if h in left else "right")
        for r in rows:
            tab.add_row(*r)
        console.print(tab)
        return
    from rich import box

    widths = column_widths(headers, rows, console.width)
    style: dict = {}
    for gap in (2, 1):  # the compact layouts: no borders, two spaces between columns, or one
        if widths is None:
            widths = column_widths(headers, rows, console.width, boxed=False, gap=gap)
            pad = (0, gap - 1, 0, 0)
            style = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=pad)
    if widths is None:
        print_records(console, title, headers, rows)
        return
    tab = Table(title=title, **style)
    for h, w in zip(headers, widths):
        tab.add_column(
            h,
            justify="left" if h in left else "right",
            width=w,
            overflow="fold",
        )
    for r in rows:
        tab.add_row(*r)
    console.print(tab)


def print_records(
    console: Console, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    """The record layout: one block per row, ``header  value`` per line (fields without a value
    left out); a value longer than a line folds at its spaces (a word longer than the line is
    printed whole)."""
    width = max(console.width, 20)
    if title:
        console.print(title, highlight=False)
    key_w = max((_len(h) for h in headers), default=0)
    for r in rows:
        head = f"-- {headers[0]} {r[0]} --" if r[0] else "--"
        console.print(head, soft_wrap=True, highlight=False)
        for h, v in zip(headers[1:], r[1:]):
            if not v:  # (a field without a value, e.g. a candidate that does not fit)
                continue
            room = width - key_w - 4
            lines = _fold(v, room) if room >= 10 else [v]
            pad = " " * (key_w - _len(h))
            console.print(f"  {h}{pad}  {lines[0]}", soft_wrap=True, highlight=False)
            for more in lines[1:]:
                console.print(" " * (key_w + 4) + more, soft_wrap=True, highlight=False)


def _fold(text: str, width: int) -> list[str]:
    """``text`` folded at its phrase boundaries (``, `` and ``; ``) and then at spaces into
    lines of at most ``width`` characters; a word longer than the line stays whole."""
    if _len(text) <= width:
        return [text]
    # phrases first: keep "p50 0.021 s" together where it fits
    phrases: list[str] = []
    for part in text.replace("; ", ";\x00").replace(", ", ",\x00").split("\x00"):
        phrases.append(part)
    lines: list[str] = []
    cur = ""
    for ph in phrases:
        cand = f"{cur} {ph}" if cur else ph
        if _len(cand) <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        if _len(ph) <= width:
            cur = ph
        else:
            parts = textwrap.wrap(ph, width, break_long_words=False, break_on_hyphens=False)
            lines.extend(parts[:-1])
            cur = parts[-1] if parts else ""
    if cur:
        lines.append(cur)
    return lines or [""]


def print_rows(console: Console, rows: Sequence[tuple[str, str, str]], style: str = "bold") -> None:
    """A run summary's ``label  value  detail`` rows. Piped: one borderless rich table as
    before. On a terminal: the detail folds at its phrase boundaries (``, ``, ``; ``) into the
    room left of the line; below 30 columns of room it goes under its row, indented."""
    from rich.table import Table

    if not console.is_terminal:
        tab = Table(show_header=False, box=None, pad_edge=False)
        tab.add_column(style=style)
        tab.add_column(justify="right")
        tab.add_column()
        for r in rows:
            tab.add_row(*r)
        console.print(tab)
        return
    width = max(console.width, 20)
    lw = max((_len(r[0]) for r in rows), default=0)
    vw = max((_len(r[1]) for r in rows), default=0)
    room = width - lw - vw - 4
    for label, value, detail in rows:  # (rich markup, as in the piped table)
        head = f"[{style}]{label}[/{style}]"
        if room >= 30:
            lines = _fold(detail, room) if detail else [""]
            pad = " " * (lw - _len(label))
            vpad = " " * (vw - _len(value))
            console.print(
                f"{head}{pad}  {vpad}{value}  {lines[0]}".rstrip(), soft_wrap=True, highlight=False
            )
            for more in lines[1:]:
                console.print(" " * (lw + vw + 4) + more, soft_wrap=True, highlight=False)
        else:
            console.print(f"{head}  {value}", soft_wrap=True, highlight=False)
            if detail:
                for more in _fold(detail, width - 4):
                    console.print("    " + more, soft_wrap=True, highlight=False)
