"""``fleetsim replay``: one timed trace through the real torch engine and through the simulator.

    fleetsim replay --trace FILE|poisson:N:RATE[:PROMPT:OUTPUT] --model NAME|FILE.toml
                    [--profile PATH] [--device auto|cpu|cuda] [--layers N] [--out DIR]

The real side is :class:`calibrate.engine.ServingEngine` replaying the trace in wall time on this
device. The simulated side is ``simulate()`` on a scenario built here with the same model (the
same layers), the same batching limits, the same KV budget and the same requests at the same
times (``traffic.trace``), timed by ``--profile`` or, without it, by a quick calibration run on
this device first (``--calibration engine``: :func:`write_engine_profile`; ``roofline``:
``calibrate.run.calibrate(quick=True)`` on :func:`replay_grid` + :func:`add_engine_overhead`).
Both sides' per-request TTFT, TPOT and end-to-end latency are summarised (mean, p50, p90) with
the simulator's relative error, printed, and written atomically to ``--out``: ``replay.csv``
(the table), ``replay.json`` (the table and the run's facts), ``requests.csv`` (every request on
both sides) and ``trace.csv`` (the trace).

``poisson:N:RATE[:PROMPT:OUTPUT]`` generates N Poisson arrivals at RATE per second with lognormal
sizes (medians PROMPT and OUTPUT tokens, default 64 and 16, sigma 0.5, clipped to [4, 4 x median]),
seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleetsim.base.errors import UserError
from fleetsim.base.units import HOUR_S

METRICS = ("ttft", "tpot", "e2e")
STATS = ("mean", "p50", "p90")
COLUMNS = ("metric", "stat", "real_s", "sim_s", "rel_err")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fleetsim replay``."""
    from fleetsim.apps.common import OneLineParser

    p = OneLineParser(prog="fleetsim replay", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--trace",
        required=True,
        help="CSV with arrival_s,prompt_tokens,output_tokens, or poisson:N:RATE[:P:O]",
    )
    p.add_argument(
        "--model",
        default=None,
        help="catalog model, built-in config (small-lm) or a TOML of ModelSpec fields "
        "(default: llama-3.1-8b on CUDA; on a CPU small-lm, 4 layers of d_model 512, which "
        "replays 30 requests in under a minute on 2 cores; a one-layer slice of llama-3.1-8b "
        "streams 0.9 GB per iteration and took 95 s)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile JSON of this device (default: run a quick calibration first)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="build only N of the model's layers (default: all on CUDA; on a CPU all of a "
        "model of at most 256 MB of weights, else 1)",
    )
    p.add_argument(
        "--full-vocab",
        action="store_true",
        help="on a CPU: build the whole vocabulary (default: cut to 2,048 rows, which the "
        "simulator's side uses too; see fleetsim calibrate --help)",
    )
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--calibration",
        choices=("engine", "roofline"),
        default="engine",
        help="without --profile: 'engine' fits the simulator's linear step-time model "
        "to this engine's own iterations on a grid (about 20 s); 'roofline' runs "
        "the quick roofline calibration on the trace's shapes and adds the "
        "engine loop's per-iteration overhead, measured on a synthetic "
        "warm-up burst (about 20 s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on a CPU: 1. A replay times every iteration: with "
        "two threads on a 2-core machine that other processes share, each op waits at its "
        "barrier for a descheduled thread: small-lm's mean time per output token was 388 ms "
        "with two threads and 12 ms with one, in two runs on this project's shared machine)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a generated trace and the weights")
    p.add_argument("--out", type=Path, default=Path("replay-out"), help="output directory")
    return p


