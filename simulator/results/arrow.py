"""Arrow arrays built from, and read back into, numpy buffers directly.

With pyarrow 26, ``pa.array(x)`` (of a numpy array or a list) and ``Array.to_numpy()`` first
ask pyarrow's pandas shim whether ``x`` is a pandas object, and that question imports pandas
(and ``pyarrow.compute`` with it) wherever pandas is installed: about 0.25 CPU seconds, more
than a small run spends on simulating. A run builds three small tables and reads a few columns
back, so these functions do both from the buffers, for the types the result tables use:

* :func:`array`: numeric columns (a numpy array of the column's own dtype, or a list of Python
  numbers), ``None`` as null, NaN as null where asked (``nan_is_null``), timestamps from
  ``datetime`` values, and strings. Anything else (another dtype, a value pyarrow would refuse
  or convert) goes to ``pa.array`` itself, so the values and the errors stay pyarrow's own;
* :func:`to_numpy`: a numeric column as a numpy array, as ``to_numpy(zero_copy_only=False)``
  returns it (nulls as NaN, the integers then as float64); other types go to pyarrow;
* :func:`row`: one row as a dict (``to_pylist``), timestamps read from their buffers.

The arrays equal pyarrow's own bit for bit (tests/test_startup.py compares them, and
``bench/same_tables.py`` the tables). ``tests/test_startup.py`` also asserts that a run of a
shipped scenario imports neither pandas nor ``pyarrow.compute``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Iterable

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_UNIT = {
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
    "us": timedelta(microseconds=1),
}
_INT32 = np.iinfo(np.int32)


def _numpy_dtype(t: pa.DataType) -> np.dtype | None:
    """The numpy dtype of a fixed-width numeric Arrow type (None for any other type)."""
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return np.dtype(t.to_pandas_dtype())
    return None


def _validity(null: np.ndarray) -> pa.Buffer | None:
    """The Arrow validity bitmap of a boolean null mask (None when nothing is null)."""
    if not null.any():
        return None
    return pa.py_buffer(np.packbits(~null, bitorder="little"))


def _from_numpy(a: np.ndarray, t: pa.DataType, null: np.ndarray | None = None) -> pa.Array:
    a = np.ascontiguousarray(a)
    valid = None if null is None else _validity(null)
    return pa.Array.from_buffers(t, len(a), [valid, pa.py_buffer(a)])


def _is_plain_number_list(values: Sequence, kind: str) -> bool:
    """Every value None, a Python int (kind "i"), or an int or float (kind "f", a numpy float64
    included: a float subclass), and no bool: values that ``pa.array`` converts exactly as
    numpy does (an int beyond 2**53 in a float column is pyarrow's own error)."""
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return False
        if isinstance(v, int):
            if kind == "f" and abs(v) > 2**53:
                return False
        elif kind != "f" or not isinstance(v, float):
            return False
    return True


def _numeric(values: Any, t: pa.DataType, dt: np.dtype, nan_is_null: bool) -> pa.Array | None:
    if isinstance(values, np.ndarray):
        if values.dtype != dt or values.ndim != 1:
            return None
        null = np.isnan(values) if nan_is_null and dt.kind == "f" else None
        return _from_numpy(values, t, null)
    if not isinstance(values, (list, tuple)) or not _is_plain_number_list(values, dt.kind):
        return None
    null = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    if null.any():
        values = [0 if v is None else v for v in values]
    if dt.kind == "i":
        a = np.array(values, dtype=np.int64) if values else np.zeros(0, np.int64)
        if dt != a.dtype:  # a narrower integer type: in range, or pyarrow's own error
            info = np.iinfo(dt)
            if len(a) and (a.min() < info.min or a.max() > info.max):
                return None
            a = a.astype(dt)
    else:
        a = np.array(values, dtype=dt)
    if nan_is_null and dt.kind == "f":
        null |= np.isnan(a)
    return _from_numpy(a, t, null)


def _timestamps(values: Iterable, t: pa.TimestampType) -> pa.Array | None:
    step = _UNIT.get(t.unit)
    if step is None or not isinstance(values, (list, tuple)):
        return None
    out = np.empty(len(values), dtype=np.int64)
    null = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            null[i], out[i] = True, 0
        elif type(v) is datetime:
            # pyarrow: an aware datetime in UTC, a naive one as it is; the unit truncates
            d = v - (_EPOCH if v.tzinfo is not None else _EPOCH_NAIVE)
            if d < timedelta(0):
                return None  # (before 1970: left to pyarrow's own rounding)
            out[i] = d // step
        else:
            return None
    return _from_numpy(out, t, null)


def _strings(values: Iterable) -> pa.Array | None:
    if not isinstance(values, (list, tuple)) or not all(
        v is None or type(v) is str for v in values
    ):
        return None
    data = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    if offsets[-1] > _INT32.max:
        return None
    null = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    return pa.Array.from_buffers(
        pa.string(),
        len(data),
        [_validity(null), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data))],
    )


