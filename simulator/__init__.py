"""fleetsim: a discrete-event simulator of GPU fleets serving large language models."""

__version__ = "0.1.0"
