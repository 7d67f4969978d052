"""Distances between samples, as pure functions returning one value per sample.

Conventions (reference notes 1.3, the scale trap) -- the two pseudo-Huber losses are different losses:

* :func:`pseudo_huber` is iCT's, on the *whole-sample* L2 norm: ``sqrt(||a - b||^2 + c^2) - c`` with
  ``c = 0.00054 sqrt(d)`` (Song & Dhariwal 2024, sec. 3.3). For ``||a - b|| >> c`` it is the unsquared L2 norm.
* :func:`pseudo_huber_elementwise` is diffusers' LCM scripts' ``--loss_type huber``: ``sqrt((a - b)^2 + c^2) - c``
  per element, then the mean (``train_lcm_distill_sd_wds.py`` and ``train_lcm_distill_lora_sd_wds.py``, step
  "10. Calculate loss"; ``--huber_c`` default 0.001). For ``|a - b| >> c`` it is the per-element L1 distance.
* :func:`mse` is those scripts' ``--loss_type l2`` (their default): ``F.mse_loss``, the mean over elements.
* :func:`cauchy` is iLCT's, on the per-sample MSE: ``log(1 + MSE / (2 c^2))`` (Dao et al. 2025, eq. 6; LCT
  ``models/karras_diffusion.py`` L246-248 writes it ``log(0.5 MSE + c^2) - 2 log c``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdiff.errors import InputError

__all__ = [
    "pseudo_huber", "pseudo_huber_elementwise", "cauchy", "mse", "squared_l2", "ict_huber_c", "weighted_denoising_mse",
    "DISTANCES", "distance", "hinge_discriminator_loss", "hinge_generator_loss", "adaptive_weight",
]  # fmt: skip


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``0.00054 sqrt(d)`` for samples of ``d`` numbers (0.0151 for 28x28)."""
    return 0.00054 * math.sqrt(dim)


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||^2`` per sample."""
    return (a - b).flatten(1).pow(2).sum(1)


def mse(a: Tensor, b: Tensor, c: float = 0.0) -> Tensor:
    """``mean((a - b)^2)`` per sample (``c`` is unused; it keeps the signature of the other distances)."""
    return (a - b).flatten(1).pow(2).mean(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """iCT: ``sqrt(||a - b||^2 + c^2) - c`` per sample (whole-sample norm, not element-wise)."""
    return (squared_l2(a, b) + c * c).sqrt() - c


def pseudo_huber_elementwise(a: Tensor, b: Tensor, c: float) -> Tensor:
    """diffusers' LCM scripts: ``mean(sqrt((a - b)^2 + c^2) - c)`` per sample, the mean over its elements."""
    return ((a - b).flatten(1).pow(2) + c * c).sqrt().mean(1) - c


def cauchy(a: Tensor, b: Tensor, c: float) -> Tensor:
    """iLCT: ``log(1 + MSE(a, b) / (2 c^2))`` per sample, MSE over all elements of the sample."""
    return (mse(a, b) / (2 * c * c)).log1p()


def weighted_denoising_mse(denoised: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """iLCT's diffusion loss per sample: ``(1 / sigma^2 + 1 / sigma_data^2) MSE(denoised, x0)`` -- EDM's weighting
    (LCT ``models/karras_diffusion.py`` L233-234: ``get_weightings("karras", sigma^-2)`` times ``mean_flat``, at the
    student's sigma)."""
    return (sigma.pow(-2) + sigma_data**-2) * mse(denoised, x0)


DISTANCES = {"l2": mse, "pseudo_huber": pseudo_huber, "pseudo_huber_elementwise": pseudo_huber_elementwise, "cauchy": cauchy}


def distance(kind: str, a: Tensor, b: Tensor, c: float) -> Tensor:
    """The distance named ``kind`` (a key of :data:`DISTANCES`) per sample, computed in float32 or wider."""
    if kind not in DISTANCES:
        raise InputError(f"unknown loss {kind!r}; expected one of {sorted(DISTANCES)}")
    return DISTANCES[kind](a.float(), b.float(), c)


def adaptive_weight(main: Tensor, other: Tensor, at: Tensor, lo: float, hi: float) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7), as CTM and SCott's ``adaptive_adversary`` use it:
    ``||grad_at main|| / (||grad_at other|| + 1e-4)`` clamped to ``[lo, hi]``, detached (it scales ``other``, it is not
    trained). ``at``: a tensor both losses depend on -- a last layer's weight (VQGAN, CTM) or the network's output."""
    (g_main,) = torch.autograd.grad(main, at, retain_graph=True, allow_unused=True)
    (g_other,) = torch.autograd.grad(other, at, retain_graph=True, allow_unused=True)
    if g_main is None or g_other is None:
        return main.new_tensor(hi if g_other is None else lo)
    return (g_main.norm() / (g_other.norm() + 1e-4)).clamp(lo, hi).detach()


def hinge_discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """The hinge GAN loss of the discriminator, ``mean relu(1 + D(fake)) + mean relu(1 - D(real))`` (CTM's, after
    StyleGAN-XL)."""
    return (1 + logits_fake.float()).relu().mean() + (1 - logits_real.float()).relu().mean()


def hinge_generator_loss(logits_fake: Tensor) -> Tensor:
    """The generator's side of the hinge GAN, ``-mean D(fake)``."""
    return -logits_fake.float().mean()
