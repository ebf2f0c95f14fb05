"""The pass-key retrieval task: a 5-digit key hidden at some depth in repetitive filler.

Raw completion prompts (no chat template): SmolLM2 finds the key 5/5 at 1.4K and 3.4K tokens
with the full cache this way (with the chat template it degrades), and it writes one token per
digit, so losing any digit loses the key.

Pure Python, standard library only: kvjax and the kvpress oracle script
(`scripts/kvpress_oracle.py`, run in a torch environment) both build their prompts here, so the
fixtures and kvjax's tests see the same text.

A prompt is::

    F F ... F N F ... F Q

with F the filler sentence, N the needle (after `round_half_up(depth * n_repeats)` fillers), Q
the question, all joined by single spaces. It ends with "The pass key is", so the greedy
continuation should be " <key>.".
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from typing import Protocol, Sequence

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
KEY_DIGITS = 5

_FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")


class Encoder(Protocol):
    """Anything with `encode(text) -> list[int]`: a Hugging Face tokenizer, kvjax's Tokenizer."""

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """One pass-key prompt.

    prompt: the raw completion prompt (question included, no chat template).
    answer: the expected answer string, the key itself (what `score_answer` looks for).
    depth: relative depth of the needle in [0, 1].
    key: the 5-digit key.
    n_repeats: filler repetitions in the prompt.
    """

    prompt: str
    answer: str
    depth: float
    key: str
    n_repeats: int


def needle_index(depth: float, n_repeats: int) -> int:
    """How many filler sentences come before the needle: depth * n_repeats rounded half up."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_repeats < 0:
        raise ValueError(f"n_repeats must be >= 0, got {n_repeats}")
    return min(n_repeats, math.floor(depth * n_repeats + 0.5))


def passkey_prompt(key: str, depth: float, n_repeats: int, question: bool = True) -> str:
    """The filler repeated `n_repeats` times, the needle inserted between repetitions at relative
    `depth`, then the question "What is the pass key? The pass key is" (unless question=False)."""
    before = needle_index(depth, n_repeats)
    parts = [FILLER] * before + [NEEDLE.format(key=key)] + [FILLER] * (n_repeats - before)
    if question:
        parts.append(QUESTION)
    return " ".join(parts)


def context_and_question(key: str, depth: float, n_repeats: int) -> tuple[str, str]:
    """The same task split for query-agnostic use: (context, question to append after compression).
    context + question == passkey_prompt(key, depth, n_repeats)."""
    return passkey_prompt(key, depth, n_repeats, question=False), " " + QUESTION


def n_repeats_for_tokens(n_tokens: int, tokenizer: Encoder, depth: float = 0.5) -> int:
    """Filler repetitions whose prompt tokenizes to the length closest to `n_tokens` (ties: fewer).

    Lengths are counted with `tokenizer.encode`, so a tokenizer that adds a BOS token counts it.
    Digits are one token each in SmolLM2's vocabulary, so the key does not change the length;
    the placeholder key 00000 is used here.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")

    def length(k: int) -> int:
        return len(tokenizer.encode(passkey_prompt("0" * KEY_DIGITS, depth, k)))

    base, one = length(0), length(1)
    per = max(1, length(11) - one) / 10.0
    guess = max(0, round((n_tokens - base) / per))
    # the estimate is within a repetition or two: settle it on exact lengths
    best = min(range(max(0, guess - 3), guess + 4), key=lambda k: (abs(length(k) - n_tokens), k))
    return best


def passkey_samples(
    n_tokens_target: int,
    tokenizer: Encoder,
    depths: Sequence[float] = DEPTHS,
    seed: int = 0,
) -> list[PasskeySample]:
    """One sample per depth, each about `n_tokens_target` tokens long (the same filler count for
    all), with 5-digit keys drawn in depth order from `random.Random(seed).randint(10000, 99999)`."""
    rng = random.Random(seed)
    n_repeats = n_repeats_for_tokens(n_tokens_target, tokenizer)
    out = []
    for depth in depths:
        key = str(rng.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1))
        out.append(
            PasskeySample(
                prompt=passkey_prompt(key, depth, n_repeats),
                answer=key,
                depth=float(depth),
                key=key,
                n_repeats=n_repeats,
            )
        )
    return out


def first_five_digit_run(generated_text: str) -> str | None:
    """The first run of exactly five digits (not part of a longer digit run), or None."""
    m = _FIVE_DIGITS.search(generated_text)
    return None if m is None else m.group(0)


def score_answer(generated_text: str, key: str) -> bool:
    """True when the first 5-digit run of the generated text is the key (" 60494. Remember" is
    right; " 6049." , " 604941" and " 12345 60494" are wrong)."""
    return first_five_digit_run(generated_text) == key
