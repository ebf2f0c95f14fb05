"""XKV (Li et al. 2024): per-layer budgets from offline profiling, SnapKV scores inside each layer.

    prof = kvjax.profile(params, 8, total_budget=128 * L)   # or `kvjax profile ...`
    policy = Profiled("configs/budgets/smollm2-135m-3840.json")     # or Profiled(prof)
    policy = AdaKV(Profiled(...))                                    # + adaptive heads per layer

The profile fixes each layer's budget (tokens per KV head, window included); the layers' sum is
the profiled total. The window defaults to the profile's window, the one its budgets were solved
for; another window is accepted if it fits inside every layer's budget.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from kvjax.xkv.budgets import BudgetProfile, ProfileError, check_fits, load_profile
from kvjax.policies import allocators, scorers
from kvjax.policies.base import PolicyError, check_positive_int, policy_dataclass, static_field
from kvjax.policies.policy import Parts, Policy


def _load(source) -> BudgetProfile:
    """A BudgetProfile or the path of its JSON -> BudgetProfile (PolicyError if unusable)."""
    if isinstance(source, BudgetProfile):
        return source
    if not isinstance(source, (str, pathlib.Path)):
        raise PolicyError(f"Profiled needs a BudgetProfile or the path of its JSON, got {type(source).__name__}")
    try:
        return load_profile(source)
    except FileNotFoundError as e:
        raise PolicyError(str(e)) from None
    except ProfileError as e:
        raise PolicyError(f"unusable budget profile: {e}") from None


@policy_dataclass
class Profiled(Policy):
    """Profiled per-layer budgets (XKV) with SnapKV scoring: `Profiled(path_or_profile, window=None,
    kernel=5, pooling="avg")`. A profile path is read once, here (the policy then holds the
    profile itself, a static field: changing profiles recompiles)."""

    profile: Any = static_field()
    window: int | None = static_field(None)
    kernel: int = static_field(5)
    pooling: str = static_field("avg")
    group_reduce: str = static_field("mean")

    def __post_init__(self):
        object.__setattr__(self, "profile", _load(self.profile))
        if self.window is None:
            object.__setattr__(self, "window", self.profile.window)
        check_positive_int("window", self.window)
        self.parts()  # validates kernel, pooling, group_reduce
        smallest = min(self.profile.budgets)
        if self.window > smallest:
            layer = self.profile.budgets.index(smallest)
            raise PolicyError(
                f"window ({self.window}) exceeds the budget of layer {layer} ({smallest}) in the profile of "
                f"{self.profile.model!r}: use a window <= {smallest}"
            )
        self._validate()

    @property
    def budget(self):
        """[L] int64: tokens per KV head of each layer, window included."""
        return np.asarray(self.profile.budgets, np.int64)

    def check_model(self, config) -> None:
        """PolicyError unless the profile was made for this model."""
        try:
            check_fits(self.profile, config)
        except ProfileError as e:
            raise PolicyError(str(e)) from None
        super().check_model(config)

    def parts(self):
        scorer = scorers.WindowAttention(self.window, self.kernel, self.pooling, self.group_reduce)
        return Parts(scorer, allocators.PerLayer(tuple(self.profile.budgets)), window=self.window)
