r"""An exact oracle: Gaussian-mixture data, its exact denoiser and score, and reference ODE solutions.

For data ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` and ``x = x0 + sigma eps`` everything is closed form:

.. math::
    p(x) = \sum_k w_k\, \mathcal N(x; \mu_k, \mathrm{diag}(v_k + \sigma^2)), \qquad
    D(x, \sigma) = E[x_0 \mid x] = \sum_k r_k(x)\,\Big(\mu_k + \frac{v_k}{v_k + \sigma^2}(x - \mu_k)\Big),

with responsibilities ``r_k(x)`` the posterior component weights, and ``score = (D - x) / sigma^2`` (Tweedie).
The mixture is a :class:`~fastdiff.denoisers.Denoiser`, so it stands in for a model anywhere: samplers' convergence
orders, objectives' fixed points, guidance. Components may carry class labels; ``class_labels`` restricts the
mixture to one class per sample and the label ``num_classes`` means unconditional (the usual CFG null class).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["GaussianMixture", "eight_gaussians"]


class GaussianMixture:
    """A mixture of isotropic or diagonal Gaussians over samples of shape ``shape`` (e.g. ``(2,)`` or ``(1, 8, 8)``).

    Args:
        means: ``(K, *shape)`` component means.
        stds: ``(K,)`` isotropic or ``(K, *shape)`` diagonal standard deviations, all > 0.
        weights: ``(K,)`` mixture weights (normalised here); default uniform.
        labels: ``(K,)`` integer class of each component, optional.
    """

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None, labels: Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise InputError(f"means must have shape (K, *sample_shape); got {tuple(means.shape)}")
        k = means.shape[0]
        self.shape = tuple(means.shape[1:])
        self.means = means.reshape(k, -1)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.reshape(-1, 1).expand(k, 1) if stds.numel() in (1, k) and stds.ndim <= 1 else stds.reshape(k, -1)
        if stds.shape[1] not in (1, self.means.shape[1]) or not (stds > 0).all():
            raise InputError(f"stds must be positive with shape (K,) or (K, *sample_shape); got {tuple(stds.shape)}")
        self.variances = (stds**2).expand_as(self.means).clone()
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not (weights >= 0).all() or weights.sum() <= 0:
            raise InputError(f"weights must be {k} non-negative numbers with a positive sum; got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and (self.labels.shape != (k,) or (self.labels < 0).any()):
            raise InputError(f"labels must be {k} non-negative integers; got {self.labels.tolist()}")
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- data ------------------------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, class_labels: Tensor | None = None) -> Tensor:
        """``n`` exact samples ``(n, *shape)`` in float64; with ``class_labels`` ``(n,)`` each from its class."""
        log_w = self._log_weights(class_labels, n)
        comp = torch.multinomial(log_w.exp(), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.variances[comp].sqrt() * noise).reshape(n, *self.shape)

    def mean(self, class_label: int | None = None) -> Tensor:
        """Exact mean ``sum_k w_k mu_k`` (of one class if given), shape ``shape``."""
        w = self._class_weights(class_label)
        return (w @ self.means).reshape(self.shape)

    def covariance(self, class_label: int | None = None, sigma: float = 0.0) -> Tensor:
        """Exact covariance ``(D, D)`` of the data (plus ``sigma^2 I`` for the noisy marginal)."""
        w = self._class_weights(class_label)
        mu = w @ self.means
        second = torch.diag(w @ self.variances) + (self.means.T * w) @ self.means
        return second - torch.outer(mu, mu) + sigma**2 * torch.eye(self.dim, dtype=torch.float64)

    def mode_weights(self, class_label: int | None = None) -> Tensor:
        """Exact weight of each component ``(K,)`` (within one class if given)."""
        return self._class_weights(class_label)

    # -- the exact denoiser ----------------------------------------------------------------------------------------

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0, class_labels: Tensor | None = None) -> Tensor:
        """``log p_sigma(x)`` of the noisy marginal, shape ``(B,)``."""
        return torch.logsumexp(self._joint_log_prob(x, sigma, class_labels), dim=1).to(x.dtype)

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0, class_labels: Tensor | None = None) -> Tensor:
        """Posterior component probabilities ``(B, K)``."""
        return torch.softmax(self._joint_log_prob(x, sigma, class_labels), dim=1)

    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``E[x0 | x0 + sigma eps = x]`` with ``x``'s shape and dtype -- the denoiser contract."""
        xf, s2 = self._flat(x), self._sigma2(sigma, x)
        r = torch.softmax(self._joint_log_prob(x, sigma, class_labels), dim=1)  # (B, K)
        gain = self.variances / (self.variances + s2[:, :, None])  # (B, K, D)
        post = self.means + gain * (xf[:, None, :] - self.means)  # (B, K, D)
        return (r[:, :, None] * post).sum(1).reshape(x.shape).to(x.dtype)

    denoise = __call__

    def score(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie's formula)."""
        s2 = self._sigma2(sigma, x).reshape(-1, *([1] * (x.ndim - 1)))
        return ((self(x, sigma, class_labels).double() - x.double()) / s2).to(x.dtype)

    # -- reference solutions ---------------------------------------------------------------------------------------

    def ode_solve(
        self,
        x: Tensor,
        sigma_start: float,
        sigma_end: float = 0.0,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
        rtol: float = 1e-10,
        atol: float = 1e-10,
    ) -> Tensor:
        """Solve the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, eq. 4)
        from ``sigma_start`` to ``sigma_end`` to high accuracy (DOP853 in ``log sigma``, float64).

        ``sigma_end = 0`` integrates to a tiny sigma and applies ``D`` once more, whose error is ``O(sigma^2)``.
        With ``guidance_scale != 1`` the ODE of the classifier-free guided denoiser is solved (needs
        ``class_labels``).
        """
        if not (math.isfinite(sigma_start) and sigma_start > 0 and 0 <= sigma_end < sigma_start):
            raise InputError(f"need 0 <= sigma_end < sigma_start < inf; got {sigma_start=} and {sigma_end=}")
        if guidance_scale != 1.0 and class_labels is None:
            raise InputError("guidance_scale != 1 needs class_labels")
        stop = sigma_end if sigma_end > 0 else 1e-5 * min(1.0, self.variances.min().sqrt().item())
        flat = x.detach().double().reshape(x.shape[0], -1)

        def rhs(log_sigma: float, y: np.ndarray) -> np.ndarray:
            xs = torch.from_numpy(y).reshape(flat.shape)
            return (xs - self._guided(xs, math.exp(log_sigma), class_labels, guidance_scale)).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(sigma_start), math.log(stop)), flat.reshape(-1).numpy(), "DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        out = torch.from_numpy(sol.y[:, -1]).reshape(flat.shape)
        if sigma_end == 0:
            out = self._guided(out, stop, class_labels, guidance_scale)
        return out.reshape(x.shape).to(x.dtype)

    # -- scoring sample sets against the truth ---------------------------------------------------------------------

    def evaluate(self, samples: Tensor, class_label: int | None = None) -> dict[str, float]:
        """Distances of a sample set to the exact distribution: mean and covariance errors, total variation of the
        mode weights (each sample assigned to its most likely component) and the mean log-likelihood."""
        flat = self._flat(samples)
        cov = torch.cov(flat.T).reshape(self.dim, self.dim) if len(flat) > 1 else torch.zeros(self.dim, self.dim)
        labels = None if class_label is None else torch.full((len(flat),), class_label)
        assign = self.responsibilities(samples, 0.0, labels).argmax(1)
        hist = torch.bincount(assign, minlength=len(self.weights)).double() / len(flat)
        return {
            "mean_error": (flat.mean(0) - self.mean(class_label).reshape(-1)).norm().item(),
            "cov_error": (cov - self.covariance(class_label)).norm().item(),
            "mode_tv": 0.5 * (hist - self.mode_weights(class_label)).abs().sum().item(),
            "log_likelihood": self.log_prob(samples.double(), 0.0, labels).mean().item(),
        }

    # -- internals -------------------------------------------------------------------------------------------------

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise InputError(f"expected samples of shape (B, {', '.join(map(str, self.shape))}); got {tuple(x.shape)}")
        return x.double().reshape(x.shape[0], -1).to(self.means.device)

    def _sigma2(self, sigma: Tensor | float, x: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if s.numel() not in (1, x.shape[0]) or (s < 0).any() or not torch.isfinite(s).all():
            raise InputError(f"sigma must be finite, >= 0, a scalar or of shape ({x.shape[0]},); got {sigma}")
        return (s**2).expand(x.shape[0]).reshape(-1, 1)

    def _log_weights(self, class_labels: Tensor | None, n: int) -> Tensor:
        """Log weights ``(n, K)``, restricted to each sample's class (label ``num_classes``: all components)."""
        log_w = self.weights.log().expand(n, -1)
        if class_labels is None:
            return log_w
        if self.labels is None:
            raise InputError("class_labels given but this mixture has no component labels")
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(n)
        if (y < 0).any() or (y > self.num_classes).any():
            raise InputError(f"class_labels must be in [0, {self.num_classes}] ({self.num_classes} = unconditional)")
        keep = (self.labels[None, :] == y[:, None]) | (y[:, None] == self.num_classes)
        log_w = torch.where(keep, log_w, torch.full_like(log_w, -math.inf))
        return log_w - torch.logsumexp(log_w, dim=1, keepdim=True)

    def _class_weights(self, class_label: int | None) -> Tensor:
        if class_label is None:
            return self.weights
        return self._log_weights(torch.tensor([class_label]), 1)[0].exp()

    def _joint_log_prob(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None) -> Tensor:
        """``log w_k + log N(x; mu_k, v_k + sigma^2)``, shape ``(B, K)``."""
        xf = self._flat(x)
        var = self.variances + self._sigma2(sigma, x)[:, :, None]  # (B, K, D)
        sq = (xf[:, None, :] - self.means) ** 2 / var
        log_n = -0.5 * (sq + var.log() + math.log(2 * math.pi)).sum(-1)
        return self._log_weights(class_labels, xf.shape[0]) + log_n

    def _guided(self, x: Tensor, sigma: float, class_labels: Tensor | None, w: float) -> Tensor:
        if w == 1.0:
            return self(x, sigma, class_labels)
        null = torch.full((x.shape[0],), self.num_classes)
        d_u = self(x, sigma, null)
        return d_u + w * (self(x, sigma, class_labels) - d_u)


def eight_gaussians(radius: float = 0.8, std: float = 0.05) -> GaussianMixture:
    """Eight equal Gaussians on a circle in 2-D, one class per component (the standard toy set, scaled to [-1, 1])."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, torch.full((8,), std), labels=torch.arange(8))

