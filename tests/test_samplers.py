"""Functional samplers against the exact Gaussian-mixture oracle: convergence orders, reductions, NFE, gradients."""

import math

import pytest
import torch

from fastdiff import samplers as S
from fastdiff.errors import InputError
from fastdiff.oracle import GaussianMixture
from fastdiff.testing import CountingDenoiser

SIGMA_MAX, SIGMA_MIN = 3.0, 0.1


@pytest.fixture(scope="module")
def problem():
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2]], dtype=torch.float64)
    gmm = GaussianMixture(means, torch.tensor([0.4, 0.5, 0.3]), weights=torch.tensor([0.5, 0.3, 0.2]))
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * SIGMA_MAX
    return gmm, x, gmm.ode_solve(x, SIGMA_MAX, SIGMA_MIN)


def _order(problem, fn, n, **kw):
    """Empirical order log2(e_n / e_2n) on grids uniform in sigma, against the reference ODE solution."""
    gmm, x, ref = problem

    def err(steps):
        sigmas = torch.linspace(SIGMA_MAX, SIGMA_MIN, steps + 1, dtype=torch.float64)
        return (fn(gmm, x.clone(), sigmas, **kw) - ref).norm(dim=1).max().item()

    return math.log2(err(n) / err(2 * n))


@pytest.mark.parametrize(
    "fn, n, kw, low, high",
    [
        (S.sample_euler, 40, {}, 0.9, 1.1),
        (S.sample_heun, 20, {}, 1.9, 2.1),
        (S.sample_dpmpp_2m, 40, {}, 1.85, 2.2),
        (S.sample_spndm, 40, {}, 1.7, 2.1),  # pseudo second order
        (S.sample_plms, 20, {}, 3.3, 4.4),  # AB4 after a third-order warm-up
        (S.sample_fpndm, 20, {}, 3.3, 4.4),
        (S.sample_hb_plms, 80, {"beta": 0.8}, 0.8, 1.15),  # heavy ball: first order (paper, Theorem 1)
        (S.sample_ghvb, 80, {"beta": 0.8, "order": 1}, 0.85, 1.1),
        (S.sample_ghvb, 40, {"beta": 0.5, "order": 2}, 1.7, 2.2),
        (S.sample_hb_dpmpp_2m, 80, {"beta": 0.8}, 0.6, 1.2),
    ],
)
def test_convergence_order(problem, fn, n, kw, low, high):
    assert low < _order(problem, fn, n, **kw) < high


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_beta_one_is_the_base_solver(problem, order):
    gmm, x, _ = problem
    sigmas = torch.linspace(SIGMA_MAX, SIGMA_MIN, 13, dtype=torch.float64)
    base = S.sample_ipndm(gmm, x, sigmas, order=order)
    torch.testing.assert_close(S.sample_ghvb(gmm, x, sigmas, order=order, beta=1.0), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(S.sample_hb_plms(gmm, x, sigmas, order=order, beta=1.0), base, atol=1e-6, rtol=0)
    karras = S.karras_sigmas(9, 0.05, 3.0)
    torch.testing.assert_close(S.sample_hb_dpmpp_2m(gmm, x, karras, beta=1.0), S.sample_dpmpp_2m(gmm, x, karras), atol=1e-6, rtol=0)
    assert not torch.allclose(S.sample_ghvb(gmm, x, sigmas, order=order, beta=0.7), base)


@pytest.mark.parametrize(
    "fn, nfe", [(S.sample_euler, 10), (S.sample_heun, 19), (S.sample_plms, 11), (S.sample_spndm, 11), (S.sample_fpndm, 19),
                (S.sample_dpmpp_2m, 10), (S.sample_ghvb, 10)],
)  # fmt: skip
def test_model_evaluations(problem, fn, nfe):
    gmm, x, _ = problem
    den = CountingDenoiser(gmm)
    fn(den, x, S.karras_sigmas(10, 0.05, 3.0))
    assert den.calls == nfe


def test_gradients_flow_through_a_two_step_rollout():
    net = torch.nn.Linear(2, 2)
    den = lambda x, sigma: net(x / (1 + sigma**2).sqrt())  # noqa: E731
    x = torch.randn(4, 2, requires_grad=True)
    for fn in (S.sample_dpmpp_2m, S.sample_ghvb, S.sample_plms):
        net.zero_grad()
        out = fn(den, x, S.karras_sigmas(2, 0.1, 2.0))
        out.square().sum().backward()
        assert net.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_grids():
    k = S.karras_sigmas(5, 0.002, 80.0)
    assert k[0] == pytest.approx(80.0) and k[-2] == pytest.approx(0.002) and k[-1] == 0 and len(k) == 6
    from fastdiff.schedules import VPSchedule, vp_timesteps

    sched = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    torch.testing.assert_close(S.vp_sigmas(sched, 4)[:-1], sched.t_to_sigma(vp_timesteps(1000, 4, "trailing").double()))
    f = S.flow_sigmas(4, shift=3.0)
    assert (f[1:] < f[:-1]).all() and f[-1] == 0 and torch.isfinite(f).all()


def test_bad_input(problem):
    gmm, x, _ = problem
    with pytest.raises(InputError, match="strictly descending"):
        S.sample_euler(gmm, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(InputError, match="positive"):
        S.sample_heun(gmm, x, torch.tensor([1.0, -0.5, 0.0]))
    with pytest.raises(InputError, match="f-pndm needs a 1-D sigma grid with at least 4 steps"):
        S.sample_fpndm(gmm, x, S.karras_sigmas(3, 0.1, 2.0))
    with pytest.raises(InputError, match=r"beta must be in \(0, 1\]"):
        S.sample_ghvb(gmm, x, S.karras_sigmas(3, 0.1, 2.0), beta=1.5)
    with pytest.raises(InputError, match="order must be 1, 2, 3 or 4"):
        S.sample_hb_plms(gmm, x, S.karras_sigmas(3, 0.1, 2.0), order=5)
    assert S.split_order(3.8) == (4, pytest.approx(0.8)) and S.split_order(2.0) == (2, 1.0)


# -- students ------------------------------------------------------------------------------------------------------


def _gaussian_jump(mu: float, var: float):
    """The exact probability-flow jump of N(mu, var): x_s - mu = (x_t - mu) sqrt((s^2 + var) / (t^2 + var))."""
    return lambda x, t, s: mu + (x - mu) * ((s**2 + var) / (t**2 + var)).sqrt()


def test_ctm_deterministic_is_exact_for_exact_jumps():
    g = _gaussian_jump(0.3, 0.25)
    x = torch.randn(8, 2, dtype=torch.float64) * 5
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0], dtype=torch.float64)
    expected = g(x, torch.tensor(5.0, dtype=torch.float64), torch.tensor(0.002, dtype=torch.float64))
    torch.testing.assert_close(S.sample_ctm(g, x, sigmas, gamma=0.0), expected)


