"""Momentum samplers against divergence artifacts (Wizadwongsa et al., ICLR 2024, "Diffusion Sampling with Momentum
for Mitigating Divergence Artifacts"): heavy ball (HB) on iPNDM/PLMS and on DPM-Solver++(2M), and the generalized
heavy ball (GHVB), and Nesterov momentum on PLMS (the paper code's ``PLMSWithNTScheduler``). Each is a rule for :func:`~fastdiff.samplers.ode.sample_multistep`; ``beta = 1`` is exactly the base
solver (iPNDM, :func:`~fastdiff.samplers.pndm.ipndm_rule`, or DPM-Solver++(2M)), ``beta < 1`` damps the update
direction (first order for HB, as the paper proves).

The float-order convention of the paper (``3.8`` = order 4 with ``beta = 0.8``) is :func:`split_order`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.samplers._common import Callback, to_d, transfer
from fastdiff.samplers.ode import State, dpmpp_2m_direction, dpmpp_2m_rule, dpmpp_update, named_rule, sample_multistep
from fastdiff.samplers.pndm import adams_bashforth, check_order

__all__ = [
    "split_order", "hb_plms_rule", "nt_plms_rule", "ghvb_rule", "hb_dpmpp_2m_rule", "ghvb_mix", "sample_hb_plms", "sample_nt_plms",
    "sample_ghvb", "sample_hb_dpmpp_2m",
]  # fmt: skip

# Generalised Adams-Bashforth weights of GHVB for orders 1..4 as functions of beta, newest first; beta = 1 gives
# Adams-Bashforth (the reference implementation's `AdamBmixer`, before its division by beta).
_GHVB = {
    1: lambda b: (b,),
    2: lambda b: ((2 + b) / 2, -(2 - b) / 2),
    3: lambda b: ((18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12),
    4: lambda b: ((46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24),
}


def _check(order: int, beta: float) -> None:
    check_order(order)
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise InputError(f"momentum beta must be in (0, 1]; got {beta!r}")


def split_order(order: float) -> tuple[int, float]:
    """The paper's float order ``r`` -> ``(ceil(r), frac(r))`` with integers meaning ``beta = 1`` (3.8 -> (4, 0.8))."""
    k = math.ceil(order)
    beta = order - (k - 1)
    _check(k, beta)
    return k, beta


def ghvb_mix(history: tuple[Tensor, ...], order: int, beta: float) -> Tensor:
    """GHVB's direction ``sum_j w_j(beta) v_j / beta`` over the newest ``min(order, len(history))`` velocities."""
    k = min(order, len(history))
    return sum(w * v for w, v in zip(_GHVB[k](beta), history)) / beta


def hb_plms_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None,
                 order: int = 4, beta: float = 0.8) -> tuple[Tensor, State]:  # fmt: skip
    """Heavy ball on PLMS: ``p = AB_k(eps history)``, ``v <- (1 - beta) v + beta p`` (``v`` starts at ``p``), step along
    ``v`` (paper sec. 4, "PLMS with HB")."""
    history, velocity = state or ((), None)
    history = (to_d(x, denoised, sigma), *history)[:order]
    p = adams_bashforth(history, order)
    velocity = p if velocity is None else (1 - beta) * velocity + beta * p
    return transfer(x, velocity, sigma, sigma_next), (history, velocity)


def nt_plms_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None,
                 order: int = 4, beta: float = 0.8) -> tuple[Tensor, State]:  # fmt: skip
    """Nesterov momentum on PLMS (official ``PLMSWithNTScheduler._step_with_momentum``): ``p = AB_k(eps history)``,
    ``v <- (1 - beta) v + beta p`` (``v`` starts at the first ``eps``), step along ``(1 - beta) v + beta p``: the
    look-ahead mixes the fresh ``p`` in once more. ``beta = 1`` is PLMS (iPNDM) exactly."""
    history, velocity = state or ((), None)
    eps = to_d(x, denoised, sigma)
    history = (eps, *history)[:order]
    p = adams_bashforth(history, order)
    velocity = (1 - beta) * (eps if velocity is None else velocity) + beta * p
    return transfer(x, (1 - beta) * velocity + beta * p, sigma, sigma_next), (history, velocity)


