"""Cascading prefill for policies whose layer budgets depend on every layer (CAKE).

A layer's budget share is only known once all layers have been seen, but holding every layer's
full KV until then is what compression is meant to avoid. The cascade re-splits the total after
each layer over the layers seen so far, shrinks the earlier layers to their new (smaller) budgets
with their stored scores, and packs the new layer behind them. The pool therefore never holds
more than the total budget, and the only full-size KV is the layer being computed.

Layout: budgets differ per sequence and per layer, so no layer has a static region. Every layer
shares the whole pool (`layer_base` 0, `layer_span` P); streams sit back to back in (layer, head)
order, each followed by `headroom` free slots for decode tokens. Decode slices the whole pool per
layer; the Pallas decode kernel reads only each stream's used slots.

    make_plan(policy, config, prompt_len, max_new_tokens) -> Plan
    prefill(weights, tokens [B, T], lengths [B], policy, rng, config=, plan=)
        -> (Cache, logits [B, V], occupancy [L, B])   occupancy: used slots after each layer
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from kvjax.cache import Cache, Layout
from kvjax.engine import BUDGET_ROUNDING, TRACE_COUNTS, Plan, resolve_budget, window_attention
from kvjax.models import ModelConfig, Weights
from kvjax.models.prompt_attention import causal_attention
from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq, scan_layers
from kvjax.pallas_kernels import budget_scatter as bs
from kvjax.pallas_kernels import masked_topk as mt
from kvjax.policies.base import PrefillStats
from kvjax.policies.cake import layer_preference, split_budgets


def _per_head_bound(policy, prompt_len: int) -> int:
    budget = policy.budget
    if isinstance(budget, float):
        return min(math.ceil(budget * prompt_len), prompt_len)
    return min(-(-int(budget) // BUDGET_ROUNDING) * BUDGET_ROUNDING, prompt_len)


def make_plan(policy, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> Plan:
    """Pool sized for the total budget: H * (L * (window + headroom) + L * (budget - window))."""
    num_layers, h, w = config.num_layers, config.num_kv_heads, policy.window
    bound = _per_head_bound(policy, prompt_len)
    # decode evicts every step; the extra kernel // 2 free slots keep neighbouring streams apart, so
    # pooling the new query's attention over the pool never mixes two streams
    headroom = policy.decode_eviction.every + policy.scorer.kernel // 2
    total = num_layers * max(bound - w, 0)
    pool = h * (num_layers * (min(w, prompt_len) + headroom) + total)
    layout = Layout((0,) * num_layers, (pool,) * num_layers, h)
    stream_bound = (min(prompt_len, total + w),) * num_layers
    return Plan(layout, stream_bound, int(headroom), False)


def _gather_streams(pool, start, max_len: int):
    """pool [B, P, ...], start [B, L, H] -> values [B, L, H, M, ...] of each stream's first M slots."""
    b, p = pool.shape[:2]
    idx = jnp.minimum(start[..., None] + jnp.arange(max_len), p - 1)  # [B, L, H, M]
    flat = idx.reshape(b, -1)
    gathered = jnp.take_along_axis(pool, flat.reshape(flat.shape + (1,) * (pool.ndim - 2)), axis=1)
    return gathered.reshape(idx.shape + pool.shape[2:]), idx


def shrink_and_compact(pools, score, start, length, new_len, present, headroom: int, max_len: int):
    """Keep each stream's top `new_len` slots by `score` and lay all streams out again back to back.

    pools: tuple of ([B, P, ...] array, value of an empty slot) moved together (keys, values,
    positions, scores); score [B, P]; start, length, new_len [B, L, H]; present [L] bool
    (layers holding streams). Kept slots stay in their order. Returns (pools, start, length).
    """
    b, p = score.shape
    sc, src = _gather_streams(score, start, max_len)
    inside = jnp.arange(max_len) < length[..., None]
    rows = b * start.shape[1] * start.shape[2]
    new_len = jnp.minimum(new_len, length)
    keep = mt.masked_topk(sc.reshape(rows, max_len), new_len.reshape(rows), inside.reshape(rows, max_len))
    keep = keep.reshape(sc.shape)
    cap = jnp.where(present[None, :, None], new_len + headroom, 0)
    flat_cap = cap.reshape(b, -1)
    new_start = (jnp.cumsum(flat_cap, axis=1) - flat_cap).reshape(cap.shape)
    dest = jnp.where(keep, new_start[..., None] + jnp.cumsum(keep, axis=-1) - 1, p)
    source = jnp.full((b, p), -1, jnp.int32).at[jnp.arange(b)[:, None], dest.reshape(b, -1)].set(
        src.reshape(b, -1).astype(jnp.int32), mode="drop"
    )
    moved = source >= 0
    safe = jnp.maximum(source, 0)

    def move(pool, empty):
        got = jnp.take_along_axis(pool, safe.reshape(safe.shape + (1,) * (pool.ndim - 2)), axis=1)
        cond = moved.reshape(moved.shape + (1,) * (pool.ndim - 2))
        return jnp.where(cond, got, jnp.asarray(empty, pool.dtype))

    return tuple(move(pool, empty) for pool, empty in pools), jnp.where(present[None, :, None], new_start, 0), new_len


