"""Calibration's energy and timing sources, chosen and computed with fakes (issue #15).

No GPU is needed: a fake ``pynvml`` module stands in for NVML (with and without the cumulative
energy counter ``nvmlDeviceGetTotalEnergyConsumption``), a fake clock for ``perf_counter``, and
a fake ``torch`` for CUDA events. The tests check which source is chosen and that the mean power
and the times computed from the readings are the exact values the fakes imply.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fleetsim.calibrate import bench, power


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeNVML:
    """A GPU drawing ``watts(t)``; the energy counter (mJ) is its exact integral."""

    class NVMLError(Exception):
        pass

    NVML_FI_DEV_POWER_INSTANT = 186

    def __init__(self, clock: Clock, energy: bool, start_mj: float = 5e9) -> None:
        self.clock, self.energy, self.start_mj = clock, energy, start_mj
        self.calls: list[str] = []
        self.shut = False

    @staticmethod
    def watts(t: float) -> float:  # 200 W idle, 600 W between t=101 and t=103
        return 600.0 if 101.0 <= t < 103.0 else 200.0

    def joules(self, t: float) -> float:
        busy = min(max(t - 101.0, 0.0), 2.0)
        return 200.0 * (t - 100.0) + 400.0 * busy

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetEnforcedPowerLimit(self, h: str) -> int:
        return 700_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        self.calls.append("energy")
        if not self.energy:
            raise self.NVMLError("Not Supported")
        return round(self.start_mj + 1000.0 * self.joules(self.clock()))

    def nvmlDeviceGetFieldValues(self, h: str, fields: list[int]) -> list:
        self.calls.append("instant")
        mw = round(1000 * self.watts(self.clock()))
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=mw))]

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        self.calls.append("usage")
        return round(1000 * self.watts(self.clock()))


def _run(meter: power.PowerMeter, clock: Clock, until: float, step: float) -> None:
    """Sample the meter every ``step`` seconds of fake time from 100 s to ``until``."""
    while clock.t <= until + 1e-9:
        meter.sample()
        clock.t += step


def test_energy_counter_is_preferred_and_exact():
    clock = Clock()
    nvml = FakeNVML(clock, energy=True)
    m = power.nvml_meter(nvml, 0, clock=clock)
    assert isinstance(m, power.NvmlEnergyMeter) and m.method == "nvml-energy"
    assert m.max_w == 700.0 and m.lag_fraction == 0.0
    _run(m, clock, 104.0, 0.0625)  # (binary fractions: exact times)
    # a window inside the busy part, one across its edge, one of idle only
    assert m.mean_w(101.2, 102.8) == pytest.approx(600.0, rel=1e-9)
    assert m.mean_w(100.5, 101.5) == pytest.approx((0.5 * 200 + 0.5 * 600) / 1.0, rel=1e-9)
    assert m.mean_w(103.2, 103.9) == pytest.approx(200.0, rel=1e-9)
    # the whole run: energy / time, whatever the sampling period
    assert m.mean_w(100.0, 104.0) == pytest.approx((200 * 4 + 400 * 2) / 4.0, rel=1e-9)
    assert math.isnan(m.mean_w(90.0, 101.0))  # a window outside the readings
    assert "usage" not in nvml.calls and "instant" not in nvml.calls
    m.stop()
    assert nvml.shut


def test_without_the_counter_power_is_sampled():
    clock = Clock()
    nvml = FakeNVML(clock, energy=False)
    m = power.nvml_meter(nvml, 0, clock=clock)
    assert isinstance(m, power.NvmlPowerMeter) and m.method == "nvml"
    assert m.lag_fraction == pytest.approx(0.3)
    _run(m, clock, 104.0, 0.125)
    assert m.mean_w(101.2, 102.8) == pytest.approx(600.0)
    # sampled: the mean of the samples in the window (100.5..100.875: 4 of 200 W; 101..102: 9
    # of 600 W)
    assert m.mean_w(100.5, 102.0) == pytest.approx((4 * 200 + 9 * 600) / 13)


def test_open_meter_reports_the_method_and_failures():
    clock = Clock()
    m, method = power.open_meter("cuda", 0, nvml=FakeNVML(clock, energy=True))
    assert method == "nvml-energy" and m is not None
    m.stop()
    m, method = power.open_meter("cuda", 0, nvml=FakeNVML(clock, energy=False))
    assert method == "nvml" and m is not None
    m.stop()

    class Broken(FakeNVML):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    m, why = power.open_meter("cuda", 0, nvml=Broken(clock, energy=True))
    assert m is None and why == "NVML failed: Driver Not Loaded"


def test_rapl_counter_unwraps(tmp_path):
    clock = Clock()
    (tmp_path / "max_energy_range_uj").write_text("1000000\n")  # wraps at 1 J
    (tmp_path / "energy_uj").write_text("900000\n")
    m = power.RaplMeter(rapl_dir=tmp_path, clock=clock)
    m.sample()
    for uj in (950000, 100000, 600000):  # +0.05 J, +0.15 J (wrapped), +0.5 J
        clock.t += 0.125
        (tmp_path / "energy_uj").write_text(f"{uj}\n")
        m.sample()
    assert m.mean_w(100.0, 100.375) == pytest.approx(0.7 / 0.375)
    assert m.mean_w(100.125, 100.25) == pytest.approx(0.15 / 0.125)  # across the wrap
    assert m.mean_w(100.0, 100.0625) == pytest.approx(0.4)  # half a sample interval


class FakeEvent:
    """A CUDA event on a fake GPU clock (ms)."""

    gpu_ms = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None
        self.waited = False

    def record(self) -> None:
        self.at = FakeEvent.gpu_ms

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.waited and self.at is not None and end.at is not None
        return end.at - self.at


def test_cuda_events_time_cuda_and_perf_counter_times_cpu():
    syncs = []
    fake_torch = SimpleNamespace(
        cuda=SimpleNamespace(Event=FakeEvent, synchronize=lambda d: syncs.append(d))
    )
    cuda = SimpleNamespace(type="cuda", index=0)
    t = bench.make_timer(cuda, fake_torch)  # type: ignore[arg-type]
    assert isinstance(t, bench.CudaEventTimer) and t.method == "cuda-events"

    def kernel() -> None:
        FakeEvent.gpu_ms += 2.5  # the GPU spends 2.5 ms

    assert t.time(kernel) == pytest.approx(2.5e-3)
    assert syncs == [cuda]

    cpu = bench.make_timer(SimpleNamespace(type="cpu"), fake_torch)  # type: ignore[arg-type]
    assert type(cpu) is bench.Timer and cpu.method == "perf_counter"
    clock = Clock()
    cpu.clock = clock

    def work() -> None:
        clock.t += 0.125

    times, t0, t1 = bench.time_fn(work, cpu, warmup=2, repeats=3, min_time_s=0.6)
    # 2 untimed warm-ups, then repeats until 0.6 s of wall time: 5 calls of 0.125 s
    assert times == [0.125] * 5 and (t0, t1) == (100.25, 100.875)
