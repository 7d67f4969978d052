"""Consistency objectives: the curriculum and level sampling against the papers' numbers, the robust losses in
closed form, loss terms, which parameters get gradients, the boundary conditions, and loading students back into
diffusers pipelines with diffusers' own consistency schedulers."""

import math

import pytest
import torch
from conftest import tiny_unet

from fastdiff.errors import InputError
from fastdiff.objectives.consistency import (
    ConsistencyDistillation,
    ConsistencyTraining,
    ict_num_levels,
    karras_levels,
    lct_cauchy_c,
    lognormal_level_probs,
    non_scaling_layernorm,
    ot_pairing,
)
from fastdiff.objectives.losses import cauchy, ict_huber_c, pseudo_huber


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.arange(n) % 3, "seeds": torch.arange(n) + 100}


def test_curriculum_and_level_probabilities_match_ict():
    assert [ict_num_levels(k, 8000) for k in (0, 999, 1000, 2000, 7000, 7999)] == [11, 11, 21, 41, 1281, 1281]
    levels = karras_levels(11, 0.002, 80.0)
    assert levels[0] == pytest.approx(0.002) and levels[-1] == pytest.approx(80.0) and bool((levels.diff() > 0).all())
    torch.testing.assert_close(levels[[1, 2, 3, 5]], torch.tensor([0.0167, 0.0851, 0.318, 2.52], dtype=torch.float64), rtol=6e-3, atol=0)
    p = lognormal_level_probs(levels)  # iCT's worked example (reference notes, N = 11)
    torch.testing.assert_close(p[:5], torch.tensor([0.063, 0.182, 0.246, 0.213, 0.142], dtype=torch.float64), atol=1.5e-3, rtol=0)
    weights = 1 / levels.diff()
    assert weights[0].item() == pytest.approx(67.9, rel=5e-3) and weights[4].item() == pytest.approx(0.645, rel=5e-3)
    assert lct_cauchy_c(11) == 0.0346 and lct_cauchy_c(21) == pytest.approx(0.0136, rel=1e-2)


def test_robust_losses_closed_form():
    a, b = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert ict_huber_c(784) == pytest.approx(0.0151, rel=1e-2)
    torch.testing.assert_close(pseudo_huber(a, b, 0.0), torch.full((2,), 1.0))  # whole-sample L2 norm sqrt(4 * 0.25)
    torch.testing.assert_close(pseudo_huber(a, b, 3.0), torch.full((2,), math.sqrt(1 + 9) - 3))
    torch.testing.assert_close(cauchy(a, b, 0.5), torch.full((2,), math.log1p(0.25 / 0.5)))


def test_ot_pairing_is_the_optimal_permutation():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    noise = x.flip(0) + 0.01
    paired = ot_pairing(x, noise)
    assert sorted(paired.sum(1).tolist()) == sorted(noise.sum(1).tolist())  # a permutation
    torch.testing.assert_close(paired, x + 0.01)


@pytest.mark.parametrize("kind", ["ict", "ilct"])
def test_consistency_training_terms_gradients_boundary(kind):
    extra = dict(loss="cauchy", diffusion_weight=5.0, ot=True) if kind == "ilct" else {}
    obj = ConsistencyTraining(tiny_unet(num_class_embeds=4), num_classes=3, total_steps=100, **extra)
    out = obj(_batch(), "student", step=0)
    assert set(out.terms) == ({"consistency", "diffusion"} if kind == "ilct" else {"consistency"})
    assert out.logs["num_levels"] == 11 and torch.isfinite(out.total)
    out.total.backward()
    assert all(p.grad is not None for p in obj.parameters_for("student"))
    x = _batch()["x"]
    torch.testing.assert_close(obj.student(x, torch.tensor(0.002), class_labels=torch.zeros(6, dtype=torch.long)), x, rtol=0, atol=0)
    again = obj(_batch(), "student", step=0)  # same seeds, same loss: all randomness comes from the per-sample seeds
    assert again.total.item() == pytest.approx(out.total.item(), rel=1e-6)


