"""Decode-time eviction's probabilities: the attention kernel's per-stream logits (`stream_logits`)
and log-sum-exp (`return_lse`), in interpret mode for the GPU (Triton) and TPU layouts, equal a
per-stream numpy softmax; `kvjax.decode_attention.stream_probs` turns them into the group-reduced
probabilities the XLA path computes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.decode_attention import stream_probs
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.pallas_kernels import ragged_decode_attention as rda


def _case(lengths, g=4, d=32, seed=0, gap=3, tail=0, offset=5):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    b, h = lengths.shape
    caps = lengths.max(axis=0, keepdims=True).repeat(b, 0) + gap
    start = (np.cumsum(caps, axis=1) - caps).astype(np.int32) + offset
    p = int((start + caps).max()) + tail
    q = rng.normal(size=(b, h, g, d)).astype(np.float32)
    k = rng.normal(size=(b, p, d)).astype(np.float32)
    v = rng.normal(size=(b, p, d)).astype(np.float32)
    kn = rng.normal(size=(b, h, d)).astype(np.float32)
    return [jnp.asarray(x) for x in (q, k, v, start, lengths, kn)]


def _numpy_probs(q, k, start, length, scale, reduce, width, visible=None):
    """[B, H, W]: each stream's softmax over its visible slots, reduced over the group, by offset."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, h = start.shape
    out = np.zeros((b, h, width))
    for i in range(b):
        for j in range(h):
            s0, n = int(start[i, j]), int(length[i, j])
            offs = np.arange(n)
            if visible is not None:
                offs = offs[visible[i, s0 + offs]]
            if len(offs) == 0:
                continue
            logits = q[i, j] @ k[i, s0 + offs].T * scale  # [G, n]
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[i, j, offs] = w.max(0) if reduce == "max" else w.mean(0)
    return out


