"""Consistency trajectory models (CTM; Kim et al., ICLR 2024) distilled from a diffusers teacher.

The student is the anytime-to-anytime map (paper eq. 5; official ``sony/ctm`` ``code/cm/karras_diffusion.py``
L62-101, L297-342)::

    G_theta(x_t, t, s) = (s / t) x_t + (1 - s / t) g_theta(x_t, t, s),      D_theta(x, t) = g_theta(x, t, t)

in sigma space (the denoiser contract), ``g`` the teacher's network with a second time input
(:class:`fastdiff.two_time.TwoTimeModel`, a zero-initialised ``s`` embedding: at step 0 ``g(x, t, s)`` is the teacher's
denoiser for every ``s``). Noise levels live on an ``N``-point Karras grid over the teacher schedule's sigma range
(``sigma_0 = sigma_max``, ``sigma_{N-1} = sigma_min``). Each step (reference notes 4.2-4.4):

* ``k`` teacher steps, the same for the whole batch, from ``p(k) ~ k`` on ``1..K`` (drawn from the step number, so
  every process and micro-batch agrees); per sample ``n ~ U{0..N-1-k}``, ``t = sigma_n``, ``u = sigma_{n+k}``, ``s =
  sigma_m`` with ``m ~ U{n+k..N-1}`` (so ``s <= u``);
* ``x_t = x + t z``, ``x_u`` = ``k`` Heun steps of the (guided) teacher from ``t`` to ``u`` (no grad);
* CTM loss ``d(G_tgt(G_theta(x_t, t, s), s, sigma_min), G_tgt(sg G_theta(x_u, u, s), s, sigma_min))`` with the EMA
  target network ``theta^-`` for the outer jumps (the paper writes ``sg(theta)``; the code uses the EMA, 0.999), ``d``
  a per-sample distance (L2, the domain extractor's features, LPIPS: chosen by the recipe);
* DSM loss ``lambda(sigma) ||g_theta(x + sigma z, sigma, sigma) - x||^2``, ``lambda = 1/sigma^2 + 1/sigma_data^2``,
  ``sigma`` from LogNormal(-1.2, 1.2) for half the samples and Karras-ramp-uniform on ``[0, 0.7]`` for the other half
  (which half: a per-sample coin, so a sample's loss does not depend on its batch position);
* weights: ``lambda_DSM = ||grad_w L_CTM|| / (||grad_w L_DSM|| + 1e-4)`` clamped to ``[0, 1e4]`` and, from
  ``gan_start`` on, the GAN term ``-mean D(x_est)`` weighted by the same ratio clamped to ``[0.01, 10]`` (``w`` the
  student's last layer, VQGAN's adaptive weight); a fixed ``dsm_weight`` / ``gan_weight`` replaces the ratio;
* phase ``discriminator`` (with a GAN): hinge loss on real data (``gan_real_free``) against ``x_est`` -- the fake of
  CTM's ImageNet commands; the code's default fake (``gan_fake_outer_type='no'``) is ``G_theta(x_t, t, sigma_min)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastdiff.denoisers import CFGDenoiser, DiffusersDenoiser
from fastdiff.errors import InputError
from fastdiff.objectives.base import EMATarget, LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, condition_kwargs, dropout_mask, view
from fastdiff.objectives.losses import adaptive_weight, hinge_discriminator_loss, hinge_generator_loss, mse, weighted_denoising_mse
from fastdiff.samplers.consistency import ctm_jump
from fastdiff.samplers.grids import karras_sigmas
from fastdiff.samplers.ode import heun_step
from fastdiff.two_time import TwoTimeModel

__all__ = ["ConsistencyTrajectory", "ctm_loss", "ctm_indices", "jump_lengths", "adaptive_weight"]


def jump_lengths(step: int, max_jump: int) -> int:
    """CTM's ``k`` for global step ``step``: ``p(k) ~ k`` on ``1..max_jump`` ("weighted"), from the step number only."""
    probs = torch.arange(1, max_jump + 1, dtype=torch.float64)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=torch.Generator().manual_seed(step * 7919 + 17))) + 1


def ctm_indices(seeds: Tensor, k: int, num_scales: int) -> tuple[Tensor, Tensor, Tensor]:
    """Grid indices ``n ~ U{0..N-1-k}``, ``n + k`` and ``m ~ U{n+k..N-1}`` of ``t``, ``u`` and ``s`` per sample."""
    if not 1 <= k < num_scales:
        raise InputError(f"CTM jump k={k} must be in 1..{num_scales - 1} (num_scales={num_scales})")
    n = (per_sample_rand(seeds, 0, seeds.device) * (num_scales - k)).long().clamp(max=num_scales - 1 - k)
    m = n + k + (per_sample_rand(seeds, 4, seeds.device) * (num_scales - n - k)).long().clamp(max=num_scales - 1 - n - k)
    return n, n + k, m


