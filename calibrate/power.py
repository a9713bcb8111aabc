"""Power readings during calibration: NVML on NVIDIA GPUs, RAPL on Intel/AMD CPUs.

A :class:`PowerMeter` has ``mean_w(t0, t1)``: the mean power in watts over a wall-clock window
(``time.perf_counter`` seconds), and ``lag_fraction``: the share of a window's start to leave
out because the readings lag the load. Two kinds of meter, chosen by :func:`open_meter`:

* an **energy counter** (:class:`CounterMeter`): a cumulative energy reading sampled in a
  background thread; the mean power over a window is the energy between its ends over its
  length (the counter interpolated linearly between samples), so every joule is counted and no
  reading lags. NVML's ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver
  loaded; Volta and newer) and RAPL's ``energy_uj`` are such counters.
* **sampled power** (:class:`SampledMeter`): instantaneous (or NVML's 1-s averaged) board power
  sampled every ``period_s``; the mean of the samples in the window. Used where the GPU has no
  energy counter (NVML returns NOT_SUPPORTED before Volta).

``open_meter`` prefers the counter, falls back to sampled power, and returns ``None`` (and the
reason) when neither is available. The NVML module and the clock can be passed in, so that the
selection and the arithmetic are tested with fakes (tests/test_calibrate_meters.py) on machines
without a GPU.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

RAPL_DIR = Path("/sys/class/powercap/intel-rapl:0")


class PowerMeter:
    """A background thread that calls :meth:`sample` every ``period_s``."""

    method = "none"
    lag_fraction = 0.0  # share of a window's start whose readings lag the load

    def __init__(self, period_s: float = 0.02, clock: Callable[[], float] = time.perf_counter):
        self.period_s = period_s
        self.clock = clock
        self.samples: list[tuple[float, float]] = []  # (clock s, reading)
        self.max_w: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float | None:  # pragma: no cover - overridden
        """One reading (watts or joules; ``None`` when not ready yet)."""
        raise NotImplementedError

    def sample(self) -> None:
        """Take one reading now."""
        v = self.read()
        if v is not None:
            self.samples.append((self.clock(), v))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def start(self) -> PowerMeter:
        """Start sampling."""
        self._thread = threading.Thread(target=self._loop, name="fleetsim-power", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and release the device handle."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def mean_w(self, t0: float, t1: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError


class SampledMeter(PowerMeter):
    """Mean of instantaneous power samples (watts) taken in the window."""

    lag_fraction = 0.3  # NVML's power reading is a moving average: skip the window's start

    def mean_w(self, t0: float, t1: float) -> float:
        """Mean of the samples taken in ``[t0, t1]`` (NaN when there are none)."""
        vals = [w for t, w in list(self.samples) if t0 <= t <= t1]
        return sum(vals) / len(vals) if vals else float("nan")


class CounterMeter(PowerMeter):
    """A cumulative energy counter (joules, made monotone across wraps) sampled in the
    background; the mean power over a window is the energy between its ends over its length."""

    lag_fraction = 0.0

    def energy_at(self, t: float) -> float:
        """The counter at clock time ``t``, linear between samples (NaN outside them)."""
        s = list(self.samples)
        if not s or t < s[0][0] or t > s[-1][0]:
            return float("nan")
        i = bisect.bisect_left(s, (t, float("-inf")))
        if s[i][0] == t:
            return s[i][1]
        (ta, ea), (tb, eb) = s[i - 1], s[i]
        return ea + (eb - ea) * (t - ta) / (tb - ta)

    def mean_w(self, t0: float, t1: float) -> float:
        """(E(t1) - E(t0)) / (t1 - t0); NaN when the window is not inside the samples."""
        if t1 <= t0:
            return float("nan")
        return (self.energy_at(t1) - self.energy_at(t0)) / (t1 - t0)


def _nvml_limit_w(nvml: Any, handle: Any) -> float:
    try:
        return float(nvml.nvmlDeviceGetEnforcedPowerLimit(handle)) / 1000.0
    except nvml.NVMLError:
        return float(nvml.nvmlDeviceGetPowerManagementLimit(handle)) / 1000.0


class NvmlEnergyMeter(CounterMeter):
    """NVML's cumulative energy counter of one GPU (``nvmlDeviceGetTotalEnergyConsumption``,
    millijoules since the driver loaded)."""

    method = "nvml-energy"

    def __init__(self, nvml: Any, handle: Any, period_s: float = 0.02, **kw: Any) -> None:
        super().__init__(period_s, **kw)
        self._nvml, self._h = nvml, handle
        self.max_w = _nvml_limit_w(nvml, handle)

    def read(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)) / 1000.0
        except self._nvml.NVMLError:
            return None

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class NvmlPowerMeter(SampledMeter):
    """Board power of one NVIDIA GPU sampled through NVML: the instantaneous field where the
    driver has it (``NVML_FI_DEV_POWER_INSTANT``), else ``nvmlDeviceGetPowerUsage`` (on Hopper
    a 1-s mean)."""

    method = "nvml"

    def __init__(self, nvml: Any, handle: Any, period_s: float = 0.02, **kw: Any) -> None:
        super().__init__(period_s, **kw)
        self._nvml, self._h = nvml, handle
        self.max_w = _nvml_limit_w(nvml, handle)
        self._instant = self._probe_instant()

    def _probe_instant(self) -> bool:
        field = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field is None:
            return False
        try:
            v = self._nvml.nvmlDeviceGetFieldValues(self._h, [field])[0]
            return v.nvmlReturn == 0 and v.value.uiVal > 0
        except Exception:
            return False

    def read(self) -> float | None:
        try:
            if self._instant:
                v = self._nvml.nvmlDeviceGetFieldValues(
                    self._h, [self._nvml.NVML_FI_DEV_POWER_INSTANT]
                )[0]
                if v.nvmlReturn == 0:
                    return v.value.uiVal / 1000.0
            return self._nvml.nvmlDeviceGetPowerUsage(self._h) / 1000.0
        except self._nvml.NVMLError:
            return None

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class RaplMeter(CounterMeter):
    """CPU package energy from the RAPL counter (``intel-rapl:0/energy_uj``), unwrapped."""

    method = "rapl"

    def __init__(self, period_s: float = 0.05, rapl_dir: Path = RAPL_DIR, **kw: Any) -> None:
        super().__init__(period_s, **kw)
        self._energy = rapl_dir / "energy_uj"
        self._wrap_uj = float((rapl_dir / "max_energy_range_uj").read_text())
        self._last_uj = float(self._energy.read_text())
        self._total_j = 0.0
        for name in ("constraint_0_max_power_uw", "constraint_0_power_limit_uw"):
            try:
                self.max_w = float((rapl_dir / name).read_text()) / 1e6
                if self.max_w > 0:
                    break
            except (OSError, ValueError):
                continue

    def read(self) -> float | None:
        """Joules since the meter opened (the counter's wraps added back)."""
        e = float(self._energy.read_text())
        de = e - self._last_uj if e >= self._last_uj else e + self._wrap_uj - self._last_uj
        self._last_uj = e
        self._total_j += de / 1e6
        return self._total_j


def nvml_meter(nvml: Any, index: int = 0, **kw: Any) -> PowerMeter:
    """The NVML meter of GPU ``index``: the energy counter where the GPU reports one (a first
    reading succeeds), else sampled power. ``nvml`` is the ``pynvml`` module (or a fake)."""
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except nvml.NVMLError:  # NOT_SUPPORTED before Volta
        return NvmlPowerMeter(nvml, h, **kw)
    return NvmlEnergyMeter(nvml, h, **kw)


def open_meter(
    device_type: str, index: int = 0, nvml: ModuleType | Any | None = None
) -> tuple[PowerMeter | None, str]:
    """A started meter for the device and its method (``"nvml-energy"``, ``"nvml"``,
    ``"rapl"``), or ``(None, reason)`` when power cannot be read."""
    if device_type == "cuda":
        try:
            if nvml is None:
                import pynvml

                nvml = pynvml
            m = nvml_meter(nvml, index)
        except ImportError:
            return None, "no NVML: pip install nvidia-ml-py"
        except Exception as exc:
            return None, f"NVML failed: {exc}"
        return m.start(), m.method
    try:
        return RaplMeter().start(), "rapl"
    except (OSError, ValueError):
        return None, "no NVML, RAPL not readable"
