"""Decode attention of one query per sequence over the streams of a pooled KV cache.

    ragged_decode_attention(q [B, H, G, D], k_pool [B, P, D], v_pool [B, P, D],
                            start [B, H] int32, length [B, H] int32, *, sm_scale,
                            pos [B, P] int32 = None, min_pos [B] int32 = None) -> out [B, H, G, D]

Stream (b, h) is the slots `[start[b,h], start[b,h] + length[b,h])` of `k_pool[b]` / `v_pool[b]`;
the G query heads of KV head h (its GQA group) share it. Optional `pos [B, P]` and `min_pos [B]`
hide slots whose original position is below `min_pos[b]` (sliding-window models). An empty stream
(length 0, or every slot hidden) gives zeros. The output has q's dtype; softmax and accumulation
are float32. Callers guarantee `0 <= start` and `start + length <= P`.

The kernel is flash-decoding: a grid over (sequence, KV head, split); each program walks its share
of the stream in blocks of `block_kv` slots with an online softmax (running max, sum, accumulator),
reading only the stream's own slots, and the splits are merged by log-sum-exp in XLA. The G query
heads of a group form one [G', D] operand (G padded to G' = max(16, next power of two)) so every
K/V block is read once per group. Split and block boundaries are aligned to 16 slots from the
stream's first slot rounded down; a block that would run past the pool is shifted back to end at P
and the slots it re-reads are masked by index, so the pool is never padded or copied.

Two kernels share that plan:
- GPU (Pallas lowered through Triton): the pools are whole-array refs (no copy on Triton) read
  with dynamic `pl.ds` slices inside the loop; Triton software-pipelines the loop.
- TPU (Mosaic): the pools stay in HBM (`pl.ANY`); start/length/min_pos arrive as scalar prefetch;
  each program double-buffers its K/V (and pos) blocks into VMEM with `pltpu.make_async_copy`.
  DMA windows start on whole tiles: blocks start at multiples of 16 slots (of 128 with `pos`, whose
  windows are lane slices), so P must be a multiple of 16 (128 with `pos`); otherwise the wrapper
  pads the pools, which copies them: allocate pools with aligned P.
Policies that evict while decoding also need the new query's attention probabilities over each stream.
`stream_logits=W` returns every query head's logits per stream offset, logits [B, H, G, W] (offset j =
slot start + j; the new token at offset `length` with `append`): the GPU kernel stores the logits it
computes anyway (a few bytes per slot, no second read of the keys); elsewhere an XLA gather of the
streams' keys computes them (`stream_logits_reference`). With the log-sum-exp (`return_lse`) they give
the probabilities the attention used. `backend=None` picks the GPU kernel when `jax.default_backend() ==
"gpu"` and the TPU kernel otherwise (so `jax.export(..., platforms=["tpu"])` on a CPU host checks the
TPU lowering). Both kernels run on CPU in interpret mode.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from . import _common
from .ragged_decode_checks import check_arguments

_NEG = -1e30  # finite: exp(_NEG - m) underflows to 0 without producing NaN
_ALIGN = 16


def dense_stream_logits(q, k_pool, start, length, *, sm_scale: float, pos=None, min_pos=None):
    """Every query head's logits over the whole pool and which slots it may see (its stream, minus
    slots with pos < min_pos): (logits [B, H, G, P] float32, visible [B, H, P] bool). The dense
    references of this module and of stream_probs start here."""
    p = k_pool.shape[1]
    s = jnp.arange(p)[None, None, :]
    mask = (s >= start[..., None]) & (s < (start + length)[..., None])  # [B, H, P]
    if min_pos is not None:
        mask &= (pos >= min_pos[:, None])[:, None, :]
    logits = jnp.einsum("bhgd,bpd->bhgp", q.astype(jnp.float32), k_pool.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * sm_scale
    return logits, mask


def ragged_decode_attention_reference(q, k_pool, v_pool, start, length, *, sm_scale: float, pos=None, min_pos=None):
    """Masked dense softmax over the whole pool (reads every slot; for tests and as the XLA path).

    Slots outside every stream must hold finite values (0 * inf would leak NaN into the sum)."""
    logits, mask = dense_stream_logits(q, k_pool, start, length, sm_scale=sm_scale, pos=pos, min_pos=min_pos)
    logits = jnp.where(mask[:, :, None], logits, _NEG)
    probs = jnp.where(mask[:, :, None], jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bhgp,bpd->bhgd", probs, v_pool.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)


def stream_log_sum_exp(q, k_pool, start, length, *, sm_scale: float, pos=None, min_pos=None):
    """lse [B, H, G] float32 of each query head's logits over its stream (+inf if empty): the dense
    reference of `return_lse`."""
    logits, mask = dense_stream_logits(q, k_pool, start, length, sm_scale=sm_scale, pos=pos, min_pos=min_pos)
    lse = jax.nn.logsumexp(jnp.where(mask[:, :, None], logits, -jnp.inf), axis=-1)
    return jnp.where(jnp.isfinite(lse), lse, jnp.inf)


def stream_logits_reference(q, k_pool, start, length, *, sm_scale: float, width: int, pos=None, min_pos=None):
    """logits [B, H, G, W] float32 of each query head on offset j of its stream (slot start + j) for
    j < length; `_NEG` where hidden by pos < min_pos and past the stream's end. The XLA path of
    `stream_logits=W`: gathers each stream's first W keys."""
    b, p, _ = k_pool.shape
    offs = jnp.arange(width)
    idx = jnp.minimum(start[..., None] + offs, p - 1)  # [B, H, W]
    rows = jnp.arange(b)[:, None, None]
    visible = offs < length[..., None]
    if min_pos is not None:
        visible &= pos[rows, idx] >= min_pos[:, None, None]
    logits = jnp.einsum("bhgd,bhwd->bhgw", q.astype(jnp.float32), k_pool[rows, idx].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * sm_scale
    return jnp.where(visible[:, :, None], logits, _NEG)


# ---------------------------------------------------------------------------------------------
# shared pieces of both kernels


def _split_plan(start, length, split, *, num_splits: int, block_kv: int, align: int = _ALIGN):
    """Slots [lo, hi) of this split, the first block's slot `base` (a multiple of `align`, a power of
    two dividing block_kv), and the block count."""
    start_a = start - (start & (align - 1))
    span = length + (start - start_a)
    per_split = _cdiv(_cdiv(span, num_splits), block_kv) * block_kv
    base = start_a + split * per_split
    lo = jnp.maximum(start, base)
    hi = jnp.minimum(start + length, base + per_split)
    n_blocks = jnp.where(hi > lo, _cdiv(jnp.maximum(hi - base, 0), block_kv), 0)
    return base, lo, hi, n_blocks


def _cdiv(a, b: int):
    """Ceil division of a non-negative int32 scalar by a constant (lax.div truncates: no sign ops,
    which Mosaic cannot lower without a TPU at hand)."""
    return jax.lax.div(a + (b - 1), jnp.int32(b))


def _block_offset(base, i, *, block_kv: int, pool_size: int):
    """Block i's nominal first slot and the first slot actually read (shifted back inside the pool)."""
    off = base + i * block_kv
    return off, jnp.minimum(off, pool_size - block_kv)


def _block_masks(base, i, lo, hi, *, block_kv: int, pool_size: int):
    """Block i's first slot read and which of its slots belong to [max(off, lo), hi): as a row
    [1, blk] (for the logits) and as a column [blk, 1] (for the values)."""
    off, off_c = _block_offset(base, i, block_kv=block_kv, pool_size=pool_size)
    first = jnp.maximum(off, lo)
    row = off_c + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    col = off_c + jax.lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
    return off_c, (row >= first) & (row < hi), (col >= first) & (col < hi)


def _softmax_init(q_shape):
    """(running max, running sum, accumulator) before the first block. q_shape = [G, D]."""
    g = q_shape[0]
    return jnp.full((g, 1), _NEG, jnp.float32), jnp.zeros((g, 1), jnp.float32), jnp.zeros(q_shape, jnp.float32)


def _dot_precision(dtype):
    """f32 dots in f32 (IEEE on Triton, not TF32): "float32" means float32 results."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _block_logits(q, k, *, sm_scale: float):
    """q [G, D], k [blk, D] -> [G, blk] float32."""
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=_dot_precision(q.dtype)) * sm_scale


def _online_softmax_step(carry, s, v, row_valid, col_valid):
    """One block of the online softmax. s [G, blk] the block's logits; v [blk, D]; row_valid [1, blk];
    col_valid [blk, 1]."""
    m, l, acc = carry
    s = jnp.where(row_valid, s, _NEG)  # [G, blk]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(row_valid, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    v = jnp.where(col_valid, v, jnp.zeros_like(v))  # slots of other streams may hold anything
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=_dot_precision(v.dtype))
    return m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True), acc * alpha + pv


def _merge_splits(out, m, l, g: int, dtype):
    """Log-sum-exp merge of the splits. out [B, H, S, G', D], m and l [B, H, S, G', 1] -> [B, H, G, D]."""
    out, m, l = out[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.where(l > 0, jnp.exp(m - m_all), 0.0)  # splits that saw nothing weigh 0
    num = jnp.sum(out * w, axis=2)
    den = jnp.sum(l * w, axis=2)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0).astype(dtype)


def _log_sum_exp(m, l, g: int):
    """Each query head's log-sum-exp over its whole stream from the splits' (max, sum):
    m, l [B, H, S, G', 1] -> [B, H, G] float32 (+inf for an empty stream, so exp(s - lse) = 0)."""
    m, l = m[:, :, :, :g, 0], l[:, :, :, :g, 0]
    m_all = jnp.max(m, axis=2)
    total = jnp.sum(jnp.where(l > 0, l * jnp.exp(m - m_all[:, :, None]), 0.0), axis=2)
    return jnp.where(total > 0, m_all + jnp.log(jnp.where(total > 0, total, 1.0)), jnp.inf)


def _compute_dtype(*dtypes):
    return functools.reduce(jnp.promote_types, dtypes)


# ---------------------------------------------------------------------------------------------
# GPU (Triton) kernel


def _logits_pad(block_kv: int) -> int:
    """Columns before offset 0 of a stream in the GPU kernel's logits output: a block may start up
    to max(block_kv, alignment) slots before the stream (alignment, or shifted back at the pool's end)."""
    return max(block_kv, _ALIGN)


def _gpu_kernel(start_ref, len_ref, minpos_ref, q_ref, k_ref, v_ref, pos_ref, *rest, sm_scale, block_kv,
                num_splits, pool_size, use_pos, cdtype, normalize, append, write_pos, g, logits, layered):
    rest = list(rest)
    n_in = (3 + write_pos) if append else 0  # k_new, v_new, slot[, new_pos]
    new_refs = rest[:n_in]
    row = (rest[n_in][0],) if layered else ()  # start/length hold every layer: read this layer's row
    o_ref, m_ref, l_ref, *outs = rest[n_in + layered:]
    pools_out = outs[:n_in - 1] if append else []  # the aliased pools: k, v[, pos]
    lg_ref = rest[-1] if logits else None
    split = pl.program_id(2)
    start = start_ref[row + (0, 0)]
    length = len_ref[row + (0, 0)]
    base, lo, hi, n_blocks = _split_plan(start, length, split, num_splits=num_splits, block_kv=block_kv)
    q = q_ref[0, 0].astype(cdtype)  # [G', D]
    real_head = jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], 1), 0) < g
    pad = _logits_pad(block_kv)

    def body(i, carry):
        off_c, row_valid, col_valid = _block_masks(base, i, lo, hi, block_kv=block_kv, pool_size=pool_size)
        in_stream = row_valid
        k = k_ref[0, pl.ds(off_c, block_kv), :].astype(cdtype)
        v = v_ref[0, pl.ds(off_c, block_kv), :].astype(cdtype)
        if use_pos:
            row_valid &= pos_ref[0, pl.ds(off_c, block_kv)][None, :] >= minpos_ref[0, 0]
        s = _block_logits(q, k, sm_scale=sm_scale)
        if logits:  # the stream's offsets off_c - start + [0, blk), shifted by `pad` columns
            pltriton.store(lg_ref.at[:, pl.ds(off_c - start + pad, block_kv)], jnp.where(row_valid, s, _NEG),
                           mask=in_stream & real_head)
        return _online_softmax_step(carry, s, v, row_valid, col_valid)

    init = _softmax_init(q.shape)
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    if append:
        m, l, acc, s_new, include = _append_new_token(m, l, acc, q, new_refs, pools_out, split, sm_scale)
        if logits:  # the new token sits at offset `length` of its stream
            pltriton.store(lg_ref.at[:, pl.ds(length + pad, 1)], s_new, mask=include & real_head)
    if normalize:  # one split: the final output, in q's dtype (a quarter of the f32 partial's bytes)
        o_ref[0, 0, 0] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
    else:
        o_ref[0, 0, 0] = acc
    m_ref[0, 0, 0] = m
    l_ref[0, 0, 0] = l


