"""Ada-KV's default allocation against the AdaKV repository's rule, computed in numpy from
transformers' attention on the embedded model; the memory it really holds; shard-local trading."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from conftest import torch_or_skip
from kvjax import policies as P
from oracle_attention import avg_pool5, hf_attentions
from selection import assert_same_selection
from test_generate import _prompt, _tiny_params


def snapkv_scores(attn, n, window, num_kv_heads):
    """kvpress-style SnapKV scores from full attention [Hq, n, n]: window mean on the prefix,
    average-pooled (kernel 5, zero padding), group mean -> [H, n] (window positions 0)."""
    rows = np.asarray(attn, np.float64)[:, n - window :, :]
    mean = rows.mean(axis=1)
    mean[:, n - window :] = 0.0
    return avg_pool5(mean).reshape(num_kv_heads, -1, n).mean(axis=1)


def adakv_repo_budgets(scores, n, window, budget, alpha):
    """The AdaKV repository: top H·B' over the flattened prefix scores, n_h per head,
    B'_h = round((1 - alpha) n_h + int(alpha B')) in float32, round half to even."""
    h = scores.shape[0]
    base = budget - window
    prefix = scores[:, : n - window]
    flat = prefix.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))[: h * base]
    n_h = np.bincount(order // (n - window), minlength=h).astype(np.float32)
    return np.round(n_h * np.float32(1 - alpha) + np.float32(int(base * alpha))).astype(np.int64), n_h


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("budget,alpha", [(128, 0.2), (64, 0.5)])
def test_adakv_head_budgets_and_kept_positions_equal_the_repository_rule(smollm2_f32, smollm2_dir, budget, alpha):
    torch_or_skip()
    from kvjax.eval.passkey import passkey_prompt

    ids = smollm2_f32.tokenizer.encode(passkey_prompt(key="27182", depth=0.6, n_repeats=30))[:700]
    n, window = len(ids), 32
    attn = hf_attentions(smollm2_dir, ids)
    cfg = smollm2_f32.config
    pre = kvjax.prefill(smollm2_f32, [ids], P.AdaKV(P.SnapKV(budget=budget, window=window), alpha=alpha),
                        max_new_tokens=1)
    lengths = np.asarray(pre.cache.streams.length)[:, 0]
    kept = kvjax.kept_positions(pre.cache)
    forced = np.arange(n) >= n - window
    uneven = 0
    for layer in range(cfg.num_layers):
        scores = snapkv_scores(attn[layer], n, window, cfg.num_kv_heads)
        ref, n_h = adakv_repo_budgets(scores, n, window, budget, alpha)
        # a flattened top-k can swap a near-tie across heads: then n_h moves by one token
        assert np.abs(lengths[layer] - window - ref).sum() <= 2, (layer, lengths[layer] - window, ref, n_h)
        uneven += np.ptp(ref) > 0
        for h in range(cfg.num_kv_heads):
            assert_same_selection(kept[layer][0][h], scores[h], int(lengths[layer, h]), forced,
                                  where=f"layer {layer} head {h}")
    assert uneven > cfg.num_layers // 2  # heads really trade tokens on this model


def test_adakv_holds_the_uniform_total_not_the_largest_head_layout():
    params = _tiny_params(num_hidden_layers=4, num_key_value_heads=4, num_attention_heads=8)
    prompt = _prompt(400, 2)
    snap = kvjax.prefill(params, [prompt], P.SnapKV(budget=64, window=16), max_new_tokens=16)
    ada = kvjax.prefill(params, [prompt], P.AdaKV(P.SnapKV(budget=64, window=16), alpha=0.1), max_new_tokens=16)
    lengths = np.asarray(ada.cache.streams.length)[:, 0]  # [L, H]
    assert (lengths.max(axis=1) > 64).all()  # some head of every layer keeps more than B ...
    cfg = params.config
    d, itemsize = cfg.head_dim, np.dtype(np.asarray(ada.cache.pools.k).dtype).itemsize
    largest_head_layout = 2 * cfg.num_layers * cfg.num_kv_heads * (lengths.max() + 16) * d * itemsize
    slack = 2 * cfg.num_layers * (cfg.num_kv_heads // 2 + 1) * d * itemsize
    # ... yet the pool holds the uniform total (plus the rounding slack), not max-head x heads
    assert ada.cache.kv_nbytes == snap.cache.kv_nbytes + slack
    assert ada.cache.kv_nbytes < 0.75 * largest_head_layout
    # the repository's rounding (int(alpha B') then round) lands within H/2 above, H + H/2 below
    per_layer = lengths.sum(axis=1) - cfg.num_kv_heads * 64
    assert (per_layer <= cfg.num_kv_heads // 2).all() and (per_layer >= -1.5 * cfg.num_kv_heads).all()


@pytest.mark.slow
def test_adakv_head_groups_keep_each_shard_at_its_share():
    params = _tiny_params(num_hidden_layers=3, num_key_value_heads=4, num_attention_heads=8)
    prompt = _prompt(300, 4)
    one_group = kvjax.prefill(params, [prompt], P.AdaKV(P.SnapKV(budget=48, window=8), alpha=0.0), max_new_tokens=16)
    two_groups = kvjax.prefill(params, [prompt], P.AdaKV(P.SnapKV(budget=48, window=8), alpha=0.0, head_groups=2),
                               max_new_tokens=16)
    free = np.asarray(one_group.cache.streams.length)[:, 0]
    shard = np.asarray(two_groups.cache.streams.length)[:, 0].reshape(3, 2, 2)  # [L, group, heads of the group]
    np.testing.assert_array_equal(shard.sum(axis=2), 2 * 48)  # alpha 0: no rounding, exact shares
    assert (free.reshape(3, 2, 2).sum(axis=2) != 2 * 48).any()  # without groups, shards would differ
    singles = kvjax.prefill(params, [prompt], P.AdaKV(P.SnapKV(budget=48, window=8), alpha=0.0, head_groups=4),
                            max_new_tokens=16)
    uniform = kvjax.prefill(params, [prompt], P.SnapKV(budget=48, window=8), max_new_tokens=16)
    # one head per group: nothing to trade, Ada-KV is plain SnapKV
    for la, lb in zip(kvjax.kept_positions(singles.cache), kvjax.kept_positions(uniform.cache)):
        for a, b in zip(la[0], lb[0]):
            np.testing.assert_array_equal(a, b)
