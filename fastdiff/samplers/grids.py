"""Sigma grids, descending and ending in 0 (k-diffusion's convention), and the one place fastdiff reproduces diffusers'
``set_timesteps``: the VP ``timestep_spacing`` grids, the Karras / exponential / beta respacings of DPM-Solver's
``use_*_sigmas``, and FlowMatchEulerDiscreteScheduler's flow-matching grids. The fastdiff schedulers, the functional
samplers and ``fastdiff schedule`` all take their grids from :func:`grid_from_config`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.schedules import (
    FlowSchedule,
    NoiseSchedule,
    VPSchedule,
    flow_time_to_sigma,
    shift_flow_time,
    stretch_to_terminal,
    time_shift,
    vp_timesteps,
)

__all__ = [
    "karras_sigmas", "exponential_sigmas", "beta_sigmas", "vp_sigmas", "flow_sigmas", "check_sigmas", "FlowGrid", "flow_grid",
    "Grid", "grid_from_config", "sigma_spacing", "solver_sigmas", "FLOW_T_MAX",
]  # fmt: skip

# Flow grids start at t = 1 (pure noise, sigma = inf); a sigma-space solver starts there at t = FLOW_T_MAX, which
# reads the input as (1 - 1e-4) noise + 1e-4 signal.
FLOW_T_MAX = 1 - 1e-4
# FlowMatchEulerDiscreteScheduler's config fields that shape its grid, with its defaults.
FLOW_GRID_DEFAULTS = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential",
    "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "invert_sigmas": False,
}  # fmt: skip


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1 or not 0 < sigma_min <= sigma_max:
        raise InputError(f"need n >= 1 and 0 < sigma_min <= sigma_max; got {n=}, {sigma_min=}, {sigma_max=}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i = 0..n-1, then 0
    (Karras et al. 2022, eq. 5)."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``n`` sigmas uniform in ``log sigma`` from ``sigma_max`` to ``sigma_min``, then 0 (diffusers'
    ``use_exponential_sigmas``)."""
    _check_range(n, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def beta_sigmas(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """``sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min)`` with ``F`` the Beta(alpha, beta) CDF, then 0 (Lee et al.
    2024, "Beta Sampling is All You Need"; diffusers' ``use_beta_sigmas``)."""
    from scipy.special import betaincinv

    _check_range(n, sigma_min, sigma_max)
    quantiles = torch.from_numpy(betaincinv(alpha, beta, 1 - torch.linspace(0, 1, n, dtype=torch.float64).numpy()))
    return _append_zero(sigma_min + quantiles * (sigma_max - sigma_min))


SIGMA_SPACINGS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def sigma_spacing(config: Mapping[str, Any]) -> str | None:
    """Which of diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` a config sets."""
    chosen = [kind for kind in SIGMA_SPACINGS if config.get(f"use_{kind}_sigmas")]
    if len(chosen) > 1:
        raise InputError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set; got {chosen}")
    return chosen[0] if chosen else None


def _respace(kind: str | None, sigmas: Tensor, n: int) -> Tensor:
    """``n`` sigmas of spacing ``kind`` between ``sigmas``' first and last values (diffusers' ``_convert_to_*``)."""
    if kind is None:
        return sigmas
    return SIGMA_SPACINGS[kind](n, sigmas[-1].item(), sigmas[0].item())[:-1]


def vp_sigmas(schedule: VPSchedule, n: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
    """The sigmas of diffusers' ``timestep_spacing`` grid on a discrete VP schedule, then 0."""
    return _append_zero(schedule.t_to_sigma(vp_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset).double()))


# ---------------------------------------------------------------------------------------------------------------
# Flow matching: FlowMatchEulerDiscreteScheduler.set_timesteps.


class FlowGrid(NamedTuple):
    """A flow-matching grid as diffusers builds it, both ``(N,)``: ``t`` the flow times visited (noise fraction,
    descending; diffusers' ``sigmas[:-1]``, or ``1 - sigmas[:-1]`` with ``invert_sigmas``) and ``timesteps`` what the
    model is conditioned on."""

    t: Tensor
    timesteps: Tensor


def _flow_count(n: int | None, sigmas: Sequence | None, timesteps: Sequence | None) -> int:
    lengths = {len(v) for v in (sigmas, timesteps) if v is not None}
    if n is not None:
        lengths.add(n)
    if len(lengths) != 1:
        raise InputError(f"num_inference_steps, sigmas and timesteps must agree in length; got {n=}, "
                         f"{None if sigmas is None else len(sigmas)} sigmas, {None if timesteps is None else len(timesteps)} timesteps")  # fmt: skip
    return lengths.pop()


def _flow_base(cfg: Mapping[str, Any], n: int, sigmas: Sequence | None, timesteps: Sequence | None) -> Tensor:
    """The unshifted times: ``sigmas``, else ``timesteps / T``, else ``linspace(1, t_min, n)`` with ``t_min`` the last of
    the scheduler's 1000 training times (statically shifted unless ``use_dynamic_shifting``, so diffusers shifts that
    end twice)."""
    if sigmas is not None:
        return torch.as_tensor(sigmas, dtype=torch.float64)
    if timesteps is not None:
        return torch.as_tensor(timesteps, dtype=torch.float64) / cfg["num_train_timesteps"]
    t_min = torch.tensor(1.0 / cfg["num_train_timesteps"], dtype=torch.float64)
    if not cfg["use_dynamic_shifting"]:
        t_min = shift_flow_time(t_min, cfg["shift"])
    return torch.linspace(1.0, t_min.item(), n, dtype=torch.float64)


def flow_grid(config: Mapping[str, Any], n: int | None = None, *, sigmas: Sequence[float] | None = None,
              timesteps: Sequence[float] | None = None, mu: float | None = None) -> FlowGrid:  # fmt: skip
    """FlowMatchEulerDiscreteScheduler's ``set_timesteps(n, sigmas=, mu=, timesteps=)`` for a ``config`` with its fields
    (:data:`FLOW_GRID_DEFAULTS` fill the missing ones): base times, static shift (SD3, Esser et al. 2024 eq. 23) or
    Flux's ``time_shift`` with ``mu``, ``shift_terminal`` stretch, Karras / exponential / beta respacing, then the model
    timesteps ``t T`` (explicit ``timesteps`` are kept as given; ``invert_sigmas``: ``(1 - t) T``)."""
    cfg = {key: config.get(key, default) for key, default in FLOW_GRID_DEFAULTS.items()}
    if cfg["use_dynamic_shifting"] and mu is None:
        raise InputError("use_dynamic_shifting needs mu in set_timesteps (the pipeline computes it)")
    n = _flow_count(n, sigmas, timesteps)
    t = _flow_base(cfg, n, sigmas, timesteps)
    t = time_shift(t, mu, cfg["time_shift_type"]) if cfg["use_dynamic_shifting"] else shift_flow_time(t, cfg["shift"])
    if cfg["shift_terminal"]:
        t = stretch_to_terminal(t, cfg["shift_terminal"])
    t = _respace(sigma_spacing(cfg), t, n)
    T = cfg["num_train_timesteps"]
    if cfg["invert_sigmas"]:
        return FlowGrid(t, (1 - t) * T)
    return FlowGrid(t, t * T if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64))


def solver_sigmas(sigmas: Tensor) -> Tensor:
    """``sigmas`` with pure noise (flow ``t = 1``, sigma = inf) moved to ``t = FLOW_T_MAX``, where a sigma-space solver can
    start."""
    return sigmas.clamp(max=FLOW_T_MAX / (1 - FLOW_T_MAX))


def flow_sigmas(n: int | None = None, *, sigmas: Sequence[float] | None = None, timesteps: Sequence[float] | None = None,
                mu: float | None = None, **config: Any) -> Tensor:  # fmt: skip
    """The sigma-space grid of :func:`flow_grid` for the FlowMatchEuler ``config`` fields given as keywords (``shift=3.0``,
    ``use_dynamic_shifting=True`` with ``mu``, ...), starting at ``t = FLOW_T_MAX``, then 0."""
    unknown = set(config) - set(FLOW_GRID_DEFAULTS)
    if unknown:
        raise InputError(f"unknown flow grid option(s) {sorted(unknown)}; expected {sorted(FLOW_GRID_DEFAULTS)}")
    grid = grid_from_config(FlowSchedule(config.get("num_train_timesteps", 1000)), config, n, timesteps=timesteps, sigmas=sigmas, mu=mu)
    return solver_sigmas(grid.sigmas)


# ---------------------------------------------------------------------------------------------------------------
# Any diffusers scheduler config.


class Grid(NamedTuple):
    """A scheduler's grid in fastdiff's convention."""

    sigmas: Tensor  # (N + 1,) noise levels visited, descending, ending in 0; inf = pure noise (flow t = 1)
    timesteps: Tensor  # (N,) the model's timestep at each of sigmas[:-1]
    integer: bool  # timesteps are diffusers' integer training steps


def grid_from_config(schedule: NoiseSchedule, config: Mapping[str, Any], n: int | None = None, *,
                     timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                     mu: float | None = None) -> Grid:  # fmt: skip
    """The grid diffusers' ``set_timesteps(n, timesteps=, sigmas=, mu=)`` builds for a scheduler ``config`` on
    ``schedule``: FlowMatchEuler's for flow models (:func:`flow_grid`; a point at ``t = 0`` is dropped, it would be a
    zero-length step); for VP models explicit ``sigmas`` or ``timesteps``, else the ``use_*_sigmas`` respacing of the
    schedule's whole sigma range (DPM-Solver's; the timesteps are the exact fractional ones, which DPM-Solver rounds for
    Karras), else the ``timestep_spacing`` grid."""
    if n is None and timesteps is None and sigmas is None:
        raise InputError("set_timesteps needs num_inference_steps, timesteps or sigmas")
    if isinstance(schedule, FlowSchedule):
        flow = flow_grid(config, n, sigmas=sigmas, timesteps=timesteps, mu=mu)
        keep = flow.t > 0
        return Grid(_append_zero(flow_time_to_sigma(flow.t[keep])), flow.timesteps[keep], integer=False)
    return _vp_grid(schedule, config, n, timesteps, sigmas)


def _snap_to_range(sigmas: Tensor, low: float, high: float, rel: float = 1e-3) -> Tensor:
    """Published lists are rounded (Align Your Steps' SD-1.5 sigmas start at 14.615 for a schedule whose largest is
    14.6146): values within ``rel`` outside the schedule's range are read as its end; anything further stays, and is
    refused by the range check downstream."""
    sigmas = torch.where((sigmas > high) & (sigmas <= high * (1 + rel)), torch.full_like(sigmas, high), sigmas)
    return torch.where((sigmas < low) & (sigmas >= low * (1 - rel)), torch.full_like(sigmas, low), sigmas)


def _vp_grid(schedule: NoiseSchedule, config: Mapping[str, Any], n: int | None, timesteps: Sequence[float] | None,
             sigmas: Sequence[float] | None) -> Grid:  # fmt: skip
    if timesteps is not None and sigmas is not None:
        raise InputError("pass either timesteps or sigmas, not both")
    if sigmas is not None:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        s = s[: len(s) - int(s[-1] == 0)]
        s = _snap_to_range(s, schedule.sigma_min, schedule.sigma_max)
        return Grid(_append_zero(s), schedule.sigma_to_t(s), integer=False)
    if timesteps is not None:
        t = torch.as_tensor(timesteps, dtype=torch.float64)
        return Grid(_append_zero(schedule.t_to_sigma(t)), t, integer=bool((t == t.round()).all()))
    kind = sigma_spacing(config)
    if kind is not None:
        s = SIGMA_SPACINGS[kind](n, schedule.sigma_min, schedule.sigma_max)[:-1]
        return Grid(_append_zero(s), schedule.sigma_to_t(s), integer=False)
    t = vp_timesteps(schedule.num_train_timesteps, n, config.get("timestep_spacing", "leading"), int(config.get("steps_offset", 0)))
    return Grid(_append_zero(schedule.t_to_sigma(t.double())), t.double(), integer=True)


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
