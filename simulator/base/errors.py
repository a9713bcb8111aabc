"""User-facing errors: one clear line, exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (scenario, flags, data files). Printed as one line."""

    exit_code = 2


class ScenarioError(UserError):
    """A scenario field is wrong: names the file, the field path, the value and the fix."""

    def __init__(self, field: str, value: object, problem: str, fix: str = "", source: str = ""):
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        self.source = source
        where = f"{source}: " if source else ""
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = f"{where}{field} = {shown}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class InvariantError(RuntimeError):
    """An internal consistency check failed at the end of a run: a bug, not a user error."""
