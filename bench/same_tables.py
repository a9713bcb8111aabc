"""Check that every scenario in scenarios/ gives the same hourly table, bit for bit.

Used around refactors that must not change results:

    python bench/same_tables.py save /tmp/before      # on the old code
    python bench/same_tables.py compare /tmp/before   # on the new code

Each scenario runs through the installed ``fleetsim`` command (its default seed, its own
hours); the comparison is of the Parquet tables' data (the key-value metadata carries the
version and paths, which may differ). With ``--requests`` (give it to both ``save`` and
``compare``) each run also writes ``requests.parquet`` and that per-request table is compared
too.
With ``--variants`` the short variants of ``VARIANTS`` run as well (routers, tight KV with
preemptions, block sizes, watermark, no chunking, the per-iteration engine, reserve, autoscaled,
disaggregated pools, Mooncake prefix caching under three routers); every Parquet table a run
writes (hourly, per-request, per-pool) is compared.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

# A replica that runs short of KV: Llama-3.1-70B TP4 H100, 12k-token prompts, 45,000 requests a
# day, 2 hours (thousands of preemptions with paged KV; the case of issue 12's closing note).
_TIGHT = (
    'model.name="llama-3.1-70b"',
    'hardware.gpu="h100-sxm"',
    "fleet.tensor_parallel=4",
    "simulation.hours=2",
    'traffic.diurnal="flat"',
    "fleet.replicas=1",
    "fleet.pods=1",
    "traffic.requests_per_day=45000",
    "traffic.prompt={dist='lognormal',median=12000,sigma=0.6,min=100,max=32000}",
    "traffic.output={dist='lognormal',median=300,sigma=0.6,min=7,max=1000}",
)
_H2 = ("simulation.hours=2",)
_H1 = ("simulation.hours=1",)
# name -> (scenario, --set values)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "v-central-queue": ("default", (*_H2, 'fleet.router="central_queue"')),
    "v-round-robin": ("default", (*_H2, 'fleet.router="round_robin"')),
    "v-random": ("default", (*_H2, 'fleet.router="random"')),
    "v-tight-kv": ("default", _TIGHT),
    "v-tight-kv-watermark": ("default", (*_TIGHT, "fleet.kv_watermark_fraction=0.05")),
    "v-tight-kv-nochunk": (
        "default",
        # (the longest recompute of a preempted request: 32,000 + 1,000 - 1 tokens)
        (*_TIGHT, "fleet.enable_chunked_prefill=false", "fleet.max_batched_tokens=33000"),
    ),
    "v-tight-kv-iteration": ("default", (*_TIGHT, 'simulation.engine="iteration"')),
    "v-tight-kv-reserve": (
        "default",
        (*_TIGHT, 'fleet.kv_allocation="reserve"', "fleet.max_batched_tokens=32768"),
    ),
    "v-block-1": ("default", (*_H1, "fleet.block_size_tokens=1")),
    "v-block-32": ("default", (*_H2, "fleet.block_size_tokens=32")),
    "v-nochunk": ("default", (*_H2, "fleet.enable_chunked_prefill=false")),
    "v-iteration": ("default", (*_H1, 'simulation.engine="iteration"')),
    "v-reserve": ("default", (*_H2, 'fleet.kv_allocation="reserve"')),
    "v-reserve-iteration": (
        "default",
        (*_H1, 'fleet.kv_allocation="reserve"', 'simulation.engine="iteration"'),
    ),
    "v-reserve-central-queue": (
        "default",
        (*_H2, 'fleet.kv_allocation="reserve"', 'fleet.router="central_queue"'),
    ),
    "v-autoscaled": ("llama70b-conv-reactive", ("simulation.hours=4",)),
    "v-autoscaled-schedule": ("llama70b-conv-schedule", ("simulation.hours=3",)),
    "v-disagg": ("disaggregated", _H2),
    "v-disagg-reserve": ("disaggregated", (*_H2, 'fleet.kv_allocation="reserve"')),
    "v-disagg-iteration": ("disaggregated", (*_H1, 'simulation.engine="iteration"')),
    "v-disagg-tight": (
        "disaggregated",
        (
            *_H2,
            "disaggregation.decode.replicas=1",
            "disaggregation.prefill.replicas=1",
            "disaggregation.decode.gpu_memory_utilization=0.5",
        ),
    ),
    "v-disagg-reserve-tight": (
        "disaggregated",
        (
            *_H2,
            'fleet.kv_allocation="reserve"',
            "disaggregation.decode.replicas=1",
            "disaggregation.prefill.replicas=1",
            "disaggregation.decode.gpu_memory_utilization=0.5",
        ),
    ),
    "v-disagg-central-queue": (
        "disaggregated",
        (*_H2, 'disaggregation.prefill.router="central_queue"'),
    ),
    "v-disagg-reactive": (
        "disaggregated",
        (
            *_H2,
            'disaggregation.decode.autoscaler="reactive"',
            "disaggregation.decode.target_requests_per_replica=32",
        ),
    ),
    "v-mooncake-least-loaded": ("mooncake-conversation", ('fleet.router="least_loaded"',)),
    "v-mooncake-round-robin": ("mooncake-conversation", ('fleet.router="round_robin"',)),
    "v-mooncake-iteration": ("mooncake-conversation", ('simulation.engine="iteration"',)),
    "v-mooncake-disagg": (
        "mooncake-conversation",
        (
            "disaggregation.prefill.replicas=4",
            "disaggregation.decode.replicas=4",
            'disaggregation.decode.router="least_loaded"',
        ),
    ),
}


def _same_bits(x: pa.ChunkedArray, y: pa.ChunkedArray) -> bool:
    """Equal type and equal values bit for bit (so NaN == NaN, and -0.0 != 0.0)."""
    if x.type != y.type:
        return False
    u, v = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
    if u.dtype.kind in "fiu":
        return u.shape == v.shape and u.tobytes() == v.tobytes()
    return u.tolist() == v.tolist()


def run_all(
    dest: Path, only: list[str], requests: bool = False, variants: bool = False
) -> dict[str, Path]:
    fleetsim = Path(sys.executable).parent / "fleetsim"
    runs: dict[str, tuple[Path, tuple[str, ...]]] = {
        sc.stem: (sc, ()) for sc in sorted((ROOT / "scenarios").glob("*.toml"))
    }
    if variants:
        for name, (scen, sets) in VARIANTS.items():
            runs[name] = (ROOT / "scenarios" / f"{scen}.toml", sets)
    out = {}
    for name, (sc, sets) in runs.items():
        if only and name not in only:
            continue
        d = dest / name
        if d.exists():
            shutil.rmtree(d)
        cmd = [str(fleetsim), "run", str(sc), "--out", str(d), "--force"]
        cmd += ["--requests"] if requests else []
        for kv in sets:
            cmd += ["--set", kv]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
            continue
        out[name] = d / "hourly.parquet"
        print(f"{name}: ran", flush=True)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("save", "compare"):
        print(__doc__ or "usage: same_tables.py save|compare DIR [NAMES] [--requests] [--variants]")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    mode, dest = argv[0], Path(argv[1])
    only = argv[2:]
    requests = "--requests" in only
    variants = "--variants" in only
    only = [o for o in only if o not in ("--requests", "--variants")]
    if mode == "save":
        run_all(dest, only, requests, variants)
        return 0
    no_run = "--no-run" in only
    only = [o for o in only if o != "--no-run"]
    newdir = Path(str(dest) + "-new")
    if no_run:  # compare the tables of an earlier `compare` run again
        new = {p.parent.name: p for p in sorted(newdir.glob("*/hourly.parquet"))}
        new = {k: v for k, v in new.items() if not only or k in only}
    else:
        new = run_all(newdir, only, requests, variants)
    bad = 0
    for name, hourly in new.items():
        tables = sorted({p.name for p in (dest / name).glob("*.parquet")} | {"hourly.parquet"})
        for table in tables:
            bad += _compare(f"{name}/{table}", dest / name / table, hourly.parent / table)
    return 1 if bad else 0


def _compare(name: str, ref: Path, path: Path) -> int:
    """1 when the table at ``path`` differs from (or lacks a column of) the one at ``ref``."""
    if not ref.exists() or not path.exists():
        print(f"{name}: no {'reference' if not ref.exists() else 'new'} table")
        return 1
    a = pq.read_table(ref).replace_schema_metadata(None)
    b = pq.read_table(path).replace_schema_metadata(None)
    common = [c for c in a.column_names if c in b.column_names]
    same = all(_same_bits(a.column(c), b.column(c)) for c in common)
    extra = sorted(set(b.column_names) - set(a.column_names))
    missing = sorted(set(a.column_names) - set(b.column_names))
    print(
        f"{name}: {'identical' if same else 'DIFFERENT'} ({a.num_rows} rows, "
        f"{len(common)} columns compared; new columns {extra or 'none'}; "
        f"dropped {missing or 'none'})"
    )
    return int((not same) or bool(missing))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
