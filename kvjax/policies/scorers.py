"""Scorers: a score per prompt token and KV head, `[B, H, T]` float32, higher = keep.

Each scorer is a small frozen dataclass; its static options set shapes, its numeric ones are leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.policies.base import PrefillStats, Scorer, check_choice, check_positive_int, policy_dataclass
from kvjax.policies.base import reduce_group, static_field


def pool1d(x, kernel: int, how: str):
    """Pool along the last axis with stride 1 and 'same' size (zero padding counted for avg, as
    torch's avg_pool1d with count_include_pad; -inf padding for max)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    window = (1,) * (x.ndim - 1) + (kernel,)
    strides = (1,) * x.ndim
    padding = ((0, 0),) * (x.ndim - 1) + ((pad, kernel - 1 - pad),)
    if how == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding) / kernel


@policy_dataclass
class WindowAttention(Scorer):
    """SnapKV: attention of the last `window` queries on each key, averaged over the window, pooled
    over neighbouring positions, reduced over the GQA group. Tokens inside the window are forced.

    The window is the observation window; `kernel`/`pooling` smooth scores so neighbours of a
    relevant token survive together.
    """

    window: int = static_field(64)
    kernel: int = static_field(5)
    pooling: str = static_field("avg")
    group_reduce: str = static_field("mean")
    pool_before_group: bool = static_field(True)

    def __post_init__(self):
        check_positive_int("window", self.window)
        check_positive_int("kernel", self.kernel)
        check_choice("pooling", self.pooling, ("avg", "max"))
        check_choice("group_reduce", self.group_reduce, ("mean", "max"))

    def prefill_scores(self, stats: PrefillStats):
        attn = stats.window_attn  # [B, H, G, w, T]
        rows = stats.window_valid[:, None, None, :, None]
        per_query_head = jnp.sum(jnp.where(rows, attn, 0.0), axis=3) / jnp.maximum(
            jnp.sum(stats.window_valid, axis=1), 1
        )[:, None, None, None]
        # pool over the prefix only: the window's own keys count as zero padding (as kvpress does;
        # the window is kept regardless)
        prefix = stats.positions[None, :] < (stats.lengths - self.window)[:, None]
        per_query_head = jnp.where(prefix[:, None, None, :], per_query_head, 0.0)
        if self.pool_before_group:
            return reduce_group(pool1d(per_query_head, self.kernel, self.pooling), self.group_reduce)
        return pool1d(reduce_group(per_query_head, self.group_reduce), self.kernel, self.pooling)


@policy_dataclass
class LastQueryAttention(Scorer):
    """TOVA: the last query's attention, averaged over every query head of the layer, so all KV
    heads of a layer keep the same positions. While decoding, the newest query re-scores."""

    window: int = static_field(1)
    layer_shared = True

    def prefill_scores(self, stats: PrefillStats):
        last = stats.window_attn[:, :, :, -1, :]  # [B, H, G, T]
        layer_mean = stats.head_mean(last, axis=(1, 2))  # [B, T], over every head of the layer
        return jnp.broadcast_to(layer_mean[:, None, :], stats.k.shape[:3])

    def prefill_running(self, stats: PrefillStats):
        s = self.prefill_scores(stats)
        return s, jnp.zeros_like(s)

    def decode_update(self, score, score2, probs, slot_pos, next_pos):
        # probs are already averaged over the layer's heads by the engine (layer_shared)
        return probs, score2


@policy_dataclass
class AccumulatedAttention(Scorer):
    """H2O: attention each token has received, summed over every query so far (group-reduced)."""

    group_reduce: str = static_field("mean")
    needs_colsum = True

    def __post_init__(self):
        check_choice("group_reduce", self.group_reduce, ("mean", "max"))

    def prefill_scores(self, stats: PrefillStats):
        return reduce_group(stats.colsum, self.group_reduce)

    def prefill_running(self, stats: PrefillStats):
        s = self.prefill_scores(stats)
        return s, jnp.zeros_like(s)

    def increments(self, probs):
        """What one query's probabilities add to (score, score2): the running statistics are sums."""
        return probs, jnp.zeros_like(probs)

    def decode_update(self, score, score2, probs, slot_pos, next_pos):
        d1, _ = self.increments(probs)
        return score + d1, score2


@policy_dataclass
class KeyNorm(Scorer):
    """KNorm: tokens with a small key norm tend to draw attention; score = -||k||."""

    def prefill_scores(self, stats: PrefillStats):
        return -jnp.linalg.norm(stats.k.astype(jnp.float32), axis=-1)


@policy_dataclass
class Recency(Scorer):
    """StreamingLLM: later tokens score higher (sinks are forced by the policy)."""

    def prefill_scores(self, stats: PrefillStats):
        return jnp.broadcast_to(stats.positions.astype(jnp.float32), stats.k.shape[:3])


@policy_dataclass
class RandomScore(Scorer):
    """Uniform random scores (seeded): the floor every method should beat."""

    def prefill_scores(self, stats: PrefillStats):
        # one key per (layer, sequence, head), from their global indices: the same numbers however
        # the batch and the heads are split over devices
        b, h, t = stats.k.shape[:3]
        layer_key = jax.random.fold_in(stats.rng, stats.layer)
        rows, heads = stats.global_index(b, stats.data_axis), stats.global_index(h, stats.model_axis)
        draw = lambda r, hh: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(layer_key, r), hh), (t,))
        return jax.vmap(lambda r: jax.vmap(lambda hh: draw(r, hh))(heads))(rows)


@policy_dataclass
class KeepAll(Scorer):
    """No eviction (the full cache)."""

    def prefill_scores(self, stats: PrefillStats):
        return jnp.zeros(stats.k.shape[:3], jnp.float32)
