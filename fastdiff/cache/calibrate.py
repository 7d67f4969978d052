"""TeaCache-style calibration (Liu et al., CVPR 2025, sec. 3.4): fit the polynomial that maps the relative change of
the early signal (the first unit's residual) to the relative change of the model output, for a user's model.

Runs the pipeline uncached, records per step ``x = |probe_t - probe_{t-1}|_1 / |probe_{t-1}|_1`` and ``y`` the same
for the model output -- separately for each call of a step (``StepContext.call``: the conditional and unconditional
calls of Flux's true CFG) -- and fits ``y ~ poly(x)`` by least squares (``numpy.polyfit``). The coefficients, highest degree
first, go to :class:`~fastdiff.cache.policies.ResidualThreshold`, whose threshold then bounds the *estimated*
accumulated output change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.cache.hooks import apply_cache, cached_model, main_output, model_id, remove_cache
from fastdiff.cache.policies import CachePolicy, ResidualThreshold, StepContext
from fastdiff.errors import InputError

__all__ = ["calibrate", "load_calibration", "rel_l1"]


def rel_l1(new: Tensor, old: Tensor) -> float:
    """Relative L1 change ``mean|new - old| / mean|old|`` (TeaCache eq. 5, First Block Cache)."""
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


class _Recorder(CachePolicy):
    """Computes everything; records, per call name, the probe's relative change at every step after the first and
    the model's outputs."""

    needs_probe = True

    def __init__(self):
        self.prev: dict[str, Tensor] = {}
        self.changes: dict[str, list[float]] = {}
        self.outputs: dict[str, list[Tensor]] = {}

    def reset(self) -> None:
        self.prev = {}

    def observe(self, ctx: StepContext, probe: Tensor) -> None:
        if ctx.call in self.prev and ctx.step > 0:
            self.changes.setdefault(ctx.call, []).append(rel_l1(probe, self.prev[ctx.call]))
        self.prev[ctx.call] = probe.detach()

    def output(self, model: nn.Module, out: Any) -> None:
        self.outputs.setdefault(model._fastdiff_cache.ctx.call, []).append(main_output(out).detach())

    def pairs(self) -> tuple[list[float], list[float]]:
        """The probe changes and the output changes of the generation just run, call by call, in the same order."""
        xs, ys = [], []
        for name, outs in self.outputs.items():
            xs += self.changes.get(name, [])
            ys += [rel_l1(outs[i], outs[i - 1]) for i in range(1, len(outs))]
        self.changes, self.outputs = {}, {}
        return xs, ys


def calibrate(pipe, steps: int, call: Callable | None = None, degree: int = 4, generations: int = 4, batch: int = 8,
              seed: int = 0) -> dict:  # fmt: skip
    """Fit the rescaling polynomial for ``pipe``'s model at ``steps`` steps over ``generations`` calls of
    ``call(pipe, steps, batch, seed + g)`` (default: fastdiff's class-conditional pipeline). Returns ``coefficients`` (highest degree first), the fit's R^2 and the points."""
    from fastdiff.cache.router import class_conditional_call

    call = call or class_conditional_call
    if not 1 <= degree <= 6:
        raise InputError(f"calibration polynomial degree must be in 1..6; got {degree}")
    model = cached_model(pipe)
    recorder = _Recorder()
    apply_cache(model, recorder)
    handle = model.register_forward_hook(lambda m, a, out: recorder.output(m, out))
    xs, ys = [], []
    try:
        for g in range(generations):
            with torch.no_grad():
                call(pipe, steps, batch, seed + g)
            x, y = recorder.pairs()
            xs, ys = xs + x, ys + y
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
