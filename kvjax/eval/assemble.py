"""A haystack prompt at an exact token length: `head`, haystack text with items inserted at sentence
starts at given depths, then the question.

    context  = head + "\\n" + haystack-with-items       (head may be empty)
    prompt   = context + question                      (question starts with "\\n")

The haystack is a contiguous span of a corpus (kvjax.eval.haystack). Its length is searched in whole words
(`fitting.largest_at_most`) until the measured text (the prompt, or the context alone for a query-agnostic
target) has exactly `target` tokens. When no whole-word cut lands on the target, the span is started one
sentence later (up to `variants` times), and as a last resort the haystack ends inside a word (the next
one, the one after it, then the last one kept), as the original needle test, which cuts its haystack at a
token, does.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

from kvjax.eval import haystack as H
from kvjax.eval.fitting import Encoder, LengthError, first_exact, largest_at_most
from kvjax.eval.scoring import contains

FITS = ("prompt", "context")


@dataclasses.dataclass(frozen=True)
class Fitted:
    """An assembled prompt.

    positions: relative position in the haystack (characters before the item / haystack characters, in
        [0, 1]) of each inserted item, in the order given.
    offset: corpus offset of the haystack's first character (None for generated text).
    """

    context: str
    question: str
    n_tokens: int
    context_tokens: int
    positions: tuple[float, ...]
    corpus: str
    offset: int | None


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS} (which text gets exactly n_tokens tokens), got {fit!r}")


def start_sample(name: str, haystack: str, n_tokens: int, encoder: Encoder, seed: int, depth, fit: str):
    """The checks and draws every haystack task begins with: (rng, span) for a sample of `n_tokens`."""
    from kvjax.eval.sample import check_depth, check_positive, task_rng

    check_positive("n_tokens", n_tokens)
    check_depth(depth)
    check_fit(fit)
    rng = task_rng(name, seed)
    return rng, draw_span(n_tokens, encoder, H.resolve(haystack), rng.random())


def insert_items(hay: str, starts: Sequence[int], items: Sequence[tuple[float, str]]) -> tuple[str, list[float]]:
    """`hay` with each (depth, text) item inserted at the sentence start nearest depth * len(hay).

    starts: sorted sentence starts of `hay` (0 first; those past its end are ignored). Items at one place
    keep their order. Returns the text and each item's relative position.
    """
    n = len(hay)
    cands = [s for s in starts if s < n] + [n]
    at = []
    for depth, _ in items:
        want = depth * n
        j = bisect.bisect_left(cands, want)
        near = [cands[k] for k in (j - 1, j) if 0 <= k < len(cands)]
        at.append(min(near, key=lambda s: (abs(s - want), s)))
    parts, prev = [], 0
    for i in sorted(range(len(items)), key=lambda i: (at[i], i)):
        parts += [hay[prev : at[i]].strip(), items[i][1]]
        prev = at[i]
    parts.append(hay[prev:].strip())
    return " ".join(p for p in parts if p), [p / n if n else 0.0 for p in at]


def chars_per_token(encoder: Encoder, text: str) -> float:
    """Characters per token on the first 20,000 characters of `text` (for first guesses only)."""
    piece = text[:20000]
    return max(len(piece) / max(len(encoder.encode(piece)), 1), 0.5)


def draw_span(target: int, encoder: Encoder, corpus: str, span_seed: float) -> H.Span:
    """A span of `corpus` long enough for a `target`-token haystack (with a margin), seeded by span_seed."""
    probe = H.span(corpus, 4000, span_seed).text
    n_chars = int(target * chars_per_token(encoder, probe) * 1.3 + 2000)
    return H.span(corpus, n_chars, span_seed)


def fit_haystack(target: int, encoder: Encoder, span: H.Span, *, head: str, items: Sequence[tuple[float, str]],
                 question: str, fit: str = "prompt", variants: int = 6, avoid: Sequence[str] = ()) -> Fitted:
    """Assemble head + haystack (a prefix of `span`, with `items`) + question so that the prompt
    (fit="prompt") or the context (fit="context") has exactly `target` tokens.

    span: from draw_span (taken longer, from the same start, if it runs out).
    avoid: strings (answers) that must not occur in the haystack text; raises ValueError if one does.
    Raises LengthError when the fixed text (head, items, question) alone is longer than the target.
    """
    check_fit(fit)
    if target <= 0:
        raise ValueError(f"n_tokens must be positive, got {target}")
    cpt = chars_per_token(encoder, span.text)
    got = _fit_span(target, encoder, span, head, items, question, fit, variants, cpt)
    while got is None:  # ran out of text: the same start, twice the text
        span = H.span(span.corpus, 2 * len(span.text), span.seed)
        got = _fit_span(target, encoder, span, head, items, question, fit, variants, cpt)
    fitted, hay = got
    for a in avoid:
        if contains(hay, a):
            raise ValueError(f"the {span.corpus} haystack contains the answer {a!r}; use another seed")
    return fitted


def _fit_span(target, encoder, span: H.Span, head, items, question, fit, variants, cpt):
    """(Fitted, the haystack text used), or None when the span is too short for the target."""
    sent = H.sentence_starts(span.text)
    shorts = []
    for v in range(min(variants, len(sent))):
        start = sent[v]
        text = span.text[start:]
        starts = [s - start for s in sent[v:]]
        cuts = [0] + [i for i, ch in enumerate(text) if ch == " "] + [len(text)]

        def build(cut: int, text=text, starts=starts):
            doc, pos = insert_items(text[:cut].rstrip(), starts, items)
            return (f"{head}\n{doc}" if head else doc), pos

        def measure(cut: int, build=build) -> int:
            context, _ = build(cut)
            return len(encoder.encode(context + question if fit == "prompt" else context))

        base = measure(0)
        if base > target:
            raise LengthError(f"the prompt without haystack already has {base} tokens > target {target} "
                              f"(preamble, inserted items and question)")
        guess = bisect.bisect_left(cuts, int((target - base) * cpt))
        i, n = largest_at_most(lambda i, m=measure, c=cuts: m(c[i]), target, 0, len(cuts) - 1, guess)
        if i == len(cuts) - 1 and n < target:
            return None
        if n == target:
            return _done(build, encoder, cuts[i], question, span, start, text)
        shorts.append((build, measure, cuts, i, start, text, n))
    # a cut inside the next word or the one after it; then inside the last word kept (where a
    # sentence-final period merges with the question's newline, every whole word past it adds two
    # tokens: "again.\n" -> "again. The\n"; "agai\n" may land between)
    for words in ((1, 2), (0,)):
        for build, measure, cuts, i, start, text, _ in shorts:
            cands = [c for j in (i + w for w in words) if 0 < j < len(cuts)
                     for c in range(cuts[j - 1] + (2 if j > 1 else 1), cuts[j])]
            c = first_exact(measure, target, cands)
            if c is not None:
                return _done(build, encoder, c, question, span, start, text)
    raise LengthError(f"no haystack cut gives exactly {target} tokens (the nearest below has "
                      f"{max(s[-1] for s in shorts)}); try another seed")


def _done(build, encoder, cut, question, span: H.Span, start: int, text: str):
    context, pos = build(cut)
    n_prompt = len(encoder.encode(context + question))
    n_context = len(encoder.encode(context))
    offset = None if span.offset is None else span.offset + start
    fitted = Fitted(context, question, n_prompt, n_context, tuple(pos), span.corpus, offset)
    return fitted, text[:cut]
