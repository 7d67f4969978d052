"""The timestep / sigma grid a diffusers scheduler config gives at N steps, in fastdiff's convention (what
``fastdiff schedule`` prints): one row per step with the timestep, sigma and the scale ``s(t)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdiff.errors import InputError

__all__ = ["load_scheduler_config", "schedule_table"]


def load_scheduler_config(path: str | Path) -> dict:
    """A diffusers scheduler config from a JSON file, a scheduler folder or a pipeline folder."""
    p = Path(path)
    for candidate in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"{candidate} is not valid JSON: {err}") from None
    raise InputError(f"no scheduler config at {p} (looked for the file, scheduler_config.json and scheduler/scheduler_config.json)")


def schedule_table(config: dict, steps: int, spacing: str | None = None, mu: float | None = None) -> list[dict]:
    """Rows ``{"step", "timestep", "sigma", "scale"}`` of the sampling grid at ``steps`` steps; ``spacing`` overrides
    the config's ``timestep_spacing``, ``mu`` is Flux's resolution shift (``use_dynamic_shifting`` configs)."""
    from fastdiff.samplers.grids import grid_from_config
    from fastdiff.schedules import schedule_from_config

    if steps < 1:
        raise InputError(f"--steps must be >= 1; got {steps}")
    config = {**config, "timestep_spacing": spacing} if spacing else dict(config)
    schedule = schedule_from_config(config)
    grid = grid_from_config(schedule, config, steps, mu=mu)
    sigmas = grid.sigmas[:-1].tolist()
    scales = [schedule.scale(torch.tensor(s, dtype=torch.float64)).item() for s in sigmas]
    return [{"step": i, "timestep": t, "sigma": s, "scale": c} for i, (t, s, c) in enumerate(zip(grid.timesteps.tolist(), sigmas, scales))]
