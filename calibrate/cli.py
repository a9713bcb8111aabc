"""``fleetsim calibrate`` (also ``python -m calibrate``): the command line.

torch is imported only after the argument check, so that ``import fleetsim.calibrate.cli`` is
cheap and a machine without torch gets one line with the install command instead of a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetsim.device.modelspec import ModelSpec

INSTALL_HINT = (
    "fleetsim: error: fleetsim calibrate needs torch (fix: pip install -e '.[calibrate]', or "
    "pip install torch==2.13.0)"
)
DEFAULT_MODEL = "llama-3.1-8b"
CPU_DEFAULT_LAYERS = 2
CPU_QUICK_LAYERS = 1
#: On a CPU, ``calibrate --quick`` and ``replay`` time the model with its vocabulary cut to this
#: many rows (``--full-vocab`` keeps it whole). The output projection is then a GEMM of the same
#: kind over fewer rows, and the timed spec (``vocab_size`` included) is the one the fit, the
#: profile's ``model_config`` and the replay's simulator use, so the cut is consistent; it takes
#: Llama-3.1-8B's fp32 output projection from 2.1 GB to 34 MB: it was most of the run's memory
#: (peak RSS of ``calibrate --quick``: 4.4 GB before, about 1.35 GB after) and 70% of the bytes
#: of a one-layer decode step, so the fitted per-layer efficiencies were mostly the output
#: projection's.
CPU_VOCAB_ROWS = 2048


def cpu_sized(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its vocabulary cut to :data:`CPU_VOCAB_ROWS` (unchanged if smaller)."""
    if spec.vocab_size <= CPU_VOCAB_ROWS:
        return spec
    return dataclasses.replace(spec, vocab_size=CPU_VOCAB_ROWS)


