"""Essay-like prose from seeded sentence templates: the generated haystack (no digits, so a needle's
number is the only number in it). Used by kvjax.eval.needles ("essay") and kvjax.eval.haystack ("generated")."""

from __future__ import annotations

import random

_SUBJECTS = ("the founder", "a good programmer", "the investor", "every startup", "the best writer", "a student",
             "the old company", "a small team", "the reader", "most people", "the first user", "a careful engineer")
_VERBS = ("learns", "discovers", "forgets", "builds", "changes", "questions", "notices", "explains", "ignores",
          "remembers", "rewrites", "understands")
_OBJECTS = ("what customers really want", "the shape of the problem", "how ideas grow", "the cost of waiting",
            "why small things matter", "the value of taste", "a simpler way to work", "the habits of good teams",
            "what makes an essay clear", "the reasons projects fail", "how to ask better questions",
            "the difference between busy and productive")
_CLAUSES = ("when the work gets hard", "after years of practice", "if nobody is watching",
            "because the market keeps moving", "long before it seems obvious", "while everyone else hesitates",
            "once the first version ships", "even in a quiet year")
_OPENERS = ("In practice,", "Surprisingly,", "Over time,", "For this reason,", "In the end,", "Often,",
            "At first,", "Perhaps more importantly,")
_ABSTRACT = ("ambition", "curiosity", "patience", "honesty", "focus", "persistence", "judgment", "clarity")


def essay_sentence(rng: random.Random) -> str:
    """One essay-like sentence (letters and punctuation only)."""
    form = rng.randrange(4)
    if form == 0:
        s = f"{rng.choice(_OPENERS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    elif form == 1:
        s = f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_CLAUSES)}."
    elif form == 2:
        a, b = rng.sample(_ABSTRACT, 2)
        s = (f"It is tempting to think that {a} matters more than {b}, but {rng.choice(_SUBJECTS)} "
             f"{rng.choice(_VERBS)} otherwise.")
    else:
        s = (f"{rng.choice(_CLAUSES).capitalize()}, {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
             f"{rng.choice(_OBJECTS)}, and that is where {rng.choice(_ABSTRACT)} comes from.")
    return s[0].upper() + s[1:]
