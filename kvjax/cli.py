"""Command line: `kvjax demo`, `kvjax profile`, `kvjax run` (also `python -m kvjax ...`).

A mistake in what the user asked for (a bad option, a missing file, an unusable checkpoint) prints
one line on stderr and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

#: where the repository ships files that commands must not overwrite without --force
SHIPPED = (pathlib.Path(__file__).resolve().parents[1] / "configs",)


def demo(args) -> int:
    """The embedded model answers a question about a long document, full cache vs compressed."""
    import kvjax
    from kvjax.eval.passkey import passkey_prompt

    print("loading the embedded SmolLM2-135M-Instruct (converted once from its GGUF) ...", flush=True)
    params = kvjax.load("smollm2-135m", dtype="float32")
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


def writable(path: pathlib.Path, force: bool) -> pathlib.Path:
    """The output path, unless it exists and --force was not given (shipped files never without it)."""
    path = path.resolve()
    if path.exists() and not force:
        shipped = any(root in path.parents for root in SHIPPED)
        raise FileExistsError(f"{path} exists{' and ships with kvjax' if shipped else ''}: "
                              "choose another --output/--out or pass --force to overwrite it")
    return path


def profile(args) -> int:
    """XKV profiling: per-layer budgets for a total, written as JSON (see kvjax/xkv/profile.py)."""
    import jax.numpy as jnp

    import kvjax
    from kvjax.xkv.profile import default_path, profile as run_profile, uniform_retention

    name = pathlib.Path(args.model).resolve().name if pathlib.Path(args.model).exists() else args.model
    out = writable(pathlib.Path(args.output or default_path(name, args.total, args.out)), args.force)
    print(f"loading {args.model} ...", flush=True)
    params = kvjax.load(args.model, dtype=jnp.dtype(args.dtype))
    cfg = params.config
    print(f"profiling {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads on {args.prompts} prompts of "
          f"~{args.tokens} tokens (seed {args.seed}, window {args.window}, metric {args.metric}) ...", flush=True)
    prof = run_profile(params, args.prompts, args.total, window=args.window, seed=args.seed, metric=args.metric,
                       n_tokens=args.tokens, name=name, progress=not args.quiet)
    path = prof.save(out)
    print(f"solver: {prof.solver}; summed retention {prof.retention:.4f} "
          f"(uniform {args.total // cfg.num_layers} per layer: ~{uniform_retention(prof):.4f})")
    print("per-layer budgets (tokens per KV head, window included):")
    print(" ".join(f"{l}:{b}" for l, b in enumerate(prof.budgets)))
    print(f"sum {sum(prof.budgets)} of {args.total}; wrote {path}")
    return 0


def run(args) -> int:
    """A batch job: every line of --input under the config's policies, records appended to --output
    (resumed when it exists; see kvjax/jobs/)."""
    from kvjax.jobs import run_job

    summary = run_job(args.config, args.input, args.output, quiet=args.quiet, force=args.force)
    print("\n".join(f"kvjax run: {line}" for line in summary.lines()), flush=True)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    from kvjax import __version__

    ap = argparse.ArgumentParser(prog="kvjax", description="KV-cache eviction for LLM inference in JAX.")
    ap.add_argument("--version", action="version", version=f"kvjax {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="answer a question about a long document with the embedded model")
    d.add_argument("--repeats", type=_positive, default=70, help="filler repetitions (~23 tokens each)")
    d.add_argument("--budget", type=_positive, default=256, help="tokens kept per KV head")
    d.add_argument("--max-new-tokens", type=_positive, default=8)
    d.set_defaults(func=demo)
    p = sub.add_parser("profile", help="XKV: profile per-layer budgets for a total and write them as JSON")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or checkpoint directory")
    p.add_argument("--total", type=_positive, required=True,
                   help="tokens per KV head summed over layers, windows included (e.g. 128 x layers)")
    p.add_argument("--prompts", type=_positive, default=8, help="synthetic prompts to profile on")
    p.add_argument("--tokens", type=_positive, default=2048, help="tokens per prompt (about)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=_positive, default=32, help="observation window, kept by every layer")
    p.add_argument("--metric", default="mass", choices=("mass", "oracle"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default="configs/budgets", help="folder of <model>-<total>.json")
    p.add_argument("--output", default=None, help="exact output file (overrides --out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=profile)
    r = sub.add_parser("run", help="a batch job: a JSONL of prompts (or contexts and questions) under one or more "
                       "policies, one JSON record per answer; resumes an interrupted output")
    r.add_argument("config", help="the job's YAML config (configs/jobs/*.yaml shows every key)")
    r.add_argument("--input", required=True, help='JSONL: {"id", "prompt"} or {"id", "context", "questions"} a line')
    r.add_argument("--output", required=True, help="JSONL of records; an existing one is resumed (done records "
                   "are skipped)")
    r.add_argument("--force", action="store_true", help="start the output over instead of resuming it")
    r.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    r.set_defaults(func=run)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from kvjax.errors import KvjaxError

    try:
        return args.func(args)
    except (KvjaxError, FileNotFoundError, FileExistsError, ModuleNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"kvjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
