"""Ada-KV (Feng et al. 2024): head-wise adaptive budgets inside each layer, on top of any scorer.

For one layer with H KV heads and a per-head budget B (window w included, B' = B - w):
1. take the top H·B' scores over the flattened [H x prefix] scores; n_h = how many fall in head h;
2. floor alpha, as the AdaKV repository computes it: B'_h = round((1 - alpha)·n_h + int(alpha·B'))
   (float32, round half to even); rounding can move the layer total by at most H/2 tokens either
   way, so every layer region has H/2 spare slots (kvjax.compress.oneshot.make_plan);
3. head h keeps its top B'_h prefix tokens plus the window.
The layer's share of the pool stays H·B (+ H/2): heads trade tokens, memory does not grow. With
`head_groups` > 1 the trade happens only inside groups of consecutive heads (the heads one device
holds when KV heads are sharded), so every shard keeps the same share.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from kvjax.pallas_kernels import masked_topk as mt
from kvjax.policies.base import PolicyError, policy_dataclass, static_field
from kvjax.policies.policy import Policy


def adaptive_head_budgets(scores, prefix, head_budget, alpha, *, head_groups: int = 1, normalize: bool = False):
    """Per-head prefix budgets of one layer.

    scores [B, H, T] float32 (higher = keep); prefix [B, H, T] bool (evictable, valid tokens);
    head_budget [B] int (B' per head); alpha scalar. Returns [B, H] int32 summing to H·B' per
    sequence (per head group) up to rounding (at most hg/2 per group), capped by each head's
    prefix length.
    """
    b, h, t = scores.shape
    if h % head_groups:
        raise PolicyError(f"head_groups ({head_groups}) must divide the number of KV heads ({h})")
    s = jnp.where(prefix, scores, -jnp.inf)
    if normalize:
        # weight each head by the share of its mass its own top-B' tokens hold
        top = mt.masked_topk(s.reshape(b * h, t), jnp.repeat(head_budget, h), prefix.reshape(b * h, t))
        pos = jnp.where(prefix, jnp.maximum(scores, 0.0), 0.0)
        share = jnp.sum(jnp.where(top.reshape(b, h, t), pos, 0.0), -1) / jnp.maximum(pos.sum(-1), 1e-30)
        s = jnp.where(prefix, scores * share[..., None], -jnp.inf)
    hg = h // head_groups
    flat = s.reshape(b * head_groups, hg * t)
    total = jnp.repeat(head_budget * hg, head_groups)
    chosen = mt.masked_topk(flat, total, prefix.reshape(b * head_groups, hg * t)).reshape(b, h, t)
    n_h = chosen.sum(-1).astype(jnp.float32)  # [B, H]
    floor = jnp.floor(alpha * head_budget.astype(jnp.float32))[:, None]
    budgets = jnp.round(n_h * (1.0 - jnp.asarray(alpha, jnp.float32)) + floor)
    return jnp.minimum(budgets, prefix.sum(-1)).astype(jnp.int32)


def kvpress_head_budgets(scores, valid, head_budget, alpha, *, head_groups: int = 1):
    """kvpress 0.5.5's AdaKVPress: lift each head's top int(alpha·B) (at least 1) above everything,
    then keep the layer's top H·B over the flattened scores; a head keeps what falls in it.
    scores [B, H, T] (window already +inf), valid [B, T], head_budget [B] -> [B, H] int32."""
    b, h, t = scores.shape
    v = jnp.broadcast_to(valid[:, None, :], scores.shape)
    n_safe = jnp.where(alpha > 0, jnp.maximum(1, jnp.floor(head_budget * alpha).astype(jnp.int32)), 0)
    safe = mt.masked_topk(scores.reshape(b * h, t), jnp.repeat(n_safe, h), v.reshape(b * h, t)).reshape(b, h, t)
    lifted = jnp.where(safe, jnp.inf, scores)
    hg = h // head_groups
    chosen = mt.masked_topk(lifted.reshape(b * head_groups, hg * t), jnp.repeat(head_budget * hg, head_groups),
                            v.reshape(b * head_groups, hg * t)).reshape(b, h, t)
    return chosen.sum(-1).astype(jnp.int32)


@policy_dataclass
class AdaAllocator:
    """Allocator wrapping another one: layers as `inner` decides, heads adaptively."""

    inner: Any = static_field()
    alpha: Any = 0.2
    window: int = static_field(0)
    sinks: int = static_field(0)
    head_groups: int = static_field(1)
    normalize: bool = static_field(False)
    convention: str = static_field("adakv")
    adaptive_heads = True

    def layer_budgets(self, budget, num_layers: int, lengths=None):
        return self.inner.layer_budgets(budget, num_layers, lengths)

    def check_model(self, num_layers: int, num_kv_heads: int):
        if num_kv_heads % self.head_groups:
            raise PolicyError(f"head_groups={self.head_groups} must divide the model's {num_kv_heads} KV heads")

    def static_layer_bounds(self, bound: int, num_layers: int) -> np.ndarray:
        return self.inner.static_layer_bounds(bound, num_layers)

    def head_budgets(self, scores, layer_budget, valid, layer):
        if self.convention == "kvpress":
            return kvpress_head_budgets(scores, valid, layer_budget, self.alpha, head_groups=self.head_groups)
        forced = jnp.isposinf(scores)
        prefix = valid[:, None, :] & ~forced
        n_forced = jnp.sum(forced & valid[:, None, :], axis=-1)  # [B, H]
        per_head = jnp.maximum(layer_budget - n_forced.max(axis=1), 0)
        prefix_budgets = adaptive_head_budgets(
            scores, prefix, per_head, self.alpha, head_groups=self.head_groups, normalize=self.normalize
        )
        return prefix_budgets + n_forced


@policy_dataclass
class AdaKV(Policy):
    """Ada-KV on top of another policy's scorer and layer allocation: `AdaKV(SnapKV(budget=128))`.

    alpha is the safeguard floor (each head gets at least alpha·B); `normalize` weighs heads by how
    concentrated their scores are; `head_groups` keeps the trade within KV-head shards.
    convention "adakv" is the AdaKV repository's rule (module docstring); "kvpress" is kvpress
    0.5.5's (protect each head's top alpha·B, then one flattened top-k, window included).
    """

    inner: Any = None  # a pytree child: the wrapped policy's numbers stay traced
    alpha: Any = 0.2
    normalize: bool = static_field(False)
    head_groups: int = static_field(1)
    convention: str = static_field("adakv")

    def __post_init__(self):
        if self.convention not in ("adakv", "kvpress"):
            raise PolicyError(f"convention must be 'adakv' or 'kvpress', got {self.convention!r}")
        if not isinstance(self.inner, Policy) or self.inner.keeps_everything:
            raise PolicyError(f"AdaKV wraps a scoring policy such as SnapKV(budget=...), got {self.inner!r}")
        if self.inner.scorer.layer_shared:
            raise PolicyError(f"AdaKV needs per-head scores; {type(self.inner).__name__} shares one set per layer")
        if isinstance(self.alpha, (int, float)) and not 0.0 <= self.alpha <= 1.0:
            raise PolicyError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.inner.decode_eviction is not None:
            raise PolicyError("AdaKV allocates prefill budgets; wrap a prefill-only policy (SnapKV, PyramidKV, KNorm, "
                              f"Learned with decode=False), got {type(self.inner).__name__}, which evicts while decoding")

    @property
    def budget(self):
        return self.inner.budget

    def parts(self):
        inner = self.inner.parts()
        alloc = AdaAllocator(inner.allocator, self.alpha, inner.window, inner.sinks, self.head_groups, self.normalize,
                             self.convention)
        return dataclasses.replace(inner, allocator=alloc)
