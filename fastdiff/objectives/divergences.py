"""Distribution matching as pure functions: DMD2's generator gradient, f-distill's weights, the GAN losses.

* :func:`dmd_gradient` / :func:`dmd_loss` -- DMD2 (Yin et al. 2024, eq. 2 and sec. 4.1; official
  ``main/sd_guidance.py`` ``compute_distribution_matching_loss`` and ``main/edm/edm_guidance.py`` L73-125): with the
  real (teacher) and fake denoisers' clean-sample predictions ``mu_real``, ``mu_fake`` at ``x_t``, the gradient on the
  generator's sample ``x`` is ``(mu_fake - mu_real) / mean_CHW |x - mu_real|`` (per sample), applied through
  ``0.5 * MSE(x, sg(x - grad))`` (mean over all elements), whose gradient is ``grad / numel``. In score terms
  (VP: ``x0_hat = (x_t + (1 - abar) score) / sqrt(abar)``) it is ``(1 - abar) / sqrt(abar) (score_fake - score_real)``
  divided by the normaliser: the reverse-KL gradient.
* :data:`F_DIVERGENCES` and :func:`f_weights` -- f-distill (Xu, Nie & Vahdat 2025, Table 1 and eq. 9): the same
  gradient weighted per sample by ``h(r) = f''(r) r^2`` of the density ratio ``r = p / q`` read from the
  discriminator's logit (its optimum under the non-saturating loss is ``log p/q``); the ratio is clamped, normalised
  by its mean in 10 noise-level bins, and ``h`` by its batch mean, as NVlabs/FastGen's
  ``methods/distribution_matching/f_distill.py`` (``_get_f_div_weighting_h``) does with its default
  ``ratio_ema_rate = 0`` (the bins' means are this batch's; FastGen's optional EMA of the bin means across steps and
  its all-reduce over processes are not implemented: each process normalises its own share). ``reverse_kl`` has
  ``h = 1``: DMD2 itself, exactly.
* :func:`gan_generator_loss` / :func:`gan_discriminator_loss` -- DMD2's non-saturating GAN (``softplus``;
  ``compute_generator_clean_cls_loss`` / ``compute_guidance_clean_cls_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["dmd_gradient", "dmd_loss", "FDivergence", "F_DIVERGENCES", "density_ratio", "f_weights",
           "gan_generator_loss", "gan_discriminator_loss"]  # fmt: skip


def dmd_gradient(x: Tensor, mu_real: Tensor, mu_fake: Tensor) -> Tensor:
    """DMD2's per-sample normalised gradient ``((x - mu_real) - (x - mu_fake)) / mean_CHW |x - mu_real|``, non-finite
    values set to zero as the official ``torch.nan_to_num`` does; computed in float32 or wider, without gradient."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mu_real, mu_fake = x.detach().to(dtype), mu_real.detach().to(dtype), mu_fake.detach().to(dtype)
    p_real, p_fake = x - mu_real, x - mu_fake
    norm = p_real.abs().flatten(1).mean(1).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num((p_real - p_fake) / norm)


def dmd_loss(x: Tensor, grad: Tensor, weight: Tensor | None = None) -> Tensor:
    """``0.5 * MSE(x, sg(x - w grad))`` over all elements: its gradient with respect to ``x`` is ``w grad / numel``.
    ``weight``: one factor ``w`` per sample (f-distill's ``h``); ``None`` is DMD2's ``w = 1``."""
    if weight is not None:
        grad = grad * weight.reshape(-1, *([1] * (grad.ndim - 1))).to(grad.dtype)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return 0.5 * F.mse_loss(x, (x - grad.to(x.dtype)).detach(), reduction="mean")


@dataclass(frozen=True)
class FDivergence:
    """One f-divergence of f-distill's Table 1: ``f`` (the generator of ``D_f(p || q) = E_q f(p / q)``) and its
    weighting ``h(r) = f''(r) r^2``."""

    f: Callable[[Tensor], Tensor]
    h: Callable[[Tensor], Tensor]


F_DIVERGENCES = {
    "reverse_kl": FDivergence(lambda r: -r.log(), lambda r: torch.ones_like(r)),
    "softened_rkl": FDivergence(lambda r: (r + 1) * (0.5 + 0.5 / r).log(), lambda r: 1 / (r + 1)),
    "jensen_shannon": FDivergence(lambda r: r * r.log() - (r + 1) * ((r + 1) / 2).log(), lambda r: r / (r + 1)),
    "squared_hellinger": FDivergence(lambda r: 1 - r.sqrt(), lambda r: 0.25 * r.sqrt()),
    "forward_kl": FDivergence(lambda r: r * r.log(), lambda r: r),
    "jeffreys": FDivergence(lambda r: (r - 1) * r.log(), lambda r: r + 1),
}


def density_ratio(logits: Tensor, logit_clamp: float = 10.0, ratio_range: tuple[float, float] = (0.1, 20.0)) -> Tensor:
    """``r = exp(logit)``, the logit clamped to ``+-logit_clamp`` and ``r`` to ``ratio_range`` (FastGen's defaults);
    one value per sample (a logit of shape ``(B, heads)`` is averaged over its heads first). No gradient."""
    logits = logits.detach().float()
    if logits.ndim == 2:
        logits = logits.mean(1)
    return logits.clamp(-logit_clamp, logit_clamp).exp().clamp(*ratio_range)


def f_weights(divergence: str, ratio: Tensor, t: Tensor | None = None, t_range: tuple[float, float] | None = None,
              num_bins: int = 10) -> Tensor:  # fmt: skip
    """f-distill's per-sample weights: ``h(r)`` divided by its batch mean, after ``r`` is divided by its mean within
    ``num_bins`` equal bins of the noise level ``t`` over ``t_range`` (pass ``t=None`` to skip that step). A mean of
    ones is exactly one, so ``reverse_kl`` gives exactly DMD2's unit weights."""
    if divergence not in F_DIVERGENCES:
        raise InputError(f"unknown f-divergence {divergence!r}; expected one of {', '.join(F_DIVERGENCES)}")
    ratio = ratio.detach().double()
    if t is not None:
        lo, hi = t_range if t_range is not None else (float(t.min()), float(t.max()))
        width = max((hi - lo) / num_bins, 1e-12)
        idx = ((t.double() - lo) / width).floor().long().clamp(0, num_bins - 1)
        count = torch.bincount(idx, minlength=num_bins).double()
        total = torch.bincount(idx, weights=ratio, minlength=num_bins)
        ratio = ratio / (total / count.clamp(min=1))[idx]
    h = F_DIVERGENCES[divergence].h(ratio)
    return (h / h.mean()).float()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """The generator's non-saturating loss ``mean softplus(-D(fake))``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """The discriminator's loss ``mean softplus(D(fake)) + mean softplus(-D(real))``; its optimum logit is
    ``log p_real / p_fake``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()

