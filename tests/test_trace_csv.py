"""Trace CSVs are read with ``pyarrow.csv`` (issue #15), keeping issue #16's guarantees.

The values must be exactly what the previous reader (Python's ``csv``, ``float`` and ``int``)
gave for every valid file, and a bad file must name the right line: the tests below compare
against that reference on random valid traces and put hostile rows on known lines.
"""

from __future__ import annotations

import csv
import io as _io
import random
from pathlib import Path

import numpy as np
import pytest

from fleetsim.base.errors import UserError
from fleetsim.workload.sampling import read_arrival_trace, read_trace


def _reference(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The old reader's values: csv.reader, then float() and int() of the stripped cells."""
    rows = list(csv.reader(_io.StringIO(text, newline="")))
    header = [h.strip() for h in rows[0]]
    j = [header.index(c) for c in ("arrival_s", "prompt_tokens", "output_tokens")]
    t = np.array([float(r[j[0]]) for r in rows[1:]])
    p = np.array([int(r[j[1]].strip()) for r in rows[1:]], dtype=np.int64)
    o = np.array([int(r[j[2]].strip()) for r in rows[1:]], dtype=np.int64)
    return t, p, o


def _number(rng: random.Random, x: float) -> str:
    """``x`` written the many ways a CSV may write a number."""
    form = rng.randrange(6)
    if form == 0:
        return repr(x)
    if form == 1:
        return f"{x:.17g}"
    if form == 2:
        return f"{x:e}"
    if form == 3:
        return f" {x:.3f} "
    if form == 4:
        return f"+{x:.9f}"
    return f'"{x:.6E}"'


def test_random_valid_traces_match_the_python_reader(tmp_path):
    rng = random.Random(7)
    for k in range(30):
        n = rng.randrange(1, 400)
        t = np.cumsum([rng.expovariate(1.0) * 10 ** rng.uniform(-6, 3) for _ in range(n)])
        lines = ["id,arrival_s,prompt_tokens,output_tokens,note"]
        prev = 0.0
        for i, x in enumerate(t):
            a = _number(rng, float(x))
            if float(a.strip().strip('"')) < prev:  # a rounded form below the previous time
                a = repr(prev)
            prev = float(a.strip().strip('"'))
            lines.append(f'{i},{a},{rng.randint(1, 10**9)}, {rng.randint(1, 3000)} ,"a, b""c"')
        eol = rng.choice(["\n", "\r\n"])
        text = eol.join(lines) + (eol if k % 2 else "")
        f = tmp_path / f"t{k}.csv"
        f.write_bytes((b"\xef\xbb\xbf" if k % 3 == 0 else b"") + text.encode())
        got = read_arrival_trace(str(f))
        want = _reference(text)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


def test_empirical_sizes_match_the_python_reader():
    """The shipped Azure code trace: the same integer columns, the timestamp column skipped."""
    path = Path(__file__).resolve().parent.parent / "data/azure-llm-2023/code.csv"
    got = read_trace(str(path))
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert sorted(got) == ["ContextTokens", "GeneratedTokens"]
    for name in got:
        j = rows[0].index(name)
        want = np.array([int(r[j]) for r in rows[1:]], dtype=np.int64)
        assert np.array_equal(got[name], want)
    assert len(got["ContextTokens"]) == len(rows) - 1 > 1000


def _err(tmp_path, data: bytes, empirical: bool = False) -> str:
    f = tmp_path / f"bad{abs(hash(data))}.csv"
    f.write_bytes(data)
    with pytest.raises(UserError) as e:
        (read_trace if empirical else read_arrival_trace)(str(f))
    msg = str(e.value)
    assert "\n" not in msg and str(f.name) in msg
    return msg


HEAD = b"arrival_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize(
    "data,needle",
    [
        (HEAD + b"0,1,1\n1,2,2\n\n3,4,4\n", "row 4 = ['', '', '']"),  # a blank line is line 4
        (HEAD + b"0,1,1\r\n1,2\r\n", "line 3: 2 field(s) where the header has 3"),
        (HEAD + b"0,1,1\n1,2,2,9\n", "line 3: 4 field(s) where the header has 3"),
        (HEAD + b'0,1,1\n1,"2\n",2\n', "line 3: a quoted value spans lines"),
        (HEAD + b"0,1,1\n1,0x10,2\n", "row 3 = ['1', '0x10', '2']"),  # int64 cast would take it
        (HEAD + b"0,1,1\n1,1_000,2\n", "row 3"),
        (HEAD + b"0,1,1\n5,1,1\n4,1,1\n", "row 4 = ['4', '1', '1']: need arrival_s"),
        (HEAD + b"0,1,1\nnan,1,1\n", "row 3 = ['nan', '1', '1']: need arrival_s in [0, 1e9]"),
        (HEAD + b"0,1,1\n1,1,1\n2,1,1\x00\n", "row 4"),
        (HEAD + b"0,1,1\n1,1,1\n2,1," + b"7" * 5000 + b"\n", "line 4: a field longer than 4096"),
        (HEAD + b"0,1,1\n1,\xe9,1\n", "line 3: byte 0xe9 is not UTF-8"),
        (HEAD, "no data rows"),
        (b"", "the file is empty"),
        (b"a,b\n1,2\n", "missing column(s) arrival_s, prompt_tokens, output_tokens"),
    ],
)
def test_a_bad_trace_names_its_line(tmp_path, data, needle):
    assert needle in _err(tmp_path, data)


def test_a_bad_size_file_names_its_row_and_column(tmp_path):
    data = b"TIMESTAMP,ContextTokens,GeneratedTokens\n2024-01-01,10,2\n2024-01-01,11,0\n"
    msg = _err(tmp_path, data, empirical=True)
    assert "row 3, column 'GeneratedTokens' = '0'" in msg
