"""Packed projections: a layer's q|k|v and gate|up matrices, which read the same normed input, as
one matrix each (`PackedLayer`), and back.

A decode step then launches one GEMM for the attention's input projections and one for the MLP's
(at one row XLA ran the narrow key and value projections as reductions, 163 reduction kernels per
step on an H100; docs/PERFORMANCE.md). Only per-layer weights are packed: they are the GPU layout,
where each layer's buffers are read in place; stacked weights are sliced per layer by a scan, and a
mesh splits the heads and the MLP columns over devices, so theirs stay apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .llama import LayerWeights, PackedLayer, Weights


@jax.jit
def _concat(parts):
    return jnp.concatenate(parts, axis=-1)


def _cat(consume: bool, *parts):
    if parts[0] is None:
        return None
    out = _concat(parts)
    if consume:
        for a in parts:
            a.delete()
    return out


def _pack(lw: LayerWeights, consume: bool) -> PackedLayer:
    return PackedLayer(attn_norm=lw.attn_norm, wqkv=_cat(consume, lw.wq, lw.wk, lw.wv), wo=lw.wo,
                       mlp_norm=lw.mlp_norm, w_gate_up=_cat(consume, lw.w_gate, lw.w_up), w_down=lw.w_down,
                       b_qkv=_cat(consume, lw.bq, lw.bk, lw.bv), bo=lw.bo, b_gate_up=_cat(consume, lw.b_gate, lw.b_up),
                       b_down=lw.b_down)


def pack_layers(weights: Weights, *, consume: bool = False) -> Weights:
    """Per-layer weights with each layer's q|k|v and gate|up packed (already packed: returned as
    they are; stacked weights raise ValueError: `unstack_layers` first).

    consume: delete each layer's separate matrices once its packed ones exist, so the peak grows by
    one layer's matrices instead of the model's; `weights` is unusable after (what `kvjax.load`
    does with the weights it just read)."""
    if not weights.per_layer:
        raise ValueError("pack_layers packs per-layer weights (a tuple of LayerWeights); unstack_layers first")
    if weights.packed:
        return weights
    return dataclasses.replace(weights, layers=tuple(_pack(lw, consume) for lw in weights.layers))


def _unpack(p: PackedLayer, config) -> LayerWeights:
    hq = config.num_heads * config.head_dim
    hkv = config.num_kv_heads * config.head_dim
    f = p.w_gate_up.shape[-1] // 2

    def qkv(w):
        return (None, None, None) if w is None else (w[..., :hq], w[..., hq:hq + hkv], w[..., hq + hkv:])

    def gate_up(w):
        return (None, None) if w is None else (w[..., :f], w[..., f:])

    (wq, wk, wv), (bq, bk, bv) = qkv(p.wqkv), qkv(p.b_qkv)
    (w_gate, w_up), (b_gate, b_up) = gate_up(p.w_gate_up), gate_up(p.b_gate_up)
    return LayerWeights(attn_norm=p.attn_norm, wq=wq, wk=wk, wv=wv, wo=p.wo, mlp_norm=p.mlp_norm, w_gate=w_gate,
                        w_up=w_up, w_down=p.w_down, bq=bq, bk=bk, bv=bv, bo=p.bo, b_gate=b_gate, b_up=b_up,
                        b_down=p.b_down)


def unpack_layers(weights: Weights, config) -> Weights:
    """The inverse of `pack_layers` (weights not packed are returned as they are)."""
    if not weights.packed:
        return weights
    return dataclasses.replace(weights, layers=tuple(_unpack(p, config) for p in weights.layers))
