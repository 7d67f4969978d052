"""Robust distances between samples, as pure functions returning one value per sample.

Conventions (see the reference notes on the scale trap): the pseudo-Huber distance of iCT is on the *whole-sample*
L2 norm, ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (Song & Dhariwal 2024, sec. 3.3); the Cauchy
loss of iLCT is on the per-sample mean squared error, ``log(1 + MSE / (2 c^2))`` (Dao et al. 2025, eq. 6).
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["pseudo_huber", "cauchy", "squared_l2", "ict_huber_c"]


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``0.00054 sqrt(d)`` for samples of ``d`` numbers (0.0151 for 28x28)."""
    return 0.00054 * math.sqrt(dim)


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||^2`` per sample."""
    return (a - b).flatten(1).pow(2).sum(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` per sample (whole-sample norm, not element-wise)."""
    return (squared_l2(a, b) + c * c).sqrt() - c


def cauchy(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``log(1 + MSE(a, b) / (2 c^2))`` per sample, MSE over all elements of the sample."""
    mse = (a - b).flatten(1).pow(2).mean(1)
    return (mse / (2 * c * c)).log1p()
