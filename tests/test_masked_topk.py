"""masked_topk: the Pallas kernel (GPU and TPU layouts, both interpret modes) equals its jnp
reference, which keeps what lax.top_k keeps; the kernel lowers for TPU (Mosaic) and GPU (Triton)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET_MODES, interpret_arg
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.pallas_kernels import masked_topk as mt


def _case(r, n, seed):
    """Ties (rounded scores), NaN, -inf, k = 0, k < 0, k >= count, an all-invalid and an all-equal row."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(r, n)).astype(np.float32)
    s[:, ::3] = np.round(s[:, ::3])  # many exact ties
    s[0, min(2, n - 1)] = np.nan
    s[-1, 0] = -np.inf
    valid = rng.random((r, n)) > 0.2
    k = rng.integers(-1, n + 2, size=r).astype(np.int32)
    k[0], k[-1] = 0, n  # nothing, and more than the valid count
    if r > 3:
        valid[1] = False  # nothing valid
        s[2] = 0.5  # one value everywhere: the index tie-break decides alone
        valid[2] = True
        k[2] = max(1, n // 3)
        k[3] = -5
    return jnp.asarray(s), jnp.asarray(k), jnp.asarray(valid)


@pytest.mark.parametrize("shape", [(5, 37), (16, 300), (3, 2), (9, 129)])
def test_reference_keeps_what_lax_top_k_keeps(shape):
    s, k, valid = _case(*shape, seed=1)
    keep = np.asarray(mt.masked_topk(s, k, valid))
    for i in range(shape[0]):
        v = np.asarray(valid[i])
        want = min(max(int(k[i]), 0), int(v.sum()))
        assert keep[i].sum() == want and not (keep[i] & ~v).any()
        if 0 < want < v.sum():
            x = np.nan_to_num(np.asarray(s[i]), nan=-np.inf)
            x = np.where(v, np.where(np.isneginf(x), -3e38, x), -np.inf).astype(np.float32)  # valid -inf > invalid
            _, idx = jax.lax.top_k(jnp.asarray(x), want)
            assert set(np.asarray(idx).tolist()) == set(np.nonzero(keep[i])[0].tolist())


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("mode", INTERPRET_MODES)
@pytest.mark.parametrize("shape", [(5, 37), (16, 300), (3, 2)])
def test_pallas_kernel_equals_reference(shape, mode, backend):
    if mode == "tpu" and shape[1] > 200:
        pytest.skip("TPU interpret mode is slow; the small shapes cover it")
    s, k, valid = _case(*shape, seed=shape[1])
    ref = mt.masked_topk(s, k, valid)
    got = mt.masked_topk(s, k, valid, implementation="pallas", interpret=interpret_arg(mode), backend=backend)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_layout_reads_rows_in_chunks(seed):
    """Rows longer than a chunk: every pass loops over column chunks (the GPU layout on long rows)."""
    s, k, valid = _case(6, 700, seed=seed)  # padded to 1024 columns = 8 chunks of 128
    got = mt.masked_topk_pallas(s, k, valid, interpret=True, backend="gpu", chunk=128)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(mt.masked_topk(s, k, valid)))


def test_continuous_scores_without_ties():
    """The tie search is skipped when no row needs it; the result must not change."""
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.normal(size=(8, 200)).astype(np.float32))
    k = jnp.asarray(rng.integers(1, 150, 8).astype(np.int32))
    valid = jnp.asarray(rng.random((8, 200)) > 0.1)
    got = mt.masked_topk(s, k, valid, implementation="pallas", interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(mt.masked_topk(s, k, valid)))


def test_pallas_kernel_lowers_for_tpu():
    s, k, valid = _case(8, 256, seed=0)
    lc.lower_for_tpu(lambda a, b, c: mt.masked_topk(a, b, c, implementation="pallas", backend="tpu"), s, k, valid)


def test_pallas_kernel_lowers_for_gpu_triton():
    s, k, valid = _case(4, 20000, seed=0)  # several chunks per row
    try:
        lc.lower_for_gpu(functools.partial(mt.masked_topk, implementation="pallas", backend="gpu"), s, k, valid)
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached (checked on jax 0.10.2 and on the H100)")


def test_shape_errors_name_the_argument():
    s, k, valid = _case(4, 10, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        mt.masked_topk(s, k[:2], valid)
    with pytest.raises(ValueError, match="k must be"):
        mt.masked_topk(s, k.astype(jnp.float32), valid)
    with pytest.raises(ValueError, match="valid must"):
        mt.masked_topk(s, k, valid[:, :3])
    with pytest.raises(ValueError, match="valid must be bool"):
        mt.masked_topk(s, k, valid.astype(jnp.int32))
    with pytest.raises(ValueError, match="scores must be"):
        mt.masked_topk(s[0], k, valid)
    with pytest.raises(ValueError, match="implementation"):
        mt.masked_topk(s, k, valid, implementation="cuda")
