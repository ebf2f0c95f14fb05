"""Eviction policies: scorer x allocator, as frozen dataclasses (see `policy.py`)."""

from kvjax.policies.adakv import AdaKV
from kvjax.policies.cake import CAKE
from kvjax.policies.learned import Learned
from kvjax.policies.profiled import Profiled
from kvjax.policies.roco import RoCo
from kvjax.policies.allocators import PerLayer, Pyramid, Uniform
from kvjax.policies.base import DecodeEviction, PolicyError, PrefillMode, PrefillStats, Scorer
from kvjax.policies.policy import H2O, TOVA, Compose, Full, KNorm, Policy, PyramidKV, Random, SnapKV, StreamingLLM
from kvjax.policies.registry import NAMES, make

__all__ = [
    "AdaKV",
    "CAKE",
    "Compose",
    "DecodeEviction",
    "Full",
    "H2O",
    "KNorm",
    "Learned",
    "PerLayer",
    "Policy",
    "NAMES",
    "PolicyError",
    "PrefillMode",
    "Profiled",
    "PrefillStats",
    "Pyramid",
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
