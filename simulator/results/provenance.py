"""Provenance: the key-value metadata that says which fleetsim, scenario, seed and profile made
an output file. One builder for every Parquet file fleetsim writes (``hourly.parquet``,
``requests.parquet``, ``sweep.parquet``, ``plan.parquet``); read it back with
:func:`fleetsim.results.output.read_metadata`."""

from __future__ import annotations

from fleetsim.base.version import __version__
from fleetsim.config.resolved import Resolved


def provenance(rs: Resolved, scenario_text: str = "", **extra: str) -> dict[str, str]:
    """The metadata of a file made from the resolved scenario ``rs`` (for a sweep or a plan: the
    base scenario, overrides applied), read from ``scenario_text``; ``extra`` keys are added
    under ``fleetsim.<key>``."""
    sc = rs.scenario
    meta = {
        "fleetsim.version": __version__,
        "fleetsim.scenario_text": scenario_text,
        "fleetsim.config": sc.model_dump_json(),
        "fleetsim.seed": str(sc.seed),
        "fleetsim.profile_id": rs.profile_id,
        "fleetsim.profile_sha256": rs.profile_sha256,
    }
    meta.update({f"fleetsim.{k}": v for k, v in extra.items()})
    return meta
