"""Hourly profiles and the autoscaler's schedule: the diurnal curves (:func:`diurnal_weights`),
24-value daily profiles expanded to a run (:func:`hourly_values`), the schedule file of the
``schedule`` autoscaler (:func:`load_schedule_file`) and the cross-field checks of
``[autoscaler]`` (:func:`check_autoscaler`, called by resolve).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fleetsim.base.errors import ScenarioError
from fleetsim.config.schema import Scenario


# shape of the diurnal curves (hourly weights, normalised to mean 1 when used)
def diurnal_weights(d: list[float] | str) -> list[float]:
    """24 hourly weights of a named shape or a list (not normalised)."""
    if isinstance(d, list):
        return [float(x) for x in d]
    if d == "flat":
        return [1.0] * 24
    if d == "azure-conv":
        # Azure 2024 conversation week (docs/references.md): peak/mean ~1.35, peak/trough ~2,
        # peak ~14:00 UTC -> 1 + 0.35 cos(2 pi (h + 0.5 - 14.5)/24), peak/trough = 1.35/0.65.
        return [1.0 + 0.35 * math.cos(2 * math.pi * (h - 14) / 24) for h in range(24)]
    if d == "azure-code":
        # Azure 2024 coding week: peak/mean ~2.25, peak/trough ~9-11, peak ~19:00 UTC. A von Mises
        # shape exp(k cos(...)) with k = 1.15 gives peak/trough e^2.3 = 10 and peak/mean ~2.3.
        return [math.exp(1.15 * math.cos(2 * math.pi * (h - 19) / 24)) for h in range(24)]
    raise ValueError(d)


def hourly_values(v: float | list[float] | None, hours: int) -> list[float] | None:
    """A flat value or a 24-value daily profile, expanded to ``hours`` hours."""
    if v is None:
        return None
    if isinstance(v, list):
        return [float(v[h % 24]) for h in range(hours)]
    return [float(v)] * hours


def load_schedule_file(path: str, source: str) -> dict:
    """The JSON schedule ``{"gpu", "tensor_parallel", "data_parallel", "replicas_by_hour":
    [24 ints]}`` (a file without ``data_parallel``, written before the plan searched it, is
    read); a relative path resolves against the scenario file's folder."""
    from fleetsim.base import io

    p = Path(path)
    if not p.is_absolute() and source:
        cand = Path(source).parent / p
        p = cand if cand.exists() else p
    if not p.exists():
        raise ScenarioError(
            "autoscaler.schedule_file",
            path,
            "no such file",
            "give the path of a schedule JSON (relative to the scenario file)",
            source,
        )
    data, _ = io.load_json(p, "autoscaler.schedule_file")
    r = data.get("replicas_by_hour") if isinstance(data, dict) else None
    if not (
        isinstance(r, list)
        and len(r) == 24
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r)
    ):
        raise ScenarioError(
            "autoscaler.schedule_file",
            path,
            "has no 'replicas_by_hour' list of 24 non-negative integers",
            'use {"gpu": ..., "tensor_parallel": ..., "replicas_by_hour": [...]}',
            source,
        )
    return data


def check_autoscaler(sc: Scenario, source: str = "") -> tuple[int, ...] | None:
    """Cross-field checks of ``[autoscaler]``; the schedule's 24 replica counts (or None)."""
    a = sc.autoscaler
    n = sc.fleet.replicas
    if a.policy == "schedule":
        if (a.replicas_by_hour is None) == (a.schedule_file is None):
            raise ScenarioError(
                "autoscaler.replicas_by_hour",
                a.replicas_by_hour,
                "the schedule policy needs exactly one of replicas_by_hour and schedule_file",
                "give one of them",
                source,
            )
        if a.schedule_file is not None:
            data = load_schedule_file(a.schedule_file, source)
            for field, key, mine in (
                ("hardware.gpu", "gpu", sc.hardware.gpu),
                ("fleet.tensor_parallel", "tensor_parallel", sc.fleet.tensor_parallel),
                ("fleet.data_parallel", "data_parallel", sc.fleet.data_parallel),
            ):
                if key in data and data[key] != mine:
                    raise ScenarioError(
                        "autoscaler.schedule_file",
                        a.schedule_file,
                        f"was planned for {key} {data[key]!r} but the scenario has {mine!r}",
                        f"set {field} = {json.dumps(data[key])} or re-plan",
                        source,
                    )
            sched = tuple(int(x) for x in data["replicas_by_hour"])
        else:
            assert a.replicas_by_hour is not None  # exactly one of the two (checked above)
            sched = tuple(a.replicas_by_hour)
        if max(sched) > n:
            raise ScenarioError(
                "autoscaler.replicas_by_hour",
                max(sched),
                f"more replicas than a pod has (fleet.replicas = {n})",
                f"set fleet.replicas >= {max(sched)}",
                source,
            )
        return sched
    if a.policy == "reactive":
        hi = a.max_replicas if a.max_replicas is not None else n
        if hi > n:
            raise ScenarioError(
                "autoscaler.max_replicas",
                hi,
                f"more than the pod's replicas (fleet.replicas = {n})",
                f"set it <= {n} or raise fleet.replicas",
                source,
            )
        if a.min_replicas > hi:
            raise ScenarioError(
                "autoscaler.min_replicas",
                a.min_replicas,
                f"above max_replicas ({hi})",
                f"set it <= {hi}",
                source,
            )
        if a.initial_replicas is not None and not a.min_replicas <= a.initial_replicas <= hi:
            raise ScenarioError(
                "autoscaler.initial_replicas",
                a.initial_replicas,
                f"outside [min_replicas, max_replicas] = [{a.min_replicas}, {hi}]",
                "choose a value in that range",
                source,
            )
    return None


__all__ = ["check_autoscaler", "diurnal_weights", "hourly_values", "load_schedule_file"]
