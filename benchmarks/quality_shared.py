"""The quality benchmark's shared prefill: one prompt pass per batch, every one-shot or cascading
policy's compression after each layer, through the library's own `kvjax.compress.prefill_policies`
(the caches equal `kvjax.prefill`'s, checked before every run by benchmarks/quality.py)."""

from __future__ import annotations

import gc
import pathlib
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvjax  # noqa: E402
from kvjax import loop, prompts  # noqa: E402
from kvjax.cache import Cache, kept_positions  # noqa: E402
from kvjax.decode import feed_tokens  # noqa: E402
from kvjax.policies import PrefillMode  # noqa: E402
from kvjax.compress import make_plan, prefill_policies  # noqa: E402
from kvjax.sampling import Sampler  # noqa: E402


def shareable(pol) -> str | None:
    """None if the shared prefill can run this policy, else why not."""
    if pol.prefill_mode is PrefillMode.CHUNKED:
        return "chunked prefill: the prompt's hidden states depend on the compressed cache"
    return None


shared_prefill = jax.jit(prefill_policies, static_argnames=("config", "plans", "implementation"))
feed_question = jax.jit(feed_tokens, static_argnames=("config", "plan", "implementation"))


class SharedRunner:
    """Runs a batch of samples through shared_prefill for a list of policies (one mode)."""

    def __init__(self, params, max_new_tokens: int, seed: int = 0):
        self.params = params
        self.max_new = max_new_tokens
        self.seed = seed
        self.sampler = Sampler(0.0, None, None)
        self.stop_ids = jnp.asarray(prompts.stop_ids(params, None), jnp.int32)
        self._compiled: dict[Any, Any] = {}
        self.compile_s: list[float] = []

    def encode(self, samples, mode):
        tok = self.params.tokenizer
        if mode == "aware":
            seqs = [tok.encode(s.prompt) for s in samples]
            q_seqs = []
        else:
            seqs = [tok.encode(s.context) for s in samples]
            q_seqs = [tok.encode(s.question, add_special_tokens=False) for s in samples]
        limit = self.params.config.max_position_embeddings
        bucket = prompts.length_bucket(max(map(len, seqs)), limit)
        q_bucket = prompts.new_tokens_bucket(max(map(len, q_seqs))) if q_seqs else 0
        pad = tok.pad_token_id
        tokens, lengths = prompts.pad(seqs, bucket, pad)
        if q_seqs:
            q_tokens, q_lengths = prompts.pad(q_seqs, q_bucket, pad)
        else:
            q_tokens, q_lengths = None, None
        return tokens, lengths, q_tokens, q_lengths, bucket, q_bucket

    def prefill(self, samples, mode, pols):
        """-> (logits, caches, plans, q_tokens, q_lengths, timing dict)."""
        cfg = self.params.config
        tokens, lengths, q_tokens, q_lengths, bucket, q_bucket = self.encode(samples, mode)
        headroom = prompts.new_tokens_bucket(self.max_new) + q_bucket
        plans = tuple(make_plan(p, cfg, bucket, headroom) for p in pols)
        key = (tokens.shape, plans, jax.tree_util.tree_structure(tuple(pols)))
        t0 = time.perf_counter()
        rng = jax.random.key(self.seed)
        if key not in self._compiled:
            self._compiled[key] = shared_prefill.lower(self.params.weights, tokens, lengths, tuple(pols), plans, rng,
                                                       config=cfg).compile()
            self.compile_s.append(time.perf_counter() - t0)
        compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        caches, logits = self._compiled[key](self.params.weights, tokens, lengths, tuple(pols), rng)
        jax.block_until_ready(logits)
        return logits, caches, plans, q_tokens, q_lengths, dict(compile_s=compile_s, prefill_s=time.perf_counter() - t1)

    def finish(self, pol, plan, cache, logits, q_tokens, q_lengths, keep_cache=False):
        """Question feed (agnostic) and greedy decode for one policy: (texts, cache after prefill+question;
        with keep_cache=False its arrays may have been donated to the decode loop: shapes only)."""
        cfg = self.params.config
        if q_tokens is not None:
            cache, logits = feed_question(self.params.weights, cache, logits, q_tokens, q_lengths, pol, config=cfg,
                                          plan=plan)
        prefilled = cache
        capacity = prompts.new_tokens_bucket(self.max_new)
        # the decode loop donates its cache argument: give it a copy when `prefilled` must stay readable
        cache_in = jax.tree_util.tree_map(jnp.copy, cache) if keep_cache else cache
        state = loop.start(logits, cache_in, jax.random.key(self.seed + 1), self.stop_ids, capacity=capacity,
                           sampler=self.sampler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = loop.runner(logits.shape[0])(self.params.weights, state, pol, jnp.int32(self.max_new),
                                                 self.stop_ids, config=cfg, plan=plan, sampler=self.sampler,
                                                 implementation="xla")
        out, n_gen = np.asarray(state.tokens), np.asarray(state.n_gen)
        texts = [self.params.tokenizer.decode(out[i, : n_gen[i]].tolist()) for i in range(out.shape[0])]
        return texts, prefilled


def generate_cell(params, samples, mode, pol, max_new_tokens, seed=0):
    """The reference path: kvjax.generate for one cell. Returns (texts, stats)."""
    if mode == "aware":
        out = kvjax.generate(params, [s.prompt for s in samples], pol, max_new_tokens=max_new_tokens, seed=seed)
    else:
        out = kvjax.generate(params, context=[s.context for s in samples], question=[s.question for s in samples],
                             policy=pol, max_new_tokens=max_new_tokens, seed=seed)
    return out.text, out.stats


def memory_maps() -> int:
    """Memory mappings of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


#: XLA:CPU maps a few hundred regions per loaded executable (over a thousand for the shared
#: prefill). The kernel refuses more than vm.max_map_count (65530 by default): LLVM then fails with
#: "Cannot allocate memory" and the process segfaults (the first default run died so at 4K tokens).
#: Above this count the compiled executables are dropped; the persistent compilation cache reloads
#: the ones needed again.
MAX_MAPS = 40000


def release_executables(runner, log, limit: int = MAX_MAPS) -> bool:
    """Drop every compiled executable when this process holds more than `limit` memory maps."""
    n = memory_maps()
    if n <= limit:
        return False
    runner._compiled.clear()
    jax.clear_caches()
    gc.collect()
    log(f"  dropped compiled executables: {n} memory maps -> {memory_maps()}")
    return True


def compare_kept(cache_a: Cache, cache_b: Cache) -> float:
    """Fraction of (layer, sequence, head) streams whose kept position sets are equal."""
    ka, kb = kept_positions(cache_a), kept_positions(cache_b)
    same = total = 0
    for la, lb in zip(ka, kb):
        for ba, bb in zip(la, lb):
            for ha, hb in zip(ba, bb):
                total += 1
                same += int(ha.shape == hb.shape and np.array_equal(ha, hb))
    return same / max(total, 1)
