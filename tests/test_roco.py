"""RoCo / EasyKV on a tiny random model (torch-free): the moments and the eviction rule against a
numpy re-implementation, the chunked prefill against a numpy replay of layer 0, bounded stream
occupancy, decode-time eviction, streaming perplexity and batching."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.compress import chunked
from kvjax.ppl import perplexity
from kvjax.prompts import length_bucket
from kvjax.decode import decode_step
from kvjax.evict import smallest as _smallest
from kvjax.models.prompt_attention import causal_attention
from kvjax.models.llama import embed, layer_qkv, rope_inv_freq
from kvjax.policies import H2O, SnapKV
from kvjax.policies.base import PolicyError
from kvjax.policies.roco import RoCo, RobustAttention, running_moments
from test_generate import _tiny_params


@pytest.fixture(scope="module")
def params():
    return _tiny_params(max_position_embeddings=8192)


def _prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


def _encode(params, prompts, policy, bucket=None):
    """Chunked prefill of a batch through the jitted core: (cache, last logits, peak lengths, plan)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    bucket = bucket or length_bucket(int(lengths.max()), params.config.max_position_embeddings)
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    plan = chunked.make_plan(policy, params.config, bucket, 0)
    cache, last, peak, _ = chunked.encode(params.weights, tokens, lengths, policy, None, config=params.config,
                                          plan=plan, chunk=chunked.chunk_size(policy, None, plan.stream_bound[0]),
                                          prefix=None, with_nll=False)
    return cache, np.asarray(last), np.asarray(peak), plan


# ----------------------------------------------------------------------------------------------
# the rule, in numpy


def numpy_victims(pos, s, q, seen, budget, *, sinks, recent, ratio):
    """Indices (into pos) EasyKV's h2o_head_std_avg rule evicts from one stream, as roco.py states it."""
    pos = np.asarray(pos)
    m = len(pos) - budget
    if m <= 0:
        return []
    n = seen - pos
    mu = s / n
    sigma = np.sqrt(np.maximum(q / n - mu**2, 0))
    unprotected = [i for i, p in enumerate(pos) if sinks <= p <= seen - 1 - recent]
    scope = max(budget - math.floor(budget * ratio) - sinks, m)
    by_sigma = sorted(unprotected, key=lambda i: -sigma[i])
    candidates = by_sigma[max(len(unprotected) - scope, 0):]
    return sorted(sorted(candidates, key=lambda i: mu[i])[:m])


def _victims_jax(scorer, pos, s, q, seen, budget, recent):
    """The same choice through RobustAttention.stream_eviction_key and the engine's selection."""
    pos_r, s_r, q_r = (jnp.asarray(a)[None] for a in (pos, s, q))
    protected = (pos_r > seen - 1 - recent) | (pos_r < scorer.sinks)
    cand = ~protected[:, None, :]
    excess = jnp.asarray([[len(pos) - budget]])
    key = scorer.stream_eviction_key(s_r, q_r, pos_r, jnp.asarray([seen]), cand, jnp.asarray([[budget]]), excess)
    return np.flatnonzero(np.asarray(_smallest(key, excess, len(pos)))[0, 0]).tolist()


