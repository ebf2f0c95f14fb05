"""The prompt pass shared by every prefill mode and by several policies at once.

    x, states, traces = prompt_pass(weights, tokens, lengths, config, compressors, rng)

Each layer runs `decoder_layer` with prompt attention (chunked over queries, or a fused kernel),
asking it for the column statistics some scorer needs; then every compressor takes that layer's
statistics and updates its own state (its pool). The prompt's full KV lives for one layer at a
time, and one forward serves any number of policies (the quality benchmark compresses a batch for
every policy from one pass).

A compressor is a (step, state, xs) triple: xs holds per-layer inputs with a leading [L] axis and
`step(state, stats, layer_xs) -> (state, trace)` compresses one layer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from kvjax.models import ModelConfig, Weights, decoder_layer, embed, scan_layers
from kvjax.models.prompt_attention import causal_attention
from kvjax.policies.base import PrefillStats


class Compressor(NamedTuple):
    step: Callable  # (state, stats, layer_xs) -> (state, trace)
    state: Any
    xs: Any  # per-layer inputs, leading axis [L]
    colsum: bool = False  # the scorer reads the attention's column sums
    colsq: bool = False  # ... and the column sums of the squared, group-reduced attention
    group_reduce: str = "mean"  # how colsq reduces the GQA group


def prompt_attend(lengths, config: ModelConfig, colsum: bool, colsq: bool, group_reduce: str):
    """`attend` for the prompt: (out, (q, k, v, colsum, colsq)); the statistics are None unless asked."""
    kw = dict(scale=config.attention_scale, sliding_window=config.sliding_window)

    def attend(q, k, v):
        cs = sq = None
        if colsq:
            out, cs, sq = causal_attention(q, k, v, lengths, column_squares=True, group_reduce=group_reduce, **kw)
        elif colsum:
            out, cs = causal_attention(q, k, v, lengths, column_sums=True, **kw)
        else:
            out = causal_attention(q, k, v, lengths, **kw)
        return out, (q, k, v, cs, sq)

    return attend


def prompt_stats(q, k, v, lengths, colsum, colsq, layer, rng, config: ModelConfig) -> PrefillStats:
    """What one prompt layer hands the compressors (no observation window yet: `layer_stats`)."""
    return PrefillStats(q, k, v, lengths, None, None, colsum, colsq, layer, rng, config.model_axis, config.data_axis)


def prompt_pass(weights: Weights, tokens, lengths, config: ModelConfig, compressors: tuple[Compressor, ...], rng):
    """Run the prompt tokens [B, T] (right-padded, lengths [B]) through every layer, compressing as
    it goes. Returns (x [B, T, E] final hidden states, states, traces [L, ...] per compressor)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    colsum = any(c.colsum for c in compressors)
    colsq = any(c.colsq for c in compressors)
    reduces = {c.group_reduce for c in compressors if c.colsq}
    if len(reduces) > 1:
        raise ValueError(f"one prompt pass computes one kind of squared column sums, got {sorted(reduces)}")
    attend = prompt_attend(lengths, config, colsum, colsq, reduces.pop() if reduces else "mean")

    def layer_step(carry, xs):
        x, states = carry
        lw, layer, per = xs
        x, (q, k, v, cs, sq) = decoder_layer(lw, x, positions, config, attend)
        stats = prompt_stats(q, k, v, lengths, cs, sq, layer, rng, config)
        out = [c.step(s, stats, p) for c, s, p in zip(compressors, states, per)]
        return (x, tuple(s for s, _ in out)), tuple(tr for _, tr in out)

    init = (embed(weights, tokens), tuple(c.state for c in compressors))
    xs = (weights.layers, jnp.arange(config.num_layers), tuple(c.xs for c in compressors))
    # one layer body to compile (per-layer buffers included): a layer's prompt work dwarfs the
    # copy of its weights that `one_body` costs
    (x, states), traces = scan_layers(layer_step, init, xs, one_body=True)
    return x, states, traces
