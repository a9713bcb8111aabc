"""Physical constants and the one helper for hour-of-day profiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

HOUR_S = 3600.0
DAY_S = 86400.0
J_PER_KWH = 3.6e6

T = TypeVar("T")


def rotate_to_start(v: Sequence[T], hod0: int) -> tuple[T, ...]:
    """``v`` indexed by UTC hour of day -> indexed by simulation hour (starting at ``hod0``)."""
    return tuple(v[(hod0 + i) % 24] for i in range(24))