# ---- traces --------------------------------------------------------------------------------------
def poisson_trace(
    n: int, rate_per_s: float, prompt_median: int = 64, output_median: int = 16, seed: int = 0
) -> list[tuple[float, int, int]]:
    """``n`` Poisson arrivals at ``rate_per_s`` with lognormal sizes (sigma 0.5, clipped to
    [4, 4 x median]); the first arrival is at 0.5 s (after the engine has warmed up)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x7E,)))
    t = 0.5 + np.concatenate(([0.0], np.cumsum(rng.exponential(1.0 / rate_per_s, n - 1))))

    def size(med: int) -> np.ndarray:
        x = np.rint(med * np.exp(0.5 * rng.standard_normal(n)))
        return np.clip(x, 4, 4 * med).astype(int)

    p, o = size(prompt_median), size(output_median)
    return [(float(a), int(b), int(c)) for a, b, c in zip(t, p, o)]


def parse_trace_arg(arg: str, seed: int) -> list[tuple[float, int, int]]:
    """The trace named by ``--trace``: a generated Poisson trace or a CSV file."""
    if arg.startswith("poisson:"):
        parts = arg.split(":")[1:]
        try:
            if not 2 <= len(parts) <= 4:
                raise ValueError
            n, rate = int(parts[0]), float(parts[1])
            pm = int(parts[2]) if len(parts) > 2 else 64
            om = int(parts[3]) if len(parts) > 3 else 16
        except ValueError:
            raise UserError(
                f"--trace {arg!r}: expected poisson:N:RATE[:PROMPT:OUTPUT] "
                "(e.g. poisson:200:2.5:64:16)"
            ) from None
        if n < 1 or not (rate > 0 and math.isfinite(rate)) or pm < 1 or om < 1:
            raise UserError(f"--trace {arg!r}: N, RATE, PROMPT and OUTPUT must be positive")
        if n > MAX_REPLAY_REQUESTS or max(pm, om) > MAX_REPLAY_TOKENS or rate > 1e6:
            raise UserError(
                f"--trace {arg!r}: at most {MAX_REPLAY_REQUESTS:,} requests of at most "
                f"{MAX_REPLAY_TOKENS:,} tokens at <= 1e6 per second (a replay runs the real "
                "engine on every request; fix: a smaller N)"
            )
        return poisson_trace(n, rate, pm, om, seed)
    from fleetsim.workload.sampling import read_arrival_trace

    t, p, o = read_arrival_trace(str(Path(arg)))
    return list(zip(t.tolist(), p.tolist(), o.tolist()))


def trace_csv(rows: list[tuple[float, int, int]]) -> str:
    """The trace as CSV text (the ``traffic.trace`` format)."""
    buf = io.StringIO()
    buf.write("arrival_s,prompt_tokens,output_tokens\n")
    for a, p, o in rows:
        buf.write(f"{a!r},{p},{o}\n")
    return buf.getvalue()


# ---- the simulated side --------------------------------------------------------------------------
def sim_scenario(
    spec,
    profile_path: Path,
    trace_path: Path,
    *,
    max_batch_size: int,
    max_batched_tokens: int,
    catalog_gpu: str | None,
    hours: int,
) -> dict:
    """The scenario that mirrors the engine: one replica, the engine's limits, the trace."""
    model = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in ("kv_dtype", "derived") and getattr(spec, f.name) is not None
    }
    model["name"] = f"{spec.name}-replay"  # inline architecture (the layers actually built)
    return {
        "name": "replay",
        "seed": 0,
        "simulation": {"hours": hours},
        "model": model,
        "hardware": {"gpu": catalog_gpu or "h100-sxm", "profile": str(profile_path)},
        "fleet": {
            "replicas": 1,
            "router": "round_robin",
            "max_batch_size": max_batch_size,
            "max_batched_tokens": max_batched_tokens,
        },
        "traffic": {"diurnal": "flat", "trace": str(trace_path)},
    }


class _Sink:
    def __init__(self) -> None:
        self.rows: dict[int, tuple[float, float, int]] = {}

    def add(self, r, replica, finish_s, ttft_s, tpot_s, e2e_s, status) -> None:
        self.rows[r.rid] = (r.first_token_s, finish_s, r.out)


