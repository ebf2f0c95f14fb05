"""The learned scorer's model: per (layer, KV head), a linear map or a 2-layer MLP over one token's
features, as pure functions over a params pytree (a dict of arrays with leading [L, H] axes).

Features of a prompt token (`FEATURES`, in this order, each optional):
    key       the pre-RoPE key [D] and its norm (RoPE rotates by position; un-rotating the cached,
              rotated key gives the projection of the token's own hidden state, exactly)
    value     the value [D] and its norm
    position  log(1 + position) (lets the model find attention sinks)
    distance  log(1 + (length - 1 - position)): how far the token lies from the end of the prompt
              (known at prefill, when the whole prompt is there: recency); 0 on padding, and 0 for a
              token scored as it enters the cache while decoding (`newest=True`: it is the last one)

    feats = token_features(k_rot, v, positions, inv_freq, features, lengths)   # [B, H, T, F]
    feats = token_features(k_rot, v, positions [B, N], inv_freq, features, newest=True)   # decode
    s = score(params, feats, layer, heads)                              # [B, H, T], higher = keep

params (kind "linear"): mean, std [L, H, F] (feature standardisation, fixed), w [L, H, F], b [L, H].
params (kind "mlp"):    mean, std, w1 [L, H, F, K], b1 [L, H, K], w2 [L, H, K], b2 [L, H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import bad_input
from kvjax.models.llama import apply_rope

FEATURES = ("key", "value", "position", "distance")
KINDS = ("linear", "mlp")


def num_features(features: tuple[str, ...], head_dim: int) -> int:
    """F: the width of `token_features`' last axis."""
    return sum({"key": head_dim + 1, "value": head_dim + 1, "position": 1, "distance": 1}[f] for f in features)


def unrotate(k_rot, positions, inv_freq):
    """The pre-RoPE keys: k_rot [B, H, T, D] (rotated at `positions` [T] or [B, T]), inv_freq [D/2]
    -> [B, H, T, D] f32."""
    b, h, t, d = k_rot.shape
    x = k_rot.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, T, H, D]
    pos = jnp.broadcast_to(-jnp.asarray(positions, jnp.int32).reshape(-1, t), (b, t))
    return apply_rope(x, pos, jnp.asarray(inv_freq, jnp.float32)).transpose(0, 2, 1, 3)


def distance_to_end(positions, lengths):
    """positions [T] int, lengths [B] (valid prompt lengths; right padding) -> [B, T] float32:
    log(1 + (length - 1 - position)), 0 where position >= length."""
    gap = lengths[:, None].astype(jnp.int32) - 1 - positions.astype(jnp.int32)[None, :]
    return jnp.log1p(jnp.maximum(gap, 0).astype(jnp.float32))


def token_features(k_rot, v, positions, inv_freq, features: tuple[str, ...], lengths=None, *, newest=False):
    """k_rot, v [B, H, T, D] (keys after RoPE, values), positions [T] or [B, T] int, lengths [B]
    (needed by "distance" unless `newest`: every token is the newest of its sequence, distance 0)
    -> [B, H, T, F] float32."""
    b, h, t, _ = k_rot.shape
    parts = []
    for f in features:
        if f == "position":
            lp = jnp.log1p(jnp.asarray(positions).astype(jnp.float32).reshape(-1, t))  # [1 or B, T]
            parts.append(jnp.broadcast_to(lp[:, None, :, None], (b, h, t, 1)))
        elif f == "distance" and newest:
            parts.append(jnp.zeros((b, h, t, 1), jnp.float32))
        elif f == "distance":
            if lengths is None:
                raise bad_input("lengths", lengths, "the prompt lengths [B]: the distance feature needs them")
            parts.append(jnp.broadcast_to(distance_to_end(positions, lengths)[:, None, :, None], (b, h, t, 1)))
        else:
            x = unrotate(k_rot, positions, inv_freq) if f == "key" else v.astype(jnp.float32)
            parts += [x, jnp.linalg.norm(x, axis=-1, keepdims=True)]
    return jnp.concatenate(parts, axis=-1)


def init_params(key, kind: str, num_layers: int, num_heads: int, num_feats: int, hidden: int, mean, std):
    """Random params (small weights, zero biases) with the given feature standardisation [L, H, F]."""
    k1, k2 = jax.random.split(key)
    lh = (num_layers, num_heads)
    p = dict(mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32))
    if kind == "linear":
        p.update(w=jax.random.normal(k1, lh + (num_feats,)) * 0.01, b=jnp.zeros(lh))
    else:
        p.update(w1=jax.random.normal(k1, lh + (num_feats, hidden)) / np.sqrt(num_feats),
                 b1=jnp.zeros(lh + (hidden,)), w2=jax.random.normal(k2, lh + (hidden,)) / np.sqrt(hidden),
                 b2=jnp.zeros(lh))
    return p


def kind_of(params) -> str:
    return "mlp" if "w1" in params else "linear"


def score(params, feats, layer, heads=None):
    """Scores of one layer: feats [B, H, T, F] float32, layer a (traced) int, heads [H] int (the
    global KV heads these are; default all) -> [B, H, T] float32."""
    p = jax.tree_util.tree_map(lambda a: a[layer], params)
    if heads is not None:
        p = jax.tree_util.tree_map(lambda a: a[heads], p)
    x = (feats - p["mean"][None, :, None, :]) / p["std"][None, :, None, :]
    if "w1" not in p:
        return jnp.einsum("bhtf,hf->bht", x, p["w"]) + p["b"][None, :, None]
    hid = jax.nn.gelu(jnp.einsum("bhtf,hfk->bhtk", x, p["w1"]) + p["b1"][None, :, None, :])
    return jnp.einsum("bhtk,hk->bht", hid, p["w2"]) + p["b2"][None, :, None]


def score_all(params, feats):
    """Every layer at once: feats [N, L, H, T, F] -> [N, L, H, T] (training)."""
    return jax.vmap(lambda f, layer: score(params, f, layer), in_axes=(1, 0), out_axes=1)(
        feats, jnp.arange(feats.shape[1]))
