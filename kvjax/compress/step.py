"""The compression step of one layer: score the prompt's tokens, choose each stream's keep-set and
pack it into the pool. Every prefill mode calls it (one-shot after each layer; the cascade after it
shrank the earlier layers; the chunked prefill for its first, all-kept tokens).

    stats = layer_stats(policy, q, k, v, lengths, colsum, colsq, layer, rng, scale)   # what the scorer reads
    keep, budgets = select(policy, stats, layer_budget)                              # [B, H, T], [B, H]
    pools, row = compress_layer(policy, plan, pools, stats, layer_budget, bound, base=, size=, first=)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache import Plan, Pools, place_streams
from kvjax.pallas_kernels import budget_scatter as bs
from kvjax.pallas_kernels import masked_topk as mt
from kvjax.policies.base import PrefillStats
from kvjax.policies.policy import Policy


def resolve_budget(policy: Policy, lengths):
    """Per-head token budget of each sequence [B] int32 (before per-layer allocation)."""
    if policy.keeps_everything:
        return lengths
    budget = jnp.asarray(policy.budget)
    if budget.ndim > 0:  # per-layer arrays are handled by the allocator
        return lengths
    if jnp.issubdtype(budget.dtype, jnp.floating):
        return jnp.maximum(jnp.round(budget * lengths).astype(jnp.int32), 1)
    return jnp.broadcast_to(budget.astype(jnp.int32), lengths.shape)


def layer_stats(policy: Policy, stats: PrefillStats, scale: float) -> PrefillStats:
    """The layer's statistics as this policy's scorer reads them (its observation window filled in)."""
    window = 0 if policy.keeps_everything else policy.scorer.window
    return stats.with_window(window, scale)


def select(policy: Policy, stats: PrefillStats, layer_budget, implementation: str = "xla"):
    """Keep-mask [B, H, T] and per-head budgets [B, H] int32 of one layer.

    layer_budget [B]: tokens per head of this layer (the allocator may redistribute them over the
    heads). A stream keeps min(budget, prompt length) tokens; its budget may be larger (it then
    fills up while decoding). Forced tokens (the policy's window and sinks) score +inf.
    """
    valid = stats.valid
    b, h, t = stats.k.shape[:3]
    if policy.keeps_everything:
        return jnp.broadcast_to(valid[:, None], (b, h, t)), jnp.broadcast_to(stats.lengths[:, None], (b, h))
    scores = policy.scorer.prefill_scores(stats).astype(jnp.float32)
    pos = stats.positions[None, :]
    forced = pos < policy.protected_sinks
    if policy.protected_window:
        forced |= pos >= stats.lengths[:, None] - policy.protected_window
    scores = jnp.where(forced[:, None, :], jnp.inf, scores)
    budgets = jnp.maximum(policy.allocator.head_budgets(scores, layer_budget, valid, stats.layer), 0)
    budgets = budgets.astype(jnp.int32)
    keep = mt.masked_topk(
        scores.reshape(b * h, t), jnp.minimum(budgets, stats.lengths[:, None]).reshape(b * h),
        jnp.broadcast_to(valid[:, None], (b, h, t)).reshape(b * h, t), implementation=implementation,
    ).reshape(b, h, t)
    return keep, budgets


def pack(pools: Pools, keep, start, payload: Pools, *, base, size: int, implementation: str = "xla") -> Pools:
    """Pack each stream's kept tokens (in order) into slots `start + i` of the region [base, base + size).

    keep [B, H, T] bool; start [B, H] relative to the region; payload: Pools-shaped values per token
    (k, v [B, H, T, D]; pos, score, score2 [B, H, T]). Other slots keep their contents.
    """
    src_head, src_tok, written = bs.pack_plan(keep, start, size)
    rows = jnp.arange(keep.shape[0])[:, None]

    def one(pool, src):
        region = jax.lax.dynamic_slice_in_dim(pool, base, size, axis=1)
        if src.ndim == 4:
            new = bs.budget_scatter(region, src.astype(pool.dtype), src_head, src_tok, written,
                                    implementation=implementation)
        else:
            new = jnp.where(written, src[rows, src_head, src_tok].astype(pool.dtype), region)
        return jax.lax.dynamic_update_slice_in_dim(pool, new, base, axis=1)

    return Pools(**{f: one(getattr(pools, f), getattr(payload, f)) for f in Pools.EMPTY})


def compress_layer(policy: Policy, plan: Plan, pools: Pools, stats: PrefillStats, layer_budget, bound, *,
                   base, size: int, first, reserve=None, implementation: str = "xla"):
    """Select one layer's keep-sets and pack them into the pool.

    stats: the layer's statistics (`layer_stats`); layer_budget [B] tokens per head; bound: the
    layer's static stream bound; the layer's streams go into the region [base, base + size) from
    its slot `first` [B] on (`reserve`: see `place_streams`). Returns (pools, (start, length, cap, budget) [B, H] int32 each, start
    absolute in the pool).
    """
    b, h, t = stats.k.shape[:3]
    keep, budgets = select(policy, stats, layer_budget, implementation)
    kept = keep.sum(-1).astype(jnp.int32)
    if policy.decode_eviction is not None:
        run1, run2 = policy.scorer.prefill_running(stats)
    else:
        run1 = run2 = jnp.zeros((b, h, t), jnp.float32)
    start, caps = place_streams(plan, kept, bound, first, reserve)
    tok_pos = jnp.broadcast_to(stats.positions.astype(jnp.int32)[None, None, :], (b, h, t))
    payload = Pools(k=stats.k, v=stats.v, pos=tok_pos, score=run1, score2=run2)
    pools = pack(pools, keep, start, payload, base=base, size=size, implementation=implementation)
    return pools, (base + start, kept, caps, budgets)
