"""Try hostile inputs on the public API and write what happens as the table in docs/ERRORS.md.

    python scripts/bad_inputs.py [--out docs/ERRORS.md]

Each case is called as a user would; the outcome is the exception type and message, or "runs" with
a short description of the result. Uses a tiny random model (no download) and, for text, the
embedded SmolLM2's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import struct
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import kvjax  # noqa: E402
from kvjax import policies as P  # noqa: E402


def cases(tiny, smol, tmp: pathlib.Path):
    ids = np.arange(1, 30, dtype=np.int32)
    gen = lambda **kw: kvjax.generate(tiny, **{"prompt": [ids], "max_new_tokens": 2, **kw})  # noqa: E731

    def bad_header():
        header = json.dumps({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 40]}}).encode()
        (tmp / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(40))
        from kvjax.io.safetensors import SafetensorsFile

        return SafetensorsFile(tmp / "model.safetensors").read("w")

    return [
        # policies
        ("SnapKV(budget=0)", lambda: P.SnapKV(budget=0)),
        ("SnapKV(budget=-4)", lambda: P.SnapKV(budget=-4)),
        ("SnapKV(budget=1.5)", lambda: P.SnapKV(budget=1.5)),
        ("SnapKV(budget=float('nan'))", lambda: P.SnapKV(budget=float("nan"))),
        ("SnapKV(budget='128')", lambda: P.SnapKV(budget="128")),
        ("SnapKV(budget=None)", lambda: P.SnapKV(budget=None)),
        ("SnapKV(budget=True)", lambda: P.SnapKV(budget=True)),
        ("SnapKV(budget=[16, 32])", lambda: P.SnapKV(budget=[16, 32])),
        ("SnapKV(budget=16, window=32)", lambda: P.SnapKV(budget=16, window=32)),
        ("SnapKV(pooling='median')", lambda: P.SnapKV(pooling="median")),
        ("H2O(evict_every=0)", lambda: P.H2O(evict_every=0)),
        ("CAKE(budget=np.array([64, 64]))", lambda: P.CAKE(budget=np.array([64, 64]))),
        ("CAKE(budget=16, window=32)", lambda: P.CAKE(budget=16, window=32)),
        ("RoCo(recent_ratio=1.5)", lambda: P.RoCo(recent_ratio=1.5)),
        ("AdaKV(H2O(budget=64))", lambda: P.AdaKV(P.H2O(budget=64))),
        ("AdaKV(SnapKV(64), alpha=2)", lambda: P.AdaKV(P.SnapKV(budget=64), alpha=2)),
        ("Learned(scorer, decode=True, recent=64) (window 32)",
         lambda: P.Learned(ROOT / "configs/scorers/smollm2-135m", decode=True, recent=64)),
        ("Learned(scorer, recent=8) without decode=True",
         lambda: P.Learned(ROOT / "configs/scorers/smollm2-135m", recent=8)),
        ("AdaKV(Learned(scorer, decode=True))",
         lambda: P.AdaKV(P.Learned(ROOT / "configs/scorers/smollm2-135m", decode=True))),
        ("policies.make('snap', budget=16)", lambda: P.make("snap", budget=16)),
        ("policies.make('snapkv', windw=8)", lambda: P.make("snapkv", windw=8)),
        ("Profiled('missing.json')", lambda: P.Profiled("missing.json")),
        # policies against the model
        ("Compose(..., budget=[16]*5, PerLayer) on a 2-layer model",
         lambda: gen(policy=P.Compose(scorer_=P.scorers.KeyNorm(), budget=np.array([16] * 5),
                                      allocator_=P.PerLayer((16,) * 5)))),
        ("Profiled(SmolLM2 profile) on another 2-layer model",
         lambda: gen(policy=P.Profiled(ROOT / "configs/budgets/smollm2-135m-1920.json"))),
        ("AdaKV(SnapKV(64), head_groups=3) on 2 KV heads",
         lambda: gen(policy=P.AdaKV(P.SnapKV(budget=64, window=4), head_groups=3))),
        ("SnapKV(budget=0.05) on 300 tokens (window 64)",
         lambda: kvjax.generate(tiny, [np.arange(300) % 200], policy=P.SnapKV(budget=0.05), max_new_tokens=2)),
        ("H2O(budget=256) on a 29-token prompt, 60 new tokens", lambda: covering(gen)),
        ("H2O(budget=1.0) on a 5-token prompt, 8 new tokens (recent 32)",
         lambda: kvjax.generate(tiny, [np.arange(5) + 3], policy=P.H2O(budget=1.0), max_new_tokens=8)),
        ("policy='snapkv'", lambda: gen(policy="snapkv")),
        # prompts
        ("prompt=[]", lambda: kvjax.generate(tiny, [], max_new_tokens=2)),
        ("prompt=[np.zeros(0)]", lambda: kvjax.generate(tiny, [np.zeros(0, np.int32)], max_new_tokens=2)),
        ("prompt=[[1.7, 2.2]] (floats)", lambda: kvjax.generate(tiny, [np.array([1.7, 2.2])], max_new_tokens=2)),
        ("prompt=b'hello' (bytes)", lambda: kvjax.generate(smol, b"hello", max_new_tokens=2)),
        ("prompt=[b'hello']", lambda: kvjax.generate(smol, [b"hello"], max_new_tokens=2)),
        ("prompt with token id 999 (vocab 256)", lambda: kvjax.generate(tiny, [[1, 2, 999]], max_new_tokens=2)),
        ("prompt with token id -1", lambda: kvjax.generate(tiny, [[1, -1]], max_new_tokens=2)),
        ("prompt=np.zeros((1, 2, 3))", lambda: kvjax.generate(tiny, np.zeros((1, 2, 3), np.int32), max_new_tokens=2)),
        ("text prompt, no tokenizer", lambda: kvjax.generate(tiny, "hello", max_new_tokens=2)),
        ("text with a lone surrogate '\\ud800'", lambda: kvjax.generate(smol, "hi \ud800 there", max_new_tokens=2)),
        ("prompt of 500 tokens + 20 new, 512 positions",
         lambda: kvjax.generate(tiny, [np.ones(500, np.int32)], max_new_tokens=20)),
        ("prompt=[1, 2, 3] (a flat list of ints)",
         lambda: f"runs: one prompt (a batch of {len(kvjax.generate(tiny, [1, 2, 3], max_new_tokens=2).tokens)})"),
        # sampling and options
        ("max_new_tokens=0", lambda: gen(max_new_tokens=0)),
        ("max_new_tokens=2.5", lambda: gen(max_new_tokens=2.5)),
        ("temperature=nan", lambda: gen(temperature=float("nan"))),
        ("temperature=inf", lambda: gen(temperature=float("inf"))),
        ("temperature=-1", lambda: gen(temperature=-1.0)),
        ("top_k=0", lambda: gen(temperature=1.0, top_k=0)),
        ("top_k=10**6 (vocab 256)", lambda: gen(temperature=1.0, top_k=10**6)),
        ("top_p=0", lambda: gen(temperature=1.0, top_p=0.0)),
        ("top_p=nan", lambda: gen(temperature=1.0, top_p=float("nan"))),
        ("seed=-1", lambda: gen(seed=-1)),
        ("stop=['']", lambda: gen(stop=[""])),
        ("stop=[-1]", lambda: gen(stop=[-1])),
        ("stop=['x'], no tokenizer", lambda: gen(stop=["x"])),
        ("stop=['Paris'] on 'The capital of France is'",
         lambda: "runs: " + repr(kvjax.generate(smol, "The capital of France is", max_new_tokens=12,
                                                stop=["Paris"]).text[0]) + " (tokens end at the stop string)"),
        ("implementation='cuda'", lambda: gen(implementation="cuda")),
        ("chat='yes'", lambda: gen(chat="yes")),
        ("prompt= and context= together", lambda: gen(context=[ids])),
        ("question= with prompt=", lambda: gen(question="q?")),
        ("context=, 2 questions for 1 context (not prefilled)",
         lambda: kvjax.generate(tiny, context=[ids], question=[[1], [2]], max_new_tokens=2)),
        ("prefilled=<a Cache>", lambda: kvjax.generate(tiny, prefilled=kvjax.prefill(tiny, [ids]).cache)),
        # forward
        ("forward(tokens=[[1.5, 2.0]])", lambda: kvjax.forward(tiny, np.array([[1.5, 2.0]]))),
        ("forward(tokens=[[1, 300]])", lambda: kvjax.forward(tiny, np.array([[1, 300]]))),
        ("forward(lengths=[5]) for 2 tokens", lambda: kvjax.forward(tiny, np.array([[1, 3]]), lengths=[5])),
        # loading and profiling
        ("load(<empty dir>)", lambda: kvjax.load(str(tmp))),
        ("load(42)", lambda: kvjax.load(42)),
        ("load('smollm3-1b') (unknown name)", lambda: kvjax.load("smollm3-1b")),
        ("load(dir, dtype='int8')", lambda: kvjax.load(str(tmp), dtype="int8")),
        ("safetensors header shape [3, 4] over 40 bytes", bad_header),
        ("profile(params, 8, total_budget=960, n_tokens=20)",
         lambda: kvjax.profile(smol, 8, total_budget=960, n_tokens=20)),
        ("profile(params, 2, total_budget=100)", lambda: kvjax.profile(smol, 2, total_budget=100, n_tokens=256)),
        ("perplexity(text, RoCo(budget=256)) on 50 tokens",
         lambda: kvjax.perplexity(tiny, np.arange(1, 51), P.RoCo(budget=256))),
        ("perplexity(text, SnapKV(64))", lambda: kvjax.perplexity(tiny, np.arange(1, 300) % 200, P.SnapKV(budget=64))),
    ]


def covering(gen) -> str:
    out, full = gen(policy=P.H2O(budget=256), max_new_tokens=60), gen(max_new_tokens=60)
    same = "equal to" if out.tokens == full.tokens else "NOT equal to"
    return (f"runs: streams end at {int(np.asarray(out.cache.streams.length).max())} tokens (nothing evicted); "
            f"tokens {same} the full cache's")


def run(fn) -> tuple[str, str]:
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the point is to see what each input raises
        return type(e).__name__, str(e).replace("\n", " ").replace("|", "\\|")
    if isinstance(out, str) and out.startswith("runs"):
        return "runs", out[len("runs: "):]
    return "runs", f"returned {type(out).__name__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "ERRORS.md"))
    args = ap.parse_args(argv)
    from test_generate import _tiny_params

    tiny = _tiny_params()
    smol = kvjax.load("smollm2-135m", dtype="float32")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, fn in cases(tiny, smol, pathlib.Path(d)):
            kind, msg = run(fn)
            rows.append(f"| `{name}` | {kind} | {msg[:400]} |")
            print(rows[-1], flush=True)
    header = pathlib.Path(args.out).read_text().split("<!-- table -->")[0] if pathlib.Path(args.out).exists() else ""
    table = "| input | outcome | message |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    pathlib.Path(args.out).write_text(header + "<!-- table -->\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
