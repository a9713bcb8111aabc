"""Profile files: the JSON contract between ``fleetsim calibrate`` and the simulator.

A profile describes a device for the latency model (:mod:`fleetsim.device.latency`)::

    {
      "format": "fleetsim-profile/1",
      "kind": "roofline",                 # or "linear"
      "name": "cpu-llama-3.1-8b-l2",      # free text
      "device": {"type": "cpu", "name": "...", "torch_version": "...", "dtype": "bf16"},
      "catalog_gpu": null,                # or the catalog GPU this device is (e.g. "h200")
      "peak_flops": ..., "mem_bw_bytes_per_s": ..., "mem_bytes": ...,
      "compute_eff_max": ..., "compute_eff_half_tokens": ..., "memory_eff": ...,
      "overhead_s": ..., "overhead_per_layer_s": ...,
      "link_bw_bytes_per_s": ..., "link_latency_s": ...,              # optional
      "compute_eff_table": [[1, 0.05], [16, 0.2], ...] | null,       # optional: eff_c by T
      "power": {"idle_w":..,"max_w":..,"active_w":..,"compute_w":..,"memory_w":..,
                "method": "nvml-energy" | "nvml" | "rapl" | "assumed"} | null,
      "fit": {"r2": ..., "max_rel_err": ..., "n_points": ...},          # optional
      "model": "llama-3.1-8b", "created_utc": "...", "grid_file": "....parquet"
    }

A ``linear`` profile carries ``base_s``, ``prefill_base_s``, ``per_prefill_token_s``,
``per_seq_s`` and ``per_context_token_s`` instead of the roofline fields.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from fleetsim.base.errors import UserError
from fleetsim.base.io import clean

# the power checks and the catalog's analytic profiles (no pydantic: a run from the catalog does
# not build this module's models), re-exported
from fleetsim.device.analytic import MAX_BUSY_OVER_TDP as MAX_BUSY_OVER_TDP
from fleetsim.device.analytic import MAX_POWER_W, power_problem
from fleetsim.device.analytic import catalog_profile as catalog_profile
from fleetsim.device.kernels import kernel_fit_from_dict, kernel_fit_to_dict
from fleetsim.device.latency import (
    POWER_TERMS_W,
    LinearProfile,
    PowerSpec,
    Profile,
    RooflineProfile,
)
from fleetsim.device.moe import moe_constants_problem, profile_moe_fit

FORMAT = "fleetsim-profile/1"

_ROOFLINE_REQUIRED = (
    "peak_flops",
    "mem_bw_bytes_per_s",
    "mem_bytes",
    "compute_eff_max",
    "compute_eff_half_tokens",
    "memory_eff",
    "overhead_s",
)
_ROOFLINE_OPTIONAL = (
    "overhead_per_layer_s",
    "link_bw_bytes_per_s",
    "link_latency_s",
    "peak_flops_fp8",
    "peak_flops_int8",
    "peak_flops_fp4",
)
_LINEAR_FIELDS = (
    "base_s",
    "prefill_base_s",
    "per_prefill_token_s",
    "per_seq_s",
    "per_context_token_s",
    "mem_bytes",
    "peak_flops",
    "mem_bw_bytes_per_s",
)
_POWER_FIELDS = ("idle_w", "max_w", *POWER_TERMS_W, "compute_u0")


# Upper bounds of profile fields: orders of magnitude above any device, so that every product
# in the latency and energy model stays finite (times in seconds per iteration or per token).
_MAX = {  # (rates up to 1e30: tests use "infinitely fast" profiles; work / 1e30 stays > 0)
    "peak_flops": 1e30,
    "mem_bw_bytes_per_s": 1e30,
    "mem_bytes": 1e15,
    "link_bw_bytes_per_s": 1e30,
    "compute_eff_max": 1.5,
    "memory_eff": 1.5,
    "compute_eff_half_tokens": 1e9,
}
_MAX_TIME_S = 3600.0  # any *_s field: one iteration, or one token's share of it


# ---- the profile file as a pydantic model ---------------------------------------------------
_FIX = "regenerate it with `fleetsim calibrate`"


def _nonneg(hi: float, doc: str, default: Any = ...) -> Any:
    """A finite number in [0, hi] (JSON: an integer or a float; not a boolean or a string);
    required unless a ``default`` is given."""
    return Field(default, strict=True, ge=0.0, le=hi, allow_inf_nan=False, description=doc)


def _time(doc: str, default: Any = ...) -> Any:
    return _nonneg(_MAX_TIME_S, doc, default)


class PowerFile(BaseModel):
    """``power``: the device's linear power model, watts per GPU (see DESIGN.md, "Power").
    Other keys (``method``, notes) are provenance and kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    idle_w: float = _nonneg(MAX_POWER_W, "power with no request in flight (W)")
    max_w: float = _nonneg(MAX_POWER_W, "board power limit, the TDP (W)")
    active_w: float = _nonneg(MAX_POWER_W, "added while any request is in flight (W)", 0.0)
    compute_w: float = _nonneg(MAX_POWER_W, "added at full compute utilisation (W)", 0.0)
    memory_w: float = _nonneg(MAX_POWER_W, "added at full memory-bandwidth utilisation (W)", 0.0)
    kv_w: float = _nonneg(
        MAX_POWER_W, "added at full bandwidth of KV-cache and linear-state traffic (W)", 0.0
    )
    comm_w: float | None = _nonneg(
        MAX_POWER_W, "above idle while waiting on multi-GPU communication (W)", None
    )
    moe_loop_w: float | None = _nonneg(
        MAX_POWER_W, "above idle during the fp8 block-scaled fused-MoE K loop (W)", None
    )
    moe_compute_w: float = _nonneg(
        MAX_POWER_W,
        "added at full peak FLOP/s of routed-expert FLOPs, on top of compute_w (W)",
        0.0,
    )
    host_w: float | None = _nonneg(
        MAX_POWER_W, "above idle while an iteration waits on the host (its overhead) (W)", None
    )
    compute_u0: float | None = Field(
        None,
        gt=0.0,
        le=1e6,
        description="saturation of the compute terms: factor (1 + u0) / (u_c + u0); unset: linear",
    )
    method: str | None = Field(
        None,
        description='"nvml-energy" (NVML\'s energy counter), "nvml" (sampled power), "rapl" or '
        '"assumed"',
    )

    @model_validator(mode="after")
    def _physical(self) -> PowerFile:
        bad = power_problem(self.spec())
        if bad is not None:
            raise ValueError(f"power.{bad[0]} = {bad[1]!r}: {bad[2]}")
        return self

    def spec(self) -> PowerSpec:
        return PowerSpec(
            idle_w=self.idle_w,
            max_w=self.max_w,
            active_w=self.active_w,
            compute_w=self.compute_w,
            memory_w=self.memory_w,
            kv_w=self.kv_w,
            comm_w=self.comm_w,
            moe_loop_w=self.moe_loop_w,
            moe_compute_w=self.moe_compute_w,
            host_w=self.host_w,
            compute_u0=self.compute_u0,
            confidence=f"from the profile (method {self.method})" if self.method else "",
        )


