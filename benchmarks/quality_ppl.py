"""Decode-time quality: perplexity of essay text read through a budgeted cache (RoCo's / EasyKV's setting).

Each text (n tokens of Paul Graham's essays, from a seeded sentence start) is read token by token:
the first K = round(r * n) tokens are prefilled with the full attention (nothing is evicted: the
budget covers them), then the rest is fed through the cache, which evicts back to K as it goes, and
every position's logits score the next token. Perplexity = exp(mean NLL over the n - 1 predictions).

Two paths, one setting:
- `kvjax.perplexity(params, tokens, policy, chunk=1)`: the library's streaming perplexity, for the
  policies that can stream a prompt in chunks (Full, RoCo, H2O: running statistics, one budget for
  every stream). chunk=1 feeds one token per step, as the decode-step path below.
- `decode_step_nll`: this benchmark's path for the policies kvjax.perplexity refuses but that evict
  while decoding (TOVA, one index set per layer; CAKE, layer budgets): the first K tokens through
  `kvjax.compress.prefill` with the policy (budget K covers them), then one `kvjax.decode.decode_step`
  per remaining token, in one jitted `lax.scan`. The NLL of the first K positions comes from
  `kvjax.perplexity(Full)` on the first K + 1 tokens (full attention there, as in both paths).
  Checked before use: H2O through this path equals kvjax.perplexity(H2O, chunk=1).
- StreamingLLM is not measured: kvjax's StreamingLLM evicts only when it compresses a prompt (no
  decode-time eviction), so nothing would hold its cache at the budget while the text streams.
  CAKE's layer split is made on the prefilled K tokens, where every layer's share is capped at
  K - window, so all layers get K: here CAKE is its eviction indicator at uniform budgets.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import policies as P
from kvjax.compress import make_plan, prefill as compress_prefill
from kvjax.decode import decode_step
from kvjax.eval import haystack

PPL_POLICIES = ("RoCo", "H2O", "TOVA", "CAKE", "StreamingLLM")
PPL_RATIOS = (0.1, 0.25, 0.5)
LIBRARY = ("Full", "RoCo", "H2O")
DECODE_STEPS = ("TOVA", "CAKE")
UNSUPPORTED = {
    "StreamingLLM": "kvjax's StreamingLLM evicts only while compressing a prompt (no decode-time eviction), so its "
                    "cache would grow past the budget as the text streams; kvjax.perplexity refuses it",
}


def essay_texts(tokenizer, n_texts: int, n_tokens: int, seed: int) -> list[tuple[int, list[int]]]:
    """n_texts token lists of exactly n_tokens from the essays (generated prose if not installed)."""
    corpus = haystack.resolve("auto")
    out = []
    for i in range(n_texts):
        s = seed + i
        ids = tokenizer.encode(haystack.span(corpus, n_tokens * 8, s).text)[:n_tokens]
        if len(ids) < n_tokens:
            raise ValueError(f"essay span of seed {s} gave {len(ids)} tokens < {n_tokens}")
        out.append((s, ids))
    return out


def ppl_policy(name: str, k: int, window: int):
    if name == "Full":
        return None
    if name == "RoCo":
        return P.RoCo(budget=k)
    if name == "H2O":
        return P.H2O(budget=k, recent=window)
    if name == "TOVA":
        return P.TOVA(budget=k)
    if name == "CAKE":
        return P.CAKE(budget=k, window=window)
    raise ValueError(f"no perplexity path for {name!r}: {UNSUPPORTED.get(name, 'unknown policy')}")


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def _stream(weights, cache, rest, policy, *, config, plan):
    """Feed rest[:, t] for t < M - 1 one decode step at a time; NLL of rest[:, t + 1]. -> [B, M - 1]."""

    def step(cache, t):
        cache, logits = decode_step(weights, cache, rest[:, t], policy, config=config, plan=plan)
        target = rest[:, t + 1]
        picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
        return cache, jax.nn.logsumexp(logits, axis=-1) - picked

    _, nll = jax.lax.scan(step, cache, jnp.arange(rest.shape[1] - 1))
    return nll.T


def decode_step_nll(params, tokens: np.ndarray, policy, k: int) -> np.ndarray:
    """NLL [B, n - 1] of texts tokens [B, n] (equal lengths) read through `policy` at budget k."""
    cfg = params.config
    b, n = tokens.shape
    head = kvjax.perplexity(params, [row[: k + 1] for row in tokens], None)["nll"]  # positions 0 .. k-1
    plan = make_plan(policy, cfg, k, n - k)
    lengths = jnp.full((b,), k, jnp.int32)
    cache, _ = compress_prefill(params.weights, jnp.asarray(tokens[:, :k], jnp.int32), lengths, policy,
                                jax.random.key(0), config=cfg, plan=plan)
    tail = np.asarray(_stream(params.weights, cache, jnp.asarray(tokens[:, k:], jnp.int32), policy, config=cfg,
                              plan=plan))
    return np.concatenate([np.stack(head), tail], axis=1)


def library_nll(params, tokens: np.ndarray, policy, chunk: int) -> np.ndarray:
    out = kvjax.perplexity(params, list(tokens), policy, chunk=chunk)
    return np.stack(out["nll"])


def verify_decode_path(params, window: int, n: int = 192, k: int = 64, seed: int = 999) -> dict:
    """H2O through decode_step_nll against kvjax.perplexity(H2O, chunk=1) on two short texts."""
    texts = np.asarray([ids for _, ids in essay_texts(params.tokenizer, 2, n, seed)], np.int32)
    pol = ppl_policy("H2O", k, min(window, k // 2))
    a = decode_step_nll(params, texts, pol, k)
    b = library_nll(params, texts, pol, 1)
    diff = float(np.max(np.abs(a - b)))
    return dict(policy="H2O", n_tokens=n, budget=k, max_abs_nll_diff=diff,
                ppl_decode_path=float(np.exp(a.mean())), ppl_library=float(np.exp(b.mean())), ok=diff < 2e-3)


def run_ppl(params, store, *, policies, ratios, n_tokens: int, n_texts: int, seed: int, window: int, chunk: int,
            log, progress=None):
    """Every (policy, ratio) cell missing from the store, its missing texts in one batch; Full once.
    More texts (a larger n_texts on --resume) add only the new texts: the first ones are the same."""
    texts = essay_texts(params.tokenizer, n_texts, n_tokens, seed)
    tokens = np.asarray([ids for _, ids in texts], np.int32)
    seeds = [s for s, _ in texts]
    if any(p in DECODE_STEPS for p in policies) and "ppl_verify" not in store.extra:
        t0 = time.perf_counter()
        store.extra["ppl_verify"] = v = verify_decode_path(params, window)
        log(f"perplexity: decode-step path vs kvjax.perplexity (H2O): max |dNLL| {v['max_abs_nll_diff']:.2e} "
            f"({'OK' if v['ok'] else 'MISMATCH'}), {time.perf_counter() - t0:.0f} s")
        store.save()
    cells = [("Full", None)] + [(p, r) for p in policies for r in ratios]
    for name, ratio in cells:
        todo = [i for i, s in enumerate(seeds) if not store.ppl.get(f"{name}|{ratio}|{n_tokens}|{s}")]
        if not todo:
            if progress is not None:
                progress.update(1)
            continue
        if name in UNSUPPORTED:
            for s in (seeds[i] for i in todo):
                store.add_ppl(dict(policy=name, ratio=ratio, length=n_tokens, seed=s, supported=False,
                                   reason=UNSUPPORTED[name]))
            store.save()
            if progress is not None:
                progress.update(1)
            continue
        k = None if ratio is None else int(round(ratio * n_tokens))
        pol = ppl_policy(name, k, window) if k is not None else None
        t0 = time.perf_counter()
        if name in DECODE_STEPS:
            if store.extra.get("ppl_verify", {}).get("ok") is False:
                log(f"perplexity: {name} skipped (the decode-step path did not match kvjax.perplexity)")
                continue
            nll, path = decode_step_nll(params, tokens[todo], pol, k), "decode steps (benchmarks/quality_ppl.py)"
        else:
            c = chunk if pol is not None else max(chunk, 64)  # the full cache: the same NLL at any chunk
            nll, path = library_nll(params, tokens[todo], pol, c), f"kvjax.perplexity(chunk={c})"
        dt = time.perf_counter() - t0
        for s, row in zip((seeds[i] for i in todo), nll):
            store.add_ppl(dict(policy=name, ratio=ratio, length=n_tokens, seed=s, supported=True, budget=k,
                               mean_nll=float(row.mean()), perplexity=float(np.exp(row.mean())), path=path))
        store.time(kind="ppl", policy=name, ratio=ratio, length=n_tokens, texts=len(todo), seconds=round(dt, 1))
        store.save()
        log(f"perplexity {name}@{ratio}: {np.exp(nll.mean(axis=1)).round(2).tolist()} ({dt:.0f} s)")
        if progress is not None:
            progress.update(1)
