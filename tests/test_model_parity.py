"""kvjax's Llama/Mistral/Qwen2 logits equal Hugging Face transformers' (PyTorch, float32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import save_tiny_hf, torch_or_skip

pytestmark = pytest.mark.torch

CASES = {
    "llama_mha": dict(num_key_value_heads=4),
    "llama_gqa_untied": dict(tie_word_embeddings=False),
    "llama_gqa_tied": dict(tie_word_embeddings=True),
    "llama3_rope_scaling": dict(
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        rope_theta=500000.0,
    ),
    "linear_rope_scaling": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "biases_and_head_dim": dict(attention_bias=True, mlp_bias=True, head_dim=32),
}


def hf_logits(directory, tokens, **kw):
    torch = torch_or_skip()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, torch_dtype=torch.float32, attn_implementation="eager", **kw
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _tokens(n, seed=0, batch=2):
    return np.random.default_rng(seed).integers(0, 256, size=(batch, n)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_logits_match_transformers(tmp_path, case):
    d = save_tiny_hf(tmp_path, "llama", **CASES[case])
    tokens = _tokens(40)
    params = kvjax.load(d, dtype=jnp.float32)
    ours = np.asarray(kvjax.forward(params, tokens, chunk=16))
    ref = hf_logits(d, tokens)
    assert np.abs(ours - ref).max() <= 2e-4, np.abs(ours - ref).max()


QWEN2_CASES = {
    "qwen2_untied": dict(rope_theta=1000000.0),
    "qwen2_tied": dict(tie_word_embeddings=True),
    # every layer windowed (max_window_layers=0): one window for all layers, which kvjax supports
    "qwen2_sliding_all_layers": dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
}


@pytest.mark.parametrize("case", sorted(QWEN2_CASES))
def test_qwen2_logits_match_transformers(tmp_path, case):
    # Qwen2ForCausalLM: q/k/v biases (random here, so a dropped one shows), no o_proj or MLP bias
    d = save_tiny_hf(tmp_path, "qwen2", **QWEN2_CASES[case])
    tokens = _tokens(40)
    params = kvjax.load(d, dtype=jnp.float32)
    layers = params.weights.layers
    assert (params.config.qkv_bias, params.config.o_bias, params.config.mlp_bias) == (True, False, False)
    assert layers.bq is not None and layers.bk is not None and layers.bv is not None and layers.bo is None
    assert params.config.sliding_window == QWEN2_CASES[case].get("sliding_window")
    ours = np.asarray(kvjax.forward(params, tokens, chunk=16))
    ref = hf_logits(d, tokens)
    assert np.abs(ours - ref).max() <= 2e-4, np.abs(ours - ref).max()


def test_mistral_sliding_window_shorter_than_sequence_matches_transformers(tmp_path):
    d = save_tiny_hf(tmp_path, "mistral", sliding_window=8)
    tokens = _tokens(48)
    params = kvjax.load(d, dtype=jnp.float32)
    assert params.config.sliding_window == 8
    ours = np.asarray(kvjax.forward(params, tokens, chunk=16))
    ref = hf_logits(d, tokens)
    assert np.abs(ours - ref).max() <= 2e-4
    # the window really matters: without it the logits differ
    import dataclasses

    no_window = dataclasses.replace(params, config=dataclasses.replace(params.config, sliding_window=None))
    assert np.abs(np.asarray(kvjax.forward(no_window, tokens)) - ref).max() > 1e-2


def test_right_padding_does_not_change_valid_logits(tmp_path):
    d = save_tiny_hf(tmp_path, "llama")
    params = kvjax.load(d, dtype=jnp.float32)
    tokens = _tokens(32, batch=1)
    padded = np.concatenate([tokens, np.zeros((1, 16), np.int32)], axis=1)
    a = np.asarray(kvjax.forward(params, tokens))
    b = np.asarray(kvjax.forward(params, padded, lengths=np.array([32])))
    np.testing.assert_allclose(a, b[:, :32], atol=1e-5)


@pytest.mark.parametrize("model,extra", [("llama", {}), ("mistral", dict(sliding_window=8))], ids=["llama", "mistral-window"])
def test_fused_prompt_attention_matches_transformers(tmp_path, monkeypatch, model, extra):
    # the path GPUs take (cuDNN flash through jax.nn.dot_product_attention), forced on the CPU,
    # where dot_product_attention runs its XLA implementation: same logits as transformers,
    # right padding included
    import kvjax.models.prompt_attention as attention

    calls = []
    original = attention.fused_causal_attention
    monkeypatch.setattr(attention, "fused_available", lambda q: True)
    monkeypatch.setattr(attention, "fused_causal_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    d = save_tiny_hf(tmp_path, model, **extra)
    tokens = _tokens(40)
    params = kvjax.load(d, dtype=jnp.float32)
    padded = np.concatenate([tokens, np.zeros((2, 9), np.int32)], axis=1)
    ours = np.asarray(kvjax.forward(params, padded, lengths=np.array([40, 40])))[:, :40]
    assert calls, "the fused path was not taken"
    ref = hf_logits(d, tokens)
    assert np.abs(ours - ref).max() <= 2e-4, np.abs(ours - ref).max()
