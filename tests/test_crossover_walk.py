"""``fleetsim crossover``'s small things (q46): the report's ratio range leaves out the cells
only the split meets, the terminal's "lowest ratio" column reads from the left when it holds
text, the setup line names a pool's own TP and GPU, and a ``--quiet`` run keeps its notes in
crossover.parquet's metadata (``fleetsim report`` shows them)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import crossover_row

from fleetsim.apps import crossover
from fleetsim.apps.crossover import FACTORS, setup_line
from fleetsim.config.loading import read_toml

ROOT = Path(__file__).resolve().parents[1]


def _table(split_at) -> pa.Table:
    """A crossover table of the short workload: the aggregated fleet at $1 per good request in
    every cell but where ``split_at(f, g)`` says otherwise; the split at what it returns."""
    rows: dict[str, list] = {}
    for f in FACTORS:
        for g in FACTORS:
            agg, split = split_at(f, g)
            for design, P, usd in (("aggregated", None, agg), ("disaggregated", 1, split)):
                cell = crossover_row(f, g, design, P, usd)
                for k, v in cell.items():
                    rows.setdefault(k, []).append(v)
    return pa.table(rows)


def _d_only_row(f: float, g: float) -> tuple[float, float]:
    """The tightest TTFT row met only by the split (7 "D only" cells, ratio 0 in best_ratio);
    elsewhere the split at 0.5 x where TPOT is tight (g <= 2), 1.25 x else."""
    if f == FACTORS[0]:
        return math.inf, 0.5
    return 1.0, 0.5 if g <= 2 else 1.25


def test_report_ratio_range_leaves_out_cells_only_the_split_meets():
    """The "D only" cells (no aggregated good request: ratio 0) were in the range, which read
    "ratio 0.00-1.25"; they are counted apart, as the terminal's table does."""
    from fleetsim.apps.report import crossover_lines

    line = dict(crossover_lines(_table(_d_only_row)))["short prompts"]
    # wins: 7 D-only cells + 6 rows x 2 tight-TPOT columns at 0.5
    assert line == (
        "3.00 requests/s; the best split is cheaper per SLO-meeting request in 19 of 49 "
        "target cells (ratio 0.50-1.25; 7 met only by the split)"
    )


def test_lowest_ratio_column_reads_from_the_left_when_it_holds_text(monkeypatch):
    import io

    from rich.console import Console

    import fleetsim.base.tables as tables

    seen = []
    real = tables.print_table

    def spy(c, title, headers, rows, left=()):
        seen.append((tuple(r[2] for r in rows), tuple(left)))
        real(c, title, headers, rows, left)

    monkeypatch.setattr(tables, "print_table", spy)
    buf = io.StringIO()
    crossover.print_outcome(_table(_d_only_row), Console(file=buf, width=200))
    crossover.print_outcome(_table(lambda f, g: (1.0, 0.8)), Console(file=buf, width=200))
    assert seen == [
        (("0.500; 7 met only by the split",), ("workload", "lowest ratio")),
        (("0.800",), ("workload",)),  # a number alone stays right-aligned
    ]


def test_setup_line_names_the_pools_own_tp_and_gpu():
    """disaggregated.toml with a TP2 prefill pool on B200s: the line said "6 replicas of TP4
    h100-sxm" for both designs ([fleet]'s TP); the aggregated fleet runs that, the split the
    pools' own."""
    data, _ = read_toml(ROOT / "scenarios/disaggregated.toml")
    data["disaggregation"]["prefill"].update(tensor_parallel=2, gpu="b200")
    assert setup_line(data, 0.7, 2, "scenario") == (
        "6 replicas: aggregated of TP4 h100-sxm vs every split P + D = 6 of prefill TP2 b200 "
        "and decode TP4 h100-sxm; KV link infiniband-ndr; each workload flat at 0.7 x the "
        "aggregated fleet's capacity for 2 h; engine: the scenario's"
    )
    data, _ = read_toml(ROOT / "scenarios/disaggregated.toml")  # pools as [fleet]: as before
    assert setup_line(data, 0.7, 2, "scenario").startswith(
        "6 replicas of TP4 h100-sxm: aggregated vs every split P + D = 6; KV link"
    )


def test_a_quiet_run_keeps_its_note_in_the_tables_metadata(tmp_path, monkeypatch, capsys):
    """``--quiet`` printed nothing, so a long workload left out (chatgpt-2023.toml's GPT-3:
    4,096 tokens of context) went unsaid; the note is now in crossover.parquet's metadata and
    on ``fleetsim report``'s page. (The sweep itself is replaced by a fixed table here: the
    note's text is test_everyday3's, from a real run.)"""
    from fleetsim.apps.report import main as report_main

    note = "the long workload ... does not fit this model; left out, the short workload only"

    def fake_run(data, source, ex, hooks, load, hours, engine, long_trace, tmp, notes):
        notes.append(note)
        return _table(lambda f, g: (1.0, 0.8))

    monkeypatch.setattr(crossover, "run_crossover", fake_run)
    out = tmp_path / "xo"
    src = str(ROOT / "scenarios/chatgpt-2023.toml")
    assert crossover.main([src, "--set", "fleet.replicas=2", "--quiet", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    meta = pq.read_schema(out / "crossover.parquet").metadata
    assert meta[b"crossover_notes"] == b'["' + note.encode() + b'"]'
    assert report_main([str(out)]) == 0
    assert f"| note | {note} |" in (out / "report.md").read_text()
