"""Decode steps over the pooled cache, with optional decode-time eviction, inside jit.

    decode_step(weights, cache, tokens [B], policy, active [B])        -> (cache, logits [B, V])
    feed_tokens(weights, cache, logits, tokens [B, Q], n_valid [B], policy) -> (cache, logits [B, V])

Per layer (`decoder_layer` with attention over the pool): project the new token(s), append the
key/value at the end of each of the sequence's streams, attend over each stream, and (for policies
that evict while decoding) give the new token its running statistics (`Scorer.new_token_stats`:
zeros, or a learned score), update the others and evict (kvjax/evict.py). `decode_step`
evicts the lowest-key candidate of any stream above its budget by moving the stream's last slot
into it, so every stream stays packed at the front of its segment. (The chunked prefill feeds a
chunk of tokens at once: kvjax/chunk_step.py.)

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
from kvjax.evict import decode_evict
from kvjax.models import ModelConfig, Weights, decoder_layer, embed, final_logits, scan_layers
from kvjax.pallas_kernels._common import append_tokens
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
        slot = jnp.where(active[:, None], st.start + st.length, -1)  # each stream's new slot; -1: inactive row
        rel = st.start - base

        def attend(q, kn, vn):  # q [B, H, G, 1, D], kn/vn [B, H, 1, D]
            probs = None
            if fused:
                # the kernel writes the new key/value/position itself and reads only each stream's used
                # slots, wherever they lie in the pool; with eviction it also hands back the logits per stream
                # every layer's start/length and this layer's index: a [B, H] row sliced out per layer
                # is a copy XLA runs before the kernel (two small launches per layer)
                out, k_pool, v_pool, pos, *rest = append_and_attend(
                    q[:, :, :, 0], pools.k, pools.v, cache.streams.start, cache.streams.length, pools.pos, min_pos,
                    kn[:, :, 0], vn[:, :, 0], slot, next_pos, scale=scale, region_slots=span,
                    skewed=plan.adaptive_heads, stream_logits=width if need_probs else None,
                    raw_logits=evict_kernel, layer=layer)
            else:
                k_pool, v_pool, pos, _ = append_tokens(pools.k, pools.v, st.length, (kn[:, :, 0], vn[:, :, 0], slot),
                                                       (pools.pos, next_pos))
            p = Pools(k_pool, v_pool, pos, pools.score, pools.score2)
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
