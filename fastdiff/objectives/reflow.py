"""Reflow with the 2-RF++ improvements (Lee, Lin & Fanti, NeurIPS 2024; official ``sangyun884/rfpp`` ``train.py``
L110-230, ``t_dist.py``): a flow-matching student trained on (noise, teacher sample) pairs.

For a pair ``(z, x)`` and ``t`` per sample (reference notes 7)::

    z_t = (1 - t) x + t z,    v = v_theta(z_t, t),    target = z - x,    x_hat = z_t - t v
    l2:            sqrt(mean (v - target)^2)                                   (the code's "l2": an RMS)
    pseudo_huber:  PH(v, target) / D,   PH(a, b) = sqrt(||a - b||^2 + c^2) - c,   c = 0.00054 sqrt(D)
    lpips_huber:   (1 - t) PH(v, target) / D + d(x_hat, x) / t                  ("LPIPS-Huber-1/t", Config F)

with ``D`` the sample dimension. The official code's constant is ``0.00054 D`` (issue #1 of the repository: a bug;
the paper and iCT mean ``sqrt(D)``); here it is ``sqrt(D)``. ``d`` is LPIPS or, for CPU recipes, the domain
extractor's features (:mod:`fastdiff.eval.perceptual`). ``t`` is U-shaped (:func:`u_shaped_t`, ``a = 4``) or uniform,
both mapped to ``[1e-5, 1 - 1e-5]`` as the code does.

The student is the teacher's network as a flow-matching model (:class:`fastdiff.flow_student.VPFlowModel`: the
sigma <-> t change of variables, so at step 0 it *is* the teacher's probability-flow ODE), sampled by diffusers'
``FlowMatchEulerDiscreteScheduler`` or 2-RF++'s sampler that re-uses the initial noise
(:func:`fastdiff.samplers.sample_reflow`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastdiff.denoisers import call_model
from fastdiff.errors import InputError, check_choice
from fastdiff.flow_student import VPFlowModel
from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand
from fastdiff.objectives.conditioning import ClassConditioner, condition_kwargs, dropout_mask, view
from fastdiff.objectives.losses import ict_huber_c, pseudo_huber

__all__ = ["Reflow", "reflow_loss", "u_shaped_t", "REFLOW_LOSSES", "T_DISTRIBUTIONS"]

REFLOW_LOSSES = ("l2", "pseudo_huber", "lpips_huber")
T_DISTRIBUTIONS = ("u_shaped", "uniform")
T_MIN, T_MAX = 1e-5, 1 - 1e-5


def u_shaped_t(r: Tensor, coin: Tensor, a: float = 4.0) -> Tensor:
    """2-RF++'s U-shaped ``t`` from uniforms ``r`` and ``coin``: ``u`` with density ``a e^{au} / (e^a - 1)`` on [0, 1]
    (inverse CDF ``log(1 + r (e^a - 1)) / a``), then ``u`` or ``1 - u`` by the coin -- the mixture ``p(t) = a (e^{at} +
    e^{a(1-t)}) / (2 (e^a - 1))`` -- scaled to ``[1e-5, 1 - 1e-5]``."""
    u = torch.log1p(r * math.expm1(a)) / a
    t = torch.where(coin < 0.5, u, 1 - u)
    return t * (T_MAX - T_MIN) + T_MIN


def reflow_loss(v: Tensor, z_t: Tensor, x: Tensor, z: Tensor, t: Tensor, kind: str,
                distance: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """The per-sample 2-RF++ loss terms of ``kind`` (see the module docstring) for velocity ``v`` at ``z_t``."""
    check_choice("reflow loss", kind, REFLOW_LOSSES)
    target = (z - x).float()
    dim = x[0].numel()
    if kind == "l2":
        return {"l2": (v.float() - target).flatten(1).pow(2).mean(1).sqrt()}
    huber = pseudo_huber(v.float(), target, ict_huber_c(dim)) / dim
    if kind == "pseudo_huber":
        return {"pseudo_huber": huber}
    x_hat = z_t.float() - view(t, z_t).float() * v.float()
    return {"pseudo_huber": (1 - t.float()) * huber, "perceptual": distance(x_hat, x.float()) / t.float()}


class Reflow(Objective):
    """2-RF++ on pairs: batches carry ``x`` (the teacher's sample), ``noise`` (its starting noise) and ``labels``.

    Args:
        teacher: the VP teacher's network; ``vp_config`` its scheduler config (betas, ``prediction_type``).
        num_classes: class labels (``None``: unconditional); ``p_uncond`` label dropout for the student's CFG.
        loss: one of :data:`REFLOW_LOSSES`; ``distance`` the perceptual distance of ``lpips_huber``.
        t_distribution: ``u_shaped`` (with ``a``) or ``uniform``.
    """

    phases = ("student",)

    def __init__(self, teacher: nn.Module, vp_config: dict, num_classes: int | None, *, loss: str = "lpips_huber",
                 distance: nn.Module | None = None, t_distribution: str = "u_shaped", a: float = 4.0, p_uncond: float = 0.0):  # fmt: skip
        super().__init__()
        check_choice("reflow loss", loss, REFLOW_LOSSES)
        check_choice("reflow t distribution", t_distribution, T_DISTRIBUTIONS)
        if loss == "lpips_huber" and distance is None:
            raise InputError("loss lpips_huber needs a perceptual distance (reflow.distance: lpips or features)")
        self.net = VPFlowModel.from_base(teacher, vp_config).requires_grad_(True)
        self.conditioner = ClassConditioner(num_classes) if num_classes is not None else None
        self.loss, self.distance, self.t_distribution, self.a, self.p_uncond = loss, distance, t_distribution, a, p_uncond

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return self.net.parameters()

    def export(self) -> nn.Module:
        return self.net

    def times(self, seeds: Tensor) -> Tensor:
        r = per_sample_rand(seeds, 0, seeds.device)
        if self.t_distribution == "uniform":
            return r * (T_MAX - T_MIN) + T_MIN
        return u_shaped_t(r, per_sample_rand(seeds, 1, seeds.device), self.a)

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        x, z, seeds = batch["x"], batch["noise"], batch["seeds"]
        t = self.times(seeds).to(x.device, x.dtype)
        z_t = (1 - view(t, x)) * x + view(t, x) * z
        cond: dict[str, Any] = condition_kwargs(self.conditioner, batch, dropout_mask(seeds, self.p_uncond))
        v = call_model(self.net, z_t, t * 1000, cond)
        terms = reflow_loss(v, z_t, x, z, t, self.loss, self.distance)
        return LossOutput({k: v.mean() for k, v in terms.items()}, {"mean_t": t.float().mean()})
