"""The objective contract the trainer hosts.

An objective is an ``nn.Module`` (so accelerate can wrap it) holding its networks as submodules. It declares
everything :func:`fastdiff.training.trainer.train` calls, and the trainer calls nothing else:

* ``phases`` -- the names of its optimisation phases, e.g. ``("student",)`` or ``("generator", "critic")``; each phase
  gets its own optimiser and schedule (``TrainerConfig.phase_optim[phase]``, with ``update_every`` for two-time-scale
  updates), run in this order within a step;
* :meth:`~Objective.parameters_for` -- the parameters a phase trains (its optimiser's; gradients of a phase's loss
  reach only these);
* :meth:`~Objective.forward` ``(batch, phase, step) -> LossOutput`` -- named loss *terms* (summed for the gradient)
  and separate *logs*;
* :meth:`~Objective.export` -- the network saved as the result (the trainer keeps its EMA);
* optional hooks with documented defaults: :meth:`~Objective.ema_targets` (networks that follow another one with an
  EMA, updated by the trainer's EMA after the phase's optimiser step) and :meth:`~Objective.after_step`.

The losses themselves are pure functions (:mod:`fastdiff.objectives.losses`). The trainer never looks inside.

A batch is a dict: ``x`` (images), ``labels`` and ``seeds`` -- one int64 per sample. Objectives draw every random
number of a sample from its seed (:func:`per_sample_randn`), so a run gives the same losses whatever the batch is
split into (gradient accumulation, several processes) and a resumed run repeats the interrupted one exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError

__all__ = ["LossOutput", "EMATarget", "Objective", "per_sample_randn", "per_sample_rand"]


@dataclass
class LossOutput:
    """Named loss terms (each a scalar tensor with gradient) and logs (floats or detached scalars; detached tensors
    cost no host synchronisation: the trainer reads them only at log steps)."""

    terms: dict[str, Tensor]
    logs: dict[str, float | Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        return sum(self.terms.values())


@dataclass
class EMATarget:
    """A network ``target`` that follows ``source`` (same architecture) as ``target <- decay target + (1 - decay)
    source`` after each optimiser step of the phase that declared it (e.g. LCM's EMA target, CTM's target network)."""

    target: nn.Module
    source: nn.Module
    decay: float

    def __post_init__(self):
        if not 0 <= self.decay < 1:
            raise InputError(f"EMA target decay must be in [0, 1); got {self.decay}")


class Objective(nn.Module, abc.ABC):
    """Base of the objectives: subclasses set ``phases`` and implement :meth:`parameters_for`, :meth:`forward` and
    :meth:`export`; :meth:`ema_targets` and :meth:`after_step` are optional hooks."""

    @property
    @abc.abstractmethod
    def phases(self) -> tuple[str, ...]:
        """The phase names, in the order they run within a step (a class attribute in subclasses)."""

    @abc.abstractmethod
    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        """The parameters ``phase`` trains: its optimiser holds those with ``requires_grad``, the backward pass of its
        loss accumulates gradients into those only, and gradient clipping sees those only."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        """The loss terms of ``phase`` at global step ``step`` on ``batch`` (this process's micro-batch of the global
        batch: ``x``, ``labels``, ``seeds``). Random numbers come from ``batch["seeds"]``, never the global RNG."""

    @abc.abstractmethod
    def export(self) -> nn.Module:
        """The network that is the result of training (the trainer keeps its EMA, checkpoints and returns it)."""

    def ema_targets(self, phase: str) -> Sequence[EMATarget]:
        """The networks moved by an EMA after ``phase``'s optimiser step (before :meth:`after_step`). Default: none."""
        return ()

    def after_step(self, phase: str) -> None:
        """Called after ``phase``'s optimiser step (and its EMA targets), on the unwrapped objective, for state an
        objective maintains itself. Default: nothing."""


def _generators(seeds: Tensor, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s) * 7919 + stream) for s in seeds.tolist()]


def per_sample_randn(like: Tensor, seeds: Tensor, stream: int) -> Tensor:
    """Standard normal noise shaped like ``like``; sample ``i`` drawn from ``(seeds[i], stream)`` only."""
    rows = [torch.randn(like.shape[1:], generator=g) for g in _generators(seeds, stream)]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def per_sample_rand(seeds: Tensor, stream: int, device: torch.device | str = "cpu") -> Tensor:
    """One uniform number in [0, 1) per sample, from ``(seeds[i], stream)``: float64, float32 on Apple's MPS."""
    values = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in _generators(seeds, stream)])
    return values.to(device, torch.float32 if torch.device(device).type == "mps" else torch.float64)
