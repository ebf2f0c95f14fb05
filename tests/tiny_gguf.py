"""A tiny GGUF written the way llama.cpp's converter writes one, and the tensors it must convert back to.

`llama`: q/k rows permuted to GGML's interleaved RoPE layout, dims innermost first, a Q8_0 embedding.
`qwen2`: rows as they are, q/k/v biases (F32), a Q5_0 down projection. Written with the `gguf`
package's writer, independent of kvjax's reader.
"""

from __future__ import annotations

import numpy as np

TINY = dict(hidden=32, ffn=64, heads=4, kv_heads=2, head_dim=8, layers=2, context=128, theta=500000.0)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool_call>"]
# "1 2": a merge that the GPT-2 regex reaches (" 12" is one piece) and the qwen2 regex never does
MERGES = ["Ġ Ġ", "h e", "l l", "he ll", "hell o", "Ċ Ċ", "Ġ hello", "1 2"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters, in byte order (written out here, independent of the module)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, row i of the first half, then row i of the second half."""
    d = w.shape[0] // n_heads
    order = [h * d + (i // 2) + (i % 2) * (d // 2) for h in range(n_heads) for i in range(d)]
    return w[order]


def tiny_tokens() -> list[str]:
    return SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES] + USER_DEFINED


def write_tiny_gguf(path, *, arch="llama", pre=None, drop=(), seed=0) -> dict[str, np.ndarray]:
    """Write a 2-layer GGUF; return the Hugging Face tensors it should convert back to.

    arch: "llama" (permuted q/k, no biases) or "qwen2" (q/k/v biases, rows unpermuted); any other
    name writes llama's tensors under that architecture. pre: tokenizer.ggml.pre (default "smollm"
    for llama, "qwen2" for qwen2). drop: GGUF tensor kinds ("ffn_up", ...) left out.
    """
    import gguf

    c = TINY
    qwen = arch == "qwen2"
    pre = pre or ("qwen2" if qwen else "smollm")
    rng = np.random.default_rng(seed)
    tokens = tiny_tokens()
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - len(USER_DEFINED)) + [4] * len(USER_DEFINED)
    h, f, q, kv = c["hidden"], c["ffn"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    hf = {"model.embed_tokens.weight": rng.standard_normal((len(tokens), h), np.float32),
          "model.norm.weight": rng.standard_normal(h).astype(np.float32)}
    gguf_of = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer = [("attn_norm", "input_layernorm", (h,)), ("ffn_norm", "post_attention_layernorm", (h,)),
             ("attn_q", "self_attn.q_proj", (q, h)), ("attn_k", "self_attn.k_proj", (kv, h)),
             ("attn_v", "self_attn.v_proj", (kv, h)), ("attn_output", "self_attn.o_proj", (h, q)),
             ("ffn_gate", "mlp.gate_proj", (f, h)), ("ffn_up", "mlp.up_proj", (f, h)),
             ("ffn_down", "mlp.down_proj", (h, f))]
    for i in range(c["layers"]):
        for g, name, shape in layer:
            hf[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
            gguf_of[f"model.layers.{i}.{name}.weight"] = f"blk.{i}.{g}.weight"
            if qwen and g in ("attn_q", "attn_k", "attn_v"):
                hf[f"model.layers.{i}.{name}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
                gguf_of[f"model.layers.{i}.{name}.bias"] = f"blk.{i}.{g}.bias"

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["layers"])
    w.add_context_length(c["context"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    if not qwen:  # llama.cpp writes no rope.dimension_count for qwen2
        w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, x in hf.items():
        if gguf_of[name].split(".")[-2] in drop:
            continue
        if not qwen and name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, c["heads"])
        elif not qwen and name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, c["kv_heads"])
        quant = {"model.embed_tokens.weight": "Q8_0", "model.layers.1.mlp.down_proj.weight": "Q5_0" if qwen else None}
        kind = quant.get(name)
        if kind is not None:  # quantised, as in the real files
            t = getattr(gguf.GGMLQuantizationType, kind)
            packed = gguf.quants.quantize(x, t)
            hf[name] = gguf.quants.dequantize(packed, t)
            w.add_tensor(gguf_of[name], packed, raw_dtype=t)
        else:
            w.add_tensor(gguf_of[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
