"""Bounded field types and the frozen section base shared by every schema (scenario, workload)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


def bounded(lo: float, hi: float, *, strict_lo: bool = False) -> Any:
    """A finite float in [lo, hi] (or (lo, hi]). The upper bounds are sanity limits, orders of
    magnitude above any real device or tariff, that keep every product in the accounting finite
    (a value like 1e300 would overflow to inf deep inside numpy instead of failing here)."""
    low = {"gt": lo} if strict_lo else {"ge": lo}
    return Annotated[float, Field(**low, le=hi, allow_inf_nan=False)]


Tokens = Annotated[int, Field(ge=1, le=1_000_000_000)]


class Section(BaseModel):
    """A frozen schema section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
