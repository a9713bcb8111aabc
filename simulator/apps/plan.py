"""``fleetsim plan``: the cheapest fleet (GPU type x tensor parallelism x replicas) that meets
the latency SLO, found by simulation.

For every candidate GPU and TP degree that fits the model, the planner finds the smallest
number of replicas per pod whose hourly p99 TTFT and p99 TPOT meet the SLO in every hour of the
day (``--hours all``) or in the peak-traffic hour (``--hours peak``); it then ranks the
candidates by the day's total cost. A fleet that falls behind fails even if the few requests it
completes look fast: the requests still in flight at the end must not exceed what Little's law
allows a compliant fleet, and no request may be rejected.

The search reuses what it learns (every probe is a task for the executor, cached by scenario;
the screening and verification machinery is apps/plan_search.py, shared with the
disaggregated design of apps/plan_disagg.py):

1. **Throughput bound.** A replica's best-case request rate (prefill at full chunks, decode at
   the largest batch the KV budget holds, from the latency model) gives ``lb`` replicas.
2. **Screening with steady probes.** Two simulated hours at the peak hour's rate, flat (the
   first hour warms the queues, the second is judged), cost about a tenth of a day. A galloping
   search from the start point, then k-section with one probe per worker per round, finds the
   smallest passing count ``n*``. The next candidate starts from ``lb x n*/lb`` of the last.
3. **Day verification.** Whole simulated days at ``n*`` and ``n* - 1`` (one round); the search
   moves on whole days until N passes and N - 1 fails. Reported figures come from the day at N.
4. **Schedule.** For the best candidate, steady probes at every hour's rate give the smallest
   count per hour (monotone in the rate, so one galloping search down the sorted rates); hours
   that failed in the day at N - 1 get N. Written to ``schedule.json``.

All probes of one candidate share the scenario's seed (common random numbers): two replica
counts see the same arrivals, so pass/fail is monotone up to router effects.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from fleetsim.apps.common import OneLineParser, description
from fleetsim.apps.executors import (
    Executor,
    RunSummary,
    add_executor_args,
    make_executor,
    progress_label,
    task_progress,
)
from fleetsim.apps.plan_search import (
    COST_COLUMNS,
    MEMORY_WORDS,
    SLO_COLUMNS,
    PlanCandidate,
    ScreenStep,
    Search,
    Size,
    Slo,
    columns,
    day_figures,
    hopeless_tpot,
    horizon,
    hours_passing,
    one_sequence_tpot_s,
    passes,
    ranked_table,
    resolve_candidate,
    search_min,
    worst_hour,
)
from fleetsim.base.errors import UserError
from fleetsim.base.io import term
from fleetsim.base.units import fmt_num, rotate_to_utc, utc_hour
from fleetsim.config.loading import apply_overrides, read_toml, scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.results.capacity import replica_capacity_rps

DEFAULT_TPS = (1, 2, 4, 8)
CAP_FACTOR = 16  # give up on a candidate above CAP_FACTOR x its throughput bound (+ 16)


@dataclass
class Candidate(PlanCandidate):
    """One GPU type x TP degree (x data-parallel engines per replica), with what the planner
    learns about it; its size is (replicas per pod,)."""

    POOLS = (("fleet", "replicas"),)
    gpu: str
    tp: int
    dp: int = 1  # data-parallel engines per replica (fleet.data_parallel)
    capacity_rps: float = math.nan  # best-case requests/s of one replica
    lower_bound: int = 0
    screened: int | None = None
    replicas: int | None = None
    day_below: RunSummary | None = None
    below_passes: bool | None = None  # the day at N - 1 meets the SLO (False by construction)


# ---------------------------------------------------------------------------------------------
# candidates and their throughput bound
def candidate_base(data: dict, gpu: str, tp: int, own_gpu: str, dp: int | None = None) -> dict:
    """The scenario dict for a candidate: the scenario's own hardware section for its own GPU
    (a calibrated profile stays), the bare catalog entry for any other GPU. ``dp`` (None: the
    scenario's): data-parallel engines per replica; each engine keeps the scenario's
    per-engine ``max_batch_size`` and ``max_batched_tokens`` (the replica's totals over its
    ``data_parallel``), as vLLM's ``--max-num-seqs`` and ``--max-num-batched-tokens`` hold
    for every engine of a ``--data-parallel-size`` launch."""
    d = copy.deepcopy(data)
    d["hardware"] = dict(d.get("hardware", {})) if gpu == own_gpu else {}
    d["hardware"]["gpu"] = gpu
    fleet = d.setdefault("fleet", {})
    fleet["tensor_parallel"] = tp
    fleet.pop("replicas_per_pod", None)
    dp0 = int(fleet.get("data_parallel") or 1)
    if dp is not None and dp != dp0:
        fleet["data_parallel"] = dp
        for key, default in (("max_batch_size", None), ("max_batched_tokens", None)):
            if fleet.get(key, default) is not None:
                fleet[key] = max(1, int(fleet[key]) * dp // dp0)
    return d


def label(gpu: str, tp: int, dp: int = 1) -> str:
    """A candidate's name in the log and the reasons: ``h100-sxm TP4``, ``b200 TP2 x DP4``."""
    return f"{gpu} TP{tp}" + (f" x DP{dp}" if dp > 1 else "")


# ---------------------------------------------------------------------------------------------
class Planner(Search):
    """The aggregated design's search: one pool, sized by the shared screening and
    verification (apps/plan_search.py), then the day below and the schedule."""

    def plan_candidate(self, cand: Candidate, ratio: float | None) -> None:
        """Find the candidate's replica count (screen, then verify on whole days); when none
        is found and even one sequence alone misses the TPOT target, the reason says so."""
        self._plan_candidate(cand, ratio)
        if not cand.replicas and cand.problem.startswith("no replica count"):
            assert cand.rs is not None
            step = one_sequence_tpot_s(cand.rs)
            if step > self.slo.tpot_p99_s:
                cand.problem = hopeless_tpot(
                    cand.gpu, cand.tp, step, self.slo.tpot_p99_s, dp=cand.dp
                )

    def _plan_candidate(self, cand: Candidate, ratio: float | None) -> None:
        rs = cand.rs
        assert rs is not None
        peak = self.set_rates(rs)
        pods = self.sc.fleet.pods
        cand.capacity_rps = replica_capacity_rps(rs, self.source)
        cand.lower_bound = max(1, math.ceil(peak / pods / cand.capacity_rps))
        start = max(1, math.ceil(cand.lower_bound * (ratio or 1.0)))
        cap = CAP_FACTOR * cand.lower_bound + 16
        size: Size | None = (start,)
        if self.steady_ok:
            step = ScreenStep(
                0, "both", start, cap, f"no replica count up to {cap} per pod meets the SLO at peak"
            )
            size = self.screen(cand, (start,), [step], peak)
            if size is None:
                return
            cand.screened = size[0]
        assert size is not None
        problem = f"no replica count up to {cap} per pod meets the SLO"
        size = self.verify(cand, size, ["both"], cap, problem)
        if size is None:
            return
        n = size[0]
        cand.replicas = n
        cand.day = self.run(cand, [((n,), None)])[0]
        if n > 1:
            cand.day_below = self.run(cand, [((n - 1,), None)])[0]
            cand.below_passes = passes(cand.day_below, self.slo, self.judged_hours())

    def schedule(self, cand: Candidate) -> list[int]:
        """The smallest replica count per UTC hour of day (24 ints, the convention of every
        24-value profile in a scenario) for ``cand``: steady probes at each hour's rate,
        galloping down the rates sorted high to low; hours that failed in the whole day at
        N - 1 get N; never above N."""
        assert cand.rs is not None and cand.replicas is not None
        N = cand.replicas
        hod0 = self.sc.simulation.start_utc.hour  # simulation hour h is UTC hour (h + hod0) % 24
        rates = list(rotate_to_utc(cand.rs.hourly_rate_per_s, hod0))
        need = [N] * 24
        if self.steady_ok:
            prev = max(N, cand.screened or N)
            for r in sorted(set(rates), reverse=True):
                n = 1
                if r > 0:
                    test = self.steady_test(cand, r, (prev,))
                    n = search_min(test, prev, self.workers, hi=prev) or prev
                    prev = n
                for h in range(24):
                    if rates[h] == r:
                        need[h] = min(N, n)
        if cand.day_below is not None and self.sc.simulation.hours >= 24:
            ok = hours_passing(cand.day_below, self.slo)
            for h in range(24):
                if not ok[h]:
                    need[utc_hour(h, hod0)] = N
        return need


# ---------------------------------------------------------------------------------------------
# results
PLAN_COLUMNS = (  # after the rank (ranked_table)
    *columns(
        "gpu:str tensor_parallel:int data_parallel:int status:str problem:str replicas:int "
        "pods:int gpus:int lower_bound_replicas:int probes:int requests:float"
    ),
    *COST_COLUMNS,
    *columns("usd_per_mtok:float wh_per_request:float ttft_p99_s:float tpot_p99_s:float"),
    *SLO_COLUMNS,
    *columns(
        "below_worst_hour_ttft_p99_s:float below_worst_hour_tpot_p99_s:float below_passes:bool"
    ),
)


def candidate_row(c: Candidate, pods: int) -> dict:
    """One row of plan.parquet (NaN/None where the candidate has no answer)."""
    row: dict = {k: None for k, _ in PLAN_COLUMNS}
    status = (
        "ok"
        if c.replicas
        else (
            "does not fit"
            if c.problem.startswith("does not fit")
            else "not accepted"
            if c.problem.startswith("not accepted")
            else "infeasible"
            if c.problem
            else "not planned"
        )
    )
    row.update(
        gpu=c.gpu,
        tensor_parallel=c.tp,
        data_parallel=c.dp,
        pods=pods,
        probes=c.probes,
        lower_bound_replicas=c.lower_bound or None,
        status=status,
        problem=c.problem or None,
    )
    if c.day is not None and c.replicas:
        t, lat = c.day.totals, c.day.day_latency
        row.update(day_figures(c.day))
        row.update(
            replicas=c.replicas,
            # a replica's GPUs: tensor_parallel x data_parallel (it said tensor_parallel alone,
            # half a TP1 x DP2 replica's, while its hardware cost counted both)
            gpus=pods * c.replicas * (c.rs.tp if c.rs is not None else c.tp),
            requests=t.requests_arrived,
            usd_per_mtok=t.usd_per_mtok,
            wh_per_request=t.wh_per_request,
            ttft_p99_s=lat["ttft_p99_s"],
            tpot_p99_s=lat["tpot_p99_s"],
        )
        if c.day_below is not None:  # the day at N - 1: why it fails
            row["below_worst_hour_ttft_p99_s"] = worst_hour(c.day_below, "ttft")
            row["below_worst_hour_tpot_p99_s"] = worst_hour(c.day_below, "tpot")
            row["below_passes"] = c.below_passes
    return row


def plan_table(cands: list[Candidate], pods: int) -> pa.Table:
    """Candidates ranked by the day's total cost (those without an answer last)."""
    return ranked_table([candidate_row(c, pods) for c in cands], PLAN_COLUMNS)


def parse_list(flag: str, raw: str, kind=str) -> list:
    """A comma-separated flag's values; an empty one (``--gpus ''``, e.g. an unset shell
    variable) is an error, not the default."""
    example = f"{flag} 2,4,8" if kind is int else f"{flag} h100-sxm,h200"
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not items:
        raise UserError(f"{flag} {raw!r}: empty list (fix: e.g. {example})")
    try:
        out = [kind(x) for x in items]
    except ValueError:
        raise UserError(f"{flag} {raw!r}: not a list of integers (fix: e.g. {example})") from None
    if kind is int and any(x < 1 for x in out):
        raise UserError(f"{flag} {raw!r}: values must be >= 1 (fix: e.g. {example})")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="fleetsim plan", description=description(__doc__))
    ap.add_argument("scenario", help="scenario TOML file")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario field first",
    )
    ap.add_argument(
        "--gpus", help="candidate GPUs, comma-separated (default: the scenario's GPU and h200)"
    )
    ap.add_argument("--tp", help="candidate tensor-parallel degrees (default 1,2,4,8)")
    ap.add_argument(
        "--dp",
        help="candidate data-parallel engines per replica, comma-separated (default: the "
        "scenario's fleet.data_parallel); each engine keeps the scenario's per-engine "
        "max_batch_size and max_batched_tokens, and a mixture of experts keeps "
        "fleet.expert_parallel (EP = TP x DP)",
    )
    ap.add_argument(
        "--slo-ttft-p99-s",
        type=float,
        default=None,
        help="p99 TTFT target per hour (default: the scenario's slo.ttft_s)",
    )
    ap.add_argument(
        "--slo-tpot-p99-s",
        type=float,
        default=None,
        help="p99 TPOT target per hour (default: the scenario's slo.tpot_s)",
    )
    ap.add_argument(
        "--hours",
        choices=("all", "peak"),
        default="all",
        help="the SLO must hold in every hour (default) or in the peak-traffic hour",
    )
    ap.add_argument(
        "--designs",
        choices=("aggregated", "disaggregated", "both"),
        default=None,
        help="which fleet designs to plan (default: both when the scenario has "
        "[disaggregation], else aggregated); see apps/plan_disagg.py",
    )
    ap.add_argument(
        "--prefill-gpus",
        help="disaggregated: candidate GPUs of the prefill pool, comma-separated (default: the "
        "scenario's)",
    )
    ap.add_argument(
        "--decode-gpus",
        help="disaggregated: candidate GPUs of the decode pool (default: the scenario's)",
    )
    ap.add_argument(
        "--out",
        help="output folder (default out/<the scenario file's stem>-plan, e.g. out/default-plan)",
    )
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    ap.add_argument("--no-schedule", action="store_true", help="skip the per-hour schedule")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or table")
    ap.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (the ranked candidates, the schedule, the paths "
        "written); the table goes to stderr",
    )
    add_executor_args(ap)
    return ap


