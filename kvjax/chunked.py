"""Chunked ("encoding") prefill and streaming perplexity under a cache budget (EasyKV's modes).

    make_plan(policy, config, prompt_len, max_new_tokens, chunk=None)   -> Plan
    prefill(weights, tokens [B, T], lengths [B], policy, rng, config=, plan=)  -> (Cache, logits [B, V])
    encode(...)       the jitted core: also the peak stream lengths and per-token NLL
    perplexity(params, text_or_tokens, policy=None, chunk=None)          -> dict

The prompt is not compressed at once: each row prefills its first K tokens (its stream budget)
with ordinary causal attention, keeping all of them with their running statistics, then the rest
streams through the cache `chunk` tokens per step (`kvjax.decode.extend_step`): the chunk attends
over the kept tokens and itself, the statistics absorb its attention, and every stream is evicted
back to K by the policy's rule. A stream never holds more than K + chunk tokens, so the pool is
sized `budget + chunk` per stream and no prompt-sized KV ever exists beyond the first K tokens.

Policies that stream: RoCo (its prefill in `kvjax.generate`), H2O (running sums, here chunked),
and Full (no eviction: the full-cache reference, fed through the same chunks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import Cache, Layout
from kvjax.decode import extend_step
from kvjax.engine import Plan, make_plan as engine_plan, resolve_budget
from kvjax.models import ModelConfig, Weights
from kvjax.models.prompt_attention import causal_attention
from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq, scan_layers
from kvjax.policies.base import PrefillStats
from kvjax.policies.policy import Full, Policy

#: prompt tokens per step when neither the call nor the policy says
DEFAULT_CHUNK = 32

#: positions per block when turning hidden states into log-likelihoods ([B, block, V] at a time)
_NLL_BLOCK = 256


def chunk_size(policy: Policy, chunk: int | None = None) -> int:
    """The chunk: the argument, else the policy's own (`RoCo.chunk`), else DEFAULT_CHUNK."""
    c = chunk if chunk is not None else getattr(policy, "chunk", DEFAULT_CHUNK)
    if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 1:
        raise ValueError(f"chunk must be a positive int, got {c!r}")
    return int(c)


def check_streamable(policy: Policy) -> None:
    """Raise unless the policy can stream a prompt through the cache in chunks."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a kvjax.policies.Policy (or None for the full cache), got {type(policy).__name__}")
    if policy.keeps_everything:
        return
    ev = policy.decode_eviction
    ok = ev is not None and not policy.scorer.layer_shared and not policy.cascades
    if not ok or policy.allocator.adaptive_heads or type(policy.allocator).__name__ != "Uniform":
        raise ValueError(
            f"{type(policy).__name__} cannot stream a prompt in chunks: use Full (None), RoCo or H2O "
            "(running statistics, one budget for every stream)"
        )


def make_plan(policy: Policy, config: ModelConfig, prompt_len: int, max_new_tokens: int = 0, *,
              chunk: int | None = None) -> Plan:
    """Pool layout for a prompt bucket of `prompt_len` tokens: every stream gets budget + headroom
    slots, headroom = max(chunk, the decode eviction period) (decoding stays at the budget).
    Full keeps the prompt plus max(chunk, max_new_tokens)."""
    check_streamable(policy)
    c = chunk_size(policy, chunk)
    num_layers, h = config.num_layers, config.num_kv_heads
    if policy.keeps_everything:
        bound, headroom = prompt_len, max(c, max_new_tokens)
    else:
        ev = policy.decode_eviction
        bound = int(engine_plan(policy, config, prompt_len, 0).stream_bound[0])
        # a stream must be able to hold its protected tokens, or it could never evict (and overflow)
        bound = max(bound, ev.sinks + ev.recent)
        headroom = max(c, ev.every)
    cap = bound + headroom
    layout = Layout(tuple(l * h * cap for l in range(num_layers)), (h * cap,) * num_layers, h)
    return Plan(layout, (bound,) * num_layers, int(headroom), False)


def _stream_budgets(policy: Policy, lengths):
    """Tokens each row's streams keep [B] (never more than the prompt, as the engine does)."""
    if policy.keeps_everything:
        return lengths
    return jnp.minimum(resolve_budget(policy, lengths), lengths)


