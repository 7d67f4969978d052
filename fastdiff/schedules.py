r"""Noise schedules and fastdiff's one time convention.

**The convention (EDM / k-diffusion sigma space).** Every model's noisy input is written as

.. math::  x_t = s(t)\,(x_0 + \sigma(t)\,\varepsilon), \qquad \varepsilon \sim \mathcal N(0, I)

(Karras et al. 2022, eq. 10 with ``s(t)`` the scale and ``sigma(t)`` the noise level). fastdiff's samplers,
denoisers and objectives work on the *unscaled* state ``x = x_t / s(t) = x_0 + sigma * eps`` and index noise by
``sigma`` alone. A schedule only says how ``sigma`` maps to the model's own timestep and scale:

=========================  =====================================  ==========================  =================
family                     native form                            ``sigma``                   ``s``
=========================  =====================================  ==========================  =================
diffusers discrete VP      ``sqrt(abar_t) x0 + sqrt(1-abar_t) e``  ``sqrt((1-abar_t)/abar_t)``  ``1/sqrt(1+sigma^2)``
flow matching / rect. flow ``(1-t) x0 + t e``,  ``t in [0, 1]``    ``t / (1 - t)``              ``1/(1+sigma)``
EDM / VE                   ``x0 + sigma e``                        ``sigma``                    ``1``
=========================  =====================================  ==========================  =================

Pure noise (``abar = 0`` or flow ``t = 1``) is ``sigma = inf``; it converts exactly (``t = 1`` <-> ``inf``) but a model
cannot be evaluated there in sigma space, so grids for flow models start just below ``t = 1``.

Discrete VP timesteps are interpolated **linearly in log sigma** between integer training steps, both ways, which
makes ``t -> sigma -> t`` exact and equals diffusers' ``_sigma_to_t`` (used by its Karras / exponential grids).
Note that ``EulerDiscreteScheduler(interpolation_type="linear")`` interpolates fractional timesteps linearly in
``sigma`` instead; at integer timesteps the two agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from fastdiff.errors import InputError, check_choice, check_in_range

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "VPSchedule",
    "FlowSchedule",
    "EDMSchedule",
    "vp_timesteps",
    "flow_time_to_sigma",
    "sigma_to_flow_time",
    "shift_flow_time",
    "unshift_flow_time",
    "time_shift",
    "undo_time_shift",
    "stretch_to_terminal",
    "dynamic_shift_mu",
    "add_noise",
    "schedule_from_config",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
TIME_SHIFT_TYPES = ("exponential", "linear")


class NoiseSchedule(Protocol):
    """What a denoiser adapter needs from a schedule: sigma <-> model timestep and the input scale."""

    num_train_timesteps: int

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Model timestep (diffusers units, e.g. 0..999) of noise level ``sigma``."""

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise level of model timestep ``t``."""

    def scale(self, sigma: Tensor) -> Tensor:
        """``s`` with ``x_t = s * (x0 + sigma * eps)``."""


# ---------------------------------------------------------------------------------------------------------------
# Discrete variance-preserving schedules (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC configs).


def _alpha_bar_betas(n: int, alpha_bar, max_beta: float = 0.999) -> Tensor:
    """Betas that discretise a continuous alpha-bar(t), t in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))


