"""Resolving an aggregated fleet (one pool of identical replicas, ``[fleet]`` on
``[hardware]``): the model's architecture (catalog, inline fields or a Hugging Face
config.json), the GPU and its step-time profile, and the cross-field checks, in the order a
reader would follow them: the weights fit, the KV budget holds a maximum-length request, the
longest prompt can be scheduled, the prefix blocks are whole KV blocks, the hourly rates are
finite, the work budget (config/budget.py) and the autoscaler (config/schedules.py).

:func:`fleetsim.config.resolve.resolve` calls it for an aggregated scenario, and
:mod:`fleetsim.config.pools` once per pool of a disaggregated one.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetsim.base.errors import ScenarioError
from fleetsim.base.units import DAY_S, rotate_to_start
from fleetsim.config.budget import check_work
from fleetsim.config.resolved import GpuSpec, KvBudget, Resolved, kv_budget
from fleetsim.config.schedules import check_autoscaler, diurnal_weights
from fleetsim.config.schema import ModelSection, Scenario, TrafficSection
from fleetsim.device import catalog
from fleetsim.device.latency import POWER_TERMS_W, LatencyModel, PowerSpec, Profile
from fleetsim.device.modelspec import ModelSpec, model_from_catalog
from fleetsim.device.moe import layout_problem, replica_weight_bytes
from fleetsim.workload.distributions import Empirical

if TYPE_CHECKING:
    import numpy as np


def _longest_field(tr: TrafficSection, trace_max: dict[str, int]) -> tuple[str, Any]:
    """The field that sets the longest requests (the larger of the prompt and output maxima),
    for error messages: (path, value)."""
    if tr.trace:
        return "traffic.trace", tr.trace
    longer_output = tr.output.max_tokens(trace_max) > tr.prompt.max_tokens(trace_max)
    which = "output" if longer_output else "prompt"
    d = getattr(tr, which)
    return f"traffic.{which}.{d.max_field}", getattr(d, d.max_field)


#: the [model] fields an architecture without a catalog entry or a config.json must give
REQUIRED_INLINE = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")


def checkout_config(m: ModelSection) -> Path | None:
    """The checkout's ``data/models/ORG/NAME/config.json`` that ``[model] name = "ORG/NAME"``
    (a Hugging Face id; ``latency --model ORG/NAME``) reads, never a download; None when the
    section gives a config, names a catalog model, gives every field inline, or the checkout
    has no copy. A catalog name is looked up first and keeps meaning the catalog entry: a
    scenario that worked keeps its model (no catalog name has an "/" today, and each entry
    with an ``hf_id`` is tested equal to its file, tests/test_hf_config.py)."""
    if m.config is not None or catalog.has_model(m.name):
        return None
    if all(getattr(m, k, None) is not None for k in REQUIRED_INLINE):
        return None
    from fleetsim.config.hf import repo_config_path

    return repo_config_path(m.name)


def model_source_note(m: ModelSection, src: str, model: ModelSpec) -> str:
    """The summaries' words on what the architecture was read from, "" when there is nothing
    to say: ``config: data/models/ORG/NAME/config.json`` for a Hugging Face id read from the
    checkout's copy (:func:`checkout_config`), and for GPTQ / AWQ 8-bit weights the
    approximation that times them at the int8 peak (``hf.int8_weight_only``)."""
    from fleetsim.config.hf import config_in_folder, int8_weight_only, repo_relative

    notes = []
    path = checkout_config(m)
    if path is not None:
        notes.append(f"config: {repo_relative(path)}")
    elif m.config is not None and m.config.strip():
        from fleetsim.workload.sampling import _resolve_path  # (numpy: only for a config)

        path = _resolve_path(os.path.expanduser(m.config), src)
        path = config_in_folder(path) if path.is_dir() else path
    if path is not None and model.dtype == "int8" and int8_weight_only(path):
        notes.append(
            "GPTQ/AWQ int8 weights timed at the int8 peak, though vLLM runs them weight-only "
            "(16-bit GEMMs): compute-bound steps read fast (docs/model.md)"
        )
    return "; ".join(notes)


#: the fields that tell two architectures apart (a name that means one model, a config another)
_SHAPE = ("n_layers", "d_model", "n_heads", "n_experts", "vocab_size")


def _check_name_matches_config(m: ModelSection, arch: dict, config: str, src: str) -> None:
    """``[model] name`` is only a label when ``config`` is given; but a name that itself means
    an architecture (a catalog model, or a Hugging Face id this checkout holds) and a config of
    another shape is a mistake (a scenario switched to a config with the old name left in,
    or the reverse): the summaries and errors would call the config's model by the other's
    name ("Qwen/Qwen3-30B-A3B-Instruct-2507 is not a mixture of experts")."""
    from fleetsim.config.hf import read_hf_config, repo_config_path

    swap = ""  # (a checkout id: its file is what --set can point model.config at)
    if catalog.has_model(m.name):
        other, what = asdict(model_from_catalog(m.name, m.dtype)), "the catalog model"
    elif (local := repo_config_path(m.name)) is not None:
        other, what = read_hf_config(local), f"this checkout's {local.parent.name} config"
        folder = os.path.relpath(local.parent, Path(src).parent) if src else str(local.parent)
        swap = f"; to simulate {m.name}: --set 'model.config=\"{folder}\"' reads its file"
    else:
        return
    differ = [k for k in _SHAPE if other.get(k, 1) != arch.get(k, 1)]
    if differ:
        k = differ[0]
        raise ScenarioError(
            "model.name",
            m.name,
            f"names {what} ({k} = {other.get(k, 1)}), but model.config = {config!r} reads "
            f"another architecture ({k} = {arch.get(k, 1)}); the name would only label it",
            "drop [model] name (the config names the model) or model.config, or give a name "
            f"that is not a catalog model{swap}",
            src,
        )


def model_spec(sc: Scenario, src: str) -> ModelSpec:
    m = sc.model
    inline = {
        k: v
        for k, v in m.model_dump().items()
        if k not in ("name", "dtype", "kv_dtype", "config") and v is not None
    }
    required = REQUIRED_INLINE
    local = checkout_config(m)
    config = str(local) if local is not None else m.config
    if config is not None:  # a Hugging Face config.json; inline fields override it
        from fleetsim.config.hf import read_hf_config_named
        from fleetsim.workload.sampling import _resolve_path

        if not config.strip():  # ("" resolved to the scenario's own folder)
            raise ScenarioError(
                "model.config",
                config,
                "is empty",
                "give the path of the model's config.json (or its folder), or leave the key out",
                src,
            )
        # (~: the Hugging Face cache's default home, ~/.cache/huggingface/hub)
        path = _resolve_path(os.path.expanduser(config), src)
        given = "dtype" in m.model_fields_set
        arch, file_name = read_hf_config_named(path, src, config, dtype_given=given)
        file_dtype = arch.pop("dtype", None)
        dtype = m.dtype if given or file_dtype is None else file_dtype
        name = m.name if "name" in m.model_fields_set else file_name
        if "name" in m.model_fields_set:
            _check_name_matches_config(m, arch, config, src)
        spec = ModelSpec(name=name, dtype=dtype, kv_dtype=m.kv_dtype, **{**arch, **inline})
    elif catalog.has_model(m.name):
        spec = model_from_catalog(m.name, m.dtype)
        if inline or m.kv_dtype:
            spec = spec.evolve(**inline, kv_dtype=m.kv_dtype)
    else:
        missing = [k for k in required if k not in inline]
        if missing:
            from fleetsim.config.hf import closest_model, hf_id_error

            err = hf_id_error(m.name, "model.name", src)
            if err is not None:
                raise err
            # (today's models are the Hugging Face ids of data/models, not catalog names)
            close = closest_model(m.name, catalog.models())
            hint = f"did you mean {close!r}? " if close else ""
            raise ScenarioError(
                "model.name",
                m.name,
                "not in the catalog and no inline architecture",
                f"{hint}catalog: {', '.join(catalog.models())}; or a Hugging Face id of "
                "data/models (ORG/NAME, e.g. deepseek-ai/DeepSeek-R1-0528); or give "
                f"{', '.join(missing)}",
                src,
            )
        spec = ModelSpec(name=m.name, dtype=m.dtype, kv_dtype=m.kv_dtype, **inline)
    # d_model must divide by n_heads only where head_dim is derived from it (Qwen3, Gemma 3
    # and gpt-oss give their own); latent attention has no KV-head groups
    uneven = "head_dim" in spec.derived and not spec.is_mla and spec.d_model % spec.n_heads
    if uneven or (not spec.is_mla and spec.n_heads % spec.n_kv_heads):
        raise ScenarioError(
            "model.n_heads",
            spec.n_heads,
            "d_model must divide by n_heads (or give head_dim) and n_heads by n_kv_heads",
            "check the architecture",
            src,
        )
    if spec.n_active_experts > spec.n_experts:
        raise ScenarioError(
            "model.n_active_experts",
            spec.n_active_experts,
            f"more than n_experts ({spec.n_experts})",
            "lower it",
            src,
        )
    for field, value, problem in spec.problems():
        raise ScenarioError(f"model.{field}", value, problem, "check the architecture", src)
    return spec


def _check_prefix_blocks(sc: Scenario, model: ModelSpec, src: str) -> None:
    """Sessions and Mooncake traces name prompt blocks that must be whole KV blocks."""
    tr = sc.traffic
    b = sc.fleet.block_size_tokens
    ses = tr.sessions
    if ses is not None:
        if ses.system_prompt_tokens >= model.max_context_tokens:
            raise ScenarioError(
                "traffic.sessions.system_prompt_tokens",
                ses.system_prompt_tokens,
                f"not shorter than {model.name}'s context of {model.max_context_tokens} tokens",
                "shorten the system prompt",
                src,
            )
        if ses.block_tokens % b:
            raise ScenarioError(
                "traffic.sessions.block_tokens",
                ses.block_tokens,
                f"not a multiple of fleet.block_size_tokens ({b})",
                f"use a multiple of {b}",
                src,
            )
    if tr.trace and tr.trace.endswith(".jsonl") and tr.trace_block_tokens % b:
        raise ScenarioError(
            "traffic.trace_block_tokens",
            tr.trace_block_tokens,
            f"not a multiple of fleet.block_size_tokens ({b})",
            f"use a multiple of {b}",
            src,
        )


def resolve_aggregated(sc: Scenario, source: str = "") -> Resolved:
    """Join the scenario with the catalogs and profile, and run the cross-field checks, in the
    order a reader would: the GPU and its profile, the weights, the KV budget, the requests'
    sizes, the prefix blocks, the hourly rates, the work budget and the autoscaler."""
    src = source
    model = model_spec(sc, src)
    check_fp8_moe_kernel(sc.fleet.fp8_moe_kernel, model, "fleet.fp8_moe_kernel", src)
    gpu, profile, profile_id, sha = _resolve_gpu(sc, src)
    tp = sc.fleet.tensor_parallel * sc.fleet.data_parallel  # GPUs per replica
    _check_weights_fit(sc, model, profile, src)
    _check_dp_scheduler(sc, src)
    kvb = _checked_kv_budget(sc, model, profile, src)
    kv_tokens = kvb.tokens
    tr = sc.traffic
    max_req, trace_t = _check_request_sizes(sc, model, kvb.request_tokens, src)
    _check_prefix_blocks(sc, model, src)
    rates = _hourly_rates(tr, src)
    f = sc.fleet
    lat = (
        LatencyModel(model, profile, tp)
        if f.data_parallel == 1 and not f.expert_parallel
        else LatencyModel(model, profile, f.tensor_parallel, f.data_parallel, f.expert_parallel)
    )
    check_work(sc, rates, lat, src, trace_t)

    # Every 24-value profile is given by UTC hour of day. The engine indexes by simulation hour
    # (h % 24), so rotate them to start at the scenario's starting hour.
    hod0 = sc.simulation.start_utc.hour
    sched = check_autoscaler(sc, src)
    return Resolved(
        scenario=sc,
        model=model,
        gpu=gpu,
        profile=profile,
        profile_id=profile_id,
        profile_sha256=sha,
        tp=tp,
        kv_capacity_tokens=kv_tokens,
        max_request_tokens=max_req,
        hourly_rate_per_s=rotate_to_start(rates, hod0),
        replicas_by_hour=None if sched is None else rotate_to_start(sched, hod0),
        kv=kvb,
        dp=f.data_parallel,
        expert_parallel=f.expert_parallel,
    )


def _resolve_gpu(sc: Scenario, src: str) -> tuple[GpuSpec, Profile, str, str]:
    """The GPU (catalog entry plus overrides, power checked) and its step-time profile: the
    scenario's measured profile file or the catalog's analytic one; (gpu, profile, id, sha256)."""
    from fleetsim.device.analytic import catalog_profile

    hw = sc.hardware
    try:
        entry = catalog.gpu(hw.gpu)
    except ScenarioError as exc:
        raise ScenarioError(exc.field, exc.value, exc.problem, exc.fix, src) from None
    over = {
        k: v for k, v in hw.model_dump().items() if k not in ("gpu", "profile") and v is not None
    }
    entry.update(over)
    set_here = [k for k in ("tdp_w", "idle_w", *POWER_TERMS_W, "compute_u0") if k in over]
    power = PowerSpec(
        idle_w=entry["idle_w"],
        max_w=entry["tdp_w"],
        active_w=entry["active_w"],
        compute_w=entry["compute_w"],
        memory_w=entry["memory_w"],
        kv_w=entry.get("kv_w", 0.0),
        comm_w=entry.get("comm_w"),
        moe_loop_w=entry.get("moe_loop_w"),
        moe_compute_w=entry.get("moe_compute_w", 0.0),
        host_w=entry.get("host_w"),
        compute_u0=entry.get("compute_u0"),
        # the catalog's tag (fitted / derived, gpus.toml), or what the scenario changed
        confidence=(
            f"set by the scenario (hardware.{', hardware.'.join(set_here)})"
            if set_here
            else entry.get("power_confidence", "")
        ),
    )
    from fleetsim.device.analytic import power_problem

    bad = power_problem(power)  # idle <= TDP, busy <= MAX_BUSY_OVER_TDP x TDP (device/analytic.py)
    if bad is not None:
        fld = {"max_w": "tdp_w"}.get(bad[0], bad[0])
        raise ScenarioError(
            f"hardware.{fld}",
            bad[1],
            bad[2],
            "check the hardware power fields (watts per GPU) against the GPU's TDP",
            src,
        )
    if hw.node_idle_w is not None and hw.node_idle_w > entry["node_overhead_w"]:
        raise ScenarioError(
            "hardware.node_idle_w",
            hw.node_idle_w,
            f"is above the host's serving draw node_overhead_w = {entry['node_overhead_w']:g} W",
            "set node_idle_w <= node_overhead_w (watts per node: idle host <= serving host)",
            src,
        )
    sha = ""
    if hw.profile:
        ppath = Path(hw.profile)
        if not ppath.is_absolute() and src:
            cand = Path(src).parent / ppath
            ppath = cand if cand.exists() or not ppath.exists() else ppath
        ppath = Path(os.path.abspath(ppath))  # errors show where the file was looked for
        from fleetsim.device.profile import load_profile  # (pydantic's profile-file models)

        profile, sha = load_profile(ppath)
        consts = (profile.meta.get("stack_constants") or {}).get(sc.fleet.serving_stack)
        if consts:  # (calibrate --from-mlenergy): the profile as the scenario's stack runs it
            from fleetsim.device.stack import apply_stack

            profile = apply_stack(
                profile,
                sc.fleet.serving_stack,
                hw.gpu,
                -(-sc.fleet.max_batch_size // sc.fleet.data_parallel),
                constants=consts,
            )
        cat_gpu = profile.meta.get("catalog_gpu")
        if cat_gpu and cat_gpu != hw.gpu:
            raise ScenarioError(
                "hardware.profile",
                hw.profile,
                f"was measured on {cat_gpu!r} but hardware.gpu is {hw.gpu!r}",
                f"set hardware.gpu = {cat_gpu!r} or use a profile of {hw.gpu}",
                src,
            )
        if profile.power is not None:
            power = profile.power
            if not power.confidence:
                power = replace(power, confidence=f"from {ppath.name}")
        profile_id = f"{profile.name} ({ppath.name})"
    else:
        from fleetsim.device.stack import apply_stack

        # the catalog's step times as the scenario's serving stack runs them (device/stack.py);
        # its CUDA graphs are captured per engine, for an engine's share of the batch
        profile = apply_stack(
            catalog_profile(hw.gpu, entry, power),
            sc.fleet.serving_stack,
            hw.gpu,
            -(-sc.fleet.max_batch_size // sc.fleet.data_parallel),
        )
        profile_id = profile.name
    if sc.fleet.fp8_moe_kernel != "triton":
        profile = _with_fp8_moe_kernel(profile, sc.fleet.fp8_moe_kernel, hw.gpu, src)
    gpu = GpuSpec(
        name=hw.gpu,
        tdp_w=entry["tdp_w"],
        idle_w=power.idle_w,
        node_overhead_w=entry["node_overhead_w"],
        # a node_overhead_w override below the catalog's idle level lowers that too
        node_idle_w=min(entry["node_idle_w"], entry["node_overhead_w"]),
        gpus_per_node=entry["gpus_per_node"],
        capex_usd=entry["capex_usd"],
        rent_usd_per_gpu_hour=entry["rent_usd_per_gpu_hour"],
        power=power,
    )

    return gpu, profile, profile_id, sha


def check_fp8_moe_kernel(kernel: str, model: ModelSpec, field: str, src: str) -> None:
    """A kernel other than Triton's is a kernel of fp8 block-quantised experts (FlashInfer's
    ``trtllm_fp8_block_scale_moe``: vLLM 0.11 ``get_fp8_moe_backend`` picks it for
    ``Fp8MoEMethod`` with ``block_quant``) or of nvfp4 experts (its FP4 sibling
    ``trtllm_fp4_block_scale_moe``, ``ModelOptNvFp4FusedMoE`` with
    ``VLLM_USE_FLASHINFER_MOE_FP4=1``); the latency model applies it to nothing else, so on
    any other model the setting was ignored without a word."""
    if kernel == "triton":
        return
    e_dt = model.expert_dtype or model.dtype
    if model.n_moe_layers and (e_dt == "nvfp4" or (e_dt == "fp8" and model.fp8_block)):
        return
    what = (
        "is not a mixture of experts"
        if not model.n_moe_layers
        else f"has {e_dt} experts"
        if e_dt != "fp8"
        else "has fp8 experts scaled per tensor or channel, not in 128 x 128 blocks"
    )
    raise ScenarioError(
        field,
        kernel,
        f"is the kernel of fp8 block-quantised or nvfp4 experts, and {model.name} {what}",
        "leave it at triton (the default), or use a model with fp8 block-quantised or nvfp4 "
        "experts (e.g. deepseek-ai/DeepSeek-V3.1, nvidia/DeepSeek-R1-0528-FP4)",
        src,
    )


def _with_fp8_moe_kernel(
    profile: Profile, kernel: str, gpu: str, src: str, flags: bool = False
) -> Profile:
    """The profile with ``fleet.fp8_moe_kernel`` set (the fused-MoE kernel of fp8
    block-quantised experts, fleetsim.device.moe.FP8_MOE_KERNELS). FlashInfer's TensorRT-LLM
    kernel needs its constants in catalog/moe.toml for the profile's GPU (fitted on the B200:
    vLLM runs it on Blackwell only, ``get_flashinfer_moe_backend`` in vllm/model_executor/
    layers/quantization/utils/flashinfer_utils.py: "latency" is CUTLASS below SM100).
    ``flags``: the refusal names ``fleetsim latency``'s options (``--fp8-moe-kernel``,
    ``--gpu``), not the scenario's fields."""
    from fleetsim.device.latency import RooflineProfile

    if not isinstance(profile, RooflineProfile):
        return profile
    fit = profile.fused_moe_fit(gpu)  # a profile file's moe_constants, else the catalog's
    if fit.fi_bw_frac <= 0.0 and fit.fi_layer_s <= 0.0:
        have = sorted(k for k, e in catalog.moe().items() if float(e.get("fi_bw_frac", 0.0)) > 0)
        gpus = ", ".join(have)
        fix = (
            f"drop --fp8-moe-kernel (triton, the default) or use --gpu {gpus}"
            if flags
            else f'set fleet.fp8_moe_kernel = "triton" or use a GPU with them: {gpus}'
        )
        raise ScenarioError(
            "--fp8-moe-kernel" if flags else "fleet.fp8_moe_kernel",
            kernel,
            f"has no fitted constants for {'--gpu' if flags else 'hardware.gpu'} = {gpu!r} "
            "(vLLM runs FlashInfer's TensorRT-LLM fp8 MoE kernel on Blackwell only)",
            fix,
            src,
        )
    return replace(profile, fp8_moe_kernel=kernel)


