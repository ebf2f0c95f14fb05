"""Which answer tokens each policy keeps: why a policy misses a needle, and why Ada-KV changes little.

    python benchmarks/needle_retention.py [--model qwen2.5-0.5b] [--length 4096] [--samples 2]
        [--ratios 0.1,0.25] [--policies SnapKV,AdaKV(SnapKV),CAKE,PyramidKV(paper)]
        [--results benchmarks/results/quality_qwen2.5-0.5b_4k.json] [--out benchmarks/results]

The prompts are the quality study's (`benchmarks/quality.py`: the same tasks, seeds and lengths, so
its first `--samples` prompts of each task), query-aware. One shared prompt pass compresses each
prompt for every (policy, ratio); nothing is decoded. For each prompt the answer strings are found
in the prompt's tokens (the context part; each answer's occurrence best kept counts: a variable
name appears twice in its chain), and for every (layer, KV head) the script measures from
`kvjax.cache.kept_positions`:
- retention: the fraction of the answers' tokens the head keeps, averaged over layers and heads;
- whole: the fraction of (layer, head) pairs that keep every token of every answer;
- Jaccard of each head's kept set against the first policy's at the same ratio (for AdaKV(X) vs X);
- the spread of head budgets within a layer (std / mean of the heads' kept counts, mean over layers).
A name may carry policy options in brackets, `SnapKV[kernel=9,group_reduce=max]` (the quality
grid's syntax: fields of the policy the name builds), to see what a scorer option does to the kept
answers; their rows have quality-run answers only where the quality run ran that name.
With `--results` (a quality run's JSON) each row also gets whether that policy answered the prompt,
and the summary splits retention by right and wrong answers.
Writes needle_retention_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import kvjax  # noqa: E402
from kvjax import prompts as kp  # noqa: E402
from kvjax.cache import kept_positions  # noqa: E402
from quality import build_samples  # noqa: E402
from quality_grid import make_policy, split_top  # noqa: E402

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")


def find_all(seq: list[int], sub: list[int], end: int) -> list[int]:
    """Start indices of `sub` in seq[:end]."""
    n = len(sub)
    return [i for i in range(0, end - n + 1) if seq[i:i + n] == sub]


def answer_spans(tok, ids: list[int], answers, context_tokens: int) -> list[list[np.ndarray]]:
    """For each answer, the token positions of each of its occurrences in the context ([] if not found)."""
    out = []
    for a in answers:
        spans = []
        for variant in (" " + a, a):
            sub = list(tok.encode(variant, add_special_tokens=False))
            spans += [np.arange(i, i + len(sub)) for i in find_all(ids, sub, context_tokens)]
            if spans:
                break
        out.append(spans)
    return out


def measure(kept_lh, spans) -> dict:
    """kept_lh [L][H] sorted position arrays; spans per answer, its occurrences' positions."""
    n_l, n_h = len(kept_lh), len(kept_lh[0])
    frac = np.zeros((n_l, n_h))
    whole = np.zeros((n_l, n_h), bool)
    for li in range(n_l):
        for h in range(n_h):
            kept = kept_lh[li][h]
            per_answer = [max(np.isin(s, kept).mean() for s in occ) for occ in spans if occ]
            frac[li, h] = np.mean(per_answer) if per_answer else np.nan
            whole[li, h] = bool(per_answer) and min(per_answer) == 1.0
    sizes = np.array([[len(kept_lh[li][h]) for h in range(n_h)] for li in range(n_l)], float)
    spread = float(np.mean(sizes.std(axis=1) / np.maximum(sizes.mean(axis=1), 1)))
    return dict(retention=float(np.nanmean(frac)), whole=float(whole.mean()), head_spread=spread,
                retention_by_layer=[round(float(x), 4) for x in np.nanmean(frac, axis=1)])


def jaccard(a_lh, b_lh) -> float:
    vals = []
    for la, lb in zip(a_lh, b_lh):
        for a, b in zip(la, lb):
            union = len(np.union1d(a, b))
            vals.append(len(np.intersect1d(a, b)) / union if union else 1.0)
    return float(np.mean(vals))


def answered(results: dict | None):
    if results is None:
        return lambda *k: None
    table = {(r["policy"], r["ratio"], r["task"], r["seed"]): r["correct"]
             for r in results["records"] if r["mode"] == "aware"}
    return lambda policy, ratio, task, seed: table.get((policy, ratio, task, seed))


