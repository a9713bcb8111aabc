"""Request-size distributions: schema and behaviour in one place.

Each distribution is a frozen schema section (``dist = "..."`` in the scenario) that also knows
how to draw (:meth:`draw`), its largest possible value (:meth:`max_tokens`) and the field that sets
that maximum (:attr:`max_field`, for error messages). ``Empirical`` draws from a trace column
that the caller loads once and passes in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from fleetsim.base.schema import Section, Tokens, bound

if TYPE_CHECKING:  # (numpy is imported by the draws: validating a scenario needs none)
    import numpy as np


class Fixed(Section):
    """Every request has ``value`` tokens."""

    dist: Literal["fixed"]
    value: Tokens

    max_field: ClassVar[str] = "value"

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        import numpy as np

        return np.full(n, self.value, dtype=np.int64)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.value


class Uniform(Section):
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

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.high


class LogNormal(Section):
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

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        import numpy as np

        x = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(n)))
        return np.clip(x, self.min, self.max).astype(np.int64)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.max


class Geometric(Section):
    """Geometric on {1, 2, ...} with the given mean (memoryless: one token ends with p = 1/mean)."""

    dist: Literal["geometric"]
    mean: Annotated[float, bound(1, 1e9)]
    max: Tokens = 1_000_000

    max_field: ClassVar[str] = "max"

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        import numpy as np

        return np.minimum(rng.geometric(1.0 / self.mean, size=n), self.max).astype(np.int64)

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return self.max


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
        idx = rows if rows is not None else rng.integers(0, len(col), size=n)
        return col[idx]

    def max_tokens(self, trace_max: dict[str, int]) -> int:
        return trace_max.get(self.column, 0)


Dist = Annotated[Fixed | Uniform | LogNormal | Geometric | Empirical, Field(discriminator="dist")]
Analytic = Fixed | Uniform | LogNormal | Geometric
