"""kvjax.models.nnx: Flax NNX modules over kvjax's weights (tiny random models built in JAX, no torch)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import TINY
from kvjax.models import LayerWeights, ModelConfig, Weights, unstack_layers

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
from kvjax.models.nnx import CausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM  # noqa: E402


def _tiny(model_type="llama", *, dtype=jnp.float32, per_layer=False, tie=False, bias=False, **overrides):
    """Random kvjax.Params (biases and tied embeddings optional)."""
    cfg = dict(TINY, model_type=model_type, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, **overrides)
    config = ModelConfig.from_hf_dict(cfg)
    e, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    hq, hkv, v = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.vocab_size
    keys = iter(jax.random.split(jax.random.key(1), 32))

    def rnd(*shape, scale=0.08):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dtype)

    biases = {}  # the ones the config has (qwen2: q, k and v always)
    if config.qkv_bias:
        biases.update(bq=rnd(n, hq), bk=rnd(n, hkv), bv=rnd(n, hkv))
    if config.o_bias:
        biases.update(bo=rnd(n, e))
    if config.mlp_bias:
        biases.update(b_gate=rnd(n, f), b_up=rnd(n, f), b_down=rnd(n, e))
    layers = LayerWeights(
        attn_norm=1 + rnd(n, e), wq=rnd(n, e, hq), wk=rnd(n, e, hkv), wv=rnd(n, e, hkv), wo=rnd(n, hq, e),
        mlp_norm=1 + rnd(n, e), w_gate=rnd(n, e, f), w_up=rnd(n, e, f), w_down=rnd(n, f, e), **biases,
    )
    weights = Weights(embed=rnd(v, e, scale=1.0), layers=layers, final_norm=1 + rnd(e),
                      lm_head=None if tie else rnd(e, v))
    if per_layer:
        weights = unstack_layers(weights)
    return kvjax.Params(config, weights, tokenizer=None)


def _tokens(b=2, t=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (b, t)), jnp.int32)


CASES = {
    "llama": dict(),
    "llama-per-layer": dict(per_layer=True),
    "llama-tied-biases": dict(tie=True, bias=True),
    "mistral-sliding": dict(model_type="mistral", sliding_window=8),
    "llama-bf16": dict(dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("case", CASES)
def test_module_logits_equal_kvjax_forward(case):
    params = _tiny(**CASES[case])
    module = CausalLM.from_params(params)
    tokens, lengths = _tokens(), jnp.asarray([24, 17], jnp.int32)
    got = nnx.jit(lambda m, t, n: m(t, n))(module, tokens, lengths)
    want = kvjax.forward(params, tokens, lengths)
    assert got.shape == (2, 24, TINY["vocab_size"]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_params_module_params_keeps_every_leaf_bit_identical(case):
    params = _tiny(**CASES[case])
    back = CausalLM.from_params(params).to_params()
    assert back.config == params.config and back.tokenizer is params.tokenizer
    before, tree_before = jax.tree_util.tree_flatten(params.weights)
    after, tree_after = jax.tree_util.tree_flatten(back.weights)
    assert tree_after == tree_before  # same layout (stacked or per-layer), same biases / lm_head
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_module_holds_the_weights_as_params_in_the_weights_layout():
    params = _tiny(per_layer=True, tie=True)
    module = CausalLM.from_params(params)
    state = nnx.state(module, nnx.Param)
    n_params = len(jax.tree_util.tree_leaves(state))
    assert n_params == len(jax.tree_util.tree_leaves(params.weights)) == 2 + 9 * TINY["num_hidden_layers"]
    assert module.per_layer and module.lm_head is None and module.layers[0].bq is None
    stacked = CausalLM.from_params(_tiny())
    assert not stacked.per_layer and stacked.layers.wq[...].shape == (2, 64, 64)


def test_classes_follow_model_type():
    assert type(CausalLM.from_params(_tiny("llama"))) is LlamaForCausalLM
    assert type(CausalLM.from_params(_tiny("mistral", sliding_window=8))) is MistralForCausalLM, Qwen2ForCausalLM
    assert type(CausalLM.from_params(_tiny("qwen2"))) is Qwen2ForCausalLM
    assert set(kvjax.models.config.SUPPORTED_MODEL_TYPES) == {LlamaForCausalLM.model_type,
                                                              MistralForCausalLM.model_type,
                                                              Qwen2ForCausalLM.model_type}


def _next_token_loss(model, tokens):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama before and after one adamw step on random tokens: (params, module, losses)."""
    params = _tiny()
    snapshot = jax.tree_util.tree_map(np.array, params.weights)
    module = CausalLM.from_params(params)
    optimizer = nnx.Optimizer(module, optax.adamw(3e-3), wrt=nnx.Param)
    tokens = _tokens(4, 32, seed=5)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(_next_token_loss)(model, tokens)
        optimizer.update(model, grads)
        return loss

    before = float(train_step(module, optimizer, tokens))
    after = float(nnx.jit(_next_token_loss)(module, tokens))
    return params, snapshot, module, (before, after)


