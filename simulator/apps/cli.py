"""The ``fleetsim`` command line: validate, run, and the subcommands of the other modules.

User mistakes print one line naming the field, the value and the fix, and exit with code 2,
without a traceback. SIGINT and SIGTERM stop a run with a short message and exit code 130/143,
and leave no partial output files (they are written under temporary names until complete).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fleetsim.base.errors import InvariantError, UserError


class Interrupted(Exception):
    """A signal asked the run to stop."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _on_signal(signum, _frame):
    """The first signal: stop the command by an exception, so that outputs are aborted and
    workers terminated on the way out. A second signal exits at once (:func:`_on_second`)."""
    for s in SIGNALS:
        signal.signal(s, _on_second)
    raise Interrupted(signum)


def _on_second(signum, _frame):
    """A second signal while the first one is being handled: never wait for anything. Worker
    processes are killed; a staging folder left behind is removed by the next run into it."""
    import os

    ex = sys.modules.get("fleetsim.apps.executors")  # (not imported: no workers to kill)
    if ex is not None:
        ex.kill_workers()
    os.write(
        2,
        f"fleetsim: interrupted by {signal.Signals(signum).name} while stopping; exited at "
        "once (temporary files, if any, are removed by the next run into that folder)\n".encode(),
    )
    os._exit(128 + signum)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario TOML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any scenario field (repeatable), e.g. --set fleet.replicas=8",
    )
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")


