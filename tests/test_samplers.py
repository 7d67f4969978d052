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
        (S.sample_nt_plms, 80, {"beta": 0.8}, 0.8, 1.2),  # Nesterov: first order as well
        (S.sample_ghvb, 80, {"beta": 0.8, "order": 1}, 0.85, 1.1),
        (S.sample_ghvb, 40, {"beta": 0.5, "order": 2}, 1.7, 2.2),
        (S.sample_hb_dpmpp_2m, 80, {"beta": 0.8}, 0.6, 1.2),
    ],
)
def test_convergence_order(problem, fn, n, kw, low, high):
    assert low < _order(problem, fn, n, **kw) < high


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_variable_ab_weights_are_exact_adams_bashforth(k):
    from fastdiff.samplers.pndm import _AB, variable_ab_weights

    assert variable_ab_weights(tuple(float(j) for j in range(k)), -1.0) == pytest.approx(_AB[k], abs=1e-12)  # uniform grid
    levels, s_next = (2.0, 2.7, 3.9, 6.5)[:k], 1.2  # newest first, unequal steps
    c, h = variable_ab_weights(levels, s_next), s_next - levels[0]
    for deg in range(k):  # the step integrates every polynomial of degree < k exactly
        exact = (s_next ** (deg + 1) - levels[0] ** (deg + 1)) / (deg + 1)
        assert h * sum(cj * s**deg for cj, s in zip(c, levels)) == pytest.approx(exact, rel=1e-12)


