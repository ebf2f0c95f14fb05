"""The quality study's grid: models' defaults, policies at ratio budgets, and the paired comparisons.

Budgets are ratios of the compressed text (the prompt query-aware, the context query-agnostic), so a
policy at ratio r keeps round(r * n) tokens per KV head on average over layers, window included
(kvjax resolves a float budget per sequence; every sample here has exactly n tokens). Windowed
policies (SnapKV, PyramidKV, Ada-KV, CAKE, Profiled, and H2O's recent window) share one window,
32 by default, so Profiled's per-layer budgets and uniform SnapKV differ only in their split.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from kvjax import policies as P
from kvjax.compress import make_plan

#: policies run only when asked for (--policies): the learned scorer needs a trained model per model
EXTRA_POLICIES = ("Learned", "AdaKV(Learned)")
#: the trained scorers of `Learned` rows (scripts/train_scorer.py), one folder per model name
SCORERS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "scorers"

#: every policy of the study, in table order ("Full" is the reference, always run)
POLICIES = ("StreamingLLM", "KNorm", "SnapKV", "PyramidKV(kvpress)", "PyramidKV(paper)", "H2O", "TOVA",
            "AdaKV(SnapKV)", "AdaKV(PyramidKV)", "CAKE", "RoCo", "Profiled", "AdaKV(Profiled)")
RATIOS = (0.05, 0.1, 0.25, 0.5)
MODES = ("aware", "agnostic")

#: (seed method, its baseline): the paired tests of issue 14. PyramidKV is the repository's split
#: ("paper"); kvpress's split falls back to uniform budgets whenever its smallest layer would not
#: cover the window, and is compared too.
COMPARISONS = (
    ("AdaKV(SnapKV)", "SnapKV"),
    ("AdaKV(PyramidKV)", "PyramidKV(paper)"),
    ("CAKE", "PyramidKV(paper)"),
    ("CAKE", "PyramidKV(kvpress)"),
    ("Profiled", "SnapKV"),
    ("AdaKV(Profiled)", "Profiled"),
    ("RoCo", "H2O"),
)
#: the reference policy: no eviction, no ratio
FULL = "Full"
#: comparisons the documents quote beyond the claims above, printed unadjusted where both ran
#: (`quality.py --pairs` adds others): the learned scorer against the best hand-written policies,
#: CAKE against its scorer's uniform split and XKV's profiled split, the best rows against the full cache
SECONDARY = (
    ("AdaKV(Learned)", "CAKE"),
    ("Learned", "CAKE"),
    ("AdaKV(Learned)", "Learned"),
    ("AdaKV(Learned)", "SnapKV"),
    ("CAKE", "SnapKV"),
    ("CAKE", "Profiled"),
    ("CAKE", "AdaKV(Profiled)"),
    ("CAKE", FULL),
    ("AdaKV(Learned)", FULL),
)


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    lengths: tuple[int, ...]
    samples: int          # per (task, length): 6 tasks x lengths x samples >= 50 prompts per comparison cell
    batch_tokens: int     # prompt tokens per batch (decoding costs about the same per step up to ~8 rows)
    ppl_length: int       # tokens of each perplexity text
    ppl_texts: int


MODELS = {
    "smollm2-135m": ModelDefaults(lengths=(2048, 4096, 6144), samples=3, batch_tokens=24576, ppl_length=2048,
                                  ppl_texts=4),
    "qwen2.5-0.5b": ModelDefaults(lengths=(4096, 8192), samples=5, batch_tokens=32768, ppl_length=4096,
                                  ppl_texts=4),
}


def ratio_tokens(ratio: float, n: int) -> int:
    """Tokens per head a ratio budget gives a text of n tokens, as kvjax resolves it
    (kvjax.compress.step.resolve_budget: round(float32(ratio) * n), at least 1)."""
    return max(int(np.round(np.float32(ratio) * np.int32(n))), 1)


def profile_total(ratio: float, n: int, num_layers: int) -> int:
    """The total (tokens per KV head summed over layers) of a ratio budget: uniform SnapKV's sum."""
    return num_layers * ratio_tokens(ratio, n)