#: the field of a kernel that only some GPUs or models run (config/aggregated.py
#: ``_with_fp8_moe_kernel``, ``check_fp8_moe_kernel``): a candidate or sweep point refused
#: for it is ``not accepted``, as a split vLLM refuses
KERNEL_FIELD = "fp8_moe_kernel"


def fit_reason(e) -> str:
    """A candidate's ``does not fit`` reason: the error's problem, and for weights that a split
    does not hold, its fix, which names the smallest TP / DP that does (the plan's candidates
    to add with ``--tp`` / ``--dp``). A kernel the candidate's GPU cannot run
    (``fleet.fp8_moe_kernel``: FlashInfer's TensorRT-LLM fp8 MoE kernel off Blackwell) is named
    with its value and its fix: its problem ("has no fitted constants for hardware.gpu =
    'h200'") does not say what has none."""
    if "weights need" in e.problem and e.fix:
        return f"{e.problem} (fix: {e.fix})"
    if e.field.endswith(KERNEL_FIELD):
        return f"{e.field} = {e.value!r}: {e.problem}" + (f" (fix: {e.fix})" if e.fix else "")
    return str(e.problem)


def make_candidates(
    data: dict,
    sc,
    gpus: list[str],
    tps: list[int],
    source: str,
    flag: str = "--gpus",
    dps: list[int] | None = None,
) -> list[Candidate]:
    """Resolve every GPU x TP (x DP: ``dps``, None for the scenario's ``data_parallel``); a
    candidate whose weights or KV do not fit, or whose split vLLM refuses, is kept with its
    reason. An unknown GPU name is a user error, named by ``flag`` (the Python API's
    ``gpus =``)."""
    cands = []
    for g in gpus:
        for tp in tps:
            for dp in dps or [sc.fleet.data_parallel]:
                base = candidate_base(data, g, tp, sc.hardware.gpu, dp)
                c = Candidate(gpu=g, tp=tp, dp=dp, base=base)
                resolve_candidate(
                    c, source, lambda f: f.startswith("hardware"), f"{flag} {g!r}", fit_reason
                )
                if c.rs is None and not any(w in c.problem for w in MEMORY_WORDS):
                    # a split vLLM refuses (heads, experts, a router a DP replica cannot
                    # take): not a question of memory
                    c.problem = "not accepted: " + c.problem.removeprefix("does not fit: ")
                cands.append(c)
    return cands


