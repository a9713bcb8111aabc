"""Request-size distributions: schema and behaviour in one place.

Each distribution is a frozen schema section (``dist = "..."`` in the scenario) that also knows
how to draw (:meth:`draw`), its largest possible value (:meth:`max_tokens`) and the field that sets
that maximum (:attr:`max_field`, for error messages). ``Empirical`` draws from a trace column
that the caller loads once and passes in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from fleetsim.base.schema import Section, Tokens, bound

if TYPE_CHECKING:  # numpy is imported where values are drawn: validating needs none (~40 ms)
    import numpy as np

# Values drawn per numpy call: a few to tens of ms, so that a signal handler (SIGINT, SIGTERM),
# which Python runs only between calls, is never held up for long by one huge draw.
DRAW_CHUNK = 1 << 20


def chunked(draw: Callable[[int], np.ndarray], n: int) -> np.ndarray:
    """``draw(n)`` done ``DRAW_CHUNK`` values at a time. numpy's ``Generator`` draws value by
    value from its bit stream, so the result equals one ``draw(n)`` bit for bit."""
    if n <= DRAW_CHUNK:
        return draw(n)
    import numpy as np

    first = draw(DRAW_CHUNK)
    out = np.empty(n, dtype=first.dtype)
    out[:DRAW_CHUNK] = first
    for i in range(DRAW_CHUNK, n, DRAW_CHUNK):
        k = min(DRAW_CHUNK, n - i)
        out[i : i + k] = draw(k)
    return out


class _Draws:
    """``draw(rng, n)``: the subclass's ``_draw`` in chunks (see :func:`chunked`)."""

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raise NotImplementedError

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return chunked(lambda k: self._draw(rng, k), n)


class Fixed(_Draws, Section):
    """Every request has ``value`` tokens."""

    dist: Literal["fixed"]
    value: Tokens

    max_field: ClassVar[str] = "value"

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        import numpy as np

        return np.full(n, self.value, dtype=np.int64)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.value

    def mean_value(self) -> float:
        return float(self.value)


class Uniform(_Draws, Section):
    """Integers uniform on [low, high]."""

    dist: Literal["uniform"]
    low: Tokens
    high: Tokens

    max_field: ClassVar[str] = "high"

    @model_validator(mode="after")
    def _order(self) -> Uniform:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.high

    def mean_value(self) -> float:
        return (self.low + self.high) / 2.0


class LogNormal(_Draws, Section):
    """Lognormal with the given median and log-space sigma, rounded and clipped to [min, max]."""

    dist: Literal["lognormal"]
    median: Annotated[float, bound(0, 1e9, strict_lo=True)]
    sigma: Annotated[float, bound(0, 10)]
    min: Tokens = 1
    max: Tokens = 32768

    max_field: ClassVar[str] = "max"

    @model_validator(mode="after")
    def _order(self) -> LogNormal:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        import numpy as np

        x = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(n)))
        return np.clip(x, self.min, self.max).astype(np.int64)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.max

    def mean_value(self) -> float:
        """The unclipped mean ``median x exp(sigma^2 / 2)`` put into [min, max] (clipping can
        only move the mean towards that range, so this bounds it for budgets)."""
        m = self.median * math.exp(min(self.sigma * self.sigma / 2.0, 700.0))
        return float(min(max(m, self.min), self.max))


class Geometric(_Draws, Section):
    """Geometric on {1, 2, ...} with the given mean (memoryless: one token ends with p = 1/mean)."""

    dist: Literal["geometric"]
    mean: Annotated[float, bound(1, 1e9)]
    max: Tokens = 1_000_000

    max_field: ClassVar[str] = "max"

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        import numpy as np

        return np.minimum(rng.geometric(1.0 / self.mean, size=n), self.max).astype(np.int64)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.max

    def mean_value(self) -> float:
        return float(min(self.mean, self.max))


class Empirical(Section):
    """Sampled from a CSV trace column (with replacement)."""

    dist: Literal["empirical"]
    file: str
    column: str

    max_field: ClassVar[str] = "file"

    def draw_from(
        self, col: np.ndarray, rng: np.random.Generator, n: int, rows: np.ndarray | None = None
    ) -> np.ndarray:
        """``n`` values of the loaded column ``col`` (at ``rows`` when sampling jointly)."""
        if rows is not None:
            return col[rows]
        return chunked(lambda k: col[rng.integers(0, len(col), size=k)], n)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return trace_max.get(self.column, 0)


Dist = Annotated[Fixed | Uniform | LogNormal | Geometric | Empirical, Field(discriminator="dist")]
Analytic = Fixed | Uniform | LogNormal | Geometric
