"""A batch job's configuration: read from YAML, checked before anything loads or compiles.

    model: smollm2-135m           # an embedded model's name or a checkpoint directory (required)
    dtype: float32                # float32 | bfloat16 | float16 (default: kvjax.load's)
    mesh: {data: 1, model: 2}     # optional: a ("data", "model") mesh over the first data x model devices
    policies:                     # or `policy:` with one entry (one of the two is required)
      - full                      # a name alone ...
      - {name: snapkv, budget: 128, window: 32}           # ... or a name and kvjax.policies.make's options
      - {name: adakv, inner: {name: snapkv, budget: 128}, alpha: 0.2}   # a nested policy
    sampling: {temperature: 0.0, top_k: null, top_p: null, seed: 0, stop: ["\\n\\n"]}
    max_new_tokens: 64
    batch_size: 8
    chat: false                   # the tokenizer's chat template around prompts and contexts (questions are
                                  # appended after it as they are, as kvjax.prefill(..., question=) does)

Every mistake raises `kvjax.errors.InputError` naming the file, the key, the value and what is
allowed (an unknown policy or option: the known ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from typing import Any

from kvjax.errors import InputError, KvjaxError, bad_input
from kvjax.policies import make
from kvjax.policies.policy import Policy

DTYPES = ("float32", "bfloat16", "float16")
KEYS = ("model", "dtype", "mesh", "policy", "policies", "sampling", "max_new_tokens", "batch_size", "chat")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "stop")
MESH_KEYS = ("data", "model")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """One policy as the config names it: `name` and `options` (JSON values; a nested policy is a
    mapping with its own `name`). `label()` is its canonical JSON, the key of its output records."""

    name: str
    options: dict

    def record(self) -> dict:
        return {"name": self.name, "options": self.options}

    def label(self) -> str:
        return json.dumps(self.record(), sort_keys=True, default=str)

    def build(self) -> Policy:
        return _build(self.name, self.options)


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple = ()


@dataclasses.dataclass(frozen=True)
class JobConfig:
    model: str
    policies: tuple[PolicySpec, ...]
    dtype: str | None = None
    mesh: tuple[int, int] | None = None  # (data, model)
    sampling: Sampling = Sampling()
    max_new_tokens: int = 64
    batch_size: int = 8
    chat: bool = False
    source: str = "config"

    def fingerprint(self) -> str:
        """What the records' contents depend on besides the prompt and the policy (model, dtype,
        sampling, max_new_tokens, chat): a resumed job must not mix two of them in one file."""
        what = {"model": self.model, "dtype": self.dtype, "sampling": dataclasses.asdict(self.sampling),
                "max_new_tokens": self.max_new_tokens, "chat": self.chat}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]

    def make_mesh(self):
        """The jax mesh of `mesh:` (None without one)."""
        if self.mesh is None:
            return None
        import jax

        data, model = self.mesh
        devices = jax.devices()
        if data * model > len(devices):
            raise bad_input(f"{self.source}: mesh", {"data": data, "model": model},
                            f"at most {len(devices)} devices in all (data x model; this machine has {len(devices)})")
        return jax.make_mesh((data, model), ("data", "model"), devices=devices[: data * model])


def _build(name, options: dict) -> Policy:
    built = {k: _build(v["name"], {o: w for o, w in v.items() if o != "name"})
             if isinstance(v, dict) and "name" in v else v for k, v in options.items()}
    return make(name, **built)


def _int(source: str, key: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise bad_input(f"{source}: {key}", value, f"an int >= {least}")
    return value


def _mapping(source: str, key: str, value, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise bad_input(f"{source}: {key}", value, f"a mapping with keys among {list(allowed)}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise bad_input(f"{source}: {key}", unknown[0] if len(unknown) == 1 else unknown,
                        f"keys among {list(allowed)} (unknown key)")
    return value


def _policy(source: str, key: str, entry) -> PolicySpec:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise bad_input(f"{source}: {key}", entry, "a policy name or a mapping {name: ..., <option>: ...} "
                        "(options as kvjax.policies.make takes them)")
    options = {str(k): v for k, v in entry.items() if k != "name"}
    spec = PolicySpec(entry["name"], options)
    try:
        spec.build()
    except (KvjaxError, TypeError, ValueError) as e:
        raise InputError(f"{source}: {key} ({spec.name}): {e}") from None
    return spec


def _policies(source: str, raw: dict) -> tuple[PolicySpec, ...]:
    if ("policy" in raw) == ("policies" in raw):
        raise bad_input(f"{source}: policy/policies", sorted(k for k in ("policy", "policies") if k in raw) or None,
                        "exactly one of `policy:` (one policy) or `policies:` (a list to compare)")
    if "policy" in raw:
        specs = (_policy(source, "policy", raw["policy"]),)
    else:
        listed = raw["policies"]
        if not isinstance(listed, list) or not listed:
            raise bad_input(f"{source}: policies", listed, "a non-empty list of policies")
        specs = tuple(_policy(source, f"policies[{i}]", p) for i, p in enumerate(listed))
    labels = [s.label() for s in specs]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise bad_input(f"{source}: policies[{i}]", specs[i].record(),
                            f"a policy not listed before (it repeats policies[{labels.index(label)}])")
    return specs


def _sampling(source: str, raw) -> Sampling:
    raw = _mapping(source, "sampling", raw, SAMPLING_KEYS)
    s = Sampling(**{k: raw[k] for k in SAMPLING_KEYS if k in raw and k != "stop"})
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not number(s.temperature) or not math.isfinite(s.temperature) or s.temperature < 0:
        raise bad_input(f"{source}: sampling.temperature", s.temperature, "a finite number >= 0 (0 = greedy)")
    if s.top_k is not None:
        _int(source, "sampling.top_k", s.top_k, 1)
    if s.top_p is not None and (not number(s.top_p) or not 0 < s.top_p <= 1):
        raise bad_input(f"{source}: sampling.top_p", s.top_p, "a number in (0, 1], or null")
    _int(source, "sampling.seed", s.seed, 0)
    stop = raw.get("stop", [])
    stop = [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
    if not isinstance(stop, list) or not all((isinstance(x, str) and x) or (isinstance(x, int) and
                                                                            not isinstance(x, bool) and x >= 0)
                                             for x in stop):
        raise bad_input(f"{source}: sampling.stop", stop, "a list of non-empty stop strings and/or token ids")
    return dataclasses.replace(s, temperature=float(s.temperature), stop=tuple(stop))


def parse(raw, source: str = "config") -> JobConfig:
    """A JobConfig from a parsed YAML mapping; `source` (the file) prefixes every error."""
    raw = _mapping(source, "the top level", raw, KEYS)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise bad_input(f"{source}: model", model, "an embedded model's name ('smollm2-135m', 'qwen2.5-0.5b') or a "
                        "checkpoint directory")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise bad_input(f"{source}: dtype", dtype, f"one of {list(DTYPES)} (or absent: kvjax.load's default)")
    mesh = None
    if raw.get("mesh") is not None:
        m = _mapping(source, "mesh", raw["mesh"], MESH_KEYS)
        mesh = tuple(_int(source, f"mesh.{k}", m.get(k, 1), 1) for k in MESH_KEYS)
    chat = raw.get("chat", False)
    if not isinstance(chat, bool):
        raise bad_input(f"{source}: chat", chat, "true or false")
    return JobConfig(
        model=model, policies=_policies(source, raw), dtype=dtype, mesh=mesh,
        sampling=_sampling(source, raw.get("sampling", {}) or {}),
        max_new_tokens=_int(source, "max_new_tokens", raw.get("max_new_tokens", 64), 1),
        batch_size=_int(source, "batch_size", raw.get("batch_size", 8), 1), chat=chat, source=source,
    )


def load(path) -> JobConfig:
    """Read and check a YAML config file."""
    import yaml

    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except IsADirectoryError:
        raise bad_input("CONFIG", str(path), "a YAML file (this is a directory)") from None
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise InputError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return parse(raw, str(path))
