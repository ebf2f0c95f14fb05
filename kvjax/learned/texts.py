"""Training texts for the learned scorer: essay spans, essays with planted facts and closing questions
about them, and kvjax.eval.synthetic documents.

    texts = default_texts(tokenizer, 40, 2048, seed=0)     # fact essays, essays, fact essays, synthetic, ...
    text, answers = fact_essay(tokenizer, 2048, random.Random(3))
    samples = fact_samples(tokenizer, 20, 2048, seed=9000)     # one-fact Samples, for validation

A fact essay is an essay span of about `n_tokens` tokens with one or two short facts planted at
seeded depths (sentence boundaries), ending with a question about each: the earlier ones answered,
the last one left open after its answer prefix ("... The locker code of Hana Ito is"). Its last
queries look back at the facts, so a target made from them (kvjax.learned.targets, `last`) rewards
rare factual spans wherever they lie, and a scorer trained on it learns to keep them before any
question is known.

Held out: the facts use their own templates and vocabulary, not RULER's needle ("One of the
special magic numbers for {adjective-noun} is: {7 digits}.") nor its word lists, so the needle
tasks the scorer is measured on (kvjax.eval.niah) are never trained on.
"""

from __future__ import annotations

import random
import re

from kvjax.eval.fitting import Encoder

_FIRST = ("Hana", "Omar", "Ines", "Tomas", "Leila", "Pavel", "Ayumi", "Diego", "Marta", "Kofi", "Sanna", "Ravi",
          "Elif", "Bram", "Noor", "Iker", "Zofia", "Malik", "Greta", "Anil")
_LAST = ("Ito", "Haddad", "Moreau", "Novak", "Okafor", "Lindqvist", "Sato", "Rossi", "Kaplan", "Mensah", "Varga",
         "Dubois", "Kowalski", "Aziz", "Berg", "Castillo")
_PLACES = ("Tromso", "Valparaiso", "Mombasa", "Ljubljana", "Cork", "Tbilisi", "Hue", "Oaxaca", "Gdansk", "Windhoek",
           "Bruges", "Salta", "Kazan", "Tartu")
_THINGS = ("brass telescope", "blue notebook", "spare battery", "oak cabinet", "glass jar", "folding ladder",
           "iron key", "paper map", "green umbrella", "toolbox", "wall clock", "copper kettle")
_SENTENCE = re.compile(r"(?<=[.!?]) (?=[\"'A-Z0-9])")


def _number(rng: random.Random) -> str:
    n = rng.randint(3, 8)
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def _fact(rng: random.Random) -> tuple[str, str, str, str]:
    """(fact sentence, question, answer prefix, answer), one of six seeded templates."""
    who = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    thing, place, num = rng.choice(_THINGS), rng.choice(_PLACES), _number(rng)
    year = str(rng.randint(1890, 2030))
    return rng.choice((
        (f"The locker code of {who} is {num}.", f"What is the locker code of {who}?",
         f"The locker code of {who} is", num),
        (f"For the record, {who} moved to {place} in {year}.", f"When did {who} move to {place}?",
         f"{who} moved to {place} in", year),
        (f"Please note that the {thing} is kept in room {num}.", f"In which room is the {thing} kept?",
         f"The {thing} is kept in room", num),
        (f"The password of the {thing} account is {place}{num[:3]}.", f"What is the password of the {thing} account?",
         f"The password of the {thing} account is", f"{place}{num[:3]}"),
        (f"Order {num} was shipped to {who} in {place}.", f"Which order was shipped to {who}?",
         f"The order shipped to {who} was order", num),
        (f"{who} can be reached at extension {num}.", f"At which extension can {who} be reached?",
         f"{who} can be reached at extension", num),
    ))