RUNS = [("gpu", 1), ("gpu", 3), ("tpu", 2)]


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("backend,num_splits", RUNS)
def test_kernel_probabilities_equal_per_stream_softmax_with_the_new_token(reduce, backend, num_splits):
    # ragged streams, one empty, the last ending at the pool's end; row 1 head 2 gets no new token
    q, k, v, start, length, kn = _case([[40, 0, 77], [5, 64, 20]], tail=0, gap=1)
    slot = jnp.where(jnp.asarray([[True, True, True], [True, True, False]]), start + length, -1)
    width = 96
    out, k2, v2, lse, logits = rda.ragged_decode_attention(
        q, k, v, start, length, sm_scale=0.3, implementation="pallas", interpret=True, backend=backend,
        block_kv=16, num_splits=num_splits, append=(kn, kn * 0.5, slot), return_lse=True, stream_logits=width)
    n_after = length + (slot >= 0)
    want = _numpy_probs(q, k2, start, n_after, 0.3, reduce, width)
    got = stream_probs(lse, logits, n_after, reduce)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[0, 1, :2], [1.0, 0.0], atol=1e-6)  # an empty stream: only its new token
    # the XLA path gives the same
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, append=(kn, kn * 0.5, slot),
                                      return_lse=True, stream_logits=width)
    np.testing.assert_allclose(np.asarray(stream_probs(ref[3], ref[4], n_after, reduce)), want, atol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_raw_logits_buffer_holds_the_same_logits_at_its_column(num_splits):
    # what the eviction kernel reads without a copy: the GPU kernel's own buffer, offset j of a
    # stream at column `stream_logits_column(P, block_kv) + j`, rows past G unspecified
    q, k, v, start, length, kn = _case([[40, 0, 77], [5, 64, 20]], tail=0, gap=1)
    slot = jnp.where(jnp.asarray([[True, True, True], [True, True, False]]), start + length, -1)
    kw = dict(sm_scale=0.3, implementation="pallas", interpret=True, backend="gpu", block_kv=16,
              num_splits=num_splits, append=(kn, kn * 0.5, slot), return_lse=True, stream_logits=96)
    *_, lse, logits = rda.ragged_decode_attention(q, k, v, start, length, **kw)
    *_, lse_raw, raw = rda.ragged_decode_attention(q, k, v, start, length, raw_stream_logits=True, **kw)
    col = rda.stream_logits_column(k.shape[1], 16)
    assert raw.shape[2] >= q.shape[2] and raw.shape[3] >= col + 96
    n_after = np.asarray(length + (slot >= 0))
    inside = np.arange(96)[None, None, None, :] < n_after[:, :, None, None]
    got = np.asarray(raw)[:, :, : q.shape[2], col:col + 96]
    np.testing.assert_array_equal(np.where(inside, got, 0), np.where(inside, np.asarray(logits), 0))
    np.testing.assert_array_equal(np.asarray(lse_raw), np.asarray(lse))
    with pytest.raises(ValueError, match="raw_stream_logits"):
        rda.ragged_decode_attention(q, k, v, start, length, raw_stream_logits=True,
                                    **{**kw, "backend": "tpu"})


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_sliding_window_hides_slots(backend):
    q, k, v, start, length, _ = _case([[50, 30], [12, 60]], seed=3)
    pos = np.tile(np.arange(k.shape[1], dtype=np.int32), (2, 1))
    min_pos = np.array([30, 0], np.int32)
    _, lse, logits = rda.ragged_decode_attention(
        q, k, v, start, length, sm_scale=0.2, pos=jnp.asarray(pos), min_pos=jnp.asarray(min_pos),
        implementation="pallas", interpret=True, backend=backend, block_kv=16, return_lse=True, stream_logits=64)
    want = _numpy_probs(q, k, start, length, 0.2, "mean", 64, visible=pos >= min_pos[:, None])
    np.testing.assert_allclose(np.asarray(stream_probs(lse, logits, length, "mean")), want, atol=1e-6)


@pytest.mark.parametrize("backend,num_splits", RUNS)
def test_attention_kernel_log_sum_exp_equals_dense(backend, num_splits):
    q, k, v, start, length, _ = _case([[40, 0, 77], [5, 64, 20]], seed=1)
    want = rda.stream_log_sum_exp(q, k, start, length, sm_scale=0.3)
    out, lse = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, implementation="pallas",
                                           interpret=True, backend=backend, block_kv=16, num_splits=num_splits,
                                           return_lse=True)
    assert np.isinf(np.asarray(lse)[0, 1]).all()  # the empty stream
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want), rtol=1e-5)


def test_storing_logits_leaves_the_attention_output_unchanged():
    q, k, v, start, length, _ = _case([[300, 7], [0, 129]], seed=4, offset=0)
    kw = dict(sm_scale=0.1, implementation="pallas", interpret=True, backend="gpu", num_splits=2)
    plain = rda.ragged_decode_attention(q, k, v, start, length, **kw)
    with_logits = rda.ragged_decode_attention(q, k, v, start, length, return_lse=True, stream_logits=320, **kw)[0]
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_logits))


@pytest.mark.parametrize("window", [False, True], ids=["plain", "window"])
def test_kernel_with_logits_lowers_for_gpu_triton(window):
    q, k, v, start, length, kn = _case([[300, 100, 7], [0, 250, 64]], d=64)
    q, k, v, kn = (x.astype(jnp.bfloat16) for x in (q, k, v, kn))
    extra = {}
    if window:
        extra = dict(pos=jnp.zeros(k.shape[:2], jnp.int32), min_pos=jnp.zeros((2,), jnp.int32))
    try:
        lc.lower_for_gpu(lambda q, k, v, s, n, kn: rda.ragged_decode_attention(
            q, k, v, s, n, sm_scale=0.1, implementation="pallas", backend="gpu", append=(kn, kn, s + n),
            return_lse=True, stream_logits=320, **extra), q, k, v, start, length, kn)
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached")
