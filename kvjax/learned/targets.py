"""Training targets from the model itself: the attention each prompt token receives from later queries.

For layer l, KV head h and key j, with a_g[i, j] the softmax attention of query head g (of h's GQA
group) at query i on key j, group-reduced to a[i, j] (`group_reduce`: max or mean over g):

    target[j] = reduce_{i in F(j)} a[i, j],
    F(j) = { i : j + min_distance <= i <= j + horizon, length - last <= i < length }

(`reduce`: "max" or "mean"; horizon None: every later query; last None: every query, last = w: only
the text's last w queries, as an observation window at its end would see it). Computed over query chunks with a
running max / sum, so memory is O(chunk x T), never [T, T]; with `last`, only those w queries are
gathered and attended (O(w x T) work, not O(T x T)). Keys without later queries get 0;
`future_count` says how many later queries each key had (the loss ignores keys with too few).

    feats, targets = text_features_and_targets(weights, tokens, lengths, config=..., ...)
    # feats [L, B, H, T, F] float32, targets [L, B, H, T] float32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.compress.prompt import prompt_attend
from kvjax.learned.model import token_features
from kvjax.models import decoder_layer, embed, scan_layers
from kvjax.models.llama import rope_inv_freq
from kvjax.models.prompt_attention import NEG_INF, query_chunks

REDUCES = ("max", "mean")


def _accumulate(qc, q_pos, k_t, lengths, *, scale, reach, reduce, group_reduce, min_distance, first,
                sliding_window):
    """One block of queries qc [B, H, G, C, D] at positions q_pos [B, C] -> the group-reduced attention
    they pay each key, zero where the query does not count for that key: [B, H, C, T]."""
    b, h, g, c, d = qc.shape
    t = k_t.shape[-1]
    k_pos = jnp.arange(t)
    logits = jnp.matmul(qc.reshape(b, h, g * c, d), k_t, preferred_element_type=jnp.float32).reshape(b, h, g, c, t)
    causal = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, C, T]
    if sliding_window is not None:
        causal &= (q_pos[:, :, None] - k_pos[None, None, :]) < sliding_window
    mask = causal & (k_pos[None, None, :] < lengths[:, None, None])
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits * scale, NEG_INF), axis=-1)
    a = jnp.max(probs, axis=2) if group_reduce == "max" else jnp.mean(probs, axis=2)  # [B, H, C, T]
    dist = q_pos[:, :, None] - k_pos[None, None, :]  # [B, C, T]
    in_range = (q_pos < lengths[:, None]) & (q_pos >= first[:, None])  # [B, C]
    later = (dist >= min_distance) & (dist <= reach) & in_range[:, :, None]
    return jnp.where(later[:, None], a, 0.0)


def future_attention(q, k, lengths, *, scale: float, horizon: int | None = None, reduce: str = "max",
                     group_reduce: str = "max", min_distance: int = 1, last: int | None = None, chunk: int = 256,
                     sliding_window: int | None = None):
    """q [B, H, G, T, D] (after RoPE), k [B, H, T, D], lengths [B] -> [B, H, T] float32 (module docstring).
    With `last`, only each text's last `last` queries are gathered and attended ([B, H, G, last, T]);
    otherwise every query, `chunk` at a time."""
    b, h, g, t, d = q.shape
    k_t = jnp.swapaxes(k, -1, -2)
    first = lengths - (t if last is None else last)  # [B]: the first query that counts
    kw = dict(scale=scale, reach=t if horizon is None else horizon, reduce=reduce, group_reduce=group_reduce,
              min_distance=min_distance, first=first, sliding_window=sliding_window)
    if last is not None and last < t:
        q_pos = first[:, None] + jnp.arange(last)[None, :]  # [B, last]; < 0 where the text is shorter
        idx = jnp.clip(q_pos, 0, t - 1)[:, None, None, :, None]
        qc = jnp.take_along_axis(q, jnp.broadcast_to(idx, (b, h, g, last, 1)), axis=3)
        a = _accumulate(qc, q_pos, k_t, lengths, **kw)
        acc = a.max(axis=2) if reduce == "max" else a.sum(axis=2)
    else:
        q_chunks, chunk = query_chunks(q, chunk)

        def one_chunk(acc, xs):
            qc, c = xs
            q_pos = jnp.broadcast_to(c * chunk + jnp.arange(chunk), (b, chunk))
            a = _accumulate(qc, q_pos, k_t, lengths, **kw)
            return (jnp.maximum(acc, a.max(axis=2)) if reduce == "max" else acc + a.sum(axis=2)), None

        acc, _ = jax.lax.scan(one_chunk, jnp.zeros((b, h, t), jnp.float32),
                              (q_chunks, jnp.arange(q_chunks.shape[0])))
    if reduce == "mean":
        acc = acc / jnp.maximum(future_count(lengths, t, horizon, min_distance, last), 1)[:, None, :]
    return acc


def future_count(lengths, t: int, horizon: int | None = None, min_distance: int = 1, last: int | None = None):
    """[B, T] int32: how many queries each key's target reduces over (|F(j)|; 0 for padding)."""
    j = jnp.arange(t)[None, :]
    n = lengths[:, None]
    lo = j + min_distance
    if last is not None:
        lo = jnp.maximum(lo, n - last)
    hi = n - 1 if horizon is None else jnp.minimum(n - 1, j + horizon)
    return jnp.maximum(hi - lo + 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "features", "horizon", "reduce", "group_reduce",
                                             "min_distance", "last"))
def text_features_and_targets(weights, tokens, lengths, *, config, features, horizon, reduce, group_reduce,
                              min_distance=1, last=None):
    """Run the model with the full cache over tokens [B, T] (right-padded, lengths [B]) and return, per
    layer, the scorer's features [L, B, H, T, F] and the future-attention targets [L, B, H, T]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend = prompt_attend(lengths, config, colsum=False, colsq=False, group_reduce="mean")
    inv_freq = rope_inv_freq(config)

    def layer_step(x, xs):
        (lw,) = xs
        x, (q, k, v, _, _) = decoder_layer(lw, x, positions, config, attend)
        target = future_attention(q, k, lengths, scale=config.attention_scale, horizon=horizon, reduce=reduce,
                                  group_reduce=group_reduce, min_distance=min_distance, last=last,
                                  sliding_window=config.sliding_window)
        return x, (token_features(k, v, jnp.arange(t), inv_freq, features, lengths), target)

    _, (feats, targets) = scan_layers(layer_step, embed(weights, tokens), (weights.layers,))
    return feats, targets