def plan_fleet(
    data: dict,
    source: str,
    slo: Slo,
    cands: list[Candidate],
    ex: Executor,
    hooks=None,
    *,
    schedule: bool = True,
    log=None,
) -> tuple[pa.Table, dict | None]:
    """Plan every candidate (see the module docstring); the ranked table and the schedule of the
    best candidate (None without one, or with ``schedule=False``)."""
    planner = Planner(data, source, slo, ex, hooks)
    ratios: dict[tuple[int, int], float] = {}  # (TP, DP) -> replicas / throughput bound
    last = None
    for c in cands:
        if c.rs is None:
            continue
        if hooks is not None:
            hooks.describe(f"plan {label(c.gpu, c.tp, c.dp)}")
        planner.plan_candidate(c, ratios.get((c.tp, c.dp), last))
        if c.replicas and c.lower_bound:
            ratios[(c.tp, c.dp)] = last = c.replicas / c.lower_bound
        if log is not None:
            log(
                f"{label(c.gpu, c.tp, c.dp)}: "
                + (
                    f"{c.replicas} replica{'' if c.replicas == 1 else 's'} per pod "
                    f"({c.probes} probes)"
                    if c.replicas
                    else c.problem
                )
            )
    pods = scenario_from_dict(data, source).fleet.pods
    table = plan_table(cands, pods)
    best = (
        next(
            (
                c
                for c in cands
                if c.replicas
                and c.gpu == table["gpu"][0].as_py()
                and c.tp == table["tensor_parallel"][0].as_py()
                and c.dp == table["data_parallel"][0].as_py()
            ),
            None,
        )
        if table.num_rows
        else None
    )
    sched = None
    if best is not None and schedule:
        if hooks is not None:
            hooks.describe(f"schedule {label(best.gpu, best.tp, best.dp)}")
        sched = {
            "gpu": best.gpu,
            "tensor_parallel": best.tp,
            "data_parallel": best.dp,
            "replicas_by_hour": planner.schedule(best),
        }
    return table, sched


