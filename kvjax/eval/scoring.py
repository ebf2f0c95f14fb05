"""Scoring of the RULER-style tasks: which expected strings the generated text contains.

RULER's `string_match_all`: the score of one sample is the fraction of its expected strings found in the
model's output (case-insensitive), so a multi-value needle with 3 of 4 values right scores 0.75. Here an
expected string only counts as a whole token of the text: not inside a longer run of letters or digits
(" 40718531" does not contain the answer 4071853, "sandwich" does not contain "sand"), which RULER's plain
substring test would let through. `all_present` is the strict per-sample flag (every string found).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Score:
    """fraction: expected strings found / expected strings, in [0, 1]; all_present: every one found;
    found: one flag per expected string, in order."""

    fraction: float
    all_present: bool
    found: tuple[bool, ...]


def _pattern(expected: str) -> re.Pattern:
    return re.compile(r"(?<![0-9A-Za-z])" + re.escape(expected) + r"(?![0-9A-Za-z])", re.IGNORECASE)


def contains(text: str, expected: str) -> bool:
    """`expected` occurs in `text` (case-insensitive), not as part of a longer word or number."""
    if not expected:
        raise ValueError("expected must be a non-empty string")
    return _pattern(expected).search(text) is not None


def score_answers(generated_text: str, expected: Sequence[str]) -> Score:
    """RULER's string-match-all score of one output against its expected strings."""
    if isinstance(expected, str) or not expected:
        raise ValueError(f"expected must be a non-empty sequence of strings, got {expected!r}")
    found = tuple(contains(generated_text, e) for e in expected)
    return Score(sum(found) / len(found), all(found), found)


def score(sample, generated_text: str) -> Score:
    """Score a model's output (the continuation only, not the prompt) for a kvjax.eval.tasks.Sample."""
    return score_answers(generated_text, sample.answers)


def mean_score(scores: Sequence[Score]) -> tuple[float, float]:
    """(mean fraction, fraction of samples with every answer) over several samples."""
    if not scores:
        raise ValueError("mean_score needs at least one score")
    return (sum(s.fraction for s in scores) / len(scores), sum(s.all_present for s in scores) / len(scores))
