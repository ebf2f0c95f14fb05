"""A chunk of queries over their streams, with the column statistics a chunked prefill needs.

    chunk_attention(q [B, H, G, C, D], k, v [B, H, W, D], kpos [B, H, W] int32, length [B, H] int32,
                    qpos [B, C] int32, n_valid [B] int32, *, scale, sliding_window=None,
                    group_reduce="mean", squares=True, implementation="pallas", interpret=False)
        -> out [B, H, G, C, D] float32, s1 [B, H, W] float32, s2 [B, H, W] float32

Stream (b, h) holds `length[b, h]` keys at offsets [0, length) of its view, key j at position
kpos[b, h, j]; query c of the chunk (position qpos[b, c]) sees key j when j < length and
0 <= qpos - kpos (< sliding_window). p[g, c, j] = softmax over the visible keys of
q[g, c] . k[j] * scale (0 where not visible; a query that sees nothing attends to nothing):

- out[g, c] = sum_j p[g, c, j] v[j] (p rounded to v's dtype for the product, f32 accumulation);
- with r[c, j] = reduce_g p[g, c, j] ("mean" or "max") over the first n_valid[b] queries only:
  s1[j] = sum_c r[c, j], s2[j] = sum_c r[c, j]^2 (0 without `squares`): what C decode steps add to
  RoCo's (H2O's) running statistics.

The GPU kernel (Pallas lowered through Triton) runs one program per query block of a stream, grid
(B, H, C / cb): the block's queries for all G heads of the group stacked as the rows of one matrix
([Gp * cb, D], G rounded up to a power of two, about `rows` rows), so each key tile is one matmul. Two walks over the stream's key
tiles, the first for each row's log-sum-exp (running max and sum), the second for the probabilities,
the output and the block's column statistics (summed over blocks afterwards), so neither the logits
nor the probabilities ever leave registers. The XLA path (`chunk_probs`, under the chunk
step off GPU and in `chunk_attention_reference`, the tests' reference) materialises them: a matmul,
the softmax passes, a second matmul and the reductions, each a pass over [B, H, G, C, W] floats.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import _common

_NEG = -1e30


def _visible(qpos, kpos, j, length, window):
    """[C, K] (or [..., C, K]) bool from qpos [..., C, 1], kpos and j [..., 1, K], length."""
    gap = qpos - kpos
    vis = (j < length) & (gap >= 0)
    if window is not None:
        vis &= gap < window
    return vis


def chunk_probs(q, k, v, kpos, length, qpos, *, scale: float, sliding_window: int | None = None):
    """The XLA path's attention: (out [B, H, G, C, D] float32, probs [B, H, G, C, W] float32), the
    probabilities materialised (for statistics that need each query's own, in order)."""
    b, h, g, c, d = q.shape
    w = k.shape[2]
    logits = jnp.matmul(q.reshape(b, h, g * c, d), jnp.swapaxes(k, 2, 3),
                        preferred_element_type=jnp.float32).reshape(b, h, g, c, w) * scale
    vis = _visible(qpos[:, None, :, None], kpos[:, :, None, :], jnp.arange(w), length[:, :, None, None],
                   sliding_window)[:, :, None]  # [B, H, 1, C, W]
    probs = jnp.where(vis, jax.nn.softmax(jnp.where(vis, logits, _NEG), axis=-1), 0.0)
    out = jnp.matmul(probs.reshape(b, h, g * c, w).astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, h, g, c, d), probs


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "group_reduce", "squares"))
def chunk_attention_reference(q, k, v, kpos, length, qpos, n_valid, *, scale: float,
                              sliding_window: int | None = None, group_reduce: str = "mean", squares: bool = True):
    """The same math in plain jnp (materialised logits): arguments and results as `chunk_attention`."""
    b, h, g, c, _ = q.shape
    out, probs = chunk_probs(q, k, v, kpos, length, qpos, scale=scale, sliding_window=sliding_window)
    red = _common.reduce_terms([probs[:, :, gi] for gi in range(g)], group_reduce)  # [B, H, C, W]
    red = jnp.where((jnp.arange(c) < n_valid[:, None])[:, None, :, None], red, 0.0)
    s2 = (red * red).sum(axis=2) if squares else jnp.zeros(red.shape[:2] + red.shape[3:], jnp.float32)
    return out, red.sum(axis=2), s2


