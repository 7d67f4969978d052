"""Cache policies: pure decision logic, separate from the hooks that apply them (:mod:`fastdiff.cache.hooks`).

A policy answers, at denoising step ``ctx.step`` and for cacheable unit ``unit`` (a transformer block, or a deep
module of a UNet), whether to compute it afresh (``True``) or reuse what was cached. The first unit is always
computed; adaptive policies look at its change (``observe``) before the other units are asked. Policies hold no
tensors of the model; ``reset()`` starts a new generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["StepContext", "CachePolicy", "NeverReuse", "EveryN", "StageSwitch", "ResidualThreshold", "StaticMask"]


@dataclass(frozen=True)
class StepContext:
    """Where a model call sits in its generation: ``step`` counts the model calls since the generation began (one
    per denoising step; a classifier-free guided batch is one call); ``timestep`` is what the model was given."""

    step: int
    timestep: float


class CachePolicy:
    """Base policy: compute everything. Subclasses override :meth:`should_compute` (and :meth:`observe`)."""

    def reset(self) -> None:
        """Forget everything about the previous generation."""

    def bind(self, units: list[str]) -> None:
        """Called by ``apply_cache`` with the model's units; a policy made for another model refuses here."""

    def observe(self, ctx: StepContext, probe: Tensor) -> None:
        """See the first unit's residual (output - input) at this step, before the other units are asked."""

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        return True


class NeverReuse(CachePolicy):
    """Compute every unit at every step (the hooks run, nothing is reused)."""


@dataclass
class EveryN(CachePolicy):
    """Static caching (FORA, DeepCache): compute every ``interval`` steps, reuse in between; the first ``warmup``
    steps are always computed. ``units`` limits caching to those units (``None``: all)."""

    interval: int = 2
    warmup: int = 1
    units: Sequence[int] | None = None

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise InputError(f"cache interval must be an integer >= 1; got {self.interval!r}")
        if self.warmup < 1:
            raise InputError(f"cache warmup must be >= 1 step (the first step has nothing to reuse); got {self.warmup}")

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        if self.units is not None and unit not in self.units:
            return True
        return _due(ctx.step, self.warmup, self.interval)


def _due(step: int, warmup: int, interval: int) -> bool:
    """Computed during the warm-up, then every ``interval`` steps counted from its last step (0, N, 2N, ... for a
    warm-up of one step)."""
    return step < warmup or (step - warmup + 1) % interval == 0


@dataclass
class StageSwitch(CachePolicy):
    """Delta-DiT's stage-adaptive caching: before step ``switch_step`` reuse the rear units (the outline stage),
    from it on the front units (the detail stage), each every ``interval`` steps; ``split`` is the first rear unit."""

    split: int
    switch_step: int
    interval: int = 2
    warmup: int = 1

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        cached = unit >= self.split if ctx.step < self.switch_step else unit < self.split
        return not cached or _due(ctx.step, self.warmup, self.interval)


@dataclass
class ResidualThreshold(CachePolicy):
    """Adaptive caching (First-Block-Cache / TeaCache): the relative L1 change of the first unit's residual,
    rescaled by a polynomial (``coefficients``, highest degree first; identity by default; ``fastdiff cache
    calibrate`` fits one), is accumulated over reused steps; the other units are reused while the sum stays below
    ``threshold`` and at most ``max_reuse`` steps in a row, then recomputed."""

    threshold: float = 0.1
    coefficients: Sequence[float] = (1.0, 0.0)
    warmup: int = 1
    max_reuse: int = 4
    _prev: Tensor | None = field(default=None, repr=False)
    _acc: float = 0.0
    _run: int = 0
    _compute: bool = True

    def __post_init__(self):
        if not self.threshold > 0:
            raise InputError(f"cache threshold must be > 0; got {self.threshold}")

    def reset(self) -> None:
        self._prev, self._acc, self._run, self._compute = None, 0.0, 0, True

    def observe(self, ctx: StepContext, probe: Tensor) -> None:
        probe = probe.detach().float()
        if self._prev is None or ctx.step < self.warmup or self._prev.shape != probe.shape:
            self._compute = True
        else:
            rel = float((probe - self._prev).abs().mean() / self._prev.abs().mean().clamp_min(1e-12))
            self._acc += float(sum(c * rel**k for k, c in enumerate(reversed(self.coefficients))))
            self._compute = self._acc >= self.threshold or self._run >= self.max_reuse
        if self._compute:
            self._acc, self._run = 0.0, 0
        else:
            self._run += 1
        self._prev = probe

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        return self._compute


@dataclass
class StaticMask(CachePolicy):
    """A fixed ``(steps, units)`` boolean plan -- True = compute -- e.g. a learned router thresholded at inference.
    A generation with more steps than the plan is refused."""

    mask: Tensor
    model: str = ""

    def __post_init__(self):
        self.mask = torch.as_tensor(self.mask, dtype=torch.bool)
        if self.mask.ndim != 2:
            raise InputError(f"a cache mask is (steps, units); got shape {tuple(self.mask.shape)}")

    def bind(self, units: list[str]) -> None:
        if self.mask.shape[1] != len(units):
            raise InputError(f"this cache plan{f' for {self.model}' if self.model else ''} has {self.mask.shape[1]} units per step; "
                             f"the model has {len(units)} ({units[0]} ... {units[-1]})")  # fmt: skip

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        if ctx.step >= self.mask.shape[0]:
            raise InputError(f"this cache plan{f' for {self.model}' if self.model else ''} covers {self.mask.shape[0]} steps; "
                             f"the sampler is at step {ctx.step + 1}. Use it with {self.mask.shape[0]} steps or make a new one")  # fmt: skip
        return bool(self.mask[ctx.step, unit]) or ctx.step == 0
