"""Training objectives hosted by :func:`fastdiff.training.trainer.train` (see :mod:`fastdiff.objectives.base` for
the contract). One module per method family; :mod:`~fastdiff.objectives.losses` and
:mod:`~fastdiff.objectives.conditioning` are the parts they share."""

from fastdiff.objectives.base import EMATarget, LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, TextConditioner
from fastdiff.objectives.consistency_distillation import LORA_TARGETS, ConsistencyDistillation, guidance_embedding, with_guidance_embedding
from fastdiff.objectives.denoising import DenoisingObjective, denoising_loss
from fastdiff.objectives.distribution_matching import DistributionMatching, generator_timesteps
from fastdiff.objectives.divergences import F_DIVERGENCES
from fastdiff.objectives.trajectory import ConsistencyTrajectory, ctm_loss
from fastdiff.objectives.consistency_training import (
    ConsistencyTraining,
    ict_num_levels,
    karras_levels,
    lct_cauchy_c,
    lct_diffusion_mask,
    lognormal_level_probs,
    non_scaling_layernorm,
    ot_pairing,
)

__all__ = [
    "LossOutput", "EMATarget", "Objective", "per_sample_rand", "per_sample_randn", "DenoisingObjective", "denoising_loss",
    "ConsistencyTraining", "ConsistencyDistillation", "DistributionMatching", "generator_timesteps", "F_DIVERGENCES",
    "ConsistencyTrajectory", "ctm_loss",
    "ClassConditioner", "TextConditioner", "LORA_TARGETS", "guidance_embedding", "with_guidance_embedding", "ict_num_levels",
    "karras_levels", "lct_cauchy_c", "lct_diffusion_mask", "lognormal_level_probs", "non_scaling_layernorm", "ot_pairing",
]  # fmt: skip
