"""Queueing theory for the prefill pool of a disaggregated fleet: M/D/c.

A prefill pool of c replicas behind one FIFO queue (``central_queue``), one prompt per
iteration (``max_batch_size = 1``) and prompts of one length is an M/D/c queue: Poisson
arrivals, a deterministic service time D (the prefill iteration of that prompt, from the
latency model) and c servers. The TTFT of a request is its wait in the queue plus D.

The M/D/c waiting time is computed here, exactly up to a truncation of the state space, by
**Crommelin's embedded chain** (Crommelin 1932; e.g. Tijms, *A First Course in Stochastic
Models*, 2003, section 5.2): every customer in service at time t has left by t + D, and every
customer present at t + D either waited at t or arrived in (t, t + D], so the number in the
system Q satisfies ``Q(t + D) = max(Q(t) - c, 0) + A`` with A ~ Poisson(lambda D) independent
of Q(t). Its stationary law is the law of Q at an arbitrary time; the mean number waiting is
``L_q = E[max(Q - c, 0)]``, so the mean wait is ``W_q = L_q / lambda`` (Little), and by PASTA
an arrival waits with probability ``P(Q >= c)``.
"""

from __future__ import annotations

import math

import numpy as np
from conftest import SMALL, ListSink, merge, resolved
from scipy.stats import poisson

from fleetsim.apps.simulate import simulate


def mdc(lam: float, D: float, c: int, n_states: int = 400) -> tuple[float, float]:
    """Mean waiting time and probability of waiting of M/D/c (Crommelin's embedded chain,
    solved as a linear system on states 0..n_states-1; the tail mass beyond is checked)."""
    a = lam * D
    assert a < c, "unstable"
    N = n_states
    pk = poisson.pmf(np.arange(N), a)
    P = np.zeros((N, N))
    for i in range(N):
        base = max(i - c, 0)
        P[i, base:] = pk[: N - base]
        P[i, -1] += 1.0 - P[i].sum()  # the truncated tail
    A = P.T - np.eye(N)
    A[-1, :] = 1.0
    rhs = np.zeros(N)
    rhs[-1] = 1.0
    pi = np.linalg.solve(A, rhs)
    assert pi[-20:].sum() < 1e-12  # the truncation does not matter
    q = np.arange(N)
    lq = float(np.sum(np.maximum(q - c, 0) * pi))
    return lq / lam, float(pi[c:].sum())


def test_mdc_solver_against_closed_forms():
    """M/D/1: Pollaczek-Khinchine W = rho D / (2 (1 - rho)); P(wait) = rho. And c servers at
    a load that makes waiting rare agree with the M/M/c-independent bound W >= 0."""
    for rho in (0.3, 0.7, 0.9):
        D = 0.1
        w, pw = mdc(rho / D, D, 1)
        assert math.isclose(w, rho * D / (2 * (1 - rho)), rel_tol=1e-9)
        assert math.isclose(pw, rho, rel_tol=1e-9)
    # M/D/c waits less than M/M/c at the same load (deterministic service): Erlang C bound
    lam, D, c = 25.0, 0.1, 3
    a = lam * D
    erlang_b = 1.0
    for k in range(1, c + 1):
        erlang_b = a * erlang_b / (k + a * erlang_b)
    erlang_c = erlang_b / (1 - (a / c) * (1 - erlang_b))
    w_mmc = erlang_c * D / (c - a)
    w, _ = mdc(lam, D, c)
    assert 0.4 * w_mmc < w < w_mmc  # M/D/c ~ half of M/M/c (Cosmetatos)


def test_prefill_pool_is_mdc():
    """Simulated waits in the prefill pool match M/D/c within 4 standard errors (batch means
    over consecutive arrivals)."""
    prompt = 4000
    c = 3
    d = merge(
        SMALL,
        simulation={"hours": 2},
        traffic={
            **SMALL["traffic"],
            "diurnal": "flat",
            "prompt": {"dist": "fixed", "value": prompt},
            "output": {"dist": "fixed", "value": 2},
        },
        disaggregation={
            "link": "nvlink-4",
            "prefill": {"replicas": c, "router": "central_queue", "max_batch_size": 1},
            "decode": {"replicas": 2},
        },
    )
    rs0 = resolved(d)
    lat = rs0.pools.prefill.rs.latency_model()
    D = lat.iteration(prompt, float(prompt) ** 2, 1, 0, 0.0)[0]
    rho = 0.8
    lam = rho * c / D
    d = merge(d, traffic={**d["traffic"], "requests_per_day": lam * 86400.0})
    sink = ListSink()
    simulate(resolved(d), request_sink=sink)
    rows = sorted(sink.rows.values())  # by arrival time
    arr = np.array([r[0] for r in rows if r[6] == "completed"])
    ft = np.array([r[4] for r in rows if r[6] == "completed"])
    keep = arr > 600.0  # 10 minutes of warm-up
    wait = (ft - arr)[keep] - D
    assert wait.min() > -1e-9 * D  # nobody is served faster than D
    w_theory, p_theory = mdc(lam, D, c)
    batches = np.array_split(wait, 40)
    means = np.array([b.mean() for b in batches])
    se = means.std(ddof=1) / math.sqrt(len(means))
    assert len(wait) > 50_000
    print(
        f"M/D/{c}: D {D:.4f} s, rho {rho}, n {len(wait)}, "
        f"W sim {wait.mean():.5f} +- {se:.5f} s, theory {w_theory:.5f} s"
    )
    assert abs(wait.mean() - w_theory) < 4 * se, (wait.mean(), w_theory, se)
    assert se < 0.1 * w_theory  # the check has teeth: the error bar is small
    pw = np.array([np.mean(b > 1e-9 * D) for b in batches])
    se_p = pw.std(ddof=1) / math.sqrt(len(pw))
    assert abs(pw.mean() - p_theory) < 4 * se_p, (pw.mean(), p_theory, se_p)
