"""Consistency objectives: the curriculum and level sampling against the papers' numbers, the robust losses in
closed form, the iCT / iLCT / LCM losses against hand computations with a network whose consistency function is
known in closed form (``F(x, t) = a x``), stop-gradient targets, shared dropout masks, label dropout, unconditional
training, the boundary conditions, and loading students back into diffusers pipelines with diffusers' own
consistency schedulers."""

import math

import pytest
import torch
from conftest import tiny_unet

from fastdiff.errors import InputError
from fastdiff.objectives import (
    ConsistencyDistillation,
    ConsistencyTraining,
    ict_num_levels,
    karras_levels,
    lct_cauchy_c,
    lct_diffusion_mask,
    lognormal_level_probs,
    non_scaling_layernorm,
    ot_pairing,
)
from fastdiff.objectives.losses import cauchy, distance, ict_huber_c, mse, pseudo_huber, pseudo_huber_elementwise
from fastdiff.training.ema import ema_update_

SIGMA_DATA, SIGMA_MIN = 0.5, 0.002


def _batch(n=6, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(n, *shape, generator=g) * 2 - 1, "labels": torch.arange(n) % 3, "seeds": torch.arange(n) + 100}


class _Linear(torch.nn.Module):
    """``F(x, t) = a x``: a network whose consistency function is known in closed form; records each call."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.a * x


def _cm_by_hand(x_in, c_noise, levels, a):
    """The iCT consistency function by hand (float64) from one recorded call of ``_Linear``: the level is the grid
    point whose ``250 ln sigma`` is ``c_noise``; ``x_sigma = x_in / c_in``;
    ``f = c_skip x_sigma + c_out a x_in``, c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),
    c_out = (sigma - sigma_min) s_d / sqrt(sigma^2 + s_d^2), c_in = 1 / sqrt(sigma^2 + s_d^2). Returns f, sigma, level."""
    level = (c_noise.double()[:, None] * 4 / 1000 - levels.log()[None]).abs().argmin(1)
    s = levels[level].view(-1, 1, 1, 1)
    c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
    c_skip = SIGMA_DATA**2 / ((s - SIGMA_MIN) ** 2 + SIGMA_DATA**2)
    c_out = (s - SIGMA_MIN) * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
    x_in = x_in.double()
    return c_skip * x_in / c_in + c_out * a * x_in, levels[level], level


def test_curriculum_and_level_probabilities_match_ict():
    assert [ict_num_levels(k, 8000) for k in (0, 999, 1000, 2000, 7000, 7999)] == [11, 11, 21, 41, 1281, 1281]
    levels = karras_levels(11, 0.002, 80.0)
    assert levels[0] == pytest.approx(0.002) and levels[-1] == pytest.approx(80.0) and bool((levels.diff() > 0).all())
    torch.testing.assert_close(levels[[1, 2, 3, 5]], torch.tensor([0.0167, 0.0851, 0.318, 2.52], dtype=torch.float64), rtol=6e-3, atol=0)
    p = lognormal_level_probs(levels)  # iCT's worked example (reference notes, N = 11)
    torch.testing.assert_close(p[:5], torch.tensor([0.063, 0.182, 0.246, 0.213, 0.142], dtype=torch.float64), atol=1.5e-3, rtol=0)
    weights = 1 / levels.diff()
    assert weights[0].item() == pytest.approx(67.9, rel=5e-3) and weights[4].item() == pytest.approx(0.645, rel=5e-3)


def test_robust_losses_closed_form():
    """iCT's pseudo-Huber on the whole-sample norm and diffusers' LCM element-wise one are different losses."""
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([0.3, 0.4, 0.0, 0.0]).reshape(1, 1, 2, 2).expand(2, 1, 2, 2)  # ||a - b|| = 0.5, sum |a - b| = 0.7
    assert ict_huber_c(784) == pytest.approx(0.0151, rel=1e-2)
    torch.testing.assert_close(pseudo_huber(a, b, 0.0), torch.full((2,), 0.5))
    torch.testing.assert_close(pseudo_huber(a, b, 1.2), torch.full((2,), math.sqrt(0.25 + 1.44) - 1.2))  # = 0.1
    torch.testing.assert_close(pseudo_huber_elementwise(a, b, 0.0), torch.full((2,), 0.7 / 4))  # mean |a - b|
    by_hand = (math.sqrt(0.09 + 1e-6) - 1e-3 + math.sqrt(0.16 + 1e-6) - 1e-3 + 0 + 0) / 4  # c = 0.001 (LCM scripts)
    torch.testing.assert_close(pseudo_huber_elementwise(a, b, 1e-3), torch.full((2,), by_hand))
    torch.testing.assert_close(mse(a, b), torch.full((2,), 0.25 / 4))
    torch.testing.assert_close(cauchy(a, b, 0.5), torch.full((2,), math.log1p(0.0625 / 0.5)))
    torch.testing.assert_close(distance("pseudo_huber_elementwise", a, b, 1e-3), torch.full((2,), by_hand))
    with pytest.raises(InputError, match="unknown loss 'huber'"):
        distance("huber", a, b, 1e-3)


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
    x = _batch()["x"]
    zero = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(obj.consistency_fn(obj.net, x, zero, {"class_labels": zero}), x, rtol=0, atol=0)  # f(x, 0) = x
    with torch.no_grad():
        next(obj.net.parameters()).add_(1.0)
    before = next(obj.target.parameters()).clone()
    (declared,) = obj.ema_targets("student")  # the trainer moves it with its one EMA implementation
    assert declared.target is obj.target and declared.source is obj.net and declared.decay == 0.95
    ema_update_(declared.target, declared.source, declared.decay)
    torch.testing.assert_close(next(obj.target.parameters()) - before, 0.05 * (next(obj.net.parameters()) - before))
    with pytest.raises(InputError, match="must divide"):
        ConsistencyDistillation(teacher, schedule, "v_prediction", 3, num_ddim_timesteps=7)


@pytest.mark.parametrize("n, step, last", [(11, 0, 1), (21, 1000, 4), (81, 3000, 19)])
def test_ilct_diffusion_term_is_5x_the_mean_over_the_lowest_noise_quarter(n, step, last):
    """By hand: LCT keeps the student's index m >= int(0.75 N) = 8, 15, 60 on its grid indexed from sigma_max; our pair
    i (student at ascending level i + 1) is m = N - 2 - i, so i <= 1, 4, 19. The term is 5 x the mean over THOSE
    samples of (1 / sigma^2 + 1 / sigma_d^2) MSE(f, x0), sigma the student's level."""
    i = torch.arange(n - 1)
    assert lct_diffusion_mask(i, n).tolist() == (i <= last).tolist()
    net, batch = _Linear(0.3), _batch(128, (1, 2, 2))
    obj = ConsistencyTraining(net, 3, 8000, loss="cauchy", diffusion_weight=5.0, p_uncond=0.0)
    out = obj(batch, "student", step)
    assert out.logs["num_levels"] == n
    (x_in, c_noise), _ = net.calls
    f, sigma, level = _cm_by_hand(x_in, c_noise, karras_levels(n, SIGMA_MIN, 80.0), 0.3)
    pair = level - 1
    assert {last, last + 1} <= set(pair.tolist())  # the last selected pair and the next noisier one both occur
    per_sample = (1 / sigma**2 + 1 / SIGMA_DATA**2) * (f - batch["x"].double()).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(out.terms["diffusion"].double(), 5 * per_sample[pair <= last].mean(), rtol=1e-5, atol=0)


