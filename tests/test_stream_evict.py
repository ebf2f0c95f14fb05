"""stream_evict: one layer's decode-time eviction in one kernel. The GPU (Triton) kernel in interpret
mode, its jnp reference and `kvjax.evict_fused.decode_evict_fused` equal a copy of decode.py's
`_decode_evict` (the oracle, driven through kvjax.evict): the moved slots bit for bit, the statistics
to an ulp, on ragged streams (full, not
full, empty, inactive rows, a stream whose view runs past the pool's end, tied scores) with every
slot outside the streams poisoned; and the kernel lowers for GPU (Triton) and MLIR-verifies."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import Pools, Streams
from kvjax.decode_attention import stream_probs
from kvjax.evict import decode_evict
from kvjax.evict_fused import decode_evict_fused, kernel_rule, supports
from kvjax.pallas_kernels import _lowering_checks as lc
from kvjax.policies.base import DecodeEviction
from kvjax.policies.cake import CakeIndicator
from kvjax.policies.roco import RobustAttention
from kvjax.policies.scorers import AccumulatedAttention, LastQueryAttention

POISON_POS = -7777


def _oracle(scorer, ev, pools, st, length, probs, active, step_due, next_pos, width, model_axis=None):
    """The XLA eviction decode_step runs (kvjax.evict.decode_evict), the new token's statistics zero."""
    zeros = jnp.zeros(st.start.shape, jnp.float32)
    return decode_evict(scorer, ev, pools, st, length, probs, (zeros, zeros), active, step_due, next_pos, width,
                        model_axis)


