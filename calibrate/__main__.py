"""``python -m calibrate ...``: the same as ``fleetsim calibrate ...``."""

from .cli import main

raise SystemExit(main())