def test_ilct_diffusion_term_is_zero_not_nan_without_selected_samples():
    obj = ConsistencyTraining(_Linear(0.3), 3, 8000, loss="cauchy", diffusion_weight=5.0, p_uncond=0.0)
    for offset in range(100):  # a batch of two whose pairs are all noisier than the quarter (p ~ 0.57 per batch)
        obj.net.calls.clear()
        batch = {**_batch(2, (1, 2, 2)), "seeds": torch.arange(2) + 1000 + 2 * offset}
        out = obj(batch, "student", 0)
        if bool((_cm_by_hand(*obj.net.calls[0], karras_levels(11, SIGMA_MIN, 80.0), 0.3)[2] - 1 > 1).all()):
            break
    else:
        pytest.fail("no batch without selected samples found")
    assert out.terms["diffusion"].item() == 0.0 and torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(obj.net.a.grad)


@pytest.mark.parametrize("shape", [(1, 2, 2), (3, 4, 4)])
def test_ilct_first_stage_cauchy_c_is_00054_sqrt_d(shape):
    """c = 0.00054 sqrt(d) on the first stage (d = 4: 0.00108; d = 48: 0.003741), then exp(-1.15 ln(N - 1) - 0.85);
    the consistency term is mean((1 / (sigma_{i+1} - sigma_i)) log(1 + MSE(f_student, f_target) / (2 c^2)))."""
    c = {(1, 2, 2): 0.00108, (3, 4, 4): 0.0037412}[shape]
    assert lct_cauchy_c(11, math.prod(shape)) == pytest.approx(c, rel=1e-4)
    assert lct_cauchy_c(11, 4 * 32 * 32) == pytest.approx(0.03456, rel=1e-4)  # LCT's SD latents
    assert lct_cauchy_c(21, math.prod(shape)) == pytest.approx(math.exp(-0.85) * 20**-1.15)  # 0.0136, any d
    net, batch = _Linear(0.3), _batch(16, shape)
    out = ConsistencyTraining(net, 3, 8000, loss="cauchy", p_uncond=0.0)(batch, "student", 0)
    assert out.logs["c"] == pytest.approx(c, rel=1e-4)
    levels = karras_levels(11, SIGMA_MIN, 80.0)
    (f_s, sigma_s, _), (f_t, sigma_t, _) = (_cm_by_hand(x_in, t, levels, 0.3) for x_in, t in net.calls)
    by_hand = torch.log1p((f_s - f_t).flatten(1).pow(2).mean(1) / (2 * c * c)) / (sigma_s - sigma_t)
    torch.testing.assert_close(out.terms["consistency"].double(), by_hand.mean(), rtol=1e-4, atol=0)


