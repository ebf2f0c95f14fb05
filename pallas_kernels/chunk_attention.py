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

The GPU kernel (Pallas lowered through Triton) runs one program per stream, grid (B, H): two walks
over the stream's key tiles, the first for each query's log-sum-exp (running max and sum), the
second for the probabilities, the output and the column statistics, so neither the [G, C, W]
logits nor the probabilities ever leave registers. The XLA path (`chunk_probs`, under the chunk
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
                scale, g, c, w, block, window, group_reduce, squares):
    length = len_ref[0, 0]
    qpos = qpos_ref[0, :][:, None]  # [C, 1]
    q_valid = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) < nval_ref[0, 0]
    qs = [q_ref[gi] for gi in range(g)]  # each [C, D]
    n_tiles = -(-w // block)

    def tile(t):
        """Tile t: keys [j0, j0 + block), j0 clamped so the tile stays inside the view; the columns
        an earlier tile covered are masked (`fresh`). Returns (j0, k [K, D], vis [C, K], fresh [K])."""
        j0 = jnp.minimum(t * block, w - block)
        j = j0 + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        fresh = j >= t * block
        kp = kpos_ref[pl.ds(j0, block)]
        vis = _visible(qpos, kp[None, :], j[None, :], length, window) & fresh[None, :]
        return j0, k_ref[pl.ds(j0, block), :], vis, fresh

    # float32 inputs: exact products (Triton's default for them is TF32, 10-bit mantissas)
    prec = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def logits(qg, k):
        return jax.lax.dot_general(qg, k, (((1,), (1,)), ((), ())), precision=prec,
                                   preferred_element_type=jnp.float32) * scale

    def lse_step(t, carry):
        _, k, vis, _ = tile(t)
        out = []
        for gi in range(g):
            m, l = carry[gi]
            s = jnp.where(vis, logits(qs[gi], k), _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
            out.append((m_new, l * jnp.exp(m - m_new) + jnp.sum(p, axis=1, keepdims=True)))
        return tuple(out)

    init = tuple((jnp.full((c, 1), _NEG, jnp.float32), jnp.zeros((c, 1), jnp.float32)) for _ in range(g))
    ml = jax.lax.fori_loop(0, n_tiles, lse_step, init)
    lse = [jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf) for m, l in ml]  # [C, 1] each

    def out_step(t, accs):
        j0, k, vis, fresh = tile(t)
        vt = v_ref[pl.ds(j0, block), :]
        ps, new = [], []
        for gi in range(g):
            p = jnp.where(vis, jnp.exp(logits(qs[gi], k) - lse[gi]), 0.0)  # [C, K]
            ps.append(p)
            new.append(accs[gi] + jax.lax.dot_general(p.astype(vt.dtype), vt, (((1,), (0,)), ((), ())), precision=prec,
                                                      preferred_element_type=jnp.float32))
        r = jnp.where(q_valid, _common.reduce_terms(ps, group_reduce), 0.0)
        cols = pl.ds(j0, block)
        pltriton.store(s1_ref.at[cols], jnp.sum(r, axis=0), mask=fresh)
        pltriton.store(s2_ref.at[cols], jnp.sum(r * r, axis=0) if squares else jnp.zeros((block,), jnp.float32),
                       mask=fresh)
        return tuple(new)

    accs = jax.lax.fori_loop(0, n_tiles, out_step, tuple(jnp.zeros(qs[0].shape, jnp.float32) for _ in range(g)))
    for gi in range(g):
        out_ref[gi] = accs[gi]


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "group_reduce", "squares", "block",
                                             "interpret", "num_warps", "num_stages"))
def _chunk_attention_pallas(q, k, v, kpos, length, qpos, n_valid, *, scale, sliding_window, group_reduce, squares,
                            block, interpret, num_warps, num_stages):
    b, h, g, c, d = q.shape
    w = k.shape[2]
    kernel = functools.partial(_gpu_kernel, scale=scale, g=g, c=c, w=w, block=block, window=sliding_window,
                               group_reduce=group_reduce, squares=squares)
    stream = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, j: (i, j) + (0,) * len(shape))  # noqa: E731
    row = lambda n: pl.BlockSpec((1, n), lambda i, j: (i, 0))  # noqa: E731
    out, s1, s2 = pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=[pl.BlockSpec((1, 1), lambda i, j: (i, j)), row(1), row(c), stream(g, c, d), stream(w, d),
                  stream(w, d), stream(w)],
        out_specs=[stream(g, c, d), stream(w), stream(w)],
        out_shape=[jax.ShapeDtypeStruct((b, h, g, c, d), jnp.float32), jax.ShapeDtypeStruct((b, h, w), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, w), jnp.float32)],
        interpret=interpret,
        name="chunk_attention_gpu",
        **_common.triton_kwargs(interpret, num_warps, num_stages),
    )(length.astype(jnp.int32), n_valid.astype(jnp.int32).reshape(b, 1), qpos.astype(jnp.int32), q, k, v,
      kpos.astype(jnp.int32))
    return out, s1, s2


def supports(q_shape, width: int, block: int = 64) -> bool:
    """Whether the GPU kernel takes these shapes: power-of-two chunk (>= 16, a Triton dot's rows) and
    head dimension, a view at least one key tile wide."""
    c, d = q_shape[3], q_shape[4]
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    return pow2(c) and c >= 16 and pow2(d) and d >= 16 and width >= block


def chunk_attention(q, k, v, kpos, length, qpos, n_valid, *, scale: float, sliding_window: int | None = None,
                    group_reduce: str = "mean", squares: bool = True, implementation: str = "pallas",
                    interpret=False, block: int = 64, num_warps: int | None = None, num_stages: int | None = None):
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
        raise ValueError(f"chunk_attention's kernel needs a power-of-two chunk >= 16 and head dim, and a view of "
                         f">= {block} keys; got q {q.shape}, {k.shape[2]} keys")
    return _chunk_attention_pallas(q, k, v, kpos, length, qpos, n_valid, **kw, block=block, interpret=interpret,
                                   num_warps=num_warps or 8, num_stages=num_stages or 2)
