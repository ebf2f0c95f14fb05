"""The eviction engine on tiny random models: budgets, memory, decode-time eviction, batching."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from kvjax.api import compile_counts
from kvjax import policies as P
from test_generate import _prompt, _tiny_params


@pytest.fixture(scope="module")
def params():
    return _tiny_params()


def _kept(out):
    return kvjax.kept_positions(out.cache)


@pytest.mark.parametrize(
    "policy",
    [P.SnapKV(budget=16, window=4), P.KNorm(budget=16), P.StreamingLLM(budget=16), P.H2O(budget=16, recent=4),
     P.TOVA(budget=16), P.Random(budget=16), P.PyramidKV(budget=16, window=4, beta=2)],
    ids=lambda p: type(p).__name__,
)
def test_every_stream_keeps_its_budget_and_its_window(params, policy):
    prompt = _prompt(50)
    pre = kvjax.prefill(params, [prompt], policy, max_new_tokens=4)
    kept = kvjax.kept_positions(pre.cache)
    budgets = np.asarray(pre.cache.streams.budget)[:, 0]
    for layer in range(params.config.num_layers):
        for h in range(params.config.num_kv_heads):
            pos = kept[layer][0][h]
            assert len(pos) == budgets[layer, h]
            assert len(set(pos.tolist())) == len(pos) and pos.max() < 50
            assert set(range(50 - policy.protected_window, 50)) <= set(pos.tolist())
            assert set(range(policy.protected_sinks)) <= set(pos.tolist())


def test_streaming_llm_keeps_sinks_and_the_most_recent(params):
    pre = kvjax.prefill(params, [_prompt(50)], P.StreamingLLM(budget=12, sinks=4), max_new_tokens=2)
    for layer in kvjax.kept_positions(pre.cache):
        for pos in layer[0]:
            assert pos.tolist() == [0, 1, 2, 3] + list(range(42, 50))


def test_tova_keeps_one_index_set_per_layer(params):
    pre = kvjax.prefill(params, [_prompt(50)], P.TOVA(budget=10), max_new_tokens=2)
    for layer in kvjax.kept_positions(pre.cache):
        assert all(np.array_equal(layer[0][0], p) for p in layer[0])


def test_pyramid_budgets_shrink_with_depth_and_average_the_budget():
    b = P.allocators.pyramid_budgets(np.int64(64), 8, 8, 4)
    assert list(b) == sorted(b, reverse=True) and b[0] > b[-1]
    assert abs(b.mean() - 64) <= 1


@pytest.mark.parametrize(
    "policy,expected_stream",
    [(P.KNorm(budget=16), [16, 16]), (P.PyramidKV(budget=32, window=4, beta=2, style="paper"), None),
     (P.Compose(scorer_=P.scorers.KeyNorm(), budget=np.array([16, 32]), allocator_=P.PerLayer((16, 32))),
      [16, 32])],
    ids=["uniform", "pyramid", "per-layer"],
)
def test_cache_bytes_equal_kept_slots_plus_headroom(params, policy, expected_stream):
    pre = kvjax.prefill(params, [_prompt(200)], policy, max_new_tokens=16)
    cfg, plan = params.config, pre.plan
    bounds = np.asarray(plan.stream_bound)
    if expected_stream is not None:
        assert bounds.tolist() == expected_stream
    slots = cfg.num_kv_heads * (bounds + plan.headroom).sum()
    assert pre.cache.layout.pool_size == slots
    assert pre.cache.kv_nbytes == 2 * slots * cfg.head_dim * 4
    kept = np.asarray(pre.cache.streams.length)[:, 0]
    assert (kept == bounds[:, None]).all()
    full = kvjax.prefill(params, [_prompt(200)], None, max_new_tokens=16)
    assert pre.cache.nbytes < full.cache.nbytes / 3


def test_per_head_budgets_vary_the_stream_sizes(params):
    budgets = ((8, 24), (16, 16))
    pol = P.Compose(scorer_=P.scorers.KeyNorm(), budget=np.array(budgets), allocator_=P.PerLayer(budgets))
    pre = kvjax.prefill(params, [_prompt(100)], pol, max_new_tokens=4)
    assert np.asarray(pre.cache.streams.length)[:, 0].tolist() == [[8, 24], [16, 16]]


@pytest.mark.parametrize("policy", [P.H2O(budget=16, recent=4), P.TOVA(budget=16)], ids=["H2O", "TOVA"])
def test_decode_time_eviction_keeps_streams_at_budget(params, policy):
    out = kvjax.generate(params, [_prompt(40)], policy=policy, max_new_tokens=20)
    assert len(out.tokens[0]) == 20
    length = np.asarray(out.cache.streams.length)[:, 0]
    assert (length == 16).all()
    assert out.cache.layout.pool_size == params.config.num_layers * params.config.num_kv_heads * (16 + 1)
    kept = kvjax.kept_positions(out.cache)
    newest = 40 + 20 - 2  # the last fed token (the final sampled one is never fed)
    for layer in kept:
        for pos in layer[0]:
            assert newest in pos.tolist()  # recent tokens are protected


def test_h2o_without_decode_pressure_matches_full_cache(params):
    prompt = _prompt(30)
    out = kvjax.generate(params, [prompt], policy=P.H2O(budget=64, recent=4), max_new_tokens=8)
    full = kvjax.generate(params, [prompt], max_new_tokens=8)
    assert out.tokens == full.tokens


@pytest.mark.slow
def test_batch_with_different_lengths_and_ratio_budgets_equals_each_alone(params):
    prompts = [_prompt(n, seed=n) for n in (60, 25, 41)]
    for policy in (P.SnapKV(budget=0.5, window=4), P.H2O(budget=0.4, recent=4), P.KNorm(budget=12),
                   P.H2O(budget=12, recent=4, evict_every=3)):  # eviction schedule per sequence
        batch = kvjax.generate(params, prompts, policy=policy, max_new_tokens=6)
        for i, p in enumerate(prompts):
            alone = kvjax.generate(params, [p], policy=policy, max_new_tokens=6)
            assert alone.tokens[0] == batch.tokens[i], (type(policy).__name__, i)
            kb = kvjax.kept_positions(batch.cache)
            ka = kvjax.kept_positions(alone.cache)
            for layer in range(params.config.num_layers):
                for h in range(params.config.num_kv_heads):
                    assert np.array_equal(kb[layer][i][h], ka[layer][0][h])


def test_no_recompilation_when_budget_or_numeric_options_change_in_a_bucket(params):
    prompt = [_prompt(90)]
    kvjax.generate(params, prompt, policy=P.SnapKV(budget=20, window=4), max_new_tokens=4)
    before = compile_counts()
    kvjax.generate(params, prompt, policy=P.SnapKV(budget=27, window=4), max_new_tokens=4)
    kvjax.generate(params, [_prompt(70, 1)], policy=P.SnapKV(budget=31, window=4), max_new_tokens=4)
    assert compile_counts() == before


def test_query_agnostic_context_then_question_matches_the_concatenated_prompt_with_full_cache(params):
    ctx, q = _prompt(40), _prompt(7, seed=9)
    a = kvjax.generate(params, context=[ctx], question=[q], max_new_tokens=6)
    b = kvjax.generate(params, [np.concatenate([ctx, q])], max_new_tokens=6)
    assert a.tokens == b.tokens


def test_compressed_context_is_reusable_for_several_questions(params):
    ctx = _prompt(64)
    pol = P.SnapKV(budget=16, window=4)
    pre = kvjax.prefill(params, [ctx], pol, max_new_tokens=4)
    kept_ctx = kvjax.kept_positions(pre.cache)
    for seed in (1, 2):
        out = kvjax.generate(params, context=[ctx], question=[_prompt(5, seed)], policy=pol, max_new_tokens=4)
        kept = kvjax.kept_positions(out.cache)
        # the question is appended after compression: context positions kept are the same
        assert all(np.array_equal(kept[l][0][h][kept[l][0][h] < 64], kept_ctx[l][0][h])
                   for l in range(2) for h in range(2))
