"""``fleetsim sweep``: simulate every point of a parameter grid and tabulate the day of each.

    fleetsim sweep scenarios/default.toml --grid 'fleet.replicas=[6, 8, 10]' \\
        --grid 'cost.hardware=["owned", "rented"]' --workers 2

The grid is the cartesian product of the ``--grid`` axes; each point is the scenario with the
point's values applied as ``--set`` overrides (the same parsing: values are TOML). An axis's
values are a TOML array (``key=[v1, v2]``; a list-valued field takes an array of arrays) or,
as before, comma-separated TOML values (``key=v1,v2``). All points are
validated before anything runs; a point whose weights or KV cache do not fit the GPU at its TP
(or whose split vLLM refuses) is a row with ``status`` and ``problem`` saying why, its figures
null, and the other points are simulated (``fleetsim plan`` keeps such candidates the same
way); any other mistake refuses the grid. Points share the scenario's seed on purpose (common
random numbers: two points differ by their parameters, not by their random draws); sweep
``seed=1,2,3`` for replications. ``sweep.parquet`` has one row per point, in grid order.

Each finished point is kept in ``<out>/.fleetsim-sweep-cache/`` while the sweep runs
(:class:`PointCache`); after an interrupt or a kill, ``--resume`` into the same ``--out``
simulates only the points not there and writes the same sweep.parquet, which stays all or
nothing. A clean finish removes the cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import cast

import pyarrow as pa

from fleetsim.apps.common import OneLineParser, description
from fleetsim.apps.executors import (
    RunSummary,
    add_executor_args,
    make_executor,
    progress_label,
    run_task,
    task_progress,
)
from fleetsim.base.errors import UserError
from fleetsim.base.io import term
from fleetsim.base.units import fmt_num
from fleetsim.config.loading import (
    apply_overrides,
    parse_override,
    read_toml,
    scenario_from_dict,
    toml_value,
)
from fleetsim.config.resolve import resolve

#: the day's figures of each point (in this order, after the grid columns)
RESULT_COLUMNS = (
    "requests",
    "requests_completed",
    "requests_in_flight",
    "requests_rejected",
    "gpu_hours",
    "energy_facility_kwh",
    "energy_gpu_idle_kwh",
    "energy_gpu_dynamic_kwh",
    "energy_overhead_kwh",
    "energy_cost_usd",
    "hardware_cost_usd",
    "total_cost_usd",
    "usd_per_mtok",
    "wh_per_request",
    "slo_attainment",
    "ttft_p99_s",
    "tpot_p99_s",
    # the hour of the highest total cost (the run summary's "peak hour"; not the busiest hour
    # by arrivals of its "peak-hour load" row and of fleetsim report)
    "peak_hour",
    "peak_hour_total_cost_usd",
    "peak_hour_ttft_p99_s",
    # vLLM's names (day-wide; docs/model.md)
    "ttft_mean_s",
    "ttft_p90_s",
    "tpot_mean_s",
    "itl_mean_s",
    "itl_p99_s",
    "e2e_mean_s",
    "e2e_p99_s",
    "request_throughput_per_s",
    "output_throughput_tokens_per_s",
)


def split_values(raw: str) -> list[str]:
    """Split ``v1,v2,...`` at top-level commas (not inside quotes, brackets or braces)."""
    out, depth, quote, cur = [], 0, "", []
    for ch in raw:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _array_end(text: str) -> int | None:
    """The index of the ``]`` that closes the array ``text`` opens (brackets and braces counted,
    quoted text skipped), or None when it is not closed."""
    depth, quote = 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i
    return None


def array_values(raw: str, key: str = "section.key") -> list[str]:
    """The items of a TOML array ``[v1, v2, ...]`` (parsed as ``--set`` parses a value), each as
    TOML text for an override; a value that is itself a list is an item: ``[[1, 2], [3, 4]]``.
    An array that is not TOML only for its bare words (``[flat, azure-conv]``) has them read as
    strings, as ``--set`` and the comma form read them; an unclosed one is named."""
    from fleetsim.base import io

    text = raw.strip()
    where = f"--grid {io.clean(key, 80)}={io.clean(raw, 80)}"
    io.check_depth(f"v = {text}", where, toml=True)
    end = _array_end(text)
    if end is not None and end < len(text) - 1:  # closed, then more: "[1.1, 1.3]x"
        raise UserError(
            f"{where}: {io.clean(text[end + 1 :], 40)!r} after the array's closing ']' (fix: "
            f"end the value there, e.g. {key}={io.clean(text[: end + 1], 80)})"
        )
    if not text.endswith("]"):
        raise UserError(f"{where}: the array is not closed (fix: e.g. {key}=[4, 8])")
    try:
        items = io.parse_toml(f"v = {text}", where)["v"]
    except UserError:
        inner = text[1:-1].strip()
        if not inner or any(ch in inner for ch in "[]{}"):
            raise
        return split_values(inner)  # bare words: each read as --set reads a value
    if not isinstance(items, list):
        raise UserError(f"{where}: not a TOML array")
    return [toml_value(v) for v in items]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``section.key=v1,v2`` items -> [(key, [raw values])], keys unique, values non-empty."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise UserError(
                f"--grid {item!r}: expected section.key=v1,v2,... (e.g. --grid fleet.replicas=4,8)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or ("." not in key and key not in ("seed", "name")):
            raise UserError(f"--grid {item!r}: the key must be section.key (e.g. fleet.replicas)")
        if any(k == key for k, _ in axes):
            raise UserError(f"--grid {key}: given twice (fix: list all its values in one --grid)")
        if not raw.strip():
            raise UserError(f"--grid {item!r}: no values (fix: e.g. {key}=[4, 8])")
        values = array_values(raw, key) if raw.strip().startswith("[") else split_values(raw)
        if not values:
            raise UserError(f"--grid {item!r}: an empty list (fix: e.g. {key}=[4, 8])")
        if any(v == "" for v in values):
            raise UserError(f"--grid {item!r}: an empty value (fix: remove the stray comma)")
        axes.append((key, values))
    if not axes:
        raise UserError("sweep: no --grid given (fix: e.g. --grid fleet.replicas=4,8)")
    return axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """The cartesian product as lists of ``key=value`` overrides, first axis slowest."""
    return [
        [f"{k}={v}" for (k, _), v in zip(axes, combo)]
        for combo in itertools.product(*(vals for _, vals in axes))
    ]


#: the fields whose refusal at resolution is vLLM refusing a split of the model (the heads,
#: the experts over TP x DP), in ``[fleet]`` or a disaggregated pool
#: (``disaggregation.prefill.tensor_parallel``): a point refused there is ``not accepted``,
#: kept as a row
SPLIT_FIELDS = ("tensor_parallel", "data_parallel", "expert_parallel")


def unfit_reason(exc: UserError) -> str:
    """``"does not fit: ..."`` for a point whose weights or KV cache do not fit the GPU at its
    TP (plan's :data:`~fleetsim.apps.plan.MEMORY_WORDS`, with the fix that names the smallest TP
    that holds the weights), ``"not accepted: ..."`` for a split vLLM refuses or a kernel the
    point's GPU or model does not run (``fleet.fp8_moe_kernel``: a grid of GPUs x kernels),
    '' for any other mistake (a typo, a value out of range: the whole grid is refused)."""
    from fleetsim.apps.plan import KERNEL_FIELD, MEMORY_WORDS, fit_reason
    from fleetsim.base.errors import ScenarioError

    if not isinstance(exc, ScenarioError):
        return ""
    if any(w in exc.problem for w in MEMORY_WORDS):
        return f"does not fit: {fit_reason(exc)}"
    if exc.field.rsplit(".", 1)[-1] in SPLIT_FIELDS:
        return f"not accepted: {exc.problem}" + (f" (fix: {exc.fix})" if exc.fix else "")
    if exc.field.rsplit(".", 1)[-1] == KERNEL_FIELD:  # (a kernel the point's GPU cannot run)
        return f"not accepted: {fit_reason(exc)}"
    return ""


def point_scenarios(base: dict, points: list[list[str]], source: str) -> list[dict | str]:
    """Validate every point up front (schema and catalogs); the scenario dict of each, or for a
    point that does not fit the GPU at its TP (or whose split vLLM refuses) the reason
    (:func:`unfit_reason`): kept as a row of the table, as ``fleetsim plan`` keeps such a
    candidate, the other points simulated. Any other mistake refuses the grid, and so does a
    grid none of whose points fits. A mistake that is not the grid's (in the file or a --set:
    the base alone fails the same way) is reported as it is, not as the first point's."""
    out: list[dict | str] = []
    first: UserError | None = None
    for ov in points:
        try:
            sc = scenario_from_dict(apply_overrides(base, ov), source)
        except UserError as exc:
            raise _point_error(base, ov, source, exc) from None
        try:
            resolve(sc, source)
        except UserError as exc:
            why = unfit_reason(exc)
            if not why:
                raise _point_error(base, ov, source, exc) from None
            first = first or _point_error(base, ov, source, exc)
            out.append(why)
            continue
        out.append(sc.model_dump(mode="json"))
    if first is not None and not any(isinstance(d, dict) for d in out):
        if len(out) == 1:
            raise first
        raise UserError(
            f"sweep: none of the {len(out)} points can be simulated; the first: {first}"
        )
    return out


