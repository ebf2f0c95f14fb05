"""What a user gets from `kvjax.generate` with each policy's defaults, side by side in one run.

    python benchmarks/policies_e2e.py [--out benchmarks/results] [--policies snapkv,cake,...]
                                      [--prompts 8] [--length 16384] [--new 128] [--budget 1024] [--tiny]

Llama-3.1-8B's shape with random bf16 weights in per-layer buffers (as `kvjax.load` keeps them on
GPU), `--prompts` prompts of different lengths just under `--length` tokens (one length bucket),
`--new` greedy tokens (EOS disabled, so every row generates all of them), `--budget` tokens per
head. Each policy is called twice with the same prompts: the first call's wall time includes
compiling its programs ("first call s"); the second call gives prefill seconds and decode tokens/s
(`generate(...).stats`, the library's own timers: device-synchronised). Ratios against SnapKV at
the same budget and batch, and the issue's targets: decode >= 90% of SnapKV's tokens/s, prefill
<= 1.3x, first call <= 2x.

Writes policies_e2e_<device>.json (after every policy: a killed run keeps what it measured) and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _shapes  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def policy_table(budget: int):
    from kvjax import policies as P

    return {
        "Full": P.Full(),
        "SnapKV": P.SnapKV(budget=budget),
        "AdaKV(SnapKV)": P.AdaKV(P.SnapKV(budget=budget)),
        "PyramidKV": P.PyramidKV(budget=budget),
        "KNorm": P.KNorm(budget=budget),
        "StreamingLLM": P.StreamingLLM(budget=budget),
        "CAKE": P.CAKE(budget=budget),
        "H2O": P.H2O(budget=budget),
        "TOVA": P.TOVA(budget=budget),
        "RoCo": P.RoCo(budget=budget),
    }


def markdown(meta, rows) -> str:
    ref = next((r for r in rows if r["policy"] == "SnapKV"), None)
    lines = [f"# Every policy through `kvjax.generate`, {meta['device']} (jax {meta['jax']})", "",
             f"{meta['model']}, {meta['prompts']} prompts of {min(meta['lengths'])}-{max(meta['lengths'])} tokens, "
             f"{meta['new_tokens']} new tokens (greedy), {meta['budget']} tokens per head, each policy's defaults. "
             "Second call timed (`generate(...).stats`); first call = compile + run. Targets against SnapKV: "
             "decode >= 0.9x, prefill <= 1.3x, first call <= 2x. Made by `benchmarks/policies_e2e.py`.", "",
             "| policy | prefill s | decode tokens/s | first call s | decode / SnapKV | prefill / SnapKV | "
             "first call / SnapKV | targets |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['policy']} | error: {r['error'][:120]} | | | | | | |")
            continue
        cells = ["", "", "", ""]
        if ref is not None and "error" not in ref:
            d = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            p = r["prefill_s"] / ref["prefill_s"]
            f = r["first_call_s"] / ref["first_call_s"]
            missed = [name for name, ok in (("decode", d >= 0.9), ("prefill", p <= 1.3), ("first call", f <= 2.0))
                      if not ok]
            verdict = "met" if not missed else "missed: " + ", ".join(missed)
            if r["policy"] in ("Full", "SnapKV"):
                verdict = "(reference)" if r["policy"] == "SnapKV" else "(no budget)"
            cells = [f"{d:.2f}x", f"{p:.2f}x", f"{f:.2f}x", verdict]
        lines.append(f"| {r['policy']} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.0f} | "
                     f"{r['first_call_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--policies", default=None, help="comma-separated names from the table (default: all)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--deadline-s", type=float, default=float("inf"), help="start no new policy after this")
    ap.add_argument("--weights", default="packed", choices=("packed", "unstacked"),
                    help="packed: q|k|v and gate|up packed, as kvjax.load leaves them on GPU; unstacked: apart")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--tiny", action="store_true", help="a miniature on CPU (checks the script)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import kvjax
    from kvjax.io.checkpoint import Params
    from kvjax.models import ModelConfig

    base = dict(_shapes.TINY if args.tiny else _shapes.LLAMA31_8B, eos_token_id=[])  # no early stops
    cfg = ModelConfig.from_hf_dict(base)
    weights = _shapes.random_weights(cfg, jnp.float32 if args.tiny else jnp.bfloat16, unstacked=True,
                                     packed=args.weights == "packed")
    params = Params(cfg, weights, tokenizer=None)
    rng = np.random.default_rng(0)
    step = max(1, args.length // 100)
    lengths = [args.length - step * i for i in range(args.prompts)]
    prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32).tolist() for n in lengths]
    table = policy_table(args.budget)
    names = list(table) if args.policies is None else [n.strip() for n in args.policies.split(",")]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"--policies: unknown {unknown}; known: {list(table)}")
    meta = _shapes.device_meta()
    model = f"Llama-3.1-8B shapes (random bf16 weights, per-layer buffers, {args.weights})"
    meta.update(model=model if not args.tiny else "tiny",
                prompts=args.prompts, lengths=lengths, new_tokens=args.new, budget=args.budget,
                weights_layout=args.weights)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny_" if args.tiny else "") + _shapes.device_slug() + args.tag
    rows = []
    for name in names:
        if time.perf_counter() - t_start > args.deadline_s:
            print(f"deadline: {name} not run", flush=True)
            continue
        pol = table[name]
        try:
            t0 = time.perf_counter()
            first = kvjax.generate(params, prompts, policy=pol, max_new_tokens=args.new)
            first_s = time.perf_counter() - t0
            second = kvjax.generate(params, prompts, policy=pol, max_new_tokens=args.new)
            st = second.stats
            rows.append(dict(policy=name, prefill_s=st["prefill_s"], decode_s=st["decode_s"],
                             decode_tokens_per_s=st["decode_tokens_per_s"], first_call_s=first_s,
                             first_prefill_s=first.stats["prefill_s"], first_decode_s=first.stats["decode_s"],
                             second_compiled=st["compiled"], generated=sum(st["generated_lengths"]),
                             cache_bytes=st["cache_bytes"], first_tokens=second.tokens[0][:8]))
        except Exception as e:  # noqa: BLE001 (one policy's failure is a row, not the end of the run)
            rows.append(dict(policy=name, error=f"{type(e).__name__}: {e}"))
        print(json.dumps(rows[-1]), flush=True)
        jax.clear_caches()
        (out / f"policies_e2e_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / f"policies_e2e_{slug}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
