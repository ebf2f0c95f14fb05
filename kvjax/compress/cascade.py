"""Cascading prefill for policies whose layer budgets depend on every layer (CAKE).

A layer's budget share is only known once all layers have been seen, but holding every layer's
full KV until then is what compression is meant to avoid. After each layer the policy's allocator
re-splits the total over the layers seen so far (its `preference` and `split` hooks), the earlier
layers shrink to their new (smaller) budgets by their stored scores, and the new layer is packed
behind them by the one compression step (`compress_layer`). The pool therefore never holds more
than the total budget, and the only full-size KV is the layer being computed.

Layout: budgets differ per sequence and per layer, so no layer has a static region. Every layer
shares the whole pool (`shared_layout`); streams sit back to back in (layer, head) order, each
followed by `headroom` free slots for decode tokens. Decode slices the whole pool per layer; the
Pallas decode kernel reads only each stream's used slots.

    plan = make_plan(policy, config, prompt_len, headroom)
    c = compressor(policy, plan, lengths, tokens_len, config, dtype, implementation)
    cache, occupancy = finish(state, traces, plan, lengths)   # occupancy [L, B]: used slots after each layer
"""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.cache import Cache, Plan, Pools, Streams, shared_layout
from kvjax.models import ModelConfig
from kvjax.pallas_kernels import masked_topk as mt
from kvjax.policies.policy import Policy
from kvjax.compress.step import compress_layer, layer_stats, resolve_budget
from kvjax.compress.oneshot import stream_bound
from kvjax.compress.prompt import Compressor


def make_plan(policy: Policy, config: ModelConfig, prompt_len: int, headroom: int) -> Plan:
    """Pool sized for the total budget: H * (L * (window + headroom) + L * (budget - window)), the
    budget at most what a stream can reach (prompt + `headroom` decode tokens)."""
    num_layers, h, w = config.num_layers, config.num_kv_heads, policy.protected_window
    bound = stream_bound(policy, prompt_len, headroom)
    # decode evicts every step; the extra free slots keep neighbouring streams apart, so pooling the
    # new query's attention over the pool never mixes two streams
    headroom = policy.decode_eviction.every + policy.scorer.decode_pool_radius
    total = num_layers * max(bound - w, 0)
    pool = h * (num_layers * (min(w, prompt_len) + headroom) + total)
    # the widest stream: a layer early in the cascade (up to the prompt), or one filling up to the budget
    stream_bounds = (min(max(prompt_len, bound), total + w),) * num_layers
    return Plan(shared_layout(pool, num_layers, h), stream_bounds, int(headroom), adaptive_heads=False, packed=True)


def _gather_streams(pool, start, max_len: int):
    """pool [B, P, ...], start [L, B, H] -> values [L, B, H, M, ...] of each stream's first M slots."""
    b, p = pool.shape[:2]
    idx = jnp.minimum(start[..., None] + jnp.arange(max_len), p - 1)  # [L, B, H, M]
    flat = jnp.moveaxis(idx, 1, 0).reshape(b, -1)
    gathered = jnp.take_along_axis(pool, flat.reshape(flat.shape + (1,) * (pool.ndim - 2)), axis=1)
    gathered = gathered.reshape((b,) + idx.shape[:1] + idx.shape[2:] + pool.shape[2:])
    return jnp.moveaxis(gathered, 0, 1), idx


def shrink_and_compact(pools: Pools, start, length, new_len, present, headroom: int, max_len: int, reserve):
    """Keep each stream's top `new_len` slots by `pools.score` and lay all streams out again back to back.

    start, length, new_len [L, B, H]; present [L] bool (layers holding streams); reserve [B]: the
    slots a stream keeps for itself when more than it holds (it fills up while decoding). Kept slots
    stay in their order. Returns (pools, start, length).
    """
    b, p = pools.score.shape
    sc, src = _gather_streams(pools.score, start, max_len)  # [L, B, H, M]
    inside = jnp.arange(max_len) < length[..., None]
    rows = sc.size // max_len
    new_len = jnp.minimum(new_len, length)
    keep = mt.masked_topk(sc.reshape(rows, max_len), new_len.reshape(rows), inside.reshape(rows, max_len))
    keep = keep.reshape(sc.shape)
    cap = jnp.where(present[:, None, None], jnp.maximum(new_len, reserve[None, :, None]) + headroom, 0)
    flat_cap = jnp.moveaxis(cap, 1, 0).reshape(b, -1)  # [B, L*H] in (layer, head) order
    new_start = jnp.moveaxis((jnp.cumsum(flat_cap, axis=1) - flat_cap).reshape((b,) + cap.shape[:1] + cap.shape[2:]), 0, 1)
    dest = jnp.where(keep, new_start[..., None] + jnp.cumsum(keep, axis=-1) - 1, p)
    source = jnp.full((b, p), -1, jnp.int32).at[jnp.arange(b)[:, None], jnp.moveaxis(dest, 1, 0).reshape(b, -1)].set(
        jnp.moveaxis(src, 1, 0).reshape(b, -1).astype(jnp.int32), mode="drop"
    )
    moved = source >= 0
    safe = jnp.maximum(source, 0)

    def move(pool, empty):
        got = jnp.take_along_axis(pool, safe.reshape(safe.shape + (1,) * (pool.ndim - 2)), axis=1)
        cond = moved.reshape(moved.shape + (1,) * (pool.ndim - 2))
        return jnp.where(cond, got, jnp.asarray(empty, pool.dtype))

    return pools.map(move), jnp.where(present[:, None, None], new_start, 0), new_len