def _betas(schedule: str, n: int, beta_start: float, beta_end: float) -> Tensor:
    """float32 betas exactly as diffusers builds them, so alphas_cumprod match the model's training."""
    check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    return _alpha_bar_betas(n, _cosine_alpha_bar if schedule == "squaredcos_cap_v2" else _laplace_alpha_bar)


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that alpha-bar_T = 0 (Lin et al. 2024, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


class VPSchedule:
    """A diffusers discrete VP schedule in sigma space: ``sigma_t = sqrt((1 - abar_t) / abar_t)``.

    Args:
        alphas_cumprod: ``abar_t`` for t = 0 .. T-1, shape ``(T,)``, strictly decreasing in ``(0, 1]``.
    """

    def __init__(self, alphas_cumprod: Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.ndim != 1 or abar.numel() < 2:
            raise InputError(f"alphas_cumprod must be 1-D with at least 2 entries; got shape {tuple(abar.shape)}")
        if not ((abar > 0) & (abar <= 1)).all() or not (abar[1:] < abar[:-1]).all():
            raise InputError("alphas_cumprod must be strictly decreasing in (0, 1]")
        self.alphas_cumprod = abar
        self.betas: Tensor | None = None  # set by from_betas
        self.sigmas = ((1 - abar) / abar).sqrt()  # ascending with t
        self.log_sigmas = self.sigmas.log()
        self.num_train_timesteps = abar.numel()

    @classmethod
    def from_betas(cls, betas: Tensor, *, rescale_betas_zero_snr: bool = False) -> VPSchedule:
        """Build from betas; zero terminal SNR is represented as diffusers' Euler does (``abar_T = 2**-24``)."""
        betas = torch.as_tensor(betas, dtype=torch.float32)
        if rescale_betas_zero_snr:
            betas = _zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
        if rescale_betas_zero_snr:
            abar[-1] = 2.0**-24
        schedule = cls(abar)
        schedule.betas = betas  # the betas it was built from, as diffusers' schedulers keep them
        return schedule

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VPSchedule:
        """Build from a diffusers scheduler config (``num_train_timesteps``, ``beta_*``, ``trained_betas``)."""
        n = int(config.get("num_train_timesteps", 1000))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            betas = _betas(
                config.get("beta_schedule", "linear"), n, config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
            )
        return cls.from_betas(betas, rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)))

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def scale(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + sigma**2).sqrt()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """sigma at (possibly fractional) timesteps ``t`` in ``[0, T-1]``, log-linear between integer steps."""
        t = torch.as_tensor(t)
        check_in_range("timestep", t, 0, self.num_train_timesteps - 1, rel_tol=0)
        t64 = t.to(torch.float64)
        low = t64.floor().clamp(max=self.num_train_timesteps - 2).long()
        w = t64 - low
        log_sigma = torch.lerp(self.log_sigmas[low], self.log_sigmas[low + 1], w)
        return log_sigma.exp().to(_float_dtype(t))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of noise level ``sigma`` (inverse of :meth:`t_to_sigma`)."""
        sigma = torch.as_tensor(sigma)
        check_in_range("sigma", sigma, self.sigma_min, self.sigma_max)
        log_sigma = sigma.to(torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])  # float rounding only
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_train_timesteps - 2)
        w = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[low + 1] - self.log_sigmas[low])
        return (low + w).to(_float_dtype(sigma))

    def timesteps(self, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        """diffusers' inference timesteps for this schedule (see :func:`vp_timesteps`)."""
        return vp_timesteps(self.num_train_timesteps, num_inference_steps, spacing, steps_offset)


def vp_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """Descending integer timesteps with diffusers' ``timestep_spacing`` rules (DDIM/PNDM/Euler).

    ``leading``: ``k * (T // n) + steps_offset``; ``trailing``: ``round(T - k * T / n) - 1``;
    ``linspace``: ``round(linspace(0, T - 1, n))``.
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if not 1 <= n <= T:
        raise InputError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps); got {n}")
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":
        t = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    else:
        t = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    t = t.long().sort(descending=True).values
    if t.max() > T - 1 or t.min() < 0:
        raise InputError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
    return t


# ---------------------------------------------------------------------------------------------------------------
# Flow matching / rectified flow: x_t = (1 - t) x0 + t eps.


def flow_time_to_sigma(t: Tensor) -> Tensor:
    """sigma = t / (1 - t); ``t = 1`` gives ``inf``."""
    t = torch.as_tensor(t)
    check_in_range("flow time t", t, 0.0, 1.0, rel_tol=0)
    return t / (1 - t)


def sigma_to_flow_time(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma); ``inf`` gives exactly 1."""
    sigma = torch.as_tensor(sigma)
    check_in_range("sigma", sigma, 0.0, math.inf, rel_tol=0)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def shift_flow_time(t: Tensor, shift: float) -> Tensor:
    """Static resolution shift of SD3 (Esser et al. 2024, eq. 23): ``t' = s t / (1 + (s - 1) t)``."""
    _check_positive("shift", shift)
    t = torch.as_tensor(t)
    check_in_range("flow time t", t, 0.0, 1.0, rel_tol=0)
    return shift * t / (1 + (shift - 1) * t)


def unshift_flow_time(t_shifted: Tensor, shift: float) -> Tensor:
    """Inverse of :func:`shift_flow_time`: ``t = t' / (s - (s - 1) t')``."""
    _check_positive("shift", shift)
    t_shifted = torch.as_tensor(t_shifted)
    check_in_range("shifted flow time", t_shifted, 0.0, 1.0, rel_tol=0)
    return t_shifted / (shift - (shift - 1) * t_shifted)


