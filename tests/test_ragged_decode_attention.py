"""ragged_decode_attention: the flash-decoding kernel (GPU and TPU kernels, both interpret modes)
equals the dense masked reference, and lowers for TPU (Mosaic) and GPU (Triton)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import interpret_arg
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.pallas_kernels import ragged_decode_attention as rda


def _case(b, h, g, d, lengths, seed, dtype=np.float32, gap=3, offset=0, tail=2):
    """Streams laid out one after another (segment capacity = the longest length + gap), starting
    at `offset`, with `tail` spare slots at the end of the pool."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32).reshape(b, h)
    caps = lengths.max(axis=0, keepdims=True).repeat(b, 0) + gap
    start = (np.cumsum(caps, axis=1) - caps).astype(np.int32) + offset
    p = int(caps.sum(axis=1).max()) + offset + tail
    q = rng.normal(size=(b, h, g, d)).astype(dtype)
    k = rng.normal(size=(b, p, d)).astype(dtype)
    v = rng.normal(size=(b, p, d)).astype(dtype)
    return [jnp.asarray(x) for x in (q, k, v, start, lengths)]


CASES = {  # dims (B, H, G, D), lengths [B, H], extra _case arguments
    "empty-single-ragged-aligned": ((2, 3, 3, 16), [[100, 0, 37], [1, 64, 129]], {}),
    "gqa4-unaligned-start": ((1, 2, 4, 64), [[200, 5]], dict(offset=7)),
    "one-head-empty-row": ((3, 1, 1, 32), [[0], [7], [90]], {}),
    "stream-ends-at-pool-end": ((1, 2, 2, 16), [[40, 33]], dict(gap=0, tail=0)),
}
RUNS = [  # (case, kernel, interpret mode); TPU interpret mode is slow: fewer cases
    (c, k, "interpret") for c in CASES for k in ("gpu", "tpu")
] + [("empty-single-ragged-aligned", "tpu", "tpu"), ("gqa4-unaligned-start", "gpu", "tpu")]


@pytest.mark.parametrize("case,backend,mode", RUNS, ids=["-".join(r) for r in RUNS])
def test_kernel_equals_reference(case, backend, mode):
    dims, lengths, extra = CASES[case]
    q, k, v, start, length = _case(*dims, lengths, seed=sum(dims), **extra)
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3)
    got = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, implementation="pallas",
                                      interpret=interpret_arg(True if mode == "interpret" else "tpu"),
                                      backend=backend, block_kv=32, num_splits=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    empty = np.asarray(length) == 0
    assert (np.asarray(got)[empty] == 0).all()


@pytest.mark.parametrize("case", ["empty-single-ragged-aligned", "stream-ends-at-pool-end"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_single_split_gpu_kernel_normalises_in_the_kernel(case, dtype):
    # one split: the GPU kernel writes the final output in q's dtype and no merge runs
    dims, lengths, extra = CASES[case]
    q, k, v, start, length = _case(*dims, lengths, seed=5, dtype=dtype, **extra)
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3)
    got = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, implementation="pallas",
                                      interpret=True, backend="gpu", block_kv=32, num_splits=1)
    assert got.dtype == q.dtype and got.shape == q.shape
    tol = 2e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol)
    assert (np.asarray(got, np.float32)[np.asarray(length) == 0] == 0).all()


