"""Fit the vllm-v1 serving stack's constants to ML.ENERGY's measured inter-token latency.

    python -m fleetsim.calibrate.stack [--data DIR] [--write]

The ML.ENERGY Benchmark v3 (vLLM 0.11.1, ``data/mlenergy-v3``; see its SOURCE.md) publishes
each configuration's median inter-token latency (ITL). A decode step of ``n`` sequences emits
one token per sequence, so wherever most steps are pure decode steps the median ITL *is* a
decode step's time at the running batch and its mean context. That holds when a request's
prefill is rare among the steps: new requests enter at ``avg_batch / avg_output_len`` per step
(one per finished request), so rows with that rate below ``MAX_PREFILLS_PER_STEP`` (0.2: at
least ~80% of steps are pure decode) are the fitting set; the others mix prefill chunks into
most steps, and only the end-to-end simulation (``fleetsim.calibrate.mlenergy``) compares
them.

The context of a running sequence, averaged over the steady state, is its prompt plus the
length-biased half of its output: ``P + E[L^2] / (2 E[L])``, with ``L`` from the
configuration's output-length histogram (bin centres) and ``P`` the task's prompt length
(``PROMPT_TOKENS``: not published; 250 tokens for chat, the estimate that the KV-limited rows
imply, issue 21).

Per GPU (H100, B200) two constants are fitted by grid search, minimising the mean squared
log error: ``overhead_s``, the CPU time per iteration left exposed by asynchronous scheduling,
and ``graph_floor_frac``, the fraction of the kernel model's per-kernel floors left under CUDA
graphs (:mod:`fleetsim.device.stack`). Leave-one-model-out: each model is predicted with the
constants fitted to the others; the catalog's constants are the fit to all of them.
Suspect rows (SOURCE.md's rules) are left out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from fleetsim.device import catalog
from fleetsim.device.latency import LatencyModel, RooflineProfile
from fleetsim.device.modelspec import ModelSpec
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import capture_max_tokens

MAX_PREFILLS_PER_STEP = 0.2
GPUS = {"H100": "h100-sxm", "B200": "b200"}
#: prompt tokens per task (not published; see the module docstring)
PROMPT_TOKENS = {"lm-arena-chat": 250, "gpqa": 250}
#: models the step-time model expresses, from their Hugging Face config.json
#: (num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
#: intermediate_size, vocab_size); head_dim = hidden / heads for both
MODELS = {
    "Qwen/Qwen3-8B": ModelSpec("qwen3-8b", 36, 4096, 32, 8, 12288, 151936),
    "Qwen/Qwen3-14B": ModelSpec("qwen3-14b", 40, 5120, 40, 8, 17408, 151936),
}
#: graph_floor_frac is NOT fitted: on single-GPU rows it only moves the ~3 ms constant of a
#: step between per-kernel floors (x layers) and the per-iteration overhead, and the two models
#: (36 and 40 layers) cannot tell them apart (rms relative error 0.020 at 0 vs 0.017 at 1 on
#: H100). Assumed (confidence L): a graph replay leaves about 1 us of the ~5-6 us per-kernel
#: floors that Vidur measured eagerly. It matters under tensor parallelism (the all-reduce
#: floors), where no expressible row exists yet.
FLOOR_GRID = (0.2,)
#: the KV cache's read efficiency, at most 0.95 of the data-sheet bandwidth (no kernel streams
#: HBM at its peak; the unconstrained fit runs to the edge, absorbing the per-sequence term)
KV_EFF_GRID = tuple(0.7 + i * 0.025 for i in range(0, 11))  # 0.7 to 0.95


@dataclass(frozen=True)
class Row:
    model_id: str
    task: str
    gpu: str  # catalog name
    max_num_seqs: int
    batch: int
    context_tokens: float
    itl_s: float


def default_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "mlenergy-v3"


def _length_biased_half(path: Path, index: int) -> float:
    """E[L^2] / (2 E[L]) of one configuration's output-length histogram (bin centres)."""
    d = json.loads(path.read_text())
    h = d["configurations"][index]["output_length_distribution"]
    edges, counts = h["bins"], h["counts"]
    mids = [(a + b) / 2.0 for a, b in itertools.pairwise(edges)]
    s1 = sum(c * x for c, x in zip(counts, mids, strict=True))
    s2 = sum(c * x * x for c, x in zip(counts, mids, strict=True))
    return s2 / (2.0 * s1)


