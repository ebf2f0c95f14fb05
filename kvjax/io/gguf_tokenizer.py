"""The Hugging Face tokenizer files of a GGUF's byte-level BPE vocabulary (`tokenizer.ggml.*`).

    files = tokenizer_files(metadata, model_max_length=8192)  # {"tokenizer.json": "...", ...}

`metadata` maps the GGUF's `tokenizer.*` keys to their values. The vocabulary, merges and token
types become a `tokenizers` BPE model; control tokens become special tokens matched whole,
user-defined ones plain added tokens. The result equals what transformers builds from the same file
(tests/test_gguf_convert.py and tests/test_qwen2.py compare token ids).

Pre-tokenizer, by `tokenizer.ggml.pre`:
- "qwen2": Qwen2's regex (letters, single digits, punctuation runs, newline runs, ...) splits the
  text, then byte-level without its own regex. llama.cpp and transformers agree on it.
- GPT-2-regex names ("gpt2", ...) and digit-splitting names ("smollm", "starcoder", ...): by default
  the GPT-2 regex of `ByteLevel`, which is what transformers builds for all of them. llama.cpp reads
  the digit-splitting names as "split every numeric character off first", as SmolLM2's original
  `tokenizer.json` does (`Digits(individual_digits=True)`); the two differ on whitespace runs before
  a digit ("a  5", "\\n\\n5"). `pretokenizer="llama.cpp"` writes the digit-splitting variant.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

PRETOKENIZERS = ("transformers", "llama.cpp")

# `tokenizer.ggml.pre` values whose llama.cpp regex is GPT-2's, and those that split every numeric
# character off before it. transformers uses the GPT-2 regex for all of them.
_GPT2_REGEX_PRE = frozenset({"gpt2", "mpt", "olmo", "jais"})
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
# `tokenizer.ggml.pre` values with their own split regex (the same in llama.cpp and transformers)
_SPLIT_REGEX_PRE = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
KNOWN_PRE = sorted(_GPT2_REGEX_PRE | _DIGIT_SPLIT_PRE | set(_SPLIT_REGEX_PRE))

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) take the characters from U+0100 on, in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return table


def check_tokenizer(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError unless the metadata describes a byte-level BPE this module can write."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}: kvjax converts byte-level BPE ('gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in KNOWN_PRE:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); kvjax knows {KNOWN_PRE}")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if metadata.get(key) is None:
            raise ValueError(f"the GGUF metadata lacks {key!r}")


def tokenizer_files(metadata: Mapping[str, Any], model_max_length: int,
                    pretokenizer: str = "transformers") -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as text."""
    if pretokenizer not in PRETOKENIZERS:
        raise ValueError(f"pretokenizer must be one of {PRETOKENIZERS}, not {pretokenizer!r}")
    check_tokenizer(metadata)
    import tokenizers
    from tokenizers import decoders, models, processors

    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())

    def byte_spelling(token: str) -> str:  # a token written in plain text, not in the byte alphabet
        return token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {byte_spelling(t): i for i, t in enumerate(tokens)}
    pairs = []
    for m in metadata["tokenizer.ggml.merges"]:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre, pretokenizer)
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>, ...) are special and matched whole; a "control" token outside the
    # byte alphabet would be a mislabel (and would grow the vocabulary), so it stays a plain token.
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= spelled])
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab])

    def token_name(key):
        i = metadata.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos, eos = token_name("bos_token_id"), token_name("eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else [])
    pair = single + [x if x != "$A" else "$B:1" for x in single]
    specials = sorted({(t, vocab[byte_spelling(t)]) for t in (bos if add_bos else None, eos if add_eos else None) if t})
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    special_map = {"bos_token": bos, "eos_token": eos, "unk_token": token_name("unknown_token_id"),
                   "pad_token": token_name("padding_token_id")}
    special_map = {k: v for k, v in special_map.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # keeps transformers from rebuilding a LlamaTokenizer
        **special_map,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }


def _pre_tokenizer(pre: str, pretokenizer: str):
    from tokenizers import Regex, pre_tokenizers

    if pre in _SPLIT_REGEX_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX_PRE[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pretokenizer == "llama.cpp" and pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level
