"""Packed projections (kvjax.models.pack_layers, kvjax.load's GPU layout): one q|k|v and one
gate|up matrix per layer compute what the separate matrices compute, through forward, the one-shot
and the chunked prefill and decode-time eviction; they unpack exactly, save unpacked, and
kvjax.load refuses packing where it cannot apply, before reading anything."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import kvjax
from kvjax import policies as P
from kvjax.cache import kept_positions
from kvjax.errors import InputError
from kvjax.models import pack_layers, unpack_layers, unstack_layers
from test_generate import _tiny_params


def _with_biases(params):
    """The tiny model with random q/k/v biases (Qwen2's), so the packed bias is checked too."""
    cfg = dataclasses.replace(params.config, qkv_bias=True)
    keys = iter(jax.random.split(jax.random.key(1), 4))
    lw = params.weights.layers
    layers = dataclasses.replace(lw, **{n: 0.1 * jax.random.normal(next(keys), (w.shape[0], w.shape[-1]))
                                        for n, w in (("bq", lw.wq), ("bk", lw.wk), ("bv", lw.wv))})
    return dataclasses.replace(params, config=cfg, weights=dataclasses.replace(params.weights, layers=layers))


@pytest.fixture(scope="module")
def pair():
    """(per-layer params, the same packed)."""
    base = _with_biases(_tiny_params())
    apart = dataclasses.replace(base, weights=unstack_layers(base.weights))
    return apart, dataclasses.replace(apart, weights=pack_layers(apart.weights))


def _prompts():
    return [np.random.default_rng(i).integers(0, 256, n).astype(np.int32) for i, n in enumerate((70, 45))]


def test_packed_layers_hold_one_matrix_for_qkv_and_one_for_gate_up(pair):
    apart, packed = pair
    assert packed.weights.packed and not apart.weights.packed
    cfg, lw, pl = apart.config, apart.weights.layers[0], packed.weights.layers[0]
    assert pl.wqkv.shape == (cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    assert pl.w_gate_up.shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
    np.testing.assert_array_equal(pl.b_qkv, np.concatenate([lw.bq, lw.bk, lw.bv]))


def test_unpack_restores_the_separate_matrices_exactly(pair):
    apart, packed = pair
    back = unpack_layers(packed.weights, packed.config)
    for a, b in zip(jax.tree_util.tree_leaves(apart.weights), jax.tree_util.tree_leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    assert unpack_layers(apart.weights, apart.config) is apart.weights  # nothing to do
    with pytest.raises(ValueError, match="unstack_layers first"):
        pack_layers(_tiny_params().weights)


def test_packed_forward_equals_the_separate_projections(pair):
    apart, packed = pair
    tokens = np.stack([p[:40] for p in _prompts()])
    np.testing.assert_allclose(kvjax.forward(packed, tokens), kvjax.forward(apart, tokens), atol=2e-5)


@pytest.mark.parametrize("policy", [pytest.param(P.SnapKV(budget=24, window=8), marks=pytest.mark.slow),
                                    P.RoCo(budget=24, chunk=8)], ids=["snapkv", "roco-chunked-and-evicting"])
def test_packed_generate_keeps_the_same_tokens_and_cache(pair, policy):
    apart, packed = pair
    a = kvjax.generate(apart, _prompts(), policy=policy, max_new_tokens=6)
    b = kvjax.generate(packed, _prompts(), policy=policy, max_new_tokens=6)
    assert a.tokens == b.tokens
    ka, kb = kept_positions(a.cache), kept_positions(b.cache)
    assert all(np.array_equal(x, y) for la, lb in zip(ka, kb) for ra, rb in zip(la, lb) for x, y in zip(ra, rb))


def test_consume_frees_the_separate_matrices():
    apart = unstack_layers(_tiny_params().weights)
    packed = pack_layers(apart, consume=True)
    assert apart.layers[0].wq.is_deleted() and apart.layers[0].w_up.is_deleted()
    assert not packed.layers[0].wqkv.is_deleted() and not packed.layers[0].wo.is_deleted()


def test_packed_params_save_unpacked(pair, tmp_path):
    apart, packed = pair
    kvjax.save(packed, tmp_path / "ck")
    back = kvjax.load(str(tmp_path / "ck"), per_layer=False)
    assert not back.weights.per_layer
    np.testing.assert_array_equal(back.weights.layers.wk[1], apart.weights.layers[1].wk)


@pytest.mark.parametrize("kwargs,allowed", [
    (dict(packed="yes"), "True or False"),
    (dict(packed=True, per_layer=False), "per_layer=False"),
])
def test_load_refuses_packing_where_it_cannot_apply(kwargs, allowed, tmp_path):
    with pytest.raises(InputError, match="packed") as e:
        kvjax.load(str(tmp_path / "never-read"), **kwargs)
    assert allowed in str(e.value)
