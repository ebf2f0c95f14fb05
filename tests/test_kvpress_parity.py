"""kvjax keeps the tokens kvpress 0.5.5 keeps, and answers the pass-key prompts as kvpress does.

Fixtures come from scripts/kvpress_oracle.py (run in its own environment with kvpress, torch and
transformers 5.2); see tests/fixtures/kvpress/CONVENTIONS.md for the conventions matched.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import kvjax
from kvjax import policies as P
from selection import assert_same_selection

pytestmark = pytest.mark.slow

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "kvpress"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
IDS = MANIFEST["prompt_ids"]
N = len(IDS)

POLICIES = {
    "snapkv": lambda b: P.SnapKV(budget=b),
    "streamingllm": lambda b: P.StreamingLLM(budget=b, sinks=4),
    "tova": lambda b: P.TOVA(budget=b),
    "knorm": lambda b: P.KNorm(budget=b),
    "pyramidkv": lambda b: P.PyramidKV(budget=b),
}


def _forced(name: str, budget: int):
    pos = np.arange(N)
    if name in ("snapkv", "pyramidkv", "adakv_snapkv"):
        return pos >= N - 64
    if name == "tova":
        return pos == N - 1
    if name == "streamingllm":
        return pos < 4
    return np.zeros(N, bool)


KEPT_CASES = {(name, budget): POLICIES[name](budget) for name in sorted(POLICIES) for budget in (64, 256)}
KEPT_CASES |= {("adakv", budget): P.AdaKV(P.SnapKV(budget=budget), convention="kvpress") for budget in (64, 256)}
KEPT_CASES[("pyramidkv", 768)] = P.PyramidKV(budget=768)


@pytest.fixture(scope="module")
def kept_by_case(smollm2_f32):
    """Each case's kept positions from one prompt pass that compresses for every policy at once
    (`kvjax.prefill` with a list of policies; each cache as that policy's prefill builds it)."""
    pres = kvjax.prefill(smollm2_f32, [IDS], list(KEPT_CASES.values()), max_new_tokens=1)
    return {case: (kvjax.kept_positions(pre.cache), pre) for case, pre in zip(KEPT_CASES, pres)}


@pytest.mark.parametrize("budget", [64, 256])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_kept_positions_equal_kvpress(smollm2_f32, kept_by_case, name, budget):
    ref = np.load(FIXTURES / f"kept_{name}_{budget}.npz")
    kept, _ = kept_by_case[(name, budget)]
    scores = ref["scores"]  # kvpress's own scores [L, H, T]
    cfg = smollm2_f32.config
    for layer in range(cfg.num_layers):
        ref_kept = ref["kept"][layer] if "kept" in ref else ref[f"kept_layer{layer}"]
        for h in range(cfg.num_kv_heads):
            ours = kept[layer][0][h]
            assert len(ours) == len(ref_kept[h]), f"layer {layer}: {len(ours)} kept, kvpress {len(ref_kept[h])}"
            if np.array_equal(ours, ref_kept[h]):
                continue
            s = scores[layer, h].astype(np.float64)
            assert_same_selection(ours, s, len(ref_kept[h]), _forced(name, budget) | np.isinf(s),
                                  where=f"{name} {budget} layer {layer} head {h}")


@pytest.mark.parametrize("budget", [64, 256])
def test_adakv_kept_mask_equals_kvpress(smollm2_f32, kept_by_case, budget):
    ref = np.load(FIXTURES / f"kept_adakv_snapkv_{budget}.npz")
    kept, _ = kept_by_case[("adakv", budget)]
    cfg = smollm2_f32.config
    for layer in range(cfg.num_layers):
        mask = ref["kept_mask"][layer]
        counts = mask.sum(-1)
        ours = np.array([len(kept[layer][0][h]) for h in range(cfg.num_kv_heads)])
        # heads trade tokens exactly as kvpress decides (up to near-ties at the layer threshold)
        assert abs(ours - counts).sum() <= 2, (layer, ours, counts)
        assert ours.sum() == counts.sum() == cfg.num_kv_heads * budget
        overlap = sum(len(np.intersect1d(kept[layer][0][h], np.nonzero(mask[h])[0])) for h in range(len(ours)))
        assert overlap >= counts.sum() - 2, (layer, overlap, counts.sum())


ANSWERS = json.loads((FIXTURES / "passkey_answers.json").read_text())


def test_full_cache_finds_the_pass_key_five_times():
    full = [a for a in ANSWERS if a["press"] == "none"]
    assert len(full) == 5 and all(a["correct"] for a in full)


PASSKEY = [(name, ratio) for name in ("snapkv", "streamingllm", "knorm", "tova") for ratio in (0.5, 0.9)]


@pytest.fixture(scope="module")
def passkey_outputs(smollm2_f32):
    """kvjax's answers to the 5 pass-key prompts for each (press, ratio): the prompts share one
    length, so each press keeps kvpress's n_kept = int(n (1 - ratio)) of every prompt; one prompt
    pass compresses for all 8 policies (`kvjax.prefill` with a list), then each decodes."""
    prompts = []
    for a in ANSWERS:
        if a["press"] != "none" and a["prompt_ids"] not in prompts:
            prompts.append(a["prompt_ids"])
    n = len(prompts[0])
    assert len(prompts) == 5 and all(len(p) == n for p in prompts)
    pols = [POLICIES[name](max(1, int(n * (1 - ratio)))) for name, ratio in PASSKEY]
    pres = kvjax.prefill(smollm2_f32, prompts, pols, max_new_tokens=8)
    return {key: (prompts, kvjax.generate(smollm2_f32, prefilled=pre, max_new_tokens=8))
            for key, pre in zip(PASSKEY, pres)}


@pytest.mark.parametrize("name,ratio", PASSKEY)
def test_passkey_answers_agree_with_kvpress(passkey_outputs, name, ratio):
    from kvjax.eval.passkey import score_answer

    prompts, out = passkey_outputs[(name, ratio)]
    cases = [a for a in ANSWERS if a["press"] == name and a["ratio"] == ratio]
    assert len(cases) == 5
    agree, ours_correct = 0, 0
    for case in cases:
        i = prompts.index(case["prompt_ids"])
        agree += out.tokens[i] == case["tokens"][: len(out.tokens[i])]
        ours_correct += score_answer(out.text[i], case["key"])
    assert agree >= 4, f"{name} at {ratio}: {agree}/5 answers equal kvpress's"
    kvpress_correct = sum(c["correct"] for c in cases)
    assert abs(ours_correct - kvpress_correct) <= 1


def test_pyramidkv_with_an_active_pyramid_equals_kvpress(smollm2_f32, kept_by_case):
    """At 768 tokens per head the pyramid does not fall back: layer budgets 1435 - 46 l."""
    ref = np.load(FIXTURES / "kept_pyramidkv_768.npz")
    kept, pre = kept_by_case[("pyramidkv", 768)]
    cfg = smollm2_f32.config
    assert np.asarray(pre.cache.streams.length)[:, 0, 0].tolist() == ref["n_kept"].tolist()
    for layer in range(cfg.num_layers):
        ref_kept = ref[f"kept_layer{layer}"]
        for h in range(cfg.num_kv_heads):
            if np.array_equal(kept[layer][0][h], ref_kept[h]):
                continue
            s = ref["scores"][layer, h].astype(np.float64)
            assert_same_selection(kept[layer][0][h], s, len(ref_kept[h]), _forced("pyramidkv", 768) | np.isinf(s),
                                  where=f"pyramidkv 768 layer {layer} head {h}")
