"""Llama-family decoders (Llama 2/3/3.1/3.2, Mistral) as pure functions over weight pytrees."""

from .config import ConfigError, ModelConfig, RopeScaling
from .llama import LayerWeights, Weights, decoder_layer, embed, final_logits, layer_qkv, mlp, rms_norm
from .llama import PackedLayer, apply_rope, forward, rope_inv_freq, scan_layers, unstack_layers
from .packed import pack_layers, unpack_layers

__all__ = [
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "LayerWeights",
    "PackedLayer",
    "Weights",
    "apply_rope",
    "decoder_layer",
    "embed",
    "final_logits",
    "forward",
    "layer_qkv",
    "mlp",
    "pack_layers",
    "rms_norm",
    "rope_inv_freq",
    "scan_layers",
    "unpack_layers",
    "unstack_layers",
]
