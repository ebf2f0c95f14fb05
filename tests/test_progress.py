"""Habits of long work: `kvjax.profile` shows a progress bar over its prompts that can be silenced,
and `generate`'s stats say whether the call compiled a program (its timings then include it)."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from test_generate import _tiny_params


@pytest.fixture(scope="module")
def tiny():
    return _tiny_params(num_hidden_layers=2)


def test_profile_shows_a_bar_over_its_prompts_unless_silenced(tiny, capsys):
    kvjax.profile(tiny, 3, 2 * 40, window=8, n_tokens=64, progress=True)
    err = capsys.readouterr().err
    assert "profiling" in err and "3/3" in err, err
    kvjax.profile(tiny, 3, 2 * 40, window=8, n_tokens=64, progress=False)
    assert capsys.readouterr().err == ""
    kvjax.profile(tiny, 3, 2 * 40, window=8, n_tokens=64)  # default: only on a terminal (pytest's is not)
    assert capsys.readouterr().err == ""
    with pytest.raises(kvjax.errors.InputError, match="progress must be True or False, got 'yes'"):
        kvjax.profile(tiny, 3, 2 * 40, window=8, n_tokens=64, progress="yes")


def test_generate_says_whether_it_compiled(tiny):
    prompts = [np.arange(1, 30, dtype=np.int32), np.arange(3, 20, dtype=np.int32)]
    policy = kvjax.policies.SnapKV(budget=12, window=4)
    first = kvjax.generate(tiny, prompts, policy=policy, max_new_tokens=5)
    again = kvjax.generate(tiny, prompts, policy=policy, max_new_tokens=5)
    assert first.stats["compiled"] is True and again.stats["compiled"] is False
    assert again.tokens == first.tokens
    pre = kvjax.prefill(tiny, [prompts[0]], policy, max_new_tokens=5)
    asked = [kvjax.generate(tiny, prefilled=pre, question=[[5, 6, 7], [8, 9]], max_new_tokens=5) for _ in range(2)]
    assert asked[0].stats["compiled"] is True and asked[1].stats["compiled"] is False  # feeding the questions
