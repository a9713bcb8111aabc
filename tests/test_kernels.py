"""The kernel model's dense-layer shortcut (fleetsim.device.kernels.DenseLayer) gives exactly the
sums of the per-operator functions it replaces on the engine's hot path."""

from __future__ import annotations

import math

import pytest

from fleetsim.device import catalog
from fleetsim.device.kernels import (
    DenseLayer,
    KernelFit,
    elem_time_s,
    gemm_time_s,
    graphed_fit,
    layer_parts_s,
    layer_shapes,
)
from fleetsim.device.latency import _GEMM_OPS, LatencyModel
from fleetsim.device.modelspec import model_from_catalog
from fleetsim.device.profile import catalog_profile
from fleetsim.device.stack import apply_stack

#: token counts across the tile boundaries (16-row small tiles, 64/128/256-row tiles) and beyond
TOKENS = [*range(1, 600), *range(600, 20000, 37), 8191, 8192, 8193, 16384, 131072]


def _reference(fit: KernelFit, peak: float, bw: float, shapes, tokens: int, wb: float):
    """The sums ``LatencyModel.linear_parts`` took from ``layer_parts_s`` before DenseLayer."""
    parts = layer_parts_s(fit, peak, bw, shapes, tokens, wb)
    return (
        sum(parts[k] for k in _GEMM_OPS),
        sum(v for k, v in parts.items() if k not in _GEMM_OPS),
    )


@pytest.mark.parametrize(
    ("model", "gpu", "tp", "dtype"),
    [
        ("llama-3.1-70b", "h100-sxm", 4, "bf16"),
        ("llama-3.1-8b", "a100-80gb", 1, "bf16"),
        ("llama-3.1-8b", "b200", 2, "fp8"),
        ("llama-3.1-70b", "h200", 8, "bf16"),
    ],
)
def test_dense_layer_is_bit_identical_to_the_operator_sum(model, gpu, tp, dtype):
    m = model_from_catalog(model, dtype)
    p = catalog_profile(gpu, catalog.gpu(gpu))
    assert p.kernels is not None
    lat = LatencyModel(m, p, tp)
    shapes = layer_shapes(m, tp)
    for fit in (p.kernels, graphed_fit(p.kernels, 0.37)):
        dl = DenseLayer(fit, lat._peak_lin, p.mem_bw_bytes_per_s, shapes, m.bytes_per_param)
        for t in TOKENS:
            ref = _reference(fit, lat._peak_lin, p.mem_bw_bytes_per_s, shapes, t, m.bytes_per_param)
            assert dl.seconds(t) == ref, (model, gpu, tp, t)  # exactly, not approximately


def test_linear_parts_use_it_and_keep_every_value():
    """The latency model's linear parts of a dense model (its embedding, LM head and all-reduce
    around the layer sums) are those of the operator functions, value for value."""
    m = model_from_catalog("llama-3.1-70b")
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    lat = LatencyModel(m, p, 4)
    assert set(lat._dense_layers) == {False, True}
    kf = p.kernels
    assert kf is not None
    bw, peak = p.mem_bw_bytes_per_s, lat._peak_lin
    for t in (1, 7, 64, 255, 256, 1000, 4097, 16384):
        fit = lat._kern_g if t <= lat._gmax else kf
        assert fit is not None
        t_gemm, t_elem = _reference(fit, peak, bw, layer_shapes(m, 4), t, m.bytes_per_param)
        head = gemm_time_s(fit, peak, bw, 3, m.vocab_size / 4, m.d_model, m.bytes_per_param)
        head += 3 * p.per_seq_s if p.per_seq_s else 0.0
        emb = elem_time_s(fit, bw, "emb", 4.0 * t * m.d_model)
        lin = m.n_layers * t_gemm + head
        ridge = peak * m.bytes_per_param / (2.0 * bw)
        comp = lin if t >= ridge else 0.0
        mem = (lin - comp) + m.n_layers * t_elem + emb
        got = lat.linear_parts(t, 3)
        assert got[:2] == (comp, mem)
        assert got[2] > 0.0 and math.isfinite(got[2])  # (4 GPUs: two all-reduces per layer)


def test_a_mixture_of_experts_is_refused():
    m = model_from_catalog("mixtral-8x7b")
    p = catalog_profile("h100-sxm", catalog.gpu("h100-sxm"))
    assert p.kernels is not None
    with pytest.raises(ValueError, match="mixture of experts"):
        DenseLayer(p.kernels, p.peak_flops, p.mem_bw_bytes_per_s, layer_shapes(m, 2), 2.0)
    assert LatencyModel(m, p, 2)._dense_layers == {}


