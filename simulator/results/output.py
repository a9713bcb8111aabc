"""Writing results: atomic Parquet files with self-describing metadata, and the request stream.

Every file is written to a temporary name in the destination folder and renamed into place
only when complete, so a failed or interrupted run never leaves a half-written Parquet file.

A whole run's files are all-or-nothing (:class:`RunOutput`): they are written into a staging
folder ``<out>/.fleetsim-tmp-<pid>-<random>/`` and moved into ``<out>`` together at the end,
under an exclusive lock (``<out>/.fleetsim-lock``, ``fcntl.flock``) that is taken before the
simulation starts and held until the files are in place, so the "folder not empty" check and
the write are one step with respect to another fleetsim run. The previous run's files are moved
aside first and put back if anything fails. A staging folder whose process is gone (a killed
run) is recognised by the pid in its name and removed. ``.fleetsim-manifest.json`` lists the
files the last run wrote: ``--force`` replaces those (and fleetsim's fixed output names), never
a file fleetsim did not write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetsim.base.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow is imported where a table is written or read, not with this module: the output
# folder rule serves every command, and `validate` writes no table (start-up time)


@cache
def request_schema() -> pa.Schema:
    """The schema of requests.parquet."""
    import pyarrow as pa

    return pa.schema(
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


def __getattr__(name: str) -> Any:
    if name == "REQUEST_SCHEMA":  # (the module's constant before pyarrow became lazy)
        return request_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TMP_PREFIX = ".fleetsim-tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_file(final: Path) -> tuple[int, Path]:
    """A fresh temporary file beside ``final`` (same filesystem, so rename is atomic), created
    with ``O_EXCL`` (never a link or someone else's file): its open descriptor and path."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets a later run recognise it as stale once this process is gone
    fd, name = tempfile.mkstemp(
        prefix=f"{_TMP_PREFIX}{os.getpid()}-{final.name}.", dir=final.parent
    )
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return fd, Path(name)


def temp_path(final: Path) -> Path:
    """A fresh temporary path beside ``final`` (see :func:`_temp_file`)."""
    fd, p = _temp_file(final)
    os.close(fd)
    return p


def commit(tmp: Path, final: Path) -> None:
    """Make a finished temporary file visible under its final name (atomic; a link at
    ``final`` is replaced, never followed)."""
    os.replace(tmp, final)


def _write_atomic(path: Path, write) -> None:
    """``write(fh)`` into a fresh temporary file (through the descriptor that created it, so
    nothing can redirect the write), then rename it to ``path``."""
    tmp: Path | None = None
    try:  # (the temporary is made inside the try: an interrupt cannot leave it behind)
        fd, tmp = _temp_file(path)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        commit(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


#: the options ``pyarrow.parquet.write_table`` and ``ParquetWriter`` give the file writer by
#: default (pyarrow 15 to 26; the others it passes are the writer's own defaults)
_PARQUET_DEFAULTS = {
    "version": "2.6",
    "compression": "snappy",
    "use_dictionary": True,
    "write_statistics": True,
    "writer_engine_version": "V2",
    "data_page_version": "1.0",
}


def parquet_writer(fh, schema: pa.Schema):
    """The writer that ``pyarrow.parquet.ParquetWriter(fh, schema)`` holds (``write_table``,
    ``add_key_value_metadata``, ``close``), made directly: the same bytes, without importing
    ``pyarrow.parquet``, whose ``pyarrow.fs`` brings ``ssl`` and ``socket`` (~50 M
    instructions, ~1 % of a 21,556-request run; bench/RESULTS.md, start-up, fifth pass) to
    write to a file that is already open. tests/test_startup.py compares the bytes with
    ``pyarrow.parquet.write_table``'s; a pyarrow without the class gets pyarrow.parquet's."""
    try:
        from pyarrow._parquet import ParquetWriter

        return ParquetWriter(fh, schema, **_PARQUET_DEFAULTS)
    except (ImportError, TypeError):  # (a pyarrow whose private writer differs)
        import pyarrow.parquet as pq

        return pq.ParquetWriter(fh, schema)


def write_parquet(table: pa.Table, fh) -> None:
    """``pyarrow.parquet.write_table(table, fh)`` for an open binary file ``fh`` (one row
    group up to 1024 x 1024 rows, as its default): see :func:`parquet_writer`."""
    w = parquet_writer(fh, table.schema)
    try:
        w.write_table(table)
    finally:
        w.close()


def write_table_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to ``path`` as Parquet, atomically, with key-value ``metadata``."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    _write_atomic(path, lambda fh: write_parquet(table, fh))


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed when complete)."""
    _write_atomic(path, lambda fh: fh.write(data))


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(text.encode(), path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The fleetsim key-value metadata of a Parquet file we wrote."""
    import pyarrow.parquet as pq

    from fleetsim.base.io import open_binary

    with open_binary(path, "") as fh:
        md = pq.read_schema(fh).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if not k.startswith(b"ARROW")}


