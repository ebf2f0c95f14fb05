"""Model configuration read from a Hugging Face `config.json`.

Only the fields that change the math are kept. Unknown architectures fail here, by name, rather than
deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Literal

from kvjax.errors import KvjaxError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ConfigError(KvjaxError, ValueError):
    """A checkpoint's `config.json` is missing, malformed or describes an unsupported model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are derived from the base (HF `rope_scaling` / `rope_parameters`)."""

    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5).

    Biases: `qkv_bias` adds a bias to the q, k and v projections, `o_bias` to the output projection
    (Llama's `attention_bias` sets both; Qwen2 has the first and not the second), `mlp_bias` to the
    three MLP projections.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    #: inside a program split over a mesh (kvjax.mesh): the axes the KV heads and the sequences are
    #: split over; None outside
    model_axis: str | None = None
    data_axis: str | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def attention_bias(self) -> bool:
        """Whether any attention projection has a bias (q/k/v or o)."""
        return self.qkv_bias or self.o_bias

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group), G."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {model_type!r}: kvjax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            num_heads = int(d["num_attention_heads"])
            head_dim = d.get("head_dim") or hidden // num_heads
            rope_params = d.get("rope_parameters") or {}
            # transformers 5 writes the RoPE base only inside rope_parameters; reading a top-level
            # rope_theta alone would silently fall back to 10000.
            rope_theta = float(rope_params.get("rope_theta", d.get("rope_theta", 10000.0)))
            scaling = _rope_scaling(d.get("rope_scaling") or rope_params)
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            sliding = _sliding_window(d, model_type)
            if model_type == "qwen2":  # Qwen2ForCausalLM: biases on q/k/v, none on o or the MLP
                qkv_bias, o_bias, mlp_bias = True, False, False
            else:
                qkv_bias = o_bias = bool(d.get("attention_bias", False))
                mlp_bias = bool(d.get("mlp_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=mlp_bias,
                sliding_window=sliding,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                pad_token_id=d.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "ModelConfig":
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json in {path.parent}: not a Hugging Face checkpoint directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if "attention_bias" in d:  # saved before q/k/v and o biases were told apart
            d["qkv_bias"] = d["o_bias"] = d.pop("attention_bias")
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def _sliding_window(d: dict[str, Any], model_type: str) -> int | None:
    """The attention window shared by every layer, or None for full attention.

    llama: never (some configs carry a stale value). mistral: `sliding_window` as given. qwen2: off
    unless `use_sliding_window` is true; then transformers windows the layers named
    "sliding_attention" in `layer_types` (by default the layers from `max_window_layers` on). kvjax
    has one window for all layers, so a mix of windowed and full layers is refused.
    """
    window = d.get("sliding_window")
    if model_type == "llama" or not window:
        return None
    if model_type == "mistral":
        return int(window)
    if not d.get("use_sliding_window", False):
        return None
    n = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is None:
        first = int(d.get("max_window_layers", 0))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not windowed:
        return None
    if len(windowed) < n:
        raise ConfigError(
            f"unsupported qwen2 config: use_sliding_window=true windows {len(windowed)} of {n} layers "
            f"(layer_types, or max_window_layers={d.get('max_window_layers')!r}) and leaves the others full "
            f"attention; kvjax applies one sliding_window to all layers or to none"
        )
    return int(window)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise ConfigError(f"unsupported rope scaling type {kind!r}: kvjax supports default, linear, llama3")
