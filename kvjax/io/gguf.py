"""GGUF (llama.cpp) -> Hugging Face checkpoint directory, without torch.

    convert_gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")  # -> pathlib.Path("smollm2")

Architectures: `llama` (LlamaForCausalLM) and `qwen2` (Qwen2ForCausalLM: q/k/v biases). The `gguf`
package parses the file and dequantises every tensor in numpy (F32, F16, Q4_0/1, Q5_0/1, Q8_0, the
K-quants, ...). This module renames the tensors to Hugging Face's names, undoes llama.cpp's q/k row
permutation where its converter applied one, writes `config.json` from the `<arch>.*` metadata and
the tokenizer files from the `tokenizer.ggml.*` vocabulary (`kvjax.io.gguf_tokenizer`). The result
equals what transformers' own GGUF loader builds (tests/test_gguf_convert.py and tests/test_qwen2.py
check every tensor, the config and the token ids) and loads both in transformers and in `kvjax.load`.

The q/k permutation: for `llama`, llama.cpp's converter reorders the rows of each attention head of
q_proj and k_proj from Hugging Face's rotate-half layout (the first half of the head's rows pair with
the second half) to GGML's interleaved layout (rows 2i and 2i+1 form a pair), using the query head
count for q and the key/value head count for k. `unpermute_rope_rows` restores the halves. Its
`qwen2` converter writes the rows as they are (GGML runs Qwen2 with rotate-half, "NEOX", RoPE).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import uuid

import numpy as np

from kvjax.io.gguf_tokenizer import PRETOKENIZERS, check_tokenizer, tokenizer_files

# Bump when the files written change: `kvjax.io.embedded` reconverts caches of another version.
CONVERTER_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` maps to a Hugging Face model class."""

    model_type: str  # config.json's model_type
    hf_class: str  # config.json's architectures[0]
    permuted_qk: bool  # llama.cpp's converter interleaved the q/k rows of every head
    qkv_bias: bool  # q/k/v projections have biases (blk.N.attn_{q,k,v}.bias)
    config_fields: tuple[tuple[str, object], ...]  # fixed entries of config.json, after tie_word_embeddings


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True, qkv_bias=False,
                          config_fields=(("attention_bias", False), ("attention_dropout", 0.0), ("mlp_bias", False))),
    # the window stays off: Qwen2's GGUF metadata has no sliding-window keys
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False, qkv_bias=True,
                          config_fields=(("attention_dropout", 0.0), ("use_sliding_window", False),
                                         ("sliding_window", None))),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
DTYPES = ("float32", "float16", "bfloat16")

_GGUF_MAGIC = b"GGUF"

_LAYER_TENSORS = {  # GGUF name inside blk.{i} -> HF name inside model.layers.{i}
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}


