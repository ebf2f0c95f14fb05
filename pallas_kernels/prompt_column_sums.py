"""Column sums of a prompt's causal attention, without the [T, T] matrix in memory.

    prompt_column_sums(q [B, KV, G, T, D], k [B, KV, T, D], lengths [B], *, scale,
                       sliding_window=None, column_squares=False, group_reduce="mean")
        -> colsum [B, KV, G, T] float32                      (and colsq [B, KV, T] with column_squares)

colsum[b, kv, g, j] = sum over valid queries t of softmax_t(q[b, kv, g, t] . k[b, kv] * scale)[j]:
the attention key j received (H2O's accumulated attention). colsq[b, kv, j] = sum over t of
(reduce_g a[g, t, j])^2 (RoCo's robustness; reduce = mean or max over the GQA group). Causal,
right-padded prompts (`lengths`), an optional sliding window. The attention output itself comes
from a flash kernel (cuDNN) beside this: these sums need only the logits.

GPU kernels (Pallas lowered through Triton), passes over the logits:
1. `_lse_kernel`: grid (sequence, KV head, query block); the G query heads of the group walk the
   key blocks up to the diagonal with a running max and sum: each query's log-sum-exp [B, KV, G, T].
   Skipped when the caller has the log-sum-exp already (`lse=`: cuDNN's flash attention returns it,
   `kvjax.models.prompt_attention.fused_causal_attention(..., return_lse=True)`).
2. `_colsum_head_kernel` (column sums alone, H2O): grid (key block, sequence, query head); one query
   head's tiles per program (128 rows fit the shared memory), walking the query blocks from the
   diagonal to the sequence's end and adding exp(logit - lse) down each column; masks only on the
   diagonal block and the blocks that padding or the window cut.
   `_colsum_kernel` (with the squares, RoCo): grid (sequence, KV head, key block); the G heads of a
   group together, for the squared group-reduced value (64-row tiles).
Each pass costs about one QK^T; nothing [T, T] is written. `prompt_column_sums_reference` is the
dense jnp version (tests; small T). Elsewhere than on a GPU the chunked XLA pass of
`kvjax.models.prompt_attention` computes the same statistics.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

_NEG = -1e30
_LOG2E = 1.4426950408889634


def _visible(q_pos, k_pos, length, window):
    """[Q, K] bool: causal, both inside the prompt, inside the sliding window."""
    vis = (k_pos <= q_pos) & (k_pos < length) & (q_pos < length)
    if window is not None:
        vis &= (q_pos - k_pos) < window
    return vis


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "column_squares", "group_reduce"))
def prompt_column_sums_reference(q, k, lengths, *, scale: float, sliding_window: int | None = None,
                                 column_squares: bool = False, group_reduce: str = "mean"):
    """Dense: builds the [B, KV, G, T, T] probabilities (tests, small prompts)."""
    t = q.shape[3]
    pos = jnp.arange(t)
    logits = jnp.einsum("bkgtd,bksd->bkgts", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    causal = (pos[None, :] <= pos[:, None])
    if sliding_window is not None:
        causal &= (pos[:, None] - pos[None, :]) < sliding_window
    mask = causal[None] & (pos[None, None, :] < lengths[:, None, None])  # [B, T, T]
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _NEG), axis=-1)
    probs = jnp.where((pos[None, :] < lengths[:, None])[:, None, None, :, None] & mask[:, None, None], probs, 0.0)
    colsum = probs.sum(axis=3)
    if not column_squares:
        return colsum
    red = probs.max(axis=2) if group_reduce == "max" else probs.mean(axis=2)  # [B, KV, T, T]
    return colsum, (red * red).sum(axis=2)


def _lse_kernel(len_ref, q_ref, k_ref, lse_ref, *, scale, block, g, window):
    i = pl.program_id(2)
    length = len_ref[0, 0]
    q_pos = i * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    qs = [q_ref[gg, pl.ds(i * block, block), :] for gg in range(g)]  # each [Q, D]

    def body(j, carry):
        k = k_ref[pl.ds(j * block, block), :]
        k_pos = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        vis = _visible(q_pos, k_pos, length, window)
        out = []
        for gg in range(g):
            m, l = carry[gg]
            s = jax.lax.dot_general(qs[gg], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            s = jnp.where(vis, s, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
            out.append((m_new, l * jnp.exp(m - m_new) + jnp.sum(p, axis=1, keepdims=True)))
        return tuple(out)

    init = tuple((jnp.full((block, 1), _NEG, jnp.float32), jnp.zeros((block, 1), jnp.float32)) for _ in range(g))
    first = 0 if window is None else jnp.maximum(i * block - window + 1, 0) // block
    res = jax.lax.fori_loop(first, i + 1, body, init)
    for gg in range(g):
        m, l = res[gg]
        lse_ref[gg, :] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)[:, 0]


def _colsum_kernel(len_ref, q_ref, k_ref, lse_ref, *out_refs, scale, block, g, window, squares, reduce):
    j = pl.program_id(2)
    length = len_ref[0, 0]
    k = k_ref[pl.ds(j * block, block), :]  # [K, D]
    k_pos = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def body(i, carry):
        sums, sq = carry
        q_pos = i * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
        vis = _visible(q_pos, k_pos, length, window)
        new, red = [], None
        for gg in range(g):
            q = q_ref[gg, pl.ds(i * block, block), :]
            lse = lse_ref[gg, pl.ds(i * block, block)][:, None]  # [Q, 1]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            p = jnp.where(vis, jnp.exp(s - lse), 0.0)  # [Q, K]
            new.append(sums[gg] + jnp.sum(p, axis=0, keepdims=True))
            if squares:
                red = p if red is None else (jnp.maximum(red, p) if reduce == "max" else red + p)
        if squares:
            if reduce != "max":
                red = red / g
            sq = sq + jnp.sum(red * red, axis=0, keepdims=True)
        return tuple(new), sq

    init = (tuple(jnp.zeros((1, block), jnp.float32) for _ in range(g)), jnp.zeros((1, block), jnp.float32))
    last = (length + block - 1) // block
    if window is not None:
        last = jnp.minimum(last, (j * block + block - 1 + window - 1) // block + 1)
    sums, sq = jax.lax.fori_loop(j, jnp.maximum(last, j), body, init)
    for gg in range(g):
        out_refs[0][gg, :] = sums[gg][0]
    if squares:
        out_refs[1][:] = sq[0]


def _colsum_head_kernel(len_ref, q_ref, k_ref, lse_ref, out_ref, *, scale, block, window, key_axis):
    """One query head, one key block: colsum over the query blocks from the diagonal to the end.
    The tile is transposed ([keys, queries] = K Q^T) so the column sum is a row sum, which stays
    inside a warp (as flash attention's row sums do) instead of crossing warps every step."""
    j = pl.program_id(key_axis)
    length = len_ref[0, 0]
    k = k_ref[pl.ds(j * block, block), :]  # [K, D]
    k_pos = j * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    c = scale * _LOG2E  # exp(x) = exp2(x * log2(e)): one multiply-add and one ex2 per logit

    def tile(masked):
        def body(i, acc):
            q = q_ref[pl.ds(i * block, block), :]  # [Q, D]
            lse2 = lse_ref[pl.ds(i * block, block)][None, :] * _LOG2E  # [1, Q]
            s = jax.lax.dot_general(k, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            p = jnp.exp2(s * c - lse2)  # [K, Q]
            if masked:
                q_pos = i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
                p = jnp.where(_visible(q_pos, k_pos, length, window), p, 0.0)
            return acc + jnp.sum(p, axis=1, keepdims=True)
        return body

    last = (length + block - 1) // block  # query blocks holding a valid query
    full = length // block  # ... holding only valid queries
    if window is not None:
        last = jnp.minimum(last, (j * block + block - 1 + window - 1) // block + 1)
        full = jnp.minimum(full, j + window // block)  # the whole block inside every key's window
    inner_end = jnp.maximum(full, j + 1)
    acc = jnp.zeros((block, 1), jnp.float32)
    acc = jax.lax.fori_loop(j, jnp.minimum(last, j + 1), tile(True), acc)  # the diagonal block
    acc = jax.lax.fori_loop(j + 1, inner_end, tile(False), acc)  # below it: every entry visible
    acc = jax.lax.fori_loop(inner_end, jnp.maximum(last, inner_end), tile(True), acc)  # padding, window edge
    out_ref[:] = acc[:, 0]


def _lse_call(q, k, lengths, scale, window, block, kw):
    """`_lse_kernel` over whole blocks: q [B, KV, G, Tp, D], k [B, KV, Tp, D], lengths [B, 1] int32."""
    b, kv, g, tp, d = q.shape
    whole = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, x: (i, h) + (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(_lse_kernel, scale=scale, block=block, g=g, window=window),
        grid=(b, kv, tp // block),
        in_specs=[pl.BlockSpec((1, 1), lambda i, h, x: (i, 0)), whole(g, tp, d), whole(tp, d)],
        out_specs=pl.BlockSpec((None, None, g, block), lambda i, h, x: (i, h, 0, x)),
        out_shape=jax.ShapeDtypeStruct((b, kv, g, tp), jnp.float32),
        name="prompt_lse_gpu", **kw,
    )(lengths, q, k)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "block", "interpret", "num_warps",
                                             "num_stages"))
def prompt_lse_pallas(q, k, lengths, *, scale: float, sliding_window: int | None = None, block: int | None = None,
                      interpret=False, num_warps: int | None = None, num_stages: int | None = None):
    """`_lse_kernel` alone: each query's log-sum-exp [B, KV, G, T] float32 (natural log, `scale`
    included; +inf for queries at or past `lengths`). For checks and timings."""
    t = q.shape[3]
    block = block or _default_block(q.dtype, False)
    tp = -(-t // block) * block
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kw = dict(interpret=interpret, **_common.triton_kwargs(interpret, num_warps or 8, num_stages or 3))
    lengths = lengths.astype(jnp.int32).reshape(-1, 1)
    return _lse_call(q, k, lengths, scale, sliding_window, block, kw)[..., :t]


def _default_block(dtype, per_head: bool) -> int:
    """Rows per tile: what fits the shared memory (the grouped kernels hold G query heads' tiles)."""
    wide = jnp.dtype(dtype).itemsize > 2
    return (64 if wide else 128) if per_head else (32 if wide else 64)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "column_squares", "group_reduce", "block",
                                             "interpret", "num_warps", "num_stages", "per_head", "order"))
def prompt_column_sums_pallas(q, k, lengths, lse=None, *, scale: float, sliding_window: int | None = None,
                              column_squares: bool = False, group_reduce: str = "mean", block: int | None = None,
                              interpret=False, num_warps: int | None = None, num_stages: int | None = None,
                              per_head: bool | None = None, order: str = "keys"):
    """The GPU kernels (see the module docstring).

    lse: None (computed by `_lse_kernel`) or each query's log-sum-exp of its scaled logits,
      [B, KV, G, T] (e.g. cuDNN's softmax statistics from `fused_causal_attention(..., return_lse=True)`);
      natural log, `scale` included; rows of queries at or past `lengths` are never read.
    per_head: the column sums by `_colsum_head_kernel` (one query head per program); None: when
      `column_squares` is off (the squares need the G heads of a group together).
    block: rows per tile; default 128 per head, 64 grouped (halved for float32: the shared memory).
    order: per-head grid order, "keys" (key blocks vary fastest: the programs running together read
      the same query head, which stays in L2) or "heads" (sequence, then head, fastest).
    num_warps, num_stages: Triton settings (default 4 and 2 per head, 8 and 3 grouped)."""
    b, kv, g, t, d = q.shape
    per_head = (not column_squares) if per_head is None else per_head
    if per_head and column_squares:
        raise ValueError("per_head=True computes no column squares (they reduce over the G heads of a group)")
    if order not in ("keys", "heads"):
        raise ValueError(f"order must be 'keys' or 'heads', got {order!r}")
    block = block or _default_block(q.dtype, per_head)
    # the fastest of each kernel's sweep (benchmarks/results/column_sums_*.md): per head 4 warps, 2 stages
    # (block 128, H100: 23.4 ms per layer at 8 x 16K against 29.5 ms at 8 and 3); grouped 8 and 3 (H200)
    num_warps, num_stages = num_warps or (4 if per_head else 8), num_stages or (2 if per_head else 3)
    lse_block = None if lse is not None else min(block, _default_block(q.dtype, False))
    whole_blocks = math.lcm(block, lse_block or 1)
    tp = -(-t // whole_blocks) * whole_blocks
    if tp != t:  # whole blocks (prompt buckets of >= 192 tokens are multiples of 64 already)
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
        if lse is not None:
            lse = jnp.pad(lse, ((0, 0), (0, 0), (0, 0), (0, tp - t)))
    n = tp // block
    lengths = lengths.astype(jnp.int32).reshape(b, 1)
    kw = dict(interpret=interpret, **_common.triton_kwargs(interpret, num_warps, num_stages))
    whole = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, h, x: (i, h) + (0,) * len(shape))
    lens = pl.BlockSpec((1, 1), lambda i, h, x: (i, 0))
    lse = _lse_call(q, k, lengths, scale, sliding_window, lse_block, kw) if lse is None else lse.astype(jnp.float32)
    if per_head:
        hq = kv * g
        # grid (key block, sequence, query head) or (sequence, query head, key block); axis 0 varies fastest
        if order == "keys":
            grid, idx = (n, b, hq), lambda x, i, h: (i, h, x)
        else:
            grid, idx = (b, hq, n), lambda i, h, x: (i, h, x)
        spec = lambda shape, f: pl.BlockSpec(shape, lambda *a: f(*idx(*a)))
        out = pl.pallas_call(
            functools.partial(_colsum_head_kernel, scale=scale, block=block, window=sliding_window,
                              key_axis=0 if order == "keys" else 2),
            grid=grid,
            in_specs=[spec((1, 1), lambda i, h, x: (i, 0)),
                      spec((None, None, tp, d), lambda i, h, x: (i, h, 0, 0)),
                      spec((None, None, tp, d), lambda i, h, x: (i, h // g, 0, 0)),
                      spec((None, None, tp), lambda i, h, x: (i, h, 0))],
            out_specs=spec((None, None, block), lambda i, h, x: (i, h, x)),
            out_shape=jax.ShapeDtypeStruct((b, hq, tp), jnp.float32),
            name="prompt_column_sums_head_gpu", **kw,
        )(lengths, q.reshape(b, hq, tp, d), k, lse.reshape(b, hq, tp))
        return out.reshape(b, kv, g, tp)[..., :t]
    out_specs = [pl.BlockSpec((None, None, g, block), lambda i, h, x: (i, h, 0, x))]
    out_shape = [jax.ShapeDtypeStruct((b, kv, g, tp), jnp.float32)]
    if column_squares:
        out_specs.append(pl.BlockSpec((None, None, block), lambda i, h, x: (i, h, x)))
        out_shape.append(jax.ShapeDtypeStruct((b, kv, tp), jnp.float32))
    res = pl.pallas_call(
        functools.partial(_colsum_kernel, scale=scale, block=block, g=g, window=sliding_window,
                          squares=column_squares, reduce=group_reduce),
        grid=(b, kv, n),
        in_specs=[lens, whole(g, tp, d), whole(tp, d), whole(g, tp)],
        out_specs=out_specs,
        out_shape=out_shape,
        name="prompt_column_sums_gpu", **kw,
    )(lengths, q, k, lse)
    colsum = res[0][..., :t]
    return (colsum, res[1][..., :t]) if column_squares else colsum


def prompt_column_sums(q, k, lengths, *, scale: float, sliding_window: int | None = None,
                       column_squares: bool = False, group_reduce: str = "mean", implementation: str = "xla",
                       interpret=False, block: int | None = None, lse=None, per_head: bool | None = None):
    """See the module docstring. implementation "pallas": the GPU kernels (in interpret mode anywhere
    with `interpret=True`; `lse`, `per_head`: see `prompt_column_sums_pallas`); "xla": the dense
    reference (which ignores `lse`)."""
    if q.ndim != 5 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3:] != k.shape[2:]:
        raise ValueError(f"q must be [B, KV, G, T, D] and k [B, KV, T, D] of the same B, KV, T, D; got {q.shape}, "
                         f"{k.shape}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths must be [B] = ({q.shape[0]},), got {lengths.shape}")
    if group_reduce not in ("mean", "max"):
        raise ValueError(f"group_reduce must be 'mean' or 'max', got {group_reduce!r}")
    if lse is not None and lse.shape != q.shape[:4]:
        raise ValueError(f"lse must be [B, KV, G, T] = {q.shape[:4]}, got {lse.shape}")
    kw = dict(scale=scale, sliding_window=sliding_window, column_squares=column_squares, group_reduce=group_reduce)
    if implementation == "pallas":
        return prompt_column_sums_pallas(q, k, lengths, lse, block=block, interpret=interpret, per_head=per_head, **kw)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return prompt_column_sums_reference(q, k, lengths, **kw)
