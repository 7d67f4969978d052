"""Pseudo numerical methods (Liu et al., ICLR 2022): PLMS, S-PNDM, F-PNDM and iPNDM in sigma space.

Every stage moves with the exact transfer part phi (:func:`~fastdiff.samplers._common.transfer`, the DDIM step); the
gradient part combines noise estimates ``eps`` with linear-multistep coefficients (paper eq. 12, 13). Every
multistep step of every variant is one :func:`ipndm_rule` (iPNDM is that rule from the first step on).

The methods are written once, as a *program* (:func:`pndm_program`): a generator that yields each point where it
needs the model, ``Query(x, sigma, ...)``, receives ``(x_evaluated, denoised)`` back and finally returns the sample.
:func:`run_program` drives it with a denoiser (the functional samplers); the diffusers schedulers drive the same
program with the model outputs the pipeline hands to ``step`` -- warm-up stages become ordinary timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.samplers._common import Callback, denoise, to_d, transfer
from fastdiff.samplers.grids import check_sigmas
from fastdiff.samplers.ode import State, named_rule, sample_multistep
from fastdiff.schedules import EDMSchedule, NoiseSchedule

__all__ = [
    "adams_bashforth", "variable_ab_weights", "check_order", "ipndm_rule", "ipndm_v_rule", "sample_ipndm_v", "prk_midpoint", "sample_plms", "sample_spndm", "sample_fpndm",
    "sample_ipndm", "PNDM_VARIANTS", "pndm_program", "run_program", "Query",
]  # fmt: skip

# Adams-Bashforth coefficients, newest first (order 1..4).
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
# variant -> (warm-up, multistep order, fewest steps)
PNDM_VARIANTS = {"plms": ("heun", 4, 1), "s-pndm": ("heun", 2, 1), "f-pndm": ("prk", 4, 4), "ipndm": ("none", 4, 1)}


class Query(NamedTuple):
    """A point where a program needs the model: evaluate at ``(x, sigma)``; ``i`` and ``sigma_next`` name the step."""

    x: Tensor
    sigma: Tensor
    i: int
    sigma_next: Tensor


Program = Generator[Query, tuple[Tensor, Tensor], Tensor]


def check_order(order: int) -> None:
    if order not in _AB:
        raise InputError(f"order must be 1, 2, 3 or 4; got {order}")


def adams_bashforth(history: tuple[Tensor, ...], order: int = 4) -> Tensor:
    """``sum_j c_j h_j`` over the newest ``min(order, len(history))`` entries (newest first)."""
    k = min(order, len(history))
    return sum(c * h for c, h in zip(_AB[k], history))


def ipndm_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None,
               order: int = 4) -> tuple[Tensor, State]:  # fmt: skip
    """One pseudo linear multistep step (paper eq. 12): push ``eps = (x - D) / sigma`` onto the history (newest first)
    and transfer along its Adams-Bashforth combination of order ``min(order, len(history))``. Run from the first step
    this is iPNDM (orders 1, 2, 3, 4 as the history fills); after a warm-up, PLMS / S-PNDM / F-PNDM."""
    history = (to_d(x, denoised, sigma), *(state or ()))[:order]
    return transfer(x, adams_bashforth(history, order), sigma, sigma_next), history


def variable_ab_weights(levels: tuple[float, ...], sigma_next: float) -> tuple[float, ...]:
    """Adams-Bashforth weights for nodes ``levels`` (sigmas, newest first) and the step to ``sigma_next``:
    ``c_j = (1 / h) int_{s_0}^{s_next} L_j(s) ds`` with ``L_j`` the Lagrange basis on the nodes, ``h = s_next - s_0``.
    Exact for an integrand of degree < ``len(levels)`` on any grid; on a uniform grid the classical weights."""
    h = sigma_next - levels[0]
    u = [(s - levels[0]) / h for s in levels]  # nodes in units of the step: 0, then -1, -2, ... on a uniform grid
    weights = []
    for j, uj in enumerate(u):
        basis = np.poly1d([1.0])
        for m, um in enumerate(u):
            if m != j:
                basis *= np.poly1d([1.0, -um]) / (uj - um)
        weights.append(float(basis.integ()(1.0)))  # int_0^1 (the antiderivative vanishes at 0)
    return tuple(weights)


def ipndm_v_rule(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: State = None,
                 order: int = 4) -> tuple[Tensor, State]:  # fmt: skip
    """:func:`ipndm_rule` with :func:`variable_ab_weights` (iPNDM-v, the variable-step version in the official
    diff-solvers code): the fixed weights assume equal steps and make iPNDM second order on Karras / VP grids; these
    keep order ``order`` on any grid and equal the fixed ones on a uniform grid."""
    history, levels = state or ((), ())
    history = (to_d(x, denoised, sigma), *history)[:order]
    levels = (float(sigma), *levels)[:order]
    weights = variable_ab_weights(levels, float(sigma_next))
    return transfer(x, sum(c * e for c, e in zip(weights, history)), sigma, sigma_next), (history, levels)


def _eps(q: Query):
    """Ask for the model at ``q``; the noise estimate there (paper's ``e``)."""
    x, denoised = yield q
    return to_d(x, denoised, q.sigma)


def _pseudo_heun(x, sigma, sigma_next, i):
    """Pseudo improved Euler (S-PNDM warm-up, paper eq. 11): average the noise at both ends, one transfer. Returns the
    new x and the first noise estimate (the one kept in the history). Costs 2 evaluations."""
    e1 = yield from _eps(Query(x, sigma, i, sigma_next))
    e2 = yield from _eps(Query(transfer(x, e1, sigma, sigma_next), sigma_next, i, sigma_next))
    return transfer(x, (e1 + e2) / 2, sigma, sigma_next), e1


def _prk(x, sigma, sigma_next, sigma_mid, i):
    """Pseudo Runge-Kutta step (paper eq. 10): RK4 stages, each a transfer from x. Costs 4 evaluations."""
    e1 = yield from _eps(Query(x, sigma, i, sigma_next))
    e2 = yield from _eps(Query(transfer(x, e1, sigma, sigma_mid), sigma_mid, i, sigma_next))
    e3 = yield from _eps(Query(transfer(x, e2, sigma, sigma_mid), sigma_mid, i, sigma_next))
    e4 = yield from _eps(Query(transfer(x, e3, sigma, sigma_next), sigma_next, i, sigma_next))
    return transfer(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, sigma, sigma_next), e1


def prk_midpoint(sigma: Tensor, sigma_next: Tensor, schedule: NoiseSchedule | None = None,
                 integer_timesteps: bool = False) -> Tensor:  # fmt: skip
    """The noise level of PRK's half step ``t - delta/2`` (paper eq. 10; the official code's ``(t + t_next) / 2``): the
    midpoint of the model's timesteps of ``sigma`` and ``sigma_next`` under ``schedule``. On integer grids it is
    rounded up to an integer timestep, diffusers' PNDMScheduler's ``t - (T // N) // 2``. Without a schedule the
    model's time is sigma itself (EDM / VE models, the oracle)."""
    schedule = schedule or EDMSchedule()
    t = schedule.sigma_to_t(torch.stack([sigma, sigma_next]).to("cpu", torch.float64))  # VP tables live on the CPU
    t_mid = (t.round().sum() / 2).ceil() if integer_timesteps else t.mean()
    return schedule.t_to_sigma(t_mid).to(sigma)


def pndm_program(x: Tensor, sigmas: Tensor, variant: str = "plms", schedule: NoiseSchedule | None = None,
                 integer_timesteps: bool = False) -> Program:  # fmt: skip
    """The PNDM family as a program (see the module docstring). ``variant``: ``plms`` (pseudo-Heun first step, then
    linear multistep of order 2, 3, 4), ``s-pndm`` (pseudo-Heun, then order 2), ``f-pndm`` (three pseudo Runge-Kutta
    steps with half steps at :func:`prk_midpoint` under ``schedule``, then order 4) or ``ipndm`` (no warm-up: orders
    1, 2, 3, 4, one evaluation per step)."""
    warmup, order, min_steps = PNDM_VARIANTS[variant]
    sigmas = check_sigmas(sigmas, min_steps=min_steps, method=variant).to(x.device, x.dtype)
    warm_steps = {"prk": 3, "heun": 1, "none": 0}[warmup]
    history: tuple[Tensor, ...] = ()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if i < warm_steps and sigma_next > 0:
            if warmup == "prk":
                x, e = yield from _prk(x, sigma, sigma_next, prk_midpoint(sigma, sigma_next, schedule, integer_timesteps), i)
            else:
                x, e = yield from _pseudo_heun(x, sigma, sigma_next, i)
            history = (e, *history)[:order]
            continue
        x, denoised = yield Query(x, sigma, i, sigma_next)
        x, history = ipndm_rule(x, denoised, sigma, sigma_next, history, order)
    return x


def run_program(program: Program, den: Callable, cond: Mapping[str, Any] | None = None, callback: Callback | None = None) -> Tensor:
    """Answer every query of ``program`` with the denoiser; the program's result."""
    try:
        q = next(program)
        while True:
            q = program.send((q.x, denoise(den, q.x, q.sigma, cond, callback, q.i, q.sigma_next)))
    except StopIteration as done:
        return done.value


def sample_plms(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                callback: Callback | None = None) -> Tensor:  # fmt: skip
    """PLMS as diffusers' ``PNDMScheduler(skip_prk_steps=True)`` runs it: a pseudo improved Euler first step, then
    pseudo linear multistep of order 2, 3 and 4 (paper eq. 12). N steps cost N + 1 evaluations."""
    return run_program(pndm_program(x, sigmas, "plms"), den, cond, callback)


def sample_spndm(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                 callback: Callback | None = None) -> Tensor:  # fmt: skip
    """S-PNDM: pseudo improved Euler first step, then the pseudo second-order multistep ``(3 e_t - e_{t-1}) / 2``."""
    return run_program(pndm_program(x, sigmas, "s-pndm"), den, cond, callback)


def sample_fpndm(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                 callback: Callback | None = None, schedule: NoiseSchedule | None = None) -> Tensor:  # fmt: skip
    """F-PNDM: three pseudo Runge-Kutta steps (4 evaluations each), then fourth-order PLMS. Needs at least 4 steps;
    N steps cost N + 9 evaluations. The half steps are at the midpoint of the model's timesteps (the paper's rule,
    :func:`prk_midpoint`): pass the model's ``schedule`` (a VP or flow schedule); without one, of sigma (EDM / VE)."""
    return run_program(pndm_program(x, sigmas, "f-pndm", schedule), den, cond, callback)


def sample_ipndm(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                 callback: Callback | None = None, order: int = 4) -> Tensor:  # fmt: skip
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"): :func:`ipndm_rule`
    from the first step, Adams-Bashforth orders 1, 2, ... up to ``order``; N evaluations for N steps."""
    check_order(order)
    return sample_multistep(named_rule(partial(ipndm_rule, order=order), "ipndm"), den, x, sigmas, cond, callback)


def sample_ipndm_v(den: Callable, x: Tensor, sigmas: Tensor, cond: Mapping[str, Any] | None = None,
                   callback: Callback | None = None, order: int = 4) -> Tensor:  # fmt: skip
    """iPNDM-v: :func:`ipndm_v_rule` from the first step (orders 1, 2, ... up to ``order``, variable-step weights)."""
    check_order(order)
    return sample_multistep(named_rule(partial(ipndm_v_rule, order=order), "ipndm-v"), den, x, sigmas, cond, callback)
