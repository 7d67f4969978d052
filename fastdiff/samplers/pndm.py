"""Pseudo numerical methods (Liu et al., ICLR 2022): PLMS, S-PNDM and F-PNDM in sigma space.

Every stage moves with the exact transfer part phi (:func:`~fastdiff.samplers._common.transfer`, the DDIM step); the
gradient part combines noise estimates ``eps`` with linear-multistep coefficients (paper eq. 12, 13).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from fastdiff.samplers._common import Callback, denoise, to_d, transfer
from fastdiff.samplers.grids import check_sigmas

__all__ = ["adams_bashforth", "sample_plms", "sample_spndm", "sample_fpndm", "PNDM_VARIANTS"]

# Adams-Bashforth coefficients, newest first (order 1..4).
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def adams_bashforth(history: tuple[Tensor, ...], order: int = 4) -> Tensor:
    """``sum_j c_j h_j`` over the newest ``min(order, len(history))`` entries (newest first)."""
    k = min(order, len(history))
    return sum(c * h for c, h in zip(_AB[k], history))


def _pseudo_heun(den, x, sigma, sigma_next, cond, callback, i):
    """Pseudo improved Euler (S-PNDM warm-up, paper eq. 11): average the noise at both ends, one transfer. Returns the
    new x and the first noise estimate (the one kept in the history). Costs 2 evaluations."""
    e1 = to_d(x, denoise(den, x, sigma, cond, callback, i, sigma_next), sigma)
    x1 = transfer(x, e1, sigma, sigma_next)
    e2 = to_d(x1, denoise(den, x1, sigma_next, cond, callback, i, sigma_next), sigma_next)
    return transfer(x, (e1 + e2) / 2, sigma, sigma_next), e1


def _prk(den, x, sigma, sigma_next, sigma_mid, cond, callback, i):
    """Pseudo Runge-Kutta step (paper eq. 10): RK4 stages, each a transfer from x. Costs 4 evaluations."""
    e1 = to_d(x, denoise(den, x, sigma, cond, callback, i, sigma_next), sigma)
    x1 = transfer(x, e1, sigma, sigma_mid)
    e2 = to_d(x1, denoise(den, x1, sigma_mid, cond, callback, i, sigma_next), sigma_mid)
    x2 = transfer(x, e2, sigma, sigma_mid)
    e3 = to_d(x2, denoise(den, x2, sigma_mid, cond, callback, i, sigma_next), sigma_mid)
    x3 = transfer(x, e3, sigma, sigma_next)
    e4 = to_d(x3, denoise(den, x3, sigma_next, cond, callback, i, sigma_next), sigma_next)
    return transfer(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, sigma, sigma_next), e1


def geometric_mid(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Default PRK half step: the geometric mean of the two noise levels."""
    return (sigma * sigma_next).sqrt()


def _pndm(den, x, sigmas, cond, callback, warmup: str, order: int, sigma_mid: Callable = geometric_mid) -> Tensor:
    name = {"heun": "plms", "prk": "f-pndm"}[warmup] if order == 4 else "s-pndm"
    min_steps = 4 if warmup == "prk" else 1
    sigmas = check_sigmas(sigmas, min_steps=min_steps, method=name).to(x.device, x.dtype)
    warm_steps = 3 if warmup == "prk" else 1
    history: tuple[Tensor, ...] = ()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if i < warm_steps and sigma_next > 0:
            if warmup == "prk":
                x, e = _prk(den, x, sigma, sigma_next, sigma_mid(sigma, sigma_next), cond, callback, i)
            else:
                x, e = _pseudo_heun(den, x, sigma, sigma_next, cond, callback, i)
            history = (e, *history)[:4]
            continue
        e = to_d(x, denoise(den, x, sigma, cond, callback, i, sigma_next), sigma)
        history = (e, *history)[:4]
        x = transfer(x, adams_bashforth(history, order), sigma, sigma_next)
    return x


def sample_plms(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                callback: Callback | None = None) -> Tensor:  # fmt: skip
    """PLMS as diffusers' ``PNDMScheduler(skip_prk_steps=True)`` runs it: a pseudo improved Euler first step, then
    pseudo linear multistep of order 2, 3 and 4 (paper eq. 12). N steps cost N + 1 evaluations."""
    return _pndm(den, x, sigmas, cond, callback, "heun", 4)


def sample_spndm(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                 callback: Callback | None = None) -> Tensor:  # fmt: skip
    """S-PNDM: pseudo improved Euler first step, then the pseudo second-order multistep ``(3 e_t - e_{t-1}) / 2``."""
    return _pndm(den, x, sigmas, cond, callback, "heun", 2)


def sample_fpndm(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                 callback: Callback | None = None, sigma_mid: Callable = geometric_mid) -> Tensor:  # fmt: skip
    """F-PNDM: three pseudo Runge-Kutta steps (4 evaluations each), then fourth-order PLMS. Needs at least 4 steps;
    N steps cost N + 9 evaluations. ``sigma_mid(sigma, sigma_next)`` picks the half step (a VP schedule's timestep
    midpoint reproduces the paper exactly)."""
    return _pndm(den, x, sigmas, cond, callback, "prk", 4, sigma_mid)


PNDM_VARIANTS = {"plms": sample_plms, "s-pndm": sample_spndm, "f-pndm": sample_fpndm}

