"""Learned scorer (issue 16): targets against a dense [T, T] reference, training lowers the held-out
loss, Orbax round trip, the model-identity check, the policy's budgets (alone and under Ada-KV),
and errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import policies as P
from kvjax.cache import kept_positions
from kvjax.errors import KvjaxError
from kvjax.learned.model import token_features, unrotate
from kvjax.learned.store import ScorerError, load_scorer
from kvjax.learned.targets import future_attention, future_count
from kvjax.models.llama import apply_rope, rope_inv_freq
from test_generate import _prompt, _tiny_params


def _dense_reference(q, k, lengths, scale, horizon, reduce, group_reduce, min_distance=1, last=None):
    """The definition, with the whole [T, T] attention in numpy."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, h, g, t, d = q.shape
    out = np.zeros((b, h, t))
    for bi in range(b):
        n = int(lengths[bi])
        logits = np.einsum("hgid,hjd->hgij", q[bi], k[bi]) * scale
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        logits = np.where((j <= i) & (j < n), logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        a = probs.max(1) if group_reduce == "max" else probs.mean(1)  # [H, T, T]
        for jj in range(n):
            rows = [ii for ii in range(jj + min_distance, n) if (horizon is None or ii - jj <= horizon)
                    and (last is None or ii >= n - last)]
            if rows:
                vals = a[:, rows, jj]
                out[bi, :, jj] = vals.max(-1) if reduce == "max" else vals.mean(-1)
    return out


@pytest.mark.parametrize("horizon,reduce,group_reduce,min_distance,last", [
    (None, "max", "max", 1, None), (5, "mean", "mean", 1, None), (3, "max", "mean", 1, None),
    (None, "max", "max", 4, 10), (None, "mean", "mean", 6, 9), (None, "max", "mean", 2, 30)])
def test_future_attention_equals_the_dense_definition(horizon, reduce, group_reduce, min_distance, last):
    rng = np.random.default_rng(0)
    b, h, g, t, d = 2, 2, 3, 37, 8
    q = rng.normal(size=(b, h, g, t, d)).astype(np.float32)
    k = rng.normal(size=(b, h, t, d)).astype(np.float32)
    lengths = np.array([37, 23], np.int32)
    got = future_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), scale=0.5, horizon=horizon,
                           reduce=reduce, group_reduce=group_reduce, min_distance=min_distance, last=last, chunk=8)
    ref = _dense_reference(q, k, lengths, 0.5, horizon, reduce, group_reduce, min_distance, last)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    count = np.asarray(future_count(jnp.asarray(lengths), t, horizon, min_distance, last))
    for bi, n in enumerate(lengths):
        want = [len([i for i in range(j + min_distance, n) if (horizon is None or i - j <= horizon)
                     and (last is None or i >= n - last)]) if j < n else 0 for j in range(t)]
        assert count[bi].tolist() == want


def test_unrotate_inverts_rope():
    params = _tiny_params()
    inv = rope_inv_freq(params.config)
    x = jax.random.normal(jax.random.key(1), (1, 2, 11, params.config.head_dim))
    pos = jnp.arange(11)
    rot = apply_rope(x.transpose(0, 2, 1, 3), pos[None], inv).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(unrotate(rot, pos, inv)), np.asarray(x), atol=1e-5)
    f = token_features(rot, x, pos, inv, ("key", "value", "position"))
    assert f.shape == (1, 2, 11, 2 * params.config.head_dim + 3)


def test_the_distance_feature_counts_to_each_prompts_own_end():
    k = jax.random.normal(jax.random.key(2), (2, 3, 9, 8))
    lengths = jnp.asarray([9, 5])
    f = np.asarray(token_features(k, k, jnp.arange(9), np.ones(4), ("position", "distance"), lengths))
    assert f.shape == (2, 3, 9, 2)
    gaps = np.array([[8, 7, 6, 5, 4, 3, 2, 1, 0], [4, 3, 2, 1, 0, 0, 0, 0, 0]])  # padding: 0
    for h in range(3):
        np.testing.assert_allclose(f[:, h, :, 1], np.log1p(gaps), rtol=1e-6)
        np.testing.assert_allclose(f[:, h, :, 0], np.log1p(np.arange(9))[None].repeat(2, 0), rtol=1e-6)
    with pytest.raises(kvjax.errors.InputError, match="lengths must be the prompt lengths"):
        token_features(k, k, jnp.arange(9), np.ones(4), ("distance",))


