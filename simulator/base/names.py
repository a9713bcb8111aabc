"""'Did you mean': the closest known name to a misspelt one."""

from __future__ import annotations

from collections.abc import Iterable


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name the user most likely meant, or None.

    A name that begins a known name is taken first ('h100' -> 'h100-sxm', the shortest such), then
    a known name that begins it ('h100-sxm5' -> 'h100-sxm'), then the closest spelling."""
    names = list(known)
    low = name.lower()
    starts = sorted((k for k in names if k.lower().startswith(low)), key=len) if low else []
    if starts:
        return starts[0]
    inside = sorted((k for k in names if low.startswith(k.lower())), key=len, reverse=True)
    if inside:
        return inside[0]
    import difflib  # (only for a misspelt name: not on every start, bench/RESULTS.md)

    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None
