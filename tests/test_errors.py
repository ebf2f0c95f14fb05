"""Bad input fails early with a message naming the problem."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import kvjax
from kvjax.policies import PolicyError
from test_generate import _tiny_params


def _write_config(d: pathlib.Path, **over):
    cfg = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(kvjax.ConfigError, match="no config.json"):
        kvjax.load(tmp_path)


def test_unknown_model_type_is_named(tmp_path):
    _write_config(tmp_path, model_type="gpt2")
    with pytest.raises(kvjax.ConfigError, match="unknown model_type 'gpt2'"):
        kvjax.load(tmp_path)


def test_missing_weights_are_named(tmp_path):
    _write_config(tmp_path)
    with pytest.raises(kvjax.CheckpointError, match="no model.safetensors"):
        kvjax.load(tmp_path)


def test_truncated_safetensors_is_named(tmp_path):
    from safetensors.numpy import save_file

    _write_config(tmp_path)
    save_file({"model.embed_tokens.weight": np.zeros((32, 16), np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(kvjax.CheckpointError, match="truncated"):
        kvjax.load(tmp_path)


def test_tensor_with_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import save_file

    _write_config(tmp_path)
    save_file({"model.embed_tokens.weight": np.zeros((31, 16), np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(kvjax.CheckpointError, match="model.layers.0.input_layernorm.weight|embed_tokens"):
        kvjax.load(tmp_path)


@pytest.fixture(scope="module")
def params():
    return _tiny_params()


def test_prompt_beyond_the_models_positions(params):
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        kvjax.generate(params, [np.zeros(500, np.int32)], max_new_tokens=20)


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_must_be_positive(params, n):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        kvjax.generate(params, [np.zeros(5, np.int32)], max_new_tokens=n)


@pytest.mark.parametrize("prompt", [[], [np.zeros(0, np.int32)]])
def test_empty_prompt(params, prompt):
    with pytest.raises(ValueError, match="empty"):
        kvjax.generate(params, prompt, max_new_tokens=2)


def test_token_ids_outside_the_vocabulary(params):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kvjax.generate(params, [np.array([1, 2, 999])], max_new_tokens=2)


def test_text_prompt_without_tokenizer(params):
    with pytest.raises(ValueError, match="no tokenizer"):
        kvjax.generate(params, "hello", max_new_tokens=2)


@pytest.mark.parametrize("budget", [0, -4, 1.5, 0.0])
def test_budget_zero_negative_or_bad_ratio(budget):
    with pytest.raises(PolicyError, match="budget"):
        kvjax.policies.SnapKV(budget=budget, window=1)


def test_window_larger_than_budget():
    with pytest.raises(PolicyError, match="window"):
        kvjax.policies.SnapKV(budget=16, window=32)


def test_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(PolicyError, match="unknown policy 'snap'.*snapkv"):
        kvjax.policies.make("snap", budget=16)


def test_unknown_policy_option_is_named():
    with pytest.raises(PolicyError, match="no option.*'windw'"):
        kvjax.policies.make("snapkv", budget=64, windw=8)


def test_policy_must_be_a_policy(params):
    with pytest.raises(TypeError, match="policy must be"):
        kvjax.generate(params, [np.ones(4, np.int32)], policy="snapkv", max_new_tokens=2)


def test_budget_larger_than_the_prompt_keeps_everything_and_says_so(params):
    prompt = np.arange(1, 30, dtype=np.int32)
    out = kvjax.generate(params, [prompt], policy=kvjax.policies.KNorm(budget=100), max_new_tokens=3)
    full = kvjax.generate(params, [prompt], max_new_tokens=3)
    assert out.stats["budget_covers_prompt"] == [True]
    assert out.tokens == full.tokens


def test_gpu_without_pallas_triton_decodes_through_xla_and_says_why_pallas_cannot(params, monkeypatch):
    # JAX 0.12 deprecates the Pallas Triton backend; where it is gone, the GPU default is the XLA
    # path and asking for the kernels is an error naming `implementation`, before anything compiles
    import jax

    from kvjax import validate
    from kvjax.pallas_kernels import _common

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_common, "triton_available", lambda: False)
    assert validate.default_implementation() == "xla"
    with pytest.raises(ValueError, match="implementation.*no Pallas Triton backend"):
        kvjax.generate(params, [np.zeros(5, np.int32)], max_new_tokens=2, implementation="pallas")
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    assert validate.default_implementation() == "pallas"
