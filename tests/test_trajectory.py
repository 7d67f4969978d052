"""CTM: the two-time adapter is the teacher at initialisation and leaves with its hook; the CTM loss vanishes for the
exact flow map of a Gaussian mixture (and not for a one-step Euler map); the jump and index draws follow the paper;
the adaptive weight is VQGAN's ratio; CTMScheduler steps with sample_ctm's rule; LPIPS reads its backbone offline."""

import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from fastdiff.denoisers import DiffusersDenoiser
from fastdiff.errors import InputError
from fastdiff.objectives.base import per_sample_rand
from fastdiff.objectives.trajectory import ConsistencyTrajectory, adaptive_weight, ctm_indices, ctm_loss, jump_lengths
from fastdiff.oracle import GaussianMixture
from fastdiff.samplers import sample_ctm
from fastdiff.samplers.consistency import ctm_jump
from fastdiff.schedules import VPSchedule
from fastdiff.two_time import TwoTimeModel

CONFIG = DDPMScheduler(prediction_type="v_prediction").config
SCHEDULE = VPSchedule.from_config(CONFIG)


def _objective(**kw) -> ConsistencyTrajectory:
    torch.manual_seed(0)
    return ConsistencyTrajectory(tiny_unet(num_class_embeds=4), SCHEDULE, "v_prediction", 3, **{"num_scales": 8, "max_jump": 4, **kw})


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.arange(n) % 3, "seeds": torch.arange(n) + 100}


def test_two_time_model_starts_as_the_teacher_for_every_s_and_its_hook_comes_off():
    teacher = tiny_unet(num_class_embeds=4)
    model = TwoTimeModel.from_base(teacher)
    den_t, den_g = DiffusersDenoiser(teacher, SCHEDULE, "v_prediction"), DiffusersDenoiser(model, SCHEDULE, "v_prediction")
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    sigma = torch.tensor([0.5, 2.0, 10.0, 80.0])
    with torch.no_grad():
        for s in (sigma, sigma * 0.1, torch.full((4,), 0.02)):
            assert torch.equal(den_g(x, sigma, class_labels=labels, s_timestep=SCHEDULE.sigma_to_t(s)), den_t(x, sigma, class_labels=labels))
        torch.nn.init.normal_(model.s_embedding[2].weight, std=0.5)  # as if trained: s now matters
        a = den_g(x, sigma, class_labels=labels, s_timestep=SCHEDULE.sigma_to_t(sigma * 0.1))
        b = den_g(x, sigma, class_labels=labels, s_timestep=SCHEDULE.sigma_to_t(sigma))
        assert (a - b).abs().max() > 1e-3
        model.remove_hook()  # the base model as it was, whatever s
        assert torch.equal(den_g(x, sigma, class_labels=labels, s_timestep=SCHEDULE.sigma_to_t(sigma * 0.1)), den_t(x, sigma, class_labels=labels))
    with pytest.raises(InputError, match="needs a diffusers UNet2DModel or UNet2DConditionModel"):
        from conftest import tiny_dit

        TwoTimeModel.from_base(tiny_dit())


def _flow_map(gmm: GaussianMixture):
    """The exact CTM jump G*(x, t, s) of the mixture: its probability-flow ODE solved from t to s, per sample."""
    def jump(x, t, s):
        return torch.stack([x[i] if t[i] == s[i] else gmm.ode_solve(x[i : i + 1], float(t[i]), float(s[i]))[0] for i in range(len(x))])
    return jump