def _state(b, h, g, d, width, seed, *, tail_short=True):
    """Random pools after a decode step's append: streams of capacity <= width laid out one after
    another (the last one ending at the pool's end, shorter than the view when `tail_short`),
    every slot outside them poisoned (NaN statistics and logits, pos -7777, k/v 1e9)."""
    rng = np.random.default_rng(seed)
    cap = rng.integers(width // 2, width + 1, size=(b, h))
    if tail_short:
        cap[:, -1] = width // 2 - 1
    gap = rng.integers(0, 3, size=(b, h))
    start = np.zeros((b, h), np.int32)
    for i in range(b):
        at = int(rng.integers(0, 4))
        for j in range(h):
            start[i, j] = at
            at += cap[i, j] + gap[i, j]
    start[:, -1] = np.maximum(start[:, -1], 0)
    p = int((start + cap).max())
    start[:, -1] = p - cap[:, -1]  # the last stream of every row ends at the pool's end
    next_pos = rng.integers(3 * width, 4 * width, size=b).astype(np.int32)
    active = rng.random(b) < 0.8
    active[0], active[-1] = True, False
    step_due = np.ones(b, bool)
    length0 = np.minimum(rng.integers(0, width + 1, size=(b, h)), cap - 1)
    budget = np.maximum(length0 - rng.integers(0, 2, size=(b, h)), 1)  # about half the streams are full
    length0[0, 0], budget[0, 0] = 0, 4  # an empty stream: only its new token
    length0[0, -1] = cap[0, -1] - 1  # the short last stream fills up
    budget[0, -1] = length0[0, -1]
    length = length0 + active[:, None]
    pos = np.full((b, p), POISON_POS, np.int32)
    score = np.full((b, p), np.nan, np.float32)
    score2 = np.full((b, p), np.nan, np.float32)
    k = np.full((b, p, d), 1e9, np.float32)
    v = np.full((b, p, d), -1e9, np.float32)
    logits = np.full((b, h, g, width), np.nan, np.float32)
    for i in range(b):
        for j in range(h):
            s, n0, n = start[i, j], length0[i, j], length[i, j]
            pos[i, s:s + n0] = rng.permutation(next_pos[i])[:n0]
            pos[i, s:s + min(n0, 3)] = np.arange(min(n0, 3))  # sinks
            if n > n0:
                pos[i, s + n0] = next_pos[i]
            score[i, s:s + n] = rng.integers(0, 6, size=n) / 8.0  # many ties
            score2[i, s:s + n] = rng.normal(size=n)
            k[i, s:s + n] = rng.normal(size=(n, d))
            v[i, s:s + n] = rng.normal(size=(n, d))
            lg = rng.normal(size=(g, n)).astype(np.float32)
            lg[:, ::3] = 0.5  # tied probabilities
            logits[i, j, :, :n] = lg
    valid = np.arange(width) < length[..., None]
    lse = np.asarray(jax.nn.logsumexp(jnp.where(valid[:, :, None], jnp.asarray(logits), -jnp.inf), axis=-1))
    lse = np.where(np.isfinite(lse), lse, np.inf).astype(np.float32)
    st = Streams(jnp.asarray(start), jnp.asarray(length0, jnp.int32), jnp.asarray(cap, jnp.int32),
                 jnp.asarray(budget, jnp.int32))
    pools = Pools(*(jnp.asarray(a) for a in (k, v, pos, score, score2)))
    return (pools, st, jnp.asarray(length, jnp.int32), jnp.asarray(logits), jnp.asarray(lse), jnp.asarray(active),
            jnp.asarray(step_due), jnp.asarray(next_pos))


SCORERS = {
    "h2o-mean": (AccumulatedAttention(), DecodeEviction(recent=4)),
    "h2o-max-sinks": (AccumulatedAttention(group_reduce="max"), DecodeEviction(recent=1, sinks=2)),
    "tova": (LastQueryAttention(), DecodeEviction()),
    "cake": (CakeIndicator(window=8, kernel=5), DecodeEviction(recent=8)),
    "roco": (RobustAttention(recent_ratio=0.25, sinks=2), DecodeEviction(recent=4, sinks=2)),
}
SHAPES = {"llama-like": (3, 4, 4, 16, 32), "smollm2-like": (2, 3, 3, 8, 24),  # B, H, G, D, W (24: padded to 32)
          "llama8b-heads": (3, 8, 4, 16, 64)}


def _assert_same(got, want, what):
    # the moved slots (k, v, pos) and lengths exactly; the statistics to an ulp: the sums run in the same
    # order, but XLA:CPU's vectorised and scalar exp may round differently (seen with jax 0.12.1 on the
    # interpreted kernel reading the raw buffer)
    (gp, gl), (wp, wl) = got, want
    for n in ("k", "v", "pos"):
        np.testing.assert_array_equal(np.asarray(getattr(gp, n)), np.asarray(getattr(wp, n)), err_msg=f"{what}: {n}")
    for n in ("score", "score2"):
        np.testing.assert_allclose(np.asarray(getattr(gp, n)), np.asarray(getattr(wp, n)), rtol=1e-6, atol=1e-12,
                                   err_msg=f"{what}: {n}")
    np.testing.assert_array_equal(np.asarray(gl), np.asarray(wl), err_msg=f"{what}: length")


def _run_all(name, shape, seed=0, step_due=None):
    scorer, ev = SCORERS[name]
    b, h, g, d, w = shape
    pools, st, length, logits, lse, active, due, next_pos = _state(b, h, g, d, w, seed)
    if step_due is not None:
        due = jnp.asarray(step_due)
    probs = stream_probs(lse, logits, length, scorer.group_reduce)
    want = jax.jit(lambda *a: _oracle(scorer, ev, *a, width=w))(pools, st, length, probs, active, due, next_pos)
    args = (pools, st, length, logits, lse, active, due, next_pos)
    ref = jax.jit(functools.partial(decode_evict_fused, scorer, ev, width=w, implementation="xla"))(*args)
    kern = decode_evict_fused(scorer, ev, *args, w, interpret=True)
    return want, ref, kern, (pools, length)


ORACLE_RUNS = [(n, s) for s in ("llama-like", "smollm2-like") for n in SCORERS] + [
    ("tova", "llama8b-heads"), ("cake", "llama8b-heads"), ("roco", "llama8b-heads")]


@pytest.mark.parametrize("name,shape", ORACLE_RUNS, ids=["-".join(r) for r in ORACLE_RUNS])
def test_kernel_equals_reference_equals_decode_oracle(name, shape):
    want, ref, kern, (pools, length) = _run_all(name, SHAPES[shape])
    _assert_same(ref, want, "reference vs oracle")
    _assert_same(kern, want, "kernel vs oracle")
    evicted = np.asarray(want[1]) < np.asarray(length)
    assert evicted.any() and not evicted.all()  # the case exercises both


def test_rows_not_due_do_not_evict_but_update_statistics():
    b = SHAPES["llama-like"][0]
    want, ref, kern, (pools, length) = _run_all("h2o-mean", SHAPES["llama-like"], seed=3,
                                                step_due=np.arange(b) != 0)
    _assert_same(kern, want, "kernel vs oracle")
    _assert_same(ref, want, "reference vs oracle")
    np.testing.assert_array_equal(np.asarray(kern[1])[0], np.asarray(length)[0])


def test_supports_the_known_scorers_only():
    kw = dict(head_dim=128, width=1024, backend="gpu")
    for scorer, ev in SCORERS.values():
        assert supports(scorer, ev, **kw)
        assert not supports(scorer, DecodeEviction(every=2), **kw)
        assert not supports(scorer, ev, head_dim=96, width=1024, backend="gpu")
        assert not supports(scorer, ev, head_dim=128, width=1024, backend="tpu")
    assert not supports(LastQueryAttention(), DecodeEviction(), model_axis="model", **kw)
    assert supports(AccumulatedAttention(), DecodeEviction(), model_axis="model", **kw)
    assert kernel_rule(RobustAttention())["robust"]


@pytest.mark.parametrize("name,w", [("h2o-mean", 1024), ("tova", 1024), ("cake", 1040), ("roco", 1040)])
def test_kernel_lowers_for_gpu_triton(name, w):
    # w = 1040: a plan's narrowed width (budget 1024 + headroom 16), not a power of two: 2048 lanes, masked
    scorer, ev = SCORERS[name]
    b, h, g, d = 2, 3, 3, 64
    pools, st, length, logits, lse, active, due, next_pos = _state(b, h, g, d, 64, 0)
    p = 4096
    pools = Pools(jnp.zeros((b, p, d), jnp.bfloat16), jnp.zeros((b, p, d), jnp.bfloat16), jnp.zeros((b, p), jnp.int32),
                  jnp.zeros((b, p), jnp.float32), jnp.zeros((b, p), jnp.float32))
    logits = jnp.zeros((b, h, 16, w + 64), jnp.float32)  # the attention kernel's raw buffer: G' rows, pad columns
    fn = lambda pools, st, length, logits, lse, active, due, next_pos: decode_evict_fused(  # noqa: E731
        scorer, ev, pools, st, length, logits, lse, active, due, next_pos, w, logits_offset=32,
        heads_per_program=h if scorer.layer_shared else None)
    try:
        n = lc.lower_for_gpu(fn, pools, st, length, logits, lse, active, due, next_pos)
    except lc.GpuLoweringUnavailable as e:
        pytest.skip(f"this JAX lowers Pallas-Triton only with a GPU attached: {e}")
    assert n >= 1


def test_raw_attention_buffer_with_offset_equals_oracle():
    # the attention kernel's own logits buffer: G' = 16 rows (those past G unused), `pad` columns
    # before offset 0 and slack after, never initialised (NaN here): no slice, no copy
    scorer, ev = SCORERS["cake"]
    b, h, g, d, w = SHAPES["llama-like"]
    pools, st, length, logits, lse, active, due, next_pos = _state(b, h, g, d, w, 5)
    probs = stream_probs(lse, logits, length, scorer.group_reduce)
    want = _oracle(scorer, ev, pools, st, length, probs, active, due, next_pos, w)
    raw = jnp.full((b, h, 16, 32 + w + 32), jnp.nan, jnp.float32).at[:, :, :g, 32:32 + w].set(logits)
    got = decode_evict_fused(scorer, ev, pools, st, length, raw, lse, active, due, next_pos, w, logits_offset=32,
                             interpret=True)
    _assert_same(got, want, "raw buffer vs oracle")


def test_eight_query_heads_per_group_match_up_to_summation_order():
    # XLA sums a group of 8 in its own order: the statistics differ in the last bits, the choices not
    want, ref, kern, _ = _run_all("h2o-mean", (2, 8, 8, 16, 32), seed=1)
    for got in (ref, kern):
        for n in ("k", "v", "pos", "score2"):
            np.testing.assert_array_equal(np.asarray(getattr(got[0], n)), np.asarray(getattr(want[0], n)))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_allclose(np.asarray(got[0].score), np.asarray(want[0].score), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,per_program", [("tova", 4), ("tova", 2), ("h2o-mean", 2)])
def test_several_streams_per_program_equal_oracle(name, per_program):
    scorer, ev = SCORERS[name]
    b, h, g, d, w = SHAPES["llama-like"]
    pools, st, length, logits, lse, active, due, next_pos = _state(b, h, g, d, w, 7)
    probs = stream_probs(lse, logits, length, scorer.group_reduce)
    want = _oracle(scorer, ev, pools, st, length, probs, active, due, next_pos, w)
    got = decode_evict_fused(scorer, ev, pools, st, length, logits, lse, active, due, next_pos, w, interpret=True,
                             heads_per_program=per_program)
    _assert_same(got, want, f"{per_program} streams per program vs oracle")


def test_roco_scope_decides_the_victim():
    # the kernel follows RoCo's volatile set, not the lowest mean alone: a wider scope (recent_ratio 0)
    # evicts other slots on this state, and the kernel still equals the oracle with it
    b, h, g, d, w = SHAPES["llama8b-heads"]
    pools, st, length, logits, lse, active, due, next_pos = _state(b, h, g, d, w, 0)
    probs = stream_probs(lse, logits, length, "mean")
    ev = SCORERS["roco"][1]
    runs = []
    for ratio in (0.25, 0.0):
        scorer = RobustAttention(recent_ratio=ratio, sinks=2)
        want = _oracle(scorer, ev, pools, st, length, probs, active, due, next_pos, w)
        got = decode_evict_fused(scorer, ev, pools, st, length, logits, lse, active, due, next_pos, w, interpret=True)
        _assert_same(got, want, f"recent_ratio {ratio}: kernel vs oracle")
        runs.append(np.asarray(got[0].pos))
    assert (runs[0] != runs[1]).any()


@pytest.mark.parametrize("walk", [0, 1, 4])
def test_roco_victim_search_equals_the_sorted_rule(walk):
    # the kernel's victim search (a walk in mean order, then the exact threshold search) on single
    # views, against the reference's sort: ties in sigma and mu, no volatile slot, all but one volatile
    from kvjax.pallas_kernels.stream_evict import _robust_key_sorted, _robust_victim_search
    rng = np.random.default_rng(11)
    w = 64
    j = jnp.arange(w)
    search = jax.jit(functools.partial(_robust_victim_search, walk=walk))
    for trial in range(40):
        cand = rng.random(w) < 0.8
        sigma = rng.integers(0, 6, size=w) / 7.0 if trial % 2 else rng.random(w)
        mu = rng.integers(0, 4, size=w) / 5.0 if trial % 3 else sigma * 0.5 + rng.random(w) * 0.1
        n_cand = int(cand.sum())
        n_vol = [0, n_cand - 1, n_cand // 10, int(rng.integers(0, n_cand))][trial % 4]
        args = (jnp.asarray(cand), jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32), jnp.int32(n_vol))
        want = int(jnp.argmin(_robust_key_sorted(*args[:3], args[3])))
        assert int(search(j, *args)) == want, (trial, walk)


def test_fill_from_tail_keeps_exactly_the_survivors_packed_at_the_front():
    # a chunk's eviction: up to k victims per stream leave, the stream's last survivors fill their
    # slots; oracle: the survivors of each stream, each slot's fields moved together
    from kvjax.evict import fill_from_tail

    rng = np.random.default_rng(3)
    b, h, w, k = 2, 3, 16, 4
    fill = jax.jit(lambda views, victims, length: fill_from_tail(views, victims, length, k))
    for _ in range(20):
        length = rng.integers(0, w + 1, (b, h))
        victims = np.zeros((b, h, w), bool)
        for i in range(b):
            for j in range(h):
                m = int(rng.integers(0, min(k, length[i, j]) + 1))
                victims[i, j, rng.choice(length[i, j], m, replace=False)] = True
        val = rng.normal(size=(b, h, w, 2)).astype(np.float32)
        pos = np.broadcast_to(np.arange(w), (b, h, w)).astype(np.int32)
        (val2, pos2), new_len = jax.tree.map(np.asarray, fill((val, pos), victims, length))
        for i in range(b):
            for j in range(h):
                survivors = [x for x in range(length[i, j]) if not victims[i, j, x]]
                n = new_len[i, j]
                assert n == len(survivors) and sorted(pos2[i, j, :n].tolist()) == survivors
                np.testing.assert_array_equal(val2[i, j, :n], val[i, j, pos2[i, j, :n]])
