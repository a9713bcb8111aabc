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
