"""RoCo (Ren & Zhu 2024, "On the Efficacy of Eviction Policy for Key-Value Constrained Generative
Language Model Inference"; reference code: EasyKV, `h2o_head_std_avg`).

Per layer and KV head, for every cached token j (attention averaged over the GQA group first):

    S_j = sum_t a[t, j]          (cache `score`)     n_j = next_pos - pos_j  (queries that saw j)
    Q_j = sum_t a[t, j]^2        (cache `score2`)    mu_j = S_j / n_j,  sigma_j = sqrt(max(Q_j / n_j - mu_j^2, 0))

mu is the importance (mean attention over the token's lifetime, so old tokens are not favoured as by
H2O's raw sum); sigma the robustness (a token whose attention swings is kept for later queries).

Eviction rule, per stream holding n tokens with stream budget K, evicting m = n - K (EasyKV's
encoding step, with EasyKV's `budget` read as K and its `stride` as m):
1. protected: the first `sinks` positions and the last `recent` positions (EasyKV: 4 and 10);
2. scope: of the unprotected tokens, the max(K - R - sinks, m) with the smallest sigma are the
   candidates, R = floor(recent_ratio * K) (EasyKV's recent window, ratio 0.1); the other,
   volatile ones are never candidates (ties in sigma: the lower slot counts as more volatile);
3. evict the m candidates with the smallest mu (ties: the lower slot).
With n = K + m and every protected token present, the volatile set has R + m - recent tokens.

The prompt is not compressed in one shot: `kvjax.compress.chunked` prefills the first K tokens, then feeds
the rest `chunk` tokens at a time, evicting back to K after each chunk (EasyKV's "encoding"; EasyKV
feeds `stride` tokens per step, so `chunk=stride` reproduces it). Statistics count every query
from position 0, as EasyKV with `keep_attention=True`. While decoding, every `stride` steps each
stream above K loses its excess one token at a time by the same rule (`stride=1`: one per head per
step). One-shot compression (`kvjax.compress.oneshot`, no chunking) ranks by mu alone.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from kvjax.policies.base import DecodeEviction, PolicyError, PrefillMode, PrefillStats, Scorer, check_choice
from kvjax.policies.base import check_positive_int, policy_dataclass, reduce_group, static_field
from kvjax.policies.policy import Parts, Policy


def running_moments(score, score2, slot_pos, seen):
    """Mean and standard deviation of the attention each slot received over its lifetime.

    score, score2 [B, S] (sums of attention and of squared attention); slot_pos [B, S] positions;
    seen [B] tokens processed so far. Returns (mu, sigma) [B, S] float32 (empty slots: garbage).
    """
    n = jnp.maximum(seen[:, None] - slot_pos, 1).astype(jnp.float32)
    mu = score / n
    return mu, jnp.sqrt(jnp.maximum(score2 / n - mu * mu, 0.0))


def top_count_mask(values, allowed, count):
    """[..., S] bool: the `count` [...] largest `values` among `allowed` slots (ties: lower slot first)."""
    v = jnp.where(allowed, values, -jnp.inf)
    order = jnp.argsort(-v, axis=-1, stable=True)
    first = jnp.arange(v.shape[-1]) < count[..., None]  # rank < count, in sorted order
    chosen = jnp.zeros(v.shape, bool)
    idx = tuple(jnp.indices(v.shape, sparse=True)[:-1]) + (order,)
    return chosen.at[idx].set(first) & allowed


def scope_size(budget, excess, recent_ratio, sinks: int):
    """Candidates per stream: max(K - floor(recent_ratio K) - sinks, m). budget, excess [B, H] int."""
    reserve = jnp.floor(budget.astype(jnp.float32) * recent_ratio).astype(jnp.int32)
    return jnp.maximum(budget - reserve - sinks, excess)


@policy_dataclass
class RobustAttention(Scorer):
    """RoCo's scorer: running sums of attention and squared attention; evicts by the rule in the
    module docstring. `recent_ratio` is a leaf (changing it does not recompile)."""

    recent_ratio: Any = 0.1
    sinks: int = static_field(4)
    group_reduce: str = static_field("mean")
    needs_colsum = True
    needs_colsq = True

    def __post_init__(self):
        check_choice("group_reduce", self.group_reduce, ("mean", "max"))
        check_positive_int("sinks", self.sinks, allow_zero=True)

    def prefill_scores(self, stats: PrefillStats):
        # one-shot compression: with everything evicted at once the sigma scope would decide alone,
        # so rank by the importance mu (the chunked prefill applies the full rule)
        s = reduce_group(stats.colsum, self.group_reduce)
        n = jnp.maximum(stats.lengths[:, None] - stats.positions[None, :], 1)  # queries that saw j
        return s / n[:, None, :].astype(jnp.float32)

    def prefill_running(self, stats: PrefillStats):
        if stats.colsum is None or stats.colsq is None:
            raise ValueError("RoCo needs the prompt's column sums of attention and of squared attention "
                             "(causal_attention(..., column_squares=True) when scorer.needs_colsq)")
        return reduce_group(stats.colsum, self.group_reduce), stats.colsq

    def increments(self, probs):
        """What one query's probabilities add to (score, score2): sums of attention and of its square."""
        return probs, probs * probs

    def decode_update(self, score, score2, probs, slot_pos, next_pos):
        d1, d2 = self.increments(probs)
        return score + d1, score2 + d2

    def eviction_key(self, score, score2, slot_pos, seen):
        return running_moments(score, score2, slot_pos, seen)[0]

    def stream_eviction_key(self, score, score2, slot_pos, seen, candidates, budget, excess):
        """Per-stream key [B, H, S]: mu on the candidates in scope, +inf elsewhere.

        score, score2, slot_pos [B, S]; seen [B]; candidates [B, H, S] (the stream's unprotected
        slots); budget, excess [B, H] (K and m of the rule).
        """
        mu, sigma = running_moments(score, score2, slot_pos, seen)
        scope = scope_size(budget, excess, self.recent_ratio, self.sinks)
        n_volatile = jnp.maximum(candidates.sum(-1) - scope, 0)
        volatile = top_count_mask(jnp.broadcast_to(sigma[:, None, :], candidates.shape), candidates, n_volatile)
        return jnp.where(candidates & ~volatile, mu[:, None, :], jnp.inf)


