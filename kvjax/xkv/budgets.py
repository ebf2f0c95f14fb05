"""The record an XKV profiling run leaves behind: per-layer budgets plus how they were obtained.

Written as JSON (`configs/budgets/<model>-<total>.json` by default) and read back by
`kvjax.policies.Profiled`. Every field is a plain number, string or tuple, so a profile is
hashable (it is a static field of the policy) and the same run writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re

from kvjax.errors import KvjaxError

#: bump when a field changes meaning; loading another version fails with a clear message
#: (2: the profiled model's identity, `architecture` and `config_hash`)
FORMAT_VERSION = 2

DEFAULT_DIR = pathlib.Path("configs") / "budgets"


class ProfileError(KvjaxError, ValueError):
    """A budget profile file is missing a field, has the wrong version or inconsistent shapes."""


@dataclasses.dataclass(frozen=True)
class BudgetProfile:
    """Per-layer cache budgets chosen from offline retention curves.

    model:          name of the profiled model (checkpoint directory name or embedded name)
    total:          tokens per KV head summed over layers, every layer's window included
    window:         observation window w of the profile; each layer budget includes it
    budgets:        [L] tokens per KV head of each layer = chosen prefix size + window
    sizes:          [S] candidate prefix sizes (tokens beyond the window), the solver's grid
    curves:         [L][S] retention of layer l at each size (see `kvjax.profile`)
    solver:         "greedy" or "dp" (which exact solver ran; `kvjax.xkv.solver`)
    metric:         the retention metric ("mass" or "oracle")
    seed:           seed of the prompt sampler
    num_prompts:    prompts averaged over
    prompt_lengths: [num_prompts] tokens of each prompt
    num_kv_heads:   KV heads per layer of the profiled model
    retention:      summed retention of the chosen budgets (the solver's objective)
    architecture:   the profiled model's `model_type`
    config_hash:    `config_hash(config)` of the profiled model (a profile fits that model only)
    """

    model: str
    total: int
    window: int
    budgets: tuple[int, ...]
    sizes: tuple[int, ...]
    curves: tuple[tuple[float, ...], ...]
    solver: str
    metric: str
    seed: int
    num_prompts: int
    prompt_lengths: tuple[int, ...]
    num_kv_heads: int
    retention: float
    architecture: str
    config_hash: str
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.budgets)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: _listify(v) for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def save(self, path) -> pathlib.Path:
        """Write the JSON to `path` (parent folders created). Returns the path."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetProfile":
        """Validated construction from parsed JSON (ProfileError names the first problem)."""
        if not isinstance(d, dict):
            raise ProfileError(f"a budget profile is a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            hint = (": it was written before profiles named the model they were made for; profile again with "
                    "`kvjax profile --model ... --total ...`") if version == 1 else ""
            raise ProfileError(f"format_version {version!r} is not supported (this kvjax reads {FORMAT_VERSION}){hint}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ProfileError(f"missing fields {missing}")
        try:
            p = cls(
                model=str(d["model"]), total=_int(d["total"], "total"), window=_int(d["window"], "window"),
                budgets=tuple(_int(b, "budgets") for b in d["budgets"]),
                sizes=tuple(_int(s, "sizes") for s in d["sizes"]),
                curves=tuple(tuple(_float(c) for c in row) for row in d["curves"]),
                solver=str(d["solver"]), metric=str(d["metric"]), seed=_int(d["seed"], "seed"),
                num_prompts=_int(d["num_prompts"], "num_prompts"),
                prompt_lengths=tuple(_int(n, "prompt_lengths") for n in d["prompt_lengths"]),
                num_kv_heads=_int(d["num_kv_heads"], "num_kv_heads"), retention=_float(d["retention"]),
                architecture=str(d["architecture"]), config_hash=str(d["config_hash"]), format_version=version,
            )
        except TypeError as e:  # a number where a list belongs, or the reverse
            raise ProfileError(f"a field has the wrong type: {e}") from None
        p.check()
        return p

    def check(self) -> None:
        """Shapes and ranges agree (ProfileError otherwise)."""
        if not self.budgets:
            raise ProfileError("budgets is empty")
        if any(b <= 0 for b in self.budgets):
            raise ProfileError(f"every budget must be positive, got {list(self.budgets)}")
        if len(self.curves) != len(self.budgets):
            raise ProfileError(f"curves has {len(self.curves)} layers, budgets has {len(self.budgets)}")
        if any(len(row) != len(self.sizes) for row in self.curves):
            raise ProfileError(f"every curve needs one value per size ({len(self.sizes)})")
        if len(self.prompt_lengths) != self.num_prompts:
            raise ProfileError(f"{len(self.prompt_lengths)} prompt lengths for {self.num_prompts} prompts")
        if self.window < 0 or self.num_kv_heads <= 0:
            raise ProfileError(f"window must be >= 0 and num_kv_heads > 0, got {self.window}, {self.num_kv_heads}")


def config_hash(config) -> str:
    """A short hash of everything in a model config that changes the math (sha256 of its JSON)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("model_axis", "data_axis")}  # how it runs, not the model
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_fits(profile: BudgetProfile, config) -> None:
    """ProfileError unless the profile was made for this model (architecture, layers, KV heads, config)."""
    made = dict(architecture=profile.architecture, num_layers=profile.num_layers, num_kv_heads=profile.num_kv_heads,
                config_hash=profile.config_hash)
    this = dict(architecture=config.model_type, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                config_hash=config_hash(config))
    diff = {k: (made[k], this[k]) for k in made if made[k] != this[k]}
    if diff:
        parts = ", ".join(f"{k} {a!r} (this model: {b!r})" for k, (a, b) in diff.items())
        raise ProfileError(f"the budget profile of {profile.model!r} was made for another model: {parts}; "
                           "profile this model with `kvjax profile`")


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProfileError(f"{name} must hold integers, got {v!r}")
    return v


def _float(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProfileError(f"curves and retention must hold finite numbers, got {v!r}")
    return float(v)


def load_profile(path) -> BudgetProfile:
    """Read a profile written by `BudgetProfile.save`. FileNotFoundError if absent, ProfileError
    if the file is not valid JSON or not a profile of this format version."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no budget profile at {path}: write one with `kvjax profile --model ... --total ...`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path} is not valid JSON: {e}") from None
    try:
        return BudgetProfile.from_dict(data)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None


def default_path(model_name: str, total: int, directory=DEFAULT_DIR) -> pathlib.Path:
    """`configs/budgets/<model>-<total>.json` (relative to the working directory); characters
    other than letters, digits, '.', '_' and '-' in the model name become '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(model_name)) or "model"
    return pathlib.Path(directory) / f"{safe}-{int(total)}.json"
