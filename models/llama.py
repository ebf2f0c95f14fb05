"""Llama / Mistral decoder as pure functions over a weight pytree with stacked layers.

    x = embed(tokens)
    for each layer:  x += W_o · attn(rope(W_q · norm(x)), rope(W_k · norm(x)), W_v · norm(x))
                     x += W_down · (silu(W_gate · norm(x)) * W_up · norm(x))
    logits = norm(x) · W_out          (W_out = embedᵀ when embeddings are tied)

RoPE is rotate-half, as in Hugging Face, so checkpoints load without permuting weights.
Activations are `[B, T, E]`; queries are grouped by KV head as `[B, KV, G, T, D]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .prompt_attention import causal_attention
from .config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights; in `Weights.layers` every leaf has a leading `[L]` axis.

    Projections are stored input-major (`x @ w`): wq [E, H*D], wk/wv [E, KV*D], wo [H*D, E],
    w_gate/w_up [E, F], w_down [F, E]. Biases are None unless the config enables them.
    """

    attn_norm: jax.Array
    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    mlp_norm: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    bq: jax.Array | None = None
    bk: jax.Array | None = None
    bv: jax.Array | None = None
    bo: jax.Array | None = None
    b_gate: jax.Array | None = None
    b_up: jax.Array | None = None
    b_down: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One layer's weights with the projections that read the same normed input packed side by side:
    wqkv [E, (H + 2 KV) * D] = wq | wk | wv and w_gate_up [E, 2F] = w_gate | w_up (biases likewise).

    One matrix each, so a decode step launches one GEMM where it launched three and two (at one row
    XLA ran the narrow key and value projections as reductions); made by `models.packed.pack_layers`
    for per-layer weights on one device (a mesh splits the heads and the MLP columns: its weights
    stay apart)."""

    attn_norm: jax.Array
    wqkv: jax.Array
    wo: jax.Array
    mlp_norm: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array
    b_qkv: jax.Array | None = None
    bo: jax.Array | None = None
    b_gate_up: jax.Array | None = None
    b_down: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """embed [V, E], layers, final_norm [E], lm_head [E, V] or None when tied.

    `layers` is one LayerWeights with stacked `[L, ...]` leaves (scanned: fast to compile), or a
    tuple of L per-layer LayerWeights (unrolled: on GPU, XLA copies a stacked layer's slice before
    every matmul, which made decode read the weights three times; see docs/PERFORMANCE.md).
    """

    embed: jax.Array
    layers: LayerWeights | tuple[LayerWeights, ...] | tuple[PackedLayer, ...]
    final_norm: jax.Array
    lm_head: jax.Array | None = None

    @property
    def per_layer(self) -> bool:
        return not isinstance(self.layers, LayerWeights)

    @property
    def packed(self) -> bool:
        return self.per_layer and isinstance(self.layers[0], PackedLayer)


def unstack_layers(weights: Weights) -> Weights:
    """Per-layer buffers (a tuple of LayerWeights) from stacked ones, one leaf at a time."""
    if weights.per_layer:
        return weights
    leaves, treedef = jax.tree_util.tree_flatten(weights.layers)
    num_layers = leaves[0].shape[0]
    split = [[leaf[i] for i in range(num_layers)] for leaf in leaves]
    layers = tuple(jax.tree_util.tree_unflatten(treedef, [s[i] for s in split]) for i in range(num_layers))
    return dataclasses.replace(weights, layers=layers)


def scan_layers(step, carry, xs, *, one_body: bool = False):
    """`lax.scan(step, carry, xs)` over the layers, where `xs[0]` is `Weights.layers`: a real scan
    for stacked weights, an unrolled loop (outputs stacked like scan's) for per-layer weights.

    one_body: per-layer weights still go through a real scan, each layer's weights copied out of
    its buffers by a `lax.switch` (one read and write of a layer's weights per layer, 0.44 GB for
    Llama-3.1-8B): one copy of `step` to compile instead of one per layer, for steps whose work
    dwarfs that copy (a chunked prefill's loop over a prompt's chunks), never for decode."""
    layers, *rest = xs
    if isinstance(layers, LayerWeights):
        return jax.lax.scan(step, carry, xs)
    if one_body:
        pick = [functools.partial(lambda lw: lw, lw) for lw in layers]

        def body(c, args):
            i, r = args
            return step(c, (jax.lax.switch(i, pick), *r))

        return jax.lax.scan(body, carry, (jnp.arange(len(layers), dtype=jnp.int32), tuple(rest)))
    ys = []
    for i, lw in enumerate(layers):
        carry, y = step(carry, (lw, *jax.tree_util.tree_map(lambda a: a[i], tuple(rest))))
        # one layer at a time, as in a scan: otherwise XLA may overlap layers and hold several
        # layers' temporaries (a 32K prefill peaked 11 GiB higher on an H100)
        carry = jax.lax.optimization_barrier(carry)
        ys.append(y)
    return carry, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)


def rms_norm(x, weight, eps: float):
    """x [..., E] normalised in float32, then scaled (as HF: cast back before the weight)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [D/2] (float32), with linear or llama3 scaling applied."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = config.rope_scaling
    if s.kind == "linear":
        inv = inv / s.factor
    elif s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * inv / s.factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, inv)
    inv = inv.astype(np.float32)
    inv.setflags(write=False)  # cached and shared
    return inv


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE. x [B, T, N, D], positions [B, T] int -> same shape and dtype as x."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(x, w, b):
    y = x @ w
    return y if b is None else y + b


