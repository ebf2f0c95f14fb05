"""Issue "Nothing silent": each bad input that used to pass silently (or fail deep inside numpy or
jax) now gets a kvjax error naming the argument, before anything compiles; each silent wrong result
is fixed. Tiny random models (no torch); the embedded model only where a tokenizer is needed."""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np
import pytest

import kvjax
from kvjax import policies as P
from kvjax.api import compile_counts
from kvjax.errors import InputError, KvjaxError
from kvjax.policies import PolicyError
from test_generate import _tiny_params


@pytest.fixture(scope="module")
def params():
    return _tiny_params()


def _prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# 1. a budget is what a stream may hold, prompt and generated tokens together


@pytest.mark.parametrize("policy", [P.H2O(budget=256, recent=8), P.TOVA(budget=256), P.CAKE(budget=256, window=8),
                                    P.RoCo(budget=256, chunk=16)], ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("n", [14, 49])
def test_a_budget_above_prompt_and_new_tokens_evicts_nothing_while_decoding(params, policy, n):
    prompt = _prompt(n, seed=n)
    full = kvjax.generate(params, [prompt], max_new_tokens=60)
    out = kvjax.generate(params, [prompt], policy=policy, max_new_tokens=60)
    assert out.tokens == full.tokens
    # every stream kept the prompt and every fed token (the last sampled one is never fed back)
    assert (np.asarray(out.cache.streams.length) == n + 59).all()
    assert out.stats["budget_covers_prompt"] == [True]


def test_a_budget_below_prompt_plus_new_tokens_fills_up_then_holds(params):
    out = kvjax.generate(params, [_prompt(40)], policy=P.H2O(budget=48, recent=8), max_new_tokens=30)
    assert (np.asarray(out.cache.streams.length) == 48).all()  # filled to the budget, never past it


# ---------------------------------------------------------------------------------------------
# 2, 3. budgets that do not fit the model or the prompt


@pytest.mark.parametrize("budgets", [(16, 16, 16, 16, 16), [[16] * 7, [16] * 7]])
def test_a_per_layer_budget_of_the_wrong_shape_is_an_error(params, budgets):
    arr = np.asarray(budgets)
    pol = P.Compose(scorer_=P.scorers.KeyNorm(), budget=arr, allocator_=P.PerLayer(tuple(map(tuple, arr))
                                                                                  if arr.ndim == 2 else budgets))
    with pytest.raises(PolicyError, match=r"shape \[.*\] do not fit this model.*\[2\] or \[2, 2\]"):
        kvjax.generate(params, [_prompt(30)], policy=pol, max_new_tokens=2)


def test_an_array_budget_needs_the_per_layer_allocator():
    with pytest.raises(PolicyError, match=r"budget=\[16, 32\].*PerLayer"):
        P.SnapKV(budget=[16, 32], window=4)


def test_a_ratio_budget_smaller_than_the_window_is_an_error_not_a_cut_window(params):
    before = compile_counts()
    with pytest.raises(PolicyError, match=r"budget=0.05 keeps 15 of prompt 0's 300 tokens.*window 64"):
        kvjax.generate(params, [_prompt(300)], policy=P.SnapKV(budget=0.05), max_new_tokens=2)
    assert compile_counts() == before  # raised before anything compiled
    out = kvjax.generate(params, [_prompt(40)], policy=P.SnapKV(budget=0.5, window=8), max_new_tokens=2)
    assert len(out.tokens[0]) == 2  # a ratio that leaves the window is fine


def test_a_ratio_budget_an_evicting_policy_could_not_hold_is_an_error(params):
    """H2O never evicts its `recent` newest tokens: a ratio budget of a short prompt below them would
    let the stream grow past its budget while decoding (it held 12 of a budget of 5 before)."""
    before = compile_counts()
    with pytest.raises(PolicyError, match=r"budget=1.0 holds 5 tokens.*never evicts its 8 most recent"):
        kvjax.generate(params, [_prompt(5)], policy=P.H2O(budget=1.0, recent=8), max_new_tokens=4)
    assert compile_counts() == before
    out = kvjax.generate(params, [_prompt(40)], policy=P.H2O(budget=0.25, recent=8), max_new_tokens=4)
    assert int(np.max(np.asarray(out.cache.streams.length))) <= 10  # held at its budget


# ---------------------------------------------------------------------------------------------
# 4, 5, 9. prompts and sampling options


@pytest.mark.parametrize("prompt,match", [
    ([np.array([1.7, 2.2, 3.9])], "integer token ids"),
    (np.array([[1.0, 2.0]]), "integer token ids"),
    (b"hello", "decode bytes to str"),
    ([b"hello"], "decode bytes to str"),
    ([np.array([[1, 2], [3, 4]])], "1-D token ids"),
    ([[1, 2, "x"]], "integer token ids"),
])
def test_prompts_of_the_wrong_kind_are_named(params, prompt, match):
    with pytest.raises(InputError, match=match):
        kvjax.generate(params, prompt, max_new_tokens=2)


def test_forward_checks_dtype_and_vocabulary(params):
    with pytest.raises(InputError, match="integer token ids"):
        kvjax.forward(params, np.array([[1.5, 2.0]]))
    with pytest.raises(InputError, match=r"vocabulary \[0, 256\).*got \[300\]"):
        kvjax.forward(params, np.array([[1, 300]]))
    with pytest.raises(InputError, match=r"lengths must be 1 ints in \[1, 2\]"):
        kvjax.forward(params, np.array([[1, 3]]), lengths=[5])


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=1.0, top_k=257), r"top_k must be a positive int <= 256, or None, got 257"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p must be a number in"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive int"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop=[-1]), r"token ids in \[0, 256\)"),
    (dict(implementation="cuda"), "implementation must be one of"),
    (dict(seed=-1), "seed must be an int >= 0"),
])
def test_sampling_and_options_are_checked_before_compiling(params, kwargs, match):
    before = compile_counts()
    with pytest.raises(InputError, match=match):
        kvjax.generate(params, [_prompt(10)], **{"max_new_tokens": 2, **kwargs})
    assert compile_counts() == before