def test_ctm_loss_vanishes_for_the_exact_flow_map_and_not_for_an_euler_jump():
    """With G = the exact flow map and x_u the exact teacher solution, both branches land on the same ODE
    solution at sigma_min: the loss is zero to the ODE tolerance. A one-step Euler (DDIM) jump is not
    trajectory-consistent, so its loss is far from zero."""
    gmm = GaussianMixture(torch.tensor([[-1.0, 0.5], [0.8, -0.3]], dtype=torch.float64), torch.tensor([0.2, 0.3], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    t, u, s = torch.tensor([5.0, 2.0, 1.0]).double(), torch.tensor([2.0, 0.9, 0.5]).double(), torch.tensor([0.6, 0.3, 0.5]).double()
    sigma_min = torch.full((3,), 0.01, dtype=torch.float64)
    x_t = gmm.sample(3, generator=g) + t[:, None] * torch.randn(3, 2, generator=g, dtype=torch.float64)
    exact = _flow_map(gmm)
    x_u = exact(x_t, t, u)
    sq = lambda a, b: (a - b).pow(2).sum(1)  # noqa: E731
    loss, x_est = ctm_loss(exact, exact, x_t, x_u, t, u, s, sigma_min, sq)
    assert loss.max() < 1e-12
    torch.testing.assert_close(x_est, exact(x_t, t, sigma_min), rtol=1e-7, atol=1e-8)

    def euler(x, a, b):
        return ctm_jump(x, gmm(x, a), a, b)
    euler_loss, _ = ctm_loss(euler, euler, x_t, x_u, t, u, s, sigma_min, sq)
    assert euler_loss.mean() > 1e-3  # 1e9 times the exact map's


def test_jump_lengths_follow_k_and_indices_keep_s_below_u_below_t():
    ks = torch.tensor([jump_lengths(step, 4) for step in range(4000)])
    freq = torch.bincount(ks, minlength=5)[1:].double() / len(ks)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.025, rtol=0)
    assert jump_lengths(7, 4) == jump_lengths(7, 4)  # a step's k is the same in every process
    seeds = torch.arange(2000)
    for k in (1, 3, 7):
        n, nu, m = ctm_indices(seeds, k, 8)
        assert (n >= 0).all() and (nu == n + k).all() and (m >= nu).all() and (m <= 7).all()
        assert n.max() == 7 - k and (m == 7).any() and (m == nu).any()
    with pytest.raises(InputError, match="must be in 1..7"):
        ctm_indices(seeds, 8, 8)


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped():
    w = torch.nn.Parameter(torch.randn(3, 3))
    main, other = 3.0 * w.sum(), 0.5 * (w**2).sum()
    expected = (3.0 * math.sqrt(9)) / ((w.detach()).norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(main, other, w, 0.0, 1e4), expected)
    assert adaptive_weight(main, other, w, 0.0, 0.5) == 0.5 and not adaptive_weight(main, other, w, 0, 1e4).requires_grad


def test_objective_steps_both_phases_and_its_grid_is_the_teachers_range():
    obj = _objective(discriminator=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)), gan_weight=None)
    assert obj.phases == ("student", "discriminator")
    assert obj.sigmas[0].item() == pytest.approx(SCHEDULE.sigma_max, rel=1e-5) and obj.sigmas[-1].item() == pytest.approx(SCHEDULE.sigma_min, rel=1e-5)
    out = obj(_batch(), "student", 0)
    assert set(out.terms) == {"ctm", "dsm", "gan"} and all(torch.isfinite(v) for v in out.terms.values())
    out.total.backward()
    assert obj.net.s_embedding[2].weight.grad is not None and all(p.grad is None for p in obj.teacher.parameters())
    assert all(p.grad is None for p in obj.target.parameters())
    d = obj(_batch(), "discriminator", 0)
    assert set(d.terms) == {"gan"} and d.total.requires_grad
    # the DSM coin is per sample: a sample's noise level does not depend on the batch it is in
    seeds = torch.arange(10)
    torch.testing.assert_close(obj.dsm_sigmas(seeds)[3:5], obj.dsm_sigmas(seeds[3:5]))
    assert (per_sample_rand(seeds, 7) < 0.5).any() and (per_sample_rand(seeds, 7) >= 0.5).any()


def test_objective_refuses_bad_settings():
    with pytest.raises(InputError, match="max_jump=8 must be in 1..num_scales-1 = 7"):
        _objective(max_jump=8)
    with pytest.raises(InputError, match="needs a discriminator and a gan_weight"):
        _objective(gan_weight=None)


