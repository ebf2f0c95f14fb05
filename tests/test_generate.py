"""generate/prefill/decode on tiny random models: cache consistency, batching, recompilation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import policies as P
from kvjax.api import compile_counts
from kvjax.prompts import new_tokens_bucket
from conftest import TINY


def _tiny_params(model_type="llama", **overrides):
    """Random params built directly in JAX (no torch needed)."""
    import jax

    from kvjax.models import LayerWeights, ModelConfig, Weights

    cfg = dict(TINY, model_type=model_type, **overrides)
    config = ModelConfig.from_hf_dict(cfg)
    e, f, l = config.hidden_size, config.intermediate_size, config.num_layers
    hq, hkv, v = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.vocab_size
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def rnd(*shape, scale=0.08):
        return jax.random.normal(next(keys), shape, jnp.float32) * scale

    layers = LayerWeights(
        attn_norm=1 + rnd(l, e), wq=rnd(l, e, hq), wk=rnd(l, e, hkv), wv=rnd(l, e, hkv), wo=rnd(l, hq, e),
        mlp_norm=1 + rnd(l, e), w_gate=rnd(l, e, f), w_up=rnd(l, e, f), w_down=rnd(l, f, e),
    )
    weights = Weights(embed=rnd(v, e, scale=1.0), layers=layers, final_norm=1 + rnd(e), lm_head=rnd(e, v))
    return kvjax.Params(config, weights, tokenizer=None)


@pytest.fixture(scope="module")
def params():
    return _tiny_params()


def _prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_decode_with_cache_equals_forward_on_extended_sequence(model_type, extra):
    params = _tiny_params(model_type, **extra)
    prompt = _prompt(21)
    out = kvjax.generate(params, [prompt], max_new_tokens=6)
    full = np.concatenate([prompt, np.asarray(out.tokens[0])])
    ref = np.asarray(kvjax.forward(params, full[None]))[0]
    # the logits that chose each generated token, recomputed through decode steps
    pre = kvjax.prefill(params, [prompt], max_new_tokens=6)
    np.testing.assert_allclose(np.asarray(pre.logits)[0], ref[len(prompt) - 1], atol=1e-4)
    from kvjax.decode import decode_step

    cache = pre.cache
    for i, tok in enumerate(out.tokens[0][:-1]):
        cache, logits = decode_step(params.weights, cache, jnp.asarray([tok]), pre.policy,
                                    config=params.config, plan=pre.plan)
        np.testing.assert_allclose(np.asarray(logits)[0], ref[len(prompt) + i], atol=1e-4)


def test_batch_of_different_lengths_gives_the_same_tokens_as_each_alone(params):
    prompts = [_prompt(n, seed=n) for n in (9, 30, 17)]
    batch = kvjax.generate(params, prompts, max_new_tokens=8)
    for p, toks in zip(prompts, batch.tokens):
        assert kvjax.generate(params, [p], max_new_tokens=8).tokens[0] == toks


def test_no_recompilation_for_new_length_or_max_new_tokens_in_the_same_bucket(params):
    kvjax.generate(params, [_prompt(20)], max_new_tokens=5)
    before = compile_counts()
    kvjax.generate(params, [_prompt(37, seed=3)], max_new_tokens=5)  # same 64-token bucket
    kvjax.generate(params, [_prompt(33, seed=4)], max_new_tokens=9)  # same 16-token decode bucket
    assert compile_counts() == before
    assert before["prefill"] >= 1 and before["decode"] >= 1
    kvjax.generate(params, [_prompt(100, seed=5)], max_new_tokens=5)  # next bucket: compiles
    assert compile_counts()["prefill"] > before["prefill"]


def test_generation_stops_at_stop_token_and_reports_stats(params):
    prompt = _prompt(12)
    free = kvjax.generate(params, [prompt], max_new_tokens=10)
    stop_tok = free.tokens[0][3]
    first = free.tokens[0].index(stop_tok)
    out = kvjax.generate(params, [prompt], max_new_tokens=10, stop=[stop_tok])
    assert out.tokens[0] == free.tokens[0][: first + 1]
    assert out.stats["generated_lengths"] == [first + 1]
    assert out.stats["cache_bytes"] == out.cache.nbytes > 0


def test_sampling_is_seeded(params):
    p = [_prompt(15)]
    a = kvjax.generate(params, p, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = kvjax.generate(params, p, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    c = kvjax.generate(params, p, max_new_tokens=8, temperature=1.0, top_k=5, seed=4)
    assert a.tokens == b.tokens
    assert len(c.tokens[0]) == 8


def test_new_tokens_bucket_is_a_power_of_two():
    assert [new_tokens_bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_full_cache_bytes_match_the_pool(params):
    out = kvjax.generate(params, [_prompt(40)], max_new_tokens=4)
    c, cfg = out.cache, params.config
    slots = cfg.num_layers * cfg.num_kv_heads * (64 + 16)  # prompt bucket + decode bucket per stream
    assert c.layout.pool_size == slots
    assert c.kv_nbytes == 2 * slots * cfg.head_dim * 4


@pytest.mark.parametrize("policy", [None, pytest.param("snapkv", marks=pytest.mark.slow),
                                    pytest.param("h2o", marks=pytest.mark.slow), "cake", "roco"])
def test_per_layer_weights_give_the_same_tokens_and_cache_as_stacked(policy):
    """GPU loads keep each layer's weights in their own buffers (an unrolled layer loop); the
    results must not depend on the layout."""
    import dataclasses

    from kvjax import policies as P
    from kvjax.models import unstack_layers

    params = _tiny_params()
    per_layer = dataclasses.replace(params, weights=unstack_layers(params.weights))
    assert per_layer.weights.per_layer and not params.weights.per_layer
    pol = {None: None, "snapkv": P.SnapKV(budget=32, window=8), "h2o": P.H2O(budget=32, recent=8),
           "cake": P.CAKE(budget=32, window=8), "roco": P.RoCo(budget=48, chunk=16)}[policy]
    prompts = [_prompt(150, 0), _prompt(90, 1)]
    a = kvjax.generate(params, prompts, policy=pol, max_new_tokens=6)
    b = kvjax.generate(per_layer, prompts, policy=pol, max_new_tokens=6)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.asarray(a.cache.pools.k), np.asarray(b.cache.pools.k), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.cache.streams.length), np.asarray(b.cache.streams.length))
    np.testing.assert_allclose(np.asarray(kvjax.forward(params, prompts[0][None])),
                               np.asarray(kvjax.forward(per_layer, prompts[0][None])), atol=1e-5)


def test_scan_layers_one_body_equals_the_unrolled_loop_for_per_layer_weights():
    """scan_layers(one_body=True) picks each layer's weights with a switch inside a real scan; it
    must give the unrolled loop's carry and stacked outputs, and compile one layer body."""
    import jax

    from kvjax.models import decoder_layer, scan_layers, unstack_layers

    params = _tiny_params()
    cfg, weights = params.config, unstack_layers(params.weights).layers
    x0 = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    extra = jnp.arange(len(weights), dtype=jnp.float32) * 0.5

    def step(x, xs):
        lw, e = xs
        y, _ = decoder_layer(lw, x, positions, cfg, lambda q, k, v: (q * v.mean(), None))
        return y + e, y.sum() + e

    run = lambda one: jax.jit(lambda w, x: scan_layers(step, x, (w, extra), one_body=one))  # noqa: E731
    (xa, ya), (xb, yb) = run(False)(weights, x0), run(True)(weights, x0)
    np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=1e-6, atol=1e-5)
    hlo = run(True).lower(weights, x0).as_text()
    assert hlo.count("stablehlo.while") == 1 and hlo.count("stablehlo.case") == 1


