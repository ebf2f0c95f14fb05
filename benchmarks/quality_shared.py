"""The quality study's engine: one prompt pass shared by many policies, then each policy's decode.

Everything goes through kvjax's public API:

    pres = kvjax.prefill(params, prompts, [pol_1, ..., pol_k], max_new_tokens=m, question=qs)
    out = kvjax.generate(params, prefilled=pres[i], max_new_tokens=m)

`kvjax.prefill` with a list runs the model over the prompts once and, after every layer, lets each
one-shot or cascading policy compress that layer into its own pool (the prompt's hidden states do
not depend on the compression); with `question=` (query-agnostic) the question is then fed through
each compressed cache. RoCo streams its prompt through its compressed cache in chunks, so it has
its own prompt pass (`kvjax.prefill(params, prompts, roco)`).
"""

from __future__ import annotations

import gc
import time

import jax
import numpy as np

import kvjax
from kvjax.cache import occupancy
from kvjax.eval import ruler


def _inputs(samples, mode):
    if mode == "aware":
        return [s.prompt for s in samples], None
    return [s.context for s in samples], [s.question for s in samples]


def max_new_for(samples, override: int | None = None) -> int:
    return override or max(ruler.MAX_NEW_TOKENS[s.task] for s in samples)


def cache_figures(pre, rows: int) -> dict:
    """Per-sequence cache figures of a Prefilled: bytes, tokens per head summed over layers (the
    budgets' total, which Profiled shares with uniform SnapKV), and the tokens actually held."""
    cache = pre.cache
    budget = np.asarray(cache.streams.budget)[:, :rows]  # [L, B, H]
    held = np.asarray(occupancy(cache))[:rows] / cache.layout.num_kv_heads  # tokens per head, summed over layers
    return dict(cache_bytes=int(cache.nbytes // cache.batch_size), kv_bytes=int(cache.kv_nbytes // cache.batch_size),
                budget_total=float(budget.mean(axis=2).sum(axis=0).mean()), held_tokens=float(held.mean()))


def decode_all(params, pres, samples, rows: int, max_new: int, seed: int, limit_of, on_cell):
    """Decode each Prefilled in turn (freeing it after), truncating row i to limit_of(sample i) new
    tokens (greedy decoding of one row does not depend on the others, so this equals decoding it
    alone with that limit). on_cell(i, texts, figures, seconds) gets each policy's outputs."""
    tok = params.tokenizer
    for i in range(len(pres)):
        pre = pres[i]
        figures = cache_figures(pre, rows)
        t0 = time.perf_counter()
        out = kvjax.generate(params, prefilled=pre, max_new_tokens=max_new, seed=seed)
        dt = time.perf_counter() - t0
        pres[i] = None
        del pre
        texts = [tok.decode(out.tokens[r][: limit_of(samples[r])]) for r in range(rows)]
        on_cell(i, texts, figures, dt)
        del out


def prefill_shared(params, samples, mode, pols, max_new: int, seed: int):
    """One prompt pass for every policy in `pols` (none may be RoCo). -> (list of Prefilled, seconds)."""
    prompts, questions = _inputs(samples, mode)
    t0 = time.perf_counter()
    pres = kvjax.prefill(params, prompts, list(pols), max_new_tokens=max_new, question=questions, seed=seed)
    jax.block_until_ready([p.logits for p in pres])
    return pres, time.perf_counter() - t0


def prefill_alone(params, samples, mode, pol, max_new: int, seed: int):
    """A policy's own prompt pass (RoCo's chunked prefill). -> ([Prefilled], seconds)."""
    prompts, questions = _inputs(samples, mode)
    t0 = time.perf_counter()
    pre = kvjax.prefill(params, prompts, pol, max_new_tokens=max_new, question=questions, seed=seed)
    jax.block_until_ready(pre.logits)
    return [pre], time.perf_counter() - t0


def memory_maps() -> int:
    """Memory mappings of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


#: XLA:CPU maps a few hundred regions per loaded executable (over a thousand for a shared prefill of
#: many policies). The kernel refuses more than vm.max_map_count (65530 by default): LLVM then fails
#: with "Cannot allocate memory" and the process segfaults. Above this count the compiled executables
#: are dropped; the persistent compilation cache reloads the ones needed again.
MAX_MAPS = 40000


def release_executables(log, limit: int = MAX_MAPS) -> bool:
    """Drop every compiled executable when this process holds more than `limit` memory maps."""
    n = memory_maps()
    if n <= limit:
        return False
    jax.clear_caches()
    gc.collect()
    log(f"dropped compiled executables: {n} memory maps -> {memory_maps()}")
    return True


def rss_gib() -> float:
    """Peak resident memory of this process so far (GiB; Linux)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")
