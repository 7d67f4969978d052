"""Time conventions: float64 round trips and agreement with diffusers' own schedules and formulas."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from fastdiff.errors import InputError
from fastdiff.schedules import (
    BETA_SCHEDULES,
    FlowSchedule,
    VPSchedule,
    add_noise,
    dynamic_shift_mu,
    flow_time_to_sigma,
    schedule_from_config,
    shift_flow_time,
    sigma_to_flow_time,
    stretch_to_terminal,
    time_shift,
    undo_time_shift,
    unshift_flow_time,
    vp_timesteps,
)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_alphas_cumprod_equal_diffusers(beta_schedule):
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    ours = VPSchedule.from_config(ref.config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.double())


def test_zero_terminal_snr_matches_euler():
    ref = EulerDiscreteScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    ours = VPSchedule.from_config(ref.config)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=0)
    assert math.isfinite(ours.sigma_max) and ours.sigma_max > 4000


def test_trained_betas():
    betas = torch.linspace(1e-4, 0.05, 50).tolist()
    ref = DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    assert torch.equal(schedule_from_config(ref.config).alphas_cumprod, ref.alphas_cumprod.double())


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_matches_diffusers(beta_schedule):
    ref = DDPMScheduler(beta_schedule=beta_schedule)
    ours = VPSchedule.from_config(ref.config)
    x0, eps = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    expected = ref.add_noise(x0, eps, t)
    got = add_noise(ours, x0.double(), eps.double(), ours.t_to_sigma(t.double()))
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)


def test_vp_round_trips_float64():
    sched = VPSchedule.from_config(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    t = torch.cat([torch.rand(10_000, dtype=torch.float64) * 999, torch.arange(1000, dtype=torch.float64)])
    assert (sched.sigma_to_t(sched.t_to_sigma(t)) - t).abs().max() < 1e-10
    sigma = torch.exp(torch.empty(10_000, dtype=torch.float64).uniform_(math.log(sched.sigma_min), math.log(sched.sigma_max)))
    assert ((sched.t_to_sigma(sched.sigma_to_t(sigma)) - sigma).abs() / sigma).max() < 1e-10


def test_vp_sigmas_at_integer_timesteps_match_euler():
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    ref.set_timesteps(13)
    ours = VPSchedule.from_config(ref.config)
    torch.testing.assert_close(ours.t_to_sigma(ref.timesteps.double()).float(), ref.sigmas[:-1], rtol=1e-6, atol=0)


def test_fractional_sigma_to_t_matches_diffusers_karras_grid():
    """diffusers' `_sigma_to_t` (log-sigma interpolation) gives the timesteps of its Karras grid."""
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    ref.set_timesteps(17)
    ours = VPSchedule.from_config(ref.config)
    torch.testing.assert_close(ours.sigma_to_t(ref.sigmas[:-1].double()).float(), ref.timesteps, atol=2e-3, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 999, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timestep_spacing_matches_ddim(spacing, n, offset):
    if spacing == "leading" and offset and n > 500:
        pytest.skip("offset pushes the top timestep past 999")
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    assert torch.equal(vp_timesteps(1000, n, spacing, offset), ref.timesteps)  # diffusers offsets `leading` only


def test_flow_round_trips_float64():
    t = torch.rand(10_000, dtype=torch.float64) * 0.999
    assert (sigma_to_flow_time(flow_time_to_sigma(t)) - t).abs().max() < 1e-10
    assert sigma_to_flow_time(flow_time_to_sigma(torch.tensor(1.0, dtype=torch.float64))) == 1.0
    sched = FlowSchedule(1000)
    ts = torch.rand(1000, dtype=torch.float64) * 999
    assert (sched.sigma_to_t(sched.t_to_sigma(ts)) - ts).abs().max() < 1e-9
    for shift in (0.5, 1.0, 3.0):
        assert (unshift_flow_time(shift_flow_time(t, shift), shift) - t).abs().max() < 1e-10
    for kind in ("exponential", "linear"):
        for power in (1.0, 2.0):
            back = undo_time_shift(time_shift(t[1:], 0.7, kind, power), 0.7, kind, power)
            assert (back - t[1:]).abs().max() < 1e-10


def test_flow_shift_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(shift_flow_time(unshifted, 3.0).float(), ref.sigmas, rtol=1e-6, atol=1e-7)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    mu = dynamic_shift_mu(1024)
    torch.testing.assert_close(time_shift(t, mu), ref.time_shift(mu, 1.0, t))


def test_dynamic_shift_mu_matches_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (256, 1024, 4096, 7000):
        assert dynamic_shift_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)


