"""Decode attention of one query per sequence over the streams of a pooled KV cache.

    ragged_decode_attention(q [B, H, G, D], k_pool [B, P, D], v_pool [B, P, D],
                            start [B, H], length [B, H]) -> out [B, H, G, D]

Stream (b, h) is `k_pool[b, start[b,h] : start[b,h] + length[b,h]]`; the G query heads of KV head h
(its GQA group) share it. Optional `pos [B, P]` and `min_pos [B]` hide slots whose original
position is below min_pos (sliding-window models). An empty stream gives zeros.

The kernel is flash-decoding: a grid over (sequence, KV head, split); each program walks its share
of the stream in blocks of `block_kv` slots with an online softmax, reading only the stream's own
slots, and the splits are merged by log-sum-exp outside. Block reads stay inside the pool by
clamping the block start and masking slots by index, so no padding copy of the pool is needed.
Written for GPU (Pallas lowered through Triton) and interpret mode; TPU would need explicit DMA
from HBM and is not done.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_NEG = -1e30


def ragged_decode_attention_reference(q, k_pool, v_pool, start, length, *, sm_scale: float, pos=None, min_pos=None):
    """Masked dense softmax over the whole pool (reads everything; for tests)."""
    b, h, g, d = q.shape
    p = k_pool.shape[1]
    s = jnp.arange(p)[None, None, :]
    mask = (s >= start[..., None]) & (s < (start + length)[..., None])  # [B, H, P]
    if min_pos is not None:
        mask &= (pos >= min_pos[:, None])[:, None, :]
    logits = jnp.einsum("bhgd,bpd->bhgp", q.astype(jnp.float32), k_pool.astype(jnp.float32)) * sm_scale
    logits = jnp.where(mask[:, :, None], logits, _NEG)
    probs = jnp.where(mask[:, :, None], jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bhgp,bpd->bhgd", probs, v_pool.astype(jnp.float32))
    return out.astype(q.dtype)


def _kernel(start_ref, len_ref, minpos_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, m_ref, l_ref, *,
            sm_scale, block_kv, num_splits, pool_size, use_pos):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = start_ref[b, h]
    length = len_ref[b, h]
    per_split = pl.cdiv(pl.cdiv(length, num_splits), block_kv) * block_kv
    lo = start + split * per_split
    hi = jnp.minimum(start + length, lo + per_split)
    n_blocks = pl.cdiv(jnp.maximum(hi - lo, 0), block_kv)
    q = q_ref[0, 0].astype(jnp.float32) * sm_scale  # [G, D]
    g = q.shape[0]

    def body(i, carry):
        m, l, acc = carry
        off = lo + i * block_kv
        off_c = jnp.minimum(off, pool_size - block_kv)  # stay inside the pool; mask by index below
        idx = off_c + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        valid = (idx >= off) & (idx < hi)
        k = k_ref[b, pl.ds(off_c, block_kv), :].astype(jnp.float32)  # [blk, D]
        v = v_ref[b, pl.ds(off_c, block_kv), :].astype(jnp.float32)
        if use_pos:
            valid &= pos_ref[b, pl.ds(off_c, block_kv)][None, :] >= minpos_ref[b]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [G, blk]
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(axis=1, keepdims=True)
        acc = acc * alpha + jax.lax.dot(p, v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((g, 1), _NEG, jnp.float32), jnp.zeros((g, 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[0, 0, 0] = acc
    m_ref[0, 0, 0] = m
    l_ref[0, 0, 0] = l


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_kv", "num_splits", "interpret"))
def ragged_decode_attention_pallas(q, k_pool, v_pool, start, length, pos=None, min_pos=None, *, sm_scale: float,
                                   block_kv: int = 64, num_splits: int = 4, interpret=False):
    b, h, g, d = q.shape
    p = k_pool.shape[1]
    block_kv = min(block_kv, p)
    g_pad = max(16, g) if not interpret else g  # Triton dots need M >= 16
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, g_pad - g), (0, 0)))
    use_pos = min_pos is not None
    pos_arr = pos if use_pos else jnp.zeros((b, p), jnp.int32)
    minpos = min_pos if use_pos else jnp.zeros((b,), jnp.int32)
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j, s: (0,) * len(shape))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits,
                               pool_size=p, use_pos=use_pos)
    out, m, l = pl.pallas_call(
        kernel,
        grid=(b, h, num_splits),
        in_specs=[
            whole((b, h)), whole((b, h)), whole((b,)),
            pl.BlockSpec((1, 1, g_pad, d), lambda i, j, s: (i, j, 0, 0)),
            whole((b, p, d)), whole((b, p, d)), whole((b, p)),
        ],
        out_specs=[
            pl.BlockSpec((1, 1, 1, g_pad, d), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((1, 1, 1, g_pad, 1), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((1, 1, 1, g_pad, 1), lambda i, j, s: (i, j, s, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, num_splits, g_pad, d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, num_splits, g_pad, 1), jnp.float32),
            jax.ShapeDtypeStruct((b, h, num_splits, g_pad, 1), jnp.float32),
        ],
        interpret=interpret,
    )(start.astype(jnp.int32), length.astype(jnp.int32), minpos.astype(jnp.int32), qp, k_pool, v_pool,
      pos_arr.astype(jnp.int32))
    # merge the splits (log-sum-exp); empty splits carry l = 0
    m_all = m.max(axis=2, keepdims=True)
    w = jnp.where(l > 0, jnp.exp(m - m_all), 0.0)
    num = (out * w).sum(axis=2)
    den = (l * w).sum(axis=2)
    res = jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)
    return res[:, :, :g].astype(q.dtype)


def ragged_decode_attention(q, k_pool, v_pool, start, length, *, sm_scale: float, pos=None, min_pos=None,
                            implementation: Literal["pallas", "xla"] = "xla", interpret=False,
                            block_kv: int = 64, num_splits: int = 4):
    """out [B, H, G, D] (see module docstring)."""
    b, h, g, d = q.shape
    if k_pool.shape != v_pool.shape or k_pool.shape[0] != b or k_pool.shape[2] != d:
        raise ValueError(f"k_pool/v_pool must be [B, P, D] = [{b}, P, {d}], got {k_pool.shape} and {v_pool.shape}")
    if start.shape != (b, h) or length.shape != (b, h):
        raise ValueError(f"start and length must be [B, H] = {(b, h)}, got {start.shape} and {length.shape}")
    if (pos is None) != (min_pos is None):
        raise ValueError("pos and min_pos go together")
    if implementation == "pallas":
        return ragged_decode_attention_pallas(q, k_pool, v_pool, start, length, pos, min_pos, sm_scale=sm_scale,
                                              block_kv=block_kv, num_splits=num_splits, interpret=interpret)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return ragged_decode_attention_reference(q, k_pool, v_pool, start, length, sm_scale=sm_scale, pos=pos,
                                             min_pos=min_pos)
