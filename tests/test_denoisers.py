"""Adapters: the x0 estimate computed by hand from the raw model output equals the adapter's."""

import pytest
import torch
from conftest import tiny_cond_unet, tiny_dit, tiny_flux, tiny_sd3, tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler

from fastdiff.denoisers import CFGDenoiser, DiffusersDenoiser, consistency_precond, edm_precond
from fastdiff.errors import InputError
from fastdiff.oracle import GaussianMixture
from fastdiff.schedules import VPSchedule


def _vp(prediction_type="epsilon"):
    return DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_unet2d_by_hand(kind):
    unet, scheduler = tiny_unet(), _vp(kind)
    den = DiffusersDenoiser.from_config(unet, scheduler.config)
    t = torch.tensor([13.0, 700.0])
    abar = scheduler.alphas_cumprod[t.long()]
    sigma = ((1 - abar) / abar).sqrt()
    x = torch.randn(2, 1, 8, 8) * sigma.view(-1, 1, 1, 1)
    a, b = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x
    out = unet(x_t, t).sample
    expected = {"epsilon": (x_t - b * out) / a, "v_prediction": a * x_t - b * out, "sample": out}[kind]
    torch.testing.assert_close(den(x, sigma), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_unet2d_condition_passes_cond_through():
    unet = tiny_cond_unet()
    den = DiffusersDenoiser.from_config(unet, _vp().config)
    sched = VPSchedule.from_config(_vp().config)
    sigma = sched.t_to_sigma(torch.tensor([250.0]))
    x, ctx = torch.randn(1, 4, 8, 8) * 3, torch.randn(1, 3, 16)
    a = sched.scale(sigma)
    out = unet(a * x, torch.tensor([250.0]), encoder_hidden_states=ctx).sample
    expected = (a * x - a * sigma * out) / a
    torch.testing.assert_close(den(x, sigma, encoder_hidden_states=ctx), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_dit_learned_sigma_keeps_the_mean_half():
    dit = tiny_dit()
    den = DiffusersDenoiser.from_config(dit, _vp().config)
    sched = den.schedule
    sigma = sched.t_to_sigma(torch.tensor([100.0, 900.0]))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 10])
    a = sched.scale(sigma).view(-1, 1, 1, 1)
    eps = dit(hidden_states=a * x, timestep=torch.tensor([100.0, 900.0]), class_labels=y).sample[:, :4]
    expected = (a * x - a * sigma.view(-1, 1, 1, 1) * eps) / a
    torch.testing.assert_close(den(x, sigma, class_labels=y), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_sd3_transformer_flow_prediction():
    model = tiny_sd3()
    den = DiffusersDenoiser.from_config(model, FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert den.prediction_type == "flow"
    t = torch.tensor([0.3, 0.8])
    sigma = t / (1 - t)
    x = torch.randn(2, 4, 8, 8)
    cond = dict(encoder_hidden_states=torch.randn(2, 3, 16), pooled_projections=torch.randn(2, 8))
    x_t = (1 - t).view(-1, 1, 1, 1) * x
    v = model(hidden_states=x_t, timestep=t * 1000, **cond).sample
    torch.testing.assert_close(den(x, sigma, **cond), x_t - t.view(-1, 1, 1, 1) * v, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_flux_transformer_gets_time_in_unit_interval():
    model = tiny_flux()
    den = DiffusersDenoiser.from_config(model, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    t = torch.tensor([0.25, 0.6])
    x = torch.randn(2, 16, 4)  # packed latents (B, tokens, channels)
    cond = dict(
        encoder_hidden_states=torch.randn(2, 3, 16), pooled_projections=torch.randn(2, 8),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3),
    )  # fmt: skip
    x_t = (1 - t).view(-1, 1, 1) * x
    v = model(hidden_states=x_t, timestep=t, **cond).sample
    torch.testing.assert_close(den(x, t / (1 - t), **cond), x_t - t.view(-1, 1, 1) * v, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_from_pipeline_is_the_pipelines_model_by_hand():
    """``from_pipeline`` wraps the pipeline's own UNet and scheduler: at the sigma of training timestep 500,
    ``D(x, sigma) = x - sigma eps(sqrt(abar) x, 500)`` for an epsilon model, a scalar sigma broadcast over the batch."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=_vp())
    den = DiffusersDenoiser.from_pipeline(pipe)
    assert den.model is pipe.unet
    abar = pipe.scheduler.alphas_cumprod[500].double()
    sigma = ((1 - abar) / abar).sqrt()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = pipe.unet(abar.sqrt().float() * x, torch.tensor(500.0)).sample
        out = den(x, torch.tensor(float(sigma)))
    torch.testing.assert_close(out, x - float(sigma) * eps, rtol=1e-4, atol=1e-4)


def test_bad_input_is_named():
    den = DiffusersDenoiser.from_config(tiny_unet(), _vp().config)
    with pytest.raises(InputError, match=r"expects x of shape \(B, 1, H, W\); got \(2, 3, 8, 8\)"):
        den(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(InputError, match="sigma must lie in"):
        den(torch.randn(2, 1, 8, 8), 1e4)
    with pytest.raises(InputError, match="finite and > 0"):
        den(torch.randn(2, 1, 8, 8), float("inf"))
    with pytest.raises(InputError, match=r"shape \(2,\)"):
        den(torch.randn(2, 1, 8, 8), torch.ones(3))
    with pytest.raises(InputError, match="unknown prediction_type"):
        DiffusersDenoiser.from_config(tiny_unet(), {**_vp().config, "prediction_type": "score"})


class _Counting(torch.nn.Module):
    def __init__(self, den):
        super().__init__()
        self.den, self.calls = den, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.den(x, sigma, **cond)


@torch.no_grad()
def test_cfg_one_batched_call_equals_two_calls():
    unet = tiny_unet(num_class_embeds=11)
    den = _Counting(DiffusersDenoiser.from_config(unet, _vp().config))
    cfg = CFGDenoiser(den, uncond={"class_labels": torch.tensor([10])}, guidance_scale=4.0)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 1.0, 5.0]), torch.tensor([1, 2, 3])
    guided = cfg(x, sigma, class_labels=y)
    assert den.calls == 1
    d_c, d_u = den(x, sigma, class_labels=y), den(x, sigma, class_labels=torch.full((3,), 10))
    torch.testing.assert_close(guided, d_u + 4.0 * (d_c - d_u), rtol=1e-4, atol=1e-5)
    den.calls = 0
    torch.testing.assert_close(cfg(x, sigma, guidance_scale=1.0, class_labels=y), d_c)
    assert den.calls == 1
    with pytest.raises(InputError, match="no unconditional value for 'cond.encoder_hidden_states'"):
        cfg(x, sigma, encoder_hidden_states=torch.randn(3, 2, 4))


def test_cfg_on_the_oracle_sharpens_toward_the_class():
    gmm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), 0.3, labels=torch.tensor([0, 1]))
    cfg = CFGDenoiser(gmm, uncond={"class_labels": torch.tensor([2])})
    x, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1])
    d1, d3 = cfg(x, 1.0, class_labels=y), cfg(x, 1.0, guidance_scale=3.0, class_labels=y)
    assert d3[0, 0] > d1[0, 0] > 0


class _Linear(torch.nn.Module):
    """A raw network F(x, c_noise) = W x + c_noise, to check preconditioning by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x, c_noise):
        return self.w * x + c_noise.view(-1, *([1] * (x.ndim - 1)))


def test_edm_precond_by_hand():
    den = edm_precond(_Linear(), sigma_data=0.5)
    x, sigma = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    s = sigma.view(-1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    expected = c_skip * x + c_out * (0.7 * c_in * x + (sigma.log() / 4).view(-1, 1))
    torch.testing.assert_close(den(x, sigma), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_boundary_condition_is_exact(dtype):
    net = tiny_unet().to(dtype)
    f = consistency_precond(net, sigma_min=0.002)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(f(x, 0.002), x)
        assert not torch.allclose(f(x, 0.5), x)

