"""The recorder's latency percentiles (recorder.percentiles) equal numpy's, value by value."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fleetsim.serving.recorder import LAT_PCTS, percentiles

QS = (*LAT_PCTS, 0.0, 1.0, 12.5, 33.3, 49.999, 50.001, 66.7, 99.9, 100.0)


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)
    )


def test_equal_to_numpy_on_latency_like_samples():
    rng = np.random.default_rng(np.random.SeedSequence(20))
    for n in (*range(1, 40), 99, 100, 101, 997, 1000, 4096):
        for x in (
            rng.lognormal(-1.0, 1.2, n),  # TTFT-like
            rng.exponential(0.05, n),  # TPOT-like
            np.round(rng.uniform(0.0, 3.0, n), 2),  # many ties
            np.full(n, 0.125),
        ):
            want = np.percentile(x, QS).tolist()
            assert _same(percentiles(x, QS), want), n
            assert percentiles(x) == np.percentile(x, LAT_PCTS).tolist()


def test_nan_anywhere_gives_nan_as_numpy_does():
    x = np.array([0.3, math.nan, 0.1, 0.2])
    assert _same(percentiles(x), np.percentile(x, LAT_PCTS).tolist())
    assert all(math.isnan(v) for v in percentiles(x))


@settings(max_examples=300, deadline=None)
@given(
    arrays(
        np.float64,
        st.integers(1, 64),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    ),
    st.lists(st.floats(0.0, 100.0), min_size=1, max_size=6),
)
def test_equal_to_numpy_on_any_finite_sample(x, qs):
    assert _same(percentiles(x, tuple(qs)), np.percentile(x, qs).tolist())


def test_hist_std_is_the_dense_sums_value():
    """results.vllm.hist_std_s adds the sparse histograms over their spans: the same value as
    the sum of the dense arrays it replaced, bit for bit (whole counts add exactly)."""
    from types import SimpleNamespace

    from fleetsim.results.vllm import hist_std_s
    from fleetsim.serving.recorder import HIST_LO_S, HIST_PER_DECADE, SparseHist, _hist

    rng = np.random.default_rng(np.random.SeedSequence(23))
    pods = []
    for _ in range(3):
        hours = []
        for h in range(24):
            x = rng.lognormal(-2.0 + 0.1 * h, 1.0, int(rng.integers(0, 500)))
            hours.append({"ttft": SparseHist(_hist(x))} if h % 7 else {})
        pods.append(SimpleNamespace(hist=hours))
    dense = [np.asarray(d["ttft"], dtype=np.float64) for p in pods for d in p.hist if d]
    h = np.sum(dense, axis=0)
    n = h.sum()
    x = HIST_LO_S * 10 ** ((np.arange(len(h)) + 0.5) / HIST_PER_DECADE)
    mean = float((h * x).sum() / n)
    want = math.sqrt(max(float((h * x * x).sum() / n) - mean * mean, 0.0))
    assert hist_std_s(pods, "ttft") == want
    assert math.isnan(hist_std_s([SimpleNamespace(hist=[{}])], "ttft"))