@pytest.mark.parametrize("budget", ["128", None, True, float("nan"), {"tokens": 8}])
def test_a_budget_that_is_not_a_number_fails_when_the_policy_is_built(budget):
    with pytest.raises(PolicyError, match="budget"):
        P.SnapKV(budget=budget, window=4)


def test_a_lone_surrogate_is_named(smollm2_f32):
    with pytest.raises(InputError, match=r"prompt\[0\] must be valid Unicode text \(character 6 is a lone surrogate"):
        kvjax.generate(smollm2_f32, "hello \ud800 world", max_new_tokens=2)


def test_a_safetensors_header_that_disagrees_with_its_bytes_names_the_file(tmp_path):
    from kvjax.io.safetensors import SafetensorsFile

    header = json.dumps({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 40]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(40))
    f = SafetensorsFile(tmp_path / "model.safetensors")
    with pytest.raises(kvjax.CheckpointError, match=r"model.safetensors: tensor w claims shape \[3, 4\] F32 \(48 bytes\)"):
        f.read("w")


# ---------------------------------------------------------------------------------------------
# 6. stop strings stop the sequence


def test_a_stop_string_ends_the_sequence_and_tokens_and_text_agree(smollm2_f32):
    free = kvjax.generate(smollm2_f32, "The capital of France is", max_new_tokens=12)
    assert "Paris" in free.text[0] and len(free.tokens[0]) > 3
    out = kvjax.generate(smollm2_f32, "The capital of France is", max_new_tokens=12, stop=["Paris"])
    assert out.text[0] == smollm2_f32.tokenizer.decode(out.tokens[0])
    assert out.text[0].endswith("Paris") and "Paris" not in smollm2_f32.tokenizer.decode(out.tokens[0][:-1])
    assert out.tokens[0] == free.tokens[0][: len(out.tokens[0])]
    assert out.stats["generated_lengths"] == [len(out.tokens[0])]


# ---------------------------------------------------------------------------------------------
# 7, 8. loading and profiles


def test_load_of_a_saved_directory_honours_dtype(tmp_path, params):
    import jax.numpy as jnp

    kvjax.save(params, tmp_path / "saved")
    assert kvjax.load(tmp_path / "saved").dtype == jnp.float32  # its own dtype by default
    assert kvjax.load(tmp_path / "saved", dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(InputError, match=r"dtype must be one of \('float32', 'bfloat16', 'float16'\)"):
        kvjax.load(tmp_path / "saved", dtype="int8")


def test_a_profile_made_for_another_model_is_refused():
    from kvjax.xkv.budgets import config_hash

    smol = P.Profiled("configs/budgets/smollm2-135m-1920.json")
    same_shape = _tiny_params(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=72)
    assert same_shape.config.num_layers == 30 and same_shape.config.num_kv_heads == 3
    assert config_hash(same_shape.config) != smol.profile.config_hash
    with pytest.raises(PolicyError, match=r"made for another model: config_hash '9bd7c7e95b1d8ccf'"):
        kvjax.generate(same_shape, [_prompt(20)], policy=smol, max_new_tokens=2)
    with pytest.raises(PolicyError, match="num_layers 30 \\(this model: 2\\)"):
        kvjax.prefill(_tiny_params(), [_prompt(20)], smol)


def test_a_profile_without_the_model_identity_is_refused(tmp_path):
    d = json.loads(pathlib.Path("configs/budgets/smollm2-135m-1920.json").read_text())
    d["format_version"] = 1
    del d["architecture"], d["config_hash"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    with pytest.raises(PolicyError, match="written before profiles named the model"):
        P.Profiled(tmp_path / "old.json")


# ---------------------------------------------------------------------------------------------
# 12. a prefilled context answers several questions without recompressing


@pytest.mark.slow
def test_a_prefilled_context_answers_questions_like_context_and_question(params):
    ctx, q1, q2 = _prompt(120, 1), _prompt(7, 2), _prompt(11, 3)
    pol = P.KNorm(budget=32)
    pre = kvjax.prefill(params, [ctx], pol)
    counts = compile_counts()
    a = kvjax.generate(params, prefilled=pre, question=[q1.tolist()], max_new_tokens=6)
    b = kvjax.generate(params, prefilled=pre, question=[q2.tolist()], max_new_tokens=6)
    again = kvjax.generate(params, prefilled=pre, question=[q1.tolist()], max_new_tokens=6)
    assert compile_counts()["prefill"] == counts["prefill"]  # the context was not compressed again
    assert again.tokens == a.tokens  # each question starts from the same compressed state
    ref = kvjax.generate(params, context=[ctx], question=[q1.tolist()], policy=pol, max_new_tokens=6)
    assert a.tokens == ref.tokens
    both = kvjax.generate(params, prefilled=pre, question=[q1.tolist(), q2.tolist()], max_new_tokens=6)
    assert both.tokens == [a.tokens[0], b.tokens[0]]  # several questions of one context, as a batch


def test_errors_are_kvjax_errors_with_the_argument_named(params):
    with pytest.raises(KvjaxError, match="policy must be a kvjax.policies.Policy"):
        kvjax.generate(params, [_prompt(5)], policy="snapkv", max_new_tokens=2)
    with pytest.raises(InputError, match="exactly one of prompt=, context="):
        kvjax.generate(params, max_new_tokens=2)
