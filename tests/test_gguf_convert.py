"""The torch-free GGUF converter equals transformers' own GGUF conversion."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import torch_or_skip

TEXTS = ["Hello world 12345", "naïve café — 日本語\n\n\t  x", "<|im_start|>user\nhi<|im_end|>",
         "   leading spaces and trailing   ", "def f(x):\n    return x**2  # comment"]


@pytest.mark.torch
@pytest.mark.slow
def test_converted_checkpoint_equals_transformers_gguf_loading(smollm2_dir):
    torch = torch_or_skip()
    import transformers
    from safetensors.numpy import load_file

    from kvjax.embedded import gguf_path

    src = gguf_path("smollm2-135m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ref_state = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(ours) == set(ref_state) - {"lm_head.weight"}  # tied: HF materialises the alias
    for name, x in ours.items():
        np.testing.assert_allclose(x, ref_state[name], atol=1e-6, err_msg=name)
    ref_cfg = ref.config.to_dict()
    ours_cfg = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours_cfg[key] == ref_cfg[key], key
    assert ours_cfg["rope_parameters"]["rope_theta"] == ref_cfg["rope_parameters"]["rope_theta"] == 100000.0
    ref_tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    from kvjax.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok(text).input_ids, text
    # and transformers loads the converted directory to the same logits
    conv = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        np.testing.assert_allclose(conv(ids).logits.numpy(), ref.eval()(ids).logits.numpy(), atol=1e-4)


def test_not_a_gguf_file_is_named(tmp_path):
    from kvjax.gguf_convert import convert_gguf_to_hf

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf_to_hf(bad, tmp_path / "out")


def test_unknown_embedded_name_lists_the_known_ones():
    import kvjax

    with pytest.raises(ValueError, match="unknown model 'smollm9'.*smollm2-135m"):
        kvjax.load("smollm9")


def test_unpermute_inverts_llama_cpp_rope_permutation():
    from kvjax.gguf_convert import unpermute_rope_rows

    heads, d, e = 3, 8, 5
    w = np.arange(heads * d * e, dtype=np.float32).reshape(heads * d, e)
    # llama.cpp: per head, rows [x0..x_{d/2-1}, y0..] become interleaved [x0, y0, x1, y1, ...]
    permuted = w.reshape(heads, 2, d // 2, e).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), w)


def test_conversion_never_imports_torch(smollm2_dir):
    code = ("import sys, kvjax; from kvjax.gguf_convert import convert_gguf_to_hf; "
            "from kvjax.embedded import gguf_path; import tempfile, pathlib; "
            "convert_gguf_to_hf(gguf_path('smollm2-135m'), pathlib.Path(tempfile.mkdtemp()) / 'm'); "
            "p = kvjax.load(sys.argv[1]); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(smollm2_dir)], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "False", res.stderr[-2000:]