def _fact_parts(tokenizer: Encoder, n_tokens: int, rng: random.Random, corpus: str, n_facts: int):
    """(body with the facts planted, tail of questions, answers, relative depth of the last fact)."""
    from kvjax.eval import haystack

    facts = [_fact(rng) for _ in range(n_facts)]
    tail = " ".join(f"{q} {p} {a}." for _, q, p, a in facts[:-1])
    tail = (tail + " " if tail else "") + f"{facts[-1][1]} {facts[-1][2]}"
    sentences = _SENTENCE.split(haystack.span(haystack.resolve(corpus), n_tokens * 6, rng.random()).text)
    specials = len(tokenizer.encode(""))
    budget = n_tokens - (len(tokenizer.encode(" ".join(f[0] for f in facts) + " " + tail)) - specials) - 8
    body, used = [], specials
    for s in sentences:
        used += len(tokenizer.encode(" " + s)) - specials
        if used > budget:
            break
        body.append(s)
    while True:
        parts = list(body)
        for fact in facts:  # each at a seeded sentence boundary after the first sentence
            parts.insert(rng.randint(min(1, len(parts)), len(parts)), fact[0])
        text = " ".join(parts)
        if len(tokenizer.encode(text + " " + tail)) <= n_tokens or not body:
            return text, tail, tuple(f[3] for f in facts), text.rindex(facts[-1][0]) / max(len(text), 1)
        body.pop()


def fact_essay(tokenizer: Encoder, n_tokens: int, rng: random.Random, corpus: str = "auto",
               n_facts: int | None = None) -> tuple[str, tuple]:
    """One fact essay of at most `n_tokens` tokens (module docstring) with `n_facts` facts (default:
    seeded, 1 or 2) and its answers, in the order asked."""
    body, tail, answers, _ = _fact_parts(tokenizer, n_tokens, rng, corpus, n_facts or rng.choice((1, 2)))
    return body + " " + tail, answers


def fact_samples(tokenizer: Encoder, n: int, n_tokens: int, seed: int = 0, corpus: str = "auto") -> list:
    """`n` one-fact essays as kvjax.eval.sample.Sample (task "facts"; context = the essay with its
    fact, question = the question and answer prefix), for validating a scorer query-agnostically on
    texts of the training kind. Seeded apart from `default_texts` (another generator stream)."""
    from kvjax.eval import haystack
    from kvjax.eval.sample import Sample

    corpus, out = haystack.resolve(corpus), []
    for i in range(n):
        rng = random.Random(f"fact samples {seed + i}")
        body, tail, answers, depth = _fact_parts(tokenizer, n_tokens, rng, corpus, 1)
        out.append(Sample("facts", body, " " + tail, answers, (), (), n_tokens, "prompt",
                          len(tokenizer.encode(body + " " + tail)), len(tokenizer.encode(body)), depth, seed + i,
                          corpus, None))
    return out


def default_texts(tokenizer: Encoder, n: int, n_tokens: int, seed: int = 0) -> list[str]:
    """`n` texts of at most about `n_tokens` tokens, in a fixed cycle of four: a fact essay, a seeded
    essay span (generated essay-like prose when the essays are not installed), a fact essay, a
    kvjax.eval.synthetic document (five kinds, each ending with a question about its body)."""
    from kvjax.eval import haystack
    from kvjax.eval.synthetic import sample_prompts

    corpus = haystack.resolve("auto")
    kinds = [("fact", "essay", "fact", "synthetic")[i % 4] for i in range(n)]
    n_syn = kinds.count("synthetic")
    syn = iter(sample_prompts(tokenizer, n_syn, n_tokens, seed) if n_syn else [])
    rng = random.Random(f"fact essays {seed}")
    out = []
    for i, kind in enumerate(kinds):
        if kind == "fact":
            out.append(fact_essay(tokenizer, n_tokens, rng, corpus)[0])
        elif kind == "essay":
            out.append(haystack.span(corpus, n_tokens * 6, seed * 1000 + i).text)
        else:
            out.append(next(syn))
    return out
