"""Helpers shared by the commands (run, plan, sweep, report): the output folder rule.

A command's files are written all or nothing through
:class:`~fleetsim.results.output.RunOutput`: :func:`open_output` checks the ``--out`` path,
takes the folder's lock and probes that it is writable *before* anything is simulated; the
command writes to ``o.path(name)`` and calls ``o.commit()`` at the end. An output that is not
committed (an error, an interrupt) is aborted by the CLI, leaving the folder as it was.
``--force`` replaces only the previous run's files that fleetsim wrote
(:func:`~fleetsim.results.output.remove_previous_outputs` is the same rule as a function).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

if TYPE_CHECKING:
    from fleetsim.results.output import RunOutput

__all__ = ["open_output", "out_dir"]


def out_dir(args, default_name: str) -> Path:
    """``--out`` or ``out/<default_name>``, after the checks that need no writing (a file, a
    path under a file, a dangling link). The not-empty rule is :func:`open_output`'s."""
    from fleetsim.results.output import check_out_path  # (pyarrow: only where output is written)

    out = Path(args.out) if args.out else Path("out") / default_name
    check_out_path(out)
    return out


def console(*, stderr: bool = False, quiet: bool = False):
    """A rich Console; when not a terminal (piped, redirected) it never wraps a line, so a value
    is never split (rich would wrap at 80 columns)."""
    from rich.console import Console

    c = Console(stderr=stderr, quiet=quiet)
    if not c.is_terminal:
        import sys

        out = _RStripLines(sys.stderr if stderr else sys.stdout)
        c = Console(
            file=cast(IO[str], out), quiet=quiet, width=100_000, soft_wrap=True, color_system=None
        )
    return c


class _RStripLines(io.TextIOBase):
    """A text stream that drops the spaces rich pads each table row with up to the widest row
    (piped output: 100,000 columns), so piped lines end at their last character."""

    def __init__(self, f: IO[str]) -> None:
        super().__init__()
        self._f = f

    def write(self, s: str) -> int:
        import re

        self._f.write(re.sub(r"[ \t]+\n", "\n", s))
        return len(s)

    def flush(self) -> None:
        self._f.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._f.fileno()


def print_json(doc) -> None:
    """One strict JSON document on stdout (NaN and infinities as null)."""
    import json
    import sys

    from fleetsim.base.io import json_safe

    sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def open_output(
    args,
    default_name: str,
    names: tuple[str, ...] = (),
    mode: str = "new",
    resume: bool = False,
) -> RunOutput:
    """The command's output folder, opened (locked, checked, probed); see the module doc."""
    from fleetsim.results.output import RunOutput

    return RunOutput(
        out_dir(args, default_name),
        force=bool(getattr(args, "force", False)),
        mode=mode,
        names=names,
        resume=resume,
    ).open()


def description(doc: str | None) -> str:
    """A command's help description from its module docstring: the whole first paragraph (not
    its first line, which may stop mid-sentence), with RST literals (````x````) as plain text."""
    import re

    para = (doc or "").strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines())
    return re.sub(r"``(.+?)``", r"\1", text)


def not_a_run(out_dir: Path) -> str:
    """Why ``out_dir`` has no report, and the fix: a sweep's or a plan's folder holds one table
    per point or candidate, not a day's hours; a file is not a folder (``fleetsim report`` and
    ``fleetsim compare``)."""
    if not out_dir.exists():
        return "no such folder (fix: give the --out folder of a `fleetsim run`)"
    if out_dir.is_file():
        return "a file, not a folder (fix: give the --out folder of a `fleetsim run`)"
    if (out_dir / "sweep.parquet").is_file():
        return (
            "a `fleetsim sweep` folder (sweep.parquet: one row per point), not a run's hours "
            "(fix: fleetsim run FILE --set KEY=VALUE --report for the point to look at)"
        )
    if (out_dir / "plan.parquet").is_file() or (out_dir / "plan_disaggregated.parquet").is_file():
        return (
            "a `fleetsim plan` folder (its candidates), not a run's hours (fix: fleetsim run "
            "FILE --set hardware.gpu=G --set fleet.tensor_parallel=T --set fleet.replicas=N "
            "--report for the candidate to look at: the plan's probe at N is that run)"
        )
    return "no hourly.parquet in it (fix: give the --out folder of a `fleetsim run`)"