def main(argv: list[str]) -> int:
    """``fleetsim plan``: see the module docstring."""
    from fleetsim.apps.common import open_output
    from fleetsim.results.output import write_table_atomic, write_text_atomic
    from fleetsim.results.provenance import provenance

    args = build_parser().parse_args(argv)
    data, text = read_toml(args.scenario)
    data = apply_overrides(data, args.overrides)
    sc = scenario_from_dict(data, args.scenario)
    rs = resolve(sc, args.scenario)
    data = sc.model_dump(mode="json")
    slo = Slo(
        args.slo_ttft_p99_s or sc.slo.ttft_s, args.slo_tpot_p99_s or sc.slo.tpot_s, args.hours
    )
    for flag, v, eg in (
        ("--slo-ttft-p99-s", args.slo_ttft_p99_s, "2"),
        ("--slo-tpot-p99-s", args.slo_tpot_p99_s, "0.05 (50 ms)"),
    ):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise UserError(f"{flag} {v:g}: must be a positive number of seconds (fix: e.g. {eg})")
    agg_data, cands, dcands = _candidates(args, sc, data)
    names = ("plan.parquet", "schedule.json") + (("plan_disaggregated.parquet",) if dcands else ())
    outp = open_output(args, Path(args.scenario).stem + "-plan", names)
    t0 = time.perf_counter()
    with (
        make_executor(args.executor, args.workers, args.address) as ex,
        task_progress(progress_label("plan", ex), args.quiet) as hooks,
    ):
        table, sched = plan_fleet(
            agg_data,
            args.scenario,
            slo,
            cands,
            ex,
            hooks,
            schedule=not args.no_schedule,
            log=lambda text: hooks.log(term(text, 400)),  # (user text: escaped)
        )
        dtable = _plan_disaggregated(agg_data, args, sc, slo, dcands, ex, hooks)
    wall = time.perf_counter() - t0
    meta = provenance(
        rs,
        text,
        overrides=json.dumps(args.overrides),
        slo=json.dumps(
            {"ttft_p99_s": slo.ttft_p99_s, "tpot_p99_s": slo.tpot_p99_s, "hours": slo.hours}
        ),
        wall_s=f"{wall:.3f}",
        schedule=json.dumps(sched),
    )
    path = outp.final("plan.parquet")
    write_table_atomic(table, outp.path("plan.parquet"), meta)
    if sched is not None:
        write_text_atomic(json.dumps(sched, indent=1) + "\n", outp.path("schedule.json"))
    if dtable is not None:
        write_table_atomic(dtable, outp.path("plan_disaggregated.parquet"), meta)
    outp.commit()  # (an error or interrupt before this leaves the folder as it was)
    _print_outcome(args, table, dtable, sched, slo, cands, outp, path, wall, sc.simulation.hours)
    return no_answer_exit(table if cands else None, dtable)