def test_ict_target_is_stop_gradient():
    """The gradient is that of the loss with the target explicitly detached, not of the loss through both passes."""
    net, batch = _Linear(0.3), _batch(16, (1, 2, 2))
    ConsistencyTraining(net, 3, 8000, p_uncond=0.0)(batch, "student", 0).total.backward()
    levels, c = karras_levels(11, SIGMA_MIN, 80.0), 0.00054 * 2
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def loss(a_target):
        (f_s, sigma_s, _), (f_t, sigma_t, _) = (_cm_by_hand(x, t, levels, w) for (x, t), w in zip(net.calls, (a, a_target)))
        return ((((f_s - f_t).flatten(1).pow(2).sum(1) + c * c).sqrt() - c) / (sigma_s - sigma_t)).mean()

    (detached,), (through,) = torch.autograd.grad(loss(a.detach()), a), torch.autograd.grad(loss(a), a)
    assert not torch.isclose(detached, through, rtol=0.05)  # the two differ, so the check below can fail
    torch.testing.assert_close(net.a.grad.double(), detached, rtol=1e-4, atol=0)


def test_lcm_target_is_stop_gradient():
    """LCM(-LoRA) with the student as its own target (target_ema=0): by hand with F = a x (epsilon prediction),
    f(x, t) = c_skip x + c_out (x - sqrt(1 - abar_t) a x) / sqrt(abar_t), c_skip = 1/4 / ((10t)^2 + 1/4),
    c_out = 10t / sqrt((10t)^2 + 1/4); L2 loss; the gradient is that of the loss with the target detached."""
    from diffusers import DDPMScheduler

    from fastdiff.schedules import VPSchedule

    schedule = VPSchedule.from_config(DDPMScheduler().config)
    obj = ConsistencyDistillation(_Linear(0.3), schedule, "epsilon", 3, target_ema=0.0)
    obj(_batch(16, (1, 2, 2)), "student", 0).total.backward()
    abar = schedule.alphas_cumprod.double()

    def f(x, t, a):
        x, ab, k = x.double(), abar[t].view(-1, 1, 1, 1), 10 * t.double().view(-1, 1, 1, 1)
        return 0.25 / (k**2 + 0.25) * x + k / (k**2 + 0.25).sqrt() * (x - (1 - ab).sqrt() * a * x) / ab.sqrt()

    (x_t, t), (x_prev, t_prev) = obj.net.calls  # student, then target (at t_prev clamped to 0: f(x, 0) = x)
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def loss(a_target):
        return (f(x_t, t, a) - f(x_prev, t_prev, a_target)).flatten(1).pow(2).mean(1).mean()

    (detached,), (through,) = torch.autograd.grad(loss(a.detach()), a), torch.autograd.grad(loss(a), a)
    assert not torch.isclose(detached, through, rtol=0.05)
    torch.testing.assert_close(obj.net.a.grad.double(), detached, rtol=1e-4, atol=0)


