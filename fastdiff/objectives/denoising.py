"""Denoising training: how fastdiff's teachers learn (Ho et al. 2020, Algorithm 1; v-target of Salimans & Ho 2022).

:func:`denoising_loss` is the pure loss -- timesteps and noise given -- and :class:`DenoisingObjective` hosts it on
the trainer: every sample draws its timestep, its noise and its label dropout (the null class, so the teacher supports
classifier-free guidance, Ho & Salimans 2022) from its own seed, so a resumed or re-split run repeats the same losses.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from fastdiff.denoisers import call_model
from fastdiff.errors import check_choice
from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, check_unconditional, condition_kwargs, dropout_mask, view
from fastdiff.param import output_from_x0, x0_from_output
from fastdiff.schedules import VPSchedule

__all__ = ["denoising_loss", "min_snr_weight", "vp_coefficients", "predict_x0", "DenoisingObjective", "WEIGHTINGS"]


WEIGHTINGS = ("none", "min_snr")


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma (Hang et al., ICCV 2023, eq. 7): the weight on the output's squared error that makes the loss
    ``min(SNR, gamma) * |x0 - x0_hat|^2``. Output errors relate to the x0 error by ``|eps - eps_hat|^2 = SNR |x0 -
    x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2``, so the weight is ``min(SNR, gamma) / SNR`` (epsilon),
    ``/ (SNR + 1)`` (v_prediction) or ``min(SNR, gamma)`` itself (sample)."""
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]


def vp_coefficients(schedule: VPSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` at integer timesteps ``t``, shaped to broadcast over ``like``."""
    abar = view(schedule.alphas_cumprod.to(like.device)[t].to(like.dtype), like)
    return abar.sqrt(), (1 - abar).sqrt()


def predict_x0(model: nn.Module, schedule: VPSchedule, prediction_type: str, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
    """The clean-sample prediction of a discrete VP ``model`` at ``(x_t, t)``, whatever its ``prediction_type``."""
    alpha, beta = vp_coefficients(schedule, t, x_t)
    return x0_from_output(call_model(model, x_t, t, cond), x_t, alpha, beta, prediction_type)


def denoising_loss(model: nn.Module, schedule: VPSchedule, x0: Tensor, t: Tensor, noise: Tensor, cond: dict[str, Tensor],
                   prediction_type: str, weighting: str = "none", snr_gamma: float = 5.0) -> Tensor:  # fmt: skip
    """Mean squared error of ``model``'s output at ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` against the
    output that corresponds to ``x0`` (``prediction_type``: epsilon, v_prediction or sample), over all elements;
    ``weighting="min_snr"``: each sample's error weighted by :func:`min_snr_weight` (``snr_gamma``)."""
    abar = view(schedule.alphas_cumprod.to(x0.device)[t].float(), x0)
    alpha, beta = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + beta * noise
    target = output_from_x0(x0, x_t, alpha, beta, prediction_type)
    error = (call_model(model, x_t, t, cond).float() - target).pow(2)
    if weighting == "none":
        return error.mean()
    snr = (abar / (1 - abar)).flatten()
    return (min_snr_weight(snr, snr_gamma, prediction_type) * error.flatten(1).mean(1)).mean()


class DenoisingObjective(Objective):
    """One phase, ``"denoiser"``, training ``net`` with :func:`denoising_loss` at uniform timesteps.

    Args:
        net: the diffusers model (``UNet2DModel``, ``DiTTransformer2DModel``) called as ``net(x_t, t, class_labels)``.
        schedule: the discrete VP schedule it is trained on; ``prediction_type`` its output.
        num_classes: real classes; label ``num_classes`` is the null label (dropped with ``p_uncond``). ``None``:
            unconditional (no labels reach ``net``).
    """

    phases = ("denoiser",)

    def __init__(self, net: nn.Module, schedule: VPSchedule, prediction_type: str, num_classes: int | None,
                 p_uncond: float = 0.1, weighting: str = "none", snr_gamma: float = 5.0):  # fmt: skip
        super().__init__()
        check_unconditional(num_classes is not None, p_uncond)
        check_choice("weighting", weighting, WEIGHTINGS)
        self.net, self.schedule, self.prediction_type, self.p_uncond = net, schedule, prediction_type, p_uncond
        self.weighting, self.snr_gamma = weighting, snr_gamma
        self.conditioner = ClassConditioner(num_classes) if num_classes is not None else None

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return self.net.parameters()

    def export(self) -> nn.Module:
        return self.net

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        x, seeds = batch["x"], batch["seeds"]
        n = self.schedule.num_train_timesteps
        t = (per_sample_rand(seeds, 0, x.device) * n).long().clamp(max=n - 1)  # uniform over 0 .. T-1
        cond = condition_kwargs(self.conditioner, batch, dropout_mask(seeds, self.p_uncond))
        noise = per_sample_randn(x, seeds, 1)
        loss = denoising_loss(self.net, self.schedule, x, t, noise, cond, self.prediction_type, self.weighting, self.snr_gamma)
        return LossOutput({"denoising": loss})