def ctm_loss(jump: Callable, target_jump: Callable, x_t: Tensor, x_u: Tensor, t: Tensor, u: Tensor, s: Tensor,
             sigma_min: Tensor, distance: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """CTM's consistency loss per sample (paper eq. 8; code ``karras_diffusion.py`` L344-430): ``d(x_est, x_target)``
    with ``x_est = G_tgt(G_theta(x_t, t, s), s, sigma_min)`` and ``x_target = G_tgt(sg G_theta(x_u, u, s), s,
    sigma_min)``; ``jump(x, t, s)`` is the online ``G_theta``, ``target_jump`` the target network's (its parameters
    frozen, gradients flowing through its input). Returns the loss and ``x_est`` (the GAN's fake sample)."""
    x_est = target_jump(jump(x_t, t, s), s, sigma_min)
    with torch.no_grad():
        x_target = target_jump(jump(x_u, u, s), s, sigma_min)
    return distance(x_est.float(), x_target.float()), x_est


class ConsistencyTrajectory(Objective):
    """CTM distillation (see the module docstring).

    Args:
        teacher: the teacher's diffusers UNet (``UNet2DModel`` / ``UNet2DConditionModel``); ``schedule`` its noise
            schedule and ``prediction_type`` its output. The student and its EMA target are two-time copies of it.
        conditioner: as for :class:`~fastdiff.objectives.ConsistencyDistillation` (``int``: class labels).
        num_scales: ``N`` of the Karras grid (CTM: 18 on CIFAR-10, 40 on ImageNet); ``max_jump``: ``K`` (17 / 39).
        distance: per-sample distance for the CTM loss (default: mean squared error).
        dsm_weight, gan_weight: fixed weights of the DSM and GAN terms; ``None``: CTM's adaptive weights. ``gan_weight
            = 0`` and no ``discriminator``: no GAN.
        discriminator: the GAN's discriminator on images (:class:`~fastdiff.objectives.critic.ImageDiscriminator`).
        gan_start: the first step with the GAN term (CTM trains CTM + DSM first, then adds the GAN).
        guidance_scale: the teacher's classifier-free guidance in its Heun solve; ``p_uncond`` label dropout.
    """

    def __init__(self, teacher: nn.Module, schedule, prediction_type: str, conditioner: Any, *, num_scales: int = 18,
                 max_jump: int = 17, rho: float = 7.0, sigma_data: float = 0.5, target_ema: float = 0.999,
                 distance: Callable[[Tensor, Tensor], Tensor] = mse, dsm_weight: float | None = None,
                 gan_weight: float | None = None, discriminator: nn.Module | None = None, gan_start: int = 0,
                 guidance_scale: float = 1.0, p_uncond: float = 0.0):  # fmt: skip
        super().__init__()
        if not 1 <= max_jump < num_scales:
            raise InputError(f"ctm.max_jump={max_jump} must be in 1..num_scales-1 = {num_scales - 1}")
        if (discriminator is None) != (gan_weight == 0):
            raise InputError("the GAN term needs a discriminator and a gan_weight other than 0 (None: adaptive); pass both or neither")
        self.conditioner = ClassConditioner(conditioner) if isinstance(conditioner, int) else conditioner
        self.teacher = teacher.requires_grad_(False)
        self.net = TwoTimeModel.from_base(teacher).requires_grad_(True)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.discriminator = discriminator
        self.schedule, self.prediction_type = schedule, prediction_type
        self.sigmas = karras_sigmas(num_scales, schedule.sigma_min, schedule.sigma_max, rho)[:-1].float()  # descending, no 0
        self.num_scales, self.max_jump, self.rho, self.sigma_data = num_scales, max_jump, rho, sigma_data
        self.target_ema, self.distance = target_ema, distance
        self.dsm_weight, self.gan_weight, self.gan_start = dsm_weight, gan_weight, gan_start
        self.guidance_scale, self.p_uncond = guidance_scale, p_uncond

    @property
    def phases(self) -> tuple[str, ...]:
        return ("student",) if self.discriminator is None else ("student", "discriminator")

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return (self.net if phase == "student" else self.discriminator).parameters()

    def export(self) -> nn.Module:
        return self.net

    def ema_targets(self, phase: str) -> Sequence[EMATarget]:
        return (EMATarget(self.target, self.net, self.target_ema),) if phase == "student" else ()

    # -- the maps ------------------------------------------------------------------------------------------------------

    def g(self, model: nn.Module, x: Tensor, t: Tensor, s: Tensor, cond: dict) -> Tensor:
        """``g_model(x, t, s)``: the two-time network's clean-sample estimate in sigma space."""
        return DiffusersDenoiser(model, self.schedule, self.prediction_type)(x, t, s_timestep=self.schedule.sigma_to_t(s), **cond)

    def jump(self, model: nn.Module, x: Tensor, t: Tensor, s: Tensor, cond: dict) -> Tensor:
        """``G_model(x, t, s)``."""
        return ctm_jump(x, self.g(model, x, t, s, cond), t, s)

    @torch.no_grad()
    def teacher_solve(self, x: Tensor, n: Tensor, k: int, cond: dict, uncond: dict) -> Tensor:
        """``k`` Heun steps of the (guided) teacher from ``sigma_n`` to ``sigma_{n+k}``, per sample."""
        den = DiffusersDenoiser(self.teacher, self.schedule, self.prediction_type)
        if self.guidance_scale != 1:
            den = CFGDenoiser(den, uncond, self.guidance_scale)
        sigmas = self.sigmas.to(x.device, x.dtype)
        for j in range(k):
            x = heun_step(den, x, sigmas[n + j], sigmas[n + j + 1], cond)
        return x

    def dsm_sigmas(self, seeds: Tensor) -> Tensor:
        """CTM's "halflognormal" DSM noise levels: LogNormal(-1.2, 1.2) or Karras-ramp-uniform on [0, 0.7], by coin."""
        lo, hi = self.sigmas[-1].item(), self.sigmas[0].item()
        lognormal = (-1.2 + 1.2 * per_sample_randn(seeds.double(), seeds, 5)).exp()
        ramp = 0.7 * per_sample_rand(seeds, 6, seeds.device)
        karras = (hi ** (1 / self.rho) + ramp * (lo ** (1 / self.rho) - hi ** (1 / self.rho))) ** self.rho
        return torch.where(per_sample_rand(seeds, 7, seeds.device) < 0.5, lognormal, karras).clamp(lo, hi)

    # -- the losses ----------------------------------------------------------------------------------------------------

    def _pairs(self, batch: dict[str, Tensor], step: int) -> tuple:
        x, seeds = batch["x"], batch["seeds"]
        dropped = dropout_mask(seeds, self.p_uncond)
        cond = condition_kwargs(self.conditioner, batch, dropped)
        uncond = condition_kwargs(self.conditioner, batch, torch.ones_like(dropped))
        k = jump_lengths(step, self.max_jump)
        n, nu, m = (i.to(x.device) for i in ctm_indices(seeds, k, self.num_scales))
        sigmas = self.sigmas.to(x.device, x.dtype)
        t, u, s = sigmas[n], sigmas[nu], sigmas[m]
        x_t = x + view(t, x) * per_sample_randn(x, seeds, 1)
        return x, seeds, cond, uncond, k, n, t, u, s, x_t

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        x, seeds, cond, uncond, k, n, t, u, s, x_t = self._pairs(batch, step)
        gan = self.discriminator is not None and step >= self.gan_start
        if phase == "discriminator":
            if not gan:  # before gan_start: no gradient, and no model calls spent on fakes
                return LossOutput({"gan": x.new_zeros((), requires_grad=True)})
            with torch.no_grad():
                fake = self.jump(self.target, self.jump(self.net, x_t, t, s, cond), s, torch.full_like(s, float(self.sigmas[-1])), cond)
            return LossOutput({"gan": hinge_discriminator_loss(self.discriminator(fake), self.discriminator(x))})
        x_u = self.teacher_solve(x_t, n, k, cond, uncond)
        sigma_min = torch.full_like(s, float(self.sigmas[-1]))
        per_sample, x_est = ctm_loss(lambda y, a, b: self.jump(self.net, y, a, b, cond), lambda y, a, b: self.jump(self.target, y, a, b, cond),
                                     x_t, x_u, t, u, s, sigma_min, self.distance)  # fmt: skip
        ctm = per_sample.mean()
        sigma = self.dsm_sigmas(seeds).to(x.device, x.dtype)
        denoised = self.g(self.net, x + view(sigma, x) * per_sample_randn(x, seeds, 3), sigma, sigma, cond)
        dsm = weighted_denoising_mse(denoised.float(), x.float(), sigma.float(), self.sigma_data).mean()
        last = self.net.base.conv_out.weight
        w_dsm = adaptive_weight(ctm, dsm, last, 0.0, 1e4) if self.dsm_weight is None else torch.tensor(self.dsm_weight)
        terms, logs = {"ctm": ctm, "dsm": w_dsm * dsm}, {"k": k, "dsm_weight": w_dsm.detach(), "dsm_unweighted": dsm.detach()}
        if gan:
            g_loss = hinge_generator_loss(self.discriminator(x_est))
            w_gan = adaptive_weight(ctm, g_loss, last, 0.01, 10.0) if self.gan_weight is None else torch.tensor(self.gan_weight)
            terms["gan"], logs["gan_weight"] = w_gan * g_loss, w_gan.detach()
        return LossOutput(terms, logs)
