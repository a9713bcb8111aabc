"""Turning scenario validation failures into one clear line: file, field path, value, fix.

pydantic reports every failed branch of a union (``float | list[float]``) with internal tags in
the location (``constrained-float``, ``list[...]``, ``literal[...]``). This module follows an
error's location through the schema, drops those tags, picks the branch that matches the shape
of what the user wrote, and describes what the field accepts ("a number >= 0, or a list of 24
numbers >= 0"). It also rejects booleans and quoted strings where a number goes, which
pydantic's lax mode would silently convert (``replicas = "2"``, ``requests_per_day = true``).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from fleetsim.base.errors import ScenarioError
from fleetsim.base.names import closest

# (annotation, constraint metadata) as carried through the walk
Ann = tuple[Any, tuple]
_NONE = type(None)


# ---------------------------------------------------------------------------------------------
# annotations
def _split(ann: Any, meta: tuple = ()) -> Ann:
    """Strip ``Annotated`` layers, collecting their constraints."""
    while get_origin(ann) is Annotated:
        base, *extra = get_args(ann)
        flat: list = []
        for m in extra:
            flat.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        ann, meta = base, meta + tuple(flat)
    return ann, meta


def _branches(ann: Any) -> list[Any] | None:
    """The non-None members of a union, or None if ``ann`` is not a union."""
    if get_origin(ann) in (Union, types.UnionType):
        return [a for a in get_args(ann) if a is not _NONE]
    return None


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Fields by name and by alias."""
    out: dict[str, FieldInfo] = {}
    for name, f in model.model_fields.items():
        out[name] = f
        if f.alias:
            out[f.alias] = f
    for alias, name in getattr(model, "ALIASES", {}).items():  # renamed before validation
        out[alias] = model.model_fields[name]
    return out


def _field_ann(f: FieldInfo) -> Ann:
    return _split(f.annotation, tuple(f.metadata))


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _bounds(meta: tuple) -> str:
    parts = []
    for m in meta:
        for cls, op, attr in (
            (at.Ge, ">=", "ge"),
            (at.Gt, ">", "gt"),
            (at.Le, "<=", "le"),
            (at.Lt, "<", "lt"),
        ):
            if isinstance(m, cls):
                parts.append(f"{op} {_num(getattr(m, attr))}")
    return " and ".join(parts)


def describe(ann: Any, meta: tuple = (), plural: bool = False) -> str:
    """What a field accepts, in words."""
    ann, meta = _split(ann, meta)
    br = _branches(ann)
    if br is not None:
        models = [b for b in br if _is_model(b)]
        if len(models) == len(br) and len(br) > 1:  # a tagged union of tables
            tags = _tags(br)
            return f"a table with {tags[0]} = one of {', '.join(map(repr, tags[1]))}"
        return ", or ".join(describe(b, meta if len(br) == 1 else (), plural) for b in br)
    b = _bounds(meta)
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(ann))
    if ann is bool:
        return "true or false"
    if ann is int:
        return ("whole numbers" if plural else "a whole number") + (f" {b}" if b else "")
    if ann is float:
        return ("numbers" if plural else "a number") + (f" {b}" if b else "")
    if ann is str:
        return "a string in quotes"
    if ann in (datetime, date):
        return "a date-time like 2026-01-01T00:00:00Z"
    if get_origin(ann) is list:
        n = [m for m in meta if isinstance(m, (at.MinLen, at.MaxLen))]
        lo = next((m.min_length for m in n if isinstance(m, at.MinLen)), None)
        hi = next((m.max_length for m in n if isinstance(m, at.MaxLen)), None)
        count = f"{lo} " if lo is not None and lo == hi else ""
        (item,) = get_args(ann) or (Any,)
        return f"a list of {count}{describe(item, (), plural=True)}"
    if _is_model(ann):
        return f"a table (keys: {', '.join(ann.model_fields)})"
    return getattr(ann, "__name__", str(ann))


def _tags(models: list[type[BaseModel]]) -> tuple[str, list]:
    """The discriminator key of a tagged union of tables and its values."""
    for key, f in models[0].model_fields.items():
        if get_origin(_split(f.annotation)[0]) is Literal and all(
            get_origin(_split(m.model_fields[key].annotation)[0]) is Literal
            for m in models
            if key in m.model_fields
        ):
            return key, [get_args(_split(m.model_fields[key].annotation)[0])[0] for m in models]
    return "type", [m.__name__ for m in models]