def _prefix_prefill(weights: Weights, tokens, n_prefix, budgets, policy: Policy, rng, *, config: ModelConfig,
                    plan: Plan):
    """Prefill the first P tokens and keep them all, with their running statistics.

    tokens [B, P]; n_prefix [B] <= P tokens each row feeds; budgets [B] stream budgets.
    Returns (cache, x [B, P, E] final hidden states).
    """
    b, p = tokens.shape
    num_layers, h = config.num_layers, config.num_kv_heads
    cap = plan.stream_bound[0] + plan.headroom
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    inv_freq = rope_inv_freq(config)
    scorer = policy.scorer
    running = policy.decode_eviction is not None
    kw = dict(scale=config.attention_scale, sliding_window=config.sliding_window)

    def layer_step(x, xs):
        lw, layer = xs
        q, k, v = layer_qkv(lw, x, positions, config, inv_freq)
        colsum = colsq = None
        if running and scorer.needs_colsq:
            attn, colsum, colsq = causal_attention(
                q, k, v, n_prefix, column_squares=True, group_reduce=getattr(scorer, "group_reduce", "mean"), **kw
            )
        elif running and scorer.needs_colsum:
            attn, colsum = causal_attention(q, k, v, n_prefix, column_sums=True, **kw)
        else:
            attn = causal_attention(q, k, v, n_prefix, **kw)
        x = mlp(lw, x + attn_output(lw, attn), config)
        if running:
            s1, s2 = scorer.prefill_running(PrefillStats(k, v, n_prefix, None, None, colsum, colsq, layer, rng))
        else:
            s1 = s2 = jnp.zeros((b, h, p), jnp.float32)
        return x, (k, v, s1.astype(jnp.float32), s2.astype(jnp.float32))

    x, (k, v, s1, s2) = scan_layers(layer_step, embed(weights, tokens), (weights.layers, jnp.arange(num_layers)))
    valid = jnp.arange(p)[None, :] < n_prefix[:, None]  # [B, P]
    dtype = weights.embed.dtype

    def pool(stacked, empty):
        """[L, B, H, P, ...] -> [B, L*H*cap, ...]: stream (l, h) at slots (l*H + h)*cap, then empty."""
        mask = valid.reshape((1, b, 1, p) + (1,) * (stacked.ndim - 4))
        a = jnp.where(mask, stacked, jnp.asarray(empty, stacked.dtype))
        pad = [(0, 0)] * a.ndim
        pad[3] = (0, cap - p)
        a = jnp.pad(a, pad, constant_values=empty)
        a = jnp.moveaxis(a, 1, 0)  # [B, L, H, cap, ...]
        return a.reshape((b, num_layers * h * cap) + a.shape[4:])

    tok_pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (num_layers, b, h, p))
    start = (jnp.arange(num_layers)[:, None] * h + jnp.arange(h)[None, :]) * cap  # [L, H]
    cache = Cache(
        k=pool(k.astype(dtype), 0), v=pool(v.astype(dtype), 0), pos=pool(tok_pos, -1),
        score=pool(s1, 0), score2=pool(s2, 0),
        start=jnp.broadcast_to(start[None], (b, num_layers, h)).astype(jnp.int32),
        length=jnp.broadcast_to(n_prefix[:, None, None], (b, num_layers, h)).astype(jnp.int32),
        cap=jnp.full((b, num_layers, h), cap, jnp.int32),
        budget=jnp.broadcast_to(budgets[:, None, None], (b, num_layers, h)).astype(jnp.int32),
        next_pos=n_prefix.astype(jnp.int32), layout=plan.layout,
    )
    return cache, x


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


