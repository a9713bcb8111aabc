"""The simulator against queueing theory: every case is a real scenario run through ``simulate()``.

Service times come from a linear profile (:class:`fleetsim.device.latency.LinearProfile`) written
to a JSON file, so that they are known in closed form:

* batch size 1: a request of prompt ``P`` and output ``o`` is one prefill iteration (it yields
  token 1) then ``o - 1`` decode steps, ``S(o) = t_prefill + sum_{i=1}^{o-1} t_decode(P + i)``
  with ``t_prefill = base + prefill_base + per_prefill_token * P + per_seq`` and
  ``t_decode(C) = base + per_seq + per_context_token * C``. The moments of ``S`` are computed from
  the exact pmf of the output length (lognormal: rounded and clipped, as the workload draws it).
* continuous batching: iteration time ``a + c n``, geometric output lengths: a birth-death chain.

Tolerances come from each run's own statistics: batch means over ~25 batches of the post-warm-up
arrivals, 4 standard errors (plus, where the comparison is with an approximation, the stated size
of the approximation). ``docs/validation.md`` records the values each case produced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.config.schedules import diurnal_weights

Z = 4.0  # standard errors allowed
N_BATCHES = 25  # batch means
HOUR_S = 3600.0


# ---- helpers -------------------------------------------------------------------------------------
class ArraySink:
    """Keeps arrival, first-token and finish times (s), prompt and output of completed requests."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float, int, int]] = []
        self.not_done = 0

    def add(self, r, replica, finish_s, ttft_s, tpot_s, e2e_s, status) -> None:
        if status == "completed":
            self.rows.append((r.arrival_s, r.first_token_s, finish_s, r.prompt, r.out))
        else:
            self.not_done += 1

    def arrays(self) -> dict[str, np.ndarray]:
        a = np.array(self.rows, dtype=np.float64)
        order = np.argsort(a[:, 0], kind="stable")
        a = a[order]
        return {
            "arrival": a[:, 0],
            "first": a[:, 1],
            "finish": a[:, 2],
            "prompt": a[:, 3],
            "out": a[:, 4],
        }


def write_profile(path: Path, **coef: float) -> str:
    """A linear profile JSON (fleetsim-profile/1) with the given coefficients."""
    d = {
        "format": "fleetsim-profile/1",
        "kind": "linear",
        "name": "theory",
        "base_s": 0.0,
        "prefill_base_s": 0.0,
        "per_prefill_token_s": 0.0,
        "per_seq_s": 0.0,
        "per_context_token_s": 0.0,
    }
    d.update(coef)
    path.write_text(json.dumps(d))
    return str(path)


def scenario(
    profile: str,
    *,
    rate_per_s: float,
    prompt: dict,
    output: dict,
    hours: int = 1,
    replicas: int = 1,
    batch: int = 1,
    router: str = "round_robin",
    diurnal="flat",
    seed: int = 11,
) -> dict:
    """A one-pod scenario on a linear profile (llama-3.1-8b on an H100 only sets the KV budget).
    ``rate_per_s`` is the day's mean rate; the diurnal curve shapes it hour by hour."""
    return {
        "name": "theory",
        "seed": seed,
        "simulation": {"hours": hours},
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm", "profile": profile},
        "fleet": {
            "replicas": replicas,
            "router": router,
            "max_batch_size": batch,
            "max_batched_tokens": 1 << 20,
            # the queueing models assume whole-prompt prefills and no preemption: the first
            # engine (KV reserved at admission, no chunking, no prefix caching), and no
            # activation reserve (a 1M-token budget would otherwise leave no KV at all)
            "kv_allocation": "reserve",
            "activation_reserve_bytes": 0,
        },
        "traffic": {
            "requests_per_day": rate_per_s * 86400.0,
            "diurnal": diurnal,
            "prompt": prompt,
            "output": output,
        },
    }


def run(d: dict):
    sink = ArraySink()
    res = simulate(resolve(scenario_from_dict(d)), request_sink=sink)
    return res, sink


