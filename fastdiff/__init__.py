"""fastdiff: make diffusion models fast -- few-step solvers, feature caching and distillation on diffusers.

Time convention (see :mod:`fastdiff.schedules`): a model's input is ``x_t = s(t) * (x0 + sigma * eps)``; fastdiff
works on ``x = x0 + sigma * eps`` indexed by ``sigma``, and every model is a denoiser ``D(x, sigma, **cond) -> x0``.
"""

from fastdiff.denoisers import (
    CFGDenoiser,
    Denoiser,
    DiffusersDenoiser,
    PreconditionedDenoiser,
    consistency_precond,
    edm_precond,
)
from fastdiff.errors import InputError
from fastdiff.oracle import GaussianMixture, eight_gaussians
from fastdiff.param import canonical_prediction_type, output_from_x0, x0_from_output
from fastdiff.schedules import EDMSchedule, FlowSchedule, VPSchedule, add_noise, schedule_from_config

__version__ = "0.1.0.dev0"

__all__ = [
    "CFGDenoiser",
    "Denoiser",
    "DiffusersDenoiser",
    "EDMSchedule",
    "FlowSchedule",
    "GaussianMixture",
    "InputError",
    "PreconditionedDenoiser",
    "VPSchedule",
    "add_noise",
    "canonical_prediction_type",
    "consistency_precond",
    "edm_precond",
    "eight_gaussians",
    "output_from_x0",
    "schedule_from_config",
    "x0_from_output",
]
