"""Few-step samplers for distilled students: consistency multistep, CTM gamma-sampling, stochastic multistep."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.samplers._common import Callback, StepInfo
from fastdiff.samplers.grids import check_sigmas
from fastdiff.schedules import batch_view

__all__ = ["sample_consistency", "sample_ctm", "ctm_jump", "ctm_target", "ctm_renoise", "sample_stochastic_multistep",
           "sample_reflow", "reuse_noise_step"]


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _report(callback: Callback | None, i: int, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> None:
    if callback is not None:
        callback(StepInfo(i, x, denoised, sigma, sigma_next))


def sample_consistency(f: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                       callback: Callback | None = None, generator: torch.Generator | None = None,
                       sigma_min: float = 0.002) -> Tensor:  # fmt: skip
    """Consistency-model multistep sampling (Song et al. 2023, Algorithm 1): ``x0 = f(x, sigma_i)``, then re-noise
    ``x = x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) z`` for every later grid point; the final 0 is not visited."""
    sigmas = check_sigmas(sigmas, method="consistency sampler").to(x.device, x.dtype)
    levels = sigmas[:-1] if sigmas[-1] == 0 else sigmas
    if (levels < sigma_min).any():
        raise InputError(f"consistency sampling needs sigmas >= sigma_min={sigma_min}; got {levels.tolist()}")
    for i, sigma in enumerate(levels):
        x0 = f(x, sigma, **(cond or {}))
        nxt = levels[i + 1] if i + 1 < len(levels) else sigmas.new_zeros(())
        _report(callback, i, x, x0, sigma, nxt)
        x = x0 if i + 1 == len(levels) else x0 + (nxt**2 - sigma_min**2).sqrt() * _noise(x, generator)
    return x


def ctm_jump(x: Tensor, g: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """CTM's anytime-to-anytime map ``G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)`` (Kim et al., ICLR 2024, eq. 5) from
    the network's clean-sample estimate ``g``; ``t``, ``s`` scalars or per-sample ``(B,)``."""
    r = batch_view(s / t, x)
    return r * x + (1 - r) * g


def ctm_target(t_next: Tensor, gamma: float, sigma_min: float, last: bool) -> Tensor:
    """CTM gamma-sampling's jump target (Kim et al., ICLR 2024, Algorithm 2): ``s = sqrt(1 - gamma^2)(t_{n+1} -
    sigma_min) + sigma_min``; the last jump lands on ``t_{n+1}`` itself."""
    if not 0 <= gamma <= 1:
        raise InputError(f"CTM gamma must be in [0, 1]; got {gamma}")
    return t_next if last else (1 - gamma**2) ** 0.5 * (t_next - sigma_min) + sigma_min


def ctm_renoise(x_hat: Tensor, s: Tensor, t_next: Tensor, noise: Tensor | None) -> Tensor:
    """Back up from the jump's ``s`` to ``t_{n+1}``: ``x_hat + sqrt(t_{n+1}^2 - s^2) z`` (``noise=None``: the last jump)."""
    return x_hat if noise is None else x_hat + (t_next**2 - s**2).clamp(min=0).sqrt() * noise


def sample_ctm(g: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
               callback: Callback | None = None, generator: torch.Generator | None = None, gamma: float = 0.0,
               sigma_min: float = 0.002) -> Tensor:  # fmt: skip
    """CTM gamma-sampling (Kim et al., ICLR 2024, Algorithm 2) for a two-time model ``g(x, t, s, **cond)`` (the jump
    ``G(x, t, s)``): ``s`` from :func:`ctm_target`, ``x_hat = g(x, t_n, s)``, then :func:`ctm_renoise` to
    ``t_{n+1}``. ``gamma = 0`` is deterministic, ``gamma = 1`` consistency multistep. A final grid value 0 means a last
    jump to ``sigma_min``, without noise. :class:`~fastdiff.samplers.diffusers.CTMScheduler` steps with the same rule."""
    ctm_target(sigmas.new_ones(()), gamma, sigma_min, False)  # checks gamma before any model call
    sigmas = check_sigmas(sigmas, method="CTM sampler").to(x.device, x.dtype)
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1].clamp(min=sigma_min)
        last = i == len(sigmas) - 2
        s = ctm_target(t_next, gamma, sigma_min, last)
        x_hat = g(x, t, s, **(cond or {}))
        _report(callback, i, x, x_hat, t, t_next)
        x = ctm_renoise(x_hat, s, t_next, None if last else _noise(x, generator))
    return x


def sample_stochastic_multistep(f: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                                callback: Callback | None = None, generator: torch.Generator | None = None,
                                eta: float = 1.0) -> Tensor:  # fmt: skip
    """Multistep sampling of a consistency / SCott-style student with controlled stochasticity: ``x0 = f(x, sigma)``,
    ``eps_hat = (x - x0) / sigma``, ``x' = x0 + sigma' (sqrt(1 - eta^2) eps_hat + eta z)``. ``eta = 1`` re-noises
    fully (consistency multistep), ``eta = 0`` is the deterministic DDIM jump with the student's ``x0``."""
    if not 0 <= eta <= 1:
        raise InputError(f"eta must be in [0, 1]; got {eta}")
    sigmas = check_sigmas(sigmas, method="stochastic multistep sampler").to(x.device, x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = f(x, sigma, **(cond or {}))
        _report(callback, i, x, x0, sigma, sigma_next)
        eps_hat = (x - x0) / sigma
        x = x0 + sigma_next * ((1 - eta**2) ** 0.5 * eps_hat + eta * _noise(x, generator))
    return x


def reuse_noise_step(denoised: Tensor, sigma_next: Tensor, eps1: Tensor) -> Tensor:
    """2-RF++'s step that re-uses the initial noise: ``x_{i+1} = x0_hat + sigma_{i+1} eps_1``, in flow time
    ``z_{t'} = (1 - t') x0_hat + t' z_1`` (official ``generate.py`` ``sample_ode_generative``, ``sampler='new'``)."""
    return denoised + sigma_next * eps1


def sample_reflow(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                  callback: Callback | None = None) -> Tensor:  # fmt: skip
    """2-RF++'s sampler for (nearly straight) rectified flows: each step predicts ``x0_hat`` and moves to the next
    level along the line to the *initial* noise ``eps_1 = x_0 / sigma_0`` (:func:`reuse_noise_step`), not along the
    current direction. One step is Euler; from two steps on it differs from Euler / FlowMatchEuler.
    :class:`~fastdiff.samplers.diffusers.ReflowScheduler` steps with the same rule."""
    sigmas = check_sigmas(sigmas, method="reflow sampler").to(x.device, x.dtype)
    eps1 = x / sigmas[0]
    for i in range(len(sigmas) - 1):
        denoised = den(x, sigmas[i], **(cond or {}))
        _report(callback, i, x, denoised, sigmas[i], sigmas[i + 1])
        x = reuse_noise_step(denoised, sigmas[i + 1], eps1)
    return x
