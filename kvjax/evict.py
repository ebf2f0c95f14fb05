"""Eviction inside a layer region of the pool (decode-time and chunked prefill), in place.

    key = stream_key(scorer, score, score2, pos, seen, candidates, budget, excess)   # lower = evicted first
    victim, last, over = evict_lowest(key, length, target, has_candidate)   # decode: one slot per stream
    victims = smallest(view_key(...), count, k_max); views, length = fill_from_tail(views, victims, length, k_max)

Decode and chunked prefill work on per-stream views ([B, H, W]: each stream's first W slots,
`stream_view`), so the cost follows the streams, not the layer region or (CAKE's cascade) the whole
pool. Every stream stays packed at the front of its segment: decode moves the stream's last slot
into the victim's (`move_slot`, `move_in_view`), `fill_from_tail` moves the stream's last kept
slots into a chunk's victims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache import Pools


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


def _rows(a):
    """[B, H, W] -> [B*H, W]: each stream a row, the [B, S] shape scorers take."""
    return a.reshape((-1,) + a.shape[2:])


def view_update(scorer, score, score2, probs, slot_pos, next_pos):
    """`scorer.decode_update` on per-stream views [B, H, W] (next_pos [B]) -> (score, score2) [B, H, W].
    Each stream is a row of its own, so pooling scorers (CAKE) pool inside the stream, zero-padded."""
    h = score.shape[1]
    new = scorer.decode_update(_rows(score), _rows(score2), _rows(probs), _rows(slot_pos), jnp.repeat(next_pos, h))
    return tuple(x.reshape(score.shape) for x in new)


def view_key(scorer, score, score2, slot_pos, seen, candidates, budget, excess):
    """`stream_key` on per-stream views: score, score2, slot_pos, candidates [B, H, W]; seen [B];
    budget, excess [B, H] -> key [B, H, W]."""
    b, h, w = score.shape
    key = stream_key(scorer, _rows(score), _rows(score2), _rows(slot_pos), jnp.repeat(seen, h),
                     candidates.reshape(b * h, 1, w), budget.reshape(b * h, 1), excess.reshape(b * h, 1))
    return key.reshape(b, h, w)


def stream_view(start, width: int, pool_size: int):
    """Each stream's first `width` slots: idx [B, H, W] absolute pool slots (clipped into the pool;
    offsets past a stream's length are masked by the caller)."""
    return jnp.minimum(start[..., None] + jnp.arange(width), pool_size - 1)


def gather_streams(a, idx):
    """a [B, P, ...] at each stream's slots idx [B, H, W] -> [B, H, W, ...]."""
    return a[jnp.arange(a.shape[0])[:, None, None], idx]


def scatter_streams(a, idx, valid, values):
    """a [B, P, ...] with values [B, H, W, ...] written at the stream slots idx [B, H, W] where valid (in
    place; one scatter with unique indices: the others go to distinct out-of-range slots and are dropped)."""
    b, p = a.shape[:2]
    spare = p + jnp.arange(idx[0].size).reshape(idx.shape[1:])  # distinct, out of range
    dest = jnp.where(valid, idx, spare)
    return a.at[jnp.arange(b)[:, None, None], dest].set(values.astype(a.dtype), mode="drop", unique_indices=True)


def move_slot(a, start, src, dst, do):
    """a [B, P, ...]: copy slot start+src into slot start+dst of every stream where do [B, H]
    (src, dst [B, H] offsets into the stream): one gather and one scatter of B*H rows."""
    rows = jnp.arange(a.shape[0])[:, None]
    src_slot, dst_slot = start + jnp.maximum(src, 0), start + dst
    cond = do.reshape(do.shape + (1,) * (a.ndim - 2))
    return a.at[rows, dst_slot].set(jnp.where(cond, a[rows, src_slot], a[rows, dst_slot]), unique_indices=True)


def evict_lowest(key, length, target, has_candidate):
    """The swap-remove of one slot per stream: the lowest-key offset [B, H] of each stream longer than
    its target (with a candidate) is the victim, and the stream's last slot moves into it.
    key [B, H, W] (lower = evict first, +inf = never); length, target [B, H]; has_candidate [B, H].
    Returns (victim [B, H], last [B, H], over [B, H] bool: whether the stream evicts)."""
    victim = jnp.argmin(key, axis=-1).astype(length.dtype)
    over = (length > target) & has_candidate
    return victim, length - 1, over


def move_in_view(a, src, dst, do):
    """a [B, H, W] (a per-stream view): copy offset src into offset dst where do [B, H]. A select,
    not a scatter, so XLA fuses it into whatever reads the view next."""
    moved = jnp.take_along_axis(a, jnp.maximum(src, 0)[..., None], axis=-1)  # [B, H, 1]
    here = (jnp.arange(a.shape[-1]) == dst[..., None]) & do[..., None]
    return jnp.where(here, moved, a)


def smallest(key, count, k_max: int):
    """[B, H, W] bool: the `count` [B, H] lowest finite keys of each stream (ties: lower offset), at most k_max."""
    b, h, s = key.shape
    neg, idx = jax.lax.top_k(-key, min(k_max, s))  # [B, H, k]
    take = (jnp.arange(idx.shape[-1]) < count[..., None]) & (neg > -jnp.inf)
    return jnp.zeros(key.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx].set(take)


