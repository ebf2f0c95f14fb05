"""Allocators: how many tokens each stream (layer, KV head) keeps, given the policy's budget.

Two levels:
- `layer_budgets(budget [B], num_layers, lengths [B])` -> per-head budget of each layer `[B, L]` (dynamic);
  `static_layer_bounds(bound, num_layers)` gives the static upper bound per layer that sizes the pool.
- `head_budgets(scores [B, H, T], layer_budget [B], valid [B, T], layer)` -> `[B, H]` inside a layer
  (uniform by default; Ada-KV redistributes the layer's H·B across heads).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.policies.base import PolicyError, policy_dataclass, static_field


@policy_dataclass
class Uniform:
    """Every layer and head keeps the same budget."""

    adaptive_heads = False

    def layer_budgets(self, budget, num_layers: int, lengths=None):
        return jnp.broadcast_to(budget[:, None], (budget.shape[0], num_layers))

    def static_layer_bounds(self, bound: int, num_layers: int) -> np.ndarray:
        return np.full((num_layers,), bound, np.int64)

    def head_budgets(self, scores, layer_budget, valid, layer):
        return jnp.broadcast_to(layer_budget[:, None], scores.shape[:2])


def pyramid_budgets(budget, num_layers: int, window: int, beta: float):
    """PyramidKV's per-layer budgets (tokens per head, window included), linear from bottom to top.

    min = (B - w) / beta, max = 2 (B - w) - min, B_l = max - l (max - min) / (L - 1), plus w.
    Works on numpy or jax integers; the layer mean stays near B.
    """
    xp = jnp if not isinstance(budget, (int, np.integer, np.ndarray)) else np
    prefix = xp.maximum(budget - window, 0)
    lo = prefix // beta if isinstance(beta, int) else (prefix / beta).astype(xp.int32)
    hi = 2 * prefix - lo
    layers = xp.arange(num_layers)
    steps = (hi - lo)[..., None] * layers // max(num_layers - 1, 1)
    return hi[..., None] - steps + window


def pyramid_budgets_kvpress(budget, lengths, num_layers: int, window: int, beta: float):
    """kvpress 0.5.5's PyramidKV layer budgets (tokens per head, window included).

    min = B / beta, max = 2B - min, capped at n - w (then min = 2B - max); B_l = round(max - l·step);
    when not (n >= max >= min >= w) every layer keeps B (plain SnapKV). budget, lengths [B_seq].
    """
    b = budget.astype(jnp.float32)
    n = lengths.astype(jnp.float32)
    lo = b / beta
    hi = 2 * b - lo
    capped = hi >= n - window
    hi = jnp.where(capped, n - window, hi)
    lo = jnp.where(capped, 2 * b - hi, lo)
    ok = (n >= hi) & (hi >= lo) & (lo >= window)
    step = (hi - lo) / max(num_layers - 1, 1)
    layers = jnp.arange(num_layers, dtype=jnp.float32)
    per_layer = jnp.round(hi[:, None] - layers[None, :] * step[:, None])
    return jnp.where(ok[:, None], per_layer, jnp.maximum(b, 1)[:, None]).astype(jnp.int32)


@policy_dataclass
class Pyramid:
    """PyramidKV: lower layers keep more tokens than higher ones (beta sets the slope).

    style "kvpress" follows kvpress 0.5.5 (budgets average B with the window included, and fall
    back to uniform when the smallest layer would not cover the window); style "paper" follows the
    PyramidKV repository (min = (B - w) // beta, plus the window on every layer).
    """

    window: int = static_field(64)
    beta: int = static_field(20)
    style: str = static_field("kvpress")
    adaptive_heads = False

    def __post_init__(self):
        if self.beta < 1:
            raise PolicyError(f"beta must be >= 1, got {self.beta}")
        if self.style not in ("kvpress", "paper"):
            raise PolicyError(f"style must be 'kvpress' or 'paper', got {self.style!r}")

    def layer_budgets(self, budget, num_layers: int, lengths=None):
        if self.style == "kvpress":
            return pyramid_budgets_kvpress(budget, lengths, num_layers, self.window, self.beta)
        return pyramid_budgets(budget.astype(jnp.int32), num_layers, self.window, self.beta)

    def static_layer_bounds(self, bound: int, num_layers: int) -> np.ndarray:
        if self.style == "kvpress":
            # the budget of layer l is linear in the (possibly capped) max, between B and the uncapped max
            lo = bound / self.beta
            hi = 2 * bound - lo
            uncapped = np.round(hi - np.arange(num_layers) * (hi - lo) / max(num_layers - 1, 1))
            return np.maximum(uncapped, bound).astype(np.int64)
        return pyramid_budgets(np.int64(bound), num_layers, self.window, self.beta).astype(np.int64)

    def head_budgets(self, scores, layer_budget, valid, layer):
        return jnp.broadcast_to(layer_budget[:, None], scores.shape[:2])


@policy_dataclass
class PerLayer:
    """Explicit budgets per layer `[L]` or per (layer, head) `[L, H]` (profiled XKV budgets too)."""

    budgets: tuple = static_field()
    adaptive_heads = False

    def __post_init__(self):
        arr = np.asarray(self.budgets)
        if arr.ndim not in (1, 2) or (arr <= 0).any():
            raise PolicyError(f"budgets must be positive with shape [L] or [L, H], got shape {arr.shape}")

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.budgets, np.int64)

    def check_model(self, num_layers: int, num_kv_heads: int):
        """PolicyError unless the budgets are [L] or [L, H] of this model."""
        arr = self.array
        if arr.shape[0] != num_layers or (arr.ndim == 2 and arr.shape[1] != num_kv_heads):
            want = f"[{num_layers}] or [{num_layers}, {num_kv_heads}]"
            raise PolicyError(f"budgets of shape {list(arr.shape)} do not fit this model: per-layer budgets are {want} "
                              f"({num_layers} layers, {num_kv_heads} KV heads)")

    def _check_layers(self, num_layers: int):
        if self.array.shape[0] != num_layers:
            raise PolicyError(f"budgets has {self.array.shape[0]} layers, the model has {num_layers}")

    def layer_budgets(self, budget, num_layers: int, lengths=None):
        self._check_layers(num_layers)
        per_layer = self.array if self.array.ndim == 1 else self.array.max(axis=1)
        return jnp.broadcast_to(jnp.asarray(per_layer, jnp.int32), (budget.shape[0], num_layers))

    def static_layer_bounds(self, bound: int, num_layers: int) -> np.ndarray:
        self._check_layers(num_layers)
        return self.array if self.array.ndim == 1 else self.array.max(axis=1)

    def head_budgets(self, scores, layer_budget, valid, layer):
        if self.array.ndim == 1:
            return jnp.broadcast_to(layer_budget[:, None], scores.shape[:2])
        if self.array.shape[1] != scores.shape[1]:
            raise PolicyError(f"budgets has {self.array.shape[1]} heads per layer, the model has {scores.shape[1]}")
        return jnp.broadcast_to(jnp.asarray(self.array, jnp.int32)[layer], scores.shape[:2])