def cmd_validate(args) -> int:
    from fleetsim.apps.common import print_json
    from fleetsim.config.loading import load_scenario
    from fleetsim.config.resolve import resolve
    from fleetsim.config.resolved import resolved_dict, sizes_from_file
    from fleetsim.results.summary import kv_kinds, serving_stack

    sc, _ = load_scenario(args.scenario, args.overrides, args.seed)
    rs = resolve(sc, args.scenario)
    print_json(resolved_dict(rs))  # every catalog field resolved, and the derived figures
    if not args.json:
        from fleetsim.config.aggregated import model_source_note

        kinds = kv_kinds(
            rs.model,
            rs.kv.bytes_per_token if rs.kv is not None else None,
            sizes_from_file(sc),
        )
        note = model_source_note(sc.model, args.scenario, rs.model)
        print(
            f"# model {rs.model.name}"
            + (f" ({note})" if note else "")
            + f": {rs.model.total_params / 1e9:.2f} B parameters "
            f"({rs.model.total_params:,}), {rs.model.weight_bytes / 1e9:.1f} GB weights; "
            f"KV budget {rs.kv_capacity_tokens:,} tokens per replica (KV cache "
            f"{rs.model.kv_dtype_resolved}, {round(rs.model.kv_bytes_per_token):,} bytes per "
            + ("token" if rs.model.kv_uniform else "token in full")
            + (f"; {kinds}" if kinds else "")
            + "; GB = 10^9 bytes)"
            + (
                f" ({rs.kv.blocks:,} blocks of {rs.kv.block_size_tokens}; "
                f"{rs.kv.kv_bytes / 1e9:,.1f} GB = {sc.fleet.gpu_memory_utilization:g} x "
                f"{rs.kv.memory_bytes / 1e9:,.1f} GB - {rs.kv.weight_bytes / 1e9:,.1f} GB "
                f"weights - {rs.kv.activation_bytes / 1e9:,.2f} GB activations)"
                if rs.kv is not None
                else ""
            )
            + (
                # a hybrid's constant state per sequence, as the engine holds it
                f"; each sequence also holds its linear-state state, "
                f"{rs.model.state_bytes_per_seq_tp(sc.fleet.tensor_parallel) / 1e6:,.1f} MB"
                + (
                    f" ({rs.kv.state_blocks:,} layer-blocks of {rs.kv.block_size_tokens} tokens, "
                    f"padded as vLLM pages it); longest request {rs.kv.request_tokens:,} tokens"
                    if rs.kv.state_blocks
                    else f"; longest request {rs.kv.request_tokens:,} tokens"
                )
                if rs.kv is not None and rs.model.n_linear_layers
                else ""
            )
            + (
                # a windowed model: the longest request the engine admits counts the windows'
                # blocks exactly, not at the token count's bytes per token (gemma-3-27b-it on
                # one H100: 252,176 tokens against 41,536; scenarios/README.md)
                f"; longest request {rs.kv.request_tokens:,} tokens (each layer kind's blocks)"
                if rs.kv is not None
                and not rs.model.n_linear_layers
                and rs.kv.request_tokens != rs.kv_capacity_tokens
                else ""
            )
            + f"; profile {rs.profile_id}; serving stack {serving_stack(rs)}",
            file=sys.stderr,
        )
        if rs.pools is not None:  # a disaggregated fleet: each pool's own figures
            for p in (rs.pools.prefill, rs.pools.decode):
                print(
                    f"# {p.name} pool: {p.replicas} x TP{p.tp} {p.gpu_name} per pod, KV budget "
                    f"{p.kv_capacity_tokens:,} tokens per replica, router {p.router}",
                    file=sys.stderr,
                )
            link = rs.pools.link
            print(
                f"# KV link {link.name}: {link.bandwidth_bytes_per_s / 1e9:g} GB/s per GPU x "
                f"TP{rs.pools.prefill.tp} per prefill replica, {link.latency_s * 1e6:g} us per "
                f"transfer; {rs.pools.kv_bytes_per_token / 1024:g} KiB of KV per prompt token",
                file=sys.stderr,
            )
        pw = rs.gpu.power
        # only the terms that apply to this model and fleet, as the simulation charges them
        # (serving.energy.energy_coeffs): communication where the replica communicates, the fp8
        # fused-MoE K loop for fp8 block-quantised experts, the routed experts' compute for an
        # MoE, the host wait where an iteration has exposed host time
        from fleetsim.serving.energy import energy_coeffs

        ec = energy_coeffs(rs)
        print(
            f"# power model ({rs.gpu.name}, per GPU): idle {pw.idle_w:g} W, busy "
            f"{pw.idle_w + pw.active_w:g} W + {pw.compute_w:g} W x compute use + "
            f"{pw.memory_w:g} W x bandwidth use + {pw.kv_w:g} W x its KV/state part"
            + (
                f"; {pw.idle_w + pw.comm_w:g} W while communicating"
                if pw.comm_w is not None and ec["track_comm"]
                else ""
            )
            + (
                f"; {pw.idle_w + pw.moe_loop_w:g} W in the fp8 fused-MoE K loop"
                if pw.moe_loop_w is not None and ec["track_loop"]
                else ""
            )
            + (
                f"; + {pw.moe_compute_w:g} W x the routed experts' compute use"
                if pw.moe_compute_w and ec["track_xf"]
                else ""
            )
            + (
                f"; {pw.idle_w + pw.host_w:g} W waiting on the host"
                if pw.host_w is not None and ec["e_host_j"]
                else ""
            )
            + (
                ""
                if pw.compute_u0 is None
                else f"; the compute terms x (1 + {pw.compute_u0:g}) / (compute use + "
                f"{pw.compute_u0:g})"
            )
            + f", capped at {pw.max_w:g} W; "
            f"{pw.confidence or 'no provenance'}",
            file=sys.stderr,
        )
    return 0


def cmd_schema(args) -> int:
    from fleetsim.apps.common import print_json
    from fleetsim.config.fields import profile_schema
    from fleetsim.config.jsonschema import scenario_json_schema

    print_json(profile_schema() if args.profile else scenario_json_schema())
    return 0


def _run_executor(args):
    """The executor of ``run --executor/--workers``, or None to simulate the pods here."""
    if args.executor is None and args.workers is None:
        return None
    from fleetsim.apps.executors import make_executor

    return make_executor(args.executor or "local", args.workers, args.address)


class _NoBar:
    """The progress bar of a ``--quiet`` run, which shows none: rich is not imported for it
    (rich.console and rich.progress: ~30 ms of a small run's start-up)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kw) -> int:
        return 0

    def advance(self, *args, **kw) -> None:
        return None


def _progress_bar(quiet: bool):
    """rich's transient progress bar on stderr, or :class:`_NoBar` with ``--quiet``."""
    if quiet:
        return _NoBar()
    from rich.progress import Progress

    from fleetsim.apps.common import console as make_console

    return Progress(console=make_console(stderr=True), transient=True)