def _check_weights_fit(sc: Scenario, model: ModelSpec, profile: Profile, src: str) -> None:
    """vLLM's tensor-parallel rule, and the weights fit in a replica's usable memory."""
    tp = sc.fleet.tensor_parallel
    tp_problem = model.tp_problem(tp)
    if tp_problem:
        raise ScenarioError("fleet.tensor_parallel", tp, tp_problem, model.tp_fix(tp), src)
    dp, ep = sc.fleet.data_parallel, sc.fleet.expert_parallel
    # (a plain TP split too, as fleetsim latency checks it: an expert width, or an fp8
    # expert's 128-column blocks, that does not divide over the GPUs)
    split = layout_problem(model, tp, dp, ep)
    if split:
        raise ScenarioError(f"fleet.{split[0]}", split[1], split[2], split[3], src)
    if dp > 1 or ep:
        _check_dp_weights_fit(sc, model, profile, src)
        return
    usable = tp * profile.mem_bytes * sc.fleet.gpu_memory_utilization
    need = replica_weight_bytes(model, 1, tp)  # the rank-replicated parts once per GPU
    if need >= usable:
        per_gpu = profile.mem_bytes * sc.fleet.gpu_memory_utilization
        # the smallest degree that holds the weights and that vLLM accepts (ModelSpec.tp_problem:
        # it divides the query heads, and divides or is a multiple of the KV heads; a degree
        # that divides the query heads alone, 20 for Llama 4 Maverick's 40 / 8, was suggested
        # and then refused)
        fits = [
            k
            for k in range(tp + 1, 65)
            if layout_problem(model, k, 1, False) is None
            and replica_weight_bytes(model, 1, k) < k * per_gpu
        ]
        # a mixture of experts: also the fewest data-parallel engines of this degree whose
        # expert-parallel replica holds the weights (the experts once, the rest per engine)
        eps = [
            d
            for d in range(2, 65)
            if model.n_moe_layers
            and layout_problem(model, tp, d, True) is None
            and replica_weight_bytes(model, d, tp) < tp * d * per_gpu
        ]
        ep_fix = (
            f"; or set fleet.data_parallel = {eps[0]} with fleet.expert_parallel = true (the "
            f"experts spread over {tp} x {eps[0]} GPUs)"
            if eps
            else ""
        )
        tp_fix = (
            f"set fleet.tensor_parallel = {fits[0]} (the smallest degree that holds the weights "
            "that vLLM's split of the attention heads and experts accepts), a larger GPU, or a "
            f"smaller dtype{ep_fix}"
            if fits
            else "no tensor-parallel degree up to 64 that vLLM's split of the attention heads "
            "and experts accepts holds the weights: use a larger GPU, a smaller dtype or a "
            f"higher fleet.gpu_memory_utilization{ep_fix}"
        )
        raise ScenarioError(
            "fleet.tensor_parallel",
            tp,
            f"{model.name} weights need {need / 1e9:.1f} GB but a replica has "
            f"{usable / 1e9:.1f} GB usable ({tp} x {profile.mem_bytes / 1e9:.0f} GB x "
            f"{sc.fleet.gpu_memory_utilization}); "
            f"{(need - usable) / 1e9:.1f} GB missing",
            tp_fix,
            src,
        )


