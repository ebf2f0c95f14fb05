"""Searches that give a prompt an exact token length with any tokenizer (only `encode` is called).

A task builds its prompt from a size parameter (haystack words, list entries): `largest_at_most` finds the
largest size whose prompt has at most the target's tokens, with a few full encodings (interpolation inside
a bracket, falling back to bisection), and `first_exact` scans finer candidates (the characters of the next
word) for one that lands exactly on the target. Token counts are nearly additive in the text, so the
searches assume `f` is non-decreasing and check every answer with a real encoding.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol


class Encoder(Protocol):
    """Anything with `encode(text) -> list[int]` (kvjax's Tokenizer, a Hugging Face tokenizer)."""

    def encode(self, text: str) -> list[int]: ...


class LengthError(ValueError):
    """The fixed part of a prompt is longer than the target, or no candidate reaches it exactly."""


def largest_at_most(f: Callable[[int], int], target: int, lo: int, hi: int, guess: int) -> tuple[int, int]:
    """The largest x in [lo, hi] with f(x) <= target, for a non-decreasing f, and f(x).

    guess: a first x to try (clamped into the range). Raises LengthError when f(lo) > target.
    """
    if hi < lo:
        raise ValueError(f"empty range [{lo}, {hi}]")
    seen: dict[int, int] = {}

    def F(x: int) -> int:
        if x not in seen:
            seen[x] = f(x)
        return seen[x]

    if F(lo) > target:
        raise LengthError(f"the prompt without filler already has {F(lo)} tokens > target {target}")
    a, fa = lo, F(lo)  # f(a) <= target
    b = fb = None  # smallest known x with f(x) > target
    x = min(max(guess, lo), hi)
    step = 0
    while True:
        fx = F(x)
        if fx <= target:
            a, fa = max((a, fa), (x, fx))
        elif b is None or x < b:
            b, fb = x, fx
        if a == hi or (b is not None and b - a <= 1):
            return a, fa
        step += 1
        if b is None:  # extrapolate from the slope seen so far, aiming a little past the target
            slope = (fa - F(lo)) / (a - lo) if a > lo else 1.0
            x = min(hi, a + max(1, int((target - fa) / max(slope, 1e-9)) + 2))
        elif step % 3 == 0 or fb == fa:  # bisect now and then: interpolation can stall on one side
            x = (a + b) // 2
        else:
            x = a + int((target - fa) * (b - a) / (fb - fa))
            x = min(max(x, a + 1), b - 1)


def first_exact(f: Callable[[int], int], target: int, candidates: Iterable[int]) -> int | None:
    """The first candidate with f(candidate) == target, or None."""
    for c in candidates:
        if f(c) == target:
            return c
    return None


def count_tokens(encoder: Encoder, text: str) -> int:
    return len(encoder.encode(text))
