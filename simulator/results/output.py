"""Writing results: atomic Parquet files with self-describing metadata, and the request stream.

Every file is written to a temporary name in the destination folder and renamed into place
only when complete, so a failed or interrupted run never leaves a half-written Parquet file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("arrival_s", pa.float64()),
        ("replica", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("first_token_s", pa.float64()),
        ("finish_s", pa.float64()),
        ("ttft_s", pa.float64()),
        ("tpot_s", pa.float64()),
        ("e2e_s", pa.float64()),
        ("cached_prompt_tokens", pa.int32()),  # served from the prefix cache (paged engine)
        ("preemptions", pa.int32()),
        ("status", pa.dictionary(pa.int8(), pa.string())),
    ]
)

_TMP_PREFIX = ".fleetsim-tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def temp_path(final: Path) -> Path:
    """A fresh temporary path beside ``final`` (same filesystem, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    return Path(name)


def commit(tmp: Path, final: Path) -> None:
    """Make a finished temporary file visible under its final name (atomic)."""
    os.replace(tmp, final)


def write_table_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to ``path`` as Parquet, atomically, with key-value ``metadata``."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed when complete)."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(text.encode(), path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The fleetsim key-value metadata of a Parquet file we wrote."""
    md = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if not k.startswith(b"ARROW")}


class RequestWriter:
    """Streams per-request records into a Parquet file in row groups (bounded memory)."""

    def __init__(self, path: Path, rows_per_group: int = 65536) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.rows_per_group = rows_per_group
        self._writer = pq.ParquetWriter(self.tmp, REQUEST_SCHEMA)
        self._cols: list[list] = [[] for _ in REQUEST_SCHEMA.names]
        self.rows = 0

    def add(
        self,
        r,
        replica: int,
        finish_s: float,
        ttft_s: float,
        tpot_s: float,
        e2e_s: float,
        status: str,
    ) -> None:
        c = self._cols
        c[0].append(r.rid)
        c[1].append(r.arrival_s)
        c[2].append(replica)
        c[3].append(r.prompt)
        c[4].append(r.out)
        c[5].append(r.first_token_s)
        c[6].append(finish_s)
        c[7].append(ttft_s)
        c[8].append(tpot_s)
        c[9].append(e2e_s)
        c[10].append(r.cached)
        c[11].append(r.preemptions)
        c[-1].append(status)
        if len(c[0]) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._cols[0]:
            return
        arrays = [
            pa.array(col, type=f.type)
            if f.name != "status"
            else pa.array(col, type=pa.string()).dictionary_encode()
            for col, f in zip(self._cols, REQUEST_SCHEMA)
        ]
        arrays[-1] = arrays[-1].cast(REQUEST_SCHEMA.field("status").type)
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=REQUEST_SCHEMA))
        self.rows += len(self._cols[0])
        self._cols = [[] for _ in REQUEST_SCHEMA.names]

    def close(self, metadata: dict[str, str] | None = None) -> None:
        """Finish the file and move it into place (on any failure, drop the partial file)."""
        try:
            self._flush()
            if metadata:
                for k, v in metadata.items():
                    self._writer.add_key_value_metadata({k: v})
            self._writer.close()
            commit(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
