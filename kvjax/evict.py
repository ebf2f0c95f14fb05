"""Eviction inside a layer region of the pool (decode-time and chunked prefill), in place.

    key = stream_key(scorer, pools, seen, candidates, budget, excess)      # [B, H, S], lower = evicted first
    regions, length = evict_one(moves, rel_start, length, target, key, has_candidate)   # decode: one slot
    victims = smallest(key, count, k_max); regions = compact(regions, rel_start, owner, victims)  # chunk

Every stream stays packed at the front of its segment: `evict_one` moves the stream's last slot into
the victim's, `compact` drops the victims and shifts the kept slots forward in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stream_mask(rel_start, length, span: int):
    """[B, H, S] bool: slot s of the region belongs to head h's used stream."""
    s = jnp.arange(span)[None, None, :]
    return (s >= rel_start[:, :, None]) & (s < (rel_start + length)[:, :, None])


def stream_key(scorer, score, score2, slot_pos, seen, candidates, budget, excess):
    """Eviction key per stream [B, H, S] (lower = evicted first, +inf = never this step).

    score, score2, slot_pos [B, S]; seen [B] tokens processed; candidates [B, H, S] the stream's
    unprotected slots; budget, excess [B, H] the stream's budget and how far it is above it.
    Scorers whose choice depends on the rest of the stream (RoCo ranks robustness inside it) define
    `stream_eviction_key`; the others rank each slot on its own through `eviction_key` [B, S].
    """
    per_stream = getattr(scorer, "stream_eviction_key", None)
    if per_stream is not None:
        return per_stream(score, score2, slot_pos, seen, candidates, budget, excess)
    return jnp.where(candidates, scorer.eviction_key(score, score2, slot_pos, seen)[:, None, :], jnp.inf)


def evict_one(moves, rel_start, length, budget, key, has_candidate):
    """Swap-remove the lowest-key slot of each stream whose length exceeds its budget.

    moves: tuple of ([B, S', ...] array, offset) moved together: a layer region (offset 0) or the
    whole pool (offset = the region's base), so keys and values move in place in the pool;
    rel_start/length/budget [B, H] relative to the region; key [B, H, S] (lower = evict first,
    +inf outside the stream's candidates, see `stream_key`); has_candidate [B, H] (a stream with
    no candidate keeps its length). Returns (moved arrays, new length).
    """
    b = key.shape[0]
    victim = jnp.argmin(key, axis=-1)  # [B, H]
    over = (length > budget) & has_candidate
    last = rel_start + length - 1
    rows = jnp.arange(b)[:, None]
    out = []
    for r, offset in moves:
        moved = r[rows, last + offset]
        cur = r[rows, victim + offset]
        cond = over.reshape(over.shape + (1,) * (r.ndim - 2))
        out.append(r.at[rows, victim + offset].set(jnp.where(cond, moved, cur)))
    return tuple(out), length - over.astype(length.dtype)


def smallest(key, count, k_max: int):
    """[B, H, S] bool: the `count` [B, H] lowest finite keys of each stream (ties: lower slot), at most k_max."""
    b, h, s = key.shape
    neg, idx = jax.lax.top_k(-key, min(k_max, s))  # [B, H, k]
    take = (jnp.arange(idx.shape[-1]) < count[..., None]) & (neg > -jnp.inf)
    return jnp.zeros(key.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx].set(take)


def compact(regions, rel_start, owner, victims):
    """Drop the victim slots [B, H, S] of every stream, packing the kept ones (in order) at its front.

    regions: tuple of [B, S, ...] arrays moved together; owner [B, H, S] the streams' used slots.
    Slots past a stream's new length keep stale values, as after `evict_one`.
    """
    b, _, s = owner.shape
    keep = owner & ~victims
    dest = rel_start[:, :, None] + jnp.cumsum(keep, axis=-1) - 1  # [B, H, S]
    dest = jnp.where(keep, dest, 0).sum(axis=1) + jnp.where(keep.any(axis=1), 0, s)  # [B, S]; s = drop
    rows = jnp.arange(b)[:, None]
    return tuple(r.at[rows, dest].set(r, mode="drop") for r in regions)


def layer_mean_by_offset(p, rel, length, width: int, model_axis: str | None = None):
    """TOVA: average a slot's attention over the layer's heads at the same offset in their streams
    (all heads of a layer hold the same positions in the same order). p [B, S] -> [B, S]; width:
    the most slots a stream holds; model_axis: inside a mesh program, the axis the heads are split
    over (the mean is over every device's heads)."""
    b, s = p.shape
    idx = rel[:, :, None] + jnp.arange(width)[None, None, :]  # [B, H, W]
    inside = jnp.arange(width)[None, None, :] < length[:, :, None]
    idx_c = jnp.minimum(idx, s - 1)
    vals = jnp.where(inside, jnp.take_along_axis(p[:, None, :], idx_c, axis=2), 0.0)
    total, count = vals.sum(axis=1), inside.sum(axis=1)
    if model_axis is not None:
        total, count = jax.lax.psum(total, model_axis), jax.lax.psum(count, model_axis)
    mean = total / jnp.maximum(count, 1)  # [B, W]
    out = jnp.zeros_like(p)
    rows = jnp.arange(b)[:, None, None]
    return out.at[rows, jnp.where(inside, idx_c, s)].set(
        jnp.broadcast_to(mean[:, None, :], idx.shape), mode="drop"
    )