def test_flow_add_noise_matches_scale_noise():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i in (1, 4, 9):
        t = ref.timesteps[i : i + 1]
        expected = ref.scale_noise(x0, t, eps)
        sigma = flow_time_to_sigma(ref.sigmas[i].double())
        torch.testing.assert_close(add_noise(FlowSchedule(), x0.double(), eps.double(), sigma).float(), expected)


def test_stretch_to_terminal_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(shift_terminal=0.05)
    t = torch.linspace(1.0, 0.2, 7, dtype=torch.float64)
    stretched = stretch_to_terminal(t, 0.05)
    torch.testing.assert_close(stretched, ref.stretch_shift_to_terminal(t))
    assert stretched[-1] == pytest.approx(0.05) and stretched[0] == 1.0


@pytest.mark.parametrize("ref, mu, tol", [
    (FlowMatchEulerDiscreteScheduler(shift=3.0), {}, 1e-3),  # SD3: 1000, 857.692, 602.151, 8.929
    (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1), {"mu": 0.9}, 1e-3),
    (DPMSolverMultistepScheduler(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
     {}, 0.5),  # DPM-Solver rounds its Karras timesteps; fastdiff keeps the exact fractional ones
])  # fmt: skip
def test_cli_schedule_prints_diffusers_grid(tmp_path, capsys, ref, mu, tol):
    """`fastdiff schedule` prints the timesteps diffusers' own scheduler sets (one grid implementation for all)."""
    from fastdiff.cli import main

    ref.save_config(tmp_path)
    assert main(["schedule", str(tmp_path), "--steps", "5", *(["--mu", str(mu["mu"])] if mu else [])]) == 0
    printed = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines()[1:]]
    ref.set_timesteps(5, **mu)
    assert printed == pytest.approx(ref.timesteps.tolist(), abs=tol)


def test_schedule_from_config_picks_the_family():
    assert isinstance(schedule_from_config(FlowMatchEulerDiscreteScheduler().config), FlowSchedule)
    assert isinstance(schedule_from_config(DDIMScheduler()), VPSchedule)  # a scheduler object works too


def test_bad_input_is_named():
    sched = VPSchedule.from_config(DDPMScheduler().config)
    with pytest.raises(InputError, match="beta_schedule.*'cubic'"):
        VPSchedule.from_config({"beta_schedule": "cubic"})
    with pytest.raises(InputError, match=r"sigma must lie in \[0.01"):
        sched.sigma_to_t(torch.tensor([500.0]))
    with pytest.raises(InputError, match="timestep must lie"):
        sched.t_to_sigma(torch.tensor([1000.0]))
    with pytest.raises(InputError, match="NaN"):
        sched.sigma_to_t(torch.tensor([float("nan")]))
    with pytest.raises(InputError, match="num_inference_steps must be in"):
        vp_timesteps(1000, 0)
    with pytest.raises(InputError, match="timestep_spacing"):
        vp_timesteps(1000, 10, "uniform")
    with pytest.raises(InputError, match="flow time t must lie"):
        flow_time_to_sigma(torch.tensor(1.5))
    with pytest.raises(InputError, match="shift must be"):
        shift_flow_time(torch.tensor(0.5), -1.0)
