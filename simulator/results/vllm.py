"""A run's latency and throughput in the keys and units of vLLM's serving benchmark.

vLLM's ``benchmarks/benchmark_serving.py`` (read at commit 0049e29c of vllm-project/vllm:
``calculate_metrics`` fills ``BenchmarkMetrics``, ``benchmark`` builds the result dict and its
``process_one_metric`` adds the latency keys) writes, with ``--save-result``, a JSON object with

* ``duration`` (s), ``completed``, ``total_input_tokens``, ``total_output_tokens``;
* ``request_throughput`` (req/s), ``output_throughput`` and ``total_token_throughput``
  (tokens/s): completed requests and tokens divided by ``duration``;
* for each metric of ``--percentile-metrics`` (``ttft``, ``tpot``, ``itl``, ``e2el``):
  ``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms`` and ``p<q>_<m>_ms`` for each ``q`` of
  ``--metric-percentiles``, all in **milliseconds**. ``tpot`` is ``(latency - ttft) /
  (output tokens - 1)`` of each request with more than one output token, ``itl`` every gap
  between consecutive tokens, ``e2el`` the request's latency.

fleetsim's own names map one to one: ``ttft``, ``tpot``, ``itl`` and ``e2e`` (= ``e2el``); the
day's means are exact, the median and percentiles come from the log-histograms (+-0.23%), and
the standard deviation from the same histograms' first two moments. ``duration`` is the
simulated time (hours x 3600 s); the requests still in flight at the end are not ``completed``.
"""

from __future__ import annotations

import math

import numpy as np

#: vLLM's metric name -> fleetsim's (``<name>_mean_s``, ``<name>_p99_s``...)
METRICS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2e"}
#: the percentiles written (those fleetsim keeps; vLLM's default ``--metric-percentiles`` is 99)
PERCENTILES = (50, 90, 95, 99)
#: the throughput and count keys, in vLLM's order
COUNTS = (
    "duration",
    "completed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
)


def latency_keys() -> list[str]:
    """The latency keys written, in vLLM's order (mean, median, std, then the percentiles)."""
    out = []
    for m in METRICS:
        out += [f"mean_{m}_ms", f"median_{m}_ms", f"std_{m}_ms"]
        out += [f"p{q}_{m}_ms" for q in PERCENTILES]
    return out


def hist_std_s(pods, metric: str) -> float:
    """The standard deviation of one latency metric over the day from the pods' log-histograms
    (the geometric mid-point of each bin, as the percentiles)."""
    from fleetsim.serving.recorder import HIST_BINS, HIST_LO_S, HIST_PER_DECADE, SparseHist

    hists = [d[metric] for p in pods if p.hist for d in p.hist if d]
    if not hists:
        return math.nan
    # the sum of the dense histograms, each sparse one added over its span only: whole counts,
    # so exactly the sum np.sum(..., axis=0) of the dense float arrays gives (not 24 x 4 dense
    # copies per pod-day at every write: ~0.01 s of a small run, bench/RESULTS.md)
    h = np.zeros(HIST_BINS, dtype=np.float64)
    for x in hists:
        if isinstance(x, SparseHist):
            h[x.lo : x.lo + len(x.counts)] += np.asarray(x.counts, dtype=np.float64)
        else:
            h += np.asarray(x, dtype=np.float64)
    n = h.sum()
    if n < 1:
        return math.nan
    x = HIST_LO_S * 10 ** ((np.arange(len(h)) + 0.5) / HIST_PER_DECADE)
    mean = float((h * x).sum() / n)
    var = float((h * x * x).sum() / n) - mean * mean
    return math.sqrt(max(var, 0.0))


def vllm_block(
    totals: dict, latency: dict, hours: int, std_s: dict[str, float] | None = None
) -> dict:
    """The benchmark_serving keys of a run from its day totals (``DayTotals.as_dict()``), its
    day latency (``day_latency``) and the simulated hours; ``std_s``: fleetsim metric ->
    standard deviation in s (None: ``std_*`` keys are None)."""
    duration = hours * 3600.0
    done = float(totals["requests_completed"])
    tin = float(totals["prompt_tokens"])
    tout = float(totals["output_tokens"])
    out: dict = {
        "duration": duration,
        "completed": round(done),
        "total_input_tokens": round(tin),
        "total_output_tokens": round(tout),
        "request_throughput": done / duration,
        "output_throughput": tout / duration,
        "total_token_throughput": (tin + tout) / duration,
    }
    for m, ours in METRICS.items():

        def ms(v) -> float | None:
            return None if v is None or not math.isfinite(v) else 1000.0 * v

        out[f"mean_{m}_ms"] = ms(latency.get(f"{ours}_mean_s"))
        out[f"median_{m}_ms"] = ms(latency.get(f"{ours}_p50_s"))
        out[f"std_{m}_ms"] = ms((std_s or {}).get(ours))
        for q in PERCENTILES:
            out[f"p{q}_{m}_ms"] = ms(latency.get(f"{ours}_p{q}_s"))
    return out


def vllm_result(res) -> dict:
    """The vLLM benchmark_serving result of a :class:`~fleetsim.results.result.Result`: the
    keys of its ``--save-result`` file (``backend`` = ``"fleetsim"``, ``model_id``, the rate)
    and the latency/throughput block (:func:`vllm_block`)."""
    sc = res.scenario
    std = {ours: hist_std_s(res.pods, ours) for ours in METRICS.values()}
    hours = sc.simulation.hours
    doc = {
        "backend": "fleetsim",
        "model_id": res.resolved.model.name,
        "num_prompts": round(res.totals.requests_arrived),
        "request_rate": res.totals.requests_arrived / (hours * 3600.0),  # the day's mean
    }
    doc.update(vllm_block(res.totals.as_dict(), res.day_latency, hours, std))
    return doc
