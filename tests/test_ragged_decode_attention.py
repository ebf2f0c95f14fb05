"""ragged_decode_attention: the flash-decoding kernel equals the dense masked reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import INTERPRET_MODES, interpret_arg, lowers_for_tpu
from kvjax.pallas_kernels import ragged_decode_attention as rda


def _case(b, h, g, d, lengths, seed, dtype=np.float32, gap=3):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32).reshape(b, h)
    caps = lengths.max(axis=0, keepdims=True).repeat(b, 0) + gap
    start = (np.cumsum(caps, axis=1) - caps).astype(np.int32)
    p = int(caps.sum(axis=1).max()) + 2
    q = rng.normal(size=(b, h, g, d)).astype(dtype)
    k = rng.normal(size=(b, p, d)).astype(dtype)
    v = rng.normal(size=(b, p, d)).astype(dtype)
    return [jnp.asarray(x) for x in (q, k, v, start, lengths)]


CASES = [
    ((2, 3, 3, 16), [[100, 0, 37], [1, 64, 129]]),  # empty, single, ragged, block-aligned streams
    ((1, 2, 4, 64), [[200, 5]]),
    ((3, 1, 1, 32), [[0], [7], [90]]),
]


@pytest.mark.parametrize("mode", INTERPRET_MODES)
@pytest.mark.parametrize("dims,lengths", CASES)
def test_kernel_equals_reference(dims, lengths, mode):
    q, k, v, start, length = _case(*dims, lengths, seed=sum(dims))
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3)
    got = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, implementation="pallas",
                                      interpret=interpret_arg(mode), block_kv=32, num_splits=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    empty = np.asarray(length) == 0
    assert (np.asarray(got)[empty] == 0).all()


def test_sliding_window_positions_are_hidden():
    q, k, v, start, length = _case(2, 2, 2, 16, [[50, 20], [33, 60]], seed=1)
    pos = jnp.asarray(np.tile(np.arange(k.shape[1]), (2, 1)).astype(np.int32))
    min_pos = jnp.asarray(np.array([30, 70], np.int32))
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.25, pos=pos, min_pos=min_pos)
    got = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.25, pos=pos, min_pos=min_pos,
                                      implementation="pallas", interpret=True, block_kv=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)


def test_reference_equals_per_stream_softmax():
    q, k, v, start, length = _case(1, 2, 2, 8, [[5, 9]], seed=2)
    out = np.asarray(rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.5))
    for h in range(2):
        s0, n = int(start[0, h]), int(length[0, h])
        logits = np.asarray(q[0, h]) @ np.asarray(k[0, s0:s0 + n]).T * 0.5
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[0, h], w @ np.asarray(v[0, s0:s0 + n]), atol=1e-5)


def test_kernel_lowers_for_tpu():
    q, k, v, start, length = _case(1, 2, 4, 128, [[300, 100]], seed=0)
    lowers_for_tpu(lambda *a: rda.ragged_decode_attention(*a, sm_scale=0.1, implementation="pallas"),
                   q, k, v, start, length)
