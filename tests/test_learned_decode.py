"""Learned(decode=True) (issue 16): the trained scorer evicts while decoding. Checked against an
oracle that decodes over the full history with a mask of kept positions per (layer, KV head), in
numpy: every token scored on its own by kvjax.learned.model (`token_features` + `score`), prompt
tokens with their prefill features, each fed token at its position as the last token of the text;
greedy decoding (or the text itself, for streaming perplexity), float32."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import policies as P
from kvjax.cache import kept_positions
from kvjax.learned.model import FEATURES, init_params, num_features, score, token_features
from kvjax.learned.store import TrainedScorer, meta_for
from kvjax.models import embed, final_logits, layer_qkv, mlp, rope_inv_freq
from kvjax.models.llama import attn_output
from test_generate import _prompt, _tiny_params

BUDGET, WINDOW, SINKS, RECENT = 24, 4, 2, 3


@pytest.fixture(scope="module")
def tiny():
    return _tiny_params()


@pytest.fixture(scope="module")
def scorer(tiny):
    return random_scorer(tiny)


def random_scorer(tiny):
    """A random MLP scorer with every feature, read as listwise (so prefill normalises its scores to
    log-shares, which decode must not mix with raw ones); training is tested in test_learned.py."""
    cfg = tiny.config
    f = num_features(FEATURES, cfg.head_dim)
    shape = (cfg.num_layers, cfg.num_kv_heads, f)
    params = init_params(jax.random.key(3), "mlp", cfg.num_layers, cfg.num_kv_heads, f, 16, np.zeros(shape),
                         np.full(shape, 0.5))
    return TrainedScorer(params, meta_for(cfg, "tiny", FEATURES, "mlp", 16, target={"loss": "listwise"}))


@functools.lru_cache(maxsize=None)
def _layer_parts(config, features):
    """The model's own layer functions, jitted, around an attention the oracle computes itself:
    (q, k, v) = qkv(lw, x, positions); x = post(lw, x, attention output); s = scored(...)."""
    inv = rope_inv_freq(config)
    qkv = jax.jit(lambda lw, x, positions: layer_qkv(lw, x, positions, config, inv))
    post = jax.jit(lambda lw, x, out: mlp(lw, x + attn_output(lw, out.astype(x.dtype), config), config))
    # the scorer's raw scores of tokens at `positions` of a text ending at `end`
    scored = jax.jit(lambda params, k, v, positions, end, layer: score(
        params, token_features(k, v, positions, inv, features, end[None]), layer)[0])
    return qkv, post, jax.jit(lambda w, x: final_logits(w, x, config)), scored


def _policy(scorer, budget=BUDGET, **kw):
    return P.Learned(scorer, budget=budget, window=WINDOW, sinks=SINKS, **dict(dict(decode=True, recent=RECENT), **kw))


def _attention(q, keys, values, scale):
    """q [G, D]; keys, values [N, D] -> [G, D] (float64 softmax)."""
    logits = q.astype(np.float64) @ keys.astype(np.float64).T * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ values.astype(np.float64)


def oracle(params, scorer, prompt, n_new, *, budget=BUDGET, decode=True, text=None):
    """Decode `n_new` tokens greedily (or feed `text[len(prompt):]`) with every key/value kept and a
    set of kept positions per (layer, KV head): the prompt attends causally over itself; each stream
    keeps its prompt's top `budget` scores (the first SINKS and last WINDOW forced); each fed token is
    scored alone, at its position, as the text's last token (distance 0), joins every stream and
    attends over the kept set; then, with `decode`, a stream above `budget` drops its lowest-scored
    token that is neither among the first SINKS nor the last RECENT positions.
    Returns (greedy tokens, kept [L][H] sorted positions, logits [position] -> [V])."""
    cfg, w = params.config, params.weights
    n_layers, h, g, d = cfg.num_layers, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    qkv, post, logits_of, scored = _layer_parts(cfg, scorer.meta.features)
    layers = [jax.tree_util.tree_map(lambda a, i=i: a[i], w.layers) for i in range(n_layers)]
    n = len(prompt)
    keys, values, scores = [None] * n_layers, [None] * n_layers, [None] * n_layers
    kept = [[None] * h for _ in range(n_layers)]

    x = embed(w, jnp.asarray(prompt)[None])
    for layer in range(n_layers):
        q, k, v = (np.asarray(a[0]) for a in qkv(layers[layer], x, jnp.arange(n)[None]))
        keys[layer], values[layer] = k, v
        out = np.zeros((h, g, n, d))
        for i in range(n):
            for hh in range(h):
                out[hh, :, i] = _attention(q[hh, :, i], k[hh, :i + 1], v[hh, :i + 1], cfg.attention_scale)
        x = post(layers[layer], x, jnp.asarray(out[None], jnp.float32))
        scores[layer] = np.asarray(scored(scorer.params, k[None], v[None], jnp.arange(n), n, layer))
        forced = (np.arange(n) < SINKS) | (np.arange(n) >= n - WINDOW)
        for hh in range(h):
            order = sorted(range(n), key=lambda j: (not forced[j], -scores[layer][hh, j]))
            kept[layer][hh] = set(order[:budget])
    logits = {i: row for i, row in enumerate(np.asarray(logits_of(w, x))[0])}
    tokens = [int(np.argmax(logits[n - 1]))]
    fed = list(text[n:-1]) if text is not None else None
    for step in range((len(fed) if fed is not None else n_new - 1)):
        p = n + step
        tok = fed[step] if fed is not None else tokens[-1]
        x = embed(w, jnp.asarray([[tok]]))
        for layer in range(n_layers):
            q, k, v = (np.asarray(a[0]) for a in qkv(layers[layer], x, jnp.asarray([[p]])))
            keys[layer] = np.concatenate([keys[layer], k], axis=1)
            values[layer] = np.concatenate([values[layer], v], axis=1)
            new = scored(scorer.params, k[None], v[None], jnp.asarray([p]), p + 1, layer)
            scores[layer] = np.concatenate([scores[layer], np.asarray(new)], axis=1)
            out = np.zeros((h, g, 1, d))
            for hh in range(h):
                kept[layer][hh].add(p)
                idx = sorted(kept[layer][hh])
                out[hh, :, 0] = _attention(q[hh, :, 0], keys[layer][hh, idx], values[layer][hh, idx],
                                           cfg.attention_scale)
            x = post(layers[layer], x, jnp.asarray(out[None], jnp.float32))
            for hh in range(h):
                cand = [j for j in kept[layer][hh] if not (j > p - RECENT or j < SINKS)]
                if decode and len(kept[layer][hh]) > budget and cand:
                    kept[layer][hh].remove(min(cand, key=lambda j: scores[layer][hh, j]))
        logits[p] = np.asarray(logits_of(w, x))[0, 0]
        tokens.append(int(np.argmax(logits[p])))
    return tokens, [[sorted(s) for s in row] for row in kept], logits


def _kept(out_cache, row):
    return [[np.asarray(hh).tolist() for hh in layer[row]] for layer in kept_positions(out_cache)]


@pytest.mark.slow
def test_kept_positions_and_tokens_equal_the_oracle_for_a_ragged_batch(tiny, scorer):
    # one prompt longer than the budget (evicts from the first step), one shorter (fills up first)
    prompts = [_prompt(40, seed=1), _prompt(18, seed=2)]
    n_new = 16
    out = kvjax.generate(tiny, prompts, policy=_policy(scorer), max_new_tokens=n_new)
    for row, prompt in enumerate(prompts):
        tokens, kept, _ = oracle(tiny, scorer, prompt, n_new)
        assert out.tokens[row] == tokens, row
        got = _kept(out.cache, row)
        assert got == kept, row
        fed = len(prompt) + n_new - 1
        for layer in got:
            for hh in layer:
                assert len(hh) == min(BUDGET, fed)
                assert set(range(SINKS)) | set(range(fed - RECENT, fed)) <= set(hh)
        # new tokens compete with prompt tokens: some are evicted, some outlive the recent window
        generated = set(range(len(prompt), fed))
        assert any(not generated <= set(hh) for layer in got for hh in layer), row
        assert any(set(hh) & (generated - set(range(fed - RECENT, fed))) for layer in got for hh in layer), row
    prefill_only = kvjax.generate(tiny, prompts[:1], policy=_policy(scorer, decode=False, recent=None),
                                  max_new_tokens=n_new)
    assert any(len(hh) > BUDGET for layer in kept_positions(prefill_only.cache) for hh in layer[0])


def test_decode_false_is_todays_prefill_only_policy(tiny, scorer):
    """Without the option, the prompt is compressed once and every generated token is kept."""
    prompt = _prompt(40, seed=3)
    default = P.Learned(scorer, budget=BUDGET, window=WINDOW, sinks=SINKS)
    assert default.decode_eviction is None and not default.decode
    out = kvjax.generate(tiny, [prompt], policy=default, max_new_tokens=8)
    tokens, kept, _ = oracle(tiny, scorer, prompt, 8, decode=False)
    assert out.tokens[0] == tokens and _kept(out.cache, 0) == kept
    again = kvjax.generate(tiny, [prompt], policy=P.Learned(scorer, BUDGET, WINDOW, SINKS, decode=False),
                           max_new_tokens=8)
    assert again.tokens == out.tokens and _kept(again.cache, 0) == kept


def test_a_budget_covering_prompt_and_new_tokens_evicts_nothing(tiny, scorer):
    """... and gives the full cache's tokens (the oracle without eviction is the full cache)."""
    prompts = [_prompt(30, seed=4), _prompt(21, seed=5)]
    out = kvjax.generate(tiny, prompts, policy=_policy(scorer, budget=40), max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        assert out.tokens[row] == oracle(tiny, scorer, prompt, 10, budget=1000)[0]
        assert all(hh == list(range(len(prompt) + 9)) for layer in _kept(out.cache, row) for hh in layer)


def test_pallas_path_keeps_the_xla_paths_positions(monkeypatch, tiny, scorer):
    """implementation="pallas" (the kernel writes the new key/value; interpret mode on CPU), with each
    layer's weights in their own buffers (the unrolled layer loop), as on GPU."""
    import kvjax.pallas_kernels.ragged_decode_attention as rda
    from kvjax.decode import decode_step
    from kvjax.models import unstack_layers

    original = rda.ragged_decode_attention_pallas
    calls = []

    def interpreted(*a, **k):
        calls.append(k.get("stream_logits"))
        return original(*a, **{**k, "interpret": True, "backend": "gpu"})

    monkeypatch.setattr(rda, "ragged_decode_attention_pallas", interpreted)
    prompts = [_prompt(30, seed=6), _prompt(17, seed=7)]
    pol = _policy(scorer, budget=20)
    pre = kvjax.prefill(tiny, prompts, pol, max_new_tokens=8)
    caches = {impl: pre.cache for impl in ("xla", "pallas")}
    weights = {"xla": tiny.weights, "pallas": unstack_layers(tiny.weights)}
    steps = {impl: jax.jit(functools.partial(decode_step, config=tiny.config, plan=pre.plan, implementation=impl))
             for impl in caches}
    tokens = jnp.asarray([5, 9])
    for step in range(7):
        active = jnp.asarray([True, step < 5])
        out = {impl: None for impl in caches}
        for impl in caches:
            caches[impl], out[impl] = steps[impl](weights[impl], caches[impl], tokens, pre.policy, active)
        np.testing.assert_allclose(np.asarray(out["pallas"]), np.asarray(out["xla"]), atol=2e-4)
        tokens = jnp.argmax(out["xla"], axis=-1).astype(jnp.int32)
    assert calls and not any(calls)  # the kernel ran, and hands back no logits: the scorer reads none
    a, b = caches["xla"], caches["pallas"]
    np.testing.assert_array_equal(np.asarray(a.streams.length), np.asarray(b.streams.length))
    assert int(np.asarray(a.streams.length).max()) == 20
    for row in range(2):
        assert _kept(a, row) == _kept(b, row)
    np.testing.assert_allclose(np.asarray(a.pools.score), np.asarray(b.pools.score), atol=1e-4)


@pytest.mark.slow
def test_streaming_perplexity_equals_the_oracle(tiny, scorer):
    """kvjax.perplexity with the policy: the first `budget` tokens prefilled (scored to their own end),
    the rest fed one at a time (chunk=1) and evicted as in decode; chunks of 8 stay within budget + 8."""
    text = _prompt(56, seed=8)
    pol = _policy(scorer)
    got = kvjax.perplexity(tiny, text, policy=pol, chunk=1)
    _, kept, logits = oracle(tiny, scorer, text[:BUDGET], 0, text=text)
    assert all(len(hh) == BUDGET for layer in kept for hh in layer)
    want = [float(jax.nn.logsumexp(logits[i]) - logits[i][text[i + 1]]) for i in range(len(text) - 1)]
    np.testing.assert_allclose(got["nll"], want, atol=2e-4)
    from kvjax.compress.chunked import encode, make_plan

    plan = make_plan(pol, tiny.config, 64, 0, chunk=8)
    cache, _, peak, _ = encode(tiny.weights, jnp.asarray(np.pad(text, (0, 8)))[None], jnp.asarray([56]), pol, None,
                               config=tiny.config, plan=plan, chunk=8, prefix=None, with_nll=False)
    assert int(np.asarray(cache.streams.length).max()) == BUDGET and int(np.asarray(peak).max()) <= BUDGET + 8


def test_a_prefilled_context_answers_questions_within_the_budget(tiny, scorer):
    ctx = kvjax.prefill(tiny, [_prompt(40, seed=9)], _policy(scorer), question=[_prompt(6, seed=10)],
                        max_new_tokens=5)
    out = kvjax.generate(tiny, prefilled=ctx, max_new_tokens=5)
    assert len(out.tokens[0]) == 5
    assert all(len(hh) == BUDGET for layer in kept_positions(out.cache) for hh in layer[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(decode="yes"), "decode='yes': must be True"),
    (dict(decode=True, recent=-1), "recent must be an int >= 0, got -1"),
    (dict(decode=True, recent=2.5), "recent must be an int >= 0, got 2.5"),
    (dict(recent=4), "recent=4: .*only with decode=True"),
    (dict(decode=True, recent=5), "recent=5: must be at most window \\(4\\)"),
    (dict(decode=True, recent=0, window=23), "window \\+ sinks \\(25\\) exceed the budget \\(24\\)"),
])
def test_bad_options_are_errors_naming_them(scorer, kwargs, match):
    with pytest.raises(P.PolicyError, match=match):
        P.Learned(scorer, **dict(dict(budget=BUDGET, window=WINDOW, sinks=SINKS), **kwargs))


