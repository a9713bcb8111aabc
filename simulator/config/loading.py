"""Loading a scenario: a TOML file read (bounded), ``--set section.key=value`` overrides
applied, the aliases of section keys renamed (vLLM's ``max_num_seqs``...), and the result
validated against the schema (:mod:`fleetsim.config.schema`) into a :class:`Scenario`. Every
problem is a :class:`ScenarioError` that names the file, the field path, the value and the fix
(the pydantic error formatting itself is :mod:`fleetsim.config.validation`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.schema import Scenario


def _format_validation(exc: ValidationError, source: str, data: Any = None) -> ScenarioError:
    """One clear line for a pydantic error (see :mod:`fleetsim.config.validation`)."""
    from fleetsim.config.validation import format_validation_error

    return format_validation_error(exc, Scenario, data, source)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is read as TOML, else as a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value (e.g. fleet.replicas=8)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {item!r}: empty key")
    from fleetsim.base import io

    text = f"v = {raw.strip()}"
    where = f"--set {io.clean(key.strip(), 80)}"
    io.check_depth(text, where, toml=True, fix="a value nested at most 64 deep")
    try:
        value = tomllib.loads(text)["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()
    return path, value


def _section_aliases(section: str) -> dict[str, str]:
    f = Scenario.model_fields.get(section)
    return dict(getattr(f.annotation, "ALIASES", {})) if f is not None else {}


def canonical_keys(data: dict, source: str = "") -> tuple[dict, dict[str, str]]:
    """``data`` with the aliases of every section's keys (``replicas_per_pod``, vLLM's
    ``max_num_seqs``...) renamed to the fields' own names; and {canonical path: path as written}
    for error messages. A field given under two of its names is an error."""
    out = dict(data)
    written: dict[str, str] = {}
    for section, sec in data.items():
        aliases = _section_aliases(section) if isinstance(section, str) else {}
        if not aliases or not isinstance(sec, dict):
            continue
        sec = dict(sec)
        for alias, name in aliases.items():
            if alias not in sec:
                continue
            if name in sec:
                raise ScenarioError(
                    f"{section}.{alias}",
                    sec[alias],
                    f"the same field as {section}.{name}, which is also given",
                    f"keep one of {section}.{name} and {section}.{alias}",
                    source,
                )
            sec[name] = sec.pop(alias)
            written[f"{section}.{name}"] = f"{section}.{alias}"
        out[section] = sec
    return out, written


def canonical_path(path: list[str]) -> list[str]:
    """An override's key path with a section alias renamed (``fleet.max_num_seqs`` ->
    ``fleet.max_batch_size``)."""
    if len(path) == 2:
        return [path[0], _section_aliases(path[0]).get(path[1], path[1])]
    return path


def toml_value(v: Any) -> str:
    """``v`` as TOML value text (what ``--set section.key=<text>`` parses back to ``v``), on
    one line: scalars written by ``tomli_w`` (any string round-trips: newlines, quotes,
    backslashes, control characters), arrays and tables inline, a key quoted where it is not
    bare."""
    import re

    import tomli_w

    if isinstance(v, Mapping):
        items = (
            f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', str(k)) else toml_value(str(k))} = "
            f"{toml_value(x)}"
            for k, x in v.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, float) and v != v:
        return "nan"
    try:
        return tomli_w.dumps({"v": v}).strip()[len("v = ") :]
    except TypeError:
        raise TypeError(type(v).__name__) from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """A copy of ``data`` with each ``section.key=value`` applied. Keys are matched by the
    fields' own names, whichever alias the file or the override uses. One field set twice
    under two of its names (``fleet.max_num_seqs`` and ``fleet.max_batch_size``) is refused,
    as the same pair in a file is (:func:`canonical_keys`); the same name twice: the later
    wins."""
    import copy

    out = copy.deepcopy(data)
    if overrides:
        out, _ = canonical_keys(out)
    spelled: dict[tuple[str, ...], str] = {}  # canonical path -> the key as --set wrote it
    for item in overrides or []:
        path, value = parse_override(item)
        from fleetsim.base import io

        key = io.clean(".".join(path), 80)
        path = canonical_path(path)
        first = spelled.setdefault(tuple(path), key)
        if first != key:
            raise ScenarioError(
                key,
                value,
                f"the same field as {first}, which --set also gives",
                f"keep one of --set {first}=... and --set {key}=...",
                "--set",
            )
        node = out
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: {p!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def scenario_from_dict(data: dict, source: str = "scenario") -> Scenario:
    """Validate a scenario dict; a ScenarioError on the first problem."""
    from fleetsim.config.validation import check_scalar_types

    if not isinstance(data, dict):
        raise ScenarioError(
            "(top level)",
            data,
            "a scenario is a table of sections",
            "start from a scenario in scenarios/ (e.g. scenarios/default.toml)",
            source,
        )
    check_scalar_types(data, Scenario, source)
    data, written = canonical_keys(data, source)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = _format_validation(exc, source, data)
        if err.field in written:  # name the field as the file spells it
            err = ScenarioError(written[err.field], err.value, err.problem, err.fix, source)
        raise err from None


def read_toml(path: str | Path) -> tuple[dict, str]:
    """The parsed TOML and its text; a UserError if unreadable, too large or malformed
    (bounded reading: :mod:`fleetsim.base.io`)."""
    from fleetsim.base import io

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise UserError(f"{io.clean(str(p))}: no such scenario file")
    text = io.read_text(p, "scenario")
    return io.parse_toml(text, io.clean(str(p))), text


def load_scenario(
    path: str | Path, overrides: list[str] | None = None, seed: int | None = None
) -> tuple[Scenario, str]:
    """Read, override and validate a scenario file. Returns the scenario and the file text."""
    data, text = read_toml(path)
    if seed is not None:
        data["seed"] = seed
    data = apply_overrides(data, overrides)
    return scenario_from_dict(data, str(path)), text


__all__ = [
    "apply_overrides",
    "canonical_keys",
    "canonical_path",
    "load_scenario",
    "parse_override",
    "read_toml",
    "scenario_from_dict",
    "toml_value",
]