def test_default_splits_fill_about_one_program_per_multiprocessor():
    assert rda.default_num_splits(1, 8, 8 * 1040, 32) == 16
    assert rda.default_num_splits(32, 8, 8 * 1040, 32) == 1
    assert rda.default_num_splits(1, 8, 8 * 100, 32) == 1  # streams too short to split
    assert rda.default_num_splits(32, 8, 8 * 1040, 32, skewed=True) == 4  # Ada-KV: long heads get split
    assert rda.default_block_kv("gpu") == 32 and rda.default_block_kv("tpu") == 128


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bf16_and_default_blocks(backend):
    q, k, v, start, length = _case(2, 2, 4, 64, [[150, 0], [31, 200]], seed=4, dtype=jnp.bfloat16)
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.125)
    got = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.125, implementation="pallas",
                                      interpret=True, backend=backend)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_sliding_window_positions_are_hidden(backend):
    q, k, v, start, length = _case(2, 2, 2, 16, [[150, 20], [33, 160]], seed=1)
    pos = jnp.asarray(np.tile(np.arange(k.shape[1]), (2, 1)).astype(np.int32))
    min_pos = jnp.asarray(np.array([60, 200], np.int32))  # (0, 0): a prefix hidden; (1, 0): all; (1, 1): part
    ref = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.25, pos=pos, min_pos=min_pos)
    got = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.25, pos=pos, min_pos=min_pos,
                                      implementation="pallas", interpret=True, backend=backend, block_kv=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    assert (np.asarray(got)[1, 0] == 0).all()  # every slot of stream (1, 0) hidden: zeros


def test_garbage_outside_the_streams_is_never_read_into_the_output():
    q, k, v, start, length = _case(1, 2, 2, 16, [[20, 30]], seed=2, gap=20)
    clean = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.5)
    inside = np.zeros(k.shape[1], bool)
    for h in range(2):
        inside[int(start[0, h]): int(start[0, h] + length[0, h])] = True
    k_bad = jnp.where(jnp.asarray(inside)[None, :, None], k, jnp.nan)
    v_bad = jnp.where(jnp.asarray(inside)[None, :, None], v, jnp.inf)
    for backend in ("gpu", "tpu"):
        got = rda.ragged_decode_attention(q, k_bad, v_bad, start, length, sm_scale=0.5, implementation="pallas",
                                          interpret=True, backend=backend, block_kv=16)
        np.testing.assert_allclose(np.asarray(got), np.asarray(clean), atol=2e-5)


def test_reference_equals_per_stream_softmax():
    q, k, v, start, length = _case(1, 2, 2, 8, [[5, 9]], seed=2)
    out = np.asarray(rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.5))
    for h in range(2):
        s0, n = int(start[0, h]), int(length[0, h])
        logits = np.asarray(q[0, h]) @ np.asarray(k[0, s0:s0 + n]).T * 0.5
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[0, h], w @ np.asarray(v[0, s0:s0 + n]), atol=1e-5)