def convert_gguf_to_hf(gguf_path, out_dir, dtype: str = "float32", *, pretokenizer: str = "transformers") -> pathlib.Path:
    """Write a Hugging Face checkpoint directory (config, model.safetensors, tokenizer) from a GGUF file.

    dtype: "float32" (default), "float16" or "bfloat16" for the saved weights.
    pretokenizer: "transformers" (the tokenizer transformers builds from the same GGUF) or
        "llama.cpp" (honour `tokenizer.ggml.pre` the way llama.cpp does: see the module docstring).
    The directory is built next to out_dir and renamed into place; an existing out_dir is replaced
    only when it is empty or looks like a checkpoint (has a config.json). Returns out_dir.
    Raises ValueError for a file that is not GGUF, an unsupported architecture, tokenizer or tensor
    type, missing metadata, or a missing or misshapen tensor.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if pretokenizer not in PRETOKENIZERS:
        raise ValueError(f"pretokenizer must be one of {PRETOKENIZERS}, not {pretokenizer!r}")
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    _check_replaceable(out_dir)
    reader = _open(gguf_path)
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf_path.name}: unsupported GGUF architecture {arch!r} "
                         f"(kvjax converts {', '.join(SUPPORTED_ARCHITECTURES)})")
    config = _config(reader, arch, dtype)
    tokenizer_meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    check_tokenizer(tokenizer_meta)  # before the tensors: fail fast
    tok_files = tokenizer_files(tokenizer_meta, _meta(reader, f"{arch}.context_length", 2048), pretokenizer)
    tensors = _tensors(reader, config, ARCHITECTURES[arch], dtype)

    from safetensors.numpy import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        _write_json(tmp / "generation_config.json", generation)
        for name, text in tok_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for path in tmp.iterdir():
            os.chmod(path, 0o644)  # safetensors writes its file private
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation. Per head of `head_dim` rows, llama.cpp put row i of the
    first half and row i of the second half next to each other (rows 2i, 2i+1); restore the halves."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# reading


def _open(path: pathlib.Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not {_GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupt: the reader raises assorted errors
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required(reader, key: str):
    value = _meta(reader, key)
    if value is None:
        raise ValueError(f"the GGUF metadata lacks {key!r}")
    return value


def _config(reader, arch: str, dtype: str) -> dict:
    def key(name, default=None):
        return _scalar(name, _meta(reader, f"{arch}.{name}", default))

    def req(name):
        return _scalar(name, _required(reader, f"{arch}.{name}"))

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    head_dim = int(key("attention.key_length", hidden // n_heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ValueError("unsupported GGUF: key and value head sizes differ")
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"unsupported GGUF: RoPE on {rope_dim} of {head_dim} head dimensions (partial rotary)")
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"unsupported GGUF: RoPE scaling ({scaling or 'rope_freqs.weight'}); kvjax converts plain RoPE")
    theta = float(key("rope.freq_base", 10000.0))
    n_tokens = len(_required(reader, "tokenizer.ggml.tokens"))

    def token_id(name):
        value = _meta(reader, f"tokenizer.ggml.{name}")
        return None if value is None else int(value)

    spec = ARCHITECTURES[arch]
    return {
        "architectures": [spec.hf_class],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        # the float32 of the file, widened (9.999999747378752e-06): what transformers' loader keeps
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(req("context_length")),
        "vocab_size": int(key("vocab_size", n_tokens)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        **dict(spec.config_fields),
        # transformers 5 reads rope_parameters; older loaders (and transformers 4) read rope_theta
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
        "dtype": dtype,
        "use_cache": True,
    }


def _scalar(name: str, value):
    """Some files store a per-layer list (head counts, FFN widths); kvjax needs one value for all layers."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ValueError(f"unsupported GGUF: {name} differs between layers ({value[:8]}...)")
        return value[0]
    return value


def _expected_shapes(config: dict, spec: Architecture) -> dict[str, tuple[int, ...]]:
    """HF name -> numpy shape ([out, in] for projections) of every tensor the checkpoint needs."""
    h, f, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    if spec.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _tensors(reader, config: dict, spec: Architecture, dtype: str) -> dict[str, np.ndarray]:
    import gguf

    expected = _expected_shapes(config, spec)
    by_name = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None or name not in expected:
            raise ValueError(f"unexpected tensor {t.name!r} in a {config['num_hidden_layers']}-layer "
                             f"{config['model_type']} GGUF")
        by_name[name] = t
    missing = [n for n in expected if n not in by_name]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the GGUF file lacks tensors: {shown}")
    out_dtype = _numpy_dtype(dtype)
    tensors = {}
    for name, shape in expected.items():
        t = by_name[name]
        gguf_shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the innermost dimension first
        if gguf_shape != shape:
            raise ValueError(f"tensor {t.name!r} has shape {gguf_shape} (numpy order); {name} needs {shape}")
        try:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"tensor {t.name!r}: cannot dequantise GGML type {t.tensor_type.name}: {e}") from e
        x = np.asarray(x, np.float32).reshape(shape)
        if spec.permuted_qk and name.endswith("q_proj.weight"):
            x = unpermute_rope_rows(x, config["num_attention_heads"])
        elif spec.permuted_qk and name.endswith("k_proj.weight"):
            x = unpermute_rope_rows(x, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(x.astype(out_dtype, copy=False))
    return tensors


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes  # a dependency of jax

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


# ----------------------------------------------------------------------------------------------
# writing


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_replaceable(out_dir: pathlib.Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise ValueError(f"{out_dir} exists and is not a checkpoint directory (no config.json): not replacing it")


def _move_into_place(tmp: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename the finished directory to out_dir; an old out_dir is renamed aside first, then removed."""
    for _ in range(3):
        if out_dir.exists():
            _check_replaceable(out_dir)
            aside = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out_dir, aside)
            except FileNotFoundError:  # someone else moved it meanwhile
                continue
            os.rename(tmp, out_dir)
            shutil.rmtree(aside, ignore_errors=True)
            return
        try:
            os.rename(tmp, out_dir)
            return
        except OSError:  # created meanwhile by another writer: replace it on the next round
            if not out_dir.exists():
                raise
    raise OSError(f"could not move the converted checkpoint into {out_dir}: it keeps changing")