def test_ctm_gamma_one_is_consistency_multistep():
    g = _gaussian_jump(0.0, 1.0)
    f = lambda x, t: g(x, t, torch.tensor(0.002, dtype=torch.float64))  # noqa: E731
    x = torch.randn(8, 2, dtype=torch.float64) * 5
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0], dtype=torch.float64)
    a = S.sample_ctm(g, x, sigmas, gamma=1.0, generator=torch.Generator().manual_seed(1))
    b = S.sample_consistency(f, x, sigmas, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_stochastic_multistep_eta_zero_is_ddim(problem):
    gmm, x, _ = problem
    sigmas = S.karras_sigmas(6, 0.05, 3.0)
    torch.testing.assert_close(S.sample_stochastic_multistep(gmm, x, sigmas, eta=0.0), S.sample_euler(gmm, x, sigmas))
    with pytest.raises(InputError, match=r"eta must be in \[0, 1\]"):
        S.sample_stochastic_multistep(gmm, x, sigmas, eta=2.0)


# -- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_prk", [True, False])
def test_pndm_parity_with_diffusers(problem, skip_prk):
    """diffusers' PNDMScheduler on the same denoiser. Its quirks, reproduced by the grid we hand our sampler: with
    `skip_prk_steps=True` the second timestep is repeated (the pseudo improved Euler warm-up: N steps cost N + 1 model
    calls); the step after timestep 0 goes to `final_alpha_cumprod` (1 here, so sigma = 0)."""
    from diffusers import PNDMScheduler

    from fastdiff.schedules import VPSchedule

    gmm, _, _ = problem
    ref = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=skip_prk,
                        set_alpha_to_one=True)  # the last step then lands on sigma = 0 (False: a zero-length step)
    n = 10
    ref.set_timesteps(n)
    sched = VPSchedule.from_config(ref.config)
    delta = ref.config.num_train_timesteps // n

    def eps_model(x_t, t):
        sigma = sched.t_to_sigma(torch.tensor(float(t), dtype=torch.float64))
        x = x_t / sched.scale(sigma)
        return (x - gmm(x, sigma)) / sigma

    base_t = torch.arange(n).flip(0) * delta  # the N distinct "leading" timesteps
    x_native = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    calls, y = 0, x_native.clone()
    for t in ref.timesteps:
        y = ref.step(eps_model(y, t), t, y).prev_sample
        calls += 1
    sigmas = torch.cat([sched.t_to_sigma(base_t.double()), torch.zeros(1, dtype=torch.float64)])
    x = x_native / sched.scale(sigmas[0])
    if skip_prk:
        ours = S.sample_plms(gmm, x, sigmas)
        assert calls == n + 1
    else:
        mid = lambda s, s_next: sched.t_to_sigma(sched.sigma_to_t(s).round() - delta // 2)  # noqa: E731
        ours = S.sample_fpndm(gmm, x, sigmas, sigma_mid=mid)
        assert calls == n + 9
    torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-5)  # at sigma = 0 native and sigma space coincide