@pytest.mark.parametrize(
    ("model", "gpu", "tp", "stack"),
    [
        ("llama-3.1-70b", "h100-sxm", 4, "vllm-v1"),  # the default scenario's
        ("llama-3.1-8b", "a100-80gb", 1, "vllm-v1"),
        ("llama-3.1-70b", "h200", 8, "eager"),
    ],
)
def test_linear_time_first_timing_is_the_sum_of_linear_parts(model, gpu, tp, stack):
    """``linear_time``'s fused first timing of a token count (``_dense_tok_s``) is, bit for
    bit, the sum of ``linear_parts(tokens, 0)`` plus the LM head, across the CUDA-graph
    boundary, the stack's custom all-reduce (<= 8 MiB) and the measured table beyond it; and
    it caches ``comm_s``'s value (0 on one GPU, the all-reduces otherwise)."""
    m = model_from_catalog(model)
    p = apply_stack(catalog_profile(gpu, catalog.gpu(gpu)), stack, gpu, 256)
    fast, ref = LatencyModel(m, p, tp), LatencyModel(m, p, tp)
    assert set(fast._dense_tok) == {False, True}
    ref._dense_tok = {}  # the reference: linear_time through linear_parts, as before
    big = 0
    for t in (*range(1, 1100), 2047, 8192, 8193, 16384, 65536, 131072):
        seqs = 1 + t % 5
        got = fast.linear_time(t, seqs)
        assert got == ref.linear_time(t, seqs), (model, t)  # exactly
        c, mm, cm = ref.linear_parts(t, 0)
        assert fast._tok_cache[t] == c + mm + cm, (model, t)
        assert fast._comm_cache[t] == ref.comm_s(t, seqs) == (cm if tp > 1 else 0.0)
        big += t * m.d_model * 2.0 > 8 * 1024 * 1024
    assert big > 0 and (tp == 1 or fast._comm_cache[1] > 0.0)
    if stack == "vllm-v1":  # both sides of the graph boundary, the custom all-reduce on
        assert 1 < fast._gmax < 1100 and fast._ar_bw > 0.0
    assert (1, 0) not in fast._lin_cache  # (the fused path keeps no linear_parts entry)


def _same_values(a, b) -> None:
    """Equal, with the same types all the way down (an int stays an int, a float a float)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)  # (the same keys in the same order)
        for k in a:
            _same_values(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_values(x, y)
    else:
        assert a == b, (a, b)


def test_the_kernel_catalog_reads_as_tomllib_reads_it():
    """catalog.kernel(gpu) reads its all-reduce tables with json (catalog._loads_numeric): the
    same values, types and key order as tomllib's parse of the whole file, for every GPU; and
    lines that only TOML reads (a + sign, an underscore, a trailing comma) go to tomllib."""
    import tomllib

    whole = tomllib.loads(catalog._text("kernels.toml"))
    assert len(whole) >= 4
    n_arrays = 0
    for gpu, table in whole.items():
        _same_values(catalog.kernel(gpu), table)
        n_arrays += sum(k.startswith("allreduce_tp") and not k.endswith("_err") for k in table)
    assert n_arrays >= 6  # (the json path did read the long tables)
    text = '["g"]\na = [[1, 2.5e-06], [3, 4.0]]\nb = [+1, 2]\nc = [1_000, 2]  # x\nd = [1, 2,]\n'
    text += "e = [-0, 1E5, 0.1]\nf = 7\n"
    _same_values(catalog._loads_numeric(text), tomllib.loads(text))
    two = '["g"]\na = [1]\n["h"]\na = [2]\n'  # (not one table: tomllib's parse)
    _same_values(catalog._loads_numeric(two), tomllib.loads(two))


def test_catalog_entries_parsed_alone_are_the_whole_files():
    """catalog.gpu / model read only the entry's table (catalog._entry): for every entry of
    every file that splits, the same dict as the whole file's; names with dots ("llama-3.1-8b")
    split too; unknown names still get the whole file's "did you mean"."""
    import tomllib

    from fleetsim.base.errors import ScenarioError

    split = 0
    for f in ("gpus.toml", "models.toml", "kernels.toml", "moe.toml", "links.toml"):
        whole = tomllib.loads(catalog._text(f))
        spans = catalog._spans(f)
        assert spans is not None and list(spans) == list(whole), f
        for key, table in whole.items():
            _same_values(catalog._entry(f, key), table)
            split += 1
    assert split >= 30 and any("." in k for k in catalog._spans("models.toml") or {})
    for name in tomllib.loads(catalog._text("models.toml")):
        assert catalog.has_model(name) and catalog.model(name) == catalog.models()[name]
    assert catalog.gpu("h100-sxm") == catalog.gpus()["h100-sxm"]
    assert not catalog.has_model("llama-3.1-7b") and catalog._entry("gpus.toml", "h100") is None
    with pytest.raises(ScenarioError, match="did you mean 'h100-sxm'"):
        catalog.gpu("h100")
    assert catalog._spans("stacks.toml") is None  # (dotted headers: the whole file, as before)
