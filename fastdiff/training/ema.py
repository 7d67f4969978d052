"""Exponential moving averages of a network's weights: the one implementation fastdiff uses.

:func:`ema_update_` moves one network towards another in place; :class:`EMA` owns a frozen copy and is what the trainer
keeps of every objective's exported network (and checkpoints as ``ema.safetensors``). The trainer also applies
:func:`ema_update_` to the target networks an objective declares (:meth:`~fastdiff.objectives.base.Objective.ema_targets`,
e.g. LCM's EMA target), and teachers train through the same trainer, so there is no other EMA update in the library.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastdiff.errors import InputError

__all__ = ["EMA", "decay_from_half_life", "ema_update_"]


def decay_from_half_life(half_life_steps: float) -> float:
    """The per-step decay whose weights halve after ``half_life_steps`` updates (EDM2's half-life view)."""
    if half_life_steps <= 0:
        raise InputError(f"EMA half-life must be > 0 steps; got {half_life_steps}")
    return 0.5 ** (1 / half_life_steps)


def _check_decay(decay: float) -> None:
    if not 0 <= decay < 1:
        raise InputError(f"EMA decay must be in [0, 1); got {decay}")


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter (a ``lerp_`` in ``ema``'s dtype; a parameter
    both share is left alone); buffers are copied. ``ema`` and ``model`` must have the same architecture (parameters
    and buffers in the same order)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if e is not p:
            e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class EMA:
    """A frozen copy of ``model`` moved by :func:`ema_update_` after each optimiser step; ``state_dict`` /
    ``load_state_dict`` make it part of accelerate's checkpoints (``accelerator.register_for_checkpointing``).

    Parameters that are frozen when the EMA is made (``requires_grad`` False: a LoRA layout's base, a frozen text
    encoder) are shared with ``model``, not copied: their average is themselves, and a copy of an SD-sized base
    would cost gigabytes. A parameter frozen then but trained later would be tracked live, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        _check_decay(decay)
        self.decay = decay
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=shared)
        for p in self.model.parameters():
            if id(p) not in shared:
                p.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        ema_update_(self.model, model, self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
