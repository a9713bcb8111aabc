"""The Python API: ``import fleetsim``.

    import fleetsim

    sc = fleetsim.load("scenarios/default.toml", {"simulation.hours": 2})
    run = fleetsim.simulate(sc)            # or fleetsim.simulate("scenarios/default.toml")
    run.hourly                             # pyarrow.Table, one row per hour
    run.to_pandas()                        # the same as a pandas DataFrame
    run.summary()                          # the day's figures, as ``fleetsim run --json``

Scenarios load from a file, a TOML string or a dict; overrides are ``{"section.key": value}``
or ``["section.key=value"]`` (the strings of ``--set``). :func:`plan` and :func:`sweep` return
their tables. Every mistake in the input raises :class:`fleetsim.UserError` (a
:class:`fleetsim.ScenarioError` names the field, the value and the fix). See docs/python-api.md.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from fleetsim.base.errors import ScenarioError, UserError
from fleetsim.config.loading import apply_overrides, read_toml, scenario_from_dict, toml_value
from fleetsim.config.resolve import resolve
from fleetsim.config.resolved import resolved_dict
from fleetsim.config.schema import Scenario
from fleetsim.results.result import Result

ScenarioLike = Scenario | str | Path | Mapping[str, Any]
Overrides = Mapping[str, Any] | Sequence[str] | None


def _override_strings(overrides: Overrides) -> list[str]:
    """``{"fleet.replicas": 4}`` or ``["fleet.replicas=4"]`` -> the ``--set`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            try:
                text = toml_value(value)
            except TypeError:
                raise UserError(
                    f"override {key!r}: {value!r} is not a TOML value "
                    "(fix: a number, string, boolean, list or table)"
                ) from None
            out.append(f"{key}={text}")
        return out
    if isinstance(overrides, str):
        return [overrides]
    return [str(x) for x in overrides]


def _is_path(s: str) -> bool:
    return "\n" not in s and "=" not in s


def load(
    scenario: ScenarioLike,
    overrides: Overrides = None,
    *,
    seed: int | None = None,
) -> Scenario:
    """A validated :class:`Scenario` from a file path, a TOML string, a dict or a scenario.

    A string is a path unless it holds a newline or ``=`` (then it is the TOML text itself).
    ``overrides`` are applied first (``{"fleet.replicas": 4}`` or ``["fleet.replicas=4"]``),
    then ``seed``. Relative paths inside a file (traces, profiles) resolve against its folder."""
    ov = _override_strings(overrides)
    source = ""
    if isinstance(scenario, Scenario):
        data = scenario.model_dump(mode="json")
        source = scenario._source
    elif isinstance(scenario, Path) or (isinstance(scenario, str) and _is_path(scenario)):
        data, _ = read_toml(scenario)
        source = str(scenario)
    elif isinstance(scenario, str):
        from fleetsim.base import io

        data = io.parse_toml(scenario, "scenario text")  # (depth-limited, one-line errors)
    elif isinstance(scenario, Mapping):
        data = dict(scenario)
    else:
        raise UserError(
            f"load({type(scenario).__name__}): expected a path, TOML text, a dict or a Scenario"
        )
    if seed is not None:
        data["seed"] = seed
    data = apply_overrides(data, ov)
    sc = scenario_from_dict(data, source or "scenario")
    sc._source = source
    return sc


def resolved(scenario: ScenarioLike, overrides: Overrides = None) -> dict:
    """The scenario with every catalog field resolved and the derived figures (parameter
    count, weight bytes, KV budget): what ``fleetsim validate`` prints."""
    sc = load(scenario, overrides)
    return resolved_dict(resolve(sc, sc._source))


@dataclass
class Run:
    """The outcome of :func:`simulate`: pyarrow tables and the day's figures."""

    result: Result
    requests: pa.Table | None = None  # one row per request (``simulate(..., requests=True)``)

    @property
    def scenario(self) -> Scenario:
        return self.result.scenario

    @property
    def hourly(self) -> pa.Table:
        """One row per simulated hour (the columns of ``hourly.parquet``, docs/model.md)."""
        return self.result.hourly

    @property
    def totals(self) -> dict[str, float]:
        """The day's sums and derived figures (requests, energy, cost, SLO attainment...), as
        a dict (the fields of :class:`fleetsim.results.result.DayTotals`)."""
        return self.result.totals.as_dict()

    @property
    def latency(self) -> dict[str, float]:
        """Day-wide latency: ``ttft_mean_s``, ``ttft_p99_s``, ``tpot_p50_s``, ``itl_p90_s``..."""
        return self.result.day_latency

    def summary(self, paths: dict[str, str] | None = None, format: str = "fleetsim") -> dict:
        """The JSON document of ``fleetsim run --json`` (NaN as None); ``format="vllm"``: that
        of ``fleetsim run --json --format vllm`` (vLLM benchmark_serving's keys, in ms)."""
        from fleetsim.results.summary import json_safe, summary_dict

        if format not in ("fleetsim", "vllm"):
            raise UserError(f"summary(format={format!r}): expected 'fleetsim' or 'vllm'")
        doc = summary_dict(self.result, paths or {})
        if format == "vllm":
            return json_safe(self.vllm() | {"fleetsim": doc})
        return doc

    def vllm(self) -> dict:
        """The latency and throughput block with vLLM benchmark_serving's keys and units
        (``mean_ttft_ms``, ``p99_itl_ms``, ``request_throughput``...; NaN as None)."""
        from fleetsim.results.summary import json_safe

        return json_safe(self.result.vllm())

    def to_pandas(self, table: str = "hourly"):
        """``hourly`` (default) or ``requests`` as a pandas DataFrame (needs pandas)."""
        t = self.hourly if table == "hourly" else self.requests
        if t is None:
            raise UserError(
                f"to_pandas({table!r}): no such table (fix: simulate(..., requests=True))"
            )
        try:
            return t.to_pandas()
        except ImportError:
            raise UserError(
                "to_pandas(): pandas is not installed (fix: pip install pandas)"
            ) from None

    def write(self, out: str | Path, *, force: bool = False) -> Path:
        """Write ``hourly.parquet`` into ``out`` (as ``fleetsim run --out``); returns its path."""
        from fleetsim.apps.simulate import write_outputs
        from fleetsim.results.output import RunOutput

        names = ("hourly.parquet",) + (("pools.parquet",) if self.result.pools is not None else ())
        o = RunOutput(Path(out), force=force, names=names).open()  # (locked, checked, probed)
        try:
            write_outputs(self.result, o.staging(), "")
            o.commit()
        finally:
            o.abort()  # (nothing after a commit)
        return Path(out) / "hourly.parquet"


def simulate(
    scenario: ScenarioLike,
    overrides: Overrides = None,
    *,
    seed: int | None = None,
    requests: bool = False,
) -> Run:
    """Simulate a scenario (a path, TOML text, a dict or a :class:`Scenario`) and return a
    :class:`Run`. ``requests=True`` also keeps one row per request in ``run.requests``."""
    from fleetsim.apps.simulate import simulate as _simulate

    sc = load(scenario, overrides, seed=seed)
    rs = resolve(sc, sc._source)
    if not requests:
        return Run(_simulate(rs, source=sc._source))
    import pyarrow.parquet as pq

    from fleetsim.results.output import RequestWriter

    with tempfile.TemporaryDirectory(prefix="fleetsim-") as tmp:
        sink = RequestWriter(Path(tmp) / "requests.parquet")
        try:
            res = _simulate(rs, source=sc._source, request_sink=sink)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        table = pq.read_table(sink.path)
    return Run(res, table)


def _check_workers(workers: Any) -> None:
    """``workers``: None (one per CPU) or a whole number >= 1, named as the argument."""
    if workers is not None and (type(workers) is not int or workers < 1):
        raise ScenarioError(
            "workers", workers, "must be a whole number >= 1, or None", "e.g. workers=2"
        )


def sweep(
    scenario: ScenarioLike,
    grid: Mapping[str, Sequence[Any]],
    overrides: Overrides = None,
    *,
    workers: int | None = 1,
    executor: str = "local",
) -> pa.Table:
    """Simulate every point of ``grid`` (``{"fleet.replicas": [4, 8], ...}``, the cartesian
    product, first key slowest) and return ``sweep.parquet``'s table: one row per point."""
    from fleetsim.apps.executors import make_executor
    from fleetsim.apps.sweep import run_sweep

    sc = load(scenario, overrides)
    if not isinstance(grid, Mapping) or not grid:
        raise UserError(
            f"sweep: grid = {type(grid).__name__}: expected a non-empty dict of field -> values "
            "(fix: e.g. grid={'fleet.replicas': [4, 8]})"
        )
    axes = []
    for key, values in grid.items():
        if not isinstance(key, str):
            raise UserError(
                f"sweep grid key {key!r}: expected a field name such as 'fleet.replicas'"
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            values = [values]
        vals = list(values)
        if not vals:
            raise UserError(f"sweep grid {key!r}: no values (fix: e.g. grid={{{key!r}: [4, 8]}})")
        try:
            axes.append((key, [toml_value(v) for v in vals]))
        except TypeError:
            raise UserError(
                f"sweep grid {key!r}: {vals!r:.80} holds a value that is not a TOML value "
                "(fix: numbers, strings, booleans, lists or tables)"
            ) from None
    _check_workers(workers)
    with make_executor(executor, workers) as ex:
        return run_sweep(sc.model_dump(mode="json"), axes, sc._source, ex)


def plan(
    scenario: ScenarioLike,
    overrides: Overrides = None,
    *,
    gpus: Sequence[str] | None = None,
    tensor_parallel: Sequence[int] = (1, 2, 4, 8),
    data_parallel: Sequence[int] | None = None,
    slo_ttft_p99_s: float | None = None,
    slo_tpot_p99_s: float | None = None,
    hours: str = "all",
    schedule: bool = True,
    workers: int | None = 1,
    executor: str = "local",
) -> tuple[pa.Table, dict | None]:
    """The capacity plan of ``fleetsim plan``: ``plan.parquet``'s table (candidates ranked by
    the day's cost) and the best candidate's schedule (``schedule.json``'s content, or None).
    ``data_parallel``: the data-parallel engines per replica to search (``--dp``; None: the
    scenario's)."""
    from fleetsim.apps.executors import make_executor
    from fleetsim.apps.plan import make_candidates, plan_fleet
    from fleetsim.apps.plan_search import Slo

    sc = load(scenario, overrides)
    src = sc._source
    resolve(sc, src)
    if hours not in ("all", "peak"):
        raise ScenarioError("hours", hours, "not accepted", "use 'all' or 'peak'")
    if isinstance(gpus, str):
        gpus = [gpus]
    if gpus is not None and (
        not isinstance(gpus, Sequence) or not gpus or not all(isinstance(g, str) for g in gpus)
    ):
        raise ScenarioError("gpus", gpus, "expected a list of catalog GPU names", "e.g. ['h200']")
    if isinstance(tensor_parallel, int):
        tensor_parallel = [tensor_parallel]
    if isinstance(data_parallel, int):
        data_parallel = [data_parallel]
    for name, degrees in (("tensor_parallel", tensor_parallel), ("data_parallel", data_parallel)):
        if name == "data_parallel" and degrees is None:
            continue
        if (
            not isinstance(degrees, Sequence)
            or not degrees
            or not all(type(t) is int and 1 <= t <= 64 for t in degrees)
        ):
            raise ScenarioError(
                name, degrees, "expected a list of whole numbers in 1..64", "e.g. (1, 2, 4, 8)"
            )
    for name, v, eg in (
        ("slo_ttft_p99_s", slo_ttft_p99_s, "e.g. 2.0"),
        ("slo_tpot_p99_s", slo_tpot_p99_s, "e.g. 0.05 (50 ms)"),
    ):
        if v is not None and (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v > 0)
        ):
            raise ScenarioError(name, v, "must be a positive number of seconds", eg)
    slo = Slo(slo_ttft_p99_s or sc.slo.ttft_s, slo_tpot_p99_s or sc.slo.tpot_s, hours)
    data = sc.model_dump(mode="json")
    cands = make_candidates(
        data,
        sc,
        list(gpus or dict.fromkeys([sc.hardware.gpu, "h200"])),
        list(tensor_parallel),
        src,
        flag="gpus =",
        dps=list(data_parallel) if data_parallel is not None else None,
    )
    _check_workers(workers)
    with make_executor(executor, workers) as ex:
        return plan_fleet(data, src, slo, cands, ex, schedule=schedule)


def schema(profile: bool = False) -> dict:
    """The scenario's JSON Schema (what ``fleetsim schema`` prints); with ``profile=True`` the
    profile file's (``fleetsim schema --profile``)."""
    if profile:
        from fleetsim.device.profile import profile_json_schema

        return profile_json_schema()
    from fleetsim.config.jsonschema import scenario_json_schema

    return scenario_json_schema()
