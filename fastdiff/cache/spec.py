"""Cache settings as one short string, for the command line and configs (``fastdiff sample --cache every:3:taylor``).

* ``every:N`` -- recompute every N steps (FORA / DeepCache); ``every:N:taylor`` forecasts the reused features
  (first-order Taylor, TaylorSeer);
* ``threshold:T`` -- reuse while the first block's accumulated relative change stays below T (First Block Cache);
  ``threshold:T:FILE`` with the polynomial of ``fastdiff cache calibrate`` (TeaCache);
* ``router:FILE`` -- a HarmoniCa router trained with ``fastdiff cache train-router``.
"""

from __future__ import annotations

from torch import nn

from fastdiff.errors import InputError

__all__ = ["apply_cache_spec", "CACHE_SPEC_HELP"]

CACHE_SPEC_HELP = "every:N, every:N:taylor, threshold:T, threshold:T:CALIBRATION.json or router:ROUTER.safetensors"


def apply_cache_spec(model: nn.Module, spec: str) -> nn.Module:
    """Apply the cache ``spec`` describes to ``model``; a malformed spec is refused with the accepted forms."""
    from fastdiff.cache import EveryN, ResidualThreshold, apply_cache, apply_router, load_calibration

    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "every" and len(parts) in (1, 2) and (len(parts) == 1 or parts[1] == "taylor"):
            return apply_cache(model, EveryN(interval=int(parts[0])), forecast=int(len(parts) == 2))
        if kind == "threshold" and len(parts) == 1:
            return apply_cache(model, ResidualThreshold(threshold=float(parts[0])))
        if kind == "threshold" and len(parts) >= 2:
            return apply_cache(model, load_calibration(":".join(parts[1:]), threshold=float(parts[0])))
        if kind == "router" and parts:
            return apply_router(model, ":".join(parts))
    except InputError:
        raise
    except ValueError:  # a number that is not one
        pass
    raise InputError(f"cannot read the cache setting {spec!r}; expected {CACHE_SPEC_HELP}")
