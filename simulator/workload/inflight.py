"""The KV tokens a request holds over its iterations in flight: a closed form over its prompt and
output sizes, shared by the KV budget of window models (``config/resolved.py``) and the capacity
estimates (``results/capacity.py``, whose module docstring derives it)."""

from __future__ import annotations

import numpy as np


def token_iterations(
    prompt: np.ndarray,
    output: np.ndarray,
    chunk_tokens: int | None = None,
    reserve: bool = False,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per request (``prompt`` / ``output`` token counts): the KV tokens it holds summed over
    its iterations in flight, and those iterations (the module docstring; ``chunk_tokens`` and
    ``reserve`` as :func:`kv_tokens_per_sequence`'s). ``window``: each iteration's tokens
    capped at ``W = window``, what a sliding-window layer holds (``ModelSpec.kv_bytes``):
    ``sum_j min(j C, P, W)`` over the prefill chunks (with ``M = min(P, W)``, the first ``J =
    ceil(M / C) - 1`` hold ``j C``, the other ``n - J`` hold ``M``) plus ``sum_{k=1}^{L-1}
    min(P + k, W) = K P + K (K + 1) / 2 + (L - 1 - K) W`` with ``K = clip(W - P, 0, L - 1)``
    the decode steps still within the window; reserved, ``min(P + L, W)`` in every
    iteration."""
    p = np.asarray(prompt, dtype=float)
    n_out = np.maximum(np.asarray(output, dtype=float), 1.0)
    n = np.ceil(p / chunk_tokens) if chunk_tokens else np.ones_like(p)
    iters = n + n_out - 1.0
    if window is None:
        if reserve:
            return (p + n_out) * iters, iters
        if chunk_tokens:
            first = chunk_tokens * n * (n - 1.0) / 2.0 + p  # tokens x iterations while prefilling
        else:
            first = p
        return first + p * (n_out - 1.0) + n_out * (n_out - 1.0) / 2.0, iters
    w = float(window)
    if reserve:
        return np.minimum(p + n_out, w) * iters, iters
    m = np.minimum(p, w)
    if chunk_tokens:
        j = np.maximum(np.ceil(m / chunk_tokens) - 1.0, 0.0)
        first = chunk_tokens * j * (j + 1.0) / 2.0 + (n - j) * m
    else:
        first = m
    k = np.clip(w - p, 0.0, n_out - 1.0)
    return first + k * p + k * (k + 1.0) / 2.0 + (n_out - 1.0 - k) * w, iters
