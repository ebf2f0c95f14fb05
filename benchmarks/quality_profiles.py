"""XKV profiles for the quality study: one per (model, length, ratio), made with kvjax.profile and cached.

A ratio budget r on a text of n tokens gives uniform SnapKV round(r * n) tokens per KV head in every
layer, L * round(r * n) in all: Profiled gets the same total, split over the layers by its profile.
So every (length, ratio) pair needs its own profile:

    kvjax.profile(params, n_prompts, total_budget=L * round(r * n), window=w, seed=s, n_tokens=n)

The prompts are kvjax's seeded synthetic prompts (kvjax.eval.synthetic: records, stories, code,
ledgers, pass keys), not the study's tasks, so the profile is made offline on other text, as XKV
intends. Profiles are written to benchmarks/results/profiles/<model>-n<n>-total<T>-w<w>-s<s>-p<k>.json
and read back on later runs (Profiled checks that a profile fits the model).
"""

from __future__ import annotations

import pathlib
import time

import kvjax
from kvjax.xkv.budgets import load_profile

from quality_grid import profile_total

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILE_DIR = ROOT / "benchmarks" / "results" / "profiles"


def profile_path(model: str, n_tokens: int, total: int, window: int, seed: int, n_prompts: int,
                 folder=PROFILE_DIR) -> pathlib.Path:
    return pathlib.Path(folder) / f"{model}-n{n_tokens}-total{total}-w{window}-s{seed}-p{n_prompts}.json"


def get_profile(params, model: str, n_tokens: int, ratio: float, *, window: int, seed: int, n_prompts: int,
                folder=PROFILE_DIR, log=print):
    """The cached profile of (model, n_tokens, ratio), made now if missing.
    -> (BudgetProfile, info dict for the result file)."""
    total = profile_total(ratio, n_tokens, params.config.num_layers)
    path = profile_path(model, n_tokens, total, window, seed, n_prompts, folder)
    made_s = None
    if path.exists():
        prof = load_profile(path)
    else:
        t0 = time.perf_counter()
        log(f"profiling {model} at {n_tokens} tokens, total {total} ({ratio:g} of the text), {n_prompts} prompts ...")
        prof = kvjax.profile(params, n_prompts, total_budget=total, window=window, seed=seed, n_tokens=n_tokens,
                             name=model)
        prof.save(path)
        made_s = round(time.perf_counter() - t0, 1)
        log(f"  wrote {path.name} in {made_s} s (retention {prof.retention:.3f}, budgets {min(prof.budgets)}.."
            f"{max(prof.budgets)})")
    try:
        rel = str(path.relative_to(ROOT))
    except ValueError:
        rel = str(path)
    info = dict(path=rel, total=prof.total, sum_budgets=int(sum(prof.budgets)), min=int(min(prof.budgets)),
                max=int(max(prof.budgets)), retention=round(prof.retention, 4), made_s=made_s)
    return prof, info
