"""Comparing a kept-position set with a reference score vector, tolerant only of true near-ties."""

from __future__ import annotations

import numpy as np


def assert_same_selection(kept, ref_scores, budget: int, forced, *, where: str = "", rel_tie: float = 1e-4):
    """`kept` must be the reference's top-`budget` (forced positions first).

    Positions may differ only where the reference scores of the swapped tokens are within
    `rel_tie` (relative) of the selection threshold: float noise between two implementations can
    reorder exact or near ties, nothing else.
    """
    kept = np.sort(np.asarray(kept))
    n = len(ref_scores)
    s = np.where(forced, np.inf, np.asarray(ref_scores, np.float64))
    order = np.lexsort((np.arange(n), -s))  # descending score, ties by lower index
    ref = np.sort(order[:budget])
    assert len(kept) == len(ref), f"{where}: kept {len(kept)} tokens, reference keeps {len(ref)}"
    only_ours = np.setdiff1d(kept, ref)
    only_ref = np.setdiff1d(ref, kept)
    if len(only_ours) == 0:
        return
    threshold = s[order[budget - 1]]
    tol = rel_tie * max(abs(threshold), 1e-12)
    bad = [int(p) for p in np.concatenate([only_ours, only_ref]) if abs(s[p] - threshold) > tol]
    assert not bad, (
        f"{where}: {len(only_ours)} positions differ; not near-ties: {bad[:10]} "
        f"(scores {[float(s[p]) for p in bad[:5]]}, threshold {threshold})"
    )
