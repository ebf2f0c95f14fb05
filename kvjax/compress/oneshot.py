"""One-shot prefill: after each layer's attention, the policy scores that layer's tokens, picks each
stream's keep-set and packs it into the layer's region of the pool (`compress_layer`).

    plan = make_plan(policy, config, prompt_len, headroom)
    c = compressor(policy, plan, lengths, config, dtype, implementation)    # for kvjax.compress.prompt
    cache = finish(c_state, traces, plan, lengths)

Regions are static (one per layer, sized by the layer's stream bound); how a region is split among
the layer's heads may differ per sequence (Ada-KV).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kvjax.cache import Cache, Plan, Pools, Streams, region_layout, round_up
from kvjax.models import ModelConfig
from kvjax.policies.policy import Policy
from kvjax.compress.step import compress_layer, layer_stats, resolve_budget
from kvjax.compress.prompt import Compressor


def budget_bound(policy: Policy, prompt_len: int) -> int:
    """Static bound on one stream's budget for a prompt bucket (before per-layer allocation): token
    budgets are rounded up to BUDGET_ROUNDING so nearby budgets share a compile; a ratio's bound
    is a function of the bucket already."""
    budget = policy.budget
    if isinstance(budget, (float, np.floating)):
        return math.ceil(budget * prompt_len)
    if isinstance(budget, (int, np.integer)):
        return round_up(budget)  # exact when a multiple
    return int(np.max(budget))


def reach(policy: Policy, prompt_len: int, growth: int) -> int:
    """The most tokens a stream can ever hold: the prompt, plus the tokens decoding appends (the
    question and the generated tokens) for policies that hold streams at their budget while decoding."""
    return prompt_len + (growth if policy.decode_eviction is not None else 0)


def stream_bound(policy: Policy, prompt_len: int, growth: int = 0) -> int:
    """The most tokens one stream holds before it evicts (after prefill, for prefill-only policies)."""
    return min(budget_bound(policy, prompt_len), reach(policy, prompt_len, growth))


def make_plan(policy: Policy, config: ModelConfig, prompt_len: int, headroom: int) -> Plan:
    """Size the pool for a prompt bucket of `prompt_len` tokens and `headroom` decode tokens per
    stream. A policy that evicts while decoding lets a stream grow to its budget (at most prompt +
    headroom), then holds it there: its streams need only their eviction period beyond that."""
    num_layers, h = config.num_layers, config.num_kv_heads
    if policy.keeps_everything:
        bounds = np.full((num_layers,), prompt_len, np.int64)
    else:
        bounds = policy.allocator.static_layer_bounds(budget_bound(policy, prompt_len), num_layers)
        bounds = np.minimum(np.asarray(bounds), reach(policy, prompt_len, headroom))
    ev = policy.decode_eviction
    headroom = ev.every if ev is not None else headroom
    adaptive = bool(policy.allocator.adaptive_heads)
    # Ada-KV's rounding may give a layer's heads up to H/2 tokens beyond H·B (kvjax/policies/adakv.py)
    slack = h // 2 + 1 if adaptive else 0
    spans = [h * (int(b) + headroom) + slack for b in bounds]
    return Plan(region_layout(spans, h), tuple(int(b) for b in bounds), int(headroom), adaptive, packed=adaptive)


def compressor(policy: Policy, plan: Plan, lengths, config: ModelConfig, dtype, implementation: str,
               layer_budgets=None) -> Compressor:
    """The one-shot compression of `policy` as a step of the prompt pass (state: the pool).

    layer_budgets [B, L]: tokens per head of each layer; default: the policy's allocation of its
    budget for prompts of `lengths` [B]."""
    b = lengths.shape[0]
    if layer_budgets is None:
        per_head = resolve_budget(policy, lengths)
        layer_budgets = policy.allocator.layer_budgets(per_head, config.num_layers, lengths)  # [B, L]
    # a stream keeps min(budget, prompt) tokens, which the plan's bound holds; the budget itself is
    # stored as given (a decode-time-eviction policy fills the stream up to it before it evicts)
    xs = (jnp.asarray(plan.layout.layer_base, jnp.int32), layer_budgets.T, jnp.asarray(plan.stream_bound, jnp.int32))
    first = jnp.zeros((b,), jnp.int32)

    def step(pools, stats, layer_xs):
        base, layer_budget, bound = layer_xs
        stats = layer_stats(policy, stats, config.attention_scale)
        return compress_layer(policy, plan, pools, stats, layer_budget, bound, base=base, size=plan.max_span,
                              first=first, implementation=implementation)

    scorer = policy.scorer
    state = Pools.empty(b, plan.layout.pool_size, config.head_dim, dtype)
    return Compressor(step, state, xs, scorer.needs_colsum, scorer.needs_colsq, scorer.group_reduce)


def finish(pools: Pools, traces, plan: Plan, lengths) -> Cache:
    """The cache from the final pool and the per-layer (start, length, cap, budget) [L, B, H]."""
    return Cache(pools, Streams(*traces), lengths.astype(jnp.int32), plan.layout)
