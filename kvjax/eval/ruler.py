"""The RULER-style tasks by name, for command lines and benchmarks.

    from kvjax.eval import ruler
    s = ruler.make_sample("niah_multikey", 4096, params.tokenizer, seed=3, depth=0.5)
    out = kvjax.generate(params, s.prompt, policy)                     # query-aware
    out = kvjax.generate(params, context=s.context, question=s.question, policy=policy)  # query-agnostic
    ruler.score(s, out.text[0])   # Score(fraction=1.0, all_present=True, found=(True,))

TASKS holds one configured task per name (frozen dataclasses; `dataclasses.replace` or the `options` of
`make_sample` change their settings). RULER_VARIANTS are RULER's numbered configurations of the same tasks.
"""

from __future__ import annotations

import dataclasses

from kvjax.eval.common_words import CommonWords
from kvjax.eval.fitting import Encoder
from kvjax.eval.niah import Niah
from kvjax.eval.sample import Sample
from kvjax.eval.scoring import Score, mean_score, score
from kvjax.eval.variable_tracking import VariableTracking

__all__ = ["TASKS", "RULER_VARIANTS", "MAX_NEW_TOKENS", "Task", "task", "make_sample", "make_samples", "Sample", "Score", "score",
           "mean_score", "Niah", "VariableTracking", "CommonWords"]

Task = Niah | VariableTracking | CommonWords

TASKS: dict[str, Task] = {
    "niah_single": Niah(),
    "niah_multikey": Niah(n_keys=4),
    "niah_multivalue": Niah(n_values=4),
    "niah_multiquery": Niah(n_keys=4, n_queries=4),
    "variable_tracking": VariableTracking(),
    "common_words": CommonWords(),
}

#: tokens to generate per task (default settings): the right answer written as a comma list takes at most
#: 9 / 9 / 36 / 36 / 27 / 24 SmolLM2 tokens (one token per digit), plus room for formatting. RULER generates
#: 128 (needles), 30 (variable tracking) and 120 (common words). UUID values need about 25 tokens each.
MAX_NEW_TOKENS: dict[str, int] = {
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "variable_tracking": 40,
    "common_words": 40,
}

#: RULER's numbered configurations (RULER's niah_multivalue / niah_multiquery are TASKS' own, and its
#: "needle" haystack made of distractor needles, niah_multikey_2 and _3, is not provided)
RULER_VARIANTS: dict[str, Task] = {
    "niah_single_1": Niah(haystack="noise"),
    "niah_single_2": Niah(haystack="essays"),
    "niah_single_3": Niah(haystack="essays", value_kind="uuids"),
    "niah_multikey_1": Niah(n_keys=4, haystack="essays"),
    "vt": VariableTracking(n_chains=1, n_hops=4),
    "cwe": CommonWords(),
}


def task(name: str, **options) -> Task:
    """The task called `name` (TASKS, then RULER_VARIANTS), with `options` replacing its settings."""
    found = TASKS.get(name) or RULER_VARIANTS.get(name)
    if found is None:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} and RULER's {sorted(RULER_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(found)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; its options: {sorted(fields)}")
    return dataclasses.replace(found, **options) if options else found


def make_sample(name: str, n_tokens: int, encoder: Encoder, seed: int = 0, *, depth: float | None = None,
                fit: str = "prompt", **options) -> Sample:
    """One sample of the task `name` with exactly `n_tokens` tokens (see Sample for `fit`)."""
    return task(name, **options).sample(n_tokens, encoder, seed, depth=depth, fit=fit)


def make_samples(name: str, n_tokens: int, encoder: Encoder, n: int, seed: int = 0, *,
                 depths=None, fit: str = "prompt", **options) -> list[Sample]:
    """`n` samples with seeds seed, seed + 1, ...; `depths` (optional) gives one depth per sample."""
    if depths is not None and len(depths) != n:
        raise ValueError(f"depths must give one depth per sample ({n}), got {len(depths)}")
    t = task(name, **options)
    return [t.sample(n_tokens, encoder, seed + i, depth=None if depths is None else depths[i], fit=fit)
            for i in range(n)]
