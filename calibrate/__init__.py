"""``fleetsim calibrate``: measure a real torch Transformer on the device at hand.

Importing this package does not import torch; :mod:`calibrate.cli` checks for it and prints an
install hint when it is missing. The pieces: :mod:`calibrate.model` (the torch model, KV cache,
FLOP counting), :mod:`calibrate.bench` (micro-benchmarks and the timing grid),
:mod:`calibrate.power` (NVML / RAPL sampling), :mod:`calibrate.fit` (roofline and power fits,
:func:`calibrate.fit.predicted_vs_measured`) and :mod:`calibrate.run` (the whole calibration).
"""
