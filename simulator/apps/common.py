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

import argparse
import io
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn, cast

if TYPE_CHECKING:
    from fleetsim.results.output import RunOutput

__all__ = ["OneLineParser", "open_output", "out_dir"]


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


class OneLineParser(argparse.ArgumentParser):
    """argparse with the README's rule for a user's mistake: one line naming the option, the
    bad value and the fix (no usage block), exit code 2 as argparse's own; ``--help`` is
    argparse's. Subcommand parsers made by ``add_subparsers`` are of the same class."""

    def error(self, message: str) -> NoReturn:
        from fleetsim.base.io import clean

        self.exit(2, f"{self.prog}: error: {clean(usage_problem(self, message), 600)}\n")


def usage_problem(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's ``message`` with the fix for the mistakes it reports."""
    import re

    prog = parser.prog
    see = f"{prog} --help lists the options"
    m = re.fullmatch(r"argument (\S+?)(?:/\S+)?: invalid (int|float) value: '(.*)'", message)
    if m:
        opt, kind, _ = m.groups()
        default = _default_of(parser, opt)
        eg = default if isinstance(default, (int, float)) and not isinstance(default, bool) else 2
        what = "a whole number" if kind == "int" else "a number"
        return f"{message} (fix: {opt} takes {what}, e.g. {opt} {eg})"
    m = re.fullmatch(
        r"argument (\S+?)(?:/\S+)?: invalid choice: '(.*)' \(choose from (.*)\)", message
    )
    if m:
        opt, value, choices = m.groups()
        return f"argument {opt}: invalid choice: {value!r} (fix: one of {choices})"
    m = re.fullmatch(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
    if m:
        opt = m.group(1)
        return f"{message} (fix: give {opt} a value, e.g. {opt} VALUE; {see})"
    m = re.fullmatch(r"unrecognized arguments: (.*)", message)
    if m:
        words = m.group(1).split()
        field = next((f for w in words if (f := scenario_field(w))), None)
        if field is not None and any(a.dest == "overrides" for a in parser._actions):
            i = next(i for i, w in enumerate(words) if scenario_field(w) == field)
            opt, eq, value = words[i].partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value = words[i + 1]
            shown = f"{opt} {value}" if value else opt
            if not value:
                value = "true" if is_flag_field(field) else "VALUE"
            return (
                f"{shown}: not an option of {prog}; {field} is a scenario field (fix: "
                f"--set {field}={value})"
            )
        return f"{message} (fix: {see})"
    return f"{message} (fix: {see})"


def _default_of(parser: argparse.ArgumentParser, opt: str):
    for a in parser._actions:
        if opt in a.option_strings:
            return a.default
    return None


#: options of other fleetsim commands (``plan --tp``, ``latency --dp``...) and a section's
#: name, typed to ``run`` / ``validate`` / ``sweep``: the scenario field each stands for
FLAG_FIELDS = {
    "tp": "fleet.tensor_parallel",
    "dp": "fleet.data_parallel",
    "ep": "fleet.expert_parallel",
    "model": "model.name",  # (a section: "--set model=x" replaced the whole section)
    "gpus": "hardware.gpu",
}


def scenario_field(word: str) -> str | None:
    """``section.key`` when ``word`` (``--hours``, ``--hours=24``) names one scenario field of
    exactly one section (a top-level scalar, ``name`` or ``seed``; a section's alias, vLLM's
    ``--tensor-parallel-size``; another command's option, :data:`FLAG_FIELDS`), else None (the
    fix of an option that is a field: ``--set``)."""
    if not word.startswith("--"):
        return None
    name = word[2:].split("=", 1)[0].replace("-", "_")
    if name in FLAG_FIELDS:
        return FLAG_FIELDS[name]
    from fleetsim.config.schema import Scenario

    hits = []
    for sec, f in Scenario.model_fields.items():
        ann = f.annotation
        types = [ann, *getattr(ann, "__args__", ())]
        model = next((t for t in types if hasattr(t, "model_fields")), None)
        if model is None:
            if sec == name:  # a top-level scalar: name, seed
                hits.append(sec)
            continue
        if name in model.model_fields or name in getattr(model, "ALIASES", {}):
            hits.append(f"{sec}.{name}")
    return hits[0] if len(hits) == 1 else None


def is_flag_field(field: str) -> bool:
    """Whether the scenario field ``section.key`` is a true / false one (an option typed
    without a value, ``--expert-parallel``, is ``--set field=true``)."""
    from fleetsim.config.schema import Scenario

    sec, _, key = field.partition(".")
    f = Scenario.model_fields.get(sec)
    types = [f.annotation, *getattr(f.annotation, "__args__", ())] if f is not None else []
    model = next((t for t in types if hasattr(t, "model_fields")), None)
    if model is None or not key:
        return False
    key = getattr(model, "ALIASES", {}).get(key, key)
    return key in model.model_fields and model.model_fields[key].annotation is bool