@pytest.fixture(scope="module")
def tiny():
    return _tiny_params()


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("scorer") / "s"
    return kvjax.train_scorer(tiny, 8, n_tokens=96, steps=40, eval_every=10, min_future=8, out=out, seed=0,
                              progress=False, model_name="tiny"), out


@pytest.mark.parametrize("kind,loss", [("linear", "mse"), ("mlp", "listwise")])
def test_training_lowers_the_held_out_loss(tiny, kind, loss):
    s = kvjax.train_scorer(tiny, 6, n_tokens=80, steps=30, eval_every=10, min_future=8, kind=kind, loss=loss,
                           lr=1e-2, progress=False)
    first, best = s.history[0]["held_out"], s.meta.train["best_held_out"]
    assert best < first
    assert [h["step"] for h in s.history] == [0, 10, 20, 30]
    assert len(s.meta.train["held_out_texts"]) == 1 and len(s.meta.train["train_texts"]) == 5


def test_training_is_seeded(tiny):
    a = kvjax.train_scorer(tiny, 4, n_tokens=64, steps=5, eval_every=5, min_future=8, progress=False, seed=3)
    b = kvjax.train_scorer(tiny, 4, n_tokens=64, steps=5, eval_every=5, min_future=8, progress=False, seed=3)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))


def test_save_restore_round_trip(trained):
    scorer, path = trained
    back = load_scorer(path)
    assert back.meta == scorer.meta and back.meta.train == scorer.meta.train
    for k in scorer.params:
        np.testing.assert_array_equal(np.asarray(back.params[k]), np.asarray(scorer.params[k]))
    curve = json.loads((path / "loss.json").read_text())
    assert curve == list(scorer.history) and curve[0]["step"] == 0
    meta = json.loads((path / "scorer.json").read_text())
    assert meta["architecture"] == "llama" and meta["config_hash"] == scorer.meta.config_hash


def test_a_scorer_for_another_model_is_an_error(trained):
    _, path = trained
    other = _tiny_params(rope_theta=5000.0)  # same shapes, another model
    pol = P.Learned(str(path), budget=40)
    with pytest.raises(KvjaxError, match="trained for another model.*config_hash"):
        kvjax.prefill(other, [_prompt(40)], pol)
    deeper = _tiny_params(num_hidden_layers=3)
    with pytest.raises(KvjaxError, match="num_layers 2 \\(this model: 3\\)"):
        kvjax.generate(deeper, [_prompt(40)], P.Learned(str(path), budget=40), max_new_tokens=2)


def test_learned_keeps_exactly_the_budget_and_composes_with_adakv(tiny, trained):
    scorer, _ = trained
    prompts = [_prompt(70, seed=1), _prompt(45, seed=2)]
    pre = kvjax.prefill(tiny, prompts, P.Learned(scorer, budget=24, window=4, sinks=2))
    kept = kept_positions(pre.cache)  # [layer][sequence][kv_head]
    for layer in kept:
        for seq in layer:
            assert all(len(h) == 24 for h in seq)
            assert all({0, 1} <= set(np.asarray(h).tolist()) for h in seq)  # sinks
    ada = kvjax.prefill(tiny, prompts, P.AdaKV(P.Learned(scorer, budget=24, window=4, sinks=2), alpha=0.2))
    uneven = False
    for layer in kept_positions(ada.cache):
        for seq in layer:
            sizes = [len(h) for h in seq]
            # the AdaKV rule's floor and rounding move a layer's total by a few tokens (kvjax/policies/adakv.py)
            assert 24 * len(seq) - len(seq) * 2 <= sum(sizes) <= 24 * len(seq) + len(seq) // 2
            assert min(sizes) >= 4 + 2
            uneven |= len(set(sizes)) > 1
    assert uneven  # heads traded tokens
    # ratio budgets, query-agnostic prefill then decode
    out = kvjax.generate(tiny, prefilled=kvjax.prefill(tiny, prompts, P.Learned(scorer, 0.25, window=4, sinks=2),
                                                       question=[_prompt(5, 7), _prompt(5, 8)], max_new_tokens=3),
                         max_new_tokens=3)
    assert len(out.tokens) == 2