def _append_new_token(m, l, acc, q, new_refs, pools_out, split, sm_scale):
    """Split 0 of a stream writes the new key/value (and with `new_pos`, the sequence's new position) at its
    slot (the pools are aliased in and out) and adds the new token to its softmax from registers. No program
    reads that slot from the pool (streams are passed without it), so the write races with nothing that
    matters: a block that over-reads it masks it by index.
    Returns (m, l, acc, the new token's logits [G', 1], included)."""
    kn_ref, vn_ref, slot_ref, *npos_ref = new_refs
    slot = slot_ref[0, 0]
    include = (split == 0) & (slot >= 0)
    kn = kn_ref[0]  # [1, D]
    vn = vn_ref[0]

    @pl.when(include)
    def _():
        ko_ref, vo_ref, *po_ref = pools_out
        ko_ref[0, pl.ds(slot, 1), :] = kn.astype(ko_ref.dtype)
        vo_ref[0, pl.ds(slot, 1), :] = vn.astype(vo_ref.dtype)
        if po_ref:
            po_ref[0][0, pl.ds(slot, 1)] = jnp.full((1,), npos_ref[0][0, 0], po_ref[0].dtype)

    s_new = jnp.sum(q.astype(jnp.float32) * kn.astype(jnp.float32), axis=1, keepdims=True) * sm_scale  # [G', 1]
    m_new = jnp.where(include, jnp.maximum(m, s_new), m)
    p = jnp.where(include, jnp.exp(s_new - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, l * alpha + p, acc * alpha + p * vn.astype(jnp.float32), s_new, include


def _gpu_call(qp, k_pool, v_pool, start, length, pos, min_pos, new=None, layer=None, *, sm_scale, block_kv,
              num_splits, use_pos, interpret, num_warps, num_stages, g, logits_width=None, raw_logits=False):
    b, h, gp, d = qp.shape
    p = k_pool.shape[1]
    block_kv = _gpu_block_kv(block_kv, p)
    cdtype = _compute_dtype(qp.dtype, k_pool.dtype, v_pool.dtype)
    normalize = num_splits == 1
    append = new is not None
    write_pos = append and len(new) == 4  # (k_new, v_new, slot, new_pos): `pos` is the pool to write
    logits = logits_width is not None
    kernel = functools.partial(_gpu_kernel, sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits,
                               pool_size=p, use_pos=use_pos, cdtype=cdtype, normalize=normalize, append=append,
                               write_pos=write_pos, g=g, logits=logits, layered=layer is not None)
    scalar = pl.BlockSpec((1, 1), lambda i, j, s: (i, j))
    # start/length [L, B, H] with `layer`: each program gets its stream's column of every layer and reads
    # one row, so no per-layer slice of them is materialised before the call
    streams = scalar if layer is None else pl.BlockSpec((start.shape[0], 1, 1), lambda i, j, s: (0, i, j))
    per_seq = lambda shape: pl.BlockSpec((1,) + shape, lambda i, j, s: (i,) + (0,) * len(shape))
    part = lambda last: pl.BlockSpec((1, 1, 1, gp, last), lambda i, j, s: (i, j, s, 0, 0))
    in_specs = [streams, streams, pl.BlockSpec((1, 1), lambda i, j, s: (i, 0)),
                pl.BlockSpec((1, 1, gp, d), lambda i, j, s: (i, j, 0, 0)),
                per_seq((p, d)), per_seq((p, d)),
                per_seq((p,)) if use_pos or write_pos else pl.BlockSpec((1, 1), lambda i, j, s: (i, 0))]
    out_specs = [part(d), part(1), part(1)]
    out_shape = [jax.ShapeDtypeStruct((b, h, num_splits, gp, d), qp.dtype if normalize else jnp.float32),
                 jax.ShapeDtypeStruct((b, h, num_splits, gp, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, num_splits, gp, 1), jnp.float32)]
    extra, aliases = (), {}
    if append:
        row = pl.BlockSpec((1, 1, d), lambda i, j, s: (i, j, 0))
        in_specs += [row, row, scalar] + [pl.BlockSpec((1, 1), lambda i, j, s: (i, 0))] * write_pos
        out_specs += [per_seq((p, d)), per_seq((p, d))] + [per_seq((p,))] * write_pos
        out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_pool, v_pool, pos)[:2 + write_pos]]
        extra = new[:3] + ((new[3].reshape(b, 1),) if write_pos else ())
        aliases = {4: 3, 5: 4, 6: 5} if write_pos else {4: 3, 5: 4}  # the pools are updated in place
    if layer is not None:
        in_specs.append(pl.BlockSpec((1,), lambda i, j, s: (0,)))
        extra += (jnp.asarray(layer, jnp.int32).reshape(1),)
    if logits:  # per stream: `pad` columns, the W offsets, one block of slack; never initialised
        cols = _logits_pad(block_kv) + logits_width + block_kv
        out_specs.append(pl.BlockSpec((None, None, gp, cols), lambda i, j, s: (i, j, 0, 0)))  # [G', cols] per program
        out_shape.append(jax.ShapeDtypeStruct((b, h, gp, cols), jnp.float32))
    res = pl.pallas_call(
        kernel,
        grid=(b, h, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="ragged_decode_attention_gpu",
        **_common.triton_kwargs(interpret, num_warps, num_stages),
    )(start, length, min_pos.reshape(b, 1), qp, k_pool, v_pool, pos, *extra)
    if logits and not raw_logits:  # the defined part: a copy of [B, H, G, W] (raw: the buffer itself)
        pad = _logits_pad(block_kv)
        res = list(res[:-1]) + [res[-1][:, :, :g, pad:pad + logits_width]]
    return res


def _gpu_block_kv(block_kv: int, p: int) -> int:  # a power of two no larger than the pool
    return min(block_kv, 1 << (p.bit_length() - 1))


def stream_logits_column(p: int, block_kv: int) -> int:
    """Column of a stream's offset 0 in the GPU kernel's raw logits buffer (`raw_stream_logits`), pool
    of `p` slots, the kernel's `block_kv`; the columns before it and the block after W are unspecified."""
    return _logits_pad(_gpu_block_kv(block_kv, p))


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic) kernel: pools in HBM, manual double-buffered DMA