def _point_error(base: dict, ov: list[str], source: str, exc: UserError) -> UserError:
    """``exc`` as it is when the base scenario fails the same way, else naming the point."""
    try:
        resolve(scenario_from_dict(base, source), source)
    except UserError as base_exc:
        if str(base_exc) == str(exc):
            return exc
    return UserError(f"sweep point {' '.join(ov)}: {exc}")


def point_row(res: RunSummary) -> dict[str, float]:
    """The result columns of one point."""
    t, lat, hourly = res.totals, res.day_latency, res.hourly
    ph = t.peak_hour
    cost = hourly.column("total_cost_usd").to_numpy()
    ttft = hourly.column("ttft_p99_s").to_numpy()
    return {
        "requests": t.requests_arrived,
        "requests_completed": t.requests_completed,
        "requests_in_flight": t.requests_in_flight,
        "requests_rejected": t.requests_rejected,
        "gpu_hours": t.gpu_hours,  # powered (autoscaling and power states show here)
        "energy_facility_kwh": t.energy_facility_kwh,
        "energy_gpu_idle_kwh": t.energy_gpu_idle_kwh,  # IT energy: x PUE is facility
        "energy_gpu_dynamic_kwh": t.energy_gpu_dynamic_kwh,
        "energy_overhead_kwh": t.energy_overhead_kwh,
        "energy_cost_usd": t.energy_cost_usd,
        "hardware_cost_usd": t.hardware_cost_usd,
        "total_cost_usd": t.total_cost_usd,
        "usd_per_mtok": t.usd_per_mtok,
        "wh_per_request": t.wh_per_request,
        "slo_attainment": t.slo_attainment,
        "ttft_p99_s": lat["ttft_p99_s"],
        "tpot_p99_s": lat["tpot_p99_s"],
        "peak_hour": ph,
        "peak_hour_total_cost_usd": float(cost[ph]) if len(cost) else math.nan,
        "peak_hour_ttft_p99_s": float(ttft[ph]) if len(ttft) else math.nan,
        **{k: lat[k] for k in RESULT_COLUMNS if k in lat and k not in ("ttft_p99_s", "tpot_p99_s")},
        "request_throughput_per_s": t.request_throughput_per_s,
        "output_throughput_tokens_per_s": t.output_throughput_tokens_per_s,
    }


