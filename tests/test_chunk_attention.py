"""chunk_attention: a chunk's queries over their streams with the column statistics of RoCo's and
H2O's chunked prefill. The GPU (Triton) kernel in interpret mode equals its jnp reference on ragged
streams (slots in any position order, padded queries, a view that is not a whole number of key
tiles, a sliding window, both group reductions, a group padded to a power of two, several query
blocks per stream); the reference equals explicit per-query softmaxes;
the chunk step picks the kernel only where it knows the scorer's statistics; and the kernel lowers for GPU (Triton) and MLIR-verifies."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.chunk_step import fused_rule
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.pallas_kernels import chunk_attention as ca
from kvjax.policies.cake import CakeIndicator
from kvjax.policies.roco import RobustAttention
from kvjax.policies.scorers import AccumulatedAttention, LastQueryAttention


def _case(seed, b=2, h=2, g=3, c=16, d=32, w=150, dtype=jnp.float32, qbase=100):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, h, g, c, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, h, w, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, h, w, d)), dtype)
    length = rng.integers(w // 2, w + 1, (b, h))
    if b * h > 1:
        length[-1, -1] = 0  # an empty stream: its queries attend to nothing
    kpos = np.stack([np.stack([rng.permutation(w) for _ in range(h)]) for _ in range(b)])  # any slot order
    qpos = qbase + np.arange(c)[None].repeat(b, 0)
    n_valid = np.array([c, c // 2 + 1])[:b]  # row 1's last queries are padding
    return q, k, v, jnp.asarray(kpos, jnp.int32), jnp.asarray(length, jnp.int32), jnp.asarray(qpos, jnp.int32), \
        jnp.asarray(n_valid, jnp.int32)


@pytest.mark.parametrize("window,reduce,squares,g,c,rows", [
    (None, "mean", True, 3, 16, 64),   # a group of 3 padded to 4 heads, the chunk in one block
    (40, "max", True, 3, 32, 32),      # four query blocks of 8 per stream, their statistics summed
    (None, "mean", False, 2, 16, 16),  # 2 x 8: the smallest block a Triton dot takes
])
def test_kernel_equals_reference(window, reduce, squares, g, c, rows):
    args = _case(0, g=g, c=c)
    kw = dict(scale=0.2, sliding_window=window, group_reduce=reduce, squares=squares)
    want = ca.chunk_attention(*args, **kw, implementation="xla")
    got = ca.chunk_attention(*args, **kw, interpret=True, rows=rows)
    for name, a, b in zip(("out", "s1", "s2"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=name)
    if not squares:
        assert not np.asarray(got[2]).any()


def test_reference_equals_explicit_softmaxes():
    # queries at positions 20-35 over keys 0-39: the keys past a query are hidden
    q, k, v, kpos, length, qpos, n_valid = _case(1, b=1, h=1, g=2, c=16, d=8, w=40, qbase=20)
    out, s1, s2 = ca.chunk_attention(q, k, v, kpos, length, qpos, n_valid, scale=0.3, implementation="xla")
    qn, kn, vn = (np.asarray(a, np.float64)[0, 0] for a in (q, k, v))
    r = np.zeros((16, 40))
    for gi in range(2):
        for c in range(16):
            vis = (np.arange(40) < int(length[0, 0])) & (np.asarray(kpos)[0, 0] <= int(qpos[0, c]))
            logit = qn[gi, c] @ kn.T * 0.3
            p = np.where(vis, np.exp(logit - logit[vis].max()), 0.0) if vis.any() else np.zeros(40)
            p = p / p.sum() if vis.any() else p
            np.testing.assert_allclose(np.asarray(out)[0, 0, gi, c], p @ vn, rtol=1e-4, atol=1e-5)
            if c < int(n_valid[0]):
                r[c] += p / 2
    np.testing.assert_allclose(np.asarray(s1)[0, 0], r.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s2)[0, 0], (r * r).sum(0), rtol=1e-5, atol=1e-7)


def test_chunk_step_uses_the_kernel_only_for_statistics_it_knows():
    assert fused_rule(RobustAttention(), True) == {"squares": True}
    assert fused_rule(AccumulatedAttention(), True) == {"squares": False}
    assert fused_rule(None, False) == {"squares": False}  # no running statistics: the output alone
    assert fused_rule(CakeIndicator(), True) is None and fused_rule(LastQueryAttention(), True) is None
    assert ca.supports((1, 1, 4, 32, 128), 1056) and ca.supports((1, 1, 7, 32, 64), 1056)  # Llama-8B, Qwen2.5
    assert not ca.supports((1, 1, 4, 24, 128), 1056) and not ca.supports((1, 1, 1, 8, 128), 1056)
    with pytest.raises(ValueError, match="power-of-two chunk"):
        ca.chunk_attention(*_case(0, c=24), scale=0.2)


def test_kernel_lowers_for_gpu_triton():
    args = _case(2, b=2, h=2, g=4, c=32, d=128, w=1056, dtype=jnp.bfloat16)
    fn = lambda *a: ca.chunk_attention(*a, scale=0.088)  # noqa: E731
    try:
        n = lc.lower_for_gpu(fn, *args)
    except lc.GpuLoweringUnavailable as e:
        pytest.skip(f"this JAX lowers Pallas-Triton only with a GPU attached: {e}")
    assert n >= 1
