"""The quality benchmark's reports: summary tables, paired comparisons, markdown and plot."""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


MODES = ("aware", "agnostic")

# ------------------------------------------------------------------------------------------------
# reports


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summary(cells, mode, policies, budgets, metric="accuracy"):
    """{policy: {budget: mean of `metric` over (task, length) cells}} and the Full row."""
    table = {}
    for name in policies:
        table[name] = {}
        for b in budgets:
            vals = [c[metric] for c in cells if c["mode"] == mode and c["policy"] == name and c["budget"] == b]
            table[name][b] = _mean(vals)
    full = _mean([c[metric] for c in cells if c["mode"] == mode and c["policy"] == "Full"])
    return table, full


def paired(outputs, a, b, budgets, mode=None, metric="correct"):
    """Prompts where a scores higher than b, and lower, over the given budgets (and mode)."""
    res = {}
    for o in outputs:
        if o["policy"] not in (a, b) or o["budget"] not in budgets or (mode and o["mode"] != mode):
            continue
        key = (o["task"], o["length"], o["seed"], o["mode"], o["budget"])
        res.setdefault(key, {})[o["policy"]] = float(o[metric])
    both = [v for v in res.values() if len(v) == 2]
    return sum(v[a] > v[b] for v in both), sum(v[b] > v[a] for v in both), len(both)


