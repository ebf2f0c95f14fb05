"""XKV: the budget solver against brute force, the profiler's retention curves against numpy, the
Profiled policy's budgets in the cache (alone and under Ada-KV), errors, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kvjax
from conftest import save_tiny_hf, torch_or_skip
from kvjax import policies as P
from kvjax.xkv.budgets import BudgetProfile, ProfileError, default_path, load_profile
from kvjax.xkv.solver import brute_force_layer_budgets, greedy_is_exact, solve, solve_layer_budgets
from kvjax.eval.synthetic import KINDS, sample_prompts
from kvjax.policies.profiled import Profiled
from kvjax.xkv.profile import profile, retention_curves
from test_generate import _prompt, _tiny_params

# ------------------------------------------------------------------------------------------------
# solver


def _concave_instance(rng):
    """Equal-step grid, concave non-decreasing curves (some flat tails): the greedy path."""
    layers, n_sizes = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    step, first = int(rng.integers(1, 5)), int(rng.integers(0, 4))
    sizes = first + step * np.arange(n_sizes)
    gains = -np.sort(-rng.random((layers, n_sizes - 1)), axis=1)  # non-increasing gains
    gains[rng.random(gains.shape) < 0.2] = 0.0
    gains = -np.sort(-gains, axis=1)
    base = rng.random((layers, 1))
    curves = np.concatenate([base, base + np.cumsum(gains, axis=1)], axis=1)
    total = int(layers * sizes[0] + rng.integers(0, layers * sizes[-1] + 3))
    return curves, sizes, total


def _arbitrary_instance(rng):
    """Uneven grid, random curves: the DP path."""
    layers, n_sizes = int(rng.integers(1, 5)), int(rng.integers(2, 6))
    sizes = np.sort(rng.choice(24, n_sizes, replace=False))
    curves = rng.random((layers, n_sizes)) * rng.choice([1.0, 10.0])
    total = int(layers * sizes[0] + rng.integers(0, layers * sizes[-1] + 3))
    return curves, sizes, total


def test_greedy_solver_equals_brute_force_on_concave_curves():
    rng = np.random.default_rng(0)
    for _ in range(200):
        curves, sizes, total = _concave_instance(rng)
        assert greedy_is_exact(curves, sizes)
        got, ref = solve(curves, sizes, total), brute_force_layer_budgets(curves, sizes, total)
        assert got.method == "greedy"
        assert got.budgets.sum() <= total
        assert set(got.budgets.tolist()) <= set(sizes.tolist())
        np.testing.assert_allclose(got.value, ref.value, rtol=0, atol=1e-9)
        np.testing.assert_allclose(solve(curves, sizes, total, method="dp").value, ref.value, atol=1e-9)


def test_dp_solver_equals_brute_force_on_arbitrary_curves():
    rng = np.random.default_rng(1)
    methods = set()
    for _ in range(200):
        curves, sizes, total = _arbitrary_instance(rng)
        got, ref = solve(curves, sizes, total), brute_force_layer_budgets(curves, sizes, total)
        methods.add(got.method)
        assert got.budgets.sum() <= total
        np.testing.assert_allclose(got.value, ref.value, rtol=0, atol=1e-9)
        np.testing.assert_allclose(curves[np.arange(len(curves)), got.choice].sum(), got.value)
    assert "dp" in methods


def test_auto_avoids_greedy_where_greedy_is_wrong():
    # layer 1 gains nothing for one step, then a lot: greedy marginal gain would buy layer 0's step
    curves = np.array([[0.0, 0.4, 0.5], [0.0, 0.0, 1.0]])
    sizes = np.array([0, 1, 2])
    sol = solve(curves, sizes, 2)
    assert sol.method == "dp" and sol.budgets.tolist() == [0, 2] and sol.value == 1.0
    assert solve_layer_budgets(curves, sizes, 2).tolist() == [0, 2]
    with pytest.raises(ValueError, match="greedy is only exact"):
        solve(curves, sizes, 2, method="greedy")
    # equal gains but uneven steps: buying by gain alone overspends, so not greedy either
    assert not greedy_is_exact([[0.0, 1.0, 2.0]], [0, 1, 3])


@pytest.mark.parametrize(
    "curves,sizes,total,match",
    [
        (np.zeros((3, 2)), [4, 8], 11, "below 3 layers x the smallest size"),
        (np.zeros((3, 2)), [4, 8, 12], 40, "sizes must have shape"),
        (np.zeros((3, 2)), [8, 4], 40, "strictly ascending"),
        (np.zeros((3, 2)), [4.0, 8.0], 40, "integers"),
        (np.zeros(3), [4], 40, r"shape \[L, S\]"),
        (np.full((2, 2), np.nan), [4, 8], 40, "finite"),
        (np.zeros((2, 2)), [4, 8], 40.5, "total must be an int"),
    ],
)
def test_solver_rejects_bad_inputs(curves, sizes, total, match):
    with pytest.raises(ValueError, match=match):
        solve_layer_budgets(curves, sizes, total)


# ------------------------------------------------------------------------------------------------
# retention curves and the profiler


def _numpy_retention(probs, lengths, window, sizes, metric, kernel=5):
    """The module docstring's definition, one sequence and head at a time."""
    b, h, g, w, t = probs.shape
    out = np.zeros((b, h, len(sizes)))
    for i in range(b):
        n = lengths[i] - window
        p = probs[i][..., :n].astype(np.float64)  # [H, G, w, n] prefix columns
        if metric == "mass":
            rank = p[:, :, : w // 2].mean(axis=2)
            padded = np.pad(rank, [(0, 0), (0, 0), (kernel // 2, kernel - 1 - kernel // 2)])
            rank = sum(padded[..., k : k + n] for k in range(kernel)) / kernel
            rank = rank.mean(axis=1)
            measured = p[:, :, w // 2 :].mean(axis=(1, 2))
        else:
            measured = p.mean(axis=(1, 2))
            rank = measured
        for j in range(h):
            order = np.argsort(-rank[j], kind="stable")
            kept = np.concatenate([[0.0], np.cumsum(measured[j][order])])
            out[i, j] = kept[np.minimum(sizes, n)]
    return out


@pytest.mark.parametrize("metric", ["mass", "oracle"])
def test_retention_curves_equal_the_numpy_definition(metric):
    rng = np.random.default_rng(2)
    b, h, g, w, t = 2, 3, 2, 8, 40
    lengths = np.array([40, 29])
    logits = rng.normal(size=(b, h, g, w, t)) * 3
    valid = np.arange(t)[None, :] < lengths[:, None]
    logits = np.where(valid[:, None, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    sizes = (0, 3, 7, 20, 32, 50)
    got = np.asarray(retention_curves(probs, lengths, w, sizes, metric, 5, "avg"))
    np.testing.assert_allclose(got, _numpy_retention(probs, lengths, w, np.array(sizes), metric), atol=1e-6)
    assert (np.diff(got, axis=-1) >= -1e-7).all() and (got[..., -1] < 1.0).all()  # the window holds the rest


@pytest.fixture(scope="module")
def tiny():
    return _tiny_params(num_hidden_layers=3)


def test_profile_is_reproducible_and_seeded(tiny, tmp_path):
    a = profile(tiny, 2, 3 * 40, window=8, n_tokens=160, seed=0)
    b = profile(tiny, 2, 3 * 40, window=8, n_tokens=160, seed=0)
    c = profile(tiny, 2, 3 * 40, window=8, n_tokens=160, seed=1)
    assert a.to_json() == b.to_json()
    assert a.curves != c.curves  # other sampled prompts
    assert len(a.budgets) == 3 and sum(a.budgets) <= 3 * 40 and min(a.budgets) >= 8
    assert a.solver == ("greedy" if greedy_is_exact(a.curves, a.sizes) else "dp")
    assert a.metric == "mass" and a.prompt_lengths == (160, 160) and a.num_kv_heads == 2
    assert all(bud - 8 in a.sizes for bud in a.budgets)
    curves = np.asarray(a.curves)
    assert curves.shape == (3, len(a.sizes)) and (curves[:, 0] == 0).all() and (curves[:, -1] > curves[:, 1]).all()
    # the recorded retention is the optimum of the recorded curves
    assert len(a.sizes) ** 3 < 10**5
    np.testing.assert_allclose(a.retention, brute_force_layer_budgets(curves, a.sizes, 3 * 32).value, rtol=1e-12)
    chosen = [a.sizes.index(bud - 8) for bud in a.budgets]
    np.testing.assert_allclose(a.retention, curves[np.arange(3), chosen].sum(), rtol=1e-12)
    path = a.save(tmp_path / "p.json")
    assert load_profile(path) == a and path.read_text() == a.to_json()


def test_profile_oracle_curves_are_concave_so_greedy_runs(tiny):
    prof = profile(tiny, 1, 3 * 40, window=8, n_tokens=128, metric="oracle", sizes=range(0, 90, 10))
    assert prof.solver == "greedy" and prof.sizes == tuple(range(0, 90, 10))
    assert greedy_is_exact(prof.curves, prof.sizes)


class _WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word."""

    def encode(self, text, add_special_tokens=True):
        return [sum(map(ord, w)) % 256 for w in text.split()]


def test_profile_encodes_sampled_text_prompts(tiny):
    params = kvjax.Params(tiny.config, tiny.weights, tokenizer=_WordTokenizer())
    prompts = sample_prompts(params.tokenizer, 2, 150, seed=3)
    from_text = profile(params, prompts, 3 * 40, window=8, seed=3)
    drawn = profile(params, 2, 3 * 40, window=8, n_tokens=150, seed=3)  # the same prompts, drawn inside
    assert from_text.curves == drawn.curves and from_text.prompt_lengths == drawn.prompt_lengths


def test_sample_prompts_are_seeded_varied_and_about_the_length():
    tok = _WordTokenizer()
    a, b = sample_prompts(tok, 5, 400, seed=0), sample_prompts(tok, 5, 400, seed=0)
    assert a == b and a != sample_prompts(tok, 5, 400, seed=1)
    markers = {"passkey": "pass key", "records": "Record 0:", "story": "kept a", "code": "def ", "ledger": "On day 1,"}
    assert len(KINDS) == 5 and all(any(markers[k] in p for p in a) for k in KINDS)
    assert all(abs(len(tok.encode(p)) - 400) <= 40 for p in a)


def test_profile_rejects_bad_options(tiny):
    with pytest.raises(ValueError, match="below 3 layers x window"):
        profile(tiny, 1, 3 * 8 - 1, window=8, n_tokens=64)
    with pytest.raises(ValueError, match="at least 2 x window"):
        profile(tiny, [_prompt(20)], 3 * 40, window=16)
    with pytest.raises(ValueError, match="metric"):
        profile(tiny, 1, 3 * 40, window=8, metric="kl")
    with pytest.raises(ValueError, match="no tokenizer"):
        profile(tiny, ["some text"], 3 * 40, window=8)
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        profile(tiny, 1, 3 * 40, window=1)


# ------------------------------------------------------------------------------------------------
# the policy


def _handmade(budgets, window=8, model="tiny", config=None):
    """A profile written by hand for `config` (the `tiny` fixture's model by default)."""
    from kvjax.xkv.budgets import config_hash

    config = config if config is not None else _tiny_params(num_hidden_layers=3).config
    sizes = tuple(range(0, 100, 4))
    return BudgetProfile(
        model=model, total=sum(budgets), window=window, budgets=tuple(budgets), sizes=sizes,
        curves=tuple(tuple(float(s) / 100 for s in sizes) for _ in budgets), solver="dp", metric="mass", seed=0,
        num_prompts=1, prompt_lengths=(512,), num_kv_heads=2, retention=1.0, architecture=config.model_type,
        config_hash=config_hash(config),
    )


def test_profiled_keeps_each_layer_at_its_profiled_budget(tiny, tmp_path):
    path = _handmade((40, 16, 72)).save(tmp_path / "b.json")
    pre = kvjax.prefill(tiny, [_prompt(300, 1)], Profiled(str(path)), max_new_tokens=4)
    lengths = np.asarray(pre.cache.streams.length)[:, 0]  # [L, H]
    np.testing.assert_array_equal(lengths, [[40, 40], [16, 16], [72, 72]])
    # every kept set still holds the window (the last 8 prompt positions)
    for layer in kvjax.kept_positions(pre.cache):
        for head in layer[0]:
            assert set(range(292, 300)) <= set(np.asarray(head).tolist())


def test_profiled_with_equal_budgets_is_snapkv(tiny):
    prompt = [_prompt(250, 5)]
    prof = kvjax.prefill(tiny, prompt, Profiled(_handmade((48, 48, 48)), kernel=3), max_new_tokens=4)
    snap = kvjax.prefill(tiny, prompt, P.SnapKV(budget=48, window=8, kernel=3), max_new_tokens=4)
    for la, lb in zip(kvjax.kept_positions(prof.cache), kvjax.kept_positions(snap.cache)):
        for a, b in zip(la[0], lb[0]):
            np.testing.assert_array_equal(np.sort(a), np.sort(b))


def test_adakv_over_profiled_keeps_each_layer_total(tiny):
    budgets = (40, 16, 72)
    pre = kvjax.prefill(tiny, [_prompt(300, 2)], P.AdaKV(Profiled(_handmade(budgets)), alpha=0.0), max_new_tokens=4)
    lengths = np.asarray(pre.cache.streams.length)[:, 0]
    np.testing.assert_array_equal(lengths.sum(axis=1), 2 * np.asarray(budgets))  # alpha 0: exact shares
    assert (lengths[:, 0] != lengths[:, 1]).any()  # heads traded tokens


def test_profiled_from_a_real_profile_run(tiny):
    prof = profile(tiny, 1, 3 * 40, window=8, n_tokens=160)
    pre = kvjax.prefill(tiny, [_prompt(400, 3)], Profiled(prof), max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(pre.cache.streams.length)[:, 0], np.repeat(np.asarray(prof.budgets)[:, None], 2, 1))


def test_profiled_errors_are_clear(tiny, tmp_path):
    with pytest.raises(P.PolicyError, match="no budget profile at"):
        Profiled(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(P.PolicyError, match="not valid JSON"):
        Profiled(bad)
    good = _handmade((40, 16, 72)).to_dict()
    for change, match in [({"format_version": 99}, "format_version 99"), ({"budgets": [40, 16]}, "curves has 3 layers"),
                          ({"budgets": 40}, "wrong type"), ({"budgets": [40, 0, 72]}, "positive")]:
        bad.write_text(json.dumps(good | change))
        with pytest.raises(P.PolicyError, match=match):
            Profiled(bad)
    del good["curves"]
    bad.write_text(json.dumps(good))
    with pytest.raises(P.PolicyError, match=r"missing fields \['curves'\]"):
        Profiled(bad)
    with pytest.raises(P.PolicyError, match="window \\(32\\) exceeds the budget of layer 1 \\(16\\)"):
        Profiled(_handmade((40, 16, 72)), window=32)
    with pytest.raises(P.PolicyError, match="pooling"):
        Profiled(_handmade((40, 16, 72)), pooling="median")
    with pytest.raises(P.PolicyError, match="BudgetProfile or the path"):
        Profiled(42)
    with pytest.raises(P.PolicyError, match=r"made for another model: num_layers 4 \(this model: 3\)"):
        kvjax.prefill(tiny, [_prompt(100)], Profiled(_handmade((40, 16, 72, 20))))
    with pytest.raises(ProfileError):
        BudgetProfile.from_dict([1, 2])


def test_default_path():
    assert str(default_path("smollm2-135m", 3840)) == "configs/budgets/smollm2-135m-3840.json"
    assert default_path("org/model x", 64, "out").name == "org_model_x-64.json"


# ------------------------------------------------------------------------------------------------
# the command line


@pytest.mark.torch
def test_cli_profile_writes_the_budgets(tmp_path, capsys):
    torch_or_skip()
    ckpt = save_tiny_hf(tmp_path / "tiny-ckpt")
    from kvjax.cli import main

    args = ["profile", "--model", str(ckpt), "--total", "60", "--prompts", "2", "--tokens", "96", "--window", "8",
            "--seed", "4", "--out", str(tmp_path / "budgets")]
    assert main(args) == 0
    path = tmp_path / "budgets" / "tiny-ckpt-60.json"
    prof = load_profile(path)
    assert prof.model == "tiny-ckpt" and prof.total == 60 and prof.seed == 4 and prof.num_prompts == 2
    assert len(prof.budgets) == 2 and sum(prof.budgets) <= 60 and min(prof.budgets) >= 8
    out = capsys.readouterr().out
    assert " ".join(f"{l}:{b}" for l, b in enumerate(prof.budgets)) in out and str(path) in out
    first = path.read_text()
    assert main(args) == 2  # an existing file is not overwritten without --force
    assert main(args + ["--force"]) == 0 and path.read_text() == first  # seeded: the same file again