_WINDOW = {"sliding_window": 8}
_PALLAS_CASES = {  # (model type, config extra, policy); the sliding window once with and without eviction
    "llama-snapkv": ("llama", {}, P.SnapKV(budget=12, window=4)),
    "mistral-window-snapkv": ("mistral", _WINDOW, P.SnapKV(budget=12, window=4)),
    "llama-adakv": ("llama", {}, P.AdaKV(P.SnapKV(budget=12, window=4))),
    "llama-full": ("llama", {}, P.Full()),
    "llama-h2o": ("llama", {}, P.H2O(budget=12, recent=4)),
    "mistral-window-tova": ("mistral", _WINDOW, P.TOVA(budget=12)),
    "llama-cake": ("llama", {}, P.CAKE(budget=12, window=4)),
    "llama-roco": ("llama", {}, P.RoCo(budget=12, recent=2, sinks=2, chunk=4, stride=2)),
}


@pytest.mark.parametrize("case", sorted(_PALLAS_CASES))
def test_pallas_decode_equals_xla_decode(monkeypatch, case):
    # the GPU path (the kernel writes the new key/value into the pool itself; policies that evict
    # while decoding take the per-stream logits it stores), run in interpret mode: the same
    # logits, kept positions and pools as the XLA path, for a ragged batch with a finished row
    import kvjax.pallas_kernels.ragged_decode_attention as rda

    original = rda.ragged_decode_attention_pallas
    calls = []

    def interpreted(*a, **k):
        calls.append("logits" if k.get("stream_logits") else k.get("num_splits"))
        return original(*a, **{**k, "interpret": True, "backend": "gpu"})

    monkeypatch.setattr(rda, "ragged_decode_attention_pallas", interpreted)
    # the eviction kernel (H2O, TOVA, CAKE: kvjax/evict_fused.py) as on GPU, interpreted
    import kvjax.decode as dec

    supports, fused = dec.evict_kernel_supports, dec.decode_evict_fused
    evictions = []

    def fused_interpreted(*a, **k):
        evictions.append(1)
        return fused(*a, **{**k, "interpret": True})

    monkeypatch.setattr(dec, "evict_kernel_supports", lambda *a, **k: supports(*a, **{**k, "backend": "gpu"}))
    monkeypatch.setattr(dec, "decode_evict_fused", fused_interpreted)
    model_type, extra, policy = _PALLAS_CASES[case]
    params = _tiny_params(model_type, **extra)
    prompts = [_prompt(n, seed=n) for n in (30, 17)]
    pre = kvjax.prefill(params, prompts, policy, max_new_tokens=6)
    from kvjax.decode import decode_step

    import functools

    import jax

    caches = {impl: pre.cache for impl in ("xla", "pallas")}
    steps = {impl: jax.jit(functools.partial(decode_step, config=params.config, plan=pre.plan, implementation=impl))
             for impl in caches}  # compiled once each: the interpreted kernel runs far faster inside jit
    tokens = jnp.asarray([5, 9])
    for step in range(5):
        active = jnp.asarray([True, step < 2])  # row 1 stops after two steps
        out = {}
        for impl in caches:
            caches[impl], out[impl] = steps[impl](params.weights, caches[impl], tokens, pre.policy, active)
        np.testing.assert_allclose(np.asarray(out["pallas"]), np.asarray(out["xla"]), atol=2e-4)
        tokens = jnp.argmax(out["xla"], axis=-1).astype(jnp.int32)
    assert calls, "the Pallas kernel was not used"
    assert ("logits" in calls) == (pre.policy.decode_eviction is not None)
    assert bool(evictions) == (type(pre.policy).__name__ in ("H2O", "TOVA", "CAKE"))
    a, b = caches["xla"], caches["pallas"]
    np.testing.assert_array_equal(np.asarray(a.streams.length), np.asarray(b.streams.length))
    np.testing.assert_array_equal(np.asarray(a.pools.pos), np.asarray(b.pools.pos))
    for name in ("k", "v"):  # later layers' keys carry the attention outputs' rounding differences
        np.testing.assert_allclose(np.asarray(getattr(a.pools, name)), np.asarray(getattr(b.pools, name)), atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_decode_narrowed_to_the_reserved_streams_keeps_what_the_full_bound_keeps():
    # CAKE's cascade plans streams wide enough for a layer keeping the whole prompt; generate narrows
    # decode-time eviction to the slots the prefilled streams reserved: same tokens, same kept positions
    import jax

    from kvjax.decode import decode_step

    params = _tiny_params(num_hidden_layers=4)
    prompts = [_prompt(n, seed=n) for n in (120, 90)]
    policy = P.CAKE(budget=24, window=4)
    pre = kvjax.prefill(params, prompts, policy, max_new_tokens=10)
    caps = np.asarray(pre.cache.streams.cap)
    narrow = pre.plan.for_decode(caps)
    assert caps.max() <= narrow.stream_width < pre.plan.stream_width  # narrower than the prompt-wide bound
    assert narrow.stream_width == max(16, 1 << (int(caps.max()) - 1).bit_length())
    out = kvjax.generate(params, prompts, policy=policy, max_new_tokens=10)
    step = jax.jit(lambda c, t: decode_step(params.weights, c, t, policy, config=params.config, plan=pre.plan))
    cache, tokens = pre.cache, jnp.argmax(pre.logits, -1).astype(jnp.int32)
    seen = [tokens]
    for _ in range(9):
        cache, logits = step(cache, tokens)
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        seen.append(tokens)
    np.testing.assert_array_equal(np.stack(seen, 1), np.asarray(out.tokens))
    for a, b in zip(kvjax.kept_positions(cache), kvjax.kept_positions(out.cache)):
        for x, y in zip(a, b):
            for u, w in zip(x, y):
                np.testing.assert_array_equal(np.sort(u), np.sort(w))
