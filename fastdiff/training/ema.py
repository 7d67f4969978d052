"""Exponential moving average of a model's weights, with a decay or a half-life, checkpointable."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastdiff.errors import InputError

__all__ = ["EMA", "decay_from_half_life"]


def decay_from_half_life(half_life_steps: float) -> float:
    """The per-step decay whose weights halve after ``half_life_steps`` updates (EDM2's half-life view)."""
    if half_life_steps <= 0:
        raise InputError(f"EMA half-life must be > 0 steps; got {half_life_steps}")
    return 0.5 ** (1 / half_life_steps)


class EMA:
    """``ema <- decay * ema + (1 - decay) * model`` after each optimiser step; ``state_dict`` / ``load_state_dict``
    make it part of accelerate's checkpoints (``accelerator.register_for_checkpointing``)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise InputError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