def test_one_adamw_step_lowers_the_next_token_loss(trained):
    params, snapshot, module, (before, after) = trained
    # the loss of a random model on random tokens starts near log(V)
    assert abs(before - np.log(TINY["vocab_size"])) < 1.5
    assert after < before - 1e-3
    # the step changed every weight of the module, and none of the params it came from
    for new, old, orig in zip(jax.tree_util.tree_leaves(module.to_params().weights),
                              jax.tree_util.tree_leaves(params.weights), jax.tree_util.tree_leaves(snapshot)):
        assert not np.array_equal(np.asarray(new), orig)
        np.testing.assert_array_equal(np.asarray(old), orig)


def test_generate_with_snapkv_runs_on_the_fine_tuned_weights(trained):
    module = trained[2]
    tuned = module.to_params()
    prompt = np.asarray(_tokens(1, 40, seed=9))[0]
    out = kvjax.generate(tuned, [prompt], policy=kvjax.policies.SnapKV(budget=16, window=4), max_new_tokens=4)
    assert len(out.tokens[0]) == 4 and all(0 <= t < TINY["vocab_size"] for t in out.tokens[0])
    # the first token is the greedy choice of the fine-tuned module itself
    logits = nnx.jit(lambda m, t: m(t))(module, jnp.asarray(prompt)[None])
    assert out.tokens[0][0] == int(jnp.argmax(logits[0, -1]))


def test_from_pretrained_reads_a_hf_directory_through_kvjax(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    e, f, v, n = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], TINY["num_hidden_layers"]
    hq, hkv = e, e // 2  # 4 heads and 2 KV heads of 16
    tensors = {"model.embed_tokens.weight": rng.normal(size=(v, e)), "model.norm.weight": rng.normal(size=(e,)),
               "lm_head.weight": rng.normal(size=(v, e))}
    for i in range(n):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": rng.normal(size=(e,)),
                    p + "post_attention_layernorm.weight": rng.normal(size=(e,)),
                    p + "self_attn.q_proj.weight": rng.normal(size=(hq, e)),
                    p + "self_attn.k_proj.weight": rng.normal(size=(hkv, e)),
                    p + "self_attn.v_proj.weight": rng.normal(size=(hkv, e)),
                    p + "self_attn.o_proj.weight": rng.normal(size=(e, hq)),
                    p + "mlp.gate_proj.weight": rng.normal(size=(f, e)),
                    p + "mlp.up_proj.weight": rng.normal(size=(f, e)),
                    p + "mlp.down_proj.weight": rng.normal(size=(e, f))}
    save_file({k: x.astype(np.float32) for k, x in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="mistral")))

    module = MistralForCausalLM.from_pretrained(tmp_path, dtype=jnp.float32, per_layer=False)
    assert type(module) is MistralForCausalLM and module.config.num_kv_heads == 2
    np.testing.assert_array_equal(module.embed[...], tensors["model.embed_tokens.weight"].astype(np.float32))
    np.testing.assert_array_equal(module.lm_head[...], tensors["lm_head.weight"].T.astype(np.float32))
    np.testing.assert_array_equal(module.layers.wk[...][1],
                                  tensors["model.layers.1.self_attn.k_proj.weight"].T.astype(np.float32))
    bf16 = CausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16, per_layer=True)
    assert bf16.per_layer and bf16.layers[1].w_down[...].dtype == jnp.bfloat16


def test_bad_inputs_are_named():
    mistral = _tiny("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="LlamaForCausalLM takes model_type 'llama'.*'mistral'"):
        LlamaForCausalLM.from_params(mistral)
    with pytest.raises(TypeError, match="params must be a kvjax.Params, got dict"):
        CausalLM.from_params({})
    params = _tiny()
    bad = dataclasses.replace(params.weights, layers=dataclasses.replace(params.weights.layers,
                                                                          wk=params.weights.layers.wq))
    with pytest.raises(ValueError, match=r"params.weights.layers.wk has shape \(2, 64, 64\), the config implies "
                                         r"\(2, 64, 32\)"):
        CausalLM.from_params(dataclasses.replace(params, weights=bad))
    with pytest.raises(ValueError, match="lm_head is None but the config has tie_word_embeddings=False"):
        CausalLM.from_params(dataclasses.replace(params, weights=dataclasses.replace(params.weights, lm_head=None)))
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\], got shape \(24,\)"):
        CausalLM.from_params(params)(_tokens()[0])


def test_importing_kvjax_does_not_import_flax():
    code = "import sys, kvjax, kvjax.models; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
