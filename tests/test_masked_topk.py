"""masked_topk: the Pallas kernel equals its jnp reference, which equals lax.top_k's choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET_MODES, interpret_arg, lowers_for_tpu
from kvjax.pallas_kernels.masked_topk import masked_topk


def _case(r, n, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(r, n)).astype(np.float32)
    s[:, ::3] = np.round(s[:, ::3])  # many exact ties
    s[0, min(2, n - 1)] = np.nan
    s[-1, 0] = -np.inf
    valid = rng.random((r, n)) > 0.2
    k = rng.integers(-1, n + 2, size=r).astype(np.int32)
    k[0], k[-1] = 0, n  # nothing, and more than the valid count
    return jnp.asarray(s), jnp.asarray(k), jnp.asarray(valid)


@pytest.mark.parametrize("shape", [(5, 37), (16, 300), (3, 2), (9, 129)])
def test_reference_keeps_what_lax_top_k_keeps(shape):
    s, k, valid = _case(*shape, seed=1)
    keep = np.asarray(masked_topk(s, k, valid))
    for i in range(shape[0]):
        n_valid = int(valid[i].sum())
        want = min(max(int(k[i]), 0), n_valid)
        assert keep[i].sum() == want and not (keep[i] & ~np.asarray(valid[i])).any()
        if 0 < want < n_valid:
            x = np.where(np.asarray(valid[i]), np.nan_to_num(np.asarray(s[i]), nan=-np.inf), -np.inf)
            x = np.where(np.asarray(valid[i]) & np.isneginf(x), -3e38, x).astype(np.float32)
            x = np.where(np.asarray(valid[i]), x, -np.inf)
            _, idx = jax.lax.top_k(jnp.asarray(x), want)
            assert set(np.asarray(idx).tolist()) == set(np.nonzero(keep[i])[0].tolist())


@pytest.mark.parametrize("mode", INTERPRET_MODES)
@pytest.mark.parametrize("shape", [(5, 37), (16, 300), (3, 2)])
def test_pallas_kernel_equals_reference(shape, mode):
    if mode == "tpu" and shape[1] > 200:
        pytest.skip("TPU interpret mode is slow; the small shapes cover it")
    s, k, valid = _case(*shape, seed=shape[1])
    ref = masked_topk(s, k, valid)
    got = masked_topk(s, k, valid, implementation="pallas", interpret=interpret_arg(mode))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_pallas_kernel_lowers_for_tpu():
    s, k, valid = _case(8, 256, seed=0)
    lowers_for_tpu(lambda a, b, c: masked_topk(a, b, c, implementation="pallas"), s, k, valid)


def test_shape_errors_name_the_argument():
    s, k, valid = _case(4, 10, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        masked_topk(s, k[:2], valid)
    with pytest.raises(ValueError, match="valid must"):
        masked_topk(s, k, valid[:, :3])
