"""The pass-key retrieval task: a 5-digit key hidden at some depth in repetitive filler.

Raw completion prompts (no chat template): SmolLM2 finds the key 5/5 at 1.4K and 3.4K tokens
with the full cache this way, and writes one token per digit, so losing any digit loses the key.
Pure Python (no jax/torch): the kvpress oracle script imports it too.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Protocol, Sequence

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    prompt: str
    answer: str
    depth: float
    n_repeats: int


def passkey_prompt(key: str, depth: float, n_repeats: int, question: bool = True) -> str:
    """Filler repeated `n_repeats` times with the needle after round(depth * n_repeats) of them."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    before = round(depth * n_repeats)
    parts = [FILLER] * before + [NEEDLE.format(key=key)] + [FILLER] * (n_repeats - before)
    text = " ".join(parts)
    return f"{text} {QUESTION}" if question else text


def context_and_question(key: str, depth: float, n_repeats: int) -> tuple[str, str]:
    """The same task split for query-agnostic use: (context, question appended after compression)."""
    return passkey_prompt(key, depth, n_repeats, question=False), " " + QUESTION


def repeats_for_tokens(n_tokens: int, tokenizer: Encoder) -> int:
    """Filler repetitions that make a prompt of about `n_tokens` tokens."""
    per = len(tokenizer.encode(" " + FILLER))
    fixed = len(tokenizer.encode(passkey_prompt("00000", 0.5, 0)))
    return max(1, round((n_tokens - fixed) / per))


def passkey_samples(n_tokens: int, tokenizer: Encoder, depths: Sequence[float] = DEPTHS, seed: int = 0):
    """One sample per depth, ~n_tokens long each, 5-digit keys from a seeded RNG."""
    rng = random.Random(seed)
    n_repeats = repeats_for_tokens(n_tokens, tokenizer)
    out = []
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        out.append(PasskeySample(passkey_prompt(key, depth, n_repeats), key, depth, n_repeats))
    return out


def score_answer(generated: str, key: str) -> bool:
    """The first 5-digit run in the answer is the key."""
    m = re.search(r"\d{5}", generated.replace(" ", ""))
    return m is not None and m.group(0) == key
