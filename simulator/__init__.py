"""fleetsim: a discrete-event simulator of GPU fleets serving large language models.

The Python API (docs/python-api.md)::

    import fleetsim

    run = fleetsim.simulate("scenarios/default.toml", {"simulation.hours": 2})
    run.hourly            # pyarrow.Table, one row per simulated hour
    run.summary()         # the day's figures (what ``fleetsim run --json`` prints)

:func:`load` reads a scenario from a file, a TOML string or a dict and applies overrides;
:func:`simulate` runs it; :func:`sweep` and :func:`plan` return their tables; :func:`schema`
is the scenario's JSON Schema. Errors in the input raise :class:`UserError`.

The names are imported on first use, so that ``import fleetsim`` (and the command line, which
imports the package first) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fleetsim.api import Run, load, plan, resolved, schema, simulate, sweep
    from fleetsim.base.errors import ScenarioError, UserError
    from fleetsim.base.version import __version__
    from fleetsim.config.schema import Scenario

_WHERE = {
    "Run": "fleetsim.api",
    "load": "fleetsim.api",
    "plan": "fleetsim.api",
    "resolved": "fleetsim.api",
    "schema": "fleetsim.api",
    "simulate": "fleetsim.api",
    "sweep": "fleetsim.api",
    "ScenarioError": "fleetsim.base.errors",
    "UserError": "fleetsim.base.errors",
    "Scenario": "fleetsim.config.schema",
    "__version__": "fleetsim.base.version",  # (reads the installed metadata: lazily)
}

__all__ = [
    "Run",
    "Scenario",
    "ScenarioError",
    "UserError",
    "__version__",
    "load",
    "plan",
    "resolved",
    "schema",
    "simulate",
    "sweep",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fleetsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
