"""fleetsim: a discrete-event simulator of GPU fleets serving large language models."""

from fleetsim.base.version import __version__

__all__ = ["__version__"]
