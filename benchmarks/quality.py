"""Quality of every eviction policy on retrieval tasks: the embedded SmolLM2-135M-Instruct on CPU.

    python benchmarks/quality.py                 # the default run (2K/4K/6K tokens, 2/1/1 samples per task)
    python benchmarks/quality.py --quick         # a few minutes: 2K tokens, one sample per task, budgets 32, 128
    python benchmarks/quality.py --lengths 2048 --samples 2 --policies "SnapKV,AdaKV(SnapKV)" --budgets 64 --modes aware

Tasks (kvjax/eval/needles.py): pass-key, RULER-style single needle and multi-key needles (4 keys,
7-digit numbers, essay-like haystack), raw completion prompts at exact token lengths (a prompt never
exceeds its target, so it pads to kvjax's length bucket of that size). Metrics: exact match of the
first digit run of the greedy continuation (the headline), and a digit score (common leading
digits / length; compressed caches of this 135M model often keep only a key's first digits).

Policies: every policy in kvjax.policies (CAKE, RoCo and Profiled when the package has them) at 32,
64, 128 and 256 tokens per KV head, plus the full cache. Windowed policies use window =
min(32, budget // 2) (SnapKV, PyramidKV, Ada-KV, CAKE windows; H2O's recent window), so the window
never takes more than half the budget; StreamingLLM keeps 4 sinks; RoCo keeps its defaults (recent
10, sinks 4, chunk 32); Profiled (XKV) reads configs/budgets/smollm2-135m-<budget * 30>.json (per-layer
budgets whose mean is the budget) with its profile's window, and budgets without a profile file are
skipped and listed.

Modes: "aware" compresses context + question (`generate(params, prompt)`); "agnostic" compresses the
context alone and appends the question afterwards (`generate(params, context=, question=)`).

Engines. `--engine generate` calls `kvjax.generate` for every (policy, budget, mode) cell: each
cell re-runs the 30-layer prefill, which dominates on CPU (about 4 s per 2K prompt, 14 s per 4K,
37 s per 6K on this 2-core machine when idle), so ~90 cells cost ~90 prefills per prompt.
`--engine shared` (default) uses that the prompt's hidden states do not depend on the policy for
one-shot compression: the prefill attends over the full prompt, compression only decides what the
cache keeps. The library's `kvjax.compress.prefill_policies` runs the model once per batch and mode
and, after each layer, lets every policy compress that layer into its own pool (one-shot, or CAKE's
cascade); the question (agnostic mode) and decoding then go through kvjax's own decode step and
loop with each policy's plan. Before the run every policy is checked
against `kvjax.prefill` on a short prompt in both modes (kept positions of every stream, pool
contents, next-token logits); one that does not match falls back to `kvjax.generate` per cell, and
the JSON records the engine of each cell. Policies whose prefill depends on the compressed cache
(RoCo's chunked encoding) always run through `kvjax.generate`.

Compiles: one shared prefill per (length bucket, batch, mode), one decode loop (and, agnostic, one
question feed) per (policy, budget, mode): ~200 compiles, several minutes on a loaded 2-core CPU.
The persistent XLA cache (`--jax-cache`, on by default) makes reruns skip the unchanged ones.

Writes benchmarks/results/quality_<platform>[_quick].json, .md and .png (if matplotlib imports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvjax  # noqa: E402
from kvjax import policies as P  # noqa: E402
from kvjax.cache import Cache  # noqa: E402
from kvjax.eval import needles  # noqa: E402
from quality_report import MODES, write_markdown, write_plot  # noqa: E402
from quality_shared import SharedRunner, compare_kept, feed_question, generate_cell, release_executables  # noqa: E402
from quality_shared import shareable  # noqa: E402

POLICY_NAMES = ("StreamingLLM", "SnapKV", "PyramidKV", "AdaKV(SnapKV)", "AdaKV(PyramidKV)", "H2O", "TOVA", "KNorm",
                "Random", "CAKE", "RoCo", "Profiled")
#: policies that appear only once the package has them
OPTIONAL = ("CAKE", "RoCo", "Profiled")
BUDGETS = (32, 64, 128, 256)
LENGTHS = (2048, 4096, 6144)
TASKS = needles.TASKS
#: default samples per task at each length (chosen from measured timings: see the module docstring)
DEFAULT_SAMPLES = {2048: 2, 4096: 1, 6144: 1}
PROFILE_DIR = ROOT / "configs" / "budgets"


def window_for(budget: int) -> int:
    """Observation / recent window of windowed policies at a budget: it fits in half the budget."""
    return min(32, budget // 2)


# ------------------------------------------------------------------------------------------------
# policies


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _windowed(cls, budget: int, **extra):
    """cls(budget=..., window=w) with the observation window (H2O: the recent window) set to
    window_for(budget) where cls has one."""
    fields, w = _fields(cls), window_for(budget)
    kw = dict(budget=budget, **extra)
    if "window" in fields:
        kw["window"] = w
    elif "recent" in fields and cls.__name__ == "H2O":
        kw["recent"] = w
    return cls(**kw)


def available_policies() -> list[str]:
    return [n for n in POLICY_NAMES if n not in OPTIONAL or hasattr(P, n)]


#: PyramidKV's layer split: "paper" (the PyramidKV repository) by default. kvjax's default, kvpress's
#: split, falls back to uniform budgets whenever (budget - window) / beta < window, i.e. at every
#: budget here (measured: identical answers to SnapKV at 32-256), which would make PyramidKV a
#: second SnapKV in this benchmark.
PYRAMID_STYLE = "paper"


def make_policy(name: str, budget: int, pyramid_style: str | None = None):
    """The policy `name` at `budget` tokens per KV head, or (None, reason) when it cannot be built."""
    if name == "Full":
        return P.Full(), None
    base = name[len("AdaKV("):-1] if name.startswith("AdaKV(") else name
    if not hasattr(P, base):
        return None, f"kvjax.policies has no {base}"
    cls = getattr(P, base)
    try:
        if base == "Profiled":
            path = PROFILE_DIR / f"smollm2-135m-{budget * 30}.json"
            if not path.exists():
                return None, f"no profile {path.relative_to(ROOT)}"
            pol = cls(str(path))
        elif base in ("StreamingLLM", "TOVA", "KNorm", "Random", "RoCo"):
            pol = cls(budget=budget)
        elif base == "PyramidKV":
            pol = _windowed(cls, budget, style=pyramid_style or PYRAMID_STYLE)
        else:
            pol = _windowed(cls, budget)
        if name.startswith("AdaKV("):
            pol = P.AdaKV(pol)
    except Exception as e:  # a new class with other options: report, do not crash the run
        return None, f"{type(e).__name__}: {e}"
    return pol, None


def policy_window(pol) -> int | None:
    inner = getattr(pol, "inner", None) or pol
    for attr in ("window", "recent"):
        v = getattr(inner, attr, None)
        if isinstance(v, int):
            return v
    return None


# ------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class Cell:
    task: str
    length: int
    mode: str
    policy: str
    budget: int | None
    correct: int = 0
    n: int = 0
    digit_sum: float = 0.0
    cache_bytes: int | None = None
    kv_bytes: int | None = None
    engine: str = "shared"
    window: int | None = None

    def row(self):
        d = dataclasses.asdict(self)
        d["accuracy"] = self.correct / self.n if self.n else None
        d["digit_score"] = round(self.digit_sum / self.n, 4) if self.n else None
        del d["digit_sum"]
        return d


def per_sequence_bytes(cache: Cache, batch: int) -> tuple[int, int]:
    """Every cache array leads with the batch axis: bytes of one sequence's cache and KV pool."""
    return cache.nbytes // batch, cache.kv_nbytes // batch


