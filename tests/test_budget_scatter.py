"""budget_scatter: packing kept tokens into pool segments; the Pallas gather (GPU and TPU kernels,
both interpret modes) equals the reference and lowers for TPU (Mosaic) and GPU (Triton)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import interpret_arg
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.pallas_kernels import budget_scatter as bs


def _case(b, h, t, d, seed, dtype=np.float32):
    """Streams with an empty and a full one, segments of capacity T back to back, 5 spare slots."""
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
    out = np.asarray(jax.jit(bs.pack_streams)(pool, src, keep, dst))
    for b in range(2):
        for h in range(3):
            kept = np.nonzero(np.asarray(keep[b, h]))[0]
            seg = out[b, int(dst[b, h]): int(dst[b, h]) + len(kept)]
            np.testing.assert_array_equal(seg, np.asarray(src[b, h, kept]))
            rest = slice(int(dst[b, h]) + len(kept), int(dst[b, h]) + 11)
            np.testing.assert_array_equal(out[b, rest], np.asarray(pool[b, rest]))  # untouched
    np.testing.assert_array_equal(out[:, -5:], np.asarray(pool[:, -5:]))


def test_plan_drops_tokens_past_the_pool():
    keep = jnp.ones((1, 2, 6), bool)
    head, tok, written = bs.pack_plan(keep, jnp.asarray([[0, 7]], jnp.int32), 10)
    np.testing.assert_array_equal(np.asarray(written[0]), [True] * 6 + [False] + [True] * 3)
    np.testing.assert_array_equal(np.asarray(head[0, 7:]), [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(tok[0, 7:]), [0, 1, 2])


_GATHER_CASES = [  # (kernel, dims, dtype, interpret mode): TPU interpret mode is slow, one shape covers it
    ("gpu", (2, 3, 11, 8), np.float32, True), ("gpu", (2, 2, 30, 128), jnp.bfloat16, True),
    ("tpu", (2, 3, 11, 8), np.float32, True), ("tpu", (1, 2, 40, 64), jnp.bfloat16, True),
    ("tpu", (2, 2, 30, 128), jnp.bfloat16, True), ("tpu", (1, 2, 40, 64), jnp.bfloat16, "tpu"),
]


@pytest.mark.parametrize("backend,dims,dtype,mode", _GATHER_CASES,
                         ids=[f"{k}-{d}-{jnp.dtype(t).name}-{'tpu-interpret' if m == 'tpu' else 'interpret'}"
                              for k, d, t, m in _GATHER_CASES])
def test_pallas_gather_equals_reference(backend, dims, dtype, mode):
    keep, dst, src, pool = _case(*dims, seed=3, dtype=dtype)
    plan = bs.pack_plan(keep, dst, pool.shape[1])
    ref = bs.budget_scatter(pool, src, *plan)
    got = bs.budget_scatter(pool, src, *plan, implementation="pallas", interpret=interpret_arg(mode), backend=backend)
    assert got.dtype == pool.dtype and got.shape == pool.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_pack_streams_pallas_with_f32_source_into_bf16_pool():
    keep, dst, src, pool = _case(1, 3, 20, 64, seed=4)
    pool = pool.astype(jnp.bfloat16)
    ref = bs.pack_streams(pool, src, keep, dst)
    got = bs.pack_streams(pool, src, keep, dst, implementation="pallas", interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_pallas_gather_lowers_for_tpu():
    keep, dst, src, pool = _case(2, 2, 64, 128, seed=0, dtype=jnp.bfloat16)
    plan = bs.pack_plan(keep, dst, pool.shape[1])
    lc.lower_for_tpu(lambda *a: bs.budget_scatter(*a, implementation="pallas", backend="tpu"), pool, src, *plan)


def test_pallas_gather_lowers_for_gpu_triton():
    keep, dst, src, pool = _case(2, 3, 50, 64, seed=0, dtype=jnp.bfloat16)
    plan = bs.pack_plan(keep, dst, pool.shape[1])
    try:
        lc.lower_for_gpu(lambda *a: bs.budget_scatter(*a, implementation="pallas", backend="gpu"), pool, src, *plan)
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached (checked on jax 0.10.2 and on the H100)")


def test_errors_name_the_argument():
    keep, dst, src, pool = _case(1, 2, 8, 4, seed=0)
    head, tok, written = bs.pack_plan(keep, dst, pool.shape[1])
    with pytest.raises(ValueError, match="pool must be"):
        bs.budget_scatter(pool[0], src, head, tok, written)
    with pytest.raises(ValueError, match="src must be"):
        bs.budget_scatter(pool, src[..., :2], head, tok, written)
    with pytest.raises(ValueError, match="src_head must be"):
        bs.budget_scatter(pool, src, head[:, :3], tok, written)
    with pytest.raises(ValueError, match="src_token must be"):
        bs.budget_scatter(pool, src, head, tok.astype(jnp.float32), written)
    with pytest.raises(ValueError, match="written must be"):
        bs.budget_scatter(pool, src, head, tok, written.astype(jnp.int32))
    with pytest.raises(ValueError, match="keep must be"):
        bs.pack_plan(keep.astype(jnp.int32), dst, 10)
    with pytest.raises(ValueError, match="dst_start must be"):
        bs.pack_plan(keep, dst[:, :1], 10)
    with pytest.raises(ValueError, match="backend"):
        bs.budget_scatter(pool, src, head, tok, written, implementation="pallas", backend="rocm")
