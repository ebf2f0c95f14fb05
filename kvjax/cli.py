"""Command line: `kvjax demo` (and `python -m kvjax.cli demo`)."""

from __future__ import annotations

import argparse
import sys


def demo(args) -> int:
    """The embedded model answers a question about a long document, full cache vs compressed."""
    import jax.numpy as jnp

    import kvjax
    from kvjax.eval.passkey import passkey_prompt

    print("loading the embedded SmolLM2-135M-Instruct (converted once from its GGUF) ...", flush=True)
    params = kvjax.load("smollm2-135m", dtype=jnp.float32)
    document = passkey_prompt(key="68451", depth=0.4, n_repeats=args.repeats)
    n = len(params.tokenizer.encode(document))
    print(f"document: {n} tokens, a pass key hidden 40% of the way in; question at the end\n")
    runs = [("full cache", None), (f"KNorm, {args.budget} tokens/head", kvjax.policies.KNorm(budget=args.budget)),
            (f"SnapKV, {args.budget} tokens/head", kvjax.policies.SnapKV(budget=args.budget))]
    for name, policy in runs:
        out = kvjax.generate(params, document, policy=policy, max_new_tokens=args.max_new_tokens)
        out = kvjax.generate(params, document, policy=policy, max_new_tokens=args.max_new_tokens)  # warm
        s = out.stats
        print(f"[{name}] answer: {out.text[0].strip()!r}")
        print(
            f"    cache held: {s['cache_bytes'] / 2**20:.1f} MiB ({s['live_tokens'][0]} live token slots over "
            f"{params.config.num_layers} layers x {params.config.num_kv_heads} KV heads), "
            f"decode {s['decode_tokens_per_s']:.1f} tokens/s, prefill {s['prefill_s']:.2f} s"
        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="answer a question about a long document with the embedded model")
    d.add_argument("--repeats", type=int, default=70, help="filler repetitions (~23 tokens each)")
    d.add_argument("--budget", type=int, default=256, help="tokens kept per KV head")
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