def build_samples(tok, lengths, tasks, samples_per, seed, task_options):
    """{length: samples}; length L draws seeds seed + L, seed + L + 1, ... (needles differ across lengths)."""
    out = {}
    for L in lengths:
        out[L] = []
        for task in tasks:
            opts = task_options if task != "passkey" else {}
            out[L] += needles.make_samples(task, L, tok, samples_per[L], seed=seed + L, **opts)
    return out


def batches(items, size):
    """Chunks of `size`; the last is padded with copies of its last item (one compile per length)."""
    out = []
    for i in range(0, len(items), size):
        chunk = list(items[i : i + size])
        real = len(chunk)
        chunk += [chunk[-1]] * (size - real)
        out.append((chunk, real))
    return out


def verify(params, runner, pols: dict[str, Any], modes, max_new_tokens, log, n_tokens=512):
    """Shared path vs kvjax.prefill on one short prompt per mode: the kept positions of every stream,
    the pool contents and the next-token logits (after the question in agnostic mode). Decoding is
    kvjax's own loop (kvjax.loop) in both paths, so equal caches and logits give equal texts.
    -> {name: report}."""
    tok = params.tokenizer
    sample = needles.single_needle(n_tokens, tok, seed=12345)
    names = list(pols)
    report = {n: {"ok": True} for n in names}
    for mode in modes:
        t0 = time.perf_counter()
        logits, caches, plans, qt, ql, _ = runner.prefill([sample], mode, [pols[n] for n in names])
        for name, pol, plan, cache in zip(names, [pols[n] for n in names], plans, caches):
            if qt is not None:
                cache, lg = feed_question(params.weights, cache, logits, qt, ql, pol, config=params.config, plan=plan)
            else:
                lg = logits
            ref = kvjax.prefill(params, sample.prompt if mode == "aware" else sample.context, pol,
                                max_new_tokens=max_new_tokens, question=None if mode == "aware" else sample.question)
            kept = compare_kept(cache, ref.cache)
            same_layout = cache.layout == ref.cache.layout and cache.pools.k.shape == ref.cache.pools.k.shape
            dk = float(jnp.max(jnp.abs(cache.pools.k - ref.cache.pools.k))) if same_layout else float("inf")
            dl = float(jnp.max(jnp.abs(lg - ref.logits)))
            same_next = bool(jnp.all(jnp.argmax(lg, -1) == jnp.argmax(ref.logits, -1)))
            ok = kept >= 0.98 and same_layout and dl < 1e-2 and same_next
            report[name][mode] = dict(kept_streams_equal=round(kept, 4), same_layout=same_layout,
                                      max_abs_k_diff=dk, max_abs_logit_diff=dl, same_next_token=same_next)
            report[name]["ok"] &= ok
            log(f"  verify {mode:8s} {name:18s} kept-equal {kept:.4f} layout {same_layout} |dk| {dk:.1e} "
                f"|dlogits| {dl:.1e} {'OK' if ok else 'MISMATCH'}")
        log(f"  verify {mode} took {time.perf_counter() - t0:.1f} s")
    return report


