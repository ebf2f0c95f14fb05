"""The quality study's report: markdown (tables with Wilson intervals, paired tests, the targets'
verdicts, the decision table, perplexity, cache figures, timings) and plots, from a result file."""

from __future__ import annotations

import pathlib
from collections import defaultdict

from kvjax.eval import stats

from quality_analysis import ALPHA, Index, comparisons, decision, kept_share, paired_rows, per_task, targets
from quality_grid import COMPARISONS, FULL, MODES, SECONDARY

MODE_TITLE = {"aware": "query-aware (context + question compressed together)",
              "agnostic": "query-agnostic (context compressed alone, then the question)"}


def _beside(stem: pathlib.Path, ext: str) -> pathlib.Path:
    """stem + ext (not Path.with_suffix: "quality_qwen2.5-0.5b" has no suffix to replace)."""
    return stem.parent / (stem.name + ext)


def _ci(p) -> str:
    return "—" if p is None else f"{p.value:.2f} [{p.low:.2f}, {p.high:.2f}]"


def _f(x, d=2) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def _present(data):
    recs = data["records"]
    meta = data["meta"]
    order = {p: i for i, p in enumerate(meta.get("policies", []))}
    policies = sorted({r["policy"] for r in recs if r["policy"] != FULL}, key=lambda p: (order.get(p, 99), p))
    ratios = sorted({r["ratio"] for r in recs if r["ratio"] is not None})
    modes = [m for m in MODES if any(r["mode"] == m for r in recs)]
    tasks = [t for t in meta.get("tasks", []) if any(r["task"] == t for r in recs)]
    lengths = sorted({r["length"] for r in recs})
    return policies, ratios, modes, tasks, lengths


