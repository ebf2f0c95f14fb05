"""Prompts in and text out: encoding, padding to length buckets, stop tokens and strings.

    seqs = encode(params, prompt, chat)                 # -> list of token-id lists (validated)
    tokens, lengths = pad(seqs, length_bucket(max(map(len, seqs)), limit), pad_id)
    ids = stop_ids(params, stop); text = decode_text(params, tokens, stop)
"""

from __future__ import annotations

import jax
import numpy as np

from kvjax.errors import InputError, bad_input
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


_PROMPT_FORMS = ("text (a str), a list of strings, or token ids (an int array [T] or [B, T], a list of ints, "
                 "or a list of int arrays)")


def _token_row(p, what: str, i: int) -> list[int]:
    """One prompt given as token ids -> a list of ints (integer dtype only: floats are not rounded)."""
    try:
        arr = np.asarray(p)
    except (ValueError, TypeError):
        raise bad_input(f"{what}[{i}]", p, _PROMPT_FORMS) from None
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise bad_input(f"{what}[{i}]", p, f"integer token ids (not {arr.dtype}: they are not rounded), or {_PROMPT_FORMS}")
    if arr.ndim != 1:
        raise bad_input(f"{what}[{i}]", p, f"1-D token ids (one prompt), not shape {list(arr.shape)}")
    return arr.tolist()


def _check_text(text: str, what: str, i: int) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_input(f"{what}[{i}]", text[max(0, e.start - 20): e.end + 20],
                        f"valid Unicode text (character {e.start} is a lone surrogate {text[e.start]!r})") from None


def encode(params: Params, prompt, chat: bool, *, special_tokens: bool = True, what: str = "prompt"):
    """A string, a list of strings, or token ids -> list of token lists (validated).
    `special_tokens=False` for text appended after a prompt (no BOS)."""
    if isinstance(prompt, (bytes, bytearray)):
        raise bad_input(what, prompt, f"{_PROMPT_FORMS} (decode bytes to str first)")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt)
        if arr.ndim not in (1, 2):
            raise bad_input(what, prompt, f"token ids of shape [T] or [B, T], not {list(arr.shape)}")
        prompt = [arr] if arr.ndim == 1 else list(arr)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
        prompt = [list(prompt)]  # a flat list of ints is one prompt's token ids
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise bad_input(what, prompt, f"a non-empty prompt: {_PROMPT_FORMS}")
    seqs = []
    for i, p in enumerate(prompt):
        if isinstance(p, (bytes, bytearray)):
            raise bad_input(f"{what}[{i}]", p, "text (decode bytes to str first) or token ids")
        if isinstance(p, str):
            if params.tokenizer is None:
                raise bad_input(f"{what}[{i}]", p, "token ids: this checkpoint has no tokenizer to read text")
            _check_text(p, what, i)
            text = params.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
            ids = params.tokenizer.encode(text, add_special_tokens=special_tokens and not chat)
        else:
            ids = _token_row(p, what, i)
        if len(ids) == 0:
            raise bad_input(f"{what}[{i}]", p, "a non-empty prompt (this one is empty)")
        bad = [t for t in ids if not 0 <= t < params.config.vocab_size]
        if bad:
            raise bad_input(f"{what}[{i}]", bad[:5], f"token ids in the vocabulary [0, {params.config.vocab_size}): "
                            "some are outside the vocabulary")
        seqs.append(ids)
    return seqs


def encode_questions(params: Params, question, batch: int):
    """Questions appended after each of `batch` compressed contexts (one string for all, or a list)."""
    if question is None:
        return []
    if isinstance(question, (bytes, bytearray)) or not isinstance(question, (str, list, tuple)):
        raise bad_input("question", question, "a string (asked of every context) or a list of strings")
    qs = [question] * batch if isinstance(question, str) else list(question)
    if len(qs) != batch:
        raise bad_input("question", question, f"one question per context: {batch} contexts, {len(qs)} questions")
    return encode(params, qs, chat=False, special_tokens=False, what="question")


def check_positions(params: Params, prompt_len: int, max_new_tokens: int):
    limit = params.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise InputError(
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