def _kinds(ann: Any) -> set[str]:
    """The shapes a field accepts: number, bool, str, list, table, other."""
    ann, _ = _split(ann)
    br = _branches(ann)
    if br is not None:
        return set().union(*(_kinds(b) for b in br))
    if get_origin(ann) is Literal:
        return {
            "bool" if isinstance(v, bool) else "str" if isinstance(v, str) else "number"
            for v in get_args(ann)
        }
    if ann is bool:
        return {"bool"}
    if ann in (int, float):
        return {"number"}
    if ann is str or ann in (datetime, date):
        return {"str"}
    if get_origin(ann) is list:
        return {"list"}
    if _is_model(ann):
        return {"table"}
    return {"other"}


def _shape(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, dict):
        return "table"
    return "other"


def _pick_model(models: list, v: dict) -> Any:
    """The member of a tagged union of tables that ``v`` names (by its tag), or None."""
    key, tags = _tags(models)
    return models[tags.index(v[key])] if v.get(key) in tags else None


# ---------------------------------------------------------------------------------------------
# booleans and strings where numbers go
def check_scalar_types(data: Any, root: type[BaseModel], source: str) -> None:
    """Reject ``true``/``false`` and quoted strings in numeric fields (pydantic would convert
    ``"2"`` to 2 and ``true`` to 1), and quoted strings and numbers in true/false fields
    (``"yes"``, ``"false"``, ``0``): a ScenarioError naming the field."""
    if isinstance(data, dict):
        _check_table(data, root, "", source)


def _check_table(data: dict, model: type[BaseModel], path: str, source: str) -> None:
    fields = _fields(model)
    for key, v in data.items():
        f = fields.get(key) if isinstance(key, str) else None
        if f is not None:
            _check_value(v, *_field_ann(f), f"{path}.{key}" if path else key, source)


def _check_value(v: Any, ann: Any, meta: tuple, path: str, source: str) -> None:
    ann, meta = _split(ann, meta)
    br = _branches(ann)
    if isinstance(v, dict):
        cands = [b for b in (br or [ann]) if _is_model(_split(b)[0])]
        if len(cands) == 1:
            _check_table(v, _split(cands[0])[0], path, source)
        elif len(cands) > 1 and (m := _pick_model(cands, v)) is not None:
            _check_table(v, m, path, source)
        return
    if isinstance(v, list):
        lists = [_split(b) for b in (br or [ann]) if get_origin(_split(b)[0]) is list]
        if len(lists) == 1 and get_args(lists[0][0]):
            item = get_args(lists[0][0])[0]
            for i, x in enumerate(v):
                _check_value(x, item, (), f"{path}[{i}]", source)
        return
    shape = _shape(v)
    kinds = _kinds(ann)
    if shape in ("bool", "str") and "number" in kinds and shape not in kinds:
        what = "a boolean" if shape == "bool" else "a quoted string"
        fix = f"use {describe(ann, meta)}"
        if shape == "str" and _parses_as_number(v):
            fix = "write the number without quotes"
        elif shape == "str" and (secs := _seconds(v)) is not None and path.endswith("_s"):
            fix = f"the field is in seconds, without a unit: {secs:g}"
        raise ScenarioError(path, v, f"{what} where a number goes", fix, source)
    if shape in ("str", "number") and "bool" in kinds and shape not in kinds:
        # pydantic's lax mode reads "yes", "no", "off", 0 and 1 as booleans: a typed value
        # in a true/false field is refused as a quoted number is in a numeric one
        what = "a quoted string" if shape == "str" else "a number"
        word = str(v).strip().lower()
        fix = "use true or false"
        if word in ("true", "false", "yes", "no", "on", "off", "1", "0", "y", "n", "t", "f"):
            truth = word in ("true", "yes", "on", "1", "y", "t")
            fix = f"write {str(truth).lower()} without quotes" if shape == "str" else fix
        raise ScenarioError(path, v, f"{what} where true or false goes", fix, source)


