"""The serving stack a step-time profile represents.

fleetsim's kernel model (:mod:`fleetsim.device.kernels`) is fitted to Vidur's operator times,
which were taken *eagerly*: every kernel launched one by one from Python, with a fixed
per-iteration CPU time on top (``overhead_s``). That is the ``eager`` stack, kept as it was so
that the comparisons against Vidur (``tests/test_vidur_fit.py``, docs/validation.md) still hold.

vLLM 0.11 (V1 engine, the ML.ENERGY v3 benchmark's engine) runs differently:

* **CUDA graphs.** Decode batches (and the non-attention part of mixed batches) of up to
  ``max_cudagraph_capture_size`` tokens replay a captured graph; vLLM's default capture list
  is ``[1, 2, 4] + range(8, 256, 8) + range(256, max + 1, 16)`` with
  ``max = min(2 x max_num_seqs, 512)`` (vllm/config/vllm.py, ``_set_cudagraph_sizes``; the
  design note docs/design/cuda_graphs.md). A replay drops the launch path that dominates the
  kernel model's per-kernel floors (the GEMM ``launch``, the elementwise ``fixed`` times, the
  all-reduce's latency floor): an iteration of at most ``graph_max_tokens`` tokens keeps only
  ``graph_floor_frac`` of them.
* **Asynchronous scheduling** (``async-scheduling: true`` in the benchmark's server
  configuration, data/mlenergy-v3/SOURCE.md): the scheduler prepares step i+1 while the GPU runs
  step i, so the CPU time per iteration is hidden except for a residual ``overhead_s`` (the
  sampler's synchronisation and the input copy).

Both constants are fitted per GPU to the ML.ENERGY rows' median inter-token latency
(``python -m fleetsim.calibrate.stack``; the values, their provenance and their errors are in
``catalog/stacks.toml``). Iterations of more tokens than the capture size run as in ``eager``
apart from the overhead (their kernels are long enough for the CPU to launch ahead of them).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fleetsim.base.errors import ScenarioError
from fleetsim.device.latency import Profile, RooflineProfile

StackName = Literal["vllm-v1", "eager"]
STACKS: tuple[str, ...] = ("vllm-v1", "eager")
DEFAULT_STACK: StackName = "vllm-v1"
#: vLLM's largest captured batch by default (CompilationConfig.max_cudagraph_capture_size)
MAX_CAPTURE_TOKENS = 512


def capture_max_tokens(max_num_seqs: int) -> int:
    """vLLM's largest CUDA-graph capture size for ``max_num_seqs``: min(2 x seqs, 512)."""
    return min(2 * max_num_seqs, MAX_CAPTURE_TOKENS)


def stack_constants(stack: str, gpu: str) -> dict | None:
    """The catalog's constants of ``stack`` on catalog GPU ``gpu`` (``catalog/stacks.toml``),
    or None when the stack has none (``eager``: the profile as it is)."""
    from fleetsim.device import catalog

    if stack == "eager":
        return None
    table = catalog.stacks().get(stack)
    if table is None:
        raise ScenarioError("fleet.serving_stack", stack, "unknown serving stack", _fix())
    entry = table.get(gpu)
    if entry is None:
        raise ScenarioError(
            "fleet.serving_stack",
            stack,
            f"has no constants for GPU {gpu!r} in the catalog (catalog/stacks.toml)",
            'use serving_stack = "eager" or a GPU with constants: ' + ", ".join(sorted(table)),
        )
    return dict(entry)


def _fix() -> str:
    return "use one of: " + ", ".join(repr(s) for s in STACKS)


def apply_stack(profile: Profile, stack: str, gpu: str, max_num_seqs: int) -> Profile:
    """``profile`` (a catalog GPU's analytic profile) as ``stack`` runs it on ``gpu`` with a
    batch limit of ``max_num_seqs``. ``eager`` and linear profiles come back unchanged."""
    if stack not in STACKS:
        raise ScenarioError("fleet.serving_stack", stack, "unknown serving stack", _fix())
    c = stack_constants(stack, gpu)
    if c is None or not isinstance(profile, RooflineProfile):
        return profile
    return dataclasses.replace(
        profile,
        name=f"{profile.name}+{stack}",
        serving_stack=stack,
        overhead_s=float(c["overhead_s"]),
        overhead_per_layer_s=0.0,
        graph_max_tokens=capture_max_tokens(max_num_seqs),
        graph_floor_frac=float(c["graph_floor_frac"]),
        per_seq_s=float(c["per_seq_s"]),
        memory_eff=float(c["kv_memory_eff"]),
    )
