"""Distribution-matching distillation: DMD2 (Yin et al., NeurIPS 2024) and f-distill (Xu, Nie & Vahdat 2025).

:class:`DistributionMatching` hosts three networks on any discrete VP diffusers teacher (through the denoiser
contract): the frozen teacher (the *real* score, with classifier-free guidance), a generator ``G`` and a *fake* score,
both initialised from the teacher, plus a GAN classifier head on the fake score's bottleneck (DMD2 sec. 4.3; a
removable hook, :mod:`fastdiff.objectives.critic`). Two phases per step, in the official order
(``main/edm/train_edm.py``, ``main/train_sd.py``):

* ``"generator"`` (``update_every = 5`` in the recipes: the two-time-scale rule, DMD2 sec. 4.2) -- ``x = G(z)``; at
  ``t ~ U{0.02 T .. 0.98 T}`` (``min/max_step_percent``) the distribution-matching loss :func:`dmd_loss` with the
  guided teacher's and the fake score's clean-sample predictions at ``x_t`` (no gradient through ``x_t``), plus
  ``gan_generator_weight * softplus(-D(x noised to t' ~ U{0 .. T-1}))`` with the critic frozen. No regression loss.
* ``"critic"`` (every step) -- the fake score's denoising loss on ``sg(G(z))`` (the teacher's own unweighted loss in
  its own prediction type, as the official SD code's epsilon-MSE for epsilon models) plus
  ``gan_critic_weight * (softplus(D(fake)) + softplus(-D(real)))`` on data images; both noised to ``t' ~ U{0 .. T-1}``
  ("diffusion GAN", ``diffusion_gan_max_timestep = 1000``).

f-distill: ``divergence`` other than ``"reverse_kl"`` weights each sample's gradient by :func:`f_weights` of the
density ratio ``exp(D(x_t))``, read from the same fake-score forward pass that gives ``mu_fake`` (so at the DM loss's
own ``x_t``, as FastGen does; the classifier reads the fake score's features as in DMD2, not the teacher's as
FastGen). ``"reverse_kl"`` skips the classifier there and is DMD2 exactly.

Multi-step generators (``generator_steps = K``, DMD2 sec. 4.4): timesteps ``T-1, T-1-T/K, ...`` (``[999, 749, 499,
249]`` for K = 4, ``LCMScheduler``'s grid with ``original_inference_steps = K``); each sample picks a step ``k`` and
is brought there by *backward simulation*: ``G`` itself, without gradient, from pure noise through the first ``k``
steps (fresh noise at each re-noising, ``sd_unified_model.py`` ``sample_backward``). The student samples with
diffusers' ``LCMScheduler``. Choices of ours, where the official code differs: ``k`` is drawn per sample (officially
once per step, shared by all GPUs), so a run does not depend on how the batch is split; the critic phase draws ``G``'s
samples again without gradient after the generator's update (officially the samples from before it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError, check_choice
from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, condition_kwargs, view
from fastdiff.objectives.critic import ClassifierHead, FeatureTap, bottleneck, probe
from fastdiff.objectives.denoising import denoising_loss, predict_x0, vp_coefficients
from fastdiff.objectives.divergences import F_DIVERGENCES, density_ratio, dmd_gradient, dmd_loss, f_weights
from fastdiff.objectives.divergences import gan_discriminator_loss, gan_generator_loss

__all__ = ["DistributionMatching", "generator_timesteps"]


def generator_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """The multi-step generator's timesteps ``range(T - 1, 0, -T // K)`` (DMD2's ``denoising_step_list``)."""
    if not 1 <= steps <= num_train_timesteps:
        raise InputError(f"generator_steps must be in 1..{num_train_timesteps}; got {steps}")
    return torch.arange(num_train_timesteps - 1, 0, -(num_train_timesteps // steps))[:steps]


class DistributionMatching(Objective):
    """DMD2 / f-distill from a discrete VP teacher (``schedule``: its :class:`~fastdiff.schedules.VPSchedule`).

    Args:
        teacher: the teacher network (frozen here); the generator and the fake score start as copies of it.
        num_classes: the teacher's classes (label ``num_classes`` is its null label); ``None``: unconditional.
        guidance_scale: classifier-free guidance of the real score (``real_guidance_scale``; the fake has none).
        generator_steps: ``K`` of the multi-step generator (1: one step from pure noise at ``T - 1``).
        dm_range: the DM loss's timesteps as fractions of ``T`` (``min/max_step_percent``, 0.02 and 0.98).
        divergence: a key of :data:`~fastdiff.objectives.divergences.F_DIVERGENCES` (``reverse_kl``: DMD2).
        gan_generator_weight, gan_critic_weight: the GAN terms' weights (DMD2 ImageNet: 3e-3 and 1e-2; 0 and 0: no
            GAN, then the classifier head is not trained and f-distill's ratio is meaningless).
    """

    phases = ("generator", "critic")

    def __init__(self, teacher: nn.Module, schedule, prediction_type: str, num_classes: int | None, *,
                 guidance_scale: float = 1.0, generator_steps: int = 1, dm_range: tuple[float, float] = (0.02, 0.98),
                 divergence: str = "reverse_kl", gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2,
                 ratio_bins: int = 10):  # fmt: skip
        super().__init__()
        check_choice("divergence", divergence, tuple(F_DIVERGENCES))
        if divergence != "reverse_kl" and gan_critic_weight <= 0:
            raise InputError(f"divergence={divergence!r} reads the density ratio off the GAN classifier; set gan_critic_weight > 0")
        if num_classes is None and guidance_scale != 1:
            raise InputError("classifier-free guidance needs a conditional teacher; pass num_classes or guidance_scale=1")
        n = schedule.num_train_timesteps
        lo, hi = int(dm_range[0] * n), int(dm_range[1] * n)
        if not 0 <= lo <= hi < n:
            raise InputError(f"dm_range={dm_range} must give 0 <= min_step <= max_step < {n}; got {lo}..{hi}")
        self.teacher = teacher.requires_grad_(False)
        self.generator = copy.deepcopy(teacher).requires_grad_(True)
        self.fake = copy.deepcopy(teacher).requires_grad_(True)
        self.schedule, self.prediction_type = schedule, prediction_type
        self.conditioner = ClassConditioner(num_classes) if num_classes is not None else None
        self.guidance_scale, self.dm_steps, self.divergence, self.ratio_bins = guidance_scale, (lo, hi), divergence, ratio_bins
        self.gan_weights = (gan_generator_weight, gan_critic_weight)
        self.register_buffer("timesteps", generator_timesteps(n, generator_steps), persistent=False)
        self._tap = FeatureTap(bottleneck(self.fake))
        self.head = ClassifierHead.for_features(self._probe())

    def _probe(self) -> Tensor:
        c = self.teacher.config
        x = torch.zeros(1, c["in_channels"], c["sample_size"], c["sample_size"], device=self.teacher.device)
        labels = torch.zeros(1, dtype=torch.long, device=x.device)
        cond = {} if self.conditioner is None else self.conditioner(labels, torch.zeros_like(labels, dtype=torch.bool))
        return probe(self.fake, self._tap, x, torch.zeros(1, dtype=torch.long, device=x.device), cond)

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        if phase == "generator":
            return self.generator.parameters()
        return [*self.fake.parameters(), *self.head.parameters()]

    def export(self) -> nn.Module:
        return self.generator

    # -- the networks ------------------------------------------------------------------------------------------------

    def _x0(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        return predict_x0(net, self.schedule, self.prediction_type, x_t, t, cond)

    def _real_x0(self, x_t: Tensor, t: Tensor, cond: dict, uncond: dict) -> Tensor:
        """The teacher's guided prediction ``D_u + w (D_c - D_u)`` (one batched call of both branches)."""
        if self.guidance_scale == 1:
            return self._x0(self.teacher, x_t, t, cond)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        x0_u, x0_c = self._x0(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return x0_u + self.guidance_scale * (x0_c - x0_u)

    def _noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, beta = vp_coefficients(self.schedule, t, x0)
        return alpha * x0 + beta * noise

    def logits(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The classifier's realism logits ``(B, 1)`` of samples ``x_t`` at timesteps ``t`` (fake-score features)."""
        self._x0(self.fake, x, t, cond)
        return self.head(self._tap.take())

    def _gan_logits(self, x: Tensor, cond: dict, seeds: Tensor, stream: int) -> Tensor:
        n = self.schedule.num_train_timesteps
        t = (per_sample_rand(seeds, stream, x.device) * n).long().clamp(max=n - 1)  # diffusion GAN: U{0 .. T-1}
        return self.logits(self._noised(x, t, per_sample_randn(x, seeds, stream + 1)), t, cond)

    def generate(self, batch: dict[str, Tensor], grad: bool = True) -> Tensor:
        """``G``'s clean samples for the batch's seeds and labels: from pure noise, or for a multi-step generator from
        the step each sample drew, reached by backward simulation."""
        x, seeds = batch["x"], batch["seeds"]
        cond = condition_kwargs(self.conditioner, batch, torch.zeros_like(seeds, dtype=torch.bool))
        steps = self.timesteps.to(x.device)
        k = (per_sample_rand(seeds, 20, x.device) * len(steps)).long().clamp(max=len(steps) - 1)
        x_t = per_sample_randn(x, seeds, 21)  # pure noise at T - 1 (DMD2's pure_noise_mask)
        with torch.no_grad():
            for j in range(int(k.max())):  # backward simulation through steps 0 .. k - 1
                t = steps[j].expand(len(x))
                x0 = self._x0(self.generator, x_t, t, cond)
                renoised = self._noised(x0, steps[j + 1].expand(len(x)), per_sample_randn(x, seeds, 30 + j))
                x_t = torch.where(view(k > j, x).bool(), renoised, x_t)
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self._x0(self.generator, x_t, steps[k], cond).float()

    # -- the phases --------------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        return self._generator_loss(batch) if phase == "generator" else self._critic_loss(batch)

    def _conditions(self, batch: dict[str, Tensor]) -> tuple[dict, dict]:
        seeds = batch["seeds"]
        cond = condition_kwargs(self.conditioner, batch, torch.zeros_like(seeds, dtype=torch.bool))
        uncond = condition_kwargs(self.conditioner, batch, torch.ones_like(seeds, dtype=torch.bool))
        return cond, uncond

    def _generator_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        seeds = batch["seeds"]
        cond, uncond = self._conditions(batch)
        x = self.generate(batch)
        lo, hi = self.dm_steps
        t = lo + (per_sample_rand(seeds, 10, x.device) * (hi - lo + 1)).long().clamp(max=hi - lo)
        weights = None
        with torch.no_grad():
            x_t = self._noised(x.detach(), t, per_sample_randn(x, seeds, 11))
            mu_real = self._real_x0(x_t, t, cond, uncond)
            mu_fake = self._x0(self.fake, x_t, t, cond)
            features = self._tap.take()
            if self.divergence != "reverse_kl":
                ratio = density_ratio(self.head(features))
                weights = f_weights(self.divergence, ratio, t, (lo, hi), self.ratio_bins)
        grad = dmd_gradient(x, mu_real, mu_fake)
        terms = {"distribution_matching": dmd_loss(x, grad, weights)}
        logs = {"grad_norm": grad.detach().flatten(1).norm(dim=1).mean()}
        if weights is not None:
            logs.update(h_min=weights.min(), h_max=weights.max())
        if self.gan_weights[0] > 0:
            terms["gan"] = self.gan_weights[0] * gan_generator_loss(self._gan_logits(x, cond, seeds, 12))
        return LossOutput(terms, logs)

    def _critic_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        seeds, n = batch["seeds"], self.schedule.num_train_timesteps
        cond, _ = self._conditions(batch)
        fake = self.generate(batch, grad=False)
        t = (per_sample_rand(seeds, 13, fake.device) * n).long().clamp(max=n - 1)  # U{0 .. T-1}
        noise = per_sample_randn(fake, seeds, 14)
        terms = {"fake_denoising": denoising_loss(self.fake, self.schedule, fake, t, noise, cond, self.prediction_type)}
        self._tap.take()
        logs = {}
        if self.gan_weights[1] > 0:
            logits_fake = self._gan_logits(fake, cond, seeds, 15)
            logits_real = self._gan_logits(batch["x"], cond, seeds, 17)
            terms["gan"] = self.gan_weights[1] * gan_discriminator_loss(logits_fake, logits_real)
            logs.update(p_real=torch.sigmoid(logits_real.detach()).mean(), p_fake=torch.sigmoid(logits_fake.detach()).mean())
        return LossOutput(terms, logs)
