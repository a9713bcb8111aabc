"""Power readings during calibration: NVML on NVIDIA GPUs, RAPL on Intel/AMD CPUs.

A :class:`PowerMeter` has ``mean_w(t0, t1)``: the mean power in watts over a wall-clock window
(``time.perf_counter`` seconds). The NVML meter samples in a background thread; the RAPL meter
reads the package energy counter, also in a background thread, and differentiates it.
``open_meter`` returns ``None`` when neither is available, and says why in ``reason``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

RAPL_DIR = Path("/sys/class/powercap/intel-rapl:0")


class PowerMeter:
    """Samples ``(perf_counter time, watts)`` in a background thread every ``period_s``."""

    method = "none"

    def __init__(self, period_s: float = 0.02) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []
        self.max_w: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read_w(self) -> float | None:  # pragma: no cover - overridden
        """One instantaneous reading in watts (``None`` when not ready yet)."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            w = self.read_w()
            if w is not None:
                self.samples.append((time.perf_counter(), w))
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

    def mean_w(self, t0: float, t1: float) -> float:
        """Mean of the samples taken in ``[t0, t1]`` (NaN when there are none)."""
        vals = [w for t, w in list(self.samples) if t0 <= t <= t1]
        return sum(vals) / len(vals) if vals else float("nan")


class NvmlMeter(PowerMeter):
    """Board power of one NVIDIA GPU through NVML (``pynvml`` from nvidia-ml-py)."""

    method = "nvml"

    def __init__(self, index: int = 0, period_s: float = 0.02) -> None:
        super().__init__(period_s)
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
        try:
            self.max_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(self._h) / 1000.0
        except pynvml.NVMLError:
            self.max_w = pynvml.nvmlDeviceGetPowerManagementLimit(self._h) / 1000.0
        self._instant = self._probe_instant()

    def _probe_instant(self) -> bool:
        """Whether the instantaneous power field is available (Hopper: getPowerUsage is a 1 s
        mean)."""
        field = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field is None:
            return False
        try:
            v = self._nvml.nvmlDeviceGetFieldValues(self._h, [field])[0]
            return v.nvmlReturn == 0 and v.value.uiVal > 0
        except Exception:
            return False

    def read_w(self) -> float | None:
        """Instant power if NVML offers it, else ``nvmlDeviceGetPowerUsage``."""
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
        """Stop sampling and shut NVML down."""
        super().stop()
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class RaplMeter(PowerMeter):
    """CPU package power from the RAPL energy counter (``intel-rapl:0/energy_uj``)."""

    method = "rapl"

    def __init__(self, period_s: float = 0.05) -> None:
        super().__init__(period_s)
        self._energy = RAPL_DIR / "energy_uj"
        self._wrap = float((RAPL_DIR / "max_energy_range_uj").read_text())
        self._last = (time.perf_counter(), float(self._energy.read_text()))
        for name in ("constraint_0_max_power_uw", "constraint_0_power_limit_uw"):
            try:
                self.max_w = float((RAPL_DIR / name).read_text()) / 1e6
                if self.max_w > 0:
                    break
            except (OSError, ValueError):
                continue

    def read_w(self) -> float | None:
        """Mean power since the previous reading."""
        t, e = time.perf_counter(), float(self._energy.read_text())
        t0, e0 = self._last
        self._last = (t, e)
        de = e - e0 if e >= e0 else e + self._wrap - e0
        return de / 1e6 / (t - t0) if t > t0 else None


def open_meter(device_type: str, index: int = 0) -> tuple[PowerMeter | None, str]:
    """A started meter for the device, or ``(None, reason)`` when power cannot be read."""
    if device_type == "cuda":
        try:
            return NvmlMeter(index).start(), "nvml"
        except ImportError:
            return None, "no NVML: pip install nvidia-ml-py"
        except Exception as exc:
            return None, f"NVML failed: {exc}"
    try:
        return RaplMeter().start(), "rapl"
    except (OSError, ValueError):
        return None, "no NVML, RAPL not readable"