def _check_dp_scheduler(sc: Scenario, src: str) -> None:
    """A data-parallel replica with a scheduler per rank (serving/ranks.py): its ranks split
    ``max_batch_size`` evenly, and it runs paged KV behind a router that binds requests to it
    (a central queue hands requests to replicas, not to ranks)."""
    f = sc.fleet
    dp = f.data_parallel
    if dp <= 1 or f.dp_scheduler != "per-rank":
        return
    merged = 'or set fleet.dp_scheduler = "merged" (one scheduler for the replica)'
    if f.max_batch_size % dp:
        raise ScenarioError(
            "fleet.max_batch_size",
            f.max_batch_size,
            f"is split over the {dp} data-parallel ranks (max_batch_size / data_parallel "
            "sequences each, as vLLM's ranks each run --max-num-seqs), but "
            f"fleet.data_parallel = {dp} does not divide it",
            f"use a multiple of {dp} (e.g. {dp * max(1, round(f.max_batch_size / dp))}), {merged}",
            src,
        )
    if f.kv_allocation != "paged":
        raise ScenarioError(
            "fleet.kv_allocation",
            f.kv_allocation,
            "a scheduler per data-parallel rank is simulated with paged KV only",
            f'use kv_allocation = "paged", {merged}',
            src,
        )
    if f.router == "central_queue":
        raise ScenarioError(
            "fleet.router",
            f.router,
            "a central queue hands requests to replicas, but a data-parallel replica with a "
            "scheduler per rank binds them to its ranks on arrival",
            f"use another router, {merged}",
            src,
        )