def accuracy_tables(index, policies, ratios, modes, n_note):
    lines = []
    for mode in modes:
        lines += [f"### Accuracy, {MODE_TITLE[mode]}", "", n_note, "",
                  "| policy | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        full = index.accuracy(mode, FULL, None)
        lines.append("| Full | " + " | ".join(_ci(full) for _ in ratios) + " |")
        for p in policies:
            lines.append(f"| {p} | " + " | ".join(_ci(index.accuracy(mode, p, r)) for r in ratios) + " |")
        lines += ["", f"Share of the full cache's accuracy ({mode}; Full on the prompts that cell ran):", "",
                  "| policy | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for p in policies:
            cells = []
            for r in ratios:
                ks = kept_share(index, mode, p, r)
                cells.append("—" if ks is None else f"{ks[0]:.0%}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def task_tables(index, policies, ratios, modes, tasks):
    lines = ["## Per task (exact match; mean fraction of expected strings in parentheses)", ""]
    for mode in modes:
        for t in tasks:
            full = index.accuracy(mode, FULL, None, t)
            lines += [f"### {t}, {mode} (Full {_ci(full)}, fraction {_f(index.mean_fraction(mode, FULL, None, t))})",
                      "", "| policy | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
            for p in policies:
                cells = []
                for r in ratios:
                    a = index.accuracy(mode, p, r, t)
                    cells.append("—" if a is None else f"{a.value:.2f} ({index.mean_fraction(mode, p, r, t):.2f})")
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def comparison_section(index, modes, ratios, tasks):
    rows = comparisons(index, modes, ratios)
    lines = ["## Seed methods against their baselines (paired, same prompts)", "",
             "Exact McNemar test (two-sided binomial test on the discordant prompts: wins = the seed method right "
             "and the baseline wrong, losses = the reverse); difference of accuracies with Newcombe's interval; "
             "the sign test on the fraction of expected strings found. The pooled rows (all ratios) form the "
             f"family of claims: their p-values are Holm-adjusted. Verdict at alpha = {ALPHA}.", "",
             "| seed vs baseline | mode | ratio | n | wins / losses | accuracy seed - base [95% CI] | p (McNemar) | "
             "p (Holm) | fraction sign-test p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_comparison_row(c, holm=True) for c in rows]
    lines += ["", "### Verdicts, with the per-task breakdown where a seed method is not better", ""]
    for c in [c for c in rows if c.ratio is None]:
        head = (f"- **{c.seed} vs {c.baseline}, {c.mode}**: {c.verdict} (accuracy {c.acc_seed:.3f} vs "
                f"{c.acc_base:.3f}, {c.test.difference:+.3f} [{c.interval.low:+.3f}, {c.interval.high:+.3f}], "
                f"{c.test.wins} wins / {c.test.losses} losses of {c.test.n}, Holm p = {c.p_holm:.3g})")
        if c.verdict == "better":
            lines.append(head + ".")
            continue
        parts = [f"{t.task} {t.test.difference:+.3f} ({t.test.wins}/{t.test.losses}, p = {t.test.p_value:.2g})"
                 for t in per_task(index, c.seed, c.baseline, c.mode, ratios, tasks)]
        lines.append(head + "; by task: " + "; ".join(parts) + ".")
    lines.append("")
    return lines


def _comparison_row(c, holm: bool) -> str:
    ratio = "all" if c.ratio is None else f"{c.ratio:g}"
    cells = [f"{c.seed} vs {c.baseline}", c.mode, ratio, str(c.test.n), f"{c.test.wins} / {c.test.losses}",
             f"{c.test.difference:+.3f} [{c.interval.low:+.3f}, {c.interval.high:+.3f}]", f"{c.test.p_value:.3g}"]
    if holm:
        cells.append("" if c.p_holm is None else f"{c.p_holm:.3g}")
    cells.append(f"{c.fraction_test.p_value:.3g}")
    if holm:
        cells.append(c.verdict if c.ratio is None else "")
    return "| " + " | ".join(cells) + " |"


def secondary_section(index, modes, ratios, pairs):
    rows = paired_rows(index, modes, ratios, pairs)
    if not rows:
        return []
    return ["## Other paired comparisons (unadjusted)", "",
            "The same tests on pairs the documents quote beyond the claims above (`quality_grid.SECONDARY`, "
            "plus `quality.py --pairs`); against Full, every ratio pairs with the full cache's answer to the "
            "same prompt. Exploratory: not Holm-adjusted, no verdict.", "",
            "| first vs second | mode | ratio | n | wins / losses | accuracy first - second [95% CI] | p (McNemar) | "
            "fraction sign-test p |", "|---|---|---|---|---|---|---|---|"] + [
        _comparison_row(c, holm=False) for c in rows] + [""]


def target_section(records, model):
    lines = ["## Targets (issue 14)", "", "| target | value | needed | verdict | detail |", "|---|---|---|---|---|"]
    for desc, value, need, met, note in targets(records, model):
        v = "not measured" if met is None else ("met" if met else "NOT met")
        lines.append(f"| {desc} | {'—' if value is None else f'{value:.0%}'} | {need:.0%} | {v} | {note} |")
    lines.append("")
    return lines


def decision_section(index, policies, ratios, modes, cells):
    lines = ["## Decision table: which policy at which budget", "",
             "Best accuracy at each (mode, ratio), pooled over tasks and lengths; 'as good' lists the policies "
             f"whose exact McNemar test against the best gives p >= {ALPHA} (not distinguishable on these prompts). "
             "KV MiB: per sequence at the longest length, query-aware plan.", "",
             "| mode | ratio | best | accuracy | as good (p vs best) | KV MiB of the best |", "|---|---|---|---|---|---|"]
    if not ratios:
        return []
    longest = max((c["length"] for c in cells), default=None)
    kv = {(c["mode"], c["policy"], c["ratio"]): c["kv_bytes"] for c in cells if c["length"] == longest}
    for mode in modes:
        for r in ratios:
            best, tied = decision(index, mode, r, policies)
            if best is None:
                continue
            others = ", ".join(f"{p} ({pv:.2f})" for p, _, pv in tied[1:]) or "none"
            mib = kv.get((mode, best, r))
            lines.append(f"| {mode} | {r:g} | {best} | {_ci(tied[0][1])} | {others} | "
                         f"{'—' if mib is None else f'{mib / 2**20:.1f}'} |")
    lines.append("")
    return lines


def ppl_section(data):
    rows = data.get("ppl", [])
    if not rows:
        return []
    meta = data["meta"]
    by = defaultdict(list)
    reasons = {}
    paths = {}
    for r in rows:
        if r.get("supported", True):
            by[(r["policy"], r["ratio"])].append(r["mean_nll"])
            paths[r["policy"]] = r.get("path")
        else:
            reasons[r["policy"]] = r["reason"]
    ratios = sorted({r for _, r in by if r is not None})
    pols = [p for p in meta.get("ppl_policies", []) if p not in reasons]
    import math

    full = by.get((FULL, None))
    lines = ["## Decode-time quality: perplexity under a budget (essays)", "",
             f"{meta.get('ppl_texts')} texts of {meta.get('ppl_length')} tokens; the first K = ratio x length tokens "
             "prefilled, the rest read one token at a time through a cache held at K (benchmarks/quality_ppl.py). "
             "Perplexity = exp(mean NLL over all texts' predictions).", "",
             "| policy | path | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|---|" + "---|" * len(ratios)]
    if full:
        lines.append(f"| Full | {paths.get('Full')} | " + " | ".join(f"{math.exp(sum(full) / len(full)):.3f}"
                                                                     for _ in ratios) + " |")
    for p in pols:
        cells = [by.get((p, r)) for r in ratios]
        lines.append(f"| {p} | {paths.get(p, '—')} | " +
                     " | ".join("—" if not c else f"{math.exp(sum(c) / len(c)):.3f}" for c in cells) + " |")
    for p, why in reasons.items():
        lines.append(f"| {p} | not measured: {why} |" + " |" * len(ratios))
    lines += ppl_paired(rows, "RoCo", [p for p in pols if p != "RoCo"], ratios)
    v = data.get("extra", {}).get("ppl_verify")
    if v:
        lines += ["", f"Decode-step path checked against kvjax.perplexity(H2O, chunk=1) on {v['n_tokens']}-token texts "
                  f"at budget {v['budget']}: max |dNLL| {v['max_abs_nll_diff']:.2e} ({'OK' if v['ok'] else 'MISMATCH'})."]
    lines.append("")
    return lines


def ppl_paired(rows, seed_method, others, ratios):
    """Sign tests of the seed method's per-text NLL against each other policy's on the same texts:
    a win is a text where the seed method's NLL is lower; per ratio and pooled over ratios."""
    nll = {(r["policy"], r["ratio"], r["seed"]): r["mean_nll"] for r in rows if r.get("supported", True)}
    if not any(k[0] == seed_method for k in nll) or not others:
        return []
    lines = ["", f"Paired on the same texts (sign test, two-sided; a win = {seed_method}'s mean NLL lower). The "
             "pooled column pairs every (text, ratio): the ratios share texts, so its p-value is optimistic.", "",
             f"| {seed_method} vs | " + " | ".join(f"{r:g}: wins / losses, p" for r in ratios) + " | pooled |",
             "|---|" + "---|" * (len(ratios) + 1)]
    for other in others:
        cells = []
        for r in list(ratios) + [None]:
            keys = [k for k in nll if k[0] == seed_method and (r is None or k[1] == r) and (other, k[1], k[2]) in nll]
            if not keys:
                cells.append("—")
                continue
            t = stats.sign_test([nll[(other, k[1], k[2])] for k in keys], [nll[k] for k in keys])
            cells.append(f"{t.wins} / {t.losses}, p = {t.p_value:.2g}")
        if any(c != "—" for c in cells):
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines


def cache_section(cells, policies, ratios):
    if not cells:
        return []
    lines = ["## Cache per sequence (query-aware): KV MiB / tokens per head summed over layers", "",
             "Profiled's total equals uniform SnapKV's at the same ratio (its profile is solved for that total).", ""]
    for L in sorted({c["length"] for c in cells}):
        here = {(c["policy"], c["ratio"]): c for c in cells if c["length"] == L and c["mode"] == "aware"}
        if not here:
            continue
        lines += [f"### {L} tokens", "", "| policy | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        f = here.get((FULL, None))
        if f:
            lines.append("| Full | " + " | ".join(f"{f['kv_bytes'] / 2**20:.1f} / {f['budget_total']:.0f}"
                                                  for _ in ratios) + " |")
        for p in policies:
            cs = [here.get((p, r)) for r in ratios]
            lines.append(f"| {p} | " + " | ".join("—" if c is None else f"{c['kv_bytes'] / 2**20:.1f} / "
                                                  f"{c['budget_total']:.0f}" for c in cs) + " |")
        lines.append("")
    return lines


def timing_section(data):
    t = data.get("timings", [])
    if not t:
        return []
    by = defaultdict(lambda: [0, 0.0, 0.0])
    for e in t:
        if e["kind"] in ("shared", "alone"):
            k = (e["kind"], e["length"], e["mode"])
            by[k][0] += 1
            by[k][1] += e["prefill_s"]
            by[k][2] += e["decode_s"]
    lines = ["## Timings", ""]
    if by:
        lines += ["| pass | length | mode | passes | prefill s | decode s |", "|---|---|---|---|---|---|"]
        lines += [f"| {kind} | {L} | {mode} | {n} | {pre:.0f} | {dec:.0f} |"
                  for (kind, L, mode), (n, pre, dec) in sorted(by.items())]
    ppl = sum(e["seconds"] for e in t if e["kind"] == "ppl")
    sess = sum(e["seconds"] for e in t if e["kind"] == "session")
    lines += ["", f"Perplexity {ppl:.0f} s; sessions (wall, all parts) {sess / 60:.1f} min."]
    est = data.get("extra", {}).get("estimate")
    if est:
        lines += ["", "Estimated full run (benchmarks/quality_estimate.py): " + est.get("summary", "")]
    lines.append("")
    return lines


def write_report(data, stem, pairs=()) -> list[str]:
    """The markdown report beside `stem` (and its plots); `pairs`: (first, second) policy names
    compared beyond SECONDARY."""
    stem = pathlib.Path(stem)
    meta, recs, cells = data["meta"], data["records"], data.get("cells", [])
    policies, ratios, modes, tasks, lengths = _present(data)
    index = Index(recs)
    counts = sorted({len(v) for v in index.by.values()})
    n_note = (f"Accuracy = prompts whose continuation holds every expected string, with its 95% Wilson interval, "
              f"pooled over tasks {', '.join(tasks)} and lengths {', '.join(map(str, lengths))}: "
              f"{'/'.join(map(str, counts))} prompts per cell.")
    lines = [f"# Quality under KV budgets: {meta['model']} ({meta.get('device', '')})", "",
             f"RULER-style tasks (kvjax.eval.ruler) at exactly the given token counts (the prompt query-aware, the "
             f"context query-agnostic), haystack {meta.get('haystack')}, greedy decoding, new tokens per task "
             f"{meta.get('max_new_tokens')}. Budgets: ratios of the compressed text, tokens per KV head averaged over "
             f"layers, window {meta.get('window')} included (SnapKV, PyramidKV, Ada-KV, CAKE, Profiled windows; "
             f"H2O's recent window); StreamingLLM 4 sinks; RoCo EasyKV's defaults (recent 10, sinks 4, chunk 32); "
             f"Profiled: XKV profiles made by kvjax.profile for each (length, ratio) total "
             f"({meta.get('profile_prompts')} synthetic prompts, seed {meta.get('profile_seed')}). "
             f"{len(recs)} records.", ""]
    if not recs:  # a perplexity-only store (benchmarks/quality_ppl.py): no retrieval sections to show
        lines = [f"# Decode-time quality under KV budgets: {meta['model']} ({meta.get('device', '')})", ""]
    else:
        lines += ["## Accuracy", ""] + accuracy_tables(index, policies, ratios, modes, n_note)
        lines += target_section(recs, meta["model"])
        lines += comparison_section(index, modes, ratios, tasks)
        lines += secondary_section(index, modes, ratios, SECONDARY + tuple(p for p in pairs if p not in SECONDARY))
        lines += decision_section(index, policies, ratios, modes, cells)
    lines += ppl_section(data)
    if recs:
        lines += task_tables(index, policies, ratios, modes, tasks)
        lines += cache_section(cells, policies, ratios)
    skipped = data.get("extra", {}).get("skipped")
    if skipped:
        lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()), ""]
    lines += timing_section(data)
    if recs:
        lines += ["Plots: " + ", ".join(write_plots(index, policies, ratios, modes, tasks, meta, stem)), ""]
    _beside(stem, ".md").write_text("\n".join(lines) + "\n")
    return lines


def write_plots(index, policies, ratios, modes, tasks, meta, stem) -> list[str]:
    """Accuracy vs budget (kvjax.plot.accuracy_vs_budget): one panel per mode pooled over tasks, and one
    per (task, mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from kvjax.plot import accuracy_vs_budget
    except ImportError as e:
        return [f"none ({e})"]

    def results(mode, task=None):
        out = []
        for p in [FULL] + policies:
            for r in ratios:
                a = index.accuracy(mode, p, None if p == FULL else r, task)
                if a is not None:
                    out.append(dict(policy=p, budget=r, accuracy=a.value, ci_low=a.low, ci_high=a.high))
        return out

    written = []
    if not modes:
        return ["none (no retrieval records)"]
    fig, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        accuracy_vs_budget(results(mode), ax=ax, title=f"{meta['model']}, {mode}: all tasks",
                           xlabel="budget (ratio of the prompt)", xscale="log", band_alpha=0.08)
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(_beside(stem, ".png"), dpi=110)
    plt.close(fig)
    written.append(_beside(stem, ".png").name)
    if tasks:
        fig, axes = plt.subplots(len(tasks), len(modes), figsize=(7 * len(modes), 4.2 * len(tasks)), squeeze=False)
        for i, t in enumerate(tasks):
            for ax, mode in zip(axes[i], modes):
                accuracy_vs_budget(results(mode, t), ax=ax, title=f"{t}, {mode}", xlabel="budget (ratio)",
                                   xscale="log", band_alpha=0.0)
                ax.set_ylim(-0.02, 1.02)
                if ax.get_legend() is not None and (i, mode) != (0, modes[-1]):
                    ax.get_legend().remove()
        fig.tight_layout()
        path = stem.parent / (stem.name + "_tasks.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


__all__ = ["write_report", "write_plots", "COMPARISONS"]
