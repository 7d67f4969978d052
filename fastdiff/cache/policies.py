"""Cache policies: pure decision logic, separate from the hooks that apply them (:mod:`fastdiff.cache.hooks`).

A policy answers, at denoising step ``ctx.step`` and for cacheable unit ``unit`` (a transformer block, or a deep
module of a UNet), whether to compute it afresh (``True``) or reuse what was cached. Adaptive policies
(``needs_probe``) have the first unit computed at every step and look at its change (``observe``) before the other
units are asked; static ones may reuse every unit. Policies hold no tensors of the model; ``reset()`` starts a new
generation.
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
    """Where a model call sits in its generation. ``call`` names it within its denoising step when a pipeline calls
    the model more than once per step (Flux with ``true_cfg_scale``: conditional, then unconditional): the name of
    the ``cache_context`` the pipeline opened ("cond", "uncond"), or without one "0", "1", ... in call order; a
    classifier-free guided *batch* is one call, "0". ``step`` counts the model calls with this ``call`` name since the
    generation began (one per denoising step; a sampler that evaluates the model twice per step, such as Heun or
    PLMS's first step, counts each evaluation). ``timestep`` is what the model was given; ``sigma`` its noise level
    (``x = x0 + sigma * eps``) when ``apply_cache`` was given the scheduler, else None. The hooks keep a separate
    cache per ``call``, and stateful policies keep their state per ``call``."""

    step: int
    timestep: float
    sigma: float | None = None
    call: str = "0"


class CachePolicy:
    """Base policy: compute everything. Subclasses override :meth:`should_compute` (and :meth:`observe`)."""

    needs_probe = False  # True: unit 0 computes at every step and its residual goes to observe()

    def reset(self) -> None:
        """Forget everything about the previous generation."""

    def bind(self, units: list[str], model: str) -> None:
        """Called by ``apply_cache`` with the model's units and :func:`~fastdiff.cache.hooks.model_id`; a policy
        made for another model refuses here."""

    def begin_step(self, ctx: StepContext) -> None:
        """Called once per model call, before any unit (after ``reset`` on a new generation)."""

    def observe(self, ctx: StepContext, probe: Tensor) -> None:
        """Policies with ``needs_probe``: the first unit's residual (output - input) at this step, before the other
        units are asked."""

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        return True

    def gate(self, ctx: StepContext, unit: int) -> Tensor | None:
        """Training only: a differentiable weight ``w`` in [0, 1]; the unit then returns ``w * fresh + (1 - w) *
        reused`` and refreshes its cache where :meth:`should_compute` says so. ``None``: decide, do not mix."""
        return None


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

    def __post_init__(self):
        EveryN(self.interval, self.warmup)  # the same range checks
        if self.switch_step < 0:
            raise InputError(f"stage switch step must be >= 0; got {self.switch_step}")

    def bind(self, units: list[str], model: str) -> None:
        if not 1 <= self.split < len(units):
            raise InputError(f"stage switch split must be in [1, {len(units) - 1}] for a model with {len(units)} units; got {self.split}")

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        cached = unit >= self.split if ctx.step < self.switch_step else unit < self.split
        return not cached or _due(ctx.step, self.warmup, self.interval)


@dataclass
class _Accumulated:
    """:class:`ResidualThreshold`'s running state for one call of the step (``StepContext.call``)."""

    prev: Tensor | None = None  # the probe at the previous step
    acc: float = 0.0  # accumulated (rescaled) relative change since the last computed step
    run: int = 0  # reused steps in a row
    compute: bool = True  # this step's decision


@dataclass
class ResidualThreshold(CachePolicy):
    """Adaptive caching (First-Block-Cache / TeaCache): the relative L1 change of the first unit's residual,
    rescaled by a polynomial (``coefficients``, highest degree first; identity by default; ``fastdiff cache
    calibrate`` fits one), is accumulated over reused steps; the other units are reused while the sum stays below
    ``threshold`` and at most ``max_reuse`` steps in a row, then recomputed. Each call of a step
    (``StepContext.call``: conditional, unconditional) accumulates on its own."""

    threshold: float = 0.1
    coefficients: Sequence[float] = (1.0, 0.0)
    warmup: int = 1
    max_reuse: int = 4
    _calls: dict[str, _Accumulated] = field(default_factory=dict, repr=False)
    needs_probe = True

    def __post_init__(self):
        if not self.threshold > 0:
            raise InputError(f"cache threshold must be > 0; got {self.threshold}")
        if self.max_reuse < 1 or self.warmup < 1:
            raise InputError(f"max_reuse and warmup must be >= 1; got max_reuse={self.max_reuse}, warmup={self.warmup}")

    def reset(self) -> None:
        self._calls = {}

    def observe(self, ctx: StepContext, probe: Tensor) -> None:
        probe = probe.detach().float()
        s = self._calls.setdefault(ctx.call, _Accumulated())
        if s.prev is None or ctx.step < self.warmup or s.prev.shape != probe.shape:
            s.compute = True
        else:
            rel = float((probe - s.prev).abs().mean() / s.prev.abs().mean().clamp_min(1e-12))
            s.acc += max(0.0, float(sum(c * rel**k for k, c in enumerate(reversed(self.coefficients)))))  # a fitted poly may dip below 0
            s.compute = s.acc >= self.threshold or s.run >= self.max_reuse
        if s.compute:
            s.acc, s.run = 0.0, 0
        else:
            s.run += 1
        s.prev = probe

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        s = self._calls.get(ctx.call)
        return s is None or s.compute


@dataclass
class StaticMask(CachePolicy):
    """A fixed ``(steps, units)`` boolean plan -- True = compute -- e.g. a learned router thresholded at inference.
    ``model`` (a :func:`~fastdiff.cache.hooks.model_id`) and ``timesteps`` (the sampler's timesteps it was made
    for), when given, are checked: another model, step count or sampler is refused with the mismatch named."""

    mask: Tensor
    model: str | None = None
    timesteps: Sequence[float] | None = None

    def __post_init__(self):
        self.mask = torch.as_tensor(self.mask, dtype=torch.bool)
        if self.mask.ndim != 2:
            raise InputError(f"a cache mask is (steps, units); got shape {tuple(self.mask.shape)}")
        if self.timesteps is not None and len(self.timesteps) != self.mask.shape[0]:
            raise InputError(f"a cache plan needs one timestep per step: {self.mask.shape[0]} steps, {len(self.timesteps)} timesteps")

    def bind(self, units: list[str], model: str) -> None:
        if self.model is not None and self.model != model:
            raise InputError(f"this cache plan was made for the model {self.model}; this model is {model} "
                             "(another class or config). Train a router for this model")  # fmt: skip
        if self.mask.shape[1] != len(units):
            raise InputError(f"this cache plan has {self.mask.shape[1]} units per step; "
                             f"the model has {len(units)} ({units[0]} ... {units[-1]})")  # fmt: skip

    def begin_step(self, ctx: StepContext) -> None:
        steps = self.mask.shape[0]
        if ctx.step >= steps:
            raise InputError(f"this cache plan covers {steps} steps; the sampler is at step {ctx.step + 1}. "
                             f"Use it with {steps} steps or make a new one")  # fmt: skip
        if self.timesteps is not None and abs(ctx.timestep - float(self.timesteps[ctx.step])) > 1e-3 * max(1.0, abs(ctx.timestep)):
            raise InputError(f"this cache plan was made for timesteps {_short(self.timesteps)} ({steps} steps); at step {ctx.step} the "
                             f"sampler gives timestep {ctx.timestep:g}, expected {float(self.timesteps[ctx.step]):g}. "
                             "Use the same scheduler and step count, or make a new plan")  # fmt: skip

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        return bool(self.mask[ctx.step, unit]) or ctx.step == 0


def _short(values: Sequence[float]) -> str:
    shown = ", ".join(f"{float(v):g}" for v in list(values)[:3])
    return f"[{shown}, ...]" if len(values) > 3 else f"[{shown}]"