def cmd_run(args) -> int:
    from fleetsim.apps.common import console as make_console
    from fleetsim.apps.common import open_output, print_json
    from fleetsim.apps.simulate import simulate, write_outputs
    from fleetsim.config.loading import load_scenario
    from fleetsim.config.resolve import resolve
    from fleetsim.results.output import RequestWriter
    from fleetsim.results.summary import health, print_summary, print_warnings, summary_dict

    if args.format != "fleetsim" and not args.json:
        raise UserError(
            f"--format {args.format}: it is the format of the --json document (fix: add --json)"
        )
    if args.workers is not None:
        from fleetsim.apps.executors import check_workers

        # before the folder and the progress bar: a mistake is one line (the transient bar's
        # exit printed a blank line ahead of it)
        check_workers(args.workers)
    sc, text = load_scenario(args.scenario, args.overrides, args.seed)
    sc._source = args.scenario  # (the summary's capacity estimate reads a trace's sizes)
    rs = resolve(sc, args.scenario)
    names = ("hourly.parquet",) + (("requests.parquet",) if args.requests else ())
    if rs.pools is not None:  # a disaggregated fleet: one row per (hour, pool) as well
        names += ("pools.parquet",)
    # the folder is checked, locked and probed before simulating; the run's files (the report
    # included) are staged and moved into place together at the end (results/output.py)
    outp = open_output(args, Path(args.scenario).stem, names)
    out = outp.out
    sink = RequestWriter(outp.path("requests.parquet")) if args.requests else None
    end_of_startup()  # (the collector runs again for the simulation)
    n_pods = len(range(min(sc.fleet.sample_pods or sc.fleet.pods, sc.fleet.pods)))
    try:
        with _progress_bar(args.quiet) as bar:
            task = bar.add_task("simulating", total=n_pods * sc.simulation.hours)
            ex = _run_executor(args)  # pods as tasks of a process pool or Ray (executors.py)
            failed = True
            try:
                runner = None
                if ex is not None:  # (executors.py, and concurrent.futures, only then)
                    from fleetsim.apps.executors import pod_runner

                    runner = pod_runner(ex, lambda: bar.advance(task, sc.simulation.hours))
                res = simulate(
                    rs,
                    source=args.scenario,
                    request_sink=sink,
                    progress=lambda k: bar.advance(task, k),
                    pod_runner=runner,
                )
                failed = False
            finally:
                if ex is not None:
                    ex.close(cancel=failed)
        if sink is not None:
            sink.close(res.metadata(text))
            sink = None
        write_outputs(res, outp.staging(), text)
        if args.report:
            from fleetsim.apps.report import write_report

            write_report(
                out,
                result=res,
                source=args.scenario,
                into=outp.staging(),
                show_progress=not args.quiet,
            )
        written = outp.commit()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise  # (main() aborts the uncommitted output: the folder is left as it was)
    paths = {p.stem if p.suffix == ".parquet" else p.name: str(p.resolve()) for p in written}
    # the human summary: stdout, or stderr when stdout carries the JSON document
    if not args.quiet:
        human = make_console(stderr=args.json)
        print_summary(res, human, args.scenario)
        human.print(
            f"wrote {', '.join(p.name for p in written)} in {_shown(out)} in {res.wall_s:.1f} s",
            markup=False,
        )
    # an overloaded run says so, even with --quiet (one prominent line on stderr)
    if health(res)["warnings"]:
        print_warnings(res, make_console(stderr=True))
    if args.json:
        if args.format == "vllm":
            from fleetsim.results.vllm import vllm_result

            print_json(vllm_result(res) | {"fleetsim": summary_dict(res, paths)})
        else:
            print_json(summary_dict(res, paths))
    if args.strict and health(res)["overloaded"]:
        return 4
    return 0


def _shown(p) -> str:
    from fleetsim.base.io import clean

    return clean(str(p))


#: ``fleetsim --help``'s description (for a user; the module docstring is for developers)
USAGE_DESCRIPTION = (
    "Simulate the GPU fleets that serve large language models: energy, cost and latency, "
    "hour by hour. Start with: fleetsim run scenarios/default.toml. Each command has its own "
    "--help; scenarios/README.md lists the scenario library and docs/ the model."
)


