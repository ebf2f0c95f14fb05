"""Prefill: run the prompt and compress each layer's KV into the pool, as the policy's
`prefill_mode` says (asked here, once).

    plan = make_plan(policy, config, prompt_len, headroom)
    cache, logits = prefill(weights, tokens [B, T], lengths [B], policy, rng, config=, plan=)
    caches, logits = prefill_policies(weights, tokens, lengths, policies, plans, rng, config=)

`prefill_policies` compresses one prompt pass for several one-shot or cascading policies at once
(their prompt forward does not depend on the compression): one cache per policy, as `prefill`
builds it alone.
"""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.cache import Cache, Plan
from kvjax.models import ModelConfig, Weights, final_logits
from kvjax.policies.base import PrefillMode
from kvjax.policies.policy import Policy
from kvjax.compress import cascade, chunked, oneshot
from kvjax.compress.prompt import prompt_pass


def make_plan(policy: Policy, config: ModelConfig, prompt_len: int, headroom: int) -> Plan:
    """The pool layout for a prompt bucket of `prompt_len` tokens and `headroom` decode slots per stream."""
    mode = policy.prefill_mode
    if mode is PrefillMode.CASCADE:
        return cascade.make_plan(policy, config, prompt_len, headroom)
    if mode is PrefillMode.CHUNKED:
        return chunked.make_plan(policy, config, prompt_len, headroom)
    return oneshot.make_plan(policy, config, prompt_len, headroom)


def _last_logits(weights: Weights, x, lengths, config: ModelConfig):
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    return final_logits(weights, last, config)[:, 0]


def prefill_traced(weights: Weights, tokens, lengths, policies: tuple[Policy, ...], plans: tuple[Plan, ...], rng, *,
                   config: ModelConfig, implementation: str = "xla"):
    """One prompt pass, every policy's compression (one-shot or cascade).
    Returns (caches, logits of each row's last token [B, V], per-policy traces: for the cascade its
    occupancy [L, B], the used slots after each layer; None for one-shot)."""
    t = tokens.shape[1]
    dtype = weights.embed.dtype
    comps = []
    for policy, plan in zip(policies, plans):
        mode = policy.prefill_mode
        if mode is PrefillMode.CASCADE:
            comps.append(cascade.compressor(policy, plan, lengths, t, config, dtype, implementation))
        elif mode is PrefillMode.ONE_SHOT:
            comps.append(oneshot.compressor(policy, plan, lengths, config, dtype, implementation))
        else:
            raise ValueError(f"{type(policy).__name__} streams its prompt in chunks: it cannot share a prompt pass")
    x, states, traces = prompt_pass(weights, tokens, lengths, config, tuple(comps), rng)
    caches, extra = [], []
    for policy, plan, state, trace in zip(policies, plans, states, traces):
        if policy.prefill_mode is PrefillMode.CASCADE:
            cache, occupancy = cascade.finish(state, trace, plan, lengths)
            caches.append(cache), extra.append(occupancy)
        else:
            caches.append(oneshot.finish(state, trace, plan, lengths)), extra.append(None)
    return tuple(caches), _last_logits(weights, x, lengths, config), tuple(extra)


def prefill_policies(weights: Weights, tokens, lengths, policies, plans, rng, *, config: ModelConfig,
                     implementation: str = "xla") -> tuple[tuple[Cache, ...], object]:
    """(caches, logits [B, V]) of one prompt pass compressed by each policy (see `prefill_traced`)."""
    caches, logits, _ = prefill_traced(weights, tokens, lengths, tuple(policies), tuple(plans), rng, config=config,
                                       implementation=implementation)
    return caches, logits


def prefill(weights: Weights, tokens, lengths, policy: Policy, rng, *, config: ModelConfig, plan: Plan,
            implementation: str = "xla", parallel=None):
    """Prefill (compressing) right-padded prompts tokens [B, T], lengths [B]: (cache, logits [B, V]).
    parallel: a `kvjax.mesh.Parallel`: each device prefills its sequences and KV heads."""
    if parallel is not None:
        run = lambda w, t, n, pol, r, cfg: prefill(w, t, n, pol, r, config=cfg, plan=plan,  # noqa: E731
                                                   implementation=implementation)
        return parallel.prefill(run, weights, config, plan, tokens, lengths, policy, rng)
    if policy.prefill_mode is PrefillMode.CHUNKED:
        return chunked.prefill(weights, tokens, lengths, policy, rng, config=config, plan=plan,
                               implementation=implementation)
    (cache,), logits = prefill_policies(weights, tokens, lengths, (policy,), (plan,), rng, config=config,
                                        implementation=implementation)
    return cache, logits