#: the exit code of a plan in which no candidate meets the SLO (README: as ``run --strict``'s for
#: an overloaded run; the files are written, and each candidate's reason is in them)
NO_ANSWER_EXIT = 4


def no_answer_exit(table: pa.Table | None, dtable: pa.Table | None) -> int:
    """0 when some candidate (of either design) meets the SLO: an infeasible candidate beside
    it is an answer too. :data:`NO_ANSWER_EXIT` with one line on stderr when none does."""
    import sys

    statuses = [s for t in (table, dtable) if t is not None for s in t.column("status").to_pylist()]
    if "ok" in statuses:
        return 0
    print(
        "fleetsim: plan: no candidate meets the SLO, so the exit code is 4; plan.parquet "
        "(column problem) and the lines under the table give each candidate's reason and fix",
        file=sys.stderr,
    )
    return NO_ANSWER_EXIT


def _candidates(args, sc, data: dict) -> tuple[dict, list, list]:
    """The aggregated scenario's data and the candidates of each design to plan."""
    gpus = (
        parse_list("--gpus", args.gpus)
        if args.gpus is not None
        else list(dict.fromkeys([sc.hardware.gpu, "h200"]))
    )
    tps = parse_list("--tp", args.tp, int) if args.tp is not None else list(DEFAULT_TPS)
    dps = parse_list("--dp", args.dp, int) if args.dp is not None else None
    dis_sec = sc.disaggregation
    designs = args.designs or ("both" if dis_sec is not None else "aggregated")
    if args.dp is not None and designs == "disaggregated":
        raise UserError(
            f"--dp {args.dp!r}: a dimension of the aggregated design, which this plan does not "
            "size (fix: --designs both, or leave it out)"
        )
    for flag, given in (("--prefill-gpus", args.prefill_gpus), ("--decode-gpus", args.decode_gpus)):
        if given is not None and designs == "aggregated":
            raise UserError(
                f"{flag} {given!r}: a pool of the disaggregated design, which this plan does not "
                "size (fix: add --designs both, or leave it out)"
            )
    agg_data = {k: v for k, v in data.items() if k != "disaggregation"}
    cands = (
        make_candidates(agg_data, sc, gpus, tps, args.scenario, dps=dps)
        if designs != "disaggregated"
        else []
    )
    dcands = []
    if designs != "aggregated":
        from fleetsim.apps.plan_disagg import make_disagg_candidates

        def pool_gpu(pool: str) -> str:
            sec = getattr(dis_sec, pool) if dis_sec is not None else None
            return sec.gpu if sec is not None and sec.gpu else sc.hardware.gpu

        pg = (
            parse_list("--prefill-gpus", args.prefill_gpus)
            if args.prefill_gpus is not None
            else None
        )
        dg = parse_list("--decode-gpus", args.decode_gpus) if args.decode_gpus is not None else None
        dcands = make_disagg_candidates(
            data, pg or [pool_gpu("prefill")], dg or [pool_gpu("decode")], args.scenario
        )
    return agg_data, cands, dcands


