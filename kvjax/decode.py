"""Decode steps over the pooled cache, with optional decode-time eviction, inside jit.

    decode_step(weights, cache, tokens [B], policy, active [B])        -> (cache, logits [B, V])
    extend_step(weights, cache, tokens [B, C], n_valid [B], policy)    -> (cache, logits [B, C, V], peak)

Per layer: project the new token(s), append the key/value at the end of each of the sequence's
streams, attend over each stream, and (for policies that evict while decoding) update the running
statistics and evict. `decode_step` evicts the lowest-key candidate of any stream above its budget
by moving the stream's last slot into it; `extend_step` (chunked prefill, streaming perplexity)
removes a stream's whole excess at once and compacts it. Either way every stream stays packed at
the front of its segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.decode_attention import append_and_attend, decode_attention, new_token_probs, stream_mask
from kvjax.cache import Cache
from kvjax.engine import TRACE_COUNTS, Plan
from kvjax.models import ModelConfig, Weights
from kvjax.models.prompt_attention import NEG_INF
from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq, scan_layers
from kvjax.pallas_kernels.ragged_decode_attention import write_rows
from kvjax.policies.base import reduce_group
from kvjax.policies.policy import Policy


#: Batch sizes [lo, hi) whose decode programs on GPU run their matmuls through cuBLAS only, not
#: XLA's Triton GEMMs. Measured on an H100 at Llama-8B shapes: Triton wins at batch 1 (7.0 vs
#: 8.7 ms per step, decode_h100_run9_cublas.md), cuBLAS at batch 32 (8.06 vs 8.46 ms at 1024 tokens
#: per head, 6.90 vs 7.31 at 256); at batch 408 XLA's own choice was faster (30.4 ms in run 8 vs
#: 32.3 with cuBLAS only in run 10).
CUBLAS_BATCHES = (16, 256)


def gemm_compiler_options(batch: int) -> dict:
    """XLA compiler options for a jitted decode program of this batch size (see CUBLAS_BATCHES)."""
    lo, hi = CUBLAS_BATCHES
    if jax.default_backend() == "gpu" and lo <= batch < hi:
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


def _append(region, slot, value, active):
    """region [B, S, ...]; write value [B, H, ...] at slot [B, H] where active [B] (in place)."""
    return write_rows(region, jnp.where(active[:, None], slot, -1), value)


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


def _evict_one(moves, rel_start, length, budget, key, has_candidate):
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


def decode_step(weights: Weights, cache: Cache, tokens, policy: Policy, active=None, *, config: ModelConfig,
                plan: Plan, implementation: str = "xla"):
    """Feed one token per sequence. tokens [B] int, active [B] bool (inactive rows are untouched).

    implementation "pallas": the decode kernel appends the new key/value and attends over each
    stream's used slots; policies that evict while decoding take the new query's probabilities
    from a second kernel (kvjax/pallas_kernels/stream_probs.py). "xla": dense over the layer region.
    Returns (cache, logits [B, V] float32).
    """
    TRACE_COUNTS["decode"] += 1
    b = tokens.shape[0]
    h = config.num_kv_heads
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
        # The new token goes straight into the pool and evictions move slots in place: the pool is
        # a loop carry, so XLA updates it without copying; only reads slice the layer's region.
        slot = start + length
        pos_pool = _append(pos_pool, slot, jnp.broadcast_to(cache.next_pos[:, None], (b, h)), active)
        min_pos = None
        if config.sliding_window is not None:
            min_pos = cache.next_pos - config.sliding_window + 1
        fused = implementation == "pallas"
        if fused:
            # the kernel writes the new key/value itself and reads only each stream's used slots,
            # wherever they lie in the pool
            out, k_pool, v_pool, *lse = append_and_attend(
                q[:, :, :, 0], k_pool, v_pool, start, length, pos_pool, min_pos, kn[:, :, 0], vn[:, :, 0],
                jnp.where(active[:, None], slot, -1), scale=config.attention_scale, region_slots=span,
                skewed=plan.adaptive_heads, return_lse=ev is not None)
        else:
            k_pool = _append(k_pool, slot, kn[:, :, 0].astype(k_pool.dtype), active)
            v_pool = _append(v_pool, slot, vn[:, :, 0].astype(v_pool.dtype), active)
        if ev is not None:  # only decode-time eviction reads the running statistics
            s_pool = _append(s_pool, slot, jnp.zeros((b, h), s_pool.dtype), active)
            s2_pool = _append(s2_pool, slot, jnp.zeros((b, h), s2_pool.dtype), active)
        length = length + active[:, None].astype(length.dtype)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, base, span, axis=1)
        rel = start - base
        if not fused:
            out, probs = decode_attention(
                q[:, :, :, 0], take(k_pool), take(v_pool), rel, length, take(pos_pool), min_pos,
                scale=config.attention_scale, implementation=implementation, need_probs=ev is not None,
            )
        x = mlp(lw, x + attn_output(lw, out[:, :, :, None].astype(x.dtype)), config)
        if ev is not None:
            pos_r, s_r, s2_r = take(pos_pool), take(s_pool), take(s2_pool)
            reduce = getattr(scorer, "group_reduce", "mean")
            if fused:  # a second kernel reads the streams' keys again for the probabilities
                p = take(new_token_probs(q[:, :, :, 0], k_pool, start, length, lse[0], pos_pool, min_pos,
                                         scale=config.attention_scale, reduce=reduce, region_slots=span,
                                         skewed=plan.adaptive_heads))  # [B, S]
            else:
                p = reduce_group(probs, reduce).sum(axis=1)  # [B, S]
            if scorer.layer_shared:
                p = _layer_mean_by_offset(p, rel, length, plan)
            s_new, s2_new = scorer.decode_update(s_r, s2_r, p, pos_r, cache.next_pos)
            # only this layer's streams: layers may share one region (kvjax/cascade.py)
            mine = active[:, None] & stream_mask(rel, length, span).any(axis=1)
            s_r = jnp.where(mine, s_new, s_r)
            s2_r = jnp.where(mine, s2_new, s2_r)
            new_pos = cache.next_pos[:, None]
            target = jnp.where((step_due & active)[:, None], budget, jnp.iinfo(jnp.int32).max)
            for _ in range(ev.every):
                protected = (pos_r > new_pos - ev.recent) | (pos_r < ev.sinks)
                cand = stream_mask(rel, length, span) & ~protected[:, None, :]
                key = stream_key(scorer, s_r, s2_r, pos_r, cache.next_pos + 1, cand, budget, length - budget)
                moves = ((k_pool, base), (v_pool, base), (pos_r, 0), (s_r, 0), (s2_r, 0))
                (k_pool, v_pool, pos_r, s_r, s2_r), length = _evict_one(
                    moves, rel, length, target, key, cand.any(axis=-1))
            put = lambda pool, r: jax.lax.dynamic_update_slice_in_dim(pool, r, base, axis=1)
            pos_pool, s_pool, s2_pool = put(pos_pool, pos_r), put(s_pool, s_r), put(s2_pool, s2_r)
        carry = (x, k_pool, v_pool, pos_pool, s_pool, s2_pool)
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
    (x, k, v, pos, s, s2), length = scan_layers(layer_step, init, xs)
    logits = final_logits(weights, x, config)[:, 0]
    new = Cache(
        k=k, v=v, pos=pos, score=s, score2=s2, start=cache.start, length=length.transpose(1, 0, 2),
        cap=cache.cap, budget=cache.budget, next_pos=cache.next_pos + active.astype(jnp.int32),
        layout=cache.layout,
    )
    return new, logits


def _smallest(key, count, k_max: int):
    """[B, H, S] bool: the `count` [B, H] lowest finite keys of each stream (ties: lower slot), at most k_max."""
    b, h, s = key.shape
    neg, idx = jax.lax.top_k(-key, min(k_max, s))  # [B, H, k]
    take = (jnp.arange(idx.shape[-1]) < count[..., None]) & (neg > -jnp.inf)
    return jnp.zeros(key.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx].set(take)


def _compact(regions, rel_start, owner, victims):
    """Drop the victim slots [B, H, S] of every stream, packing the kept ones (in order) at its front.

    regions: tuple of [B, S, ...] arrays moved together; owner [B, H, S] the streams' used slots.
    Slots past a stream's new length keep stale values, as after `_evict_one`.
    """
    b, _, s = owner.shape
    keep = owner & ~victims
    dest = rel_start[:, :, None] + jnp.cumsum(keep, axis=-1) - 1  # [B, H, S]
    dest = jnp.where(keep, dest, 0).sum(axis=1) + jnp.where(keep.any(axis=1), 0, s)  # [B, S]; s = drop
    rows = jnp.arange(b)[:, None]
    return tuple(r.at[rows, dest].set(r, mode="drop") for r in regions)


def _chunk_attention(q, k_s, v_s, visible, scale: float):
    """Queries of a chunk over their own streams. q [B, H, G, C, D]; k_s, v_s [B, H, W, D] (each
    stream's first W slots); visible [B, H, C, W].
    Returns (out [B, H, G, C, D] float32, probs [B, H, G, C, W] float32)."""
    b, h, g, c, d = q.shape
    w = k_s.shape[2]
    logits = jnp.matmul(
        q.reshape(b, h, g * c, d), jnp.swapaxes(k_s, 2, 3), preferred_element_type=jnp.float32
    ).reshape(b, h, g, c, w) * scale
    mask = visible[:, :, None]
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # a query with nothing visible (inactive row) attends to nothing
    out = jnp.matmul(probs.reshape(b, h, g * c, w).astype(v_s.dtype), v_s, preferred_element_type=jnp.float32)
    return out.reshape(b, h, g, c, d), probs


def extend_step(weights: Weights, cache: Cache, tokens, n_valid, policy: Policy, *, config: ModelConfig,
                plan: Plan, evict: bool = True):
    """Feed a chunk of up to C tokens per sequence at once (chunked prefill, streaming perplexity).

    tokens [B, C] int; n_valid [B] int (row b feeds its first n_valid[b] tokens; 0 leaves it as is).
    Every stream gets the chunk appended; the chunk's queries attend over the stream and the chunk
    (causal by position); the running statistics take each query's attention in order, exactly as
    C decode steps would; then, if `evict` and the policy evicts, every stream above its budget
    loses its whole excess at once: the lowest keys of `stream_key` (RoCo: the rule of
    kvjax/policies/roco.py with m = the excess). Streams need cap >= budget + C (the plan's headroom).
    Returns (cache, logits [B, C, V] float32, peak [B, L, H] stream lengths before eviction).
    """
    b, c = tokens.shape
    h = config.num_kv_heads
    if plan.headroom < c:
        raise ValueError(f"a chunk of {c} tokens needs a plan with headroom >= {c} (got {plan.headroom})")
    span = plan.max_span
    inv_freq = rope_inv_freq(config)
    q_idx = jnp.arange(c)
    positions = cache.next_pos[:, None] + q_idx[None, :]  # [B, C]
    q_valid = q_idx[None, :] < n_valid[:, None]  # [B, C]
    seen = cache.next_pos + n_valid  # tokens processed after this chunk
    newest = seen - 1
    ev = policy.decode_eviction
    scorer = policy.scorer
    if ev is not None and scorer.layer_shared:
        raise ValueError("extend_step does not support layer-shared scorers (TOVA): feed tokens with decode_step")
    rows3 = jnp.arange(b)[:, None, None]
    width = min(max(plan.stream_bound) + plan.headroom, span)  # no stream holds more

    def layer_step(carry, xs):
        x, k_pool, v_pool, pos_pool, s_pool, s2_pool = carry
        lw, base, start, length, budget = xs
        q, kn, vn = layer_qkv(lw, x, positions, config, inv_freq)  # q [B,H,G,C,D], kn [B,H,C,D]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, base, span, axis=1)
        k_r, v_r, pos_r, s_r, s2_r = map(take, (k_pool, v_pool, pos_pool, s_pool, s2_pool))
        rel = start - base
        slots = jnp.where(q_valid[:, None, :], (rel + length)[:, :, None] + q_idx, span)  # [B, H, C]; span = drop
        write = lambda r, val: r.at[rows3, slots].set(val.astype(r.dtype), mode="drop")
        k_r, v_r = write(k_r, kn), write(v_r, vn)
        pos_r = write(pos_r, jnp.broadcast_to(positions[:, None, :], (b, h, c)))
        s_r, s2_r = write(s_r, jnp.zeros((b, h, c))), write(s2_r, jnp.zeros((b, h, c)))
        length = length + n_valid[:, None].astype(length.dtype)
        owner = stream_mask(rel, length, span)  # [B, H, S]
        # attend per stream (C queries make a region-wide matmul H times too costly): gather each
        # stream's first W slots, W = the most any stream holds
        inside = jnp.arange(width) < length[:, :, None]  # [B, H, W]
        idx = jnp.where(inside, rel[:, :, None] + jnp.arange(width), span)  # span = outside
        gather = lambda r: r[rows3, jnp.minimum(idx, span - 1)]
        gap = positions[:, None, :, None] - gather(pos_r)[:, :, None, :]  # [B, H, C, W]
        visible = inside[:, :, None, :] & (gap >= 0)
        if config.sliding_window is not None:
            visible &= gap < config.sliding_window
        out, probs = _chunk_attention(q, gather(k_r), gather(v_r), visible, config.attention_scale)
        x = mlp(lw, x + attn_output(lw, out.astype(x.dtype)), config)
        if ev is not None:
            p_s = reduce_group(probs, getattr(scorer, "group_reduce", "mean"))  # [B, H, C, W]
            p = jnp.zeros((b, c, span), jnp.float32).at[  # back to region slots: [B, C, S]
                rows3[..., None], q_idx[None, :, None, None], idx[:, None]
            ].set(p_s.swapaxes(1, 2), mode="drop")

            def one_query(stats, xs):
                p_c, pos_c, valid_c = xs
                new = scorer.decode_update(stats[0], stats[1], p_c, pos_r, pos_c)
                return tuple(jnp.where(valid_c[:, None], n, o) for n, o in zip(new, stats)), None

            (s_new, s2_new), _ = jax.lax.scan(one_query, (s_r, s2_r), (p.swapaxes(0, 1), positions.T, q_valid.T))
            mine = owner.any(axis=1)  # only this layer's streams: layers may share one region
            s_r, s2_r = jnp.where(mine, s_new, s_r), jnp.where(mine, s2_new, s2_r)
        peak = length
        if ev is not None and evict:
            protected = (pos_r > newest[:, None] - ev.recent) | (pos_r < ev.sinks)
            cand = owner & ~protected[:, None, :]
            excess = jnp.maximum(length - budget, 0)
            key = stream_key(scorer, s_r, s2_r, pos_r, seen, cand, budget, excess)
            victims = _smallest(key, excess, c)
            k_r, v_r, pos_r, s_r, s2_r = _compact((k_r, v_r, pos_r, s_r, s2_r), rel, owner, victims)
            length = length - victims.sum(axis=-1).astype(length.dtype)
        put = lambda pool, r: jax.lax.dynamic_update_slice_in_dim(pool, r, base, axis=1)
        carry = (x, put(k_pool, k_r), put(v_pool, v_r), put(pos_pool, pos_r), put(s_pool, s_r), put(s2_pool, s2_r))
        return carry, (length, peak)

    xs = (
        weights.layers,
        jnp.asarray(cache.layout.layer_base, jnp.int32),
        cache.start.transpose(1, 0, 2),
        cache.length.transpose(1, 0, 2),
        cache.budget.transpose(1, 0, 2),
    )
    init = (embed(weights, tokens), cache.k, cache.v, cache.pos, cache.score, cache.score2)
    (x, k, v, pos, s, s2), (length, peak) = scan_layers(layer_step, init, xs)
    logits = final_logits(weights, x, config)
    new = Cache(
        k=k, v=v, pos=pos, score=s, score2=s2, start=cache.start, length=length.transpose(1, 0, 2),
        cap=cache.cap, budget=cache.budget, next_pos=seen.astype(jnp.int32), layout=cache.layout,
    )
    return new, logits, peak.transpose(1, 0, 2)


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