def prefill(weights: Weights, tokens, lengths, policy, rng, *, config: ModelConfig, plan: Plan,
            implementation: str = "xla"):
    """Prefill with the cascade. Returns (cache, logits of the last token [B, V], occupancy [L, B])."""
    TRACE_COUNTS["prefill"] += 1
    b, t = tokens.shape
    num_layers, h, d = config.num_layers, config.num_kv_heads, config.head_dim
    w, headroom = policy.window, plan.headroom
    pool_size = plan.layout.pool_size
    # without the cascade every layer keeps its full KV until the last one
    run_size = pool_size if policy.cascade else max(pool_size, h * num_layers * (t + headroom))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = rope_inv_freq(config)
    scorer = policy.scorer
    per_head = resolve_budget(policy, lengths)
    total = num_layers * jnp.maximum(per_head - w, 0)  # B_total [B]
    cap = jnp.maximum(lengths - w, 0)  # most prefix tokens a layer can keep [B]
    window_kept = jnp.minimum(lengths, w)
    layer_ids = jnp.arange(num_layers)
    dtype = weights.embed.dtype

    def layer_step(carry, xs):
        x, k_pool, v_pool, pos_pool, s_pool, start, length, prefs = carry
        lw, layer = xs
        q, k, v = layer_qkv(lw, x, positions, config, inv_freq)
        attn = causal_attention(q, k, v, lengths, scale=config.attention_scale, sliding_window=config.sliding_window)
        x = mlp(lw, x + attn_output(lw, attn), config)
        win_attn, row_valid = window_attention(q, k, lengths, w, config.attention_scale)
        stats = PrefillStats(k, v, lengths, win_attn, row_valid, None, None, layer, rng)
        prefs = prefs.at[:, layer].set(layer_preference(stats, w, policy.tau1, policy.tau2))
        seen = jnp.broadcast_to(layer_ids <= layer, (b, num_layers))
        budgets = split_budgets(prefs, seen, total, cap)
        if not policy.cascade:
            budgets = jnp.where(layer == num_layers - 1, budgets, cap[:, None])
        keep_count = jnp.where(seen, budgets + window_kept[:, None], 0)  # [B, L]

        earlier = layer_ids < layer
        (k_pool, v_pool, pos_pool, s_pool), start, length = shrink_and_compact(
            ((k_pool, 0), (v_pool, 0), (pos_pool, -1), (s_pool, 0)), s_pool, start, length,
            jnp.broadcast_to(keep_count[:, :, None], length.shape), earlier, headroom, t,
        )

        scores = scorer.prefill_scores(stats).astype(jnp.float32)
        forced = stats.positions[None, :] >= (lengths - w)[:, None]
        scores = jnp.where(forced[:, None, :], jnp.inf, scores)
        valid = jnp.broadcast_to(stats.valid[:, None, :], (b, h, t))
        kept = jnp.broadcast_to(keep_count[:, layer][:, None], (b, h))
        keep = mt.masked_topk(scores.reshape(b * h, t), kept.reshape(-1), valid.reshape(b * h, t),
                              implementation=implementation).reshape(b, h, t)
        free = jnp.sum(jnp.where(earlier[None, :, None], length + headroom, 0), axis=(1, 2))
        caps = keep.sum(-1).astype(jnp.int32) + headroom
        rel_start = free[:, None] + jnp.cumsum(caps, axis=1) - caps
        src_head, src_tok, written = bs.pack_plan(keep, rel_start, run_size)

        def pack(pool, src):
            if src.ndim == 4:
                return bs.budget_scatter(pool, src.astype(pool.dtype), src_head, src_tok, written,
                                         implementation=implementation)
            gathered = src[jnp.arange(b)[:, None], src_head, src_tok]
            return jnp.where(written, gathered.astype(pool.dtype), pool)

        tok_pos = jnp.broadcast_to(positions[:, None, :], (b, h, t))
        k_pool, v_pool = pack(k_pool, k), pack(v_pool, v)
        pos_pool, s_pool = pack(pos_pool, tok_pos), pack(s_pool, scores)
        start = start.at[:, layer].set(rel_start)
        length = length.at[:, layer].set(keep.sum(-1).astype(jnp.int32))
        carry = (x, k_pool, v_pool, pos_pool, s_pool, start, length, prefs)
        return carry, length.sum(axis=(1, 2))

    init = (
        embed(weights, tokens),
        jnp.zeros((b, run_size, d), dtype),
        jnp.zeros((b, run_size, d), dtype),
        jnp.full((b, run_size), -1, jnp.int32),
        jnp.zeros((b, run_size), jnp.float32),
        jnp.zeros((b, num_layers, h), jnp.int32),
        jnp.zeros((b, num_layers, h), jnp.int32),
        jnp.zeros((b, num_layers), jnp.float32),
    )
    carry, occupancy = scan_layers(layer_step, init, (weights.layers, layer_ids))
    x, k_pool, v_pool, pos_pool, s_pool, start, length, _ = carry
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    logits = final_logits(weights, last, config)[:, 0]
    trim = lambda a: a[:, :pool_size]
    cache = Cache(
        k=trim(k_pool), v=trim(v_pool), pos=trim(pos_pool), score=trim(s_pool),
        score2=jnp.zeros((b, pool_size), jnp.float32), start=start, length=length, cap=length + headroom,
        budget=length, next_pos=lengths.astype(jnp.int32), layout=plan.layout,
    )
    return cache, logits, occupancy