def ghvb_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None,
              order: int = 4, beta: float = 0.8) -> tuple[Tensor, State]:  # fmt: skip
    """Generalized heavy ball: ``v <- (1 - beta) v + beta eps`` (``v`` starts at ``eps``), then the beta-dependent
    multistep combination of the velocity history (paper sec. 5). Order 1 is HB on DDIM."""
    history, velocity = state or ((), None)
    eps = to_d(x, denoised, sigma)
    velocity = eps if velocity is None else (1 - beta) * velocity + beta * eps
    history = (velocity, *history)[:order]
    return transfer(x, ghvb_mix(history, order, beta), sigma, sigma_next), (history, velocity)


def hb_dpmpp_2m_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None,
                     beta: float = 0.8) -> tuple[Tensor, State]:  # fmt: skip
    """Heavy ball on DPM-Solver++(2M) as the official code has it (``MomentumDPMSolverMultistepScheduler``): only the
    second-order steps carry momentum, on their data prediction ``D_hat = D0 + D1 / 2``; ``v`` starts at the first
    ``D_hat`` (step 2), then ``v <- (1 - beta) v + beta D_hat`` and ``x' = (sigma'/sigma) x - expm1(-h) v``. The first
    step (no history) and the lower-order final step to sigma = 0 are plain first-order DPM-Solver++ steps."""
    history, velocity = state or (None, None)
    if history is None or sigma_next == 0:
        x_next, history = dpmpp_2m_rule(x, denoised, sigma, sigma_next)
        return x_next, (history, velocity)
    h = torch.log(sigma / sigma_next)
    d_hat = dpmpp_2m_direction(denoised, h, history)
    velocity = d_hat if velocity is None else (1 - beta) * velocity + beta * d_hat
    return dpmpp_update(x, velocity, sigma, sigma_next, h), ((denoised, h), velocity)


def _sampler(rule: Callable, name: str, **params: Any) -> Callable:
    return named_rule(partial(rule, **params), name)


def sample_hb_plms(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                   callback: Callback | None = None, order: int = 4, beta: float = 0.8) -> Tensor:  # fmt: skip
    """PLMS with heavy-ball momentum (``beta = 1``: :func:`sample_ipndm`)."""
    _check(order, beta)
    return sample_multistep(_sampler(hb_plms_rule, "hb-plms", order=order, beta=beta), den, x, sigmas, cond, callback)


def sample_nt_plms(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                   callback: Callback | None = None, order: int = 4, beta: float = 0.8) -> Tensor:  # fmt: skip
    """PLMS with Nesterov momentum (``beta = 1``: :func:`sample_ipndm`)."""
    _check(order, beta)
    return sample_multistep(_sampler(nt_plms_rule, "nt-plms", order=order, beta=beta), den, x, sigmas, cond, callback)


def sample_ghvb(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                callback: Callback | None = None, order: int = 4, beta: float = 0.8) -> Tensor:  # fmt: skip
    """Generalized heavy ball of ``order`` 1-4 (``beta = 1``: :func:`sample_ipndm`)."""
    _check(order, beta)
    return sample_multistep(_sampler(ghvb_rule, "ghvb", order=order, beta=beta), den, x, sigmas, cond, callback)


def sample_hb_dpmpp_2m(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                       callback: Callback | None = None, beta: float = 0.8) -> Tensor:  # fmt: skip
    """DPM-Solver++(2M) with heavy-ball momentum (``beta = 1``: plain DPM-Solver++(2M))."""
    _check(1, beta)
    return sample_multistep(_sampler(hb_dpmpp_2m_rule, "hb-dpmpp-2m", beta=beta), den, x, sigmas, cond, callback)
