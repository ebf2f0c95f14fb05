"""The quality study's numbers from its records: accuracies with Wilson intervals, paired tests, targets.

Every function reads the per-prompt records of a result file (quality_store). A prompt is identified
by (task, length, seed); two policies are paired on the prompts both ran, in one mode and at one
ratio (or pooled over ratios: then a pair is a (prompt, ratio)).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from kvjax.eval import stats

from quality_grid import COMPARISONS, FULL

#: issue 14's targets, checked on the model and lengths named here
TARGETS = dict(model="qwen2.5-0.5b", lengths=(4096, 8192),
               aware=((0.25, 0.95, ("AdaKV(SnapKV)", "CAKE", "Profiled")),
                      (0.1, 0.85, ("AdaKV(SnapKV)", "CAKE", "Profiled"))),
               agnostic=((0.5, 0.90),))
ALPHA = 0.05


class Index:
    """records grouped by (mode, policy, ratio) -> {(task, length, seed): record}."""

    def __init__(self, records, lengths=None):
        self.by = defaultdict(dict)
        for r in records:
            if lengths is not None and r["length"] not in lengths:
                continue
            self.by[(r["mode"], r["policy"], r["ratio"])][(r["task"], r["length"], r["seed"])] = r

    def get(self, mode, policy, ratio, task=None):
        d = self.by.get((mode, policy, ratio), {})
        return d if task is None else {k: v for k, v in d.items() if k[0] == task}

    def accuracy(self, mode, policy, ratio, task=None) -> stats.Proportion | None:
        rows = self.get(mode, policy, ratio, task)
        return stats.proportion([r["correct"] for r in rows.values()]) if rows else None

    def mean_fraction(self, mode, policy, ratio, task=None) -> float | None:
        rows = self.get(mode, policy, ratio, task)
        return sum(r["fraction"] for r in rows.values()) / len(rows) if rows else None

    def pairs(self, mode, a, b, ratios, task=None):
        """Aligned (a, b) records over the prompts both ran, at each ratio in `ratios` (the full cache,
        which has no ratio, pairs with either policy at every ratio)."""
        out = []
        for r in ratios:
            da, db = (self.get(mode, p, None if p == FULL else r, task) for p in (a, b))
            out += [(da[k], db[k]) for k in sorted(set(da) & set(db))]
        return out


@dataclasses.dataclass
class Comparison:
    seed: str
    baseline: str
    mode: str
    ratio: float | None           # None: pooled over the ratios
    task: str | None              # None: every task
    test: stats.PairedTest        # exact McNemar on right/wrong
    interval: stats.Interval      # Newcombe CI of acc(seed) - acc(baseline)
    fraction_test: stats.PairedTest  # sign test on the fraction of expected strings found
    acc_seed: float
    acc_base: float
    p_holm: float | None = None

    @property
    def verdict(self) -> str:
        p = self.p_holm if self.p_holm is not None else self.test.p_value
        if self.test.n == 0:
            return "not measured"
        if p < ALPHA:
            return "better" if self.test.difference > 0 else "worse"
        return "no significant difference"


def compare(index: Index, seed: str, base: str, mode: str, ratios, task=None, ratio_label=None):
    pairs = index.pairs(mode, seed, base, ratios, task)
    if not pairs:
        return None
    a = [x["correct"] for x, _ in pairs]
    b = [y["correct"] for _, y in pairs]
    return Comparison(seed, base, mode, ratio_label, task, stats.mcnemar(a, b),
                      stats.paired_difference_interval(a, b),
                      stats.sign_test([x["fraction"] for x, _ in pairs], [y["fraction"] for _, y in pairs]),
                      sum(a) / len(a), sum(b) / len(b))


def paired_rows(index: Index, modes, ratios, pairs):
    """Per (first, second) pair and mode: one comparison per ratio and one pooled over the ratios,
    where both ran; no adjustment."""
    return [c for a, b in pairs for mode in modes
            for rs, label in [([r], r) for r in ratios] + [(ratios, None)]
            if (c := compare(index, a, b, mode, rs, ratio_label=label)) is not None]


def comparisons(index: Index, modes, ratios, comparisons=COMPARISONS):
    """`paired_rows` of the seed-vs-baseline claims, Holm-adjusted over the pooled rows (the family
    of claims). The other pairs the documents quote (`quality_grid.SECONDARY`, `--pairs`) are
    `paired_rows` alone: exploratory, unadjusted."""
    rows = paired_rows(index, modes, ratios, comparisons)
    pooled = [c for c in rows if c.ratio is None]
    for c, p in zip(pooled, stats.holm([c.test.p_value for c in pooled])):
        c.p_holm = p
    return rows


def per_task(index: Index, seed, base, mode, ratios, tasks):
    return [c for t in tasks if (c := compare(index, seed, base, mode, ratios, task=t)) is not None]


def kept_share(index: Index, mode, policy, ratio, task=None):
    """(accuracy / full accuracy, Wilson low / full, Wilson high / full, Proportion, full Proportion),
    the full cache's accuracy taken on the prompts the policy ran at that ratio (a cell with fewer
    prompts than Full is not divided by Full's accuracy on other prompts)."""
    pairs = index.pairs(mode, policy, FULL, [ratio], task)
    if not pairs:
        return None
    acc = stats.proportion([a["correct"] for a, _ in pairs])
    full = stats.proportion([b["correct"] for _, b in pairs])
    if full.value == 0:
        return None
    return acc.value / full.value, acc.low / full.value, acc.high / full.value, acc, full


