"""RULER's common words extraction (aggregation): a numbered list of words in which `n_common` words
appear `common_freq` times each and the others `uncommon_freq` times; the question asks for the
`n_common` most common words, and every one of them must be returned.

    Below is a numbered list of words. ... 1. lantern 2. brave 3. pencil 4. lantern ...

RULER's frequencies are 30 and 3. They only fit from about 4K tokens on, so by default (None) this uses
30 / 3 from 4096 target tokens up and, below, common_freq = max(2, n_tokens // 128) (capped at 30) with
uncommon words once. The list's length is searched in uncommon words until the prompt (or the context)
has exactly `n_tokens` tokens (the last uncommon word may appear fewer times); when no whole list lands
on it, another seeded choice of uncommon words is tried, and as a last resort one more entry, cut short,
ends the list. Words come from kvjax.eval.words
(849 words), which bounds the list: a target that needs more distinct words raises LengthError (raise
uncommon_freq). There is no haystack: samples record haystack="none" and depth None.
"""

from __future__ import annotations

import dataclasses
import random

from kvjax.eval import words as W
from kvjax.eval.assemble import check_fit
from kvjax.eval.fitting import Encoder, LengthError, first_exact, largest_at_most
from kvjax.eval.sample import Sample, check_positive, task_options, task_rng

HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.")
QUESTION = ("\nQuestion: What are the {n} most common words in the above list? Answer: The top {n} words that appear "
            "most often in the list are:")


def frequencies(n_tokens: int, common_freq: int | None, uncommon_freq: int | None) -> tuple[int, int]:
    """(common_freq, uncommon_freq) for a target length: the given values, or the defaults above."""
    cf = common_freq if common_freq is not None else (30 if n_tokens >= 4096 else min(30, max(2, n_tokens // 128)))
    uf = uncommon_freq if uncommon_freq is not None else (3 if n_tokens >= 4096 else 1)
    if uf >= cf:
        raise ValueError(f"uncommon_freq ({uf}) must be below common_freq ({cf})")
    return cf, uf


@dataclasses.dataclass(frozen=True)
class CommonWords:
    """n_common: words asked for; common_freq / uncommon_freq: occurrences (None: by target length)."""

    n_common: int = 10
    common_freq: int | None = None
    uncommon_freq: int | None = None

    def __post_init__(self):
        check_positive("n_common", self.n_common)
        if self.n_common > len(W.VOCABULARY) // 2:
            raise ValueError(f"n_common must be <= {len(W.VOCABULARY) // 2}, got {self.n_common}")
        for f in ("common_freq", "uncommon_freq"):
            if getattr(self, f) is not None:
                check_positive(f, getattr(self, f))

    @property
    def name(self) -> str:
        return "common_words"

    def sample(self, n_tokens: int, encoder: Encoder, seed: int = 0, *, depth: float | None = None,
               fit: str = "prompt", variants: int = 8) -> Sample:
        """One prompt with exactly `n_tokens` tokens. `depth` must be None (the task has no needle)."""
        check_positive("n_tokens", n_tokens)
        check_fit(fit)
        if depth is not None:
            raise ValueError(f"common words extraction has no needle: depth must be None, got {depth!r}")
        cf, uf = frequencies(n_tokens, self.common_freq, self.uncommon_freq)
        rng = task_rng(self.name, seed)
        vocab = list(W.VOCABULARY)
        rng.shuffle(vocab)
        common, pool = vocab[: self.n_common], vocab[self.n_common :]
        question = QUESTION.format(n=self.n_common)
        list_seed = rng.random()

        def measure(text: str) -> int:
            context = f"{HEAD}\n{text}"
            return len(encoder.encode(context + question if fit == "prompt" else context))

        shorts = []
        for v in range(variants):
            order = pool[:]
            random.Random(f"{list_seed}:{v}").shuffle(order)
            stream = [w for w in order for _ in range(uf)]  # uncommon entries: each word uf times

            def build(k: int, stream=stream, v=v) -> tuple[str, list[str]]:
                entries = common * cf + stream[:k]
                random.Random(f"{list_seed}:{v}:{k}").shuffle(entries)
                return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), entries

            # the last pool word is kept back for a cut-short entry
            hi = len(stream) - uf
            guess = shorts[0][2] if shorts else max(0, (n_tokens - measure(build(0)[0])) // 5)
            k, n = largest_at_most(lambda k, b=build: measure(b(k)[0]), n_tokens, 0, hi, guess)
            if k == hi and n < n_tokens:
                raise LengthError(f"{len(W.VOCABULARY)} words with uncommon_freq={uf} fill only {n} of {n_tokens} "
                                  "tokens; raise uncommon_freq")
            if n == n_tokens:
                text, entries = build(k)
                break
            shorts.append((build, stream, k))
        else:  # one more entry, cut short, ends the list: "... 611. lantern 612. ca"
            for build, stream, k in shorts:
                text, entries = build(k)
                extra = f" {len(entries) + 1}. {stream[-1]}"
                c = first_exact(lambda c: measure(text + extra[:c]), n_tokens, range(2, len(extra)))
                if c is not None:
                    text += extra[:c]
                    break
            else:
                raise LengthError(f"no common-words list has exactly {n_tokens} tokens; try another seed")
        context = f"{HEAD}\n{text}"
        uncommon = tuple(w for w in dict.fromkeys(entries) if w not in common)
        return Sample(self.name, context, question, tuple(common), uncommon, (), n_tokens, fit,
                      len(encoder.encode(context + question)), len(encoder.encode(context)), None, seed, "none",
                      None, task_options(self) + (("used_common_freq", cf), ("used_uncommon_freq", uf)))