_TIME_UNITS = {"ms": 1e-3, "us": 1e-6, "s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0}


def _seconds(v: str) -> float | None:
    """``'50ms'`` / ``'2 s'`` / ``'10min'`` in seconds (a duration written with its unit), else
    None."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]+)\s*", v)
    if m is None or m.group(2) not in _TIME_UNITS:
        return None
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _parses_as_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# pydantic errors -> one line
def _walk(loc: tuple, root: type[BaseModel]) -> dict:
    """Follow an error location through the schema.

    Returns the user-facing path, the model that holds the last key (for 'did you mean'), the
    annotation at the end, and the union met on the way (its path and annotation), if any."""
    ann: Ann = (root, ())
    parent: type[BaseModel] | None = None
    path = ""
    union: tuple[str, Ann, str] | None = None  # (path, annotation, branch tag)
    for part in loc:
        base, meta = _split(*ann)
        br = _branches(base)
        if br is not None and len(br) == 1:  # ``Model | None``: pydantic adds no tag, descend
            base, meta = _split(br[0], meta)
            br = _branches(base)
        if isinstance(part, int):
            path += f"[{part}]"
            args = get_args(base) if get_origin(base) is list else ()
            ann = (args[0], ()) if args else (None, ())
            continue
        if _is_model(base):
            parent = base
            f = _fields(base).get(part)
            path = f"{path}.{part}" if path else part
            ann = _field_ann(f) if f else (None, ())
            continue
        if br is not None:  # a union branch tag: pick the branch, keep the path
            branch = _branch_for_tag(br, part)
            if union is None and not _is_model(branch):  # (a tagged table is reported inside)
                union = (path, (base, meta), part)
            ann = (branch, ())
            continue
        path = f"{path}.{part}" if path else part
        ann = (None, ())
    return {"path": path or "(top level)", "parent": parent, "ann": ann, "union": union}


def _section_model(f: FieldInfo) -> type[BaseModel] | None:
    """The table a field holds (``X`` or ``X | None``), else None."""
    base = _split(*_field_ann(f))[0]
    for b in [base, *(_branches(base) or [])]:
        if _is_model(_split(b)[0]):
            return _split(b)[0]
    return None


def _home_section(key: str, root: type[BaseModel], parent: type[BaseModel] | None) -> str:
    """The one other top-level section of ``root`` that has a field (or alias) ``key``, for a
    key written at the top level or under the wrong header (``[cost] rent_usd_per_gpu_hour``
    is ``hardware``'s); '' if none or several, or if the key sits deeper."""
    sections = {n: _section_model(f) for n, f in root.model_fields.items()}
    if key in _fields(root) or (parent is not root and parent not in sections.values()):
        return ""
    if parent is not None and parent is not root:  # a table of its own holds it ([disaggregation])
        subs = [_section_model(f) for f in parent.model_fields.values()]
        if any(m is not None and key in _fields(m) for m in subs):
            return ""
    homes = [
        n for n, m in sections.items() if m is not None and m is not parent and key in _fields(m)
    ]
    return homes[0] if len(homes) == 1 else ""


def _branch_for_tag(br: list, tag: str) -> Any:
    for b in br:
        base, _ = _split(b)
        if _is_model(base):
            if tag == base.__name__ or any(
                get_origin(_split(f.annotation)[0]) is Literal
                and tag in get_args(_split(f.annotation)[0])
                for f in base.model_fields.values()
            ):
                return b
        elif (
            (tag.startswith("list[") and get_origin(base) is list)
            or (tag.startswith("literal[") and get_origin(base) is Literal)
            or (base in (int, float, str, bool) and tag.split("-")[-1] == base.__name__)
        ):
            return b
    return None


def _tag_shape(tag: str) -> str:
    if tag.startswith("list["):
        return "list"
    if tag.startswith("literal[") or tag.endswith("str"):
        return "str"
    if tag.endswith(("float", "int")):
        return "number"
    if tag.endswith("bool"):
        return "bool"
    return "table"


def _lookup(data: Any, loc: tuple, root: type[BaseModel]) -> Any:
    """The raw input at the user-facing part of ``loc`` (union tags skipped)."""
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node)
        ):
            node = node[part]
        elif isinstance(part, str) and not isinstance(node, dict):
            continue
        else:
            return node
    return node


