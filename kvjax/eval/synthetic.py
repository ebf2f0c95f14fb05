"""Seeded synthetic prompts for offline profiling (no internet, standard library only).

Five kinds, so the profile does not learn only the pass-key pattern:
    passkey  repetitive filler with a hidden key (kvjax.eval.passkey)
    records  a table of people, cities and codes, then a lookup question
    story    random sentences from a small vocabulary, then a recall question
    code     small Python functions, then a question about one of them
    ledger   daily sales figures, then a question about one day

Each prompt ends with a question whose answer lies somewhere in the body, as in the long-context
tasks the budgets are meant for, so the last queries (the observation window) look back into it.
"""

from __future__ import annotations

import random

from kvjax.errors import bad_input

from kvjax.eval.passkey import Encoder, n_repeats_for_tokens, passkey_prompt

KINDS = ("passkey", "records", "story", "code", "ledger")

_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena",
          "Mateo", "Nia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara")
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hanoi", "Perth", "Bergen", "Cusco", "Dakar",
           "Porto", "Kyoto", "Tunis", "Lyon", "Hobart", "Riga")
_ADJ = ("quiet", "red", "old", "clever", "tired", "bright", "small", "heavy", "gentle", "strange", "silver",
        "narrow", "busy", "warm", "hidden", "wooden")
_NOUNS = ("river", "lantern", "teacher", "garden", "engine", "violin", "harbor", "letter", "mountain", "market",
          "window", "bridge", "farmer", "library", "kettle", "compass")
_VERBS = ("watched", "followed", "repaired", "painted", "carried", "found", "crossed", "opened", "described",
          "visited", "measured", "forgot")
_PLACES = ("near the station", "behind the mill", "across the valley", "under the old oak", "by the sea",
           "inside the museum", "at the end of the road", "over the hill")
_OPS = ("+", "-", "*")


#: tokens kept free for the closing question
_QUESTION_TOKENS = 24


def _units(tokenizer: Encoder, n_tokens: int, unit) -> list[str]:
    """`unit(i)` sentences until they fill about `n_tokens - _QUESTION_TOKENS` tokens (counted
    unit by unit: the long text is not re-encoded for every added sentence)."""
    budget = n_tokens - _QUESTION_TOKENS
    parts, used, specials = [], 0, len(tokenizer.encode(""))  # a BOS the tokenizer adds
    while used < budget:
        parts.append(unit(len(parts)))
        used += max(1, len(tokenizer.encode(" " + parts[-1])) - specials)
    return parts


def _passkey(tokenizer, n_tokens, rng: random.Random) -> str:
    key = str(rng.randint(10000, 99999))
    return passkey_prompt(key, rng.uniform(0.05, 0.95), n_repeats_for_tokens(n_tokens, tokenizer))


def _records(tokenizer, n_tokens, rng):
    rows = []

    def unit(i):
        rows.append(f"{rng.choice(_NAMES)} {rng.choice(_NAMES)}son")
        return f"Record {i}: {rows[-1]} lives in {rng.choice(_CITIES)} and keeps the code {rng.randint(1000, 9999)}."

    body = " ".join(_units(tokenizer, n_tokens, unit))
    return body + f" What is the code kept by {rng.choice(rows)}? The code is"


def _story(tokenizer, n_tokens, rng):
    hero = rng.choice(_NAMES)

    def unit(i):
        return (f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} {rng.choice(_NAMES)} "
                f"{rng.choice(_PLACES)}, and the {rng.choice(_NOUNS)} was {rng.choice(_ADJ)}.")

    parts = _units(tokenizer, n_tokens, unit)
    # the one sentence the question asks about replaces a random one, so the length stays put
    parts[rng.randrange(len(parts))] = f"That day {hero} found a {rng.choice(_ADJ)} {rng.choice(_NOUNS)} and kept it."
    return " ".join(parts) + f" What did {hero} find and keep? {hero} kept a"


def _code(tokenizer, n_tokens, rng):
    names = []

    def unit(i):
        names.append(f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}_{i}")
        a, b = rng.randint(2, 9), rng.randint(1, 50)
        return f"\ndef {names[-1]}(x, y):\n    return x {rng.choice(_OPS)} {a} * y {rng.choice(_OPS)} {b}\n"

    body = " ".join(_units(tokenizer, n_tokens, unit))
    return body + f"\n# What does {rng.choice(names)}(2, 3) return? It returns"


def _ledger(tokenizer, n_tokens, rng):
    def unit(i):
        return (f"On day {i + 1}, the {rng.choice(_CITIES)} shop sold {rng.randint(2, 90)} "
                f"{rng.choice(_NOUNS)}s for {rng.randint(1, 60)} dollars each.")

    parts = _units(tokenizer, n_tokens, unit)
    day = rng.randint(1, len(parts))
    return " ".join(parts) + f" How many items were sold on day {day}? On day {day}, the shop sold"


_MAKERS = {"passkey": _passkey, "records": _records, "story": _story, "code": _code, "ledger": _ledger}


#: the shortest prompt `sample_prompts` writes
MIN_TOKENS = 64


def sample_prompts(tokenizer: Encoder, n: int, n_tokens: int, seed: int = 0, kinds=KINDS) -> list[str]:
    """`n` prompts of about `n_tokens` tokens each (within a few percent), drawn with
    `random.Random(seed)`: kinds cycle in a seeded order, so any 5 consecutive prompts cover all
    five kinds. The same (tokenizer, n, n_tokens, seed) gives the same strings."""
    if n <= 0:
        raise bad_input("n", n, "a positive number of prompts")
    if n_tokens < MIN_TOKENS:
        raise bad_input("n_tokens", n_tokens, f"at least {MIN_TOKENS} tokens (a prompt holds several sentences and a question)")
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"unknown prompt kinds {unknown}; known: {KINDS}")
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    return [_MAKERS[order[i % len(order)]](tokenizer, n_tokens, rng) for i in range(n)]
