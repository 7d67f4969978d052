"""Consistency training without a teacher.

:class:`ConsistencyTraining`: iCT (Song & Dhariwal, ICLR 2024) and, with its switches, iLCT / sLCT (Dao et al.,
  ICLR 2025): the network is its own stop-gradient teacher (no EMA target), adjacent levels of a Karras grid whose
  size doubles (10 -> 1280), discretised lognormal level sampling, weighting ``1 / (sigma_{i+1} - sigma_i)``,
  pseudo-Huber on the whole-sample norm (iCT) or Cauchy with the adaptive ``c(N)`` (iLCT), a diffusion loss on the
  lowest-noise quarter, minibatch optimal-transport pairing of noise and data, dropout masks shared by both passes.
  The student is ``f(x, sigma) = c_skip x + c_out F(c_in x, 250 ln sigma)`` with ``f(x, sigma_min) = x`` exactly --
  the convention of diffusers' ``CMStochasticIterativeScheduler``, which therefore samples the saved students.
Both are class-conditional with label dropout (the null label or prompt, seen by every pass of a dropped sample),
or, built without classes, unconditional: the network then gets no labels.

Grids here are ascending: index 0 is ``sigma_min`` (the reference notes' index-direction trap).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastdiff.denoisers import consistency_precond
from fastdiff.errors import InputError
from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, check_unconditional, condition_kwargs, dropout_mask, same_dropout, view
from fastdiff.objectives.losses import distance, ict_huber_c, weighted_denoising_mse

__all__ = ["karras_levels", "ict_num_levels", "lognormal_level_probs", "lct_cauchy_c", "lct_diffusion_mask", "ot_pairing",
           "non_scaling_layernorm", "ConsistencyTraining"]  # fmt: skip


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``n`` noise levels of the Karras grid, **ascending** (index 0 = sigma_min), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum (sec. 3.4): ``N(k) = min(s0 2^floor(k / K'), s1) + 1``,
    ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` -- 11, 21, 41, ..., 1281 levels."""
    stage_len = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // stage_len), s1) + 1


def lognormal_level_probs(levels: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's discretised lognormal over the pairs ``(i, i + 1)`` of an ascending grid (eq. 11):
    ``p(i) ~ erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2 P_std))``."""
    cdf = torch.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def lct_cauchy_c(num_levels: int, dim: int, s0: int = 10) -> float:
    """iLCT's adaptive Cauchy scale for samples of ``dim`` numbers: iCT's ``0.00054 sqrt(dim)`` on the first stage
    (LCT ``train_cm_latent.py`` L198; 0.0346 only for its 4x32x32 latents), then ``exp(-1.15 ln(N - 1) - 0.85)``
    once ``N > s0 + 1`` (L351-352)."""
    return ict_huber_c(dim) if num_levels <= s0 + 1 else math.exp(-1.15 * math.log(num_levels - 1) - 0.85)


def lct_diffusion_mask(i: Tensor, num_levels: int) -> Tensor:
    """iLCT's diffusion-loss subset: the pairs ``i`` (student at level ``i + 1`` of the ascending grid) whose student
    level is in the lowest-noise quarter, ``i <= N - 2 - int(0.75 N)`` (N = 11: i <= 1; 21: i <= 4; 81: i <= 19)."""
    # LCT (models/karras_diffusion.py L200) keeps `indices >= int(0.75 N)`, `indices` being the student's index m on
    # its grid indexed from sigma_max (student at m, target at m + 1). Ascending level i + 1 is LCT's m = N - 2 - i.
    return (num_levels - 2 - i) >= int(0.75 * num_levels)


def _selected_mean(values: Tensor, selected: Tensor) -> Tensor:
    """Mean of ``values`` over the ``selected`` samples; 0 (with a gradient graph) when none is selected."""
    # LCT averages over the selected samples only (`losses["diff_loss"].mean()`, train_cm_latent.py L373, of the
    # already-masked `diff_loss`, karras_diffusion.py L234). For an empty selection that mean is NaN and LCT's loop
    # skips the step and exits (L383-397); LCT is silent on a better choice -- here such a batch trains on the
    # consistency term alone. The mean is per micro-batch (as LCT's is per GPU).
    return torch.where(selected, values, torch.zeros_like(values)).sum() / selected.sum().clamp(min=1)


def ot_pairing(x: Tensor, noise: Tensor) -> Tensor:
    """Minibatch optimal transport (iLCT): the permutation of ``noise`` minimising ``sum ||x_i - noise_pi(i)||^2``."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.flatten(1).double(), noise.flatten(1).double()).pow(2)
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


