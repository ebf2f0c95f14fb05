"""Keep-mask of the k largest valid entries of each row, with a per-row k.

    masked_topk(scores [R, N] f32, k [R] int32, valid [R, N] bool) -> keep [R, N] bool

Ties are broken by position (lower index first), as `lax.top_k` orders them; k <= 0 keeps nothing,
k >= the row's valid count keeps every valid entry; NaN counts as -inf; invalid entries are never
kept.

The Pallas kernel cannot sort (no Pallas backend lowers sort or top_k), so it searches the k-th
largest value bit by bit: floats map to order-preserving int32 keys, 32 passes of compare + count
fix the threshold's bits from the top, and a second search over index bits keeps the first
(k - #greater) entries equal to the threshold. Only compares, reductions and bit operations: it
lowers on TPU (Mosaic) and GPU (Triton).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_INT_MIN = -(2**31)


def _order_keys(scores, valid):
    """float32 -> int32 with the same order; NaN as -inf; invalid below everything."""
    x = jnp.where(jnp.isnan(scores), -jnp.inf, scores).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    keys = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
    return jnp.where(valid, keys, jnp.int32(_INT_MIN))


def masked_topk_reference(scores, k, valid):
    """Plain-jnp reference: a stable descending sort of each row."""
    keys = _order_keys(scores, valid)
    order = jnp.argsort(~keys, axis=1, stable=True)  # ~ reverses int32 order without overflow
    rank = jnp.argsort(order, axis=1)
    return (rank < k[:, None]) & valid


def _select_rows(keys, k, n: int):
    """Threshold search on a block of rows. keys [r, n] int32, k [r, 1] int32 -> keep [r, n] bool."""
    sign = jnp.int32(_INT_MIN)

    def value_bit(i, prefix):
        bit = 31 - i
        cand = prefix | jnp.left_shift(jnp.int32(1), bit)  # unsigned bit pattern, held in int32
        count = jnp.sum((keys >= (cand ^ sign)).astype(jnp.int32), axis=1, keepdims=True)
        return jnp.where(count >= k, cand, prefix)

    prefix = jax.lax.fori_loop(0, 32, value_bit, jnp.zeros_like(k))
    threshold = prefix ^ sign  # the k-th largest key (signed)
    greater = keys > threshold
    need = k - jnp.sum(greater.astype(jnp.int32), axis=1, keepdims=True)
    equal = keys == threshold
    idx = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    n_bits = max(1, (n - 1).bit_length() + 1)

    def index_bit(i, m):
        cand = m | jnp.left_shift(jnp.int32(1), n_bits - 1 - i)
        count = jnp.sum((equal & (idx < cand)).astype(jnp.int32), axis=1, keepdims=True)
        return jnp.where(count <= need, cand, m)

    m = jax.lax.fori_loop(0, n_bits, index_bit, jnp.zeros_like(k))
    return greater | (equal & (idx < m))


def _kernel(keys_ref, k_ref, valid_ref, out_ref, *, n: int):
    k = jnp.max(k_ref[...], axis=1, keepdims=True)  # every lane holds the row's k (no slicing on Triton)
    keep = _select_rows(keys_ref[...], k, n)
    out_ref[...] = (keep & (valid_ref[...] != 0)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def masked_topk_pallas(scores, k, valid, *, block_rows: int = 8, interpret=False):
    r, n = scores.shape
    n_pad = max(128, 1 << (n - 1).bit_length())  # a power of two: Triton blocks need it, TPU lanes too
    r_pad = -(-r // block_rows) * block_rows
    keys = _order_keys(scores, valid)
    keys = jnp.pad(keys, ((0, r_pad - r), (0, n_pad - n)), constant_values=_INT_MIN)
    valid_i = jnp.pad(valid.astype(jnp.int32), ((0, r_pad - r), (0, n_pad - n)))
    k2 = jnp.pad(k.astype(jnp.int32), (0, r_pad - r)).reshape(r_pad, 1)
    k2 = jnp.broadcast_to(k2, (r_pad, 128))  # lane-dense on TPU; every lane holds the row's k
    row_block = lambda i: (i, 0)
    out = pl.pallas_call(
        functools.partial(_kernel, n=n_pad),
        grid=(r_pad // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, n_pad), row_block), pl.BlockSpec((block_rows, 128), row_block),
                  pl.BlockSpec((block_rows, n_pad), row_block)],
        out_specs=pl.BlockSpec((block_rows, n_pad), row_block),
        out_shape=jax.ShapeDtypeStruct((r_pad, n_pad), jnp.int32),
        interpret=interpret,
    )(keys, k2, valid_i)
    return out[:r, :n] != 0


def masked_topk(scores, k, valid, *, implementation: Literal["pallas", "xla"] = "xla", interpret=False):
    """Keep-mask [R, N] of each row's top-k valid entries (see module docstring)."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [R, N], got shape {scores.shape}")
    if valid.shape != scores.shape:
        raise ValueError(f"valid must have the shape of scores {scores.shape}, got {valid.shape}")
    if k.shape != scores.shape[:1]:
        raise ValueError(f"k must be [R] = {scores.shape[:1]}, got {k.shape}")
    if implementation == "pallas":
        return masked_topk_pallas(scores, k, valid, interpret=interpret)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return masked_topk_reference(scores, k, valid)
