"""Streaming perplexity under a cache budget (EasyKV's setting, RoCo's own evaluation).

    kvjax.perplexity(params, text, policy=RoCo(budget=256))  -> {"nll", "perplexity", "tokens"}
"""

from __future__ import annotations

import jax
import numpy as np

from kvjax import prompts
from kvjax.policies.policy import Full, Policy
from kvjax.compress.chunked import check_streamable, chunk_size, encode, make_plan
from kvjax.errors import InputError


def _covers(policy: Policy, n: int) -> bool:
    b = policy.budget
    if isinstance(b, (float, np.floating)):
        return b >= 1.0
    return int(b) >= n


def _is_single(x) -> bool:
    """One text (a string or a flat token sequence), as opposed to a batch of them."""
    if isinstance(x, str):
        return True
    if isinstance(x, (np.ndarray, jax.Array)):
        return x.ndim == 1
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, (int, np.integer)) for t in x)


def perplexity(params, text_or_tokens, policy: Policy | None = None, *, chunk: int | None = None) -> dict:
    """Perplexity of a text read through a budgeted cache (EasyKV's streaming perplexity).

    The first K tokens (the budget) are prefilled, the rest fed `chunk` at a time through the
    compressed cache; each position's logits predict the next token. `policy=None` (Full) feeds the
    same chunks through the full cache and equals the perplexity from `kvjax.forward`'s logits.
    `text_or_tokens`: a string or a token sequence, or a list of them (a batch).
    Returns {"nll": per-token negative log-likelihoods [n - 1] (token t + 1 given the tokens up to
    t), "perplexity": exp(mean nll), "tokens": n}; for a batch, each value is a list over rows.
    """
    policy = Full() if policy is None else policy
    check_streamable(policy)
    chunk_size(policy, chunk)  # a bad chunk is reported before the text is read
    single = _is_single(text_or_tokens)
    if single and not isinstance(text_or_tokens, str):
        text_or_tokens = [np.asarray(text_or_tokens)]
    seqs = prompts.encode(params, text_or_tokens, False, what="text")
    longest = max(len(s) for s in seqs)
    limit = params.config.max_position_embeddings
    if longest > limit:
        raise InputError(f"text of {longest} tokens exceeds the model's {limit} positions (max_position_embeddings)")
    if min(len(s) for s in seqs) < 2:
        raise InputError("perplexity needs texts of at least 2 tokens")
    if not policy.keeps_everything:
        for i, s in enumerate(seqs):
            if _covers(policy, len(s)):
                raise InputError(
                    f"budget {policy.budget} covers the whole text {i} ({len(s)} tokens): nothing would be "
                    "evicted; use policy=None for the full-cache perplexity"
                )
    bucket = prompts.length_bucket(longest, limit)
    plan = make_plan(policy, params.config, bucket, 0, chunk=chunk)
    c = chunk_size(policy, chunk, plan.stream_bound[0])
    tokens, lengths = prompts.pad(seqs, bucket, prompts.pad_id(params))
    _, _, _, nll = encode(
        params.weights, tokens, lengths, policy, None, config=params.config, plan=plan, chunk=c,
        prefix=c if policy.keeps_everything else None, with_nll=True,
    )
    nll = np.asarray(nll)
    rows = [nll[i, : n - 1] for i, n in enumerate(lengths)]
    out = {
        "nll": rows,
        "perplexity": [float(np.exp(r.mean())) for r in rows],
        "tokens": [int(n) for n in lengths],
    }
    return {k: v[0] for k, v in out.items()} if single else out
