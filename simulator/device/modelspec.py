"""Analytic work of a decoder-only Transformer: parameters, FLOPs and bytes per iteration.

Everything here is derived from the architecture alone, so that the simulator, the roofline
profiles and the torch calibration (which counts FLOPs with ``FlopCounterMode``) share one
definition. Conventions, chosen to match what ``torch.utils.flop_counter`` charges:

* a multiply-add is 2 FLOPs;
* attention scores and the weighted sum each cost ``2 * n_heads * head_dim`` FLOPs per
  (query, key) pair, at the *query* head count also under grouped-query attention; a prefill of
  ``L`` tokens is charged the full ``L x L`` square. That is torch's ``sdpa_flop_count``, which
  the flop counter applies to the CUDA SDPA kernels whether or not the mask is causal (on CPU,
  torch 2.13's ``_scaled_dot_product_flash_attention_for_cpu`` has no formula, and
  ``calibrate.model`` registers the same one for it);
* a decode step of a sequence with context ``ctx`` attends ``ctx`` keys, the new token's own
  included (``decode_flops(B, B * ctx)``);
* the LM head runs only on the last position of each sequence (what serving engines do);
* norms, activations, softmax and rotary embeddings are not counted (under 0.5% of the work).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture of a decoder-only Transformer (dense or mixture-of-experts)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    n_experts: int = 1
    n_active_experts: int = 1
    mlp: str = "swiglu"  # "swiglu" (3 matrices) or "gelu" (2 matrices)
    tied_embeddings: bool = False
    max_context_tokens: int = 131072
    dtype: str = "bf16"
    kv_dtype: str | None = None

    # ---- shapes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_dtype_resolved(self) -> str:
        """The KV cache's dtype: ``kv_dtype``, or when unset the activation dtype (the weight
        dtype if it is a 16/32-bit float, else bf16: quantized weights keep a 16-bit cache
        unless told otherwise, like vLLM's kv_cache_dtype='auto')."""
        if self.kv_dtype:
            return self.kv_dtype
        return self.dtype if self.dtype in ("fp32", "bf16", "fp16") else "bf16"

    @property
    def kv_bytes_per_element(self) -> float:
        return DTYPE_BYTES[self.kv_dtype_resolved]

    @property
    def attn_params_per_layer(self) -> int:
        kv_dim = self.n_kv_heads * self.head_dim
        q_dim = self.n_heads * self.head_dim
        return self.d_model * q_dim + 2 * self.d_model * kv_dim + q_dim * self.d_model

    @property
    def expert_params(self) -> int:
        """Parameters of one expert's MLP (the whole MLP for a dense model)."""
        return (3 if self.mlp == "swiglu" else 2) * self.d_model * self.d_ff

    @property
    def router_params_per_layer(self) -> int:
        return self.d_model * self.n_experts if self.n_experts > 1 else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def total_params(self) -> int:
        per_layer = (
            self.attn_params_per_layer
            + self.n_experts * self.expert_params
            + self.router_params_per_layer
        )
        head = 0 if self.tied_embeddings else self.lm_head_params
        return self.n_layers * per_layer + self.embedding_params + head

    @property
    def active_params_per_token(self) -> int:
        """Matmul parameters one token passes through, LM head excluded."""
        per_layer = (
            self.attn_params_per_layer
            + self.n_active_experts * self.expert_params
            + self.router_params_per_layer
        )
        return self.n_layers * per_layer

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token in every layer."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.kv_bytes_per_element

    def kv_bytes_per_token_tp(self, tp: int) -> float:
        """K and V of one token summed over the ``tp`` GPUs of a replica: with more GPUs than
        KV heads each GPU holds one head, so ``tp / n_kv_heads`` replicas of each (vLLM)."""
        return self.kv_bytes_per_token * max(1.0, tp / self.n_kv_heads)

    def tp_problem(self, tp: int) -> str | None:
        """Why ``tp``-way tensor parallelism cannot shard this model (vLLM's rule: the query
        heads divide by tp, and the KV heads either divide by tp or are a divisor of it, so
        that they can be replicated), or None."""
        if self.n_heads % tp:
            return f"does not divide {self.name}'s {self.n_heads} attention heads"
        kv = self.n_kv_heads
        if kv % tp and tp % kv:
            return f"neither divides nor is a multiple of {self.name}'s {kv} KV heads"
        return None

    def tp_fix(self, tp: int) -> str:
        ok = [t for t in (1, 2, 4, 8, 16, 32, 64) if self.tp_problem(t) is None]
        return f"use one of {', '.join(map(str, ok))}"

    # ---- FLOPs --------------------------------------------------------------------------
    @property
    def flops_per_token_linear(self) -> float:
        """Matmul FLOPs of one token through the layers (no attention scores, no LM head)."""
        return 2.0 * self.active_params_per_token

    @property
    def flops_lm_head(self) -> float:
        return 2.0 * self.lm_head_params

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs per (query, key) pair summed over layers: QK^T and AV."""
        return 4.0 * self.n_heads * self.head_dim * self.n_layers

    def prefill_flops(self, prompt_tokens: int) -> float:
        """FLOPs of one sequence's prefill of ``prompt_tokens`` (full-square attention)."""
        p = float(prompt_tokens)
        return (
            p * self.flops_per_token_linear + p * p * self.attn_flops_per_pair + self.flops_lm_head
        )

    def decode_flops(self, n_seqs: int, context_tokens_total: float) -> float:
        """FLOPs of one decode step of ``n_seqs`` sequences attending ``context_tokens_total``
        keys."""
        return n_seqs * (self.flops_per_token_linear + self.flops_lm_head) + (
            context_tokens_total * self.attn_flops_per_pair
        )

    # ---- bytes moved --------------------------------------------------------------------
    def expected_experts_touched(self, tokens: float) -> float:
        """Expected distinct experts per layer that ``tokens`` tokens route to (uniform routing)."""
        if self.n_experts <= 1:
            return 1.0
        e, k = self.n_experts, self.n_active_experts
        return e * (1.0 - (1.0 - k / e) ** max(tokens, 0.0))

    def weight_bytes_read(self, tokens: float) -> float:
        """Weights read by one iteration over ``tokens`` tokens (embedding rows not counted)."""
        per_layer: float = self.attn_params_per_layer + self.router_params_per_layer
        per_layer += self.expected_experts_touched(tokens) * self.expert_params
        return (self.n_layers * per_layer + self.lm_head_params) * self.bytes_per_param


def model_from_catalog(name: str, dtype: str = "bf16", field: str = "model.name") -> ModelSpec:
    """The :class:`ModelSpec` of catalog model ``name`` (see ``catalog/models.toml``)."""
    from fleetsim.device import catalog

    entry = catalog.model(name, field)
    entry.pop("published_params", None)
    return ModelSpec(name=name, dtype=dtype, **entry)
