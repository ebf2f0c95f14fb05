"""Train the learned eviction scorer for a model (issue 16) and save it.

    python scripts/train_scorer.py                       # smollm2-135m, 48 texts, -> configs/scorers/smollm2-135m
    python scripts/train_scorer.py --texts 8 --steps 50 --out /tmp/s      # a quick one
    python scripts/train_scorer.py --model qwen2.5-0.5b --texts 32     # -> configs/scorers/qwen2.5-0.5b

The defaults are the committed scorer's: a 2-layer MLP (width 8) per (layer, KV head) over the
pre-RoPE key, value, position and distance to the end of the text, listwise loss, target = the max
(over the GQA group and over queries) attention a token draws from the text's last 64 queries when
it lies at least 64 tokens before them; 48 texts of at most 2,048 tokens, 500 steps. It took 706 s
on this repository's 2-core CPU (461 s of targets; shared with another job).
The qwen2.5-0.5b scorer: the same settings on 32 texts (its targets cost 16 s a text vs
SmolLM2's 10 s): 673 s (523 s of targets; shared with another job), held-out loss 7.66 -> 6.55.

Texts (kvjax.learned.texts.default_texts): a cycle of fact essays (an essay span with one or two
planted facts and closing questions about them; not RULER's needle template), essay spans, fact
essays and kvjax.eval.synthetic documents; a seeded share is held out. Prints the run's record
(held-out loss before and after, seconds spent); the loss curve is saved beside the scorer (loss.json).
"""

from __future__ import annotations

import argparse
import json
import time

import kvjax
from kvjax.learned.model import FEATURES


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--n-tokens", type=int, default=2048)
    ap.add_argument("--kind", default="mlp", choices=("linear", "mlp"))
    ap.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--loss", default="listwise", choices=("mse", "listwise"))
    ap.add_argument("--horizon", type=int, default=None, help="later queries that count (default: all)")
    ap.add_argument("--reduce", default="max", choices=("max", "mean"))
    ap.add_argument("--group-reduce", default="max", choices=("max", "mean"))
    ap.add_argument("--min-future", type=int, default=64)
    ap.add_argument("--min-distance", type=int, default=64, help="only queries at least this far after the key")
    ap.add_argument("--last", type=int, default=64, help="only the text's last N queries (0: every later query)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--held-out", type=float, default=0.2)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--max-seconds", type=float, default=840.0, help="stop training after this long (all included)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: configs/scorers/<model>")
    args = ap.parse_args(argv)
    out = args.out or f"configs/scorers/{args.model}"
    t0 = time.perf_counter()
    params = kvjax.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    scorer = kvjax.train_scorer(params, args.texts, n_tokens=args.n_tokens, kind=args.kind, hidden=args.hidden,
                                features=tuple(args.features),
                                loss=args.loss, horizon=args.horizon, reduce=args.reduce,
                                group_reduce=args.group_reduce, min_future=args.min_future,
                                min_distance=args.min_distance, last=args.last or None, steps=args.steps,
                                batch=args.batch, lr=args.lr, held_out=args.held_out, eval_every=args.eval_every,
                                max_seconds=args.max_seconds, seed=args.seed, out=out, model_name=args.model,
                                progress=True)
    info = dict(scorer.meta.train, load_seconds=round(load_s, 1), out=out)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
