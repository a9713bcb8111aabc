"""``fleetsim compare``: a finished run beside a measured vLLM benchmark result.

    fleetsim compare RUN_DIR VLLM_RESULT.json [--json]

``RUN_DIR`` is a ``fleetsim run`` output folder (its ``hourly.parquet``); ``VLLM_RESULT.json``
the file vLLM's ``benchmark_serving.py --save-result`` (or ``vllm bench serve``) writes. Every
throughput and latency key of the vLLM file that fleetsim also computes is printed side by side
with the relative error ``(fleetsim - vLLM) / vLLM``, in vLLM's units (ms, req/s, tokens/s);
the keys and their meaning are listed in ``simulator/results/vllm.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from fleetsim.base.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from fleetsim.apps.common import OneLineParser, description

    ap = OneLineParser(prog="fleetsim compare", description=description(__doc__))
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a fleetsim run's output folder")
    ap.add_argument(
        "vllm_result", metavar="VLLM_RESULT.json", help="vLLM benchmark_serving's result file"
    )
    ap.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document: {key: {fleetsim, vllm, relative_error}}",
    )
    return ap


def run_block(run_dir: str | Path) -> dict:
    """The vLLM-format block of a finished run (:mod:`fleetsim.results.vllm`), from its
    ``hourly.parquet`` metadata (runs written before the block was stored: rebuilt from the
    stored totals and latency, without the standard deviations)."""
    from fleetsim.base.io import clean
    from fleetsim.results.output import read_metadata
    from fleetsim.results.vllm import vllm_block

    path = Path(run_dir) / "hourly.parquet"
    if not path.is_file():
        from fleetsim.apps.common import not_a_run

        why = not_a_run(Path(run_dir))
        if Path(run_dir).is_file() and str(run_dir).endswith(".json"):
            why = (
                "a JSON file, not a run's folder (fix: the run's folder first, then the vLLM "
                "result: fleetsim compare RUN_DIR VLLM_RESULT.json)"
            )
        raise UserError(f"RUN_DIR = {clean(str(run_dir))!r}: {why}")
    md = read_metadata(path)
    if "fleetsim.vllm" in md:
        return json.loads(md["fleetsim.vllm"])
    try:
        totals = json.loads(md["fleetsim.totals"])
        latency = json.loads(md["fleetsim.latency"])
        hours = json.loads(md["fleetsim.config"])["simulation"]["hours"]
    except (KeyError, ValueError, TypeError):
        raise UserError(
            f"{clean(str(path))}: not written by fleetsim run (no totals in its metadata)"
        ) from None
    return vllm_block(totals, latency, int(hours))


def read_vllm(path: str | Path) -> dict:
    """The numeric keys of a vLLM result file."""
    from fleetsim.base.io import clean, parse_json, read_text

    doc = parse_json(read_text(path, "VLLM_RESULT"), f"VLLM_RESULT = {clean(str(path))!r}")
    if not isinstance(doc, dict):
        raise UserError(
            f"VLLM_RESULT = {clean(str(path))!r}: expected a JSON object (the file vLLM's "
            "benchmark_serving.py --save-result writes)"
        )
    return doc


def compare(ours: dict, theirs: dict) -> dict[str, dict]:
    """``{key: {"fleetsim", "vllm", "relative_error"}}`` for every key both documents can hold
    that the vLLM file has as a number, in vLLM's key order."""
    from fleetsim.results.vllm import COUNTS, latency_keys

    known = list(COUNTS) + latency_keys()
    extra = [k for k in theirs if k.endswith("_ms") and k not in known]
    out: dict[str, dict] = {}
    for k in known + extra:
        v = theirs.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        f = ours.get(k)
        rel = (
            (f - v) / v
            if isinstance(f, (int, float)) and v != 0 and math.isfinite(f) and math.isfinite(v)
            else None
        )
        out[k] = {"fleetsim": f, "vllm": v, "relative_error": rel}
    if not out:
        raise UserError(
            "VLLM_RESULT: none of benchmark_serving's keys (completed, request_throughput, "
            "mean_ttft_ms, p99_tpot_ms, ...) is in the file (fix: pass the JSON written by "
            "benchmark_serving.py --save-result)"
        )
    return out


def model_note(ours: dict, theirs: dict) -> str:
    """A line when the two files name different models (the last part of each ``model_id``,
    lower case, letters and digits only, neither containing the other: ``llama-3.1-70b``
    matches ``meta-llama/Llama-3.1-70B-Instruct``); '' when they agree or one is unnamed."""
    import re

    a, b = ours.get("model_id"), theirs.get("model_id")
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return ""

    def key(m: str) -> str:
        return re.sub(r"[^a-z0-9]", "", m.rstrip("/").rsplit("/", 1)[-1].lower())

    ka, kb = key(a), key(b)
    if not ka or not kb or ka in kb or kb in ka:
        return ""
    from fleetsim.base.io import clean

    return (
        f"note: different models: the run's {clean(a, 80)!r}, the vLLM file's {clean(b, 80)!r} "
        "(the comparison is of unlike things)"
    )


#: the keys that are totals over the benchmark's duration (they scale with it)
TOTALS = ("duration", "completed", "total_input_tokens", "total_output_tokens")


def duration_note(rows: dict[str, dict]) -> str:
    """A line when the run and the benchmark lasted differently (by more than 10%): their
    totals (:data:`TOTALS`) then differ by the durations, not by the model, and read as
    errors (a 3-hour run against a 1,000 s benchmark: completed +504%); '' otherwise."""
    d = rows.get("duration")
    if d is None or d["relative_error"] is None or abs(d["relative_error"]) <= 0.10:
        return ""
    shown = ", ".join(k for k in TOTALS if k in rows)
    return (
        f"note: the run lasted {d['fleetsim']:,.0f} s, the benchmark {d['vllm']:,.0f} s: "
        f"{shown} are totals over each duration and differ by it, not by the model; compare "
        "the throughputs and latencies"
    )


def _num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{v:,.0f}"
    return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.4g}"


def main(argv: Sequence[str] | None = None) -> int:
    from fleetsim.apps.common import console, print_json
    from fleetsim.base.io import term
    from fleetsim.base.tables import print_table

    args = build_parser().parse_args(argv)
    ours, theirs = run_block(args.run_dir), read_vllm(args.vllm_result)
    rows = compare(ours, theirs)
    note = model_note(ours, theirs)
    span = duration_note(rows)
    if args.json:
        for line in (note, span):
            if line:
                print(line, file=sys.stderr)
        print_json(rows)
        return 0
    c = console()
    print_table(
        c,
        f"{term(args.run_dir)} (fleetsim) vs {term(args.vllm_result)} (vLLM)",
        ("key", "fleetsim", "vLLM", "rel. error"),
        [
            (
                k,
                _num(r["fleetsim"]),
                _num(r["vllm"]),
                "n/a" if r["relative_error"] is None else f"{r['relative_error']:+.1%}",
            )
            for k, r in rows.items()
        ],
        left=("key",),
    )
    c.print(
        "units as vLLM's: *_ms in milliseconds, throughputs per second of the run's duration; "
        "rel. error = (fleetsim - vLLM) / vLLM",
        highlight=False,
    )
    for line in (note, span):
        if line:
            c.print(term(line, 600), highlight=False)
    return 0