def array(values: Any, type: pa.DataType, *, nan_is_null: bool = False) -> pa.Array:
    """``pa.array(values, type=type)`` (with ``from_pandas=True`` when ``nan_is_null``: NaN as
    null), built from numpy buffers where the values allow (see the module docstring)."""
    if isinstance(values, pa.Array) and values.type == type:
        return values
    out: pa.Array | None = None
    dt = _numpy_dtype(type)
    if dt is not None:
        out = _numeric(values, type, dt, nan_is_null)
    elif pa.types.is_timestamp(type):
        out = _timestamps(values, type)
    elif pa.types.is_string(type):
        out = _strings(values)
    if out is None:
        return pa.array(values, type=type, from_pandas=nan_is_null or None)
    return out


def dictionary(values: list[str], dict_type: pa.DictionaryType) -> pa.Array:
    """``pa.array(values, pa.string()).dictionary_encode().cast(type)``: the distinct strings
    in order of first appearance, and each value's index into them (the index type's)."""
    codes: dict[str, int] = {}
    idx = [codes.setdefault(v, len(codes)) if type(v) is str else -1 for v in values]
    dt = _numpy_dtype(dict_type.index_type)
    strings = _strings(list(codes))
    if (
        dt is None
        or strings is None
        or not pa.types.is_string(dict_type.value_type)
        or -1 in idx
        or len(codes) > np.iinfo(dt).max
    ):
        return pa.array(values, type=pa.string()).dictionary_encode().cast(dict_type)
    return pa.DictionaryArray.from_arrays(
        _from_numpy(np.array(idx, dtype=dt), dict_type.index_type), strings
    )


def table(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """``pa.table(columns, schema=schema)`` with each column built by :func:`array`."""
    return pa.table({f.name: array(columns[f.name], f.type) for f in schema}, schema=schema)


def to_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``col.to_numpy(zero_copy_only=False)`` of a numeric column, read from its buffers (a
    copy); other types are pyarrow's own conversion."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    dt = _numpy_dtype(col.type)
    if dt is None:
        return col.to_numpy(zero_copy_only=False)
    parts = []
    nulls = False
    for c in chunks:
        buf = c.buffers()[1]
        v = (
            np.frombuffer(buf, dtype=dt, count=c.offset + len(c))[c.offset :]
            if buf is not None
            else np.zeros(len(c), dtype=dt)
        )
        if c.null_count:
            nulls = True
            bits = np.frombuffer(c.buffers()[0], dtype=np.uint8)
            valid = np.unpackbits(bits, bitorder="little", count=c.offset + len(c))[c.offset :]
            v = v.astype(np.float64 if dt.kind != "f" else dt)
            v[valid == 0] = np.nan
        parts.append(v)
    if not parts:
        return np.zeros(0, dtype=dt)
    if nulls:  # (pyarrow: integers with nulls come back as float64)
        parts = [p.astype(np.float64) if p.dtype.kind != "f" else p for p in parts]
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def row(t: pa.Table, i: int) -> dict[str, Any]:
    """``t.slice(i, 1).to_pylist()[0]``, with a timestamp in UTC (or without a zone) read from
    its buffer (``as_py`` of a timestamp imports pandas)."""
    out: dict[str, Any] = {}
    one = t.slice(i, 1)
    for name, col in zip(one.column_names, one.columns):
        typ = col.type
        if pa.types.is_timestamp(typ) and typ.tz in (None, "UTC") and typ.unit in _UNIT:
            c = col.combine_chunks()
            if c.null_count:
                out[name] = None
                continue
            v = int(np.frombuffer(c.buffers()[1], dtype=np.int64, count=c.offset + 1)[c.offset])
            epoch = _EPOCH if typ.tz else _EPOCH_NAIVE
            out[name] = epoch + v * _UNIT[typ.unit]
        else:
            out[name] = col.to_pylist()[0]
    return out


__all__ = ["array", "dictionary", "row", "table", "to_numpy"]
