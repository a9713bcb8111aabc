"""The work budget of one run: :func:`check_work` refuses, before anything is generated, a
scenario whose arrivals, pods, pod-hours, autoscaler ticks or engine iterations exceed the
bounds below, with a message saying how to get the same answer within them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fleetsim.base.errors import ScenarioError
from fleetsim.base.units import HOUR_S
from fleetsim.config.schema import Scenario
from fleetsim.device.latency import LatencyModel
from fleetsim.workload.distributions import Empirical

if TYPE_CHECKING:  # (numpy only for a timed trace's counts: imported there)
    import numpy as np

# The work budget of one run (check_work). Memory: a request held by a pod costs ~150 bytes (its
# Request object and its slots in the hour's arrival lists and the queue). Time: the engines
# simulate ~2e4 requests per second on one core (bench/bench_speed.py, README).
MAX_ARRIVALS_PER_POD_HOUR = 2_000_000  # one hour of a pod's arrivals is generated at once (~0.3 GB)
MAX_ARRIVALS_PER_POD = 20_000_000  # an overloaded pod holds every arrival not yet served (~3 GB)
MAX_SIMULATED_ARRIVALS = 100_000_000  # all simulated pods together: ~1.5 h of one core
MAX_SIMULATED_POD_HOURS = 200_000  # per-pod-hour summaries (a few kB each) and set-up time
MAX_AUTOSCALER_TICKS = 20_000_000  # reactive autoscaler ticks, all simulated pods together
MAX_ITERATIONS = 2_000_000_000  # engine iterations (iteration engine), an upper estimate
# A session's turns, user tokens, answers and think times are drawn when it starts and held
# until it ends (workload/sessions.py): ~100 B a turn, so at most ~0.1 GB for one session.
MAX_TURNS_PER_SESSION = 1_000_000


def _session_turns(sc: Scenario, src: str) -> float:
    """The mean number of requests a session makes (1 without sessions); refuses turns that no
    budget could hold and session distributions that cannot be drawn."""
    ses = sc.traffic.sessions
    if ses is None:
        return 1.0
    for name, d in (("turns", ses.turns), ("think_s", ses.think_s)):
        if isinstance(d, Empirical):
            raise ScenarioError(
                f"traffic.sessions.{name}.dist",
                "empirical",
                "a session's turns and think times are drawn from a distribution, not a trace",
                'use dist = "fixed", "uniform", "lognormal" or "geometric"',
                src,
            )
    d = ses.turns
    assert not isinstance(d, Empirical)  # (refused above)
    t_max = d.max_tokens({})
    if t_max > MAX_TURNS_PER_SESSION:
        raise ScenarioError(
            f"traffic.sessions.turns.{d.max_field}",
            getattr(d, d.max_field),
            f"a session of up to {t_max:,} turns, above the budget of "
            f"{MAX_TURNS_PER_SESSION:,} turns per session (a session's turns are drawn, and held, "
            "when it starts)",
            f"at most {MAX_TURNS_PER_SESSION:,}",
            src,
        )
    return d.mean_value()


def _trace_counts(t: np.ndarray, hours: int, pods: int) -> tuple[float, float]:
    """(requests per pod over the run, requests in a pod's busiest hour) of a timed trace whose
    arrival times are ``t`` (s): rows past the horizon are never generated; row i goes to pod
    i % pods."""
    import numpy as np

    per_hour = np.bincount(np.floor(t[t < hours * HOUR_S] / HOUR_S).astype(np.int64), minlength=1)
    return float(per_hour.sum()) / pods, float(math.ceil(int(per_hour.max()) / pods))


def check_work(
    sc: Scenario,
    rates: tuple[float, ...],
    lat: LatencyModel,
    src: str,
    trace_arrivals_s: np.ndarray | None = None,
) -> None:
    """Refuse a scenario whose work (arrivals per pod-hour and per pod, pods and pod-hours
    simulated, autoscaler ticks, engine iterations) exceeds the budget above, before anything
    is generated; the message says how to get the same answer within it. Arrivals count a
    timed trace's rows by the hour they arrive in (``trace_arrivals_s``, CSV or JSONL), and a
    session's turns (sessions x mean turns)."""
    f, hours = sc.fleet, sc.simulation.hours
    sim_pods = min(f.sample_pods or f.pods, f.pods)
    hint_pods = (
        "set fleet.sample_pods (e.g. 16: pods are exchangeable, the totals are scaled and get a "
        "confidence interval)"
    )
    if sim_pods * hours > MAX_SIMULATED_POD_HOURS:
        raise ScenarioError(
            "fleet.sample_pods" if f.sample_pods else "fleet.pods",
            f.sample_pods or f.pods,
            f"{sim_pods:,} simulated pods x {hours:,} hours = {sim_pods * hours:,} pod-hours, "
            f"above the budget of {MAX_SIMULATED_POD_HOURS:,}",
            f"{hint_pods}, or simulate fewer hours",
            src,
        )
    turns = _session_turns(sc, src)
    value: object
    if trace_arrivals_s is not None:  # a timed trace: its rows by hour, split over the pods
        per_pod, peak_pod_hour = _trace_counts(trace_arrivals_s, hours, f.pods)
        field, value = "traffic.trace", sc.traffic.trace
    else:
        per_pod = sum(rates[h % 24] for h in range(hours)) * HOUR_S / f.pods * turns
        peak_pod_hour = max(rates) * HOUR_S / f.pods * turns
        field, value = "traffic.requests_per_day", sc.traffic.requests_per_day
    what = " (sessions x their mean turns)" if turns != 1.0 and trace_arrivals_s is None else ""
    if peak_pod_hour > MAX_ARRIVALS_PER_POD_HOUR:
        raise ScenarioError(
            field,
            value,
            f"the busiest hour brings {peak_pod_hour:.3g} requests{what} to each of the "
            f"{f.pods} pod(s), above the budget of {MAX_ARRIVALS_PER_POD_HOUR:,} per pod-hour "
            "(one hour of a pod's arrivals is held in memory)",
            "split the fleet into more, smaller pods (fleet.pods, and fleet.sample_pods to "
            "simulate a few of them) or "
            + (
                "replay a thinner trace (its rows go to the pods in turn)"
                if trace_arrivals_s is not None
                else "lower the rate"
            ),
            src,
        )
    if per_pod > MAX_ARRIVALS_PER_POD:
        raise ScenarioError(
            "simulation.hours",
            hours,
            f"each pod gets {per_pod:.3g} requests{what} over the run, above the budget of "
            f"{MAX_ARRIVALS_PER_POD:,} (an overloaded pod holds every request it has not served)",
            f"simulate fewer hours (e.g. {max(1, int(hours * MAX_ARRIVALS_PER_POD / per_pod))}), "
            "or "
            "split the fleet into more, smaller pods with fleet.sample_pods",
            src,
        )
    total = per_pod * sim_pods
    if total > MAX_SIMULATED_ARRIVALS:
        raise ScenarioError(
            "fleet.sample_pods" if f.sample_pods else "simulation.hours",
            f.sample_pods or hours,
            f"{total:.3g} requests would be simulated, above the budget of "
            f"{MAX_SIMULATED_ARRIVALS:,} (about 1.5 hours of one core)",
            f"{hint_pods} with fewer pods, or simulate fewer hours",
            src,
        )
    _check_ticks_and_iterations(sc, lat, src, sim_pods, total, trace_arrivals_s is not None)


def _check_ticks_and_iterations(
    sc: Scenario,
    lat: LatencyModel,
    src: str,
    sim_pods: int,
    total: float,
    timed_trace: bool,
) -> None:
    """The work budget's reactive-autoscaler ticks and per-iteration engine iterations."""
    f, hours = sc.fleet, sc.simulation.hours
    a = sc.autoscaler
    if a.policy == "reactive":
        ticks = hours * HOUR_S / a.interval_s * sim_pods
        if ticks > MAX_AUTOSCALER_TICKS:
            need = hours * HOUR_S * sim_pods / MAX_AUTOSCALER_TICKS
            raise ScenarioError(
                "autoscaler.interval_s",
                a.interval_s,
                f"{ticks:.3g} autoscaler ticks over the run, above the budget of "
                f"{MAX_AUTOSCALER_TICKS:,}",
                f"a coarser interval (>= {need:.3g} s; 30 s is typical), fewer hours or "
                "fewer simulated pods",
                src,
            )
    if sc.simulation.engine == "iteration":
        t_min = lat.decode_time(1, 1)  # the shortest iteration the profile allows
        by_time = f.replicas * sim_pods * hours * HOUR_S / max(t_min, 1e-12)
        max_out = float(sc.traffic.output.max_tokens({})) if not timed_trace else 1e9
        by_tokens = total * (1.0 + max_out)
        its = min(by_time, by_tokens)
        if its > MAX_ITERATIONS:
            raise ScenarioError(
                "simulation.engine",
                sc.simulation.engine,
                f"up to {its:.3g} engine iterations (shortest iteration {t_min:.3g} s), above "
                f"the budget of {MAX_ITERATIONS:,}",
                'use engine = "macro", fewer hours or fewer simulated pods',
                src,
            )


__all__ = [
    "MAX_ARRIVALS_PER_POD",
    "MAX_ARRIVALS_PER_POD_HOUR",
    "MAX_AUTOSCALER_TICKS",
    "MAX_ITERATIONS",
    "MAX_SIMULATED_ARRIVALS",
    "MAX_SIMULATED_POD_HOURS",
    "MAX_TURNS_PER_SESSION",
    "check_work",
]
