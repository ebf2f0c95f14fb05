"""The policies users pick: frozen dataclasses composing a scorer and an allocator.

    Policy = scorer x allocator + options (budget, window, sinks, decode-time eviction)

Each policy says what it is made of in one place, `parts()`; the runtime reads the parts through
the `Policy` properties. `Compose(scorer, allocator, budget, ...)` builds any combination; the
named classes below (SnapKV, H2O, ...) fix the pairing of the published method and expose its
options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kvjax.policies import allocators, scorers
from kvjax.policies.base import DecodeEviction, PolicyError, PrefillMode, Scorer, check_budget
from kvjax.policies.base import check_positive_int
from kvjax.policies.base import policy_dataclass, static_field


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a policy is made of.

    scorer:   which tokens matter; allocator: how many each stream keeps
    window:   always-kept most recent prompt tokens; sinks: always-kept first prompt tokens
    decode:   decode-time eviction (None: the budget bounds the compressed prompt only)
    mode:     how the runtime prefills (one-shot, cascade or chunked)
    """

    scorer: Scorer
    allocator: Any = allocators.Uniform()
    window: int = 0
    sinks: int = 0
    decode: DecodeEviction | None = None
    mode: PrefillMode = PrefillMode.ONE_SHOT
    keeps_everything: bool = False


def _part(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.parts(), name), doc=doc)


class Policy:
    """Interface of every policy. Subclasses are `policy_dataclass`es with a `budget` leaf and a
    `parts()` method."""

    budget: Any = None

    def parts(self) -> Parts:
        raise NotImplementedError

    # what the runtime reads, from `parts()`
    scorer = _part("scorer", "Scores the prompt's tokens (and keeps running statistics).")
    allocator = _part("allocator", "How many tokens each stream keeps.")
    protected_window = _part("window", "Always-kept most recent prompt tokens (static).")
    protected_sinks = _part("sinks", "Always-kept first prompt tokens (static).")
    decode_eviction = _part("decode", "Decode-time eviction, or None.")
    keeps_everything = _part("keeps_everything", "The uncompressed cache.")
    prefill_mode = _part("mode", "How the runtime prefills a prompt for this policy.")

    def __post_init__(self):
        self.parts()  # validates the scorer's and allocator's options
        self._validate()

    def check_model(self, config) -> None:
        """PolicyError unless this policy fits the model (budget arrays of its shape, a profile made
        for it, head groups that divide its KV heads). Asked before anything compiles."""
        alloc = self.allocator
        for part in (alloc, getattr(alloc, "inner", None)):
            check = getattr(part, "check_model", None)
            if check is not None:
                check(config.num_layers, config.num_kv_heads)

    def _validate(self):
        check_budget(self.budget)
        if np.ndim(self.budget) > 0:
            alloc = self.allocator
            per_layer = alloc if isinstance(alloc, allocators.PerLayer) else getattr(alloc, "inner", None)
            if not isinstance(per_layer, allocators.PerLayer) or not np.array_equal(np.asarray(self.budget),
                                                                                    per_layer.array):
                raise PolicyError(
                    f"budget={np.asarray(self.budget).tolist()}: {type(self).__name__} takes one budget (tokens "
                    "or a ratio); per-layer or per-(layer, head) budgets need the PerLayer allocator with the same "
                    "array: Compose(scorer_, budget=b, allocator_=PerLayer(b)), or Profiled(profile)")
        w, b = self.protected_window + self.protected_sinks, self.budget
        if isinstance(b, (int, np.integer)) and not isinstance(b, bool) and w > b:
            raise PolicyError(
                f"window + sinks ({w}) exceed the budget ({b}): raise the budget or shrink the window"
            )


@policy_dataclass
class Full(Policy):
    """Keep every token (the uncompressed cache)."""

    def parts(self):
        return Parts(scorers.KeepAll(), keeps_everything=True)

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

    def parts(self):
        return Parts(self.scorer_, self.allocator_, self.window, self.sinks, self.decode)


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
        self.parts()  # validates the scorer's and allocator's options
        self._validate()

    def parts(self):
        scorer = scorers.WindowAttention(self.window, self.kernel, self.pooling, self.group_reduce)
        return Parts(scorer, self.layer_allocator(), window=self.window)

    def layer_allocator(self):
        return allocators.Uniform()


@policy_dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024): SnapKV scores, budgets shrinking linearly with depth (beta)."""

    beta: int = static_field(20)
    style: str = static_field("kvpress")

    def layer_allocator(self):
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
        self.parts()
        self._validate()

    def parts(self):
        return Parts(scorers.AccumulatedAttention(self.group_reduce), window=self.recent,
                     decode=DecodeEviction(every=self.evict_every, recent=self.recent))


@policy_dataclass
class TOVA(Policy):
    """TOVA (Oren et al. 2024): keep the tokens the newest query attends to most (mean over the
    layer's heads, one index set per layer), re-selected every decode step."""

    budget: Any = 256
    evict_every: int = static_field(1)

    def __post_init__(self):
        check_positive_int("evict_every", self.evict_every)
        self._validate()

    def parts(self):
        # the last prompt token is the query: always kept
        return Parts(scorers.LastQueryAttention(), window=1, decode=DecodeEviction(every=self.evict_every, recent=1))


@policy_dataclass
class KNorm(Policy):
    """KNorm (Devoto et al. 2024): keep the keys with the smallest L2 norm."""

    budget: Any = 256

    def parts(self):
        return Parts(scorers.KeyNorm())


@policy_dataclass
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al. 2023): the first `sinks` tokens and the most recent ones."""

    budget: Any = 256
    sinks: int = static_field(4)

    def __post_init__(self):
        check_positive_int("sinks", self.sinks, allow_zero=True)
        self._validate()

    def parts(self):
        return Parts(scorers.Recency(), sinks=self.sinks)


@policy_dataclass
class Random(Policy):
    """Uniformly random tokens (seeded through `generate(seed=...)`): the floor to beat."""

    budget: Any = 256

    def parts(self):
        return Parts(scorers.RandomScore())