def test_adakv_over_decode_eviction_is_an_error_naming_the_option(scorer):
    with pytest.raises(P.PolicyError, match="Learned with decode=False"):
        P.AdaKV(_policy(scorer))
    assert isinstance(P.AdaKV(_policy(scorer, decode=False, recent=None)), P.AdaKV)
    made = P.make("learned", source=scorer, budget=40, window=8, decode=True, recent=8)
    assert made.decode_eviction == P.DecodeEviction(every=1, recent=8, sinks=4)
    assert P.Learned(scorer, 40, window=6, decode=True).decode_eviction.recent == 6  # recent defaults to window


_MESH = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import kvjax
from kvjax import policies as P
from test_generate import _prompt, _tiny_params
from test_learned_decode import random_scorer
params = _tiny_params(num_attention_heads=8, num_key_value_heads=4)
pol = P.Learned(random_scorer(params), budget=24, window=4, sinks=2, decode=True, recent=3)
prompts = [_prompt(40, 1), _prompt(18, 2)]
ref = kvjax.generate(params, prompts, policy=pol, max_new_tokens=12)
out = kvjax.generate(kvjax.shard(params, jax.make_mesh((1, 2), ("data", "model"))), prompts, policy=pol,
                     max_new_tokens=12)
kr, ko = kvjax.kept_positions(ref.cache), kvjax.kept_positions(out.cache)
same = all(np.array_equal(kr[l][b][h], ko[l][b][h]) for l in range(2) for b in range(2) for h in range(4))
print("RESULT", same, out.tokens == ref.tokens)
"""


@pytest.mark.slow
def test_kv_heads_over_a_mesh_score_with_their_own_heads_weights():
    """Two forced CPU devices, KV heads split over `model`: each device scores new tokens with the
    weights of its global KV heads, so the kept positions equal one device's."""
    tests = str(pathlib.Path(__file__).resolve().parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-c", _MESH.format(tests=tests)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RESULT True True" in res.stdout, res.stdout[-2000:]
