"""CAKE: layer budgets and kept positions against a numpy implementation of the paper's formulas,
computed from transformers' full attention maps; the cascade's bounded pool; decode re-selection."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import torch_or_skip
from kvjax.compress import cascade, prefill_traced
from kvjax import policies as P
from oracle_attention import avg_pool5, hf_attentions
from selection import assert_same_selection
from test_generate import _prompt, _tiny_params


# ----------------------------------------------------------------------------------------------
# an independent implementation of CAKE's rules (numpy, float64 except where the reference is float32)


def _split(prefs, total, cap):
    """The reference's adjust_budgets: float32 shares truncated, capped, excess and shortfall spread."""
    prefs = np.asarray(prefs, np.float32)
    x = (prefs / prefs.sum() * np.float32(total)).astype(np.int64)
    excess = np.maximum(x - cap, 0).sum()
    x = np.minimum(x, cap)
    if excess > 0:
        ok = np.flatnonzero(x < cap)
        if len(ok):
            x[ok] += excess // len(ok)
            x[ok[: excess % len(ok)]] += 1
    diff = total - x.sum()
    if diff:
        ok = np.flatnonzero(x < cap) if diff > 0 else np.flatnonzero(x > 1)
        if len(ok):
            x[ok] += np.sign(diff) * (abs(diff) // len(ok))
            x[ok[: abs(diff) % len(ok)]] += np.sign(diff)
    return np.minimum(x, cap)


def cake_reference(attn, n, budget, window, gamma, num_kv_heads, cascade_=True):
    """attn: per layer [Hq, n, n] full attention. Returns (kept prefix counts [L], indicators [L][H, n])."""
    num_layers = len(attn)
    total, cap = num_layers * (budget - window), n - window
    prefs, indicators = [], []
    for a in attn:
        a = np.asarray(a, np.float64)
        win = a[:, n - window :, : n - window]
        entropy = -(win * np.log(win + 1e-10)).sum()
        prefs.append(entropy * win.var(axis=1, ddof=1).sum())
        rows = a[:, n - window :, :]
        ind = (rows.mean(axis=1) + gamma * rows.var(axis=1, ddof=1))[:, : n - window]
        pooled = avg_pool5(ind).reshape(num_kv_heads, -1, n - window).mean(axis=1)
        indicators.append(np.concatenate([pooled, np.zeros((num_kv_heads, window))], axis=1))
    kept = np.full(num_layers, np.iinfo(np.int64).max)
    for layer in range(num_layers):
        if cascade_ or layer == num_layers - 1:
            b = _split(prefs[: layer + 1], total, cap)
            kept[: layer + 1] = np.minimum(kept[: layer + 1], b)
    return kept, indicators


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("budget,cascade_", [(64, True), (128, True), (96, False)])
def test_cake_budgets_and_kept_positions_equal_the_formulas_on_the_embedded_model(
    smollm2_f32, smollm2_dir, budget, cascade_
):
    torch_or_skip()
    from kvjax.eval.passkey import passkey_prompt

    ids = smollm2_f32.tokenizer.encode(passkey_prompt(key="31415", depth=0.4, n_repeats=30))[:700]
    n, window, gamma = len(ids), 32, 200.0
    attn = hf_attentions(smollm2_dir, ids)
    cfg = smollm2_f32.config
    ref_counts, indicators = cake_reference(attn, n, budget, window, gamma, cfg.num_kv_heads, cascade_)

    policy = P.CAKE(budget=budget, window=window, gamma=gamma, cascade=cascade_)
    pre = kvjax.prefill(smollm2_f32, [ids], policy, max_new_tokens=1)
    lengths = np.asarray(pre.cache.streams.length)[:, 0]  # [L, H]
    np.testing.assert_array_equal(lengths, np.broadcast_to((ref_counts + window)[:, None], lengths.shape))
    assert lengths.sum() == cfg.num_kv_heads * cfg.num_layers * budget  # the total is spent exactly
    assert len(set(ref_counts.tolist())) > 3  # the layers really differ
    kept = kvjax.kept_positions(pre.cache)
    forced = np.arange(n) >= n - window
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_kv_heads):
            assert_same_selection(kept[layer][0][h], indicators[layer][h], int(ref_counts[layer]) + window, forced,
                                  where=f"layer {layer} head {h}")


# ----------------------------------------------------------------------------------------------
# the cascade's memory, decode re-selection, batches (tiny random model, no torch)


@functools.lru_cache(maxsize=None)
def _tiny():
    return _tiny_params(num_hidden_layers=6)


def _cascade_run(policy, prompts):
    params = _tiny()
    bucket = 512
    plan = cascade.make_plan(policy, params.config, bucket, 16)
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    run = jax.jit(lambda w, t, n, p, r: prefill_traced(w, t, n, (p,), (plan,), r, config=params.config))
    (cache,), _, (occupancy,) = run(params.weights, tokens, lengths, policy, jax.random.key(0))
    return params, plan, cache, np.asarray(occupancy)


