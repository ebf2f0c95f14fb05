"""Decode attention over one layer's region of the pool.

XLA path: one batch-major matmul of all the layer's query heads against the layer region
`[B, S, D]`, with a mask that lets head h see only its own stream. Every slot is read once, as a
head-by-head gather would; the extra multiply-adds are cheap next to the memory traffic.
Pallas path (`kvjax.pallas_kernels.ragged_decode_attention`): reads only each stream's used slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.evict import stream_mask
from kvjax.models.prompt_attention import NEG_INF


def _kernel_blocks(batch: int, heads: int, region_slots: int, skewed: bool):
    """(block_kv, num_splits) for the decode kernels on this backend, sized by a layer's region."""
    from kvjax.pallas_kernels import _common
    from kvjax.pallas_kernels.ragged_decode_attention import default_block_kv, default_num_splits

    block_kv = default_block_kv(_common.default_backend_kind(None))
    return block_kv, default_num_splits(batch, heads, region_slots, block_kv, skewed)


def decode_attention(q, k_r, v_r, rel_start, length, pos_r, min_pos, *, scale: float,
                     implementation: str = "xla", need_probs: bool = False, region_slots: int | None = None,
                     skewed: bool = False):
    """One query per sequence over each KV head's stream in a layer region.

    q [B, H, G, D]; k_r, v_r [B, S, D]; rel_start, length [B, H] (slots relative to the region);
    pos_r [B, S]; min_pos [B] or None (sliding window: slots with pos < min_pos are hidden).
    region_slots: with the Pallas kernel over a whole pool, the size of the layer's region (sizes
    the kernel's split count by the streams, not by the pool); skewed: stream lengths differ within
    a layer (more splits, see `default_num_splits`).
    Returns (out [B, H, G, D] float32, probs [B, H, G, S] float32 or None).
    """
    b, h, g, d = q.shape
    s = k_r.shape[1]
    if implementation == "pallas" and not need_probs:
        from kvjax.pallas_kernels.ragged_decode_attention import ragged_decode_attention

        block_kv, num_splits = _kernel_blocks(b, h, region_slots or s, skewed)
        out = ragged_decode_attention(
            q, k_r, v_r, rel_start, length, sm_scale=scale, pos=pos_r if min_pos is not None else None,
            min_pos=min_pos, implementation="pallas", block_kv=block_kv, num_splits=num_splits,
        )
        return out.astype(jnp.float32), None
    mask = stream_mask(rel_start, length, s)
    if min_pos is not None:
        mask &= (pos_r >= min_pos[:, None])[:, None, :]
    logits = jnp.matmul(
        q.reshape(b, h * g, d), jnp.swapaxes(k_r, 1, 2), preferred_element_type=jnp.float32
    ).reshape(b, h, g, s) * scale
    logits = jnp.where(mask[:, :, None, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask[:, :, None, :], probs, 0.0)  # empty streams attend to nothing
    out = jnp.matmul(probs.reshape(b, h * g, s).astype(v_r.dtype), v_r, preferred_element_type=jnp.float32)
    return out.reshape(b, h, g, d), (probs if need_probs else None)


def append_and_attend(q, k_pool, v_pool, start, length, pos, min_pos, k_new, v_new, slot, new_pos, *, scale: float,
                      region_slots: int, skewed: bool = False, stream_logits: int | None = None,
                      raw_logits: bool = False, layer=None):
    """The Pallas path of a decode step: write each stream's new key/value at `slot` [B, H] (-1: none)
    and its sequence's position new_pos [B] in the pool's `pos`, and attend over the stream with it.
    On GPU the kernel writes the pools in place itself, so no scatter runs before it.

    q [B, H, G, D]; k_pool, v_pool [B, P, D]; start, length [B, H] (absolute slots, length before the
    new token), or with `layer` every layer's [L, B, H] (the kernel reads row `layer`); pos [B, P]
    int32 (before the append), min_pos [B] or None; k_new, v_new [B, H, D]; skewed as `decode_attention`.
    Returns (out [B, H, G, D] float32, k_pool, v_pool, pos), and with `stream_logits=W` also each query
    head's log-sum-exp over its stream, lse [B, H, G], and its logits on the stream's first W
    offsets, [B, H, G, W] (for `stream_probs`; on GPU the kernel stores them as it goes).
    `raw_logits` (GPU kernel): the kernel's logits buffer uncopied, [B, H, G', C], and after it the
    column of offset 0 (a Python int): (out, k_pool, v_pool, pos, lse, logits, column).
    """
    from kvjax.pallas_kernels.ragged_decode_attention import ragged_decode_attention, stream_logits_column

    block_kv, num_splits = _kernel_blocks(*start.shape[-2:], region_slots, skewed)
    raw = raw_logits and stream_logits is not None
    out, k_pool, v_pool, pos, *rest = ragged_decode_attention(
        q, k_pool, v_pool, start, length, sm_scale=scale, pos=pos if min_pos is not None else None,
        min_pos=min_pos, implementation="pallas", block_kv=block_kv, num_splits=num_splits,
        append=(k_new, v_new, slot), append_pos=(pos, new_pos), return_lse=stream_logits is not None,
        stream_logits=stream_logits, raw_stream_logits=raw, layer=layer,
    )
    column = (stream_logits_column(k_pool.shape[1], block_kv),) if raw else ()
    return (out.astype(jnp.float32), k_pool, v_pool, pos, *rest, *column)


def _reduce(p, how: str, axis: int):
    return jnp.max(p, axis=axis) if how == "max" else jnp.mean(p, axis=axis)


def stream_probs(lse, logits, length, reduce: str):
    """The new query's attention probabilities on each stream's first W offsets, reduced over each
    group's query heads ("mean" or "max"): [B, H, W] float32, 0 past the stream's end.

    lse [B, H, G] and logits [B, H, G, W] from `append_and_attend`; length [B, H] (new token included).
    """
    inside = jnp.arange(logits.shape[-1]) < length[..., None]
    p = jnp.where(inside[:, :, None], jnp.exp(logits - lse[..., None]), 0.0)  # unspecified offsets -> 0
    return _reduce(p, reduce, axis=2)


def region_to_streams(probs, rel_start, width: int, reduce: str):
    """The XLA path's probabilities over the layer region, probs [B, H, G, S], on each stream's first
    `width` offsets, group-reduced: [B, H, W] (the caller masks offsets past the stream's end)."""
    s = probs.shape[-1]
    idx = jnp.minimum(rel_start[..., None] + jnp.arange(width), s - 1)
    return jnp.take_along_axis(_reduce(probs, reduce, axis=2), idx, axis=2)