def test_ict_student_and_target_share_dropout_masks():
    from diffusers import UNet2DModel

    net = UNet2DModel.from_config(tiny_unet(num_class_embeds=4).config, dropout=0.5).train()
    masks = []
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    ConsistencyTraining(net, 3, 100)(_batch(), "student", 0)
    student, target = masks[: len(masks) // 2], masks[len(masks) // 2 :]
    assert student and 0.4 < torch.cat([m.flatten() for m in student]).float().mean() < 0.6  # dropout is on
    assert all(torch.equal(s, t) for s, t in zip(student, target, strict=True))


def test_cd_label_dropout_is_unconditional_for_teacher_student_and_target():
    """With every label dropped the loss is the one of a batch whose labels are all the null label: the teacher's
    guided prediction D_u + w (D_c - D_u) is then the unconditional D_u, which the unconditional student learns."""
    from diffusers import DDPMScheduler

    from fastdiff.schedules import VPSchedule

    teacher = tiny_unet(num_class_embeds=4)  # random class embeddings: labels change every prediction
    schedule = VPSchedule.from_config(DDPMScheduler(prediction_type="v_prediction").config)

    def loss(labels, p_uncond):
        obj = ConsistencyDistillation(teacher, schedule, "v_prediction", 3, guidance_scale=3.0, p_uncond=p_uncond)
        return obj({**_batch(), "labels": labels}, "student", 0).total

    dropped, null = loss(torch.arange(6) % 3, 1.0), loss(torch.full((6,), 3), 0.0)
    assert not torch.isclose(loss(torch.arange(6) % 3, 0.0), null, rtol=1e-3)  # labels matter when kept
    torch.testing.assert_close(dropped, null, rtol=1e-6, atol=0)


def test_consistency_objectives_train_without_labels():
    """Unconditional: a network without class embedding (diffusers raises if it gets labels) and no labels in the batch."""
    from diffusers import DDPMScheduler

    from fastdiff.schedules import VPSchedule

    batch = {k: v for k, v in _batch().items() if k != "labels"}
    ct = ConsistencyTraining(tiny_unet(), None, 100, p_uncond=0.0)
    out = ct(batch, "student", 0)
    out.total.backward()
    assert torch.isfinite(out.total) and all(p.grad is not None for p in ct.parameters_for("student"))
    schedule = VPSchedule.from_config(DDPMScheduler(prediction_type="v_prediction").config)
    assert torch.isfinite(ConsistencyDistillation(tiny_unet(), schedule, "v_prediction", None)(batch, "student", 0).total)
    with pytest.raises(InputError, match="unconditional; set p_uncond=0"):
        ConsistencyTraining(tiny_unet(), None, 100, p_uncond=0.1)
    with pytest.raises(InputError, match="needs a conditional teacher"):
        ConsistencyDistillation(tiny_unet(), schedule, "v_prediction", None, guidance_scale=2.0)
    with pytest.raises(InputError, match="needs 'labels'"):
        ConsistencyTraining(tiny_unet(num_class_embeds=4), 3, 100)(batch, "student", 0)


def test_non_scaling_layernorm():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.LayerNorm(4, elementwise_affine=False))
    assert non_scaling_layernorm(m) == 1
    assert not m[1].weight.requires_grad and m[1].bias.requires_grad and bool((m[1].weight == 1).all())


