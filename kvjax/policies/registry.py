"""Policies by name, as configs and the command line give them: `make("snapkv", budget=128)`.

The table is written out here, in one place: adding a policy means adding a line.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.adakv import AdaKV
from kvjax.policies.base import PolicyError
from kvjax.policies.cake import CAKE
from kvjax.policies.learned import Learned
from kvjax.policies.policy import H2O, TOVA, Full, KNorm, Policy, PyramidKV, Random, SnapKV, StreamingLLM
from kvjax.policies.profiled import Profiled
from kvjax.policies.roco import RoCo

NAMES: dict[str, type[Policy]] = {
    "full": Full,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "tova": TOVA,
    "knorm": KNorm,
    "streamingllm": StreamingLLM,
    "random": Random,
    "adakv": AdaKV,
    "cake": CAKE,
    "profiled": Profiled,
    "roco": RoCo,
    "learned": Learned,
}


def make(name: str, **options) -> Policy:
    """Build a policy from its name (as in configs): `make("snapkv", budget=128, window=32)`."""
    if not isinstance(name, str):
        raise PolicyError(f"a policy name must be a string, got {name!r}; known: {', '.join(sorted(NAMES))}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in NAMES:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(sorted(NAMES))}")
    cls = NAMES[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise PolicyError(f"{cls.__name__} has no option {sorted(unknown)}; options: {sorted(fields)}")
    return cls(**options)