def test_ctm_scheduler_steps_with_sample_ctms_rule():
    """The pipeline with CTMScheduler and the functional sample_ctm on the same two-time network give the same
    samples (gamma = 0: to float tolerance); gamma sets the jump targets by Algorithm 2's formula."""
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline
    from fastdiff.samplers.diffusers import CTMScheduler

    torch.manual_seed(0)
    net = TwoTimeModel.from_base(tiny_unet(num_class_embeds=4))
    torch.nn.init.normal_(net.s_embedding[2].weight, std=0.3)
    scheduler = CTMScheduler.from_config(CONFIG)
    pipe = ClassConditionalPipeline(scheduler=scheduler, unet=net)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 1, 2])
    out = pipe(class_labels=labels, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    den = DiffusersDenoiser(net, SCHEDULE, "v_prediction")

    def jump(x, t, s, class_labels):
        t, s = t.expand(len(x)), s.expand(len(x))
        return ctm_jump(x, den(x, t, s_timestep=SCHEDULE.sigma_to_t(s), class_labels=class_labels), t, s)

    sigmas = scheduler.sigmas.double()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # the pipeline's noise: N(0, I) at sigma_max, scaled
    with torch.no_grad():
        ours = sample_ctm(jump, (x / SCHEDULE.scale(sigmas[0])).double().float(), sigmas.float(), {"class_labels": labels},
                          sigma_min=SCHEDULE.sigma_min)  # fmt: skip
    torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)
    gamma = CTMScheduler.from_config(CONFIG, gamma=0.6)
    gamma.set_timesteps(3)
    s_min = SCHEDULE.sigma_min
    expected = (1 - 0.36) ** 0.5 * (gamma.sigmas[1:-1].clamp(min=s_min) - s_min) + s_min
    torch.testing.assert_close(gamma.jump_sigmas[:-1].double(), expected.double())
    assert float(gamma.jump_sigmas[-1]) == pytest.approx(s_min)
    with pytest.raises(InputError, match="CTM gamma must be in"):
        CTMScheduler.from_config(CONFIG, gamma=1.5)


def test_ctm_scheduler_refuses_a_model_without_a_second_time():
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline
    from fastdiff.samplers.diffusers import CTMScheduler

    pipe = ClassConditionalPipeline(scheduler=CTMScheduler.from_config(CONFIG), unet=tiny_unet(num_class_embeds=4))
    with pytest.raises(InputError, match="jumps to a second time s, which UNet2DModel does not take"):
        pipe(class_labels=[0], num_inference_steps=1, output_type="latent")


def test_lpips_reads_its_backbone_from_a_local_file_and_names_the_file_to_fetch(tmp_path):
    import torchvision

    from fastdiff.eval.perceptual import VGG16_URL, perceptual_distance

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    lpips = perceptual_distance("lpips", None, tmp_path / "vgg16.pth")
    assert torch.equal(getattr(lpips.lpips.net.slice3, "10").weight, vgg.features[10].weight)
    a, b = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(lpips(a, a), torch.zeros(2)) and (lpips(a, b) > 0).all()
    with pytest.raises(InputError, match=VGG16_URL.replace(".", r"\.")):
        perceptual_distance("lpips", None, None)
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="not torchvision's VGG-16 state dict: features.0.weight expected"):
        perceptual_distance("lpips", None, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="has none"):
        perceptual_distance("features", "folder")


def test_discriminator_phase_spends_no_model_calls_before_the_gan_starts():
    obj = _objective(discriminator=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)), gan_weight=None, gan_start=5)
    calls = []
    jump = obj.jump
    obj.jump = lambda *a: calls.append(1) or jump(*a)
    out = obj(_batch(), "discriminator", 0)
    assert calls == [] and out.total.item() == 0 and "gan" not in obj(_batch(), "student", 0).terms
    calls.clear()
    assert obj(_batch(), "discriminator", 5).total.item() > 0 and len(calls) == 2  # the fake: online jump, then target jump
