"""kvjax: KV-cache eviction for LLM inference in JAX.

    params = kvjax.load("smollm2-135m")
    out = kvjax.generate(params, "a long document ...", policy=kvjax.policies.SnapKV(budget=128))
"""

from kvjax import policies
from kvjax.api import Generation, Prefilled, forward, generate, load, prefill, save
from kvjax.mesh import shard_params as shard
from kvjax.xkv.budgets import BudgetProfile, load_profile
from kvjax.cache import Cache, kept_positions
from kvjax.ppl import perplexity
from kvjax.io.checkpoint import Params
from kvjax.xkv.profile import profile
from kvjax.learned.train import train_scorer
from kvjax.learned.store import TrainedScorer, load_scorer
from kvjax.policies.learned import Learned
from kvjax.models.config import ConfigError
from kvjax.io.safetensors import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "BudgetProfile",
    "Cache",
    "CheckpointError",
    "ConfigError",
    "Generation",
    "Learned",
    "Params",
    "Prefilled",
    "TrainedScorer",
    "forward",
    "generate",
    "kept_positions",
    "load",
    "load_scorer",
    "load_profile",
    "perplexity",
    "policies",
    "prefill",
    "profile",
    "save",
    "shard",
    "train_scorer",
]
