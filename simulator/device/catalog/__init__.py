"""Catalogs of GPUs and models, as data files with a source for every number.

``gpus.toml``, ``models.toml`` and ``links.toml`` sit beside this module. :func:`gpu` and :func:`model` return
plain dicts of the entry's fields; the scenario layer turns them into typed objects.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources

from fleetsim.base.errors import ScenarioError
from fleetsim.base.names import closest


@cache
def _load(name: str) -> dict[str, dict]:
    with resources.files(__package__).joinpath(name).open("rb") as fh:
        return tomllib.load(fh)


def gpus() -> dict[str, dict]:
    """All GPU entries, by name."""
    return _load("gpus.toml")


def models() -> dict[str, dict]:
    """All model entries, by name."""
    return _load("models.toml")


def links() -> dict[str, dict]:
    """All KV-transfer link entries (disaggregated serving), by name."""
    return _load("links.toml")


def _lookup(table: dict[str, dict], name: str, field: str) -> dict:
    if name in table:
        return dict(table[name])
    close = closest(name, table)
    hint = f"did you mean {close!r}? " if close else ""
    raise ScenarioError(
        field, name, "unknown catalog name", f"{hint}known: {', '.join(sorted(table))}"
    )


def gpu(name: str, field: str = "hardware.gpu") -> dict:
    """The catalog entry of GPU ``name``; a ScenarioError naming ``field`` if unknown."""
    return _lookup(gpus(), name, field)


def link(name: str, field: str = "disaggregation.link") -> dict:
    """The catalog entry of KV-transfer link ``name``; a ScenarioError naming ``field``."""
    return _lookup(links(), name, field)


def model(name: str, field: str = "model.name") -> dict:
    """The catalog entry of model ``name``; a ScenarioError naming ``field`` if unknown."""
    return _lookup(models(), name, field)