# ---- the table -----------------------------------------------------------------------------------
def latency_arrays(arrival, first, finish, out) -> dict[str, np.ndarray]:
    """TTFT, TPOT (outputs > 1 token) and end-to-end latency of completed requests."""
    arrival, first, finish, out = map(np.asarray, (arrival, first, finish, out))
    ok = np.isfinite(finish)
    multi = ok & (out > 1)
    return {
        "ttft": (first - arrival)[ok],
        "e2e": (finish - arrival)[ok],
        "tpot": ((finish - first)[multi] / (out[multi] - 1)),
    }


def error_table(real: dict[str, np.ndarray], sim: dict[str, np.ndarray]) -> list[dict]:
    """Rows (metric, stat, real_s, sim_s, rel_err = sim / real - 1)."""
    rows = []
    for m in METRICS:
        for s in STATS:
            f = np.mean if s == "mean" else (lambda x, q=float(s[1:]): np.percentile(x, q))
            a = float(f(real[m])) if len(real[m]) else math.nan
            b = float(f(sim[m])) if len(sim[m]) else math.nan
            rows.append(
                {
                    "metric": m,
                    "stat": s,
                    "real_s": a,
                    "sim_s": b,
                    "rel_err": b / a - 1.0 if a > 0 else math.nan,
                }
            )
    return rows


def table_csv(rows: list[dict]) -> str:
    """The error table as CSV text."""
    lines = [",".join(COLUMNS)]
    lines += [
        f"{r['metric']},{r['stat']},{r['real_s']!r},{r['sim_s']!r},{r['rel_err']!r}" for r in rows
    ]
    return "\n".join(lines) + "\n"


