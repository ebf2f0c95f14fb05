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


def reduce_terms(terms, how: str):
    """Sequential reduction of a list of same-shape arrays, "mean" or "max" (in index order, as XLA
    reduces a few heads): a GQA group's probabilities inside a kernel and in its jnp reference."""
    acc = terms[0]
    for t in terms[1:]:
        acc = acc + t if how == "mean" else jnp.maximum(acc, t)
    return acc / len(terms) if how == "mean" else acc
