"""Helpers shared by the commands (run, plan, sweep): the output folder rule."""

from __future__ import annotations

from pathlib import Path

from fleetsim.base.errors import UserError


def out_dir(args, default_name: str) -> Path:
    """``--out`` or ``out/<default_name>``; a non-empty folder needs ``--force``."""
    out = Path(args.out) if args.out else Path("out") / default_name
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(
            f"--out {str(out)!r}: the folder exists and is not empty "
            "(fix: pass --force to overwrite, or choose another --out)"
        )
    return out


def console(*, stderr: bool = False, quiet: bool = False):
    """A rich Console; when not a terminal (piped, redirected) it never wraps a line, so a value
    is never split (rich would wrap at 80 columns)."""
    from rich.console import Console

    c = Console(stderr=stderr, quiet=quiet)
    if not c.is_terminal:
        c = Console(stderr=stderr, quiet=quiet, width=100_000, soft_wrap=True)
    return c


def print_json(doc) -> None:
    """One strict JSON document on stdout (NaN and infinities as null)."""
    import json
    import sys

    from fleetsim.results.summary import json_safe

    sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()
