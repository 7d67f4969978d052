"""Shared pieces of the samplers: the step callback record, the exact DDIM transfer in sigma space and the dtype
of step maths on a device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepInfo", "Callback", "to_d", "transfer", "denoise", "step_dtype"]


def step_dtype(device: str | torch.device | None) -> torch.dtype:
    """The dtype of scheduler step maths on ``device``: float64, or float32 on Apple's MPS, which has no float64 (as
    diffusers' schedulers do)."""
    return torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each model evaluation."""

    i: int
    x: Tensor
    denoised: Tensor
    sigma: Tensor
    sigma_next: Tensor


Callback = Callable[[StepInfo], None]


def to_d(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """``dx/dsigma = (x - D(x, sigma)) / sigma`` of the probability-flow ODE (Karras et al. 2022, eq. 3), i.e. the
    noise estimate ``eps_hat``."""
    return (x - denoised) / sigma


def transfer(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """PNDM's transfer part phi (Liu et al. 2022, eq. 9): the exact DDIM step with noise estimate ``eps``, which in
    sigma space is ``x + (sigma_next - sigma) eps``."""
    return x + (sigma_next - sigma) * eps


def denoise(den: Callable, x: Tensor, sigma: Tensor, cond: Mapping[str, Any] | None, callback: Callback | None,
            i: int, sigma_next: Tensor) -> Tensor:  # fmt: skip
    """One model evaluation, reported to ``callback``."""
    denoised = den(x, sigma, **(cond or {}))
    if callback is not None:
        callback(StepInfo(i, x, denoised, sigma, sigma_next))
    return denoised
