"""A Hugging Face fast tokenizer read straight from `tokenizer.json`, without transformers.

transformers' tokenizer classes import torch when it is installed (five seconds, and kvjax never
imports torch), so this wraps the `tokenizers` library and renders chat templates with jinja2.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import tokenizers


class Tokenizer:
    """encode/decode, the end-of-sequence ids and the chat template of one checkpoint."""

    def __init__(self, directory: str | pathlib.Path):
        directory = pathlib.Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {directory}; pass token arrays instead of text")
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        cfg = _read_json(directory / "tokenizer_config.json")
        gen = _read_json(directory / "generation_config.json")
        model_cfg = _read_json(directory / "config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if self.chat_template is None and template_file.exists():
            self.chat_template = template_file.read_text()
        eos: set[int] = set()
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(source)
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = tuple(sorted(eos))
        pad = cfg.get("pad_token")
        pad_id = self._tok.token_to_id(_token_text(pad)) if pad else None
        self.pad_token_id = pad_id if pad_id is not None else (self.eos_token_ids or (0,))[0]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's chat template (the prompt text, special tokens included)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; call generate with chat=False")
        import jinja2.sandbox

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def load_tokenizer(directory) -> Tokenizer | None:
    """The directory's tokenizer, or None when it ships none (token-array prompts still work)."""
    if not (pathlib.Path(directory) / "tokenizer.json").exists():
        return None
    return Tokenizer(directory)


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
