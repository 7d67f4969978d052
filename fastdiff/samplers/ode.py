"""Reference ODE solvers in sigma space: Euler (= DDIM), Heun, DPM-Solver++(2M)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.samplers._common import Callback, denoise, to_d
from fastdiff.samplers.grids import check_sigmas
from fastdiff.schedules import batch_view

__all__ = [
    "sample_euler", "sample_heun", "heun_step", "sample_dpmpp_2m", "euler_rule", "dpmpp_2m_rule", "dpmpp_update", "sample_multistep",
    "named_rule",
]  # fmt: skip

State = Any
Rule = Callable[[Tensor, Tensor, Tensor, Tensor, State], tuple[Tensor, State]]


def sample_multistep(rule: Rule, den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                     callback: Callback | None = None) -> Tensor:  # fmt: skip
    """Drive a one-evaluation-per-step ``rule(x, denoised, sigma, sigma_next, state) -> (x_next, state)`` down the grid.
    The state (solver history) lives only in this loop; the diffusers schedulers call the same rules."""
    sigmas = check_sigmas(sigmas, method=getattr(rule, "__name__", "sampler")).to(x.device, x.dtype)
    state = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(den, x, sigmas[i], cond, callback, i, sigmas[i + 1])
        x, state = rule(x, denoised, sigmas[i], sigmas[i + 1], state)
    return x


def named_rule(rule: Callable, name: str) -> Callable:
    """``rule`` (e.g. a ``partial`` with its parameters) named ``name`` for :func:`sample_multistep`'s error messages."""
    rule.__name__ = name  # type: ignore[attr-defined]
    return rule


def euler_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None) -> tuple[Tensor, State]:
    """Euler on ``dx/dsigma`` -- exactly deterministic DDIM (Song et al. 2021, eq. 13) in sigma space."""
    return x + (sigma_next - sigma) * to_d(x, denoised, sigma), None


def sample_euler(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                 callback: Callback | None = None) -> Tensor:  # fmt: skip
    """Euler / DDIM sampler; first order."""
    return sample_multistep(euler_rule, den, x, sigmas, cond, callback)


def heun_step(den: Callable, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Mapping[str, Any] | None = None,
              callback: Callback | None = None, i: int = 0) -> Tensor:  # fmt: skip
    """One Heun step from ``sigma`` to ``sigma_next`` (Karras et al. 2022, Algorithm 1 without churn), Euler when
    ``sigma_next`` is 0. Both are scalars or per-sample ``(B,)`` tensors (CTM's teacher solves every sample between
    its own pair of grid points)."""
    s, s_next = batch_view(sigma, x), batch_view(sigma_next, x)
    d = to_d(x, denoise(den, x, sigma, cond, callback, i, sigma_next), s)
    x_euler = x + (s_next - s) * d
    if bool((sigma_next == 0).any()):
        if not bool((sigma_next == 0).all()):
            raise InputError("heun_step: sigma_next is 0 for some samples only; step those to 0 separately")
        return x_euler
    d_next = to_d(x_euler, denoise(den, x_euler, sigma_next, cond, callback, i, sigma_next), s_next)
    return x + (s_next - s) * (d + d_next) / 2


def sample_heun(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                callback: Callback | None = None) -> Tensor:  # fmt: skip
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn); Euler on a final step to 0."""
    sigmas = check_sigmas(sigmas, method="heun").to(x.device, x.dtype)
    for i in range(len(sigmas) - 1):
        x = heun_step(den, x, sigmas[i], sigmas[i + 1], cond, callback, i)
    return x


def dpmpp_2m_direction(denoised: Tensor, h: Tensor, state: State) -> Tensor:
    """DPM-Solver++(2M)'s data prediction ``D0 + (D0 - D_prev) / (2 r)``, ``r = h_prev / h`` (Lu et al. 2022b,
    Algorithm 2); first order without history."""
    if state is None:
        return denoised
    denoised_prev, h_prev = state[0], state[1]
    r = h_prev / h
    return (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev


def dpmpp_update(x: Tensor, data: Tensor, sigma: Tensor, sigma_next: Tensor, h: Tensor) -> Tensor:
    """DPM-Solver++'s exponential-integrator step along a data prediction, ``h = log(sigma / sigma_next)`` (Lu et al.
    2022b, eq. 10 in sigma space): ``x' = (sigma'/sigma) x - expm1(-h) data``."""
    return (sigma_next / sigma) * x - torch.expm1(-h) * data


def dpmpp_2m_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None) -> tuple[Tensor, State]:
    """One DPM-Solver++(2M) step in ``lambda = -log sigma`` along :func:`dpmpp_2m_direction` (first order without
    history); the step to sigma = 0 is first order too and returns the denoised estimate."""
    if sigma_next == 0:
        return denoised, None
    h = torch.log(sigma / sigma_next)
    return dpmpp_update(x, dpmpp_2m_direction(denoised, h, state), sigma, sigma_next, h), (denoised, h)


def sample_dpmpp_2m(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                    callback: Callback | None = None) -> Tensor:  # fmt: skip
    """DPM-Solver++(2M); second order."""
    return sample_multistep(dpmpp_2m_rule, den, x, sigmas, cond, callback)
