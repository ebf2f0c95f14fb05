"""GGUF (llama.cpp) -> Hugging Face checkpoint directory, without torch.

The `gguf` package reads the file and dequantises every tensor in numpy; this module renames the
tensors to Hugging Face's names, undoes llama.cpp's interleaved-RoPE permutation of the q/k rows,
and rebuilds the byte-level BPE tokenizer from the GGUF vocabulary and merges. The result loads in
transformers and in `kvjax.load`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

CONVERTER_VERSION = 1

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, its rows were reordered from HF's
    rotate-half layout [first halves | second halves] to interleaved pairs; restore the halves."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _meta(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _config(reader, arch: str, n_tokens: int) -> dict:
    def req(key):
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    head_dim = int(_meta(reader, f"{arch}.rope.dimension_count", hidden // n_heads))
    theta = float(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
    bos = _meta(reader, "tokenizer.ggml.bos_token_id")
    eos = _meta(reader, "tokenizer.ggml.eos_token_id")
    pad = _meta(reader, "tokenizer.ggml.padding_token_id")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_meta(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(req("context_length")),
        "vocab_size": int(_meta(reader, f"{arch}.vocab_size", n_tokens)),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
    }


def _tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json (byte-level BPE, as transformers builds it from GGUF) and its configs."""
    model = _meta(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}: kvjax converts byte-level BPE ('gpt2')")
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    types = list(_meta(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    bos_id = _meta(reader, "tokenizer.ggml.bos_token_id")
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", False))
    special = [tokenizers.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)
    if add_bos and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])

    def name(key):
        i = _meta(reader, key)
        return None if i is None else tokens[int(i)]

    cfg = {
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "model_max_length": int(_meta(reader, f"{_meta(reader, 'general.architecture')}.context_length", 2048)),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = _meta(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    specials = {k: v for k, v in cfg.items() if k.endswith("_token") and v is not None}
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(cfg, indent=1),
        "special_tokens_map.json": json.dumps(specials, indent=1),
    }


def convert_gguf_to_hf(gguf_path, out_dir, dtype: str = "float32") -> pathlib.Path:
    """Write a Hugging Face checkpoint directory (config, safetensors, tokenizer) from a GGUF file."""
    import gguf
    from safetensors.numpy import save_file

    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file (bad magic)")
    reader = gguf.GGUFReader(gguf_path)
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: kvjax converts llama")
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = _config(reader, arch, n_tokens)
    tensors = {}
    for t in reader.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        name = _hf_name(t.name)
        if t.name.endswith("attn_q.weight"):
            x = unpermute_rope_rows(x, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            x = unpermute_rope_rows(x, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(x.astype(dtype))
    for i in range(config["num_hidden_layers"]):
        for suffix in _LAYER_NAMES.values():
            if f"model.layers.{i}.{suffix}" not in tensors:
                raise ValueError(f"GGUF file lacks the tensor for model.layers.{i}.{suffix}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1))
        for fname, text in _tokenizer_files(reader).items():
            (tmp / fname).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