class _ProfileBase(BaseModel):
    """The keys every profile has; unknown keys are provenance (``device``, ``fit``, ``grid``,
    ``micro``, ``notes``...) written by ``fleetsim calibrate`` and kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["fleetsim-profile/1"] = Field(description="the file format and its version")
    name: str | None = Field(None, description="free text (default: the file's name)")
    power: PowerFile | None = Field(None, description="the power model (null: the catalog's)")
    catalog_gpu: str | None = Field(None, description="the catalog GPU this device is, or null")
    model: str | None = Field(None, description="the model the profile was measured with")
    created_utc: str | None = None
    device: dict[str, Any] | None = Field(None, description="what the profile was measured on")
    fit: dict[str, Any] | None = Field(None, description="quality of the fit (r2, errors...)")
    grid_file: str | None = Field(None, description="the measured grid (Parquet), beside it")


class RooflineFile(_ProfileBase):
    """A roofline profile: an iteration costs max(FLOPs / compute, bytes / bandwidth) plus
    overheads (fleetsim.device.latency)."""

    kind: Literal["roofline"]
    peak_flops: float = _nonneg(_MAX["peak_flops"], "dense peak FLOP/s (> 0)")
    mem_bw_bytes_per_s: float = _nonneg(_MAX["mem_bw_bytes_per_s"], "memory bandwidth (> 0)")
    mem_bytes: float = _nonneg(_MAX["mem_bytes"], "device memory (> 0)")
    compute_eff_max: float = _nonneg(_MAX["compute_eff_max"], "compute efficiency cap (> 0)")
    compute_eff_half_tokens: float = _nonneg(
        _MAX["compute_eff_half_tokens"], "tokens per iteration at half the efficiency cap"
    )
    memory_eff: float = _nonneg(_MAX["memory_eff"], "achieved fraction of bandwidth (> 0)")
    overhead_s: float = _time("fixed time per iteration")
    overhead_per_layer_s: float | None = _time("time per layer per iteration", None)
    link_bw_bytes_per_s: float | None = _nonneg(_MAX["link_bw_bytes_per_s"], "GPU link B/s", None)
    link_latency_s: float | None = _time("GPU link latency", None)
    peak_flops_fp8: float | None = _nonneg(math.inf, "dense FP8 peak FLOP/s", None)
    peak_flops_int8: float | None = _nonneg(math.inf, "dense INT8 peak FLOP/s", None)
    peak_flops_fp4: float | None = _nonneg(math.inf, "dense FP4 (NVFP4) peak FLOP/s", None)
    compute_eff_table: list[tuple[float, float]] | None = Field(
        None,
        description="measured compute efficiency by tokens per iteration: [[tokens, eff], ...] "
        "with tokens >= 1 strictly increasing and 0 < eff <= 1.5",
    )
    kernels: dict[str, Any] | None = Field(None, description="the kernel model (calibrate)")
    source: str = Field("measured", description="measured, analytic, vidur...")
    stack_constants: dict[str, dict[str, float]] | None = Field(
        None,
        description="serving-stack constants by stack, e.g. {'vllm-v1': {'overhead_s': ...}} "
        "(`fleetsim calibrate --from-mlenergy`): applied as fleet.serving_stack runs them, in "
        "place of the catalog's (device/stack.py apply_stack)",
    )
    moe_constants: dict[str, float] | None = Field(
        None,
        description="fused-MoE kernel constants (device/moe.py FusedMoeFit: k_step_s, "
        "k_step_fp8_s, k_step_fp8_default_s, layer_s, mma_frac, fi_layer_s, fi_bw_frac, "
        "fp8_wave_frac; `fleetsim calibrate --from-mlenergy --fit-moe`): in place of the "
        "catalog's (catalog/moe.toml) for this device; a key it lacks keeps the catalog's",
    )

    @field_validator("moe_constants", mode="after")
    @classmethod
    def _moe_constants(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            why = moe_constants_problem(v)
            if why:
                raise ValueError(f"{why} (fix: regenerate it with `fleetsim calibrate`)")
        return v

    @field_validator("compute_eff_table", mode="before")
    @classmethod
    def _table(cls, v: Any) -> Any:
        t = eff_table_from_json(v)
        return None if t is None else [list(p) for p in t]

    @model_validator(mode="after")
    def _positive(self) -> RooflineFile:
        for k in ("peak_flops", "mem_bw_bytes_per_s", "mem_bytes", "compute_eff_max", "memory_eff"):
            if getattr(self, k) <= 0:
                raise ValueError(f"field {k!r} = {getattr(self, k)!r} must be positive")
        return self


class LinearFile(_ProfileBase):
    """A linear profile: iteration time linear in tokens, sequences and context (a fit of one
    engine's iterations, ``fleetsim replay``)."""

    kind: Literal["linear"]
    base_s: float = _time("fixed time per iteration")
    prefill_base_s: float = _time("added when an iteration has a prefill", 0.0)
    per_prefill_token_s: float = _time("per prefill token", 0.0)
    per_seq_s: float = _time("per sequence in the batch", 0.0)
    per_context_token_s: float = _time("per token of context read", 0.0)
    mem_bytes: float = _nonneg(_MAX["mem_bytes"], "device memory", 80e9)
    peak_flops: float = _nonneg(_MAX["peak_flops"], "peak FLOP/s (for utilisation)", 1e15)
    mem_bw_bytes_per_s: float = _nonneg(
        _MAX["mem_bw_bytes_per_s"], "bandwidth (for utilisation)", 3e12
    )


ProfileFile = Annotated[RooflineFile | LinearFile, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[RooflineFile | LinearFile] = TypeAdapter(ProfileFile)


def profile_json_schema() -> dict:
    """The profile file's JSON Schema (draft 2020-12): what ``fleetsim schema --profile``
    prints."""
    schema = json.loads(json.dumps(_ADAPTER.json_schema(mode="validation")).replace("``", "`"))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fleetsim profile"
    schema["description"] = (
        f"A device profile for the latency model ({FORMAT}); written by `fleetsim calibrate`."
    )
    return schema


def eff_table_from_json(v: Any) -> tuple[tuple[float, float], ...] | None:
    """The ``compute_eff_table`` of a profile: ``[[tokens, eff], ...]`` with tokens >= 1 strictly
    increasing and 0 < eff <= 1.5, or null (ValueError otherwise, with the fix)."""
    if v is None:
        return None
    fix = (
        "(fix: a list of [tokens, efficiency] pairs, tokens >= 1 strictly increasing, "
        "0 < efficiency <= 1.5; or regenerate it with `fleetsim calibrate`)"
    )
    if not isinstance(v, list) or not v:
        raise ValueError(f"field 'compute_eff_table' = {v!r} must be a non-empty list {fix}")
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(v):
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in pair
            )
        )
        if not ok:
            raise ValueError(
                f"compute_eff_table[{i}] = {pair!r} is not a "
                f"[tokens, efficiency] pair of finite numbers {fix}"
            )
        t, e = float(pair[0]), float(pair[1])
        if t < 1.0 or (out and t <= out[-1][0]):
            raise ValueError(
                f"compute_eff_table[{i}] tokens = {pair[0]!r} must be >= 1 "
                f"and greater than the previous entry's {fix}"
            )
        if not 0.0 < e <= 1.5:
            raise ValueError(
                f"compute_eff_table[{i}] efficiency = {pair[1]!r} must be in (0, 1.5] {fix}"
            )
        out.append((t, e))
    return tuple(out)


