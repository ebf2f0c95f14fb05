"""Reference attention maps from transformers (PyTorch, eager, f32) and numpy helpers, shared by
the oracle tests of the eviction rules."""

from __future__ import annotations

import numpy as np


def hf_attentions(checkpoint_dir, ids) -> list[np.ndarray]:
    """Full softmax attention of every layer for one prompt: L x [Hq, n, n] float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return [a[0].numpy() for a in model(torch.tensor([ids]), output_attentions=True).attentions]


def avg_pool5(x):
    """Average pooling over the last axis, kernel 5, zero padding counted (torch's avg_pool1d)."""
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(2, 2)])
    return sum(padded[..., i : i + x.shape[-1]] for i in range(5)) / 5.0
