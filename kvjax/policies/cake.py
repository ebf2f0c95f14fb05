"""CAKE (Qin et al., ICLR 2025): layer budgets from each layer's attention pattern, a cascade that
bounds prefill memory, and a mean + gamma * variance eviction indicator.

For layer l, with A[h, i, j] the softmax attention of the last w prompt queries i (all query heads
h) on the prefix keys j < n - w:

    spatial dispersion  H_l = -sum_{h,i,j} A log(A + 1e-10)
    temporal shift      V_l = sum_{h,j} Var_i A[h, i, j]          (unbiased variance over i)
    preference          P_l = H_l^(1/tau1) * V_l^(1/tau2)
    budget              B_l = P_l / sum_k P_k * B_total,  B_total = (budget - w) * L,
                        capped at n - w with the excess spread evenly, integer sum exact
    indicator           I_j = avgpool_5(mean_i A + gamma * Var_i A) over the prefix, GQA group mean

Every layer also keeps its w window tokens. The cascade (kvjax/compress/cascade.py) re-splits B_total over
the layers seen so far after each layer and shrinks them with their stored indicators, so the
stored KV stays near B_total plus one layer's full KV. While decoding, each new query's attention
(pooled, group mean) re-selects the layer's non-window tokens, keeping every layer at its budget.

The rules follow the CAKE repository (antgroup/cakekv): float32 shares truncated to integers, the
capped layers' excess handed out evenly (the first layers get the remainder), then the total
trued up the same way.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kvjax.policies.base import DecodeEviction, PolicyError, PrefillMode, PrefillStats, Scorer, check_positive_int
from kvjax.policies.base import policy_dataclass, reduce_group, static_field
from kvjax.policies.policy import Parts, Policy
from kvjax.policies.scorers import pool1d


def _window_prefix_attention(stats: PrefillStats, window: int):
    """Window attention restricted to prefix keys: [B, H, G, w, T] float32 (0 outside the prefix)."""
    prefix = stats.positions[None, :] < (stats.lengths - window)[:, None]  # [B, T]
    rows = stats.window_valid[:, None, None, :, None]
    return jnp.where(prefix[:, None, None, None, :] & rows, stats.window_attn, 0.0), prefix


def _variance_over_window(a, n_rows):
    """Unbiased variance over the window-query axis (3) of a [B, H, G, w, T] array."""
    n = n_rows[:, None, None, None].astype(jnp.float32)
    mean = a.sum(axis=3) / n
    return ((a - mean[:, :, :, None]) ** 2).sum(axis=3) / jnp.maximum(n - 1.0, 1.0), mean


def layer_preference(stats: PrefillStats, window: int, tau1, tau2):
    """P_l of one layer for each sequence: [B] float32."""
    a, _ = _window_prefix_attention(stats, window)
    entropy = -stats.head_sum(a * jnp.log(a + 1e-10), axis=(1, 2, 3, 4))
    var, _ = _variance_over_window(a, stats.window_valid.sum(axis=1))
    return entropy ** (1.0 / tau1) * stats.head_sum(var, axis=(1, 2, 3)) ** (1.0 / tau2)


def split_budgets(prefs, active, total, cap):
    """CAKE's layer split: shares of `total` by preference over the active layers, capped.

    prefs [B, L] float32; active [B, L] bool (layers that share the total); total [B] int (B_total);
    cap [B] int (n - w). Returns [B, L] int32 non-window budgets (0 for inactive layers).
    """
    p = jnp.where(active, prefs, 0.0)
    share = p / jnp.sum(p, axis=1, keepdims=True) * total[:, None].astype(jnp.float32)
    x = jnp.where(active, jnp.floor(share), 0).astype(jnp.int32)
    cap = cap[:, None]

    def hand_out(x, amount, eligible):
        """Add `amount` [B] (may be negative) evenly to the eligible layers, first ones get the rest."""
        n = jnp.sum(eligible, axis=1, keepdims=True)
        mag = jnp.abs(amount)[:, None]
        per = jnp.where(n > 0, mag // jnp.maximum(n, 1), 0)
        rem = jnp.where(n > 0, mag % jnp.maximum(n, 1), 0)
        rank = jnp.cumsum(eligible, axis=1) - 1
        delta = jnp.where(eligible, per + (rank < rem), 0)
        return x + jnp.sign(amount)[:, None] * delta

    excess = jnp.sum(jnp.maximum(x - cap, 0), axis=1)
    x = jnp.minimum(x, cap)
    x = hand_out(x, excess, active & (x < cap))
    diff = total - jnp.sum(x, axis=1)
    eligible = jnp.where((diff > 0)[:, None], x < cap, x > 1) & active
    x = hand_out(x, diff, eligible & (diff != 0)[:, None])
    return jnp.clip(x, 0, cap).astype(jnp.int32)


@policy_dataclass
class CakeIndicator(Scorer):
    """CAKE's eviction indicator: mean + gamma * variance of the window's attention, avg-pooled
    (kernel 5) over the prefix, then the GQA group mean. While decoding, the newest query's
    attention, pooled over neighbouring slots of its stream, replaces the score each step."""

    window: int = static_field(32)
    gamma: Any = 200.0
    kernel: int = static_field(5)

    def prefill_scores(self, stats: PrefillStats):
        a, prefix = _window_prefix_attention(stats, self.window)
        var, mean = _variance_over_window(a, stats.window_valid.sum(axis=1))
        indicator = jnp.where(prefix[:, None, None, :], mean + self.gamma * var, 0.0)
        return reduce_group(pool1d(indicator, self.kernel, "avg"), "mean")

    @property
    def decode_pool_radius(self) -> int:
        return self.kernel // 2

    def prefill_running(self, stats: PrefillStats):
        # the stored indicator ranks a layer's tokens again when the cascade shrinks it: the window
        # stays (+inf), as at selection
        window = stats.positions[None, :] >= (stats.lengths - self.window)[:, None]
        s = jnp.where(window[:, None, :], jnp.inf, self.prefill_scores(stats))
        return s, jnp.zeros_like(s)

    def decode_update(self, score, score2, probs, slot_pos, next_pos):
        # streams are separated by >= kernel // 2 empty slots (kvjax/compress/cascade.py), so pooling
        # over the region pools each stream on its own with zero padding, as the reference pools its cache
        return pool1d(probs, self.kernel, "avg"), score2


@policy_dataclass
class CakeAllocator:
    """CAKE's layer allocation, re-split after every layer of the cascade (kvjax.compress.cascade).

    `preference(stats)` is P_l of one layer, `split(...)` shares the total over the layers seen so
    far; inside a layer every head keeps the same budget."""

    window: int = static_field(32)
    tau1: Any = 1.0
    tau2: Any = 1.0
    cascade: bool = static_field(True)
    adaptive_heads = False

    def preference(self, stats: PrefillStats):
        """[B] float32: this layer's preference P_l."""
        return layer_preference(stats, self.window, self.tau1, self.tau2)

    def split(self, prefs, active, total, cap):
        """[B, L] int32 non-window budgets of the active layers (`split_budgets`)."""
        return split_budgets(prefs, active, total, cap)

    def head_budgets(self, scores, layer_budget, valid, layer):
        return jnp.broadcast_to(layer_budget[:, None], scores.shape[:2])