def _one_line(exc: ValidationError, d: dict, where: str) -> UserError:
    """One line (field, value, fix) for the most useful error of a ValidationError."""
    errs = exc.errors(include_url=False)
    kind = d.get("kind")
    missing = [".".join(str(p) for p in e["loc"][1:]) for e in errs if e["type"] == "missing"]
    if missing:
        what = f"{kind} profile" if kind in ("roofline", "linear") else "profile"
        return UserError(f"{where}: {what} lacks {', '.join(missing)} (fix: {_FIX})")
    e = errs[0]
    loc = [str(p) for p in e["loc"]]
    if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return UserError(
            f"{where}: 'kind' is {kind!r}; expected 'roofline' or 'linear' (fix: {_FIX})"
        )
    path = ".".join(loc[1:])  # (the first is the union's tag)
    if e["type"] == "value_error":
        msg = str((e.get("ctx") or {}).get("error", e["msg"]))
        return UserError(f"{where}: {msg}" + ("" if "(fix:" in msg else f" (fix: {_FIX})"))
    v = e.get("input")
    ctx = e.get("ctx") or {}
    if e["type"] == "less_than_equal":
        problem = f"is above the limit {float(ctx['le']):g}"
    elif e["type"] in ("float_type", "finite_number", "greater_than_equal"):
        problem = "must be a finite non-negative number"
    elif e["type"] in ("model_type", "dict_type"):
        problem = "must be a JSON object or null"
    else:
        problem = clean(e["msg"].replace("Input should be", "should be"), 100)
    shown = clean(repr(v), 60)
    return UserError(f"{where}: field {path!r} = {shown} {problem} (fix: {_FIX})")