def test_cascade_pool_never_holds_more_than_the_total_budget_plus_one_layer():
    policy = P.CAKE(budget=48, window=8)
    params, plan, cache, occupancy = _cascade_run(policy, [_prompt(480, 0)])
    cfg = params.config
    h, num_layers, n = cfg.num_kv_heads, cfg.num_layers, 480
    total = h * num_layers * 48  # the stored KV the budget allows, windows included
    # after each layer the used slots stay within the total ...
    assert (occupancy <= total).all(), occupancy
    # ... while the only full-size KV is the layer being computed: total + one layer is the peak
    assert occupancy.max() + h * n <= total + h * n
    # early layers start large and shrink as later layers claim their shares
    assert occupancy[0, 0] > h * 48 and occupancy[-1, 0] == total
    # the reserved pool is the total plus headroom, not a full layer per layer
    assert plan.layout.pool_size == h * (num_layers * (8 + plan.headroom) + num_layers * 40)
    assert plan.layout.pool_size < h * num_layers * n / 4
    assert cache.pools.k.shape[1] == plan.layout.pool_size


def test_cascade_off_holds_every_layer_until_the_last_then_splits_once():
    policy = P.CAKE(budget=48, window=8, cascade=False)
    params, plan, cache, occupancy = _cascade_run(policy, [_prompt(480, 0)])
    h = params.config.num_kv_heads
    np.testing.assert_array_equal(occupancy[:-1, 0], h * 480 * np.arange(1, params.config.num_layers))
    assert occupancy[-1, 0] == h * params.config.num_layers * 48
    assert cache.pools.k.shape[1] == plan.layout.pool_size


def test_cake_decode_keeps_each_layer_at_its_budget_and_the_recent_window():
    params = _tiny()
    policy = P.CAKE(budget=48, window=8)
    prompt = _prompt(300, 3)
    pre = kvjax.prefill(params, [prompt], policy, max_new_tokens=12)
    out = kvjax.generate(params, [prompt], policy=policy, max_new_tokens=12)
    before, after = np.asarray(pre.cache.streams.length), np.asarray(out.cache.streams.length)
    np.testing.assert_array_equal(after, before)  # one in, one out, every step and layer
    assert np.ptp(before.sum(axis=2)) > 0  # layers got different budgets
    n_total = len(prompt) + len(out.tokens[0]) - 1  # the last sampled token is never fed back
    for layer_kept in kvjax.kept_positions(out.cache):
        for kept in layer_kept[0]:
            assert set(range(n_total - 8, n_total)) <= set(kept.tolist())  # the recent window stays
            assert kept.max() == n_total - 1
    assert out.stats["layer_budgets"][0] == after[:, 0].tolist()


def test_cake_decode_evicts_the_lowest_pooled_attention_of_the_new_query():
    """One decode step: each stream loses the token the new query attends to least (average-pooled
    over neighbouring slots, group mean), never one of the recent window."""
    import dataclasses

    from kvjax.decode import decode_step

    params = _tiny()
    cfg = params.config
    policy = P.CAKE(budget=48, window=8)
    prompt = _prompt(300, 5)
    n = len(prompt)
    pre = kvjax.prefill(params, [prompt], policy, max_new_tokens=1)
    step = jax.jit(functools.partial(decode_step, config=cfg, plan=pre.plan))
    token = jnp.array([7], jnp.int32)
    cache, _ = step(params.weights, pre.cache, token, policy)
    # the same step with one more slot of budget evicts nothing and leaves every slot's pooled score
    roomy = dataclasses.replace(pre.cache, streams=dataclasses.replace(pre.cache.streams, budget=pre.cache.streams.budget + 1))
    seen, _ = step(params.weights, roomy, token, policy)
    score, pos = np.asarray(seen.pools.score)[0], np.asarray(seen.pools.pos)[0]
    start, length = np.asarray(seen.streams.start)[:, 0], np.asarray(seen.streams.length)[:, 0]
    new = kvjax.kept_positions(cache)
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_kv_heads):
            s = slice(start[layer, h], start[layer, h] + length[layer, h])
            stream_pos, stream_score = pos[s], score[s]
            evicted = sorted(set(stream_pos.tolist()) - set(new[layer][0][h].tolist()))
            unprotected = stream_pos <= n - 8  # the last 8 positions (new token included) are kept
            expected = stream_pos[unprotected][np.argmin(stream_score[unprotected])]
            assert evicted == [expected], (layer, h)
            assert len(new[layer][0][h]) == length[layer, h] - 1


@pytest.mark.slow
def test_cake_batch_rows_equal_the_rows_alone():
    params = _tiny()
    policy = P.CAKE(budget=48, window=8)
    prompts = [_prompt(300, 0), _prompt(170, 1)]
    out = kvjax.generate(params, prompts, policy=policy, max_new_tokens=8)
    for i, p in enumerate(prompts):
        alone = kvjax.generate(params, [p], policy=policy, max_new_tokens=8)
        assert alone.tokens[0] == out.tokens[i]
        assert alone.stats["layer_budgets"][0] == out.stats["layer_budgets"][i]


def test_cake_rejects_bad_options():
    with pytest.raises(P.PolicyError, match="window"):
        P.CAKE(budget=16, window=32)
    with pytest.raises(P.PolicyError, match="tau1"):
        P.CAKE(budget=64, tau1=0.0)
    with pytest.raises(P.PolicyError, match="one budget"):
        P.CAKE(budget=np.array([64, 64]))
    with pytest.raises(P.PolicyError, match="AdaKV"):
        P.AdaKV(P.CAKE(budget=64))
    assert isinstance(P.make("cake", budget=64), P.CAKE)
