"""Bounded field types and the frozen section base shared by every schema (scenario, workload)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


def bound(lo: float, hi: float, *, strict_lo: bool = False) -> Any:
    """The bounds of a finite float in [lo, hi] (or (lo, hi]), to annotate a field with:
    ``Annotated[float, bound(0, 1e5)]``. The upper bounds are sanity limits, orders of magnitude
    above any real device or tariff, that keep every product in the accounting finite (a value
    like 1e300 would overflow to inf deep inside numpy instead of failing here)."""
    if strict_lo:
        return Field(gt=lo, le=hi, allow_inf_nan=False)
    return Field(ge=lo, le=hi, allow_inf_nan=False)


Tokens = Annotated[int, Field(ge=1, le=1_000_000_000)]


class Section(BaseModel):
    """A frozen schema section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