def _kth(mask, k_max: int):
    """mask [B, H, N] bool -> [B, H, k_max] int32: the offset of each stream's k-th True (in
    order), N where there is none. A compare-and-count (no scatter, no sort)."""
    n = mask.shape[-1]
    cum = jnp.cumsum(mask, axis=-1, dtype=jnp.int32)  # [B, H, N]
    return (cum[..., None, :] <= jnp.arange(k_max, dtype=jnp.int32)[:, None]).sum(axis=-1, dtype=jnp.int32).clip(max=n)


def fill_from_tail(views, victims, length, k_max: int):
    """Drop at most `k_max` victims per stream by moving the stream's last kept slots into them: a
    swap-remove of several slots at once (the k-th hole left below the new length takes the k-th
    kept slot above it). The stream stays packed at the front; its order is not kept (as with
    decode's swap-remove, which this equals for one victim).

    views: a pytree (`Pools`, a tuple) of per-stream views [B, H, W, ...] moved together; victims
    [B, H, W] bool, at offsets < length [B, H]. Returns (views, length [B, H] after it): per field one
    gather and one scatter of k_max slots per stream, where packing in order rewrites all W."""
    b, h, w = victims.shape
    new_length = length - victims.sum(axis=-1, dtype=length.dtype)
    holes = victims & (jnp.arange(w) < new_length[..., None])
    tail = jnp.minimum(new_length[..., None] + jnp.arange(k_max), w - 1)  # [B, H, K] offsets above it
    movers = (new_length[..., None] + jnp.arange(k_max) < length[..., None]) & ~jnp.take_along_axis(victims, tail, -1)
    dst = _kth(holes, k_max)
    dst = jnp.where(dst < w, dst, w + jnp.arange(k_max))  # fewer holes: distinct offsets past W, dropped
    src = jnp.take_along_axis(tail, jnp.minimum(_kth(movers, k_max), k_max - 1), -1)
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]

    def move(v):
        picked = jnp.take_along_axis(v, src.reshape(src.shape + (1,) * (v.ndim - 3)), axis=2)
        return v.at[rows, heads, dst].set(picked, mode="drop", unique_indices=True)

    return jax.tree.map(move, views), new_length


def layer_mean(p, inside, model_axis: str | None = None):
    """TOVA: average each offset's attention over the layer's heads (all heads of a layer hold the
    same positions in the same order). p, inside [B, H, W] per-stream views -> [B, H, W];
    model_axis: inside a mesh program, the axis the heads are split over (the mean is over every
    device's heads)."""
    total = jnp.where(inside, p, 0.0).sum(axis=1)
    count = inside.sum(axis=1)
    if model_axis is not None:
        total, count = jax.lax.psum(total, model_axis), jax.lax.psum(count, model_axis)
    mean = total / jnp.maximum(count, 1)  # [B, W]
    return jnp.where(inside, mean[:, None, :], 0.0)


def decode_evict(scorer, ev, pools, st, length, probs, new_stats, active, step_due, next_pos, width: int,
                 model_axis: str | None = None):
    """One layer's decode-time eviction (the XLA ops; kvjax/evict_fused.py is the GPU kernel): update
    the statistics and evict, on each stream's first `width` slots. pools after the append; st the
    layer's streams (length before the append); length [B, H] after it; probs [B, H, W] (None: the
    scorer's statistics do not follow attention); new_stats: the new token's (score, score2) [B, H];
    active, step_due [B]; next_pos [B]. Returns (pools, length)."""
    idx = stream_view(st.start, width, pools.pos.shape[1])
    inside = jnp.arange(width) < length[..., None]  # [B, H, W], the new token included
    pos_w = jnp.where(inside, gather_streams(pools.pos, idx), -1)
    s_w, s2_w = gather_streams(pools.score, idx), gather_streams(pools.score2, idx)
    # the new token's running statistics start at the scorer's (zeros by default)
    fresh = (jnp.arange(width) == st.length[..., None]) & active[:, None, None]
    s_w, s2_w = (jnp.where(fresh, n[..., None], jnp.where(inside, o, 0.0)) for n, o in zip(new_stats, (s_w, s2_w)))
    if probs is not None:
        probs = jnp.where(inside, probs, 0.0)
        if scorer.layer_shared:
            probs = layer_mean(probs, inside, model_axis)
        updated = view_update(scorer, s_w, s2_w, probs, pos_w, next_pos)
        s_w, s2_w = (jnp.where(inside & active[:, None, None], n, o) for n, o in zip(updated, (s_w, s2_w)))
    written = inside
    new_pos = next_pos[:, None, None]
    target = jnp.where((step_due & active)[:, None], st.budget, jnp.iinfo(jnp.int32).max)
    k_pool, v_pool = pools.k, pools.v
    for _ in range(ev.every):
        inside = jnp.arange(width) < length[..., None]
        protected = (pos_w > new_pos - ev.recent) | (pos_w < ev.sinks)
        cand = inside & ~protected
        key = view_key(scorer, s_w, s2_w, pos_w, next_pos + 1, cand, st.budget, length - st.budget)
        victim, last, over = evict_lowest(key, length, target, cand.any(axis=-1))
        k_pool, v_pool = (move_slot(a, st.start, last, victim, over) for a in (k_pool, v_pool))
        pos_w, s_w, s2_w = (move_in_view(a, last, victim, over) for a in (pos_w, s_w, s2_w))
        length = length - over.astype(length.dtype)
    # the views go back in three scatters; slots past the new length keep stale values
    pos, score, score2 = (scatter_streams(a, idx, written, w) for a, w in
                          ((pools.pos, pos_w), (pools.score, s_w), (pools.score2, s2_w)))
    return Pools(k_pool, v_pool, pos, score, score2), length
