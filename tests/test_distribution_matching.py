"""DMD2 and f-distill: the generator gradient against exact scores of Gaussian mixtures, h(r) against f''(r) r^2 by
autograd, a discriminator that recovers a known log density ratio, f = reverse-KL as DMD2 exactly, the official
formulas re-derived by hand on a tiny model, backward simulation, the classifier reading the fake score, and the
trainer running both phases with two time scales."""

import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler, LCMScheduler

from fastdiff.errors import InputError
from fastdiff.objectives.distribution_matching import DistributionMatching, generator_timesteps
from fastdiff.objectives.divergences import (
    F_DIVERGENCES,
    density_ratio,
    dmd_gradient,
    dmd_loss,
    f_weights,
    gan_discriminator_loss,
)
from fastdiff.oracle import GaussianMixture
from fastdiff.schedules import VPSchedule

SCHEDULE = VPSchedule.from_config(DDPMScheduler(prediction_type="v_prediction").config)


def _mixture(shift: float) -> GaussianMixture:
    means = torch.tensor([[-0.6 + shift, 0.2], [0.5, -0.4 + shift], [0.1 + shift, 0.7]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.15, 0.2, 0.1], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def _grad_log_p(gmm: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The score by automatic differentiation of the exact log density (independent of the mixture's denoiser)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    return g


@pytest.mark.parametrize("t", [50, 400, 900])
def test_dmd_gradient_is_the_normalised_score_difference(t):
    """VP marginals at t: x_t = a x0 + b eps, i.e. x_t / a = x0 + (b / a) eps. With exact denoisers of the real
    (p) and fake (q) mixtures, mu_fake - mu_real = (b^2 / a) (grad log q_t - grad log p_t)(x_t), and
    grad_x_t log p_t(x_t) = (1 / a) grad log p_sigma(x_t / a): per sample, to float64 round-off."""
    p, q = _mixture(0.0), _mixture(0.3)
    g = torch.Generator().manual_seed(1)
    abar = float(SCHEDULE.alphas_cumprod[t])
    a, b = math.sqrt(abar), math.sqrt(1 - abar)
    sigma = b / a
    x = q.sample(64, generator=g)  # the generator's samples
    x_t = a * x + b * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mu_real, mu_fake = p(x_t / a, sigma), q(x_t / a, sigma)
    grad = dmd_gradient(x, mu_real, mu_fake)
    score_p, score_q = _grad_log_p(p, x_t / a, sigma) / a, _grad_log_p(q, x_t / a, sigma) / a
    norm = (x - mu_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, (b**2 / a) * (score_q - score_p) / norm, rtol=1e-9, atol=1e-12)
    # the loss delivers it: d/dx of 0.5 MSE(x, sg(x - grad)) = grad / numel
    x_leaf = x.clone().requires_grad_(True)
    dmd_loss(x_leaf, grad).backward()
    torch.testing.assert_close(x_leaf.grad * x.numel(), grad, rtol=1e-12, atol=1e-15)
    # where the fake equals the real distribution, there is nothing to match
    assert dmd_gradient(x, mu_real, p(x_t / a, sigma)).abs().max() == 0


@pytest.mark.parametrize("name", list(F_DIVERGENCES))
def test_h_is_f_second_derivative_times_r_squared(name):
    """h(r) = f''(r) r^2 for every divergence (Table 1 of f-distill), f'' by automatic differentiation."""
    spec = F_DIVERGENCES[name]
    r = torch.tensor([0.1, 0.37, 1.0, 2.5, 19.0], dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(spec.f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(spec.h(r.detach()), d2f * r.detach() ** 2, rtol=1e-10, atol=1e-12)
    assert spec.f(torch.tensor(1.0, dtype=torch.float64)).abs() < 1e-15  # f(1) = 0: a divergence


def test_f_weights_normalisation_and_reverse_kl_is_dmd2():
    g = torch.Generator().manual_seed(0)
    ratio = density_ratio(torch.randn(256, 1, generator=g) * 3)
    t = torch.randint(20, 981, (256,), generator=g)
    assert ratio.min() >= 0.1 and ratio.max() <= 20  # clamped as FastGen
    for name in F_DIVERGENCES:
        w = f_weights(name, ratio, t, (20, 980))
        assert w.mean().item() == pytest.approx(1.0, abs=1e-6) and (w > 0).all()
    assert torch.equal(f_weights("reverse_kl", ratio, t, (20, 980)), torch.ones(256))  # exactly, not to tolerance
    # a ratio constant within each noise-level bin is normalised away: every divergence weighs all samples alike
    binned = 1 + ((t - 20) / 96).floor().clamp(max=9).double()  # bin width (980 - 20) / 10
    for name in F_DIVERGENCES:
        torch.testing.assert_close(f_weights(name, binned, t, (20, 980)), torch.ones(256))
    # forward KL weighs up where the real density dominates: h = r, so the weights are r / mean(r) (no bins)
    torch.testing.assert_close(f_weights("forward_kl", ratio, None), (ratio / ratio.mean()).float())
    x, grad = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert torch.equal(dmd_loss(x, grad, torch.ones(4)), dmd_loss(x, grad))
    with pytest.raises(InputError, match="unknown f-divergence 'kl'"):
        f_weights("kl", ratio)


def test_discriminator_recovers_the_log_density_ratio():
    """A classifier trained with the non-saturating GAN loss on samples of two known mixtures p (real) and q (fake)
    approaches its optimum logit log p(x) - log q(x): on points drawn from both, correlation >= 0.95 and median
    absolute error <= 0.35 nats (where either density has mass: |log ratio| < 4)."""
    p, q = _mixture(0.0), _mixture(0.35)
    torch.manual_seed(0)
    d = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(d.parameters(), 3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(1500):
        real, fake = p.sample(256, generator=g).float(), q.sample(256, generator=g).float()
        loss = gan_discriminator_loss(d(fake), d(real))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.cat([p.sample(1000, generator=g), q.sample(1000, generator=g)])
    truth = p.log_prob(x) - q.log_prob(x)
    keep = truth.abs() < 4
    with torch.no_grad():
        est = d(x.float()).squeeze(1).double()
    corr = torch.corrcoef(torch.stack([est[keep], truth[keep]]))[0, 1]
    assert corr >= 0.95, corr
    assert (est[keep] - truth[keep]).abs().median() <= 0.35


def _objective(**kw) -> DistributionMatching:
    torch.manual_seed(0)
    return DistributionMatching(tiny_unet(num_class_embeds=4), SCHEDULE, "v_prediction", 3, **kw)


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.arange(n) % 3, "seeds": torch.arange(n) + 100}


def _x0(net, x_t, t, labels):
    abar = SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return abar.sqrt() * x_t - (1 - abar).sqrt() * net(x_t, t, class_labels=labels).sample  # v-prediction -> x0


def test_generator_loss_is_the_official_formula_by_hand():
    """The generator phase against DMD2's ``compute_distribution_matching_loss`` written out here: x = G(z, 999);
    x_t = a x + b n at the objective's t; p_real = x - guided teacher x0, p_fake = x - fake x0;
    grad = (p_real - p_fake) / mean|p_real|; loss = 0.5 mse(x, sg(x - grad)). Equal with f = reverse-KL and with the
    generator's gradient the same; another divergence changes the gradient but not the loss's value at grad's scale."""
    obj = _objective(guidance_scale=2.0, gan_generator_weight=0.0)
    with torch.no_grad():
        for p in obj.fake.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a fake score that differs from the teacher
    batch = _batch()
    out = obj(batch, "generator", 0)
    assert set(out.terms) == {"distribution_matching"}
    # by hand, drawing the same per-sample numbers (streams 21: z, 10: t, 11: noise)
    from fastdiff.objectives.base import per_sample_rand, per_sample_randn

    seeds, labels = batch["seeds"], batch["labels"]
    z = per_sample_randn(batch["x"], seeds, 21)
    t999 = torch.full((6,), 999)
    x = _x0(obj.generator, z, t999, labels)
    t = 20 + (per_sample_rand(seeds, 10) * 961).long().clamp(max=960)
    abar = SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x.detach() + (1 - abar).sqrt() * per_sample_randn(x, seeds, 11)
    with torch.no_grad():
        null = torch.full_like(labels, 3)
        real = _x0(obj.teacher, x_t, t, null) + 2.0 * (_x0(obj.teacher, x_t, t, labels) - _x0(obj.teacher, x_t, t, null))
        fake = _x0(obj.fake, x_t, t, labels)
        p_real, p_fake = x - real, x - fake
        grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    loss = 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())
    torch.testing.assert_close(out.terms["distribution_matching"], loss, rtol=1e-5, atol=1e-7)
    mine = torch.autograd.grad(out.total, list(obj.generator.parameters()))
    theirs = torch.autograd.grad(loss, list(obj.generator.parameters()))
    mine, theirs = torch.cat([g.flatten() for g in mine]), torch.cat([g.flatten() for g in theirs])
    torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5 * float(theirs.abs().max()))


def test_critic_phase_and_gan_terms_train_the_right_networks():
    obj = _objective(gan_generator_weight=3e-3, gan_critic_weight=1e-2)
    batch = _batch()
    gen = obj(batch, "generator", 0)
    assert set(gen.terms) == {"distribution_matching", "gan"}
    critic = obj(batch, "critic", 0)
    assert set(critic.terms) == {"fake_denoising", "gan"} and 0 < float(critic.logs["p_real"]) < 1
    critic.total.backward()
    assert all(p.grad is not None for p in obj.head.parameters())
    assert all(p.grad is None for p in obj.generator.parameters()) and all(p.grad is None for p in obj.teacher.parameters())
    assert {id(p) for p in obj.parameters_for("critic")} == {id(p) for p in [*obj.fake.parameters(), *obj.head.parameters()]}
    assert {id(p) for p in obj.parameters_for("generator")} == {id(p) for p in obj.generator.parameters()}


def test_classifier_reads_the_fake_score_not_the_teacher():
    obj = _objective()
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), {"class_labels": torch.tensor([0, 1])}
    before = obj.logits(x, t, cond).detach()
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(obj.logits(x, t, cond).detach(), before, rtol=0, atol=0)
    with torch.no_grad():
        for p in obj.fake.mid_block.parameters():
            p.mul_(1.5)
    assert not torch.allclose(obj.logits(x, t, cond), before)
    obj._tap.remove()  # removable: the fake score computes what the teacher does again
    assert not obj.fake._forward_hooks and not obj.fake.mid_block._forward_hooks


def test_multi_step_generator_backward_simulation_and_lcm_grid():
    """K = 4: timesteps 999, 749, 499, 249 (LCMScheduler's with original_inference_steps=4, so diffusers samples the
    student on its training grid); a sample that drew step k was brought there by k generator steps from pure
    noise, each re-noised with fresh noise to the next timestep."""
    steps = generator_timesteps(1000, 4)
    assert steps.tolist() == [999, 749, 499, 249]
    lcm = LCMScheduler(original_inference_steps=4, timestep_spacing="trailing")
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == steps.tolist()
    obj = _objective(generator_steps=4)
    from fastdiff.objectives.base import per_sample_rand, per_sample_randn

    batch = _batch(8)
    seeds, labels = batch["seeds"], batch["labels"]
    k = (per_sample_rand(seeds, 20) * 4).long()
    assert len(set(k.tolist())) > 1
    got = obj.generate(batch, grad=False)
    for i in range(8):
        one = {key: v[i : i + 1] for key, v in batch.items()}
        x_t = per_sample_randn(one["x"], one["seeds"], 21)
        with torch.no_grad():
            for j in range(int(k[i])):
                x0 = _x0(obj.generator, x_t, steps[j : j + 1], labels[i : i + 1])
                abar = SCHEDULE.alphas_cumprod[steps[j + 1]].float()
                x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * per_sample_randn(x0, one["seeds"], 30 + j)
            expect = _x0(obj.generator, x_t, steps[k[i] : k[i] + 1], labels[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], expect, rtol=1e-5, atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="unknown divergence 'kl'"):
        _objective(divergence="kl")
    with pytest.raises(InputError, match="reads the density ratio off the GAN classifier"):
        _objective(divergence="jensen_shannon", gan_critic_weight=0.0)
    with pytest.raises(InputError, match="generator_steps must be in 1..1000"):
        _objective(generator_steps=0)
    with pytest.raises(InputError, match="dm_range"):
        _objective(dm_range=(0.5, 1.2))


@pytest.mark.parametrize("divergence", ["reverse_kl", "jensen_shannon"])
def test_trainer_runs_both_phases_on_two_time_scales(tmp_path, divergence):
    from fastdiff.training.trainer import OptimConfig, TrainerConfig, train

    obj = _objective(divergence=divergence)
    teacher = [p.clone() for p in obj.teacher.parameters()]
    gen0 = [p.clone() for p in obj.generator.parameters()]
    data, labels = torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 3
    cfg = TrainerConfig(steps=3, batch_size=8, log_every=1, checkpoint_every=100, tracker="none", optim=OptimConfig(lr=1e-3),
                        phase_optim={"generator": OptimConfig(lr=1e-3, update_every=2)})  # fmt: skip
    calls = []
    forward = obj.forward
    obj.forward = lambda batch, phase, step: calls.append((step, phase)) or forward(batch, phase, step)
    train(obj, data, labels, cfg, tmp_path / "run", {"test": divergence}, progress=False)
    assert calls == [(0, "generator"), (0, "critic"), (1, "critic"), (2, "generator"), (2, "critic")]
    assert all(torch.equal(a, b) for a, b in zip(teacher, obj.teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen0, obj.generator.parameters()))


@pytest.mark.parametrize("override, message", [
    ("dmd.divergence=jensen_shannon", "objective dmd2 is the reverse-KL divergence"),
    ("p_uncond=0.1", "p_uncond=0.1 has no effect on dmd2"),
    ("eval.steps=[1, 2]", r"more steps than the generator has \(dmd.generator_steps=1\)"),
])  # fmt: skip
def test_dmd2_recipe_refuses_settings_that_would_be_ignored(override, message):
    from pathlib import Path

    from fastdiff.training.config import load_config
    from fastdiff.training.distill import DistillRecipe, build_objective

    path = Path(__file__).resolve().parent.parent / "recipes" / "dmd2_digits.yaml"
    with pytest.raises(InputError, match=message):
        build_objective(load_config(DistillRecipe, path, [override]), 1, 8, 10)
    objective, scheduler = build_objective(load_config(DistillRecipe, path), 1, 8, 10)
    assert isinstance(objective, DistributionMatching) and scheduler.config.original_inference_steps == 1


def test_generator_starts_from_the_given_network():
    """``generator=``: G starts as that network (DMD2's one-step recipes start from a pre-trained generator), the fake
    score and the teacher stay the teacher's; another architecture, or the LoRA layout, is refused."""
    torch.manual_seed(0)
    teacher, start = tiny_unet(num_class_embeds=4), tiny_unet(num_class_embeds=4)
    obj = DistributionMatching(teacher, SCHEDULE, "v_prediction", 3, generator=start)
    assert all(torch.equal(a, b) for a, b in zip(obj.generator.state_dict().values(), start.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(obj.generator.state_dict().values(), teacher.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(obj.fake.state_dict().values(), teacher.state_dict().values()))
    assert obj.generator is not start and all(p.requires_grad for p in obj.generator.parameters())
    with pytest.raises(InputError, match="the starting generator must be the teacher's network with other weights"):
        DistributionMatching(teacher, SCHEDULE, "v_prediction", 3, generator=tiny_unet(num_class_embeds=5))
    with pytest.raises(InputError, match="needs the three-network layout"):
        DistributionMatching(teacher, SCHEDULE, "v_prediction", 3, generator=start, lora_rank=4)


def test_dmd_generator_init_recipe_key(tmp_path):
    """``dmd.generator_init``: a student folder of the teacher (here the digits teacher with one weight changed,
    written by the test) starts G; one that predicts another type is refused, naming both."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from fastdiff.eval.assets import pipeline_path
    from fastdiff.training.config import load_config
    from fastdiff.training.distill import DistillRecipe, build_objective

    student = tmp_path / "student"
    shutil.copytree(pipeline_path("digits"), student)
    weights = student / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    save_file({**state, name: state[name] + 1}, weights)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "dmd2_digits.yaml"
    objective, _ = build_objective(load_config(DistillRecipe, recipe, [f"dmd.generator_init={student}"]), 1, 8, 10)
    torch.testing.assert_close(objective.generator.state_dict()[name], objective.teacher.state_dict()[name] + 1)
    torch.testing.assert_close(objective.fake.state_dict()[name], objective.teacher.state_dict()[name])
    config = student / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "epsilon"}))
    with pytest.raises(InputError, match=f"dmd.generator_init={student} predicts epsilon but the teacher .* predicts v_prediction"):
        build_objective(load_config(DistillRecipe, recipe, [f"dmd.generator_init={student}"]), 1, 8, 10)


def test_dmd_generator_init_from_a_reflow_student(tmp_path):
    """A reflow student (``VPFlowModel``) as ``dmd.generator_init``: G is its VP network, so at step 0 G's clean-sample
    estimate at every ``(x_t, t)`` is the student's own ``z_t - t v`` at the same point of the flow (``z = x_t /
    (s (1 + sigma))``, flow time ``sigma / (1 + sigma)``); a student of another noise schedule is refused, naming it."""
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastdiff.eval.assets import pipeline_path
    from fastdiff.flow_student import VPFlowModel
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, load_pipeline, save_teacher
    from fastdiff.training.config import load_config
    from fastdiff.training.distill import DistillRecipe, build_objective

    teacher = load_pipeline(pipeline_path("digits"))
    config = dict(teacher.scheduler.config)
    flow = VPFlowModel.from_base(teacher.model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.base.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a student: other weights than the teacher's
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "dmd2_digits.yaml"
    save_teacher(ClassConditionalPipeline(unet=flow, scheduler=FlowMatchEulerDiscreteScheduler()), tmp_path / "reflow")
    objective, _ = build_objective(load_config(DistillRecipe, recipe, [f"dmd.generator_init={tmp_path / 'reflow'}"]), 1, 8, 10)

    x_t, t, labels = torch.randn(6, 1, 8, 8), torch.tensor([999, 900, 700, 400, 100, 20]), torch.arange(6)
    with torch.no_grad():
        x0_g = objective._x0("generator", x_t, t, {"class_labels": labels})
        abar = objective.schedule.alphas_cumprod[t]
        sigma = ((1 - abar) / abar).sqrt()
        z = x_t.double() / (abar.sqrt() * (1 + sigma)).view(-1, 1, 1, 1)
        tau = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
        v = flow(z.float(), (1000 * tau).flatten(), class_labels=labels).sample
        x0_flow = z - tau * v.double()
        x0_teacher = objective._x0("teacher", x_t, t, {"class_labels": labels})
    torch.testing.assert_close(x0_g.double(), x0_flow, atol=2e-4, rtol=2e-4)
    assert (x0_g - x0_teacher).abs().max() > 1e-2  # the student's weights, not the teacher's

    other = VPFlowModel.from_base(teacher.model, {**config, "beta_end": 0.012})
    save_teacher(ClassConditionalPipeline(unet=other, scheduler=FlowMatchEulerDiscreteScheduler()), tmp_path / "other")
    with pytest.raises(InputError, match="is a reflow student of another noise schedule than the teacher"):
        build_objective(load_config(DistillRecipe, recipe, [f"dmd.generator_init={tmp_path / 'other'}"]), 1, 8, 10)


def test_lora_layout_shares_one_frozen_base():
    """Generator and fake score as two LoRA adapters on the teacher: at start both compute what the teacher does
    (the same losses as the copies layout), the phases train disjoint adapter parameters, switching adapters leaves
    the trainer's freezing alone, and the merged generator equals the base with the generator adapter on."""
    from fastdiff.objectives.distribution_matching import generator_of

    copies, lora = _objective(), _objective(lora_rank=4)
    batch = _batch()
    torch.testing.assert_close(lora.generate(batch, grad=False), copies.generate(batch, grad=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora(batch, "critic", 0).terms["fake_denoising"], copies(batch, "critic", 0).terms["fake_denoising"])
    gen, critic = list(lora.parameters_for("generator")), list(lora.parameters_for("critic"))
    assert gen and {id(p) for p in gen}.isdisjoint(id(p) for p in critic)
    trainable = {id(p) for p in gen} | {id(p) for p in critic}
    assert all(not p.requires_grad for p in lora.net.parameters() if id(p) not in trainable)  # the base stays frozen
    for p in critic:  # the generator phase, as the trainer runs it: the critic's parameters frozen
        p.requires_grad_(False)
    lora(batch, "generator", 0).total.backward()
    assert all(not p.requires_grad and p.grad is None for p in critic) and all(p.grad is not None for p in gen)
    with torch.no_grad():
        for p in gen:
            p.add_(0.05 * torch.randn_like(p))
    merged = generator_of(lora.export())
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([999, 500]), {"class_labels": torch.tensor([0, 2])}
    with torch.no_grad(), lora._use("generator") as net:
        expect = net(x, t, **cond).sample
    torch.testing.assert_close(merged(x, t, **cond).sample, expect, rtol=1e-4, atol=1e-5)
    assert not any("lora_" in n for n, _ in merged.named_parameters()) and type(merged) is type(lora.net)


def test_generator_gan_term_has_the_gan_loss_value_and_gradient():
    """The GAN term reaches the generator through its sample (taken while the critic's adapter is on): its value is
    w softplus(-D(x)) and its gradient on the generator that of the plain expression."""
    batch = _batch()
    with_gan, without = _objective(gan_generator_weight=0.5), _objective(gan_generator_weight=0.0)
    without.load_state_dict(with_gan.state_dict())
    params = list(with_gan.generator.parameters())
    out = with_gan(batch, "generator", 0)
    grads = torch.autograd.grad(out.total, params)
    dm_only = torch.autograd.grad(without(batch, "generator", 0).total, list(without.generator.parameters()))
    cond = {"class_labels": batch["labels"]}
    x = with_gan.generate(batch)
    direct = 0.5 * torch.nn.functional.softplus(-with_gan._gan_logits(x, cond, batch["seeds"], 12)).mean()
    torch.testing.assert_close(out.terms["gan"], direct)
    expect = torch.autograd.grad(direct, params)
    got = torch.cat([(a - b).flatten() for a, b in zip(grads, dm_only)])
    expect = torch.cat([g.flatten() for g in expect])
    torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-5 * float(expect.abs().max()))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_feature_tap_run_to_stops_the_forward_pass_at_the_bottleneck(kind, checkpointing):
    """As DMD2's classifier forward (``classify_mode``): the layers after the bottleneck are not run, the features and
    their gradients (with gradient checkpointing too, whose backward recomputes blocks) are those of the full pass,
    and the tap is disarmed afterwards (the next full pass returns the model's output)."""
    from fastdiff.denoisers import call_model
    from fastdiff.objectives.critic import FeatureTap, bottleneck

    from conftest import tiny_dit

    net, channels = (tiny_unet(num_class_embeds=4), 1) if kind == "unet" else (tiny_dit(num_layers=3), 4)
    if checkpointing:
        net.enable_gradient_checkpointing()
    after = net.up_blocks[0] if kind == "unet" else net.transformer_blocks[-1]
    checkpointed = net.mid_block.resnets[-1] if kind == "unet" else bottleneck(net)  # recomputed in backward if so
    calls, recomputed = [], []
    after.register_forward_hook(lambda *_: calls.append(1))
    tap = FeatureTap(bottleneck(net))
    x = torch.randn(2, channels, 8, 8, requires_grad=True)
    t, cond = torch.tensor([10, 500]), {"class_labels": torch.tensor([0, 1])}
    out = call_model(net, x, t, cond)
    full = tap.take()
    assert calls
    calls.clear()
    early = tap.run_to(lambda: call_model(net, x, t, cond))
    assert not calls, "the layers after the bottleneck ran"
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    params = [x, *(p for p in net.parameters() if p.requires_grad)][:6]
    # (a pre-hook: torch's recomputation stops once it has what backward needs, before any forward hook fires)
    checkpointed.register_forward_pre_hook(lambda *_: recomputed.append(1))
    grads_early = torch.autograd.grad(early.square().sum(), params, allow_unused=True)
    assert bool(recomputed) == checkpointing
    for a, b in zip(grads_early, torch.autograd.grad(full.square().sum(), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(call_model(net, x, t, cond), out)
    assert calls


def test_gan_logits_do_not_run_the_fake_scores_decoder():
    obj = _objective()
    calls = []
    obj.fake.up_blocks[0].register_forward_hook(lambda *_: calls.append(1))
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), {"class_labels": torch.tensor([0, 1])}
    logits = obj.logits(x, t, cond)
    assert logits.shape == (2, 1) and not calls
    obj._x0("fake", x, t, cond)
    torch.testing.assert_close(obj.head(obj._tap.take()), logits, rtol=0, atol=0)
    assert calls