@pytest.mark.parametrize("window", [False, True], ids=["plain", "window"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_kernel_lowers_for_tpu(dtype, window):
    q, k, v, start, length = _case(2, 2, 4, 128, [[300, 100], [0, 250]], seed=0, dtype=dtype)  # P = 617: padded
    if window:
        pos = jnp.zeros(k.shape[:2], jnp.int32)
        min_pos = jnp.zeros((2,), jnp.int32)
        lc.lower_for_tpu(lambda *a: rda.ragged_decode_attention(*a[:5], pos=a[5], min_pos=a[6], sm_scale=0.1,
                                                                implementation="pallas", backend="tpu"),
                         q, k, v, start, length, pos, min_pos)
    else:
        lc.lower_for_tpu(lambda *a: rda.ragged_decode_attention(*a, sm_scale=0.1, implementation="pallas",
                                                                backend="tpu"), q, k, v, start, length)


@pytest.mark.parametrize("window,append,layered", [(False, False, False), (True, False, False), (True, True, False),
                                                   (False, True, True)],
                         ids=["plain", "window", "window-append-pos", "append-layer-row"])
def test_kernel_lowers_for_gpu_triton(window, append, layered):
    q, k, v, start, length = _case(2, 3, 3, 64, [[300, 100, 7], [0, 250, 64]], seed=0, dtype=jnp.bfloat16)
    extra = {}
    if window:
        extra = dict(pos=jnp.zeros(k.shape[:2], jnp.int32), min_pos=jnp.zeros((2,), jnp.int32))
    if append:  # the kernel writes the new key, value and position in place
        extra.update(append=(q[:, :, 0], q[:, :, 0], start + length),
                     append_pos=(extra.get("pos", jnp.zeros(k.shape[:2], jnp.int32)), jnp.ones((2,), jnp.int32)))
    if layered:  # three layers' start/length, row 1 read by the kernel
        start, length = jnp.stack([start] * 3), jnp.stack([length] * 3)
        extra["layer"] = jnp.int32(1)
    try:
        lc.lower_for_gpu(lambda q, k, v, s, n: rda.ragged_decode_attention(q, k, v, s, n, sm_scale=0.1, **extra,
                                                                           implementation="pallas", backend="gpu"),
                         q, k, v, start, length)
    except lc.GpuLoweringUnavailable:
        pytest.skip("this JAX lowers Pallas-Triton only with a GPU attached (checked on jax 0.10.2 and on the H100)")


def test_errors_name_the_argument():
    q, k, v, start, length = _case(1, 2, 2, 8, [[5, 9]], seed=2)
    call = lambda **kw: rda.ragged_decode_attention(**{**dict(q=q, k_pool=k, v_pool=v, start=start, length=length,
                                                              sm_scale=1.0), **kw})
    with pytest.raises(ValueError, match="q must be"):
        call(q=q[0])
    with pytest.raises(ValueError, match="k_pool must be"):
        call(k_pool=k[..., :4])
    with pytest.raises(ValueError, match="v_pool"):
        call(v_pool=v[:, :3])
    with pytest.raises(ValueError, match="start must be"):
        call(start=start[:, :1])
    with pytest.raises(ValueError, match="length must be"):
        call(length=length.astype(jnp.float32))
    with pytest.raises(ValueError, match="pos and min_pos"):
        call(pos=jnp.zeros(k.shape[:2], jnp.int32))
    with pytest.raises(ValueError, match="min_pos must be"):
        call(pos=jnp.zeros(k.shape[:2], jnp.int32), min_pos=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        call(implementation="triton")


@pytest.mark.parametrize("backend,num_splits", [("gpu", 1), ("gpu", 3), ("tpu", 2)])
def test_append_writes_the_new_token_and_attends_to_it(backend, num_splits):
    # streams of different lengths (one empty), one row without a new token (slot -1)
    q, k, v, start, length = _case(2, 3, 4, 32, [[40, 0, 77], [5, 64, 20]], seed=6, gap=4)
    rng = np.random.default_rng(1)
    k_new = jnp.asarray(rng.normal(size=(2, 3, 32)).astype(np.float32))
    v_new = jnp.asarray(rng.normal(size=(2, 3, 32)).astype(np.float32))
    slot = jnp.where(jnp.asarray([[True], [False]]), start + length, -1).astype(jnp.int32)
    # oracle: write the tokens by hand, then the dense reference over the longer streams
    k_ref, v_ref = np.asarray(k).copy(), np.asarray(v).copy()
    for b in range(2):
        for h in range(3):
            if slot[b, h] >= 0:
                k_ref[b, int(slot[b, h])], v_ref[b, int(slot[b, h])] = k_new[b, h], v_new[b, h]
    grown = length + (slot >= 0)
    want = rda.ragged_decode_attention(q, jnp.asarray(k_ref), jnp.asarray(v_ref), start, grown, sm_scale=0.3)
    for impl in ("xla", "pallas"):
        out, k2, v2 = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, implementation=impl,
                                                  interpret=True, backend=backend, block_kv=16,
                                                  num_splits=num_splits, append=(k_new, v_new, slot))
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(k2), k_ref)
        np.testing.assert_array_equal(np.asarray(v2), v_ref)


@pytest.mark.parametrize("backend,num_splits,window", [("gpu", 1, True), ("gpu", 3, False), ("tpu", 2, True)])
def test_append_pos_writes_each_new_position_in_place(backend, num_splits, window):
    # the position pool is written at each stream's new slot (the GPU kernel writes it itself, no
    # scatter); with a sliding window its old positions hide slots and the new token stays visible
    q, k, v, start, length = _case(2, 3, 4, 32, [[40, 0, 77], [5, 64, 20]], seed=8, gap=4)
    rng = np.random.default_rng(2)
    kn, vn = (jnp.asarray(rng.normal(size=(2, 3, 32)).astype(np.float32)) for _ in range(2))
    slot = jnp.where(jnp.asarray([[True], [False]]), start + length, -1).astype(jnp.int32)
    pos = rng.integers(0, 200, size=k.shape[:2]).astype(np.int32)
    new_pos = jnp.asarray([300, 301], jnp.int32)
    k_ref, v_ref, pos_ref = np.asarray(k).copy(), np.asarray(v).copy(), pos.copy()
    for b, h in np.argwhere(np.asarray(slot) >= 0):
        s = int(slot[b, h])
        k_ref[b, s], v_ref[b, s], pos_ref[b, s] = kn[b, h], vn[b, h], new_pos[b]
    min_pos = jnp.asarray([120, 60], jnp.int32) if window else None
    win = dict(pos=jnp.asarray(pos_ref), min_pos=min_pos) if window else {}
    want = rda.ragged_decode_attention(q, jnp.asarray(k_ref), jnp.asarray(v_ref), start, length + (slot >= 0),
                                       sm_scale=0.3, **win)
    for impl in ("xla", "pallas"):
        out, k2, v2, pos2 = rda.ragged_decode_attention(
            q, k, v, start, length, sm_scale=0.3, implementation=impl, interpret=True, backend=backend,
            block_kv=16, num_splits=num_splits, append=(kn, vn, slot), append_pos=(jnp.asarray(pos), new_pos),
            **(dict(pos=jnp.asarray(pos), min_pos=min_pos) if window else {}))
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(pos2), pos_ref)
        np.testing.assert_array_equal(np.asarray(k2), k_ref)
        np.testing.assert_array_equal(np.asarray(v2), v_ref)
    with pytest.raises(ValueError, match="append_pos must be"):
        rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.3, append=(kn, vn, slot),
                                    append_pos=(jnp.asarray(pos, jnp.int16), new_pos))


