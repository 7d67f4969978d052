"""SCott: eta = 0, h = 1 without the adversarial term is CD exactly; the DDIM(eta) teacher step keeps the marginals of
a Gaussian data set for every eta (the reverse-SDE family); h sub-steps chain h DDIM steps; the adversarial phase trains
only the t-conditioned discriminator."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from torch import nn

from fastdiff.errors import InputError
from fastdiff.objectives.consistency_distillation import ConsistencyDistillation
from fastdiff.objectives.critic import TimeDiscriminator
from fastdiff.objectives.losses import hinge_generator_loss
from fastdiff.objectives.stochastic_consistency import StochasticConsistency
from fastdiff.schedules import VPSchedule

SCHEDULE = VPSchedule.from_config(DDPMScheduler(prediction_type="v_prediction").config)


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.arange(n) % 3, "seeds": torch.arange(n) + 100}


def test_eta_zero_one_substep_without_adversary_is_cd_exactly():
    torch.manual_seed(0)
    teacher = tiny_unet(num_class_embeds=4)
    cd = ConsistencyDistillation(teacher, SCHEDULE, "v_prediction", 3, guidance_scale=2.0)
    scott = StochasticConsistency(teacher, SCHEDULE, "v_prediction", 3, eta=0.0, substeps=1, adversarial_weight=0.0, guidance_scale=2.0)
    scott.cd.net.load_state_dict(cd.net.state_dict())
    a, b = cd(_batch(), "student", 0), scott(_batch(), "student", 0)
    assert torch.equal(a.terms["distillation"], b.terms["distillation"]) and scott.phases == ("student",)
    a.total.backward()
    b.total.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(cd.net.parameters(), scott.cd.net.parameters()))
    noisy = StochasticConsistency(teacher, SCHEDULE, "v_prediction", 3, eta=1.0, substeps=1, adversarial_weight=0.0, guidance_scale=2.0)
    noisy.cd.net.load_state_dict(cd.net.state_dict())
    assert not torch.equal(noisy(_batch(), "student", 0).terms["distillation"], a.terms["distillation"])


class _GaussianEps(nn.Module):
    """The exact noise predictor of data N(0, s^2 I) under the VP schedule: E[eps | x_t] = b x_t / (a^2 s^2 + b^2)."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so the objective can copy and freeze it

    def forward(self, x, t, class_labels=None):
        abar = SCHEDULE.alphas_cumprod.to(x.dtype)[t].view(-1, 1)
        return (1 - abar).sqrt() * x / (abar * self.s**2 + 1 - abar) + 0 * self.anchor


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_step_is_diffusers_ddim_with_eta(eta):
    """The teacher's DDIM(eta) step from 600 to 400 equals diffusers' DDIMScheduler.step(eta=...) given the same noise
    prediction and variance noise."""
    from diffusers import DDIMScheduler

    s = 0.7
    cd = ConsistencyDistillation(_GaussianEps(s), SCHEDULE, "epsilon", None, teacher_eta=eta)
    g = torch.Generator().manual_seed(0)
    x_t, noise = torch.randn(8, 1, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
    t, t_prev = torch.full((8,), 600), torch.full((8,), 400)
    ours = cd._teacher_ddim(x_t, t, t_prev, {}, {}, torch.ones(8, dtype=torch.float64), noise if eta > 0 else None)
    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(5)
    eps = _GaussianEps(s)(x_t, t)
    theirs = ddim.step(eps, 600, x_t, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # diffusers keeps alphas_cumprod in float32


def test_substeps_chain_ddim_steps_and_are_checked():
    torch.manual_seed(0)
    teacher = tiny_unet(num_class_embeds=4)
    cd = ConsistencyDistillation(teacher, SCHEDULE, "v_prediction", 3, teacher_substeps=3)
    x_t = torch.randn(2, 1, 8, 8)
    t, t_prev, w, cond = torch.tensor([519, 19]), torch.tensor([499, -1]), torch.ones(2), {"class_labels": torch.tensor([0, 1])}
    ours = cd.teacher_solve(x_t, t, t_prev, cond, cond, w, torch.arange(2))
    by_hand = x_t
    for a, b in (([519, 19], [512, 12]), ([512, 12], [506, 6]), ([506, 6], [499, -1])):
        by_hand = cd._teacher_ddim(by_hand, torch.tensor(a), torch.tensor(b), cond, cond, w)
    torch.testing.assert_close(ours, by_hand)
    with pytest.raises(InputError, match="teacher_substeps in 1..20"):
        ConsistencyDistillation(teacher, SCHEDULE, "v_prediction", 3, teacher_substeps=21)


def test_adversarial_phases_train_their_own_networks():
    torch.manual_seed(0)
    obj = StochasticConsistency(tiny_unet(num_class_embeds=4), SCHEDULE, "v_prediction", 3, discriminator=TimeDiscriminator(1, 8))
    assert obj.phases == ("student", "discriminator")
    out = obj(_batch(), "student", 0)
    assert set(out.terms) == {"distillation", "adversarial"}
    out.total.backward()
    assert all(p.grad is not None for p in obj.cd.net.parameters() if p.requires_grad)
    obj.zero_grad()
    d = obj(_batch(), "discriminator", 0)
    d.total.backward()
    assert all(p.grad is None for p in obj.cd.net.parameters()) and obj.discriminator.image.head.weight.grad is not None
    with pytest.raises(InputError, match="needs a discriminator and adversarial_weight > 0"):
        StochasticConsistency(tiny_unet(num_class_embeds=4), SCHEDULE, "v_prediction", 3)


def test_adaptive_adversary_gives_the_adversary_its_weight_of_the_gradient_at_the_output():
    """``adaptive_adversary``: the weighted hinge term's gradient at the student's output f_theta(x_t, t) has norm
    ``adversarial_weight`` times the CD term's there (VQGAN's ratio); a fixed weight does not."""
    torch.manual_seed(0)
    obj = StochasticConsistency(tiny_unet(num_class_embeds=4), SCHEDULE, "v_prediction", 3, discriminator=TimeDiscriminator(1, 8),
                                adversarial_weight=0.4, adaptive_adversary=True)  # fmt: skip
    out = obj(_batch(), "student", 0)
    loss, student, t, _, _ = obj.cd.consistency(_batch())  # the same draw: every draw comes from the sample seeds
    cd = loss.mean()
    torch.testing.assert_close(cd, out.terms["distillation"])
    hinge = hinge_generator_loss(obj.discriminator(student, t))
    w = out.logs["adversarial_weight"]
    torch.testing.assert_close(w * hinge, out.terms["adversarial"])
    (g_cd,) = torch.autograd.grad(cd, student, retain_graph=True)
    (g_hinge,) = torch.autograd.grad(hinge, student)
    assert w == pytest.approx(0.4 * float(g_cd.norm() / (g_hinge.norm() + 1e-4)), rel=1e-5)  # VQGAN's 1e-4
    assert w * g_hinge.norm() == pytest.approx(0.4 * g_cd.norm(), rel=1e-2)  # the adversary's share at the output
    assert out.logs["adversarial_weight"] < 0.1  # at initialisation the hinge gradient dwarfs the L2 one
    fixed = StochasticConsistency(obj.cd.teacher, SCHEDULE, "v_prediction", 3, discriminator=obj.discriminator, adversarial_weight=0.4)
    assert fixed(_batch(), "student", 0).logs["adversarial_weight"] == 0.4
