"""Keep-mask of the k largest valid entries of each row, with a per-row k.

    masked_topk(scores [R, N] f32, k [R] int32, valid [R, N] bool) -> keep [R, N] bool

Ties are broken by position (lower index first), as `lax.top_k` orders them; k <= 0 keeps nothing,
k >= the row's valid count keeps every valid entry; NaN counts as -inf; invalid entries are never
kept.

The Pallas kernel cannot sort (no Pallas backend lowers sort or top_k), so it searches the k-th
largest value bit by bit: floats map to order-preserving int32 keys, 32 passes of compare + count
fix the threshold's bits from the top, and a second search over index bits keeps the first
(k - #greater) entries equal to the threshold (skipped when no row of the block needs it, i.e. no
row has more entries equal to its threshold than it may keep). Only compares, reductions and bit
operations: it lowers on TPU (Mosaic) and GPU (Triton). The wrapper pads N to a power of two >= 128
(padding keys are INT_MIN, like invalid entries, and never kept).

Layouts: `backend="gpu"` runs one row per program and reads the row in 8192-column chunks in every
pass; `backend="tpu"` runs 8 rows per program over whole rows held in VMEM. `backend=None` picks
"gpu" on a GPU and "tpu" elsewhere (so CPU interpret mode and TPU export see the TPU layout).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

_INT_MIN = -(2**31)


def _order_keys(scores, valid):
    """float32 -> int32 with the same order; NaN as -inf; invalid = INT_MIN, below every valid key
    (the smallest valid key, -inf's, is 0x807FFFFF). -0.0 sorts just below +0.0."""
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


def _row_sums(keys_ref, fn, rows: int, n: int, chunk: int):
    """sum over the columns of fn(keys chunk [rows, chunk], column index [rows, chunk]) -> [rows, 1]."""

    def one(c, acc):
        off = c * chunk
        x = keys_ref[:, pl.ds(off, chunk)]
        idx = off + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
        return acc + jnp.sum(fn(x, idx).astype(jnp.int32), axis=1, keepdims=True)

    zero = jnp.zeros((rows, 1), jnp.int32)
    if n == chunk:
        return one(0, zero)
    return jax.lax.fori_loop(0, n // chunk, one, zero)


def _kernel(keys_ref, k_ref, out_ref, *, n: int, chunk: int, skip_ties: bool = True):
    """Threshold search on a block of rows. keys [r, n] int32 (invalid = INT_MIN), k [r, 128] int32
    (every lane holds the row's k: no lane slicing, which Triton rejects) -> keep [r, n] int32.

    Every pass reads the keys block in column chunks of `chunk` (the whole row on TPU, where the
    block sits in VMEM; a few thousand lanes on GPU, where the row stays in L1/L2)."""
    rows = keys_ref.shape[0]
    k = jnp.max(k_ref[...], axis=1, keepdims=True)
    sign = jnp.int32(_INT_MIN)

    def value_bit(i, prefix):  # prefix: the threshold's top bits found so far, as an unsigned pattern
        cand = prefix | jnp.left_shift(jnp.int32(1), 31 - i)
        thr = cand ^ sign
        count = _row_sums(keys_ref, lambda x, _: x >= thr, rows, n, chunk)
        return jnp.where(count >= k, cand, prefix)

    threshold = jax.lax.fori_loop(0, 32, value_bit, jnp.zeros((rows, 1), jnp.int32)) ^ sign  # k-th largest key
    n_greater = _row_sums(keys_ref, lambda x, _: x > threshold, rows, n, chunk)
    n_equal = _row_sums(keys_ref, lambda x, _: x == threshold, rows, n, chunk)
    need = k - n_greater  # how many entries equal to the threshold to keep, lowest index first
    take_all = need >= n_equal
    n_bits = max(1, n.bit_length())

    def index_bit(i, m):  # the largest m with #(equal & idx < m) <= need, bit by bit
        cand = m | jnp.left_shift(jnp.int32(1), n_bits - 1 - i)
        count = _row_sums(keys_ref, lambda x, idx: (x == threshold) & (idx < cand), rows, n, chunk)
        return jnp.where(count <= need, cand, m)

    # ties at the threshold are rare for real scores: skip the index search when no row needs it
    # (jnp.any has no Triton lowering; a reduction result must be reshaped to a true scalar there)
    any_ties = jnp.max(jnp.where(take_all, 0, 1).astype(jnp.int32).reshape(-1), axis=0)
    trips = any_ties * jnp.int32(n_bits) if skip_ties else n_bits
    m = jax.lax.fori_loop(0, trips, index_bit, jnp.zeros((rows, 1), jnp.int32))

    def write(c, carry):
        off = c * chunk
        x = keys_ref[:, pl.ds(off, chunk)]
        idx = off + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
        keep = (x > threshold) | ((x == threshold) & (take_all | (idx < m)))
        out_ref[:, pl.ds(off, chunk)] = (keep & (x != sign)).astype(jnp.int32)
        return carry

    if n == chunk:
        write(0, 0)
    else:
        jax.lax.fori_loop(0, n // chunk, write, 0)


@functools.partial(jax.jit, static_argnames=("block_rows", "chunk", "interpret", "backend"))
def masked_topk_pallas(scores, k, valid, *, block_rows: int | None = None, chunk: int | None = None, interpret=False,
                       backend: str | None = None):
    """The Pallas kernel; arguments as `masked_topk`. GPU: one row per program, each pass over the
    row in chunks of 8192 columns (measured best on an H100 among 1024 / 4096 / 8192); TPU: 8 rows
    per program, whole rows in VMEM (the keys and output blocks, double-buffered, take 64 * N
    bytes: rows up to ~128K entries fit a 16 MiB scoped VMEM)."""
    gpu = _common.default_backend_kind(backend) == "gpu"
    r, n = scores.shape
    n_pad = max(128, 1 << (n - 1).bit_length())  # a power of two: Triton blocks need it, TPU lanes too
    block_rows = block_rows or (1 if gpu else 8)
    chunk = min(n_pad, chunk or (8192 if gpu else n_pad))
    r_pad = -(-r // block_rows) * block_rows
    keys = jnp.pad(_order_keys(scores, valid), ((0, r_pad - r), (0, n_pad - n)), constant_values=_INT_MIN)
    k2 = jnp.broadcast_to(jnp.pad(k.astype(jnp.int32), (0, r_pad - r))[:, None], (r_pad, 128))
    row_block = lambda i: (i, 0)
    out = pl.pallas_call(
        functools.partial(_kernel, n=n_pad, chunk=chunk, skip_ties=True),
        grid=(r_pad // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, n_pad), row_block), pl.BlockSpec((block_rows, 128), row_block)],
        out_specs=pl.BlockSpec((block_rows, n_pad), row_block),
        out_shape=jax.ShapeDtypeStruct((r_pad, n_pad), jnp.int32),
        interpret=interpret,
        name="masked_topk",
        **(_common.triton_kwargs(interpret) if gpu else {}),
    )(keys, k2)
    return out[:r, :n] != 0


def masked_topk(scores, k, valid, *, implementation: Literal["pallas", "xla"] = "xla", interpret=False,
                backend: Literal["gpu", "tpu"] | None = None):
    """Keep-mask [R, N] bool of each row's top-k valid entries (see module docstring).

    scores [R, N] float; k [R] int; valid [R, N] bool. `implementation`: "xla" (the sort-based
    reference) or "pallas"; `interpret`: False, True or a `pltpu.InterpretParams`; `backend`: which
    kernel layout ("gpu" or "tpu"; None = by `jax.default_backend()`)."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [R, N], got shape {scores.shape}")
    if valid.shape != scores.shape:
        raise ValueError(f"valid must have the shape of scores {scores.shape}, got {valid.shape}")
    if k.shape != scores.shape[:1] or not jnp.issubdtype(k.dtype, jnp.integer):
        raise ValueError(f"k must be an integer [R] = {scores.shape[:1]} array, got {k.dtype}{list(k.shape)}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be bool, got {valid.dtype}")
    if implementation == "pallas":
        return masked_topk_pallas(scores, k, valid, interpret=interpret, backend=backend)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return masked_topk_reference(scores, k, valid)