@pytest.mark.parametrize("backend,num_splits", [("gpu", 1), ("gpu", 2), ("tpu", 2)])
def test_layer_row_of_every_layers_streams_equals_the_row_alone(backend, num_splits):
    # start/length of three layers [L, B, H] and `layer`: the kernel reads row `layer` itself (on GPU
    # without a per-layer slice) and appends and attends exactly as with that row passed as [B, H]
    rows = [_case(2, 3, 4, 32, lens, seed=10, gap=8)[3:] for lens in
            ([[40, 0, 77], [5, 64, 20]], [[3, 50, 9], [70, 1, 33]], [[0, 0, 12], [60, 2, 80]])]
    q, k, v = _case(2, 3, 4, 32, [[70, 64, 80], [70, 64, 80]], seed=11, gap=8)[:3]
    start, length = (jnp.stack(x) for x in zip(*rows))
    rng = np.random.default_rng(3)
    kn, vn = (jnp.asarray(rng.normal(size=(2, 3, 32)).astype(np.float32)) for _ in range(2))
    pos, new_pos = jnp.asarray(rng.integers(0, 90, size=k.shape[:2]), jnp.int32), jnp.asarray([95, 99], jnp.int32)
    for layer in (0, 2):
        slot = jnp.where(jnp.asarray([[True], [False]]), start[layer] + length[layer], -1)
        common = dict(sm_scale=0.3, append=(kn, vn, slot), append_pos=(pos, new_pos), return_lse=True)
        want = rda.ragged_decode_attention(q, k, v, start[layer], length[layer], **common)
        got = rda.ragged_decode_attention(q, k, v, start, length, **common, layer=jnp.int32(layer),
                                          implementation="pallas", interpret=True, backend=backend, block_kv=16,
                                          num_splits=num_splits)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)
    with pytest.raises(ValueError, match=r"start must be an integer \[L, B, H\] \(with layer\)"):
        rda.ragged_decode_attention(q, k, v, start[0], length, sm_scale=0.3, layer=jnp.int32(0))
