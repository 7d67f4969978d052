r"""Parameterisations: model outputs <-> x0 estimate, and the EDM / consistency-model scalings.

A model sees ``x_t = alpha * x0 + beta * eps`` with ``alpha = s`` and ``beta = s * sigma`` in fastdiff's convention
(:mod:`fastdiff.schedules`). The prediction types are

* ``epsilon``       the noise ``eps``;
* ``v_prediction``  ``v = alpha * eps - beta * x0`` (Salimans & Ho 2022, sec. 4);
* ``sample``        ``x0`` itself;
* ``flow``          the velocity ``eps - x0`` of ``x_t = (1 - t) x0 + t eps`` (Lipman et al. 2023; diffusers calls it
  ``flow_prediction``).

The formulas below hold for any ``alpha, beta`` (``v`` and ``flow`` are inverted without assuming
``alpha^2 + beta^2 = 1`` or ``alpha + beta = 1``), so every conversion is an exact round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastdiff.errors import InputError, check_choice

__all__ = [
    "PREDICTION_TYPES",
    "canonical_prediction_type",
    "x0_from_output",
    "output_from_x0",
    "dynamic_threshold",
    "check_threshold",
    "Scalings",
    "edm_scalings",
    "consistency_scalings",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
_ALIASES = {"flow_prediction": "flow", "v": "v_prediction", "eps": "epsilon", "x0": "sample"}


def canonical_prediction_type(name: str) -> str:
    """Map diffusers' spellings (``flow_prediction``) and short ones (``eps``, ``v``, ``x0``) to :data:`PREDICTION_TYPES`."""
    return check_choice("prediction_type", _ALIASES.get(name, name), PREDICTION_TYPES)


def check_threshold(ratio: float, max_value: float) -> None:
    """Refuse a dynamic-thresholding setting :func:`dynamic_threshold` cannot use (diffusers' key names)."""
    if not 0 < ratio <= 1 or not max_value >= 1:
        raise InputError(f"thresholding needs 0 < dynamic_thresholding_ratio <= 1 and sample_max_value >= 1; got {ratio}, {max_value}")


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding of an x0 estimate (Saharia et al. 2022, sec. 2.3; diffusers' ``thresholding``):
    per sample, ``s`` = the ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``; ``x0`` is clipped to
    ``[-s, s]`` and divided by ``s``. ``max_value = 1`` is static clipping to ``[-1, 1]``. It bounds what a step
    extrapolates from, which at high guidance keeps few-step samplers from diverging; for pixel-space models only."""
    check_threshold(ratio, max_value)
    flat = x0.flatten(1).abs()
    if flat.dtype in (torch.float16, torch.bfloat16):  # quantile needs float32 there (as diffusers upcasts)
        flat = flat.float()
    s = torch.quantile(flat, ratio, dim=1).clamp(1.0, max_value).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def x0_from_output(output: Tensor, x_t: Tensor, alpha: Tensor, beta: Tensor, prediction_type: str) -> Tensor:
    """The x0 estimate implied by a model ``output`` at ``x_t = alpha x0 + beta eps``."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return (x_t - beta * output) / alpha
    if kind == "v_prediction":  # alpha x_t - beta v = (alpha^2 + beta^2) x0
        return (alpha * x_t - beta * output) / (alpha**2 + beta**2)
    if kind == "flow":  # x_t - beta (eps - x0) = (alpha + beta) x0
        return (x_t - beta * output) / (alpha + beta)
    return output


def output_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, beta: Tensor, prediction_type: str) -> Tensor:
    """The model output that corresponds to ``x0`` at ``x_t`` (training targets; inverse of :func:`x0_from_output`)."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "sample":
        return x0
    eps = (x_t - alpha * x0) / beta
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return alpha * eps - beta * x0
    return eps - x0


@dataclass(frozen=True)
class Scalings:
    """Preconditioning ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022, eq. 7)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5, noise_scale: float = 1.0) -> Scalings:
    """EDM's preconditioning (Karras et al. 2022, Table 1); ``c_noise = noise_scale * ln(sigma) / 4``."""
    denom = sigma**2 + sigma_data**2
    return Scalings(
        c_skip=sigma_data**2 / denom,
        c_out=sigma * sigma_data / denom.sqrt(),
        c_in=1 / denom.sqrt(),
        c_noise=noise_scale * sigma.log() / 4,
    )


def consistency_scalings(
    sigma: Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5, noise_scale: float = 1.0
) -> Scalings:
    """Consistency-model boundary scalings (Song et al. 2023, appendix C): c_skip(sigma_min) = 1 and
    c_out(sigma_min) = 0 exactly, so ``f(x, sigma_min) == x`` bit for bit.

    ``noise_scale=1000`` gives the ``250 ln(sigma)`` timestep of openai's models and diffusers'
    ``CMStochasticIterativeScheduler``.
    """
    offset = sigma - sigma_min
    return Scalings(
        c_skip=sigma_data**2 / (offset**2 + sigma_data**2),
        c_out=offset * sigma_data / (sigma**2 + sigma_data**2).sqrt(),
        c_in=1 / (sigma**2 + sigma_data**2).sqrt(),
        c_noise=noise_scale * sigma.log() / 4,
    )



def lcm_scalings(t: Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Scalings:
    """LCM's boundary scalings at discrete timestep ``t`` (diffusers ``LCMScheduler``): ``c_skip = s^2 / ((k t)^2 + s^2)``,
    ``c_out = k t / sqrt((k t)^2 + s^2)`` with ``k = timestep_scaling``, ``s = sigma_data``; ``f(x, 0) = x``."""
    scaled = t * timestep_scaling
    return Scalings(
        c_skip=sigma_data**2 / (scaled**2 + sigma_data**2),
        c_out=scaled / (scaled**2 + sigma_data**2).sqrt(),
        c_in=torch.ones_like(t),
        c_noise=t,
    )