def batch_means(
    t: np.ndarray, x: np.ndarray, t0: float, t1: float, k: int = N_BATCHES
) -> tuple[float, float]:
    """Mean of ``x`` over the items with ``t`` in [t0, t1), and its standard error from ``k``
    batches by time (the batch means are nearly independent when a batch spans many busy
    periods)."""
    edges = np.linspace(t0, t1, k + 1)
    idx = np.searchsorted(edges, t, side="right") - 1
    ok = (idx >= 0) & (idx < k)
    sums = np.bincount(idx[ok], weights=x[ok], minlength=k)
    cnts = np.bincount(idx[ok], minlength=k)
    means = sums / cnts
    return float(x[ok].mean()), float(means.std(ddof=1) / math.sqrt(k))


def lognormal_pmf(median: float, sigma: float, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact pmf of ``clip(rint(median * exp(sigma Z)), lo, hi)`` on lo..hi."""
    k = np.arange(lo, hi + 1, dtype=np.float64)
    cdf = lambda y: stats.norm.cdf(np.log(np.maximum(y, 1e-300) / median) / sigma)  # noqa: E731
    upper = np.where(k == hi, 1.0, cdf(k + 0.5))
    lower = np.where(k == lo, 0.0, cdf(k - 0.5))
    return k, upper - lower


def geometric_pmf(mean: float, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact pmf of ``min(Geometric(1/mean), hi)`` on 1..hi."""
    k = np.arange(1, hi + 1, dtype=np.float64)
    p = 1.0 / mean
    pmf = p * (1.0 - p) ** (k - 1)
    pmf[-1] = (1.0 - p) ** (hi - 1)
    return k, pmf


def service_time(
    o: np.ndarray,
    P: int,
    *,
    base_s=0.0,
    prefill_base_s=0.0,
    per_prefill_token_s=0.0,
    per_seq_s=0.0,
    per_context_token_s=0.0,
) -> np.ndarray:
    """S(o) at batch size 1 (see the module docstring)."""
    t_p = base_s + prefill_base_s + per_prefill_token_s * P + per_seq_s
    d = o - 1.0
    return (
        t_p + d * (base_s + per_seq_s + per_context_token_s * P) + per_context_token_s * d * o / 2
    )


def erlang_c(c: int, a: float) -> float:
    """Probability of waiting in M/M/c with offered load ``a = lambda E[S]``."""
    rho = a / c
    terms = [a**k / math.factorial(k) for k in range(c)]
    top = a**c / math.factorial(c) / (1.0 - rho)
    return top / (sum(terms) + top)


def birth_death(lam: float, m: float, a: float, c: float, B: int, n_max: int = 4000):
    """Stationary law of the continuous-batching birth-death chain: departures at rate
    ``min(n, B) / (m (a + c min(n, B)))``. Returns (pi, E[N])."""
    n = np.arange(1, n_max + 1)
    k = np.minimum(n, B)
    mu = k / (m * (a + c * k))
    logp = np.concatenate(([0.0], np.cumsum(np.log(lam / mu))))
    p = np.exp(logp - logp.max())
    p /= p.sum()
    return p, float(np.dot(np.arange(n_max + 1), p))


# ---- M/D/1 and M/G/1 at batch size 1 -------------------------------------------------------------
MG1_CASES = {
    # fixed output: M/D/1
    "md1": {
        "coef": {
            "base_s": 4e-4,
            "prefill_base_s": 1e-3,
            "per_prefill_token_s": 2e-5,
            "per_seq_s": 2e-4,
        },
        "output": {"dist": "fixed", "value": 20},
        "rho": 0.6,
    },
    # lognormal output, and a context-length cost in decode: M/G/1 (Pollaczek-Khinchine)
    "mg1_lognormal": {
        "coef": {
            "base_s": 4e-4,
            "prefill_base_s": 1e-3,
            "per_prefill_token_s": 2e-5,
            "per_seq_s": 2e-4,
            "per_context_token_s": 4e-7,
        },
        "output": {"dist": "lognormal", "median": 15, "sigma": 0.8, "min": 1, "max": 300},
        "rho": 0.6,
    },
}
PROMPT = 100


def _output_pmf(out: dict) -> tuple[np.ndarray, np.ndarray]:
    if out["dist"] == "fixed":
        return np.array([float(out["value"])]), np.array([1.0])
    if out["dist"] == "lognormal":
        return lognormal_pmf(out["median"], out["sigma"], out["min"], out["max"])
    return geometric_pmf(out["mean"], out["max"])


@pytest.mark.parametrize("case", list(MG1_CASES))
def test_mg1_pollaczek_khinchine(tmp_path, case):
    cfg = MG1_CASES[case]
    coef = cfg["coef"]
    prof = write_profile(tmp_path / "p.json", **coef)
    o, pmf = _output_pmf(cfg["output"])
    S = service_time(o, PROMPT, **coef)
    ES, ES2 = float(pmf @ S), float(pmf @ S**2)
    lam = cfg["rho"] / ES
    d = scenario(
        prof, rate_per_s=lam, prompt={"dist": "fixed", "value": PROMPT}, output=cfg["output"]
    )
    res, sink = run(d)
    r = sink.arrays()
    t0, t1 = 0.05 * HOUR_S, 0.98 * HOUR_S  # warm-up from empty; the tail may still be running
    win = (r["arrival"] >= t0) & (r["arrival"] < t1)
    # the inputs: Poisson count, and the sizes' moments against the exact pmf
    n_win = int(win.sum())
    assert abs(n_win - lam * (t1 - t0)) < Z * math.sqrt(lam * (t1 - t0))
    S_i = service_time(r["out"][win], PROMPT, **coef)
    se_S = S_i.std() / math.sqrt(n_win)
    assert abs(S_i.mean() - ES) < Z * se_S + 1e-12 * ES
    # Pollaczek-Khinchine, with the exact moments and with those of the realised sizes (which
    # takes the size-sampling noise out of the comparison)
    rho = lam * ES
    wq_exact = lam * ES2 / (2.0 * (1.0 - rho))
    lam_hat, ES_hat, ES2_hat = n_win / (t1 - t0), S_i.mean(), (S_i**2).mean()
    wq_theory = lam_hat * ES2_hat / (2.0 * (1.0 - lam_hat * ES_hat))
    t_prefill = float(service_time(np.array([1.0]), PROMPT, **coef)[0])
    wait = r["first"] - r["arrival"] - t_prefill
    wq, se = batch_means(r["arrival"], wait, t0, t1)
    print(
        f"{case}: lambda={lam:.3f}/s E[S]={ES * 1e3:.4f} ms SCV={ES2 / ES**2 - 1:.4f} "
        f"n={n_win} Wq sim={wq * 1e3:.4f} ms se={se * 1e3:.4f} ms PK(exact moments)="
        f"{wq_exact * 1e3:.4f} ({(wq - wq_exact) / se:+.2f} se) PK(realised sizes)="
        f"{wq_theory * 1e3:.4f} ({(wq - wq_theory) / se:+.2f} se)"
    )
    assert abs(wq - wq_theory) < Z * se, (case, wq, wq_theory, se)
    assert abs(wq - wq_exact) < Z * se + Z * abs(wq_exact - wq_theory), (case, wq, wq_exact)
    # the sojourn time: W = W_q + E[S]
    e2e, se2 = batch_means(r["arrival"], r["finish"] - r["arrival"], t0, t1)
    assert abs(e2e - (wq_theory + ES_hat)) < Z * se2, (case, e2e, wq_theory + ES_hat, se2)
    # utilisation = lambda E[S]: busy time over the hour (Poisson count noise + edge carry-over)
    busy = res.totals.gpu_busy_s / HOUR_S
    se_busy = math.sqrt(lam * HOUR_S * ES2) / HOUR_S
    print(
        f"{case}: W sim={e2e * 1e3:.4f} ms theory={(wq_theory + ES_hat) * 1e3:.4f} ms "
        f"se={se2 * 1e3:.4f}; busy={busy:.5f} rho={rho:.5f} se={se_busy:.5f}"
    )
    assert abs(busy - rho) < Z * se_busy + 10 * ES / HOUR_S, (case, busy, rho, se_busy)
    assert sink.not_done < 50  # only the last moments' arrivals are still in flight


# ---- M/M/c: central queue, c replicas at batch size 1 --------------------------------------------
def test_mmc_erlang_c(tmp_path):
    c, m, t_tok = 4, 200.0, 5e-4
    # prefill costs the same as a decode step: S = t_tok * o, o ~ Geometric(mean m)
    coef = {"base_s": t_tok}
    prof = write_profile(tmp_path / "p.json", **coef)
    out = {"dist": "geometric", "mean": m, "max": 20000}
    o, pmf = geometric_pmf(m, out["max"])
    S = t_tok * o
    ES, ES2 = float(pmf @ S), float(pmf @ S**2)
    scv = ES2 / ES**2 - 1.0  # 1 - 1/m for the untruncated geometric
    rho = 0.7
    lam = rho * c / ES
    d = scenario(
        prof,
        rate_per_s=lam,
        prompt={"dist": "fixed", "value": 10},
        output=out,
        replicas=c,
        router="central_queue",
    )
    res, sink = run(d)
    r = sink.arrays()
    a = lam * ES
    wq_mmc = erlang_c(c, a) * ES / (c - a)
    # Allen-Cunneen: W_q(M/G/c) ~ (1 + SCV)/2 W_q(M/M/c); here (1 + SCV)/2 = 1 - 1/(2m)
    wq_theory = wq_mmc * (1.0 + scv) / 2.0
    wait = r["first"] - r["arrival"] - t_tok
    t0, t1 = 0.05 * HOUR_S, 0.98 * HOUR_S
    wq, se = batch_means(r["arrival"], wait, t0, t1)
    approx = abs(wq_mmc - wq_theory)  # the size of the non-exponential correction
    assert abs(wq - wq_theory) < Z * se + approx, (wq, wq_theory, wq_mmc, se)
    busy = res.totals.gpu_busy_s / (c * HOUR_S)
    se_busy = math.sqrt(lam * HOUR_S * ES2) / (c * HOUR_S)
    assert abs(busy - rho) < Z * se_busy + 10 * ES / HOUR_S
    print(
        f"mmc: c={c} lambda={lam:.2f}/s E[S]={ES * 1e3:.3f} ms SCV={scv:.5f} "
        f"P(wait)={erlang_c(c, a):.4f} Wq sim={wq * 1e3:.4f} ms M/M/c={wq_mmc * 1e3:.4f} "
        f"A-C={wq_theory * 1e3:.4f} se={se * 1e3:.4f} busy={busy:.4f}"
    )


# ---- continuous batching against the birth-death chain -------------------------------------------
BD = {"a": 0.01, "c": 0.001, "m": 5.0, "B": 8, "lam": 30.0}


@pytest.fixture(scope="module")
def bd_run(tmp_path_factory):
    """One continuous-batching run shared by the birth-death and Little's-law tests."""
    a, c, m, B, lam = BD["a"], BD["c"], BD["m"], BD["B"], BD["lam"]
    prof = write_profile(tmp_path_factory.mktemp("bd") / "p.json", base_s=a, per_seq_s=c)
    d = scenario(
        prof,
        rate_per_s=lam,
        prompt={"dist": "fixed", "value": 10},
        output={"dist": "geometric", "mean": m, "max": 500},
        batch=B,
    )
    return run(d)


def test_continuous_batching_birth_death(bd_run):
    a, c, m, B, lam = BD["a"], BD["c"], BD["m"], BD["B"], BD["lam"]
    _res, sink = bd_run
    r = sink.arrays()
    pi, EN = birth_death(lam, m, a, c, B)
    ET_bd = EN / lam
    # An arrival that finds the replica busy waits for the current iteration to end (PASTA: it
    # sees state n w.p. pi_n, and lands uniformly inside an iteration of a + c min(n, B) seconds).
    n = np.arange(len(pi))
    tau = a + c * np.minimum(n, B)
    resid = float(np.dot(pi[1:], tau[1:] / 2.0))
    ET_corr = ET_bd + resid
    t0, t1 = 0.05 * HOUR_S, 0.97 * HOUR_S
    T, se = batch_means(r["arrival"], r["finish"] - r["arrival"], t0, t1)
    print(
        f"birth-death: E[T] sim={T:.5f} s se={se:.5f} BD={ET_bd:.5f} (+{T / ET_bd - 1:.2%}) "
        f"BD+residual={ET_corr:.5f} (+{T / ET_corr - 1:.2%}) residual={resid * 1e3:.3f} ms "
        f"E[N]={EN:.3f} P(N>B)={pi[B + 1 :].sum():.4f}"
    )
    assert abs(T - ET_corr) < Z * se, (T, ET_corr, se)
    # the boundary wait is real and shows: at least half the residual above the chain
    assert ET_bd + resid / 2 < T, (T, ET_bd, resid)


# ---- Little's law --------------------------------------------------------------------------------
def test_littles_law(bd_run):
    """Time-average number in system over a window = lambda x mean sojourn of its arrivals."""
    _res, sink = bd_run
    r = sink.arrays()
    lam = BD["lam"]
    t0, t1 = 0.05 * HOUR_S, 0.95 * HOUR_S
    edges = np.linspace(t0, t1, N_BATCHES + 1)
    L = np.empty(N_BATCHES)
    lw = np.empty(N_BATCHES)
    for b in range(N_BATCHES):
        lo, hi = edges[b], edges[b + 1]
        overlap = np.clip(np.minimum(r["finish"], hi) - np.maximum(r["arrival"], lo), 0.0, None)
        L[b] = overlap.sum() / (hi - lo)
        sel = (r["arrival"] >= lo) & (r["arrival"] < hi)
        lw[b] = lam * (r["finish"][sel] - r["arrival"][sel]).mean()
    diff = L - lw
    se = diff.std(ddof=1) / math.sqrt(N_BATCHES)
    print(f"little: L={L.mean():.4f} lambda*W={lw.mean():.4f} diff={diff.mean():.4f} se={se:.4f}")
    assert abs(diff.mean()) < Z * se


# ---- utilisation over a realistic day ------------------------------------------------------------
def test_day_utilisation_hourly(tmp_path):
    """Azure-conversation diurnal curve over 24 h, batch size 1: busy fraction of each hour and
    of the day against lambda_h E[S]."""
    coef = {"base_s": 0.02, "prefill_base_s": 0.05, "per_prefill_token_s": 1e-4, "per_seq_s": 0.01}
    prof = write_profile(tmp_path / "p.json", **coef)
    out = {"dist": "lognormal", "median": 20, "sigma": 0.6, "min": 1, "max": 200}
    o, pmf = _output_pmf(out)
    S = service_time(o, PROMPT, **coef)
    ES, ES2 = float(pmf @ S), float(pmf @ S**2)
    w = np.array(diurnal_weights("azure-conv"))
    peak_rho = 0.7
    lam_h = peak_rho / ES * w / w.max()
    d = scenario(
        prof,
        rate_per_s=float(lam_h.mean()),
        prompt={"dist": "fixed", "value": PROMPT},
        output=out,
        hours=24,
        diurnal="azure-conv",
    )
    res = simulate(resolve(scenario_from_dict(d)))
    busy_h = res.hourly.column("gpu_busy_s").to_numpy() / HOUR_S
    want_h = lam_h * ES
    se_h = np.sqrt(lam_h * HOUR_S * ES2) / HOUR_S
    carry = 20 * ES / HOUR_S  # work carried across an hour boundary (a few service times)
    assert np.all(np.abs(busy_h - want_h) < Z * se_h + carry), np.c_[busy_h, want_h, se_h]
    day, want = busy_h.sum(), want_h.sum()
    se_day = math.sqrt(float((se_h**2).sum()))
    print(
        f"day: busy={day:.4f} h lambda*E[S]={want:.4f} h se={se_day:.4f} h "
        f"max hourly |z|={np.max(np.abs(busy_h - want_h) / se_h):.2f}"
    )
    assert abs(day - want) < Z * se_day + carry
