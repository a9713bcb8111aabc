"""End-to-end accuracy against the ML.ENERGY Benchmark v3 (``data/mlenergy-v3``).

    python -m fleetsim.calibrate.mlenergy              # every expressible configuration
    python -m fleetsim.calibrate.mlenergy --quick      # a reduced subset (what the test runs)

Every configuration whose model the simulator can express is simulated as the benchmark ran it
(``data/mlenergy-v3/SOURCE.md``): one vLLM server (one replica of ``tensor_parallel`` GPUs), all
of the run's requests sent at time 0, ``max_num_seqs`` the batch limit, ``max_num_batched_tokens``
8,192, output lengths drawn from the configuration's own histogram (uniform inside a bin) and
prompt lengths by task (:data:`PROMPT_TOKENS`, with how each was estimated: each request that
mean, or, the harness's default, the chat prompts drawn from a production chat service's prompt
lengths rescaled to it, :func:`draw_prompts`); a run that sends its
task's list of prompts more than once shares the repeats' prompt blocks through the prefix cache
(:func:`repeated_prompts`, :func:`repeat_trace_jsonl`). The figures are taken
over the benchmark's steady-state window: it starts when ``max_num_seqs`` requests have their
first token and ends when ``num_requests - max_num_seqs - 1`` requests have finished. Over it:
W per GPU, J per output token and output tokens/s; the median inter-token latency is taken over
the whole run (as the benchmark's), token-weighted over engine steps.

The simulation runs the real engine (:class:`fleetsim.serving.pod.Pod`, the paged engine with
chunked prefill, as vLLM V1). Its recorder's per-hour lists are swapped for lists that also log
every addition (:class:`_Tracker`), which gives the work, energy and tokens of each engine commit
in order; the replica is busy without a gap from the first request to the window's end, so its
cumulative busy time is the wall-clock time there and the window's work is read off by
interpolation. Step times do not depend on the power model, so one simulation per configuration
serves every power fit (:func:`fit_power`, leave-one-model-out in :func:`evaluate`).

Models are found as ``data/models/ORG/NAME/config.json`` (read by :mod:`fleetsim.config.hf`);
where that folder has none, :data:`BUILTIN_ARCH` holds the two Qwen3 models the reader already
expresses. A configuration is skipped, with its reason, when the model's config is missing or not
expressible, or when the task needs a vision encoder (image-chat, video-chat). Expert- and
data-parallel servers are one replica of ``num_gpus`` GPUs (``fleet.data_parallel``,
``fleet.expert_parallel``; see :mod:`fleetsim.device.moe`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fleetsim.base import io as fio
from fleetsim.calibrate import eager_host, gpu_names
from fleetsim.device.latency import PowerSpec, RooflineProfile
from fleetsim.device.modelspec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data" / "mlenergy-v3"
MODELS_DIR = REPO / "data" / "models"

#: requests per run by task (ml-energy/benchmark ``configs/vllm/<task>/benchmark.yaml``, see
#: SOURCE.md); runs that repeat the list are recognised by their histogram's count (the
#: histogram holds every completed request of the run), which is used when it is larger
REQUESTS_PER_TASK = {
    "lm-arena-chat": 1024,
    "gpqa": 198,
    "sourcegraph-fim": 1024,
    "image-chat": 1024,
    "video-chat": 512,
}

#: prompt tokens per request by task (not published; SOURCE.md, "Input (prompt) lengths").
#: * lm-arena-chat 250: what the KV-limited rows imply. With a full KV cache vLLM holds
#:   ``avg_batch x (prompt + E[L^2] / (2 E[L]))`` tokens; e.g. Qwen3-8B on one H100 at
#:   max_num_seqs 512 holds 474 sequences, i.e. prompts of about 240 tokens (issue 21), and the
#:   chat template adds a few dozen. The benchmark replays multi-turn histories, so this is a mean
#:   over turns. Confidence L. Solved on the simulation instead (``--implied-prompt``) the same
#:   row gives 402 and the other large-cache rows 205-689; ``--chat-prompt-mean`` tries a mean;
#:   not adopted (docs/accuracy-log.md, "The chat prompt mean re-estimated").
#: * gpqa 250: a GPQA-diamond question with four choices in the benchmark's template (a question
#:   of ~100-200 words, choices of a few words to a sentence each) plus the chat template;
#:   outputs are ~7,000 tokens, so the prefill share is under 1% and the figure barely matters.
#:   Confidence L.
#: * sourcegraph-fim 1,500: "inputs are long (the surrounding code context)" (leaderboard
#:   tasks.ts); a guess of a few hundred lines of code. Confidence L (only MoE models run it).
PROMPT_TOKENS = {"lm-arena-chat": 250, "gpqa": 250, "sourcegraph-fim": 1500}

#: the prompts' shapes the harness can draw (``--prompts``): ``constant`` gives every request of
#: a task :data:`PROMPT_TOKENS`; ``azure`` draws each chat prompt from a production chat
#: service's prompt lengths, rescaled to that mean (:func:`draw_prompts`); ``azure-code`` also
#: draws the fim prompts from the same trace's code service (:data:`AZURE_CODE_PROMPT_TRACES`)
PROMPT_SHAPES = ("constant", "azure", "azure-code", "azure-conv")
#: the prompt lengths ``azure`` draws from, by task: the Azure LLM inference trace 2023
#: (Patel et al., "Splitwise", ISCA 2024; ``data/azure-llm-2023``, CC-BY 4.0), column
#: ContextTokens of its conversation service (19,366 requests: mean 1,155, median 1,020, p99
#: 4,142 tokens, coefficient of variation 0.96). Why this shape: the benchmark's LMArena
#: prompts are not published (SOURCE.md), and this is a published production chat service's
#: prompt lengths; only its shape is used (its mean is a service with longer histories than
#: the benchmark's, whose mean the KV-limited rows imply: :data:`PROMPT_TOKENS`). Confidence L:
#: another service's chat, multi-turn histories in both. GPQA and fim keep the constant (no
#: published source for their prompts' spread).
AZURE_PROMPT_TRACES = {"lm-arena-chat": REPO / "data" / "azure-llm-2023" / "conv.csv"}
#: the harness's (``python -m fleetsim.calibrate.mlenergy``) default shape: ``azure`` keeps every
#: goal-table floor and signed median of ``constant`` and lowers the p99 ITL error
#: (docs/accuracy-log.md, "ITL tails"). The library's functions (:func:`simulate_config`,
#: :func:`simulate_all`) keep ``constant``: the catalog's fits (``fleetsim calibrate``,
#: ``calibrate/moe_fit.py``) and the tests that pin their values simulate with it.
HARNESS_PROMPTS = "azure"
#: the fim prompts ``azure-code`` draws from: the same trace's code service (8,819 requests:
#: mean 2,048, median 1,469, p99 7,436 tokens, coefficient of variation 0.96), a production
#: code-completion service's prompts (the surrounding code, as fim's). A trial, not the
#: default's: the benchmark's sourcegraph-fim prompts are not published either. Confidence L.
AZURE_CODE_PROMPT_TRACES = {"sourcegraph-fim": REPO / "data" / "azure-llm-2023" / "code.csv"}
#: ``azure-conv``: the chat list drawn as conversations (:func:`draw_chat_conversations`; an
#: option, not the default). The benchmark's lm-arena-chat list is
#: ``lmarena-ai/arena-human-preference-100k`` conversations, a conversation of ``T`` turns giving
#: ``T`` adjacent requests, request ``t`` carrying every earlier user message and model A's
#: answers plus the ``t``-th user message (ml-energy/benchmark ``mlenergy/llm/datasets.py``
#: ``LMArenaHumanPreferenceDataset.sample``): each request's prompt is the previous turn's plus
#: that turn's answer plus a new user message, named as block-id chains so that vLLM's prefix
#: cache computes a conversation's history once. The turns per conversation are geometric with
#: mean ``CHAT_TURNS_MEAN`` (the law assumed: the published figures are means only). With a
#: geometric law the held (per-request) prompt mean is exactly ``CHAT_TURNS_MEAN x`` the
#: computed (unique) one (:func:`conversation_means`): 1.6 is the ratio of the two means the
#: measurements gave before sharing, 400 held (c40's ``--implied-prompt`` on the KV-limited
#: Qwen3-8B H100 b512 row, unshared: 402) over 250 computed (:data:`PROMPT_TOKENS`, the step
#: times' mean). Fitted, L: one row informs the 400, the step fit's rows the 250. Published
#: means bracket it: Chatbot Arena (Chiang et al. 2024, arXiv 2403.04132, Table 1) 1.3 turns
#: per conversation, LMSYS-Chat-1M (Zheng et al. 2023, arXiv 2309.11998, Table 1) 2.0 (figures
#: as recalled). Turns running at once share their history's blocks in the KV cache too, so at
#: 1.6 the KV-limited rows imply 303-323 computed tokens (485-517 held), not 250
#: (docs/accuracy-log.md, "Conversation histories share their prefix": built, not adopted).
CHAT_TURNS_MEAN = 1.6
#: a turn's answer length over its user message's: Chiang et al. 2024 Table 1 (as recalled),
#: ~269 tokens per response over ~95 per prompt. Only the split of the computed tokens between a
#: conversation's first request (its user message) and the later ones (the previous answer and
#: a user message) depends on it, not the means. Assumed, L.
CHAT_ANSWER_PER_USER = 269.0 / 95.0

#: the benchmark's GPUs as catalog names: every catalog GPU, by its chip (``H100``: h100-sxm,
#: ``H200``, ``A100``: a100-80gb, ``B200``); a folder's other spellings of them (``h200``,
#: ``A100-SXM4-80GB``) are read as these (calibrate/gpu_names.py says the rule)
GPUS = gpu_names.GPUS
TEXT_TASKS = ("lm-arena-chat", "gpqa", "sourcegraph-fim")
MAX_BATCHED_TOKENS = 8192  # the benchmark's --max-num-batched-tokens (SOURCE.md)

#: architectures of models whose config.json is not in data/models yet, as the reader of
#: config/hf.py would give them (Hugging Face Qwen/Qwen3-8B and Qwen/Qwen3-14B config.json:
#: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
#: vocab_size, tie_word_embeddings false; head_dim 128 = hidden / heads for both)
BUILTIN_ARCH: dict[str, dict] = {
    "Qwen/Qwen3-8B": {
        "n_layers": 36,
        "d_model": 4096,
        "n_heads": 32,
        "n_kv_heads": 8,
        "d_ff": 12288,
        "vocab_size": 151936,
        "mlp": "swiglu",
        "tied_embeddings": False,
        "max_context_tokens": 40960,
    },
    "Qwen/Qwen3-14B": {
        "n_layers": 40,
        "d_model": 5120,
        "n_heads": 40,
        "n_kv_heads": 8,
        "d_ff": 17408,
        "vocab_size": 151936,
        "mlp": "swiglu",
        "tied_embeddings": False,
        "max_context_tokens": 40960,
    },
}

METRICS = ("w_per_gpu", "j_per_token", "tokens_per_s", "itl_median")
#: the power model alone: its mean power per GPU with the simulated work done at the measured
#: pace (:func:`speed_of`), i.e. without the step-time model's errors
EXTRA = ("w_at_pace",)
METRIC_NAMES = {
    "w_per_gpu": "W per GPU",
    "j_per_token": "J per output token",
    "tokens_per_s": "output tokens/s",
    "itl_median": "median ITL",
    "w_at_pace": "(W/GPU, meas. pace)",
    "itl_p90": "p90 ITL",
    "itl_p95": "p95 ITL",
    "itl_p99": "p99 ITL",
}
#: the tail of the inter-token gap (:data:`ITL_QUANTILES`), compared in their own table
#: (:func:`tail_table`), not in issue 21's goal table, which the issue defines with the median
TAILS = ("itl_p90", "itl_p95", "itl_p99")


# -- the data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One measured configuration (a row of configurations.csv) with its output histogram."""

    model_id: str
    task: str
    architecture: str
    weight_precision: str
    gpu_model: str
    num_gpus: int
    tp: int
    ep: int
    dp: int
    max_num_seqs: int
    avg_batch_size: float
    power_per_gpu_w: float
    energy_per_token_j: float
    tokens_per_s: float
    itl_median_ms: float
    avg_output_len: float
    suspect: bool
    suspect_reason: str
    source_file: str
    config_index: int
    hist_lo: float = 0.0
    hist_hi: float = 0.0
    hist_counts: tuple[int, ...] = ()
    #: the fused-MoE kernel of the server's fp8 block-quantised experts, from the benchmark's
    #: server environment (:func:`server_env`, ``fleet.fp8_moe_kernel``)
    fp8_moe_kernel: str = "triton"
    #: a one-GPU B200 row of a series that ``calibrate/stack.py`` ``host_limited_series`` finds
    #: host-limited (measured slower, at some batch limit, than an H100 server with no more
    #: bandwidth or FLOP/s): set by :func:`read_configs` from the measured rows alone; left out
    #: of the step fit's one-GPU floor and of the power fit (:func:`fit_rows`), kept in every
    #: accuracy table
    host_limited: bool = False
    #: the measured tail of the whole run's inter-token gaps, as the median (SOURCE.md)
    itl_p90_ms: float = math.nan
    itl_p95_ms: float = math.nan
    itl_p99_ms: float = math.nan

    @property
    def key(self) -> str:
        return (
            f"{self.model_id} {self.task} {self.gpu_model} x{self.num_gpus} "
            f"TP{self.tp}/EP{self.ep}/DP{self.dp} b{self.max_num_seqs}"
        )

    @property
    def moe_or_ep(self) -> bool:
        return self.architecture == "MoE" or self.ep > 1

    @property
    def num_requests(self) -> int:
        return max(REQUESTS_PER_TASK.get(self.task, 0), sum(self.hist_counts))


def read_configs(data_dir: Path = DATA_DIR) -> list[Config]:
    """Every row of ``configurations.csv`` joined with ``output_lengths.csv``."""
    from fleetsim.base.errors import UserError

    data_dir = Path(data_dir)
    table = data_dir / "configurations.csv"
    if not table.is_file():
        raise UserError(
            f"{data_dir}: no configurations.csv (fix: a folder laid out as data/mlenergy-v3, "
            "see its SOURCE.md)"
        )
    hist = _histograms(data_dir)
    env = server_env(data_dir)
    out = []
    with _csv_text(table) as f:
        reader = csv.DictReader(f)
        for i, r in enumerate(reader):
            if None in r.values():  # (csv fills the missing fields of a short row with None)
                n = sum(v is not None for v in r.values())
                raise UserError(
                    f"{table}: row {i + 2}: {n} of the header's {len(reader.fieldnames or [])} "
                    "columns (fix: one value per column, as data/mlenergy-v3/configurations.csv; "
                    "an empty field is written as nothing between two commas)"
                )
            try:
                c = _config(r, hist)
                kernel = fp8_moe_kernel(env.get((c.model_id, c.task, c.gpu_model), {}), c)
                out.append(c if kernel == "triton" else replace(c, fp8_moe_kernel=kernel))
            except KeyError as exc:
                raise UserError(
                    f"{table}: row {i + 2}: no column {exc} (fix: the columns of "
                    "data/mlenergy-v3/SOURCE.md)"
                ) from None
            except (ValueError, TypeError) as exc:
                raise UserError(
                    f"{table}: row {i + 2}: {exc} (fix: the columns of data/mlenergy-v3/SOURCE.md)"
                ) from None
    from fleetsim.calibrate.stack import host_limited_series

    bad = host_limited_series(out)
    return [
        replace(c, host_limited=True)
        if c.gpu_model == "B200" and c.num_gpus == 1 and (c.model_id, c.task) in bad
        else c
        for c in out
    ]


#: the benchmark's server environment variables that select kernels (``server_env.csv``)
SERVER_ENV_FILE = "server_env.csv"
#: GPUs of compute capability 10.0 (SM100), where vLLM 0.11 runs FlashInfer's TensorRT-LLM MoE
#: kernels (``get_flashinfer_moe_backend``: "latency" falls back to CUTLASS below SM100)
SM100_GPUS = ("B200",)


def server_env(data_dir: Path = DATA_DIR) -> dict[tuple[str, str, str], dict[str, str]]:
    """The kernel environment variables the benchmark started each server with, by (model,
    task, GPU): ``server_env.csv`` of the data folder (SOURCE.md; copied from ml-energy/benchmark
    ``configs/vllm/<task>/<org>/<model>/<GPU>/monolithic.env.yaml``); empty when the folder has
    none (a user's own runs: vLLM's defaults)."""
    from fleetsim.base.errors import UserError

    path = Path(data_dir) / SERVER_ENV_FILE
    out: dict[tuple[str, str, str], dict[str, str]] = {}
    if not path.is_file():
        return out
    with _csv_text(path) as f:
        for i, r in enumerate(csv.DictReader(f)):
            try:
                key = (r["model_id"], r["task"], r["gpu_model"])
                out.setdefault(key, {})[r["variable"]] = r["value"]
            except (KeyError, TypeError):
                raise UserError(
                    f"{path}: row {i + 2}: needs the columns model_id, task, gpu_model, variable,"
                    " value (fix: the layout of data/mlenergy-v3/server_env.csv, SOURCE.md)"
                ) from None
    return out


def fp8_moe_kernel(env: dict[str, str], c: Config) -> str:
    """``fleet.fp8_moe_kernel`` of a server started with ``env``: ``"flashinfer-trtllm"`` where
    ``VLLM_USE_FLASHINFER_MOE_FP8`` is set true on an SM100 GPU (vLLM 0.11
    ``vllm/model_executor/layers/quantization/fp8.py``, ``get_fp8_moe_backend``: FlashInfer's
    TensorRT-LLM backend for block-quantised fp8 experts, the CUTLASS one refusing block
    quantisation there; SOURCE.md, server_env.csv), else ``"triton"``."""
    flag = env.get("VLLM_USE_FLASHINFER_MOE_FP8", "").strip().lower()
    if flag in ("1", "true") and c.gpu_model in SM100_GPUS:
        return "flashinfer-trtllm"
    return "triton"


def find_config(
    model: str,
    gpu: str,
    gpus: int,
    batch: int,
    task: str = "lm-arena-chat",
    dp: int | None = None,
    configs: Sequence[Config] | None = None,
) -> Config:
    """The row of ``model`` on ``gpus`` x ``gpu`` at ``max_num_seqs`` = ``batch`` for ``task``
    (and ``dp`` data-parallel engines, if given), from ``configs`` or every row; an
    AssertionError naming it if there is none (the tests' lookup)."""
    for c in read_configs() if configs is None else configs:
        if (c.model_id, c.gpu_model, c.num_gpus, c.max_num_seqs, c.task) == (
            model,
            gpu,
            gpus,
            batch,
            task,
        ) and (dp is None or c.dp == dp):
            return c
    raise AssertionError(f"no row {model} {task} {gpu} x{gpus} b{batch} DP{dp}")


def _csv_text(path: Path) -> io.StringIO:
    """A CSV of the data folder read through the bounded reader (regular file, size limit,
    UTF-8), as a text stream for ``csv``."""
    return io.StringIO(fio.read_text(path, "", fio.MAX_TRACE_BYTES), newline="")


def _histograms(data_dir: Path) -> dict[tuple[str, int], tuple[float, float, tuple[int, ...]]]:
    """Output-length histograms by (source_file, config_index): from output_lengths.csv, or
    from the leaderboard's per-model JSON files under ``models/`` (equal-width bins)."""
    hist: dict[tuple[str, int], tuple[float, float, tuple[int, ...]]] = {}
    lengths = data_dir / "output_lengths.csv"
    if lengths.is_file():
        from fleetsim.base.errors import UserError

        with _csv_text(lengths) as f:
            for i, r in enumerate(csv.DictReader(f)):
                try:
                    try:
                        counts = tuple(int(x) for x in (r["counts"] or "").split())
                    except ValueError:
                        raise ValueError(
                            f"counts = {fio.clean(repr(r['counts']), 60)}: not whole numbers "
                            "apart by spaces"
                        ) from None
                    hist[(r["source_file"], _num(r, "config_index", int, positive=False))] = (
                        _num(r, "min_tokens", float, positive=False),
                        _num(r, "max_tokens", float),
                        counts,
                    )
                except KeyError as exc:
                    raise UserError(
                        f"{lengths}: row {i + 2}: no column {exc} (fix: the columns of "
                        "data/mlenergy-v3/SOURCE.md)"
                    ) from None
                except ValueError as exc:
                    raise UserError(
                        f"{lengths}: row {i + 2}: {exc} (fix: the columns of "
                        "data/mlenergy-v3/SOURCE.md)"
                    ) from None
        return hist
    import json

    for p in sorted((data_dir / "models").glob("*.json")):
        try:
            d = json.loads(fio.read_text(p, "", fio.MAX_TRACE_BYTES))
        except ValueError as exc:
            from fleetsim.base.errors import UserError

            raise UserError(
                f"{p}: not JSON ({exc}; fix: the leaderboard's per-model file)"
            ) from None
        for i, c in enumerate(d.get("configurations", [])):
            h = c.get("output_length_distribution") or {}
            bins, cnt = h.get("bins") or [], h.get("counts") or []
            if len(bins) == len(cnt) + 1 and cnt:
                hist[(f"models/{p.name}", i)] = (
                    float(bins[0]),
                    float(bins[-1]),
                    tuple(int(x) for x in cnt),
                )
    return hist


