"""prompt_column_sums: the GPU kernels (interpret mode) equal the dense reference and the chunked XLA
pass the prompt attention uses elsewhere (causal, ragged prompts, a sliding window, mean/max
group reduction), the per-head kernel takes a precomputed log-sum-exp (the one
`fused_causal_attention(return_lse=True)` returns, whose convention is pinned here for XLA), and
the kernels lower for Triton where this JAX can."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.models.prompt_attention import causal_attention, fused_causal_attention
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
    _, cs, sq = jax.jit(lambda q, k, v, n: causal_attention(q, k, v, n, scale=0.3, sliding_window=window, chunk=64,
                                                            column_squares=True, group_reduce=reduce, fused=False))(
        q, k, v, lengths)
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


def _dense_lse(q, k, scale, window):
    t = q.shape[3]
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k) * scale
    pos = np.arange(t)
    vis = pos[None, :] <= pos[:, None]
    if window is not None:
        vis &= (pos[:, None] - pos[None, :]) < window
    return jax.nn.logsumexp(jnp.where(vis, logits, -jnp.inf), axis=-1)


@pytest.mark.parametrize("g,block,window,given_lse", [(4, 64, 150, True), (1, 128, None, False)])
def test_per_head_kernel(g, block, window, given_lse):
    # T = 200: not a multiple of the block; ragged prompts; with the window, key blocks whose
    # inner query blocks are all visible, and blocks the window cuts
    q, k, v = _case(b=2, kv=2, g=g, t=200, seed=2)
    lengths = jnp.asarray([200, 130], jnp.int32)
    kw = dict(scale=0.3, sliding_window=window)
    lse = None
    if given_lse:  # the log-sum-exp the fused attention returns (XLA here, cuDNN on a GPU)
        both = jax.jit(lambda q, k, v: (fused_causal_attention(q, k, v, return_lse=True, **kw),
                                        fused_causal_attention(q, k, v, **kw), _dense_lse(q, k, 0.3, window)))
        (out, lse), out_alone, want = both(q, k, v)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want), atol=1e-5)  # natural log, scale included
        np.testing.assert_allclose(np.asarray(out), np.asarray(out_alone), atol=1e-6)
    got = pcs.prompt_column_sums(q, k, lengths, implementation="pallas", interpret=True, block=block, lse=lse,
                                 per_head=True, **kw)
    ref = pcs.prompt_column_sums(q, k, lengths, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)


def test_errors_name_the_argument():
    q, k, _ = _case(t=64)
    with pytest.raises(ValueError, match="lengths must be"):
        pcs.prompt_column_sums(q, k, jnp.zeros((3,), jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="group_reduce"):
        pcs.prompt_column_sums(q, k, jnp.zeros((2,), jnp.int32), scale=1.0, group_reduce="sum")
    with pytest.raises(ValueError, match="q must be"):
        pcs.prompt_column_sums(q[0], k, jnp.zeros((2,), jnp.int32), scale=1.0)
    with pytest.raises(ValueError, match="lse must be"):
        pcs.prompt_column_sums(q, k, jnp.zeros((2,), jnp.int32), scale=1.0, lse=jnp.zeros((2, 2, 3, 63)))
    with pytest.raises(ValueError, match="per_head"):
        pcs.prompt_column_sums_pallas(q, k, jnp.zeros((2,), jnp.int32), scale=1.0, column_squares=True, per_head=True)


def test_kernels_lower_for_gpu_triton():
    q, k, _ = _case(b=2, kv=2, g=4, t=256, d=64)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    try:
        lengths, lse = jnp.asarray([256, 100], jnp.int32), jnp.zeros(q.shape[:4], jnp.float32)
        lc.lower_for_gpu(lambda q, k, n: pcs.prompt_column_sums_pallas(q, k, n, scale=0.1, column_squares=True),
                         q, k, lengths)
        for order in ("keys", "heads"):  # the per-head kernel, given the log-sum-exp, block 128
            lc.lower_for_gpu(lambda q, k, n, lse: pcs.prompt_column_sums_pallas(q, k, n, lse, scale=0.1, order=order,
                                                                                sliding_window=100), q, k, lengths, lse)
        lc.lower_for_gpu(lambda q, k, n: pcs.prompt_column_sums_pallas(q, k, n, scale=0.1), q, k, lengths)
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached")
