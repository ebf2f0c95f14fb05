"""Eviction policies: scorer x allocator, as frozen dataclasses (see `policy.py`)."""

from kvjax.policies.adakv import AdaKV
from kvjax.policies.cake import CAKE
from kvjax.policies.profiled import Profiled
from kvjax.policies.roco import RoCo
from kvjax.policies.allocators import PerLayer, Pyramid, Uniform
from kvjax.policies.base import DecodeEviction, PolicyError, PrefillStats, Scorer
from kvjax.policies.policy import (
    H2O,
    TOVA,
    Compose,
    Full,
    KNorm,
    Policy,
    PyramidKV,
    Random,
    SnapKV,
    StreamingLLM,
    make,
)

__all__ = [
    "AdaKV",
    "CAKE",
    "Compose",
    "DecodeEviction",
    "Full",
    "H2O",
    "KNorm",
    "PerLayer",
    "Policy",
    "PolicyError",
    "Profiled",
    "PrefillStats",
    "PyramidKV",
    "Random",
    "RoCo",
    "Scorer",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "Uniform",
    "make",
]

from kvjax.policies import policy as _policy  # noqa: E402

_policy._BY_NAME["adakv"] = AdaKV
_policy._BY_NAME["cake"] = CAKE
_policy._BY_NAME["profiled"] = Profiled
_policy._BY_NAME["roco"] = RoCo
