"""Optimised schedules for a pipeline, as small JSON files any pipeline takes.

:func:`optimize_pipeline_schedule` runs :func:`fastdiff.samplers.schedule_search.optimize_schedule` on a
class-conditional pipeline's denoiser (classifier-free guided at ``guidance``; balanced class labels; calibration
noise seeded by ``seed``) over a Karras fine grid of the model's sigma range, and returns the schedule record::

    {"model": ..., "solver": ..., "nfe": N, "guidance": w, "timesteps": [...], "sigmas": [...], "calibration": {...}}

``sigmas`` are the model's noise levels without the final 0 (diffusers' ``set_timesteps(sigmas=...)`` convention),
``timesteps`` the matching model timesteps; ``pipe(..., timesteps=...)`` or ``sigmas=...`` takes them, and
:func:`check_schedule` refuses a file made for another model, solver or step count, naming the difference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fastdiff.errors import InputError

__all__ = ["optimize_pipeline_schedule", "check_steps", "calibrate_pipeline", "schedule_from_calibration", "refine_schedule",
           "refinement_reference", "write_schedule", "read_schedule", "check_schedule"]


def optimize_pipeline_schedule(pipe: Any, model_id: str, solver: str, steps: int, guidance: float = 1.0, num_samples: int = 32,
                               seed: int = 0, fine_points: int = 80, progress: bool = False) -> dict:  # fmt: skip
    """The optimised ``steps``-step schedule of ``pipe`` (see the module docstring)."""
    check_steps([steps], fine_points)
    calibration = calibrate_pipeline(pipe, guidance, num_samples, seed, fine_points, progress)
    return schedule_from_calibration(pipe, calibration, model_id, solver, steps)


def check_steps(steps: list[int], fine_points: int) -> None:
    """Refuse step counts the fine grid cannot hold -- before minutes of reference trajectories."""
    if not steps or min(steps) < 1 or fine_points < max(steps) + 1:
        raise InputError(f"need 1 <= --steps < --fine; got {', '.join(map(str, steps))} steps, {fine_points} fine points")


def calibrate_pipeline(pipe: Any, guidance: float = 1.0, num_samples: int = 32, seed: int = 0, fine_points: int = 80,
                       progress: bool = False, sigma_data: float | None = None) -> dict:  # fmt: skip
    """The step-count-independent part of the optimisation: the Karras fine grid of the model's sigma range and the
    DDIM step costs on it for ``num_samples`` calibration noises (seeded by ``seed``; balanced class labels;
    classifier-free guided at ``guidance``; errors weighted with the data std ``sigma_data``, default
    :data:`~fastdiff.samplers.schedule_search.SIGMA_DATA`). One calibration serves every step count and solver."""
    from fastdiff.denoisers import CFGDenoiser, DiffusersDenoiser
    from fastdiff.samplers import karras_sigmas
    from fastdiff.samplers.schedule_search import SIGMA_DATA, calibration_costs
    from fastdiff.schedules import schedule_from_config

    sigma_data = SIGMA_DATA if sigma_data is None else sigma_data
    if not sigma_data > 0:
        raise InputError(f"--sigma-data must be > 0; got {sigma_data}")
    if num_samples < 1 or fine_points < 2:
        raise InputError(f"need --samples >= 1 and --fine >= 2; got {num_samples} samples, {fine_points} fine points")
    schedule = schedule_from_config(dict(pipe.scheduler.config))
    lo, hi = float(schedule.sigma_min), float(schedule.sigma_max)
    if not (0 < lo < hi < float("inf")):
        raise InputError(f"schedule optimisation needs a finite sigma range (VP and EDM models); {type(schedule).__name__} has {lo}..{hi}")
    den = DiffusersDenoiser.from_pipeline(pipe)
    labels = torch.arange(num_samples) % pipe.num_classes
    if guidance != 1.0:
        den = CFGDenoiser(den, {"class_labels": torch.full_like(labels, pipe.num_classes)}, guidance)
    fine = karras_sigmas(fine_points - 1, lo, hi).float()
    noise = torch.randn((num_samples, *pipe.image_shape), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    costs = calibration_costs(den, noise * hi, fine, {"class_labels": labels}, progress, sigma_data)
    return {"fine": fine, "costs": costs, "guidance": guidance, "samples": num_samples, "seed": seed, "fine_points": fine_points,
            "sigma_data": sigma_data,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def schedule_from_calibration(pipe: Any, calibration: dict, model_id: str, solver: str, steps: int) -> dict:
    """The schedule record (the module docstring's format) of the optimal ``steps``-step path of ``calibration``."""
    from fastdiff.samplers.schedule_search import METHOD, path_record

    sigmas, record = path_record(calibration["fine"], calibration["costs"], steps)
    kept = ("samples", "seed", "fine_points", "sigma_data", "seconds")
    return {
        "model": model_id, "solver": solver, "nfe": steps, "guidance": calibration["guidance"], **_grid(pipe, sigmas),
        "calibration": {**{k: calibration[k] for k in kept}, "cost": record["cost"], "method": METHOD},
    }  # fmt: skip


def _grid(pipe: Any, sigmas: Any) -> dict:
    """``{"timesteps", "sigmas"}`` of a descending sigma path ending in 0 (the final 0 dropped, diffusers' convention)."""
    from fastdiff.schedules import schedule_from_config

    levels = sigmas[:-1].double()
    return {"timesteps": schedule_from_config(dict(pipe.scheduler.config)).sigma_to_t(levels).tolist(), "sigmas": levels.tolist()}


def refine_schedule(pipe: Any, calibration: dict, record: dict, overrides: dict | None = None, samples: int = 16, sweeps: int = 2,
                    seed: int = 1, config: dict | None = None, reference: Any = None, progress: bool = False) -> dict:  # fmt: skip
    """``record`` (of :func:`schedule_from_calibration`) fitted to its solver ``record["solver"]`` (a
    :func:`~fastdiff.pipelines.sampling.make_scheduler` name, with config ``overrides``): :func:`refine_path` from the
    DP's path on the solver's end-to-end RMS error against ``reference`` (default: DPM-Solver++(2M) at 50 NFE) on
    ``samples`` images of seed ``seed`` (not the evaluation's seed 0). ``config``: the pipeline's own scheduler config
    (default: its scheduler's), which the solvers are built from; the pipeline's scheduler is restored afterwards."""
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline
    from fastdiff.samplers.schedule_search import optimal_path, refine_path

    fine, steps, guidance, original = calibration["fine"], record["nfe"], record["guidance"], pipe.scheduler
    base, start = dict(config or original.config), time.perf_counter()
    try:
        if reference is None:
            reference = refinement_reference(pipe, guidance, samples, seed, base)
        pipe.scheduler = make_scheduler(record["solver"], base, **(overrides or {}))

        def error(path: list[int]) -> float:
            out = sample_pipeline(pipe, samples, steps, guidance, seed, schedule=_grid(pipe, fine[path])).images
            return float((out - reference).flatten(1).pow(2).mean(1).sqrt().mean())

        dp_path = optimal_path(calibration["costs"], steps)
        dp_error = error(dp_path)
        path, refined_error = refine_path(error, dp_path, sweeps, progress, start_error=dp_error)
        grid = _grid(pipe, fine[path])
    finally:
        pipe.scheduler = original
    refinement = {"samples": samples, "sweeps": sweeps, "seed": seed, "dp_error": dp_error, "error": refined_error,
                  "seconds": round(time.perf_counter() - start, 2), "method": "coordinate descent on the solver's end-to-end error"}  # fmt: skip
    return {**record, **grid, "calibration": {**record["calibration"], "refined": refinement}}


def refinement_reference(pipe: Any, guidance: float, samples: int, seed: int, config: dict) -> Any:
    """What :func:`refine_schedule` fits against: DPM-Solver++(2M) at 50 NFE from the pipeline's own ``config``."""
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    original = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler("dpmpp-2m", config)
        return sample_pipeline(pipe, samples, 50, guidance, seed).images
    finally:
        pipe.scheduler = original


def write_schedule(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.rename(path)
    return path


def read_schedule(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"cannot read the schedule file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not a schedule file (invalid JSON: {err})") from None
    missing = [k for k in ("model", "solver", "nfe", "timesteps", "sigmas") if k not in record]
    if missing:
        raise InputError(f"{path} is not a schedule file: no {', '.join(missing)} (make one with `fastdiff schedule optimize`)")
    return record


def check_schedule(record: dict, model: str, solver: str, steps: int, where: str = "the schedule") -> None:
    """Refuse a schedule made for another model, solver or step count, by name."""
    for key, want in (("model", model), ("solver", solver), ("nfe", steps)):
        if record.get(key) != want:
            raise InputError(f"{where} was optimised for {key} {record.get(key)!r}, not {want!r}; optimise one for this "
                             f"setting with `fastdiff schedule optimize {model} --scheduler {solver} --steps {steps}`")  # fmt: skip
