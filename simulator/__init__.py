"""fleetsim: a discrete-event simulator of GPU fleets serving large language models.

The Python API (docs/python-api.md)::

    import fleetsim

    run = fleetsim.simulate("scenarios/default.toml", {"simulation.hours": 2})
    run.hourly            # pyarrow.Table, one row per simulated hour
    run.summary()         # the day's figures (what ``fleetsim run --json`` prints)

:func:`load` reads a scenario from a file, a TOML string or a dict and applies overrides;
:func:`simulate` runs it; :func:`sweep` and :func:`plan` return their tables; :func:`schema`
is the scenario's JSON Schema. Errors in the input raise :class:`UserError`.
"""

from fleetsim.api import Run, load, plan, resolved, schema, simulate, sweep
from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.base.version import __version__
from fleetsim.config.scenario import Scenario

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