def time_shift(t: Tensor, mu: float, kind: str = "exponential", power: float = 1.0) -> Tensor:
    """Flux's resolution-dependent shift: ``e^mu / (e^mu + (1/t - 1)^power)`` (``kind="linear"``: ``mu`` for ``e^mu``)."""
    check_choice("time_shift_type", kind, TIME_SHIFT_TYPES)
    t = torch.as_tensor(t)
    check_in_range("flow time t", t, 0.0, 1.0, rel_tol=0)
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / t - 1) ** power)


def undo_time_shift(t_shifted: Tensor, mu: float, kind: str = "exponential", power: float = 1.0) -> Tensor:
    """Inverse of :func:`time_shift`: ``1/t - 1 = (m (1/t' - 1))^(1/power)``."""
    check_choice("time_shift_type", kind, TIME_SHIFT_TYPES)
    t_shifted = torch.as_tensor(t_shifted)
    check_in_range("shifted flow time", t_shifted, 0.0, 1.0, rel_tol=0)
    m = math.exp(mu) if kind == "exponential" else mu
    return 1 / (1 + (m * (1 / t_shifted - 1)) ** (1 / power))


def stretch_to_terminal(t: Tensor, terminal: float) -> Tensor:
    """Stretch descending flow times so the last is ``terminal``, keeping ``1 - t`` proportional (LTX-Video's schedule;
    diffusers' ``shift_terminal``): ``1 - t' = (1 - t) (1 - terminal) / (1 - t_last)``."""
    check_in_range("shift_terminal", torch.as_tensor(terminal), 0.0, 1.0, rel_tol=0)
    t = torch.as_tensor(t)
    return 1 - (1 - t) * (1 - terminal) / (1 - t[-1])


def dynamic_shift_mu(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """``mu`` for :func:`time_shift`, linear in the image token count (the Flux pipeline's ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


class FlowSchedule:
    """Flow matching ``x_t = (1 - t) x0 + t eps`` in sigma space; model timesteps are ``t * num_train_timesteps``.

    The shift of SD3/Flux schedulers only moves the *grid* of times a sampler visits (:func:`shift_flow_time`,
    :func:`time_shift`); the model is always conditioned on the actual ``t`` of its input.
    """

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = int(num_train_timesteps)

    sigma_min = 0.0
    sigma_max = math.inf

    def scale(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + sigma)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return sigma_to_flow_time(sigma) * self.num_train_timesteps

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return flow_time_to_sigma(torch.as_tensor(t) / self.num_train_timesteps)


class EDMSchedule:
    """Variance-exploding sigma space of EDM (``s = 1``); the "timestep" is sigma itself."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        _check_positive("sigma_min", sigma_min)
        if not sigma_max > sigma_min:
            raise InputError(f"sigma_max must exceed sigma_min={sigma_min}; got {sigma_max}")
        self.sigma_min, self.sigma_max, self.num_train_timesteps = float(sigma_min), float(sigma_max), 0

    def scale(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t)


def add_noise(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The model's native noisy input ``s(sigma) * (x0 + sigma * noise)`` (diffusers ``add_noise`` / ``scale_noise``)."""
    sigma = batch_view(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0)
    return schedule.scale(sigma) * (x0 + sigma * noise)


def schedule_from_config(config: Mapping[str, Any]) -> VPSchedule | FlowSchedule:
    """The schedule a diffusers scheduler config describes: flow matching for ``FlowMatch*`` classes or configs
    with ``use_flow_sigmas``, else the discrete VP schedule from its betas."""
    config = getattr(config, "config", config)  # accept a scheduler object as well
    if is_flow_config(config):
        return FlowSchedule(config.get("num_train_timesteps", 1000))
    return VPSchedule.from_config(config)


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """True for flow-matching scheduler configs (FlowMatch* classes: a ``shift`` and no betas; ``use_flow_sigmas``;
    flow prediction)."""
    return (
        str(config.get("_class_name", "")).startswith("FlowMatch")
        or ("shift" in config and "beta_start" not in config)
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") in ("flow", "flow_prediction")
    )


def batch_view(sigma: Tensor, x: Tensor) -> Tensor:
    """Reshape a scalar or per-sample ``sigma`` of shape ``(B,)`` to broadcast against ``x`` of shape ``(B, ...)``."""
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise InputError(f"sigma must be a scalar or of shape ({x.shape[0]},) to match x; got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a finite positive number; got {value!r}")
