"""One layer's streams take a chunk of tokens at once: RoCo's (EasyKV's) chunked prefill and
streaming perplexity (kvjax/compress/chunked.py calls it once per chunk, per layer).

    out, views, length, peak = absorb_chunk(views, length, budget, q, k, v, positions, n_valid, layer,
                                             policy=, config=, plan=)

The streams are dense views [B, H, W, ...] for the whole chunk loop (gathered from the layer's
region once before it, written back once after): every stream gets the chunk appended, each
token with `Scorer.new_token_stats`; the chunk's queries attend over the stream and the chunk
(causal by position); the running statistics take each query's attention in order, exactly as C
decode steps would; then, if the policy evicts, every stream above its budget loses its whole
excess at once: the lowest keys of `stream_key` (RoCo: the rule of kvjax/policies/roco.py with
m = the excess), and the stream's last survivors move into the victims' slots (`fill_from_tail`:
C slots per stream moved, not the whole view). Streams need cap >= budget + C (the plan's headroom).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import Plan, Pools
from kvjax.evict import fill_from_tail, smallest, view_key, view_update
from kvjax.models import ModelConfig
from kvjax.models.prompt_attention import NEG_INF
from kvjax.policies.base import reduce_group
from kvjax.policies.policy import Policy


def chunk_attention(q, k_s, v_s, visible, scale: float):
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


def absorb_chunk(views: Pools, length, budget, q, kn, vn, positions, n_valid, layer, *, policy: Policy,
                 config: ModelConfig, plan: Plan):
    """Feed one layer's streams a chunk of up to C tokens per row.

    views: the layer's streams as dense views (Pools [B, H, W, ...]: stream h of row b at [b, h],
    its used slots packed at the front; `gather_streams` of the layer's region before the chunk
    loop, `scatter_streams` back after it); length, budget [B, H]; q [B, H, G, C, D]; kn, vn
    [B, H, C, D] (after RoPE); positions [B, C] the chunk's positions (consecutive, each row from its
    next position); n_valid [B] (row b feeds its first n_valid[b] tokens; 0 leaves it as is);
    layer: scalar int.
    Returns (out [B, H, G, C, D] float32, views, length [B, H] after eviction, peak [B, H] before it).
    """
    b, h, c = kn.shape[:3]
    if plan.headroom < c:
        raise ValueError(f"a chunk of {c} tokens needs a plan with headroom >= {c} (got {plan.headroom})")
    width = views.pos.shape[2]
    q_idx = jnp.arange(c)
    q_valid = q_idx[None, :] < n_valid[:, None]  # [B, C]
    seen = positions[:, 0] + n_valid  # tokens processed after this chunk
    newest = seen - 1
    ev = policy.decode_eviction
    scorer = policy.scorer
    if ev is not None and scorer.layer_shared:
        raise ValueError("a chunk cannot feed layer-shared scorers (TOVA): feed tokens with decode_step")
    rows3, heads3 = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    at = jnp.where(q_valid[:, None, :], length[:, :, None] + q_idx, width)  # [B, H, C]; width = dropped
    write = lambda a, val: a.at[rows3, heads3, at].set(val.astype(a.dtype), mode="drop")  # noqa: E731
    if ev is not None:  # the chunk's tokens enter with the scorer's statistics (zeros by default)
        s_new, s2_new = scorer.new_token_stats(kn, vn, positions, layer, config.model_axis)
    else:
        s_new = s2_new = jnp.zeros((b, h, c))
    views = Pools(write(views.k, kn), write(views.v, vn),
                  write(views.pos, jnp.broadcast_to(positions[:, None, :], (b, h, c))),
                  write(views.score, s_new), write(views.score2, s2_new))
    length = length + n_valid[:, None].astype(length.dtype)
    inside = jnp.arange(width) < length[:, :, None]  # [B, H, W]
    gap = positions[:, None, :, None] - views.pos[:, :, None, :]  # [B, H, C, W]
    visible = inside[:, :, None, :] & (gap >= 0)
    if config.sliding_window is not None:
        visible &= gap < config.sliding_window
    out, probs = chunk_attention(q, views.k, views.v, visible, config.attention_scale)

    increments = getattr(scorer, "increments", None)
    if ev is None or not scorer.attention_running:
        pass  # statistics fixed when the tokens entered (or none)
    elif increments is not None:  # sums over queries: the chunk's at once
        d1, d2 = increments(jnp.where(q_valid[:, None, :, None], reduce_group(probs, scorer.group_reduce), 0.0))
        views = dataclasses.replace(views, score=views.score + d1.sum(axis=2), score2=views.score2 + d2.sum(axis=2))
    else:  # query by query, in order, each stream on its own (as decode steps update them)
        p_s = reduce_group(probs, scorer.group_reduce)  # [B, H, C, W]

        def one_query(stats, xs):
            p_c, pos_c, valid_c = xs
            new = view_update(scorer, stats[0], stats[1], p_c, views.pos, pos_c)
            keep = valid_c[:, None, None] & inside
            return tuple(jnp.where(keep, n, o) for n, o in zip(new, stats)), None

        (s_new, s2_new), _ = jax.lax.scan(one_query, (views.score, views.score2),
                                          (jnp.moveaxis(p_s, 2, 0), positions.T, q_valid.T))
        views = dataclasses.replace(views, score=s_new, score2=s2_new)
    peak = length
    if ev is not None:
        protected = (views.pos > newest[:, None, None] - ev.recent) | (views.pos < ev.sinks)
        cand = inside & ~protected
        excess = jnp.maximum(length - budget, 0)
        key = view_key(scorer, views.score, views.score2, views.pos, seen, cand, budget, excess)
        victims = smallest(key, excess, c)
        views, length = fill_from_tail(views, victims, length, c)
    return out, views, length, peak
