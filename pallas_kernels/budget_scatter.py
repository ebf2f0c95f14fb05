"""Pack each stream's kept tokens into consecutive pool slots, expressed as a gather.

    pack_plan(keep [B, H, T], dst_start [B, H], P) -> (src_head [B, P], src_token [B, P], written [B, P])
    budget_scatter(pool [B, P, D], src [B, H, T, D], src_head, src_token, written) -> pool'

Stream (b, h)'s kept tokens, in increasing t, go to slots `dst_start[b, h] + i`. Scatter and cumsum
do not lower inside TPU kernels, so the plan (which needs a cumsum) is computed by XLA, and the
kernel only gathers: `pool'[b, p] = src[b, src_head[b, p], src_token[b, p]]` where written, else
the old slot. Callers guarantee streams do not overlap and fit in the pool; slots past P drop.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def pack_plan(keep, dst_start, pool_size: int):
    """Where every pool slot's token comes from. keep [B, H, T] bool, dst_start [B, H] int32."""
    b, h, t = keep.shape
    rank = jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(keep, dst_start[..., None] + rank, pool_size)  # pool_size = dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], keep.shape)
    heads = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[None, :, None], keep.shape)
    toks = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, None, :], keep.shape)
    src_head = jnp.zeros((b, pool_size), jnp.int32).at[rows, slot].set(heads, mode="drop")
    src_token = jnp.zeros((b, pool_size), jnp.int32).at[rows, slot].set(toks, mode="drop")
    written = jnp.zeros((b, pool_size), bool).at[rows, slot].set(True, mode="drop")
    return src_head, src_token, written


def budget_scatter_reference(pool, src, src_head, src_token, written):
    gathered = src[jnp.arange(src.shape[0])[:, None], src_head, src_token]
    return jnp.where(written[..., None], gathered.astype(pool.dtype), pool)


def _gather_kernel(head_ref, tok_ref, written_ref, src_ref, pool_ref, out_ref, *, block: int):
    """One (sequence, slot block): copy each written slot's source row, keep the others."""
    b, j = pl.program_id(0), pl.program_id(1)

    def one_slot(i, carry):
        p = j * block + i
        row = src_ref[0, head_ref[b, p], tok_ref[b, p], :]
        keep_old = written_ref[b, p] == 0
        out_ref[0, i, :] = jnp.where(keep_old, pool_ref[0, i, :], row.astype(out_ref.dtype))
        return carry

    jax.lax.fori_loop(0, block, one_slot, 0)


def _gather_kernel_gpu(head_ref, tok_ref, written_ref, src_ref, pool_ref, out_ref, *, block: int):
    """Triton has no scalar prefetch: indices come in as blocks, the slot loop is unrolled."""
    for i in range(block):
        row = src_ref[0, head_ref[0, i], tok_ref[0, i], :]
        keep_old = written_ref[0, i] == 0
        out_ref[0, i, :] = jnp.where(keep_old, pool_ref[0, i, :], row.astype(out_ref.dtype))


def _budget_scatter_gpu(pool, src, heads, toks, wr, *, block: int, interpret):
    b, p, d = pool.shape
    _, h, t, _ = src.shape
    slots = lambda i, j: (i, j)
    return pl.pallas_call(
        functools.partial(_gather_kernel_gpu, block=block),
        grid=(b, p // block),
        in_specs=[pl.BlockSpec((1, block), slots), pl.BlockSpec((1, block), slots), pl.BlockSpec((1, block), slots),
                  pl.BlockSpec((1, h, t, d), lambda i, j: (i, 0, 0, 0)),
                  pl.BlockSpec((1, block, d), lambda i, j: (i, j, 0))],
        out_specs=pl.BlockSpec((1, block, d), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
        interpret=interpret,
    )(heads, toks, wr, src, pool)


@functools.partial(jax.jit, static_argnames=("block", "interpret", "gpu"))
def budget_scatter_pallas(pool, src, src_head, src_token, written, *, block: int = 8, interpret=False, gpu=False):
    """Pallas gather: grid over (sequence, block of slots); on TPU the indices arrive as scalar
    prefetch, on GPU (Triton, no scalar prefetch) as ordinary blocks."""
    b, p, d = pool.shape
    _, h, t, _ = src.shape
    p_pad = -(-p // block) * block
    pad = lambda x: jnp.pad(x, ((0, 0), (0, p_pad - p)))
    heads, toks, wr = pad(src_head), pad(src_token), pad(written.astype(jnp.int32))
    pool_p = jnp.pad(pool, ((0, 0), (0, p_pad - p), (0, 0)))
    if gpu:
        return _budget_scatter_gpu(pool_p, src, heads, toks, wr, block=block, interpret=interpret)[:, :p]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, p_pad // block),
        in_specs=[
            pl.BlockSpec((1, h, t, d), lambda i, j, *_: (i, 0, 0, 0)),
            pl.BlockSpec((1, block, d), lambda i, j, *_: (i, j, 0)),
        ],
        out_specs=pl.BlockSpec((1, block, d), lambda i, j, *_: (i, j, 0)),
    )
    out = pl.pallas_call(
        functools.partial(_gather_kernel, block=block),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(pool_p.shape, pool.dtype),
        interpret=interpret,
    )(heads, toks, wr, src, pool_p)
    return out[:, :p]


def budget_scatter(pool, src, src_head, src_token, written, *,
                   implementation: Literal["pallas", "xla"] = "xla", interpret=False):
    """pool [B, P, D], src [B, H, T, D] -> pool' [B, P, D] (see module docstring)."""
    if pool.ndim != 3 or src.ndim != 4 or src.shape[0] != pool.shape[0] or src.shape[3] != pool.shape[2]:
        raise ValueError(f"pool must be [B, P, D] and src [B, H, T, D]; got {pool.shape} and {src.shape}")
    if src_head.shape != pool.shape[:2] or src_token.shape != pool.shape[:2] or written.shape != pool.shape[:2]:
        raise ValueError(f"src_head, src_token and written must be [B, P] = {pool.shape[:2]}")
    if implementation == "pallas":
        gpu = jax.default_backend() == "gpu"
        return budget_scatter_pallas(pool, src, src_head, src_token, written, interpret=interpret, gpu=gpu)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return budget_scatter_reference(pool, src, src_head, src_token, written)


def pack_streams(pool, src, keep, dst_start, **kwargs):
    """pack_plan + budget_scatter in one call."""
    plan = pack_plan(keep, dst_start, pool.shape[1])
    return budget_scatter(pool, src, *plan, **kwargs)