def _gpu_kernel(len_ref, nval_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, out_ref, s1_ref, s2_ref, *,
                scale, g, gp, cb, w, block, window, group_reduce, squares):
    """One program: query block i of stream (b, h), its G heads stacked as rows [Gp * cb, D] (row
    gi * cb + c is head gi's query c; Gp = G rounded up to a power of two, the padding heads at
    position -1, so they see nothing), so every tile is one [Gp * cb, K] matmul."""
    length = len_ref[0, 0]
    rows = gp * cb
    qpos = qpos_ref[0, :][:, None]  # [Gp * cb, 1] (the block's positions, repeated per head)
    c0 = pl.program_id(2) * cb
    q_valid = c0 + jax.lax.broadcasted_iota(jnp.int32, (cb, 1), 0) < nval_ref[0, 0]  # [cb, 1]
    q = q_ref[...]  # [Gp * cb, D]
    n_tiles = -(-w // block)

    def tile(t):
        """Tile t: keys [j0, j0 + block), j0 clamped so the tile stays inside the view; the columns
        an earlier tile covered are masked (`fresh`). Returns (j0, k [K, D], vis [Gp * cb, K], fresh [K])."""
        j0 = jnp.minimum(t * block, w - block)
        j = j0 + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        fresh = j >= t * block
        kp = kpos_ref[pl.ds(j0, block)]
        vis = _visible(qpos, kp[None, :], j[None, :], length, window) & fresh[None, :]
        return j0, k_ref[pl.ds(j0, block), :], vis, fresh

    # float32 inputs: exact products (Triton's default for them is TF32, 10-bit mantissas)
    prec = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def logits(k):
        return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                                   preferred_element_type=jnp.float32) * scale

    def lse_step(t, carry):
        m, l = carry
        _, k, vis, _ = tile(t)
        s = jnp.where(vis, logits(k), _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        return m_new, l * jnp.exp(m - m_new) + jnp.sum(p, axis=1, keepdims=True)

    init = (jnp.full((rows, 1), _NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    m, l = jax.lax.fori_loop(0, n_tiles, lse_step, init)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # [Gp * cb, 1]

    def out_step(t, acc):
        j0, k, vis, fresh = tile(t)
        vt = v_ref[pl.ds(j0, block), :]
        p = jnp.where(vis, jnp.exp(logits(k) - lse), 0.0)  # [Gp * cb, K], 0 in the padding heads
        acc = acc + jax.lax.dot_general(p.astype(vt.dtype), vt, (((1,), (0,)), ((), ())), precision=prec,
                                        preferred_element_type=jnp.float32)
        pg = p.reshape(gp, cb, block)  # probabilities are >= 0: the padding's zeros change no max
        r = pg.sum(axis=0) / g if group_reduce == "mean" else pg.max(axis=0)  # [cb, K]
        r = jnp.where(q_valid, r, 0.0)
        cols = pl.ds(j0, block)
        pltriton.store(s1_ref.at[cols], jnp.sum(r, axis=0), mask=fresh)
        pltriton.store(s2_ref.at[cols], jnp.sum(r * r, axis=0) if squares else jnp.zeros((block,), jnp.float32),
                       mask=fresh)
        return acc

    out_ref[...] = jax.lax.fori_loop(0, n_tiles, out_step, jnp.zeros((rows, q.shape[1]), jnp.float32))


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "group_reduce", "squares", "block",
                                             "rows", "interpret", "num_warps", "num_stages"))
def _chunk_attention_pallas(q, k, v, kpos, length, qpos, n_valid, *, scale, sliding_window, group_reduce, squares,
                            block, rows, interpret, num_warps, num_stages):
    b, h, g, c, d = q.shape
    w = k.shape[2]
    gp = 1 << (g - 1).bit_length()
    cb = _query_block(gp, c, rows)
    nb, r = c // cb, gp * cb
    # query block i's rows, heads stacked: [B, H, nb, Gp * cb, D]; positions repeated per head, -1 for padding
    qs = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0), (0, 0)))
    qs = qs.reshape(b, h, gp, nb, cb, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, nb, r, d)
    qp = jnp.broadcast_to(qpos.astype(jnp.int32).reshape(b, nb, 1, cb), (b, nb, g, cb))
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, gp - g), (0, 0)), constant_values=-1).reshape(b, nb * r)
    kernel = functools.partial(_gpu_kernel, scale=scale, g=g, gp=gp, cb=cb, w=w, block=block,
                               window=sliding_window, group_reduce=group_reduce, squares=squares)
    stream = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, j, n: (i, j) + (0,) * len(shape))  # noqa: E731
    qblock = lambda *shape: pl.BlockSpec((None, None, None) + shape,  # noqa: E731
                                         lambda i, j, n: (i, j, n) + (0,) * len(shape))
    out, s1, s2 = pl.pallas_call(
        kernel,
        grid=(b, h, nb),
        in_specs=[pl.BlockSpec((1, 1), lambda i, j, n: (i, j)), pl.BlockSpec((1, 1), lambda i, j, n: (i, 0)),
                  pl.BlockSpec((1, r), lambda i, j, n: (i, n)), qblock(r, d), stream(w, d), stream(w, d), stream(w)],
        out_specs=[qblock(r, d), qblock(w), qblock(w)],
        out_shape=[jax.ShapeDtypeStruct((b, h, nb, r, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, nb, w), jnp.float32), jax.ShapeDtypeStruct((b, h, nb, w), jnp.float32)],
        interpret=interpret,
        name="chunk_attention_gpu",
        **_common.triton_kwargs(interpret, num_warps, num_stages),
    )(length.astype(jnp.int32), n_valid.astype(jnp.int32).reshape(b, 1), qp, qs, k, v, kpos.astype(jnp.int32))
    out = out.reshape(b, h, nb, gp, cb, d)[:, :, :, :g].transpose(0, 1, 3, 2, 4, 5).reshape(b, h, g, c, d)
    return out, s1.sum(axis=2), s2.sum(axis=2)