def test_moments_hand_computed():
    # token at position 2 seen by 3 queries with attention 0.5, 0.1, 0.3; token 4 seen once (0.7)
    s = jnp.asarray([[0.9, 0.7]])
    q = jnp.asarray([[0.5**2 + 0.1**2 + 0.3**2, 0.0]]).at[0, 1].set(s[0, 1] ** 2)
    mu, sigma = running_moments(s, q, jnp.asarray([[2, 4]]), jnp.asarray([5]))
    np.testing.assert_allclose(np.asarray(mu), [[0.3, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sigma), [[np.std([0.5, 0.1, 0.3]), 0.0]], rtol=1e-5, atol=1e-7)


def test_volatile_tokens_are_not_candidates_hand_case():
    # 8 tokens (positions 0..7), budget 6: evict m = 2. sinks 1 and recent 2 protect 0, 6, 7.
    # R = floor(6 * 0.34) = 2, scope = max(6 - 2 - 1, 2) = 3 of the 5 unprotected: the 2 with the
    # largest sigma (positions 1, 2) are volatile; of 3, 4, 5 the two smallest mu (3, 4) go.
    pos = np.arange(8)
    seen = 8
    n = seen - pos
    mu = np.array([0.9, 0.01, 0.02, 0.03, 0.04, 0.05, 0.9, 0.9])
    sigma = np.array([0.0, 0.5, 0.4, 0.0, 0.1, 0.2, 0.0, 0.0])
    s, q = mu * n, (sigma**2 + mu**2) * n
    rule = dict(sinks=1, recent=2, ratio=0.34)
    assert numpy_victims(pos, s, q, seen, 6, **rule) == [3, 4]
    scorer = RobustAttention(0.34, sinks=1)
    assert _victims_jax(scorer, pos, s.astype(np.float32), q.astype(np.float32), seen, 6, recent=2) == [3, 4]
    # H2O-like ranking by mu alone would take 1 and 2: the scope is what differs
    assert sorted(np.argsort(np.where((pos >= 1) & (pos <= 5), mu, np.inf))[:2].tolist()) == [1, 2]


def _plain_mu_victims(pos, s, seen, m, *, sinks, recent):
    """What ranking by mu alone (no robustness scope) would evict."""
    mu = s / (seen - pos)
    unprotected = [i for i, p in enumerate(pos) if sinks <= p <= seen - 1 - recent]
    return sorted(sorted(unprotected, key=lambda i: mu[i])[:m])


@pytest.mark.parametrize("seed,m", [(0, 1), (1, 3), (2, 7)])
def test_eviction_choice_equals_numpy_rule_on_explicit_attention(seed, m):
    rng = np.random.default_rng(seed)
    n_tok, budget = 40, 40 - m
    # explicit causal attention of 40 queries over 40 keys (rows sum to 1); a few "spiky" keys get
    # almost nothing except from one query: a small mean but a large deviation
    logits = rng.normal(size=(n_tok, n_tok)) * 0.5
    for j in rng.choice(np.arange(5, 25), 6, replace=False):
        logits[:, j] -= 6
        logits[rng.integers(j + 1, n_tok), j] += 9
    logits[np.triu_indices(n_tok, 1)] = -np.inf
    a = np.exp(logits - logits.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    s, q = a.sum(0), (a**2).sum(0)
    pos = np.arange(n_tok)
    victims = numpy_victims(pos, s, q, n_tok, budget, sinks=4, recent=10, ratio=0.5)
    assert victims != _plain_mu_victims(pos, s, n_tok, m, sinks=4, recent=10)  # the scope matters here
    perm = rng.permutation(n_tok)  # slots hold positions in any order
    want = sorted(perm.tolist().index(p) for p in victims)
    got = _victims_jax(RobustAttention(0.5, sinks=4), perm, s[perm].astype(np.float32), q[perm].astype(np.float32),
                       n_tok, budget, recent=10)
    assert len(want) == m and got == want


def test_column_squares_equal_explicit_attention():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 2, 3, 37, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, 37, 8)), jnp.float32)
    lengths = jnp.asarray([37, 21])
    out0, colsum0 = causal_attention(q, k, k, lengths, scale=0.35, chunk=16, column_sums=True)
    out, colsum, colsq = causal_attention(q, k, k, lengths, scale=0.35, chunk=16, column_squares=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out0))
    np.testing.assert_array_equal(np.asarray(colsum), np.asarray(colsum0))
    logits = np.einsum("bhgtd,bhsd->bhgts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 0.35
    for b, n in enumerate([37, 21]):
        lg = np.where(np.tril(np.ones((n, n), bool)), logits[b, :, :, :n, :n], -np.inf)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(colsq)[b, :, :n], (p.mean(1) ** 2).sum(1), atol=1e-5)
        np.testing.assert_allclose(np.asarray(colsq)[b, :, n:], 0, atol=0)


# ----------------------------------------------------------------------------------------------
# chunked prefill


