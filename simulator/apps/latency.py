"""``fleetsim latency``: the predicted time of one iteration and its parts.

    fleetsim latency --gpu G --model NAME|FILE.toml --tp N
                     (--batch B[,B...] --context C | --prefill-tokens P[,P...]) [--json]

``--batch B --context C`` is a decode step of B sequences each attending C tokens;
``--prefill-tokens P`` one prompt of P tokens. The device is the catalog GPU's analytic profile
(the kernel model fitted to measured operator times where the GPU has one). ``overhead_s`` is the
fixed CPU-side time per iteration that kernel profiles do not see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fleetsim.base.errors import UserError

MAX_BATCH = 1_000_000  # sequences in one decode step (vLLM's max_num_seqs is 256-1024)


def _ints(text: str, flag: str, hi: int, why: str) -> list[int]:
    """Comma-separated whole numbers in 1..``hi`` (``why`` says what bounds them)."""
    from fleetsim.base.io import clean

    try:
        vals = [int(x) for x in text.split(",") if x.strip()] if len(text) < 10_000 else []
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UserError(
            f"{flag} = {clean(text, 60)!r}: expected positive integers separated by commas"
        )
    big = max(vals)
    if big > hi:
        raise UserError(f"{flag} = {big:,}: above {hi:,} ({why}; fix: a smaller value)")
    return vals


class _OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line (the flag and the problem), not the usage block."""

    def error(self, message: str) -> NoReturn:
        from fleetsim.base.io import clean

        self.exit(2, f"{self.prog}: error: {clean(message, 300)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="fleetsim latency",
        description="Predicted time of one engine iteration on a catalog GPU, and its parts.",
    )
    p.add_argument("--gpu", required=True, help="catalog GPU, e.g. h100-sxm")
    p.add_argument(
        "--model", required=True, help="catalog model name, or a TOML file of [model] fields"
    )
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism (default 1)")
    p.add_argument("--dtype", default=None, help="weight dtype (default: the model's, or bf16)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--batch", help="decode: sequences per step, comma-separated list")
    g.add_argument("--prefill-tokens", help="prefill: prompt tokens, comma-separated list")
    p.add_argument("--context", type=int, default=None, help="decode: context per sequence")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return p


def _model(arg: str, dtype: str | None):
    from fleetsim.base import io
    from fleetsim.config.aggregated import model_spec
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.device import catalog

    path = Path(arg)
    is_file = os.path.lexists(path)  # (a link, a broken one or a loop included)
    if arg.endswith(".toml") or is_file:
        where = f"--model {io.clean(arg)!r}"
        data = io.parse_toml(io.read_text(path, "--model"), where)
        model = data.get("model", data)
        if not isinstance(model, dict):
            raise UserError(f"{where}: [model] must be a table of model fields")
        section = dict(model)
        section.setdefault("name", path.stem)
    elif arg in catalog.models():
        section = {"name": arg}
    else:
        section = {"name": arg}  # model_spec names the catalog and suggests a close name
    if dtype:
        section["dtype"] = dtype
    sc = scenario_from_dict({"model": section}, str(path) if path.exists() else "--model")
    return model_spec(sc, str(path) if path.exists() else "")


def rows(args: argparse.Namespace) -> list[dict]:
    from fleetsim.base.errors import ScenarioError
    from fleetsim.device import catalog
    from fleetsim.device.latency import LatencyModel, compute_peak
    from fleetsim.device.profile import catalog_profile

    model = _model(args.model, args.dtype)
    if args.tp < 1:
        raise UserError(f"--tp = {args.tp}: must be a positive integer")
    problem = model.tp_problem(args.tp)
    if problem:
        raise ScenarioError("--tp", args.tp, problem, model.tp_fix(args.tp))
    profile = catalog_profile(args.gpu, catalog.gpu(args.gpu, "--gpu"))
    if model.weight_bytes >= args.tp * profile.mem_bytes:
        raise UserError(
            f"--tp = {args.tp}: {model.name} weights ({model.weight_bytes / 1e9:.1f} GB) do not "
            f"fit in {args.tp} x {profile.mem_bytes / 2**30:.1f} GiB; raise --tp"
        )
    lat = LatencyModel(model, profile, args.tp)
    _, weight_only = compute_peak(profile, model.dtype)
    out = []
    ctx_max = model.max_context_tokens
    why = f"{model.name}'s context is {ctx_max:,} tokens"
    if args.batch is not None:
        if args.context is None:
            raise UserError("--batch needs --context C (tokens each sequence attends, >= 1)")
        if not 1 <= args.context <= ctx_max:
            raise UserError(
                f"--context = {args.context:,}: tokens each sequence attends must be in "
                f"1..{ctx_max:,} ({why}; fix: a value in that range)"
            )
        batches = _ints(args.batch, "--batch", MAX_BATCH, "sequences in one decode step")
        cases = [(b, 0, b * args.context) for b in batches]
    else:
        if args.context is not None:
            raise UserError("--context goes with --batch, not --prefill-tokens")
        prompts = _ints(args.prefill_tokens, "--prefill-tokens", ctx_max, why)
        cases = [(0, p, 0) for p in prompts]
    for b, p, ctx in cases:
        if b:
            total, flops, nbytes = lat.iteration(0, 0.0, 0, b, float(ctx))
            tokens, seqs, pairs = b, b, 0.0
        else:
            total, flops, nbytes = lat.iteration(p, float(p * p), 1, 0, 0.0)
            tokens, seqs, pairs = p, 1, float(p * p)
        overhead = lat._oh
        if lat._kern is not None:
            comp, mem, comm = lat.linear_parts(tokens, seqs)
            att = (pairs + ctx) * lat._att_c
            kv = ctx * lat._att_m + tokens * lat._att_m
            if att > ctx * lat._att_m:
                comp += att
                mem += tokens * lat._att_m
            else:
                mem += kv
        else:  # a roofline without a kernel model: the bound that wins, and the ring
            comm = lat._comm_a + lat._comm_b * tokens
            rest = total - overhead - comm
            comp, mem = (rest, 0.0) if flops / lat._rc_peak > nbytes / lat._rm else (0.0, rest)
        out.append(
            {
                "gpu": args.gpu,
                "model": model.name,
                "dtype": model.dtype,
                "kv_dtype": model.kv_dtype_resolved,
                "weight_only_quantization": weight_only,
                "tp": args.tp,
                "phase": "decode" if b else "prefill",
                "tokens": tokens,
                "context_tokens": ctx,
                "total_s": total,
                "compute_s": comp,
                "memory_s": mem,
                "comm_s": comm,
                "overhead_s": overhead,
                "flops": flops,
                "bytes": nbytes,
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = rows(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    r0 = res[0]
    wq = (
        " (weight-only: no native compute in that precision)"
        if r0["weight_only_quantization"]
        else ""
    )
    print(
        f"{r0['model']} ({r0['dtype']} weights{wq}, kv {r0['kv_dtype']}) on {r0['tp']} x "
        f"{r0['gpu']}"
    )
    print(
        f"{'phase':8} {'tokens':>7} {'context':>9} {'total ms':>9} {'compute':>8} "
        f"{'memory':>8} {'comm':>8} {'overhead':>8}"
    )
    for r in res:
        print(
            f"{r['phase']:8} {r['tokens']:7d} {r['context_tokens']:9d} {r['total_s'] * 1e3:9.3f} "
            f"{r['compute_s'] * 1e3:8.3f} {r['memory_s'] * 1e3:8.3f} {r['comm_s'] * 1e3:8.3f} "
            f"{r['overhead_s'] * 1e3:8.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