def _logits_nll(logits, targets, valid):
    """logits [B, C, V], targets/valid [B, C] -> [B, C] (0 where not valid)."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


def _encode(weights: Weights, tokens, lengths, policy: Policy, rng, *, config: ModelConfig, plan: Plan,
            chunk: int, prefix: int | None, with_nll: bool):
    """Chunked prefill of right-padded prompts tokens [B, T], lengths [B].

    prefix: static width of the first, all-at-once part (None: the stream bound, so each row
    prefills its first K tokens; Full in `perplexity` passes `chunk`, streaming nearly everything).
    Returns (cache, logits of each row's last token [B, V], peak stream lengths [B, L, H] over the
    chunk steps, nll [B, T] of each next token (position t scores token t + 1; None unless with_nll)).
    """
    b, t = tokens.shape
    rng = jax.random.key(0) if rng is None else rng
    budgets = _stream_budgets(policy, lengths)
    width = min(plan.stream_bound[0] if prefix is None else prefix, t)
    n_prefix = jnp.minimum(budgets if prefix is None else width, lengths).astype(jnp.int32)
    cache, x = _prefix_prefill(weights, tokens[:, :width], n_prefix, budgets, policy, rng, config=config, plan=plan)
    last = final_logits(weights, jnp.take_along_axis(x, (n_prefix - 1)[:, None, None], axis=1), config)[:, 0]
    nll = None
    if with_nll:
        pos = jnp.arange(width)[None, :]
        targets = tokens[:, jnp.minimum(jnp.arange(width) + 1, t - 1)]
        nll = _token_nll(weights, config, x, targets, (pos < n_prefix[:, None]) & (pos + 1 < lengths[:, None]))
        nll = jnp.pad(nll, ((0, 0), (0, t - width)))
    peak = cache.length

    def step(state):
        cache, last, peak, nll = state
        start = cache.next_pos
        n_valid = jnp.clip(lengths - start, 0, chunk).astype(jnp.int32)
        idx = start[:, None] + jnp.arange(chunk)[None, :]  # [B, C] positions fed
        chunk_tokens = jnp.take_along_axis(tokens, jnp.minimum(idx, t - 1), axis=1)
        cache, logits, pk = extend_step(weights, cache, chunk_tokens, n_valid, policy, config=config, plan=plan)
        ends = (n_valid > 0) & (start + n_valid == lengths)
        row_last = jnp.take_along_axis(logits, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        last = jnp.where(ends[:, None], row_last, last)
        if nll is not None:
            fed = jnp.arange(chunk)[None, :] < n_valid[:, None]
            targets = jnp.take_along_axis(tokens, jnp.minimum(idx + 1, t - 1), axis=1)
            vals = _logits_nll(logits, targets, fed & (idx + 1 < lengths[:, None]))
            nll = nll.at[jnp.arange(b)[:, None], jnp.where(fed, idx, t)].set(vals, mode="drop")
        return cache, last, jnp.maximum(peak, pk), nll

    # rows finish at different chunks; a finished row feeds nothing (n_valid 0) until all are done
    state = jax.lax.while_loop(lambda s: jnp.any(s[0].next_pos < lengths), step, (cache, last, peak, nll))
    return state


encode = jax.jit(_encode, static_argnames=("config", "plan", "chunk", "prefix", "with_nll"))


def prefill(weights: Weights, tokens, lengths, policy: Policy, rng=None, *, config: ModelConfig, plan: Plan,
            implementation: str = "xla"):
    """Chunked prefill with the engine's signature (pure, jittable): (cache, logits [B, V]).
    `implementation` is accepted for symmetry; chunk attention runs on XLA."""
    chunk = chunk_size(policy)
    cache, logits, _, _ = _encode(weights, tokens, lengths, policy, rng, config=config, plan=plan, chunk=chunk,
                                  prefix=None, with_nll=False)
    return cache, logits


# ----------------------------------------------------------------------------------------------
# streaming perplexity


def _covers(policy: Policy, n: int) -> bool:
    b = policy.budget
    if isinstance(b, (float, np.floating)):
        return b >= 1.0
    return int(b) >= n


def _is_single(x) -> bool:
    """One text (a string or a flat token sequence), as opposed to a batch of them."""
    if isinstance(x, str):
        return True
    if isinstance(x, (np.ndarray, jax.Array)):
        return x.ndim == 1
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, (int, np.integer)) for t in x)


def perplexity(params, text_or_tokens, policy: Policy | None = None, *, chunk: int | None = None) -> dict:
    """Perplexity of a text read through a budgeted cache (EasyKV's streaming perplexity).

    The first K tokens (the budget) are prefilled, the rest fed `chunk` at a time through the
    compressed cache; each position's logits predict the next token. `policy=None` (Full) feeds the
    same chunks through the full cache and equals the perplexity from `kvjax.forward`'s logits.
    `text_or_tokens`: a string or a token sequence, or a list of them (a batch).
    Returns {"nll": per-token negative log-likelihoods [n - 1] (token t + 1 given the tokens up to
    t), "perplexity": exp(mean nll), "tokens": n}; for a batch, each value is a list over rows.
    """
    from kvjax.api import _encode as encode_prompts, _pad, length_bucket  # api imports this module

    policy = Full() if policy is None else policy
    check_streamable(policy)
    c = chunk_size(policy, chunk)
    single = _is_single(text_or_tokens)
    if single and not isinstance(text_or_tokens, str):
        text_or_tokens = [np.asarray(text_or_tokens)]
    seqs = encode_prompts(params, text_or_tokens, False, what="text")
    longest = max(len(s) for s in seqs)
    limit = params.config.max_position_embeddings
    if longest > limit:
        raise ValueError(f"text of {longest} tokens exceeds the model's {limit} positions (max_position_embeddings)")
    if min(len(s) for s in seqs) < 2:
        raise ValueError("perplexity needs texts of at least 2 tokens")
    if not policy.keeps_everything:
        for i, s in enumerate(seqs):
            if _covers(policy, len(s)):
                raise ValueError(
                    f"budget {policy.budget} covers the whole text {i} ({len(s)} tokens): nothing would be "
                    "evicted; use policy=None for the full-cache perplexity"
                )
    bucket = length_bucket(longest, limit)
    plan = make_plan(policy, params.config, bucket, 0, chunk=c)
    pad_id = params.tokenizer.pad_token_id if params.tokenizer is not None else 0
    tokens, lengths = _pad(seqs, bucket, pad_id)
    _, _, _, nll = encode(
        params.weights, tokens, lengths, policy, None, config=params.config, plan=plan, chunk=c,
        prefix=c if policy.keeps_everything else None, with_nll=True,
    )
    nll = np.asarray(nll)
    rows = [nll[i, : n - 1] for i, n in enumerate(lengths)]
    out = {
        "nll": rows,
        "perplexity": [float(np.exp(r.mean())) for r in rows],
        "tokens": [int(n) for n in lengths],
    }
    return {k: v[0] for k, v in out.items()} if single else out