def _plan_disaggregated(agg_data, args, sc, slo, dcands, ex, hooks) -> pa.Table | None:
    """Size the pools of every disaggregated candidate; their table (None without any)."""
    if not dcands:
        return None
    from fleetsim.apps.plan_disagg import DisaggPlanner, disagg_table

    dplanner = DisaggPlanner(agg_data, args.scenario, slo, ex, hooks)
    for dc in dcands:
        if dc.rs is None:
            continue
        hooks.describe(f"plan disaggregated {dc.label}")
        dplanner.plan(dc)
        hooks.log(
            f"disaggregated {dc.label}: "
            + (
                f"{dc.prefill} prefill + {dc.decode} decode replicas per pod ({dc.probes} probes)"
                if dc.day is not None
                else dc.problem
            )
        )
    dtable = disagg_table(dcands, sc.fleet.pods)
    return dtable


def _print_outcome(args, table, dtable, sched, slo, cands, outp, path, wall, hours=24) -> None:
    """The ranked tables and the paths written, for a person (and as JSON with --json)."""
    from fleetsim.apps.common import console, print_json

    wide = console(stderr=args.json)  # stderr when stdout carries the JSON document
    if not args.quiet:
        if cands:
            print_plan(table, slo, sched, wide, hours)
            dps = sorted({c.dp for c in cands if c.rs is not None})
            ep = any(c.rs.expert_parallel for c in cands if c.rs is not None)
            if len(dps) == 1 and dps[0] > 1:  # (the TP column is tensor_parallel alone)
                wide.print(
                    f"each replica is TP x DP{dps[0]} GPUs (fleet.data_parallel = {dps[0]}"
                    + (", expert parallel)" if ep else ")")
                )
            elif len(dps) > 1:
                wide.print(
                    "each replica is TP x DP GPUs (DP: fleet.data_parallel"
                    + (", expert parallel over TP x DP" if ep else "")
                    + "); each engine keeps the scenario's per-engine max_batch_size and "
                    "max_batched_tokens"
                )
            line = price_line(cands, args.scenario)
            if line:
                wide.print(term(line))
        if dtable is not None:
            from fleetsim.apps.plan_disagg import print_designs

            print_designs(table if cands else None, dtable, slo, wide, hours)
        wide.print(
            f"wrote {term(path)}" + (" and schedule.json" if sched else "") + f" in {wall:.1f} s"
        )
    if args.json:
        paths = {"plan": str(path.resolve())}
        if sched is not None:
            paths["schedule"] = str(outp.final("schedule.json").resolve())
        if dtable is not None:
            paths["plan_disaggregated"] = str(outp.final("plan_disaggregated.parquet").resolve())
        print_json(
            {
                "slo": {"ttft_p99_s": slo.ttft_p99_s, "tpot_p99_s": slo.tpot_p99_s},
                "candidates": table.to_pylist() if cands else [],
                "disaggregated": dtable.to_pylist() if dtable is not None else None,
                "schedule": sched,
                "paths": paths,
                "wall_s": wall,
            }
        )


