"""pydantic's plugin lookup skipped while plugins are off, without ``importlib.metadata``.

pydantic (2.x) calls ``pydantic.plugin._loader.get_plugins()`` each time it builds a model's
validator; that module imports ``importlib.metadata`` (with email, zipfile, csv: ~0.01-0.02 CPU s
of every start, bench/RESULTS.md) at its top, even when ``PYDANTIC_DISABLE_PLUGINS`` turns the
lookup off. The ``fleetsim`` program turns plugins off (apps/cli.py ``main``: it has none, and
scanning every installed distribution's entry points costs more still) unless the user's
environment sets ``PYDANTIC_DISABLE_PLUGINS`` otherwise.

:func:`install` puts this module in ``sys.modules`` under the loader's name, and only then:

* only when called by the program itself (``main()`` without ``argv``; in-process callers of
  ``main(argv)`` and the Python API keep pydantic's own loader);
* only when ``PYDANTIC_DISABLE_PLUGINS`` turns every plugin off (pydantic's own test: ``__all__``,
  ``1`` or ``true``), when pydantic's :func:`get_plugins` returns ``()`` too, and only before
  pydantic's own loader has been imported;
* :func:`get_plugins` reads the variable on every call as pydantic's does: if something in the
  process turns plugins back on, it removes itself and hands over to pydantic's own loader, which
  then loads them. A user with pydantic plugins who wants them in fleetsim sets
  ``PYDANTIC_DISABLE_PLUGINS=`` (empty) and this module is never installed.

The interface used is the one pydantic's ``plugin/_schema_validator.py`` imports
(``from ._loader import get_plugins``; pydantic 2.4 to 2.14 at least). If a pydantic release
renames the module, this one is simply never imported by pydantic: start-up is slower, nothing
else changes (tests/test_startup.py checks that the stand-in is the module pydantic uses).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

LOADER = "pydantic.plugin._loader"
#: the values of PYDANTIC_DISABLE_PLUGINS for which pydantic loads no plugin at all
ALL_OFF = ("__all__", "1", "true")


def _off() -> bool:
    return os.getenv("PYDANTIC_DISABLE_PLUGINS") in ALL_OFF


def get_plugins() -> Iterable[Any]:
    """No plugins while they are all off; else pydantic's own loader (from then on)."""
    if _off():
        return ()
    if sys.modules.get(LOADER) is sys.modules[__name__]:
        del sys.modules[LOADER]
    import importlib

    return importlib.import_module(LOADER).get_plugins()


def install() -> bool:
    """Stand in for pydantic's loader if every plugin is off and the loader is not imported
    yet; True if installed."""
    if not _off() or LOADER in sys.modules:
        return False
    sys.modules[LOADER] = sys.modules[__name__]
    return True
