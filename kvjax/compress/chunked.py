"""Chunked ("encoding") prefill under a cache budget (EasyKV's mode, RoCo's prefill).

    make_plan(policy, config, prompt_len, headroom, chunk=None)             -> Plan
    prefill(weights, tokens [B, T], lengths [B], policy, rng, config=, plan=)  -> (Cache, logits [B, V])
    encode(...)       the jitted core: also the peak stream lengths and per-token NLL (kvjax.perplexity)

The prompt is not compressed at once: each row prefills its first K tokens (its stream budget)
with ordinary causal attention, keeping all of them with their running statistics (the one-shot
compression step with every token kept), then the rest streams through the cache `chunk` tokens
per step (`kvjax.chunk_step.absorb_chunk`): the chunk attends over the kept tokens and itself, the
statistics absorb its attention, and every stream is evicted back to K by the policy's rule. A
stream never holds more than K + chunk tokens, so the pool is sized `budget + chunk` per stream;
as in every prefill mode, one layer's prompt keys and values exist at a time.

The work goes layer by layer: a layer's cache depends only on its own queries, keys and values,
so each layer projects the whole prompt at once and walks the chunks only for attention and
eviction, on its streams gathered into dense views [B, H, W] for the loop; the result equals
feeding the whole model one chunk at a time. The layers are a real scan even with per-layer weight
buffers (`scan_layers(one_body=True)`): one layer body to compile, not one per layer.

Policies that stream: RoCo (its prefill in `kvjax.generate`), H2O (running sums, here chunked),
and Full (no eviction: the full-cache reference, fed through the same chunks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import Plan, region_layout
from kvjax.evict import gather_streams, scatter_streams
from kvjax.chunk_step import absorb_chunk
from kvjax.models import ModelConfig, Weights, decoder_layer, embed, final_logits, scan_layers
from kvjax.policies.allocators import Uniform
from kvjax.policies.policy import Policy
from kvjax.compress import oneshot
from kvjax.compress.step import resolve_budget
from kvjax.compress.prompt import prompt_attend, prompt_stats
from kvjax.errors import InputError

#: prompt tokens per step when neither the call nor the policy says and no budget sets it (Full)
DEFAULT_CHUNK = 32

#: positions per block when turning hidden states into log-likelihoods ([B, block, V] at a time)
_NLL_BLOCK = 256


def auto_chunk(bound: int) -> int:
    """The chunk for a stream that keeps `bound` tokens: bound / 8 rounded down to a power of two,
    16 to 256. Eviction after every chunk then tracks stride-1 encoding closely (RoCo at K = 256
    keeps 98% of its tokens with chunk 32, 93% with 128, 76% with 256: the ratio chunk / K is what
    matters) while a chunk of K / 8 queries keeps a GPU busy (1024 -> 128: 1.14x SnapKV's prefill)."""
    return int(min(256, max(16, 1 << max(int(bound) // 8, 1).bit_length() - 1)))


def chunk_size(policy: Policy, chunk: int | None = None, bound: int | None = None) -> int:
    """The chunk: the argument, else the policy's own (`RoCo.chunk`), else `auto_chunk(bound)` for a
    policy that evicts (bound: its streams' token bound), else DEFAULT_CHUNK."""
    c = chunk if chunk is not None else getattr(policy, "chunk", None)
    if c is None:
        c = DEFAULT_CHUNK if bound is None or policy.keeps_everything else auto_chunk(bound)
    if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 1:
        raise InputError(f"chunk must be a positive int, got {c!r}")
    return int(c)


def check_streamable(policy: Policy) -> None:
    """Raise unless the policy can stream a prompt through the cache in chunks."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a kvjax.policies.Policy (or None for the full cache), got {type(policy).__name__}")
    if policy.keeps_everything:
        return
    ev = policy.decode_eviction
    ok = ev is not None and not policy.scorer.layer_shared and policy.allocator == Uniform()
    if not ok:
        raise InputError(
            f"{type(policy).__name__} cannot stream a prompt in chunks: use Full (None), RoCo or H2O "
            "(running statistics, one budget for every stream)"
        )


def make_plan(policy: Policy, config: ModelConfig, prompt_len: int, headroom: int = 0, *,
              chunk: int | None = None) -> Plan:
    """Pool layout for a prompt bucket of `prompt_len` tokens and `headroom` decode tokens: every
    stream gets its budget (at most prompt + headroom) plus max(chunk, the decode eviction period)
    slots (decoding fills a stream up to its budget, then holds it there). Full keeps the prompt
    plus max(chunk, headroom)."""
    check_streamable(policy)
    num_layers, h = config.num_layers, config.num_kv_heads
    if policy.keeps_everything:
        bound, headroom = prompt_len, max(chunk_size(policy, chunk), headroom)
    else:
        ev = policy.decode_eviction
        bound = oneshot.stream_bound(policy, prompt_len, headroom)
        # a stream must be able to hold its protected tokens, or it could never evict (and overflow)
        bound = max(bound, ev.sinks + ev.recent)
        headroom = max(chunk_size(policy, chunk, bound), ev.every)
    return Plan(region_layout([h * (bound + headroom)] * num_layers, h), (bound,) * num_layers, int(headroom))


def _stream_budgets(policy: Policy, lengths):
    """The budget of each row's streams [B]: what a stream may hold, prompt and generated tokens."""
    if policy.keeps_everything:
        return lengths
    return resolve_budget(policy, lengths)


def _token_nll(weights: Weights, config: ModelConfig, x, targets, valid):
    """-log p(target | position) for hidden states x [B, N, E], targets/valid [B, N] -> [B, N]
    (0 where not valid), a block of positions at a time so [B, N, V] logits never exist."""
    b, n, e = x.shape
    blk = min(_NLL_BLOCK, n)
    nb = -(-n // blk)
    pad = nb * blk - n
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, nb, blk, e).swapaxes(0, 1)
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, nb, blk).swapaxes(0, 1)

    def one(args):
        xb, tb = args
        logits = final_logits(weights, xb, config)  # [B, blk, V]
        picked = jnp.take_along_axis(logits, tb[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    nll = jax.lax.map(one, (xs, ts)).swapaxes(0, 1).reshape(b, nb * blk)[:, :n]
    return jnp.where(valid, nll, 0.0)


def _encode(weights: Weights, tokens, lengths, policy: Policy, rng, *, config: ModelConfig, plan: Plan,
            chunk: int, prefix: int | None, with_nll: bool, implementation: str = "xla"):
    """Chunked prefill of right-padded prompts tokens [B, T], lengths [B], layer by layer.

    implementation: the chunk attention's (`absorb_chunk`). prefix: static width of the first,
    all-at-once part (None: the stream bound, so each row prefills its first K tokens; Full in
    `perplexity` passes `chunk`, streaming nearly everything). A layer's cache depends only on that
    layer's queries, keys and values, so each layer projects every prompt token at once (one matmul over
    [B, T] rows, as any prefill) and only its attention and eviction walk the chunks in order
    (`kvjax.chunk_step.absorb_chunk`): the same cache and outputs as feeding the whole model a chunk at
    a time, without reading the weights per chunk.
    Returns (cache, logits of each row's last token [B, V], peak stream lengths [L, B, H] over the
    chunk steps, nll [B, T] of each next token (position t scores token t + 1; None unless with_nll)).
    """
    b, t = tokens.shape
    rng = jax.random.key(0) if rng is None else rng
    budgets = _stream_budgets(policy, lengths)
    width = min(plan.stream_bound[0] if prefix is None else prefix, t)
    n_prefix = jnp.minimum(budgets if prefix is None else width, lengths).astype(jnp.int32)
    # the prefix: the one-shot compression step keeping every token (each stream's budget is its
    # row's, at least the prefix), with the running statistics
    keep_all = jnp.broadcast_to(jnp.maximum(budgets, n_prefix)[:, None], (b, config.num_layers))
    comp = oneshot.compressor(policy, plan, n_prefix, config, weights.embed.dtype, "xla", layer_budgets=keep_all)
    prefix_attend = prompt_attend(n_prefix, config, comp.colsum, comp.colsq, comp.group_reduce)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    n_chunks = jnp.max(-(-(lengths - n_prefix) // chunk))  # rows finish at different chunks
    rows = jnp.arange(b)[:, None]
    span = plan.max_span
    view_width = plan.stream_width

    def layer_step(carry, xs):
        x, pools = carry
        lw, layer, per = xs
        base = per[0]

        def attend(q, k, v):  # every position: q [B, H, G, T, D], k/v [B, H, T, D]
            qp, kp, vp = q[:, :, :, :width], k[:, :, :width], v[:, :, :width]
            out_p, (_, _, _, cs, sq) = prefix_attend(qp, kp, vp)
            stats = prompt_stats(qp, kp, vp, n_prefix, cs, sq, layer, rng, config)
            new_pools, (start, length, cap, budget) = comp.step(pools, stats, per)
            rel = start - base
            out = jnp.pad(out_p.astype(q.dtype), ((0, 0),) * 3 + ((0, t - width), (0, 0)))

            # the layer's streams as dense views for the whole loop: gathered once, written back once
            idx = jnp.minimum(rel[:, :, None] + jnp.arange(view_width), span - 1)  # [B, H, W] region slots
            region = new_pools.region(base, span)

            def one_chunk(j, c):
                views, length, peak, out = c
                first = n_prefix + j * chunk
                pos = first[:, None] + jnp.arange(chunk)[None, :]  # [B, C]
                n_valid = jnp.clip(lengths - first, 0, chunk).astype(jnp.int32)
                at = jnp.minimum(pos, t - 1)
                qc = jnp.moveaxis(q[rows, :, :, at], 1, 3)  # [B, H, G, C, D]
                kc, vc = (jnp.moveaxis(a[rows, :, at], 1, 2) for a in (k, v))  # [B, H, C, D]
                oc, views, length, pk = absorb_chunk(views, length, budget, qc, kc, vc, pos, n_valid, layer,
                                                     policy=policy, config=config, plan=plan,
                                                     implementation=implementation)
                dst = jnp.where(jnp.arange(chunk)[None, :] < n_valid[:, None], pos, t)  # t: dropped
                out = out.at[rows, :, :, dst].set(jnp.moveaxis(oc, 3, 1).astype(out.dtype), mode="drop")
                return views, length, jnp.maximum(peak, pk), out

            views, length, peak, out = jax.lax.fori_loop(
                0, n_chunks, one_chunk, (region.map(lambda a, _: gather_streams(a, idx)), length, length, out))
            used = jnp.arange(view_width) < length[:, :, None]
            region = jax.tree.map(lambda r, v: scatter_streams(r, idx, used, v), region, views)
            return out, (new_pools.put_region(region, base), (start, length, cap, budget), peak)

        x, (pools, trace, peak) = decoder_layer(lw, x, positions, config, attend)
        return (x, pools), (trace, peak)

    xs = (weights.layers, jnp.arange(config.num_layers, dtype=jnp.int32), comp.xs)
    (x, pools), (traces, peak) = scan_layers(layer_step, (embed(weights, tokens), comp.state), xs, one_body=True)
    cache = oneshot.finish(pools, traces, plan, lengths)
    last = final_logits(weights, jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1), config)[:, 0]
    nll = None
    if with_nll:
        targets = tokens[:, jnp.minimum(jnp.arange(t) + 1, t - 1)]
        nll = _token_nll(weights, config, x, targets, positions + 1 < lengths[:, None])
    return cache, last, peak, nll


encode = jax.jit(_encode, static_argnames=("config", "plan", "chunk", "prefix", "with_nll", "implementation"))


def prefill(weights: Weights, tokens, lengths, policy: Policy, rng=None, *, config: ModelConfig, plan: Plan,
            implementation: str = "xla"):
    """Chunked prefill with the other modes' signature (pure, jittable): (cache, logits [B, V]).
    `implementation` "pallas": each chunk's attention and statistics in one GPU kernel per layer
    where the kernel applies (`kvjax.chunk_step.absorb_chunk`)."""
    chunk = chunk_size(policy, None, plan.stream_bound[0])
    cache, logits, _, _ = _encode(weights, tokens, lengths, policy, rng, config=config, plan=plan, chunk=chunk,
                                  prefix=None, with_nll=False, implementation=implementation)
    return cache, logits