class _Version(argparse.Action):
    """``--version``, reading the installed metadata only when asked (start-up time)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from fleetsim.base.version import __version__

        print(f"fleetsim {__version__}")  # (on stdout, as argparse's version action)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from fleetsim.apps.common import OneLineParser

    ap = OneLineParser(prog="fleetsim", description=USAGE_DESCRIPTION)
    ap.add_argument("--version", action=_Version, help="show the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "validate",
        help="print the resolved scenario (JSON: catalog fields filled in, parameter count) "
        "or a clear error",
    )
    _add_run_args(p)
    p.add_argument(
        "--json", action="store_true", help="only the JSON document (no summary line on stderr)"
    )
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the scenario file's JSON Schema")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print the profile file's JSON Schema instead (hardware.profile, calibrate's output)",
    )
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("run", help="simulate a scenario and write hourly.parquet")
    _add_run_args(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (the day's figures, health flags, the paths "
        "written); the human summary goes to stderr",
    )
    p.add_argument(
        "--format",
        choices=("fleetsim", "vllm"),
        default="fleetsim",
        help="the --json document: fleetsim's summary (default), or 'vllm': the keys and units "
        "of vLLM's benchmark_serving result file (mean/median/std/p50..p99 of ttft, tpot, itl, "
        "e2el in ms; request_throughput, output_throughput, total_token_throughput; completed, "
        "duration), with fleetsim's summary under the key 'fleetsim'",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with code 4 when the run is overloaded (the queue grows without bound or "
        "under 90%% of requests meet the SLO)",
    )
    p.add_argument(
        "--out", help="output folder (default out/<the scenario file's stem>, e.g. out/default)"
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--requests", action="store_true", help="also write requests.parquet")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--report", action="store_true", help="also write the report (plots + page)")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default=None,
        help="simulate the pods as tasks of a process pool or Ray (default: here)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="workers for --executor (default os.cpu_count())"
    )
    p.add_argument("--address", default=None, help="Ray cluster address (--executor ray)")
    p.set_defaults(func=cmd_run)
    # subcommands that own their argument parsing: name -> (module with main(argv), help)
    for name, module, text in DELEGATED:
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, m=module: _delegate(m, a.rest))
    return ap


DELEGATED = [
    (
        "calibrate",
        "fleetsim.calibrate.cli",
        "measure a torch Transformer on this device; write a profile",
    ),
    (
        "replay",
        "fleetsim.calibrate.replay",
        "replay a trace on the real torch engine and the simulator",
    ),
    ("plan", "fleetsim.apps.plan", "find the cheapest fleet that meets the SLO"),
    ("latency", "fleetsim.apps.latency", "predicted time of one iteration and its parts"),
    ("sweep", "fleetsim.apps.sweep", "simulate every point of a parameter grid"),
    (
        "crossover",
        "fleetsim.apps.crossover",
        "aggregated vs disaggregated cost per SLO-meeting request (one sweep, one figure)",
    ),
    ("report", "fleetsim.apps.report", "plots and a page for a finished run"),
    (
        "compare",
        "fleetsim.apps.compare",
        "a finished run beside a vLLM benchmark_serving result, with relative errors",
    ),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``build_parser().parse_args(argv)``, with an unknown option reported by the subcommand's
    parser (``fleetsim run: error: unrecognized arguments: --hours x ...``: its name, and the
    ``--set`` fix where the option is a scenario field), not the top level's."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
        subs.get(str(getattr(args, "cmd", "")), ap).error(
            "unrecognized arguments: " + " ".join(extra)
        )
    return args


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. Called with ``argv`` (in-process use) the
    signal handlers are restored after; as the program itself (``argv`` None) a signal that
    arrives after the command, while the interpreter shuts down, still exits at once with
    128 + signum and one line (it cannot turn into a traceback or a hang)."""
    top_level = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if top_level:
        # pydantic looks for plugins among every installed distribution's entry points when
        # it builds the scenario's first model (~0.01 CPU s of each start, bench/RESULTS.md);
        # the program has none. PYDANTIC_DISABLE_PLUGINS= (empty) in the environment keeps them.
        import os

        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
        # numpy's OpenBLAS starts a pool of threads when it loads, which spin before they
        # sleep: ~44 M instructions (~1 %) of a 21,556-request run, on the cores the run needs
        # (bench/RESULTS.md, start-up, fifth pass). The program does no linear algebra (nothing
        # in fleetsim calls BLAS); a value already in the environment is kept.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        # and with them off, its loader's import of importlib.metadata is skipped too
        from fleetsim.apps import pydantic_plugins

        pydantic_plugins.install()
        if argv and argv[0] in _GC_PAUSED_COMMANDS:
            _pause_gc()
    delegated = {name: module for name, module, _ in DELEGATED}
    if argv and argv[0] in delegated:
        # argparse.REMAINDER does not keep options that come first ("replay --trace F"),
        # so these subcommands get their arguments untouched
        args = argparse.Namespace(
            func=lambda _a, m=delegated[argv[0]], rest=argv[1:]: _delegate(m, rest)
        )
    else:
        args = parse_args(argv)
    saved = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        rc = _main(args)
    finally:
        for s, handler in saved.items():
            signal.signal(s, _on_second if top_level else handler)
    if top_level and rc > 128:
        # interrupted: the outputs are aborted and the workers terminated, so nothing is left
        # for the interpreter's shutdown, during which Python restores the default handlers
        # (a second Ctrl-C there would kill the process by the signal): exit now
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    if top_level:
        _exit_now(rc)
    return rc