def test_variable_step_ipndm_keeps_the_local_order_on_uneven_steps(problem):
    """One fourth-order step from exact states on unevenly spaced sigmas (a Karras or optimised grid's situation):
    the fixed Adams-Bashforth weights only integrate constants exactly there (local error O(h^2)); iPNDM-v's variable-step
    weights keep the local error O(h^5). (Globally both start with an Euler step, whose O(h^2) shows only for fine grids.)"""
    from fastdiff.samplers.pndm import ipndm_rule, ipndm_v_rule

    gmm, x, _ = problem
    offsets, ahead = (0.0, 1.0, 2.5, 4.5), -0.7  # newest first, in units of h

    def local_error(rule, h, variable):
        levels = [1.0 + h * a for a in offsets]
        states = [gmm.ode_solve(x, SIGMA_MAX, s) for s in levels]
        eps = tuple((xs - gmm(xs, s)) / s for xs, s in zip(states[1:], levels[1:]))
        state = (eps, tuple(levels[1:])) if variable else eps
        s0, s1 = torch.tensor(levels[0], dtype=torch.float64), torch.tensor(1.0 + h * ahead, dtype=torch.float64)
        out, _ = rule(states[0], gmm(states[0], s0), s0, s1, state, order=4)
        return (out - gmm.ode_solve(x, SIGMA_MAX, float(s1))).norm(dim=1).max().item()

    def slope(rule, variable):
        return math.log2(local_error(rule, 0.1, variable) / local_error(rule, 0.05, variable))

    fixed, variable = slope(ipndm_rule, False), slope(ipndm_v_rule, True)
    assert 1.7 < fixed < 2.5 and variable > 4.5, (fixed, variable)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_beta_one_is_the_base_solver(problem, order):
    gmm, x, _ = problem
    sigmas = torch.linspace(SIGMA_MAX, SIGMA_MIN, 13, dtype=torch.float64)
    base = S.sample_ipndm(gmm, x, sigmas, order=order)
    torch.testing.assert_close(S.sample_ghvb(gmm, x, sigmas, order=order, beta=1.0), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(S.sample_hb_plms(gmm, x, sigmas, order=order, beta=1.0), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(S.sample_nt_plms(gmm, x, sigmas, order=order, beta=1.0), base, atol=1e-6, rtol=0)
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



def test_flow_sigmas_are_flow_match_eulers_grid():
    """The functional flow grid is FlowMatchEuler's (SD3's shift 3 at 4 steps: t = 1, 0.858, 0.602, 0.0089), in sigma
    space t / (1 - t), pure noise read at FLOW_T_MAX, then 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastdiff.samplers.grids import FLOW_T_MAX

    for config, kw in (({"shift": 3.0}, {}), ({"use_dynamic_shifting": True}, {"mu": 0.8}), ({"shift_terminal": 0.05}, {})):
        ref = FlowMatchEulerDiscreteScheduler(**config)
        ref.set_timesteps(4, **kw)
        t = ref.sigmas.double().clamp(max=FLOW_T_MAX)
        torch.testing.assert_close(S.flow_sigmas(4, **config, **kw), t / (1 - t), rtol=1e-6, atol=0)
    with pytest.raises(InputError, match="unknown flow grid option"):
        S.flow_sigmas(4, shfit=3.0)


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
        ours = S.sample_fpndm(gmm, x, sigmas, schedule=sched)  # half steps t - delta/2, delta = 100
        assert calls == n + 9
    torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-5)  # at sigma = 0 native and sigma space coincide


# -- one rule per method ---------------------------------------------------------------------------------------------


def test_fpndm_half_step_is_the_timestep_midpoint(problem):
    """Paper eq. 10 (official code: `(t + t_next) / 2`): PRK's 2nd and 3rd evaluations are at the midpoint of the
    model's timesteps -- of sigma itself without a schedule (EDM), of the VP timesteps with one."""
    from fastdiff.schedules import VPSchedule

    gmm, x, _ = problem
    seen = []
    record = lambda info: seen.append(info.sigma.item())  # noqa: E731
    sigmas = S.karras_sigmas(6, 0.05, 3.0)
    S.sample_fpndm(gmm, x, sigmas, callback=record)
    assert seen[1] == seen[2] == pytest.approx(((sigmas[0] + sigmas[1]) / 2).item(), rel=1e-12)
    vp = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    grid = S.vp_sigmas(vp, 6, "trailing")  # timesteps 999, 832, ... : first half step at t = 915.5
    seen.clear()
    S.sample_fpndm(gmm, x, grid, callback=record, schedule=vp)
    assert vp.sigma_to_t(torch.tensor(seen[1:3], dtype=torch.float64)).tolist() == pytest.approx([915.5, 915.5], abs=1e-9)


def _official_hb_dpmpp_2m(den, x_t, sigma_bar, beta):
    """sWizad/momentum-diffusion's `MomentumDPMSolverMultistepScheduler` (DPM-Solver++(2M), midpoint) inside
    diffusers-0.18's `DPMSolverMultistepScheduler.step` with `lower_order_final` and fewer than 15 steps, transcribed in
    VP variables (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) on a grid of sigma_bar = sigma_t / alpha_t."""
    alpha = 1 / (1 + sigma_bar**2).sqrt()
    sigma = sigma_bar * alpha
    lam = torch.log(alpha / sigma)
    model_outputs, vel, n = [], None, len(sigma_bar) - 1
    for i in range(n):
        model_outputs.append(den(x_t / alpha[i], sigma_bar[i]))  # convert_model_output: the data prediction
        m0, h = model_outputs[-1], lam[i + 1] - lam[i]
        if i == 0 or i == n - 1:  # lower_order_nums < 1 / lower_order_final: first-order update, no momentum
            x_t = (sigma[i + 1] / sigma[i]) * x_t - alpha[i + 1] * (torch.exp(-h) - 1.0) * m0
            continue
        r0 = (lam[i] - lam[i - 1]) / h
        D0, D1 = m0, (1.0 / r0) * (m0 - model_outputs[-2])
        diff = D0 + 0.5 * D1
        vel = diff if vel is None else (1 - beta) * vel + beta * diff
        x_t = (sigma[i + 1] / sigma[i]) * x_t - alpha[i + 1] * (torch.exp(-h) - 1.0) * vel
    return x_t


@pytest.mark.parametrize("beta", [0.8, 0.5])
def test_hb_dpmpp_2m_is_the_official_rule(problem, beta):
    """Momentum only on the second-order steps: v starts at D0 + D1/2 on step 2; the first step and the lower-order final
    step are plain first-order DPM-Solver++ steps (the official code)."""
    gmm, _, _ = problem
    sigma_bar = S.karras_sigmas(8, 0.03, 14.6)
    x_t = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # pure noise at alpha ~ 0.07
    expected = _official_hb_dpmpp_2m(gmm, x_t, sigma_bar, beta)
    ours = S.sample_hb_dpmpp_2m(gmm, x_t * (1 + sigma_bar[0] ** 2).sqrt(), sigma_bar, beta=beta)
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_pndm_family_multistep_is_one_rule(problem, monkeypatch):
    """iPNDM and the multistep steps of PLMS, S-PNDM and F-PNDM are all `pndm.ipndm_rule` (after 0, 1, 1, 3 warm-up
    steps)."""
    from fastdiff.samplers import momentum, pndm

    gmm, x, _ = problem
    calls, rule = [], pndm.ipndm_rule
    monkeypatch.setattr(pndm, "ipndm_rule", lambda *a, **k: calls.append(1) or rule(*a, **k))
    sigmas = S.karras_sigmas(8, 0.05, 3.0)
    for fn, steps in ((S.sample_ipndm, 8), (S.sample_plms, 7), (S.sample_spndm, 7), (S.sample_fpndm, 5)):
        calls.clear()
        fn(gmm, x, sigmas)
        assert len(calls) == steps, fn.__name__
    assert not hasattr(momentum, "ipndm_rule")


def _official_nt_directions(grads, order, beta):
    """The official PLMSWithNTScheduler's directions for a sequence of noise estimates, written out here: ets keeps the
    last ``order``; AdamBmixer(order, ets, 1) is Adams-Bashforth; vel starts at the first grads (momentum_scheduler.py
    L58-L71, L138-L143)."""
    ab = {1: lambda e: e[-1], 2: lambda e: (3 * e[-1] - e[-2]) / 2, 3: lambda e: (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12,
          4: lambda e: (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24}  # fmt: skip
    ets, vel, out = [], None, []
    for g in grads:
        vel = g if vel is None else vel
        ets = (ets + [g])[-order:]
        prime = ab[min(order, len(ets))](ets)
        vel = (1 - beta) * vel + beta * prime
        out.append((1 - beta) * vel + beta * prime)
    return out


def test_nt_plms_matches_the_official_update():
    """With sigma_next = sigma - 1 and x = 0, the rule's step is x - direction: compare directions step by step."""
    from fastdiff.samplers.momentum import nt_plms_rule

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(6)]
    expected = _official_nt_directions(grads, 4, 0.7)
    state, sigma = None, torch.tensor(10.0, dtype=torch.float64)
    for eps, direction in zip(grads, expected):
        x = torch.zeros(3, 2, dtype=torch.float64)
        x_next, state = nt_plms_rule(x, x - sigma * eps, sigma, sigma - 1, state, order=4, beta=0.7)  # denoised with eps = grads
        torch.testing.assert_close(-x_next, direction)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [5, 10])
def test_unipc_equals_diffusers_unipc(order, steps):
    """beta = 1: diffusers' UniPCMultistepScheduler (bh2, data prediction, corrector, lower-order final step) driven by
    the oracle, and fastdiff's rule on its sigmas, land on the same samples."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    gmm = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64), 0.4)
    cfg = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    unipc = UniPCMultistepScheduler.from_config(cfg, solver_order=order)
    unipc.set_timesteps(steps)
    sigmas = unipc.sigmas.double()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = x * (1 + sigmas[0] ** 2).sqrt()  # the VP input read in sigma space
    for i, t in enumerate(unipc.timesteps):
        a = 1 / (1 + sigmas[i] ** 2).sqrt()
        eps = (x / a - gmm(x / a, sigmas[i])) / sigmas[i]
        x = unipc.step(eps, t, x).prev_sample
    torch.testing.assert_close(S.sample_unipc(gmm, start, sigmas, order=order), x, rtol=1e-5, atol=1e-6)


def test_unipc_heavy_ball_damps_and_is_first_order(problem):
    gmm, x, _ = problem
    karras = S.karras_sigmas(9, 0.05, 3.0)
    assert not torch.allclose(S.sample_unipc(gmm, x, karras, beta=0.8), S.sample_unipc(gmm, x, karras))
    assert 0.7 < _order(problem, S.sample_unipc, 80, beta=0.8) < 1.2  # heavy ball: first order (measured 0.82)
    assert 2.4 < _order(problem, S.sample_unipc, 40) < 3.2  # UniPC-2 + UniC: order 3 (measured 2.73)
    with pytest.raises(InputError, match="UniPC order must be 1 or 2"):
        S.sample_unipc(gmm, x, karras, order=3)