def test_consistency_distillation_terms_gradients_boundary_target():
    from diffusers import DDPMScheduler

    from fastdiff.schedules import VPSchedule

    teacher = tiny_unet(num_class_embeds=4)
    schedule = VPSchedule.from_config(DDPMScheduler(prediction_type="v_prediction").config)
    obj = ConsistencyDistillation(teacher, schedule, "v_prediction", 3, guidance_scale=2.0)
    out = obj(_batch(), "student", step=0)
    assert set(out.terms) == {"distillation"}
    out.total.backward()
    assert all(p.grad is not None for p in obj.net.parameters())
    assert all(p.grad is None for p in obj.teacher.parameters()) and all(p.grad is None for p in obj.target.parameters())
    x = _batch()["x"]
    zero = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(obj.consistency_fn(obj.net, x, zero, {"class_labels": zero}), x, rtol=0, atol=0)  # f(x, 0) = x
    with torch.no_grad():
        next(obj.net.parameters()).add_(1.0)
    before = next(obj.target.parameters()).clone()
    obj.after_step("student")
    torch.testing.assert_close(next(obj.target.parameters()) - before, 0.05 * (next(obj.net.parameters()) - before))
    with pytest.raises(InputError, match="must divide"):
        ConsistencyDistillation(teacher, schedule, "v_prediction", 3, num_ddim_timesteps=7)


def test_non_scaling_layernorm():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.LayerNorm(4, elementwise_affine=False))
    assert non_scaling_layernorm(m) == 1
    assert not m[1].weight.requires_grad and m[1].bias.requires_grad and bool((m[1].weight == 1).all())


def test_cm_student_samples_the_same_in_diffusers_pipeline():
    """A saved iCT student in a pipeline with diffusers' CMStochasticIterativeScheduler gives the functional sampler's
    1-step images; a CD student runs with LCMScheduler."""
    from diffusers import CMStochasticIterativeScheduler, DDPMScheduler

    from fastdiff.denoisers import consistency_precond
    from fastdiff.distill import _lcm_scheduler, student_pipeline
    from fastdiff.samplers import sample_consistency

    net = tiny_unet(num_class_embeds=4)
    pipe = student_pipeline(net, CMStochasticIterativeScheduler(clip_denoised=False))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe(class_labels=[0, 1], num_inference_steps=1, generator=gens, output_type="latent").images
    x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]) * 80.0
    ours = sample_consistency(consistency_precond(net, noise_scale=1000.0), x, torch.tensor([80.0, 0.0]), {"class_labels": torch.tensor([0, 1])})
    torch.testing.assert_close(images, ours, rtol=1e-4, atol=1e-4)
    lcm = student_pipeline(tiny_unet(num_class_embeds=4), _lcm_scheduler(dict(DDPMScheduler(prediction_type="v_prediction").config), 50))
    out = lcm(class_labels=[0, 1], num_inference_steps=2, generator=gens, output_type="latent").images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_lcm_lora_objective_trains_only_the_adapter():
    from conftest import tiny_cond_unet
    from diffusers import DDPMScheduler

    from fastdiff.objectives.consistency import TextConditioner
    from fastdiff.schedules import VPSchedule

    unet = tiny_cond_unet()
    reference = {k: v.clone() for k, v in unet.state_dict().items()}
    cond = TextConditioner(torch.randn(3, 5, 16), torch.zeros(5, 16))
    obj = ConsistencyDistillation(unet, VPSchedule.from_config(DDPMScheduler().config), "epsilon", cond, guidance_scale=6.0,
                                  guidance_max=16.0, target_ema=0.0, lora_rank=4)  # fmt: skip
    batch = {"x": torch.randn(2, 4, 8, 8), "labels": torch.tensor([0, 2]), "seeds": torch.tensor([1, 2])}
    out = obj(batch, "student", 0)
    assert 7 <= out.logs["mean_w"] <= 16
    out.total.backward()
    trained = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trained and all("lora" in n for n in trained)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with obj._teacher() as teacher:  # adapter off: the original UNet exactly
        off = teacher(x, t, emb).sample
    fresh = tiny_cond_unet()
    fresh.load_state_dict(reference)
    torch.testing.assert_close(off, fresh(x, t, emb).sample)
    assert not torch.allclose(unet(x, t, emb).sample, off)  # adapter on again afterwards