def _num(r: dict, col: str, kind: Callable[[str], Any], positive: bool = True) -> Any:
    """Column ``col`` of row ``r`` as ``kind`` (int or float), finite and, with ``positive``,
    above 0 (every measured figure and parallel degree of the format; a configuration index
    may be 0); a ValueError naming the column and the value otherwise (KeyError where the
    column is missing)."""
    v = r[col]
    shown = fio.clean(repr(v), 60)
    what = "a whole number" if kind is int else "a number"
    try:
        x = kind(v)
    except (ValueError, TypeError):
        raise ValueError(f"{col} = {shown}: not {what}") from None
    if not math.isfinite(x) or (positive and x <= 0) or x < 0:
        low = "above 0" if positive else "at least 0"
        raise ValueError(f"{col} = {shown}: must be finite and {low}")
    return x


def _config(r: dict, hist: dict) -> Config:
    key = (r["source_file"], _num(r, "config_index", int, positive=False))
    lo, hi, counts = hist.get(key, (0.0, 0.0, ()))
    n_gpus = _num(r, "num_gpus", int)
    per_gpu = r.get("power_per_gpu_w") or ""
    return Config(
        model_id=r["model_id"],
        task=r["task"],
        architecture=r["architecture"],
        weight_precision=r["weight_precision"],
        gpu_model=gpu_names.benchmark_name(r["gpu_model"]),
        num_gpus=n_gpus,
        tp=_num(r, "tensor_parallel", int),
        ep=_num(r, "expert_parallel", int),
        dp=_num(r, "data_parallel", int),
        max_num_seqs=_num(r, "max_num_seqs", int),
        avg_batch_size=_num(r, "avg_batch_size", float),
        power_per_gpu_w=_num(r, "power_per_gpu_w", float)
        if per_gpu
        else _num(r, "avg_power_w", float) / n_gpus,
        energy_per_token_j=_num(r, "energy_per_token_j", float),
        tokens_per_s=_num(r, "output_tokens_per_s", float),
        itl_median_ms=_num(r, "itl_median_ms", float),
        avg_output_len=_num(r, "avg_output_len", float),
        suspect=(r.get("suspect") or "").strip().lower() == "true",
        suspect_reason=r.get("suspect_reason") or "",
        source_file=r["source_file"],
        config_index=_num(r, "config_index", int, positive=False),
        hist_lo=lo,
        hist_hi=hi,
        hist_counts=counts,
        itl_p90_ms=_float_or_nan(r, "itl_p90_ms"),
        itl_p95_ms=_float_or_nan(r, "itl_p95_ms"),
        itl_p99_ms=_float_or_nan(r, "itl_p99_ms"),
    )


def _float_or_nan(r: dict, col: str) -> float:
    """Column ``col`` of row ``r`` as a float; nan where it is missing or empty."""
    return _num(r, col, float) if r.get(col) else math.nan


def model_section(
    model_id: str, precision: str, architecture: str = "Dense Transformer"
) -> tuple[dict | None, str]:
    """The scenario's ``[model]`` table for ``model_id``, or (None, why it is skipped) (see
    :func:`_model_section`)."""
    model, why = _model_section(model_id, precision, architecture)
    return (None if model is None else dict(model)), why


@functools.lru_cache(maxsize=256)
def _model_section(
    model_id: str, precision: str, architecture: str = "Dense Transformer"
) -> tuple[dict | None, str]:
    """The scenario's ``[model]`` table for ``model_id``, or (None, why it is skipped). A
    hybrid (Mamba-Transformer) model counts only when the reader gives its layer pattern."""
    from fleetsim.base.errors import UserError
    from fleetsim.config.hf import architecture_from_hf

    dtype = {"bfloat16": "bf16", "fp8": "fp8"}.get(precision)
    if dtype is None:
        return None, f"weight precision {precision!r} not simulated"
    path = MODELS_DIR / model_id / "config.json"
    if path.is_file():
        import json

        try:
            cfg = json.loads(fio.read_text(path, "model.config"))
            fields = architecture_from_hf(cfg, str(path))
        except (UserError, ValueError, KeyError, TypeError) as exc:
            why = str(exc).splitlines()[0]
            why = why.split("': ", 1)[-1]  # drop "model.config = '<path>'"
            return None, f"{model_id}: config not expressible ({why[:120]})"
        if "Hybrid" in architecture and "hybrid_pattern" not in fields:
            return None, f"{model_id}: the config reader does not give its Mamba layers"
        if "Hybrid" in architecture:
            # the benchmark starts every Mamba-Transformer hybrid's server with
            # ``mamba-ssm-cache-dtype: float32`` (ml-energy/benchmark configs/vllm/<task>/nvidia/
            # NVIDIA-Nemotron-Nano-{9B,12B}-v2/<GPU>/monolithic.config.yaml, lm-arena-chat and
            # gpqa, H100 and B200): the SSM state in fp32, the convolution state in the model's
            # bf16 (vLLM 0.11 MambaStateDtypeCalculator.mamba2_state_dtype), twice the state
            # bytes per sequence that a bf16 cache holds
            return {"config": str(path), "dtype": dtype, "ssm_state_dtype": "fp32"}, ""
        return {"config": str(path), "dtype": dtype}, ""
    if model_id in BUILTIN_ARCH:
        return {"name": "custom", **BUILTIN_ARCH[model_id], "dtype": dtype}, ""
    return None, f"{model_id}: no data/models/{model_id}/config.json"


def skip_reason(c: Config) -> str:
    """Why ``c`` is not simulated ('' when it is)."""
    if c.task not in TEXT_TASKS:
        return f"task {c.task} needs a vision encoder"
    if c.gpu_model not in GPUS:
        return gpu_names.resolve(c.gpu_model)[1]
    if not c.hist_counts or sum(c.hist_counts) == 0:
        return "no output-length histogram (output_lengths.csv or models/*.json)"
    _, why = model_section(c.model_id, c.weight_precision, c.architecture)
    return why