def window_for(ratio: float, shortest: int, window: int) -> int:
    """The shared window, shrunk to half the smallest budget when a budget would not hold it."""
    return max(2, min(window, ratio_tokens(ratio, shortest) // 2))


def split_top(s: str) -> list[str]:
    """Split a comma list on commas outside parentheses and brackets ("AdaKV(SnapKV),CAKE[kernel=9,gamma=100]")."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out if x.strip()]


def split_options(name: str) -> tuple[str, str]:
    """`"SnapKV[kernel=9,group_reduce=max]"` -> `("SnapKV", "kernel=9,group_reduce=max")`; no brackets: `""`."""
    plain, _, rest = name.partition("[")
    return plain, rest[:-1] if rest.endswith("]") else rest


def base_name(name: str) -> str:
    """The scorer family of a grid name: AdaKV(X) -> X, options dropped."""
    name = split_options(name)[0]
    return name[len("AdaKV("):-1] if name.startswith("AdaKV(") else name


def known_policy(name: str) -> bool:
    """A grid name: one of POLICIES / EXTRA_POLICIES, optionally with `[field=value,...]` options."""
    return split_options(name)[0] in POLICIES + EXTRA_POLICIES


def _option_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_options(name: str, cls):
    """A grid name's `[field=value,...]` as {field: value} for the policy class `cls`: (changes, None),
    or (None, why not). No brackets: ({}, None)."""
    if "[" not in name:
        return {}, None
    _, opts = split_options(name)
    if not (opts and name.endswith("]")):
        return None, f"options must be written NAME[field=value,...], got {name!r}"
    fields = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for item in opts.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            return None, f"option {item!r} of {name!r}: expected field=value with a field of {cls.__name__} {sorted(fields)}"
        changes[key] = _option_value(value)
    return changes, None


def check_options(name: str, window: int) -> str | None:
    """Why a grid name's options are wrong, or None: before anything loads. Names that need a profile
    or a trained scorer to be built have their option names checked against the policy's fields."""
    if "[" not in name:
        return None
    base = base_name(name)
    if base in ("Profiled", "Learned"):
        cls = P.AdaKV if split_options(name)[0].startswith("AdaKV(") else getattr(P, base)
        return _parse_options(name, cls)[1]
    return make_policy(name, 0.25, window=window)[1]


def with_options(pol, name: str):
    """Apply a grid name's `[field=value,...]` options to the policy it built (dataclasses.replace,
    so the library validates the values). Returns (policy, None) or (None, why not)."""
    changes, why = _parse_options(name, type(pol))
    if not changes:
        return (pol, None) if why is None else (None, why)
    try:
        return dataclasses.replace(pol, **changes), None
    except Exception as e:  # noqa: BLE001 - the library's own message names the bad option
        return None, f"{name!r}: {type(e).__name__}: {e}"


def make_policy(name: str, ratio: float, *, window: int, profile=None, model: str | None = None):
    """The policy `name` at a ratio budget. `profile`: the BudgetProfile for Profiled (its total is
    the ratio's total at this length); `model`: the model's name, for Learned's trained scorer
    (SCORERS / model; not in POLICIES: ask for "Learned" or "AdaKV(Learned)" with --policies).
    `name` may carry options, `CAKE[kernel=9]`: fields of the built policy (AdaKV's own for AdaKV(X)).
    Returns (policy, None) or (None, why it cannot be built)."""
    if name == FULL:
        return P.Full(), None
    plain, _ = split_options(name)
    base = base_name(name)
    try:
        if base == "StreamingLLM":
            pol = P.StreamingLLM(budget=ratio, sinks=4)
        elif base in ("KNorm", "TOVA"):
            pol = getattr(P, base)(budget=ratio)
        elif base == "RoCo":
            pol = P.RoCo(budget=ratio, chunk=32)  # EasyKV's defaults (recent 10, sinks 4); chunk 32 as stored
        elif base == "SnapKV":
            pol = P.SnapKV(budget=ratio, window=window)
        elif base.startswith("PyramidKV"):  # "PyramidKV(kvpress)", "PyramidKV(paper)"; Ada-KV's: the paper's
            style = base[len("PyramidKV("):-1] if base.startswith("PyramidKV(") else "paper"
            pol = P.PyramidKV(budget=ratio, window=window, style=style)
        elif base == "H2O":
            pol = P.H2O(budget=ratio, recent=window)
        elif base == "CAKE":
            pol = P.CAKE(budget=ratio, window=window)
        elif base == "Learned":
            if model is None or not (SCORERS / model).is_dir():
                return None, f"no trained scorer for model {model!r} in {SCORERS}"
            pol = P.Learned(SCORERS / model, budget=ratio, window=window)
        elif base == "Profiled":
            if profile is None:
                return None, "no profile for this (length, ratio)"
            pol = P.Profiled(profile, window=window)
        else:
            return None, f"unknown policy {name!r}; known: {POLICIES}"
        if plain.startswith("AdaKV("):
            pol = P.AdaKV(pol)
    except Exception as e:  # noqa: BLE001 - a policy the library refuses is reported, not fatal
        return None, f"{type(e).__name__}: {e}"
    return with_options(pol, name)


def needs_profile(name: str) -> bool:
    return base_name(name) == "Profiled"


def chunked(name: str) -> bool:
    """Policies whose prefill streams the prompt through the compressed cache: no shared prompt pass."""
    return base_name(name) == "RoCo"


def pool_bytes(policy, config, bucket: int, headroom: int, batch: int, itemsize: int = 4) -> int:
    """Bytes of one policy's pool for a batch, from kvjax's own plan (keys, values, positions and
    two running statistics per slot)."""
    plan = make_plan(policy, config, bucket, headroom)
    return batch * plan.layout.pool_size * (2 * config.head_dim * itemsize + 12)


def groups(cells, sizes, limit_bytes: int):
    """Split cells into consecutive groups whose pools (`sizes`, bytes per cell) fit `limit_bytes`
    together: one shared prompt pass each. A cell larger than the limit gets a group of its own."""
    out, cur, total = [], [], 0
    for cell, b in zip(cells, sizes):
        if cur and total + b > limit_bytes:
            out.append(cur)
            cur, total = [], 0
        cur.append(cell)
        total += b
    if cur:
        out.append(cur)
    return out
