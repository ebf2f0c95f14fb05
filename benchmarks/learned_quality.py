"""Learned scorer vs the query-agnostic baselines on held-out RULER needle tasks (issue 16).

    nice -n 10 python benchmarks/learned_quality.py                         # smollm2-135m
    nice -n 10 python benchmarks/learned_quality.py --model qwen2.5-0.5b --samples 30 --batch 3

Query-agnostic ("agnostic"): the context alone is compressed (`kvjax.prefill(params, contexts, policy,
question=questions)`), then the question is fed through each compressed cache: Full, Learned,
AdaKV(Learned), KNorm, StreamingLLM and SnapKV (its observation window is the context's end: no
question) at one ratio budget, every policy from one shared prompt pass per batch
(benchmarks/quality_shared.py). Query-aware ("aware"): context + question compressed together,
SnapKV and Learned. Greedy decoding, RULER's scoring (all answers present = right).

Paired tests: McNemar (kvjax.eval.stats.mcnemar, exact) of Learned against each baseline
("greater": Learned better), of AdaKV(Learned) against Learned, and query-aware Learned against SnapKV
(two-sided). The needle tasks are held out: the scorer was trained on essay spans, fact essays (own
templates) and synthetic documents, never on a needle prompt. Writes
benchmarks/results/learned_<model>.{json,md} (`result_paths`; the scorer defaults to
configs/scorers/<model>); the JSON is rewritten after every batch and a rerun
skips the batches it holds (--force starts over).

`--task facts --seed 9000` runs the same comparison on held-out fact essays of the training kind
(kvjax.learned.texts.fact_samples): a validation set for comparing scorers without the needle test.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import kvjax  # noqa: E402
from kvjax import policies as P  # noqa: E402
from kvjax.eval import ruler, stats  # noqa: E402
from kvjax.learned.texts import fact_samples  # noqa: E402
from quality_shared import decode_all, prefill_shared  # noqa: E402

#: new tokens per task; "facts": kvjax.learned.texts.fact_samples (answers of at most 8 digits, or a word and 3)
MAX_NEW = {**ruler.MAX_NEW_TOKENS, "facts": 12}


def result_paths(model: str, out: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """(JSON, markdown) paths: `out` + .json / .md, by default benchmarks/results/learned_<model>
    (learned_smollm2 for smollm2-135m, its first result's name). Not with_suffix: "qwen2.5-0.5b" has dots."""
    stem = pathlib.Path(out or "benchmarks/results/" + ("learned_smollm2" if model == "smollm2-135m" else
                                                       f"learned_{model}"))
    return stem.parent / (stem.name + ".json"), stem.parent / (stem.name + ".md")


def agnostic_policies(scorer, ratio: float, window: int) -> dict:
    learned = P.Learned(scorer, ratio, window=window, sinks=4)
    return {"Full": P.Full(), "Learned": learned, "AdaKV(Learned)": P.AdaKV(learned, alpha=0.2),
            "KNorm": P.KNorm(ratio), "StreamingLLM": P.StreamingLLM(ratio, sinks=4),
            f"SnapKV(w{window})": P.SnapKV(ratio, window=window), "SnapKV(w64)": P.SnapKV(ratio, window=64)}


def aware_policies(scorer, ratio: float, window: int) -> dict:
    return {"Learned": P.Learned(scorer, ratio, window=window, sinks=4), "SnapKV": P.SnapKV(ratio, window=window)}


def run(params, samples, pols: dict, mode: str, batch: int, seed: int, done: dict, save, log):
    names = list(pols)
    for bi in range(0, len(samples), batch):
        key = f"{mode}|{bi}"
        if key in done:
            continue
        chunk = samples[bi:bi + batch]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - real)  # one compile per batch shape
        max_new = max(MAX_NEW[s.task] for s in chunk)
        t0 = time.perf_counter()
        pres, t_pre = prefill_shared(params, chunk, mode, [pols[n] for n in names], max_new, seed)
        rows = {}

        def on_cell(i, texts, figures, dt):
            rows[names[i]] = [dict(seed=s.seed, depth=s.depth, correct=ruler.score(s, t).all_present, text=t)
                              for s, t in zip(chunk[:real], texts[:real])]

        decode_all(params, pres, chunk, real, max_new, seed, lambda s: MAX_NEW[s.task], on_cell)
        done[key] = rows
        save()
        right = {n: sum(r["correct"] for r in rows[n]) for n in names}
        log(f"[{mode} batch {bi // batch + 1}/{-(-len(samples) // batch)}] prefill {t_pre:.0f} s, all "
            f"{time.perf_counter() - t0:.0f} s; right: {right}")