def embed(weights: Weights, tokens):
    """tokens [B, T] int -> x [B, T, E]."""
    return weights.embed[tokens]


def layer_qkv(lw: LayerWeights | PackedLayer, x, positions, config: ModelConfig, inv_freq):
    """Pre-norm, project and rotate. x [B, T, E] -> q [B, KV, G, T, D], k, v [B, KV, T, D]."""
    b, t, _ = x.shape
    h = rms_norm(x, lw.attn_norm, config.rms_norm_eps)
    kv, g, d = config.num_kv_heads, config.group_size, config.head_dim
    if isinstance(lw, PackedLayer):  # one GEMM, its columns split after
        qkv = _linear(h, lw.wqkv, lw.b_qkv)
        q, k, v = jnp.split(qkv, (kv * g * d, (kv * g + kv) * d), axis=-1)
    else:
        # Three distinct operands: XLA:GPU otherwise merges the three projections into one GEMM by
        # concatenating wq|wk|wv, a 50 MB copy per layer per decode step at Llama-8B shapes (1 ms of
        # a 32 ms step at batch 408 on an H100, benchmarks/results/decode_tuning_h100.md).
        hq, hk, hv = jax.lax.optimization_barrier((h, h, h))
        q, k, v = _linear(hq, lw.wq, lw.bq), _linear(hk, lw.wk, lw.bk), _linear(hv, lw.wv, lw.bv)
    q, k, v = q.reshape(b, t, kv * g, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _summed(x, w, b, axis: str | None):
    """x @ w + b, where w's input rows are split over the mesh axis `axis` (None: not split): each
    device's partial products are summed over the axis, then b is added once."""
    y = x @ w
    if axis is not None:
        y = jax.lax.psum(y, axis)
    return y if b is None else y + b


def attn_output(lw: LayerWeights | PackedLayer, attn, config: ModelConfig | None = None):
    """attn [B, KV, G, T, D] -> [B, T, E] through W_o. Inside a mesh program each device holds its
    heads' rows of W_o, so the products are summed over the model axis."""
    b, kv, g, t, d = attn.shape
    axis = None if config is None else config.model_axis
    return _summed(attn.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g * d), lw.wo, lw.bo, axis)


def mlp(lw: LayerWeights | PackedLayer, x, config: ModelConfig):
    """The gated MLP block with its pre-norm and residual. x [B, T, E] -> [B, T, E] (inside a mesh
    program, summed over the model axis when the MLP's columns are split over it)."""
    h = rms_norm(x, lw.mlp_norm, config.rms_norm_eps)
    if isinstance(lw, PackedLayer):
        gate, up = jnp.split(_linear(h, lw.w_gate_up, lw.b_gate_up), 2, axis=-1)
    else:
        gate, up = _linear(h, lw.w_gate, lw.b_gate), _linear(h, lw.w_up, lw.b_up)
    split = config.model_axis is not None and lw.w_down.shape[-2] != config.intermediate_size
    return x + _summed(jax.nn.silu(gate) * up, lw.w_down, lw.b_down, config.model_axis if split else None)


def final_logits(weights: Weights, x, config: ModelConfig):
    """x [B, T, E] -> logits [B, T, V] in float32 (gathered over the model axis when the output
    projection's vocabulary is split over it)."""
    h = rms_norm(x, weights.final_norm, config.rms_norm_eps)
    w_out = weights.embed.T if weights.lm_head is None else weights.lm_head
    logits = jnp.matmul(h, w_out, preferred_element_type=jnp.float32)
    if config.model_axis is not None and w_out.shape[1] != config.vocab_size:
        logits = jax.lax.all_gather(logits, config.model_axis, axis=logits.ndim - 1, tiled=True)
    return logits


def decoder_layer(lw: LayerWeights | PackedLayer, x, positions, config: ModelConfig, attend):
    """One decoder layer; `attend` is the only part that differs between prompt, decode and chunk.

        q, k, v   = layer_qkv(x)                  pre-norm, projections, RoPE
        out, aux  = attend(q, k, v)               q [B, KV, G, T, D], k/v [B, KV, T, D] -> out [B, KV, G, T, D]
        x        += attn_output(out); x += mlp(x)

    `attend` returns whatever else its caller needs as `aux` (prompt statistics, an updated cache).
    Returns (x [B, T, E], aux).
    """
    q, k, v = layer_qkv(lw, x, positions, config, rope_inv_freq(config))
    out, aux = attend(q, k, v)
    x = x + attn_output(lw, out.astype(x.dtype), config)
    return mlp(lw, x, config), aux


def forward(weights: Weights, config: ModelConfig, tokens, lengths=None, *, chunk: int = 512):
    """Logits of every position with no cache. tokens [B, T] int, lengths [B] -> [B, T, V] float32."""
    b, t = tokens.shape
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def attend(q, k, v):
        out = causal_attention(q, k, v, lengths, scale=config.attention_scale,
                               sliding_window=config.sliding_window, chunk=chunk)
        return out, None

    def layer(x, xs):
        (lw,) = xs
        return decoder_layer(lw, x, positions, config, attend)[0], None

    x, _ = scan_layers(layer, embed(weights, tokens), (weights.layers,))
    return final_logits(weights, x, config)