def run(args, log):
    params = kvjax.load(args.model, dtype=jnp.dtype(args.dtype))
    tok = params.tokenizer
    t_start = time.perf_counter()
    samples_per = dict(zip(args.lengths, args.samples))
    task_options = dict(digits=args.digits, haystack=args.haystack)
    all_samples = build_samples(tok, args.lengths, args.tasks, samples_per, args.seed, task_options)
    for L, ss in all_samples.items():
        log(f"length {L}: {len(ss)} samples, token counts {min(s.n_tokens for s in ss)}..{max(s.n_tokens for s in ss)}")

    # the grid of policies
    grid: list[tuple[str, int | None, Any]] = [("Full", None, P.Full())]
    skipped = []
    for name in args.policies:
        for budget in args.budgets:
            pol, why = make_policy(name, budget, args.pyramid_style)
            if pol is None:
                skipped.append(dict(policy=name, budget=budget, reason=why))
                log(f"skip {name} @ {budget}: {why}")
            else:
                grid.append((name, budget, pol))

    runner = SharedRunner(params, args.max_new_tokens, args.seed)
    engines = {}
    for name, budget, pol in grid:
        why = shareable(pol) if args.engine == "shared" else "--engine generate"
        engines[(name, budget)] = "shared" if why is None else "generate"
    verification = None
    timings: dict[str, Any] = {"verify_s": 0.0, "per_length": {}, "releases": 0}
    if args.engine == "shared" and args.verify:
        t0 = time.perf_counter()
        check = {}
        for name, budget, pol in grid:
            if engines[(name, budget)] == "shared" and name not in check:
                vb = 64 if budget is None or any(b == 64 and n == name for n, b, _ in grid) else budget
                pol_v = pol if budget in (None, vb) else make_policy(name, vb, args.pyramid_style)[0]
                check[name] = pol_v
        log(f"verifying the shared prefill against kvjax.prefill for {len(check)} policies ...")
        verification = verify(params, runner, check, args.modes, args.max_new_tokens, log)
        for (name, budget), eng in list(engines.items()):
            if eng == "shared" and not verification[name]["ok"]:
                engines[(name, budget)] = "generate"
                log(f"  {name} falls back to kvjax.generate per cell")
        timings["verify_s"] = round(time.perf_counter() - t0, 1)
        timings["releases"] += release_executables(runner, log, limit=0)  # verification shapes are not reused

    cells: dict[tuple, Cell] = {}
    outputs = []
    for L in args.lengths:
        ss = all_samples[L]
        bsz = max(1, min(len(ss), args.batch_tokens // L))
        tl = timings["per_length"].setdefault(str(L), {"compile_s": 0.0, "shared_prefill_s": 0.0, "decode_s": 0.0,
                                                      "generate_s": 0.0, "batches": 0, "batch_size": bsz,
                                                      "prefill_batches_s": [], "decode_batches_s": []})
        for mode in args.modes:
            for chunk, real in batches(ss, bsz):
                tl["batches"] += 1
                shared = [(n, b, p) for n, b, p in grid if engines[(n, b)] == "shared"]
                results = {}
                if shared:
                    logits, caches, plans, qt, ql, tm = runner.prefill(chunk, mode, [p for _, _, p in shared])
                    tl["compile_s"] += tm["compile_s"]
                    tl["shared_prefill_s"] += tm["prefill_s"]
                    tl["prefill_batches_s"].append(round(tm["prefill_s"], 1))
                    log(f"[{L} {mode}] shared prefill of {len(shared)} policies, batch {len(chunk)}: compile "
                        f"{tm['compile_s']:.1f} s, run {tm['prefill_s']:.1f} s")
                    t0 = time.perf_counter()
                    for (name, budget, pol), plan, cache in zip(shared, plans, caches):
                        texts, pre = runner.finish(pol, plan, cache, logits, qt, ql)
                        results[(name, budget)] = (texts, per_sequence_bytes(pre, len(chunk)), "shared")
                        timings["releases"] += release_executables(runner, log)
                    del caches
                    dt = time.perf_counter() - t0
                    tl["decode_s"] += dt
                    tl["decode_batches_s"].append(round(dt, 1))
                    log(f"[{L} {mode}] decode of {len(shared)} policies: {dt:.1f} s")
                for name, budget, pol in grid:
                    if engines[(name, budget)] != "generate":
                        continue
                    t0 = time.perf_counter()
                    texts, st = generate_cell(params, chunk, mode, pol, args.max_new_tokens, args.seed)
                    dt = time.perf_counter() - t0
                    tl["generate_s"] += dt
                    results[(name, budget)] = (texts, (st["cache_bytes"] // len(chunk), st["kv_bytes"] // len(chunk)),
                                               "generate")
                    timings["releases"] += release_executables(runner, log)
                    log(f"[{L} {mode}] generate {name}@{budget}: {dt:.1f} s")
                for (name, budget), (texts, (cb, kb), eng) in results.items():
                    pol = dict(((n, b), p) for n, b, p in grid)[(name, budget)]
                    for s, text in zip(chunk[:real], texts[:real]):
                        ok = needles.score(text, s.answer)
                        partial = needles.digit_score(text, s.answer)
                        c = cells.setdefault((s.task, L, mode, name, budget),
                                             Cell(s.task, L, mode, name, budget, window=policy_window(pol)))
                        c.correct += int(ok)
                        c.digit_sum += partial
                        c.n += 1
                        c.cache_bytes, c.kv_bytes, c.engine = cb, kb, eng
                        outputs.append(dict(task=s.task, length=L, seed=s.seed, mode=mode, policy=name, budget=budget,
                                            answer=s.answer, output=text, correct=ok, digit_score=round(partial, 4)))
                acc = {k: np.mean([needles.score(t, s.answer) for s, t in zip(chunk[:real], v[0][:real])])
                       for k, v in results.items()}
                log(f"[{L} {mode}] batch done; Full {acc.get(('Full', None), float('nan')):.2f}, mean over "
                    f"compressed cells {np.mean([a for k, a in acc.items() if k[0] != 'Full']):.2f}; "
                    f"elapsed {time.perf_counter() - t_start:.0f} s")
        for k, v in tl.items():
            if isinstance(v, float):
                tl[k] = round(v, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    timings["compiles_s"] = [round(x, 1) for x in runner.compile_s]
    return dict(cells=[c.row() for c in cells.values()], outputs=outputs, skipped=skipped, verification=verification,
                timings=timings, engines={f"{n}@{b}": e for (n, b), e in engines.items()})


# ------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2K tokens, 1 sample per task, budgets 32 and 128")
    ap.add_argument("--lengths", default=None, help="comma list of prompt lengths (default 2048,4096,6144)")
    ap.add_argument("--samples", default=None,
                    help="samples per task: one int, or one per length (default " +
                         ",".join(str(DEFAULT_SAMPLES[L]) for L in LENGTHS) + ")")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--policies", default=None, help="comma list (default: every available policy)")
    ap.add_argument("--budgets", default=None, help="comma list (default 32,64,128,256)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--engine", choices=("shared", "generate"), default="shared")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--report-only", default=None, metavar="JSON",
                    help="re-render the .md and .png of an existing result file, run nothing")
    ap.add_argument("--digits", type=int, default=7, help="digits of the needles' numbers")
    ap.add_argument("--pyramid-style", default=PYRAMID_STYLE, choices=("paper", "kvpress"),
                    help="PyramidKV's layer split (kvpress's is uniform at every budget here)")
    ap.add_argument("--haystack", default="essay", choices=needles.HAYSTACKS)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--batch-tokens", type=int, default=18432,
                    help="most prompt tokens per batch (default: one batch per length at the default samples)")
    ap.add_argument("--jax-cache", default=None,
                    help="persistent XLA compilation cache directory (default $KVJAX_CACHE_DIR/xla-cache or "
                         "~/.cache/kvjax/xla-cache; 'none' disables): reruns skip most compiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file name suffix (default: '_quick' with --quick)")
    args = ap.parse_args(argv)
    split = lambda s: [x.strip() for x in _split_top(s) if x.strip()]  # noqa: E731
    if args.quick:
        args.lengths = args.lengths or "2048"
        args.samples = args.samples or "1"
        args.budgets = args.budgets or "32,128"
        args.tag = "_quick" if args.tag is None else args.tag
    args.lengths = [int(x) for x in split(args.lengths)] if args.lengths else list(LENGTHS)
    if args.samples is None:
        args.samples = [DEFAULT_SAMPLES.get(L, 2) for L in args.lengths]
    else:
        s = [int(x) for x in split(args.samples)]
        args.samples = s * len(args.lengths) if len(s) == 1 else s
        if len(args.samples) != len(args.lengths):
            ap.error("--samples needs one value or one per length")
    args.budgets = [int(x) for x in split(args.budgets)] if args.budgets else list(BUDGETS)
    args.tasks = split(args.tasks)
    for t in args.tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t}; known: {TASKS}")
    args.modes = split(args.modes)
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m}; known: {MODES}")
    avail = available_policies()
    if args.policies:
        args.policies = split(args.policies)
        for p in args.policies:
            if p not in POLICY_NAMES:
                ap.error(f"unknown policy {p}; known: {POLICY_NAMES}")
        missing = [p for p in args.policies if p not in avail]
        if missing:
            print(f"not in kvjax.policies yet, skipped: {missing}", flush=True)
        args.policies = [p for p in args.policies if p in avail]
    else:
        args.policies = avail
    args.tag = args.tag or ""
    if args.jax_cache is None:
        root = os.environ.get("KVJAX_CACHE_DIR") or os.path.expanduser("~/.cache/kvjax")
        args.jax_cache = os.path.join(root, "xla-cache")
    elif args.jax_cache.lower() == "none":
        args.jax_cache = None
    return args