def sign_test_p(wins, losses):
    """Two-sided exact sign test on the discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(0, k + 1)) / 2**n
    return min(1.0, 2 * p)


def analysis(result, policies, budgets):
    cells, outputs = result["cells"], result["outputs"]
    small = [b for b in budgets if b <= 128]
    lines = ["## Analysis (generated from the numbers above)", ""]
    n_per_cell = sorted({c["n"] for c in cells})
    lines.append(f"Each number averages (task, length) cells of {', '.join(map(str, n_per_cell))} samples, so one "
                 "sample moves a cell by 1/n. Paired counts compare two policies on the same prompts (task, length, "
                 "seed, mode, budget): how often each scores higher; p is a two-sided exact sign test on those "
                 "prompts. Budgets <= 128 only.")
    lines.append("")
    for a, b in (("AdaKV(SnapKV)", "SnapKV"), ("CAKE", "PyramidKV"), ("AdaKV(PyramidKV)", "PyramidKV")):
        if a not in policies or b not in policies:
            lines.append(f"- {a} vs {b}: not measured ({a if a not in policies else b} not in this run).")
            continue
        for metric, key, label in (("accuracy", "correct", "exact match"),
                                   ("digit_score", "digit_score", "digit score")):
            parts, means = [], []
            for mode in MODES:
                table, _ = summary(cells, mode, [a, b], small, metric)
                ma, mb = _mean([table[a][x] for x in small]), _mean([table[b][x] for x in small])
                if ma is None or mb is None:
                    continue
                means.append((ma, mb))
                w, l, n = paired(outputs, a, b, small, mode, key)
                parts.append(f"{mode} {ma:.3f} vs {mb:.3f} ({a} higher on {w}, {b} on {l} of {n} prompts, "
                             f"p = {sign_test_p(w, l):.2f})")
            if not means:
                continue
            ma, mb = np.mean([m[0] for m in means]), np.mean([m[1] for m in means])
            w, l, n = paired(outputs, a, b, small, None, key)
            p = sign_test_p(w, l)
            verdict = ("yes" if ma >= mb else "no") + (f", p = {p:.2f}" + (" (not significant)" if p > 0.05 else ""))
            lines.append(f"- {a} >= {b} on average at budgets <= 128, {label}? {verdict}: both modes {ma:.3f} vs "
                         f"{mb:.3f}; " + "; ".join(parts) + ".")
    lines.append("")
    for metric, label in (("accuracy", "exact match"), ("digit_score", "digit score")):
        for mode in MODES:
            table, full = summary(cells, mode, policies, budgets, metric)
            if full is None:
                continue
            best = []
            for b in budgets:
                vals = [(table[p][b], p) for p in policies if table[p][b] is not None]
                if vals:
                    top = max(v for v, _ in vals)
                    tops = [p for v, p in vals if v == top]
                    best.append(f"{b}: " + (", ".join(tops) if len(tops) <= 3 else f"{len(tops)} policies tie")
                                + f" ({top:.2f})")
            lines.append(f"- {label}, {mode}: full cache {full:.2f}; best per budget: " + "; ".join(best) + ".")
    gaps = []
    for name in policies:
        ta, _ = summary(cells, "aware", [name], budgets, "digit_score")
        tg, _ = summary(cells, "agnostic", [name], budgets, "digit_score")
        a, g = _mean(list(ta[name].values())), _mean(list(tg[name].values()))
        if a is not None and g is not None:
            gaps.append((a - g, name, a, g))
    if gaps:
        gaps.sort(reverse=True)
        lines.append("- Digit score, query-aware -> query-agnostic (mean over budgets): " +
                     ", ".join(f"{n} {a:.2f} -> {g:.2f}" for _, n, a, g in gaps) + ".")
    return lines


def fmt(x):
    return "—" if x is None else f"{x:.2f}"


def write_markdown(path, result, meta, policies, budgets):
    cells = result["cells"]
    lines = [f"# Quality: retrieval accuracy under KV-cache budgets ({meta['model']}, {meta['device']})", ""]
    lines.append(f"Tasks {', '.join(meta['tasks'])} (kvjax/eval/needles.py; {meta['digits']}-digit needle numbers, "
                 f"{meta['haystack']} haystack, multikey with 4 keys; pass key 5 digits), lengths "
                 f"{', '.join(map(str, meta['lengths']))} tokens (exact: each prompt is at most its length), samples "
                 f"per task {meta['samples_per_task']}, greedy, {meta['max_new_tokens']} new tokens, exact match "
                 f"of the first digit run (digit score: common leading digits / length). Budgets are tokens per KV "
                 f"head (window included); SnapKV, PyramidKV, Ada-KV and CAKE windows and H2O's recent window = "
                 f"min(32, budget // 2); StreamingLLM 4 sinks; RoCo its defaults (recent 10, sinks 4, chunked "
                 f"encoding 32 tokens at a time); PyramidKV's split: {meta.get('pyramid_style', 'kvpress')} style; "
                 f"Profiled: configs/budgets/smollm2-135m-<30 x budget>.json. Engine: {meta['engine']} (see "
                 f"benchmarks/quality.py). Every number is the mean over (task, length) cells.")
    lines.append("")
    for metric, label in (("accuracy", "Accuracy (exact match)"),
                          ("digit_score", "Digit score (partial credit for the leading digits)")):
        for mode in meta["modes"]:
            table, full = summary(cells, mode, policies, budgets, metric)
            title = ("query-aware: context + question compressed together" if mode == "aware"
                     else "query-agnostic: context compressed, then the question appended")
            lines += [f"## {label}, {title}", "", "| policy | " + " | ".join(str(b) for b in budgets) + " | mean |",
                      "|---|" + "---|" * (len(budgets) + 1)]
            for name in policies:
                row = [table[name][b] for b in budgets]
                lines.append(f"| {name} | " + " | ".join(fmt(x) for x in row) + f" | {fmt(_mean(row))} |")
            lines.append("| Full (all tokens) | " + " | ".join(fmt(full) for _ in budgets) + f" | {fmt(full)} |")
            lines.append("")
    # per task/length at full cache and the mean over compressed policies
    lines += ["## Per task and length (exact match; digit score in parentheses)", "",
              "| mode | task | length | Full | mean over compressed policies, budget " + " / ".join(map(str, budgets))
              + " |", "|---|---|---|---|---|"]
    for mode in meta["modes"]:
        for task in meta["tasks"]:
            for L in meta["lengths"]:
                def both(sel):
                    acc, dig = _mean([c["accuracy"] for c in sel]), _mean([c["digit_score"] for c in sel])
                    return f"{fmt(acc)} ({fmt(dig)})"

                here = [c for c in cells if (c["mode"], c["task"], c["length"]) == (mode, task, L)]
                if not here:
                    continue
                full = both([c for c in here if c["policy"] == "Full"])
                per_b = [both([c for c in here if c["budget"] == b]) for b in budgets]
                lines.append(f"| {mode} | {task} | {L} | {full} | " + " / ".join(per_b) + " |")
    lines.append("")
    # cache bytes
    lines += ["## Cache bytes per sequence (MiB, `out.stats['cache_bytes']` / batch; query-aware plan)", "",
              "| policy | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in policies:
        row = []
        for b in budgets:
            cb = [c["cache_bytes"] for c in cells if c["policy"] == name and c["budget"] == b and c["mode"] == "aware"]
            cb = cb or [c["cache_bytes"] for c in cells if c["policy"] == name and c["budget"] == b]
            row.append(f"{max(cb) / 2**20:.2f}" if cb else "—")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    for L in meta["lengths"]:
        cb = [c["cache_bytes"] for c in cells if c["policy"] == "Full" and c["length"] == L and c["mode"] == "aware"]
        if cb:
            lines.append(f"| Full at {L} | " + " | ".join(f"{max(cb) / 2**20:.2f}" for _ in budgets) + " |")
    lines.append("")
    lines.append("The query-agnostic plans hold the question's slots too (decode headroom of new tokens + question), "
                 "so their pools are a little larger; `quality_cpu.json` has both.")
    lines.append("")
    if result["skipped"]:
        lines.append("Not run: " + "; ".join(f"{s['policy']}@{s['budget']} ({s['reason']})" for s in result["skipped"]))
        lines.append("")
    t = result["timings"]
    lines += ["## Timings", "", f"Total {t['total_s'] / 60:.1f} min (verification {t['verify_s']:.0f} s; compiled "
              f"executables dropped {t.get('releases', 0)} times to stay under the memory-map limit).", "",
              "| length | batch | batches (both modes) | compile s | shared prefill s | decode s | generate s |",
              "|---|---|---|---|---|---|---|"]
    for L, tl in t["per_length"].items():
        lines.append(f"| {L} | {tl['batch_size']} | {tl['batches']} | {tl['compile_s']} | {tl['shared_prefill_s']} | "
                     f"{tl['decode_s']} | {tl['generate_s']} |")
    lines.append("")
    lines += analysis(result, policies, budgets)
    path.write_text("\n".join(lines) + "\n")
    return lines


def write_plot(path, result, meta, policies, budgets):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # optional: pip install -e .[plot]
        return f"no plot ({type(e).__name__}: {e})"
    modes = meta["modes"]
    metrics = (("accuracy", "exact match"), ("digit_score", "digit score"))
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(6.5 * len(modes), 4.4 * len(metrics)), sharey=True,
                             sharex=True, squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row, (metric, label) in enumerate(metrics):
        for ax, mode in zip(axes[row], modes):
            table, full = summary(result["cells"], mode, policies, budgets, metric)
            for i, name in enumerate(policies):
                xs = [b for b in budgets if table[name][b] is not None]
                if xs:
                    style = ":" if name in ("Random", "StreamingLLM") else "-"
                    ax.plot(xs, [table[name][b] for b in xs], style, marker="o", label=name, color=cmap(i % 20))
            if full is not None:
                ax.axhline(full, color="black", linestyle="--", label="Full")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_title(f"query-{mode}, {label}")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(f"{label} (mean over tasks, lengths)")
    for ax in axes[-1]:
        ax.set_xlabel("budget (tokens per KV head)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{meta['model']} on {meta['device']}: {', '.join(meta['tasks'])}, "
                 f"{'/'.join(str(x) for x in meta['lengths'])} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)
