"""The objective contract the trainer hosts.

An objective is an ``nn.Module`` (so accelerate can wrap it) with named ``phases`` -- e.g. ``("student",)`` or
``("generator", "critic")`` -- the parameters each phase trains (:meth:`Objective.parameters_for`), and
``forward(batch, phase, step) -> LossOutput``: named loss *terms* (summed for the gradient) and separate *logs*.
The losses themselves are pure functions (:mod:`fastdiff.objectives.losses`). The trainer never looks inside.

A batch is a dict: ``x`` (images), ``labels`` and ``seeds`` -- one int64 per sample. Objectives draw every random
number of a sample from its seed (:func:`per_sample_randn`), so a run gives the same losses whatever the batch is
split into (gradient accumulation, several processes) and a resumed run repeats the interrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["LossOutput", "Objective", "per_sample_randn", "per_sample_rand"]


@dataclass
class LossOutput:
    """Named loss terms (each a scalar tensor with gradient) and logs (floats or detached scalars)."""

    terms: dict[str, Tensor]
    logs: dict[str, float | Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        return sum(self.terms.values())


class Objective(nn.Module):
    """Base of the objectives: holds the networks as submodules; subclasses set ``phases`` and implement
    ``forward`` and ``parameters_for``. ``export()`` returns the network that is saved as the result."""

    phases: tuple[str, ...] = ("student",)

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:  # pragma: no cover
        raise NotImplementedError


def _generators(seeds: Tensor, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s) * 7919 + stream) for s in seeds.tolist()]


def per_sample_randn(like: Tensor, seeds: Tensor, stream: int) -> Tensor:
    """Standard normal noise shaped like ``like``; sample ``i`` drawn from ``(seeds[i], stream)`` only."""
    rows = [torch.randn(like.shape[1:], generator=g) for g in _generators(seeds, stream)]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def per_sample_rand(seeds: Tensor, stream: int, device: torch.device | str = "cpu") -> Tensor:
    """One uniform number in [0, 1) per sample, from ``(seeds[i], stream)``."""
    return torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in _generators(seeds, stream)]).to(device)