def load_rows(data: Path) -> list[Row]:
    """The decode-dominated, non-suspect, single-GPU rows of expressible models."""
    out = []
    with (data / "configurations.csv").open() as fh:
        for r in csv.DictReader(fh):
            if (
                r["model_id"] not in MODELS
                or r["task"] not in PROMPT_TOKENS
                or r["num_gpus"] != "1"
                or r["suspect"] == "true"
                or r["gpu_model"] not in GPUS
            ):
                continue
            batch = float(r["avg_batch_size"])
            if batch / float(r["avg_output_len"]) >= MAX_PREFILLS_PER_STEP:
                continue
            ctx = PROMPT_TOKENS[r["task"]] + _length_biased_half(
                data / r["source_file"], int(r["config_index"])
            )
            out.append(
                Row(
                    r["model_id"],
                    r["task"],
                    GPUS[r["gpu_model"]],
                    int(r["max_num_seqs"]),
                    round(batch),
                    ctx,
                    float(r["itl_median_ms"]) / 1e3,
                )
            )
    return out


def stacked_profile(row: Row, c: dict) -> RooflineProfile:
    """The catalog profile of the row's GPU under vllm-v1 with constants ``c``."""
    prof = catalog_profile(row.gpu, catalog.gpu(row.gpu))
    return dataclasses.replace(
        prof,
        serving_stack="vllm-v1",
        overhead_s=c["overhead_s"],
        overhead_per_layer_s=0.0,
        graph_max_tokens=capture_max_tokens(row.max_num_seqs),
        graph_floor_frac=c["graph_floor_frac"],
        per_seq_s=c["per_seq_s"],
        memory_eff=c["kv_memory_eff"],
    )


def predict_s(row: Row, c: dict) -> float:
    """A decode step of the row's batch at its mean context under vllm-v1 with constants
    ``c``."""
    lm = LatencyModel(MODELS[row.model_id], stacked_profile(row, c), 1)
    return lm.decode_time(row.batch, round(row.context_tokens))


