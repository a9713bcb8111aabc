"""A model's architecture from a local Hugging Face ``config.json`` (``[model] config = "..."``).

Nothing is downloaded: the file is read from disk. The keys read are those of the dense and
mixture-of-experts decoder families in use today (Llama, Mistral, Mixtral, Qwen2/Qwen2-MoE,
GPT-2/NeoX style):

================================  ============================================================
ModelSpec field                   config.json keys (first found)
================================  ============================================================
n_layers                          num_hidden_layers, n_layer, num_layers
d_model                           hidden_size, n_embd, d_model
n_heads                           num_attention_heads, n_head
n_kv_heads                        num_key_value_heads (default: n_heads, i.e. no GQA)
d_ff                              moe_intermediate_size (MoE), intermediate_size, n_inner,
                                  ffn_dim (default 4 x d_model for GPT-2 style models)
vocab_size                        vocab_size
n_experts                         num_local_experts, num_experts, n_routed_experts (default 1)
n_active_experts                  num_experts_per_tok (default 1)
tied_embeddings                   tie_word_embeddings (default: false for the Llama, Mistral,
                                  Mixtral, Qwen2/3 families, else true as in transformers)
max_context_tokens                max_position_embeddings, n_positions, seq_length
dtype                             torch_dtype or dtype (bfloat16, float16, float32)
mlp                               "gelu" (2 matrices) for the ungated GPT-2/NeoX/OPT/Falcon
                                  families, else "swiglu" (3 matrices: gate, up, down)
================================  ============================================================

What :class:`~fleetsim.device.modelspec.ModelSpec` cannot express is refused with a clear
error rather than approximated: a ``head_dim`` that is not ``hidden_size / num_attention_heads``,
shared experts beside the routed ones, and dense layers mixed into an MoE stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetsim.base.errors import ScenarioError

#: model_type values whose MLP is two matrices with an ungated activation
UNGATED = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "mpt"}
#: model_type values whose config class defaults to untied embeddings (transformers'
#: PretrainedConfig defaults to tied: a config.json without the key is tied unless its family
#: says otherwise)
UNTIED = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def _first(cfg: dict, *keys: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def architecture_from_hf(cfg: dict, where: str, source: str = "") -> dict[str, Any]:
    """The :class:`ModelSpec` fields (and ``dtype`` when the file gives one) of a parsed
    ``config.json``; a ScenarioError naming ``model.config`` for what it lacks or cannot be
    represented."""

    def fail(problem: str, fix: str) -> ScenarioError:
        return ScenarioError("model.config", where, problem, fix, source)

    if not isinstance(cfg, dict):
        raise fail("is not a JSON object", "give the model's config.json")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers: the language model
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k == "torch_dtype"}}
    model_type = str(cfg.get("model_type", ""))
    out: dict[str, Any] = {
        "n_layers": _first(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "d_model": _first(cfg, "hidden_size", "n_embd", "d_model"),
        "n_heads": _first(cfg, "num_attention_heads", "n_head"),
        "vocab_size": _first(cfg, "vocab_size"),
    }
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise fail(
            f"has no {', '.join(missing)} (keys like num_hidden_layers, hidden_size, "
            "num_attention_heads, vocab_size)",
            "give a decoder-only model's config.json, or an inline [model] architecture",
        )
    out["n_kv_heads"] = _first(cfg, "num_key_value_heads", "num_kv_heads") or out["n_heads"]
    n_experts = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts") or 1
    out["n_experts"] = n_experts
    out["n_active_experts"] = (_first(cfg, "num_experts_per_tok") or 1) if n_experts > 1 else 1
    if n_experts > 1:
        d_ff = _first(cfg, "moe_intermediate_size", "intermediate_size")
        for key in ("shared_expert_intermediate_size", "n_shared_experts"):
            if cfg.get(key):
                raise fail(
                    f"has shared experts ({key} = {cfg[key]}), which fleetsim's model cannot "
                    "express",
                    "describe the model inline in [model] (an approximation you choose)",
                )
        if (
            cfg.get("first_k_dense_replace")
            or cfg.get("decoder_sparse_step", 1) != 1
            or cfg.get("mlp_only_layers")
        ):
            raise fail(
                "mixes dense and MoE layers, which fleetsim's model cannot express",
                "describe the model inline in [model] (an approximation you choose)",
            )
    else:
        d_ff = _first(cfg, "intermediate_size", "n_inner", "ffn_dim")
        if d_ff is None and model_type in UNGATED:
            d_ff = 4 * out["d_model"]
    if d_ff is None:
        raise fail("has no intermediate_size", "give the model's config.json")
    out["d_ff"] = d_ff
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * out["n_heads"] != out["d_model"]:
        raise fail(
            f"head_dim = {head_dim} is not hidden_size / num_attention_heads "
            f"({out['d_model']} / {out['n_heads']}), which fleetsim's model cannot express",
            "describe the model inline in [model] (an approximation you choose)",
        )
    out["mlp"] = "gelu" if model_type in UNGATED else "swiglu"
    tied = cfg.get("tie_word_embeddings")
    out["tied_embeddings"] = bool(model_type not in UNTIED if tied is None else tied)
    ctx = _first(cfg, "max_position_embeddings", "n_positions", "seq_length")
    if ctx is not None:
        out["max_context_tokens"] = ctx
    for k, v in out.items():
        if k in ("mlp", "tied_embeddings"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise fail(f"{k} would be {v!r}", "a config.json with positive integer sizes")
    dt = _first(cfg, "torch_dtype", "dtype")
    if isinstance(dt, str) and dt in DTYPES:
        out["dtype"] = DTYPES[dt]
    return out


def read_hf_config(path: str | Path, source: str = "", written: str = "") -> dict[str, Any]:
    """:func:`architecture_from_hf` of the file at ``path`` (already resolved; ``written`` is
    the path as the scenario gives it; bounded reading, one clear line on a bad file)."""
    from fleetsim.base import io

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise ScenarioError(
            "model.config",
            written or str(p),
            f"no such file: {p}",
            "give the path of the model's config.json (relative to the scenario file)",
            source,
        )
    cfg, _ = io.load_json(p, "model.config")
    return architecture_from_hf(cfg, str(p), source)