def compressor(policy: Policy, plan: Plan, lengths, prompt_len: int, config: ModelConfig, dtype,
               implementation: str) -> Compressor:
    """The cascade of `policy` as a step of the prompt pass (state: the pool, streams, preferences)."""
    b = lengths.shape[0]
    num_layers, h = config.num_layers, config.num_kv_heads
    alloc = policy.allocator
    w, headroom = policy.protected_window, plan.headroom
    # without the cascade every layer keeps its full KV until the last one
    run_size = plan.layout.pool_size if alloc.cascade else max(plan.layout.pool_size,
                                                                h * num_layers * (prompt_len + headroom))
    per_head = resolve_budget(policy, lengths)
    total = num_layers * jnp.maximum(per_head - w, 0)  # B_total [B]
    # a budget that covers the prompt: every layer keeps it all and may fill up to the budget while
    # decoding (nothing is evicted until a stream is full)
    reserve = jnp.where(per_head >= lengths, jnp.minimum(per_head, max(plan.stream_bound)), 0).astype(jnp.int32)
    cap = jnp.maximum(lengths - w, 0)  # most prefix tokens a layer can keep [B]
    window_kept = jnp.minimum(lengths, w)
    layer_ids = jnp.arange(num_layers)
    bounds = jnp.asarray(plan.stream_bound, jnp.int32)

    def step(state, stats, layer_xs):
        pools, start, length, prefs, _ = state
        layer = stats.layer
        stats = layer_stats(policy, stats, config.attention_scale)
        prefs = prefs.at[:, layer].set(alloc.preference(stats))
        seen = jnp.broadcast_to(layer_ids <= layer, (b, num_layers))
        budgets = alloc.split(prefs, seen, total, cap)
        if not alloc.cascade:
            budgets = jnp.where(layer == num_layers - 1, budgets, cap[:, None])
        keep_count = jnp.where(seen, budgets + window_kept[:, None], 0)  # [B, L]

        earlier = layer_ids < layer
        pools, start, length = shrink_and_compact(
            pools, start, length, jnp.broadcast_to(keep_count.T[:, :, None], length.shape), earlier, headroom,
            prompt_len, reserve)
        held = jnp.maximum(length, reserve[None, :, None]) + headroom
        free = jnp.sum(jnp.where(earlier[:, None, None], held, 0), axis=(0, 2))  # [B]
        pools, (s, n, _, _) = compress_layer(policy, plan, pools, stats, keep_count[:, layer], bounds[layer],
                                             base=0, size=run_size, first=free, reserve=reserve,
                                             implementation=implementation)
        start, length = start.at[layer].set(s), length.at[layer].set(n)
        return (pools, start, length, prefs, reserve), length.sum(axis=(0, 2))

    streams0 = jnp.zeros((num_layers, b, h), jnp.int32)
    state = (Pools.empty(b, run_size, config.head_dim, dtype), streams0, streams0,
             jnp.zeros((b, num_layers), jnp.float32), reserve)
    scorer = policy.scorer
    return Compressor(step, state, (), scorer.needs_colsum, scorer.needs_colsq, scorer.group_reduce)


def finish(state, occupancy, plan: Plan, lengths):
    """(Cache, occupancy [L, B]) from the cascade's final state: the pool trimmed to the plan."""
    pools, start, length, _, reserve = state
    size = plan.layout.pool_size
    pools = pools.map(lambda a, _: a[:, :size])
    pools = Pools(pools.k, pools.v, pools.pos, pools.score, jnp.zeros_like(pools.score2))
    budget = jnp.maximum(length, reserve[None, :, None])  # what each layer's split left it, or the whole budget
    streams = Streams(start, length, budget + plan.headroom, budget)
    return Cache(pools, streams, lengths.astype(jnp.int32), plan.layout), occupancy
