"""Descending sigma grids ending in 0 (k-diffusion's convention): Karras, diffusers' VP spacings, flow matching."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.schedules import VPSchedule, flow_time_to_sigma, shift_flow_time, time_shift, vp_timesteps

__all__ = ["karras_sigmas", "vp_sigmas", "flow_sigmas", "check_sigmas"]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i = 0..n-1, then 0
    (Karras et al. 2022, eq. 5)."""
    if n < 1 or not 0 < sigma_min < sigma_max:
        raise InputError(f"need n >= 1 and 0 < sigma_min < sigma_max; got {n=}, {sigma_min=}, {sigma_max=}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho)


def vp_sigmas(schedule: VPSchedule, n: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
    """The sigmas of diffusers' ``timestep_spacing`` grid on a discrete VP schedule, then 0."""
    return _append_zero(schedule.t_to_sigma(vp_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset).double()))


def flow_sigmas(n: int, shift: float = 1.0, mu: float | None = None, t_max: float = 0.999) -> Tensor:
    """Flow-matching times ``linspace(t_max, 1/n ... )`` as FlowMatchEuler spaces them, shifted (static ``shift`` or
    Flux's ``mu``), as sigmas, then 0. ``t_max < 1`` because ``t = 1`` is ``sigma = inf``."""
    if n < 1 or not 0 < t_max < 1:
        raise InputError(f"need n >= 1 and 0 < t_max < 1; got {n=}, {t_max=}")
    t = torch.linspace(t_max, t_max / n, n, dtype=torch.float64)
    t = time_shift(t, mu) if mu is not None else shift_flow_time(t, shift)
    return _append_zero(flow_time_to_sigma(t))


def check_sigmas(sigmas: Tensor, min_steps: int = 1, method: str = "sampler") -> Tensor:
    """A 1-D grid, strictly descending, positive except a final 0, with at least ``min_steps`` steps."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < min_steps + 1:
        raise InputError(f"{method} needs a 1-D sigma grid with at least {min_steps} steps ({min_steps + 1} values); got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or (sigmas[:-1] <= 0).any() or sigmas[-1] < 0:
        raise InputError(f"{method}: sigmas must be finite, positive, and may end in 0; got {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise InputError(f"{method}: sigmas must be strictly descending; got {sigmas.tolist()}")
    return sigmas

