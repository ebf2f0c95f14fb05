"""The README's "API in ten lines" runs as written, on the embedded model."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow


def _api_block() -> str:
    text = README.read_text()
    section = text[text.index("## The API in ten lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_block_runs_as_written(smollm2_dir):
    code = _api_block()
    assert "kvjax.generate" in code and "prefilled=ctx" in code
    env: dict = {}
    exec(compile(code, str(README) + ":api", "exec"), env)  # noqa: S102 - the README's own example
    out, ans, ppl, prof = env["out"], env["ans"], env["ppl"], env["prof"]
    assert len(out.text) == 1 and len(ans.text) == 2
    assert ppl["perplexity"] > 1 and len(prof.budgets) == 30
    logits = env["logits"]
    assert logits.ndim == 3 and logits.shape[0] == 1 and logits.shape[2] == env["params"].config.vocab_size