def collect(done: dict, mode: str) -> dict:
    out: dict = {}
    for key in sorted((k for k in done if k.startswith(mode + "|")), key=lambda k: int(k.split("|")[1])):
        for name, rows in done[key].items():
            out.setdefault(name, []).extend(r["correct"] for r in rows)
    return out


def summarise(done: dict) -> dict:
    res: dict = {}
    for mode in ("agnostic", "aware"):
        flags = collect(done, mode)
        if not flags:
            continue
        acc = {n: vars(stats.proportion(f)) for n, f in flags.items()}
        tests = {}
        if mode == "agnostic":
            for base in [n for n in flags if n not in ("Full", "Learned", "AdaKV(Learned)")]:
                tests[f"Learned vs {base}"] = vars(stats.mcnemar(flags["Learned"], flags[base], "greater"))
            tests["AdaKV(Learned) vs Learned"] = vars(stats.mcnemar(flags["AdaKV(Learned)"], flags["Learned"]))
        else:
            tests["Learned vs SnapKV"] = vars(stats.mcnemar(flags["Learned"], flags["SnapKV"]))
        res[mode] = dict(accuracy=acc, tests=tests, n=len(next(iter(flags.values()))))
    return res


def by_depth(done: dict, mode: str, edges=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Accuracy of each policy by the needle's depth in the context (quarters): {name: [(right, n), ...]}."""
    out: dict = {}
    for key in (k for k in done if k.startswith(mode + "|")):
        for name, rows in done[key].items():
            cells = out.setdefault(name, [[0, 0] for _ in edges[1:]])
            for r in rows:
                q = min(sum(r["depth"] >= e for e in edges[1:-1]), len(edges) - 2)
                cells[q][0] += bool(r["correct"])
                cells[q][1] += 1
    return out


def markdown(meta: dict, res: dict, done: dict | None = None) -> str:
    lines = [f"# Learned scorer vs baselines ({meta['model']}, {meta['task']} at {meta['length']} tokens, "
             f"budget {meta['ratio']:.0%} of the context)", "",
             f"Scorer: `{meta['scorer']}` ({meta['scorer_meta']['kind']}, features {meta['scorer_meta']['features']}, "
             f"target {meta['scorer_meta']['target']}; trained in {meta['scorer_meta']['train'].get('total_seconds')} s "
             f"on {meta['scorer_meta']['train'].get('texts')} texts). Learned keeps a window of {meta['window']} and "
             "4 sinks. Accuracy: all answers present (RULER scoring), Wilson 95% intervals. McNemar exact tests on "
             "the same prompts. Produced by `benchmarks/learned_quality.py`; nothing here is edited by hand.", ""]
    for mode, r in res.items():
        lines += [f"## {mode} (n = {r['n']})", "", "| policy | accuracy | 95% interval |", "|---|---|---|"]
        for n, a in r["accuracy"].items():
            lines.append(f"| {n} | {a['value']:.2f} ({a['successes']}/{a['n']}) | [{a['low']:.2f}, {a['high']:.2f}] |")
        lines += ["", "| test | wins | losses | difference | p |", "|---|---|---|---|---|"]
        for n, t in r["tests"].items():
            lines.append(f"| {n} ({t['alternative']}) | {t['wins']} | {t['losses']} | {t['difference']:+.2f} | "
                         f"{t['p_value']:.3g} |")
        lines.append("")
        depth = by_depth(done or {}, mode)
        if depth:
            lines += ["Right / prompts by the needle's depth in the context:", "",
                      "| policy | 0-25% | 25-50% | 50-75% | 75-100% |", "|---|---|---|---|---|"]
            lines += [f"| {n} | " + " | ".join(f"{a}/{b}" for a, b in cells) + " |" for n, cells in depth.items()]
            lines.append("")
    lines += ["## Targets (issue 16)", ""]
    if "agnostic" in res:
        acc = {n: a["value"] for n, a in res["agnostic"]["accuracy"].items()}
        bases = {n: v for n, v in acc.items() if n not in ("Full", "Learned", "AdaKV(Learned)")}
        best = max(bases, key=bases.get)
        gap = acc["Learned"] - bases[best]
        p = res["agnostic"]["tests"][f"Learned vs {best}"]["p_value"]
        ok = gap >= 0.10 and p < 0.05
        lines.append(f"- Query-agnostic: Learned {acc['Learned']:.2f} vs the best baseline {best} {bases[best]:.2f}: "
                     f"{gap * 100:+.0f} points (target >= +10 with a paired test; McNemar p = {p:.3g}): "
                     f"{'met' if ok else 'MISSED by ' + format(max(0.10 - gap, 0) * 100, '.0f') + ' points' + ('' if p < 0.05 else ', not significant')}.")
        d = acc["AdaKV(Learned)"] - acc["Learned"]
        lines.append(f"- AdaKV(Learned) {acc['AdaKV(Learned)']:.2f} vs Learned {acc['Learned']:.2f} ({d * 100:+.0f} points): "
                     f"{'met' if d >= 0 else 'MISSED'} (target: at least as good).")
    if "aware" in res:
        acc = {n: a["value"] for n, a in res["aware"]["accuracy"].items()}
        d = acc["Learned"] - acc["SnapKV"]
        lines.append(f"- Query-aware: Learned {acc['Learned']:.2f} vs SnapKV {acc['SnapKV']:.2f} ({d * 100:+.0f} points): "
                     f"{'met' if d >= -0.02 else 'MISSED by ' + format((-0.02 - d) * 100, '.0f') + ' points'} "
                     "(target: no worse than SnapKV by more than 2 points).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scorer", default=None, help="default: configs/scorers/<model>")
    ap.add_argument("--task", default="niah_single", help="a RULER task, or facts: held-out fact essays "
                    "(kvjax.learned.texts.fact_samples), to compare scorers without touching the needle test")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--samples", type=int, default=50, help="query-agnostic prompts")
    ap.add_argument("--aware-samples", type=int, default=20, help="query-aware prompts (0: skip)")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7000, help="first sample seed (training never saw a needle task)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/learned_<model>")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    path, md_path = result_paths(args.model, args.out)
    args.scorer = args.scorer or f"configs/scorers/{args.model}"
    params = kvjax.load(args.model, dtype="float32")
    scorer = kvjax.load_scorer(args.scorer)
    meta = dict(model=args.model, scorer=args.scorer, task=args.task, length=args.length, ratio=args.ratio,
                window=args.window, seed=args.seed, scorer_meta=scorer.meta.to_dict())
    done = {}
    if path.exists() and not args.force:
        old = json.loads(path.read_text())
        if old.get("meta") == meta:
            done = old.get("batches", {})

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(meta=meta, summary=summarise(done), batches=done), indent=1) + "\n")

    def log(msg):
        print(msg, flush=True)

    tok = params.tokenizer
    if args.task == "facts":  # validation on held-out texts of the training kind, not the needle test
        agn = fact_samples(tok, args.samples, args.length, seed=args.seed)
    else:
        agn = ruler.make_samples(args.task, args.length, tok, args.samples, seed=args.seed, fit="context")
    run(params, agn, agnostic_policies(scorer, args.ratio, args.window), "agnostic", args.batch, args.seed, done,
        save, log)
    if args.aware_samples:
        aw = (fact_samples(tok, args.aware_samples, args.length, seed=args.seed) if args.task == "facts" else
              ruler.make_samples(args.task, args.length, tok, args.aware_samples, seed=args.seed, fit="prompt"))
        run(params, aw, aware_policies(scorer, args.ratio, args.window), "aware", args.batch, args.seed, done,
            save, log)
    save()
    res = summarise(done)
    md_path.write_text(markdown(meta, res, done))
    print(markdown(meta, res, done))


if __name__ == "__main__":
    main()