@policy_dataclass
class RoCo(Policy):
    """RoCo / EasyKV: `RoCo(budget=256, stride=1, recent=10, sinks=4, recent_ratio=0.1, chunk=None)`.

    budget:       tokens each stream keeps (int, or a ratio of each prompt)
    stride:       while decoding, evict every `stride` steps (one per head per step with 1)
    recent, sinks: the last / first positions never evicted (EasyKV: 10 and 4)
    recent_ratio: R = floor(recent_ratio * budget) sets the eviction scope (EasyKV's recent window:
                  0.1 when encoding; EasyKV's decoding-only mode uses 0.3)
    chunk:        prompt tokens fed per step of the chunked prefill; each stream holds at most
                  budget + chunk tokens while encoding (chunk=stride is EasyKV's step). None: an
                  eighth of the stream's budget K (a power of two, 16 to 256; `auto_chunk`), which
                  keeps ~98% of the tokens EasyKV's stride-1 encoding keeps (measured:
                  benchmarks/results/roco_chunk_fidelity_qwen2.5-0.5b.md) at GPU speed
    """

    budget: Any = 256
    stride: int = static_field(1)
    recent: int = static_field(10)
    sinks: int = static_field(4)
    recent_ratio: Any = 0.1
    group_reduce: str = static_field("mean")
    chunk: int | None = static_field(None)

    def __post_init__(self):
        check_positive_int("stride", self.stride)
        check_positive_int("recent", self.recent, allow_zero=True)
        if self.chunk is not None:
            check_positive_int("chunk", self.chunk)
        if isinstance(self.recent_ratio, (int, float, np.floating)) and not 0.0 <= self.recent_ratio < 1.0:
            raise PolicyError(f"recent_ratio must be in [0, 1), got {self.recent_ratio}")
        if isinstance(self.budget, (np.ndarray, list, tuple)):
            raise PolicyError("RoCo takes one budget per stream (an int or a ratio), not an array")
        self.parts()  # validates the scorer's options
        self._validate()

    def parts(self):
        # the prompt streams through the cache in chunks (kvjax.compress.chunked), not compressed at once
        return Parts(RobustAttention(self.recent_ratio, self.sinks, self.group_reduce), window=self.recent,
                     sinks=self.sinks, decode=DecodeEviction(every=self.stride, recent=self.recent, sinks=self.sinks),
                     mode=PrefillMode.CHUNKED)

