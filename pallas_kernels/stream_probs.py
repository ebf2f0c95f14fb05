"""The new query's attention probabilities over each stream, written at the streams' pool slots.

    stream_probs(q [B, H, G, D], k_pool [B, P, D], start [B, H], length [B, H], lse [B, H, G], *,
                 sm_scale, reduce="mean", pos [B, P] = None, min_pos [B] = None) -> p [B, P] float32

p[b, s] = reduce_g exp(q[b, h, g] . k_pool[b, s] * sm_scale - lse[b, h, g]) for the slot s of
stream (b, h) (reduce: the mean or the max over the G query heads of the group), 0 for every slot
outside the streams and for slots hidden by `pos < min_pos`. `lse` is each query head's
log-sum-exp over its stream (`ragged_decode_attention(..., return_lse=True)`), so the values are
the softmax probabilities the attention used.

Policies that evict while decoding (H2O, TOVA, CAKE, RoCo) score slots by these probabilities.
Without this kernel they attend through the XLA path, which reads a whole layer region (for CAKE's
cascade, the whole pool) for every layer. The GPU kernel (Pallas lowered through Triton) reads
only the streams' keys, with the split and block plan of `ragged_decode_attention`, and writes
each block's values into its slots of a zero-initialised output (aliased in and out). Elsewhere
the dense reference runs. Both run on CPU in interpret mode.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import _common
from .ragged_decode_attention import (_block_masks, _compute_dtype, _split_plan, default_block_kv, default_num_splits,
                                      dense_stream_logits)


def stream_probs_reference(q, k_pool, start, length, lse, *, sm_scale: float, reduce: str = "mean", pos=None,
                           min_pos=None):
    """Dense over the whole pool (reads every slot)."""
    logits, mask = dense_stream_logits(q, k_pool, start, length, sm_scale=sm_scale, pos=pos, min_pos=min_pos)
    probs = jnp.where(mask[:, :, None], jnp.exp(logits - lse[..., None]), 0.0)
    red = jnp.max(probs, axis=2) if reduce == "max" else jnp.mean(probs, axis=2)  # [B, H, P]
    return red.sum(axis=1)  # each slot belongs to one stream at most


def _gpu_kernel(start_ref, len_ref, minpos_ref, q_ref, lse_ref, k_ref, pos_ref, p_in_ref, p_ref, *, sm_scale,
                block_kv, num_splits, pool_size, use_pos, cdtype, g, reduce):
    del p_in_ref  # the same buffer as p_ref: slots outside the streams keep its zeros
    split = pl.program_id(2)
    start = start_ref[0, 0]
    length = len_ref[0, 0]
    base, lo, hi, n_blocks = _split_plan(start, length, split, num_splits=num_splits, block_kv=block_kv)
    q = q_ref[0, 0].astype(cdtype)  # [G', D]
    lse = lse_ref[0, 0]  # [G', 1]
    real_head = jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], 1), 0) < g

    def body(i, carry):
        off_c, in_stream, _ = _block_masks(base, i, lo, hi, block_kv=block_kv, pool_size=pool_size)
        k = k_ref[0, pl.ds(off_c, block_kv), :].astype(cdtype)
        visible = in_stream
        if use_pos:
            visible = visible & (pos_ref[0, pl.ds(off_c, block_kv)][None, :] >= minpos_ref[0, 0])
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * sm_scale
        p = jnp.where(real_head & visible, jnp.exp(s - lse), 0.0)  # [G', blk]
        red = jnp.max(p, axis=0, keepdims=True) if reduce == "max" else jnp.sum(p, axis=0, keepdims=True) / g
        pltriton.store(p_ref.at[pl.ds(0, 1), pl.ds(off_c, block_kv)], red, mask=in_stream)  # [1, blk]
        return carry

    jax.lax.fori_loop(0, n_blocks, body, 0)


def _gpu_call(qp, lse_p, k_pool, start, length, pos, min_pos, *, sm_scale, block_kv, num_splits, use_pos, g,
              reduce, interpret):
    b, h, gp, d = qp.shape
    p = k_pool.shape[1]
    block_kv = min(block_kv, 1 << (p.bit_length() - 1))
    cdtype = _compute_dtype(qp.dtype, k_pool.dtype)
    kernel = functools.partial(_gpu_kernel, sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits,
                               pool_size=p, use_pos=use_pos, cdtype=cdtype, g=g, reduce=reduce)
    scalar = pl.BlockSpec((1, 1), lambda i, j, s: (i, j))
    per_seq = lambda shape: pl.BlockSpec((1,) + shape, lambda i, j, s: (i,) + (0,) * len(shape))
    row = pl.BlockSpec((1, 1), lambda i, j, s: (i, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, h, num_splits),
        in_specs=[scalar, scalar, row, pl.BlockSpec((1, 1, gp, d), lambda i, j, s: (i, j, 0, 0)),
                  pl.BlockSpec((1, 1, gp, 1), lambda i, j, s: (i, j, 0, 0)), per_seq((p, d)),
                  per_seq((p,)) if use_pos else row, per_seq((p,))],
        out_specs=per_seq((p,)),
        out_shape=jax.ShapeDtypeStruct((b, p), jnp.float32),
        input_output_aliases={7: 0},
        interpret=interpret,
        name="stream_probs_gpu",
        **_common.triton_kwargs(interpret),
    )(start, length, min_pos.reshape(b, 1), qp, lse_p, k_pool, pos, jnp.zeros((b, p), jnp.float32))


@functools.partial(jax.jit, static_argnames=("sm_scale", "reduce", "block_kv", "num_splits", "interpret"))
def stream_probs_pallas(q, k_pool, start, length, lse, pos=None, min_pos=None, *, sm_scale: float,
                        reduce: str = "mean", block_kv: int | None = None, num_splits: int | None = None,
                        interpret=False):
    """The GPU kernel (see module docstring)."""
    b, h, g, d = q.shape
    block_kv = block_kv or default_block_kv("gpu")
    num_splits = num_splits or default_num_splits(b, h, k_pool.shape[1], block_kv)
    gp = max(16, 1 << (g - 1).bit_length())  # Triton dots need M >= 16
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    lse_p = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, gp - g)), constant_values=jnp.inf)[..., None]
    use_pos = min_pos is not None
    pos_arr = pos.astype(jnp.int32) if use_pos else jnp.zeros((b, 1), jnp.int32)
    minpos = min_pos.astype(jnp.int32) if use_pos else jnp.zeros((b,), jnp.int32)
    return _gpu_call(qp, lse_p, k_pool, start.astype(jnp.int32), length.astype(jnp.int32), pos_arr, minpos,
                     sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits, use_pos=use_pos, g=g,
                     reduce=reduce, interpret=interpret)


def stream_probs(q, k_pool, start, length, lse, *, sm_scale: float, reduce: str = "mean", pos=None, min_pos=None,
                 implementation: Literal["pallas", "xla"] = "xla", interpret=False, backend=None,
                 block_kv: int | None = None, num_splits: int | None = None):
    """See the module docstring. `implementation="pallas"` runs the GPU kernel where the backend is a
    GPU (or `backend="gpu"`, e.g. in interpret mode) and the dense reference elsewhere."""
    b, h, g, d = q.shape
    if k_pool.ndim != 3 or k_pool.shape[0] != b or k_pool.shape[2] != d:
        raise ValueError(f"k_pool must be [B, P, D] = [{b}, P, {d}], got {k_pool.shape}")
    for name, x in (("start", start), ("length", length)):
        if x.shape != (b, h):
            raise ValueError(f"{name} must be [B, H] = {(b, h)}, got {x.shape}")
    if lse.shape != (b, h, g):
        raise ValueError(f"lse must be [B, H, G] = {(b, h, g)}, got {lse.shape}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if (pos is None) != (min_pos is None):
        raise ValueError("pos and min_pos must be given together")
    if implementation == "pallas" and _common.default_backend_kind(backend) == "gpu":
        return stream_probs_pallas(q, k_pool, start, length, lse, pos, min_pos, sm_scale=sm_scale, reduce=reduce,
                                   block_kv=block_kv, num_splits=num_splits, interpret=interpret)
    if implementation not in ("pallas", "xla"):
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return stream_probs_reference(q, k_pool, start, length, lse, sm_scale=sm_scale, reduce=reduce, pos=pos,
                                  min_pos=min_pos)