def non_scaling_layernorm(model: nn.Module) -> int:
    """iLCT's non-scaling LayerNorm: fix every affine LayerNorm's scale to 1 (bias stays trainable). Returns how many
    LayerNorms were changed (0 for models whose norms have no affine scale, like diffusers' DiT with adaLN-Zero)."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(1.0)
            m.weight.requires_grad_(False)
            changed += 1
    return changed


class ConsistencyTraining(Objective):
    """iCT (``loss="pseudo_huber"``) and iLCT (``loss="cauchy"``, ``diffusion_weight=5``, ``ot=True``) from data.

    Args:
        net: the raw network ``F`` (a diffusers model), conditioned on ``250 ln sigma``.
        num_classes: real classes; label ``num_classes`` is the null label (dropped with ``p_uncond``). ``None``:
            unconditional -- ``net`` gets no labels and the batch needs none (iCT's CIFAR-10 results).
        total_steps: training steps, for the curriculum.
        huber_c: pseudo-Huber ``c``; ``None`` = ``0.00054 sqrt(d)``. For Cauchy, ``None`` = the adaptive ``c(N)``.
        diffusion_weight: iLCT's diffusion loss weight (5), on the samples whose student level is in the
            lowest-noise quarter (:func:`lct_diffusion_mask`), averaged over those samples.
    """

    phases = ("student",)

    def __init__(self, net: nn.Module, num_classes: int | None, total_steps: int, *, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0, p_mean: float = -1.1,
                 p_std: float = 2.0, s0: int = 10, s1: int = 1280, loss: str = "pseudo_huber", huber_c: float | None = None,
                 diffusion_weight: float = 0.0, ot: bool = False, p_uncond: float = 0.1):  # fmt: skip
        super().__init__()
        if loss not in ("pseudo_huber", "cauchy"):
            raise InputError(f"consistency loss must be 'pseudo_huber' or 'cauchy'; got {loss!r}")
        check_unconditional(num_classes is not None, p_uncond)
        self.student = consistency_precond(net, sigma_min, sigma_data, noise_scale=1000.0)  # registers net once
        self.conditioner = ClassConditioner(num_classes) if num_classes is not None else None
        self.num_classes, self.total_steps, self.loss_kind = num_classes, total_steps, loss
        self.grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.p_mean, self.p_std, self.s0, self.s1 = p_mean, p_std, s0, s1
        self.sigma_data, self.huber_c, self.diffusion_weight, self.ot, self.p_uncond = sigma_data, huber_c, diffusion_weight, ot, p_uncond

    @property
    def net(self) -> nn.Module:
        return self.student.net

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def export(self) -> nn.Module:
        return self.net

    def levels(self, step: int) -> Tensor:
        return karras_levels(ict_num_levels(step, self.total_steps, self.s0, self.s1), **self.grid)

    def scale_c(self, num_levels: int, dim: int) -> float:
        """The robust loss's ``c`` for samples of ``dim`` numbers on a grid of ``num_levels``."""
        if self.huber_c is not None:
            return self.huber_c
        return ict_huber_c(dim) if self.loss_kind == "pseudo_huber" else lct_cauchy_c(num_levels, dim, self.s0)

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        x, seeds = batch["x"], batch["seeds"]
        levels = self.levels(step).to(x.device)
        n = len(levels)
        probs = lognormal_level_probs(levels, self.p_mean, self.p_std)
        u = per_sample_rand(seeds, 0, x.device)
        i = torch.searchsorted(probs.cumsum(0), u.to(probs.dtype), right=True).clamp(max=n - 2)
        z = per_sample_randn(x, seeds, 1)
        if self.ot:
            z = ot_pairing(x, z)
        cond = condition_kwargs(self.conditioner, batch, dropout_mask(seeds, self.p_uncond))
        sigma, sigma_next = levels[i], levels[i + 1]
        dropout_seed = int(seeds[0]) % (2**62)
        with same_dropout(dropout_seed, x.device):
            student = self.student(x + view(sigma_next, x) * z, sigma_next.to(x.dtype), **cond)
        with same_dropout(dropout_seed, x.device), torch.no_grad():  # iCT: the target is sg(f_theta), EMA rate 0
            target = self.student(x + view(sigma, x) * z, sigma.to(x.dtype), **cond)
        weight = (1 / (sigma_next - sigma)).to(torch.float32)
        c = self.scale_c(n, x[0].numel())
        terms = {"consistency": (weight * distance(self.loss_kind, student, target, c)).mean()}
        if self.diffusion_weight > 0:  # L = mean(L_CM) + 5 mean(L_diff over the selected samples), LCT L370-378
            per_sample = weighted_denoising_mse(student.float(), x.float(), sigma_next.float(), self.sigma_data)
            terms["diffusion"] = self.diffusion_weight * _selected_mean(per_sample, lct_diffusion_mask(i, n))
        return LossOutput(terms, {"num_levels": n, "c": c, "mean_sigma": float(sigma_next.mean())})
