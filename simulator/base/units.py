"""Physical constants, the hour helpers (hours of the simulation against UTC hours of the day)
and the one formatter of numbers for people."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

HOUR_S = 3600.0
DAY_S = 86400.0
J_PER_KWH = 3.6e6

T = TypeVar("T")


def rotate_to_start(v: Sequence[T], hod0: int) -> tuple[T, ...]:
    """``v`` indexed by UTC hour of day -> indexed by simulation hour (starting at ``hod0``)."""
    return tuple(v[(hod0 + i) % 24] for i in range(24))


def rotate_to_utc(v: Sequence[T], hod0: int) -> tuple[T, ...]:
    """The inverse of :func:`rotate_to_start`: ``v`` indexed by simulation hour of day (the
    run starting at UTC hour ``hod0``) -> indexed by UTC hour of day."""
    return tuple(v[(u - hod0) % 24] for u in range(24))


def utc_hour(h: int, hod0: int) -> int:
    """The UTC hour of day of simulation hour ``h`` of a run that starts at UTC hour ``hod0``."""
    return (hod0 + h) % 24


def per_sim_hour(v: Sequence[T], hod0: int, hours: int) -> list[T]:
    """``v`` indexed by UTC hour of day -> one value per simulation hour ``0 .. hours - 1``."""
    return [v[(hod0 + h) % 24] for h in range(hours)]


def fmt_num(x: object, spec: str = ",.2f", missing: str = "n/a") -> str:
    """A number for people: ``format(x, spec)``; ``missing`` for None, NaN and infinities;
    anything else as ``str(x)``."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def run_span(hours: int) -> str:
    """What a run's totals cover, for a share of them: ``the day`` for 24 hours, else ``the
    2 h simulated`` (a 2-hour run's peak hour read "59.1% of the day")."""
    return "the day" if hours == 24 else f"the {hours} h simulated"
