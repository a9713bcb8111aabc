"""A model's architecture from a local Hugging Face ``config.json`` (``[model] config = "..."``,
``fleetsim latency --model config.json``).

Nothing is downloaded: the file is read from disk (``base/io.py``, bounded). The families read
are the decoders in use today: Llama, Mistral, Mixtral, Qwen2/Qwen3 (dense and MoE), Gemma 3,
gpt-oss, DeepSeek-V2/V3 (and R1), Llama 4, Nemotron-H, and GPT-2/NeoX-style models. A
multimodal file is read for its language model only (``text_config``, ``llm_config`` or
``thinker_config.text_config``); vision, audio and speech towers are out of scope.

================================  ============================================================
ModelSpec field                   config.json keys (first found)
================================  ============================================================
n_layers                          num_hidden_layers, n_layer, num_layers
d_model                           hidden_size, n_embd, d_model
n_heads                           num_attention_heads, n_head
n_kv_heads                        num_key_value_heads, num_kv_heads (default: n_heads; 0 is
                                  refused)
head_dim                          head_dim (default hidden_size / num_attention_heads; MLA:
                                  qk_nope_head_dim + qk_rope_head_dim)
d_ff                              intermediate_size_mlp (Llama 4), intermediate_size, n_inner,
                                  ffn_dim (default 4 x d_model for GPT-2 style models)
vocab_size                        vocab_size
n_experts, n_active_experts       num_local_experts, num_experts, n_routed_experts;
                                  num_experts_per_tok, experts_per_token
d_ff_expert                       moe_intermediate_size, else intermediate_size (Mixtral,
                                  gpt-oss, Llama 4)
n_shared_experts, d_ff_shared     n_shared_experts (DeepSeek), shared_expert_intermediate_size
                                  (Qwen2-MoE: one shared expert), Llama 4's one shared expert
first_k_dense, moe_layer_step     first_k_dense_replace, mlp_only_layers (a leading run);
                                  decoder_sparse_step, moe_layer_freq, interleave_moe_layer_step
sliding_window_tokens             sliding_window (Qwen: only with use_sliding_window), Llama 4's
                                  attention_chunk_size (a chunk holds at most as many tokens);
                                  none when it is not below max_position_embeddings
sliding_global_every              sliding_window_pattern (Gemma 3; 0 refused: transformers
                                  divides by it), a periodic layer_types list,
                                  Llama 4's NoPE layers (every 4th), else Gemma 2's and gpt-oss's
                                  default alternation (every 2nd)
attention_sinks                   gpt-oss (learned sink logits)
kv_lora_rank ... v_head_dim       the same keys (multi-head latent attention)
hybrid_pattern, ssm_*             hybrid_override_pattern; mamba_num_heads, mamba_head_dim,
                                  ssm_state_size, n_groups (a divisor of the heads, as
                                  vLLM's kernels need), conv_kernel (Nemotron-H)
tied_embeddings                   tie_word_embeddings (default: the family's, as transformers)
max_context_tokens                max_position_embeddings, n_positions, seq_length
dtype, expert_dtype, embed_dtype  dtype, else torch_dtype (as transformers; another value is
                                  refused unless quantization_config or [model] dtype sets
                                  the precision); quantization_config: fp8 and
                                  fbgemm_fp8 (linear layers fp8, embedding and LM head bf16;
                                  fp8_block false without weight_block_size),
                                  mxfp4 (experts), modelopt (quant_algo NVFP4: nvfp4, FP8:
                                  per-tensor fp8; exclude_modules / ignore keep whole parts
                                  16-bit; hf_quant_config.json beside the file when it has no
                                  quantization_config, as vLLM reads it), compressed-tensors /
                                  gptq / awq (their bits: 4 int4, 8 int8; compressed-tensors'
                                  8-bit float type fp8);
                                  another method is refused unless [model] dtype / --dtype
                                  gives the precision; an empty quantization_config is none,
                                  as vLLM reads it (quant_method "" -> None)
mlp                               "gelu" (2 matrices) for the ungated GPT-2/NeoX/OPT/Falcon
                                  families and Nemotron-H's squared ReLU, else "swiglu"
================================  ============================================================

Every value is type-checked before it is compared or used, and bounded as the inline
``[model]`` fields are; a wrong one is refused in one line that names the key and its value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fleetsim.base.errors import ScenarioError

#: model_type values whose MLP is two matrices with an ungated activation
UNGATED = {
    "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "mpt", "nemotron_h",
}  # fmt: skip
#: model_type values whose config class defaults to untied embeddings (transformers'
#: PretrainedConfig defaults to tied: a config.json without the key is tied unless its family
#: says otherwise)
UNTIED = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
    "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4_text", "nemotron_h", "qwen3_vl_text",
    "qwen3_vl_moe_text", "qwen3_omni_moe_text",
}  # fmt: skip
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
#: transformers' Gemma3TextConfig defaults, for the keys its published files leave out
GEMMA3_DEFAULTS = {
    "vocab_size": 262_208,
    "head_dim": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 131_072,
}
#: model_type values whose config class alternates sliding and full layers when the file lists
#: no layer_types (global every 2nd layer)
ALTERNATING = {"gemma2": 2, "gpt_oss": 2}
#: the inline [model] bounds (config/scenario.py ArchInt, base/schema.py Tokens)
ARCH_MAX = 10_000_000
TOKENS_MAX = 1_000_000_000


def _show(v: object) -> str:
    """A value for a message, short whatever its size (never builds a long string)."""
    if isinstance(v, str):
        return repr(v[:40] + "...") if len(v) > 40 else repr(v)
    if isinstance(v, list | tuple):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return f"an object of {len(v)} keys"
    if isinstance(v, float):
        return repr(v) if abs(v) < 1e15 else f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**15:
        return f"about 10^{len(str(abs(v))) - 1}" if abs(v) < 10**4000 else "a huge number"
    return repr(v)


def _kind(v: object) -> str:
    return {
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        float: "a float",
        int: "a whole number",
    }.get(type(v), type(v).__name__)


class _Reader:
    """Typed, bounded access to one config dict; errors name ``model.config``."""

    def __init__(self, cfg: dict, where: str, source: str) -> None:
        self.cfg, self.where, self.source = cfg, where, source

    def fail(self, problem: str, fix: str) -> ScenarioError:
        return ScenarioError("model.config", self.where, problem, fix, self.source)

    def num(self, *keys: str, lo: int = 1, hi: int = ARCH_MAX) -> int | None:
        """The first of ``keys`` present (not null) as an int in lo..hi, or None."""
        for k in keys:
            v = self.cfg.get(k)
            if v is None:
                continue
            if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
                v = int(v)  # 128.0: JSON writers differ
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(
                    f"{k} = {_show(v)} is {_kind(v)}", f"give {k} as a whole number in {lo}..{hi}"
                )
            if not lo <= v <= hi:
                raise self.fail(
                    f"{k} = {_show(v)} is outside {lo}..{hi}", f"give {k} in {lo}..{hi}"
                )
            return v
        return None

    def text(self, key: str) -> str | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(f"{key} = {_show(v)} is {_kind(v)}", f"give {key} as a string")
        return v

    def flag(self, key: str) -> bool | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self.fail(f"{key} = {_show(v)} is {_kind(v)}", f"give {key} as true or false")
        return v

    def seq(self, key: str) -> list | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, list):
            raise self.fail(f"{key} = {_show(v)} is {_kind(v)}", f"give {key} as a list")
        return v

    def obj(self, key: str) -> dict | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail(f"{key} = {_show(v)} is {_kind(v)}", f"give {key} as an object")
        return v


def language_model_config(cfg: dict, where: str, source: str = "") -> dict:
    """The language model's part of a (possibly multimodal) config: ``text_config``,
    ``llm_config`` or ``thinker_config.text_config``, with the outer file's dtype,
    quantization and name where the inner one has none."""
    r = _Reader(cfg, where, source)
    inner = r.obj("text_config") or r.obj("llm_config")
    thinker = r.obj("thinker_config")
    if inner is None and thinker is not None:
        inner = _Reader(thinker, where, source).obj("text_config")
    if inner is None:
        return cfg
    outer = ("torch_dtype", "dtype", "quantization_config", "_name_or_path", "tie_word_embeddings")
    return {**{k: cfg[k] for k in outer if k in cfg}, **inner}


#: keys of layers that are neither attention nor a Nemotron-H pattern's Mamba-2 (Qwen3-Next's
#: Gated DeltaNet every few layers, Jamba's attention period): read as attention layers, their
#: KV was counted on every layer
NOT_ATTENTION_KEYS = (
    "full_attention_interval",
    "linear_num_value_heads",
    "attn_layer_period",
    "attn_layer_offset",
)


def _layer_type_names(types: list, r: _Reader) -> None:
    """Refuse a ``layer_types`` entry that is not full or sliding attention (a linear-attention
    or convolution layer, read as attention, would count KV it does not hold)."""
    names = ("full_attention", "sliding_attention")
    if not all(isinstance(t, str) and t in names for t in types):
        bad = next(t for t in types if not (isinstance(t, str) and t in names))
        raise r.fail(
            f"layer_types has {_show(bad)}",
            "use full_attention and sliding_attention (other layer kinds: describe the "
            "model inline)",
        )


def _layer_types_every(types: list, r: _Reader, n_layers: int) -> tuple[bool, int]:
    """(any sliding, global every n) of a ``layer_types`` list, when it is periodic."""
    names = {"full_attention": "F", "sliding_attention": "S"}
    _layer_type_names(types, r)
    if len(types) != n_layers:  # (a short list was read as its pattern, repeated)
        raise r.fail(
            f"layer_types has {len(types)} entries for num_hidden_layers = {n_layers}",
            "give one layer type per layer (check the file)",
        )
    s = "".join(names[t] for t in types)
    if "S" not in s:
        return False, 0
    if "F" not in s:
        return True, 0
    g = s.index("F") + 1
    if s != "".join("F" if (j + 1) % g == 0 else "S" for j in range(len(s))):
        raise r.fail(
            "layer_types is not periodic (every n-th layer global), which fleetsim's model "
            "cannot express",
            "describe the model inline in [model] (an approximation you choose)",
        )
    return True, g


#: the ends of transformers' class names for heads that do not generate text token by token
#: (BertForMaskedLM, RobertaForSequenceClassification, WhisperForConditionalGeneration is caught
#: by is_encoder_decoder): read as a decoder, such a file was simulated as one without a word
NOT_GENERATIVE_HEADS = (
    "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
    "ForQuestionAnswering", "ForMultipleChoice", "ForNextSentencePrediction",
    "ForPreTraining", "ForImageClassification", "ForAudioClassification", "ForCTC",
    "ForSeq2SeqLM", "ForSpeechSeq2Seq", "ForMaskedImageModeling",
)  # fmt: skip
#: model_type values of encoder-only and encoder-decoder families (whose files may list no
#: architectures or a bare ``BertModel``)
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta",
    "deberta-v2", "modernbert", "camembert", "mpnet", "t5", "mt5", "umt5", "bart", "mbart",
    "pegasus", "marian", "whisper", "nllb-moe", "m2m_100", "longt5", "switch_transformers",
}  # fmt: skip


def _refuse_non_decoder(r: _Reader) -> None:
    """Refuse an encoder or encoder-decoder model (BERT, T5, Whisper...): fleetsim simulates
    decoder-only generation (prefill, then one token per iteration), and such a file, which
    also has num_hidden_layers, hidden_size, num_attention_heads and vocab_size, was read as a
    decoder of that shape."""
    model_type = r.cfg.get("model_type")
    archs = r.cfg.get("architectures")
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    what = None
    if r.cfg.get("is_encoder_decoder") is True:
        what = "is_encoder_decoder = true: an encoder-decoder model"
    elif names and all(a.endswith(NOT_GENERATIVE_HEADS) for a in names):
        what = f"architectures = {names[:3]!r}: a model that does not generate text"
    elif isinstance(model_type, str) and model_type.lower() in ENCODER_TYPES:
        what = f"model_type = {_show(model_type)}: an encoder or encoder-decoder family"
    if what is not None:
        raise r.fail(
            f"{what}, which fleetsim (decoder-only generation) does not simulate",
            "give a decoder-only model's config.json (architectures ...ForCausalLM), or "
            "describe the model inline in [model]",
        )


def _quantization(q: dict, r: _Reader, out: dict[str, Any], dtype_given: bool = False) -> None:
    """The weights' precision from ``quantization_config``. ``dtype_given``: the user gave the
    precision (``[model] dtype``, ``--dtype``), so a method fleetsim does not read is left to it
    (the refusal's fix says to give it) instead of refused."""
    qr = _Reader(q, r.where, r.source)
    method = qr.text("quant_method")
    if method in ("fp8", "fbgemm_fp8"):
        # fbgemm_fp8 (Meta's Llama 3.1 FP8 checkpoints): fp8 weights per channel, activations
        # fp8 per token, lm_head not converted (vLLM quantization/fbgemm_fp8.py)
        out["dtype"] = "fp8"
        out["embed_dtype"] = "bf16"  # embedding and LM head are not converted
        if method == "fbgemm_fp8" or q.get("weight_block_size") is None:
            # per-tensor / per-channel scales: no 128 x 128 blocks (vLLM Fp8Config:
            # weight_block_size None, Fp8MoEMethod.block_quant False)
            out["fp8_block"] = False
    elif method == "mxfp4":
        out["expert_dtype"] = "mxfp4"  # gpt-oss: attention, router, embedding stay bf16
    elif method in ("modelopt", "modelopt_fp4"):
        _modelopt(q, r, out, dtype_given)
    elif method in ("gptq", "awq", "compressed-tensors"):
        bits = qr.num("bits", "num_bits", lo=1, hi=64)
        kind = None  # compressed-tensors: the weights' number type ("int" or "float")
        strategy = None  # compressed-tensors: "tensor", "channel", "group" or "block"
        if bits is None and method == "compressed-tensors":
            groups = qr.obj("config_groups") or {}
            for g in groups.values():
                w = g.get("weights") if isinstance(g, dict) else None
                if isinstance(w, dict):
                    wr = _Reader(w, r.where, r.source)
                    bits = wr.num("num_bits", lo=1, hi=64)
                    kind = wr.text("type")
                    strategy = wr.text("strategy")
                    break
        if kind == "float" and bits == 8:  # FP8 W8A8 ("float-quantized"): not int8
            out["dtype"] = "fp8"
            out["embed_dtype"] = "bf16"
            if strategy != "block":  # (per-tensor / per-channel: RedHatAI's FP8-dynamic)
                out["fp8_block"] = False
            return
        if kind == "float" or bits not in (4, 8):
            if dtype_given:
                return
            what = f"{bits}-bit float weights (e.g. NVFP4)" if kind == "float" else None
            raise r.fail(
                f"quantization_config has {method} with "
                + (what or f"bits = {_show(bits)}")
                + ", which fleetsim does not read",
                "give [model] dtype (int4, int8, fp8) for these weights",
            )
        out["dtype"] = "int4" if bits == 4 else "int8"
        out["embed_dtype"] = "bf16"
    elif not dtype_given:
        raise r.fail(
            f"quantization_config.quant_method = {_show(method)} is not one fleetsim reads "
            "(fp8, fbgemm_fp8, mxfp4, modelopt, gptq, awq, compressed-tensors)",
            "give [model] dtype (--dtype for fleetsim latency), or remove quantization_config",
        )


#: ModelOpt's ``quant_algo`` values vLLM 0.11 runs (``QUANT_ALGOS = ["FP8", "NVFP4"]`` in
#: vllm/model_executor/layers/quantization/modelopt.py) and the precision each gives the
#: weights it quantises: ``ModelOptFp8Config`` per-tensor fp8 (``ModelOptFp8LinearMethod``:
#: one fp32 scale a tensor, ``Fp8LinearOp`` per-tensor activations; no 128 x 128 blocks),
#: ``ModelOptNvFp4Config`` NVFP4 (e2m1 weights, one e4m3 scale per 16, one fp32 scale a tensor)
MODELOPT_ALGOS = {"FP8": "fp8", "NVFP4": "nvfp4"}
#: ModelOpt's ``exclude_modules`` entries that name parts fleetsim does not quantise anyway
#: (the LM head and embedding stay 16-bit: ``embed_dtype``; vision towers and the
#: multi-token-prediction layer are out of scope), or a mixture of experts' router, which vLLM
#: builds unquantised whatever the checkpoint says (``ReplicatedLinear(..., quant_config=None)``
#: of ``DeepseekV2MoE.gate``, ``Qwen3MoeSparseMoeBlock.gate``, ``Llama4MoE.router_gate``)
_MODELOPT_16BIT = re.compile(
    r"(lm_head|embed|vision|visual|mm_projector|multi_modal|mtp|router|shared_expert_gate|"
    r"(^|\.)gate\*?$|mlp\.gate\b(?!_))"
)
_ATTN = re.compile(r"(self_attn|attention|attn)(\.([a-z_]+))?")
_LAYER = re.compile(r"layers\.(\d+)(\.|\*|$)")


def _modelopt_excluded(
    patterns: list, out: dict[str, Any], r: _Reader, key: str
) -> tuple[bool, bool]:
    """(whether every attention layer's projections stay 16-bit, whether every MoE layer's
    experts do) from ModelOpt's excluded-module patterns (``exclude_modules`` of
    hf_quant_config.json, ``ignore`` of config.json: fnmatch wildcards over vLLM's module
    names, ``ModelOptNvFp4Config.is_layer_excluded``). A pattern naming a layer index at or
    beyond ``n_layers`` is the multi-token-prediction layer (DeepSeek's layer 61), not
    simulated. A part excluded in some layers only, some of attention's projections only, or a
    pattern fleetsim cannot place is refused: fleetsim gives one precision to the attention
    and dense layers (``dtype``) and one to the experts (``expert_dtype``)."""
    n_layers = out["n_layers"]
    mla = out.get("kv_lora_rank", 0) > 0
    if mla:
        q = ("q_a_proj", "q_b_proj") if out.get("q_lora_rank") else ("q_proj",)
        projections = {*q, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    else:
        projections = {"q_proj", "k_proj", "v_proj", "o_proj"}
    pattern = out.get("hybrid_pattern") or ""
    attn_layers = (
        {i for i, c in enumerate(pattern) if c == "*"} if pattern else set(range(n_layers))
    )
    attn: dict[int, set[str]] = {}  # layer -> excluded projections ("*": all)
    experts: set[int] = set()
    fix = "give [model] dtype and expert_dtype for this checkpoint, or inline [model] fields"
    for p in patterns:
        if not isinstance(p, str):
            raise r.fail(f"quantization_config.{key} holds {_show(p)}, not a string", fix)
        name = p.strip().lower()
        m = _LAYER.search(name)
        layers = {int(m.group(1))} if m else set(range(n_layers))
        if m and int(m.group(1)) >= n_layers:
            continue  # the multi-token-prediction layer
        if _MODELOPT_16BIT.search(name):
            continue
        a = _ATTN.search(name)
        if a:
            proj = a.group(3)
            if proj == "qkv_proj":
                got = {"q_proj", "k_proj", "v_proj"}
            else:
                got = {proj} if proj else {"*"}
            for i in layers:
                attn.setdefault(i, set()).update(got)
        elif "expert" in name or re.search(r"(mlp|feed_forward)\*?$", name):
            if "shared_expert" in name:
                raise r.fail(
                    f"quantization_config.{key} keeps the shared experts 16-bit ({_show(p)}), "
                    "which fleetsim does not separate from the routed experts (expert_dtype)",
                    fix,
                )
            experts |= layers
        else:
            raise r.fail(
                f"quantization_config.{key} excludes {_show(p)}, a module fleetsim cannot place "
                "(it reads attention, experts, router, LM head, embedding and vision entries)",
                fix,
            )
    full = {i for i, s in attn.items() if "*" in s or projections <= s}
    attn_16 = bool(attn_layers) and attn_layers <= full
    if attn and not attn_16:
        some = sorted(attn)[:3]
        raise r.fail(
            f"quantization_config.{key} keeps attention 16-bit in part only (layers "
            f"{some}{'...' if len(attn) > 3 else ''}: some layers or some projections), which "
            "fleetsim's one precision for the attention layers (dtype) does not represent",
            fix,
        )
    # the MoE layers (ModelSpec.layer_kinds: after first_k_dense, every moe_layer_step-th)
    k0, step = out.get("first_k_dense", 0), out.get("moe_layer_step", 1)
    moe = set()
    if out.get("n_experts", 1) > 1:
        moe = {i for i in range(k0, n_layers) if (i - k0 + 1) % max(step, 1) == 0}
    if pattern:
        moe = {i for i, c in enumerate(pattern) if c == "E"}
    experts_16 = bool(moe) and moe <= experts
    if moe and experts & moe and not experts_16:
        raise r.fail(
            f"quantization_config.{key} keeps the experts 16-bit in {len(experts & moe)} of "
            f"{len(moe)} MoE layers, which fleetsim's one expert precision does not represent",
            fix,
        )
    return attn_16, experts_16


def _modelopt(q: dict, r: _Reader, out: dict[str, Any], dtype_given: bool) -> None:
    """A ModelOpt checkpoint's precision per part, as vLLM 0.11 reads it
    (``ModelOptFp8Config`` / ``ModelOptNvFp4Config.from_config``): the ``quantization`` object
    of hf_quant_config.json (``quant_algo``, ``exclude_modules``, ``group_size``) or the
    config.json form (``quant_algo``, ``ignore``, ``group_size`` beside ``quant_method``).
    The quantised layers take ``quant_algo``'s precision (:data:`MODELOPT_ALGOS`); the
    attention layers stay 16-bit when ``exclude_modules`` lists all of them (NVIDIA's
    DeepSeek-R1 FP4 checkpoints; the dense MLPs of its first layers are then counted 16-bit
    too: fleetsim has one precision for both); the embedding and the LM head stay 16-bit
    (vLLM 0.11 quantises neither: ``get_quant_method`` returns a method for ``LinearBase``,
    attention and ``FusedMoE`` layers only). The KV cache is not changed:
    ``kv_cache_quant_algo`` ships fp8 scales, which vLLM uses with ``--kv-cache-dtype fp8``
    (``[model] kv_dtype``)."""
    inner = q.get("quantization")
    nested = isinstance(inner, dict)
    qr = _Reader(inner if isinstance(inner, dict) else q, r.where, r.source)
    algo = (qr.text("quant_algo") or "").upper()
    key = "exclude_modules" if nested else "ignore"
    if algo not in MODELOPT_ALGOS:
        if dtype_given:
            return
        raise r.fail(
            f"quantization_config has ModelOpt's quant_algo = {_show(algo or None)}, which "
            "vLLM 0.11 does not run (it reads FP8 and NVFP4)",
            "give [model] dtype (--dtype for fleetsim latency), or a ModelOpt FP8 / NVFP4 "
            "checkpoint",
        )
    part = MODELOPT_ALGOS[algo]
    group = qr.num("group_size", lo=1, hi=ARCH_MAX)
    if part == "nvfp4" and group not in (None, 16):
        raise r.fail(
            f"quantization_config.group_size = {group} with NVFP4: NVFP4 scales blocks of 16 "
            "(vLLM's scaled_fp4_quant and its FP4 GEMMs take no other size)",
            "check the file: NVFP4 checkpoints have group_size 16",
        )
    attn_16, experts_16 = _modelopt_excluded(qr.seq(key) or [], out, r, key)
    half = out.get("dtype") if out.get("dtype") in ("bf16", "fp16") else "bf16"
    out["dtype"] = half if attn_16 else part
    if out.get("n_experts", 1) > 1:
        out["expert_dtype"] = half if experts_16 else part
    out["embed_dtype"] = half
    if part == "fp8":
        out["fp8_block"] = False  # one scale a tensor (ModelOptFp8LinearMethod)


def architecture_from_hf(
    cfg: dict, where: str, source: str = "", dtype_given: bool = False
) -> dict[str, Any]:
    """The :class:`ModelSpec` fields (and ``dtype`` when the file gives one) of a parsed
    ``config.json``; a ScenarioError naming ``model.config`` for what it lacks, a value of the
    wrong type or out of bounds, or what the model cannot represent. ``dtype_given``: the
    caller has the weights' precision from the user (see :func:`_quantization`)."""
    top = _Reader(cfg, where, source)
    if not isinstance(cfg, dict):
        raise top.fail("is not a JSON object", "give the model's config.json")
    _refuse_non_decoder(top)
    cfg = language_model_config(cfg, where, source)
    r = _Reader(cfg, where, source)
    model_type = r.text("model_type") or ""
    if model_type == "gemma3_text":
        cfg = {**GEMMA3_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        r = _Reader(cfg, where, source)
    out: dict[str, Any] = {
        "n_layers": r.num("num_hidden_layers", "n_layer", "num_layers"),
        "d_model": r.num("hidden_size", "n_embd", "d_model"),
        "n_heads": r.num("num_attention_heads", "n_head"),
        "vocab_size": r.num("vocab_size"),
    }
    keys = {
        "n_layers": "num_hidden_layers",
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "vocab_size": "vocab_size",
    }
    missing = [keys[k] for k, v in out.items() if v is None]
    if missing:
        raise r.fail(
            f"has no {', '.join(missing)}",
            "give a decoder-only model's config.json, or an inline [model] architecture",
        )
    n_layers, d_model, n_heads = out["n_layers"], out["d_model"], out["n_heads"]
    mla = r.num("kv_lora_rank", lo=0) or 0
    # 0 has its own line; any other value is checked in 1.. (the range a wrong type's fix
    # names: "0..10000000" named 0, which is then refused)
    kv_raw = next(
        (r.cfg[k] for k in ("num_key_value_heads", "num_kv_heads") if r.cfg.get(k) is not None),
        None,
    )
    zero = not isinstance(kv_raw, bool) and isinstance(kv_raw, int | float) and kv_raw == 0
    kv = 0 if zero else r.num("num_key_value_heads", "num_kv_heads")
    if kv == 0:
        raise r.fail(
            "num_key_value_heads = 0: a model has at least one KV head",
            "give num_key_value_heads (num_attention_heads when there is no GQA)",
        )
    kv = n_heads if kv is None or mla else kv
    if n_heads % kv:
        raise r.fail(
            f"num_attention_heads = {n_heads} does not divide by num_key_value_heads = {kv}",
            "check the file: query heads come in whole groups per KV head",
        )
    out["n_kv_heads"] = kv

    # ---- mixture of experts -------------------------------------------------------------
    n_experts = r.num("num_local_experts", "num_experts", "n_routed_experts", lo=0)
    top_k = r.num("num_experts_per_tok", "experts_per_token", lo=0)
    if n_experts == 0 and top_k:  # was read as a dense model
        raise r.fail(
            f"has 0 experts but num_experts_per_tok = {top_k}",
            "give the number of experts (num_experts / num_local_experts / n_routed_experts)",
        )
    n_experts = n_experts or 1
    out["n_experts"] = n_experts
    active = top_k if n_experts > 1 else 1
    if not active:  # 0 or absent: was read as one expert per token
        raise r.fail(
            f"has {n_experts} experts but num_experts_per_tok = {_show(active)}",
            "give num_experts_per_tok, the experts each token is routed to (1 or more)",
        )
    out["n_active_experts"] = active
    if out["n_active_experts"] > n_experts:
        raise r.fail(
            f"num_experts_per_tok = {active} is more than the {n_experts} experts",
            "check the file",
        )
    dense_ff = r.num("intermediate_size_mlp", "intermediate_size", "n_inner", "ffn_dim")
    moe: dict[str, Any] = {}
    if n_experts > 1:
        expert_ff = r.num("moe_intermediate_size", "intermediate_size")
        if model_type == "llama4_text":
            expert_ff = r.num("intermediate_size")
            moe["n_shared_experts"] = 1  # Llama 4's MoE layers add one shared expert
        shared = r.num("n_shared_experts", lo=0)
        shared_ff = r.num("shared_expert_intermediate_size", lo=0)
        if shared:
            moe["n_shared_experts"] = shared
        elif shared_ff:  # Qwen2-MoE: one shared expert of this width
            moe["n_shared_experts"] = 1
            moe["d_ff_shared"] = shared_ff
        k = r.num("first_k_dense_replace", lo=0, hi=n_layers) or 0
        only = r.seq("mlp_only_layers") or []
        if only:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
                raise r.fail("mlp_only_layers holds a non-integer", "give layer indices")
            if sorted(only) != list(range(len(only))):
                raise r.fail(
                    f"mlp_only_layers = {_show(only)} is not a leading run of layers, which "
                    "fleetsim's model cannot express",
                    "describe the model inline in [model] (an approximation you choose)",
                )
            k = max(k, len(only))
        step = r.num("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step") or 1
        if k:
            moe["first_k_dense"] = k
        if step != 1:
            moe["moe_layer_step"] = step
        all_moe = not k and step == 1
        if expert_ff is None:
            raise r.fail("has experts but no moe_intermediate_size", "give the model's config")
        if all_moe or dense_ff is None:
            dense_ff = expert_ff  # no dense layer: one width
        elif expert_ff != dense_ff:
            moe["d_ff_expert"] = expert_ff
        if moe.get("n_shared_experts") and "d_ff_shared" not in moe and expert_ff != dense_ff:
            moe["d_ff_shared"] = expert_ff
    if dense_ff is None and model_type in UNGATED:
        dense_ff = 4 * d_model
    if dense_ff is None:
        raise r.fail("has no intermediate_size", "give the model's config.json")
    out["d_ff"] = dense_ff
    out.update(moe)

    # ---- attention ----------------------------------------------------------------------
    if mla:
        out["kv_lora_rank"] = mla
        out["q_lora_rank"] = r.num("q_lora_rank", lo=0) or 0
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = r.num(key, lo=0)
            if v is None:
                raise r.fail(f"has kv_lora_rank but no {key}", "give the model's config.json")
            out[key] = v
    else:
        head_dim = r.num("head_dim")
        if head_dim is not None and head_dim * n_heads != d_model:
            out["head_dim"] = head_dim
        elif head_dim is None and d_model % n_heads:
            raise r.fail(
                f"has no head_dim, and hidden_size = {d_model} does not divide by "
                f"num_attention_heads = {n_heads} to give one",
                "give head_dim (the width of one attention head), or check hidden_size",
            )
    window = r.num("sliding_window", lo=0, hi=TOKENS_MAX) or 0
    if r.flag("use_sliding_window") is False:
        window = 0  # Qwen: the key is present, the window is off
    elif r.flag("use_sliding_window"):
        raise r.fail(
            "use_sliding_window = true (windows above max_window_layers), which fleetsim's "
            "model cannot express",
            "describe the model inline in [model] (an approximation you choose)",
        )
    every = 0
    types = r.seq("layer_types")
    if types is not None and model_type != "llama4_text":
        _layer_type_names(types, r)  # (with or without a window)
    hybrid_key = next((k for k in NOT_ATTENTION_KEYS if r.cfg.get(k) is not None), None)
    if hybrid_key is not None:
        raise r.fail(
            f"has {hybrid_key} = {_show(r.cfg[hybrid_key])}: layers that are not attention "
            f"(model_type {_show(model_type)}: linear attention or state-space layers), which "
            "the reader does not place",
            "describe the model inline in [model] (hybrid_pattern and the ssm_* fields: an "
            "approximation you choose)",
        )
    if model_type == "llama4_text":
        window = r.num("attention_chunk_size", lo=0, hi=TOKENS_MAX) or 0
        every = 4 if window else 0  # every 4th layer is a global NoPE layer
    elif types is not None and window:
        sliding, every = _layer_types_every(types, r, n_layers)
        window = window if sliding else 0
    elif window:
        # a family whose config class makes layer_types when the file has none: Gemma 2 and
        # gpt-oss alternate sliding and full layers (transformers' Gemma2Config, GptOssConfig:
        # "sliding_attention" if (i + 1) % 2 else "full_attention"); they were read all windowed.
        # Any other file with a window and no layer_types (Mistral-7B-v0.1: 4096; Phi-3-mini-4k:
        # 2047) is windowed on every layer, as vLLM 0.11 runs it: is_interleaved() is false
        # without layer_types (vllm/transformers_utils/config.py), so
        # EngineArgs.create_engine_config sets CacheConfig.sliding_window =
        # ModelConfig.get_sliding_window() (the file's sliding_window, None when
        # use_sliding_window is false: get_hf_config_sliding_window, vllm/config/model.py)
        # for the whole model (vllm/engine/arg_utils.py), and each Attention layer without a
        # per_layer_sliding_window takes it ("model-level sliding window",
        # vllm/attention/layer.py Attention.__init__). LlamaAttention, which both run on (the
        # model registry maps MistralForCausalLM to LlamaForCausalLM; models/phi3.py's
        # Phi3ForCausalLM subclasses it), sets a per-layer window only from layer_types
        # (vllm/model_executor/models/llama.py: "if layer_types := getattr(config, ...)").
        #
        # Gemma 3 without layer_types: transformers' Gemma3TextConfig makes them from
        # sliding_window_pattern (default 6: GEMMA3_DEFAULTS), layer i global when (i + 1) %
        # pattern == 0 (models/gemma3/configuration_gemma3.py; vLLM's models/gemma3.py reads
        # the layer_types it makes). A pattern of 0 is not "no global layer" there: the modulo
        # divides by zero and transformers cannot load the file, so it is refused (it was
        # read as every layer windowed).
        pattern0 = r.cfg.get("sliding_window_pattern")
        if type(pattern0) is int and pattern0 == 0:
            raise r.fail(
                "sliding_window_pattern = 0: transformers makes layer i global when (i + 1) % "
                "sliding_window_pattern == 0 (Gemma3TextConfig), which divides by zero; it "
                "cannot load this file",
                "give sliding_window_pattern >= 1 (6 for Gemma 3: every 6th layer global; 1: "
                "every layer global), or layer_types",
            )
        every = r.num("sliding_window_pattern", lo=1, hi=ARCH_MAX) or ALTERNATING.get(model_type, 0)
    ctx = r.num("max_position_embeddings", "n_positions", "seq_length", hi=TOKENS_MAX)
    if window and ctx is not None and window >= ctx:
        # a window no request can fill (Phi-3-mini-128k: 262,144 over a 131,072 context): the
        # layers hold and attend the whole context, as full attention does
        window = 0
    if window:
        out["sliding_window_tokens"] = window
        if every:
            out["sliding_global_every"] = every
    if model_type == "gpt_oss":
        out["attention_sinks"] = True

    # ---- hybrid stacks ------------------------------------------------------------------
    pattern = r.text("hybrid_override_pattern")
    if pattern is not None:
        if len(pattern) != n_layers or set(pattern) - {"M", "*", "-", "E"}:
            raise r.fail(
                f"hybrid_override_pattern = {_show(pattern)} is not {n_layers} characters of "
                "M (Mamba), * (attention), - (MLP), E (MoE)",
                "check the file",
            )
        out["hybrid_pattern"] = pattern
        if "M" in pattern:
            out["ssm_n_heads"] = r.num("mamba_num_heads")
            out["ssm_head_dim"] = r.num("mamba_head_dim")
            out["ssm_state_size"] = r.num("ssm_state_size", "mamba_d_state")
            out["ssm_n_groups"] = r.num("n_groups", "mamba_n_groups") or 1
            out["ssm_conv_kernel"] = r.num("conv_kernel", "mamba_d_conv") or 4
            if None in (out["ssm_n_heads"], out["ssm_head_dim"], out["ssm_state_size"]):
                raise r.fail(
                    "has Mamba layers but no mamba_num_heads, mamba_head_dim or ssm_state_size",
                    "give the model's config.json",
                )
            heads, groups = out["ssm_n_heads"], out["ssm_n_groups"]
            if heads % groups:
                # vLLM's Mamba-2 kernels share one group of B and C among heads // groups
                # heads and assert it whole: selective_state_update ("nheads must be divisible
                # by ngroups", vllm/model_executor/layers/mamba/ops/mamba_ssm.py) for decode,
                # the chunked scan (ops/ssd_chunk_state.py, ssd_chunk_scan.py: nheads % ngroups
                # == 0) for prefill; MambaMixer2 (layers/mamba/mamba_mixer2.py) hands them
                # its n_groups groups, and maps its heads to them by num_heads // n_groups
                g_key = "n_groups" if r.cfg.get("n_groups") is not None else "mamba_n_groups"
                raise r.fail(
                    f"{g_key} = {groups} does not divide mamba_num_heads = {heads}: vLLM's "
                    "Mamba-2 kernels give each group of B and C a whole number of heads",
                    f"check the file: {g_key} is a divisor of mamba_num_heads (8 in Nemotron-H)",
                )

    out["mlp"] = "gelu" if model_type in UNGATED else "swiglu"
    tied = r.flag("tie_word_embeddings")
    out["tied_embeddings"] = bool(model_type not in UNTIED if tied is None else tied)
    if ctx is not None:
        out["max_context_tokens"] = ctx
    # transformers keeps ``dtype`` when a file has both it and the older ``torch_dtype``
    # (PretrainedConfig.__init__, src/transformers/configuration_utils.py: "If both are
    # provided, keep `dtype`"); a null ``dtype`` falls back to ``torch_dtype``
    dt_key = "dtype" if cfg.get("dtype") is not None else "torch_dtype"
    dt = r.text(dt_key)
    if dt in DTYPES:
        out["dtype"] = DTYPES[dt]
    q = r.obj("quantization_config")
    if q:
        _quantization(q, r, out, dtype_given)
    if dt is not None and dt not in DTYPES and not dtype_given and "dtype" not in out:
        # (was read as bf16 without a word; a quantization_config that sets the linear
        # layers' precision, or the user's [model] dtype, decides it without this key)
        raise r.fail(
            f"{dt_key} = {_show(dt)} is not a precision fleetsim reads (bfloat16, float16, "
            "half, float32, float)",
            "give [model] dtype (--dtype for fleetsim latency): bf16, fp16, fp32, fp8, int8 "
            "or int4",
        )
    return out


def hf_model_name(cfg: object, path: Path) -> str:
    """A model's name: ``Org/Name`` of a Hugging Face cache folder
    (``models--Org--Name/snapshots/HASH/config.json``: the repository the file was downloaded
    from), else ``_name_or_path`` when it is a Hugging Face id, else the file's folder. The cache
    folder comes first because a fine-tune's config.json often carries its base model's id, or
    a training run's relative path, in ``_name_or_path`` (transformers saves whatever the
    config was loaded from)."""
    for part in reversed(path.parts):
        m = re.fullmatch(r"models--([\w.-]+)--([\w.-]+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    if isinstance(cfg, dict):
        inner = language_model_config(cfg, str(path))
        n = inner.get("_name_or_path")
        if isinstance(n, str) and re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", n):
            return n
    return path.parent.name or path.stem


def read_hf_config_named(
    path: str | Path, source: str = "", written: str = "", dtype_given: bool = False
) -> tuple[dict[str, Any], str]:
    """(:func:`architecture_from_hf`, :func:`hf_model_name`) of the file at ``path``."""
    from fleetsim.base import io

    p = Path(path)
    if p.is_dir():  # the model's folder (a Hugging Face snapshot), as ``latency --model``
        found = config_in_folder(p)
        if found is None:
            n = snapshots_without_ref(p)
            raise ScenarioError(
                "model.config",
                written or str(p),
                f"{p} is a Hugging Face cache folder with {n} snapshots and no refs/main "
                "naming one of them"
                if n
                else f"{p} is a folder with no config.json",
                "give the snapshot's folder (snapshots/HASH) or its config.json"
                if n
                else "give the path of the model's config.json, or of the folder that holds it",
                source,
            )
        p = found
    if not p.exists() and not p.is_symlink():
        # a Hugging Face id written where the path belongs, or a path into data/models from
        # another folder: name the checkout's file where it has one
        m = re.search(r"(?:^|data/models/)([\w.-]{1,96}/[\w.-]{1,96})(?:/config\.json)?$", written)
        local = repo_config_path(m.group(1)) if m else None
        hint = f"; this checkout has {local}" if local else ""
        if m and not local and "data/models/" in written:
            # a folder of data/models mistyped (gemma-3-12b for gemma-3-12b-it): the one meant
            from fleetsim.base.names import closest

            close = closest(m.group(1), checkout_ids())
            if close is not None:
                hint = f"; did you mean {written.replace(m.group(1), close)!r}?"
        if re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", written) and not written.endswith(".json"):
            # (a path is read as the path it is, not as an id: a typo must not silently read
            # another file; [model] name = "ORG/NAME" reads the checkout's copy)
            hint = f"; {written!r} looks like a Hugging Face id, and fleetsim never downloads{hint}"
            if local:
                hint += f' (or [model] name = "{written}" reads it)'
        raise ScenarioError(
            "model.config",
            written or str(p),
            f"no such file: {p}",
            "give the path of the model's config.json (relative to the "
            # (sampling._resolve_path: a scenario given as a dict or text has no file)
            + ("scenario file" if source else "working directory")
            + f"){hint}",
            source,
        )
    cfg, _ = io.load_json(
        p,
        "model.config",
        fix="give the model's config.json as Hugging Face writes it: one JSON object",
    )
    cfg = with_hf_quant_config(cfg, p)
    return architecture_from_hf(cfg, str(p), source, dtype_given), hf_model_name(cfg, p)


def with_hf_quant_config(cfg: Any, path: Path) -> Any:
    """``cfg`` with the ``hf_quant_config.json`` beside ``path`` as its quantization_config when
    the file has none: ModelOpt 0.29 and before saved the quantization there, not in
    config.json, and vLLM reads it in that case (vllm/transformers_utils/config.py:
    ``quantization_config is None and file_or_path_exists(model, "hf_quant_config.json")``;
    ModelOpt's ``{"producer": {"name": "modelopt"}, "quantization": {...}}`` is then read by
    ``ModelOptNvFp4Config.from_config``). A config.json that has a quantization_config keeps
    it, as vLLM does."""
    from fleetsim.base import io

    side = path.parent / "hf_quant_config.json"
    if not isinstance(cfg, dict) or not side.is_file():
        return cfg
    if language_model_config(cfg, str(path)).get("quantization_config") is not None:
        return cfg
    q, _ = io.load_json(
        side,
        "model.config",
        fix="give hf_quant_config.json as ModelOpt writes it: one JSON object",
    )
    if not isinstance(q, dict) or not isinstance(q.get("quantization"), dict):
        raise ScenarioError(
            "model.config",
            str(side),
            'is not ModelOpt\'s hf_quant_config.json (no "quantization" object)',
            "give the checkpoint's hf_quant_config.json, or remove it from the folder",
        )
    return {**cfg, "quantization_config": {"quant_method": "modelopt", **q}}


def config_in_folder(folder: Path) -> Path | None:
    """The config.json a model folder holds: ``folder/config.json``, or for a Hugging Face cache
    repository folder (``models--Org--Name``, holding ``refs/main`` and ``snapshots/HASH/``) the
    snapshot ``refs/main`` names, else its only snapshot; None when there is none."""
    if (folder / "config.json").exists():
        return folder / "config.json"
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file():
        from fleetsim.base.errors import UserError
        from fleetsim.base.io import read_bytes

        try:  # a ref is one commit hash; anything else falls back to the only snapshot
            h = read_bytes(ref, "refs/main", limit=4096).decode("utf-8", "replace").strip()
        except UserError:
            h = ""
        if re.fullmatch(r"[0-9a-fA-F]{7,64}", h) and (snaps / h / "config.json").exists():
            return snaps / h / "config.json"
    found = sorted(c for c in snaps.glob("*/config.json"))
    return found[0] if len(found) == 1 else None


def snapshots_without_ref(folder: Path) -> int:
    """The snapshots holding a config.json of a Hugging Face cache repository folder when
    :func:`config_in_folder` cannot pick one (several, and no ``refs/main`` naming one of
    them); 0 otherwise."""
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return 0
    n = len(list(snaps.glob("*/config.json")))
    return n if n > 1 else 0


def read_hf_config(path: str | Path, source: str = "", written: str = "") -> dict[str, Any]:
    """:func:`architecture_from_hf` of the file at ``path`` (already resolved; ``written`` is
    the path as the scenario gives it; bounded reading, one clear line on a bad file)."""
    return read_hf_config_named(path, source, written)[0]


def repo_config_path(hf_id: str) -> Path | None:
    """``data/models/ORG/NAME/config.json`` of a source checkout, when it holds ``hf_id``."""
    if not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", hf_id):
        return None
    p = Path(__file__).resolve().parents[2] / "data" / "models" / hf_id / "config.json"
    return p if p.is_file() else None


def checkout_ids() -> list[str]:
    """The Hugging Face ids whose config.json a source checkout ships in data/models
    (``ORG/NAME``, sorted; empty for an installed package without them)."""
    root = Path(__file__).resolve().parents[2] / "data" / "models"
    return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in root.glob("*/*/config.json"))


def closest_model(name: str, catalog_names: Iterable[str]) -> str | None:
    """The model a mistyped ``[model] name`` most likely meant: a catalog name, or a Hugging
    Face id of the checkout by its name part (``llama-4-scout`` ->
    ``meta-llama/Llama-4-Scout-17B-16E-Instruct``, ``deepseek-r1`` ->
    ``deepseek-ai/DeepSeek-R1-0528``: today's models are data/models ids, not catalog names);
    :func:`fleetsim.base.names.closest` over both, a catalog name first where both begin
    alike."""
    from fleetsim.base.names import closest

    names = list(catalog_names)
    ids = {i.split("/", 1)[1]: i for i in checkout_ids()}
    known = names + [k for k in ids if k not in names]
    hit = closest(name.rsplit("/", 1)[-1], known)
    return ids.get(hit, hit) if hit is not None and hit not in names else hit


def int8_weight_only(path: Path) -> bool:
    """Whether the config.json at ``path`` (already read once by the model) quantizes its
    linear layers to 8-bit integers with GPTQ or AWQ. The reader gives them ``dtype = int8``,
    which the step-time model runs at the GPU's int8 peak (device/latency.py compute_peak),
    but vLLM runs these checkpoints weight-only, the activations in 16 bits: GPTQ's
    ``GPTQLinearMethod.apply`` (vllm/model_executor/layers/quantization/gptq.py) and
    ``gptq_marlin.py`` (TYPE_MAP ``(8, True): uint8b128``, Marlin's W8A16 GEMM) take bf16 /
    fp16 activations; AWQ (awq.py) dequantizes into a 16-bit ``torch.matmul`` and its
    ``AWQConfig`` accepts 4-bit weights only. The summaries name the approximation
    (docs/model.md)."""
    from fleetsim.base import io
    from fleetsim.base.errors import UserError

    try:
        cfg, _ = io.load_json(path, "model.config")
    except (UserError, OSError):
        return False
    if not isinstance(cfg, dict):
        return False
    q = language_model_config(cfg, str(path)).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") not in ("gptq", "awq"):
        return False
    return q.get("bits", q.get("num_bits")) == 8


def repo_relative(p: Path) -> str:
    """``p`` relative to the source checkout (``data/models/ORG/NAME/config.json``) for
    summaries, else as it is."""
    root = Path(__file__).resolve().parents[2]
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p)


def hf_id_error(hf_id: str, field: str, source: str = "") -> ScenarioError | None:
    """The error for a Hugging Face id given where a catalog name belongs, when the checkout
    has no copy of its config.json (an id it has is read from data/models:
    ``aggregated.checkout_config``; fleetsim never downloads), or None when ``hf_id`` does not
    look like one."""
    if not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", hf_id):
        return None
    return ScenarioError(
        field,
        hf_id,
        "a Hugging Face id that is neither a catalog name nor in this checkout's data/models; "
        "fleetsim never downloads",
        'point at a local config.json: [model] config = "path/to/config.json" or '
        "--model path/to/config.json (huggingface-cli download ID config.json fetches it)",
        source,
    )
