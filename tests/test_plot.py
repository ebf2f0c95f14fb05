"""kvjax.plot: the drawn artists hold the data given (Agg backend; skipped without matplotlib)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import kvjax
from kvjax import plot


@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def _png(ax, path):
    ax.figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def adakv_generation():
    """Ada-KV on a tiny random Llama, two prompts of different lengths."""
    from test_generate import _tiny_params

    params = _tiny_params()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).astype(np.int32) for n in (50, 37)]
    policy = kvjax.policies.AdaKV(kvjax.policies.SnapKV(budget=16, window=4), alpha=0.2)
    return kvjax.generate(params, prompts, policy=policy, max_new_tokens=3)


# ----------------------------------------------------------------------------------------------
# budgets_heatmap


def test_budgets_heatmap_image_is_the_layer_by_head_budgets(plt, tmp_path):
    budgets = np.array([[10, 20, 30], [40, 50, 60]])
    ax = plot.budgets_heatmap(budgets, title="mine")
    np.testing.assert_array_equal(ax.images[0].get_array(), budgets)
    assert ax.get_title() == "mine" and ax.get_ylabel() == "layer" and ax.get_xlabel() == "KV head"
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for v in budgets.ravel())
    _png(ax, tmp_path / "budgets.png")


def test_budgets_heatmap_of_a_generation_shows_the_chosen_sequence(plt, adakv_generation, tmp_path):
    want = np.asarray(adakv_generation.stats["layer_budgets"])  # [B, L, H]
    assert want.shape == (2, 2, 2) and not np.array_equal(want[0], want[1])  # Ada-KV: uneven per prompt
    fig, axes = plt.subplots(1, 2)
    for b, ax in enumerate(axes):
        assert plot.budgets_heatmap(adakv_generation, sequence=b, ax=ax) is ax
        np.testing.assert_array_equal(ax.images[0].get_array(), want[b])
    np.testing.assert_array_equal(plot.budgets_heatmap(adakv_generation.cache, sequence=1).images[0].get_array(),
                                  np.asarray(adakv_generation.cache.streams.budget)[:, 1])
    _png(axes[0], tmp_path / "generation_budgets.png")


def test_budgets_heatmap_rejects_bad_shapes_and_values(plt):
    with pytest.raises(ValueError, match=r"budgets must be \[L, H\] or \[B, L, H\], got shape \(4,\)"):
        plot.budgets_heatmap(np.ones(4))
    with pytest.raises(ValueError, match="sequence=2 is not a sequence index of this batch of 2"):
        plot.budgets_heatmap(np.ones((2, 3, 4)), sequence=2)
    with pytest.raises(ValueError, match="finite and non-negative"):
        plot.budgets_heatmap(np.array([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="numeric"):
        plot.budgets_heatmap([["a", "b"]])


# ----------------------------------------------------------------------------------------------
# kept_positions_raster


KEPT = [  # [layer][sequence][kv_head]
    [[np.array([0, 3, 7]), np.array([1, 2])], [np.array([5]), np.array([], np.int64)]],
    [[np.array([4, 9, 12]), np.array([0])], [np.array([2, 6]), np.array([8])]],
]


def test_kept_positions_raster_offsets_are_positions_by_row(plt, tmp_path):
    ax = plot.kept_positions_raster(KEPT, prompt_len=10, layers=[1, 0])
    offsets = np.asarray(ax.collections[0].get_offsets())
    rows = [(1, 0), (1, 1), (0, 0), (0, 1)]
    want = [(p, r) for r, (layer, head) in enumerate(rows) for p in KEPT[layer][0][head]]
    np.testing.assert_array_equal(offsets, np.asarray(want, np.float64))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L1 H0", "L1 H1", "L0 H0", "L0 H1"]
    # the prompt ends before position 10; position 12 (a generated token) widens the x range
    assert ax.lines[0].get_xdata()[0] == 9.5 and ax.get_xlim() == (-0.5, 12.5)
    _png(ax, tmp_path / "kept.png")


def test_kept_positions_raster_picks_the_sequence_and_heads(plt):
    ax = plot.kept_positions_raster(KEPT, sequence=1, heads=1)
    offsets = np.asarray(ax.collections[0].get_offsets())
    np.testing.assert_array_equal(offsets, [[8.0, 1.0]])  # layer 0 head 1 is empty in sequence 1
    assert not ax.lines  # no prompt length given: no prompt-end line


def test_kept_positions_raster_of_a_generation_equals_kept_positions(plt, adakv_generation, tmp_path):
    kept = kvjax.kept_positions(adakv_generation.cache)
    ax = plot.kept_positions_raster(adakv_generation, sequence=1)
    offsets = np.asarray(ax.collections[0].get_offsets())
    want = np.concatenate([kept[layer][1][head] for layer in range(2) for head in range(2)])
    np.testing.assert_array_equal(offsets[:, 0], want)
    counts = [len(kept[layer][1][head]) for layer in range(2) for head in range(2)]
    np.testing.assert_array_equal(offsets[:, 1], np.repeat(np.arange(4), counts))
    prompt_len = adakv_generation.stats["prompt_lengths"][1]
    assert ax.lines[0].get_xdata()[0] == prompt_len - 0.5
    _png(ax, tmp_path / "generation_kept.png")


def test_kept_positions_raster_rejects_bad_indices_and_structure(plt):
    with pytest.raises(ValueError, match=r"layers=\[0, 2\]: 2 is not an index in \[0, 2\)"):
        plot.kept_positions_raster(KEPT, layers=[0, 2])
    with pytest.raises(ValueError, match=r"heads=-1: -1 is not an index in \[0, 2\)"):
        plot.kept_positions_raster(KEPT, heads=-1)
    with pytest.raises(ValueError, match="sequence=3 is not a sequence index of this batch of 2"):
        plot.kept_positions_raster(KEPT, sequence=3)
    with pytest.raises(ValueError, match="prompt_len must be a positive int, got 0"):
        plot.kept_positions_raster(KEPT, prompt_len=0)
    with pytest.raises(ValueError, match="different numbers of sequences"):
        plot.kept_positions_raster([KEPT[0], KEPT[1][:1]])
    with pytest.raises(ValueError, match=r"kept\[0\]\[0\]\[1\] must be a 1-D array of non-negative int"):
        plot.kept_positions_raster([[[np.array([1]), np.array([0.5])]]])


# ----------------------------------------------------------------------------------------------
# accuracy_vs_budget


RESULTS = [
    {"policy": "SnapKV", "budget": 128, "accuracy": 0.8, "ci_low": 0.7, "ci_high": 0.9},
    {"policy": "SnapKV", "budget": 32, "accuracy": 0.4, "ci_low": 0.3, "ci_high": 0.55},
    {"policy": "H2O", "budget": 32, "accuracy": 0.2},
    {"policy": "SnapKV", "budget": 64, "accuracy": 0.6, "ci_low": 0.5, "ci_high": 0.65},
    {"policy": "H2O", "budget": 128, "accuracy": 0.5},
]


def test_accuracy_vs_budget_draws_one_sorted_curve_per_policy_with_bands(plt, tmp_path):
    ax = plot.accuracy_vs_budget(RESULTS, xscale="log")
    snap, h2o = ax.lines
    assert [snap.get_label(), h2o.get_label()] == ["SnapKV", "H2O"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SnapKV", "H2O"]
    np.testing.assert_array_equal(snap.get_xdata(), [32, 64, 128])
    np.testing.assert_array_equal(snap.get_ydata(), [0.4, 0.6, 0.8])
    np.testing.assert_array_equal(h2o.get_xdata(), [32, 128])
    np.testing.assert_array_equal(h2o.get_ydata(), [0.2, 0.5])
    (band,) = ax.collections  # only SnapKV has intervals
    vertices = band.get_paths()[0].vertices
    for x, lo, hi in [(32, 0.3, 0.55), (64, 0.5, 0.65), (128, 0.7, 0.9)]:
        at_x = vertices[np.isclose(vertices[:, 0], x), 1]
        assert np.isclose(at_x.min(), lo) and np.isclose(at_x.max(), hi)
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64", "128"]
    _png(ax, tmp_path / "accuracy.png")


@pytest.mark.parametrize("results,message", [
    ([], "non-empty list"),
    ([{"policy": "A", "budget": 8}], r"results\[0\] lacks 'accuracy'"),
    ([{"policy": "A", "budget": 8, "accuracy": "high"}], r"results\[0\]\['accuracy'\] must be a finite number"),
    ([{"policy": "A", "budget": 8, "accuracy": 0.5}, {"policy": "A", "budget": 8, "accuracy": 0.6}],
     "policy 'A' has budget 8 twice"),
    ([{"policy": "A", "budget": 8, "accuracy": 0.5, "ci_low": 0.4}], "only one of 'ci_low' and 'ci_high'"),
    ([{"policy": "A", "budget": 8, "accuracy": 0.5, "ci_low": 0.6, "ci_high": 0.7}],
     r"interval \[0.6, 0.7\] does not contain accuracy 0.5"),
    ([{"policy": "A", "budget": 8, "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.7},
      {"policy": "A", "budget": 16, "accuracy": 0.6}], "confidence intervals for some budgets, not all"),
])
def test_accuracy_vs_budget_rejects_malformed_results(plt, results, message):
    with pytest.raises(ValueError, match=message):
        plot.accuracy_vs_budget(results)


# ----------------------------------------------------------------------------------------------
# matplotlib stays optional


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib.pyplot` fail
    with pytest.raises(ImportError, match=r"pip install kvjax\[plot\]"):
        plot.budgets_heatmap(np.ones((2, 2)))


def test_importing_kvjax_plot_does_not_import_matplotlib():
    code = "import sys, kvjax, kvjax.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
