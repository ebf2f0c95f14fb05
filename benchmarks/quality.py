"""Quality that tells methods apart: RULER-style tasks under ratio budgets, every policy, paired tests.

    python benchmarks/quality.py --model qwen2.5-0.5b                  # the whole study for one model
    python benchmarks/quality.py --model qwen2.5-0.5b --resume         # continue an interrupted run
    python benchmarks/quality.py --model smollm2-135m --quick --out /tmp/q   # a few minutes, a smoke test
    python benchmarks/quality.py --report-only benchmarks/results/quality_qwen2.5-0.5b.json

Tasks (kvjax.eval.ruler): needles (single, multi-key, multi-value, multi-query), variable tracking,
common-words extraction; raw completion prompts with exactly `length` tokens: the prompt
(query-aware, context + question compressed together) or the context (query-agnostic: the context
is compressed alone, then the question is fed through the compressed cache). Score: RULER's
string-match-all (kvjax.eval.scoring); a prompt counts as right when every expected string is in the
continuation (the `fraction` found is kept too). Budgets: ratios of the compressed text (quality_grid).

Each (length, mode) runs its samples in batches; for each batch, the policies share prompt passes
(quality_shared: kvjax.prefill with a list of policies, grouped so their pools fit --pool-gib), RoCo
gets its own chunked pass per ratio, and every policy decodes greedily. After every pass the result
file is rewritten; a rerun with --resume skips every (prompt, policy, ratio) already in it. Then the
perplexity part (quality_ppl) and the report (quality_report: markdown with Wilson intervals, exact
McNemar tests, the targets' verdicts, the decision table; plots).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402

import kvjax  # noqa: E402
from kvjax import prompts as kp  # noqa: E402
from kvjax.eval import ruler  # noqa: E402
from quality_grid import EXTRA_POLICIES, FULL, MODELS, MODES, POLICIES, RATIOS, chunked, groups  # noqa: E402
from quality_grid import check_options, known_policy, make_policy, needs_profile, split_top  # noqa: E402
from quality_grid import pool_bytes, window_for  # noqa: E402
from quality_ppl import PPL_POLICIES, PPL_RATIOS, run_ppl  # noqa: E402
from quality_profiles import get_profile  # noqa: E402
from quality_shared import decode_all, max_new_for, prefill_alone, prefill_shared, release_executables  # noqa: E402
from quality_shared import rss_gib  # noqa: E402
from quality_store import Store, load  # noqa: E402

TASKS = tuple(ruler.TASKS)


def batches(items, size):
    """Chunks of `size`; the last is padded with copies of its last item (one compile per length)."""
    out = []
    for i in range(0, len(items), size):
        chunk = list(items[i:i + size])
        real = len(chunk)
        out.append((chunk + [chunk[-1]] * (size - real), real))
    return out


def batch_size(args, length: int) -> int:
    """Prompts per batch: --batch-tokens worth, at most every prompt of a (length, mode)."""
    return max(1, min(args.batch_tokens // length, len(args.tasks) * args.samples))


def sample_seed(seed: int, length: int) -> int:
    """First sample seed of a length (samples draw seed, seed + 1, ...)."""
    return seed * 100_000 + length


def build_samples(tok, tasks, length, mode, n, seed):
    fit = "prompt" if mode == "aware" else "context"
    out = []
    for task in tasks:
        out += ruler.make_samples(task, length, tok, n, seed=sample_seed(seed, length), fit=fit)
    return out


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return None


def run_retrieval(params, store: Store, args, log):
    tok = params.tokenizer
    cells = [(FULL, None)] + [(p, r) for p in args.policies for r in args.ratios]
    n = len(args.tasks) * args.samples
    plan_batches = {(L, m): batches(list(range(n)), batch_size(args, L)) for L in args.lengths for m in args.modes}
    total = sum(min(len(b), args.limit_batches or len(b)) for b in plan_batches.values())
    bar = _progress(total, f"{args.model} retrieval")
    say = bar.write if bar is not None else log
    skipped = store.extra.setdefault("skipped", {})
    profiles: dict = {}
    for L in args.lengths:
        for mode in args.modes:
            samples = build_samples(tok, args.tasks, L, mode, args.samples, args.seed)
            bsz = batch_size(args, L)
            for bi, (chunk, real) in enumerate(batches(samples, bsz)):
                if args.limit_batches and bi >= args.limit_batches:
                    break
                reals = chunk[:real]
                pending = [(n, r) for n, r in cells
                           if any(not store.has(s.task, L, s.seed, mode, n, r) for s in reals)]
                built = []
                for name, ratio in pending:
                    w = window_for(ratio or 1.0, L, args.window)
                    prof = None
                    if needs_profile(name):
                        if (L, ratio) not in profiles:
                            profiles[(L, ratio)], info = get_profile(params, args.model, L, ratio, window=w,
                                                                     seed=args.profile_seed,
                                                                     n_prompts=args.profile_prompts, log=say,
                                                                     folder=pathlib.Path(args.out) / "profiles")
                            store.profiles[f"{L}|{ratio}"] = info
                        prof = profiles[(L, ratio)]
                    pol, why = make_policy(name, ratio, window=w, profile=prof, model=args.model)
                    if pol is None:
                        skipped[f"{name}|{ratio}|{L}"] = why
                        say(f"skip {name}@{ratio} at {L}: {why}")
                        continue
                    built.append((name, ratio, pol))
                if built:
                    run_batch(params, store, args, L, mode, chunk, real, built, say)
                if bar is not None:
                    bar.set_postfix_str(f"{L} {mode} batch {bi + 1}, rss {rss_gib():.1f} GiB")
                    bar.update(1)
    if bar is not None:
        bar.close()


def run_batch(params, store: Store, args, L, mode, chunk, real, built, say):
    cfg = params.config
    max_new = max_new_for(chunk, args.max_new_tokens)
    q_bucket = 0
    if mode == "agnostic":
        q_bucket = kp.new_tokens_bucket(max(len(params.tokenizer.encode(s.question, add_special_tokens=False))
                                            for s in chunk))
    headroom = kp.new_tokens_bucket(max_new) + q_bucket
    bucket = kp.length_bucket(L, cfg.max_position_embeddings)
    shared = [b for b in built if not chunked(b[0])]
    alone = [b for b in built if chunked(b[0])]
    sizes = [pool_bytes(p, cfg, bucket, headroom, len(chunk)) for _, _, p in shared]
    limit = int(args.pool_gib * 2**30)
    limit_of = (lambda s: args.max_new_tokens) if args.max_new_tokens else (lambda s: ruler.MAX_NEW_TOKENS[s.task])
    units = [("shared", g) for g in groups(shared, sizes, limit)] + [("alone", [b]) for b in alone]
    for kind, group in units:
        decode_s, right = [], []

        def on_cell(i, texts, figures, dt, group=group):
            name, ratio, _ = group[i]
            decode_s.append(dt)
            for s, text in zip(chunk[:real], texts[:real]):
                sc = ruler.score(s, text)
                store.add(dict(task=s.task, length=L, seed=s.seed, mode=mode, policy=name, ratio=ratio,
                               fraction=sc.fraction, correct=sc.all_present, depth=s.depth, answers=list(s.answers),
                               text=text, n_tokens=s.n_tokens if mode == "aware" else s.context_tokens))
                right.append(sc.all_present)
            store.add_cell(dict(length=L, mode=mode, policy=name, ratio=ratio, **figures))

        pols = [p for _, _, p in group]
        if kind == "shared":
            pres, t_pre = prefill_shared(params, chunk, mode, pols, max_new, args.seed)
        else:
            pres, t_pre = prefill_alone(params, chunk, mode, pols[0], max_new, args.seed)
        decode_all(params, pres, chunk, real, max_new, args.seed, limit_of, on_cell)
        del pres
        store.time(kind=kind, length=L, mode=mode, batch=len(chunk), real=real, cells=len(group), max_new=max_new,
                   policies=sorted({n for n, _, _ in group}), prefill_s=round(t_pre, 1),
                   decode_s=round(sum(decode_s), 1), rss_gib=round(rss_gib(), 2))
        store.save()
        say(f"[{L} {mode}] {kind} pass, {len(group)} cells x {real} prompts: prefill {t_pre:.0f} s, decode "
            f"{sum(decode_s):.0f} s, {sum(right)}/{len(right)} right")
        release_executables(say)


# ------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    ap.add_argument("--lengths", default=None, help="comma list of prompt lengths (default: the model's)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--samples", type=int, default=None, help="prompts per (task, length) (default: the model's)")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma list (Full always runs)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--parts", default="retrieval,ppl", help="retrieval, ppl, or both")
    ap.add_argument("--resume", action="store_true", help="continue an existing result file (skip what it holds)")
    ap.add_argument("--report-only", default=None, metavar="JSON", help="render the report of a result file")
    ap.add_argument("--pairs", default="", metavar="A:B,...",
                    help="more paired comparisons for the report (policy A against policy B, e.g. 'TOVA:H2O')")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2K tokens, 1 prompt per task, ratios 0.1 and 0.5, a short perplexity part")
    ap.add_argument("--limit-batches", type=int, default=0, help="at most this many batches per (length, mode)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="prompt tokens per batch (default: the model's)")
    ap.add_argument("--pool-gib", type=float, default=6.0, help="most pool memory of one shared prompt pass")
    ap.add_argument("--window", type=int, default=32, help="observation / recent window of windowed policies")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: kvjax.eval.ruler.MAX_NEW_TOKENS")
    ap.add_argument("--profile-prompts", type=int, default=4, help="synthetic prompts per XKV profile")
    ap.add_argument("--profile-seed", type=int, default=0)
    ap.add_argument("--ppl-policies", default=",".join(PPL_POLICIES))
    ap.add_argument("--ppl-ratios", default=",".join(map(str, PPL_RATIOS)))
    ap.add_argument("--ppl-length", type=int, default=None)
    ap.add_argument("--ppl-texts", type=int, default=None)
    ap.add_argument("--ppl-chunk", type=int, default=1, help="tokens per step of kvjax.perplexity (RoCo, H2O)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--jax-cache", default=None, help="persistent XLA cache dir ('none' disables)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file name suffix (default '_quick' with --quick)")
    args = ap.parse_args(argv)
    d = MODELS[args.model]
    if args.quick:
        args.lengths = args.lengths or "2048"
        args.samples = args.samples or 1
        args.ratios = "0.1,0.5" if args.ratios == ",".join(map(str, RATIOS)) else args.ratios
        args.ppl_length = args.ppl_length or 512
        args.ppl_texts = args.ppl_texts or 2
        args.ppl_ratios = "0.25" if args.ppl_ratios == ",".join(map(str, PPL_RATIOS)) else args.ppl_ratios
        args.profile_prompts = min(args.profile_prompts, 2)
        args.tag = "_quick" if args.tag is None else args.tag
    args.lengths = [int(x) for x in split_top(args.lengths)] if args.lengths else list(d.lengths)
    args.samples = args.samples or d.samples
    args.batch_tokens = args.batch_tokens or d.batch_tokens
    args.ppl_length = args.ppl_length or d.ppl_length
    args.ppl_texts = args.ppl_texts or d.ppl_texts
    args.tasks = split_top(args.tasks)
    args.ratios = [float(x) for x in split_top(args.ratios)]
    args.ppl_ratios = [float(x) for x in split_top(args.ppl_ratios)]
    args.policies = split_top(args.policies)
    args.ppl_policies = split_top(args.ppl_policies)
    args.modes = split_top(args.modes)
    args.parts = split_top(args.parts)
    for name, values, known in (("--tasks", args.tasks, TASKS), ("--modes", args.modes, MODES),
                                ("--parts", args.parts, ("retrieval", "ppl")),
                                ("--ppl-policies", args.ppl_policies, PPL_POLICIES)):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"{name}: unknown {bad}; known: {', '.join(known)}")
    bad = [v for v in args.policies if not known_policy(v)]
    if bad:
        ap.error(f"--policies: unknown {bad}; known: {', '.join(POLICIES + EXTRA_POLICIES)}, each optionally "
                 "with options of its policy, e.g. CAKE[kernel=9]")
    for name in args.policies:  # options checked against the policy's fields before anything loads
        why = check_options(name, args.window)
        if why is not None:
            ap.error(f"--policies: {why}")
    bad = [r for r in args.ratios + args.ppl_ratios if not 0.0 < r < 1.0]
    if bad:
        ap.error(f"ratios must lie in (0, 1), got {bad}")
    args.pairs = [tuple(pair.split(":")) for pair in split_top(args.pairs)]
    names = (FULL,) + POLICIES + EXTRA_POLICIES
    bad = [":".join(p) for p in args.pairs
           if len(p) != 2 or p[0] == p[1] or not all(x == FULL or known_policy(x) for x in p)]
    if bad:
        ap.error(f"--pairs: {bad} are not 'A:B' with two different policies; known: {', '.join(names)}")
    args.tag = args.tag or ""
    if args.jax_cache is None:
        args.jax_cache = os.path.join(os.environ.get("KVJAX_CACHE_DIR") or os.path.expanduser("~/.cache/kvjax"),
                                      "xla-cache")
    elif args.jax_cache.lower() == "none":
        args.jax_cache = None
    return args


def meta_of(args) -> dict:
    from kvjax.eval import haystack

    dev = jax.devices()[0]
    return dict(model=args.model, dtype=args.dtype, window=args.window, seed=args.seed,
                haystack=haystack.resolve("auto"), max_new_tokens=args.max_new_tokens or dict(ruler.MAX_NEW_TOKENS),
                fit={"aware": "prompt", "agnostic": "context"}, profile_prompts=args.profile_prompts,
                profile_seed=args.profile_seed, lengths=args.lengths, tasks=args.tasks, ratios=args.ratios,
                policies=args.policies, modes=args.modes, samples=args.samples, ppl_length=args.ppl_length,
                ppl_texts=args.ppl_texts, ppl_ratios=args.ppl_ratios, ppl_policies=args.ppl_policies,
                ppl_chunk=args.ppl_chunk, device=f"{dev.platform} ({os.cpu_count()} cores)" if dev.platform == "cpu"
                else dev.device_kind, jax=jax.__version__, host=platform.node(), argv=sys.argv[1:])


def main(argv=None):
    args = parse_args(argv)
    from quality_report import write_report

    if args.report_only:
        src = pathlib.Path(args.report_only)
        print("\n".join(write_report(load(src), src.with_suffix(""), args.pairs)))
        return
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    stem = pathlib.Path(args.out) / f"quality_{args.model}{args.tag}"
    path = stem.parent / (stem.name + ".json")  # not with_suffix: "qwen2.5-0.5b"
    if path.exists() and not args.resume:
        raise SystemExit(f"{path} exists: --resume continues it, --tag / --out write elsewhere")

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    params = kvjax.load(args.model, dtype=args.dtype)
    store = Store(path, meta_of(args))
    log(f"{args.model}: lengths {args.lengths}, {args.samples} prompts per task, tasks {args.tasks}, ratios "
        f"{args.ratios}, modes {args.modes}, policies {args.policies}; {len(store.records)} records already in {path}")
    if "retrieval" in args.parts:
        run_retrieval(params, store, args, log)
    if "ppl" in args.parts:
        bar = _progress(1 + len(args.ppl_policies) * len(args.ppl_ratios), f"{args.model} perplexity")
        run_ppl(params, store, policies=args.ppl_policies, ratios=args.ppl_ratios, n_tokens=args.ppl_length,
                n_texts=args.ppl_texts, seed=args.seed + 7, window=args.window, chunk=args.ppl_chunk,
                log=bar.write if bar is not None else log, progress=bar)
        if bar is not None:
            bar.close()
    store.time(kind="session", seconds=round(time.perf_counter() - t0, 1))
    store.save()
    lines = write_report(store.data(), stem, args.pairs)
    print("\n".join(lines[:60]))
    log(f"wrote {path} and {stem}.md")


if __name__ == "__main__":
    main()