def summary(rows, policies, ratios) -> list[str]:
    lines = ["| policy | ratio | prompts | retention | whole (layer, head) pairs | head spread | Jaccard vs "
             f"{policies[0]} | retention when right / wrong (prompts) |", "|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        for p in policies:
            sel = [x for x in rows if x["policy"] == p and x["ratio"] == r and not np.isnan(x["retention"])]
            if not sel:
                continue
            m = lambda k, s=sel: float(np.mean([x[k] for x in s]))  # noqa: E731
            right = [x["retention"] for x in sel if x["correct"] is True]
            wrong = [x["retention"] for x in sel if x["correct"] is False]
            rw = (f"{np.mean(right):.3f} ({len(right)}) / " if right else "- / ") + (
                f"{np.mean(wrong):.3f} ({len(wrong)})" if wrong else "-")
            lines.append(f"| {p} | {r:g} | {len(sel)} | {m('retention'):.3f} | {m('whole'):.3f} | "
                         f"{m('head_spread'):.3f} | {m('jaccard'):.3f} | {rw} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2, help="prompts per task (the quality run's first ones)")
    ap.add_argument("--ratios", default="0.1,0.25")
    ap.add_argument("--policies", default="SnapKV,AdaKV(SnapKV),CAKE,PyramidKV(paper)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--batch", type=int, default=2, help="prompts per prompt pass")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--results", default=None, help="a quality run's JSON: whether each policy answered")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    names = split_top(args.policies)
    cells = [(n, r) for r in ratios for n in names]
    pols = []
    for n, r in cells:
        pol, why = make_policy(n, r, window=args.window, model=args.model)
        if pol is None:
            raise SystemExit(f"--policies: {n} at {r}: {why}")
        pols.append(pol)
    is_right = answered(json.loads(pathlib.Path(args.results).read_text()) if args.results else None)
    params = kvjax.load(args.model, dtype="float32")
    tok = params.tokenizer
    samples = build_samples(tok, args.tasks.split(","), args.length, "aware", args.samples, 0)
    rows, t0 = [], time.perf_counter()
    for i in range(0, len(samples), args.batch):
        chunk = samples[i:i + args.batch]
        pres = kvjax.prefill(params, [s.prompt for s in chunk], pols, max_new_tokens=16)
        kept = [kept_positions(p.cache) for p in pres]  # [cell][l][b][h]
        for b, s in enumerate(chunk):
            ids = [int(t) for t in kp.encode(params, s.prompt, False)[0]]
            spans = answer_spans(tok, ids, s.answers, s.context_tokens)
            first = {}
            for c, (name, ratio) in enumerate(cells):
                lh = [kept[c][li][b] for li in range(len(kept[c]))]
                first.setdefault(ratio, lh)
                row = dict(task=s.task, seed=s.seed, policy=name, ratio=ratio, answers=list(s.answers),
                           found=sum(bool(o) for o in spans), **measure(lh, spans),
                           jaccard=jaccard(first[ratio], lh), correct=is_right(name, ratio, s.task, s.seed))
                rows.append(row)
        print(f"[{time.perf_counter() - t0:6.0f}s] {min(i + args.batch, len(samples))}/{len(samples)} prompts",
              flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"needle_retention_{args.model}{args.tag}"
    meta = dict(model=args.model, length=args.length, samples=args.samples, tasks=args.tasks.split(","),
                ratios=ratios, policies=names, results=args.results, argv=sys.argv[1:],
                seconds=round(time.perf_counter() - t0, 1))
    stem.with_name(stem.name + ".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Answer tokens kept: {args.model}, {args.length} tokens, query-aware", "",
             f"`benchmarks/needle_retention.py {' '.join(sys.argv[1:])}` ({meta['seconds']:.0f} s). "
             f"{len(samples)} prompts ({args.samples} per task of {', '.join(args.tasks.split(','))}), "
             "the quality study's first ones; retention = the fraction of the answers' tokens a (layer, KV head) "
             "keeps, averaged; whole = pairs keeping every answer token; head spread = std / mean of the "
             "heads' kept counts within a layer; right / wrong from the quality run's answers.", ""]
    lines += summary(rows, names, ratios)
    lines += ["", "Answers found in the prompt's tokens: "
              f"{sum(r['found'] for r in rows if r['policy'] == names[0] and r['ratio'] == ratios[0])} of "
              f"{sum(len(r['answers']) for r in rows if r['policy'] == names[0] and r['ratio'] == ratios[0])}."]
    stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