def _check_dp_weights_fit(sc: Scenario, model: ModelSpec, profile: Profile, src: str) -> None:
    """The weights of a data-parallel / expert-parallel replica fit its GPUs' usable memory:
    the experts once, the rest once per engine (``fleetsim.device.moe.replica_weight_bytes``)."""
    f = sc.fleet
    gpus = f.tensor_parallel * f.data_parallel
    usable = gpus * profile.mem_bytes * f.gpu_memory_utilization
    need = replica_weight_bytes(model, f.data_parallel, f.tensor_parallel)
    if need >= usable:
        tp, dp, ep = f.tensor_parallel, f.data_parallel, f.expert_parallel
        per_gpu = profile.mem_bytes * f.gpu_memory_utilization
        # the smallest split of each kind that holds the weights and that vLLM accepts: more
        # tensor parallelism at these engines, or more engines at this degree (the experts
        # spread over more GPUs, the rest once more per engine)
        more_tp = next(
            (
                k
                for k in range(tp + 1, 65)
                if layout_problem(model, k, dp, ep) is None
                and replica_weight_bytes(model, dp, k) < k * dp * per_gpu
            ),
            None,
        )
        more_dp = next(
            (
                d
                for d in range(dp + 1, 65)
                if layout_problem(model, tp, d, ep) is None
                and replica_weight_bytes(model, d, tp) < tp * d * per_gpu
            ),
            None,
        )
        splits = [
            f"fleet.tensor_parallel = {k} ({k * dp} GPUs per replica)"
            for k in [more_tp]
            if k is not None
        ] + [
            f"fleet.data_parallel = {d} ({tp * d} GPUs per replica)"
            for d in [more_dp]
            if d is not None
        ]
        raise ScenarioError(
            "fleet.data_parallel" if f.data_parallel > 1 else "fleet.tensor_parallel",
            f.data_parallel if f.data_parallel > 1 else f.tensor_parallel,
            f"{model.name} weights need {need / 1e9:.1f} GB on a replica of {gpus} "
            f"GPU{'' if gpus == 1 else 's'} "
            + ("(non-expert weights once per data-parallel engine) " if dp > 1 else "")
            + "but it has "
            f"{usable / 1e9:.1f} GB usable ({gpus} x {profile.mem_bytes / 1e9:.0f} GB x "
            f"{f.gpu_memory_utilization})",
            (
                "set " + " or ".join(splits) + " (the smallest that holds the weights and "
                "that vLLM's split accepts), a larger GPU, or a smaller dtype"
            )
            if splits
            else "no split up to 64 GPUs per replica that vLLM accepts holds the weights: "
            "use a larger GPU, a smaller dtype or a higher fleet.gpu_memory_utilization",
            src,
        )