class RequestWriter:
    """Streams per-request records into a Parquet file in row groups (bounded memory)."""

    def __init__(self, path: Path, rows_per_group: int = 65536) -> None:
        self.path = Path(path)
        fd, self.tmp = _temp_file(self.path)
        self._fh = os.fdopen(fd, "wb")
        self.rows_per_group = rows_per_group
        try:
            self._writer = parquet_writer(self._fh, request_schema())
        except BaseException:
            self._fh.close()
            self.tmp.unlink(missing_ok=True)
            raise
        self._cols: list[list] = [[] for _ in request_schema().names]
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
        import pyarrow as pa

        from fleetsim.results.arrow import array, dictionary

        schema = request_schema()
        # (built from numpy buffers: pa.array and dictionary_encode would import pandas and
        # pyarrow.compute, results/arrow.py)
        arrays = [
            array(col, f.type) if f.name != "status" else dictionary(col, f.type)
            for col, f in zip(self._cols, schema)
        ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        self.rows += len(self._cols[0])
        self._cols = [[] for _ in schema.names]

    def close(self, metadata: dict[str, str] | None = None) -> None:
        """Finish the file and move it into place (on any failure, drop the partial file)."""
        try:
            self._flush()
            if metadata:
                for k, v in metadata.items():
                    self._writer.add_key_value_metadata({k: v})
            self._writer.close()
            self._fh.close()
            commit(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            try:
                self._writer.close()
            finally:
                self._fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# a run's output folder, all or nothing
LOCK_NAME = ".fleetsim-lock"
MANIFEST_NAME = ".fleetsim-manifest.json"
# ``fleetsim sweep``'s finished points, kept while the sweep runs (``--resume``: apps/sweep.py)
SWEEP_CACHE_NAME = ".fleetsim-sweep-cache"
# The files fleetsim's commands write into an --out folder: ``--force`` may replace these.
OUTPUT_NAMES = frozenset(
    {
        "hourly.parquet",
        "pools.parquet",
        "requests.parquet",
        "sweep.parquet",
        "plan.parquet",
        "plan_disaggregated.parquet",
        "crossover.parquet",
        "crossover.png",
        "schedule.json",
        "cost.png",
        "power.png",
        "utilization.png",
        "latency.png",
        "report.html",
        "report.md",
        "peak.json",
        "flat-day.json",
        "replay.csv",
        "replay.json",
        "requests.csv",
        "iterations.csv",
        "profile.json",
        "profile-engine.json",
        "profile-insample.json",
        MANIFEST_NAME,
    }
)
# Names fleetsim writes that a user's own file often has too (replay's trace.csv): fleetsim's
# only when its manifest lists them.
LISTED_NAMES = frozenset({"trace.csv"})
# Patterns of names fleetsim makes up per pool or per figure (none today besides the fixed
# names above; a command that adds some adds its pattern here).
OUTPUT_PATTERNS: tuple[re.Pattern[str], ...] = ()


def could_write(name: str, listed: bool = False) -> bool:
    """Whether fleetsim itself could have written a file called ``name`` into an output folder
    (``listed``: its manifest lists it). Whatever a manifest says, no other name is ever
    replaced or deleted by ``--force``."""
    if name in OUTPUT_NAMES or any(p.fullmatch(name) for p in OUTPUT_PATTERNS):
        return True
    return listed and name in LISTED_NAMES


PROBE_BYTES = 1 << 20  # written and removed before simulating: a full disk or ulimit -f shows
_STAGE_RE = re.compile(r"^\.fleetsim-tmp-(\d+)-")
_OPEN: list[RunOutput] = []  # RunOutputs of this process not yet committed or aborted
LAST: dict[str, str] = {}  # what became of the last output: {"out": path, "state": ...}


def _shown(p: Path | str) -> str:
    from fleetsim.base.io import clean

    return repr(clean(str(p), 160))


def os_problem(exc: OSError) -> str:
    """A short, plain reason for an OSError while writing."""
    reasons = {
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "the file-size limit (ulimit -f) was reached",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "a file the run writes exists there as a folder",
        errno.ENAMETOOLONG: "the path is too long",
        errno.ELOOP: "too many levels of symbolic links",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


def out_error(out: Path | str, problem: str, fix: str = "choose another --out") -> UserError:
    return UserError(f"--out {_shown(out)}: {problem} (fix: {fix})")


def check_out_path(out: Path) -> None:
    """The problems of an --out path that show without writing anything: a file, a path under
    a file, a dangling symbolic link."""
    if out.is_symlink() and not out.exists():
        raise out_error(
            out, f"is a symbolic link to {_shown(os.readlink(out))}, which does not exist"
        )
    if out.exists() and not out.is_dir():
        raise out_error(out, "exists and is a file, not a folder")
    for anc in out.parents:
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                raise out_error(out, f"{_shown(anc)} is a file, not a folder")
            break


def _write_probe(probe: Path) -> None:
    """Write and remove :data:`PROBE_BYTES` at ``probe`` (a new file: ``O_EXCL``, no link
    followed), so that a full disk, a read-only file system or ``ulimit -f`` shows before the
    simulation rather than after it."""
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)
    probe.unlink()


def _dir_id(p: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder ``p`` itself (not a link's target), or None."""
    try:
        st = os.lstat(p)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def clean_stale(out: Path) -> list[str]:
    """Remove temporaries of fleetsim runs that are gone (their pid, in the name, is not
    running; names without a pid are from older versions). Returns the names removed."""
    gone = []
    with contextlib.suppress(OSError):
        for p in out.iterdir():
            if not p.name.startswith(_TMP_PREFIX):
                continue
            m = _STAGE_RE.match(p.name)
            if m and _pid_alive(int(m.group(1))):
                continue
            _remove(p)
            gone.append(p.name)
    return gone


def _manifest(out: Path) -> list[str]:
    """The names the folder's manifest lists that fleetsim could have written (a manifest that
    is a link, has a second hard link or is not fleetsim's JSON counts as empty)."""
    from fleetsim.base.io import MiB, load_json

    p = out / MANIFEST_NAME
    if not p.is_file():
        return []
    try:
        d, _ = load_json(p, "manifest", MiB, nofollow=True)
    except UserError:
        return []
    files = d.get("files") if isinstance(d, dict) else None
    if not isinstance(files, list):
        return []
    return [f for f in files if isinstance(f, str) and could_write(f, listed=True)]


def previous_outputs(out: Path) -> list[str]:
    """The names in ``out`` that a previous fleetsim run wrote: fleetsim's fixed output names,
    and those its manifest lists among the names fleetsim writes (:func:`could_write`). Nothing
    else in the folder is ever fleetsim's, whatever the manifest says."""
    if not out.is_dir():
        return []
    owned = set(_manifest(out)) | OUTPUT_NAMES
    return sorted(
        p.name
        for p in out.iterdir()
        if (p.name in owned or any(r.fullmatch(p.name) for r in OUTPUT_PATTERNS))
        and (p.is_symlink() or not p.is_dir())
    )


def remove_previous_outputs(out: Path) -> list[str]:
    """``--force``: delete the previous run's files that fleetsim wrote (see
    :func:`previous_outputs`), and only those. Returns the names removed. (Commands that write
    through :class:`RunOutput` get this at commit time, all or nothing.)"""
    names = previous_outputs(out)
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            (out / n).unlink()
    return names


def clean_pid(text: str) -> str:
    """A lock file's pid as shown in a message (digits only; anything else as '?')."""
    return text if text.isdigit() else "?"


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _lock_problem(out: Path, lock: Path, what: str) -> UserError:
    return out_error(
        out,
        f"{LOCK_NAME} there is {what}, not fleetsim's lock file; nothing was written through it",
        f"remove {_shown(lock)} if it is not needed, or choose another --out",
    )


def _lock_refused(out: Path, lock: Path, exc: OSError) -> UserError:
    """The one-line refusal of a lock path that cannot be opened without following a link."""
    try:
        st = os.lstat(lock)
    except OSError:
        return out_error(out, f"cannot open its {LOCK_NAME}: {os_problem(exc)}")
    return _lock_problem(out, lock, _kind(st.st_mode))


def _check_lock_file(out: Path, lock: Path, st: os.stat_result) -> None:
    """A lock file is a regular file with one link (else someone placed it there)."""
    if not stat.S_ISREG(st.st_mode):
        raise _lock_problem(out, lock, _kind(st.st_mode))
    if st.st_nlink != 1:
        raise _lock_problem(
            out, lock, f"a file with {st.st_nlink} hard links (another name shares its contents)"
        )


class RunOutput:
    """The output folder of one command, written all or nothing.

    ``open()`` (before simulating) checks the path, creates the folder, takes the lock, removes
    stale temporaries, refuses a non-empty folder without ``force`` (``mode="new"``), creates
    the staging folder and probes that a file can be written there. The command writes its files
    to :meth:`path` (inside the staging folder); :meth:`commit` moves them into place together,
    replacing the previous run's files (``force``) or the files of the same names
    (``mode="add"``: a report added to a run). :meth:`abort` drops the staging folder; the
    folder is then as it was."""

    def __init__(
        self,
        out: Path | str,
        *,
        force: bool = False,
        mode: str = "new",
        names: Iterable[str] = (),
        resume: bool = False,
    ) -> None:
        self.out = Path(out)
        self.force = force
        self.mode = mode
        self.names = tuple(names)
        self.resume = resume  # a sweep's --resume: its cache does not make the folder non-empty
        self.stage: Path | None = None
        self._fd: int | None = None
        self._created: list[Path] = []
        self._stage_id: tuple[int, int] | None = None
        self.state = "new"

    # -- opening ------------------------------------------------------------------------------
    def open(self) -> RunOutput:
        out = self.out
        for other in list(_OPEN):  # an abandoned output of this process for the same folder
            if other.out.resolve() == out.resolve():
                other.abort()
        check_out_path(out)
        for n in self.names:
            t = out / n
            if t.is_dir() and not t.is_symlink():
                raise out_error(out, f"{n} exists there as a folder", f"remove {_shown(t)}")
        missing = [p for p in [out, *out.parents] if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._created = missing  # innermost first (removed in this order on abort)
            _OPEN.append(self)
            self._lock()
            clean_stale(out)
            if self.mode == "new" and not self.force:
                extra = [p.name for p in out.iterdir() if p.name != LOCK_NAME]
                if self.resume:
                    extra = [n for n in extra if n != SWEEP_CACHE_NAME]
                if extra == [SWEEP_CACHE_NAME] and "sweep.parquet" in self.names:
                    raise out_error(
                        out,
                        "holds the finished points of an interrupted sweep",
                        "pass --resume to reuse them, --force to start over, or choose "
                        "another --out",
                    )
                if extra:
                    raise out_error(
                        out,
                        "the folder exists and is not empty",
                        "pass --force to replace the previous run's files, or choose another --out",
                    )
            if self.mode != "new" or self.force:
                foreign = [
                    n for n in self.names if (out / n).exists() and n not in previous_outputs(out)
                ]
                if foreign:
                    raise out_error(
                        out,
                        f"{', '.join(foreign)} there was not written by fleetsim and would be "
                        "overwritten",
                        "move it away or choose another --out",
                    )
            self.stage = out / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
            self.stage.mkdir(mode=0o700)  # (fails if anything, a link included, is there)
            self._stage_id = _dir_id(self.stage)
            _write_probe(self.stage / ".probe")
        except OSError as exc:
            self.abort()
            raise out_error(out, f"cannot write there: {os_problem(exc)}") from None
        except BaseException:
            self.abort()
            raise
        self.state = "open"
        LAST.clear()
        LAST.update(out=str(out), state="open")
        return self

    def _lock(self) -> None:
        """Take ``<out>/.fleetsim-lock``: created with ``O_EXCL``, or an existing one opened
        without following a link and accepted only as a regular file with one link (a symbolic
        link, a hard link to another file, a FIFO, a device or a folder placed there is refused
        in one line, and nothing is written through it)."""
        import fcntl

        lock = self.out / LOCK_NAME
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        for _ in range(10):
            try:
                fd = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(lock, flags)
                except FileNotFoundError:
                    continue  # removed since: create it again
                except OSError as exc:
                    raise _lock_refused(self.out, lock, exc) from None
            try:
                _check_lock_file(self.out, lock, os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise out_error(
                    self.out,
                    f"another fleetsim run (pid {clean_pid(holder)}) is writing into this folder",
                    "wait for it to finish or choose another --out",
                ) from None
            try:
                now = os.lstat(lock)
                st = os.fstat(fd)
                same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev) and st.st_nlink == 1
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return
            os.close(fd)  # the holder removed the file between our open and our lock: retry
        raise out_error(self.out, "could not take the folder's lock", "try again")

    def _unlock(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            st, now = os.fstat(self._fd), os.lstat(self.out / LOCK_NAME)
            if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
                os.unlink(self.out / LOCK_NAME)
        os.close(self._fd)
        self._fd = None

    # -- writing ------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Where the command writes its file ``name`` (inside the staging folder)."""
        if self.stage is None:
            raise RuntimeError("RunOutput.path() before open()")
        return self.stage / name

    def staging(self) -> Path:
        """The staging folder itself (what is written there moves into place at commit)."""
        if self.stage is None:
            raise RuntimeError("RunOutput.staging() before open()")
        return self.stage

    def final(self, name: str) -> Path:
        """Where ``name`` will be after :meth:`commit`."""
        return self.out / name

    def commit(self) -> list[Path]:
        """Move the staged files into place together; returns their final paths."""
        if self.stage is None:
            raise RuntimeError("RunOutput.commit() before open()")
        out, stage = self.out, self.stage
        if _dir_id(stage) != self._stage_id:  # replaced (by a link, say) since open()
            self.abort()
            raise out_error(out, f"the staging folder {_shown(stage)} was replaced meanwhile")
        names = sorted(
            p.name for p in stage.iterdir() if not p.name.startswith((_TMP_PREFIX, ".probe"))
        )
        old = set(_manifest(out)) if self.mode != "new" else set()
        keep = sorted(n for n in old if n not in names and (out / n).is_file())
        backup = out / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-old"
        signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        moved: list[str] = []
        placed: list[str] = []
        try:
            try:
                write_text_atomic(
                    json.dumps({"files": sorted(set(names) | set(keep))}, indent=1) + "\n",
                    stage / MANIFEST_NAME,
                )
                names.append(MANIFEST_NAME)
                aside = set(previous_outputs(out)) if (self.force and self.mode == "new") else set()
                aside |= {n for n in names if (out / n).exists()}
                backup.mkdir()
                for n in sorted(aside):
                    os.replace(out / n, backup / n)
                    moved.append(n)
                for n in names:
                    os.replace(stage / n, out / n)
                    placed.append(n)
            except BaseException as exc:
                for n in placed:  # roll back: the previous files return
                    with contextlib.suppress(OSError):
                        os.replace(out / n, stage / n)
                for n in moved:
                    with contextlib.suppress(OSError):
                        os.replace(backup / n, out / n)
                _remove(backup)
                self.abort()
                if isinstance(exc, OSError):
                    raise out_error(out, f"cannot write there: {os_problem(exc)}") from None
                raise
            _remove(backup)
            _remove(stage)
            self.stage = None
            self._created = []
            self.state = "committed"
            LAST.update(out=str(out), state="committed")
            self._unlock()
            with contextlib.suppress(ValueError):
                _OPEN.remove(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return [out / n for n in names if n != MANIFEST_NAME]

    def adopt(self, names: Iterable[str]) -> None:
        """For a command that writes its files straight into the folder (``replay``: each file
        atomic, the set not): list ``names`` in the manifest, so that they count as fleetsim's,
        and release the folder."""
        old = [n for n in _manifest(self.out) if (self.out / n).is_file()]
        keep = sorted(set(old) | {n for n in names if (self.out / n).is_file()})
        write_text_atomic(json.dumps({"files": keep}, indent=1) + "\n", self.out / MANIFEST_NAME)
        if self.stage is not None:
            _remove(self.stage)
            self.stage = None
        self._created = []
        self.state = "committed"
        LAST.update(out=str(self.out), state="committed")
        self._unlock()
        with contextlib.suppress(ValueError):
            _OPEN.remove(self)

    def abort(self) -> None:
        """Drop the staged files and the lock; the folder is as it was before :meth:`open`."""
        if self.stage is not None:
            _remove(self.stage)
            self.stage = None
        self._unlock()
        for d in self._created:  # folders this run created, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        if self._created and not self.out.exists():
            LAST["removed"] = "1"
        self._created = []
        with contextlib.suppress(ValueError):
            _OPEN.remove(self)
        if self.state == "open":
            LAST.update(out=str(self.out), state="aborted")
        self.state = "aborted" if self.state != "committed" else self.state

    def __enter__(self) -> RunOutput:
        return self.open() if self.state == "new" else self

    def __exit__(self, exc_type, *_exc) -> None:
        if self.state == "open":
            self.abort()


def open_outputs() -> list[RunOutput]:
    """The outputs of this process opened and not yet committed or aborted."""
    return list(_OPEN)


def abort_open_outputs() -> None:
    """Abort every output of this process that was opened but not committed (the command
    failed or was interrupted)."""
    for o in list(_OPEN):
        o.abort()


def interrupted_note() -> str:
    """What an interrupt left, for the one-line message."""
    out, state = LAST.get("out"), LAST.get("state")
    kept = LAST.get("sweep_points_kept")
    if kept and state in ("open", "aborted"):
        return (
            f"no sweep.parquet was written to {_shown(out or '')}; its {kept} finished points "
            f"are kept in {SWEEP_CACHE_NAME}/ (fix: rerun with --resume to simulate only the "
            "others)"
        )
    if state == "committed":
        return f"the outputs in {_shown(out or '')} were complete before the interrupt"
    if state in ("open", "aborted") and LAST.get("removed"):
        return f"nothing was written ({_shown(out or '')}, which this run created, was removed)"
    if state in ("open", "aborted"):
        return (
            f"nothing new was written to {_shown(out or '')}; its previous contents are unchanged"
        )
    return "no output was written"


@contextlib.contextmanager
def staged(out: Path | str, **kw) -> Iterator[RunOutput]:
    """``with staged(out, force=..., names=...) as o:`` write to ``o.path(name)``, then
    ``o.commit()``; leaving the block without a commit aborts."""
    o = RunOutput(out, **kw)
    with o:
        yield o