def _split_top(s: str) -> list[str]:
    """Split on commas outside parentheses ("AdaKV(SnapKV),H2O")."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality_{jax.devices()[0].platform}{args.tag}"
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    def log(msg):
        print(msg, flush=True)

    if args.report_only:
        src = pathlib.Path(args.report_only)
        data = json.loads(src.read_text())
        meta, result = data["meta"], {k: v for k, v in data.items() if k != "meta"}
        stem = src.with_suffix("")
        write_markdown(stem.with_suffix(".md"), result, meta, meta["policies"], meta["budgets"])
        plot = write_plot(stem.with_suffix(".png"), result, meta, meta["policies"], meta["budgets"])
        log(f"wrote {stem}.md; plot: {plot}")
        return

    log(f"policies {args.policies}; budgets {args.budgets}; lengths {args.lengths}; samples/task {args.samples}; "
        f"tasks {args.tasks}; modes {args.modes}; engine {args.engine}")
    result = run(args, log)
    device = jax.devices()[0]
    meta = dict(model=args.model, dtype=args.dtype, device=f"{device.platform} ({os.cpu_count()} cores)"
                if device.platform == "cpu" else device.device_kind, platform=device.platform, jax=jax.__version__,
                host=platform.node(), tasks=args.tasks, lengths=args.lengths,
                samples_per_task=dict(zip(map(str, args.lengths), args.samples)), budgets=args.budgets,
                modes=args.modes, policies=args.policies, engine=args.engine, digits=args.digits,
                jax_cache=args.jax_cache, pyramid_style=args.pyramid_style,
                haystack=args.haystack, max_new_tokens=args.max_new_tokens, seed=args.seed,
                window_rule="min(32, budget // 2) for SnapKV/PyramidKV/AdaKV/CAKE windows and H2O's recent; "
                            "StreamingLLM sinks 4; RoCo its defaults (recent 10, sinks 4, chunk 32); Profiled its "
                            "profile's window",
                bytes_note="cache_bytes / kv_bytes are per sequence: out.stats['cache_bytes'] (or the shared path's "
                           "cache.nbytes) divided by the batch size; every cache array leads with the batch axis",
                argv=sys.argv[1:])
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, **result), indent=1, default=str))
    lines = write_markdown(out / f"{stem}.md", result, meta, args.policies, args.budgets)
    plot = write_plot(out / f"{stem}.png", result, meta, args.policies, args.budgets)
    print("\n".join(lines))
    log(f"wrote {out / stem}.json, .md; plot: {plot}")


if __name__ == "__main__":
    main()