def render(rows: list[dict], title: str) -> None:
    """Print the table with rich."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in ("metric", "stat", "real ms", "sim ms", "rel err"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["metric"],
            r["stat"],
            f"{r['real_s'] * 1e3:.2f}",
            f"{r['sim_s'] * 1e3:.2f}",
            f"{r['rel_err']:+.1%}",
        )
    Console().print(t)


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run ``fleetsim replay``; returns the exit code. Bad input raises UserError (exit 2)."""
    args = build_parser().parse_args(argv)
    for name in ("max_batch_size", "max_batched_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.profile is not None and not args.profile.is_file():
        raise UserError(
            f"--profile {args.profile}: no such file (fix: run `fleetsim calibrate` "
            "or leave --profile out to calibrate now)"
        )
    from fleetsim.results.output import RunOutput

    # the folder is checked and locked first; a file there that fleetsim did not write (a
    # user's own trace.csv) is never overwritten (results/output.py)
    outp = RunOutput(args.out, mode="add", names=REPLAY_FILES).open()
    try:
        rc = _main(args)
    except BaseException:
        outp.abort()
        raise
    outp.adopt(REPLAY_FILES)
    return rc


def _main(args) -> int:
    trace = parse_trace_arg(args.trace, args.seed)
    try:
        import torch
    except ImportError:
        raise UserError("fleetsim replay needs torch: pip install -e '.[calibrate]'") from None
    from fleetsim.calibrate.cli import _Usage, cpu_sized, resolve_model, return_freed_memory

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (fix: --device cpu)")
    dev_type = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    device = torch.device(dev_type, 0) if dev_type == "cuda" else torch.device("cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if dev_type == "cuda" else "fp32")
    if args.model is None:
        args.model = "llama-3.1-8b" if dev_type == "cuda" else "small-lm"
        if dev_type == "cpu":
            print("model: small-lm on a CPU (default; --model llama-3.1-8b for the 8B's layers)")
    if dev_type == "cpu":
        return_freed_memory()
    if args.threads is None and dev_type == "cpu":
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        spec = resolve_model(args.model, dtype)
    except _Usage as exc:
        raise UserError(str(exc)) from None
    # on a CPU: every layer of a small model, one layer of a large one (efficiencies transfer)
    small = spec.weight_bytes <= CPU_ALL_LAYERS_BYTES
    layers = args.layers or (spec.n_layers if dev_type == "cuda" or small else 1)
    if not 1 <= layers <= spec.n_layers:
        raise UserError(f"--layers {args.layers}: must be between 1 and {spec.n_layers}")
    spec = dataclasses.replace(spec, n_layers=layers, dtype=dtype)
    if dev_type == "cpu" and not args.full_vocab:
        spec = cpu_sized(spec)  # the output projection of a 128k vocabulary is 2.1 GB in fp32
    longest = max(p + o for _, p, o in trace)
    if longest > spec.max_context_tokens:
        raise UserError(
            f"--trace: a request of {longest} tokens exceeds {spec.name}'s context "
            f"({spec.max_context_tokens})"
        )
    return run_replay(args, trace, spec, device, torch)


REPLAY_FILES = (
    "trace.csv",
    "replay.csv",
    "replay.json",
    "requests.csv",
    "iterations.csv",
    "profile.json",
    "profile-engine.json",
    "profile-insample.json",
)
CPU_ALL_LAYERS_BYTES = 256e6  # on a CPU, a model this small is built whole (small-lm: 179 MB)
# a replay runs the real engine request by request: bounds of a generated trace
MAX_REPLAY_REQUESTS = 100_000
MAX_REPLAY_TOKENS = 1_000_000


def run_replay(args, trace, spec, device, torch) -> int:
    """Calibrate if needed, replay on the engine, simulate, compare, write."""
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve
    from fleetsim.device.profile import load_profile
    from fleetsim.results.output import write_text_atomic

    from .engine import TraceRequest

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    trace_path = out / "trace.csv"
    write_text_atomic(trace_csv(trace), trace_path)
    eng = _build_engine(args, trace, spec, device)  # first: an engine calibration times it
    profile_path = _profile_for_replay(args, eng, trace, spec, device, out)
    profile, _ = load_profile(profile_path)
    hours = max(1, math.ceil((trace[-1][0] + 600.0) / HOUR_S))
    d = sim_scenario(
        spec,
        profile_path.resolve(),
        trace_path.resolve(),
        max_batch_size=args.max_batch_size,
        max_batched_tokens=args.max_batched_tokens,
        catalog_gpu=profile.meta.get("catalog_gpu"),
        hours=hours,
    )
    rs = resolve(scenario_from_dict(d, "replay"), "")
    eng.kv_cap = rs.kv_capacity_tokens  # the simulator's KV budget, the same on both sides
    span = trace[-1][0] - trace[0][0]
    print(f"replaying {len(trace)} requests over {span:.1f} s on the real engine ...")
    real = eng.replay(
        [TraceRequest(a, p, o) for a, p, o in trace], max_context_tokens=spec.max_context_tokens
    )

    # the simulator, same trace
    t0 = time.perf_counter()
    res, sim_first, sim_finish = _simulate_trace(rs, len(trace))
    sim_wall = time.perf_counter() - t0
    arrival = np.array([a for a, _, _ in trace])
    outs = np.array([o for _, _, o in trace])
    real_first = np.array([r.first_token_s for r in real.requests])
    real_finish = np.array([r.finish_s for r in real.requests])
    rows = error_table(
        latency_arrays(arrival, real_first, real_finish, outs),
        latency_arrays(arrival, sim_first, sim_finish, outs),
    )
    lat = rs.latency_model()
    t_real = np.array([x.end_s - x.start_s for x in real.iterations])
    t_pred = np.array(
        [
            lat.iteration(
                x.prompt_tokens, x.pairs, x.n_prefill, x.n_decode, float(x.context_tokens)
            )[0]
            for x in real.iterations
        ]
    )
    facts = _facts(args, spec, device, torch, profile, profile_path, trace, real, res)
    facts["completed_sim"] = int(np.isfinite(sim_finish).sum())
    facts["iteration_time_ratio_sim_over_real"] = float(t_pred.sum() / t_real.sum())
    facts["iteration_median_rel_err"] = float(np.median(t_pred / t_real - 1.0))
    facts["sim_wall_s"] = sim_wall
    # diagnosis: the same simulation with the step-time model fitted to this replay's own
    # iterations (in-sample). What is left is the simulator's scheduling, not its device model.
    coef, s2_first, s2_finish = _insample_simulation(real, d, profile.mem_bytes, out, len(trace))
    rows_in = error_table(
        latency_arrays(arrival, real_first, real_finish, outs),
        latency_arrays(arrival, s2_first, s2_finish, outs),
    )
    facts["insample_profile"] = coef
    facts["table_insample"] = rows_in
    _write_replay_files(
        out, rows, facts, trace, real, (real_first, real_finish), (sim_first, sim_finish), t_pred
    )
    _print_tables(rows, rows_in, facts, len(trace), spec, device)
    print(f"written: {out}/replay.csv, replay.json, requests.csv, iterations.csv, trace.csv")
    return 0


def _facts(args, spec, device, torch, profile, profile_path, trace, real, res) -> dict:
    """What replay.json says besides the table (the simulated side's iteration figures are
    added by the caller)."""
    arrival0 = trace[0][0]
    real_finish = np.array([r.finish_s for r in real.requests])
    window = max(real_finish[np.isfinite(real_finish)].max() - arrival0, 1e-9)
    return {
        "command": "fleetsim replay " + " ".join(_argv_text(args)),
        "device": str(device),
        "model": spec.name,
        "layers": spec.n_layers,
        "dtype": spec.dtype,
        "profile": str(profile_path),
        "profile_kind": profile.kind,
        "requests": len(trace),
        "completed_real": int(np.isfinite(real_finish).sum()),
        "completed_sim": None,
        "busy_fraction_real": real.busy_s / window,
        "busy_fraction_sim": float(res.totals.gpu_busy_s) / window,
        "iteration_time_ratio_sim_over_real": None,
        "iteration_median_rel_err": None,
        "iterations_real": len(real.iterations),
        "iterations_sim": int(res.totals.iterations),
        "replay_wall_s": real.wall_s,
        "sim_wall_s": None,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "max_batch_size": args.max_batch_size,
        "max_batched_tokens": args.max_batched_tokens,
    }


def _print_tables(rows, rows_in, facts: dict, n: int, spec, device) -> None:
    """The two error tables and the iteration-time summary, on the terminal."""
    render(
        rows,
        f"replay: {n} requests, {spec.name} ({spec.n_layers} layers) on "
        f"{device}; busy {facts['busy_fraction_real']:.0%} real, "
        f"{facts['busy_fraction_sim']:.0%} simulated",
    )
    render(
        rows_in,
        "diagnosis: the simulator with a step-time model fitted to this replay's "
        "own iterations (in-sample)",
    )
    print(
        f"iteration times, simulated / real: {facts['iteration_time_ratio_sim_over_real']:.3f} "
        f"in sum, median relative error {facts['iteration_median_rel_err']:+.1%}"
    )


def _build_engine(args, trace, spec, device):
    """The real engine over the torch model, warmed up (KV budget set later, from the
    simulator's)."""
    from .engine import ServingEngine
    from .model import TorchTransformer

    model = TorchTransformer(
        spec,
        device=device,
        dtype=spec.dtype,
        seed=args.seed,
        embed_rows=4096 if device.type == "cpu" else None,
    )
    eng = ServingEngine(
        model,
        max_batch_size=args.max_batch_size,
        max_batched_tokens=args.max_batched_tokens,
        kv_budget_tokens=1 << 62,
        max_seq_tokens=max(p + o for _, p, o in trace) + 1,
    )
    eng.warmup()
    return eng


def _profile_for_replay(args, eng, trace, spec, device, out: Path) -> Path:
    """``--profile``, or one made here: a quick roofline on the trace's shapes plus the
    engine's overhead (``--calibration roofline``), or a linear fit to the engine's own
    iterations."""
    if args.profile is not None:
        return Path(args.profile)
    if args.calibration == "roofline":
        from .run import calibrate

        profile_path = out / "profile.json"
        print(
            f"calibrating {spec.name} ({spec.n_layers} layers) on {device} (quick roofline on "
            "the trace's shapes, then the engine's per-iteration overhead) ..."
        )
        grid = replay_grid(
            spec,
            trace,
            max_batch_size=args.max_batch_size,
            max_batched_tokens=args.max_batched_tokens,
        )
        calibrate(
            spec,
            device=device,
            out=profile_path,
            quick=True,
            seed=args.seed,
            budget_s=40.0,
            grid=grid,
            log=lambda s: None,
        )
        add_engine_overhead(eng, spec, profile_path, trace)
        return profile_path
    profile_path = out / "profile-engine.json"
    print(f"fitting a linear profile to the engine's own iterations on {device} ...")
    write_engine_profile(
        eng,
        spec,
        device,
        profile_path,
        max_prompt=max(p for _, p, _ in trace),
        max_context=max(p + o for _, p, o in trace),
    )
    return profile_path


def _simulate_trace(rs, n: int):
    """Simulate ``rs`` (a replayed trace of ``n`` requests): the result, and each request's
    first-token and finish times (NaN where it did not finish)."""
    from fleetsim.apps.simulate import simulate

    sink = _Sink()
    res = simulate(rs, request_sink=sink)
    first = np.array([sink.rows.get(i, (math.nan, math.nan, 0))[0] for i in range(n)])
    finish = np.array([sink.rows.get(i, (math.nan, math.nan, 0))[1] for i in range(n)])
    return res, first, finish


def _insample_simulation(real, d: dict, mem_bytes: float, out: Path, n: int):
    """The simulation again with a linear step-time model fitted to ``real``'s own iterations
    (written to ``profile-insample.json``): its coefficients, first-token and finish times."""
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve
    from fleetsim.results.output import write_text_atomic

    from .engine import fit_linear_rows

    it_rows = [
        {
            "n_prefill": x.n_prefill,
            "prompt_tokens": x.prompt_tokens,
            "n_decode": x.n_decode,
            "context_tokens": x.context_tokens,
            "time_s": x.end_s - x.start_s,
        }
        for x in real.iterations
    ]
    coef = fit_linear_rows(it_rows, relative=False)  # the mean, stalls included
    insample = out / "profile-insample.json"
    write_text_atomic(
        json.dumps(
            {
                "format": "fleetsim-profile/1",
                "kind": "linear",
                "name": "replay-insample",
                "mem_bytes": mem_bytes,
                **coef,
            }
        )
        + "\n",
        insample,
    )
    rs2 = resolve(
        scenario_from_dict(
            {**d, "hardware": {**d["hardware"], "profile": str(insample.resolve())}}, "replay"
        ),
        "",
    )
    _, first, finish = _simulate_trace(rs2, n)
    return coef, first, finish


def _write_replay_files(out: Path, rows, facts: dict, trace, real, real_t, sim_t, t_pred) -> None:
    """replay.csv, replay.json, requests.csv (both sides' times) and iterations.csv."""
    from fleetsim.results.output import write_text_atomic

    (real_first, real_finish), (sim_first, sim_finish) = real_t, sim_t
    write_text_atomic(table_csv(rows), out / "replay.csv")
    write_text_atomic(
        json.dumps({"table": rows, **facts}, indent=2, allow_nan=True) + "\n", out / "replay.json"
    )
    req = [
        "rid,arrival_s,prompt_tokens,output_tokens,real_first_token_s,real_finish_s,"
        "sim_first_token_s,sim_finish_s"
    ]
    req += [
        f"{i},{a!r},{p},{o},{float(real_first[i])!r},{float(real_finish[i])!r},"
        f"{float(sim_first[i])!r},{float(sim_finish[i])!r}"
        for i, (a, p, o) in enumerate(trace)
    ]
    write_text_atomic("\n".join(req) + "\n", out / "requests.csv")
    it = [
        f"{x.start_s!r},{x.end_s!r},{x.n_prefill},{x.prompt_tokens},{x.n_decode},"
        f"{x.context_tokens},{float(p)!r}"
        for x, p in zip(real.iterations, t_pred)
    ]
    write_text_atomic(
        "start_s,end_s,n_prefill,prompt_tokens,n_decode,context_tokens,"
        "sim_time_s\n" + "\n".join(it) + "\n",
        out / "iterations.csv",
    )


def replay_grid(spec, trace, *, max_batch_size: int, max_batched_tokens: int):
    """The roofline timing grid for a replay's shapes: decode at every batch size 1 .. max(8,
    ``max_batch_size``) (up to 16; powers of two above), at the trace's typical and longest
    context, and prefill of one prompt at the trace's prompt-length quantiles, so that
    ``compute_eff_table`` has a point at every small ``T`` the replay's iterations have (a CPU's
    small GEMMs are not monotonic in the rows: see docs/validation.md section 2)."""
    from .bench import GridSpec

    prompts = np.array([p for _, p, _ in trace])
    longest = max(p + o for _, p, o in trace)
    top = max(8, min(max_batch_size, 16))
    batches = list(range(1, top + 1))
    b = 32
    while b <= max_batch_size:
        batches.append(b)
        b *= 2
    typical = int(np.median([p + o / 2 for _, p, o in trace]))
    contexts = tuple(sorted({max(2, typical), max(2, longest)}))
    # one prompt per prefill (at ~1 arrival per iteration or less, a replay's prefill iterations
    # hold one prompt; two prompts of L and one of 2L have the same T but not the same time, and
    # a table mixing them is jagged), at the trace's prompt-length quantiles and its longest
    lens = sorted(
        {max(2, int(np.rint(q))) for q in np.percentile(prompts, (5, 20, 35, 50, 65, 80, 95))}
        | {int(prompts.max())}
    )
    return GridSpec(
        tuple(lens),
        (1,),
        max_batched_tokens,
        tuple(batches),
        contexts,
        max(contexts) * max(batches),
        (spec.n_layers,),
        warmup=2,
        repeats=9,
    )


def warmup_trace(
    trace, max_batch_size: int, max_batched_tokens: int, max_seq: int
) -> list[tuple[float, int, int]]:
    """A synthetic burst (not the replay's trace): ``2 x max_batch_size`` requests at t = 0 with
    the trace's median prompt and staggered outputs, so the engine runs decode steps of every
    batch size from ``max_batch_size`` down to 1, prefills, and mixed iterations."""
    med = int(np.median([p for _, p, _ in trace]))
    B = max_batch_size
    rows = []
    for k in range(2):
        for i in range(1, B + 1):
            o = 3 * i + 1
            p = max(2, min(med // (k + 1), max_seq - o - 2, max_batched_tokens - B))
            rows.append((0.0, p, o))
    return rows


def add_engine_overhead(eng, spec, profile_path: Path, trace, rounds: int = 6) -> dict:
    """Time the real engine loop on a synthetic warm-up burst (:func:`warmup_trace`, not the
    replay's trace), compare its iterations with the roofline profile at ``profile_path`` (fitted
    to bare forward passes), and add the median difference, the engine's per-iteration
    bookkeeping (admission, input ids, packing, sampling, token accounting), to the profile's
    ``overhead_s``; rewrites the profile atomically with a note. Returns the facts recorded."""
    from fleetsim.device.latency import LatencyModel
    from fleetsim.device.profile import load_profile
    from fleetsim.results.output import write_text_atomic

    from .engine import TraceRequest

    profile, _ = load_profile(profile_path)
    lat = LatencyModel(spec, profile, tp=1)
    burst = warmup_trace(trace, eng.max_batch, eng.max_tokens, eng.max_seq)
    diffs: list[float] = []
    classes: dict[str, list[float]] = {}
    for _ in range(rounds):
        res = eng.replay([TraceRequest(a, p, o) for a, p, o in burst])
        for x in res.iterations:
            t = x.end_s - x.start_s
            pred = lat.iteration(
                x.prompt_tokens, x.pairs, x.n_prefill, x.n_decode, float(x.context_tokens)
            )[0]
            diffs.append(t - pred)
            key = f"decode n={x.n_decode}" if x.n_prefill == 0 else "with prefill"
            classes.setdefault(key, []).append(t - pred)
    delta = float(np.median(diffs))
    from fleetsim.base import io as fio

    raw, _ = fio.load_json(profile_path, "profile")
    old = float(raw["overhead_s"])
    raw["overhead_s"] = max(0.0, old + delta)
    by_class = {k: round(float(np.median(v)) * 1e3, 3) for k, v in sorted(classes.items())}
    facts = {
        "bare_overhead_s": old,
        "engine_overhead_s": raw["overhead_s"] - old,
        "iterations": len(diffs),
        "median_ms_by_class": by_class,
    }
    raw["engine_overhead"] = facts
    raw.setdefault("notes", []).append(
        f"overhead_s = {old * 1e3:.3f} ms (fit to bare forward passes) + {delta * 1e3:.3f} ms: the "
        f"median excess of {len(diffs)} iterations of calibrate.engine's serving loop on a "
        "synthetic warm-up burst over this profile (engine bookkeeping); median excess by "
        "iteration kind, ms: " + ", ".join(f"{k}: {v}" for k, v in by_class.items())
    )
    write_text_atomic(json.dumps(raw, indent=2) + "\n", profile_path)
    print(
        f"engine per-iteration overhead: {delta * 1e3:+.3f} ms over the bare forward passes "
        f"({len(diffs)} warm-up iterations)"
    )
    return facts


def write_engine_profile(
    eng, spec, device, path: Path, *, max_prompt: int, max_context: int
) -> dict:
    """Fit the linear step-time model to ``eng``'s iterations and write it as a profile JSON."""
    import torch

    from fleetsim.device.latency import LinearProfile
    from fleetsim.device.profile import profile_to_dict
    from fleetsim.results.output import write_text_atomic

    from .engine import fit_linear_profile
    from .run import device_mem_bytes, device_name

    coef, rows = fit_linear_profile(eng, max_prompt=max_prompt, max_context=max_context)
    terms: dict[str, Any] = dict(coef)  # (Any: the fitted numbers, by name next to typed fields)
    errs = np.array([r["rel_err"] for r in rows])
    prof = LinearProfile(
        name=f"{device.type}-{spec.name}-l{spec.n_layers}-engine",
        mem_bytes=device_mem_bytes(device),
        **terms,
    )
    d = profile_to_dict(
        prof,
        device={
            "type": device.type,
            "name": device_name(device),
            "torch_version": torch.__version__,
            "dtype": spec.dtype,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
        catalog_gpu=None,
        model=spec.name,
        model_config=dataclasses.asdict(spec),
        fit={
            "method": "nnls, 1/t weights, on calibrate.engine iterations",
            "max_rel_err": float(np.abs(errs).max()),
            "rms_rel_err": float(np.sqrt(np.mean(errs**2))),
            "n_points": len(rows),
        },
        grid=rows,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_text_atomic(json.dumps(d, indent=2) + "\n", path)
    return d


def _argv_text(args) -> list[str]:
    parts = [f"--trace {args.trace}", f"--model {args.model}"]
    if args.profile is not None:
        parts.append(f"--profile {args.profile}")
    if args.profile is None:
        parts.append(f"--calibration {args.calibration}")
    parts += [
        f"--device {args.device}",
        f"--layers {args.layers}" if args.layers else "",
        f"--max-batch-size {args.max_batch_size}",
        f"--max-batched-tokens {args.max_batched_tokens}",
        f"--seed {args.seed}",
        f"--out {args.out}",
    ]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    return [p for p in parts if p]


if __name__ == "__main__":  # python -m calibrate.replay ... (same as fleetsim replay)
    import sys

    try:
        sys.exit(main())
    except UserError as exc:
        print(f"fleetsim replay: error: {exc}", file=sys.stderr)
        sys.exit(2)
