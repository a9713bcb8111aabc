"""Data-parallel engines as vLLM 0.11 runs them: every rank its own scheduler (a reference model
of the ML.ENERGY runs, which the engine now follows: ``serving/ranks.py``).

    python -m fleetsim.calibrate.dp_ranks      # every data-parallel row: measured, merged,
                                               # ranks (this model) and the engine (the harness)

The simulator's engine serves a data-parallel replica (``fleet.data_parallel`` = ``dp``) with one
scheduler per rank by default (``fleet.dp_scheduler = "per-rank"``, :mod:`fleetsim.serving.
ranks`), as below; ``"merged"`` is ONE scheduler: one waiting queue, one ``max_batch_size`` and
one ``max_batched_tokens`` budget for the replica, its iterations timed at ``dp`` times the
tokens of the fullest rank as if the prompts of a step went one to a rank
(:meth:`fleetsim.device.latency.LatencyModel.dp_padded_tokens`). This module is the engine-free
reference the engine is tested against (``tests/test_dp_engine.py``): it gives the harness's
tokens/s and window batch of every non-KV-limited DP row as the engine does (the engine counts
one more context token per decoding sequence, and has a KV pool: DP8 b2048 is KV-limited there).
vLLM 0.11 runs ``dp`` engine cores, and the ML.ENERGY Benchmark launches them so
(``data/mlenergy-v3/SOURCE.md``):

* **each rank has its own scheduler**: its own waiting queue, its own ``max_num_seqs`` and its
  own ``max_num_batched_tokens`` (8,192) budget: every ``DPEngineCoreProc`` builds its
  ``Scheduler`` from the same ``SchedulerConfig`` (``vllm/v1/engine/core.py``); the benchmark
  passes ``--max-num-seqs max_num_seqs / num_gpus`` under data parallelism (ml-energy/benchmark
  ``mlenergy/benchmark/llm/benchmark.py``, ``spawn_vllm``: ``max_num_seqs_per_replica``), so
  the row's ``max_num_seqs`` is the server's total;
* **a request is bound to a rank on arrival**: the API server's ``DPLBAsyncMPClient.
  get_core_engine_for_request`` (``vllm/v1/engine/core_client.py``) sends it to the rank with
  the lowest ``waiting * 4 + running`` and counts it there at once; a request stays on its rank
  (no migration). With every request sent at time 0 (the benchmark) the ranks get the requests
  in turn, each ``num_requests / dp`` of them, which is :func:`simulate_ranks`' assignment;
* **the ranks step in lockstep**: the mixture-of-experts layers' all-to-all needs every rank in
  every step, an idle rank runs a dummy batch (``DPEngineCoreProc.run_busy_loop``,
  ``execute_dummy_batch``), and each rank's batch is padded to the fullest rank's token count
  (``get_dp_padding`` / ``coordinate_batch_across_dp``); a step takes ``dp x`` the fullest
  rank's tokens (``LatencyModel.iteration``'s ``t_pad``), and its prompt attention that of the
  rank with the most prompt pairs (``p_full``, ``pairs_full``: a chunk's pairs are its rank's).

What it changes, shown on the rows (:func:`compare`): the per-rank queues drain unevenly (a rank
whose requests were short runs out first), which gives the measured ``avg_batch_size`` below
``max_num_seqs`` of the small-batch data-parallel rows (Coder-480B-FP8: DP4 b8 7.45 measured,
7.6 here, 8.0 in the merged scheduler); and at large batches each rank admits up to its own
budget, so the fullest rank of a step carries several prompts (DP8 b1024: merged 2,813 tokens/s,
per rank 1,741, measured 1,136). What it does not change: how many steps carry a prompt at 8 to
256 sequences (a rank's prompts come as its own requests finish, one at a time, as in the merged
scheduler), so the DP8 rows' time beyond the median step stays short by ~1.4x (the prompt
steps' cost), and their measured medians at 128 and 256 sequences (108, 157 ms) stay between
the decode and the prompt step.

The model here: per rank, the running decodes take one token each, then the partly prefilled
prompts their next chunk, then waiting requests are admitted first come first served while the
rank has a free slot and budget (chunked prefill); KV blocks are not limited (the rows are not
KV-limited at these batches); a prompt's last chunk gives its first token. A step with prompt
tokens is timed by ``LatencyModel.iteration`` at ``t_pad = dp x`` the fullest rank's tokens; a
pure decode step by ``decode_step`` (the ranks' decodes balanced, as the engine). The figures
are the harness's (``calibrate/mlenergy.py``): the window from ``max_num_seqs`` first tokens to
``num_requests - max_num_seqs - 1`` finishes, the median inter-token gap token-weighted over
the whole run. With one rank (``per_rank=False``) it is the merged scheduler with the
replica's one 8,192-token budget, which reproduced the engine's figures of these rows within 1 %
before the engine ran per rank (``dp_scheduler = "merged"`` with ``max_batched_tokens`` 8,192
still does).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetsim.device.latency import LatencyModel


@dataclass(frozen=True)
class RankRun:
    """The figures of one simulated run (the harness's window and ITL)."""

    tokens_per_s: float  # output tokens in the window / window
    itl_median_s: float  # token-weighted median step, whole run
    itl_p90_s: float
    avg_batch: float  # time-weighted running sequences over the window
    prompt_share: float  # share of the window's steps that compute prompt tokens
    steps: int
    output_tokens: int  # every output token of the run (first tokens included)


@dataclass
class RankTrace:
    """Every step of a simulated run (:func:`run_ranks`)."""

    first: list[float] = field(default_factory=list)  # first-token times
    finish: list[float] = field(default_factory=list)  # finish times
    step_s: list[float] = field(default_factory=list)  # each step's duration
    step_end: list[float] = field(default_factory=list)
    step_dec: list[int] = field(default_factory=list)  # its decode tokens (inter-token gaps)
    step_run: list[int] = field(default_factory=list)  # sequences running in it
    step_pf: list[bool] = field(default_factory=list)  # whether it computes prompt tokens
    step_pad: list[int] = field(default_factory=list)  # the t_pad it was timed at (-1: none)
    output_tokens: int = 0


def simulate_ranks(
    lat: LatencyModel,
    outs: np.ndarray,
    prompt_tokens: int,
    max_num_seqs: int,
    max_batched_tokens: int,
    per_rank: bool = True,
) -> RankRun:
    """The harness's figures of :func:`run_ranks`."""
    tr = run_ranks(lat, outs, prompt_tokens, max_num_seqs, max_batched_tokens, per_rank)
    return figures(tr, max_num_seqs, len(outs))


def run_ranks(
    lat: LatencyModel,
    outs: np.ndarray,
    prompt_tokens: int,
    max_num_seqs: int,
    max_batched_tokens: int,
    per_rank: bool = True,
) -> RankTrace:
    """Serve ``len(outs)`` requests of ``prompt_tokens`` prompt and ``outs[i]`` output tokens,
    all sent at time 0, on the replica ``lat`` times: its ``lat.dp`` ranks each with its own
    queue (request ``i`` on rank ``i mod dp``), ``max_num_seqs / dp`` slots and
    ``max_batched_tokens`` budget, in lockstep (``per_rank``), or one merged scheduler with the
    replica's ``max_num_seqs`` and budget and the engine's padding (module docstring)."""
    dp = lat.dp if per_rank else 1
    n_req = len(outs)
    cap = max_num_seqs // dp
    if cap < 1:
        raise ValueError(f"max_num_seqs {max_num_seqs} under {dp} ranks")
    queues = [list(range(r, n_req, dp))[::-1] for r in range(dp)]  # popped from the end
    # per rank: [request, prompt tokens left, output tokens so far, context tokens]
    running: list[list[list[int]]] = [[] for _ in range(dp)]
    t = 0.0
    tr = RankTrace()
    first, finish = tr.first, tr.finish
    out_tokens = 0
    while True:
        p_tot = 0
        pairs = 0.0
        nch = 0
        ndec = 0
        ctx = 0.0
        fullest = 0
        p_rank = [0] * dp  # each rank's prompt tokens and attention pairs in this step
        pairs_rank = [0.0] * dp
        plans = []
        for r in range(dp):
            budget = max_batched_tokens
            dec = [s for s in running[r] if s[1] == 0]
            budget -= len(dec)
            chunks: list[tuple[list[int], int]] = []
            for s in running[r]:
                if s[1] > 0 and budget > 0:
                    c = min(s[1], budget)
                    budget -= c
                    chunks.append((s, c))
            q = queues[r]
            while q and len(running[r]) < cap and budget > 0:
                s = [q.pop(), prompt_tokens, 0, 0]
                running[r].append(s)
                c = min(prompt_tokens, budget)
                budget -= c
                chunks.append((s, c))
            fullest = max(fullest, max_batched_tokens - budget)
            plans.append((dec, chunks))
            ndec += len(dec)
            ctx += float(sum(s[3] for s in dec))
            for s, c in chunks:
                p_tot += c
                nch += 1
                pp = c * (2.0 * s[3] + c)  # the engine's convention (serving/kv_paged.py)
                pairs += pp
                p_rank[r] += c
                pairs_rank[r] += pp
        if p_tot == 0 and ndec == 0:
            break
        t_pad = -1
        if p_tot:
            if per_rank and dp > 1:  # the fullest rank's tokens, prompt tokens and pairs
                t_pad = dp * fullest
                dur = lat.iteration(
                    p_tot, pairs, nch, ndec, ctx, t_pad, dp * max(p_rank), dp * max(pairs_rank)
                )[0]
            else:
                dur = lat.iteration(p_tot, pairs, nch, ndec, ctx)[0]
        else:
            dur = lat.decode_step(ndec, ctx)[0]
        t += dur
        nrun = sum(len(x) for x in running)
        for r in range(dp):
            dec, chunks = plans[r]
            done = False
            for s in dec:
                s[2] += 1
                s[3] += 1
                out_tokens += 1
                if s[2] >= outs[s[0]]:
                    finish.append(t)
                    done = True
            for s, c in chunks:
                s[1] -= c
                s[3] += c
                if s[1] == 0:  # the last chunk: its first token
                    s[2] = 1
                    out_tokens += 1
                    first.append(t)
                    if s[2] >= outs[s[0]]:
                        finish.append(t)
                        done = True
            if done:
                running[r] = [s for s in running[r] if s[1] > 0 or s[2] < outs[s[0]]]
        tr.step_s.append(dur)
        tr.step_end.append(t)
        tr.step_dec.append(ndec)
        tr.step_run.append(nrun)
        tr.step_pf.append(p_tot > 0)
        tr.step_pad.append(t_pad)
    tr.output_tokens = out_tokens
    return tr


def figures(tr: RankTrace, m: int, n_req: int) -> RankRun:
    """The harness's figures of the run ``tr`` of ``n_req`` requests at ``max_num_seqs`` =
    ``m``: its window from ``m`` first tokens to ``n_req - m - 1`` finishes."""
    if n_req - m - 1 < 1:
        raise ValueError(f"no steady-state window ({n_req} requests, max_num_seqs {m})")
    fs = np.sort(np.asarray(tr.first))
    ff = np.sort(np.asarray(tr.finish))
    ts, te = float(fs[m - 1]), float(ff[n_req - m - 2])
    d = np.asarray(tr.step_s)
    end = np.asarray(tr.step_end)
    dec = np.asarray(tr.step_dec, dtype=float)
    run = np.asarray(tr.step_run, dtype=float)
    start = end - d
    ov = np.clip(np.minimum(end, te) - np.maximum(start, ts), 0.0, None)
    inw = ov > 0
    # output tokens of the window: the decode tokens of its steps (time share at its edges)
    # and the first tokens that came out in it
    share = np.where(d > 0, ov / np.where(d > 0, d, 1.0), 0.0)
    tokens = float((dec * share).sum()) + float(((fs > ts) & (fs <= te)).sum())
    o = np.argsort(d, kind="stable")
    cw = np.cumsum(dec[o])
    med = float(d[o][np.searchsorted(cw, 0.5 * cw[-1])])
    p90 = float(d[o][np.searchsorted(cw, 0.9 * cw[-1])])
    return RankRun(
        tokens_per_s=tokens / (te - ts),
        itl_median_s=med,
        itl_p90_s=p90,
        avg_batch=float((run * ov).sum() / (te - ts)),
        prompt_share=float(np.asarray(tr.step_pf)[inw].mean()),
        steps=len(tr.step_s),
        output_tokens=tr.output_tokens,
    )


def row_latency(c) -> LatencyModel:
    """The latency model the harness's simulation of row ``c`` uses (its scenario, the
    catalog's profile)."""
    from fleetsim.calibrate import mlenergy as M
    from fleetsim.config.scenario import resolve

    prompt = M.PROMPT_TOKENS[c.task]
    with tempfile.TemporaryDirectory(prefix="fleetsim-dp-ranks-") as tmp:
        trace = Path(tmp) / "trace.csv"
        trace.write_text(f"arrival_s,prompt_tokens,output_tokens\n0,{prompt},1\n")
        sc = M._run_scenario(c, trace, prompt, np.array([1]), 1, "iteration")
        return resolve(sc, "").latency_model()


def simulate_row(c, per_rank: bool = True, seed: int = 0) -> RankRun:
    """:func:`simulate_ranks` of row ``c``, its outputs drawn as the harness draws them."""
    from fleetsim.calibrate import mlenergy as M

    rng = np.random.default_rng(np.random.SeedSequence([seed, c.config_index, len(c.source_file)]))
    outs = M.draw_outputs(c, c.num_requests, rng)
    return simulate_ranks(
        row_latency(c),
        outs,
        M.PROMPT_TOKENS[c.task],
        c.max_num_seqs,
        M.MAX_BATCHED_TOKENS,
        per_rank,
    )


def compare(configs, engine: bool = True) -> list[str]:
    """One line per data-parallel row: measured, merged scheduler and per-rank figures, and
    (``engine``) the harness's run of the engine (per-rank, iteration engine)."""
    from fleetsim.calibrate import mlenergy as M

    out = [
        "data-parallel rows: tokens/s, median ITL (ms), avg batch; measured / merged / per rank"
        + (" / engine" if engine else "")
    ]
    for c in configs:
        if c.dp <= 1:
            continue
        a, b = simulate_row(c, False), simulate_row(c, True)
        e = None
        if engine:
            run = M.simulate_config(c, engine="iteration")
            e = (run.tokens / run.window_s, run.itl_median_s, run.avg_batch)

        def err(x: float, m: float) -> str:
            return f"{100.0 * (x / m - 1.0):+6.1f}%" if m and not math.isnan(m) else "   n/a"

        out.append(
            f"  {c.key:70} tok/s {c.tokens_per_s:6.0f} / {a.tokens_per_s:6.0f} "
            f"{err(a.tokens_per_s, c.tokens_per_s)} / {b.tokens_per_s:6.0f} "
            f"{err(b.tokens_per_s, c.tokens_per_s)}"
            + (f" / {e[0]:6.0f} {err(e[0], c.tokens_per_s)}" if e else "")
            + f" | ITL {c.itl_median_ms:6.1f} / {1e3 * a.itl_median_s:6.1f} / "
            f"{1e3 * b.itl_median_s:6.1f}"
            + (f" / {1e3 * e[1]:6.1f}" if e else "")
            + f" | batch {c.avg_batch_size:6.1f} / {a.avg_batch:6.1f} / {b.avg_batch:6.1f}"
            + (f" / {e[2]:6.1f}" if e else "")
            + (" suspect" if c.suspect else "")
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from fleetsim.calibrate import mlenergy as M

    ap = argparse.ArgumentParser(
        prog="python -m fleetsim.calibrate.dp_ranks",
        description="data-parallel ML.ENERGY rows: merged scheduler vs one scheduler per rank",
    )
    ap.add_argument("--data", type=Path, default=M.DATA_DIR, help="a folder in that format")
    ap.add_argument("--no-engine", action="store_true", help="leave out the engine's runs")
    a = ap.parse_args(argv)
    configs, _ = M.select(M.read_configs(a.data))
    print("\n".join(compare(configs, not a.no_engine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