def _query_block(g: int, c: int, rows: int) -> int:
    """Queries per program (g a power of two): g * cb = `rows` stacked rows where the chunk allows, at
    least 16 rows (a Triton dot's minimum) and at most the whole chunk."""
    cb = max(rows // g, -(-16 // g), 1)
    return min(1 << (cb.bit_length() - 1), c)


def supports(q_shape, width: int, block: int = 64) -> bool:
    """Whether the GPU kernel takes these shapes: power-of-two chunk and head dimension, the group
    (rounded up to a power of two) x chunk >= 16 (a Triton dot's rows), a view >= one key tile."""
    g, c, d = q_shape[2], q_shape[3], q_shape[4]
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return pow2(c) and (1 << (g - 1).bit_length()) * c >= 16 and pow2(d) and d >= 16 and width >= block


def chunk_attention(q, k, v, kpos, length, qpos, n_valid, *, scale: float, sliding_window: int | None = None,
                    group_reduce: str = "mean", squares: bool = True, implementation: str = "pallas",
                    interpret=False, block: int = 64, rows: int = 64, num_warps: int = 4, num_stages: int = 2):
    """See the module docstring. implementation "pallas": the GPU kernel (`interpret=True` runs it
    on CPU; shapes must pass `supports`); "xla": `chunk_attention_reference`."""
    if group_reduce not in ("mean", "max"):
        raise ValueError(f"group_reduce must be 'mean' or 'max', got {group_reduce!r}")
    kw = dict(scale=float(scale), sliding_window=sliding_window, group_reduce=group_reduce, squares=squares)
    if implementation == "xla":
        return chunk_attention_reference(q, k, v, kpos, length, qpos, n_valid, **kw)
    if implementation != "pallas":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    if not supports(q.shape, k.shape[2], block):
        raise ValueError(f"chunk_attention's kernel needs a power-of-two chunk and head dim, group x chunk >= 16 "
                         f"and a view of >= {block} keys; got q {q.shape}, {k.shape[2]} keys")
    return _chunk_attention_pallas(q, k, v, kpos, length, qpos, n_valid, **kw, block=block, rows=rows,
                                   interpret=interpret, num_warps=num_warps, num_stages=num_stages)
