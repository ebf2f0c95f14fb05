"""A 32K-token prefill never allocates a [T, T] buffer: XLA's own buffer assignment says so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kvjax import compress as engine
from kvjax import policies as P
from kvjax.models import LayerWeights, ModelConfig, Weights

T = 32768


def _abstract_params():
    config = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
    ))
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    l, e, f, d = 2, 64, 128, 16
    layers = LayerWeights(attn_norm=f32(l, e), wq=f32(l, e, 4 * d), wk=f32(l, e, 2 * d), wv=f32(l, e, 2 * d),
                          wo=f32(l, 4 * d, e), mlp_norm=f32(l, e), w_gate=f32(l, e, f), w_up=f32(l, e, f),
                          w_down=f32(l, f, e))
    return config, Weights(embed=f32(512, e), layers=layers, final_norm=f32(e), lm_head=f32(e, 512))


@pytest.mark.parametrize("policy", [P.SnapKV(budget=1024, window=32), P.H2O(budget=1024, recent=32)],
                         ids=["SnapKV-window-stats", "H2O-column-sums"])
def test_32k_prefill_peak_memory_has_no_t_by_t_buffer(policy):
    config, weights = _abstract_params()
    plan = engine.make_plan(policy, config, T, 16)
    fn = jax.jit(lambda w, t, n, p, r: engine.prefill(w, t, n, p, r, config=config, plan=plan))
    compiled = fn.lower(weights, jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
                        policy, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes
    t_by_t = T * T * 4  # one float32 [T, T] score matrix for a single head
    assert peak < t_by_t / 4, f"peak {peak / 2**20:.0f} MiB vs one [T, T] buffer {t_by_t / 2**20:.0f} MiB"
    # and the per-layer working set is what the query chunking implies (heads x chunk x T floats)
    chunk_scores = config.num_heads * 512 * T * 4
    assert mem.temp_size_in_bytes < 6 * chunk_scores + 64 * 2**20
