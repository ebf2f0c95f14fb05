"""Pure, jittable prefill and decode steps over the pooled cache.

    prefill(weights, tokens [B, T], lengths [B], policy, rng)  -> (Cache, logits of the last token [B, V])
    decode_step(weights, cache, tokens [B], policy, active [B]) -> (Cache, logits [B, V])

Prefill runs the layers in a `lax.scan`; after each layer's attention the policy scores that
layer's tokens, picks what each stream keeps and packs it into the layer's pool region, so the
prompt's full KV never exists for more than one layer at a time. Decode carries the pool through
the layer scan and updates it in place.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import Cache, Layout
from kvjax.models import ModelConfig, Weights
from kvjax.models.prompt_attention import NEG_INF, causal_attention
from kvjax.models.llama import attn_output, embed, final_logits, layer_qkv, mlp, rope_inv_freq, scan_layers
from kvjax.pallas_kernels import budget_scatter as bs
from kvjax.pallas_kernels import masked_topk as mt
from kvjax.policies.base import PrefillStats
from kvjax.policies.policy import Policy

#: per-stream capacities are rounded up to this many slots, so nearby budgets share a compile
BUDGET_ROUNDING = 16

#: counts how often each jitted entry point was traced (tests assert no recompilation)
TRACE_COUNTS: dict[str, int] = {"prefill": 0, "decode": 0, "generate": 0}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static sizes of one compiled prefill/decode: the pool layout and per-layer stream bounds.

    stream_bound[l]: most tokens a stream of layer l keeps after prefill (the budget's bound)
    headroom:        extra slots per stream for decode tokens (max new tokens, or the eviction
                     period for policies that evict while decoding)
    """

    layout: Layout
    stream_bound: tuple[int, ...]
    headroom: int
    adaptive_heads: bool

    @property
    def max_span(self) -> int:
        return max(self.layout.layer_span)


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def make_plan(policy: Policy, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> Plan:
    """Size the pool for a prompt bucket of `prompt_len` tokens and `max_new_tokens` decode steps."""
    num_layers, h = config.num_layers, config.num_kv_heads
    if policy.keeps_everything:
        bounds = np.full((num_layers,), prompt_len, np.int64)
    else:
        budget = policy.budget
        if isinstance(budget, (float, np.floating)):
            bound = math.ceil(budget * prompt_len)
        elif isinstance(budget, (int, np.integer)):
            bound = int(budget)
        else:
            bound = int(np.max(budget))
        if np.ndim(budget) == 0:  # nearby budgets share one compile; exact when a multiple
            bound = _round_up(bound, BUDGET_ROUNDING)
        bounds = policy.allocator.static_layer_bounds(min(bound, prompt_len), num_layers)
        bounds = np.minimum(np.asarray(bounds), prompt_len)
    ev = policy.decode_eviction
    headroom = ev.every if ev is not None else max_new_tokens
    # Ada-KV's rounding may give a layer's heads up to H/2 tokens beyond H·B (kvjax/policies/adakv.py)
    slack = h // 2 + 1 if policy.allocator.adaptive_heads else 0
    spans = [h * (int(b) + headroom) + slack for b in bounds]
    # Lay the largest region last, so a max-span slice from any layer's base stays inside the pool.
    order = sorted(range(num_layers), key=lambda l: spans[l])
    base = [0] * num_layers
    offset = 0
    for l in order:
        base[l] = offset
        offset += spans[l]
    layout = Layout(tuple(base), tuple(spans), h)
    return Plan(layout, tuple(int(b) for b in bounds), int(headroom), bool(policy.allocator.adaptive_heads))


def resolve_budget(policy: Policy, lengths):
    """Per-head token budget of each sequence [B] int32 (before per-layer allocation)."""
    if policy.keeps_everything:
        return lengths
    budget = jnp.asarray(policy.budget)
    if budget.ndim > 0:  # per-layer arrays are handled by the allocator
        return lengths
    if jnp.issubdtype(budget.dtype, jnp.floating):
        return jnp.maximum(jnp.round(budget * lengths).astype(jnp.int32), 1)
    return jnp.broadcast_to(budget.astype(jnp.int32), lengths.shape)


def window_attention(q, k, lengths, window: int, scale: float):
    """Softmax attention of the last `window` valid queries of each sequence over the prompt.

    q [B, H, G, T, D], k [B, H, T, D] -> (probs [B, H, G, w, T] float32, row_valid [B, w]).
    """
    b, h, g, t, d = q.shape
    q_pos = lengths[:, None] - window + jnp.arange(window)[None, :]  # [B, w]
    row_valid = q_pos >= 0
    q_pos = jnp.maximum(q_pos, 0)
    qw = jnp.take_along_axis(q, q_pos[:, None, None, :, None], axis=3)  # [B, H, G, w, D]
    logits = jnp.matmul(
        qw.reshape(b, h, g * window, d), jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32
    ).reshape(b, h, g, window, t) * scale
    k_pos = jnp.arange(t)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < lengths[:, None, None])
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1), row_valid


