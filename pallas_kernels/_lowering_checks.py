"""Lowering checks that run on a CPU host (used by the tests and the GPU benchmark script).

- `lower_for_tpu`: `jax.export` for platforms=["tpu"] runs the Mosaic TPU lowering, which rejects
  what interpret mode accepts (sort, scatter, misaligned blocks, ...).
- `lower_for_gpu`: lowering for "cuda" runs the Pallas -> Triton IR lowering on the host; the Triton
  modules are also MLIR-verified when jax's private Triton lowering hook is where we expect it (the
  verifier catches e.g. loop bounds of mixed types that would only fail when the GPU compiles).
"""

from __future__ import annotations

import contextlib

import jax


def lower_for_tpu(fn, *args):
    """Export `fn` for TPU (Mosaic lowering on this host). Returns the `jax.export.Exported`."""
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)


@contextlib.contextmanager
def _verify_triton_modules(errors: list, count: list):
    try:
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:  # private module moved: lower without verifying
        yield False
        return
    original = getattr(triton_lowering, "lower_jaxpr_to_triton_module", None)
    if original is None:
        yield False
        return

    def verified(*a, **k):
        result = original(*a, **k)
        count.append(1)
        try:
            result.module.operation.verify()
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = verified
    try:
        yield True
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original


class GpuLoweringUnavailable(RuntimeError):
    """This JAX cannot lower Pallas-Triton without a GPU attached (newer JAX wants a device)."""


def _abstract_gpu():
    """A context that makes a CPU host lower for an H100 (JAX >= 0.12 asks the abstract mesh's device
    which GPU to target when none is attached), or None where this JAX has no abstract devices."""
    try:
        from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
        mesh = AbstractMesh((1,), ("gpu",), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", None, "gpu"))
    except (ImportError, TypeError):
        return None
    return use_abstract_mesh(mesh)


def lower_for_gpu(fn, *args) -> int:
    """Lower `fn` for CUDA (Pallas calls through Triton) and verify the Triton modules. Returns the
    number of Triton modules verified (0 when the private hook is unavailable); raises on failure.
    Without a GPU attached, newer JAX lowers for an abstract H100 (the Triton IR, not the PTX)."""
    errors: list = []
    count: list = []
    lower = lambda: jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))  # noqa: E731
    with _verify_triton_modules(errors, count):
        try:
            lower()
        except RuntimeError as e:
            if "No supported GPU devices" not in str(e):
                raise
            abstract = _abstract_gpu()
            if abstract is None:
                raise GpuLoweringUnavailable(str(e)) from None
            with abstract:
                lower()
    if errors:
        raise AssertionError("Triton module failed MLIR verification:\n" + errors[0][:4000])
    return len(count)
