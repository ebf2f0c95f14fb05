"""The policies users pick: frozen dataclasses composing a scorer and an allocator.

    Policy = scorer x allocator + options (budget, window, sinks, decode-time eviction)

`Compose(scorer, allocator, budget, ...)` builds any combination; the named classes below
(SnapKV, H2O, ...) fix the pairing of the published method and expose its options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kvjax.policies import allocators, scorers
from kvjax.policies.base import DecodeEviction, PolicyError, Scorer, check_budget, check_positive_int
from kvjax.policies.base import policy_dataclass, static_field


class Policy:
    """Interface of every policy. Subclasses are `policy_dataclass`es with a `budget` leaf."""

    budget: Any = None

    @property
    def scorer(self) -> Scorer:
        raise NotImplementedError

    @property
    def allocator(self):
        return allocators.Uniform()

    #: always-kept most recent prompt tokens (static)
    @property
    def protected_window(self) -> int:
        return 0

    #: always-kept first prompt tokens (static)
    @property
    def protected_sinks(self) -> int:
        return 0

    @property
    def decode_eviction(self) -> DecodeEviction | None:
        return None

    @property
    def keeps_everything(self) -> bool:
        return False

    #: layer budgets depend on every layer: prefill through kvjax.cascade
    @property
    def cascades(self) -> bool:
        return False

    #: the prompt streams through the cache in chunks, evicting as it goes: prefill through kvjax.chunked
    @property
    def chunked_prefill(self) -> bool:
        return False

    def _validate(self):
        check_budget(self.budget)
        w, b = self.protected_window + self.protected_sinks, self.budget
        if isinstance(b, (int, np.integer)) and not isinstance(b, bool) and w > b:
            raise PolicyError(
                f"window + sinks ({w}) exceed the budget ({b}): raise the budget or shrink the window"
            )


@policy_dataclass
class Full(Policy):
    """Keep every token (the uncompressed cache)."""

    @property
    def scorer(self):
        return scorers.KeepAll()

    @property
    def keeps_everything(self) -> bool:
        return True

    def _validate(self):
        pass


@policy_dataclass
class Compose(Policy):
    """Any scorer with any allocator."""

    scorer_: Scorer = static_field()
    budget: Any = 256
    allocator_: Any = static_field(allocators.Uniform())
    window: int = static_field(0)
    sinks: int = static_field(0)
    decode: DecodeEviction | None = static_field(None)

    def __post_init__(self):
        check_positive_int("window", self.window, allow_zero=True)
        check_positive_int("sinks", self.sinks, allow_zero=True)
        self._validate()

    @property
    def scorer(self):
        return self.scorer_

    @property
    def allocator(self):
        return self.allocator_

    @property
    def protected_window(self):
        return self.window

    @property
    def protected_sinks(self):
        return self.sinks

    @property
    def decode_eviction(self):
        return self.decode


@policy_dataclass
class SnapKV(Policy):
    """SnapKV (Li et al. 2024): observation-window attention, pooled; the window is always kept.

    Defaults follow kvpress 0.5.5 (window 64, average pooling with kernel 5, group mean)."""

    budget: Any = 256
    window: int = static_field(64)
    kernel: int = static_field(5)
    pooling: str = static_field("avg")
    group_reduce: str = static_field("mean")

    def __post_init__(self):
        self.scorer, self.allocator  # validate their options
        self._validate()

    @property
    def scorer(self):
        return scorers.WindowAttention(self.window, self.kernel, self.pooling, self.group_reduce)

    @property
    def protected_window(self):
        return self.window


@policy_dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024): SnapKV scores, budgets shrinking linearly with depth (beta)."""

    beta: int = static_field(20)
    style: str = static_field("kvpress")

    @property
    def allocator(self):
        return allocators.Pyramid(window=self.window, beta=self.beta, style=self.style)


@policy_dataclass
class H2O(Policy):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention plus the most recent tokens,
    re-evicting every decode step so each stream stays at its budget."""

    budget: Any = 256
    recent: int = static_field(32)
    group_reduce: str = static_field("mean")
    evict_every: int = static_field(1)

    def __post_init__(self):
        check_positive_int("recent", self.recent, allow_zero=True)
        check_positive_int("evict_every", self.evict_every)
        self.scorer
        self._validate()

    @property
    def scorer(self):
        return scorers.AccumulatedAttention(self.group_reduce)

    @property
    def protected_window(self):
        return self.recent

    @property
    def decode_eviction(self):
        return DecodeEviction(every=self.evict_every, recent=self.recent)


@policy_dataclass
class TOVA(Policy):
    """TOVA (Oren et al. 2024): keep the tokens the newest query attends to most (mean over the
    layer's heads, one index set per layer), re-selected every decode step."""

    budget: Any = 256
    evict_every: int = static_field(1)

    def __post_init__(self):
        check_positive_int("evict_every", self.evict_every)
        self._validate()

    @property
    def scorer(self):
        return scorers.LastQueryAttention()

    @property
    def protected_window(self):
        return 1  # the last prompt token (it is the query)

    @property
    def decode_eviction(self):
        return DecodeEviction(every=self.evict_every, recent=1)


@policy_dataclass
class KNorm(Policy):
    """KNorm (Devoto et al. 2024): keep the keys with the smallest L2 norm."""

    budget: Any = 256

    def __post_init__(self):
        self._validate()

    @property
    def scorer(self):
        return scorers.KeyNorm()


@policy_dataclass
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al. 2023): the first `sinks` tokens and the most recent ones."""

    budget: Any = 256
    sinks: int = static_field(4)

    def __post_init__(self):
        check_positive_int("sinks", self.sinks, allow_zero=True)
        self._validate()

    @property
    def scorer(self):
        return scorers.Recency()

    @property
    def protected_sinks(self):
        return self.sinks


@policy_dataclass
class Random(Policy):
    """Uniformly random tokens (seeded through `generate(seed=...)`): the floor to beat."""

    budget: Any = 256

    def __post_init__(self):
        self._validate()

    @property
    def scorer(self):
        return scorers.RandomScore()


_BY_NAME = {
    cls.__name__.lower(): cls for cls in (Full, SnapKV, PyramidKV, H2O, TOVA, KNorm, StreamingLLM, Random)
}


def make(name: str, **options) -> Policy:
    """Build a policy from its name (as in configs): `make("snapkv", budget=128, window=32)`."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _BY_NAME:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    cls = _BY_NAME[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise PolicyError(f"{cls.__name__} has no option {sorted(unknown)}; options: {sorted(fields)}")
    return cls(**options)
