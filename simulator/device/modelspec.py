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
* norms, activations, softmax, rotary embeddings and biases are not counted (under 0.5% of the
  work and of the parameters).

**The layer stack.** A model has ``n_layers`` layers. Without ``hybrid_pattern`` each layer is an
attention block followed by a feed-forward block, dense or mixture-of-experts: with
``n_experts > 1`` the first ``first_k_dense`` layers are dense and after them every
``moe_layer_step``-th layer is MoE (layer ``i`` is MoE when ``i >= first_k_dense`` and
``(i - first_k_dense + 1) % moe_layer_step == 0``: Qwen3-MoE's ``decoder_sparse_step``, Llama 4's
``interleave_moe_layer_step``, DeepSeek-V3's ``first_k_dense_replace``). With
``hybrid_pattern`` (Nemotron-H's ``hybrid_override_pattern``) each layer is one block, one
character per layer: ``M`` a linear-state (Mamba-2) mixer, ``*`` attention, ``-`` a dense MLP,
``E`` an MoE MLP.

**Attention kinds.** Full attention; a sliding window of ``sliding_window_tokens`` tokens on
every layer, or with ``sliding_global_every = n`` on all but every n-th attention layer
(attention layer ``j`` is global when ``(j + 1) % n == 0``: Gemma 3's ``sliding_window_pattern
= 6``, gpt-oss's alternating ``layer_types`` with ``n = 2``); learned attention sinks
(gpt-oss: one logit per head, no KV); multi-head latent attention (``kv_lora_rank > 0``,
DeepSeek-V2/V3): the cache holds the latent (``kv_lora_rank``) and the rotary key
(``qk_rope_head_dim``) per token and layer, and attention is charged in its absorbed form (a
query attends in the latent space: ``2 * n_heads * (2 * kv_lora_rank + qk_rope_head_dim)``
FLOPs per pair, what vLLM's MLA decode kernels compute).

**Linear-state layers** (Mamba-2, ``ssm_*``) hold a fixed state per sequence: the SSM state
``ssm_n_heads * ssm_head_dim * ssm_state_size`` and the convolution window ``(ssm_conv_kernel
- 1) * (d_inner + 2 * ssm_n_groups * ssm_state_size)`` elements (under tensor parallelism
the groups are split over the ranks, which must divide them, or a single group is copied on
every rank, in the state and the B and C weights: :meth:`ModelSpec.ssm_groups_tp`, vLLM 0.11's
``MambaMixer2``); a step costs ``5 * d_inner * ssm_state_size`` FLOPs per token besides its
projections (the state decay, the input outer product and the read-out).

**Precision per part.** ``dtype`` is that of the linear layers; ``expert_dtype`` overrides it
for the experts (gpt-oss: mxfp4 experts, bf16 attention); ``embed_dtype`` for the embedding and
the LM head (left in bf16 by fp8 checkpoints). ``DTYPE_BYTES`` gives the bytes per parameter,
block scales included (mxfp4: 4 bits + one 8-bit scale per 32, OCP MX v1.0; fp8 with 128 x 128
blocks carries one fp32 scale per 16,384 weights, 0.02%, not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DTYPE_BYTES = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    # OCP Microscaling Formats v1.0: E2M1 elements, one E8M0 scale per block of 32
    "mxfp4": 4.25 / 8,
    # NVIDIA NVFP4: E2M1 elements, one E4M3 scale per block of 16
    "nvfp4": 4.5 / 8,
}

#: characters of ``hybrid_pattern`` (Nemotron-H's ``hybrid_override_pattern``)
HYBRID_CHARS = {"M": "linear-state", "*": "attention", "-": "dense MLP", "E": "MoE MLP"}

#: fields whose default is derived from others (``__post_init__``)
_DERIVED = ("head_dim", "d_ff_expert", "d_ff_shared")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture of a decoder-only Transformer: dense, mixture-of-experts, with sliding
    windows, latent attention or linear-state layers (see the module docstring)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int  # the dense layers' MLP width (and the experts' unless d_ff_expert is given)
    vocab_size: int
    n_experts: int = 1  # routed experts per MoE layer
    n_active_experts: int = 1  # routed experts per token (top-k)
    mlp: str = "swiglu"  # "swiglu" (gated: 3 matrices) or "gelu" (ungated: 2 matrices)
    tied_embeddings: bool = False
    max_context_tokens: int = 131072
    dtype: str = "bf16"
    kv_dtype: str | None = None
    # ---- attention ----------------------------------------------------------------------
    head_dim: int = 0  # 0: d_model // n_heads (MLA: qk_nope_head_dim + qk_rope_head_dim)
    sliding_window_tokens: int = 0  # 0: no sliding window
    sliding_global_every: int = 0  # every n-th attention layer is global; 0: none is
    attention_sinks: bool = False  # learned per-head sink logits (gpt-oss)
    kv_lora_rank: int = 0  # > 0: multi-head latent attention
    q_lora_rank: int = 0  # 0: a full-rank query projection
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # ---- mixture of experts ---------------------------------------------------------------
    d_ff_expert: int = 0  # 0: d_ff
    n_shared_experts: int = 0
    d_ff_shared: int = 0  # 0: d_ff_expert
    first_k_dense: int = 0
    moe_layer_step: int = 1
    # ---- hybrid stacks (one block per layer) ----------------------------------------------
    hybrid_pattern: str = ""
    ssm_state_size: int = 0
    ssm_n_heads: int = 0
    ssm_head_dim: int = 0
    ssm_n_groups: int = 1
    ssm_conv_kernel: int = 4
    # ---- precision per part -----------------------------------------------------------------
    expert_dtype: str | None = None  # None: dtype
    #: fp8 weights carry 128 x 128 block scales (the checkpoint's ``weight_block_size``, as
    #: DeepSeek-V3 and Qwen3's -FP8 files); False: per-tensor or per-channel scales (``fp8``
    #: without ``weight_block_size``, ``fbgemm_fp8``, compressed-tensors' channel / tensor
    #: strategies), whose experts vLLM splits at any width and runs in the fused MoE kernel's
    #: default tiles without the block-scaled K loop (``Fp8MoEMethod``: ``block_quant`` is
    #: ``weight_block_size is not None``; its block-width check and ``get_default_config``'s
    #: block tiles apply only then)
    fp8_block: bool = True
    embed_dtype: str | None = None  # None: dtype
    state_dtype: str | None = None  # linear-state cache; None: the KV dtype
    #: the SSM (temporal) state's precision when it differs from the convolution state's
    #: (vLLM's ``--mamba-ssm-cache-dtype``, over ``--mamba-cache-dtype`` = ``state_dtype``:
    #: ``MambaStateDtypeCalculator.mamba2_state_dtype``, vllm/model_executor/layers/mamba/
    #: mamba_utils.py); None: ``state_dtype``
    ssm_state_dtype: str | None = None
    #: which of head_dim, d_ff_expert, d_ff_shared were derived (not given): they follow
    #: their sources through :meth:`evolve` and ``dataclasses.replace``
    derived: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        derived = set(self.derived)
        for name in _DERIVED:
            if getattr(self, name) == 0 or name in derived:
                derived.add(name)
                if name == "head_dim":
                    value = (
                        self.qk_nope_head_dim + self.qk_rope_head_dim
                        if self.kv_lora_rank > 0
                        else self.d_model // max(self.n_heads, 1)
                    )
                elif name == "d_ff_expert":
                    value = self.d_ff
                else:
                    value = self.d_ff_expert
                object.__setattr__(self, name, value)
        object.__setattr__(self, "derived", tuple(n for n in _DERIVED if n in derived))

    def evolve(self, **changes: object) -> ModelSpec:
        """A copy with ``changes``; derived widths not given are derived again."""
        kw: dict[str, object] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "derived" and f.name not in self.derived
        }
        kw.update(changes)
        return ModelSpec(**kw)  # type: ignore[arg-type]

    def problems(self) -> list[tuple[str, object, str]]:
        """``(field, value, what is wrong)`` for each inconsistency; empty when valid."""
        out: list[tuple[str, object, str]] = []
        for f in (
            "dtype",
            "kv_dtype",
            "expert_dtype",
            "embed_dtype",
            "state_dtype",
            "ssm_state_dtype",
        ):
            v = getattr(self, f)
            if v is not None and v not in DTYPE_BYTES:
                out.append((f, v, f"is not one of {', '.join(DTYPE_BYTES)}"))
        if self.n_active_experts > self.n_experts:
            out.append(
                (
                    "n_active_experts",
                    self.n_active_experts,
                    f"more than n_experts ({self.n_experts})",
                )
            )
        if self.moe_layer_step < 1:
            out.append(("moe_layer_step", self.moe_layer_step, "must be at least 1"))
        if not 0 <= self.first_k_dense <= self.n_layers:
            out.append(("first_k_dense", self.first_k_dense, f"is not in 0..{self.n_layers}"))
        if (
            self.n_experts > 1
            and not self.hybrid_pattern
            and self.moe_layer_step >= 1
            and 0 <= self.first_k_dense <= self.n_layers
            and self.n_moe_layers == 0
        ):
            # (HF decoder_sparse_step or first_k_dense_replace past the last layer: every layer
            # dense, while the experts were counted in n_experts, expert parallelism, the plan)
            out.append(
                (
                    "moe_layer_step" if self.moe_layer_step > 1 else "first_k_dense",
                    self.moe_layer_step if self.moe_layer_step > 1 else self.first_k_dense,
                    f"leaves none of the {self.n_layers} layers a mixture of experts, though "
                    f"n_experts is {self.n_experts}",
                )
            )
        if self.sliding_window_tokens < 0 or self.sliding_global_every < 0:
            out.append(("sliding_window_tokens", self.sliding_window_tokens, "is negative"))
        if self.kv_lora_rank > 0 and (self.qk_rope_head_dim < 1 or self.v_head_dim < 1):
            out.append(("kv_lora_rank", self.kv_lora_rank, "needs qk_rope_head_dim and v_head_dim"))
        p = self.hybrid_pattern
        if p:
            bad = sorted(set(p) - set(HYBRID_CHARS))
            if bad:
                out.append(("hybrid_pattern", p, f"has {bad[0]!r}: use M, *, - and E"))
            elif len(p) != self.n_layers:
                out.append(
                    ("hybrid_pattern", p, f"has {len(p)} layers but n_layers is {self.n_layers}")
                )
            if "E" in p and self.n_experts < 2:
                out.append(("hybrid_pattern", p, "has MoE layers (E) but n_experts < 2"))
            if "M" in p and min(self.ssm_state_size, self.ssm_n_heads, self.ssm_head_dim) < 1:
                out.append(("hybrid_pattern", p, "has linear-state layers (M) but no ssm_* sizes"))
            elif "M" in p and self.ssm_n_groups >= 1 and self.ssm_n_heads % self.ssm_n_groups:
                # vLLM's Mamba-2 kernels give each group of B and C a whole number of heads
                # (nheads % ngroups == 0: ops/mamba_ssm.py, ops/ssd_chunk_state.py)
                out.append(
                    (
                        "ssm_n_groups",
                        self.ssm_n_groups,
                        f"does not divide ssm_n_heads = {self.ssm_n_heads}: vLLM's Mamba-2 "
                        "kernels give each group of B and C a whole number of heads",
                    )
                )
            if not bad and "*" not in p:
                # the KV pool is counted in pages of an attention layer (vLLM's page size
                # unification: serving/kv_paged.py); a stack with none is not modelled
                out.append(("hybrid_pattern", p, "has no attention layer (*): not modelled"))
        return out

    # ---- the layer stack ----------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_attn_layers(self) -> int:
        """Layers with an attention block."""
        return self.hybrid_pattern.count("*") if self.hybrid_pattern else self.n_layers

    @property
    def n_linear_layers(self) -> int:
        """Linear-state (Mamba-2) layers."""
        return self.hybrid_pattern.count("M")

    @property
    def n_moe_layers(self) -> int:
        """Layers whose feed-forward block is a mixture of experts."""
        if self.n_experts <= 1:
            return 0
        if self.hybrid_pattern:
            return self.hybrid_pattern.count("E")
        return max(0, self.n_layers - self.first_k_dense) // max(self.moe_layer_step, 1)

    @property
    def n_dense_layers(self) -> int:
        """Layers whose feed-forward block is a dense MLP of width ``d_ff``."""
        if self.hybrid_pattern:
            return self.hybrid_pattern.count("-")
        return self.n_layers - self.n_moe_layers

    @property
    def n_global_attn_layers(self) -> int:
        """Attention layers that attend the whole context."""
        n = self.n_attn_layers
        if self.sliding_window_tokens <= 0:
            return n
        g = self.sliding_global_every
        return n // g if g > 0 else 0

    @property
    def n_sliding_layers(self) -> int:
        """Attention layers that attend the last ``sliding_window_tokens`` tokens."""
        return self.n_attn_layers - self.n_global_attn_layers

    @property
    def sliding_share(self) -> float:
        """The fraction of the attention layers that attend a sliding window (0.0 without
        windows): what a key beyond the window saves of a full-attention key's decode cost."""
        n = self.n_attn_layers
        if self.sliding_window_tokens <= 0 or n <= 0:
            return 0.0
        return self.n_sliding_layers / n

    def attended_keys(self, context_tokens: float) -> float:
        """Keys one decoding sequence at ``context_tokens`` reads in a step, in units of a key
        read by every attention layer (the unit of the latency model's ``ctx``): ``c`` on the
        global layers, ``min(c, W)`` on the window layers, so ``c - share x max(c - W, 0)``.
        Linear-state layers read a constant state (in the step's fixed part), MLA its latent
        (in :attr:`kv_bytes_per_token`)."""
        c = max(float(context_tokens), 0.0)
        w = self.sliding_window_tokens
        if w <= 0 or c <= w:
            return c
        return c - self.sliding_share * (c - w)

    def attended_pairs(self, prompt_tokens: int) -> float:
        """Attention pairs of a whole prompt's prefill, in units of a pair in every attention
        layer: ``L^2`` (the full-square convention), less the window layers' share of
        ``L^2 - L min(L, W)`` (:meth:`prefill_flops`)."""
        p = float(prompt_tokens)
        w = self.sliding_window_tokens
        if w <= 0 or p <= w:
            return p * p
        return p * p - self.sliding_share * (p * p - p * w)

    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        """``(mixer, ffn)`` of each layer: mixer ``full``, ``sliding``, ``linear`` or ``none``;
        ffn ``dense``, ``moe`` or ``none``."""
        out: list[tuple[str, str]] = []
        j = 0  # attention layers so far
        w, g = self.sliding_window_tokens, self.sliding_global_every

        def attn() -> str:
            nonlocal j
            j += 1
            return "full" if w <= 0 or (g > 0 and j % g == 0) else "sliding"

        for i in range(self.n_layers):
            if self.hybrid_pattern:
                c = self.hybrid_pattern[i] if i < len(self.hybrid_pattern) else "-"
                mixer = {"M": "linear", "*": attn() if c == "*" else "", "-": "none", "E": "none"}
                ffn = {"M": "none", "*": "none", "-": "dense", "E": "moe"}
                out.append((mixer[c], ffn[c]))
                continue
            moe = (
                self.n_experts > 1
                and i >= self.first_k_dense
                and (i - self.first_k_dense + 1) % max(self.moe_layer_step, 1) == 0
            )
            out.append((attn(), "moe" if moe else "dense"))
        return tuple(out)

    # ---- parameters ---------------------------------------------------------------------
    @property
    def bytes_per_param(self) -> float:
        """Bytes per parameter of the linear layers (``dtype``)."""
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
        """Projections of one attention layer (MLA: the query down/up, the joint KV down
        projection with the rotary key, the KV up projection, the output)."""
        h, d = self.n_heads, self.d_model
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            r = self.q_lora_rank
            q = d * r + r * h * qk if r else d * h * qk
            kv = d * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + h * self.v_head_dim * d
        kv_dim = self.n_kv_heads * self.head_dim
        q_dim = self.n_heads * self.head_dim
        out = self.d_model * q_dim + 2 * self.d_model * kv_dim + q_dim * self.d_model
        return out + self.n_heads if self.attention_sinks else out

    @property
    def mla_down_params_per_layer(self) -> int:
        """Multi-head latent attention's down projections of one layer: the query's (``d x
        q_lora_rank``, absent without a query LoRA) and the joint KV one with the rotary key
        (``d x (kv_lora_rank + qk_rope_head_dim)``); 0 for other attention. vLLM 0.11 builds them
        unsplit on every tensor-parallel rank (``DeepseekV2MLAAttention``,
        ``vllm/model_executor/models/deepseek_v2.py``: ``fused_qkv_a_proj`` a
        ``MergedColumnParallelLinear(..., disable_tp=True)``, without a query LoRA
        ``kv_a_proj_with_mqa`` a ``ReplicatedLinear``); the up projections (``q_b_proj``,
        ``kv_b_proj``: column) and ``o_proj`` (row) are split."""
        if not self.is_mla:
            return 0
        return self.d_model * (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def router_bytes_per_param(self) -> float:
        """Bytes per parameter of a router: vLLM builds every router unquantized, in the
        activation dtype (DeepSeek's and Qwen3-MoE's ``gate`` a ``ReplicatedLinear(...,
        quant_config=None)``, gpt-oss's ``router`` a bf16 ``torch.nn.Linear``), so 16 bits under
        an 8- or 4-bit checkpoint (whose routers the checkpoints keep in bf16)."""
        return self.bytes_per_param if self.dtype in ("fp32", "bf16", "fp16") else 2.0

    def _tp_extra_params(self, tp: int) -> tuple[int, int]:
        """(linear-layer, router) parameters that a ``tp``-way engine holds beyond one copy of
        the model (:meth:`tp_extra_weight_bytes`)."""
        if tp <= 1:
            return 0, 0
        lin = (tp - 1) * self.n_attn_layers * self.mla_down_params_per_layer
        if not self.is_mla and self.n_kv_heads and tp > self.n_kv_heads:
            lin += (tp - self.n_kv_heads) * self.n_attn_layers * 2 * self.d_model * self.head_dim
        if self.n_linear_layers:
            # a single Mamba-2 group replicated on every rank (ssm_groups_tp): its B and C
            # columns of the input projection and of the convolution, tp - 1 further copies
            lin += self.n_linear_layers * (
                self.linear_state_params_per_layer_tp(tp) - self.linear_state_params_per_layer
            )
        return lin, (tp - 1) * self.n_moe_layers * self.router_params_per_layer

    def tp_extra_weight_bytes(self, tp: int) -> float:
        """Weight bytes that a ``tp``-way tensor-parallel engine holds beyond one copy of the
        model, the parts every rank holds whole (vLLM 0.11): multi-head latent attention's down
        projections (:attr:`mla_down_params_per_layer`) and the MoE routers (replicated,
        16-bit: :attr:`router_bytes_per_param`), ``tp - 1`` further copies each; and, with more
        ranks than KV heads, the K and V projections of one head on every rank
        (``QKVParallelLinear``'s ``num_kv_head_replicas``, as the KV cache:
        :meth:`kv_bytes_per_token_tp`), ``tp - n_kv_heads`` further heads. Every rank reads its
        copies every iteration, so this is also the bytes an iteration reads beyond
        :meth:`weight_bytes_read` (:meth:`weight_bytes_read_tp`). 0 on one GPU."""
        lin, router = self._tp_extra_params(tp)
        return lin * self.bytes_per_param + router * self.router_bytes_per_param

    def tp_extra_flops_per_token(self, tp: int) -> float:
        """Matmul FLOPs per token that a ``tp``-way engine's ranks do beyond
        :attr:`flops_per_token_linear`: every rank multiplies each token by its own copy of the
        replicated parts (:meth:`tp_extra_weight_bytes`). 0 on one GPU."""
        return 2.0 * sum(self._tp_extra_params(tp))

    def weight_bytes_tp(self, tp: int) -> float:
        """Weight bytes the ``tp`` GPUs of one tensor-parallel engine hold together:
        :attr:`weight_bytes` and the replicated parts' further copies
        (:meth:`tp_extra_weight_bytes`)."""
        return self.weight_bytes + self.tp_extra_weight_bytes(tp)

    def weight_bytes_read_tp(self, tokens: float, tp: int) -> float:
        """Weight bytes the ``tp`` GPUs of one engine read together in an iteration over
        ``tokens`` tokens: :meth:`weight_bytes_read` and the replicated parts' further copies."""
        return self.weight_bytes_read(tokens) + self.tp_extra_weight_bytes(tp)

    @property
    def _mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    @property
    def dense_mlp_params(self) -> int:
        """Parameters of a dense layer's MLP (width ``d_ff``)."""
        return self._mlp_matrices * self.d_model * self.d_ff

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert's MLP (width ``d_ff_expert``; the whole MLP of a
        dense model)."""
        return self._mlp_matrices * self.d_model * self.d_ff_expert

    @property
    def shared_expert_params(self) -> int:
        """Parameters of a MoE layer's shared experts together."""
        return self.n_shared_experts * self._mlp_matrices * self.d_model * self.d_ff_shared

    @property
    def router_params_per_layer(self) -> int:
        """The router of one MoE layer."""
        return self.d_model * self.n_experts if self.n_experts > 1 else 0

    @property
    def ssm_d_inner(self) -> int:
        return self.ssm_n_heads * self.ssm_head_dim

    def ssm_groups_tp(self, tp: int) -> int:
        """The Mamba-2 B and C groups a ``tp``-way engine holds together: ``ssm_n_groups``
        split over the ranks when ``tp`` divides them; a single group (the only other case vLLM
        0.11 accepts: :meth:`tp_problem`) is replicated on every rank, ``tp`` copies
        (vllm/model_executor/layers/mamba/mamba_mixer2.py ``MambaMixer2.__init__``: ``n_groups +
        extra_groups_for_head_shards(n_groups, tp)`` in the conv and in_proj widths, the same
        extra groups in the conv state, ``mamba_utils.py`` ``mamba2_state_shape``)."""
        g = self.ssm_n_groups
        return g if tp <= 1 or g % tp == 0 else g + (tp - g)

    def _ssm_conv_dim_tp(self, tp: int) -> int:
        return self.ssm_d_inner + 2 * self.ssm_groups_tp(tp) * self.ssm_state_size

    @property
    def linear_state_params_per_layer(self) -> int:
        """A Mamba-2 mixer: the input projection (z, x, B, C, dt), the depthwise convolution,
        the output projection."""
        if not self.n_linear_layers:
            return 0
        return self.linear_state_params_per_layer_tp(1)

    def linear_state_params_per_layer_tp(self, tp: int) -> int:
        """:attr:`linear_state_params_per_layer` summed over the ``tp`` ranks of an engine: a
        single group's B and C columns (of the input projection and the convolution) on every
        rank (:meth:`ssm_groups_tp`), ``2 (tp - 1) N (d_model + conv_kernel)`` more."""
        if not self.n_linear_layers:
            return 0
        conv_dim = self._ssm_conv_dim_tp(tp)
        in_proj = self.d_model * (self.ssm_d_inner + conv_dim + self.ssm_n_heads)
        conv = conv_dim * self.ssm_conv_kernel
        return in_proj + conv + self.ssm_d_inner * self.d_model

    @property
    def moe_layer_params(self) -> int:
        """One MoE layer's feed-forward block: routed and shared experts, router."""
        return (
            self.n_experts * self.expert_params
            + self.router_params_per_layer
            + self.shared_expert_params
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def expert_params_total(self) -> int:
        """All experts' parameters (routed and shared; the part ``expert_dtype`` applies to)."""
        return self.n_moe_layers * (self.n_experts * self.expert_params + self.shared_expert_params)

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.lm_head_params
        return (
            self.n_attn_layers * self.attn_params_per_layer
            + self.n_linear_layers * self.linear_state_params_per_layer
            + self.n_dense_layers * self.dense_mlp_params
            + self.n_moe_layers * self.moe_layer_params
            + self.embedding_params
            + head
        )

    @property
    def active_params_per_token(self) -> int:
        """Matmul parameters one token passes through, LM head excluded."""
        moe = (
            self.n_active_experts * self.expert_params
            + self.router_params_per_layer
            + self.shared_expert_params
        )
        return (
            self.n_attn_layers * self.attn_params_per_layer
            + self.n_linear_layers * self.linear_state_params_per_layer
            + self.n_dense_layers * self.dense_mlp_params
            + self.n_moe_layers * moe
        )

    @property
    def active_params(self) -> int:
        """Parameters one token uses, embedding row and LM head included (how the Qwen3,
        DeepSeek-V3 and Llama 4 cards count "activated" parameters)."""
        head = 0 if self.tied_embeddings else self.lm_head_params
        return self.active_params_per_token + self.embedding_params + head

    @property
    def weights_label(self) -> str:
        """The weights' precision for a header: ``bf16 weights``, and the parts that differ
        (gpt-oss: ``bf16 weights, experts mxfp4``; an fp8 checkpoint: ``fp8 weights,
        embedding bf16``)."""
        out = f"{self.dtype} weights"
        if self.expert_dtype not in (None, self.dtype) and self.n_experts > 1:
            out += f", experts {self.expert_dtype}"
        if self.embed_dtype not in (None, self.dtype):
            out += f", embedding {self.embed_dtype}"
        return out

    @property
    def _uniform_dtype(self) -> bool:
        return self.expert_dtype in (None, self.dtype) and self.embed_dtype in (None, self.dtype)

    @property
    def _router_dtype_bytes(self) -> float:
        """What the routers' 16 bits add over their count at ``dtype`` (0 for a 16-bit model)."""
        extra = self.router_bytes_per_param - self.bytes_per_param
        return self.n_moe_layers * self.router_params_per_layer * extra

    @property
    def weight_bytes(self) -> float:
        if self._uniform_dtype:
            return self.total_params * self.bytes_per_param + self._router_dtype_bytes
        emb = self.embedding_params + (0 if self.tied_embeddings else self.lm_head_params)
        experts = self.expert_params_total
        rest = self.total_params - emb - experts
        return (
            rest * self.bytes_per_param
            + experts * DTYPE_BYTES[self.expert_dtype or self.dtype]
            + emb * DTYPE_BYTES[self.embed_dtype or self.dtype]
            + self._router_dtype_bytes
        )

    # ---- KV cache and state -------------------------------------------------------------
    @property
    def kv_elements_per_token_layer(self) -> int:
        """Cache elements of one token in one attention layer (MLA: the latent and the rotary
        key; else K and V of every KV head)."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        """KV of one token in every attention layer: what a token costs while it is inside
        every sliding window (beyond it only the global layers keep it,
        :attr:`kv_bytes_per_token_global`)."""
        if self.is_mla:
            return self.n_attn_layers * self.kv_elements_per_token_layer * self.kv_bytes_per_element
        return 2 * self.n_attn_layers * self.n_kv_heads * self.head_dim * self.kv_bytes_per_element

    @property
    def kv_bytes_per_token_global(self) -> float:
        """KV of one token in the global (full-attention) layers."""
        return (
            self.n_global_attn_layers * self.kv_elements_per_token_layer * self.kv_bytes_per_element
        )

    @property
    def state_bytes_per_seq(self) -> float:
        """The fixed state of one sequence in the linear-state layers: the SSM state (heads x
        head dim x state size, at ``ssm_state_dtype``) and the convolution's last
        ``conv_kernel - 1`` inputs (at ``state_dtype``), vLLM's two Mamba-2 state tensors
        (``MambaStateShapeCalculator.mamba2_state_shape``)."""
        return self.state_bytes_per_seq_tp(1)

    def state_bytes_per_seq_tp(self, tp: int) -> float:
        """:attr:`state_bytes_per_seq` summed over the ``tp`` GPUs of an engine: the SSM state
        split by heads; the convolution's window over x, B and C split likewise, but for a
        single group replicated on every rank (:meth:`ssm_groups_tp`), whose B and C columns
        every rank's conv state holds (``mamba2_state_shape``: ``(conv_kernel - 1, (d_inner + 2
        (n_groups + extra) N) / tp)``)."""
        if not self.n_linear_layers:
            return 0.0
        dt = self.state_dtype or self.kv_dtype_resolved
        ssm = self.ssm_d_inner * self.ssm_state_size * DTYPE_BYTES[self.ssm_state_dtype or dt]
        conv = (self.ssm_conv_kernel - 1) * self._ssm_conv_dim_tp(tp) * DTYPE_BYTES[dt]
        return self.n_linear_layers * (ssm + conv)

    def kv_tokens_by_layer(self, context_tokens: int) -> tuple[int, ...]:
        """Tokens of a sequence of ``context_tokens`` that each layer caches (0 for layers
        without attention)."""
        c, w = max(int(context_tokens), 0), self.sliding_window_tokens
        held = {"full": c, "sliding": min(c, w)}
        return tuple(held.get(mixer, 0) for mixer, _ in self.layer_kinds())

    def kv_bytes(self, context_tokens: float) -> float:
        """Bytes one sequence of ``context_tokens`` holds: its KV in the global layers, at most
        the window in the sliding ones, and the constant linear-state state."""
        c = max(float(context_tokens), 0.0)
        per = self.kv_elements_per_token_layer * self.kv_bytes_per_element
        w = min(c, float(self.sliding_window_tokens))
        return per * (self.n_global_attn_layers * c + self.n_sliding_layers * w) + (
            self.state_bytes_per_seq
        )

    def kv_bytes_per_token_at(self, context_tokens: float) -> float:
        """The mean KV bytes per token of a sequence of ``context_tokens`` (state included):
        :attr:`kv_bytes_per_token` for a full-attention model at any context."""
        if not self.n_sliding_layers and not self.n_linear_layers:
            return self.kv_bytes_per_token
        return self.kv_bytes(context_tokens) / max(float(context_tokens), 1.0)

    def _tp_replication(self, tp: int) -> float:
        if self.is_mla:
            return float(tp)  # every rank caches the whole latent (vLLM's MLA)
        return max(1.0, tp / self.n_kv_heads)

    def kv_bytes_per_token_tp(self, tp: int) -> float:
        """K and V of one token summed over the ``tp`` GPUs of a replica: with more GPUs than
        KV heads each GPU holds one head, so ``tp / n_kv_heads`` replicas of each (vLLM); MLA's
        latent is held whole by every GPU."""
        return self.kv_bytes_per_token * self._tp_replication(tp)

    def kv_bytes_tp(self, context_tokens: float, tp: int) -> float:
        """:meth:`kv_bytes` summed over the ``tp`` GPUs of a replica (the linear-state state is
        split by heads, not replicated, but for a single Mamba group's conv columns:
        :meth:`state_bytes_per_seq_tp`)."""
        state = self.state_bytes_per_seq
        return (self.kv_bytes(context_tokens) - state) * self._tp_replication(
            tp
        ) + self.state_bytes_per_seq_tp(tp)

    @property
    def kv_uniform(self) -> bool:
        """Whether a sequence's KV is proportional to its context (no window, no state)."""
        return not self.n_sliding_layers and not self.n_linear_layers

    def max_tokens_in_layer_blocks(self, layer_blocks: int, block_tokens: int) -> int:
        """The longest sequence whose KV fits ``layer_blocks`` blocks of ``block_tokens`` tokens
        of one attention layer, counted as the paged policy holds it (serving/kv_blocks.py
        ``kv_blocks_for``): ``G ceil(L / b)`` on the global layers and ``S min(ceil(L / b),
        ceil(W / b) + 1)`` on the window layers; a multiple of ``b`` (``1 << 62`` when no layer
        is global: the window layers alone never outgrow their cap)."""
        G, S, b = self.n_global_attn_layers, self.n_sliding_layers, block_tokens
        if G + S <= 0:
            return 1 << 62
        q = layer_blocks // (G + S)
        if not S or self.sliding_window_tokens <= 0:
            return q * b
        cap = -(-self.sliding_window_tokens // b) + 1
        if q < cap:  # (G + S) cap > layer_blocks: it cannot reach the cap
            return q * b
        if G == 0:
            return 1 << 62
        return ((layer_blocks - S * cap) // G) * b

    def state_layer_blocks(self, block_tokens: int, tp: int) -> int:
        """The layer-blocks (``block_tokens`` tokens of one attention layer, summed over the
        ``tp`` GPUs) that one sequence's linear-state state holds, as vLLM 0.11's hybrid KV
        cache manager allocates it: every layer's state is padded to whole pages of an attention
        layer (vLLM raises the attention block size until its page holds a Mamba state, then pads
        the state to that page: ``HybridAttentionMambaModelConfig`` in
        vllm/model_executor/models/config.py, ``unify_kv_cache_spec_page_size`` in
        vllm/v1/core/kv_cache_utils.py), the layers of each kind are split into groups of the
        smallest kind's count (the largest's when within 1.25 x), the last group padded
        (``_get_kv_cache_groups_uniform_page_size``), and a linear-state group holds one block
        per request whatever its length (vllm/v1/core/single_type_kv_cache_manager.py
        ``MambaManager.allocate_new_blocks``). With ``block_tokens`` a multiple of vLLM's
        16-token kernel alignment the padded state is exactly vLLM's page. 0 without such
        layers."""
        M = self.n_linear_layers
        if not M:
            return 0
        layer_block = block_tokens * self.kv_bytes_per_token_tp(tp) / max(self.n_attn_layers, 1)
        per_layer = -(-self.state_bytes_per_seq_tp(tp) / M // layer_block)  # ceil, whole blocks
        kinds = [n for n in (self.n_global_attn_layers, self.n_sliding_layers, M) if n]
        group = min(kinds)
        if max(kinds) < 1.25 * group:
            group = max(kinds)
        return int(-(-M // group) * group * per_layer)

    def kv_bytes_per_token_held_tp(
        self, tp: int, tokens: float, window_tokens: float, iterations: float
    ) -> float:
        """KV bytes per token of a replica holding sequences that hold ``tokens`` token-
        iterations (a sequence's context summed over its iterations in flight), ``window_tokens``
        of them within the sliding window (each iteration's context capped at the window) over
        ``iterations`` iterations (means per request: workload/inflight.py
        ``token_iterations``): their bytes over their tokens, ``(e rep (G tokens + S
        window_tokens) + state iterations) / tokens`` with ``e`` one token's K and V in one layer,
        ``rep`` the KV heads' copies over the ``tp`` GPUs (:meth:`kv_bytes_tp` summed over the
        iterations). :meth:`kv_bytes_per_token_tp` exactly when the KV is proportional to the
        context."""
        if self.kv_uniform:
            return self.kv_bytes_per_token_tp(tp)
        per = self.kv_elements_per_token_layer * self.kv_bytes_per_element
        attn = self.n_global_attn_layers * tokens
        if self.n_sliding_layers:
            attn += self.n_sliding_layers * window_tokens
        held = per * self._tp_replication(tp) * attn + self.state_bytes_per_seq_tp(tp) * iterations
        return held / max(tokens, 1.0)

    def tp_problem(self, tp: int) -> str | None:
        """Why ``tp``-way tensor parallelism cannot shard this model (vLLM's rule: the query
        heads divide by tp, and the KV heads either divide by tp or are a divisor of it, so
        that they can be replicated; the linear-state heads divide by tp), or None."""
        if self.n_heads % tp:
            return f"does not divide {self.name}'s {self.n_heads} attention heads"
        kv = self.n_kv_heads
        if not self.is_mla and kv % tp and tp % kv:
            return f"neither divides nor is a multiple of {self.name}'s {kv} KV heads"
        if self.n_linear_layers and self.ssm_n_heads % tp:
            return f"does not divide {self.name}'s {self.ssm_n_heads} linear-state heads"
        g = self.ssm_n_groups
        if self.n_linear_layers and g > 1 and g % tp:
            # MambaMixer2 asserts n_groups % tp == 0 or n_groups == 1 (vllm/model_executor/
            # layers/mamba/mamba_mixer2.py): only a single group is replicated over the ranks
            return f"does not divide {self.name}'s {g} Mamba groups (vLLM replicates only one)"
        return None

    def tp_fix(self, tp: int) -> str:
        ok = [t for t in (1, 2, 4, 8, 16, 32, 64) if self.tp_problem(t) is None]
        return f"use one of {', '.join(map(str, ok))}"

    # ---- FLOPs --------------------------------------------------------------------------
    @property
    def linear_state_flops_per_token(self) -> float:
        """The scan of the linear-state layers per token (state decay, input outer product,
        read-out: 5 FLOPs per state element), besides their projections."""
        return 5.0 * self.n_linear_layers * self.ssm_d_inner * self.ssm_state_size

    @property
    def flops_per_token_linear(self) -> float:
        """Matmul FLOPs of one token through the layers (no attention scores, no LM head;
        the linear-state scan included)."""
        f = 2.0 * self.active_params_per_token
        return f + self.linear_state_flops_per_token if self.n_linear_layers else f

    @property
    def routed_expert_flops_per_token(self) -> float:
        """Matmul FLOPs of one token in its routed experts' grouped GEMMs, over the MoE layers
        (``top_k`` experts each; shared experts, router and attention excluded): the part of
        :attr:`flops_per_token_linear` that ``PowerSpec.moe_compute_w`` prices. 0 for a dense
        model."""
        if self.n_experts <= 1:
            return 0.0
        return 2.0 * self.n_moe_layers * self.n_active_experts * self.expert_params

    @property
    def flops_lm_head(self) -> float:
        return 2.0 * self.lm_head_params

    @property
    def attn_flops_per_pair_layer(self) -> float:
        """FLOPs per (query, key) pair in one attention layer: QK^T and AV (MLA absorbed:
        the scores over the latent and the rotary key, the sum over the latent)."""
        if self.is_mla:
            return 2.0 * self.n_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 4.0 * self.n_heads * self.head_dim

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs per (query, key) pair summed over the attention layers, for a key inside every
        sliding window."""
        if self.is_mla:
            return self.attn_flops_per_pair_layer * self.n_attn_layers
        return 4.0 * self.n_heads * self.head_dim * self.n_attn_layers

    @property
    def attn_flops_per_pair_global(self) -> float:
        """FLOPs per (query, key) pair in the global layers only."""
        return self.attn_flops_per_pair_layer * self.n_global_attn_layers

    def prefill_flops(self, prompt_tokens: int) -> float:
        """FLOPs of one sequence's prefill of ``prompt_tokens`` (full-square attention; a
        sliding layer ``L x min(L, W)``)."""
        p = float(prompt_tokens)
        if not self.n_sliding_layers:
            return (
                p * self.flops_per_token_linear
                + p * p * self.attn_flops_per_pair
                + self.flops_lm_head
            )
        w = min(p, float(self.sliding_window_tokens))
        sliding = self.attn_flops_per_pair_layer * self.n_sliding_layers
        return (
            p * self.flops_per_token_linear
            + p * p * self.attn_flops_per_pair_global
            + p * w * sliding
            + self.flops_lm_head
        )

    def decode_flops(self, n_seqs: int, context_tokens_total: float) -> float:
        """FLOPs of one decode step of ``n_seqs`` sequences attending ``context_tokens_total``
        keys (a sliding layer attends at most the window of each, taken at the mean context)."""
        if not self.n_sliding_layers:
            return n_seqs * (self.flops_per_token_linear + self.flops_lm_head) + (
                context_tokens_total * self.attn_flops_per_pair
            )
        mean = context_tokens_total / max(n_seqs, 1)
        w = n_seqs * min(mean, float(self.sliding_window_tokens))
        sliding = self.attn_flops_per_pair_layer * self.n_sliding_layers
        return (
            n_seqs * (self.flops_per_token_linear + self.flops_lm_head)
            + context_tokens_total * self.attn_flops_per_pair_global
            + w * sliding
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
        simple = (
            not self.hybrid_pattern
            and self._uniform_dtype
            and not self.n_shared_experts
            and self.n_moe_layers in (0, self.n_layers)
        )
        if simple:
            per_layer: float = self.attn_params_per_layer + self.router_params_per_layer
            per_layer += self.expected_experts_touched(tokens) * self.expert_params
            out = (self.n_layers * per_layer + self.lm_head_params) * self.bytes_per_param
            return out + self._router_dtype_bytes
        b = self.bytes_per_param
        fixed = (
            self.n_attn_layers * self.attn_params_per_layer
            + self.n_linear_layers * self.linear_state_params_per_layer
            + self.n_dense_layers * self.dense_mlp_params
            + self.n_moe_layers * self.router_params_per_layer
        )
        experts = self.n_moe_layers * (
            self.expected_experts_touched(tokens) * self.expert_params + self.shared_expert_params
        )
        eb = DTYPE_BYTES[self.expert_dtype or self.dtype]
        hb = DTYPE_BYTES[self.embed_dtype or self.dtype]
        return fixed * b + experts * eb + self.lm_head_params * hb + self._router_dtype_bytes


def model_from_catalog(name: str, dtype: str = "bf16", field: str = "model.name") -> ModelSpec:
    """The :class:`ModelSpec` of catalog model ``name`` (see ``catalog/models.toml``)."""
    from fleetsim.device import catalog

    entry = catalog.model(name, field)
    for key in ("published_params", "published_active_params", "hf_id"):
        entry.pop(key, None)
    return ModelSpec(name=name, dtype=dtype, **entry)