def _checked_kv_budget(sc: Scenario, model: ModelSpec, profile: Profile, src: str) -> KvBudget:
    """The replica's KV budget; an error when nothing is left for it."""
    usable = (
        sc.fleet.tensor_parallel
        * sc.fleet.data_parallel
        * profile.mem_bytes
        * sc.fleet.gpu_memory_utilization
    )
    kvb = kv_budget(sc, model, profile.mem_bytes, src)
    # what the engine itself can hold (the longest request; a window or hybrid model's
    # layer-blocks), not the estimate in typical tokens: a hybrid's state per sequence spread
    # over a trace of very short requests makes that estimate less than one block while the
    # cache still holds several of them
    if kvb.request_tokens <= 0:
        raise ScenarioError(
            "fleet.gpu_memory_utilization",
            sc.fleet.gpu_memory_utilization,
            f"no memory left for the KV cache: {usable / 1e9:.1f} GB usable - "
            f"{kvb.weight_bytes / 1e9:.1f} GB weights - {kvb.activation_bytes / 1e9:.2f} GB "
            f"activation reserve (fleet.max_batched_tokens = {sc.fleet.max_batched_tokens})",
            "raise it, raise fleet.tensor_parallel, or lower fleet.max_batched_tokens",
            src,
        )
    return kvb


