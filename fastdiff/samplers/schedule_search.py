"""Optimised step schedules by dynamic programming over a fine grid (GITS, Chen et al. 2024; Optimal Stepsize
Distillation, Pei et al. 2025).

Given a denoiser and a few calibration noises, :func:`optimize_schedule` finds the ``n``-step sigma schedule that
minimises the summed local error against reference trajectories of the same noise:

1. reference states ``x_i`` at every point of a fine grid ``sigma_0 > ... > sigma_{F-1} = 0``
   (:func:`reference_trajectories`: Heun between consecutive fine points);
2. the cost of one DDIM step from fine point ``i`` to ``j``: ``C[i, j] = g(sigma_j) mean_b RMS(Euler(x_i; sigma_i ->
   sigma_j) - x_j)`` (:func:`step_costs`). A DDIM step from ``i`` needs only ``D(x_i, sigma_i)``, so the whole matrix
   costs ``F`` model calls (GITS's observation) -- none here: the trajectories' first call out of each fine point is
   that very evaluation, and :func:`calibration_costs` reuses it (a fifth of a calibration's calls with 2 sub-steps).
   ``g(sigma) = sigma_data / sqrt(sigma_data^2 + sigma^2)`` is the gain with which the probability-flow map carries
   an error at ``sigma`` to the image (exact for Gaussian data of std ``sigma_data``), so the DP minimises the local
   errors' first-order share of the final error. GITS sums raw local errors; on a VP model (sigma_max ~157) those at
   high sigma are ~100x larger than what reaches the image, and under guidance the raw DP spent every step there and
   left one step from sigma ~10 to 0 (fashion-mnist teacher, w = 6: 48% diverged images with DPM-Solver++ on that
   schedule; on the oracle at w = 6 the weighted DP halves Euler's error);
3. the cheapest path from ``0`` to ``F - 1`` in exactly ``n`` steps (:func:`optimal_path`, ``O(n F^2)``).

The schedule is then used with any solver (fastdiff's or diffusers' schedulers take it as ``sigmas=`` or
``timesteps=``); the DP measures DDIM's local error, as GITS does. A multistep solver is not DDIM: on the Fashion-MNIST
teacher at guidance 1, GHVB of order 4 sampled worse on the DP schedule than on its default one at 6-10 NFE.
:func:`refine_path` then fits the schedule to the solver itself -- coordinate descent on the fine grid, from the DP's
path, on the solver's end-to-end error against the reference (Optimal Stepsize Distillation's point: the steps
should suit the solver that takes them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.samplers._common import Callback, to_d
from fastdiff.samplers.ode import heun_step

SIGMA_DATA = 0.5  # images in [-1, 1] (EDM's sigma_data)
METHOD = "DP over DDIM local errors carried to the image (GITS, propagation-weighted)"  # named in schedule files and bench keys

__all__ = ["SIGMA_DATA", "METHOD", "propagation_gain", "reference_trajectories", "step_costs", "optimal_path", "calibration_costs",
           "path_record", "optimize_schedule", "refine_path"]


@torch.no_grad()
def reference_trajectories(den: Callable, x: Tensor, fine: Tensor, cond: Mapping[str, Any] | None = None, substeps: int = 2,
                           progress: bool = False, callback: Callback | None = None) -> Tensor:  # fmt: skip
    """The states ``(F, B, ...)`` at every point of the descending ``fine`` grid (ending in 0), from ``x`` at
    ``fine[0]``, by ``substeps`` Heun steps (geometric in sigma; Euler onto 0) between consecutive points.
    ``callback``: told of every model evaluation of the first sub-step out of fine point ``i`` (``StepInfo.i = i``;
    the first of them is ``D(x_i, sigma_i)``)."""
    from tqdm.auto import tqdm

    states = [x]
    for i in tqdm(range(len(fine) - 1), desc="reference trajectories", disable=not progress, leave=False):
        hi, lo = fine[i], fine[i + 1]
        if lo > 0:
            points = torch.exp(torch.linspace(float(hi.log()), float(lo.log()), substeps + 1, dtype=torch.float64)).to(x.dtype)
            points[0], points[-1] = hi, lo  # the fine points exactly (exp(log(s)) is not s in floating point)
        else:
            points = torch.stack([hi, lo])
        for k, (a, b) in enumerate(zip(points[:-1], points[1:])):
            x = heun_step(den, x, a, b, cond, callback if k == 0 else None, i)
        states.append(x)
    return torch.stack(states)


def propagation_gain(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """How much of an error at noise level ``sigma`` the probability-flow map carries to the image: for Gaussian data
    of std ``sigma_data`` the map from ``sigma`` to 0 is ``x -> x sigma_data / sqrt(sigma_data^2 + sigma^2)``."""
    return sigma_data / (sigma_data**2 + sigma**2).sqrt()


@torch.no_grad()
def step_costs(den: Callable, states: Tensor, fine: Tensor, cond: Mapping[str, Any] | None = None, progress: bool = False,
               sigma_data: float = SIGMA_DATA, denoised: Mapping[int, Tensor] | None = None) -> Tensor:  # fmt: skip
    """``C[i, j]`` (``i < j``; ``inf`` elsewhere): the mean RMS error of one DDIM (Euler) step from the reference
    state at ``fine[i]`` to ``fine[j]`` against the reference state there, times :func:`propagation_gain` at
    ``fine[j]`` (its share of the final image's error). ``denoised[i]``: ``D(x_i, sigma_i)`` where already computed
    (the reference trajectories evaluate it; :func:`calibration_costs` passes them on)."""
    from tqdm.auto import tqdm

    n, denoised = len(fine), denoised or {}
    costs = torch.full((n, n), float("inf"), dtype=torch.float64)
    for i in tqdm(range(n - 1), desc="step costs", disable=not progress, leave=False):
        d = to_d(states[i], denoised[i] if i in denoised else den(states[i], fine[i], **(cond or {})), fine[i])
        for j in range(i + 1, n):
            err = states[i] + (fine[j] - fine[i]) * d - states[j]
            costs[i, j] = err.flatten(1).pow(2).mean(1).sqrt().mean().double() * propagation_gain(fine[j].double(), sigma_data)
    return costs


def optimal_path(costs: Tensor, steps: int) -> list[int]:
    """The indices ``0 = p_0 < ... < p_steps = F - 1`` minimising ``sum C[p_k, p_{k+1}]`` (dynamic programming)."""
    n = costs.shape[0]
    if not 1 <= steps <= n - 1:
        raise InputError(f"a {steps}-step schedule needs 1 <= steps <= {n - 1} (fine grid of {n} points)")
    best = torch.full((steps + 1, n), float("inf"), dtype=torch.float64)
    parent = torch.zeros((steps + 1, n), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + costs  # (from i, to j)
        best[k], parent[k] = total.min(0)
    path = [n - 1]
    for k in range(steps, 0, -1):
        path.append(int(parent[k, path[-1]]))
    return path[::-1]


def calibration_costs(den: Callable, x: Tensor, fine: Tensor, cond: Mapping[str, Any] | None = None,
                      progress: bool = False, sigma_data: float = SIGMA_DATA, substeps: int = 2) -> Tensor:  # fmt: skip
    """The step-cost matrix ``C`` of the calibration noise ``x`` (at ``fine[0]``): the part of the optimisation that
    does not depend on the step count, so one calibration serves every ``n`` (:func:`optimal_path`). ``sigma_data``:
    the data's standard deviation in the model's space (0.5 for images in [-1, 1]; about 1 for SD-style latents).
    ``substeps``: Heun steps of the reference between fine points (1 costs half as much; on the Fashion-MNIST teacher it
    moved one of the benchmark's 16 schedules, w = 6 at 10 NFE, by a fine point)."""
    if fine[-1] != 0 or not bool((fine[1:] < fine[:-1]).all()):
        raise InputError("the fine grid must be strictly descending and end in 0")
    at_points: dict[int, Tensor] = {}  # D(x_i, sigma_i): the trajectories' first evaluation out of each fine point
    states = reference_trajectories(den, x, fine, cond, substeps, progress,
                                    callback=lambda info: at_points.setdefault(info.i, info.denoised))
    return step_costs(den, states, fine, cond, progress, sigma_data, at_points)


def path_record(fine: Tensor, costs: Tensor, steps: int) -> tuple[Tensor, dict]:
    """The optimal ``steps``-step sigmas on ``fine`` under ``costs`` and a record (the fine grid, the path, its cost)."""
    path = optimal_path(costs, steps)
    cost = float(sum(costs[a, b] for a, b in zip(path[:-1], path[1:])))
    return fine[path], {"fine": fine.tolist(), "path": path, "cost": cost}


def optimize_schedule(den: Callable, x: Tensor, fine: Tensor, steps: int, cond: Mapping[str, Any] | None = None,
                      progress: bool = False) -> tuple[Tensor, dict]:  # fmt: skip
    """The ``steps``-step sigma schedule (descending, ending in 0) for the calibration noise ``x`` (at ``fine[0]``),
    and a record of the optimisation (the fine grid, the path, its cost)."""
    fine = fine.to(x.device, x.dtype)
    return path_record(fine, calibration_costs(den, x, fine, cond, progress), steps)


def refine_path(error: Callable[[list[int]], float], path: list[int], sweeps: int = 2, progress: bool = False,
                start_error: float | None = None) -> tuple[list[int], float]:  # fmt: skip
    """Coordinate descent from ``path`` (indices into the fine grid; the ends stay): each interior point moves to the
    neighbouring fine-grid point above or below while ``error(path)`` -- a solver's end-to-end error on calibration
    noise -- drops; at most ``sweeps`` passes (fewer when one moves nothing). Returns the path and its error; never
    worse than the start. ``start_error``: ``error(path)`` where the caller has it already (one solve saved)."""
    from tqdm.auto import tqdm

    best = error(path) if start_error is None else start_error
    for _ in tqdm(range(sweeps), desc="refine", disable=not progress, leave=False):
        moved = False
        for k in range(1, len(path) - 1):
            for candidate in (path[k] - 1, path[k] + 1):
                if path[k - 1] < candidate < path[k + 1]:
                    trial = [*path[:k], candidate, *path[k + 1 :]]
                    e = error(trial)
                    if e < best:
                        path, best, moved = trial, e, True
        if not moved:
            break
    return path, best
