"""Prompts in and text out: encoding, padding to length buckets, stop tokens and strings.

    seqs = encode(params, prompt, chat)                 # -> list of token-id lists (validated)
    tokens, lengths = pad(seqs, length_bucket(max(map(len, seqs)), limit), pad_id)
    ids = stop_ids(params, stop); text = decode_text(params, tokens, stop)
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from kvjax.io.checkpoint import Params

#: prompt lengths are padded up to one of these (then multiples of the largest step)
LENGTH_BUCKETS = tuple(sorted({m * 2**i for i in range(12) for m in (64, 96)}))


def length_bucket(n: int, limit: int) -> int:
    """The padded length for a prompt of n tokens, never beyond the model's `limit`."""
    for b in LENGTH_BUCKETS:
        if b >= n:
            return min(b, limit)
    return min(-(-n // 4096) * 4096, limit)


def new_tokens_bucket(n: int) -> int:
    """Decode capacity bucket: a power of two >= n (at least 16)."""
    return max(16, 1 << (int(n) - 1).bit_length())


def encode(params: Params, prompt, chat: bool, *, special_tokens: bool = True, what: str = "prompt"):
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


def encode_questions(params: Params, question, batch: int):
    """Questions appended after each of `batch` compressed contexts (one string for all, or a list)."""
    if question is None:
        return []
    qs = [question] * batch if isinstance(question, str) else list(question)
    if len(qs) != batch:
        raise ValueError(f"{len(qs)} questions for {batch} contexts")
    return encode(params, qs, chat=False, special_tokens=False, what="question")


def check_positions(params: Params, prompt_len: int, max_new_tokens: int):
    limit = params.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"{limit} positions (max_position_embeddings)"
        )


def pad(seqs: list[list[int]], length: int, pad_id: int):
    """Right-pad token lists to `length`: (tokens [B, length] int32, lengths [B] int32)."""
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return tokens, np.array([len(s) for s in seqs], np.int32)


def pad_id(params: Params) -> int:
    return params.tokenizer.pad_token_id if params.tokenizer is not None else 0


def stop_ids(params: Params, stop) -> list[int]:
    ids = set(params.tokenizer.eos_token_ids if params.tokenizer is not None else params.config.eos_token_ids)
    for s in stop or ():
        if isinstance(s, (int, np.integer)):
            ids.add(int(s))
        elif params.tokenizer is not None:
            enc = params.tokenizer.encode(s, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids) or [-1]


def decode_text(params: Params, tokens: list[int], stop) -> str:
    if params.tokenizer is None:
        return ""
    text = params.tokenizer.decode(tokens)
    for s in stop or ():
        if isinstance(s, str) and s in text:
            text = text[: text.index(s)]
    return text