def _check_request_sizes(
    sc: Scenario, model: ModelSpec, kv_tokens: int, src: str
) -> tuple[int, np.ndarray | None]:
    """The longest request fits the KV budget and the context, and the longest prompt can be
    scheduled; (the longest request in tokens, a timed trace's arrival times or None)."""
    tr = sc.traffic
    trace_max: dict[str, int] = {}
    for d in (tr.prompt, tr.output):
        if isinstance(d, Empirical):  # (workload.sampling reads traces: imported for them only)
            from fleetsim.workload.sampling import trace_columns_max

            trace_max.update(trace_columns_max(d.file, src))
            if d.column not in trace_max:  # (checked here, before anything is simulated)
                from fleetsim.workload.sampling import _trace_column

                _trace_column(d, src)
    max_req = tr.prompt.max_tokens(trace_max) + tr.output.max_tokens(trace_max)
    pmax = tr.prompt.max_tokens(trace_max)
    trace_t: np.ndarray | None = None
    if tr.trace:  # a timed trace replaces the size distributions: check its own requests
        from fleetsim.workload.sampling import _resolve_path, read_arrival_trace

        # (read whole, bounded by the trace file size limit and stored as flat arrays)
        trace_t, tp_, to_ = read_arrival_trace(str(_resolve_path(tr.trace, src)))
        max_req, pmax = int((tp_ + to_).max()), int(tp_.max())
    big_field, big_value = _longest_field(tr, trace_max)
    if max_req > kv_tokens:
        f = sc.fleet
        per_rank = f.data_parallel > 1 and f.dp_scheduler == f.dp_kv_pool == "per-rank"
        raise ScenarioError(
            big_field,
            big_value,
            f"a maximum-length request ({max_req} tokens) exceeds the KV budget of a "
            + ("data-parallel rank, whose own cache serves it" if per_rank else "replica")
            + f" ({kv_tokens} tokens)",
            "lower the prompt/output maximum, raise fleet.tensor_parallel or "
            "fleet.gpu_memory_utilization",
            src,
        )
    if max_req > model.max_context_tokens:
        raise ScenarioError(
            big_field,
            big_value,
            f"prompt + output ({max_req} tokens) exceeds {model.name}'s context of "
            f"{model.max_context_tokens} tokens",
            "lower the maxima",
            src,
        )
    f = sc.fleet
    if pmax > f.prompt_token_budget and not f.chunked_prefill:
        if f.prompt_token_budget == f.max_batched_tokens:
            raise ScenarioError(
                "fleet.max_batched_tokens",
                f.max_batched_tokens,
                f"smaller than the longest prompt ({pmax} tokens); such prompts could "
                "never be scheduled",
                f"set it >= {pmax}, or fleet.enable_chunked_prefill = true",
                src,
            )
        # a scheduler per data-parallel rank: each rank has its share of the token budget
        raise ScenarioError(
            "fleet.max_batched_tokens",
            f.max_batched_tokens,
            f"gives each of the {f.data_parallel} data-parallel ranks "
            f"{f.prompt_token_budget} tokens per iteration, fewer than the longest prompt "
            f"({pmax} tokens); such prompts could never be scheduled",
            f"set it >= {f.data_parallel * pmax}, fleet.enable_chunked_prefill = true, or "
            'fleet.dp_scheduler = "merged"',
            src,
        )
    return max_req, trace_t


def _hourly_rates(tr: TrafficSection, src: str) -> tuple[float, ...]:
    """The fleet's arrival rate (1/s) by UTC hour of day, from requests_per_day and the diurnal
    curve."""
    w = diurnal_weights(tr.diurnal)
    w = [x / max(w) for x in w]  # (scaled to a peak of 1 first: 24 huge weights must not overflow)
    mean_w = sum(w) / 24.0
    base = tr.requests_per_day / DAY_S
    rates = tuple(base * x / mean_w for x in w)
    if not all(math.isfinite(r) for r in rates):
        raise ScenarioError(
            "traffic.requests_per_day",
            tr.requests_per_day,
            "rate is not finite",
            "use a finite rate",
            src,
        )
    return rates


__all__ = ["model_spec", "resolve_aggregated"]
