"""What RoCo's prefill chunk costs: the tokens each chunk size keeps against EasyKV's own encoding.

    python benchmarks/roco_chunk_fidelity.py [--model qwen2.5-0.5b] [--length 2048] [--texts 4]
                                             [--budgets 128,256] [--chunks 1,8,32,64,128,256]
                                             [--out benchmarks/results] [--tiny]

RoCo (EasyKV) encodes a prompt `stride` tokens at a time, evicting back to the budget K after each
step; kvjax's `RoCo(chunk=c)` does the same c tokens at a time (`chunk=1` is EasyKV's step, stride 1),
and a larger chunk keeps the GPU busier (benchmarks/roco_prefill_gpu.py). This script prefills essay
texts (the haystack of the quality study, exactly --length tokens) with `RoCo(budget=K, chunk=c)` on
the CPU in float32 and reports, against chunk 1:

- kept overlap: per (layer, sequence, KV head) stream, |kept_c & kept_1| / |kept_1|, averaged over
  streams (1.0 = the same tokens);
- logit agreement: the last prompt token's argmax equal to chunk 1's, and the KL divergence of
  chunk 1's next-token distribution from chunk c's (both after the full prompt, which every chunk
  reads whole: the difference is what the evictions changed, not what the last chunk saw).

Writes roco_chunk_fidelity_<model>.json (after every setting: a killed run keeps what it measured)
and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import kvjax  # noqa: E402
from kvjax import policies as P  # noqa: E402
from kvjax.eval import haystack  # noqa: E402


def texts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n essay spans of exactly `length` tokens (the quality study's haystack)."""
    corpus = haystack.resolve("auto")
    out = []
    for i in range(n):
        ids = tokenizer.encode(haystack.span(corpus, length * 8, seed + i).text)[:length]
        if len(ids) < length:
            raise ValueError(f"essay span {seed + i} gave {len(ids)} tokens < {length}")
        out.append(ids)
    return out


def run_one(params, prompts, budget: int, chunk: int):
    """(kept positions [l][b][h], last-token log-probabilities [B, V]) after RoCo's prefill."""
    pre = kvjax.prefill(params, prompts, P.RoCo(budget=budget, chunk=chunk), max_new_tokens=1)
    logits = np.asarray(pre.logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    return kvjax.kept_positions(pre.cache), logp


def compare(ref, got) -> dict:
    (kr, lr), (kg, lg) = ref, got
    overlap = [len(np.intersect1d(a, b)) / max(len(a), 1) for la, lb in zip(kr, kg) for ba, bb in zip(la, lb)
               for a, b in zip(ba, bb)]
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    return dict(kept_overlap=float(np.mean(overlap)), kept_overlap_min=float(np.min(overlap)),
                same_argmax=float((lr.argmax(-1) == lg.argmax(-1)).mean()), kl_mean=float(kl.mean()),
                kl_max=float(kl.max()), streams=len(overlap))


def markdown(res) -> str:
    m = res["meta"]
    lines = [f"# RoCo's prefill chunk against EasyKV's stride-1 encoding: {m['model']} (CPU, float32)", "",
             f"{m['texts']} essay texts of {m['length']} tokens, `RoCo(budget=K, chunk=c)` prefilled (EasyKV's "
             "defaults otherwise), compared with chunk 1 (EasyKV's stride 1). Kept overlap: the share of chunk 1's "
             "kept tokens that chunk c keeps, per (layer, sequence, KV head) stream, mean (min); argmax and KL: "
             "the last prompt token's next-token distribution, KL(chunk 1 || chunk c) in nats. Made by "
             "`benchmarks/roco_chunk_fidelity.py`.", "",
             "| budget K | chunk | kept overlap, mean (min) | same argmax | KL mean (max) | prefill s |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['chunk']} | error: {r['error'][:120]} | | | |")
            continue
        lines.append(f"| {r['budget']} | {r['chunk']} | {r['kept_overlap']:.3f} ({r['kept_overlap_min']:.3f}) | "
                     f"{100 * r['same_argmax']:.0f}% | {r['kl_mean']:.2e} ({r['kl_max']:.2e}) | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=None, help="default 2048 (tiny: 256)")
    ap.add_argument("--texts", type=int, default=None, help="default 4 (tiny: 2)")
    ap.add_argument("--budgets", default=None, help="default 128,256 (tiny: 64)")
    ap.add_argument("--chunks", default=None, help="default 1,8,32,64,128,256 (tiny: 1,16,64); 1 is the reference")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiny", action="store_true", help="SmolLM2 on short texts (checks the script)")
    args = ap.parse_args(argv)
    model = "smollm2-135m" if args.tiny else args.model
    length = args.length or (256 if args.tiny else 2048)
    n = args.texts or (2 if args.tiny else 4)
    budgets = [int(x) for x in (args.budgets or ("64" if args.tiny else "128,256")).split(",")]
    chunks = [int(x) for x in (args.chunks or ("1,16,64" if args.tiny else "1,8,32,64,128,256")).split(",")]
    if chunks[0] != 1:
        raise SystemExit(f"--chunks must start with 1 (the reference), got {args.chunks!r}")
    params = kvjax.load(model, dtype="float32")
    prompts = texts(params.tokenizer, n, length)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"roco_chunk_fidelity_{'tiny_' if args.tiny else ''}{model}"
    res = dict(meta=dict(model=model, length=length, texts=n, jax=jax.__version__), rows=[])
    for k in budgets:
        ref = None
        for c in chunks:
            t0 = time.perf_counter()
            try:
                got = run_one(params, prompts, k, c)
            except Exception as e:  # noqa: BLE001 (one setting's failure is a row)
                res["rows"].append(dict(budget=k, chunk=c, error=f"{type(e).__name__}: {e}"[:400]))
                if c == 1:
                    break  # no reference for this budget
                continue
            dt = time.perf_counter() - t0
            ref = got if c == 1 else ref
            row = dict(budget=k, chunk=c, seconds=dt, **compare(ref, got))
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / f"{name}.json").write_text(json.dumps(res, indent=1))
            (out / f"{name}.md").write_text(markdown(res))
            jax.clear_caches()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
