"""One decode step over the pooled cache, with optional decode-time eviction, inside jit.

Per layer: project the new token, append its key/value at the end of each of the sequence's
streams, attend over each stream, and (for policies that evict while decoding) update the running
statistics and evict the lowest-scoring unprotected slot of any stream above its budget by moving
the stream's last slot into it, so every stream stays packed at the front of its segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import decode_attention, stream_mask
from kvjax.cache import Cache
from kvjax.engine import TRACE_COUNTS, Plan
from kvjax.models import ModelConfig, Weights
from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq
from kvjax.policies.base import reduce_group
from kvjax.policies.policy import Policy


def _append(region, slot, value, active):
    """region [B, S, ...]; write value [B, H, ...] at slot [B, H] where active [B]."""
    b = region.shape[0]
    rows = jnp.arange(b)[:, None]
    old = region[rows, slot]
    return region.at[rows, slot].set(jnp.where(active.reshape((b, 1) + (1,) * (value.ndim - 2)), value, old))


def _evict_one(regions, rel_start, length, budget, key, protected):
    """Swap-remove the lowest-key unprotected slot of each stream whose length exceeds its budget.

    regions: tuple of [B, S, ...] arrays moved together; rel_start/length/budget [B, H];
    key [B, S] (lower = evict first); protected [B, S] bool.
    """
    b, s = key.shape
    owner = stream_mask(rel_start, length, s)  # [B, H, S]
    cand = owner & ~protected[:, None, :]
    masked = jnp.where(cand, key[:, None, :], jnp.inf)
    victim = jnp.argmin(masked, axis=-1)  # [B, H]
    over = (length > budget) & jnp.any(cand, axis=-1)
    last = rel_start + length - 1
    rows = jnp.arange(b)[:, None]
    out = []
    for r in regions:
        moved = r[rows, last]
        cur = r[rows, victim]
        cond = over.reshape(over.shape + (1,) * (r.ndim - 2))
        out.append(r.at[rows, victim].set(jnp.where(cond, moved, cur)))
    return tuple(out), length - over.astype(length.dtype)


def decode_step(weights: Weights, cache: Cache, tokens, policy: Policy, active=None, *, config: ModelConfig,
                plan: Plan, implementation: str = "xla"):
    """Feed one token per sequence. tokens [B] int, active [B] bool (inactive rows are untouched).

    Returns (cache, logits [B, V] float32).
    """
    TRACE_COUNTS["decode"] += 1
    b = tokens.shape[0]
    h, g = config.num_kv_heads, config.group_size
    active = jnp.ones((b,), bool) if active is None else active
    positions = cache.next_pos[:, None]
    inv_freq = rope_inv_freq(config)
    span = plan.max_span
    ev = policy.decode_eviction
    scorer = policy.scorer

    def layer_step(carry, xs):
        x, k_pool, v_pool, pos_pool, s_pool, s2_pool = carry
        lw, base, start, length, budget, step_due = xs
        q, kn, vn = layer_qkv(lw, x, positions, config, inv_freq)  # q [B,H,G,1,D], kn [B,H,1,D]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, base, span, axis=1)
        k_r, v_r, pos_r, s_r, s2_r = map(take, (k_pool, v_pool, pos_pool, s_pool, s2_pool))
        rel = start - base
        slot = rel + length
        k_r = _append(k_r, slot, kn[:, :, 0].astype(k_r.dtype), active)
        v_r = _append(v_r, slot, vn[:, :, 0].astype(v_r.dtype), active)
        pos_r = _append(pos_r, slot, jnp.broadcast_to(cache.next_pos[:, None], (b, h)), active)
        s_r = _append(s_r, slot, jnp.zeros((b, h), s_r.dtype), active)
        s2_r = _append(s2_r, slot, jnp.zeros((b, h), s2_r.dtype), active)
        length = length + active[:, None].astype(length.dtype)
        min_pos = None
        if config.sliding_window is not None:
            min_pos = cache.next_pos - config.sliding_window + 1
        out, probs = decode_attention(
            q[:, :, :, 0], k_r, v_r, rel, length, pos_r, min_pos,
            scale=config.attention_scale, implementation=implementation, need_probs=ev is not None,
        )
        x = mlp(lw, x + attn_output(lw, out[:, :, :, None].astype(x.dtype)), config)
        if ev is not None:
            p = reduce_group(probs, getattr(scorer, "group_reduce", "mean")).sum(axis=1)  # [B, S]
            if scorer.layer_shared:
                p = _layer_mean_by_offset(p, rel, length, plan)
            s_new, s2_new = scorer.decode_update(s_r, s2_r, p, pos_r, cache.next_pos)
            # only this layer's streams: layers may share one region (kvjax/cascade.py)
            mine = active[:, None] & stream_mask(rel, length, span).any(axis=1)
            s_r = jnp.where(mine, s_new, s_r)
            s2_r = jnp.where(mine, s2_new, s2_r)
            new_pos = cache.next_pos[:, None]
            regions = (k_r, v_r, pos_r, s_r, s2_r)
            target = jnp.where((step_due & active)[:, None], budget, jnp.iinfo(jnp.int32).max)
            for _ in range(ev.every):
                _, _, pos_now, s_now, s2_now = regions
                key = scorer.eviction_key(s_now, s2_now, pos_now, cache.next_pos + 1)
                protected = (pos_now > new_pos - ev.recent) | (pos_now < ev.sinks)
                regions, length = _evict_one(regions, rel, length, target, key, protected)
            k_r, v_r, pos_r, s_r, s2_r = regions
        put = lambda pool, r: jax.lax.dynamic_update_slice_in_dim(pool, r, base, axis=1)
        carry = (x, put(k_pool, k_r), put(v_pool, v_r), put(pos_pool, pos_r), put(s_pool, s_r), put(s2_pool, s2_r))
        return carry, length

    # each sequence evicts on its own schedule (its own position), so a batch behaves like its rows alone
    step_due = jnp.ones((b,), bool)
    if ev is not None and ev.every > 1:
        step_due = (cache.next_pos % ev.every) == 0
    xs = (
        weights.layers,
        jnp.asarray(cache.layout.layer_base, jnp.int32),
        cache.start.transpose(1, 0, 2),
        cache.length.transpose(1, 0, 2),
        cache.budget.transpose(1, 0, 2),
        jnp.broadcast_to(step_due, (config.num_layers, b)),
    )
    init = (embed(weights, tokens[:, None]), cache.k, cache.v, cache.pos, cache.score, cache.score2)
    (x, k, v, pos, s, s2), length = jax.lax.scan(layer_step, init, xs)
    logits = final_logits(weights, x, config)[:, 0]
    new = Cache(
        k=k, v=v, pos=pos, score=s, score2=s2, start=cache.start, length=length.transpose(1, 0, 2),
        cap=cache.cap, budget=cache.budget, next_pos=cache.next_pos + active.astype(jnp.int32),
        layout=cache.layout,
    )
    return new, logits


def _layer_mean_by_offset(p, rel, length, plan: Plan):
    """TOVA: average a slot's attention over the layer's heads at the same offset in their streams
    (all heads of a layer hold the same positions in the same order). p [B, S] -> [B, S]."""
    b, s = p.shape
    width = max(plan.stream_bound) + plan.headroom
    idx = rel[:, :, None] + jnp.arange(width)[None, None, :]  # [B, H, W]
    inside = jnp.arange(width)[None, None, :] < length[:, :, None]
    idx_c = jnp.minimum(idx, s - 1)
    vals = jnp.where(inside, jnp.take_along_axis(p[:, None, :], idx_c, axis=2), 0.0)
    mean = vals.sum(axis=1) / jnp.maximum(inside.sum(axis=1), 1)  # [B, W]
    out = jnp.zeros_like(p)
    rows = jnp.arange(b)[:, None, None]
    return out.at[rows, jnp.where(inside, idx_c, s)].set(
        jnp.broadcast_to(mean[:, None, :], idx.shape), mode="drop"
    )