def test_learned_with_per_layer_budgets(tiny, trained):
    b = np.array([12, 28])
    pol = P.Learned(trained[0], budget=b, window=4, sinks=2, allocator_=P.PerLayer((12, 28)))
    kept = kept_positions(kvjax.prefill(tiny, [_prompt(60, seed=5)], pol).cache)
    assert [[len(h) for h in layer[0]] for layer in kept] == [[12, 12], [28, 28]]
    with pytest.raises(P.PolicyError, match="PerLayer allocator"):
        P.Learned(trained[0], budget=b)


def test_learned_scores_follow_the_scorer(tiny, trained):
    """The kept set is the top of the scorer's own scores (window and sinks aside), for each prompt of a
    ragged batch alike: the distance feature counts to each prompt's own end, as in training."""
    scorer, _ = trained
    assert "distance" in scorer.meta.features
    prompts = [_prompt(60, seed=4), _prompt(41, seed=6)]
    pol = P.Learned(scorer, budget=20, window=0, sinks=0)
    kept = kept_positions(kvjax.prefill(tiny, prompts, pol).cache)
    from kvjax.learned.targets import text_features_and_targets
    from kvjax.learned.model import score

    for row, prompt in enumerate(prompts):
        feats, _ = text_features_and_targets(tiny.weights, jnp.asarray(prompt)[None], jnp.asarray([len(prompt)]),
                                             config=tiny.config, features=scorer.meta.features, horizon=None,
                                             reduce="max", group_reduce="max")
        for layer in range(tiny.config.num_layers):
            s = np.asarray(score(scorer.params, feats[layer], layer))[0]  # [H, T]
            for h in range(s.shape[0]):
                top = set(np.argsort(-s[h], kind="stable")[:20].tolist())
                assert set(np.asarray(kept[layer][row][h]).tolist()) == top


@pytest.mark.slow
def test_a_scorer_without_the_distance_feature_still_loads_and_scores(tiny, tmp_path):
    """Scorers saved before the distance feature existed (features key, value, position) stay readable."""
    old = kvjax.train_scorer(tiny, 4, n_tokens=64, steps=3, eval_every=3, min_future=8, progress=False,
                             features=("key", "value", "position"), out=tmp_path / "old")
    back = load_scorer(tmp_path / "old")
    assert back.meta.features == ("key", "value", "position") == old.meta.features
    kept = kept_positions(kvjax.prefill(tiny, [_prompt(50, seed=3)], P.Learned(back, budget=16, window=2)).cache)
    assert all(len(h) == 16 for layer in kept for h in layer[0])
    meta = json.loads((tmp_path / "old" / "scorer.json").read_text())
    for bad, match in ((dict(meta, format_version=2), "format version 2; this kvjax reads 1"),
                       (dict(meta, features=["key", "depth"]), "features a subset of")):
        (tmp_path / "old" / "scorer.json").write_text(json.dumps(bad))
        with pytest.raises(ScorerError, match=match):
            load_scorer(tmp_path / "old")


@pytest.mark.parametrize("kwargs,match", [
    (dict(texts=1), "texts must be"), (dict(texts="one text"), "texts must be"), (dict(kind="tree"), "kind must be"),
    (dict(features=("key", "hidden")), "features must be"), (dict(horizon=0), "horizon must be"),
    (dict(loss="l1"), "loss must be"), (dict(held_out=1.0), "held_out must be"), (dict(steps=0), "steps must be"),
    (dict(reduce="sum"), "reduce must be"), (dict(texts=[[1, 2, 3], [1, 999]]), "texts\\[1\\] must be"),
])
def test_train_scorer_rejects_bad_inputs(tiny, kwargs, match):
    kwargs = dict(dict(texts=4, n_tokens=64, steps=2, progress=False), **kwargs)
    with pytest.raises(kvjax.errors.InputError, match=match):
        kvjax.train_scorer(tiny, **kwargs)