def _tpu_kernel(start_s, len_s, minpos_s, q_ref, k_hbm, v_hbm, *rest, sm_scale, block_kv, num_splits, pool_size,
                num_heads, use_pos, cdtype, align, dma_align):
    if use_pos:
        pos_hbm, o_ref, m_ref, l_ref, k_buf, v_buf, pos_buf, sem = rest
    else:
        o_ref, m_ref, l_ref, k_buf, v_buf, sem = rest
        pos_hbm = pos_buf = None
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = start_s[b * num_heads + h]
    length = len_s[b * num_heads + h]
    min_pos = minpos_s[b]
    base, lo, hi, n_blocks = _split_plan(start, length, split, num_splits=num_splits, block_kv=block_kv, align=align)

    def copies(i, slot):
        _, off_c = _block_offset(base, i, block_kv=block_kv, pool_size=pool_size)
        off_c = pl.multiple_of(off_c, dma_align)  # whole (8|16, 128) tiles of the pool (128 lanes of pos)
        out = [pltpu.make_async_copy(k_hbm.at[b, pl.ds(off_c, block_kv), :], k_buf.at[slot], sem.at[0, slot]),
               pltpu.make_async_copy(v_hbm.at[b, pl.ds(off_c, block_kv), :], v_buf.at[slot], sem.at[1, slot])]
        if use_pos:
            out.append(pltpu.make_async_copy(pos_hbm.at[b, :, pl.ds(off_c, block_kv)], pos_buf.at[slot],
                                             sem.at[2, slot]))
        return out

    @pl.when(n_blocks > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    q = q_ref[0, 0].astype(cdtype)  # [G', D]

    def body(i, carry):
        slot = i & 1

        @pl.when(i + 1 < n_blocks)
        def _():
            for c in copies(i + 1, 1 - slot):
                c.start()

        for c in copies(i, slot):
            c.wait()
        off_c, row_valid, col_valid = _block_masks(base, i, lo, hi, block_kv=block_kv, pool_size=pool_size)
        if use_pos:
            row_valid &= pos_buf[slot] >= min_pos  # [1, blk]
        k = k_buf[slot].astype(cdtype)
        v = v_buf[slot].astype(cdtype)
        return _online_softmax_step(carry, _block_logits(q, k, sm_scale=sm_scale), v, row_valid, col_valid)

    init = _softmax_init(q.shape)
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[0, 0, 0] = acc
    m_ref[0, 0, 0] = jnp.broadcast_to(m, m_ref.shape[3:])  # lane-dense: 128 copies of each value
    l_ref[0, 0, 0] = jnp.broadcast_to(l, l_ref.shape[3:])


def _tpu_call(qp, k_pool, v_pool, start, length, pos, min_pos, *, sm_scale, block_kv, num_splits, use_pos,
              interpret):
    b, h, gp, d = qp.shape
    # DMA windows along P start on whole sublane tiles of the pool (16 rows covers 2- and 4-byte
    # values) and, with pos, on whole 128-lane tiles of pos.
    align = dma_align = 128 if use_pos else _ALIGN
    p = k_pool.shape[1]
    p_pad = -(-p // dma_align) * dma_align
    if p_pad != p:  # P not tile-aligned: pad (this copies the pools; allocate them aligned instead)
        k_pool = jnp.pad(k_pool, ((0, 0), (0, p_pad - p), (0, 0)))
        v_pool = jnp.pad(v_pool, ((0, 0), (0, p_pad - p), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, p_pad - p)))
    block_kv = min(max(align, block_kv // align * align), p_pad)
    cdtype = _compute_dtype(qp.dtype, k_pool.dtype, v_pool.dtype)
    kernel = functools.partial(_tpu_kernel, sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits,
                               pool_size=p_pad, num_heads=h, use_pos=use_pos, cdtype=cdtype, align=align,
                               dma_align=dma_align)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    part = lambda last: pl.BlockSpec((1, 1, 1, gp, last), lambda i, j, s, *_: (i, j, s, 0, 0))
    scratch = [pltpu.VMEM((2, block_kv, d), k_pool.dtype), pltpu.VMEM((2, block_kv, d), v_pool.dtype)]
    if use_pos:
        scratch.append(pltpu.VMEM((2, 1, block_kv), jnp.int32))
    scratch.append(pltpu.SemaphoreType.DMA((3, 2)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, h, num_splits),
        in_specs=[pl.BlockSpec((1, 1, gp, d), lambda i, j, s, *_: (i, j, 0, 0)), hbm, hbm] + ([hbm] if use_pos else []),
        out_specs=[part(d), part(128), part(128)],
        scratch_shapes=scratch,
    )
    out, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, h, num_splits, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, num_splits, gp, 128), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, num_splits, gp, 128), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="ragged_decode_attention_tpu",
    )(start.reshape(-1), length.reshape(-1), min_pos, qp, k_pool, v_pool, *([pos.reshape(b, 1, p_pad)] if use_pos else []))
    return out, m[..., :1], l[..., :1]