def _grid_column(values: list):
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([json.dumps(v) if not isinstance(v, str) else v for v in values])


def sweep_table(
    axes, points: list[list[str]], rows: list[dict | None], problems: list[str] | None = None
) -> pa.Table:
    """One row per point: the grid values (typed as parsed), ``status`` (``ok``, ``does not
    fit``, ``not accepted``: plan's words) and ``problem`` (the reason, null when ok), then
    :data:`RESULT_COLUMNS` (null for a point not simulated: ``rows[i]`` None)."""
    problems = problems or [""] * len(points)
    cols: dict[str, pa.Array] = {}
    for j, (key, _) in enumerate(axes):
        cols[key] = _grid_column([parse_override(p[j])[1] for p in points])
    cols["status"] = pa.array([p.split(":", 1)[0] if p else "ok" for p in problems], pa.string())
    cols["problem"] = pa.array([p or None for p in problems], pa.string())
    for c in RESULT_COLUMNS:
        typ = pa.int64() if c == "peak_hour" else pa.float64()
        cols[c] = pa.array([r[c] if r is not None else None for r in rows], type=typ)
    return pa.table(cols)


def point_key(scenario: dict, source: str) -> str:
    """A point's key in :class:`PointCache`: the SHA-256 of the fleetsim version, the scenario
    file's absolute path (relative files resolve against it) and the point's resolved scenario
    (:func:`~fleetsim.config.resolved.resolved_dict`: every catalog field filled in, the seed,
    the profile's SHA-256), so a changed grid, scenario, catalog or version misses."""
    import hashlib

    from fleetsim.apps.executors import _resolved
    from fleetsim.base.version import __version__
    from fleetsim.config.resolved import resolved_dict

    rs = _resolved(json.dumps(scenario, sort_keys=True), source)
    doc = {
        "fleetsim": __version__,
        "source": str(Path(source).resolve()) if source else "",
        "resolved": resolved_dict(rs),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _plain_row(row: dict) -> dict[str, float | int]:
    """A point's row as plain numbers (as sweep.parquet stores them: peak_hour an integer, the
    rest float64), so a row read back from the cache is the row computed."""
    return {c: int(row[c]) if c == "peak_hour" else float(row[c]) for c in RESULT_COLUMNS}


class PointCache:
    """The finished points of a sweep, kept in ``<out>/.fleetsim-sweep-cache/`` (the folder's
    lock held) so that ``--resume`` reuses them after an interrupt or a kill. One JSON file per
    point, ``<key>.json`` (:func:`point_key`), each written atomically; the sweep's own files stay
    all or nothing (staged, moved into place at the end), and the cache is removed when they
    are. Nothing here follows a link: the cache folder must be a real folder (else refused in
    one line), an entry that is a link, has a second hard link or is not fleetsim's JSON counts
    as missing (its point re-runs), and removal deletes only ``<key>.json`` regular files."""

    _ENTRY = re.compile(r"^[0-9a-f]{64}\.json$")

    def __init__(self, out: Path, resume: bool) -> None:
        from fleetsim.results.output import SWEEP_CACHE_NAME

        self.out = out
        self.dir = out / SWEEP_CACHE_NAME
        self.resume = resume
        self._id: tuple[int, int] | None = None
        self.reused = 0  # points read back (--resume)
        self.kept = 0  # points simulated and kept

    def _check(self) -> bool:
        """Whether the cache folder exists (a real folder; anything else is refused)."""
        from fleetsim.results.output import _dir_id, _shown, out_error

        if not (self.dir.exists() or self.dir.is_symlink()):
            return False
        ident = _dir_id(self.dir)
        if ident is None or (self._id is not None and ident != self._id):
            raise out_error(
                self.out,
                f"{_shown(self.dir)} is not the folder fleetsim keeps a sweep's finished points "
                "in (a link or a file); nothing was read or written through it",
                f"remove {_shown(self.dir)} if it is not needed, or choose another --out",
            )
        self._id = ident
        return True

    def get(self, key: str) -> dict | None:
        """The row of the point ``key`` finished by an earlier run, or None."""
        from fleetsim.base.io import MiB, load_json

        if not self.resume or not self._check():
            return None
        p = self.dir / f"{key}.json"
        if not p.exists():
            return None
        try:
            d, _ = load_json(p, "sweep cache", MiB, nofollow=True)
        except UserError:
            return None
        row = d.get("row") if isinstance(d, dict) and d.get("key") == key else None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
            for c in RESULT_COLUMNS
        ):
            return None
        self.reused += 1
        return _plain_row(row)

    def put(self, key: str, row: dict) -> None:
        """Keep a finished point (atomically: a kill leaves the whole entry or none)."""
        from fleetsim.base.version import __version__
        from fleetsim.results.output import LAST, clean_stale, write_text_atomic

        if not self._check():
            self.dir.mkdir(mode=0o700)  # (fails if anything, a link included, is there)
            self._check()
            clean_stale(self.dir)
        doc = {"fleetsim": __version__, "key": key, "row": row}
        write_text_atomic(json.dumps(doc, sort_keys=True) + "\n", self.dir / f"{key}.json")
        self.kept += 1
        LAST["sweep_points_kept"] = str(self.kept + self.reused)  # (for an interrupt's line)

    def remove(self) -> None:
        """Delete the entries (regular files with one link) and the folder if then empty."""
        import contextlib
        import os
        import stat

        from fleetsim.results.output import clean_stale

        if not self._check():
            return
        clean_stale(self.dir)  # (temporaries of dead processes)
        for p in self.dir.iterdir():
            if self._ENTRY.fullmatch(p.name):
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    p.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # (left in place if something else is in it)


