"""budget_scatter: packing kept tokens into pool segments; Pallas gather equals the reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET_MODES, interpret_arg, lowers_for_tpu
from kvjax.pallas_kernels import budget_scatter as bs


def _case(b, h, t, d, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    keep = rng.random((b, h, t)) > 0.5
    keep[0, 0] = False  # an empty stream
    if h > 1:
        keep[0, 1] = True  # a full stream
    caps = np.full((b, h), t, np.int32)
    dst = (np.cumsum(caps, axis=1) - caps).astype(np.int32)
    p = int(caps.sum(axis=1).max()) + 5
    src = rng.normal(size=(b, h, t, d)).astype(dtype)
    pool = rng.normal(size=(b, p, d)).astype(dtype)
    return jnp.asarray(keep), jnp.asarray(dst), jnp.asarray(src), jnp.asarray(pool)


def test_reference_packs_each_stream_in_order():
    keep, dst, src, pool = _case(2, 3, 11, 4, seed=0)
    out = np.asarray(bs.pack_streams(pool, src, keep, dst))
    for b in range(2):
        for h in range(3):
            kept = np.nonzero(np.asarray(keep[b, h]))[0]
            seg = out[b, int(dst[b, h]): int(dst[b, h]) + len(kept)]
            np.testing.assert_array_equal(seg, np.asarray(src[b, h, kept]))
            rest = slice(int(dst[b, h]) + len(kept), int(dst[b, h]) + 11)
            np.testing.assert_array_equal(out[b, rest], np.asarray(pool[b, rest]))  # untouched


@pytest.mark.parametrize("mode", INTERPRET_MODES)
@pytest.mark.parametrize("dims,dtype", [((2, 3, 11, 8), np.float32), ((1, 2, 40, 64), jnp.bfloat16)])
def test_pallas_gather_equals_reference(dims, dtype, mode):
    keep, dst, src, pool = _case(*dims, seed=3, dtype=dtype)
    plan = bs.pack_plan(keep, dst, pool.shape[1])
    ref = bs.budget_scatter(pool, src, *plan)
    got = bs.budget_scatter(pool, src, *plan, implementation="pallas", interpret=interpret_arg(mode))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_pallas_gather_lowers_for_tpu():
    keep, dst, src, pool = _case(2, 2, 64, 128, seed=0)
    plan = bs.pack_plan(keep, dst, pool.shape[1])
    lowers_for_tpu(lambda *a: bs.budget_scatter(*a, implementation="pallas"), pool, src, *plan)