# ---------------------------------------------------------------------------------------------
# public entry points


def default_block_kv(backend: str) -> int:
    """Slots per loop step: 32 on GPU (the fastest at batch 1, 32 and 408 in
    benchmarks/results/decode_tuning_h100.md), 128 on TPU (whole lane tiles)."""
    return 32 if backend == "gpu" else 128


def default_num_splits(batch: int, heads: int, pool_size: int, block_kv: int, skewed: bool = False) -> int:
    """About one program per streaming multiprocessor (~128 programs), but no split shorter than ~2
    blocks of an average stream. More splits only add partial outputs to merge: on an H100 one split
    was fastest once batch x heads >= 256, eight at batch 1 (decode_tuning_h100.md).

    skewed: stream lengths differ within a layer (Ada-KV's per-head budgets). The kernel lasts as
    long as its longest program, and a head may hold several times the mean, so aim at 8x the
    programs (measured at batch 32, 1024 tokens/head: one split made Ada-KV 23% slower than uniform)."""
    per_stream = max(1, pool_size // max(1, heads))
    want = -(-(1024 if skewed else 128) // max(1, batch * heads))
    return int(max(1, min(want, per_stream // (2 * block_kv), 32)))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_kv", "num_splits", "interpret", "backend",
                                             "num_warps", "num_stages", "return_lse", "stream_logits",
                                             "raw_stream_logits"))
def ragged_decode_attention_pallas(q, k_pool, v_pool, start, length, pos=None, min_pos=None, append=None,
                                   append_pos=None, layer=None, *,
                                   sm_scale: float, block_kv: int | None = None, num_splits: int | None = None,
                                   interpret=False, backend: str | None = None, num_warps: int | None = None,
                                   num_stages: int | None = None, return_lse: bool = False,
                                   stream_logits: int | None = None, raw_stream_logits: bool = False):
    """The Pallas kernel (see module docstring); arguments as `ragged_decode_attention`."""
    b, h, g, d = q.shape
    p = k_pool.shape[1]
    backend = _common.default_backend_kind(backend)
    if layer is not None and backend != "gpu":  # only the GPU kernel reads the row itself
        start, length, layer = start[layer], length[layer], None
    if block_kv is None:
        block_kv = default_block_kv(backend)
    if num_splits is None:
        num_splits = default_num_splits(b, h, p, block_kv)
    gp = max(16, 1 << (g - 1).bit_length())  # Triton dots need M >= 16; Mosaic likes full sublane tiles
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    use_pos = min_pos is not None
    pos_arr = (append_pos[0] if append_pos is not None and backend == "gpu"  # read and written: one aliased operand
               else pos.astype(jnp.int32) if use_pos else jnp.zeros((b, 1), jnp.int32))  # unused: no [B, P] fill
    minpos = min_pos.astype(jnp.int32) if use_pos else jnp.zeros((b,), jnp.int32)
    args = (qp, k_pool, v_pool, start.astype(jnp.int32), length.astype(jnp.int32), pos_arr, minpos)
    kw = dict(sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits, use_pos=use_pos, interpret=interpret)
    logits = ()
    if backend == "gpu":
        new = None
        if append is not None:
            k_new, v_new, slot = append
            new = (k_new.astype(k_pool.dtype), v_new.astype(v_pool.dtype), slot.astype(jnp.int32))
            new += () if append_pos is None else (append_pos[1].astype(jnp.int32),)
        res = _gpu_call(*args, new, layer, **kw, num_warps=num_warps, num_stages=num_stages, g=g,
                        logits_width=stream_logits, raw_logits=raw_stream_logits)
        out, m, l = res[:3]
        # the kernel normalised a single split itself
        out = out[:, :, 0, :g] if num_splits == 1 else _merge_splits(out, m, l, g, q.dtype)
        pools = () if append is None else tuple(res[3:5 if append_pos is None else 6])
        if stream_logits is not None:
            logits = (res[-1],)
    else:
        if raw_stream_logits:
            raise ValueError("raw_stream_logits: only the GPU kernel stores the logits (backend 'gpu')")
        n_after = length
        if append is not None:
            k_pool, v_pool, pos_w, n_after = _common.append_tokens(k_pool, v_pool, length, append, append_pos)
            pos, pos_arr = (pos_w, pos_w) if pos_w is not None and use_pos else (pos, pos_arr)  # read from the pool
            args = (qp, k_pool, v_pool, start.astype(jnp.int32), n_after.astype(jnp.int32), pos_arr, minpos)
        out, m, l = _tpu_call(*args, **kw)
        out = _merge_splits(out, m, l, g, q.dtype)
        pools = () if append is None else (k_pool, v_pool) + (() if pos_w is None else (pos_w,))
        if stream_logits is not None:  # the Mosaic kernel does not store them: gather the streams' keys
            logits = (stream_logits_reference(q, k_pool, start, n_after, sm_scale=sm_scale, width=stream_logits,
                                              pos=pos, min_pos=min_pos),)
    extra = pools + ((_log_sum_exp(m, l, g),) if return_lse else ()) + logits
    return (out,) + extra if extra else out


def ragged_decode_attention(q, k_pool, v_pool, start, length, *, sm_scale: float, min_pos=None, pos=None,
                            implementation: Literal["pallas", "xla"] = "xla", interpret=False,
                            block_kv: int | None = None, num_splits: int | None = None,
                            backend: Literal["gpu", "tpu"] | None = None, append=None, append_pos=None,
                            return_lse: bool = False, stream_logits: int | None = None,
                            raw_stream_logits: bool = False, layer=None):
    """Attention of each group's G query heads over its stream. Returns out [B, H, G, D] (q's dtype).

    q [B, H, G, D]; k_pool, v_pool [B, P, D]; start, length [B, H] int; pos [B, P] int and min_pos [B]
    int (together, or neither). `implementation="xla"` is the dense reference; "pallas" the
    flash-decoding kernel with `block_kv` slots per step (default 32 on GPU, 128 on TPU) and
    `num_splits` programs per stream (default: `default_num_splits`). `interpret`: False, True or a
    `pltpu.InterpretParams`. `backend`: which kernel ("gpu" Triton, "tpu" Mosaic; None = by the
    default backend).

    `append = (k_new [B, H, D], v_new [B, H, D], slot [B, H] int)`: first write each stream's new token at
    `slot` (= start + length; -1 writes nothing) and attend over the stream with it; returns (out, k_pool,
    v_pool). The new token is always visible (with `pos`, it must be the newest position, as in a decode
    step). The GPU kernel writes it itself, in place, from registers; elsewhere an XLA scatter runs first.
    `append_pos = (pos_pool [B, P] int32, new_pos [B] int)` (with `append`): also write each sequence's
    new position at its streams' slots in pos_pool, returned after v_pool (`pos`, if given, must be
    this pool); the GPU kernel writes it too, so a decode step launches no scatter.
    `return_lse`: also return each query head's log-sum-exp over its stream, lse [B, H, G] float32
    (+inf for an empty stream). `stream_logits=W`: also return logits [B, H, G, W] float32, each
    query head's scaled q.k at offset j of its stream (with `append`, the new token at offset
    `length`); only offsets inside the stream (after the append) are defined, hidden ones hold a
    large negative value, the rest is unspecified. The last returned, after lse. `raw_stream_logits` (GPU
    kernel only): its own buffer, no copy: [B, H, G', C], offset j at `stream_logits_column(P, block_kv) + j`.
    `layer` (int scalar): start and length are every layer's, [L, B, H], and the call uses row `layer`;
    the GPU kernel reads it in place, so a layer loop copies no [B, H] row out per layer."""
    check_arguments(q, k_pool, v_pool, start, length, pos, min_pos, append, append_pos, layer)
    if implementation == "pallas":
        return ragged_decode_attention_pallas(q, k_pool, v_pool, start, length, pos, min_pos, append, append_pos,
                                              sm_scale=sm_scale, block_kv=block_kv, num_splits=num_splits,
                                              interpret=interpret, backend=backend, return_lse=return_lse,
                                              stream_logits=stream_logits, raw_stream_logits=raw_stream_logits,
                                              layer=layer)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    if raw_stream_logits:
        raise ValueError("raw_stream_logits: only the Pallas GPU kernel stores the logits")
    if layer is not None:
        start, length = start[layer], length[layer]
    pos_w = None
    if append is not None:
        k_pool, v_pool, pos_w, length = _common.append_tokens(k_pool, v_pool, length, append, append_pos)
        pos = pos if pos is None or pos_w is None else pos_w
    out = ragged_decode_attention_reference(q, k_pool, v_pool, start, length, sm_scale=sm_scale, pos=pos,
                                            min_pos=min_pos)
    extra = (() if append is None else (k_pool, v_pool)) + (() if pos_w is None else (pos_w,)) + (
        (stream_log_sum_exp(q, k_pool, start, length, sm_scale=sm_scale, pos=pos, min_pos=min_pos),) if return_lse else ())
    if stream_logits is not None:
        extra += (stream_logits_reference(q, k_pool, start, length, sm_scale=sm_scale, width=stream_logits, pos=pos,
                                          min_pos=min_pos),)
    return (out,) + extra if extra else out