def _typo(d: dict, where: str) -> None:
    """An unknown key that is a near miss of a profile field is an error (did you mean), not
    provenance silently ignored."""
    known = set(RooflineFile.model_fields) | set(LinearFile.model_fields)
    for k in d:
        if k in known:
            continue
        close = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.85)
        if close:
            raise UserError(
                f"{where}: unknown key {clean(str(k), 40)!r} (fix: did you mean {close[0]!r}?)"
            )


def parse_profile(d: Any, where: str = "profile") -> RooflineFile | LinearFile:
    """The profile file's JSON object validated as :class:`RooflineFile` or :class:`LinearFile`;
    a UserError names the field, its value and the fix."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise UserError(
            f"{where}: 'format' is {clean(repr(d.get('format')), 40)}, expected {FORMAT!r} "
            f"(fix: {_FIX})"
        )
    _typo(d, where)
    try:
        return _ADAPTER.validate_python(d)
    except ValidationError as exc:
        raise _one_line(exc, d, where) from None


def profile_from_dict(d: Any, where: str = "profile") -> Profile:
    """Build a profile from its JSON object; a UserError names the bad field."""
    f = parse_profile(d, where)
    name = f.name if f.name is not None else Path(where).stem
    power = None if f.power is None else f.power.spec()
    meta = {
        k: getattr(f, k)
        for k in (
            "device",
            "catalog_gpu",
            "model",
            "created_utc",
            "fit",
            "grid_file",
            "stack_constants",
            "moe_constants",
        )
        if k in f.model_fields_set
    }
    if isinstance(f, RooflineFile):
        vals = {k: getattr(f, k) for k in _ROOFLINE_REQUIRED}
        vals.update({k: getattr(f, k) for k in _ROOFLINE_OPTIONAL if getattr(f, k) is not None})
        return RooflineProfile(
            name=name,
            power=power,
            source=f.source,
            meta=meta,
            compute_eff_table=(
                None
                if f.compute_eff_table is None
                else tuple((t, e) for t, e in f.compute_eff_table)
            ),
            kernels=(
                None if f.kernels is None else kernel_fit_from_dict(f.kernels, f"{where} kernels")
            ),
            moe_fit=profile_moe_fit(name, f.catalog_gpu, f.moe_constants),
            **vals,
        )
    vals = {k: getattr(f, k) for k in _LINEAR_FIELDS if k in f.model_fields_set}
    return LinearProfile(name=name, power=power, meta=meta, **vals)


def load_profile(path: str | Path) -> tuple[Profile, str]:
    """Read a profile file; returns the profile and the SHA-256 of the file's bytes."""
    from fleetsim.base import io

    p = Path(path)
    d, raw = io.load_json(p, "hardware.profile", fix="regenerate it with `fleetsim calibrate`")
    return profile_from_dict(d, str(p)), hashlib.sha256(raw).hexdigest()


def profile_to_dict(p: Profile, **extra: Any) -> dict:
    """The JSON object of a profile (for writing), with ``extra`` keys added."""
    d: dict[str, Any] = {"format": FORMAT, "kind": p.kind, "name": p.name}
    if isinstance(p, RooflineProfile):
        for k in _ROOFLINE_REQUIRED + _ROOFLINE_OPTIONAL:
            if getattr(p, k) is not None:
                d[k] = getattr(p, k)
        d["kernels"] = None if p.kernels is None else kernel_fit_to_dict(p.kernels)
        d["compute_eff_table"] = (
            None if p.compute_eff_table is None else [[t, e] for t, e in p.compute_eff_table]
        )
        d["source"] = p.source
    else:
        for k in _LINEAR_FIELDS:
            d[k] = getattr(p, k)
    d["power"] = None if p.power is None else {k: getattr(p.power, k) for k in _POWER_FIELDS}
    d.update(p.meta)
    d.update(extra)
    return d