@policy_dataclass
class CAKE(Policy):
    """CAKE: `CAKE(budget=1024, window=32, gamma=200, tau1=1, tau2=1, cascade=True)`.

    budget: tokens per KV head averaged over layers, window included (CAKE's cache_size); an int
    or a ratio of each prompt. Layers get budget shares by preference; the pool holds the total.
    cascade: re-split after every layer during prefill (bounded memory); False keeps every layer's
    full KV until the last layer, then splits once (the reference's non-cascade mode).
    """

    budget: Any = 1024
    window: int = static_field(32)
    gamma: Any = 200.0
    tau1: Any = 1.0
    tau2: Any = 1.0
    cascade: bool = static_field(True)
    kernel: int = static_field(5)

    def __post_init__(self):
        check_positive_int("window", self.window)
        check_positive_int("kernel", self.kernel)
        for name in ("tau1", "tau2"):
            v = getattr(self, name)
            if isinstance(v, (int, float)) and v <= 0:
                raise PolicyError(f"{name} must be > 0, got {v}")
        if isinstance(self.budget, (list, tuple)) or getattr(self.budget, "ndim", 0) > 0:
            raise PolicyError("CAKE chooses the per-layer split itself: give one budget (int or ratio)")
        self._validate()
        if isinstance(self.budget, int) and self.budget <= self.window:
            raise PolicyError(f"budget ({self.budget}) must exceed the window ({self.window})")

    def parts(self):
        return Parts(CakeIndicator(self.window, self.gamma, self.kernel),
                     CakeAllocator(self.window, self.tau1, self.tau2, self.cascade), window=self.window,
                     decode=DecodeEviction(every=1, recent=self.window), mode=PrefillMode.CASCADE)

