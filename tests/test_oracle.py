"""The exact Gaussian-mixture oracle: closed forms, Monte Carlo, autograd and ODE convergence."""

import math

import pytest
import torch

from fastdiff.errors import InputError
from fastdiff.oracle import GaussianMixture, eight_gaussians


def _mixture():
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2]], dtype=torch.float64)
    stds = torch.tensor([[0.3, 0.2], [0.25, 0.4], [0.5, 0.15]], dtype=torch.float64)  # diagonal
    return GaussianMixture(means, stds, weights=torch.tensor([0.5, 0.3, 0.2]), labels=torch.tensor([0, 1, 1]))


def test_single_gaussian_closed_form():
    mu, s = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64), 0.7
    gmm = GaussianMixture(mu, s)
    x, sigma = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64)
    s2, v = s**2, sigma.view(-1, 1) ** 2
    torch.testing.assert_close(gmm(x, sigma), (s2 * x + v * mu) / (s2 + v))


def test_denoiser_equals_monte_carlo_posterior_mean():
    """Self-normalised importance sampling of E[x0 | x] from prior draws, within 4 standard errors."""
    gmm, g = _mixture(), torch.Generator().manual_seed(1)
    sigma = 0.6
    query = torch.tensor([[0.2, 0.1]], dtype=torch.float64)
    x0 = gmm.sample(400_000, generator=g).reshape(-1, 2)
    log_w = -((query - x0) ** 2).sum(1) / (2 * sigma**2)
    w = torch.softmax(log_w, 0)
    estimate = (w[:, None] * x0).sum(0)
    std_err = ((w[:, None] ** 2) * (x0 - estimate) ** 2).sum(0).sqrt()
    assert ((gmm(query, sigma)[0] - estimate).abs() < 4 * std_err).all(), (gmm(query, sigma), estimate, std_err)


def test_score_is_the_gradient_of_log_density():
    gmm = _mixture()
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    gmm.log_prob(x, 0.4).sum().backward()
    torch.testing.assert_close(gmm.score(x.detach(), 0.4), x.grad)


def test_exact_moments_match_samples():
    gmm = _mixture()
    x = gmm.sample(200_000, generator=torch.Generator().manual_seed(0)).reshape(-1, 2)
    torch.testing.assert_close(x.mean(0), gmm.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gmm.covariance(), atol=0.01, rtol=0)
    report = gmm.evaluate(x[:20_000])
    assert report["mode_tv"] < 0.03 and report["mean_error"] < 0.02
    collapsed = gmm.means[:1].expand(1000, 2)
    assert gmm.evaluate(collapsed)["mode_tv"] > 0.45  # all mass on one mode: TV = 1 - 0.5


def test_class_labels_restrict_components():
    gmm = _mixture()
    x = torch.zeros(2, 2, dtype=torch.float64)
    r = gmm.responsibilities(x, 0.5, torch.tensor([0, 1]))
    assert r[0, 1] == 0 and r[0, 2] == 0 and r[1, 0] == 0
    torch.testing.assert_close(gmm.mode_weights(1), torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))
    uncond = gmm(x, 0.5, torch.tensor([2, 2]))  # label num_classes = unconditional
    torch.testing.assert_close(uncond, gmm(x, 0.5))
    with pytest.raises(InputError, match=r"class_labels must be in \[0, 2\]"):
        gmm(x, 0.5, torch.tensor([3, 0]))


def test_ode_solve_single_gaussian_closed_form():
    """x(sigma) - mu = (x(sigma0) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))."""
    mu, s = torch.tensor([[0.5, -1.0]], dtype=torch.float64), 0.4
    gmm = GaussianMixture(mu, s)
    x0 = torch.randn(4, 2, dtype=torch.float64) * 10
    for end in (2.0, 0.0):
        expected = mu + (x0 - mu) * math.sqrt((s**2 + end**2) / (s**2 + 10.0**2))
        torch.testing.assert_close(gmm.ode_solve(x0, 10.0, end), expected, atol=1e-8, rtol=0)


def test_euler_converges_to_the_reference_at_first_order():
    gmm, sigma_max, sigma_min = eight_gaussians(), 5.0, 0.02
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigma_max
    ref = gmm.ode_solve(x, sigma_max, sigma_min)

    def euler(n):
        sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n + 1, dtype=torch.float64)
        y = x.clone()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            y = y + (s_next - s) * (y - gmm(y, s)) / s
        return (y - ref).norm(dim=1).max().item()

    e1000, e2000 = euler(1000), euler(2000)
    assert e2000 < 1e-2
    assert 1.8 < e1000 / e2000 < 2.2  # first order: halving the step halves the error


def test_guided_ode_needs_labels():
    with pytest.raises(InputError, match="needs class_labels"):
        eight_gaussians().ode_solve(torch.zeros(1, 2), 1.0, 0.0, guidance_scale=3.0)
    with pytest.raises(InputError, match="sigma_end < sigma_start"):
        eight_gaussians().ode_solve(torch.zeros(1, 2), 1.0, 2.0)


def test_image_shaped_mixture_is_a_denoiser():
    gmm = GaussianMixture(torch.randn(3, 1, 4, 4), torch.tensor([0.2, 0.3, 0.4]))
    x = torch.randn(5, 1, 4, 4)
    assert gmm(x, torch.full((5,), 0.7)).shape == (5, 1, 4, 4)
    with pytest.raises(InputError, match=r"expected samples of shape \(B, 1, 4, 4\)"):
        gmm(torch.randn(5, 16), 0.7)
    with pytest.raises(InputError, match="stds must be positive"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([0.1, 0.0]))
