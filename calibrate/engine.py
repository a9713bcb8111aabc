"""A minimal real serving engine: continuous batching over the torch Transformer, in wall time.

It mirrors the replica core with the reserve KV policy (:mod:`fleetsim.serving.core`,
:mod:`fleetsim.serving.kv_reserve`) rule for rule, so that a trace replayed here and through
``simulate()`` differ only by the latency model:

* at every iteration boundary, waiting requests are admitted first-come-first-served while the
  batch has fewer than ``max_batch_size`` sequences, the iteration's tokens (prompts being
  prefilled + one per decoding sequence) stay within ``max_batched_tokens``, and the KV budget
  can reserve the request's prompt + output tokens; the first request that does not fit blocks
  the queue (no overtaking). This is :meth:`fleetsim.serving.admission.Limits.admits`, the
  simulator's own rule, called here;
* an admitted request is prefilled in its first iteration, which yields its first token; every
  later iteration yields one more token per sequence; a request leaves after its last token
  (``output_tokens`` tokens in all: the trace fixes the length, no EOS);
* a request that could never be served (prompt + output over the KV budget or the context,
  prompt over ``max_batched_tokens``: :meth:`~fleetsim.serving.admission.Limits.servable`; or
  over this engine's KV slab) is rejected on arrival.

**Mixed iterations.** An iteration that prefills new requests while others decode is one forward
pass over the *packed* tokens (vLLM style): every linear layer (QKV, output projection, MLP, LM
head) runs once over all ``P + n`` tokens of the iteration, which is what the simulator's
iteration time models (FLOPs and bytes of the combined work). Only attention is per sequence:
each prompt attends causally to itself, and the decoding sequences attend their cache in one
batched call, padded to the longest context with a mask (so decode attention costs
``n x max context`` rather than the sum of the contexts; on the small models this engine is meant
for, attention is a few percent of an iteration).

The KV cache is a slab per layer, ``[max_batch_size, n_kv_heads, max_seq_tokens, head_dim]``:
a request takes a free slot on admission and gives it back when it leaves.

Times are ``time.perf_counter()`` seconds from the start of the replay; on CUDA the device is
synchronised at the end of every iteration (a token is out when the host has it).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fleetsim.serving.admission import Limits

from .model import TorchTransformer


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a timed trace."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (times in seconds from the start of the replay)."""

    rid: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    status: str = "waiting"  # completed | rejected | waiting | running
    admit_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (NaN for one-token outputs)."""
        if self.output_tokens <= 1:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass(slots=True)
class IterationRecord:
    """One engine iteration: its composition and its wall time."""

    start_s: float
    end_s: float
    n_prefill: int
    prompt_tokens: int
    pairs: float  # sum of squared prompt lengths
    n_decode: int
    context_tokens: int  # keys attended by the decoding sequences (their new token included)


@dataclass(slots=True)
class _Seq:
    rec: RequestRecord
    slot: int
    length: int = 0  # tokens in the cache
    left: int = 0  # tokens still to produce
    last_token: int = 0


@dataclass
class ReplayResult:
    """The per-request records and the iteration log of one replay."""

    requests: list[RequestRecord]
    iterations: list[IterationRecord] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def busy_s(self) -> float:
        return sum(it.end_s - it.start_s for it in self.iterations)


class ServingEngine:
    """Continuous batching over ``model`` (its weights; the KV cache is the engine's own)."""

    def __init__(
        self,
        model: TorchTransformer,
        *,
        max_batch_size: int,
        max_batched_tokens: int,
        kv_budget_tokens: int,
        max_seq_tokens: int,
    ) -> None:
        self.model = model
        self.max_batch = max_batch_size
        self.max_tokens = max_batched_tokens
        self.kv_cap = kv_budget_tokens
        self.max_seq = max_seq_tokens
        self.device = model.device
        m = model
        shape = (max_batch_size, m.n_kv_heads, max_seq_tokens, m.head_dim)
        self.kc = [torch.zeros(shape, device=self.device, dtype=m.dtype) for _ in m.layers]
        self.vc = [torch.zeros(shape, device=self.device, dtype=m.dtype) for _ in m.layers]
        inv = 1.0 / (
            m.rope_theta
            ** (
                torch.arange(0, m.head_dim, 2, device=self.device, dtype=torch.float32) / m.head_dim
            )
        )
        ang = torch.outer(
            torch.arange(max_seq_tokens, device=self.device, dtype=torch.float32), inv
        )
        self._cos = torch.cat((torch.cos(ang), torch.cos(ang)), -1).to(m.dtype)
        self._sin = torch.cat((torch.sin(ang), torch.sin(ang)), -1).to(m.dtype)
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(self.device))
            if self.device.type == "cuda"
            else (lambda: None)
        )
        self._gen = torch.Generator(device="cpu").manual_seed(1234)

    # ---- one iteration --------------------------------------------------------------------
    def _rotary(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, heads, hd] at per-token positions ``pos`` [T]."""
        if not self.model.rope:
            return x
        cos = self._cos[pos].unsqueeze(1)
        sin = self._sin[pos].unsqueeze(1)
        half = self.model.head_dim // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(
        self, prefills: Sequence[tuple[int, torch.Tensor]], decodes: Sequence[tuple[int, int, int]]
    ) -> torch.Tensor:
        """One packed iteration. ``prefills``: (slot, prompt ids [L]); ``decodes``: (slot, cache
        length, last token id). Returns the next token of every sequence (prefills first)."""
        m = self.model
        dev = self.device
        h, hk, hd = m.n_heads, m.n_kv_heads, m.head_dim
        lens = [int(t.numel()) for _, t in prefills]
        n_dec = len(decodes)
        toks = [t for _, t in prefills]
        pos = [torch.arange(L, device=dev) for L in lens]
        if n_dec:
            toks.append(torch.tensor([d[2] for d in decodes], device=dev))
            dec_len = torch.tensor([d[1] for d in decodes], device=dev)
            pos.append(dec_len)
            dec_slots = torch.tensor([d[0] for d in decodes], device=dev)
            max_ctx = max(d[1] for d in decodes) + 1
            mask = (torch.arange(max_ctx, device=dev)[None, :] <= dec_len[:, None])[
                :, None, None, :
            ]
        tokens = torch.cat(toks)
        positions = torch.cat(pos)
        if m.embed.shape[0] < m.spec.vocab_size:
            tokens = tokens % m.embed.shape[0]
        x = F.embedding(tokens, m.embed)  # [T, d]
        P = sum(lens)
        for i, layer in enumerate(m.layers):
            y = m._norm(x, layer.attn_norm)
            q = self._rotary(F.linear(y, layer.wq).view(-1, h, hd), positions)
            k = self._rotary(F.linear(y, layer.wk).view(-1, hk, hd), positions)
            v = F.linear(y, layer.wv).view(-1, hk, hd)
            kc, vc = self.kc[i], self.vc[i]
            outs = []
            off = 0
            for (slot, _), L in zip(prefills, lens):
                kc[slot, :, :L] = k[off : off + L].transpose(0, 1)
                vc[slot, :, :L] = v[off : off + L].transpose(0, 1)
                qi = q[off : off + L].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(
                    qi,
                    kc[slot : slot + 1, :, :L],
                    vc[slot : slot + 1, :, :L],
                    is_causal=L > 1,
                    enable_gqa=h != hk,
                )
                outs.append(o[0].transpose(0, 1).reshape(L, h * hd))
                off += L
            if n_dec:
                kc[dec_slots, :, dec_len] = k[P:]
                vc[dec_slots, :, dec_len] = v[P:]
                keys = kc[dec_slots, :, :max_ctx]
                vals = vc[dec_slots, :, :max_ctx]
                o = F.scaled_dot_product_attention(
                    q[P:].unsqueeze(2), keys, vals, attn_mask=mask, enable_gqa=h != hk
                )
                outs.append(o.reshape(n_dec, h * hd))
            x = x + F.linear(torch.cat(outs) if len(outs) > 1 else outs[0], layer.wo)
            x = x + m._mlp(layer, m._norm(x, layer.mlp_norm))
        last = torch.tensor(
            [*(torch.tensor(lens).cumsum(0) - 1).tolist(), *range(P, P + n_dec)], device=dev
        )
        logits = F.linear(m._norm(x[last], m.final_norm), m.lm_head)
        return logits.argmax(-1)

    # ---- the serving loop -----------------------------------------------------------------
    def _prompt_ids(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.model.spec.vocab_size, (n,), generator=self._gen).to(
            self.device
        )

    def warmup(self, iterations: int = 3) -> None:
        """A few untimed mixed iterations (allocator, kernels, caches)."""
        L = min(16, self.max_seq - 2)
        for _ in range(iterations):
            self.forward([(0, self._prompt_ids(L))], [(1, L, 1)] if self.max_batch > 1 else [])
        self._sync()

    def replay(
        self,
        trace: Sequence[TraceRequest],
        *,
        max_context_tokens: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        progress: Callable[[int], None] | None = None,
    ) -> ReplayResult:
        """Serve ``trace`` in real time: each request arrives ``arrival_s`` after the start."""
        recs = [
            RequestRecord(i, r.arrival_s, r.prompt_tokens, r.output_tokens)
            for i, r in enumerate(trace)
        ]
        order = sorted(range(len(recs)), key=lambda i: recs[i].arrival_s)
        max_ctx = max_context_tokens or self.max_seq
        # the limits as they are now (a replay sets kv_cap to the simulator's budget first)
        lim = Limits(self.max_batch, self.max_tokens, self.kv_cap)
        waiting: deque[RequestRecord] = deque()
        running: list[_Seq] = []
        free = list(range(self.max_batch))[::-1]
        kv_used = 0
        iters: list[IterationRecord] = []
        nxt = 0
        t0 = clock()
        while True:
            now = clock() - t0
            while nxt < len(order) and recs[order[nxt]].arrival_s <= now:
                r = recs[order[nxt]]
                nxt += 1
                need = r.prompt_tokens + r.output_tokens
                if (
                    not lim.servable(r.prompt_tokens, r.output_tokens, max_ctx)
                    or need > self.max_seq
                ):
                    r.status = "rejected"
                else:
                    waiting.append(r)
            if not running and not waiting:
                if nxt >= len(order):
                    break
                wait = recs[order[nxt]].arrival_s - (clock() - t0)
                if wait > 2e-3:
                    sleep(wait - 1e-3)
                while clock() - t0 < recs[order[nxt]].arrival_s:
                    pass  # the last millisecond: spin, so that an idle engine starts on time
                continue
            # admission (FCFS, head-of-line blocking): the simulator's rule, Limits.admits
            pf: list[_Seq] = []
            P = 0
            n_dec = len(running)
            while waiting:
                r = waiting[0]
                need = r.prompt_tokens + r.output_tokens
                if not lim.admits(n_dec + len(pf), P + n_dec, kv_used, r.prompt_tokens, need):
                    break
                waiting.popleft()
                r.admit_s = now
                r.status = "running"
                pf.append(_Seq(r, free.pop(), 0, r.output_tokens))
                P += r.prompt_tokens
                kv_used += need
            ctx = sum(s.length + 1 for s in running)
            start = now  # the boundary: the iteration's time includes admission and input prep
            nxt_tok = self.forward(
                [(s.slot, self._prompt_ids(s.rec.prompt_tokens)) for s in pf],
                [(s.slot, s.length, s.last_token) for s in running],
            )
            self._sync()
            toks = nxt_tok.tolist()
            done: list[_Seq] = []
            for s in pf:
                s.length = s.rec.prompt_tokens
            for s in running:
                s.length += 1
            for s, tok in zip(pf + running, toks):
                s.left -= 1
                s.last_token = int(tok)
                if s.left <= 0:
                    done.append(s)
                    free.append(s.slot)
                    kv_used -= s.rec.prompt_tokens + s.rec.output_tokens
            running = [s for s in running if s.left > 0] + [s for s in pf if s.left > 0]
            # the iteration ends when the engine is ready for the next one (its bookkeeping
            # included): that is the boundary, and when its tokens are out, as in the simulator
            end = clock() - t0
            for s in pf:
                s.rec.first_token_s = end
            for s in done:
                s.rec.finish_s = end
                s.rec.status = "completed"
                if progress is not None:
                    progress(1)
            iters.append(
                IterationRecord(
                    start,
                    end,
                    len(pf),
                    P,
                    float(sum(s.rec.prompt_tokens**2 for s in pf)),
                    n_dec,
                    ctx,
                )
            )
        return ReplayResult(recs, iters, clock() - t0)


# ---- a linear profile of this engine ------------------------------------------------------------
LINEAR_TERMS = (
    "base_s",
    "prefill_base_s",
    "per_prefill_token_s",
    "per_seq_s",
    "per_context_token_s",
)


def time_iteration(
    engine: ServingEngine, prompts: Sequence[int], contexts: Sequence[int], repeats: int = 3
) -> float:
    """Median wall time (s) of one packed iteration prefilling ``prompts`` (lengths) while the
    sequences of ``contexts`` (cache lengths) decode. Slots: prefills first, then decodes."""
    pf = [(i, engine._prompt_ids(L)) for i, L in enumerate(prompts)]
    dec = [(len(prompts) + j, c, 1) for j, c in enumerate(contexts)]
    engine.forward(pf, dec)  # warm
    engine._sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.forward(pf, dec)
        engine._sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def fit_linear_profile(
    engine: ServingEngine, *, max_prompt: int, max_context: int, repeats: int = 3
) -> tuple[dict[str, float], list[dict]]:
    """Time the engine's own iterations on a small grid of compositions (prefill only, decode
    only, mixed) and fit the simulator's linear step-time model to them by non-negative least
    squares: ``t = base + [P>0] prefill_base + per_prefill_token P + per_seq (n_prefill + n)
    + per_context_token C``. Returns the coefficients and the timed rows (with predictions)."""
    B = engine.max_batch
    mp = max(4, min(max_prompt, engine.max_seq - 2, engine.max_tokens - B))
    mc = max(4, min(max_context, engine.max_seq - 2))
    plens = sorted({max(2, mp // 8), max(2, mp // 4), max(2, mp // 2), mp})
    batches = sorted({1, max(1, B // 4), max(1, B // 2), B})
    ctxs = sorted({max(2, mc // 8), max(2, mc // 2), mc})
    points: list[tuple[list[int], list[int]]] = []
    points += [([L], []) for L in plens]
    if B >= 2:
        points.append(([mp // 2, mp // 2], []))
    points += [([], [c] * b) for b in batches for c in ctxs]
    points += [
        ([L], [c] * (b - 1))
        for L in (plens[0], plens[-1])
        for b in batches
        if b > 1
        for c in (ctxs[0], ctxs[-1])
    ]
    rows = []
    for prompts, contexts in points:
        t = time_iteration(engine, prompts, contexts, repeats)
        rows.append(
            {
                "n_prefill": len(prompts),
                "prompt_tokens": sum(prompts),
                "n_decode": len(contexts),
                "context_tokens": sum(c + 1 for c in contexts),
                "time_s": t,
            }
        )
    return fit_linear_rows(rows), rows


def fit_linear_rows(rows: list[dict], relative: bool = True) -> dict[str, float]:
    """Non-negative least squares of the linear step-time model to rows with n_prefill,
    prompt_tokens, n_decode, context_tokens and time_s (``relative``: weights 1/t, i.e. relative
    errors, for a grid of medians; else plain, which fits the mean time of noisy iterations);
    adds ``predicted_s`` and ``rel_err`` to each row and returns the coefficients."""
    from scipy.optimize import nnls

    X = np.array(
        [
            [
                1.0,
                1.0 if r["prompt_tokens"] else 0.0,
                r["prompt_tokens"],
                r["n_prefill"] + r["n_decode"],
                r["context_tokens"],
            ]
            for r in rows
        ]
    )
    y = np.array([r["time_s"] for r in rows])
    w = 1.0 / y if relative else np.ones_like(y)
    coef, _ = nnls(X * w[:, None], y * w)
    pred = X @ coef
    for r, p in zip(rows, pred):
        r["predicted_s"] = float(p)
        r["rel_err"] = float(p / r["time_s"] - 1.0)
    return dict(zip(LINEAR_TERMS, map(float, coef)))