def run_sweep(
    base: dict, axes, source: str, executor, hooks=None, cache: PointCache | None = None
) -> pa.Table:
    """Validate, simulate every point with ``executor`` and tabulate (in grid order). With a
    ``cache``, each finished point is kept in it as it finishes, and (``cache.resume``) a point
    already there is reused, not simulated again."""
    points = grid_points(axes)
    checked = point_scenarios(base, points, source)
    problems = [d if isinstance(d, str) else "" for d in checked]
    fit = [i for i, d in enumerate(checked) if isinstance(d, dict)]
    scenarios = {i: cast(dict, checked[i]) for i in fit}
    keys = {i: point_key(scenarios[i], source) for i in fit} if cache is not None else {}
    rows: dict[int, dict | None] = {
        i: (cache.get(keys[i]) if cache is not None else None) for i in fit
    }
    todo = [i for i in fit if rows[i] is None]
    if hooks is not None:
        hooks.add(len(todo))
    for j, res in executor.imap_unordered(run_task, [(scenarios[i], source) for i in todo]):
        i = todo[j]
        rows[i] = _plain_row(point_row(res))
        if cache is not None:
            cache.put(keys[i], cast(dict, rows[i]))
        if hooks is not None:
            hooks.done()
    return sweep_table(axes, points, [rows.get(i) for i in range(len(points))], problems)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="fleetsim sweep", description=description(__doc__))
    ap.add_argument("scenario", help="scenario TOML file")
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2,...",
        help="an axis of the grid (repeatable): a TOML array, e.g. 'fleet.replicas=[4, 8]', or "
        "comma-separated TOML values",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a field for every point",
    )
    ap.add_argument(
        "--out",
        help="output folder (default out/<the scenario file's stem>-sweep, e.g. out/default-sweep)",
    )
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the points an interrupted sweep into the same --out finished (kept in its "
        ".fleetsim-sweep-cache/ until a sweep there completes); only the others are simulated",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar or table")
    ap.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (every point's row, the path written); the "
        "table goes to stderr",
    )
    add_executor_args(ap)
    return ap


def shared_hardware_note(base: dict, axes: list) -> str:
    """A line for a grid over ``hardware.gpu`` whose scenario sets other ``[hardware]`` fields
    (a price, a profile, power constants) outside the grid: every GPU of the grid runs with
    them, as given (``fleetsim plan`` instead prices any GPU but the scenario's own from the
    catalog); '' when there is nothing to say. A FinOps sweep of H100 vs B200 with an H100
    contract price set in ``[hardware]`` priced the B200 at it without a word."""
    keys = [k for k, _ in axes]
    gpus = next((v for k, v in axes if k == "hardware.gpu"), None)
    if gpus is None:
        return ""
    hw = base.get("hardware") or {}
    shared = {
        k: v for k, v in hw.items() if k != "gpu" and v is not None and f"hardware.{k}" not in keys
    }
    if not shared:
        return ""
    given = ", ".join(f"{k} = {json.dumps(v)}" for k, v in shared.items())
    names = ", ".join(str(g).strip().strip('"') for g in gpus)
    return (
        f"note: the scenario's [hardware] {given} holds for every hardware.gpu of the grid "
        f"({names}), as given; fleetsim plan prices each GPU other than the "
        "scenario's from the catalog (fix: make it a grid axis, or leave it out for each "
        "GPU's catalog value)"
    )


#: the price fields each way of paying for the GPUs reads (results/accounting.py: owned GPUs
#: cost capex over the amortization plus maintenance per GPU-hour, whether busy or not; rented
#: ones the rent per powered GPU-hour), by the last part of the field's name
PRICE_FIELDS = {
    "owned": ("capex_usd", "amortization_years", "maintenance_usd_per_gpu_hour"),
    "rented": ("rent_usd_per_gpu_hour",),
}

#: the traffic fields a timed trace replaces (``traffic.trace``: its own arrivals and sizes;
#: serving/pod.py replays it, config/aggregated.py checks its requests, not the distributions)
TRACE_REPLACES = ("traffic.requests_per_day", "traffic.diurnal", "traffic.prompt", "traffic.output")


def unused_axis_notes(axes: list, points: list) -> list[str]:
    """A line for each grid axis that no simulated point reads, so its rows are identical: a
    rent with every point's ``cost.hardware = "owned"``, a capex, amortization or maintenance
    with every point rented, the request rate, diurnal shape or sizes with every point
    replaying a timed ``traffic.trace``. A FinOps sweep of
    ``hardware.rent_usd_per_gpu_hour=[2.5, 4.25]`` on the default (owned) scenario printed two
    identical rows and nothing else."""
    fit = [d for d in points if isinstance(d, dict)]
    ways = {d["cost"]["hardware"] for d in fit}
    traced = bool(fit) and all(d["traffic"].get("trace") for d in fit)
    out = []
    for key, values in axes:
        if len(values) < 2:
            continue
        if len(ways) == 1:
            (way,) = ways
            other = "rented" if way == "owned" else "owned"
            if key.rsplit(".", 1)[-1] in PRICE_FIELDS[other]:
                out.append(
                    f"note: {key} changes no figure: every point has cost.hardware = "
                    f'"{way}", which does not read it (fix: --set cost.hardware="{other}", or '
                    'add --grid \'cost.hardware=["owned", "rented"]\')'
                )
        if traced and any(key == f or key.startswith(f + ".") for f in TRACE_REPLACES):
            out.append(
                f"note: {key} changes no figure: every point replays traffic.trace, whose "
                "requests bring their own arrival times and sizes (fix: sweep a fleet or cost "
                "field, or --set traffic.trace='' for the distributions)"
            )
    return out


def slo_note(table: pa.Table, axes: list[str]) -> str:
    """A line naming the simulated points whose SLO attainment is below the run's warning level
    (``SLO_ATTAINMENT_WARN_BELOW``: ``fleetsim run`` prints "SLO MISSED" for them, the sweep
    printed nothing): an overloaded point serves fewer requests with the same GPUs, so its
    $/Mtok and Wh/req can read as the cheapest (kv-pressure-70b-a100.toml paged vs reserve: 0%
    both, $/Mtok 0.66 / 0.61); '' when every point meets it."""
    from fleetsim.results.summary import SLO_ATTAINMENT_WARN_BELOW

    rows = table.to_pylist()
    low = [
        r
        for r in rows
        if r.get("status", "ok") == "ok"
        and r["slo_attainment"] is not None
        and r["slo_attainment"] < SLO_ATTAINMENT_WARN_BELOW
    ]
    if not low:
        return ""
    shown = "; ".join(
        " ".join(f"{k}={_grid_cell(r[k])}" for k in axes) + f" {r['slo_attainment']:.2%}"
        for r in low[:5]
    )
    more = f"; and {len(low) - 5} more" if len(low) > 5 else ""
    return (
        f"note: {len(low)} of {len(rows)} points met the SLO for under "
        f'{SLO_ATTAINMENT_WARN_BELOW:.0%} of requests (fleetsim run warns "SLO MISSED"): '
        f"{shown}{more}; such a fleet is overloaded or too slow, and its $/Mtok and Wh/req are "
        "not a cheaper way to serve the same requests (fix: more replicas, or compare only the "
        "points that meet it)"
    )


def horizon_note(hours: set[int]) -> str:
    """A line for the table when its requests, GPU-h, kWh and $ are not a day's: the points'
    ``simulation.hours`` (one value other than 24, or several when it is a grid axis); '' for a
    day. A FinOps sweep over a 2-hour scenario printed "total $ 15.10" with nothing saying it
    was 2 hours' (``fleetsim plan`` heads its columns ``$/2 h``)."""
    if not hours or hours == {24}:
        return ""
    if len(hours) == 1:
        (h,) = hours
        return (
            f"requests, GPU-h, kWh and $ are over the simulated {h} h (simulation.hours), not a day"
        )
    return (
        "requests, GPU-h, kWh and $ are over each point's simulation.hours ("
        + ", ".join(f"{h} h" for h in sorted(hours))
        + "), not a day; $/Mtok and Wh/req compare across points"
    )


def main(argv: list[str]) -> int:
    """``fleetsim sweep``: see the module docstring."""
    from fleetsim.apps.common import console, open_output, print_json
    from fleetsim.results.output import write_table_atomic
    from fleetsim.results.provenance import provenance

    args = build_parser().parse_args(argv)
    axes = parse_grid(args.grid)
    data, text = read_toml(args.scenario)
    base = apply_overrides(data, args.overrides)
    points = point_scenarios(base, grid_points(axes), args.scenario)  # fail fast, before work
    # the provenance: the base scenario (overrides applied), or the first point that fits where
    # the grid is needed to make it valid; the grid's values are in the table
    try:
        base_rs = resolve(scenario_from_dict(base, args.scenario), args.scenario)
    except UserError:
        first = next(d for d in points if isinstance(d, dict))
        base_rs = resolve(scenario_from_dict(first, args.scenario), args.scenario)
    outp = open_output(
        args, Path(args.scenario).stem + "-sweep", ("sweep.parquet",), resume=args.resume
    )
    cache = PointCache(outp.out, args.resume)
    t0 = time.perf_counter()
    with (
        make_executor(args.executor, args.workers, args.address) as ex,
        task_progress(progress_label("sweep", ex), args.quiet) as hooks,
    ):
        table = run_sweep(base, axes, args.scenario, ex, hooks, cache)
    wall = time.perf_counter() - t0
    path = outp.final("sweep.parquet")
    write_table_atomic(
        table,
        outp.path("sweep.parquet"),
        provenance(
            base_rs,
            text,
            grid=json.dumps(args.grid),
            overrides=json.dumps(args.overrides),
            wall_s=f"{wall:.3f}",
            executor=args.executor,
        ),
    )
    # the finished points are dropped with the lock still held, just before the files move into
    # place (a failure in between loses the points, as a sweep without a cache would)
    cache.remove()
    outp.commit()  # (an error or interrupt before this leaves the folder as it was)
    human = console(stderr=args.json, quiet=args.quiet)  # stderr when stdout carries JSON
    if not args.quiet:
        print_sweep(table, [k for k, _ in axes], f"sweep of {term(args.scenario)}", human)
        hours = {d["simulation"]["hours"] for d in points if isinstance(d, dict)}
        span = horizon_note(hours)
        if span:
            human.print(span, highlight=False)
        low = slo_note(table, [k for k, _ in axes])
        if low:
            human.print(term(low, 1200), highlight=False)
        for line in unused_axis_notes(axes, points):
            human.print(term(line, 400), highlight=False)
        note = shared_hardware_note(base, axes)
        if note:
            human.print(term(note, 400))
        ran = sum(1 for d in points if isinstance(d, dict))  # (the points that fit)
        reused = f" ({cache.reused} of {ran} points reused)" if args.resume else ""
        human.print(f"wrote {term(path)} in {wall:.1f} s{reused}")
    if args.json:
        print_json(
            {
                "points": table.to_pylist(),
                "paths": {"sweep": str(path.resolve())},
                "points_reused": cache.reused,
                "wall_s": wall,
            }
        )
    return 0


def print_sweep(table: pa.Table, axes: list[str], title: str, c) -> None:
    """One row per point: the grid's values, then :data:`SHOWN` (never cut:
    :mod:`fleetsim.base.tables`). Where a point does not fit (or its split is not accepted),
    its figures are blank, a ``status`` column says so, and each such point's reason follows
    the table (as ``fleetsim plan`` prints its candidates')."""
    from fleetsim.base.tables import print_table

    rows = table.to_pylist()
    unfit = [r for r in rows if r.get("status", "ok") != "ok"]
    shown = [(k, k, 1.0, "") for k in axes] + list(SHOWN)
    if unfit:
        shown.append(("status", "status", 1.0, ""))
    counts = f"{len(rows)} points" + (
        f", {len(unfit)} not simulated (why: below the table)" if unfit else ""
    )
    print_table(
        c,
        f"{title}: {counts}",
        [term(header) for _, header, _, _ in shown],
        [
            [
                _grid_cell(row[col])
                if col in axes
                else term(row[col])
                if col == "status"
                else _fmt(row[col], scale, fmt, "" if row.get("status", "ok") != "ok" else "n/a")
                for col, _, scale, fmt in shown
            ]
            for row in rows
        ],
        left=("status",) if unfit else (),
    )
    for r in unfit:
        name = " ".join(f"{k}={_grid_cell(r[k])}" for k in axes)
        c.print(term(f"  {name}: {r['problem']}", 700))


def _grid_cell(v: object) -> str:
    """A grid value for the terminal: a long list of numbers (a 24-hour price or diurnal
    profile) as its length, range and mean, so the table stays readable; sweep.parquet keeps
    the whole value."""
    items = v
    if isinstance(v, str) and v.startswith("["):
        try:
            items = json.loads(v)
        except ValueError:
            items = v
    if (
        isinstance(items, list)
        and len(items) > 6
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items)
    ):
        lo, hi, mean = min(items), max(items), sum(items) / len(items)
        return term(f"{len(items)} values {lo:g}..{hi:g}, mean {mean:.4g}")
    return _fmt(v)


