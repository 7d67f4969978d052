"""Feature caching for diffusers models: pure policies (:mod:`fastdiff.cache.policies`) applied as removable hooks
(:mod:`fastdiff.cache.hooks`), a TeaCache-style calibration (:mod:`fastdiff.cache.calibrate`) and a learned
HarmoniCa router (:mod:`fastdiff.cache.router`)."""

from fastdiff.cache.calibrate import calibrate, load_calibration
from fastdiff.cache.hooks import apply_cache, cache_bypassed, cache_stats, cache_units, cached_model, model_id, remove_cache
from fastdiff.cache.policies import (
    CachePolicy,
    EveryN,
    NeverReuse,
    ResidualThreshold,
    StageSwitch,
    StaticMask,
    StepContext,
)
from fastdiff.cache.router import Router, RouterConfig, RouterGate, apply_router, load_router, train_router
from fastdiff.cache.spec import apply_cache_spec

__all__ = [
    "apply_cache", "remove_cache", "cache_stats", "cache_units", "cache_bypassed", "cached_model", "model_id",
    "CachePolicy", "StepContext", "NeverReuse", "EveryN", "StageSwitch", "ResidualThreshold", "StaticMask",
    "calibrate", "load_calibration", "Router", "RouterConfig", "RouterGate", "train_router", "load_router", "apply_router",
    "apply_cache_spec",
]  # fmt: skip