def _problem(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "should be")
    ctx = err.get("ctx") or {}
    if kind in ("too_short", "too_long") and "actual_length" in ctx:
        return f"has {ctx['actual_length']} values"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "should be a table"
    for op, key in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt")):
        if key in ctx and kind.startswith(("greater", "less")):
            return f"should be {op} {_num(ctx[key])}"
    if kind == "int_from_float":
        return "should be a whole number"
    if kind == "literal_error":
        return "not an accepted value"
    return msg


def format_validation_error(
    exc: ValidationError, root: type[BaseModel], data: Any, source: str
) -> ScenarioError:
    """One ScenarioError for a pydantic ValidationError (the most useful of its errors)."""
    errs = exc.errors(include_url=False)
    # a misspelt key also shows up as the correct key missing: report the misspelling
    err = next((e for e in errs if e["type"] == "extra_forbidden"), errs[0])
    w = _walk(tuple(err["loc"]), root)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = w["parent"]
        known = list(parent.model_fields) if parent else []
        key = str(err["loc"][-1])
        home = _home_section(key, root, parent)
        close = closest(key, known)
        if home:
            fix = f"it belongs to [{home}]: {home}.{key}"
        else:
            fix = f"did you mean {close!r}?" if close else f"known keys: {', '.join(known)}"
        return ScenarioError(w["path"], err.get("input"), "unknown key", fix, source)
    if kind == "missing":
        ann, meta = w["ann"]
        return ScenarioError(
            w["path"],
            None,
            "is required",
            f"add {err['loc'][-1]!s} = {describe(ann, meta)}",
            source,
        )
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        ann, _ = _split(*w["ann"])
        models = [b for b in (_branches(ann) or []) if _is_model(b)]
        key, tags = _tags(models) if models else ("dist", [])
        fix = f"{key} is one of {', '.join(map(repr, tags))}"
        if kind == "union_tag_not_found":
            return ScenarioError(w["path"], err.get("input"), f"has no {key!r} key", fix, source)
        value = (err.get("ctx") or {}).get("tag", err.get("input"))
        return ScenarioError(f"{w['path']}.{key}", value, "not an accepted value", fix, source)
    if w["union"] is not None:
        upath, (uann, umeta), _ = w["union"]
        shown = _lookup(data, tuple(err["loc"]), root)
        uvalue = _lookup(data, _loc_prefix(err["loc"], upath, root), root)
        accepted = describe(uann, umeta)
        # the errors of the branch that matches what the user wrote
        same = [(e, _walk(tuple(e["loc"]), root)) for e in errs]
        same = [(e, we) for e, we in same if we["union"] and we["union"][0] == upath]
        mine = [(e, we) for e, we in same if _tag_shape(we["union"][2]) == _shape(uvalue)]
        if not mine:
            kind_of = {
                "str": "a string",
                "number": "a number",
                "list": "a list",
                "bool": "a boolean",
                "table": "a table",
            }.get(_shape(uvalue), type(uvalue).__name__)
            return ScenarioError(
                upath, uvalue, f"{kind_of} is not accepted here", f"use {accepted}", source
            )
        e, we = mine[0]
        value = e.get("input") if we["path"] != upath else uvalue
        return ScenarioError(
            we["path"],
            value if value is not None else shown,
            _problem(e),
            f"use {accepted}",
            source,
        )
    ann, meta = w["ann"]
    value = err.get("input")
    problem = _problem(err)
    if ann is None or (_is_model(_split(*w["ann"])[0]) and kind.startswith("value_error")):
        fix = ""  # a check across the fields of a table: its message says what to change
    elif kind in ("dict_type", "model_type", "model_attributes_type") and _is_model(ann):
        fix = f"write it as a [{w['path']}] table"
    else:
        fix = f"use {describe(ann, meta)}"
        if (
            kind.endswith(("_type", "_parsing"))
            and isinstance(value, str)
            and "number" in _kinds(ann)
        ):
            fix += " (quotes make a string)"
    return ScenarioError(w["path"], value, problem, fix, source)


def _loc_prefix(loc: Any, upath: str, root: type[BaseModel]) -> tuple:
    """The shortest prefix of ``loc`` whose user-facing path is ``upath``."""
    loc = tuple(loc)
    for i in range(len(loc) + 1):
        if _walk(loc[:i], root)["path"] == upath:
            return loc[:i]
    return loc


__all__ = ["check_scalar_types", "describe", "format_validation_error"]