def test_learned_rejects_bad_sources(tmp_path, trained):
    with pytest.raises(P.PolicyError, match="not a saved scorer"):
        P.Learned(str(tmp_path), budget=8)
    with pytest.raises(P.PolicyError, match="needs a TrainedScorer"):
        P.Learned(3, budget=8)
    with pytest.raises(P.PolicyError, match="window \\+ sinks"):
        P.Learned(trained[0], budget=8, window=8, sinks=4)
    (tmp_path / "scorer.json").write_text("{}")
    (tmp_path / "params").mkdir()
    with pytest.raises(P.PolicyError, match="malformed scorer metadata"):
        P.Learned(str(tmp_path), budget=8)
    assert isinstance(P.make("learned", source=trained[0], budget=40), P.Learned)
    with pytest.raises(ScorerError):
        load_scorer(tmp_path)


def test_the_committed_scorer_fits_the_embedded_model(smollm2_dir):
    import pathlib

    from kvjax.learned.store import check_fits
    from kvjax.models import ModelConfig

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "scorers" / "smollm2-135m"
    scorer = load_scorer(path)
    check_fits(scorer.meta, ModelConfig.from_file(smollm2_dir))
    assert scorer.meta.model == "smollm2-135m" and scorer.meta.train["total_seconds"] <= 15 * 60
    assert scorer.history[-1]["held_out"] < scorer.history[0]["held_out"]


class _Words:
    """A whitespace tokenizer with a BOS (kvjax.eval.fitting.Encoder)."""

    def encode(self, text):
        return [0] + [1 + len(w) for w in text.split()]


def test_fact_essays_hold_their_answers_fit_and_stay_apart_from_the_needle_test():
    import random
    import warnings

    from kvjax.learned.texts import default_texts, fact_essay, fact_samples

    tok = _Words()
    for seed in range(6):
        text, answers = fact_essay(tok, 300, random.Random(seed), corpus="generated")
        assert text == fact_essay(tok, 300, random.Random(seed), corpus="generated")[0]  # seeded
        assert 250 <= len(tok.encode(text)) <= 300 and 1 <= len(answers) <= 2
        assert all(a in text for a in answers) and text.endswith(("is", "in", "order", "extension", "room"))
        assert "special magic" not in text  # not RULER's needle
    (s,) = fact_samples(tok, 1, 300, seed=4, corpus="generated")
    assert s.task == "facts" and s.answers[0] in s.context and s.answers[0] not in s.question
    assert s.question.startswith(" ") and 0.0 <= s.depth <= 1.0 and s.context_tokens < s.n_tokens <= 300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generated prose where the essays are not installed
        texts = default_texts(tok, 8, 200, seed=1)
    assert len(texts) == 8 and texts == default_texts(tok, 8, 200, seed=1)
    assert [t.endswith(("is", "in", "order", "extension", "room")) for t in texts[:3:2]] == [True, True]


def test_the_learned_benchmark_names_its_results_per_model():
    """benchmarks/learned_quality.py (imported by path): one results file per model, SmolLM2's name kept,
    dots in a model's name kept (not taken for a suffix)."""
    import importlib.util
    import pathlib
    import sys

    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("learned_quality_bench", bench / "learned_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = pathlib.Path("benchmarks/results")
    assert mod.result_paths("smollm2-135m") == (res / "learned_smollm2.json", res / "learned_smollm2.md")
    assert mod.result_paths("qwen2.5-0.5b") == (res / "learned_qwen2.5-0.5b.json", res / "learned_qwen2.5-0.5b.md")
    assert mod.result_paths("qwen2.5-0.5b", "/tmp/x.y") == (pathlib.Path("/tmp/x.y.json"), pathlib.Path("/tmp/x.y.md"))


def test_the_committed_qwen_scorer_is_for_qwen():
    """configs/scorers/qwen2.5-0.5b without the model (make test does not install it): its identity,
    shapes, the 15-minute budget and a held-out loss that fell."""
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "scorers" / "qwen2.5-0.5b"
    scorer = load_scorer(path)
    m = scorer.meta
    assert (m.model, m.architecture, m.num_layers, m.num_kv_heads, m.head_dim) == ("qwen2.5-0.5b", "qwen2", 24, 2, 64)
    assert m.train["total_seconds"] <= 15 * 60 and m.train["n_tokens"] == 2048
    assert scorer.history[-1]["held_out"] < scorer.history[0]["held_out"]