def price_line(cands: list[Candidate], source: str = "") -> str:
    """The hardware price behind each GPU's ``hw $``: the scenario's ``[hardware]`` figures
    hold for its own GPU only, every other GPU is priced from the catalog (so a price set for
    one GPU is never silently applied to another); '' without a resolved candidate."""
    from fleetsim.device import catalog

    seen: dict[str, str] = {}
    for c in cands:
        rs = c.rs
        if rs is None or c.gpu in seen:
            continue
        g, cost = rs.gpu, rs.scenario.cost
        cat = catalog.gpus().get(c.gpu, {})
        key = "rent_usd_per_gpu_hour" if cost.hardware == "rented" else "capex_usd"
        where = "catalog" if getattr(g, key) == cat.get(key) else "the scenario's [hardware]"
        if cost.hardware == "rented":
            seen[c.gpu] = f"{c.gpu} ${g.rent_usd_per_gpu_hour:,.2f}/GPU-h rent ({where})"
        else:
            seen[c.gpu] = (
                f"{c.gpu} ${g.capex_usd:,.0f} per GPU over {cost.amortization_years:g} years "
                f"({where})"
            )
    return ("hardware prices: " + "; ".join(seen.values())) if seen else ""


def print_plan(table: pa.Table, slo: Slo, sched: dict | None, c, hours: int = 24) -> None:
    """The ranked candidates as a table (never cut: :mod:`fleetsim.base.tables`); ``hours``:
    the simulated horizon its cost and energy columns cover."""
    from fleetsim.base.tables import print_table

    def f(v: object, fmt: str) -> str:
        return fmt_num(v, fmt, missing="")

    rows_in = table.to_pylist()
    show_dp = any((r["data_parallel"] or 1) > 1 for r in rows_in)
    headers = (
        "#",
        "GPU",
        "TP",
        *(("DP",) if show_dp else ()),
        "repl",
        "GPUs",
        f"$/{horizon(hours)}",
        "energy $",
        "hw $",
        f"kWh/{horizon(hours)}",
        "$/Mtok",
        "Wh/req",
        "TTFT s",
        "TPOT ms",
        "status",
    )
    rows = [
        (
            f(r["rank"], "d"),
            term(r["gpu"]),
            str(r["tensor_parallel"]),
            *((str(r["data_parallel"]),) if show_dp else ()),
            f(r["replicas"], "d"),
            f(r["gpus"], ",d"),
            f(r["total_cost_usd"], ",.2f"),
            f(r["energy_cost_usd"], ",.2f"),
            f(r["hardware_cost_usd"], ",.2f"),
            f(r["energy_facility_kwh"], ",.1f"),
            f(r["usd_per_mtok"], ".3f"),
            f(r["wh_per_request"], ".3f"),
            f(r["worst_hour_ttft_p99_s"], ".3f"),
            f((r["worst_hour_tpot_p99_s"] or math.nan) * 1000, ".1f"),
            term(r["status"]),
        )
        for r in rows_in
    ]
    title = (
        f"capacity plan: p99 TTFT <= {slo.ttft_p99_s:g} s and p99 TPOT <= "
        f"{slo.tpot_p99_s * 1000:g} ms in {'every hour' if slo.hours == 'all' else 'the peak hour'}"
    )
    print_table(c, title, headers, rows, left=("GPU", "status"))
    c.print(
        "repl = replicas per pod; TTFT/TPOT = the worst hour's p99 at that count"
        + (
            ""
            if hours == 24
            else f"; $ and kWh over the simulated {hours} h (simulation.hours), not a day"
        )
    )
    for r in rows_in:
        if r["problem"]:
            name = label(r["gpu"], r["tensor_parallel"], r["data_parallel"] or 1)
            c.print(term(f"  {name}: {r['problem']}", 700))
    if sched:
        name = label(sched["gpu"], sched["tensor_parallel"], sched.get("data_parallel", 1))
        c.print(
            f"schedule ({term(name)}), replicas per pod by hour: {sched['replicas_by_hour']}",
            highlight=False,
        )