#: commands whose start (imports, loading, resolving) runs with the cyclic garbage collector
#: paused, when fleetsim is the program (see :func:`end_of_startup`)
_GC_PAUSED_COMMANDS = ("run", "validate")
_gc_paused = False


def _pause_gc() -> None:
    global _gc_paused
    import gc

    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def end_of_startup() -> None:
    """The command's start is over (modules imported, scenario loaded and resolved): what it
    allocated lives until the exit, so it is frozen out of the cyclic garbage collector's
    passes, which start again now for the work (``gc.freeze``, CPython's tool for this).

    A start with the collector running made ~100 young and ~10 middle collections that walked
    the ~45,000 objects of numpy, pyarrow, pydantic and the schema again and again (~0.03 CPU s
    of a small run and of ``validate``, bench/RESULTS.md). Only the program itself pauses it
    (:func:`main` without ``argv``; in-process callers keep their collector as it is); a
    ``validate`` keeps it paused to its exit."""
    global _gc_paused
    if _gc_paused:
        import gc

        _gc_paused = False
        gc.freeze()
        gc.enable()


def _exit_now(rc: int) -> None:
    """End the program with ``rc`` without the interpreter's teardown, when nothing needs it.

    The command has finished: its outputs are committed (or aborted) and closed, and what is
    left is freeing every module and object one by one (numpy, pyarrow, pydantic's models, a
    run's requests), ~0.04 CPU s of a small run (bench/RESULTS.md, start-up). Standard output
    and error are flushed and the ``atexit`` handlers run, as at a normal exit; a command that
    started threads or worker processes (``--workers``, Ray) exits normally, so that the
    interpreter joins them. Returns (and the caller exits normally) if any of that is not so."""
    import atexit
    import os
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if (
        run_exit_handlers is None
        or threading.active_count() > 1
        or "multiprocessing" in sys.modules
    ):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # (a closed pipe or stream: the normal exit reports it)
        return
    run_exit_handlers()
    os._exit(rc)


def _outputs():
    """:mod:`fleetsim.results.output` if a command has imported it, else None: a command that
    writes nothing (``validate``) never imports it, so it has no output to abort."""
    return sys.modules.get("fleetsim.results.output")


def _main(args) -> int:
    from fleetsim.base.io import clean

    if (out := _outputs()) is not None:
        out.LAST.clear()
    try:
        try:
            return int(args.func(args) or 0)
        except OSError as exc:  # writing a staged output failed (full disk, ulimit -f, ...)
            out = _outputs()
            if out is None or not out.open_outputs():
                raise
            where = out.open_outputs()[-1].out
            raise out.out_error(where, f"cannot write there: {out.os_problem(exc)}") from None
        finally:
            if (out := _outputs()) is not None:
                out.abort_open_outputs()  # an output not committed leaves the folder as it was
    except UserError as exc:
        print(f"fleetsim: error: {clean(str(exc), 4000)}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        from fleetsim.results import output

        print(f"fleetsim: interrupted by {exc}; {output.interrupted_note()}", file=sys.stderr)
        return 128 + exc.signum
    except InvariantError as exc:
        print(f"fleetsim: internal error: invariant violated: {clean(str(exc))}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
