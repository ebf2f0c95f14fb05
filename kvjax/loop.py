"""The sampling loop: a named state carried through `lax.while_loop`, in chunks of steps.

    state = start(logits [B, V], cache, rng, stop_ids, capacity=, sampler=)   # samples the first token
    state = drive(weights, state, policy, max_new, stop_ids, config=, plan=, sampler=, implementation=)

The compiled loop (`runner(batch)`) decodes until every row is done or `until` steps are sampled;
`until` is traced, so `drive` calls it a chunk of steps at a time (the host stays responsive:
Ctrl-C, stop strings) and compiles nothing new.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def _run(weights, state: DecodeState, policy, until, stop_ids, *, config, plan, sampler, implementation, parallel=None):
    def cond(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        active = ~s.done
        cache, logits = decode_step(weights, s.cache, s.tokens[:, s.step - 1], policy, active, config=config,
                                    plan=plan, implementation=implementation, parallel=parallel)
        rng, key = jax.random.split(s.rng)
        tok = sampler(logits, key)
        return DecodeState(
            cache, s.step + 1, s.tokens.at[:, s.step].set(jnp.where(active, tok, 0)),
            s.done | (active & jnp.isin(tok, stop_ids)), s.n_gen + active.astype(jnp.int32), rng,
        )

    return jax.lax.while_loop(cond, body, state)


_JIT = dict(static_argnames=("config", "plan", "sampler", "implementation", "parallel"), donate_argnums=(1,))
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


def host(array, parallel=None) -> np.ndarray:
    """A device array on the host (on a mesh spanning processes, gathered first)."""
    return np.asarray(array if parallel is None else parallel.gathered(array))


def _stop_at_strings(state: DecodeState, stops: tuple[str, ...], decode, checked: list[int],
                     parallel=None) -> DecodeState:
    """Rows whose generated text now contains a stop string end at the token that completes it."""
    tokens, n_gen, done = (host(a, parallel).copy() for a in (state.tokens, state.n_gen, state.done))
    changed = False
    for i in range(tokens.shape[0]):
        n = int(n_gen[i])
        if checked[i] >= n:
            continue
        text = decode(tokens[i, :n].tolist())
        if any(s in text for s in stops):
            k = max(checked[i], 1)
            while not any(s in decode(tokens[i, :k].tolist()) for s in stops):
                k += 1
            n_gen[i], done[i], changed = k, True, True
        checked[i] = int(n_gen[i])
    if not changed:
        return state
    put = jnp.asarray if parallel is None else (lambda a, like: parallel.put(a, like.sharding.spec))
    if parallel is None:
        return dataclasses.replace(state, n_gen=put(n_gen), done=put(done))
    return dataclasses.replace(state, n_gen=put(n_gen, state.n_gen), done=put(done, state.done))


@contextlib.contextmanager
def _ctrl_c_is_never_lost():
    """Ctrl-C during the loop always ends it with KeyboardInterrupt. Python raises it wherever the
    main thread happens to be, and where that is a garbage-collector callback (JAX registers one)
    the exception is printed as "ignored" and dropped: the handler also records the signal, and
    the loop raises it itself at the next chunk. Only Python's own handler is wrapped."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def drive(weights, state: DecodeState, policy, max_new: int, stop_ids, *, config, plan, sampler, implementation,
          stop_strings: tuple[str, ...] = (), decode=None, seconds_per_call: float = 0.5, parallel=None) -> DecodeState:
    """Decode until every row is done or `max_new` tokens are sampled, a chunk of steps per call of
    the compiled loop, sized so a call takes about `seconds_per_call`: between calls the host sees
    Ctrl-C and checks stop strings (a row whose text contains one ends at the token completing it)."""
    run = runner(state.tokens.shape[0])
    if policy.decode_eviction is not None:  # eviction looks at the slots streams really reserved
        caps = state.cache.streams.cap
        plan = plan.for_decode(host(caps, parallel))
    checked = [0] * state.tokens.shape[0]
    if stop_strings:
        state = _stop_at_strings(state, stop_strings, decode, checked, parallel)
    steps, chunk = 1, 8
    with _ctrl_c_is_never_lost() as interrupted:
        while steps < max_new and not bool(jnp.all(state.done)):
            if interrupted():
                raise KeyboardInterrupt
            until = min(steps + chunk, max_new)
            t0 = time.perf_counter()
            state = run(weights, state, policy, jnp.int32(until), stop_ids, config=config, plan=plan,
                        sampler=sampler, implementation=implementation, parallel=parallel)
            jax.block_until_ready(state.step)
            took = max(time.perf_counter() - t0, 1e-4)
            chunk = int(min(max((until - steps) * seconds_per_call / took, 1), 4096))
            steps = until
            if stop_strings:
                state = _stop_at_strings(state, stop_strings, decode, checked, parallel)
        if interrupted():
            raise KeyboardInterrupt
    return state
