"""Decode steps over the pooled cache, with optional decode-time eviction, inside jit.

    decode_step(weights, cache, tokens [B], policy, active [B])        -> (cache, logits [B, V])
    extend_step(weights, cache, tokens [B, C], n_valid [B], policy)    -> (cache, logits [B, C, V], peak)

Per layer (`decoder_layer` with attention over the pool): project the new token(s), append the
key/value at the end of each of the sequence's streams, attend over each stream, and (for policies
that evict while decoding) give the new token its running statistics (`Scorer.new_token_stats`:
zeros, or a learned score), update the others and evict (kvjax/evict.py). `decode_step`
evicts the lowest-key candidate of any stream above its budget by moving the stream's last slot
into it; `extend_step` (chunked prefill, streaming perplexity) removes a stream's whole excess at
once and compacts it. Either way every stream stays packed at the front of its segment.

The pool is the layer loop's carry, so XLA updates it in place; the streams' bookkeeping is
layer-major, so the loop slices it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import Cache, Plan, Pools
from kvjax.decode_attention import append_and_attend, decode_attention, region_to_streams, stream_probs
from kvjax.evict_fused import decode_evict_fused, supports as evict_kernel_supports
from kvjax.evict import compact_views, decode_evict, gather_streams, smallest, stream_mask, view_key
from kvjax.models import ModelConfig, Weights, decoder_layer, embed, final_logits, scan_layers
from kvjax.models.prompt_attention import NEG_INF
from kvjax.pallas_kernels.ragged_decode_attention import write_rows
from kvjax.policies.base import reduce_group
from kvjax.policies.policy import Policy

#: Batch sizes [lo, hi) whose decode programs on GPU run their matmuls through cuBLAS only, not
#: XLA's Triton GEMMs. Measured on an H100 at Llama-8B shapes: Triton wins at batch 1 (7.0 vs
#: 8.7 ms per step), cuBLAS at batch 32 (8.06 vs 8.46 ms at 1024 tokens per head, 6.90 vs 7.31 at
#: 256); at batch 408 XLA's own choice was faster (30.4 vs 32.3 ms with cuBLAS only).
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


def decode_step(weights: Weights, cache: Cache, tokens, policy: Policy, active=None, *, config: ModelConfig,
                plan: Plan, implementation: str = "xla", parallel=None, fused_eviction: bool = True):
    """Feed one token per sequence. tokens [B] int, active [B] bool (inactive rows are untouched).

    implementation "pallas": the decode kernel appends the new key/value and attends over each
    stream's used slots; for policies that evict while decoding it also returns the new query's
    logits per stream, which with its log-sum-exp give the probabilities the attention used.
    "xla": dense over the layer region. Either way the eviction itself works on each stream's
    first W slots (W = the widest stream), never on the region or the pool.
    parallel: a `kvjax.mesh.Parallel`: each device runs this step on its sequences and KV heads.
    fused_eviction: on the Pallas path on GPU, evict through one kernel per layer
    (`kvjax.evict_fused`: H2O, TOVA, CAKE) where it supports the policy; False keeps kvjax/evict.py's
    XLA ops (the same result, the benchmark's comparison).
    Returns (cache, logits [B, V] float32).
    """
    b = tokens.shape[0]
    active = jnp.ones((b,), bool) if active is None else active
    if parallel is not None:
        step = lambda w, c, t, pol, a, cfg: decode_step(w, c, t, pol, a, config=cfg, plan=plan,  # noqa: E731
                                                        implementation=implementation, fused_eviction=fused_eviction)
        return parallel.decode(step, weights, config, cache, tokens, policy, active)
    h = config.num_kv_heads
    next_pos = cache.next_pos
    positions = next_pos[:, None]
    span = plan.max_span
    ev = policy.decode_eviction
    scorer = policy.scorer
    # the new query's attention per stream, for scorers whose statistics follow it
    need_probs = ev is not None and scorer.attention_running
    fused = implementation == "pallas"
    scale = config.attention_scale
    min_pos = None if config.sliding_window is None else next_pos - config.sliding_window + 1
    take = lambda a, base: jax.lax.dynamic_slice_in_dim(a, base, span, axis=1)
    width = plan.stream_width
    # one eviction kernel per layer, fed the attention kernel's per-stream logits (kvjax/evict_fused.py)
    evict_kernel = fused and fused_eviction and need_probs and evict_kernel_supports(
        scorer, ev, head_dim=config.head_dim, width=width, model_axis=config.model_axis)

    def layer_step(carry, xs):
        x, pools = carry
        lw, base, st, step_due, layer = xs
        # The new token goes straight into the pool and evictions move slots in place: the pool is
        # a loop carry, so XLA updates it without copying; only reads slice the layer's region.
        slot = st.start + st.length
        rel = st.start - base

        def attend(q, kn, vn):  # q [B, H, G, 1, D], kn/vn [B, H, 1, D]
            p = dataclasses.replace(pools, pos=_append(pools.pos, slot, jnp.broadcast_to(next_pos[:, None], (b, h)),
                                                       active))
            probs = None
            if fused:
                # the kernel writes the new key/value itself and reads only each stream's used slots,
                # wherever they lie in the pool; with eviction it also hands back the logits per stream
                out, k_pool, v_pool, *rest = append_and_attend(
                    q[:, :, :, 0], p.k, p.v, st.start, st.length, p.pos, min_pos, kn[:, :, 0], vn[:, :, 0],
                    jnp.where(active[:, None], slot, -1), scale=scale, region_slots=span,
                    skewed=plan.adaptive_heads, stream_logits=width if need_probs else None,
                    raw_logits=evict_kernel)
            else:
                k_pool = _append(p.k, slot, kn[:, :, 0].astype(p.k.dtype), active)
                v_pool = _append(p.v, slot, vn[:, :, 0].astype(p.v.dtype), active)
            p = Pools(k_pool, v_pool, p.pos, p.score, p.score2)
            length = st.length + active[:, None].astype(st.length.dtype)
            if fused:
                if evict_kernel:
                    probs = tuple(rest)  # (lse, raw logits, column): the eviction kernel reduces them itself
                elif need_probs:
                    probs = stream_probs(*rest, length, scorer.group_reduce)
            else:
                out, region_probs = decode_attention(
                    q[:, :, :, 0], take(p.k, base), take(p.v, base), rel, length, take(p.pos, base), min_pos,
                    scale=scale, implementation=implementation, need_probs=need_probs)
                if need_probs:
                    probs = region_to_streams(region_probs, rel, width, scorer.group_reduce)
            new_stats = None
            if ev is not None:  # the new token's own statistics [B, H] each (zeros unless the scorer scores it)
                new_stats = tuple(a[:, :, 0] for a in scorer.new_token_stats(kn, vn, positions, layer,
                                                                             config.model_axis))
            return out[:, :, :, None], (p, length, probs, new_stats)

        x, (pools, length, probs, new_stats) = decoder_layer(lw, x, positions, config, attend)
        if evict_kernel:  # the scorer's new-token statistics are zeros, as the kernel sets them
            lse, logits, column = probs  # the attention kernel's own buffer: no copy of the logits
            pools, length = decode_evict_fused(scorer, ev, pools, st, length, logits, lse, active, step_due,
                                               next_pos, width, config.model_axis, logits_offset=column)
        elif ev is not None:
            pools, length = decode_evict(scorer, ev, pools, st, length, probs, new_stats, active, step_due, next_pos,
                                         width, config.model_axis)
        return (x, pools), length

    # each sequence evicts on its own schedule (its own position), so a batch behaves like its rows alone
    step_due = jnp.ones((b,), bool)
    if ev is not None and ev.every > 1:
        step_due = (next_pos % ev.every) == 0
    xs = (weights.layers, jnp.asarray(cache.layout.layer_base, jnp.int32), cache.streams,
          jnp.broadcast_to(step_due, (config.num_layers, b)), jnp.arange(config.num_layers, dtype=jnp.int32))
    (x, pools), length = scan_layers(layer_step, (embed(weights, tokens[:, None]), cache.pools), xs)
    logits = final_logits(weights, x, config)[:, 0]
    new = Cache(pools, dataclasses.replace(cache.streams, length=length),
                next_pos + active.astype(jnp.int32), cache.layout)
    return new, logits


def feed_tokens(weights: Weights, cache: Cache, logits, tokens, n_valid, policy: Policy, *, config: ModelConfig,
                plan: Plan, implementation: str = "xla", parallel=None):
    """Feed tokens [B, Q] one decode step at a time (row b its first n_valid[b]; a question appended
    after a compressed context). logits [B, V]: each row's latest, replaced as it feeds.
    Returns (cache, logits [B, V])."""

    def feed(carry, i):
        cache, logits = carry
        active = i < n_valid
        cache, new_logits = decode_step(weights, cache, tokens[:, i], policy, active, config=config, plan=plan,
                                        implementation=implementation, parallel=parallel)
        return (cache, jnp.where(active[:, None], new_logits, logits)), None

    (cache, logits), _ = jax.lax.scan(feed, (cache, logits), jnp.arange(tokens.shape[1]))
    return cache, logits


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
                plan: Plan, evict: bool = True, last_only: bool = False):
    """Feed a chunk of up to C tokens per sequence at once (chunked prefill, streaming perplexity).

    tokens [B, C] int; n_valid [B] int (row b feeds its first n_valid[b] tokens; 0 leaves it as is).
    Every stream gets the chunk appended, each token with `Scorer.new_token_stats`; the chunk's
    queries attend over the stream and the chunk (causal by position); the running statistics take
    each query's attention in order, exactly as C decode steps would; then, if `evict` and the policy evicts, every stream above its budget
    loses its whole excess at once: the lowest keys of `stream_key` (RoCo: the rule of
    kvjax/policies/roco.py with m = the excess). Streams need cap >= budget + C (the plan's headroom).
    Returns (cache, logits [B, C, V] float32, peak [L, B, H] stream lengths before eviction);
    `last_only`: logits [B, 1, V] of each row's last fed token only (a prefill needs no others).
    """
    b, c = tokens.shape
    h = config.num_kv_heads
    if plan.headroom < c:
        raise ValueError(f"a chunk of {c} tokens needs a plan with headroom >= {c} (got {plan.headroom})")
    span = plan.max_span
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
    width = plan.stream_width

    def layer_step(carry, xs):
        x, pools = carry
        lw, base, st, layer = xs
        r = pools.region(base, span)
        rel = st.start - base
        slots = jnp.where(q_valid[:, None, :], (rel + st.length)[:, :, None] + q_idx, span)  # [B, H, C]; span = drop
        length = st.length + n_valid[:, None].astype(st.length.dtype)
        # attend per stream (C queries make a region-wide matmul H times too costly): gather each
        # stream's first W slots, W = the most any stream holds
        inside = jnp.arange(width) < length[:, :, None]  # [B, H, W]
        idx = jnp.where(inside, rel[:, :, None] + jnp.arange(width), span)  # span = outside
        gather = lambda a: gather_streams(a, jnp.minimum(idx, span - 1))  # [B, H, W, ...]

        def attend(q, kn, vn):  # q [B, H, G, C, D], kn/vn [B, H, C, D]
            write = lambda a, val: a.at[rows3, slots].set(val.astype(a.dtype), mode="drop")
            if ev is not None:  # the chunk's tokens enter with the scorer's statistics (zeros by default)
                s_new, s2_new = scorer.new_token_stats(kn, vn, positions, layer, config.model_axis)
            else:
                s_new = s2_new = jnp.zeros((b, h, c))
            reg = Pools(write(r.k, kn), write(r.v, vn), write(r.pos, jnp.broadcast_to(positions[:, None, :], (b, h, c))),
                        write(r.score, s_new), write(r.score2, s2_new))
            gap = positions[:, None, :, None] - gather(reg.pos)[:, :, None, :]  # [B, H, C, W]
            visible = inside[:, :, None, :] & (gap >= 0)
            if config.sliding_window is not None:
                visible &= gap < config.sliding_window
            out, probs = _chunk_attention(q, gather(reg.k), gather(reg.v), visible, config.attention_scale)
            return out, (reg, probs)

        x, (reg, probs) = decoder_layer(lw, x, positions, config, attend)
        increments = getattr(scorer, "increments", None)
        if ev is None or not scorer.attention_running:
            pass  # statistics fixed when the tokens entered (or none)
        elif increments is not None:  # sums over queries: the chunk's at once
            d1, d2 = increments(jnp.where(q_valid[:, None, :, None], reduce_group(probs, scorer.group_reduce), 0.0))
            add = lambda a, d: a.at[rows3, idx].add(d.sum(axis=2), mode="drop")  # only this layer's streams
            reg = dataclasses.replace(reg, score=add(reg.score, d1), score2=add(reg.score2, d2))
        else:  # query by query, in order
            p_s = reduce_group(probs, scorer.group_reduce)  # [B, H, C, W]
            p = jnp.zeros((b, c, span), jnp.float32).at[  # back to region slots: [B, C, S]
                rows3[..., None], q_idx[None, :, None, None], idx[:, None]
            ].set(p_s.swapaxes(1, 2), mode="drop")

            def one_query(stats, xs):
                p_c, pos_c, valid_c = xs
                new = scorer.decode_update(stats[0], stats[1], p_c, reg.pos, pos_c)
                return tuple(jnp.where(valid_c[:, None], n, o) for n, o in zip(new, stats)), None

            (s_new, s2_new), _ = jax.lax.scan(one_query, (reg.score, reg.score2),
                                              (p.swapaxes(0, 1), positions.T, q_valid.T))
            mine = stream_mask(rel, length, span).any(axis=1)  # only this layer's streams: layers may share a region
            reg = dataclasses.replace(reg, score=jnp.where(mine, s_new, reg.score),
                                      score2=jnp.where(mine, s2_new, reg.score2))
        peak = length
        if ev is not None and evict:  # on the streams' views [B, H, W], not the region [B, H, S]
            views = reg.map(lambda a, _: gather(a))  # k, v: the gathers the attention made
            protected = (views.pos > newest[:, None, None] - ev.recent) | (views.pos < ev.sinks)
            cand = inside & ~protected
            excess = jnp.maximum(length - st.budget, 0)
            key = view_key(scorer, views.score, views.score2, views.pos, seen, cand, st.budget, excess)
            victims = smallest(key, excess, c)
            reg = compact_views(reg, views, idx, inside, inside & ~victims)
            length = length - victims.sum(axis=-1).astype(length.dtype)
        return (x, pools.put_region(reg, base)), (length, peak)

    xs = (weights.layers, jnp.asarray(cache.layout.layer_base, jnp.int32), cache.streams,
          jnp.arange(config.num_layers, dtype=jnp.int32))
    (x, pools), (length, peak) = scan_layers(layer_step, (embed(weights, tokens), cache.pools), xs)
    if last_only:
        x = jnp.take_along_axis(x, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)
    logits = final_logits(weights, x, config)
    new = Cache(pools, dataclasses.replace(cache.streams, length=length), seen.astype(jnp.int32), cache.layout)
    return new, logits, peak
