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
from kvjax.evict_fused import kernel_rule
from kvjax.models import ModelConfig
from kvjax.pallas_kernels import chunk_attention as ca
from kvjax.policies.base import reduce_group
from kvjax.policies.policy import Policy


def fused_rule(scorer, running: bool) -> dict | None:
    """The chunk-attention kernel's statistics for this scorer: {"squares": bool} when its running
    statistics are sums of the group-reduced attention (H2O) and of its square (RoCo), or when it
    keeps no running statistics (only the output is used); None when only the XLA path knows them."""
    if not running:
        return {"squares": False}
    rule = kernel_rule(scorer)
    if rule is None or rule.get("update") != "add" or rule.get("pool_kernel", 1) > 1:
        return None
    return {"squares": bool(rule.get("robust"))}


def absorb_chunk(views: Pools, length, budget, q, kn, vn, positions, n_valid, layer, *, policy: Policy,
                 config: ModelConfig, plan: Plan, implementation: str = "xla"):
    """Feed one layer's streams a chunk of up to C tokens per row.

    views: the layer's streams as dense views (Pools [B, H, W, ...]: stream h of row b at [b, h],
    its used slots packed at the front; `gather_streams` of the layer's region before the chunk
    loop, `scatter_streams` back after it); length, budget [B, H]; q [B, H, G, C, D]; kn, vn
    [B, H, C, D] (after RoPE); positions [B, C] the chunk's positions (consecutive, each row from its
    next position); n_valid [B] (row b feeds its first n_valid[b] tokens; 0 leaves it as is);
    layer: scalar int. implementation "pallas" on a GPU: the chunk's
    attention and its column statistics in one kernel (`kvjax.pallas_kernels.chunk_attention`)
    where `fused_rule` and the kernel's shapes allow; otherwise the probabilities are materialised.
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
    running = ev is not None and scorer.attention_running
    increments = getattr(scorer, "increments", None)
    rule = fused_rule(scorer, running)
    attend = dict(scale=config.attention_scale, sliding_window=config.sliding_window)
    on_gpu = implementation == "pallas" and jax.default_backend() == "gpu"
    if on_gpu and rule is not None and ca.supports(q.shape, width):
        out, d1, d2 = ca.chunk_attention(q, views.k, views.v, views.pos, length, positions, n_valid, **attend,
                                         group_reduce=scorer.group_reduce if running else "mean", **rule)
        if running:
            views = dataclasses.replace(views, score=views.score + d1, score2=views.score2 + d2)
    else:
        out, probs = ca.chunk_probs(q, views.k, views.v, views.pos, length, positions, **attend)
        if not running:
            pass  # statistics fixed when the tokens entered (or none)
        elif increments is not None:  # sums over queries: the chunk's at once
            r = jnp.where(q_valid[:, None, :, None], reduce_group(probs, scorer.group_reduce), 0.0)
            d1, d2 = increments(r)
            views = dataclasses.replace(views, score=views.score + d1.sum(axis=2),
                                        score2=views.score2 + d2.sum(axis=2))
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
