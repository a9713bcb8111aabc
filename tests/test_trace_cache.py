"""The trace readers cache a file's parse, keyed by its path AND its size, modification time and
inode: a trace rewritten at the same path within one Python session is read again."""

from __future__ import annotations

import os
from pathlib import Path

from fleetsim.workload import sampling


def _write(path: Path, rows: list[tuple[float, int, int]], mtime_ns: int) -> None:
    path.write_text(
        "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows)
    )
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_rewritten_trace_is_read_again(tmp_path: Path) -> None:
    p = tmp_path / "trace.csv"
    _write(p, [(0.0, 100, 10), (1.0, 200, 20)], 1_000_000_000)
    _, prompts, _ = sampling.read_arrival_trace(str(p))
    assert prompts.tolist() == [100, 200]
    # the same size and a different modification time: the cache must not answer
    _write(p, [(0.0, 300, 10), (1.0, 400, 20)], 2_000_000_000)
    _, prompts, _ = sampling.read_arrival_trace(str(p))
    assert prompts.tolist() == [300, 400]


def test_an_unchanged_trace_is_answered_from_the_cache(tmp_path: Path) -> None:
    p = tmp_path / "trace.csv"
    _write(p, [(0.0, 100, 10)], 1_000_000_000)
    first = sampling.read_arrival_trace(str(p))
    assert sampling.read_arrival_trace(str(p)) is first
