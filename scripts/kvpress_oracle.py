"""Regenerate tests/fixtures/kvpress/ from NVIDIA kvpress 0.5.5 (the reference implementation).

Runs in its own environment (never imported by kvjax or its tests):

    python3 -m venv kvp && . kvp/bin/activate
    pip install torch==2.13.0
    pip install "transformers==5.2.*" accelerate "cachetools<6,>=5.5.2" "pandas<3" requests fire
    pip install --no-deps kvpress==0.5.5
    python scripts/kvpress_oracle.py --model-dir ~/.cache/kvjax/smollm2-135m

`--model-dir` is the embedded SmolLM2 converted by kvjax (`kvjax.load("smollm2-135m")` creates it;
tests/test_gguf_convert.py shows it equals transformers' own GGUF conversion).

Writes:
- kept_<press>_<budget>.npz: the prompt's kept positions per layer and KV head ([L, H, budget],
  sorted), or for AdaKV the kept mask [L, H, T]; plus kvpress's raw scores [L, H, T].
- passkey_answers.json: greedy answers (8 tokens) on 5 pass-key prompts, no press and SnapKV,
  StreamingLLM, KNorm, TOVA at compression ratios 0.5 and 0.9 (whole prompt compressed in prefill).
- manifest.json: prompt token ids, budgets, press parameters, versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _passkey_module():
    # the task generator is pure Python; load it by path so this env needs no jax
    spec = importlib.util.spec_from_file_location("passkey", ROOT / "kvjax" / "eval" / "passkey.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["passkey"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _import_kvpress():
    import types

    if importlib.util.find_spec("datasets") is None:  # kvpress imports it at top level, unused here
        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)
    import kvpress

    return kvpress


def ratio_for(n: int, budget: int) -> float:
    """A compression ratio for which kvpress keeps exactly `budget` of n tokens, with
    n (1 - ratio) a hair above `budget` so that float rounding neither drops a token nor moves
    PyramidKV's budget formula."""
    return 1.0 - (budget + 1e-6) / n


def record_scores(press, store: dict):
    """Wrap press.score to keep each layer's scores (float32, before top-k)."""
    original = press.score

    def score(module, *args, **kwargs):
        s = original(module, *args, **kwargs)
        store[module.layer_idx] = s.detach().float().clone()
        return s

    press.score = score
    return press


def kept_positions(model, ids, press, kvpress, budget: int):
    import torch

    scores: dict[int, torch.Tensor] = {}
    inner = press.press if isinstance(press, kvpress.AdaKVPress) else press
    record_scores(inner, scores)
    masks = {}
    if isinstance(press, kvpress.AdaKVPress):
        original = press.compress

        def compress(module, *a, **k):
            out = original(module, *a, **k)
            b, h, s = module.masked_key_indices
            m = torch.ones(scores[module.layer_idx].shape[1:], dtype=torch.bool)
            m[h, s] = False
            masks[module.layer_idx] = m
            return out

        press.compress = compress
    with torch.no_grad(), press(model):
        model(torch.tensor([ids]), use_cache=True)
    n_layers = model.config.num_hidden_layers
    all_scores = np.stack([scores[l][0].numpy() for l in range(n_layers)])
    if isinstance(press, kvpress.AdaKVPress):
        return dict(kept_mask=np.stack([masks[l].numpy() for l in range(n_layers)]), scores=all_scores)
    kept = []
    for l in range(n_layers):
        if isinstance(press, kvpress.PyramidKVPress):
            n_kept = press.get_layer_budget(model.model.layers[l].self_attn, len(ids))
        else:
            n_kept = kvpress.utils.compute_n_kept(len(ids), press.compression_ratio)
        idx = scores[l][0].topk(n_kept, dim=-1).indices.sort(dim=-1).values
        kept.append(idx.numpy())
    if len({k.shape for k in kept}) == 1:
        return dict(kept=np.stack(kept), scores=all_scores)
    return dict(**{f"kept_layer{l}": k for l, k in enumerate(kept)}, scores=all_scores)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "kvpress"))
    ap.add_argument("--tokens", type=int, default=1500)
    args = ap.parse_args()
    import torch
    import transformers

    kvpress = _import_kvpress()
    passkey = _passkey_module()
    torch.manual_seed(0)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    sample = passkey.passkey_samples(args.tokens, tok, depths=(0.5,), seed=0)[0]
    ids = tok(sample.prompt).input_ids
    n = len(ids)
    budgets = (64, 256)
    presses = {
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "pyramidkv": lambda r: kvpress.PyramidKVPress(compression_ratio=r),
        "adakv_snapkv": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
    }
    press_params = {}
    for name, make in presses.items():
        for budget in budgets:
            t0 = time.time()
            press = make(ratio_for(n, budget))
            press_params[name] = {k: v for k, v in vars(press).items() if isinstance(v, (int, float, str))}
            arrays = kept_positions(model, ids, press, kvpress, budget)
            np.savez_compressed(out / f"kept_{name}_{budget}.npz", **arrays)
            print(f"{name} budget {budget}: {time.time() - t0:.1f}s", flush=True)

    # pass-key answers: whole prompt compressed during prefill (query-aware), greedy decoding
    samples = passkey.passkey_samples(args.tokens, tok, seed=0)
    answer_presses = {"none": None, "snapkv": kvpress.SnapKVPress, "streamingllm": kvpress.StreamingLLMPress,
                      "knorm": kvpress.KnormPress, "tova": kvpress.TOVAPress}
    answers = []
    for s in samples:
        p_ids = tok(s.prompt).input_ids
        for name, cls in answer_presses.items():
            for ratio in ((0.0,) if cls is None else (0.5, 0.9)):
                with torch.no_grad():
                    if cls is None:
                        gen = model.generate(torch.tensor([p_ids]), max_new_tokens=8, do_sample=False)
                    else:
                        with cls(compression_ratio=ratio)(model):
                            gen = model.generate(torch.tensor([p_ids]), max_new_tokens=8, do_sample=False)
                new = gen[0, len(p_ids):].tolist()
                text = tok.decode(new, skip_special_tokens=True)
                answers.append(dict(press=name, ratio=ratio, depth=s.depth, key=s.answer, prompt_ids=p_ids,
                                    tokens=new, text=text, correct=passkey.score_answer(text, s.answer)))
                print(name, ratio, s.depth, repr(text), answers[-1]["correct"], flush=True)
    (out / "passkey_answers.json").write_text(json.dumps(answers))
    manifest = dict(
        prompt_ids=ids, n_tokens=n, depth=sample.depth, key=sample.answer, budgets=budgets,
        press_params=press_params, model_dir_config=model.config.to_dict()["num_hidden_layers"],
        versions=dict(kvpress=_version("kvpress"), transformers=transformers.__version__, torch=torch.__version__),
        attn_implementation="sdpa", dtype="float32",
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _version(pkg):
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    main()
