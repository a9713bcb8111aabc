"""The scenario file's JSON Schema (``fleetsim schema``), generated from
:mod:`fleetsim.config.schema` for editors that complete and check TOML files."""

from __future__ import annotations

import json

from fleetsim.config.schema import Scenario


def scenario_json_schema() -> dict:
    """The scenario file's JSON Schema (draft 2020-12), with the names the documentation uses.
    Aliases a section accepts (``fleet.max_num_seqs``...) are listed as properties too, each
    pointing at its field, so that editors complete and check them. Every property carries a
    description (:mod:`fleetsim.config.fields`: meaning, unit, vLLM's name; default and range
    from the schema)."""
    from fleetsim.config.fields import SCENARIO, describe

    schema = json.loads(
        json.dumps(Scenario.model_json_schema(mode="validation")).replace("``", "`")
    )  # (docstrings' RST literals as the single backticks editors show as code)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fleetsim scenario"
    defs = schema.get("$defs", {})
    for name, f in Scenario.model_fields.items():
        aliases = getattr(f.annotation, "ALIASES", {})
        sec = defs.get(getattr(f.annotation, "__name__", ""), {})
        props = sec.get("properties", {})
        for alias, field in aliases.items():
            if field in props:
                props[alias] = {
                    **props[field],
                    "description": f"another name of {name}.{field} (give one of them)",
                }
    describe(schema, SCENARIO)
    return schema


__all__ = ["scenario_json_schema"]
