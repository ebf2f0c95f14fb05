"""Helpers shared by the kernel modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_backend_kind(backend: str | None) -> str:
    """'gpu' or 'tpu': which kernel layout to build. None follows `jax.default_backend()`: the GPU
    (Triton) kernels on a GPU, the TPU (Mosaic) kernels everywhere else, so that on a CPU host
    interpret mode and `jax.export(..., platforms=["tpu"])` see the TPU kernels."""
    if backend is None:
        return "gpu" if jax.default_backend() == "gpu" else "tpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu', 'tpu' or None, got {backend!r}")
    return backend


def triton_available() -> bool:
    """Whether this JAX still ships the Pallas Triton backend that the GPU kernels lower through
    (JAX 0.12 deprecates it in favour of Mosaic GPU; without it kvjax decodes through XLA on GPU)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """Compiler params that pin a GPU `pallas_call` to the Triton lowering.

    Without them the choice follows `jax_pallas_use_mosaic_gpu` (default True in jax 0.10), and
    Mosaic GPU rejects these kernels (they rely on Triton's pointer loads with dynamic offsets)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_kwargs(interpret, num_warps: int | None = None, num_stages: int | None = None) -> dict:
    """`pallas_call` keyword arguments for a GPU-layout kernel: Triton params when compiling; none in
    interpret mode (the TPU interpreter only accepts Mosaic params)."""
    if interpret is not False and interpret is not None:
        return {}
    return {"compiler_params": triton_params(num_warps, num_stages)}


def write_rows(region, slot, value):
    """region [B, P, ...]; write value [B, H, ...] at slot [B, H] (-1: nothing) with one in-place
    XLA scatter. Rows without a slot write out of range and are dropped, so no gather of the old
    values runs first."""
    b, p = region.shape[:2]
    rows = jnp.arange(b)[:, None]
    idx = jnp.where(slot >= 0, slot, p + jnp.arange(slot.shape[1])[None, :])  # unique, out of range: dropped
    return region.at[rows, idx].set(value.astype(region.dtype), mode="drop", unique_indices=True)


def append_tokens(k_pool, v_pool, length, append, append_pos=None):
    """Write each stream's new key/value at its slot with XLA scatters (the paths without the fused
    GPU kernel). append = (k_new [B, H, D], v_new [B, H, D], slot [B, H] int, -1 = none);
    append_pos = (pos [B, P], new_pos [B]) or None: also write each sequence's new position there.
    Returns (k_pool, v_pool, pos or None, length + 1 where a token was written)."""
    k_new, v_new, slot = append
    pos = None
    if append_pos is not None:
        pos, new_pos = append_pos
        pos = write_rows(pos, slot, jnp.broadcast_to(new_pos[:, None], slot.shape))
    return (write_rows(k_pool, slot, k_new), write_rows(v_pool, slot, v_new), pos,
            length + (slot >= 0).astype(length.dtype))


def reduce_terms(terms, how: str):
    """Sequential reduction of a list of same-shape arrays, "mean" or "max" (in index order, as XLA
    reduces a few heads): a GQA group's probabilities inside a kernel and in its jnp reference."""
    acc = terms[0]
    for t in terms[1:]:
        acc = acc + t if how == "mean" else jnp.maximum(acc, t)
    return acc / len(terms) if how == "mean" else acc
