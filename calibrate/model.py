"""A decoder-only Transformer in torch, built from a :class:`~fleetsim.device.modelspec.ModelSpec`.

Random weights from an explicit ``torch.Generator`` (fixed seed); nothing is downloaded. The
model has what a serving engine's forward pass has, so that its timing means something:

* RMSNorm, rotary embeddings, grouped-query attention (``n_kv_heads``) through
  ``torch.nn.functional.scaled_dot_product_attention`` (causal in prefill);
* a SwiGLU (3 matrices) or GELU (2 matrices) MLP, or a mixture of experts with top-k routing
  when ``n_experts > 1`` (routed experts computed by a loop over the experts that got tokens);
* a tied or untied LM head, applied to the last position only (the contract of
  :mod:`fleetsim.device.modelspec`);
* a real KV cache, preallocated per batch for a maximum length, and true incremental decoding:
  :meth:`TorchTransformer.prefill` fills the cache, :meth:`TorchTransformer.decode_step` feeds one
  token per sequence against it without recomputing the prefix.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (:func:`count_flops`). On CPU,
torch dispatches SDPA to ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no flop
formula in torch's registry (so the counter would charge attention 0 FLOPs);
:func:`register_cpu_sdpa_flops` gives it the same formula the CUDA kernels have (full ``q x k``
rectangle, GQA charged at the query-head count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fleetsim.device.modelspec import ModelSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Tensors larger than this are filled by repeating one random block (a prime length, so rows do
# not repeat in step): i.i.d. init of a 128k x 4096 embedding costs seconds on a small CPU and the
# values do not change the timing. Smaller tensors (norms, routers, tiny test models) are i.i.d.
_FILL_BLOCK = (1 << 22) + 15


def _fill_uniform_(t: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    """Fill ``t`` with uniform noise of standard deviation ``std`` (see ``_FILL_BLOCK``)."""
    a = std * math.sqrt(3.0)
    n = t.numel()
    if n <= _FILL_BLOCK or t.device.type != "cpu":
        return t.uniform_(-a, a, generator=gen)
    block = torch.empty(_FILL_BLOCK, dtype=t.dtype, device=t.device).uniform_(-a, a, generator=gen)
    flat = t.view(-1)
    for i in range(0, n, _FILL_BLOCK):
        m = min(_FILL_BLOCK, n - i)
        flat[i : i + m].copy_(block[:m])
    return t


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    router: torch.Tensor | None
    w1: torch.Tensor  # [E, d_ff, d] (gate / fc1)
    w2: torch.Tensor  # [E, d, d_ff] (down / fc2)
    w3: torch.Tensor | None  # [E, d_ff, d] (up), SwiGLU only


class TorchTransformer:
    """Decoder-only Transformer with a KV cache; weights random from ``seed``.

    ``spec.n_layers`` layers are built (pass a spec sliced with ``dataclasses.replace`` to build
    fewer); ``embed_rows`` shrinks an untied input-embedding table (see ``__init__``).
    ``prefill`` and ``decode_step`` take ``n_layers`` to run only the first layers, which
    the calibration uses to separate per-layer from per-iteration overhead.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        seed: int = 0,
        rope: bool = True,
        rope_theta: float = 500000.0,
        norm_eps: float = 1e-5,
        embed_rows: int | None = None,
    ) -> None:
        if spec.d_model % spec.n_heads or spec.n_heads % spec.n_kv_heads:
            raise ValueError(f"{spec.name}: d_model, n_heads and n_kv_heads do not divide")
        self.spec = spec
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.rope = rope
        self.rope_theta = rope_theta
        self.eps = norm_eps
        self.n_heads = spec.n_heads
        self.n_kv_heads = spec.n_kv_heads
        self.head_dim = spec.head_dim
        gen = torch.Generator(device=self.device).manual_seed(seed)
        d, hd = spec.d_model, spec.head_dim
        std = 0.02

        def w(*shape: int, s: float = std) -> torch.Tensor:
            t = torch.empty(*shape, device=self.device, dtype=self.dtype)
            return _fill_uniform_(t, gen, s)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=self.device, dtype=self.dtype)

        # The input embedding is a gather of B x L rows; its table is never read whole (and
        # ModelSpec.weight_bytes_read does not count it). ``embed_rows`` keeps only that many
        # rows of an untied table (token ids are taken modulo), which saves gigabytes of page
        # faults when building a 128k-vocabulary model on a small CPU without changing the timing.
        rows = spec.vocab_size
        if embed_rows is not None and not spec.tied_embeddings:
            rows = max(1, min(embed_rows, spec.vocab_size))
        self.embed = w(rows, d, s=1.0)
        n_exp = spec.n_experts
        self.layers: list[_Layer] = []
        for _ in range(spec.n_layers):
            self.layers.append(
                _Layer(
                    attn_norm=ones(d),
                    wq=w(spec.n_heads * hd, d),
                    wk=w(spec.n_kv_heads * hd, d),
                    wv=w(spec.n_kv_heads * hd, d),
                    wo=w(d, spec.n_heads * hd, s=std / math.sqrt(2 * spec.n_layers)),
                    mlp_norm=ones(d),
                    router=w(n_exp, d, s=1.0 / math.sqrt(d)) if n_exp > 1 else None,
                    w1=w(n_exp, spec.d_ff, d),
                    w2=w(n_exp, d, spec.d_ff, s=std / math.sqrt(2 * spec.n_layers)),
                    w3=w(n_exp, spec.d_ff, d) if spec.mlp == "swiglu" else None,
                )
            )
        self.final_norm = ones(d)
        self.lm_head = self.embed if spec.tied_embeddings else w(spec.vocab_size, d)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.cache_batch = 0
        self.cache_tokens = 0
        self.pos = 0
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    # ---- cache ---------------------------------------------------------------------------
    def allocate_cache(self, batch: int, max_tokens: int) -> None:
        """Preallocate K and V for ``batch`` sequences of up to ``max_tokens`` tokens (zeros)."""
        shape = (batch, self.n_kv_heads, max_tokens, self.head_dim)
        self.k_cache = [
            torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers
        ]
        self.v_cache = [
            torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers
        ]
        self.cache_batch, self.cache_tokens, self.pos = batch, max_tokens, 0
        if self.rope:
            inv = 1.0 / (
                self.rope_theta
                ** (
                    torch.arange(0, self.head_dim, 2, device=self.device, dtype=torch.float32)
                    / self.head_dim
                )
            )
            ang = torch.outer(
                torch.arange(max_tokens, device=self.device, dtype=torch.float32), inv
            )
            self._cos = torch.cos(ang).to(self.dtype)
            self._sin = torch.sin(ang).to(self.dtype)

    def free_cache(self) -> None:
        """Drop the KV cache (frees its memory)."""
        self.k_cache, self.v_cache = [], []
        self.cache_batch = self.cache_tokens = self.pos = 0

    def set_position(self, pos: int) -> None:
        """Pretend the cache holds ``pos`` tokens per sequence (their values are whatever is
        there)."""
        if not 0 <= pos < self.cache_tokens:
            raise ValueError(f"position {pos} outside the cache of {self.cache_tokens} tokens")
        self.pos = pos

    # ---- blocks --------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * weight

    def _rotary(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate ``x`` [B, h, L, hd] for positions start..start+L-1 (rotate-half convention)."""
        if not self.rope:
            return x
        assert self._cos is not None and self._sin is not None  # made with rope
        n = x.shape[2]
        cos = self._cos[start : start + n]
        sin = self._sin[start : start + n]
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((sin, sin), dim=-1)
        half = self.head_dim // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _attention(self, layer: _Layer, idx: int, x: torch.Tensor, start: int) -> torch.Tensor:
        b, n, _ = x.shape
        h, hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = F.linear(x, layer.wq).view(b, n, h, hd).transpose(1, 2)
        k = F.linear(x, layer.wk).view(b, n, hk, hd).transpose(1, 2)
        v = F.linear(x, layer.wv).view(b, n, hk, hd).transpose(1, 2)
        q = self._rotary(q, start)
        k = self._rotary(k, start)
        kc, vc = self.k_cache[idx], self.v_cache[idx]
        kc[:b, :, start : start + n] = k
        vc[:b, :, start : start + n] = v
        keys = kc[:b, :, : start + n]
        vals = vc[:b, :, : start + n]
        gqa = h != hk
        # prefill: the whole prompt attends causally; decode (n == 1): the new token attends
        # everything in the cache, no mask needed.
        o = F.scaled_dot_product_attention(
            q, keys, vals, is_causal=(start == 0 and n > 1), enable_gqa=gqa
        )
        o = o.transpose(1, 2).reshape(b, n, h * hd)
        return F.linear(o, layer.wo)

    def _expert(self, layer: _Layer, e: int, x: torch.Tensor) -> torch.Tensor:
        if layer.w3 is not None:
            return F.linear(
                F.silu(F.linear(x, layer.w1[e])) * F.linear(x, layer.w3[e]), layer.w2[e]
            )
        return F.linear(F.gelu(F.linear(x, layer.w1[e])), layer.w2[e])

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.router is None:
            return self._expert(layer, 0, x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores = F.linear(flat, layer.router)
        top_w, top_i = torch.topk(scores, self.spec.n_active_experts, dim=-1)
        top_w = torch.softmax(top_w.float(), dim=-1).to(x.dtype)
        out = torch.zeros_like(flat)
        for e in torch.unique(top_i).tolist():
            tok, slot = torch.nonzero(top_i == e, as_tuple=True)
            y = self._expert(layer, e, flat[tok]) * top_w[tok, slot, None]
            out.index_add_(0, tok, y)
        return out.view(shape)

    def _forward(self, tokens: torch.Tensor, start: int, n_layers: int | None) -> torch.Tensor:
        """Run ``tokens`` [B, n] at positions start.., return last-position logits [B, vocab]."""
        b, n = tokens.shape
        if b > self.cache_batch or start + n > self.cache_tokens:
            raise ValueError(
                f"batch {b} x {start + n} tokens exceeds the cache "
                f"({self.cache_batch} x {self.cache_tokens}); allocate_cache first"
            )
        if self.embed.shape[0] < self.spec.vocab_size:
            tokens = tokens % self.embed.shape[0]
        x = F.embedding(tokens, self.embed)
        layers = self.layers if n_layers is None else self.layers[:n_layers]
        for i, layer in enumerate(layers):
            x = x + self._attention(layer, i, self._norm(x, layer.attn_norm), start)
            x = x + self._mlp(layer, self._norm(x, layer.mlp_norm))
        last = self._norm(x[:, -1], self.final_norm)
        return F.linear(last, self.lm_head)

    # ---- public passes -------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Prefill equal-length prompts ``tokens`` [B, L] into the cache; last-position logits."""
        logits = self._forward(tokens, 0, n_layers)
        self.pos = tokens.shape[1]
        return logits

    def decode_step(self, tokens: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Feed one token per sequence (``tokens`` [B]) against the cache; returns logits [B, V]."""
        logits = self._forward(tokens.view(-1, 1), self.pos, n_layers)
        self.pos += 1
        return logits

    def random_tokens(self, batch: int, length: int, seed: int = 1) -> torch.Tensor:
        """Token ids [batch, length] from a fixed generator."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randint(
            0, self.spec.vocab_size, (batch, length), generator=g, device=self.device
        )


# ---- FLOP counting ---------------------------------------------------------------------------
_CPU_SDPA_REGISTERED = False


def register_cpu_sdpa_flops() -> None:
    """Give the CPU flash-attention op the flop formula that torch gives the CUDA ones.

    torch 2.13 counts ``aten._scaled_dot_product_flash_attention`` (CUDA) but not
    ``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU SDPA would count 0 FLOPs.
    """
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in fc.flop_registry and op.default not in fc.flop_registry:

        @fc.register_flop_formula(op)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    _CPU_SDPA_REGISTERED = True


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` charges for running ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flop_check(
    model: TorchTransformer, batch: int, prompt_tokens: int, context_tokens: int
) -> dict[str, float]:
    """Counted vs analytic FLOPs of one prefill (B x L) and one decode step (B at ``ctx`` keys).

    The decode step's new token attends ``context_tokens`` keys, itself included (the cache
    holds ``context_tokens - 1`` tokens before the step), which is what
    ``ModelSpec.decode_flops(B, B * ctx)`` charges.
    """
    spec = model.spec
    model.allocate_cache(batch, max(prompt_tokens, context_tokens))
    toks = model.random_tokens(batch, prompt_tokens)
    counted_p = count_flops(lambda: model.prefill(toks))
    model.set_position(context_tokens - 1)
    counted_d = count_flops(lambda: model.decode_step(toks[:, 0]))
    model.free_cache()
    want_p = spec.prefill_flops(prompt_tokens) * batch
    want_d = spec.decode_flops(batch, batch * context_tokens)
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "context_tokens": context_tokens,
        "prefill_counted_flops": counted_p,
        "prefill_analytic_flops": want_p,
        "prefill_rel_err": counted_p / want_p - 1.0,
        "decode_counted_flops": counted_d,
        "decode_analytic_flops": want_d,
        "decode_rel_err": counted_d / want_d - 1.0,
    }