def test_cm_student_samples_the_same_in_diffusers_pipeline():
    """A saved iCT student in a pipeline with diffusers' CMStochasticIterativeScheduler gives the functional sampler's
    1-step images; a CD student runs with LCMScheduler."""
    from diffusers import CMStochasticIterativeScheduler, DDPMScheduler

    from fastdiff.denoisers import consistency_precond
    from fastdiff.training.distill import _lcm_scheduler, student_pipeline
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

    from fastdiff.objectives import TextConditioner
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


def test_v_target_denoising_loss_is_zero_for_an_oracle_model():
    """With the exact v-target as model output the loss vanishes: the target and the noising agree."""
    from fastdiff.objectives import denoising_loss
    from fastdiff.schedules import VPSchedule

    schedule = VPSchedule.from_config({"beta_schedule": "linear"})
    x0, noise, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.tensor([0, 10, 500, 999])

    class Oracle(torch.nn.Module):  # knows x0; returns v = alpha eps - beta x0 from x_t = alpha x0 + beta eps
        def forward(self, x, t, class_labels=None):
            abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    assert denoising_loss(Oracle(), schedule, x0, t, noise, {}, "v_prediction") < 1e-8
    assert denoising_loss(Oracle(), schedule, x0, t, noise, {}, "epsilon") > 1e-2  # another target: the loss sees it


def test_denoising_objective_draws_from_the_seeds_and_drops_labels():
    """Teachers on the trainer: the loss of a batch is the mean of its halves' (timesteps, noise and label dropout
    come from each sample's seed, not the global RNG), dropped labels become the null class, only the net trains."""
    from diffusers import DDPMScheduler

    from fastdiff.objectives import DenoisingObjective
    from fastdiff.schedules import VPSchedule

    net = tiny_unet(num_class_embeds=4)
    obj = DenoisingObjective(net, VPSchedule.from_config(DDPMScheduler().config), "v_prediction", 3, p_uncond=0.5)
    batch = _batch(8)
    full = obj(batch, "denoiser", 0)
    assert set(full.terms) == {"denoising"} and obj.phases == ("denoiser",)
    halves = [obj({k: v[i : i + 4] for k, v in batch.items()}, "denoiser", 0).total for i in (0, 4)]
    torch.testing.assert_close(full.total, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=0)
    seen = []
    net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    obj(batch, "denoiser", 0).total.backward()
    assert 3 in seen[0].tolist() and (seen[0] != 3).any()  # some dropped to the null class, some kept
    assert all(p.grad is not None for p in net.parameters()) and list(obj.parameters_for("denoiser")) == list(net.parameters())



@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_min_snr_loss_is_min_snr_gamma_times_the_x0_error(prediction_type):
    """Min-SNR-gamma (Hang et al. 2023): whatever the output, the weighted loss is the mean over samples of
    min(SNR_t, gamma) * mean |x0 - x0_hat|^2, with x0_hat recovered from a (wrong) model's output by hand."""
    from fastdiff.objectives import denoising_loss
    from fastdiff.param import x0_from_output
    from fastdiff.schedules import VPSchedule

    schedule = VPSchedule.from_config({"beta_schedule": "linear"})
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g), torch.tensor([0, 10, 500, 999])
    model = lambda x, t, class_labels=None: 0.7 * x + 0.1  # noqa: E731

    abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    alpha, beta = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + beta * noise
    x0_hat = x0_from_output(model(x_t, t), x_t, alpha, beta, prediction_type)
    snr = (abar / (1 - abar)).flatten()
    expected = (snr.clamp(max=5.0) * (x0 - x0_hat).pow(2).flatten(1).mean(1)).mean()
    got = denoising_loss(model, schedule, x0, t, noise, {}, prediction_type, weighting="min_snr", snr_gamma=5.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert snr.min() < 5.0 < snr.max()  # the clip acts on some samples and not on others
