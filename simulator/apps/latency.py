"""``fleetsim latency``: the predicted time of one iteration and its parts.

    fleetsim latency --gpu G --model NAME|FILE.toml|config.json --tp N
                     (--batch B[,B...] --context C | --prefill-tokens P[,P...]) [--json]

``--batch B --context C`` is a decode step of B sequences each attending C tokens;
``--prefill-tokens P`` one prompt of P tokens. Under ``--dp D`` (D data-parallel engines of
``--tp`` GPUs each: one replica) ``--batch B`` is the replica's batch, all D engines together:
each runs ``ceil(B / D)`` sequences (the fullest one's attention is timed; vLLM pads every
engine's batch to the largest before the forward pass), and the printed figures are the
replica's: ``tokens`` and ``kv_tokens_read`` its B and B x C, ``flops`` and ``bytes`` those of
all D engines (D x ``ceil(B / D)`` tokens, each engine reading the weights it holds),
``total_s`` one iteration of the engines in step. A prompt runs on one engine, the
others padded to its tokens. The device is the catalog GPU's analytic profile
(the kernel model fitted to measured operator times where the GPU has one) as
``--serving-stack`` runs it (:mod:`fleetsim.device.stack`). ``overhead_s`` is the fixed CPU-side
time per iteration that kernel profiles do not see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fleetsim.base.errors import UserError

if TYPE_CHECKING:
    from fleetsim.device.modelspec import ModelSpec

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
            f"{flag} = {clean(text, 60)!r}: expected positive integers separated by commas "
            "(fix: e.g. 1,8,64,512)"
        )
    big = max(vals)
    if big > hi:
        raise UserError(f"{flag} = {big:,}: above {hi:,} ({why}; fix: a smaller value)")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from fleetsim.apps.common import OneLineParser

    p = OneLineParser(
        prog="fleetsim latency",
        description="Predicted time of one engine iteration on a catalog GPU, and its parts.",
    )
    p.add_argument("--gpu", required=True, help="catalog GPU, e.g. h100-sxm")
    p.add_argument(
        "--model",
        required=True,
        help="catalog model name, a TOML file of [model] fields, or a Hugging Face config.json "
        "(or its folder)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism (default 1)")
    p.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data-parallel attention engines of --tp GPUs each (vLLM --data-parallel-size)",
    )
    p.add_argument(
        "--expert-parallel",
        action="store_true",
        help="experts whole on the tp x dp GPUs (vLLM --enable-expert-parallel)",
    )
    p.add_argument("--dtype", default=None, help="weight dtype (default: the model's, or bf16)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--batch",
        help="decode: sequences per step, comma-separated list; under --dp the replica's (all "
        "its engines together, ceil(B / dp) on each, as vLLM's DP load balancer spreads them)",
    )
    g.add_argument(
        "--prefill-tokens",
        help="prefill: prompt tokens, comma-separated list (one prompt; under --dp on one "
        "engine, the others padded to it)",
    )
    p.add_argument("--context", type=int, default=None, help="decode: context per sequence")
    p.add_argument(
        "--serving-stack",
        choices=("vllm-v1", "eager"),
        default="vllm-v1",
        help="the serving stack the step times represent (default vllm-v1, as fleet.serving_stack;"
        " its CUDA graphs are sized for the default max_num_seqs, 256)",
    )
    p.add_argument(
        "--fp8-moe-kernel",
        choices=("triton", "flashinfer-trtllm"),
        default="triton",
        help="the fused-MoE kernel fp8 block-quantised (or nvfp4) experts run (default triton,"
        " as fleet.fp8_moe_kernel; flashinfer-trtllm: B200 only)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return p


def _model(arg: str, dtype: str | None) -> ModelSpec:
    """The model ``--model`` names."""
    return _model_and_source(arg, dtype)[0]


def _model_and_source(arg: str, dtype: str | None) -> tuple[ModelSpec, str]:
    """The model ``--model`` names and the header's note on its source
    (:func:`fleetsim.config.aggregated.model_source_note`)."""
    from fleetsim.base import io
    from fleetsim.base.errors import ScenarioError
    from fleetsim.config.aggregated import model_source_note, model_spec
    from fleetsim.config.hf import hf_id_error, repo_config_path
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.device import catalog

    path = Path(arg).expanduser()  # (a quoted ~, as a scenario's [model] config reads it)
    if path.is_dir():  # a model folder (a Hugging Face snapshot, or the cache's repository)
        from fleetsim.config.hf import config_in_folder, snapshots_without_ref

        found = config_in_folder(path)
        if found is None and (n := snapshots_without_ref(path)):
            raise UserError(
                f"--model = {io.clean(arg)!r}: a Hugging Face cache folder with {n} snapshots "
                "and no refs/main naming one of them (fix: the snapshot's folder, "
                "snapshots/HASH, or its config.json)"
            )
        if found is None:
            raise UserError(
                f"--model = {io.clean(arg)!r}: a folder with no config.json (fix: the path of "
                "a config.json, of the folder that holds it, or of a TOML file of [model] "
                "fields)"
            )
        path = found
    is_file = os.path.lexists(path)  # (a link, a broken one or a loop included)
    if path.suffix == ".json" and not is_file:  # (the reader's fix names a scenario file)
        raise UserError(
            f"--model = {io.clean(arg)!r}: no such file (fix: the path of a config.json, of "
            "the folder that holds it, or of a TOML file of [model] fields)"
        )
    if path.suffix == ".json":  # a Hugging Face config.json
        section: dict = {"config": str(path.absolute())}
    elif arg.endswith(".toml") or is_file:
        where = f"--model {io.clean(arg)!r}"
        data = io.parse_toml(io.read_text(path, "--model"), where)
        model = data.get("model", data)
        if not isinstance(model, dict):
            raise UserError(f"{where}: [model] must be a table of model fields")
        section = dict(model)
        if "config" not in section:  # (a config.json names its model: _name_or_path, ...)
            section.setdefault("name", path.stem)
    elif arg in catalog.models() or repo_config_path(arg) is not None:
        # (a catalog name, or a Hugging Face id whose config.json the checkout ships:
        # model_spec reads that copy, aggregated.checkout_config)
        section = {"name": arg}
    else:
        err = hf_id_error(arg, "--model")
        if err is not None:
            raise err
        if "/" in arg or os.sep in arg or arg.startswith((".", "~")):  # a path, not a name
            raise UserError(
                f"--model = {io.clean(arg)!r}: no such file or folder (fix: the path of a "
                "config.json, of its folder or of a TOML file of [model] fields, or a catalog "
                f"name: {', '.join(catalog.models())})"
            )
        section = {"name": arg}  # model_spec names the catalog and suggests a close name
    if dtype:
        from typing import get_args

        from fleetsim.config.schema import DType

        if dtype not in get_args(DType):  # (else refused as the model file's model.dtype)
            raise UserError(
                f"--dtype = {io.clean(dtype, 40)!r}: not a weight precision (fix: use one of "
                f"{', '.join(get_args(DType))})"
            )
        section["dtype"] = dtype
    sc = scenario_from_dict({"model": section}, str(path) if path.exists() else "--model")
    try:
        spec = model_spec(sc, str(path) if path.exists() else "")
    except ScenarioError as exc:
        if exc.field != "model.name" or is_file:
            raise
        # a name that is no model: the flag's, and its fix this command's (no inline fields)
        fix = exc.fix.replace("; or give ", "; or a TOML file of [model] fields: ")
        raise ScenarioError("--model", exc.value, exc.problem, fix) from None
    return spec, model_source_note(sc.model, str(path) if path.exists() else "", spec)


def rows(args: argparse.Namespace) -> list[dict]:
    from fleetsim.base.errors import ScenarioError
    from fleetsim.device import catalog
    from fleetsim.device.latency import LatencyModel, RooflineProfile, compute_peak
    from fleetsim.device.moe import (
        layout_problem,
        mxfp4_moe_path,
        nvfp4_moe_path,
        replica_weight_bytes,
    )
    from fleetsim.device.profile import catalog_profile

    model, source = _model_and_source(args.model, args.dtype)
    if args.tp < 1:
        raise UserError(f"--tp = {args.tp}: must be a positive integer (fix: use 1 or more)")
    problem = model.tp_problem(args.tp)
    if problem:
        raise ScenarioError("--tp", args.tp, problem, model.tp_fix(args.tp))
    split = layout_problem(model, args.tp, args.dp, args.expert_parallel)
    if split:
        flag = {"tensor_parallel": "--tp", "data_parallel": "--dp"}.get(
            split[0], "--expert-parallel"
        )
        # (the problem and the fix name the scenario's fields: here they are flags)
        flags = (
            ("set expert_parallel = true", "add --expert-parallel"),
            ("drop expert_parallel", "drop --expert-parallel"),
            ("tensor_parallel", "--tp"),
            ("data_parallel", "--dp"),
        )
        problem, fix = split[2], split[3]
        for field, flag_name in flags:
            problem, fix = problem.replace(field, flag_name), fix.replace(field, flag_name)
        raise ScenarioError(flag, split[1], problem, fix)
    from fleetsim.config.schema import FleetSection
    from fleetsim.device.stack import apply_stack

    profile = apply_stack(
        catalog_profile(args.gpu, catalog.gpu(args.gpu, "--gpu")),
        getattr(args, "serving_stack", "vllm-v1"),
        args.gpu,
        FleetSection().max_batch_size,
    )
    kernel = getattr(args, "fp8_moe_kernel", "triton")
    stack = getattr(args, "serving_stack", "vllm-v1")
    fp8_block = bool(
        model.n_moe_layers and (model.expert_dtype or model.dtype) == "fp8" and model.fp8_block
    )
    nvfp4_experts = bool(model.n_moe_layers and (model.expert_dtype or model.dtype) == "nvfp4")
    if kernel != "triton":
        from fleetsim.config.aggregated import _with_fp8_moe_kernel, check_fp8_moe_kernel

        check_fp8_moe_kernel(kernel, model, "--fp8-moe-kernel", "")
        profile = _with_fp8_moe_kernel(profile, kernel, args.gpu, "", flags=True)
    need = replica_weight_bytes(model, max(args.dp, 1), args.tp)
    if need >= args.tp * max(args.dp, 1) * profile.mem_bytes:
        # the smallest degree that holds them and that vLLM's head split accepts (raising
        # --tp to a degree that ModelSpec.tp_problem refuses, 16 for Llama 4 Maverick's 40
        # heads, only moves the error)
        # (and the experts' split: 40 for Maverick's 8,192-wide experts was suggested, then
        # refused by layout_problem)
        fits = [
            k
            for k in range(args.tp + 1, 65)
            if layout_problem(model, k, args.dp, args.expert_parallel) is None
            and replica_weight_bytes(model, max(args.dp, 1), k)
            < k * max(args.dp, 1) * profile.mem_bytes
        ]
        tp_fix = f"--tp {fits[0]} (the smallest degree that holds them), " if fits else ""
        eps = [
            d
            for d in range(max(args.dp, 1) + 1, 65)
            if not fits
            and model.n_moe_layers
            and layout_problem(model, args.tp, d, True) is None
            and replica_weight_bytes(model, d, args.tp) < args.tp * d * profile.mem_bytes
        ]
        if eps:
            tp_fix = f"--dp {eps[0]} --expert-parallel (the experts over {args.tp * eps[0]} GPUs), "
        raise UserError(
            f"--tp = {args.tp}: {model.name} weights ({need / 1e9:.1f} GB) do not "
            f"fit in {args.tp * max(args.dp, 1)} x {profile.mem_bytes / 1e9:.1f} GB (GB = 10^9 "
            f"bytes, as validate) (fix: {tp_fix}a larger --gpu or a smaller --dtype)"
        )
    lat = LatencyModel(model, profile, args.tp, dp=args.dp, expert_parallel=args.expert_parallel)
    _, weight_only = compute_peak(profile, model.dtype)
    e_note = {"mxfp4": mxfp4_moe_path, "nvfp4": nvfp4_moe_path}.get(str(model.expert_dtype))
    if model.n_experts <= 1:
        e_note = None
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
        # (the keys the step reads, per layer kind: LatencyModel.decode_ctx)
        windows = model.sliding_window_tokens > 0
        cases = [
            (b, 0, lat.decode_ctx(b, args.context) if windows else b * args.context)
            for b in batches
        ]
    else:
        if args.context is not None:
            raise UserError("--context goes with --batch, not --prefill-tokens")
        prompts = _ints(args.prefill_tokens, "--prefill-tokens", ctx_max, why)
        cases = [(0, p, 0) for p in prompts]
    p16 = args.tp * profile.peak_flops  # attention runs at the 16-bit peak
    p_lin = args.tp * compute_peak(profile, model.dtype)[0]
    for b, p, ctx in cases:
        if b:
            total, flops, nbytes = lat.iteration(0, 0.0, 0, b, float(ctx))
            tokens, seqs, pairs = b, b, 0.0
        else:
            pairs = model.attended_pairs(p)  # (p^2 without sliding windows)
            total, flops, nbytes = lat.iteration(p, pairs, 1, 0, 0.0)
            tokens, seqs = p, 1
        parts = lat.breakdown(p, float(pairs), seqs if not b else 0, b, float(ctx))
        # the exposed CPU time: the per-iteration overhead and, for an eager MoE iteration
        # below its host floor (device/stack.py) or a hybrid's prompt step below its Mamba-2
        # prefill floor, the time the GPU waits for the host
        overhead = lat._oh + parts.get("eager_host", 0.0) + parts.get("prefill_host", 0.0)
        if lat._kern is not None:
            comm = lat.linear_parts(tokens, seqs)[2]
        else:
            comm = lat._comm_a + lat._comm_b * tokens
        # compute: the iteration's FLOPs at the achievable peak (compute_eff_max x the peak of
        # the weights' precision for the linear layers, of 16-bit for attention), shown whether
        # or not it is the bound; memory: the rest of the kernel time (HBM traffic beyond the
        # compute, kernel floors). They add up with the all-reduces and the overhead to the
        # model's total.
        eff = profile.compute_eff_max if isinstance(profile, RooflineProfile) else 1.0
        att_flops = (pairs + ctx) * model.attn_flops_per_pair
        t_c = (flops - att_flops) / (p_lin * eff) + att_flops / (p16 * eff)
        busy = max(total - overhead - comm, 0.0)
        comp = min(t_c, busy)
        mem = busy - comp
        bound = "compute" if t_c >= nbytes / lat._rm else "memory"
        out.append(
            {
                "gpu": args.gpu,
                "model": model.name,
                # where the architecture came from, when the header should say (a Hugging
                # Face id read from data/models; GPTQ/AWQ int8 weights' approximation)
                "source": source,
                "dtype": model.dtype,
                "weights": model.weights_label,
                "kv_dtype": model.kv_dtype_resolved,
                "weight_only_quantization": weight_only,
                # how the experts' own precision is computed, when it differs (mxfp4 and
                # nvfp4 experts: vLLM's kernel on this GPU, the peak they run at; device/moe.py)
                "experts_note": e_note(args.gpu) if e_note else "",
                # the fused-MoE kernel of fp8 block-quantised or nvfp4 experts (None for other
                # models: it times nothing else) and the serving stack, as a scenario's
                # fleet.fp8_moe_kernel and fleet.serving_stack (a run summary names both)
                "fp8_moe_kernel": kernel if (fp8_block or nvfp4_experts) else None,
                "serving_stack": stack,
                "tp": args.tp,
                "phase": "decode" if b else "prefill",
                "tokens": tokens,
                "context_tokens": args.context if b else 0,  # per sequence
                # all sequences: batch x context (a window layer's keys count min(c, W) / c)
                "kv_tokens_read": ctx,
                "bound": bound,
                "total_s": total,
                "compute_s": comp,
                "memory_s": mem,
                "comm_s": comm,
                "overhead_s": overhead,
                "flops": flops,
                "bytes": nbytes,
                "dp": args.dp,
                "expert_parallel": args.expert_parallel,
                # the named parts of total_s (LatencyModel.breakdown), seconds
                "parts_s": parts,
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = rows(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    from fleetsim.apps.common import console
    from fleetsim.base.tables import print_table

    r0 = res[0]
    wq = (
        " (weight-only: no native compute in that precision)"
        if r0["weight_only_quantization"]
        else ""
    )
    c = console()
    # the GPUs of one replica: tp x dp (vLLM's data-parallel engines), experts over all
    # of them with --expert-parallel
    dp = r0["dp"]
    layout = f" (TP{r0['tp']} x DP{dp}" if dp > 1 else ""
    if r0["expert_parallel"]:
        layout = (layout or f" (TP{r0['tp']}") + f", EP{r0['tp'] * dp}"
    layout += ")" if layout else ""
    note = f"; {r0['source']}" if r0["source"] else ""
    # the note is the weights' precision's ("fp8 weights (weight-only ...), embedding bf16"):
    # after the parts' list it read as the embedding's
    head, sep, rest = str(r0["weights"]).partition(",")
    c.print(
        f"{r0['model']} ({head}{wq}{sep}{rest}, kv {r0['kv_dtype']}) on {r0['tp'] * dp} x "
        f"{r0['gpu']}{layout}{note}",
        highlight=False,
        markup=False,
    )
    if r0["experts_note"]:
        c.print(r0["experts_note"], highlight=False, markup=False)
    if r0["fp8_moe_kernel"] or r0["serving_stack"] != "vllm-v1":
        # which kernel and stack the figures are of: a scenario's fleet.fp8_moe_kernel (the
        # B200 R1 scenario's flashinfer-trtllm) is not this command's default (triton), and
        # the two differ by a third of a decode step
        said = [f"serving stack {r0['serving_stack']}"]
        if r0["fp8_moe_kernel"]:
            said.append(
                f"fp8 MoE kernel {r0['fp8_moe_kernel']} (--fp8-moe-kernel, as a scenario's "
                "fleet.fp8_moe_kernel: triton or flashinfer-trtllm)"
            )
        c.print("; ".join(said), highlight=False, markup=False)
    # the parts: every *_s field the model returns besides the total, in its order (parts that
    # a model adds appear without an edit here)
    parts = [k for k in r0 if k.endswith("_s") and k not in ("total_s", "parts_s")]
    headers = ["phase", "tokens", "context", "total ms"]
    headers += [k[:-2].replace("_", " ") + " ms" for k in parts] + ["bound"]
    cells = [
        [r["phase"], f"{r['tokens']:,}", f"{r['context_tokens']:,}", f"{r['total_s'] * 1e3:.3f}"]
        + [f"{r[k] * 1e3:.3f}" for k in parts]
        + [r["bound"]]
        for r in res
    ]
    print_table(c, None, headers, cells, left=("phase", "bound"))
    c.print(
        "context: tokens each sequence attends; compute: the FLOPs at the achievable peak (shown "
        "even when memory bounds the step); memory: the rest of the kernel time; bound: the "
        "larger of the FLOP and byte times"
        + (
            f"; DP{dp}: the figures are the replica's (a decode's tokens: its sequences, "
            f"all {dp} engines together, ceil(tokens / {dp}) on each; a prompt on one engine, "
            "the others padded to it), the time one iteration of the engines in step"
            if dp > 1
            else ""
        ),
        highlight=False,
    )
    # the named parts of the layer stack (attention, dense MLP, MoE dispatch / grouped GEMM /
    # combine, all-reduce, overhead: LatencyModel.breakdown), those that any row uses
    # (in order of first appearance: the eager host floor's part only in the rows it binds)
    order = list(dict.fromkeys(k for r in res for k in r["parts_s"]))
    names = [k for k in order if any(r["parts_s"].get(k, 0.0) > 0.0 for r in res)]
    print_table(
        c,
        "parts (ms)",
        ["tokens", *names],
        [
            [f"{r['tokens']:,}"] + [f"{r['parts_s'].get(k, 0.0) * 1e3:.3f}" for k in names]
            for r in res
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
