"""stream_probs: the new query's attention probabilities at the streams' slots. The GPU kernel (in
interpret mode) equals the dense reference, which equals a per-stream numpy softmax; the attention
kernel's log-sum-exp (return_lse) equals the dense one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.pallas_kernels import ragged_decode_attention as rda
from kvjax.pallas_kernels import stream_probs as sp


def _case(lengths, g=4, d=32, seed=0, gap=3, tail=0):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    b, h = lengths.shape
    caps = lengths.max(axis=0, keepdims=True).repeat(b, 0) + gap
    start = (np.cumsum(caps, axis=1) - caps).astype(np.int32) + 5
    p = int((start + caps).max()) + tail
    q = rng.normal(size=(b, h, g, d)).astype(np.float32)
    k = rng.normal(size=(b, p, d)).astype(np.float32)
    v = rng.normal(size=(b, p, d)).astype(np.float32)
    return [jnp.asarray(x) for x in (q, k, v, start, lengths)]


def _numpy_probs(q, k, start, length, scale, reduce, visible=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, h = start.shape
    out = np.zeros(k.shape[:2])
    for i in range(b):
        for j in range(h):
            s0, n = int(start[i, j]), int(length[i, j])
            idx = np.arange(s0, s0 + n)
            if visible is not None:
                idx = idx[visible[i, idx]]
            if len(idx) == 0:
                continue
            logits = q[i, j] @ k[i, idx].T * scale  # [G, n]
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[i, idx] = w.max(0) if reduce == "max" else w.mean(0)
    return out


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_and_reference_equal_per_stream_softmax(reduce, num_splits):
    q, k, v, start, length = _case([[40, 0, 77], [5, 64, 20]], tail=0, gap=0)  # last stream ends at the pool end
    lse = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, return_lse=True)[1]
    want = _numpy_probs(q, k, start, length, 0.3, reduce)
    ref = sp.stream_probs(q, k, start, length, lse, sm_scale=0.3, reduce=reduce)
    got = sp.stream_probs(q, k, start, length, lse, sm_scale=0.3, reduce=reduce, implementation="pallas",
                          interpret=True, backend="gpu", block_kv=16, num_splits=num_splits)
    np.testing.assert_allclose(np.asarray(ref), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_sliding_window_hides_slots():
    q, k, v, start, length = _case([[50, 30], [12, 60]], seed=3)
    pos = np.tile(np.arange(k.shape[1], dtype=np.int32), (2, 1))
    min_pos = np.array([30, 0], np.int32)
    lse = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.2, pos=jnp.asarray(pos),
                                      min_pos=jnp.asarray(min_pos), return_lse=True)[1]
    want = _numpy_probs(q, k, start, length, 0.2, "mean", visible=pos >= min_pos[:, None])
    got = sp.stream_probs(q, k, start, length, lse, sm_scale=0.2, pos=jnp.asarray(pos), min_pos=jnp.asarray(min_pos),
                          implementation="pallas", interpret=True, backend="gpu", block_kv=16)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


@pytest.mark.parametrize("backend,num_splits", [("gpu", 1), ("gpu", 3), ("tpu", 2)])
def test_attention_kernel_log_sum_exp_equals_dense(backend, num_splits):
    q, k, v, start, length = _case([[40, 0, 77], [5, 64, 20]], seed=1)
    want = rda.stream_log_sum_exp(q, k, start, length, sm_scale=0.3)
    out, lse = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, implementation="pallas",
                                           interpret=True, backend=backend, block_kv=16, num_splits=num_splits,
                                           return_lse=True)
    assert np.isinf(np.asarray(lse)[0, 1]).all()  # the empty stream
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want), rtol=1e-5)


def test_errors_name_the_argument():
    q, k, v, start, length = _case([[4, 5]])
    lse = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="lse must be"):
        sp.stream_probs(q, k, start, length, lse[:, :, :2], sm_scale=1.0)
    with pytest.raises(ValueError, match="reduce"):
        sp.stream_probs(q, k, start, length, lse, sm_scale=1.0, reduce="sum")
    with pytest.raises(ValueError, match="start must be"):
        sp.stream_probs(q, k, start[:, :1], length, lse, sm_scale=1.0)


@pytest.mark.parametrize("window", [False, True], ids=["plain", "window"])
def test_kernel_lowers_for_gpu_triton(window):
    from kvjax.pallas_kernels import _lowering_checks as lc

    q, k, v, start, length = _case([[300, 100, 7], [0, 250, 64]], d=64)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    lse = jnp.zeros(q.shape[:3], jnp.float32)
    extra = ()
    if window:
        extra = (jnp.zeros(k.shape[:2], jnp.int32), jnp.zeros((2,), jnp.int32))
    try:
        lc.lower_for_gpu(lambda q, k, s, n, l: sp.stream_probs_pallas(q, k, s, n, l, *extra, sm_scale=0.1,
                                                                      reduce="max" if window else "mean"),
                         q, k, start, length, lse)
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached")
