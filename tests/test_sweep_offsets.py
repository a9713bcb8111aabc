"""The per-sweep offsets of the goal table's errors (``--sweeps``; docs/accuracy-log.md, "The W
and J medians by task")."""

import pytest

from fleetsim.calibrate.mlenergy import sweep_offsets


def test_sweep_offsets_hand_count():
    # two sweeps on one GPU: A (+10, +12, +14: median +12), B (-4, -6: median -5); one on another
    errs = [
        ("H100", "A", 10.0),
        ("H100", "A", 12.0),
        ("H100", "A", 14.0),
        ("H100", "B", -4.0),
        ("H100", "B", -6.0),
        ("B200", "C", 3.0),
    ]
    out = sweep_offsets(errs)
    med, within, sweeps = out["H100"]
    # |errors| 10 12 14 4 6: median 10; within: |-2| 0 2 1 1 -> median 1
    assert med == pytest.approx(10.0)
    assert within == pytest.approx(1.0)
    assert sweeps == [("B", 2, -5.0), ("A", 3, 12.0)]  # by their median, signed
    assert out["B200"] == (3.0, 0.0, [("C", 1, 3.0)])


def test_a_constant_offset_per_sweep_leaves_nothing_within():
    errs = [("H100", s, off) for s, off in (("a", 7.0), ("b", -9.0)) for _ in range(4)]
    med, within, _ = sweep_offsets(errs)["H100"]
    assert (med, within) == (8.0, 0.0)
