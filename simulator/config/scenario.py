"""The names this module held before ``config/`` was split, re-exported so that older imports
keep working. New code imports from the module that holds each concern:

* :mod:`fleetsim.config.schema`: the sections and :class:`Scenario`;
* :mod:`fleetsim.config.loading`: reading a file, ``--set`` overrides, key aliases, validation;
* :mod:`fleetsim.config.resolve`: ``resolve``, joining a scenario with the catalogs;
* :mod:`fleetsim.config.resolved`: what it produces (``Resolved``, ``GpuSpec``, ``KvBudget``);
* :mod:`fleetsim.config.aggregated`: an aggregated fleet's resolution and cross-field checks;
* :mod:`fleetsim.config.pools`: a disaggregated fleet's pools and link;
* :mod:`fleetsim.config.schedules`: diurnal curves, hourly profiles, autoscaler checks;
* :mod:`fleetsim.config.budget`: the work budget of a run;
* :mod:`fleetsim.config.jsonschema`: the scenario file's JSON Schema.
"""

from __future__ import annotations

from fleetsim.config.aggregated import model_spec as _model_spec
from fleetsim.config.budget import (
    MAX_ARRIVALS_PER_POD,
    MAX_ARRIVALS_PER_POD_HOUR,
    MAX_AUTOSCALER_TICKS,
    MAX_ITERATIONS,
    MAX_SIMULATED_ARRIVALS,
    MAX_SIMULATED_POD_HOURS,
    check_work,
)
from fleetsim.config.jsonschema import scenario_json_schema
from fleetsim.config.loading import (
    apply_overrides,
    canonical_keys,
    load_scenario,
    parse_override,
    read_toml,
    scenario_from_dict,
    toml_value,
)
from fleetsim.config.pools import resolve_disaggregated
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import (
    GpuSpec,
    KvBudget,
    Resolved,
    activation_reserve_bytes,
    kv_budget,
    resolved_dict,
)
from fleetsim.config.schedules import (
    check_autoscaler,
    diurnal_weights,
    hourly_values,
    load_schedule_file,
)
from fleetsim.config.schema import ModelSection, Scenario
from fleetsim.device.modelspec import DTYPE_BYTES

__all__ = [
    "DTYPE_BYTES",
    "MAX_ARRIVALS_PER_POD",
    "MAX_ARRIVALS_PER_POD_HOUR",
    "MAX_AUTOSCALER_TICKS",
    "MAX_ITERATIONS",
    "MAX_SIMULATED_ARRIVALS",
    "MAX_SIMULATED_POD_HOURS",
    "GpuSpec",
    "KvBudget",
    "ModelSection",
    "Resolved",
    "Scenario",
    "_model_spec",
    "activation_reserve_bytes",
    "apply_overrides",
    "canonical_keys",
    "check_autoscaler",
    "check_work",
    "diurnal_weights",
    "hourly_values",
    "kv_budget",
    "load_scenario",
    "load_schedule_file",
    "parse_override",
    "read_toml",
    "resolve",
    "resolve_disaggregated",
    "resolved_dict",
    "scenario_from_dict",
    "scenario_json_schema",
    "toml_value",
]