def _layer0_replay(params, prompt, budget, chunk, *, sinks, recent, ratio):
    """Numpy replay of RoCo's encoding on layer 0 (its input does not depend on the cache):
    per KV head, the kept positions, S, and how many evictions the robustness scope changed."""
    cfg = params.config
    lw = jax.tree_util.tree_map(lambda a: a[0], params.weights.layers)
    x = embed(params.weights, jnp.asarray(prompt)[None])
    pos = jnp.arange(len(prompt))[None]
    q, k, _ = layer_qkv(lw, x, pos, cfg, rope_inv_freq(cfg))
    q, k = np.asarray(q[0], np.float64), np.asarray(k[0], np.float64)  # [H, G, T, D], [H, T, D]
    n = len(prompt)
    out = []
    for h in range(cfg.num_kv_heads):
        s, sq = np.zeros(n), np.zeros(n)

        def attend(t, vis):
            lg = q[h, :, t] @ k[h, vis].T * cfg.attention_scale
            p = np.exp(lg - lg.max(-1, keepdims=True))
            p = (p / p.sum(-1, keepdims=True)).mean(0)
            s[vis] += p
            sq[vis] += p * p

        kept, changed = list(range(min(budget, n))), 0
        for t in kept:
            attend(t, np.arange(t + 1))
        nxt = len(kept)
        while nxt < n:
            new = list(range(nxt, min(nxt + chunk, n)))
            kept += new
            for t in new:
                attend(t, np.array([j for j in kept if j <= t]))
            nxt = new[-1] + 1
            kp = np.array(kept)
            gone = numpy_victims(kp, s[kp], sq[kp], nxt, budget, sinks=sinks, recent=recent, ratio=ratio)
            changed += gone != _plain_mu_victims(kp, s[kp], nxt, len(gone), sinks=sinks, recent=recent)
            kept = [p for i, p in enumerate(kept) if i not in set(gone)]
        out.append((sorted(kept), s, changed))
    return out


#: most tests share one compile: this policy on one row padded to 512 tokens
ROCO = RoCo(budget=64, chunk=16)


def test_chunked_prefill_layer0_equals_numpy_replay(params):
    prompt = _prompt(300, seed=5)
    # a wide robustness scope (R = 32, so 38 of the 66 unprotected tokens are volatile at each
    # eviction) makes sigma decide often; recent_ratio is a leaf: same compile as ROCO
    policy = RoCo(budget=64, chunk=16, recent_ratio=0.5)
    cache, _, _, _ = _encode(params, [prompt], policy, bucket=512)
    kept = kvjax.kept_positions(cache)[0][0]
    pos, score = np.asarray(cache.pools.pos)[0], np.asarray(cache.pools.score)[0]
    start, length = np.asarray(cache.streams.start)[0, 0], np.asarray(cache.streams.length)[0, 0]
    for h, (want, s, changed) in enumerate(_layer0_replay(params, prompt, 64, 16, sinks=4, recent=10, ratio=0.5)):
        assert changed > 0  # the scope changed some eviction: the comparison tests it
        np.testing.assert_array_equal(kept[h], want, err_msg=f"head {h}")
        sl = slice(start[h], start[h] + length[h])
        np.testing.assert_allclose(score[sl], s[pos[sl]], rtol=1e-4, err_msg=f"head {h}")


def test_4k_prompt_never_holds_more_than_budget_plus_chunk(params):
    policy = RoCo(budget=256, chunk=64)
    cache, _, peak, plan = _encode(params, [_prompt(4096, seed=1)], policy)
    cfg = params.config
    assert peak.max() == 256 + 64  # every stream reached, and never passed, budget + chunk
    assert (np.asarray(cache.streams.length) == 256).all()
    assert (np.asarray(cache.streams.cap) == 256 + 64).all()
    assert cache.layout.pool_size == cfg.num_layers * cfg.num_kv_heads * (256 + 64)
    for streams in kvjax.kept_positions(cache):
        for pos in streams[0]:
            assert list(pos[:4]) == [0, 1, 2, 3] and list(pos[-10:]) == list(range(4086, 4096))


def test_default_chunk_is_an_eighth_of_the_budget(params):
    """RoCo's default chunk follows its budget (K / 8, a power of two in [16, 256]): the plan's
    headroom, and so the most a stream holds while encoding, is K + chunk."""
    cfg = params.config
    headroom = lambda pol, n=8192: chunked.make_plan(pol, cfg, n, 0).headroom  # noqa: E731
    assert [chunked.auto_chunk(k) for k in (64, 255, 256, 1023, 1024, 4096)] == [16, 16, 32, 64, 128, 256]
    assert headroom(RoCo(budget=1024)) == 128 and headroom(RoCo(budget=256)) == 32
    assert headroom(RoCo(budget=0.125), 4096) == 64  # a ratio: K = 512 of this bucket
    assert headroom(RoCo(budget=1024, chunk=8)) == 8  # an explicit chunk wins
    assert headroom(RoCo(budget=1024), 300) == 32  # a short prompt: K = the whole prompt (300 tokens)


