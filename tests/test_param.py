"""Prediction-type conversions and preconditioning scalings: round trips, closed forms, diffusers' step formulas."""

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fastdiff.errors import InputError
from fastdiff.param import (
    PREDICTION_TYPES,
    canonical_prediction_type,
    consistency_scalings,
    edm_scalings,
    output_from_x0,
    x0_from_output,
)
from fastdiff.schedules import FlowSchedule, VPSchedule, flow_time_to_sigma


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_round_trip_float64(kind):
    x0, eps = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    alpha, beta = torch.rand(64, 1, dtype=torch.float64) + 0.05, torch.rand(64, 1, dtype=torch.float64) * 3 + 0.01
    x_t = alpha * x0 + beta * eps
    out = output_from_x0(x0, x_t, alpha, beta, kind)
    assert (x0_from_output(out, x_t, alpha, beta, kind) - x0).abs().max() < 1e-10


def test_outputs_are_the_textbook_targets():
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    abar = torch.rand(8, 1, dtype=torch.float64)
    alpha, beta = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + beta * eps
    torch.testing.assert_close(output_from_x0(x0, x_t, alpha, beta, "epsilon"), eps)
    torch.testing.assert_close(output_from_x0(x0, x_t, alpha, beta, "v_prediction"), alpha * eps - beta * x0)
    t = torch.rand(8, 1, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    torch.testing.assert_close(output_from_x0(x0, x_t, 1 - t, t, "flow_prediction"), eps - x0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_equals_euler_in_sigma_space(kind):
    """diffusers' DDIM x0 estimate equals ours, and its deterministic step is Euler on x = x0 + sigma eps."""
    ref = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=kind, clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(10)
    sched = VPSchedule.from_config(ref.config)
    x_t, out = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t, t_prev = ref.timesteps[3], ref.timesteps[4]
    step = ref.step(out.float(), t, x_t.float())
    sigma, sigma_next = sched.t_to_sigma(t.double()), sched.t_to_sigma(t_prev.double())
    alpha = sched.scale(sigma)
    x0 = x0_from_output(out, x_t, alpha, alpha * sigma, kind)
    torch.testing.assert_close(x0.float(), step.pred_original_sample, rtol=1e-4, atol=1e-4)
    x = x_t / alpha  # sigma space
    x_next = x + (sigma_next - sigma) * (x - x0) / sigma  # Euler, dx/dsigma = (x - D) / sigma
    torch.testing.assert_close((sched.scale(sigma_next) * x_next).float(), step.prev_sample, rtol=1e-4, atol=1e-4)


def test_flow_euler_step_equals_euler_in_sigma_space():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    x_t, v = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    i = 2
    expected = ref.step(v.float(), ref.timesteps[i], x_t.float()).prev_sample
    sched = FlowSchedule()
    sigma, sigma_next = flow_time_to_sigma(ref.sigmas[i].double()), flow_time_to_sigma(ref.sigmas[i + 1].double())
    alpha = sched.scale(sigma)
    x0 = x0_from_output(v, x_t, alpha, alpha * sigma, "flow")
    x = x_t / alpha
    x_next = x + (sigma_next - sigma) * (x - x0) / sigma
    torch.testing.assert_close((sched.scale(sigma_next) * x_next).float(), expected, rtol=1e-5, atol=1e-5)


def test_edm_scalings_give_unit_variance_input_and_target():
    """EDM's design (Karras et al. 2022, appendix B.6): Var[c_in x] = 1 and Var[F_target] = 1 for data of std sigma_data."""
    sigma, sd = torch.logspace(-3, 2, 50, dtype=torch.float64), 0.5
    c = edm_scalings(sigma, sd)
    torch.testing.assert_close(c.c_in**2 * (sd**2 + sigma**2), torch.ones_like(sigma))
    target_var = ((1 - c.c_skip) ** 2 * sd**2 + c.c_skip**2 * sigma**2) / c.c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(sigma))
    torch.testing.assert_close(c.c_noise, sigma.log() / 4)


def test_consistency_scalings_boundary_exact_and_match_diffusers():
    sigma_min = 0.002
    for dtype in (torch.float32, torch.float64):
        c = consistency_scalings(torch.tensor([sigma_min], dtype=dtype), sigma_min)
        assert c.c_skip.item() == 1.0 and c.c_out.item() == 0.0
    ref = CMStochasticIterativeScheduler()
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    c_skip, c_out = ref.get_scalings_for_boundary_condition(sigma)
    c = consistency_scalings(sigma, sigma_min=0.002, sigma_data=0.5, noise_scale=1000)
    torch.testing.assert_close(c.c_skip, c_skip)
    torch.testing.assert_close(c.c_out, c_out)
    torch.testing.assert_close(c.c_noise, torch.as_tensor(ref.sigma_to_t(sigma.numpy()), dtype=torch.float64))


def test_prediction_type_names():
    assert canonical_prediction_type("flow_prediction") == "flow"
    assert canonical_prediction_type("v_prediction") == "v_prediction"
    with pytest.raises(InputError, match="unknown prediction_type 'score'.*'epsilon'"):
        canonical_prediction_type("score")
