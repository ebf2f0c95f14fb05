"""The sampling loop: a named state carried through `lax.while_loop`, in chunks of steps.

    state = start(logits [B, V], cache, rng, stop_ids, capacity=, sampler=)   # samples the first token
    state = run(weights, state, policy, until, stop_ids, config=, plan=, sampler=, implementation=)

`run` decodes until every row is done or `until` steps are sampled; `until` is traced, so calling it
again to go on (a chunk at a time, so the host stays responsive) compiles nothing new.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax.cache import Cache
from kvjax.decode import decode_step, gemm_compiler_options


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """cache; step: tokens sampled so far (scalar); tokens [B, capacity] int32 (0 after a row is
    done); done [B] bool; n_gen [B] int32 tokens each row generated; rng."""

    cache: Cache
    step: jax.Array
    tokens: jax.Array
    done: jax.Array
    n_gen: jax.Array
    rng: jax.Array


@functools.partial(jax.jit, static_argnames=("capacity", "sampler"))
def start(logits, cache: Cache, rng, stop_ids, *, capacity: int, sampler) -> DecodeState:
    """The state after sampling the first token from the prefill's logits [B, V]."""
    b = logits.shape[0]
    rng, key = jax.random.split(rng)
    first = sampler(logits, key)
    tokens = jnp.zeros((b, capacity), jnp.int32).at[:, 0].set(first)
    return DecodeState(cache, jnp.int32(1), tokens, jnp.isin(first, stop_ids), jnp.ones((b,), jnp.int32), rng)


def _run(weights, state: DecodeState, policy, until, stop_ids, *, config, plan, sampler, implementation):
    def cond(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        active = ~s.done
        cache, logits = decode_step(weights, s.cache, s.tokens[:, s.step - 1], policy, active, config=config,
                                    plan=plan, implementation=implementation)
        rng, key = jax.random.split(s.rng)
        tok = sampler(logits, key)
        return DecodeState(
            cache, s.step + 1, s.tokens.at[:, s.step].set(jnp.where(active, tok, 0)),
            s.done | (active & jnp.isin(tok, stop_ids)), s.n_gen + active.astype(jnp.int32), rng,
        )

    return jax.lax.while_loop(cond, body, state)


_JIT = dict(static_argnames=("config", "plan", "sampler", "implementation"), donate_argnums=(1,))
_run_default = jax.jit(_run, **_JIT)
_run_with_options: dict = {}


def runner(batch: int):
    """The jitted loop for this batch size (GEMM back end: kvjax.decode.gemm_compiler_options)."""
    options = gemm_compiler_options(batch)
    if not options:
        return _run_default
    key = tuple(sorted(options.items()))
    if key not in _run_with_options:
        _run_with_options[key] = jax.jit(_run, **_JIT, compiler_options=options)
    return _run_with_options[key]


def compiled_count() -> int:
    """Programs compiled so far for the loop (tests: no recompilation within a bucket)."""
    return _run_default._cache_size() + sum(f._cache_size() for f in _run_with_options.values())
