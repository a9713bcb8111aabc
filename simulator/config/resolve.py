"""``resolve``: a validated :class:`Scenario` joined with the catalogs and the profile into what
the engine and the accounting consume (:class:`fleetsim.config.resolved.Resolved`), after the
cross-field checks. An aggregated fleet is resolved by :mod:`fleetsim.config.aggregated`; a
disaggregated one (``[disaggregation]``) by :mod:`fleetsim.config.pools`, which resolves each
pool as an aggregated fleet of its own.
"""

from __future__ import annotations

from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import resolve_aggregated
from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import Scenario


def resolve(sc: Scenario, source: str = "") -> Resolved:
    """Join the scenario with the catalogs and profile, and run the cross-field checks (the
    first problem is a :class:`~fleetsim.base.errors.ScenarioError`); ``source`` is the file
    the scenario came from, for messages and relative paths."""
    if sc.disaggregation is not None:  # two pools, each resolved like a fleet (config/pools.py)
        f = sc.fleet
        if f.data_parallel > 1 or f.expert_parallel:
            field, value = (
                ("fleet.data_parallel", f.data_parallel)
                if f.data_parallel > 1
                else ("fleet.expert_parallel", f.expert_parallel)
            )
            raise ScenarioError(
                field,
                value,
                "data and expert parallelism are simulated for aggregated fleets only",
                "drop it, or drop [disaggregation]",
                source,
            )
        # imported here: an aggregated run needs neither the module nor its dataclasses
        from fleetsim.config.pools import resolve_disaggregated

        return resolve_disaggregated(sc, source)
    return resolve_aggregated(sc, source)


__all__ = ["resolve"]