def test_chunk_of_one_equals_prefix_then_decode_steps(params):
    """The chunked prefill (chunk 1, compaction) and decode_step (swap-remove) apply the same rule."""
    prompt = _prompt(120, seed=2)
    policy = RoCo(budget=48, chunk=1)
    cache_a, last_a, _, plan = _encode(params, [prompt], policy, bucket=128)
    cache, _, _, _ = _encode(params, [prompt[:48]], policy, bucket=128)
    step = jax.jit(functools.partial(decode_step, config=params.config, plan=plan))
    for tok in prompt[48:]:
        cache, logits = step(params.weights, cache, jnp.asarray([tok]), policy)
    for la, lb in zip(kvjax.kept_positions(cache_a), kvjax.kept_positions(cache)):
        for a, b in zip(la[0], lb[0]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(last_a[0], np.asarray(logits)[0], atol=1e-4)


def test_decode_keeps_every_stream_at_the_budget(params):
    policy = ROCO
    cache, last, _, plan = _encode(params, [_prompt(450, seed=3)], policy, bucket=512)
    step = jax.jit(functools.partial(decode_step, config=params.config, plan=plan))
    tok = jnp.argmax(jnp.asarray(last), -1)
    for i in range(32):
        cache, logits = step(params.weights, cache, tok, policy)
        tok = jnp.argmax(logits, -1)
        assert (np.asarray(cache.streams.length) == 64).all(), f"step {i}"
    for streams in kvjax.kept_positions(cache):
        for pos in streams[0]:
            assert list(pos[:4]) == [0, 1, 2, 3] and pos[-1] == 481 and len(set(pos)) == 64


def test_batch_of_different_lengths_equals_each_row_alone(params):
    policy = ROCO
    prompts = [_prompt(500, seed=4), _prompt(330, seed=6)]
    cache, last, _, _ = _encode(params, prompts, policy)
    kept = kvjax.kept_positions(cache)
    for i, p in enumerate(prompts):
        c1, l1, _, _ = _encode(params, [p], policy)  # row 1 alone is padded to 384, not 512
        for la, lb in zip(kept, kvjax.kept_positions(c1)):
            for a, b in zip(la[i], lb[0]):
                np.testing.assert_array_equal(a, b, err_msg=f"row {i}")
        np.testing.assert_allclose(last[i], l1[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# perplexity


def _forward_nll(params, tokens):
    logits = np.asarray(kvjax.forward(params, np.asarray(tokens)[None]), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), tokens[1:]]


@pytest.mark.slow
def test_full_cache_perplexity_equals_forward(params):
    texts = [_prompt(300, seed=7), _prompt(170, seed=8)]
    out = perplexity(params, texts, None, chunk=32)
    for text, nll, ppl, n in zip(texts, out["nll"], out["perplexity"], out["tokens"]):
        ref = _forward_nll(params, text)
        assert n == len(text)
        np.testing.assert_allclose(nll, ref, atol=2e-5)
        np.testing.assert_allclose(ppl, np.exp(ref.mean()), rtol=1e-5)
    roco = perplexity(params, texts[0].tolist(), ROCO)
    assert roco["tokens"] == 300 and np.isfinite(roco["perplexity"])
    # the first tokens are read before anything is evicted: same as the full cache
    np.testing.assert_allclose(roco["nll"][:63], out["nll"][0][:63], atol=2e-5)
    assert not np.allclose(roco["nll"][100:], out["nll"][0][100:], atol=1e-3)


def test_full_cache_perplexity_equals_forward_with_a_sliding_window():
    params = _tiny_params("mistral", sliding_window=24)
    text = _prompt(150, seed=9)
    out = perplexity(params, text, None, chunk=16)
    np.testing.assert_allclose(out["nll"], _forward_nll(params, text), atol=2e-5)


def test_perplexity_errors(params):
    text = _prompt(100)
    with pytest.raises(ValueError, match="covers the whole text"):
        perplexity(params, text, RoCo(budget=128))
    with pytest.raises(ValueError, match="positions"):
        perplexity(params, _prompt(9000), RoCo(budget=64))
    with pytest.raises(TypeError, match="Policy"):
        perplexity(params, text, "roco")
    with pytest.raises(ValueError, match="cannot stream"):
        perplexity(params, text, SnapKV(budget=64, window=8))
    out = perplexity(params, text, H2O(budget=48, recent=8), chunk=8)  # H2O streams too
    assert np.isfinite(out["perplexity"])


def test_policy_options_are_checked():
    with pytest.raises(PolicyError, match="recent_ratio"):
        RoCo(budget=64, recent_ratio=1.5)
    with pytest.raises(PolicyError, match="exceed the budget"):
        RoCo(budget=12, recent=10, sinks=4)
    with pytest.raises(PolicyError, match="array"):
        RoCo(budget=np.array([64, 64]))
    with pytest.raises(PolicyError, match="chunk"):
        RoCo(budget=64, chunk=0)
