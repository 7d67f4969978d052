"""Feature caching for diffusers models: pure policies (:mod:`fastdiff.cache.policies`) applied as removable hooks
(:mod:`fastdiff.cache.hooks`)."""

from fastdiff.cache.hooks import apply_cache, cache_stats, cache_units, remove_cache
from fastdiff.cache.policies import (
    CachePolicy,
    EveryN,
    NeverReuse,
    ResidualThreshold,
    StageSwitch,
    StaticMask,
    StepContext,
)

__all__ = [
    "apply_cache", "remove_cache", "cache_stats", "cache_units", "CachePolicy", "StepContext", "NeverReuse", "EveryN",
    "StageSwitch", "ResidualThreshold", "StaticMask",
]  # fmt: skip
