"""The one source of fleetsim's version. pyproject.toml reads it from here (``[tool.setuptools.
dynamic]``), so the installed distribution's metadata says the same; tests/test_startup.py checks
both. A constant rather than ``importlib.metadata.version``: that module (with email, zipfile and
csv) costs ~0.01-0.02 CPU s of every start (bench/RESULTS.md, start-up)."""

from __future__ import annotations

__version__ = "0.1.0"
