"""One prompt of a RULER-style task, in both layouts, with what a correct answer must contain."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

LAYOUTS = ("query_aware", "query_agnostic")


@dataclasses.dataclass(frozen=True)
class Sample:
    """A generated prompt.

    Layouts: query-aware runs `prompt` (= context + question: the question is inside the prompt, at its
    end); query-agnostic compresses `context` alone and appends `question` afterwards.

    task: the task's name ("niah_single", "variable_tracking", ...).
    context: instructions and haystack (what a query-agnostic cache compresses).
    question: the question and answer prefix; starts with "\\n"; the model continues after it.
    answers: every string a correct continuation contains (kvjax.eval.scoring.score).
    distractors: strings in the context that are wrong answers (other needles' values, other chains'
        variables, the uncommon words): a continuation made of them scores 0.
    query: what the question asks about (needle keys, the tracked value); () for common words.
    target: the requested length; fit: which text has exactly `target` tokens, "prompt" (context +
        question) or "context" (the context alone, for query-agnostic runs).
    n_tokens: tokens of `prompt`; context_tokens: tokens of `context` (the tokenizer's own counts,
        special tokens it adds included).
    depth: relative position in the haystack (0 = start, 1 = end) of the first answer's needle or
        statement; None for tasks without one (common words).
    seed: the seed that drew the sample.
    haystack: the corpus of the filler text ("essays", "bible", "generated", "noise"), or "none".
    offset: character offset of the haystack in its corpus (None for generated text or no haystack).
    options: the task's settings, as (name, value) pairs.
    """

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    distractors: tuple[str, ...]
    query: tuple[str, ...]
    target: int
    fit: str
    n_tokens: int
    context_tokens: int
    depth: float | None
    seed: int
    haystack: str
    offset: int | None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def prompt(self) -> str:
        """The query-aware prompt: context + question."""
        return self.context + self.question

    def metadata(self) -> dict[str, Any]:
        """Everything but the texts, as a JSON-friendly dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("context", "question")}
        d["answers"], d["distractors"], d["query"] = list(self.answers), list(self.distractors), list(self.query)
        d["options"] = dict(self.options)
        return d


def task_rng(name: str, seed: int) -> random.Random:
    """The generator of one sample: the same (task, seed) always draws the same sample."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return random.Random(f"{name}:{seed}")


def check_depth(depth: float | None) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] or None (seeded), got {depth!r}")


def check_positive(name: str, value: int, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def task_options(task) -> tuple[tuple[str, Any], ...]:
    return tuple((f.name, getattr(task, f.name)) for f in dataclasses.fields(task))
