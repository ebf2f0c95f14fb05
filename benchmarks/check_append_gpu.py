"""On the GPU: the fused-append decode kernel (Triton: new key, value and position written in place)
against the XLA path, bf16 and f32 (Triton runs f32 dots as TF32: ~1e-3), one and several splits,
with and without a sliding window; then the probabilities decode-time eviction takes
from the kernel's per-stream logits against the XLA path. Prints the largest differences.

    python benchmarks/check_append_gpu.py
"""

import jax.numpy as jnp
import numpy as np

from kvjax.pallas_kernels import ragged_decode_attention as rda


def case(b, h, g, d, max_len, dtype, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, (b, h)).astype(np.int32)
    caps = lengths + 3
    start = (np.cumsum(caps, 1) - caps).astype(np.int32) + 5
    p = int((start + caps).max()) + 7
    mk = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32)).astype(dtype)
    slot = np.where(rng.random((b, h)) < 0.8, start + lengths, -1).astype(np.int32)
    return mk(b, h, g, d), mk(b, p, d), mk(b, p, d), jnp.asarray(start), jnp.asarray(lengths), mk(b, h, d), mk(b, h, d), jnp.asarray(slot), p


worst = 0.0
for dtype in (jnp.bfloat16, jnp.float32):
    for splits in (1, 2, 5):
        for window in (False, True):
            q, k, v, start, length, kn, vn, slot, p = case(6, 8, 4, 128, 700, dtype, splits)
            # the kernel also writes each sequence's new position (the newest) at its streams' slots
            pos = jnp.asarray(np.tile(np.arange(p, dtype=np.int32), (6, 1)))
            new_pos = jnp.full((6,), 10 ** 6, jnp.int32)
            want_pos = np.asarray(pos).copy()
            rows = np.nonzero(np.asarray(slot) >= 0)
            want_pos[rows[0], np.asarray(slot)[rows]] = 10 ** 6
            kw = dict(append=(kn, vn, slot), append_pos=(pos, new_pos))
            if window:
                kw.update(pos=pos, min_pos=jnp.asarray([0, 50, 300, 0, 900, 20], jnp.int32))
            ref, kr, vr, pr = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.088, **kw)
            got, kg, vg, pg = rda.ragged_decode_attention(q, k, v, start, length, sm_scale=0.088, implementation="pallas",
                                                          num_splits=splits, **kw)
            diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
            same_pools = bool(jnp.array_equal(kg, kr) and jnp.array_equal(vg, vr))
            same_pos = bool(np.array_equal(np.asarray(pg), want_pos) and np.array_equal(np.asarray(pr), want_pos))
            worst = max(worst, diff)
            print(f"{jnp.dtype(dtype).name} splits={splits} window={window}: max |diff| {diff:.2e}, pools equal "
                  f"{same_pools}, positions written {same_pos}")
            assert same_pools and same_pos and diff < 3e-2  # bf16 values, or f32 through TF32 dots
print("append ok, worst", worst)

# decode-time eviction: the per-stream logits the kernel stores, as probabilities, against the XLA path
from kvjax.decode_attention import stream_probs  # noqa: E402

for dtype in (jnp.bfloat16, jnp.float32):
    for splits in (1, 4):
        for reduce in ("mean", "max"):
            q, k, v, start, length, kn, vn, slot, p = case(6, 8, 4, 128, 700, dtype, 10 + splits)
            kw = dict(sm_scale=0.088, append=(kn, vn, slot), return_lse=True, stream_logits=720)
            ref = rda.ragged_decode_attention(q, k, v, start, length, **kw)
            got = rda.ragged_decode_attention(q, k, v, start, length, implementation="pallas", num_splits=splits, **kw)
            n = length + (slot >= 0)
            pr, pg = stream_probs(ref[3], ref[4], n, reduce), stream_probs(got[3], got[4], n, reduce)
            diff = float(jnp.max(jnp.abs(pg - pr)))
            sums = np.asarray(pg).sum(-1)  # mean over a group's heads of probabilities: each stream sums to 1
            print(f"probs {jnp.dtype(dtype).name} splits={splits} {reduce}: max |diff| {diff:.2e}, row sums "
                  f"{sums.min():.3f}..{sums.max():.3f}")
            assert diff < 2e-3
print("probs ok")

# prompt column sums (H2O / RoCo prefill on GPU): the Triton kernels against the chunked XLA pass
from kvjax.models.prompt_attention import causal_attention  # noqa: E402
from kvjax.pallas_kernels import prompt_column_sums as pcs  # noqa: E402

rng = np.random.default_rng(3)
for dtype in (jnp.bfloat16, jnp.float32):
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 2048, 128)), dtype)
    k = jnp.asarray(rng.normal(size=(2, 8, 2048, 128)), dtype)
    lengths = jnp.asarray([2048, 1500], jnp.int32)
    _, cs, sq = causal_attention(q, k, k, lengths, scale=0.088, column_squares=True, fused=False)
    got_cs, got_sq = pcs.prompt_column_sums(q, k, lengths, scale=0.088, column_squares=True, implementation="pallas")
    rel = float(jnp.max(jnp.abs(got_cs - cs)) / jnp.max(cs))
    rel2 = float(jnp.max(jnp.abs(got_sq - sq)) / jnp.max(sq))
    print(f"column sums {jnp.dtype(dtype).name}: max |diff| / max {rel:.2e} (colsum), {rel2:.2e} (colsq)")
    assert rel < 2e-2 and rel2 < 2e-2
print("column sums ok")