def targets(records, model: str):
    """Issue 14's targets on this file: [(description, value, threshold, met, note)]."""
    out = []
    lengths = TARGETS["lengths"] if model == TARGETS["model"] else sorted({r["length"] for r in records})
    index = Index(records, lengths)
    where = f"{model}, lengths {'/'.join(map(str, lengths))}"
    if model != TARGETS["model"]:
        where += f"; set for {TARGETS['model']} at 4096/8192, informational here"
    for ratio, need, pols in TARGETS["aware"]:
        for p in pols:
            ks = kept_share(index, "aware", p, ratio)
            desc = f"query-aware, {p} at {ratio:g} keeps >= {need:.0%} of Full's accuracy ({where})"
            if ks is None:
                out.append((desc, None, need, None, "not measured"))
            else:
                out.append((desc, ks[0], need, ks[0] >= need,
                            f"{ks[3].value:.3f} vs Full {ks[4].value:.3f} (n={ks[3].n}); share CI from the policy's "
                            f"Wilson interval [{ks[1]:.2f}, {ks[2]:.2f}]"))
    for ratio, need in TARGETS["agnostic"]:
        best = None
        for (mode, p, r) in list(index.by):
            if mode != "agnostic" or r != ratio:
                continue
            ks = kept_share(index, "agnostic", p, ratio)
            if ks is not None and (best is None or ks[0] > best[1][0]):
                best = (p, ks)
        desc = f"query-agnostic at {ratio:g}: the best policy keeps >= {need:.0%} of Full's accuracy ({where})"
        if best is None:
            out.append((desc, None, need, None, "not measured"))
        else:
            p, ks = best
            out.append((desc, ks[0], need, ks[0] >= need, f"best: {p}, {ks[3].value:.3f} vs Full {ks[4].value:.3f} "
                        f"(n={ks[3].n}); share CI [{ks[1]:.2f}, {ks[2]:.2f}]"))
    return out


def decision(index: Index, mode: str, ratio: float, policies):
    """The policy with the highest accuracy at (mode, ratio) and those not significantly worse than it
    (exact McNemar, two-sided, p >= 0.05): [(policy, Proportion, p vs best)], best first."""
    accs = [(p, index.accuracy(mode, p, ratio)) for p in policies]
    accs = [(p, a) for p, a in accs if a is not None]
    if not accs:
        return None, []
    accs.sort(key=lambda x: (-x[1].value, -(index.mean_fraction(mode, x[0], ratio) or 0.0)))
    best = accs[0][0]
    tied = [(best, accs[0][1], 1.0)]
    for p, a in accs[1:]:
        c = compare(index, best, p, mode, [ratio])
        if c is not None and c.test.p_value >= ALPHA:
            tied.append((p, a, c.test.p_value))
    return best, tied
