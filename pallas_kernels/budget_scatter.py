"""Pack each stream's kept tokens into consecutive pool slots, expressed as a gather.

    pack_plan(keep [B, H, T], dst_start [B, H], P) -> (src_head [B, P], src_token [B, P], written [B, P])
    budget_scatter(pool [B, P, D], src [B, H, T, D], src_head, src_token, written) -> pool'

Stream (b, h)'s kept tokens, in increasing t, go to slots `dst_start[b, h] + i`. Scatter and cumsum
do not lower inside TPU kernels, so the plan (which needs a cumsum) is computed by XLA, and the
kernel only gathers: `pool'[b, p] = src[b, src_head[b, p], src_token[b, p]]` where written, else
the old slot. Callers guarantee dst_start >= 0, that streams do not overlap and that they fit in
the pool (slots past P are dropped). Payloads: bf16 or f32, any D (64 and 128 are the tested ones).

Kernels: on GPU (Triton) a grid over (sequence, block of 8 slots) whose programs read each written
slot's source row from the whole-array src ref; on TPU (Mosaic) the pool is aliased to the output
in HBM and each written slot is one row DMA from src (HBM -> HBM), with the block's source indices
in SMEM, so neither src nor the pool has to fit in VMEM.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _common


def pack_plan(keep, dst_start, pool_size: int):
    """Where every pool slot's token comes from (XLA: cumsum + scatter, outside any kernel).

    keep [B, H, T] bool, dst_start [B, H] int -> (src_head [B, P] int32, src_token [B, P] int32,
    written [B, P] bool), P = pool_size. Stream (b, h)'s i-th kept token (increasing t) goes to slot
    dst_start[b, h] + i. The caller guarantees that streams do not overlap and fit in the pool;
    tokens whose slot would be >= P are dropped silently, and overlapping streams give an
    unspecified winner. Unwritten slots have src_head = src_token = 0."""
    if keep.ndim != 3 or keep.dtype != jnp.bool_:
        raise ValueError(f"keep must be a bool [B, H, T] array, got {keep.dtype}{list(keep.shape)}")
    if dst_start.shape != keep.shape[:2] or not jnp.issubdtype(dst_start.dtype, jnp.integer):
        raise ValueError(f"dst_start must be an integer [B, H] = {keep.shape[:2]} array, got "
                         f"{dst_start.dtype}{list(dst_start.shape)}")
    b, h, t = keep.shape
    rank = jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(keep, dst_start.astype(jnp.int32)[..., None] + rank, pool_size)  # pool_size = dropped
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


def _gather_kernel_gpu(head_ref, tok_ref, written_ref, src_ref, pool_ref, out_ref, *, block: int):
    """One (sequence, block of slots): copy each written slot's source row, keep the others.
    Triton has no scalar prefetch: the indices come in as blocks and the slot loop is unrolled."""
    for i in range(block):
        row = src_ref[0, head_ref[0, i], tok_ref[0, i], :]
        keep_old = written_ref[0, i] == 0
        out_ref[0, i, :] = jnp.where(keep_old, pool_ref[0, i, :], row.astype(out_ref.dtype))


def _budget_scatter_gpu(pool, src, src_head, src_token, written, *, block: int, interpret):
    b, p, d = pool.shape
    _, h, t, _ = src.shape
    p_pad = -(-p // block) * block
    pad = lambda x: jnp.pad(x, ((0, 0), (0, p_pad - p)))
    heads, toks, wr = pad(src_head), pad(src_token), pad(written.astype(jnp.int32))
    pool_p = jnp.pad(pool, ((0, 0), (0, p_pad - p), (0, 0)))
    slots = lambda i, j: (i, j)
    out = pl.pallas_call(
        functools.partial(_gather_kernel_gpu, block=block),
        grid=(b, p_pad // block),
        in_specs=[pl.BlockSpec((1, block), slots), pl.BlockSpec((1, block), slots), pl.BlockSpec((1, block), slots),
                  pl.BlockSpec((1, h, t, d), lambda i, j: (i, 0, 0, 0)),
                  pl.BlockSpec((1, block, d), lambda i, j: (i, j, 0))],
        out_specs=pl.BlockSpec((1, block, d), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct(pool_p.shape, pool.dtype),
        interpret=interpret,
        name="budget_scatter_gpu",
        **_common.triton_kwargs(interpret),
    )(heads, toks, wr, src, pool_p)
    return out[:, :p]


_TPU_BLOCK = 8 * 128  # slots per program: their source indices are one (8, 128) int32 tile in SMEM


def _gather_kernel_tpu(flat_ref, src_hbm, pool_hbm, out_hbm, sem):
    """One (sequence, block of 1024 slots): a row DMA (HBM -> HBM) per written slot; the other slots
    keep the pool's rows, which `out` aliases. flat_ref [1, 1, 8, 128] in SMEM: slot j*1024 + 128*r + c
    takes src row head * T + token, or nothing where -1."""
    del pool_hbm  # aliased to out_hbm
    b, j = pl.program_id(0), pl.program_id(1)

    def index(i):
        return flat_ref[0, 0, jax.lax.shift_right_logical(i, 7), i & 127]

    def copy(i):
        return pltpu.make_async_copy(src_hbm.at[b, pl.ds(index(i), 1), :],
                                     out_hbm.at[b, pl.ds(j * _TPU_BLOCK + i, 1), :], sem.at[0])

    def start(i, carry):
        @pl.when(index(i) >= 0)
        def _():
            copy(i).start()
        return carry

    def wait(i, carry):
        @pl.when(index(i) >= 0)
        def _():
            copy(i).wait()
        return carry

    jax.lax.fori_loop(0, _TPU_BLOCK, start, 0)
    jax.lax.fori_loop(0, _TPU_BLOCK, wait, 0)


def _budget_scatter_tpu(pool, src, src_head, src_token, written, *, interpret):
    b, p, d = pool.shape
    _, h, t, _ = src.shape
    n_blocks = -(-p // _TPU_BLOCK)
    flat = jnp.where(written, src_head * t + src_token, -1).astype(jnp.int32)
    flat = jnp.pad(flat, ((0, 0), (0, n_blocks * _TPU_BLOCK - p)), constant_values=-1)  # past P: -1
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        _gather_kernel_tpu,
        grid=(b, n_blocks),
        in_specs=[pl.BlockSpec((1, 1, 8, 128), lambda i, j: (i, j, 0, 0), memory_space=pltpu.SMEM), hbm, hbm],
        out_specs=hbm,
        out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
        scratch_shapes=[pltpu.SemaphoreType.DMA((1,))],
        input_output_aliases={2: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="budget_scatter_tpu",
    )(flat.reshape(b, n_blocks, 8, 128), src.astype(pool.dtype).reshape(b, h * t, d), pool)


@functools.partial(jax.jit, static_argnames=("block", "interpret", "backend"))
def budget_scatter_pallas(pool, src, src_head, src_token, written, *, block: int | None = None, interpret=False,
                          backend: str | None = None):
    """The Pallas gather; arguments as `budget_scatter`.

    GPU (Triton): grid over (sequence, block of 8 slots), indices as blocks, each source row read
    through the whole-array src ref. TPU (Mosaic): pool aliased to the output in HBM, grid over
    (sequence, block of 1024 slots) with the block's indices in SMEM, one HBM -> HBM row DMA per
    written slot (unwritten slots are not touched; XLA copies the pool first unless it is donated)."""
    backend = _common.default_backend_kind(backend)
    if backend == "gpu":
        return _budget_scatter_gpu(pool, src, src_head, src_token, written, block=block or 8, interpret=interpret)
    return _budget_scatter_tpu(pool, src, src_head, src_token, written, interpret=interpret)


def budget_scatter(pool, src, src_head, src_token, written, *,
                   implementation: Literal["pallas", "xla"] = "xla", interpret=False,
                   backend: Literal["gpu", "tpu"] | None = None):
    """pool' [B, P, D] with `pool'[b, p] = src[b, src_head[b, p], src_token[b, p]] if written[b, p]
    else pool[b, p]`.

    pool [B, P, D]; src [B, H, T, D] (cast to pool's dtype); src_head, src_token [B, P] int32 with
    0 <= src_head < H and 0 <= src_token < T where written; written [B, P] bool (`pack_plan` makes
    all three). `implementation`: "xla" (reference) or "pallas"; `interpret`: False, True or a
    `pltpu.InterpretParams`; `backend`: "gpu" / "tpu" kernel (None = by `jax.default_backend()`)."""
    if pool.ndim != 3:
        raise ValueError(f"pool must be [B, P, D], got shape {pool.shape}")
    if src.ndim != 4 or src.shape[0] != pool.shape[0] or src.shape[3] != pool.shape[2]:
        raise ValueError(f"src must be [B, H, T, D] with B, D of pool {pool.shape}, got {src.shape}")
    for name, x in (("src_head", src_head), ("src_token", src_token)):
        if x.shape != pool.shape[:2] or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer [B, P] = {pool.shape[:2]} array, got {x.dtype}{list(x.shape)}")
    if written.shape != pool.shape[:2] or written.dtype != jnp.bool_:
        raise ValueError(f"written must be a bool [B, P] = {pool.shape[:2]} array, got {written.dtype}{list(written.shape)}")
    if implementation == "pallas":
        return budget_scatter_pallas(pool, src, src_head.astype(jnp.int32), src_token.astype(jnp.int32), written,
                                     interpret=interpret, backend=backend)
    if implementation != "xla":
        raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}")
    return budget_scatter_reference(pool, src, src_head, src_token, written)


def pack_streams(pool, src, keep, dst_start, **kwargs):
    """pack_plan + budget_scatter in one call: pool [B, P, D], src [B, H, T, D], keep [B, H, T] bool,
    dst_start [B, H] int -> pool' [B, P, D]; keyword arguments go to `budget_scatter`."""
    plan = pack_plan(keep, dst_start, pool.shape[1])
    return budget_scatter(pool, src, *plan, **kwargs)