def _solve(rows: list[Row], g: dict) -> tuple[float, float, float]:
    """(overhead_s, per_seq_s, loss): least squares of the relative error of
    ``g + overhead + per_seq * batch`` with both terms >= 0."""
    best = (0.0, 0.0, math.inf)
    cands = []
    # unconstrained 2x2 normal equations in the weighted variables, then the two edges
    w = [1.0 / r.itl_s for r in rows]
    y = [(r.itl_s - g[r]) * wi for r, wi in zip(rows, w, strict=True)]
    x1 = w
    x2 = [r.batch * wi for r, wi in zip(rows, w, strict=True)]
    s11 = sum(a * a for a in x1)
    s12 = sum(a * b for a, b in zip(x1, x2, strict=True))
    s22 = sum(b * b for b in x2)
    t1 = sum(a * b for a, b in zip(x1, y, strict=True))
    t2 = sum(a * b for a, b in zip(x2, y, strict=True))
    det = s11 * s22 - s12 * s12
    if det > 0:
        cands.append(((t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det))
    cands.append((max(0.0, t1 / s11), 0.0))
    cands.append((0.0, max(0.0, t2 / s22)))
    for o, s in cands:
        if o < 0 or s < 0:
            continue
        loss = sum(((g[r] + o + s * r.batch) / r.itl_s - 1.0) ** 2 for r in rows)
        if loss < best[2]:
            best = (o, s, loss)
    return best


def fit_constants(rows: list[Row], grid: dict) -> dict:
    """The constants minimising the squared relative error over ``rows``; ``grid`` holds the
    kernel part of each row's step (overhead and per-sequence time 0) by (floor, kv_eff)."""
    best: dict = {"loss": math.inf}
    for (f, e), g in grid.items():
        o, s, loss = _solve(rows, g)
        if loss < best["loss"]:
            best = {
                "overhead_s": o,
                "per_seq_s": s,
                "graph_floor_frac": f,
                "kv_memory_eff": e,
                "loss": loss,
            }
    return best


def fit(rows: list[Row]) -> dict:
    """Per GPU: the constants fitted to all rows, and the leave-one-model-out errors."""
    out: dict = {}
    for gpu in sorted({r.gpu for r in rows}):
        rs = [r for r in rows if r.gpu == gpu]
        grid = {
            (f, e): {
                r: predict_s(
                    r,
                    {
                        "overhead_s": 0.0,
                        "per_seq_s": 0.0,
                        "graph_floor_frac": f,
                        "kv_memory_eff": e,
                    },
                )
                for r in rs
            }
            for f in FLOOR_GRID
            for e in KV_EFF_GRID
        }
        c_all = fit_constants(rs, grid)
        errs = []
        models = sorted({r.model_id for r in rs})
        for m in models:
            train = [r for r in rs if r.model_id != m]
            if not train:
                continue
            c = fit_constants(train, grid)
            errs += [predict_s(r, c) / r.itl_s - 1.0 for r in rs if r.model_id == m]
        out[gpu] = {
            **{k: v for k, v in c_all.items() if k != "loss"},
            "rows": len(rs),
            "models": models,
            "lomo": _summary(errs),
            "in_sample": _summary([predict_s(r, c_all) / r.itl_s - 1.0 for r in rs]),
            "eager": _summary([predict_eager(r) / r.itl_s - 1.0 for r in rs]),
        }
    return out


def predict_eager(row: Row) -> float:
    entry = catalog.gpu(row.gpu)
    lm = LatencyModel(MODELS[row.model_id], catalog_profile(row.gpu, entry), 1)
    return lm.decode_time(row.batch, round(row.context_tokens))


def _summary(errs: list[float]) -> dict:
    if not errs:
        return {}
    a = sorted(abs(e) for e in errs)
    return {
        "n": len(errs),
        "median_abs": median(a),
        "worst_abs": a[-1],
        "signed_median": median(errs),
    }


def stacks_toml(res: dict) -> str:
    """The catalog file of the fitted constants (``catalog/stacks.toml``)."""
    lines = [
        "# Serving-stack constants by stack and catalog GPU (fleetsim.device.stack). GENERATED by",
        "#   python -m fleetsim.calibrate.stack --write",
        "# from data/mlenergy-v3 (ML.ENERGY Benchmark v3, vLLM 0.11.1, Apache-2.0; its SOURCE.md):",
        "# decode-dominated, non-suspect single-GPU rows of Qwen3-8B and Qwen3-14B (lm-arena-chat,",
        "# gpqa), their median ITL against a decode step at the row's batch and mean context.",
        "# overhead_s, per_seq_s: fitted (least squares, relative error); kv_memory_eff:",
        "# fitted on a grid capped at 0.95; graph_floor_frac: assumed (calibrate/stack.py says",
        "# why), confidence L. GPUs without ML.ENERGY rows (A100, H200): derived = the H100's",
        "# constants (same host-side stack; H200 is an H100 with more HBM), confidence L.",
        "",
    ]
    h100 = res.get("h100-sxm")
    entries = dict(res)
    if h100 is not None:
        for g in ("a100-80gb", "h200"):
            entries.setdefault(g, {**h100, "derived_from": "h100-sxm"})
    for gpu in sorted(entries):
        v = entries[gpu]
        lines.append(f'["vllm-v1"."{gpu}"]')
        if "derived_from" in v:
            lines.append('provenance = "derived"')
            lines.append(f'source = "the {v["derived_from"]} fit (no ML.ENERGY rows for {gpu})"')
        else:
            lo, ins = v["lomo"], v["in_sample"]
            lines.append('provenance = "fitted"')
            lines.append(
                f'source = "fitted to {v["rows"]} ML.ENERGY v3 rows ({", ".join(v["models"])})"'
            )
            lines.append(
                f"lomo_median_err = {lo['median_abs']:.4f}  # leave-one-model-out |error|,"
                f" worst {lo['worst_abs']:.4f}, signed median {lo['signed_median']:+.4f}"
            )
            lines.append(
                f"fit_median_err = {ins['median_abs']:.4f}  # in sample, worst"
                f" {ins['worst_abs']:.4f}"
            )
        lines.append(f"overhead_s = {v['overhead_s']:.4e}  # exposed CPU time per iteration")
        lines.append(f"per_seq_s = {v['per_seq_s']:.4e}  # per sequence in the iteration")
        lines.append(f"graph_floor_frac = {v['graph_floor_frac']:g}  # assumed (L)")
        lines.append(f"kv_memory_eff = {v['kv_memory_eff']:.3f}  # KV read, fraction of peak")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--write", action="store_true", help="rewrite catalog/stacks.toml")
    a = ap.parse_args(argv)
    res = fit(load_rows(a.data))
    if a.write:
        path = Path(catalog.__file__).parent / "stacks.toml"
        path.write_text(stacks_toml(res))
        print(f"wrote {path}")
    for gpu, v in res.items():
        print(
            f"{gpu}: overhead_s={v['overhead_s']:.4g} per_seq_s={v['per_seq_s']:.4g}"
            f" graph_floor_frac={v['graph_floor_frac']:.3g} kv_memory_eff={v['kv_memory_eff']:.3g}"
            f" ({v['rows']} rows, {', '.join(v['models'])})"
        )
        for k in ("eager", "in_sample", "lomo"):
            s = v[k]
            if s:
                print(
                    f"  {k:9s} median |err| {s['median_abs']:.1%}  worst {s['worst_abs']:.1%}"
                    f"  signed median {s['signed_median']:+.1%}  (n={s['n']})"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
