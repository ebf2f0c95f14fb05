"""H2O's accumulated-attention rule, computed from transformers' full attention maps, picks the same
tokens as kvjax's blockwise column sums on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from conftest import torch_or_skip
from selection import assert_same_selection

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.mark.parametrize("budget", [64, 256])
def test_h2o_kept_positions_equal_the_accumulated_attention_rule(smollm2_f32, smollm2_dir, budget):
    torch = torch_or_skip()
    import transformers

    from kvjax.eval.passkey import passkey_prompt

    tok = smollm2_f32.tokenizer
    ids = tok.encode(passkey_prompt(key="27182", depth=0.5, n_repeats=30))[:700]
    recent = 32
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        attn = model(torch.tensor([ids]), output_attentions=True).attentions  # L x [1, Hq, T, T]
    cfg = smollm2_f32.config
    pre = kvjax.prefill(smollm2_f32, [ids], kvjax.policies.H2O(budget=budget, recent=recent), max_new_tokens=1)
    kept = kvjax.kept_positions(pre.cache)
    n = len(ids)
    for layer in range(cfg.num_layers):
        a = attn[layer][0].numpy().reshape(cfg.num_kv_heads, cfg.group_size, n, n)
        scores = a.sum(axis=2).mean(axis=1)  # accumulated over queries, mean over the group: [H, T]
        forced = np.arange(n) >= n - recent
        for h in range(cfg.num_kv_heads):
            assert_same_selection(kept[layer][0][h], scores[h], budget, forced, where=f"layer {layer} head {h}")