#: the terminal table's columns: (column, header, scale, format); units as in ``fleetsim run``
#: and ``fleetsim plan`` (TTFT in s, TPOT in ms, money in $)
SHOWN = (
    ("requests", "requests", 1.0, ",.0f"),
    ("gpu_hours", "GPU-h", 1.0, ",.1f"),
    ("energy_facility_kwh", "kWh", 1.0, ",.1f"),
    # the cost's two parts, as plan's table and the run summary split it (a FinOps sweep of
    # owned vs rented, or of the electricity price, reads which part moved)
    ("energy_cost_usd", "energy $", 1.0, ",.2f"),
    ("hardware_cost_usd", "hw $", 1.0, ",.2f"),
    ("total_cost_usd", "total $", 1.0, ",.2f"),
    ("usd_per_mtok", "$/Mtok", 1.0, ".3f"),
    ("wh_per_request", "Wh/req", 1.0, ".3f"),
    ("ttft_p99_s", "TTFT p99 s", 1.0, ".3f"),
    ("tpot_p99_s", "TPOT p99 ms", 1000.0, ".1f"),
    ("itl_p99_s", "ITL p99 ms", 1000.0, ".1f"),
    ("slo_attainment", "SLO met %", 100.0, ".2f"),
)


def _fmt(v: object, scale: float = 1.0, fmt: str = "", missing: str = "n/a") -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and scale != 1.0:
        v = v * scale
    s = fmt_num(v, fmt or (",.4g" if isinstance(v, float) else ","), missing)
    return s if isinstance(v, (int, float)) else term(s)  # a grid value is user text: escaped
