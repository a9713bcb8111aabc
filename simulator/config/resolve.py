"""``resolve``: a validated :class:`Scenario` joined with the catalogs and the profile into what
the engine and the accounting consume (:class:`fleetsim.config.resolved.Resolved`), after the
cross-field checks. An aggregated fleet is resolved by :mod:`fleetsim.config.aggregated`; a
disaggregated one (``[disaggregation]``) by :mod:`fleetsim.config.pools`, which resolves each
pool as an aggregated fleet of its own.
"""

from __future__ import annotations

from fleetsim.config.aggregated import resolve_aggregated
from fleetsim.config.pools import resolve_disaggregated
from fleetsim.config.resolved import Resolved
from fleetsim.config.schema import Scenario


def resolve(sc: Scenario, source: str = "") -> Resolved:
    """Join the scenario with the catalogs and profile, and run the cross-field checks (the
    first problem is a :class:`~fleetsim.base.errors.ScenarioError`); ``source`` is the file
    the scenario came from, for messages and relative paths."""
    if sc.disaggregation is not None:  # two pools, each resolved like a fleet (config/pools.py)
        return resolve_disaggregated(sc, source)
    return resolve_aggregated(sc, source)


__all__ = ["resolve"]