def _select(policy: Policy, stats: PrefillStats, layer_budget, implementation: str):
    """Keep-mask [B, H, T] and per-head budgets [B, H] of one layer."""
    valid = stats.valid
    b, h, t = stats.k.shape[:3]
    if policy.keeps_everything:
        lengths = jnp.broadcast_to(stats.lengths[:, None], (b, h))
        return jnp.broadcast_to(valid[:, None], (b, h, t)), lengths
    scores = policy.scorer.prefill_scores(stats).astype(jnp.float32)
    pos = stats.positions[None, :]
    forced = pos < policy.protected_sinks
    if policy.protected_window:
        forced |= pos >= stats.lengths[:, None] - policy.protected_window
    scores = jnp.where(forced[:, None, :], jnp.inf, scores)
    budgets = policy.allocator.head_budgets(scores, layer_budget, valid, stats.layer)
    budgets = jnp.clip(budgets, 0, stats.lengths[:, None]).astype(jnp.int32)
    keep = mt.masked_topk(
        scores.reshape(b * h, t),
        budgets.reshape(b * h),
        jnp.broadcast_to(valid[:, None], (b, h, t)).reshape(b * h, t),
        implementation=implementation,
    ).reshape(b, h, t)
    return keep, budgets


def prefill(weights: Weights, tokens, lengths, policy: Policy, rng, *, config: ModelConfig, plan: Plan,
            implementation: str = "xla"):
    """Run the prompt, compress each layer's KV as it is produced. Returns (cache, logits [B, V])."""
    TRACE_COUNTS["prefill"] += 1
    b, t = tokens.shape
    num_layers, h, d = config.num_layers, config.num_kv_heads, config.head_dim
    layout, span_max = plan.layout, plan.max_span
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = rope_inv_freq(config)
    scorer = policy.scorer
    window = scorer.window
    per_head = resolve_budget(policy, lengths)
    layer_budgets = policy.allocator.layer_budgets(per_head, num_layers, lengths)  # [B, L]
    layer_budgets = jnp.minimum(layer_budgets, jnp.asarray(plan.stream_bound)[None, :])
    keep_running = policy.decode_eviction is not None
    dtype = weights.embed.dtype

    def layer_step(carry, xs):
        x, k_pool, v_pool, pos_pool, s_pool, s2_pool = carry
        lw, layer, base, span, layer_budget, bound = xs
        q, k, v = layer_qkv(lw, x, positions, config, inv_freq)
        kw = dict(scale=config.attention_scale, sliding_window=config.sliding_window)
        colsum = colsq = None
        if scorer.needs_colsq:  # RoCo: the squared attention comes from the same chunked pass
            attn, colsum, colsq = causal_attention(q, k, v, lengths, column_squares=True,
                                                   group_reduce=getattr(scorer, "group_reduce", "mean"), **kw)
        elif scorer.needs_colsum:
            attn, colsum = causal_attention(q, k, v, lengths, column_sums=True, **kw)
        else:
            attn = causal_attention(q, k, v, lengths, **kw)
        x = mlp(lw, x + attn_output(lw, attn), config)
        win_attn = row_valid = None
        if window and not policy.keeps_everything:
            win_attn, row_valid = window_attention(q, k, lengths, window, config.attention_scale)
        stats = PrefillStats(k, v, lengths, win_attn, row_valid, colsum, colsq, layer, rng)
        keep, budgets = _select(policy, stats, layer_budget, implementation)
        if keep_running:
            run1, run2 = scorer.prefill_running(stats)
        else:
            run1 = run2 = jnp.zeros((b, h, t), jnp.float32)
        if plan.adaptive_heads:
            caps = budgets + plan.headroom
        else:
            caps = jnp.broadcast_to(bound + plan.headroom, (b, h)).astype(jnp.int32)
        rel_start = jnp.cumsum(caps, axis=1) - caps  # [B, H]
        src_head, src_tok, written = bs.pack_plan(keep, rel_start, span_max)
        in_span = jnp.arange(span_max)[None, :] < span

        def pack(pool, src, empty):
            region = jax.lax.dynamic_slice_in_dim(pool, base, span_max, axis=1)
            if src.ndim == 4:  # [B, H, T, D] payload
                gathered = bs.budget_scatter(region, src, src_head, src_tok, written, implementation=implementation)
                cleared = jnp.where(in_span[..., None], jnp.asarray(empty, pool.dtype), region)
                new = jnp.where(written[..., None], gathered, cleared)
            else:  # [B, H, T] per-token payload
                gathered = src[jnp.arange(b)[:, None], src_head, src_tok]
                cleared = jnp.where(in_span, jnp.asarray(empty, pool.dtype), region)
                new = jnp.where(written, gathered.astype(pool.dtype), cleared)
            return jax.lax.dynamic_update_slice_in_dim(pool, new, base, axis=1)

        tok_pos = jnp.broadcast_to(positions[:, None, :], (b, h, t))
        carry = (
            x,
            pack(k_pool, k.astype(k_pool.dtype), 0),
            pack(v_pool, v.astype(v_pool.dtype), 0),
            pack(pos_pool, tok_pos, -1),
            pack(s_pool, run1, 0),
            pack(s2_pool, run2, 0),
        )
        return carry, (base + rel_start, keep.sum(-1).astype(jnp.int32), caps, budgets)

    p = layout.pool_size
    init = (
        embed(weights, tokens),
        jnp.zeros((b, p, d), dtype),
        jnp.zeros((b, p, d), dtype),
        jnp.full((b, p), -1, jnp.int32),
        jnp.zeros((b, p), jnp.float32),
        jnp.zeros((b, p), jnp.float32),
    )
    xs = (
        weights.layers,
        jnp.arange(num_layers),
        jnp.asarray(layout.layer_base, jnp.int32),
        jnp.asarray(layout.layer_span, jnp.int32),
        layer_budgets.T,
        jnp.asarray(plan.stream_bound, jnp.int32),
    )
    (x, k_pool, v_pool, pos_pool, s_pool, s2_pool), (start, length, cap, budget) = scan_layers(layer_step, init, xs)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    logits = final_logits(weights, last, config)[:, 0]
    cache = Cache(
        k=k_pool, v=v_pool, pos=pos_pool, score=s_pool, score2=s2_pool,
        start=start.transpose(1, 0, 2), length=length.transpose(1, 0, 2), cap=cap.transpose(1, 0, 2),
        budget=budget.transpose(1, 0, 2), next_pos=lengths.astype(jnp.int32), layout=layout,
    )
    return cache, logits