def draw_outputs(c: Config, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` output lengths from the configuration's histogram: a bin by its count, then
    uniform inside the bin (50 equal bins from ``hist_lo`` to ``hist_hi``)."""
    counts = np.asarray(c.hist_counts, dtype=float)
    edges = np.linspace(c.hist_lo, c.hist_hi, len(counts) + 1)
    b = rng.choice(len(counts), size=n, p=counts / counts.sum())
    x = edges[b] + rng.random(n) * (edges[b + 1] - edges[b])
    return np.maximum(1, np.rint(x)).astype(np.int64)


@functools.lru_cache(maxsize=4)
def trace_context_tokens(path: Path) -> np.ndarray:
    """The ContextTokens column of an Azure LLM inference trace CSV (prompt tokens per request,
    in the file's order), read through the bounded reader as the data folder's CSVs are."""
    with _csv_text(path) as f:
        return np.array([int(r["ContextTokens"]) for r in csv.DictReader(f)], dtype=np.int64)


def draw_prompts(
    c: Config,
    n: int,
    rng: np.random.Generator,
    shape: str = "constant",
    max_context_tokens: int | None = None,
    outs: np.ndarray | None = None,
    mean: float | None = None,
) -> np.ndarray:
    """``n`` prompt lengths of the run's requests. ``constant``: :data:`PROMPT_TOKENS` each.
    ``azure`` (tasks of :data:`AZURE_PROMPT_TRACES`, ``azure-code`` those and
    :data:`AZURE_CODE_PROMPT_TRACES`; the others stay constant): the benchmark's
    list of ``REQUESTS_PER_TASK`` prompts drawn with replacement from the trace's prompt lengths,
    each scaled by ``PROMPT_TOKENS / trace mean`` (the same shape at the task's mean; rounded, at
    least one token), then sent in order as the benchmark repeats its list: request ``i``
    carries prompt ``i mod list`` (as :func:`repeat_trace_jsonl` names its blocks), clipped so
    that prompt + output (``outs``) fits ``max_context_tokens``. ``rng`` is the row's seeded
    stream (drawn after the outputs, so they are the same in both shapes). ``mean`` replaces the
    task's :data:`PROMPT_TOKENS` (``--chat-prompt-mean``, :func:`implied_prompt_means`); the
    draws do not depend on it, so two means give the same requests' prompts in proportion.
    ``azure-conv``: the chat list as conversations (:func:`draw_prompt_list`)."""
    return draw_prompt_list(c, n, rng, shape, max_context_tokens, outs, mean)[0]


def draw_prompt_list(
    c: Config,
    n: int,
    rng: np.random.Generator,
    shape: str = "constant",
    max_context_tokens: int | None = None,
    outs: np.ndarray | None = None,
    mean: float | None = None,
    turns_mean: float | None = None,
) -> tuple[np.ndarray, list[list[int]] | None]:
    """(:func:`draw_prompts`' lengths, each request's prompt block ids or None). ``azure-conv``
    (lm-arena-chat; fim as ``azure``): the same unit-mean draws of the Azure shape as ``azure``
    are each listed request's computed tokens at mean ``mean`` (:data:`PROMPT_TOKENS`), the
    list drawn as conversations with ``turns_mean`` turns (:data:`CHAT_TURNS_MEAN`;
    :func:`draw_chat_conversations`), so the lengths are the held prompts (mean ``turns_mean x
    mean``) and the ids their chains of :data:`PROMPT_BLOCK_TOKENS` tokens
    (:func:`conversation_block_ids`), the list's repeats carrying their first copy's ids; a
    prompt clipped to the context keeps its leading ids."""
    if mean is None:
        mean = PROMPT_TOKENS[c.task]
    if shape not in PROMPT_SHAPES:
        raise ValueError(f"prompt shape {shape!r}: one of {', '.join(PROMPT_SHAPES)}")
    traces = {"constant": {}, "azure": AZURE_PROMPT_TRACES, "azure-conv": AZURE_PROMPT_TRACES}.get(
        shape, {**AZURE_PROMPT_TRACES, **AZURE_CODE_PROMPT_TRACES}
    )
    chain: list[list[int]] | None = None
    if c.task not in traces:
        p = np.full(n, mean, dtype=np.int64)
    else:
        tr = trace_context_tokens(traces[c.task])
        uniq = max(1, min(n, REQUESTS_PER_TASK.get(c.task, n)))
        drawn = tr[rng.integers(len(tr), size=uniq)]
        if shape == "azure-conv" and c.task == "lm-arena-chat":
            tau = CHAT_TURNS_MEAN if turns_mean is None else turns_mean
            unit = drawn / float(tr.mean())
            turn, listed = draw_chat_conversations(uniq, rng, unit, mean, tau)
            chain = conversation_block_ids(turn, listed, PROMPT_BLOCK_TOKENS)
        else:
            scaled = drawn * (mean / float(tr.mean()))
            listed = np.maximum(1, np.rint(scaled)).astype(np.int64)
        p = listed[np.arange(n) % uniq]
    if max_context_tokens is not None:
        room = max_context_tokens - (np.zeros(n, np.int64) if outs is None else outs)
        p = np.maximum(1, np.minimum(p, room))
    if chain is None:
        return p, None
    uniq = len(chain)
    b = PROMPT_BLOCK_TOKENS
    return p, [chain[i % uniq][: -(-int(p[i]) // b)] for i in range(n)]


def conversation_means(
    unique_mean: float,
    turns_mean: float = CHAT_TURNS_MEAN,
    answer_per_user: float = CHAT_ANSWER_PER_USER,
) -> tuple[float, float, float]:
    """(user message mean ``u``, answer mean ``a``, held prompt mean per request) of the
    conversation model whose computed (unique) prompt per request averages ``unique_mean``:
    turns ``T`` geometric with mean ``tau`` (``P(T = k) = p (1 - p)^(k - 1)``, ``p = 1 / tau``),
    request ``t`` of a conversation holding ``t u + (t - 1) a`` tokens and computing ``u`` (its
    first) or ``a + u`` (the earlier answer is history text no earlier request computed). Over the
    requests (a conversation of ``T`` turns gives ``T``): a request is its conversation's first
    with probability ``1 / tau``, so the computed mean is ``u + a (1 - 1 / tau)``; the held mean
    is ``E[sum_t (t u + (t - 1) a)] / E[T] = (u tau^2 + a tau (tau - 1)) / tau = u tau + a (tau -
    1)`` (``E[T(T + 1) / 2] = tau^2``, ``E[T(T - 1) / 2] = tau (tau - 1)`` for the geometric law),
    i.e. exactly ``tau x`` the computed mean whatever the split ``a = answer_per_user x u``."""
    tau = float(turns_mean)
    u = unique_mean / (1.0 + answer_per_user * (1.0 - 1.0 / tau))
    a = answer_per_user * u
    return u, a, u * tau + a * (tau - 1.0)


def draw_chat_conversations(
    n_list: int,
    rng: np.random.Generator,
    unit: np.ndarray,
    unique_mean: float,
    turns_mean: float = CHAT_TURNS_MEAN,
    answer_per_user: float = CHAT_ANSWER_PER_USER,
) -> tuple[np.ndarray, np.ndarray]:
    """(turn of each request, its held prompt) of a chat list of ``n_list`` requests drawn as
    conversations (:data:`CHAT_TURNS_MEAN`, :func:`conversation_means`): turns per conversation
    geometric with mean ``turns_mean``, conversations in order until the list is full (the last
    one cut, as the benchmark stops at its request count); each request's computed tokens
    ``unit`` (a draw per request of the prompt shape at mean 1) x ``u`` for a conversation's
    first request, x ``u + a`` for a later one (rounded, at least one token), and its prompt the
    previous turn's plus those."""
    u, a, _ = conversation_means(unique_mean, turns_mean, answer_per_user)
    turns = rng.geometric(1.0 / float(turns_mean), size=max(1, n_list))
    k = int(np.searchsorted(np.cumsum(turns), n_list)) + 1
    turn = np.concatenate([np.arange(1, int(t) + 1) for t in turns[:k]])[:n_list]
    add = np.maximum(1, np.rint(unit[:n_list] * np.where(turn == 1, u, u + a))).astype(np.int64)
    held = np.empty(n_list, dtype=np.int64)
    acc = 0
    for j in range(n_list):
        acc = int(add[j]) if turn[j] == 1 else acc + int(add[j])
        held[j] = acc
    return turn, held


def conversation_block_ids(turn: np.ndarray, held: np.ndarray, block: int = 16) -> list[list[int]]:
    """Each listed request's prompt block ids (one per ``block`` tokens, the last one partial)
    as a chain: request ``t > 1`` of a conversation starts with request ``t - 1``'s ids of its
    full blocks (``floor(P_(t-1) / block)`` of them: the blocks vLLM's prefix cache can hold;
    the previous prompt's partial last block continues with the answer here, other text) and
    then new ids; a conversation's first request has new ids only. vLLM then computes a
    block once, by the first request that carries it: a turn's answer is computed by the next
    turn (its history text), never by the turn that produced it."""
    out: list[list[int]] = []
    nxt = 0
    for j in range(len(held)):
        keep = out[j - 1][: int(held[j - 1]) // block] if turn[j] > 1 else []
        nb = -(-int(held[j]) // block)
        new = list(range(nxt, nxt + nb - len(keep)))
        nxt += len(new)
        out.append(keep + new)
    return out


# -- one simulation ----------------------------------------------------------------------------
class _Log(list):
    """A recorder list that also reports every addition to a callback."""

    def __init__(self, base: list, on_add: Callable[[float], None]) -> None:
        super().__init__(base)
        self._on_add = on_add

    def __setitem__(self, i, v) -> None:
        old = list.__getitem__(self, i)
        list.__setitem__(self, i, v)
        self._on_add(v - old)


class _Tracker:
    """Cumulative work of one replica, snapshot at every energy addition (one per commit)."""

    def __init__(self, rec) -> None:
        self.rec = rec
        self.busy = 0.0
        self.flops = 0.0
        self.bytes = 0.0
        self.tokens = 0.0
        self.dyn = 0.0
        self.comm = 0.0
        self.loop = 0.0
        self.xflops = 0.0
        self.prompt = 0.0
        self.hit = 0.0
        self.snaps: list[tuple[float, ...]] = []
        #: with a step record (:func:`_record_iterations`): the last iteration the engine timed
        #: and, per commit, the one it committed
        self.last_step: tuple[int, int] = (0, 0)
        self.steps: list[tuple[int, int]] | None = None
        rec.busy_s = _Log(rec.busy_s, self._busy)
        rec.flops = _Log(rec.flops, self._flops)
        rec.bytes_moved = _Log(rec.bytes_moved, self._bytes)
        rec.output_tokens = _Log(rec.output_tokens, self._tokens)
        rec.dyn_j = _Log(rec.dyn_j, self._dyn)
        rec.comm_s = _Log(rec.comm_s, self._comm)
        rec.moe_loop_s = _Log(rec.moe_loop_s, self._loop)
        rec.expert_flops = _Log(rec.expert_flops, self._xflops)
        rec.prompt_tokens = _Log(rec.prompt_tokens, self._prompt)
        rec.prefix_hit_tokens = _Log(rec.prefix_hit_tokens, self._hit)

    def _busy(self, d: float) -> None:
        self.busy += d

    def _flops(self, d: float) -> None:
        self.flops += d

    def _bytes(self, d: float) -> None:
        self.bytes += d

    def _comm(self, d: float) -> None:
        self.comm += d

    def _loop(self, d: float) -> None:
        self.loop += d

    def _xflops(self, d: float) -> None:
        self.xflops += d

    def _tokens(self, d: float) -> None:
        self.tokens += d

    def _prompt(self, d: float) -> None:
        self.prompt += d

    def _hit(self, d: float) -> None:
        self.hit += d

    def _dyn(self, d: float) -> None:
        self.dyn += d
        if self.steps is not None:
            self.steps.append(self.last_step)
        # a commit adds its prompt and output tokens, busy time, energy, FLOPs, bytes,
        # communication and fp8 MoE-loop seconds and routed-expert FLOPs in that order, and its
        # iteration count last: the FLOPs, bytes, communication, loop, expert FLOPs and
        # iterations seen here are the earlier
        # commits' (cumulative()); its prompt tokens and prefix-cache hits (serving/core.py,
        # P_first and hit_tok, added before its energy) are its own
        self.snaps.append(
            (
                self.busy,
                self.dyn,
                self.tokens,
                self.flops,
                self.bytes,
                self.rec.iterations,
                self.comm,
                self.loop,
                self.prompt,
                self.hit,
                self.xflops,
            )
        )

    def cumulative(self) -> dict[str, np.ndarray]:
        """Cumulative busy time, output tokens, prompt tokens (``prompt``: all of the admitted
        prompts, ``hit``: those served from the prefix cache), FLOPs, bytes, iterations,
        communication and fp8 MoE-loop seconds and routed-expert FLOPs after each commit."""
        s = np.array(self.snaps, dtype=float).reshape(-1, 11)
        final = np.array(
            [
                [
                    self.flops,
                    self.bytes,
                    float(self.rec.iterations),
                    self.comm,
                    self.loop,
                    self.xflops,
                ]
            ]
        )
        after = np.concatenate((s[1:, [3, 4, 5, 6, 7, 10]], final))
        return {
            "busy": s[:, 0],
            "tokens": s[:, 2],
            "flops": after[:, 0],
            "bytes": after[:, 1],
            "iters": after[:, 2],
            "comm": after[:, 3],
            "loop": after[:, 4],
            "xflops": after[:, 5],
            "prompt": s[:, 8],
            "hit": s[:, 9],
        }


@dataclass
class SimRun:
    """What one simulated benchmark run gives: window figures and per-commit work."""

    key: str
    window_s: float = math.nan
    tokens: float = math.nan  # output tokens in the window
    flops: float = math.nan  # FLOPs of the replica in the window (all its GPUs)
    bytes: float = math.nan  # bytes moved by the replica in the window
    busy_s: float = math.nan  # replica busy time in the window
    itl_median_s: float = math.nan
    #: the tail of the same token-weighted step durations (:data:`ITL_QUANTILES`)
    itl_p90_s: float = math.nan
    itl_p95_s: float = math.nan
    itl_p99_s: float = math.nan
    #: the share of those gaps (token-weighted) longer than the measured p90 / p99 ITL: 0.10 /
    #: 0.01 where the simulated tail matches at that level; an SLO's violation rate, where a
    #: quantile's error can be large at a small share (a tail that falls steeply there)
    itl_beyond_meas_p90: float = math.nan
    itl_beyond_meas_p99: float = math.nan
    #: the share of those gaps (token-weighted, whole run) that fall in a step computing prompt
    #: tokens (:func:`prompt_gap_share`): above one half the median gap is a prompt-carrying step
    itl_prompt_share: float = math.nan
    #: the same gaps split by phase of the run: ramp-up (commits that end by the steady window's
    #: start), the window, ramp-down (commits that start at its end or later, when the queue is
    #: empty and no prompt is left): each phase's share of the run's gaps and the share of its
    #: own gaps in prompt-computing steps; ``itl_prompt_share`` is their token-weighted sum
    itl_phase_tokens: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    itl_phase_prompt_share: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    avg_batch: float = math.nan  # mean running sequences over the window (time-weighted)
    tp: int = 1
    # per commit inside the window: duration, FLOPs, bytes (for the power cap)
    seg_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seg_flops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seg_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seg_iters: np.ndarray = field(default_factory=lambda: np.zeros(0))  # iterations per commit
    seg_comm_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # in communication
    #: in the block-scaled K loop of fp8 fused-MoE kernels (PowerSpec.moe_loop_w)
    seg_loop_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: FLOPs of the routed experts' grouped GEMMs (part of seg_flops; PowerSpec.moe_compute_w)
    seg_xflops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: prompt tokens per commit, all of the prompts it admits (``seg_hit`` of them served from
    #: the prefix cache, the rest computed); a commit's prompts are in its first iteration
    #: (serving/core.py), so a commit with any carries one prompt-carrying step
    seg_prompt: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seg_hit: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: weight bytes the replica reads per iteration (the rest of a commit's bytes are KV cache
    #: and linear state: PowerSpec.kv_w); exact for a dense model, whose every iteration reads
    #: them all; a mixture of experts: those a full batch of max_num_seqs touches
    weight_bytes: float = 0.0
    #: the exposed host time of every iteration (s; LatencyModel.host_s_per_iter): the share
    #: of a commit's time PowerSpec.host_w applies to is iterations x this / its duration
    host_s_per_iter: float = 0.0
    peak_flops: float = 0.0  # per GPU, as the simulator's power model uses them
    peak_bw: float = 0.0
    #: (u_c, u_m, u_kv, u_moe, f_host) per GPU of one full prefill iteration
    #: (max_num_batched_tokens of prompts of the task's length), the anchor of the fit's prefill
    #: row (see fit_power); u_moe, the routed experts' part of u_c, and f_host, the share of the
    #: iteration waiting on the host, may be absent (0)
    prefill_u: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    #: the model's mixture-of-experts layers (0 for a dense model)
    moe_layers: int = 0
    #: its latent-attention (MLA) layers (0 without)
    mla_layers: int = 0
    #: every iteration of the whole run, in order (``simulate_config(record_steps=True)``, the
    #: iteration engine: one iteration per commit): its duration (s), the output tokens it gave
    #: (the weights of the median ITL), the sequences it ran (prompts and decodes, the eager
    #: host floor's count), the tokens its layers ran (padded under data parallelism, compared
    #: with ``graph_tokens``) and whether it lies in the steady-state window (the mean step's)
    step_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_seqs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_lin_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_in_window: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: ``simulate_config(dp_publish=True)``: the host time moved from the prompt-carrying steps'
    #: gaps to the gaps before them, summed over the run (:func:`dp_publication_shift`)
    dp_publish_shift_s: float = 0.0
    #: the replica's largest CUDA-graphed iteration (tokens; -1: no graphs)
    graph_tokens: int = -1
    error: str = ""
    sim_wall_s: float = 0.0


def scenario_dict(c: Config, trace: str, hours: int, engine: str = "macro") -> dict:
    model, why = model_section(c.model_id, c.weight_precision, c.architecture)
    if model is None:
        raise ValueError(why)
    return {
        "seed": 1,
        "simulation": {"hours": hours, "engine": engine},
        "model": model,
        "hardware": {"gpu": GPUS[c.gpu_model]},
        "fleet": {
            "replicas": 1,
            "pods": 1,
            # the benchmark launches vLLM with --tensor-parallel-size num_gpus, or with
            # --data-parallel-size num_gpus when its config sets data-parallel-size (ml-energy/
            # benchmark spawn_vllm); the CSV's tensor_parallel = 1 under expert parallelism is
            # the toolkit's default, not the launch. max_num_seqs is the server's total.
            "tensor_parallel": c.num_gpus // c.dp,
            "data_parallel": c.dp,
            "expert_parallel": c.ep > 1,
            "max_batch_size": c.max_num_seqs,
            # vLLM's default per engine: every data-parallel rank its own budget (the field is the
            # replica's, split over its ranks: serving/ranks.py)
            "max_batched_tokens": MAX_BATCHED_TOKENS * c.dp,
            "kv_allocation": "paged",
            # the fp8 experts' kernel as the benchmark's server environment selects it
            # (server_env.csv; only where it is not vLLM's default Triton kernel)
            **({"fp8_moe_kernel": c.fp8_moe_kernel} if c.fp8_moe_kernel != "triton" else {}),
        },
        "traffic": {"trace": trace, "diurnal": "flat"},
        "slo": {"ttft_s": 1e5, "tpot_s": 1e5},
    }


class _Sink:
    """Request sink: first-token and finish times of the completed requests."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.finish: list[float] = []

    def add(self, r, replica, finish_s, ttft, tpot, e2e, status) -> None:
        if status == "completed":
            self.first.append(r.first_token_s)
            self.finish.append(finish_s)


#: vLLM's KV block (``--block-size``, 16 on CUDA): the granularity of its prefix cache
PROMPT_BLOCK_TOKENS = 16
#: the prefix cache's eviction order of the repeated-prompt runs (FleetSection.
#: prefix_cache_eviction): vLLM's
EVICTION = "vllm"


def repeated_prompts(c: Config) -> bool:
    """Whether the run sends its task's list of prompts more than once (``num_requests`` above
    :data:`REQUESTS_PER_TASK`: the benchmark's ``num_request_repeats``, SOURCE.md), and is then
    simulated with its repeated prompts named so the engine's prefix cache shares them, dense or
    MoE alike: the same vLLM server (prefix caching on by default, SOURCE.md) shares a running
    copy's blocks whatever the model. Under data parallelism each engine core has its own prefix
    cache (fleetsim: ``fleet.dp_kv_pool = "per-rank"``), so a repeat hits only a copy held by
    the rank it is routed to, and vLLM routes by load, not by prompt: the trace's later passes
    reach the ranks in an order unrelated to the first's (:func:`repeat_trace_jsonl`).
    Mamba hybrids (Nemotron-Nano-v2), for which vLLM 0.11 disables prefix caching, replay unique
    prompts all the same (:func:`_run_scenario`); sliding-window models (gemma-3) share them as
    vLLM's hybrid KV cache manager does since h46 (no gemma-3 row repeats its list). Until r40
    dense rows kept unique prompts, until d46 data-parallel rows did (docs/accuracy-log.md,
    'Dense rows share their repeated prompts', 'Data-parallel rows share their repeated prompts
    per rank')."""
    return c.num_requests > REQUESTS_PER_TASK.get(c.task, c.num_requests)


#: the stream of the data-parallel rows' later passes' orders (:func:`repeat_trace_jsonl`)
DP_PASS_SEED = 0xD46


def repeat_trace_jsonl(c: Config, prompt: int | np.ndarray, outs: np.ndarray) -> str:
    """The run as a Mooncake-format JSONL trace (``traffic.trace`` ``.jsonl``) whose prompt
    block ids make the benchmark's repeated prompts identical: the list of
    ``REQUESTS_PER_TASK`` prompts is sent ``num_requests / list`` times one after the other (all
    at time 0), so request ``i`` carries prompt ``i mod list``, named by one id per
    :data:`PROMPT_BLOCK_TOKENS` tokens. vLLM V1's prefix cache (on by default; SOURCE.md: not
    set by the benchmark) then shares a running copy's full blocks, or reuses a finished one's
    while they are still cached, instead of computing and holding them again. ``prompt``: one
    length for every request, or each request's (:func:`draw_prompts`; a repeat carries its
    first copy's length, and its ids are its first copy's).

    Under data parallelism (``c.dp > 1``) every later pass of the list is written in an order
    drawn at random (a fixed stream per row, :data:`DP_PASS_SEED`): the simulated front end
    binds the ``i``-th arrival of a burst to rank ``i mod dp`` (lowest ``4 x waiting +
    running``, counted at once), which would put every repeat on its first copy's rank; vLLM's
    front end does not keep that phase. Its ``DPLBAsyncMPClient`` counts its own sends at once,
    but the ``DPCoordinator`` replaces its view with the engines' own (waiting, running) every
    100 ms (vllm/v1/engine/core_client.py ``get_core_engine_for_request``, coordinator.py), and
    those lag the sends still in flight; with several API server processes (``api-server-count``,
    3 in the benchmark's chat configs, SOURCE.md) each has its own view and start index and gets
    whichever requests its HTTP connections carry. A 4,096-request burst takes seconds to
    tokenize and send, so the rank a repeat lands on is unrelated to its first copy's: it meets
    a given earlier copy's rank ``1 / dp`` of the time, what a random order of the later passes
    gives (the measured rows refute the aligned phase: docs/accuracy-log.md, 'Data-parallel rows
    share their repeated prompts per rank'). A request keeps its
    own prompt, length and output; only the order of arrival within a later pass changes."""
    uniq = max(1, REQUESTS_PER_TASK.get(c.task, len(outs)))
    n = len(outs)
    lens = np.broadcast_to(np.asarray(prompt, dtype=np.int64), (n,))
    nb = -(-lens // PROMPT_BLOCK_TOKENS)
    # the first block id of each listed prompt: ids never shared between two listed prompts
    span = int(nb.max()) if len(nb) else 0
    order = np.arange(n)
    if c.dp > 1:
        rng = np.random.default_rng(np.random.SeedSequence([DP_PASS_SEED, c.config_index]))
        for p0 in range(uniq, n, uniq):
            order[p0 : p0 + uniq] = p0 + rng.permutation(min(uniq, n - p0))
    lines = []
    for i in order.tolist():
        o = outs[i]
        base = (i % uniq) * span
        ids = ",".join(str(base + j) for j in range(int(nb[i])))
        lines.append(
            f'{{"timestamp":0,"input_length":{int(lens[i])},"output_length":{int(o)},'
            f'"hash_ids":[{ids}]}}\n'
        )
    return "".join(lines)


def ids_trace_jsonl(lens: np.ndarray, outs: np.ndarray, ids: Sequence[Sequence[int]]) -> str:
    """The run as a Mooncake-format JSONL trace (all requests at time 0) with each request's
    prompt block ids (:func:`draw_prompt_list`'s conversation chains)."""
    return "".join(
        f'{{"timestamp":0,"input_length":{int(p)},"output_length":{int(o)},'
        f'"hash_ids":[{",".join(map(str, b))}]}}\n'
        for p, o, b in zip(lens, outs, ids, strict=True)
    )


def _run_scenario(
    c: Config,
    csv_trace: Path,
    prompt: int | np.ndarray,
    outs: np.ndarray,
    hours: int,
    engine: str,
    ids: Sequence[Sequence[int]] | None = None,
):
    """The loaded scenario of one run: ``csv_trace`` (the run's unique prompts) or, where the
    prompts repeat (:func:`repeated_prompts`) and the engine models prefix caching for the model
    (sliding-window models too, serving/kv_blocks.py; not Mamba hybrids, which vLLM
    0.11 serves without prefix caching, "Hybrid or mamba-based model detected: disabling prefix
    caching", and whose replica caches none: ``serving/kv_paged.py``), the JSONL trace of
    :func:`repeat_trace_jsonl` written beside it. ``ids``: each request's prompt block ids
    (the chat list drawn as conversations, :func:`draw_prompt_list`), replayed so on one engine
    (``dp = 1``) for a model whose prefix caching is modelled; under data parallelism vLLM binds
    a request to the rank with the shortest queue, so a turn meets its history's rank only
    ``1 / dp`` of the time, and the run replays unique prompts (every token computed); a
    repeated list under data parallelism is shared per rank (:func:`repeat_trace_jsonl`); the
    conversation chains (``azure-conv``, not the default) are not, under data parallelism."""
    from fleetsim.api import load
    from fleetsim.config.aggregated import model_spec

    if (ids is not None and c.dp == 1) or (ids is None and repeated_prompts(c)):
        trace = csv_trace.with_suffix(".jsonl")
        lens = np.broadcast_to(np.asarray(prompt, dtype=np.int64), (len(outs),))
        trace.write_text(
            repeat_trace_jsonl(c, prompt, outs) if ids is None else ids_trace_jsonl(lens, outs, ids)
        )
        sd = scenario_dict(c, str(trace), hours, engine)
        sd["traffic"]["trace_block_tokens"] = PROMPT_BLOCK_TOKENS
        # vLLM V1's one free-block queue: a copy's cached blocks last until the blocks freed
        # before them are reused (kv_blocks.py, "vLLM's eviction order")
        sd["fleet"]["prefix_cache_eviction"] = EVICTION
        sc = load(sd)
        if _prefix_cached(model_spec(sc, "")):
            return sc
    return load(scenario_dict(c, str(csv_trace), hours, engine))


def _prefix_cached(spec: ModelSpec) -> bool:
    """Whether the engine models prefix caching for the model: sliding-window layers as vLLM's
    hybrid KV cache manager (serving/kv_blocks.py, since h46), not Mamba hybrids, which vLLM
    0.11 serves without it."""
    return not spec.n_linear_layers


def shares_repeated_prompts(c: Config) -> bool:
    """Whether the run is simulated with its repeated prompts shared: :func:`repeated_prompts`
    and a model whose prefix caching the engine models (:func:`_run_scenario`)."""
    return repeated_prompts(c) and _prefix_cached(_row_resolved(c).model)


def _row_resolved(c: Config):
    """The row's server resolved as a scenario (model, GPUs, KV budget), on a one-request trace:
    what the KV-limited tables read without simulating."""
    from fleetsim.api import load
    from fleetsim.config.resolve import resolve

    with tempfile.TemporaryDirectory(prefix="fleetsim-mlenergy-") as tmp:
        trace = Path(tmp) / "trace.csv"
        trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,100\n")
        return resolve(load(scenario_dict(c, str(trace), 1)), "")


def simulate_config(
    c: Config,
    seed: int = 0,
    engine: str = "macro",
    host_stall_s: float | None = None,
    profile_fields: dict | None = None,
    record_steps: bool = False,
    prompts: str = "constant",
    dp_publish: bool = False,
    prompt_tokens: dict[str, int] | None = None,
) -> SimRun:
    """Simulate one benchmark run of ``c`` and measure it over the steady-state window;
    ``host_stall_s`` replaces the catalog's host stall per step of the vllm-v1 stack (the
    harness passes the one fitted without the row's model: :func:`lomo_host_stalls`);
    ``profile_fields`` replaces fields of the resolved profile (a fit's trial constants, e.g.
    ``calibrate/eager_host.py`` without the eager host floor); ``record_steps`` (iteration
    engine only) keeps every iteration of the run (``SimRun.step_s`` ...); ``prompts`` the
    prompt lengths' shape (:data:`PROMPT_SHAPES`, :func:`draw_prompts`); ``dp_publish`` (data
    parallelism, iteration engine) times the ITL sample's gaps as the tokens are published
    (:func:`publication_gaps`, :func:`dp_publication_shift`) instead of as the steps end;
    ``prompt_tokens`` replaces tasks' :data:`PROMPT_TOKENS` (the prompts' mean and the prefill
    anchor's prompt)."""
    from fleetsim.base.errors import UserError
    from fleetsim.config.scenario import resolve
    from fleetsim.serving.pod import Pod

    t0 = time.perf_counter()
    out = SimRun(c.key, tp=c.num_gpus)
    rng = np.random.default_rng(np.random.SeedSequence([seed, c.config_index, len(c.source_file)]))
    n = c.num_requests
    outs = draw_outputs(c, n, rng)
    ctx = None
    if prompts != "constant":
        model, _ = model_section(c.model_id, c.weight_precision, c.architecture)
        ctx = None if model is None else model.get("max_context_tokens")
    # the task's mean prompt: the prefill anchor below (a full batch of prompts of that length)
    prompt = int({**PROMPT_TOKENS, **(prompt_tokens or {})}[c.task])
    plens, pids = draw_prompt_list(c, n, rng, prompts, ctx, outs, prompt)
    with tempfile.TemporaryDirectory(prefix="fleetsim-mlenergy-") as tmp:
        trace = Path(tmp) / "trace.csv"
        with open(trace, "w") as f:
            f.write("arrival_s,prompt_tokens,output_tokens\n")
            f.writelines(f"0,{int(p)},{int(o)}\n" for p, o in zip(plens, outs, strict=True))
        try:
            # hours: enough for the run at a pessimistic 5 ms per output token per sequence slot
            est_s = float(outs.sum()) / c.max_num_seqs * 0.2 + 60.0
            hours = max(1, min(48, math.ceil(est_s / 3600.0) + 1))
            sc = _run_scenario(c, trace, plens, outs, hours, engine, pids)
            rs = resolve(sc, "")
            prof0 = rs.profile
            if (
                host_stall_s is not None
                and isinstance(prof0, RooflineProfile)
                and prof0.serving_stack == "vllm-v1"
            ):
                from fleetsim.device.stack import stack_constants

                base = stack_constants("vllm-v1", GPUS[c.gpu_model])
                assert base is not None
                oh = float(base["overhead_s"]) + host_stall_s
                rs = replace(rs, profile=replace(prof0, overhead_s=oh))
            prof1 = rs.profile
            if profile_fields and isinstance(prof1, RooflineProfile):
                rs = replace(rs, profile=replace(prof1, **profile_fields))
            sink = _Sink()
            pod = Pod(rs, 0, 1, keep_hist=False, request_sink=sink)
            tr = _Tracker(pod.rec)
            publish = dp_publish and c.dp > 1 and engine == "iteration"
            log = _record_iterations(pod.lat, tr) if record_steps or publish else None
            pod.run()
        except (UserError, ValueError) as exc:
            out.error = str(exc).splitlines()[0][:200]
            return out
    prof = rs.profile
    out.moe_layers = int(rs.model.n_moe_layers)
    out.mla_layers = int(rs.model.n_attn_layers) if rs.model.is_mla else 0
    out.peak_flops = float(prof.peak_flops)
    out.peak_bw = float(prof.mem_bw_bytes_per_s)
    k = max(1, MAX_BATCHED_TOKENS // prompt)
    t_pf, f_pf, b_pf = rs.latency_model().iteration(
        k * prompt, float(k * prompt * prompt), k, 0, 0.0
    )
    lm = rs.latency_model()
    out.weight_bytes = float(lm.weight_bytes_per_iteration(max(1, c.max_num_seqs)))
    out.host_s_per_iter = float(lm.host_s_per_iter)
    out.prefill_u = (
        f_pf / (t_pf * c.num_gpus * out.peak_flops),
        b_pf / (t_pf * c.num_gpus * out.peak_bw),
        max(b_pf - lm.weight_bytes_per_iteration(k * prompt), 0.0)
        / (t_pf * c.num_gpus * out.peak_bw),
        lm.expert_flops_iter(k * prompt, k, 0) / (t_pf * c.num_gpus * out.peak_flops),
        min(lm.host_s_per_iter / t_pf, 1.0),
    )
    m = c.max_num_seqs
    first = np.sort(np.asarray(sink.first))
    fin = np.sort(np.asarray(sink.finish))
    if len(fin) < n:
        out.error = f"{n - len(fin)} of {n} requests unfinished at the horizon"
        return out
    n_end = n - m - 1
    if n_end < 1 or m > len(first):
        out.error = f"no steady-state window ({n} requests, max_num_seqs {m})"
        return out
    ts, te = float(first[m - 1]), float(fin[n_end - 1])
    if te <= ts:
        out.error = f"empty steady-state window ({ts:.1f} s .. {te:.1f} s)"
        return out
    cum = tr.cumulative()
    busy, tok, fl_cum, by_cum, iters = (
        cum[k] for k in ("busy", "tokens", "flops", "bytes", "iters")
    )
    # the replica works without a gap from t = 0 until the queue empties, so the cumulative
    # busy time is the clock there; the commits' FLOPs and bytes come from the per-commit log
    if busy[-1] + 1e-6 < te - 1e-6 * te:
        out.error = "replica idle inside the window"
        return out
    seg_t = np.diff(np.concatenate(([0.0], busy)))
    seg_it = np.diff(np.concatenate(([0.0], iters)))
    seg_tok = np.diff(np.concatenate(([0.0], tok)))
    seg_f = np.diff(np.concatenate(([0.0], fl_cum)))
    seg_b = np.diff(np.concatenate(([0.0], by_cum)))
    seg_c = np.diff(np.concatenate(([0.0], cum["comm"])))
    seg_l = np.diff(np.concatenate(([0.0], cum["loop"])))
    seg_x = np.diff(np.concatenate(([0.0], cum["xflops"])))
    seg_p = np.diff(np.concatenate(([0.0], cum["prompt"])))
    seg_h = np.diff(np.concatenate(([0.0], cum["hit"])))

    def at(cum: np.ndarray, t: float) -> float:
        return float(np.interp(t, np.concatenate(([0.0], busy)), np.concatenate(([0.0], cum))))

    out.window_s = te - ts
    out.tokens = at(tok, te) - at(tok, ts)
    out.flops = at(fl_cum, te) - at(fl_cum, ts)
    out.bytes = at(by_cum, te) - at(by_cum, ts)
    out.busy_s = out.window_s
    # tokens per step = sequences in the step; time-weighted mean over the window
    ok = seg_it > 0
    step_s = np.where(ok, seg_t / np.maximum(seg_it, 1), 0.0)
    tok_per_step = np.where(ok, seg_tok / np.maximum(seg_it, 1), 0.0)
    ends = busy
    starts = ends - seg_t
    inw = (ends > ts) & (starts < te) & ok
    ov = np.minimum(ends, te) - np.maximum(starts, ts)
    out.avg_batch = float((tok_per_step[inw] * ov[inw]).sum() / out.window_s)
    # median inter-token gap: every step's duration, weighted by the tokens it produced (one
    # per running sequence), over the whole run
    gap_s = step_s
    if publish and log is not None and len(log) == len(seg_t) and np.all(seg_it[ok] == 1):
        lg = np.asarray(log, dtype=float).reshape(-1, 2)
        shift = dp_publication_shift(pod.lat, lg[:, 0], lg[:, 1], seg_p > 0)
        gap_s = np.where(ok, publication_gaps(seg_t, shift), 0.0)
        out.dp_publish_shift_s = float(shift.sum())
    out.itl_median_s = _weighted_median(gap_s[ok], seg_tok[ok])
    # its tail, by the same definition (whole run, token-weighted; a planner's p99 TPOT)
    out.itl_p90_s, out.itl_p95_s, out.itl_p99_s = _weighted_quantiles(
        gap_s[ok], seg_tok[ok], ITL_QUANTILES
    )
    out.itl_prompt_share = prompt_gap_share(seg_tok[ok], seg_it[ok], seg_p[ok], seg_h[ok])
    out.itl_phase_tokens, out.itl_phase_prompt_share = phase_gap_shares(
        seg_tok[ok], seg_it[ok], seg_p[ok], seg_h[ok], starts[ok], ends[ok], ts, te
    )
    n_gaps = seg_tok[ok].sum()
    if n_gaps > 0:
        out.itl_beyond_meas_p90, out.itl_beyond_meas_p99 = (
            float(seg_tok[ok][step_s[ok] > 1e-3 * ms].sum() / n_gaps) if ms == ms else math.nan
            for ms in (c.itl_p90_ms, c.itl_p99_ms)
        )
    out.seg_s = seg_t[inw]
    out.seg_flops = seg_f[inw]
    out.seg_bytes = seg_b[inw]
    out.seg_iters = seg_it[inw]
    out.seg_comm_s = seg_c[inw]
    out.seg_loop_s = seg_l[inw]
    out.seg_xflops = seg_x[inw]
    out.seg_prompt = seg_p[inw]
    out.seg_hit = seg_h[inw]
    if log is not None and record_steps:
        if engine != "iteration" or len(log) != len(seg_t) or not np.all(seg_it == 1):
            out.error = (
                f"step record: {len(log)} iterations timed for {len(seg_t)} commits of"
                f" {int(seg_it.sum())} iterations (needs engine 'iteration')"
            )
            return out
        lg = np.asarray(log, dtype=float).reshape(-1, 2)
        out.step_s = seg_t
        out.step_tokens = seg_tok
        out.step_seqs = lg[:, 0]
        out.step_lin_tokens = lg[:, 1]
        out.step_in_window = inw
        out.graph_tokens = int(pod.lat._gmax)
    out.sim_wall_s = time.perf_counter() - t0
    return out


def prompt_gap_share(
    tokens: np.ndarray, iters: np.ndarray, prompt: np.ndarray, hit: np.ndarray
) -> float:
    """The share of a run's inter-token gaps that fall in a step computing prompt tokens, from
    its commits: ``tokens`` output tokens, ``iters`` iterations, ``prompt`` prompt tokens
    admitted and ``hit`` of them served from the prefix cache, per commit. Every step gives one
    gap per token it produces (the benchmark's ITL sample, :func:`_weighted_quantiles`); a
    commit's prompt tokens are in its first iteration (serving/core.py), which produces about
    ``tokens / iters`` of its tokens. The median ITL is a prompt-carrying step when this is
    above one half (and every such step is longer than every decode step); ``nan`` without
    tokens."""
    total = float(np.sum(tokens))
    if total <= 0.0:
        return math.nan
    computes = (np.asarray(prompt, float) - np.asarray(hit, float)) > 0.0
    first = np.asarray(tokens, float) / np.maximum(np.asarray(iters, float), 1.0)
    return float(first[computes].sum() / total)


def phase_gap_shares(
    tokens: np.ndarray,
    iters: np.ndarray,
    prompt: np.ndarray,
    hit: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    ts: float,
    te: float,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """A run's inter-token gaps by phase, from its commits (as :func:`prompt_gap_share`, with
    each commit's ``starts`` / ``ends``) and the steady window [``ts``, ``te``]: the ramp-up
    (commits ending by ``ts``), the window, the ramp-down (commits starting at ``te`` or later).
    Returns each phase's share of all gaps and, per phase, the share of its gaps in prompt-
    computing steps (``nan`` for a phase without gaps). The benchmark's median ITL is over the
    whole run (SOURCE.md), so the ramp-down's gaps, which no prompt can be in once the last
    request is admitted, dilute the window's prompt-carrying share: the run's share is
    ``sum(tokens_i x share_i)``."""
    tokens = np.asarray(tokens, float)
    total = float(tokens.sum())
    ramp = np.asarray(ends, float) <= ts
    down = (np.asarray(starts, float) >= te) & ~ramp
    masks = (ramp, ~ramp & ~down, down)
    frac = tuple(float(tokens[m].sum() / total) if total > 0 else math.nan for m in masks)
    share = tuple(prompt_gap_share(tokens[m], iters[m], prompt[m], hit[m]) for m in masks)
    return (frac[0], frac[1], frac[2]), (share[0], share[1], share[2])


def _record_iterations(lat, tr: _Tracker) -> list[tuple[int, int]]:
    """Record the iteration of every commit of the pod (``engine = "iteration"``: one each):
    (sequences, tokens its layers run) as ``LatencyModel.iteration`` counts them for the eager
    host floor (its ``n_prefill + n`` and ``t_lin``: a data-parallel step's ``t_pad``). The
    engine times a step on the pod's latency model ``lat`` when it plans it (``iteration`` with
    prompt tokens, ``decode_step`` without: serving/core.py ``plan``) and may replan it before
    committing it (an arrival that joins it, at t = 0 here), so the tracker keeps the last one
    timed and logs it at the commit."""
    iteration, decode_step = lat.iteration, lat.decode_step

    def lin(p_tokens: int, n_prefill: int, n: int, t_pad: int = -1) -> int:
        if lat.dp <= 1:
            return p_tokens + n
        return t_pad if t_pad >= 0 else lat.dp_padded_tokens(p_tokens, n_prefill, n)

    def timed_iteration(p_tokens, pairs, n_prefill, n, ctx, t_pad=-1, p_full=-1, pairs_full=-1.0):
        tr.last_step = (n_prefill + n, lin(p_tokens, n_prefill, n, t_pad))
        return iteration(p_tokens, pairs, n_prefill, n, ctx, t_pad, p_full, pairs_full)

    def timed_decode_step(n, ctx):
        tr.last_step = (n, lin(0, 0, n))
        return decode_step(n, ctx)

    lat.iteration = timed_iteration
    lat.decode_step = timed_decode_step
    tr.steps = []
    return tr.steps


def dp_publication_shift(
    lat, seqs: np.ndarray, lin_tokens: np.ndarray, prompt: np.ndarray
) -> np.ndarray:
    """Per iteration of a data-parallel run (its sequences, the tokens its layers run, whether it
    carries prompt tokens): the host time that delays the publication of the iteration BEFORE
    it, :meth:`LatencyModel.eager_host_s` where it runs without a CUDA graph (more tokens than
    the capture size ``lat._gmax``: under data parallelism every prompt-carrying step, padded),
    else 0 (a graph replay's launch is in every step's host time alike).

    Why, in vLLM 0.11.1 with ``--async-scheduling`` (the benchmark's configs) and
    ``--data-parallel-size``: each engine core steps with a batch queue of two
    (``EngineCore.step_with_batch_queue``, ``vllm/v1/engine/core.py``): it schedules step k+1
    and calls ``execute_model`` on it, which ``UniProcExecutor`` (TP1 ranks) runs inline (the
    ``non_block`` future is made after the call returns: ``collective_rpc``,
    ``vllm/v1/executor/uniproc_executor.py``), and only then pops step k's result
    and runs ``update_from_output`` on it, which sends step k's tokens to the API server. Under
    data parallelism ``execute_model`` begins with the all-reduce of the step's token count
    over NCCL read back to the host (``coordinate_batch_across_dp``,
    ``vllm/v1/worker/dp_utils.py``; a CPU all-reduce only after 0.11.1, vllm-project/vllm PR
    29311), so the host reaches step k+1's kernel launches only when step k has ended on the
    GPU. Step k's tokens therefore leave after step k ends AND the host has issued step k+1:
    a graph replay (decode) adds the same small time to every gap, an eager step its whole
    host time, which moves from the prompt step's gap to the one before (time conserved)."""
    eh = lat.eager_host_s
    gmax = lat._gmax
    out = np.zeros(len(seqs))
    for i in range(len(seqs)):
        if lin_tokens[i] > gmax:
            out[i] = eh(int(seqs[i]), 1 if prompt[i] else 0)
    return out


def publication_gaps(step_s: np.ndarray, shift_s: np.ndarray) -> np.ndarray:
    """The inter-token gap of each iteration's tokens when iteration k's tokens are published
    ``shift_s[k + 1]`` after it ends (the next iteration's host time,
    :func:`dp_publication_shift`): ``step_s[k] + shift_s[k + 1] - shift_s[k]``; the last
    iteration has no next one. The gaps sum to the run's time (less the first shift, which
    delays no published token)."""
    nxt = np.zeros(len(step_s))
    nxt[:-1] = shift_s[1:]
    return step_s + nxt - shift_s


#: the quantiles of the inter-token gap beyond the median that the benchmark publishes
#: (``itl_p90_ms``, ``itl_p95_ms``, ``itl_p99_ms``; SOURCE.md)
ITL_QUANTILES = (0.9, 0.95, 0.99)


def _weighted_quantiles(x: np.ndarray, w: np.ndarray, qs: Sequence[float]) -> tuple[float, ...]:
    """The weighted ``q``-quantiles of ``x`` with weights ``w``, each the smallest ``x`` whose
    cumulative weight (in ascending ``x``) reaches ``q`` of the total: the ``q``-quantile of the
    sample in which each ``x`` appears ``w`` times (integer weights; the benchmark's gaps, one
    per token, each step's duration once per token it produced). The lower quantile, not an
    interpolated one: the runs have thousands of steps, the gap between two neighbours is
    below the figures' precision. ``nan`` for an empty or weightless sample."""
    if len(x) == 0 or w.sum() <= 0:
        return tuple(math.nan for _ in qs)
    o = np.argsort(x)
    cw = np.cumsum(w[o])
    xs = x[o]
    return tuple(float(xs[np.searchsorted(cw, q * cw[-1])]) for q in qs)


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """:func:`_weighted_quantiles` at one ``q`` (0 < q <= 1)."""
    return _weighted_quantiles(x, w, (q,))[0]


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    return _weighted_quantile(x, w, 0.5)


@dataclass(frozen=True)
class StepSplit:
    """A run's mean gap between tokens split into its median step and the time beyond it,
    measured and simulated, with the simulated steady window's prompt-carrying steps.

    The mean gap is ``batch / tokens/s`` (every running sequence gets one token per step, so it
    is the mean step); what lies beyond the median ITL is carried by the steps longer than the
    median: in the simulation those that carry prompt tokens (prefill chunks mixed into the
    decode batch), in vLLM those and whatever else stalls a step (docs/accuracy-log.md, "Time beyond
    the median step")."""

    meas_mean_s: float  # measured avg_batch_size / output tokens/s
    meas_median_s: float  # measured median ITL
    sim_mean_s: float  # simulated window batch / window tokens/s
    sim_median_s: float  # simulated token-weighted median step (whole run, as the benchmark)
    steps: float  # iterations of the simulated window
    prompt_steps: float  # of them, those computing prompt tokens
    prompt_tokens: float  # prompt tokens computed in the window (prefix-cache hits excluded)
    decode_step_s: float  # mean iteration of the window's commits without prompt tokens
    prompt_step_s: float  # mean prompt-carrying iteration
    #: the whole run's token-weighted share of prompt-carrying steps (SimRun.itl_prompt_share):
    #: the median ITL is a decode step only while it is under one half
    run_prompt_share: float = math.nan
    #: SimRun.itl_phase_tokens / itl_phase_prompt_share: (ramp-up, window, ramp-down)
    phase_tokens: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    phase_prompt_share: tuple[float, float, float] = (math.nan, math.nan, math.nan)

    @property
    def meas_on_prompt_step(self) -> bool:
        """Whether the measured median ITL is longer than a decode step: over 1.3 simulated
        decode steps of the window (a prompt-carrying step costs 1.6-10 decode steps on the
        fim rows; the simulated decode steps are within ~20 % of the measured medians where
        those are decode steps, so a row within 1.1-1.5 of it is a guess)."""
        return self.meas_median_s > 1.3 * self.decode_step_s

    @property
    def edge_window_share(self) -> float:
        """The window's prompt-carrying share of gaps at which the whole run's is one half (the
        ramp-up's and ramp-down's gaps as simulated): the measured median is a prompt-carrying
        step only if vLLM's window share is above it, a decode step only if below."""
        (rt, wt, dt), (rs, _, ds) = self.phase_tokens, self.phase_prompt_share
        rest = (rt * rs if rt > 0 else 0.0) + (dt * ds if dt > 0 else 0.0)
        return (0.5 - rest) / wt if wt > 0 else math.nan

    @property
    def prompt_steps_factor(self) -> float:
        """How many prompt-carrying steps vLLM must run per simulated one for the run's share to
        be one half, with the window's steps as Poisson admissions (share ``1 - exp(-lambda)``,
        "The median ITL of Coder-30B fim"): ``ln(1 - edge) / ln(1 - window share)``. With the
        measured median a prompt-carrying step (:attr:`meas_on_prompt_step`) vLLM runs more
        than this many, with it a decode step fewer."""
        w, e = self.phase_prompt_share[1], self.edge_window_share
        if not 0.0 < w < 1.0 or math.isnan(e):
            return math.nan
        if e >= 1.0:
            return math.inf
        return math.log1p(-max(e, 0.0)) / math.log1p(-w)

    @property
    def meas_beyond_s(self) -> float:
        return self.meas_mean_s - self.meas_median_s

    @property
    def sim_beyond_s(self) -> float:
        return self.sim_mean_s - self.sim_median_s

    @property
    def prompt_share(self) -> float:
        """Fraction of the window's steps that carry prompt tokens."""
        return self.prompt_steps / self.steps if self.steps else math.nan

    @property
    def tokens_per_prompt_step(self) -> float:
        return self.prompt_tokens / self.prompt_steps if self.prompt_steps else 0.0

    @property
    def missing_per_prompt_step_s(self) -> float:
        """The time each prompt-carrying step would have to gain for the simulated time beyond
        the median to reach the measured one (the prompt-carrying steps are fewer than half, so
        the median does not move): (measured - simulated beyond) / prompt share."""
        share = self.prompt_share
        if not share or math.isnan(share):
            return math.nan
        return (self.meas_beyond_s - self.sim_beyond_s) / share


def measured_steps_s(c: Config) -> tuple[float, float]:
    """Configuration ``c``'s measured (mean step, median step) in seconds: the batch over the
    output tokens/s, and the median ITL."""
    return c.avg_batch_size / c.tokens_per_s, c.itl_median_ms * 1e-3


def step_split(c: Config, run: SimRun) -> StepSplit:
    """:class:`StepSplit` of configuration ``c`` and its simulated ``run``."""
    meas_mean_s, meas_median_s = measured_steps_s(c)
    tps = run.tokens / run.window_s
    it = run.seg_iters
    has_p = run.seg_prompt > 0
    dec = ~has_p & (it > 0)
    d = float(run.seg_s[dec].sum() / it[dec].sum()) if dec.any() else math.nan
    # a commit's prompt tokens are in its first iteration; the rest of it decodes at ~d
    pf = float((run.seg_s[has_p] - (it[has_p] - 1.0) * d).mean()) if has_p.any() else math.nan
    return StepSplit(
        meas_mean_s=meas_mean_s,
        meas_median_s=meas_median_s,
        sim_mean_s=run.avg_batch / tps,
        sim_median_s=run.itl_median_s,
        steps=float(it.sum()),
        prompt_steps=float(has_p.sum()),
        prompt_tokens=float((run.seg_prompt - run.seg_hit).sum()),
        decode_step_s=d,
        prompt_step_s=pf,
        run_prompt_share=run.itl_prompt_share,
        phase_tokens=run.itl_phase_tokens,
        phase_prompt_share=run.itl_phase_prompt_share,
    )


def split_lines(pairs: Sequence[tuple[Config, SimRun]]) -> list[str]:
    """One line per run: mean step, median and the time beyond it, measured / simulated (ms),
    the simulated window's prompt-carrying share of steps, prompts per such step (computed
    tokens over the task's prompt length), its extra time over a decode step, and the time each
    would have to gain to match the measured time beyond the median."""
    out = [
        "time beyond the median step, measured / simulated (ms); simulated window: share of "
        "steps carrying prompts, computed prompt tokens per such step, its extra over a decode "
        "step (ms), the extra it would need (ms); whole run: the share of the gaps (token-"
        "weighted steps) that carry prompts (over one half: the median is a prompt step) = "
        "the window's share of the gaps x its prompt-carrying share + the ramp-down's x its; "
        "the measured median on a decode or a prompt-carrying step (over 1.3 simulated "
        "decode steps), and the factor on the window's prompt-carrying steps that vLLM's "
        "must be under or over for that (StepSplit.prompt_steps_factor)"
    ]
    for c, r in pairs:
        s = step_split(c, r)
        out.append(
            f"  {c.key:70} mean {1e3 * s.meas_mean_s:6.1f} / {1e3 * s.sim_mean_s:6.1f}"
            f" median {1e3 * s.meas_median_s:6.1f} / {1e3 * s.sim_median_s:6.1f}"
            f" beyond {1e3 * s.meas_beyond_s:5.1f} / {1e3 * s.sim_beyond_s:5.1f}"
            f" | prompt steps {s.prompt_share:4.2f} x {s.tokens_per_prompt_step:5.0f} tok"
            f" +{1e3 * (s.prompt_step_s - s.decode_step_s):5.1f} need"
            f" +{1e3 * (s.prompt_step_s - s.decode_step_s + s.missing_per_prompt_step_s):6.1f}"
            f" | run {s.run_prompt_share:4.2f} = {s.phase_tokens[1]:4.2f} x"
            f" {s.phase_prompt_share[1]:4.2f} + down {s.phase_tokens[2]:4.2f} x"
            f" {s.phase_prompt_share[2]:4.2f} | meas"
            f" {'prompt k >' if s.meas_on_prompt_step else 'decode k <'}"
            f" {s.prompt_steps_factor:4.2f}"
        )
    return out


# -- the power model ---------------------------------------------------------------------------
#: loaded idle and power limit per benchmark GPU (the catalog's; the fit does not move them:
#: a serving GPU is never idle inside the window, so the rows cannot separate idle from active)
def catalog_power(gpu_model: str) -> PowerSpec:
    """The catalog's :class:`PowerSpec` of a benchmark GPU."""
    from fleetsim.device import catalog

    e = catalog.gpu(GPUS[gpu_model])
    return PowerSpec(
        idle_w=e["idle_w"],
        max_w=e["tdp_w"],
        active_w=e["active_w"],
        compute_w=e["compute_w"],
        memory_w=e["memory_w"],
        kv_w=e.get("kv_w", 0.0),
        comm_w=e.get("comm_w"),
        moe_loop_w=e.get("moe_loop_w"),
        moe_compute_w=e.get("moe_compute_w", 0.0),
        host_w=e.get("host_w"),
        compute_u0=e.get("compute_u0"),
    )


def utilisation(run: SimRun, speed: float = 1.0) -> tuple[np.ndarray, ...]:
    """(segment durations, u_c, u_m, u_kv, f_comm, f_loop, u_moe, f_host) per GPU of the
    window's commits, u_kv being the KV cache and linear-state part of u_m (the bytes beyond the
    weights of each iteration, as the engine counts them), f_comm the share of the time in
    communication, f_loop in the block-scaled K loop of fp8 fused-MoE kernels, u_moe the
    routed experts' grouped-GEMM part of u_c and f_host the share waiting on the host (each
    iteration's ``host_s_per_iter``); ``speed`` scales the achieved rates (the measured over
    the simulated throughput: the same work done at the measured pace; the shares of time
    stay)."""
    dt = np.maximum(run.seg_s, 1e-12)
    g = max(run.tp, 1)
    uc = speed * run.seg_flops / (dt * g * run.peak_flops)
    um = speed * run.seg_bytes / (dt * g * run.peak_bw)
    iters = run.seg_iters if len(run.seg_iters) == len(run.seg_s) else np.zeros(len(dt))
    kv = np.maximum(run.seg_bytes - iters * run.weight_bytes, 0.0)
    ukv = speed * kv / (dt * g * run.peak_bw)
    cm = run.seg_comm_s if len(run.seg_comm_s) == len(run.seg_s) else np.zeros(len(dt))
    fc = np.minimum(cm / dt, 1.0)
    lp = run.seg_loop_s if len(run.seg_loop_s) == len(run.seg_s) else np.zeros(len(dt))
    fl = np.minimum(lp / dt, 1.0 - fc)
    xf = run.seg_xflops if len(run.seg_xflops) == len(run.seg_s) else np.zeros(len(dt))
    umoe = speed * xf / (dt * g * run.peak_flops)
    fh = np.minimum(iters * run.host_s_per_iter / dt, np.maximum(1.0 - fc - fl, 0.0))
    return run.seg_s, uc, um, ukv, fc, fl, umoe, fh


def speed_of(c: Config, run: SimRun) -> float:
    """Measured over simulated output tokens/s of a configuration."""
    return c.tokens_per_s / (run.tokens / run.window_s)


def predict_w(run: SimRun, p: PowerSpec, speed: float = 1.0) -> float:
    """Mean power per GPU over the window: every commit at
    ``min(max_w, idle + level + compute_w u_c + memory_w u_m + kv_w u_kv + moe_compute_w
    u_moe)``, the level being
    ``active_w`` and, for the share ``f_comm`` of the time in communication, ``comm_w``, for
    the share ``f_loop`` in the fp8 fused-MoE K loop, ``moe_loop_w``, for the share
    ``f_host`` waiting on the host, ``host_w`` (the replica is busy throughout the window),
    time-weighted."""
    u = utilisation(run, speed)
    if u[0].sum() <= 0:
        return math.nan
    return _mean_w(u, p)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best of the unconstrained
    solutions over every subset of free columns (2^k solves) that has no negative entry."""
    k = a.shape[1]
    best, best_r = np.zeros(k), float(np.sum(b**2))
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if np.any(x < 0):
            continue
        r = float(np.sum((a[:, cols] @ x - b) ** 2))
        if r < best_r:
            best_r = r
            best = np.zeros(k)
            best[cols] = x
    return best


#: weight of the prefill anchor of each model in the fit, in measured rows: one, as a row. At 3
#: (until 2026-12) the B200's anchors, an assumption there, outweighed its measured rows and put
#: its leave-one-model-out power 4 % low at the measured pace (docs/accuracy-log.md, "The power
#: fit")
PREFILL_ANCHOR_ROWS = 1.0
#: the fit's loss on the relative residuals (scipy ``least_squares``): ``soft_l1`` with
#: :data:`FIT_F_SCALE`, quadratic below 5 % and linear above, so that the few rows no step model
#: explains (the B200's host-limited GPQA series, docs/accuracy-log.md "B200 data") do not pull
#: every other row's prediction down; plain least squares gives each GPU's relative residuals a
#: zero mean, and these skewed residuals a negative median
FIT_LOSS = "soft_l1"
FIT_F_SCALE = 0.05


def power_fit_terms(p: PowerSpec, moe_rows: bool) -> int:
    """How many constants :func:`fit_power` fitted to give ``p``: ``active_w``, ``compute_w``,
    ``memory_w``, ``kv_w``, and each optional level it fitted (``comm_w``, ``moe_loop_w``,
    ``host_w``: None where not fitted) and ``moe_compute_w`` where some rows (``moe_rows``) are
    mixtures of experts."""
    return (
        4
        + (p.comm_w is not None)
        + (p.moe_loop_w is not None)
        + (p.host_w is not None)
        + bool(moe_rows)
    )


def fit_rows(c: Config) -> bool:
    """Whether a configuration's row is in the power fit: every non-suspect row, dense and
    mixture-of-experts / expert-parallel alike (issue 21: MoE and EP rows count), except the
    host-limited one-GPU B200 series (:attr:`Config.host_limited`), which the step fit leaves out
    too: the fit maps the simulated work at the measured pace to power, and on those rows the
    measured pace is set by the host, not by the work (GPU idle within each step, 294-540 W;
    docs/accuracy-log.md "B200 data" and "The power fit"). The accuracy tables keep them."""
    return not c.suspect and not c.host_limited


def fit_power(
    runs: Sequence[SimRun],
    measured_w: Sequence[float],
    base: PowerSpec,
    speeds: Sequence[float] | None = None,
    anchor: bool = True,
    kv: bool = True,
    exact: bool = True,
    anchor_rows: float = PREFILL_ANCHOR_ROWS,
    loss: str = FIT_LOSS,
    f_scale: float = FIT_F_SCALE,
    comm_cap: bool = True,
    moe: bool = True,
    host: bool = True,
    u0_grid: Sequence[float | None] | None = None,
) -> PowerSpec:
    """``active_w``, ``compute_w``, ``memory_w`` and ``kv_w`` (all >= 0) fitted to measured
    mean power per GPU on the relative residuals of the window means: first linear least squares
    (non-negative), refined for the cap at ``base.max_w`` (commits predicted above the limit are
    clipped; two refits on the gap keep the fit consistent with it), then the exact capped
    problem under ``loss`` (``"linear"``: least squares; ``"soft_l1"`` and the other losses of
    scipy's ``least_squares``, with ``f_scale``; ``"log"``: least squares on log(pred / meas)).
    ``idle_w`` and ``max_w`` stay ``base``'s.

    The utilisations are the simulated work (FLOPs, bytes) at the *measured* pace (``speeds``,
    measured over simulated tokens/s, :func:`speed_of`): the fit describes the GPU, not the
    step-time model's errors, which the evaluation then adds back.

    The benchmark's windows are decode-dominated (u_c <= 0.3), which leaves the compute term
    to extrapolation. With ``anchor``, each model adds one row (weight ``anchor_rows``,
    :data:`PREFILL_ANCHOR_ROWS`): its full prefill iteration draws the power limit, as measured
    on H100s (Splitwise, Patel et al., ISCA'24: the prompt phase runs at about the 700 W TDP,
    token generation well below; the catalog's earlier constants used the same figure). For
    other GPUs the same is assumed (confidence L). Without any anchor the B200's compute_w
    runs away (2,300-3,100 W per unit of peak FLOP/s), a slope no decode row constrains.

    ``kv_w`` (:class:`PowerSpec`) is fitted with the others from the runs' KV/state bytes
    (``seg_iters``, ``weight_bytes``), and ``comm_w``, the level in place of ``active_w`` while
    the GPUs communicate, where some runs are multi-GPU (``seg_comm_s``; else it stays None);
    with ``comm_cap`` it is at most ``active_w`` (GPUs waiting on their links do not draw more
    than computing ones); and ``moe_loop_w``, the level in place of ``active_w`` while fused-MoE
    kernels of fp8 block-quantised experts run their block-scaled K loop, where some runs have
    that time (``seg_loop_s``; else it stays None), at most ``max_w - idle_w`` (a GPU draws at
    most its limit); and ``moe_compute_w``, the power per unit of the routed experts' FLOP
    utilisation on top of ``compute_w`` (``seg_xflops``; fitted where some runs are mixtures of
    experts and ``moe``, else 0: a fused-MoE kernel spends more energy per useful FLOP than a
    dense GEMM, docs/model.md "Power"); and ``host_w``, the level in place of ``active_w`` for
    each iteration's exposed host time (``host_s_per_iter``; fitted where ``host`` and some
    runs have that time, else None), at most ``active_w`` (a GPU waiting for its next launch
    draws no more than a computing one); with ``kv=False`` all five stay off (the older
    three-term model).

    ``compute_u0`` (the saturation of the FLOP terms, :meth:`PowerSpec.compute_gain`) is
    ``base``'s, or with ``u0_grid`` the value of the grid (None: linear) whose fit has the
    least cost on the exact problem (``exact``; else the first of the grid)."""
    best: tuple[PowerSpec, float] | None = None
    for u0 in u0_grid or [base.compute_u0]:
        p, cost = _fit_power_at(
            runs,
            measured_w,
            replace(base, compute_u0=u0),
            speeds,
            anchor,
            kv,
            exact,
            anchor_rows,
            loss,
            f_scale,
            comm_cap,
            moe,
            host,
        )
        if not exact:
            return p
        if best is None or cost < best[1]:
            best = (p, cost)
    assert best is not None
    return best[0]


def _fit_power_at(
    runs: Sequence[SimRun],
    measured_w: Sequence[float],
    base: PowerSpec,
    speeds: Sequence[float] | None = None,
    anchor: bool = True,
    kv: bool = True,
    exact: bool = True,
    anchor_rows: float = PREFILL_ANCHOR_ROWS,
    loss: str = FIT_LOSS,
    f_scale: float = FIT_F_SCALE,
    comm_cap: bool = True,
    moe: bool = True,
    host: bool = True,
) -> tuple[PowerSpec, float]:
    """:func:`fit_power` at ``base.compute_u0``, with the exact problem's cost (nan without
    ``exact``)."""
    sp = [1.0] * len(runs) if speeds is None else list(speeds)
    rows = []
    for r, v in zip(runs, sp, strict=True):
        dt, uc, um, ukv, fc, fl, umoe, fh = utilisation(r, v)
        T = dt.sum()
        f = float((fc * dt).sum() / T)
        g = float((fl * dt).sum() / T)
        h = float((fh * dt).sum() / T) if kv and host else 0.0
        gain = base.compute_gain(uc)  # 1 without compute_u0 (the FLOP terms linear)
        rows.append(
            (
                1.0 - f - g - h,
                float((gain * uc * dt).sum() / T),
                float((um * dt).sum() / T),
                float((ukv * dt).sum() / T) if kv else 0.0,
                f,
                g,
                float((gain * umoe * dt).sum() / T) if kv and moe else 0.0,
                h,
            )
        )
    # the communication level is fitted only where some rows communicate (multi-GPU runs), the
    # loop level only where some rows run fp8 block-quantised experts, the routed experts'
    # FLOP term only where some rows are mixtures of experts, the host level only where some
    # rows have host time
    comm = kv and any(row[4] > 0.0 for row in rows)
    loop = kv and any(row[5] > 0.0 for row in rows)
    xmoe = kv and moe and any(row[6] > 0.0 for row in rows)
    hlev = kv and host and any(row[7] > 0.0 for row in rows)
    meas = list(np.asarray(measured_w, dtype=float))
    wts = [1.0] * len(rows)
    if anchor:
        seen: dict[tuple[float, ...], None] = {}
        for r in runs:
            seen.setdefault(tuple(r.prefill_u), None)
        for u0 in seen:
            if u0[0] > 0:
                ukv0 = u0[2] if kv and len(u0) > 2 else 0.0
                umoe0 = u0[3] if xmoe and len(u0) > 3 else 0.0
                fh0 = u0[4] if hlev and len(u0) > 4 else 0.0
                k0 = base.compute_gain(u0[0])
                rows.append((1.0 - fh0, k0 * u0[0], u0[1], ukv0, 0.0, 0.0, k0 * umoe0, fh0))
                meas.append(base.max_w)
                wts.append(anchor_rows)
    a = np.asarray(rows)
    if not comm:  # the level is active_w throughout
        a[:, 0] += a[:, 4]
    if not loop:
        a[:, 0] += a[:, 5]
    if not hlev:
        a[:, 0] += a[:, 7]
    # the fitted columns: active, compute, memory, [kv], [comm], [loop], [routed-expert FLOPs],
    # [host]
    cols = [0, 1, 2] + [3] * kv + [4] * comm + [5] * loop + [6] * xmoe + [7] * hlev
    a = a[:, cols]
    m = np.asarray(meas)
    y = m - base.idle_w
    # a row of weight w counts as w rows in the sum of squares: its residual is scaled by sqrt(w)
    wgt = np.sqrt(np.asarray(wts)) / m

    def spec(x: np.ndarray) -> PowerSpec:
        v = dict(zip(cols, (float(e) for e in x), strict=True))
        return replace(
            base,
            active_w=v[0],
            compute_w=v[1],
            memory_w=v[2],
            kv_w=v.get(3, 0.0),
            comm_w=v.get(4),
            moe_loop_w=v.get(5),
            moe_compute_w=v.get(6, 0.0),
            host_w=v.get(7),
        )

    x = _nnls(a * wgt[:, None], y * wgt)
    p = spec(x)
    n = len(runs)
    for _ in range(2):  # the cap lowers the prediction of the hottest rows: refit on the gap
        pred = np.array([predict_w(r, p, v) for r, v in zip(runs, sp, strict=True)])
        lin = base.idle_w + a[:n] @ x
        y2 = y.copy()
        y2[:n] += lin - pred  # what the linear part must add to reach the measurement
        x = _nnls(a * wgt[:, None], y2 * wgt)
        p = spec(x)
    if not exact:
        return p, math.nan
    # then the exact problem: the capped window means (every commit clipped at the limit)
    # against the measurements, relative, from the linear solution, all terms >= 0
    from scipy.optimize import least_squares

    us = [utilisation(r, v) for r, v in zip(runs, sp, strict=True)]
    meas_runs = m[:n]
    anchors = a[n:]
    anchor_w = wgt[n:] * m[n:]  # the anchors' weight (anchor_rows)
    ncol = a.shape[1]

    # with comm_cap, the communication level is at most the active level: optimised as the
    # ratio comm_w / active_w in [0, 1]; the host level always is
    cap = comm_cap and comm
    ic = cols.index(4) if comm else -1
    ih = cols.index(7) if hlev else -1

    def full(z: np.ndarray) -> np.ndarray:
        if not cap and not hlev:
            return z
        zz = z.copy()
        if cap:
            zz[ic] = z[ic] * z[0]
        if hlev:
            zz[ih] = z[ih] * z[0]
        return zz

    def residuals(zz: np.ndarray) -> np.ndarray:
        xx = full(zz)
        q = spec(xx)
        pred = np.array([_mean_w(u, q) for u in us])
        lin = base.idle_w + anchors @ xx
        if loss == "log":
            return np.concatenate(
                (np.log(pred / meas_runs), anchor_w * np.log(np.maximum(lin, 1e-9) / base.max_w))
            )
        return np.concatenate((pred / meas_runs - 1.0, anchor_w * (lin / base.max_w - 1.0)))

    z0 = np.maximum(x[:ncol], 1e-3)
    hi = np.full(ncol, np.inf)
    if cap:
        z0[ic] = min(0.999, x[ic] / max(x[0], 1e-3)) if x[ic] > 0 else 1e-3
        hi[ic] = 1.0
    if hlev:
        z0[ih] = min(0.999, x[ih] / max(x[0], 1e-3)) if x[ih] > 0 else 1e-3
        hi[ih] = 1.0
    if loop:  # the loop level: at most the power limit above idle
        il = cols.index(5)
        hi[il] = max(base.max_w - base.idle_w, 1e-3)
        z0[il] = min(z0[il], 0.999 * hi[il])
    sol = least_squares(
        residuals,
        z0,
        bounds=(0.0, hi),
        loss="linear" if loss == "log" else loss,
        f_scale=f_scale,
    )
    return spec(full(sol.x)), float(sol.cost)


def _mean_w(u: tuple[np.ndarray, ...], p: PowerSpec) -> float:
    """:func:`predict_w` from precomputed :func:`utilisation` arrays."""
    dt, uc, um, ukv, fc, fl, umoe, fh = u
    level = p.level_w(fc, fl, fh)
    if p.compute_u0 is not None:
        w = np.minimum(
            p.max_w,
            p.idle_w
            + level
            + p.compute_gain(uc) * (p.compute_w * uc + p.moe_compute_w * umoe)
            + p.memory_w * um
            + p.kv_w * ukv,
        )
        return float((w * dt).sum() / dt.sum())
    w = np.minimum(
        p.max_w,
        p.idle_w
        + level
        + p.compute_w * uc
        + p.memory_w * um
        + p.kv_w * ukv
        + p.moe_compute_w * umoe,
    )
    return float((w * dt).sum() / dt.sum())


# -- evaluation --------------------------------------------------------------------------------
@dataclass
class Row:
    """One compared configuration: measured and simulated figures."""

    config: Config
    run: SimRun
    sim: dict[str, float] = field(default_factory=dict)

    def meas(self) -> dict[str, float]:
        c = self.config
        return {
            "w_at_pace": c.power_per_gpu_w,
            "w_per_gpu": c.power_per_gpu_w,
            "j_per_token": c.energy_per_token_j,
            "tokens_per_s": c.tokens_per_s,
            "itl_median": c.itl_median_ms / 1e3,
            "itl_p90": c.itl_p90_ms / 1e3,
            "itl_p95": c.itl_p95_ms / 1e3,
            "itl_p99": c.itl_p99_ms / 1e3,
        }

    def err(self) -> dict[str, float]:
        m = self.meas()
        return {k: self.sim[k] / m[k] - 1.0 for k in METRICS + EXTRA if k in self.sim}

    def tail_err(self) -> dict[str, float]:
        """The relative errors of the ITL's tail (:data:`TAILS`), apart from :meth:`err`."""
        m = self.meas()
        return {k: self.sim[k] / m[k] - 1.0 for k in TAILS if k in self.sim}


def sim_figures(run: SimRun, p: PowerSpec) -> dict[str, float]:
    w = predict_w(run, p)
    tps = run.tokens / run.window_s
    return {
        "w_per_gpu": w,
        "j_per_token": w * run.tp / tps,
        "tokens_per_s": tps,
        "itl_median": run.itl_median_s,
        "itl_p90": run.itl_p90_s,
        "itl_p95": run.itl_p95_s,
        "itl_p99": run.itl_p99_s,
    }


def evaluate(pairs: Sequence[tuple[Config, SimRun]], fit: bool = True) -> list[Row]:
    """Simulated figures of every pair; with ``fit``, each model's power comes from a fit to the
    other models' rows of the same GPU that :func:`fit_rows` takes, dense and MoE
    (leave-one-model-out), else the catalog's."""
    out = []
    for c, r in pairs:
        base = catalog_power(c.gpu_model)
        p = base
        if fit:
            train = [
                (cc, rr)
                for cc, rr in pairs
                if cc.gpu_model == c.gpu_model and cc.model_id != c.model_id and fit_rows(cc)
            ]
            if train:
                p = _cached_fit(tuple(id(rr) for _, rr in train), train, base)
        row = Row(c, r, sim_figures(r, p))
        row.sim["w_at_pace"] = predict_w(r, p, speed_of(c, r))
        out.append(row)
    return out


_FITS: dict = {}
#: fit the power model at the measured pace (see fit_power)
FIT_AT_MEASURED_PACE = True
#: the saturation of the compute terms the harness's fits choose from (fit_power's
#: ``u0_grid``; ``--compute-u0``); None: the catalog's (linear: docs/accuracy-log.md, "A saturating
#: compute term")
FIT_U0_GRID: tuple[float | None, ...] | None = None


def _cached_fit(key, train, base):
    if key not in _FITS:
        _FITS[key] = fit_power(
            [r for _, r in train],
            [c.power_per_gpu_w for c, _ in train],
            base,
            [speed_of(c, r) for c, r in train] if FIT_AT_MEASURED_PACE else None,
            u0_grid=FIT_U0_GRID,
        )
    return _FITS[key]


def stats(errs: Iterable[float]) -> dict[str, float]:
    e = np.asarray(list(errs), dtype=float)
    e = e[np.isfinite(e)]
    if len(e) == 0:
        return {"n": 0, "median": math.nan, "p90": math.nan, "worst": math.nan, "signed": math.nan}
    a = np.abs(e)
    return {
        "n": len(e),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "worst": float(a.max()),
        "signed": float(np.median(e)),
    }


#: the power-fit variants :func:`power_variants` compares (name, dense rows only, anchor rows,
#: loss): the fit until 2026-12 (dense, anchors as 3 rows, least squares), the anchor lighter
#: and off, a robust loss, and the catalog's fit (dense + MoE, one anchor row, soft-L1)
POWER_VARIANTS = (
    ("dense a3 linear (before)", True, 3.0, "linear"),
    ("dense a1 linear", True, 1.0, "linear"),
    ("dense a0 linear", True, 0.0, "linear"),
    ("dense a3 soft_l1", True, 3.0, "soft_l1"),
    ("dense a1 log", True, 1.0, "log"),
    ("all a1 linear", False, 1.0, "linear"),
    ("all a1 soft_l1 (catalog)", False, 1.0, "soft_l1"),
)


def power_variants(pairs: Sequence[tuple[Config, SimRun]]) -> list[str]:
    """Leave-one-model-out errors of each fit in :data:`POWER_VARIANTS` on the non-suspect rows,
    per GPU and kind (dense, MoE / expert-parallel): W per GPU at the measured pace (the power
    model alone), end to end, and J per output token; median |error| / signed median, in %."""
    lines = [
        "Power-fit variants, leave-one-model-out, non-suspect rows (median / signed, %):",
        f"  {'variant':26} {'GPU':5} {'rows':5} {'n':>4} {'W meas. pace':>13} {'W per GPU':>13} "
        f"{'J/token':>13}",
    ]
    for name, dense_only, a, loss in POWER_VARIANTS:
        errs: list[tuple[Config, tuple[float, float, float]]] = []
        fits: dict[tuple[str, str], PowerSpec] = {}
        for c, r in pairs:
            if c.suspect:
                continue
            key = (c.gpu_model, c.model_id)
            if key not in fits:
                tr = [
                    (cc, rr)
                    for cc, rr in pairs
                    if cc.gpu_model == c.gpu_model
                    and cc.model_id != c.model_id
                    and fit_rows(cc)
                    and not (dense_only and cc.moe_or_ep)
                ]
                fits[key] = fit_power(
                    [rr for _, rr in tr],
                    [cc.power_per_gpu_w for cc, _ in tr],
                    catalog_power(c.gpu_model),
                    [speed_of(cc, rr) for cc, rr in tr],
                    anchor=a > 0,
                    anchor_rows=a,
                    loss=loss,
                    comm_cap=not name.endswith("(before)"),
                )
            f = sim_figures(r, fits[key])
            wp = predict_w(r, fits[key], speed_of(c, r))
            m = c.power_per_gpu_w
            errs.append(
                (
                    c,
                    (
                        wp / m - 1,
                        f["w_per_gpu"] / m - 1,
                        f["j_per_token"] / c.energy_per_token_j - 1,
                    ),
                )
            )
        for g in sorted({e[0].gpu_model for e in errs}):
            for kind in ("dense", "moe"):
                sub = [e for e in errs if e[0].gpu_model == g and e[0].moe_or_ep == (kind == "moe")]
                if not sub:
                    continue
                cells = []
                for i in (0, 1, 2):
                    s = stats(e[1][i] for e in sub)
                    cells.append(f"{100 * s['median']:5.1f} /{100 * s['signed']:+5.1f}")
                lines.append(
                    f"  {name:26} {g:5} {kind:5} {len(sub):>4} "
                    + " ".join(f"{x:>13}" for x in cells)
                )
    return lines


def table(rows: Sequence[Row], title: str) -> list[str]:
    """Per GPU and metric: median, p90, worst |error| and the signed median, in percent."""
    lines = [
        title,
        f"  {'GPU':5} {'metric':20} {'n':>4} {'median':>7} {'p90':>7} {'worst':>7} {'signed':>7}",
    ]
    for g in sorted({r.config.gpu_model for r in rows}):
        sub = [r for r in rows if r.config.gpu_model == g]
        for k in METRICS + EXTRA:
            s = stats(r.err().get(k, math.nan) for r in sub)
            lines.append(
                f"  {g:5} {METRIC_NAMES[k]:20} {s['n']:>4} {100 * s['median']:>6.1f}% "
                f"{100 * s['p90']:>6.1f}% {100 * s['worst']:>6.1f}% {100 * s['signed']:>+6.1f}%"
            )
    return lines


def tail_table(rows: Sequence[Row], title: str) -> list[str]:
    """Per GPU and kind (dense, MoE / expert-parallel), the non-suspect rows' p90, p95 and p99
    ITL: median, p90, worst |error| and the signed median, in percent, and the median over the
    rows of the tail's ratio to the median ITL, measured / simulated (the tail's shape), and
    of the share of the simulated gaps beyond the measured p90 / p99 (``SimRun``
    ``itl_beyond_meas_p90``; 10 / 1 % where the tail matches there). Not issue 21's goal table
    (its ITL is the median)."""
    beyond = {"itl_p90": "itl_beyond_meas_p90", "itl_p99": "itl_beyond_meas_p99"}
    lines = [
        title,
        f"  {'GPU':5} {'kind':5} {'metric':8} {'n':>4} {'median':>7} {'p90':>7} {'worst':>7} "
        f"{'signed':>7}   {'x median, meas. / sim.':>22}   sim. gaps beyond meas.",
    ]
    for g in sorted({r.config.gpu_model for r in rows}):
        for kind in ("dense", "moe"):
            sub = [
                r
                for r in rows
                if r.config.gpu_model == g
                and not r.config.suspect
                and r.config.moe_or_ep == (kind == "moe")
            ]
            if not sub:
                continue
            for k in TAILS:
                s = stats(r.tail_err().get(k, math.nan) for r in sub)
                meas = np.nanmedian([r.meas()[k] / r.meas()["itl_median"] for r in sub])
                sim = np.nanmedian([r.sim[k] / r.sim["itl_median"] for r in sub])
                over = (
                    f"{100 * np.nanmedian([getattr(r.run, beyond[k]) for r in sub]):5.1f}%"
                    if k in beyond
                    else ""
                )
                lines.append(
                    f"  {g:5} {kind:5} {METRIC_NAMES[k]:8} {s['n']:>4} {100 * s['median']:>6.1f}% "
                    f"{100 * s['p90']:>6.1f}% {100 * s['worst']:>6.1f}% "
                    f"{100 * s['signed']:>+6.1f}%   {meas:>10.2f} / {sim:<10.2f}   {over}"
                )
    return lines


def tail_lines(rows: Sequence[Row]) -> list[str]:
    """One line per row: the median, p90 and p99 ITL measured / simulated (ms), the p90 and
    p99 errors, and the share of the simulated gaps beyond the measured p90 / p99."""
    out = ["ITL median, p90, p99: measured / simulated (ms); p90 and p99 error"]
    for r in rows:
        m, e = r.meas(), r.tail_err()
        cells = " ".join(
            f"{k.removeprefix('itl_')} {1e3 * m[k]:7.1f} / {1e3 * r.sim[k]:7.1f}"
            for k in ("itl_median", "itl_p90", "itl_p99")
        )
        out.append(
            f"  {r.config.key:70} {cells} | p90 {100 * e['itl_p90']:+6.1f}% "
            f"p99 {100 * e['itl_p99']:+6.1f}% | beyond {100 * r.run.itl_beyond_meas_p90:5.1f}% "
            f"{100 * r.run.itl_beyond_meas_p99:5.1f}%" + (" suspect" if r.config.suspect else "")
        )
    return out


def _sim_one(
    args: tuple[Config, int, str, float | None, dict | None, str, bool, dict[str, int] | None],
) -> SimRun:
    c, seed, engine, stall, fields, prompts, dp_publish, ptok = args
    return simulate_config(
        c,
        seed,
        engine,
        stall,
        profile_fields=fields,
        prompts=prompts,
        dp_publish=dp_publish,
        prompt_tokens=ptok,
    )


def lomo_host_stalls(data: Path, configs: Sequence[Config]) -> dict[tuple[str, str], float]:
    """The vllm-v1 host stall per step (``fleetsim.calibrate.stack.fit_host_stall``) of each
    (GPU, model) of ``configs`` fitted without that model's rows: leave-one-model-out, as the
    power. A model outside the fitting set (hybrids, MoE, multi-GPU-only) takes the fit to
    every row, which is the catalog's."""
    from fleetsim.calibrate import stack
    from fleetsim.device.stack import stack_constants

    out: dict[tuple[str, str], float] = {}
    for g in sorted({c.gpu_model for c in configs if c.gpu_model in stack.GPUS}):
        cst = stack_constants("vllm-v1", GPUS[g])
        if cst is None or not cst.get("host_stall_s"):
            continue  # not charged on this GPU (calibrate/stack.py, HOST_STALL_ADOPTED)
        # (the steps at the dense GEMMs' weight stream the stall was fitted with)
        runs = stack.load_runs(data, g, dense_gemm_bw_eff=cst.get("dense_gemm_bw_eff", 0.0))
        fit = stack.fit_host_stall(runs, cst)
        for m in {c.model_id for c in configs if c.gpu_model == g}:
            out[(g, m)] = fit["hs_by_model"].get(m, fit["host_stall_fitted_s"]) if fit else 0.0
    return out


def simulate_all(
    configs: Sequence[Config],
    workers: int = 2,
    seed: int = 0,
    engine: str = "iteration",
    stalls: dict[tuple[str, str], float] | None = None,
    fields: dict[str, dict] | None = None,
    prompts: str = "constant",
    dp_publish: bool = False,
    prompt_tokens: dict[str, int] | None = None,
) -> list[SimRun]:
    """:func:`simulate_config` of every configuration, in a process pool; ``stalls`` (by GPU
    and model, :func:`lomo_host_stalls`) replaces the catalog's host stall per step;
    ``fields`` (by GPU, ``"B200"``) the resolved profile's fields (``profile_fields``: a
    folder's fitted constants, :func:`folder_profile_fields`); ``prompts`` the prompt lengths'
    shape (:func:`draw_prompts`); ``dp_publish`` the data-parallel rows' publication gaps
    (:func:`publication_gaps`); ``prompt_tokens`` tasks' prompt means in place of
    :data:`PROMPT_TOKENS`."""
    st = stalls or {}
    fs = fields or {}
    jobs = [
        (
            c,
            seed,
            engine,
            st.get((c.gpu_model, c.model_id)),
            fs.get(c.gpu_model) or None,
            prompts,
            dp_publish,
            prompt_tokens,
        )
        for c in configs
    ]
    if workers <= 1 or len(jobs) <= 1:
        return [_sim_one(j) for j in jobs]
    with _pool(workers) as ex:
        return list(ex.map(_sim_one, jobs, chunksize=1))


def _harness_options() -> tuple:
    """The module-wide options the command line sets (``--chat-prompt-mean``,
    ``--chat-turns-mean``), for :func:`_pool`'s workers."""
    from fleetsim.calibrate import stack

    return dict(PROMPT_TOKENS), CHAT_TURNS_MEAN, stack.CHAT_TURNS_MEAN


def _set_harness_options(opts: tuple) -> None:
    """A worker's copy of :func:`_harness_options` (whatever the start method: a spawned or
    forkserver worker does not inherit the parent's module state)."""
    global CHAT_TURNS_MEAN
    from fleetsim.calibrate import stack

    prompt_tokens, CHAT_TURNS_MEAN, stack.CHAT_TURNS_MEAN = opts
    PROMPT_TOKENS.update(prompt_tokens)


def _pool(workers: int, mp_context=None) -> ProcessPoolExecutor:
    """The harness's process pool, each worker with the command line's options (``mp_context``:
    a start method's context, the platform's default if None)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp_context,
        initializer=_set_harness_options,
        initargs=(_harness_options(),),
    )


QUICK = (  # the reduced subset: both models, both GPUs, small to large batches
    ("Qwen/Qwen3-8B", "lm-arena-chat", "H100", (8, 64, 256)),
    ("Qwen/Qwen3-14B", "lm-arena-chat", "H100", (8, 64, 256)),
    ("Qwen/Qwen3-8B", "lm-arena-chat", "B200", (8, 64, 256)),
    ("Qwen/Qwen3-14B", "lm-arena-chat", "B200", (8, 64, 256)),
)


def select(
    configs: Sequence[Config], quick: bool = False
) -> tuple[list[Config], list[tuple[Config, str]]]:
    """(the configurations simulated, the skipped ones with their reason)."""
    run, skipped = [], []
    for c in configs:
        why = skip_reason(c)
        if why:
            skipped.append((c, why))
        elif quick and not any(
            c.model_id == m and c.task == t and c.gpu_model == g and c.max_num_seqs in b
            for m, t, g, b in QUICK
        ):
            continue
        else:
            run.append(c)
    return run, skipped


#: the suspect reason of the series set apart in the second table: a B200 series whose other
#: batch sizes run slower than the H100's (SOURCE.md: host-side limits are one candidate)
HOST_LIMITED_REASON = "B200 slower than H100"


def flagged_series(rows: Sequence[Row]) -> set[str]:
    """Keys of the rows whose series (model, task, GPU, parallelism) has a row flagged
    :data:`HOST_LIMITED_REASON`: e.g. Qwen3-8B GPQA on one B200, flagged at 8 to 64 sequences,
    whose 128-sequence row escaped the flag only because no H100 row has that batch
    (docs/accuracy-log.md, "B200 data", has the evidence that no step model fits it)."""

    def series(c: Config) -> tuple:
        return (c.model_id, c.task, c.gpu_model, c.num_gpus, c.tp, c.ep, c.dp)

    bad = {series(r.config) for r in rows if HOST_LIMITED_REASON in r.config.suspect_reason}
    return {r.config.key for r in rows if series(r.config) in bad}


def report(rows: Sequence[Row], skipped: Sequence[tuple[Config, str]], fitted: bool) -> list[str]:
    how = "leave-one-model-out power fit" if fitted else "catalog power model"
    dense = [r for r in rows if not r.config.moe_or_ep]
    lines = []
    lines += table([r for r in dense if not r.config.suspect], f"Dense, non-suspect rows ({how}):")
    apart = flagged_series(dense)
    gpus = {r.config.gpu_model for r in dense if not r.config.suspect and r.config.key in apart}
    if gpus:
        lines += table(
            [
                r
                for r in dense
                if not r.config.suspect and r.config.key not in apart and r.config.gpu_model in gpus
            ],
            "Dense, non-suspect rows without the series flagged host-limited (NOT the goal "
            "table; docs/accuracy-log.md, B200 data):",
        )
    sus = [r for r in dense if r.config.suspect]
    if sus:
        lines += table(sus, "Dense, suspect rows (not fitted, not in the goal table):")
    moe = [r for r in rows if r.config.moe_or_ep]
    if moe:
        lines += table(
            [r for r in moe if not r.config.suspect], "MoE / expert-parallel, non-suspect rows:"
        )
        lines += table(moe, "MoE / expert-parallel rows, suspect included:")
    if dense and moe:
        lines += table(
            [r for r in rows if not r.config.suspect],
            f"Dense + MoE / expert-parallel, non-suspect rows: the goal table of issue 21 ({how}):",
        )
    lines += tail_table(
        rows,
        "ITL tail, non-suspect rows, per GPU and kind (NOT the goal table; docs/accuracy-log.md, "
        "'ITL tails'):",
    )
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    lines.append(f"Skipped {len(skipped)} configurations:")
    lines += [f"  {n:4}  {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])]
    return lines


def sweep_offsets(
    errs: Sequence[tuple[str, str, float]],
) -> dict[str, tuple[float, float, list[tuple[str, int, float]]]]:
    """Per GPU (the first of each triple): (the median |error|, the median |error| left after
    each sweep's own median error is taken off, and every sweep's (name, rows, median signed
    error), by that median) of ``(gpu, sweep, error)`` triples, a sweep being one model, task
    and parallelism across its batch sizes (:func:`sweep_lines`). What a per-sweep constant
    offset (a power level the work does not show, or a run's node) explains of the median
    error: docs/accuracy-log.md, "The W and J medians by task"."""
    by: dict[str, dict[str, list[float]]] = {}
    for gpu, sweep, e in errs:
        by.setdefault(gpu, {}).setdefault(sweep, []).append(float(e))
    out = {}
    for gpu, sweeps in by.items():
        allv = [abs(e) for v in sweeps.values() for e in v]
        meds = {k: float(np.median(v)) for k, v in sweeps.items()}
        within = [abs(e - meds[k]) for k, v in sweeps.items() for e in v]
        out[gpu] = (
            float(np.median(allv)),
            float(np.median(within)),
            sorted(((k, len(sweeps[k]), meds[k]) for k in sweeps), key=lambda t: t[2]),
        )
    return out


def sweep_lines(
    rows: Sequence[Row], metrics: Sequence[str] = ("w_per_gpu", "j_per_token")
) -> list[str]:
    """``--sweeps``: :func:`sweep_offsets` of the goal table's rows (non-suspect), per GPU and
    metric, each sweep's median signed error in %."""
    lines = []
    for metric in metrics:
        errs = [
            (
                r.config.gpu_model,
                f"{r.config.model_id} {r.config.task} x{r.config.num_gpus} "
                f"TP{r.config.tp}/EP{r.config.ep}/DP{r.config.dp}",
                100.0 * r.err()[metric],
            )
            for r in rows
            if not r.config.suspect and metric in r.sim
        ]
        for gpu, (med, within, sweeps) in sorted(sweep_offsets(errs).items()):
            lines.append(
                f"{gpu} {METRIC_NAMES.get(metric, metric)}: median |error| {med:.1f} %, "
                f"{within:.1f} % within the sweeps ({len(sweeps)} sweeps; their medians, signed):"
            )
            lines += [f"  {m:+6.1f} %  {n:3d} rows  {k}" for k, n, m in sweeps]
    return lines


def length_biased_half(c: Config) -> float:
    """``E[L^2] / (2 E[L])`` of the configuration's output histogram (bin centres): the mean
    generated length of a running sequence, sampled over time, in steady state."""
    counts = np.asarray(c.hist_counts, dtype=float)
    edges = np.linspace(c.hist_lo, c.hist_hi, len(counts) + 1)
    mid = (edges[:-1] + edges[1:]) / 2
    w = counts / counts.sum()
    return float((w * mid**2).sum() / (2 * (w * mid).sum()))


def implied_prompts(
    configs: Sequence[Config], fill_below: float = 0.95
) -> list[tuple[Config, float]]:
    """Prompt lengths the KV-limited rows imply: where the batch stayed below
    ``fill_below x max_num_seqs`` the KV cache was full, so it held
    ``avg_batch x (prompt + E[L^2] / (2 E[L]))`` tokens; with the simulator's KV budget for
    that configuration (``kv_capacity_tokens``; a hybrid's attention layer-blocks less each
    sequence's Mamba state) this gives the prompt. Only as right as the
    KV budget (vLLM's profiling run, see the serving stack) and the steady-state assumption.
    Data-parallel rows are left out: their batch stays below ``max_num_seqs`` because every
    rank serves its own queue, bound on arrival, and the queues drain unevenly (the per-rank
    model of ``calibrate/dp_ranks.py`` gives their measured batch, e.g. 7.5 of 8 for
    Coder-480B-FP8 DP4 b8), not because their KV cache is full."""

    out = []
    for c in configs:
        if not kv_limited(c, fill_below):
            continue
        rs = _row_resolved(c)
        per_seq = rs.kv_capacity_tokens / c.avg_batch_size
        md = rs.model
        if md.n_linear_layers and not md.n_sliding_layers:
            # a Mamba-Transformer hybrid: each sequence holds its constant state (state_blocks
            # layer-blocks, vLLM's Mamba pages) beside its tokens' blocks in the attention
            # layers, so only what is left of a sequence's share holds tokens
            kb = rs.kv  # (kv_budget, as resolved: its one-request trace is gone)
            assert kb is not None
            left = kb.layer_blocks / c.avg_batch_size - kb.state_blocks
            per_seq = left / md.n_attn_layers * kb.block_size_tokens
        out.append((c, per_seq - length_biased_half(c)))
    return out


def kv_limited(c: Config, fill_below: float = 0.95) -> bool:
    """Whether the row's measured window batch says its KV cache was full (the rows of
    :func:`implied_prompts`): non-suspect, one engine (``dp = 1``), expressible, and a batch
    below ``fill_below x max_num_seqs``."""
    return not (
        c.suspect or c.dp > 1 or c.avg_batch_size >= fill_below * c.max_num_seqs or skip_reason(c)
    )


@dataclass
class ImpliedMean:
    """The prompt mean at which one row's simulated window batch equals the measured one
    (:func:`implied_prompt_mean`), and every (mean, simulated batch) tried on the way."""

    config: Config
    mean: float = math.nan
    #: (prompt mean, simulated window batch) of every simulation, in order
    tried: list[tuple[float, float]] = field(default_factory=list)
    #: "" where bracketed and solved; otherwise why not (a bound, not a value)
    note: str = ""


def implied_prompt_mean(
    c: Config,
    stall: float | None = None,
    engine: str = "iteration",
    prompts: str = HARNESS_PROMPTS,
    start: float | None = None,
    lo: float = 16.0,
    hi: float = 8192.0,
    rtol: float = 0.002,
    max_sims: int = 12,
) -> ImpliedMean:
    """The task's prompt mean at which the simulated window batch of ``c`` (the harness's
    engine, prompt shape and host stall) equals the measured ``avg_batch_size``, solved on the
    simulation itself rather than the steady-state closed form (:func:`implied_prompts`). A
    full cache holds about ``b (P + h)`` tokens, so ``1 / b`` is close to linear in the mean
    ``P``: the root of ``1 / b_sim(P) - 1 / b_meas`` is found by regula falsi (Illinois) inside
    a bracket grown from ``start`` (the task's :data:`PROMPT_TOKENS`) by doubling / halving,
    until the simulated batch is within ``rtol`` of the measured. Where no mean in
    ``[lo, hi]`` brackets it (the simulation holds more sequences even at ``hi``, or fewer at
    ``lo``), ``note`` says so and ``mean`` is the bound reached."""
    out = ImpliedMean(c)
    target = 1.0 / c.avg_batch_size

    def g(m: float) -> float:
        r = simulate_config(c, 0, engine, stall, prompts=prompts, prompt_tokens={c.task: round(m)})
        if r.error or not r.avg_batch > 0:
            raise ValueError(f"{c.key} at prompt mean {m:.0f}: {r.error or 'no batch'}")
        out.tried.append((float(round(m)), float(r.avg_batch)))
        return 1.0 / float(r.avg_batch) - target

    def close(m: float) -> bool:
        return abs(out.tried[-1][1] * target - 1.0) <= rtol

    a = float(start if start is not None else PROMPT_TOKENS.get(c.task, 250))
    fa = g(a)
    if close(a):
        out.mean = a
        return out
    # grow the bracket: a mean too short (fa < 0: the simulation holds more) doubles
    b, fb = a, fa
    while (fa < 0) == (fb < 0):
        nb = b * 2.0 if fa < 0 else b / 2.0
        if nb > hi or nb < lo or len(out.tried) >= max_sims:
            out.mean = b
            out.note = (
                f"not bracketed: simulated batch {out.tried[-1][1]:.1f} at mean {b:.0f} "
                f"(measured {c.avg_batch_size:.1f})"
            )
            return out
        a, fa = b, fb
        b, fb = nb, g(nb)
        if close(b):
            out.mean = b
            return out
    # Illinois regula falsi on [a, b]
    side = 0
    while len(out.tried) < max_sims:
        m = (a * fb - b * fa) / (fb - fa)
        if abs(m - a) < 0.5 or abs(m - b) < 0.5:  # whole tokens: nothing left to split
            break
        fm = g(m)
        if close(m):
            out.mean = m
            return out
        if (fm < 0) == (fb < 0):
            b, fb = m, fm
            if side == -1:
                fa /= 2.0
            side = -1
        else:
            a, fa = m, fm
            if side == 1:
                fb /= 2.0
            side = 1
    # the closest tried
    best = min(out.tried, key=lambda t: abs(t[1] * target - 1.0))
    out.mean = best[0]
    out.note = f"closest of {len(out.tried)} tried (batch {best[1]:.1f})"
    return out


def _implied_one(args: tuple[Config, float | None, str, str]) -> ImpliedMean:
    c, stall, engine, prompts = args
    try:
        return implied_prompt_mean(c, stall, engine, prompts)
    except ValueError as exc:
        return ImpliedMean(c, note=str(exc)[:200])


def implied_prompt_means(
    configs: Sequence[Config],
    workers: int = 2,
    engine: str = "iteration",
    prompts: str = HARNESS_PROMPTS,
    stalls: dict[tuple[str, str], float] | None = None,
) -> list[ImpliedMean]:
    """:func:`implied_prompt_mean` of every KV-limited row of ``configs`` (:func:`kv_limited`),
    in a process pool."""
    st = stalls or {}
    jobs = [(c, st.get((c.gpu_model, c.model_id)), engine, prompts) for c in configs]
    jobs = [j for j in jobs if kv_limited(j[0])]
    if workers <= 1 or len(jobs) <= 1:
        return [_implied_one(j) for j in jobs]
    with _pool(workers) as ex:
        return list(ex.map(_implied_one, jobs, chunksize=1))


def reserve_sensitivity(c: Config) -> tuple[float, float]:
    """(the simulated KV cache in GiB, the prompt tokens one GiB per GPU of memory the
    simulator does not reserve moves the row's implied mean by): ``gpus x 2^30 / (b_meas x
    bytes per token)``. A row whose implied mean a plausible reserve error (a few tenths of a
    GiB: the profiling run's peak, non-torch memory; docs/accuracy-log.md, KV budget) moves by
    a few tokens is a trustworthy estimator; one it moves by hundreds is not."""

    rs = _row_resolved(c)
    kb = rs.kv  # (kv_budget, as resolved: its one-request trace is gone)
    assert kb is not None
    gpus = rs.scenario.fleet.tensor_parallel * rs.scenario.fleet.data_parallel
    return kb.kv_bytes / 2**30, gpus * 2**30 / (c.avg_batch_size * kb.bytes_per_token)


def implied_mean_lines(res: Sequence[ImpliedMean], turns_mean: float | None = None) -> list[str]:
    """The table ``--implied-prompt`` prints: per row the measured window batch, the closed
    form's prompt (:func:`implied_prompts`), the simulated one, the simulated KV cache and the
    implied mean's shift per GiB per GPU of unexplained reserve (:func:`reserve_sensitivity`),
    and whether the run repeats its prompt list (``rep``: shared where the simulation shares
    the repeats' blocks, :func:`shares_repeated_prompts`; ``unsh`` where it repeats but does
    not). ``turns_mean`` (the chat list as conversations, ``azure-conv``): the implied mean is
    the computed prompt per request, and a column gives the held one, ``turns_mean x`` it
    (:func:`conversation_means`)."""
    closed = {c.key: p for c, p in implied_prompts([r.config for r in res])}
    lines = [
        "Prompt mean at which the simulated window batch equals the measured one (KV-limited "
        "rows; docs/accuracy-log.md, 'The chat prompt mean'):",
        f"  {'configuration':70} {'meas.b':>7} {'closed':>7} {'implied':>8} {'KV GiB':>7} "
        f"{'tok/GiB':>7} {'rep':>5}  tried (mean: batch)",
    ]
    if turns_mean:
        lines[1] = lines[1].replace(" implied", "computed") + f"  (held = {turns_mean:g} x chat's)"
    for r in res:
        c = r.config
        gib, per = reserve_sensitivity(c)
        rep = (
            ("share" if shares_repeated_prompts(c) else "unsh")
            if c.num_requests > REQUESTS_PER_TASK.get(c.task, c.num_requests)
            else ""
        )
        tried = ", ".join(f"{m:.0f}: {b:.1f}" for m, b in r.tried)
        if turns_mean and c.task == "lm-arena-chat":
            tried = f"held {r.mean * turns_mean:.0f}; " + tried
        lines.append(
            f"  {c.key:70} {c.avg_batch_size:7.1f} {closed.get(c.key, math.nan):7.0f} "
            f"{r.mean:8.0f} {gib:7.1f} {per:7.1f} {rep:>5}  {tried}"
            + (f"  [{r.note}]" if r.note else "")
        )
    return lines


def fit_all(
    pairs: Sequence[tuple[Config, SimRun]],
) -> dict[str, tuple[PowerSpec, int, list[str]]]:
    """The power model of each GPU fitted to all its non-suspect rows, dense and MoE /
    expert-parallel (:func:`fit_rows`): ``{gpu_model: (PowerSpec, rows, models)}``."""
    out = {}
    for g in sorted({c.gpu_model for c, _ in pairs}):
        train = [(c, r) for c, r in pairs if c.gpu_model == g and fit_rows(c)]
        if not train:
            continue
        base = catalog_power(g)
        p = fit_power(
            [r for _, r in train],
            [c.power_per_gpu_w for c, _ in train],
            base,
            [speed_of(c, r) for c, r in train] if FIT_AT_MEASURED_PACE else None,
        )
        models = sorted({c.model_id for c, _ in train})
        out[g] = (
            replace(p, confidence=f"fitted: ML.ENERGY v3, {len(train)} rows"),
            len(train),
            models,
        )
    return out


#: the serving-stack constants a --from-mlenergy profile carries (device/stack.py apply_stack)
STACK_KEYS = (
    "overhead_s",
    "per_seq_s",
    "graph_floor_frac",
    "kv_memory_eff",
    "attn_unit_bw_bytes_per_s",
    "ar_floor_s",
    "ar_bw_bytes_per_s",
    "linear_state_eff",
    "host_stall_s",
    "one_gpu_overhead_s",
    "dense_gemm_bw_eff",
    # the eager MoE host floor, fitted by calibrate/eager_host.py to the folder's MoE rows
    # (write_profiles); a GPU without such rows keeps the catalog's
    "eager_moe_layer_host_s",
    "eager_seq_host_s",
    "eager_mla_layer_host_s",
    # latent attention's prefill path in an eager prompt-carrying step (calibrate/mla_prefill.py)
    "eager_mla_prefill_layer_host_s",
    # the Mamba-2 prefill path of a prompt-carrying step (calibrate/mamba_prefill.py)
    "linear_state_prefill_layer_s",
    "linear_state_prefill_step_s",
)


def fit_eager_floor(
    data_dir: Path,
    gpu_model: str,
    stack: dict[str, float],
    workers: int = 2,
    moe: dict[str, float] | None = None,
) -> tuple[eager_host.FloorFit | None, str]:
    """The eager MoE host floor (calibrate/eager_host.py) fitted to ``data_dir``'s non-suspect
    rows of mixtures of experts on ``gpu_model``, simulated with the serving stack's constants
    ``stack`` fitted to the same folder (the catalog's where empty) and the fused-MoE constants
    ``moe`` (a profile's ``moe_constants``; None: the catalog's), and the line to print:
    (``eager_host.FloorFit``, the line). The constants the profile carries
    (``FloorFit.profile_constants``) are 0 where the fit does not predict the models left out
    better than no floor (``FloorFit.adopted``); (None, line) where the folder has no such
    rows, or rows of one model only (the catalog's floor stays)."""
    name = GPUS[gpu_model]
    fields = folder_profile_fields(name, stack, moe) or None
    rows = eager_host.simulate_rows(gpu_model, data_dir, workers, profile_fields=fields)
    if not rows:
        return None, (
            "eager MoE host floor: the catalog's (no non-suspect row of a mixture of experts "
            "to fit it to)"
        )
    models = sorted({r.model for r in rows})
    if len(models) < 2:
        # the floor is adopted only where it predicts a model left out better than none (the
        # catalog's rule, eager_host.FloorFit.adopted): one model leaves none to check it on
        return None, (
            f"eager MoE host floor: the catalog's (the folder's {len(rows)} MoE rows are of one "
            f"model, {models[0]}: none left out to check a fitted floor on; fix: rows of two or "
            "more MoE models)"
        )
    f = eager_host.fit_gpu(rows, gpu_model)
    lomo = float(np.median(np.abs(f.err_lomo[:, 1])))
    without = float(np.median(np.abs(f.err_without[:, 1])))
    hl, hs, hm = f.constants
    if not f.adopted:
        return f, (
            f"eager MoE host floor: none ({len(rows)} MoE rows fit {hl * 1e3:.2f} ms per MoE "
            f"layer, {hs * 1e6:.0f} us per sequence, but leave-one-model-out no better than "
            f"none: mean |error| {np.abs(f.err_lomo).mean():.1%} vs "
            f"{np.abs(f.err_without).mean():.1%})"
        )
    return f, (
        f"eager MoE host floor fitted to {len(rows)} MoE rows: {hl * 1e3:.2f} ms per MoE layer, "
        f"{hs * 1e6:.0f} us per sequence"
        + (f", {hm * 1e3:.2f} ms per latent-attention layer" if hm else "")
        + f" (leave-one-model-out mean step median {lomo:.1%}, without the floor {without:.1%})"
    )


def folder_profile_fields(gpu: str, constants: dict[str, float], moe: dict | None) -> dict:
    """The resolved-profile fields (:func:`simulate_config` ``profile_fields``) of catalog GPU
    ``gpu`` run with a folder's serving-stack ``constants`` (calibrate/stack.py and the eager
    floor; empty: the catalog's) and MoE constants ``moe`` (a profile's ``moe_constants``;
    None: the catalog's), as a scenario with the profile :func:`write_profiles` writes runs."""
    from fleetsim.device.moe import profile_moe_fit

    fields: dict = eager_host.stack_profile_fields(gpu, constants) if constants else {}
    if moe:
        fields["moe_fit"] = profile_moe_fit(gpu, gpu, moe)
    return fields


def fit_moe_constants(
    data_dir: Path, gpus: Sequence[str], fields: dict[str, dict], workers: int = 2
) -> tuple[dict, list[str]]:
    """The fused-MoE kernel constants (calibrate/moe_fit.py) of each GPU of ``gpus``
    (``"B200"``) fitted to ``data_dir``'s non-suspect MoE rows, simulated once with the
    profile fields ``fields`` (by GPU: the folder's serving-stack constants): ``({gpu:
    moe_fit.GpuFit}, the lines to print)``; a GPU without such rows is left out (the catalog's
    stay) and says so."""
    from fleetsim.calibrate import moe_fit

    t0 = time.perf_counter()
    rows = moe_fit.build_rows(workers, data_dir, fields)
    out, lines = {}, []
    for g in gpus:
        if not any(r.config.gpu_model == g for r in rows):
            lines.append(
                f"{GPUS[g]}: fused-MoE kernel constants: the catalog's (no non-suspect row of a "
                "mixture of experts to fit them to)"
            )
            continue
        gf = moe_fit.fit_gpu(rows, g)
        out[g] = gf
        f = gf.fit
        shown = {
            "k_step_s": f"K step {f.k_step_s * 1e6:.2f} us",
            "k_step_fp8_s": f"fp8 K step {f.k_step_fp8_s * 1e6:.2f} us (tuned)",
            "k_step_fp8_default_s": f"{f.k_step_fp8_default_s * 1e6:.2f} us (default tiles)",
            "layer_s": f"layer {f.layer_s * 1e6:.1f} us",
            "fi_layer_s": f"FlashInfer TRTLLM fp8 layer {f.fi_layer_s * 1e6:.1f} us",
            "fi_bw_frac": f"bandwidth x {f.fi_bw_frac:.3f}",
        }
        lo = (
            "no leave-one-model-out (one model)"
            if gf.lomo is None
            else f"leave-one-model-out {gf.lomo[0]:.1%} / {gf.lomo[1]:.1%}"
        )
        lines.append(
            f"{GPUS[g]}: fused-MoE kernel constants fitted to {gf.rows} MoE rows of "
            f"{len(gf.models)} model(s): "
            + ", ".join(shown[k] for k in gf.keys)
            + f"; median ITL |error| median / worst: as simulated {gf.before[0]:.1%} / "
            f"{gf.before[1]:.1%}, in sample {gf.insample[0]:.1%} / {gf.insample[1]:.1%}, {lo}"
            " (the rest: the catalog's)"
        )
    lines.append(f"(fused-MoE fit: {len(rows)} rows in {time.perf_counter() - t0:.0f} s)")
    return out, lines


def fit_mla_prefill(
    data_dir: Path, gpu_model: str, fields: dict, workers: int = 2
) -> tuple[float | None, dict | None, str]:
    """Latent attention's prefill path in an eager prompt-carrying step
    (``eager_mla_prefill_layer_host_s``, calibrate/mla_prefill.py) fitted to ``data_dir``'s
    non-suspect chat and code rows of latent-attention models on ``gpu_model``, simulated with
    the profile fields ``fields`` (the folder's stack, eager floor and MoE constants) at every
    grid value: ``(value, summary, line)``; ``(None, None, line)`` without such rows (the
    catalog's stays). With one such model there is no leave-one-model-out figure (the
    committed data: DeepSeek-V3.1 only); with more, each model is scored at the value fitted
    to the others."""
    from fleetsim.calibrate import mla_prefill as mp

    configs = mp.mla_configs(gpu_model, data_dir)
    if not configs:
        return (
            None,
            None,
            (
                "latent attention's eager prefill path: the catalog's (no non-suspect chat or code "
                "row of a latent-attention model)"
            ),
        )
    meas = np.array([measured_steps_s(c) for c in configs])
    err = mp.errors(mp.simulate_grid(configs, mp.GRID_S, workers, fields), meas)
    h, _ = mp.best(err, mp.GRID_S)
    models = sorted({c.model_id for c in configs})
    ib = mp.GRID_S.index(h)

    def med(i: int | None, e: np.ndarray = err) -> float:
        x = e[:, 0, :] if i is None else e[:, i, :]
        return float(np.nanmedian(np.abs(x)))

    lomo = None
    if len(models) > 1:
        parts = []
        for m in models:
            keep = np.array([c.model_id != m for c in configs])
            hm, _ = mp.best(err[keep], mp.GRID_S)
            parts.append(err[~keep, mp.GRID_S.index(hm), :])
        lomo = float(np.nanmedian(np.abs(np.concatenate(parts))))
    summary = {
        "provenance": "fitted",
        "rows": len(configs),
        "models": models,
        "value_s": h,
        "without_median": med(None),
        "fitted_median": med(ib),
        "lomo_median": lomo,
    }
    return (
        h,
        summary,
        (
            f"latent attention's eager prefill path fitted to {len(configs)} rows: "
            f"{h * 1e3:.1f} ms per attention layer (mean and median step |error| median "
            f"{med(None):.1%} without, {med(ib):.1%} fitted, "
            + (
                f"{lomo:.1%} leave-one-model-out)"
                if lomo is not None
                else "no leave-one-model-out: one model)"
            )
        ),
    )


def skip_reasons(skipped: Sequence[tuple[Config, str]], top: int = 3) -> str:
    """The ``top`` most frequent reasons of ``skipped`` with their counts, most frequent first."""
    why = Counter(w for _, w in skipped).most_common()
    return "; ".join(f"{n} x {w}" for w, n in why[:top]) + ("; ..." if len(why) > top else "")


def no_rows_message(data_dir: Path, skipped: Sequence[tuple[Config, str]]) -> str:
    """The one line of a folder none of whose rows the simulator expresses: the skip reasons,
    most frequent first, and the fix."""
    if not skipped:
        return (
            f"{data_dir}/configurations.csv: no rows (fix: a header and one row per "
            "configuration, as data/mlenergy-v3/configurations.csv)"
        )
    return (
        f"{data_dir}: no configuration the simulator can express ({len(skipped)} skipped: "
        f"{skip_reasons(skipped)}; fix: {'/'.join(GPUS)} rows of text tasks "
        f"({', '.join(TEXT_TASKS)}) of models with a config in data/models, with their "
        "output-length histograms)"
    )


def write_profiles(
    data_dir: Path, out_dir: Path, workers: int = 2, engine: str = "macro", fit_moe: bool = False
) -> list[str]:
    """``fleetsim calibrate --from-mlenergy DIR --out OUT``: fit, to DIR's expressible
    configurations, the serving stack's constants (calibrate/stack.py), with ``fit_moe`` the
    fused-MoE kernel constants on them (:func:`fit_moe_constants`), the eager MoE host floor on
    both (:func:`fit_eager_floor`), then simulate every configuration with them and fit each
    GPU's power model to its non-suspect rows; write ``OUT/<catalog gpu>-mlenergy.json`` (the
    catalog profile with the fitted power, ``stack_constants`` and ``moe_constants``, usable as
    ``hardware.profile``) and ``OUT/mlenergy-fit.json`` (constants, the rows used, the
    leave-one-model-out errors). Returns the lines to print."""
    import json

    from fleetsim.base.errors import UserError
    from fleetsim.device import catalog
    from fleetsim.device.profile import catalog_profile, profile_to_dict

    configs, skipped = select(read_configs(data_dir))
    if not configs:
        raise UserError(no_rows_message(data_dir, skipped))
    gpus = sorted({c.gpu_model for c in configs})
    # the vllm-v1 stack's constants fitted to the folder (calibrate/stack.py; the parts a
    # folder has no rows for, e.g. TP2 all-reduces or hybrids, keep the catalog's)
    from fleetsim.calibrate import stack as stack_fit

    stacks = stack_fit.fit(stack_fit.load_rows(data_dir), data_dir)
    per_gpu: dict[str, dict] = {}
    for g in gpus:
        sf = stacks.get(GPUS[g])
        consts: dict[str, float] = {}
        stack_line = "serving stack: the catalog's constants (no rows to fit them)"
        if sf:
            consts = {k: float(sf[k]) for k in STACK_KEYS if k in sf}
            stack_line = (
                f"serving stack vllm-v1 fitted to {sf['rows']} rows: overhead "
                f"{consts['overhead_s'] * 1e3:.2f} ms, per sequence "
                f"{consts['per_seq_s'] * 1e6:.1f} us"
                + (
                    f", host stall {consts['host_stall_s'] * 1e3:.2f} ms"
                    if "host_stall_s" in consts
                    else ""
                )
                + (
                    f" (leave-one-model-out ITL median {sf['lomo']['median_abs']:.1%})"
                    if sf["lomo"]
                    else " (one model: no leave-one-model-out figure)"
                )
            )
        per_gpu[g] = {"sf": sf, "consts": consts, "line": stack_line}
    # the fused-MoE constants on the folder's stack (and the catalog's eager floor: the small
    # batches' graph-captured decode steps that set most MoE rows' median ITL do not reach
    # it), then the eager floor on both (a floor fitted first would take up the kernel's
    # error in the eager steps: a round trip with another K step gave 2 ms per MoE layer)
    moe_fits: dict = {}
    moe_lines = [
        "fused-MoE kernel constants: the catalog's (--fit-moe fits them to the folder's MoE rows)"
    ]
    if fit_moe:
        fields0 = {g: folder_profile_fields(GPUS[g], v["consts"], None) for g, v in per_gpu.items()}
        moe_fits, moe_lines = fit_moe_constants(data_dir, gpus, fields0, workers)
    fields: dict[str, dict] = {}
    for g, pg in per_gpu.items():
        moe = moe_fits[g].constants() if g in moe_fits else None
        consts = pg["consts"]
        floor, floor_line = fit_eager_floor(data_dir, g, dict(consts), workers, moe)
        if floor is not None:
            fitted = dict(zip(eager_host.FLOOR_FIELDS, floor.profile_constants, strict=True))
            if floor.adopted and not any(r.mla_layers for r in floor.rows):
                del fitted["eager_mla_layer_host_s"]  # no latent-attention row: the catalog's
            consts.update(fitted)
        pg["floor"] = floor
        pg["line"] += "; " + floor_line
        pg["mla"] = None
        if (
            fit_moe
            and floor is not None
            and floor.adopted
            and any(r.mla_layers for r in floor.rows)
        ):
            # the prefill path of latent attention's eager prompt steps, on that floor
            h, pg["mla"], mla_line = fit_mla_prefill(
                data_dir, g, folder_profile_fields(GPUS[g], consts, moe), workers
            )
            if h is not None:
                consts["eager_mla_prefill_layer_host_s"] = h
            pg["line"] += "; " + mla_line
        # the Mamba-2 hybrids' prefill path (calibrate/mamba_prefill.py), on the folder's stack
        from fleetsim.calibrate import mamba_prefill

        hm, mamba_line = mamba_prefill.fit_folder(
            data_dir, g, folder_profile_fields(GPUS[g], consts, moe), workers
        )
        if hm is not None:
            consts.update(hm)
        pg["line"] += "; " + mamba_line
        fields[g] = folder_profile_fields(GPUS[g], consts, moe)
    # the power model fitted to every configuration simulated with the folder's constants
    runs = simulate_all(configs, workers, engine=engine, fields=fields)
    pairs = [(c, r) for c, r in zip(configs, runs, strict=True) if not r.error]
    fits = fit_all(pairs)
    if not fits:
        n_sus = sum(1 for c, _ in pairs if c.suspect)
        raise UserError(
            f"{data_dir}: no non-suspect row simulated ({len(pairs)} simulated, {n_sus} of them "
            "suspect = true); nothing to fit the power model to (fix: rows with suspect false, "
            "see data/mlenergy-v3/SOURCE.md)"
        )
    rows = evaluate(pairs, fit=True)
    rows_catalog = evaluate(pairs, fit=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"source": str(data_dir), "engine": engine, "gpus": {}}
    lines = list(moe_lines)
    for g, (p, n, models) in fits.items():
        name = GPUS[g]
        # fewer rows than the power model's free constants: the fit is not determined (one
        # row gives any split of the power between the terms); the GPU keeps the catalog's
        k = power_fit_terms(p, any(c.moe_or_ep for c, _ in pairs if c.gpu_model == g))
        few = n < k
        if few:
            p = catalog_power(g)
        # one model (or the catalog's power): no leave-one-model-out figure; the errors are
        # those of the catalog's power model on the rows (evaluate's fallback without others)
        lomo_ok = len(models) > 1 and not few
        lomo = [
            r
            for r in (rows if lomo_ok else rows_catalog)
            if r.config.gpu_model == g and fit_rows(r.config)
        ]
        st = {k: stats(r.err()[k] for r in lomo) for k in ("w_per_gpu", "j_per_token")}
        power = {
            "idle_w": p.idle_w,
            "max_w": p.max_w,
            "active_w": round(p.active_w, 1),
            "compute_w": round(p.compute_w, 1),
            "memory_w": round(p.memory_w, 1),
            "kv_w": round(p.kv_w, 1),
            "comm_w": None if p.comm_w is None else round(p.comm_w, 1),
            "moe_loop_w": None if p.moe_loop_w is None else round(p.moe_loop_w, 1),
            "moe_compute_w": round(p.moe_compute_w, 1),
            "host_w": None if p.host_w is None else round(p.host_w, 1),
            "compute_u0": p.compute_u0,
            "method": "catalog (too few rows to fit)" if few else "mlenergy-fit",
        }
        prof = replace(
            catalog_profile(name, catalog.gpu(name), None),
            name=f"{name}-mlenergy",
            source="fitted",
        )
        d = profile_to_dict(prof, catalog_gpu=name)
        d["power"] = power
        d["fit"] = {"rows": n, "models": models, "lomo": st if lomo_ok else None}
        if not lomo_ok:
            d["fit"]["catalog_power_errors"] = st
        if few:
            d["fit"]["power_kept"] = f"the catalog's: {n} rows, fewer than the fit's {k} constants"
        pg = per_gpu[g]
        sf, consts, floor = pg["sf"], pg["consts"], pg["floor"]
        if sf:
            d["fit"]["stack"] = {"rows": sf["rows"], "models": sf["models"], "lomo": sf["lomo"]}
        if floor is not None:
            d["fit"]["eager_host"] = floor.summary()
        if pg["mla"] is not None:
            d["fit"]["mla_prefill"] = pg["mla"]
        if consts:
            d["stack_constants"] = {"vllm-v1": consts}
        gf = moe_fits.get(g)
        if gf is not None:
            d["moe_constants"] = gf.constants()
            d["fit"]["moe"] = {**gf.summary(), "source": str(data_dir)}
        path = out_dir / f"{name}-mlenergy.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(path)
        summary["gpus"][name] = {
            "power": power,
            "rows": n,
            "models": models,
            "lomo": st if lomo_ok else None,
        }
        if floor is not None:
            summary["gpus"][name]["eager_host"] = d["fit"]["eager_host"]
        if gf is not None:
            summary["gpus"][name]["moe"] = d["fit"]["moe"]
        how = (
            f"leave-one-model-out W/GPU median {st['w_per_gpu']['median']:.1%}, J/token median "
            f"{st['j_per_token']['median']:.1%}"
            if lomo_ok
            else "no leave-one-model-out figure (one model); the catalog's power model on these "
            f"rows: W/GPU median {st['w_per_gpu']['median']:.1%}, J/token median "
            f"{st['j_per_token']['median']:.1%}"
        )
        if few:
            lines.append(
                f"{name}: {n} non-suspect rows, fewer than the power model's {k} constants: the "
                f"catalog's power model kept, not fitted (fix: at least {k} rows, e.g. more batch "
                f"sizes or models); {how}; {pg['line']}; wrote {path}"
            )
            continue
        lines.append(
            f"{name}: {n} rows of {len(models)} model(s): idle {p.idle_w:g} W (kept), active "
            f"{p.active_w:.0f} W, compute {p.compute_w:.0f} W, memory {p.memory_w:.0f} W, KV/state "
            f"{p.kv_w:.0f} W, "
            + ("" if p.comm_w is None else f"communication level {p.comm_w:.0f} W, ")
            + ("" if p.moe_loop_w is None else f"fp8 MoE-loop level {p.moe_loop_w:.0f} W, ")
            + (f"routed-expert compute {p.moe_compute_w:.0f} W, " if p.moe_compute_w else "")
            + ("" if p.host_w is None else f"host-wait level {p.host_w:.0f} W, ")
            + f"cap {p.max_w:g} W; {how}; {pg['line']}; wrote {path}"
        )
    fit_path = out_dir / "mlenergy-fit.json"
    fit_path.write_text(json.dumps(summary, indent=1))
    lines.append(
        f"wrote {fit_path} ({len(pairs)} configurations simulated, {len(skipped)} skipped"
        + (f": {skip_reasons(skipped)})" if skipped else ")")
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fleetsim.calibrate.mlenergy",
        description="fleetsim against the ML.ENERGY Benchmark v3 (data/mlenergy-v3)",
    )
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="a folder in that format")
    ap.add_argument("--quick", action="store_true", help="a reduced subset (12 configurations)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--catalog", action="store_true", help="the catalog's power model, no fit")
    ap.add_argument(
        "--engine",
        choices=("iteration", "macro"),
        default="iteration",
        help="iteration: every engine step simulated (exact ITL); macro: faster",
    )
    ap.add_argument("--rows", action="store_true", help="print every configuration's errors")
    ap.add_argument(
        "--beyond",
        action="store_true",
        help="print every configuration's time beyond the median step, measured and simulated, "
        "and the simulated prompt-carrying steps (docs/accuracy-log.md)",
    )
    ap.add_argument(
        "--sweeps",
        action="store_true",
        help="print, per GPU, each sweep's (model, task, parallelism) median W and J/token "
        "error and the median error left within the sweeps (docs/accuracy-log.md, 'The W and "
        "J medians by task')",
    )
    ap.add_argument(
        "--tails",
        action="store_true",
        help="print every configuration's median, p90 and p99 ITL, measured and simulated",
    )
    ap.add_argument(
        "--power-variants",
        action="store_true",
        help="also compare the power-fit variants (anchor weight, loss, dense or all rows; "
        "several minutes)",
    )
    ap.add_argument(
        "--prompts",
        choices=PROMPT_SHAPES,
        default=HARNESS_PROMPTS,
        help="prompt lengths: constant (the task's mean, every request), azure (the default: "
        "chat prompts drawn from the Azure LLM inference trace 2023's conversation service, "
        "rescaled to that mean; docs/accuracy-log.md, 'ITL tails') or azure-code (also fim's, "
        "from its code service)",
    )
    ap.add_argument(
        "--dp-publish",
        action="store_true",
        help="time the data-parallel rows' inter-token gaps as vLLM 0.11.1 publishes the tokens "
        "(a step's tokens after the next step's host launch; docs/accuracy-log.md, 'Two long steps "
        "per prompt'; not the default)",
    )
    ap.add_argument("--gpu", help="only this GPU's rows, e.g. B200 or b200 (the fit stays per GPU)")
    ap.add_argument(
        "--kind",
        choices=("all", "dense", "moe"),
        default="all",
        help="dense or MoE/expert-parallel rows only (the power fit, leave-one-model-out, "
        "then sees only those rows)",
    )
    ap.add_argument(
        "--compute-u0",
        help="the saturation of the compute terms (PowerSpec.compute_u0) the leave-one-model-out "
        "fits choose from, comma-separated, 'none' for linear, e.g. none,0.05,0.1,0.2,0.35,0.6,"
        "1,2 (one value: fixed); default: the catalog's",
    )
    ap.add_argument(
        "--chat-prompt-mean",
        type=int,
        help="the lm-arena-chat prompts' mean in tokens in place of PROMPT_TOKENS' (the "
        "prompts, the prefill anchor of the power fit and the host stall's fitting rows; "
        "docs/accuracy-log.md, 'The chat prompt mean'; not the default)",
    )
    ap.add_argument(
        "--chat-turns-mean",
        type=float,
        help="with --prompts azure-conv: the mean turns per conversation in place of "
        "CHAT_TURNS_MEAN's (docs/accuracy-log.md, 'Conversation histories share their prefix')",
    )
    ap.add_argument(
        "--implied-prompt",
        action="store_true",
        help="only solve, per KV-limited row, the prompt mean at which the simulated window "
        "batch equals the measured one (implied_prompt_mean; a few simulations a row)",
    )
    a = ap.parse_args(argv)
    ptok = None
    if a.chat_prompt_mean:
        # module-wide, so that the host stall's fitting rows (stack.load_runs) and the closed
        # form see it too; passed to the workers explicitly as well
        PROMPT_TOKENS["lm-arena-chat"] = int(a.chat_prompt_mean)
        ptok = {"lm-arena-chat": int(a.chat_prompt_mean)}
    global FIT_U0_GRID, CHAT_TURNS_MEAN
    if a.chat_turns_mean:
        # module-wide: the pool's workers (_pool) and the host stall's fitting rows read it
        CHAT_TURNS_MEAN = float(a.chat_turns_mean)
    if a.compute_u0:
        FIT_U0_GRID = tuple(
            None if v.strip().lower() == "none" else float(v) for v in a.compute_u0.split(",")
        )
    if a.workers < 1:
        print(f"{ap.prog}: error: --workers {a.workers}: must be at least 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    configs, skipped = select(read_configs(a.data), a.quick)
    if a.gpu:
        want = gpu_names.benchmark_name(a.gpu).upper()  # any spelling (calibrate/gpu_names.py)
        have = sorted({c.gpu_model for c in configs})
        if want not in {g.upper() for g in have}:
            # (a misspelt GPU simulated nothing and printed an empty table)
            print(
                f"{ap.prog}: error: --gpu {a.gpu}: no simulated row of that GPU in {a.data} "
                f"(fix: one of {', '.join(have) or 'none'})",
                file=sys.stderr,
            )
            return 2
        configs = [c for c in configs if c.gpu_model.upper() == want]
    if a.kind != "all":
        configs = [c for c in configs if c.moe_or_ep == (a.kind == "moe")]
    if a.prompts == "azure-conv":
        # the host stall's fitting rows (stack.load_runs) at the conversations' held contexts
        from fleetsim.calibrate import stack

        stack.CHAT_TURNS_MEAN = CHAT_TURNS_MEAN
    # the host stall per step, fitted without each row's model (the catalog's is the fit to all)
    stalls = lomo_host_stalls(a.data, configs)
    if a.implied_prompt:
        res = implied_prompt_means(configs, a.workers, a.engine, a.prompts, stalls)
        conv = CHAT_TURNS_MEAN if a.prompts == "azure-conv" else None
        print("\n".join(implied_mean_lines(res, conv)))
        print(f"({len(res)} rows solved in {time.perf_counter() - t0:.1f} s; prompts {a.prompts})")
        return 0
    runs = simulate_all(
        configs,
        a.workers,
        engine=a.engine,
        stalls=stalls,
        prompts=a.prompts,
        dp_publish=a.dp_publish,
        prompt_tokens=ptok,
    )
    pairs = []
    for c, r in zip(configs, runs, strict=True):
        if r.error:
            skipped.append((c, f"simulation: {r.error}"))
        else:
            pairs.append((c, r))
    rows = evaluate(pairs, fit=not a.catalog)
    if a.rows:
        for row in rows:
            e = row.err()
            print(
                f"{row.config.key:70} "
                + " ".join(f"{k}={100 * e[k]:+6.1f}%" for k in METRICS)
                + (" suspect" if row.config.suspect else "")
            )
    if a.beyond:
        print("\n".join(split_lines(pairs)))
    if a.tails:
        print("\n".join(tail_lines(rows)))
    if a.sweeps:
        print("\n".join(sweep_lines(rows)))
    print("\n".join(report(rows, skipped, not a.catalog)))
    if FIT_U0_GRID and not a.catalog:
        chosen = Counter(p.compute_u0 for p in _FITS.values())
        print(
            "compute_u0 chosen by the leave-one-model-out fits (value: fits): "
            + ", ".join(f"{k}: {n}" for k, n in sorted(chosen.items(), key=lambda kv: kv[0] or 0))
        )
    if a.power_variants:
        print("\n".join(power_variants(pairs)))
    imp = implied_prompts(configs)
    if imp:
        print(
            "Prompt tokens implied by the KV-limited rows (simulator's KV budget; assumed "
            + ", ".join(f"{t} {n}" for t, n in PROMPT_TOKENS.items())
            + "):"
        )
        for c, p in imp:
            print(f"  {c.key:70} {p:8.0f}")
    print(
        f"({len(pairs)} configurations simulated in {time.perf_counter() - t0:.1f} s;"
        f" prompts {a.prompts})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
