"""RULER's variable tracking (multi-hop tracing): chains of assignments hidden in a haystack,

    VAR QWERT = 48213.  ...  VAR ASDFG = VAR QWERT.  ...  VAR ZXCVB = VAR ASDFG.  ...

and the question asks for every variable that ends up holding the first chain's value. A chain has
`n_hops` copies after its first assignment, so `n_hops + 1` names answer it; the other `n_chains - 1`
chains (different values) are distractors. Names are five random capital letters, values five-digit
numbers (RULER's). The default haystack is RULER's repeated noise sentence ("noise"); any
kvjax.eval.haystack haystack works.

Depth: `depth` places the asked chain's first assignment; its later statements follow at seeded depths
between it and the end, in chain order. Without `depth` every statement's depth is seeded (each chain
in order).
"""

from __future__ import annotations

import dataclasses
import string

from kvjax.eval import haystack as H
from kvjax.eval.assemble import fit_haystack, start_sample
from kvjax.eval.fitting import Encoder
from kvjax.eval.sample import Sample, check_positive, task_options
from kvjax.eval.scoring import contains

HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According "
            "to the chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, "
            "they are:")
NAME_LETTERS = 5


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    """n_chains: assignment chains (one asked, the others distractors); n_hops: copies per chain;
    haystack: kvjax.eval.haystack.HAYSTACKS (default "noise", as RULER)."""

    n_chains: int = 1
    n_hops: int = 4
    haystack: str = "noise"

    def __post_init__(self):
        check_positive("n_chains", self.n_chains)
        check_positive("n_hops", self.n_hops)
        if self.haystack not in H.HAYSTACKS:
            raise ValueError(f"haystack must be one of {H.HAYSTACKS}, got {self.haystack!r}")

    @property
    def name(self) -> str:
        return "variable_tracking"

    def sample(self, n_tokens: int, encoder: Encoder, seed: int = 0, *, depth: float | None = None,
               fit: str = "prompt") -> Sample:
        """One prompt with exactly `n_tokens` tokens (the prompt's, or the context's for fit="context")."""
        rng, span = start_sample(self.name, self.haystack, n_tokens, encoder, seed, depth, fit)
        names: list[str] = []
        while len(names) < self.n_chains * (self.n_hops + 1):
            v = "".join(rng.choice(string.ascii_uppercase) for _ in range(NAME_LETTERS))
            if v not in names and not contains(span.text, v):
                names.append(v)
        values: list[str] = []
        while len(values) < self.n_chains:
            v = str(rng.randint(10000, 99999))
            if v not in values and not contains(span.text, v):
                values.append(v)
        items = []
        for c in range(self.n_chains):
            chain = names[c * (self.n_hops + 1) : (c + 1) * (self.n_hops + 1)]
            statements = [f"VAR {chain[0]} = {values[c]}."] + [
                f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(self.n_hops)]
            start = depth if (c == 0 and depth is not None) else None
            items += list(zip(_chain_depths(rng, len(statements), start), statements))
        fitted = fit_haystack(n_tokens, encoder, span, head=HEAD, items=items,
                              question=QUESTION.format(value=values[0], n=self.n_hops + 1), fit=fit,
                              avoid=names + values)
        answers = tuple(names[: self.n_hops + 1])
        return Sample(self.name, fitted.context, fitted.question, answers, tuple(names[self.n_hops + 1 :]),
                      (values[0],), n_tokens, fit, fitted.n_tokens, fitted.context_tokens, fitted.positions[0], seed,
                      fitted.corpus, fitted.offset, task_options(self))


def _chain_depths(rng, n: int, start: float | None) -> list[float]:
    """Sorted depths of one chain's statements: the first at `start` (seeded when None), the rest after it."""
    if start is None:
        return sorted(rng.random() for _ in range(n))
    return [start] + sorted(start + (1.0 - start) * rng.random() for _ in range(n - 1))