class _Usage(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fleetsim calibrate``."""
    from fleetsim.apps.common import OneLineParser

    p = OneLineParser(
        prog="fleetsim calibrate",
        description="Time a real torch Transformer (random weights) on this device and write a "
        "roofline profile for the simulator.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"catalog model name or a TOML file of ModelSpec fields (default {DEFAULT_MODEL})",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU (bf16 matmul is emulated and very slow on most CPUs)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"build only N of the model's layers (default: all on CUDA, "
        f"{CPU_DEFAULT_LAYERS} on CPU, {CPU_QUICK_LAYERS} with --quick); "
        "efficiencies transfer per layer",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="profile JSON to write (default profiles/<device>-<model>.json); the "
        "grid Parquet goes beside it. With --from-vidur: the profile file (NAME.json, one GPU) "
        "or a folder for <gpu>-vidur.json (default out/calibrate-vidur/)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small grid, few repeats (under a minute on a 2-core CPU); on a CPU the "
        f"vocabulary is cut to {CPU_VOCAB_ROWS:,} rows (see --full-vocab)",
    )
    p.add_argument(
        "--full-vocab",
        action="store_true",
        help="with --quick on a CPU: time the whole vocabulary (its output projection is "
        "2.1 GB in fp32 for a 128k-vocabulary model)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop timing new grid points after this many seconds "
        "(default 40 with --quick, none otherwise)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--from-vidur",
        type=Path,
        default=None,
        metavar="DIR",
        help="no torch run: fit the kernel model to operator times in Vidur's profiling format "
        "(DIR/compute/GPU/ORG/MODEL/mlp.csv, DIR/network/GPU_dgx/all_reduce.csv) and write one "
        "profile per GPU folder",
    )
    p.add_argument(
        "--gpu",
        default=None,
        help="with --from-vidur: fit only this GPU: one of DIR's GPU folders (h100, a100) or "
        "its catalog name (h100-sxm); with one folder, any catalog GPU names it (its data-sheet "
        "peaks, memory and power). Default: every folder (a100 -> a100-80gb, h100 -> h100-sxm)",
    )
    p.add_argument(
        "--from-mlenergy",
        type=Path,
        default=None,
        metavar="DIR",
        help="no torch run: fit the GPU power model, the vllm-v1 serving stack's step-time "
        "constants, the eager MoE host floor (with --fit-moe the fused-MoE kernel's too) to "
        "measured configurations in the ML.ENERGY Benchmark v3 format (DIR/configurations.csv "
        "and DIR/output_lengths.csv or DIR/models/*.json; see data/mlenergy-v3/SOURCE.md) and "
        "write one profile per GPU into --out (a folder; required); parts without rows keep "
        "the catalog's, and so does the power model of a GPU with fewer non-suspect rows than "
        "its constants (4 to 8); GPUs: any catalog GPU, gpu_model as H100, H200, A100, B200, "
        "the catalog id or the chip with words of its description, any case (A100-SXM4-80GB; "
        "calibrate/gpu_names.py); others are skipped with the reason",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="with --from-mlenergy: processes simulating the configurations (default 2)",
    )
    p.add_argument(
        "--fit-moe",
        action="store_true",
        help="with --from-mlenergy: also fit the fused-MoE kernel constants (calibrate/"
        "moe_fit.py) to DIR's MoE rows and write them into the profiles (moe_constants); the "
        "power fit then simulates with them. One more simulation of every MoE row: about 6 "
        "minutes more on data/mlenergy-v3 with 2 workers. Default: the catalog's",
    )
    return p


def return_freed_memory() -> bool:
    """Make glibc's malloc hand freed blocks of 1 MB and more back to the system (a fixed mmap
    threshold and trim threshold; by default the mmap threshold rises to 32 MB after the first
    large free, and the calibration's freed activations and caches stay in the heap). Lowers the
    peak resident set of ``calibrate --quick`` by about 70 MB. Returns whether it applied (glibc
    only; elsewhere a no-op)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # (glibc's malloc.h)
    return bool(mallopt(m_mmap_threshold, 1 << 20)) and bool(mallopt(m_trim_threshold, 1 << 20))


#: Built-in model configs, beside the catalog's: ``small-lm`` is the small decoder of
#: docs/validation.md's CPU replays (45 M parameters, 33 M of them its 32k-row embeddings; 179 MB
#: in fp32), the default of ``fleetsim replay`` on a CPU, where one layer of an 8B model streams
#: 0.9 GB per iteration and a 30-request trace takes minutes.
BUILTIN_MODELS: dict[str, dict] = {
    "small-lm": {
        "name": "small-lm",
        "n_layers": 4,
        "d_model": 512,
        "n_heads": 8,
        "n_kv_heads": 2,
        "d_ff": 1536,
        "vocab_size": 32000,
        "max_context_tokens": 4096,
    }
}


def resolve_model(arg: str, dtype: str) -> ModelSpec:
    """ModelSpec of a catalog name, a built-in config (:data:`BUILTIN_MODELS`) or a TOML file
    (``name`` defaults to the file's stem)."""
    from fleetsim.base.errors import UserError
    from fleetsim.device.modelspec import ModelSpec, model_from_catalog

    if arg in BUILTIN_MODELS:
        return ModelSpec(**{**BUILTIN_MODELS[arg], "dtype": dtype})

    path = Path(arg)
    if arg.endswith(".toml") or path.is_file():
        from fleetsim.base import io

        try:  # bounded reading: a regular file, size limit, UTF-8, depth limit (base/io.py)
            data = io.parse_toml(io.read_text(path, "--model"), f"--model {io.clean(arg)}")
        except UserError as exc:
            raise _Usage(str(exc)) from None
        data = data.get("model", data)
        if not isinstance(data, dict):
            raise _Usage(f"--model {io.clean(arg)}: [model] must be a table")
        data.pop("published_params", None)
        data.setdefault("name", path.stem)
        data["dtype"] = dtype
        fields = {f.name for f in dataclasses.fields(ModelSpec)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise _Usage(
                f"--model {io.clean(arg)}: unknown field(s) {io.clean(', '.join(unknown), 80)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        required = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise _Usage(f"--model {io.clean(arg)}: missing field(s) {', '.join(missing)}")
        # the same bounds as an inline [model] of a scenario (config/schema.py ModelSection)
        from pydantic import ValidationError

        from fleetsim.config.schema import ModelSection

        try:
            ModelSection.model_validate(dict(data.items()))
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(x) for x in e["loc"])
            raise _Usage(
                f"--model {io.clean(arg)}: {loc} = {io.clean(repr(e.get('input')), 60)}: {e['msg']}"
            ) from None
        if data["d_model"] % data["n_heads"] or data["n_heads"] % data["n_kv_heads"]:
            raise _Usage(
                f"--model {io.clean(arg)}: d_model must divide by n_heads and n_heads by n_kv_heads"
            )
        try:
            return ModelSpec(**data)
        except TypeError as exc:
            raise _Usage(f"--model {io.clean(arg)}: {exc}") from None
    try:
        return model_from_catalog(arg, dtype, field="--model")
    except UserError as exc:
        raise _Usage(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Run ``fleetsim calibrate``; returns the exit code (0 ok, 2 user error or missing torch)."""
    args = build_parser().parse_args(argv)
    if args.fit_moe and args.from_mlenergy is None:
        print(
            "fleetsim: error: --fit-moe: only with --from-mlenergy DIR (fix: add "
            "--from-mlenergy data/mlenergy-v3 --out DIR, or leave out --fit-moe)",
            file=sys.stderr,
        )
        return 2
    if args.from_mlenergy is not None:
        from fleetsim.base.errors import UserError

        try:
            return _from_mlenergy(args)
        except (_Usage, UserError) as exc:
            print(f"fleetsim: error: {exc}", file=sys.stderr)
            return 2
    if args.from_vidur is not None:
        from fleetsim.base.errors import UserError

        try:
            return _from_vidur(args)
        except (_Usage, UserError) as exc:
            print(f"fleetsim: error: {exc}", file=sys.stderr)
            return 2
    try:
        import torch
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    try:
        return _run(args, torch)
    except _Usage as exc:
        print(f"fleetsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fleetsim: interrupted; nothing written", file=sys.stderr)
        return 130


def _from_mlenergy(args: argparse.Namespace) -> int:
    """``--from-mlenergy DIR --out OUT``: the power fit of calibrate/mlenergy.py on a folder of
    measured configurations; writes into OUT only (never into the checkout by default)."""
    from . import mlenergy

    root = args.from_mlenergy
    if args.out is None:
        raise _Usage(
            f"--from-mlenergy {root}: --out is required (fix: --out FOLDER for the profiles)"
        )
    if not root.is_dir():
        raise _Usage(f"--from-mlenergy {root}: not a folder (fix: a folder as data/mlenergy-v3)")
    if args.out.exists() and not args.out.is_dir():
        raise _Usage(f"--out {args.out}: exists and is not a folder (fix: a folder name)")
    if args.workers < 1:
        raise _Usage(f"--workers {args.workers}: must be at least 1")
    for line in mlenergy.write_profiles(root, args.out, workers=args.workers, fit_moe=args.fit_moe):
        print(line)
    return 0


def _from_vidur(args: argparse.Namespace) -> int:
    """``--from-vidur DIR``: the kernel-model fit of calibrate/vidur.py on a user's folder."""
    import dataclasses
    import json

    from fleetsim.device import catalog
    from fleetsim.device.profile import catalog_profile, profile_to_dict

    from . import vidur

    root = args.from_vidur
    gpus = sorted(p.name for p in (root / "compute").glob("*") if p.is_dir())
    if not gpus or not any((root / "compute").glob("*/*/*/mlp.csv")):
        raise _Usage(
            f"--from-vidur {root}: no compute/GPU/ORG/MODEL/mlp.csv files (Vidur's profiling "
            "layout; see data/vidur-profiling/SOURCE.md)"
        )
    names: dict[str, str] = {}
    if args.gpu:
        # --gpu names one of DIR's GPU folders (Vidur's own layout: "h100", "a100"), or the
        # catalog GPU of a folder: that of the one folder, or the folder Vidur names for it
        by_catalog = {v[0]: k for k, v in vidur.VIDUR_GPUS.items()}
        if args.gpu in gpus:
            gpus = [args.gpu]
        elif by_catalog.get(args.gpu) in gpus:
            gpus = [by_catalog[args.gpu]]
            names[gpus[0]] = args.gpu
        elif len(gpus) == 1 and args.gpu in catalog.gpus():
            names[gpus[0]] = args.gpu
        else:
            raise _Usage(
                f"--gpu {args.gpu}: not one of {root}'s GPU folders ({', '.join(gpus)})"
                + (
                    ""
                    if len(gpus) > 1
                    else f" nor a catalog GPU (fix: one of {', '.join(catalog.gpus())})"
                )
            )
    for g in gpus:
        cat = names.get(g, vidur.VIDUR_GPUS.get(g, (g, ""))[0])
        if cat not in catalog.gpus():
            raise _Usage(
                f"--from-vidur {root}: GPU folder {g!r} is not a catalog GPU "
                f"(fix: --gpu one of {', '.join(catalog.gpus())})"
            )
        names[g] = cat
    # --out: the profile file when one GPU is fitted (a name ending in .json), else a folder
    # for <gpu>-vidur.json; by default out/calibrate-vidur/ (never into the checkout's
    # profiles/: out/ is where every command writes)
    out_arg = args.out if args.out is not None else Path("out") / "calibrate-vidur"
    as_file = args.out is not None and args.out.suffix == ".json" and not args.out.is_dir()
    if as_file and len(gpus) > 1:
        raise _Usage(
            f"--out {args.out}: {root} has {len(gpus)} GPU folders ({', '.join(gpus)}); give "
            "--out a folder for one profile each, or --gpu one of them"
        )
    for f in vidur.fit_folder(root, gpus, catalog_names=names):
        prof = catalog_profile(f.catalog_gpu, catalog.gpu(f.catalog_gpu), None)
        prof = dataclasses.replace(
            prof, name=f"{f.catalog_gpu}-vidur", kernels=f.fit, source="fitted"
        )
        fit = {"n_rows": f.n_rows, "models": f.models}
        if f.lomo is not None:
            fit.update(lomo_median_err=f.lomo.median, lomo_worst_err=f.lomo.worst)
        d = profile_to_dict(prof, catalog_gpu=f.catalog_gpu, fit=fit)
        d["power"] = None  # the scenario's catalog GPU supplies power
        out = out_arg if as_file else out_arg / f"{f.catalog_gpu}-vidur.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(out)
        msg = f"{f.catalog_gpu}: {f.n_rows} operator rows of {len(f.models)} model(s)"
        if f.lomo is not None:
            msg += f"; leave-one-model-out median {f.lomo.median:.1%}, worst {f.lomo.worst:.1%}"
        print(f"{msg}; wrote {out}")
    return 0


def _run(args: argparse.Namespace, torch: ModuleType) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Usage(
            "--device cuda: no CUDA device is available to torch "
            f"{torch.__version__} (fix: use --device cpu, or install a CUDA build of torch)"
        )
    dev_type = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    device = torch.device(dev_type, 0) if dev_type == "cuda" else torch.device("cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if dev_type == "cuda" else "fp32")
    spec = resolve_model(args.model, dtype)
    if args.layers is not None and not 1 <= args.layers <= spec.n_layers:
        raise _Usage(
            f"--layers {args.layers}: must be between 1 and {spec.name}'s {spec.n_layers} layers"
        )
    if spec.d_model % spec.n_heads or spec.n_heads % spec.n_kv_heads or spec.head_dim % 2:
        raise _Usage(f"--model {args.model}: d_model / n_heads / n_kv_heads do not divide evenly")
    cpu_layers = CPU_QUICK_LAYERS if args.quick else CPU_DEFAULT_LAYERS
    layers = args.layers or (
        spec.n_layers if dev_type == "cuda" else min(spec.n_layers, cpu_layers)
    )
    if args.out is not None and args.out.is_dir():
        raise _Usage(f"--out {args.out}: is a directory; give a .json file name")

    from rich.console import Console

    from . import bench, run

    if dev_type == "cpu":
        return_freed_memory()

    console = Console()
    requested = dtype
    if dev_type == "cpu" and dtype != "fp32":
        slow = bench.matmul_rate(device, dtype)
        fast = bench.matmul_rate(device, "fp32")
        if slow < 0.1 * fast:
            console.print(
                f"note: {dtype} matmul runs at {slow / 1e9:.1f} GFLOP/s on this CPU vs "
                f"{fast / 1e9:.1f} in fp32; timing fp32 instead (recorded in the profile)"
            )
            dtype = "fp32"
    spec_used = dataclasses.replace(spec, n_layers=layers, dtype=dtype)
    if dev_type == "cpu" and args.quick and not args.full_vocab:
        spec_used = cpu_sized(spec_used)
        if spec_used.vocab_size != spec.vocab_size:
            console.print(
                f"timing a vocabulary of {spec_used.vocab_size:,} of {spec.vocab_size:,} rows "
                "(the output projection is one GEMM of the same kind; --full-vocab keeps it)"
            )
    if layers != spec.n_layers:
        console.print(
            f"timing {layers} of {spec.name}'s {spec.n_layers} layers "
            "(efficiencies transfer per layer)"
        )
    profile = run.calibrate(
        spec_used,
        device=device,
        out=args.out,
        quick=args.quick,
        seed=args.seed,
        budget_s=args.budget_s,
        dtype_requested=requested,
        log=lambda s: console.print(s, highlight=False),
    )
    run.render(profile, console)
    return 0
