"""prompt_column_sums: the GPU kernels (interpret mode) equal the dense reference and the chunked XLA
pass the prompt attention uses elsewhere (causal, ragged prompts, a sliding window, mean/max
group reduction), and lower for Triton where a GPU is attached."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.models.prompt_attention import causal_attention
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.pallas_kernels import prompt_column_sums as pcs


def _case(b=2, kv=2, g=3, t=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, kv, g, t, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, t, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, t, d)), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("window,reduce", [(None, "mean"), (50, "max")])
def test_kernels_equal_reference_and_chunked_pass(window, reduce):
    q, k, v = _case()
    lengths = jnp.asarray([200, 77], jnp.int32)  # T = 200 is not a multiple of the block: padded inside
    kw = dict(scale=0.3, sliding_window=window, column_squares=True, group_reduce=reduce)
    ref = pcs.prompt_column_sums(q, k, lengths, **kw)
    got = pcs.prompt_column_sums(q, k, lengths, implementation="pallas", interpret=True, block=32, **kw)
    _, cs, sq = causal_attention(q, k, v, lengths, scale=0.3, sliding_window=window, chunk=64, column_squares=True,
                                 group_reduce=reduce, fused=False)
    for a, b in ((got[0], ref[0]), (got[1], ref[1]), (ref[0], cs), (ref[1], sq)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # every valid query's attention sums to one: columns add up to the valid queries per head
    np.testing.assert_allclose(np.asarray(got[0]).sum(-1), np.broadcast_to([[[200.0]], [[77.0]]], (2, 2, 3)), rtol=1e-5)


def test_column_sums_alone():
    q, k, _ = _case(t=128, seed=1)
    lengths = jnp.asarray([128, 1], jnp.int32)
    got = pcs.prompt_column_sums(q, k, lengths, scale=0.2, implementation="pallas", interpret=True, block=64)
    ref = pcs.prompt_column_sums(q, k, lengths, scale=0.2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    assert float(np.asarray(got)[1, :, :, 1:].max()) == 0.0  # a one-token prompt: all attention on token 0


def test_errors_name_the_argument():
    q, k, _ = _case(t=64)
    with pytest.raises(ValueError, match="lengths must be"):
        pcs.prompt_column_sums(q, k, jnp.zeros((3,), jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="group_reduce"):
        pcs.prompt_column_sums(q, k, jnp.zeros((2,), jnp.int32), scale=1.0, group_reduce="sum")
    with pytest.raises(ValueError, match="q must be"):
        pcs.prompt_column_sums(q[0], k, jnp.zeros((2,), jnp.int32), scale=1.0)


def test_kernels_lower_for_gpu_triton():
    q, k, _ = _case(b=2, kv=2, g=4, t=256, d=64)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    try:
        lc.lower_for_gpu(lambda q, k, n: pcs.prompt_column_sums_pallas(q, k, n, scale=0.1, column_squares=True),
                         q, k, jnp.asarray([256, 100], jnp.int32))
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached")
