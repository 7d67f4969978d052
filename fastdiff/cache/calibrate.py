"""TeaCache-style calibration (Liu et al., CVPR 2025, sec. 3.4): fit the polynomial that maps the relative change of
the early signal (the first unit's residual) to the relative change of the model output, for a user's model.

Runs the pipeline uncached, records per step ``x = |probe_t - probe_{t-1}|_1 / |probe_{t-1}|_1`` and ``y`` the same
for the model output, and fits ``y ~ poly(x)`` by least squares (``numpy.polyfit``). The coefficients, highest degree
first, go to :class:`~fastdiff.cache.policies.ResidualThreshold`, whose threshold then bounds the *estimated*
accumulated output change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiff.cache.hooks import apply_cache, cached_model, model_id, remove_cache
from fastdiff.cache.policies import CachePolicy, ResidualThreshold, StepContext
from fastdiff.errors import InputError

__all__ = ["calibrate", "load_calibration", "rel_l1"]


def rel_l1(new: Tensor, old: Tensor) -> float:
    """Relative L1 change ``mean|new - old| / mean|old|`` (TeaCache eq. 5, First Block Cache)."""
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


class _Recorder(CachePolicy):
    """Computes everything; records the probe's relative change at every step after the first."""

    needs_probe = True

    def __init__(self):
        self.prev: Tensor | None = None
        self.changes: list[float] = []

    def reset(self) -> None:
        self.prev = None

    def observe(self, ctx: StepContext, probe: Tensor) -> None:
        if self.prev is not None and ctx.step > 0:
            self.changes.append(rel_l1(probe, self.prev))
        self.prev = probe.detach()


def calibrate(pipe, steps: int, call: Callable | None = None, degree: int = 4, generations: int = 4, batch: int = 8,
              seed: int = 0) -> dict:  # fmt: skip
    """Fit the rescaling polynomial for ``pipe``'s model at ``steps`` steps over ``generations`` calls of
    ``call(pipe, steps, batch, seed + g)`` (default: fastdiff's class-conditional pipeline). Returns ``coefficients`` (highest degree first), the fit's R^2 and the points."""
    from fastdiff.cache.router import class_conditional_call

    call = call or class_conditional_call
    if not 1 <= degree <= 6:
        raise InputError(f"calibration polynomial degree must be in 1..6; got {degree}")
    model = cached_model(pipe)
    recorder, outputs = _Recorder(), []
    apply_cache(model, recorder)
    handle = model.register_forward_hook(lambda m, a, out: outputs.append((out if isinstance(out, Tensor) else out[0]).detach()))
    xs, ys = [], []
    try:
        for g in range(generations):
            recorder.changes, outputs[:] = [], []
            with torch.no_grad():
                call(pipe, steps, batch, seed + g)
            ys += [rel_l1(outputs[i], outputs[i - 1]) for i in range(1, len(outputs))]
            xs += recorder.changes
    finally:
        handle.remove()
        remove_cache(model)
    if len(xs) != len(ys) or len(xs) <= degree:
        raise InputError(f"calibration needs more than {degree} steps with a model call each; got {len(xs)} probe / {len(ys)} output changes")
    x, y = np.asarray(xs), np.asarray(ys)
    coefficients = np.polyfit(x, y, degree)
    r2 = 1.0 - float(((np.polyval(coefficients, x) - y) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    return {"format": "fastdiff-cache-calibration", "model": model_id(model), "steps": steps, "degree": degree,
            "coefficients": coefficients.tolist(), "r2": r2, "probe_change": xs, "output_change": ys}  # fmt: skip


def load_calibration(path: str | Path, threshold: float, **kwargs) -> ResidualThreshold:
    """A :class:`ResidualThreshold` with the polynomial of a calibration file written by ``fastdiff cache calibrate``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the calibration file {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != "fastdiff-cache-calibration" or "coefficients" not in data:
        raise InputError(f"{path} is not a fastdiff cache calibration (expected 'format': 'fastdiff-cache-calibration' and 'coefficients')")
    return ResidualThreshold(threshold=threshold, coefficients=tuple(data["coefficients"]), **kwargs)
