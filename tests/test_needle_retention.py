"""benchmarks/needle_retention.py's measurements on hand-made kept sets (the oracle is counted by hand)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np


def _module():
    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))  # it imports quality.py's sibling modules
    spec = importlib.util.spec_from_file_location("needle_retention_bench", bench / "needle_retention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Tok:
    """Characters as tokens; a leading space is its own token."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_answers_are_found_in_the_context_only_and_every_occurrence_counts():
    nr = _module()
    ids = [ord(c) for c in "ab 12 cd 12 ?12"]
    spans = nr.answer_spans(_Tok(), ids, ["12", "zz"], context_tokens=12)  # the question's "12" is not context
    assert [s.tolist() for s in spans[0]] == [[2, 3, 4], [8, 9, 10]]  # " 12" twice
    assert spans[1] == []


def test_retention_takes_each_answers_best_kept_occurrence():
    nr = _module()
    spans = [[np.array([2, 3]), np.array([8, 9])], [np.array([5])]]
    kept = [[np.array([2, 5, 8, 9]), np.array([3])],  # layer 0: head 0 keeps all; head 1 half of answer 0
            [np.array([]), np.array([2, 3, 5])]]      # layer 1: head 0 nothing; head 1 all
    m = nr.measure(kept, spans)
    # per head: (1 + 1) / 2, (0.5 + 0) / 2, 0, 1
    assert np.isclose(m["retention"], (1 + 0.25 + 0 + 1) / 4)
    assert np.isclose(m["whole"], 2 / 4)
    assert m["retention_by_layer"] == [0.625, 0.5]
    sizes = np.array([[4, 1], [0, 3]], float)
    assert np.isclose(m["head_spread"], np.mean(sizes.std(axis=1) / sizes.mean(axis=1)))


def test_jaccard_averages_over_heads():
    nr = _module()
    a = [[np.array([1, 2, 3]), np.array([], int)]]
    b = [[np.array([2, 3, 4]), np.array([], int)]]
    assert np.isclose(nr.jaccard(a, b), (2 / 4 + 1.0) / 2)  # an empty pair counts as equal
