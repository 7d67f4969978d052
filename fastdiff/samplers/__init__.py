"""Samplers: plain functions over a denoiser ``D(x, sigma, **cond)`` and a descending sigma grid ending in 0.

``x`` starts as ``sigmas[0] * noise`` (sigma space, see :mod:`fastdiff.schedules`). Solver history is local to each
call, nothing is wrapped in ``no_grad`` (distillation rolls out through samplers), and noise comes from an explicit
``generator``. :data:`SAMPLERS` lists the ODE samplers that run on any denoiser by name.
"""

from fastdiff.samplers._common import step_dtype
from fastdiff.samplers.consistency import sample_consistency, sample_ctm, sample_stochastic_multistep
from fastdiff.samplers.grids import beta_sigmas, check_sigmas, exponential_sigmas, flow_sigmas, karras_sigmas, vp_sigmas
from fastdiff.samplers.momentum import sample_ghvb, sample_hb_dpmpp_2m, sample_hb_plms, sample_nt_plms, split_order
from fastdiff.samplers.ode import sample_dpmpp_2m, sample_euler, sample_heun
from fastdiff.samplers.pndm import sample_fpndm, sample_ipndm, sample_ipndm_v, sample_plms, sample_spndm
from fastdiff.samplers.unipc import sample_unipc

SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "plms": sample_plms,
    "s-pndm": sample_spndm,
    "f-pndm": sample_fpndm,
    "ipndm": sample_ipndm,
    "ipndm-v": sample_ipndm_v,
    "hb-plms": sample_hb_plms,
    "nt-plms": sample_nt_plms,
    "ghvb": sample_ghvb,
    "hb-dpmpp-2m": sample_hb_dpmpp_2m,
    "unipc": sample_unipc,
}

__all__ = [
    "SAMPLERS", "check_sigmas", "flow_sigmas", "karras_sigmas", "exponential_sigmas", "beta_sigmas", "vp_sigmas", "split_order",
    "sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_plms", "sample_spndm", "sample_fpndm", "sample_ipndm",
    "sample_ipndm_v", "sample_hb_plms", "sample_nt_plms", "sample_unipc", "sample_ghvb", "sample_hb_dpmpp_2m", "sample_consistency", "sample_ctm",
    "sample_stochastic_multistep", "step_dtype",
]  # fmt: skip
