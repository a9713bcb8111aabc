"""Check that every scenario in scenarios/ gives the same hourly table, bit for bit.

Used around refactors that must not change results:

    python bench/same_tables.py save /tmp/before      # on the old code
    python bench/same_tables.py compare /tmp/before   # on the new code

Each scenario runs through the installed ``fleetsim`` command (its default seed, its own
hours); the comparison is of the Parquet tables' data (the key-value metadata carries the
version and paths, which may differ). With ``--requests`` (give it to both ``save`` and
``compare``) each run also writes ``requests.parquet`` and that per-request table is compared
too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def _same_bits(x: pa.ChunkedArray, y: pa.ChunkedArray) -> bool:
    """Equal type and equal values bit for bit (so NaN == NaN, and -0.0 != 0.0)."""
    if x.type != y.type:
        return False
    u, v = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
    if u.dtype.kind in "fiu":
        return u.shape == v.shape and u.tobytes() == v.tobytes()
    return u.tolist() == v.tolist()


def run_all(dest: Path, only: list[str], requests: bool = False) -> dict[str, Path]:
    fleetsim = Path(sys.executable).parent / "fleetsim"
    out = {}
    for sc in sorted((ROOT / "scenarios").glob("*.toml")):
        if only and sc.stem not in only:
            continue
        d = dest / sc.stem
        if d.exists():
            shutil.rmtree(d)
        r = subprocess.run(
            [str(fleetsim), "run", str(sc), "--out", str(d), "--force"]
            + (["--requests"] if requests else []),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            print(f"{sc.stem}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
            continue
        out[sc.stem] = d / "hourly.parquet"
        print(f"{sc.stem}: ran", flush=True)
    return out


def main(argv: list[str]) -> int:
    mode, dest = argv[0], Path(argv[1])
    only = argv[2:]
    requests = "--requests" in only
    only = [o for o in only if o != "--requests"]
    if mode == "save":
        run_all(dest, only, requests)
        return 0
    no_run = "--no-run" in only
    only = [o for o in only if o != "--no-run"]
    newdir = Path(str(dest) + "-new")
    if no_run:  # compare the tables of an earlier `compare` run again
        new = {p.parent.name: p for p in sorted(newdir.glob("*/hourly.parquet"))}
        new = {k: v for k, v in new.items() if not only or k in only}
    else:
        new = run_all(newdir, only, requests)
    bad = 0
    tables = ["hourly.parquet"] + (["requests.parquet"] if requests else [])
    for name, hourly in new.items():
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
