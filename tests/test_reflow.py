"""Reflow (2-RF++): the U-shaped t density, the pseudo-Huber constant sqrt(d) (not the official code's d), the
LPIPS-Huber-1/t weighting, the flow student that is exactly the teacher's ODE at step 0, the sampler that re-uses the
initial noise (functional and scheduler), and pairs that resume after a kill and are the pipeline's own noise."""

import json
import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fastdiff.denoisers import DiffusersDenoiser
from fastdiff.errors import InputError
from fastdiff.flow_student import VPFlowModel
from fastdiff.objectives.reflow import Reflow, reflow_loss, u_shaped_t
from fastdiff.samplers import sample_euler
from fastdiff.samplers.consistency import sample_reflow
from fastdiff.schedules import VPSchedule

CONFIG = DDPMScheduler(prediction_type="v_prediction").config
SCHEDULE = VPSchedule.from_config(CONFIG)


def test_u_shaped_t_has_the_papers_density():
    g = torch.Generator().manual_seed(0)
    t = u_shaped_t(torch.rand(200_000, generator=g, dtype=torch.float64), torch.rand(200_000, generator=g, dtype=torch.float64), 4.0)
    assert t.min() >= 1e-5 and t.max() <= 1 - 1e-5
    counts = torch.histc(t, bins=20, min=0, max=1) / len(t)
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    cdf = lambda x: (torch.exp(4 * x) - torch.exp(4 * (1 - x)) + math.exp(4) - 1) / (2 * (math.exp(4) - 1))  # noqa: E731
    expected = cdf(edges[1:]) - cdf(edges[:-1])
    torch.testing.assert_close(counts.double(), expected, atol=2e-3, rtol=0)
    assert expected[0] / expected[10] > 3  # density ~2.07 at the ends, ~0.55 at t = 0.5 (reference notes 7)


def test_pseudo_huber_uses_sqrt_d_and_lpips_huber_weighs_by_t():
    x, z = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    v = z - x + 0.01  # a residual of 0.01 everywhere
    t = torch.tensor([0.2, 0.8])
    d = 64
    c = 0.00054 * math.sqrt(d)
    ph = (math.sqrt(d * 0.01**2 + c**2) - c) / d
    torch.testing.assert_close(reflow_loss(v, x, x, z, t, "pseudo_huber")["pseudo_huber"], torch.full((2,), ph))
    wrong = (math.sqrt(d * 0.01**2 + (0.00054 * d) ** 2) - 0.00054 * d) / d  # the official code's constant
    assert abs(ph - wrong) > 0.1 * ph
    z_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * z
    terms = reflow_loss(v, z_t, x, z, t, "lpips_huber", lambda a, b: (a - b).flatten(1).abs().mean(1))
    torch.testing.assert_close(terms["pseudo_huber"], (1 - t) * ph)
    torch.testing.assert_close(terms["perceptual"], (t * 0.01) / t)  # x_hat - x = -t * 0.01, then / t
    torch.testing.assert_close(reflow_loss(v, x, x, z, t, "l2")["l2"], torch.full((2,), 0.01))  # the code's "l2" is an RMS


def test_flow_student_is_the_teachers_ode_at_initialisation():
    """FlowMatchEuler on the wrapped teacher equals fastdiff's Euler (DDIM) on the teacher at the same sigmas: Euler in
    flow time and in sigma space are the same method for a model behind the change of variables."""
    torch.manual_seed(0)
    teacher = tiny_unet(num_class_embeds=4)
    student = VPFlowModel.from_base(teacher, CONFIG)
    flow_sigmas = [0.9, 0.6, 0.3, 0.1]
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=flow_sigmas)
    labels = torch.tensor([0, 1, 2])
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.9  # a state at flow time 0.9
    with torch.no_grad():
        x = z
        for t in scheduler.timesteps:
            x = scheduler.step(student(x, t.expand(3), class_labels=labels).sample, t, x).prev_sample
        sigmas = torch.tensor([s / (1 - s) for s in flow_sigmas] + [0.0], dtype=torch.float64)
        ref = sample_euler(DiffusersDenoiser(teacher, SCHEDULE, "v_prediction"), (z / 0.1).double().float(), sigmas.float(), {"class_labels": labels})
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


def test_reuse_noise_sampler_is_euler_for_one_step_and_exact_on_straight_paths():
    x0 = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    point = lambda x, sigma: x0.expand_as(x)  # noqa: E731 -- a point mass: every path is straight
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([50.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sample_reflow(point, 50.0 * eps, sigmas), x0.expand(4, 2))
    curved = lambda x, sigma: torch.tanh(x) * 0.5  # noqa: E731
    one = torch.tensor([50.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sample_reflow(curved, 50.0 * eps, one), sample_euler(curved, 50.0 * eps, one))
    assert (sample_reflow(curved, 50.0 * eps, sigmas) - sample_euler(curved, 50.0 * eps, sigmas)).abs().max() > 1e-3


def test_reflow_scheduler_steps_with_the_functional_rule():
    """Driven step by step from flow time 0.8 (where the initial noise and the current direction differ), the
    scheduler lands where sample_reflow does; the pipeline samples with it."""
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline
    from fastdiff.samplers.diffusers import ReflowScheduler
    from fastdiff.schedules import FlowSchedule

    torch.manual_seed(0)
    student = VPFlowModel.from_base(tiny_unet(num_class_embeds=4), CONFIG)
    scheduler = ReflowScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
    scheduler.set_timesteps(sigmas=[0.8, 0.5, 0.2])
    labels = torch.tensor([0, 1])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = z
        for t in scheduler.timesteps:
            x = scheduler.step(student(x, t.expand(2), class_labels=labels).sample, t, x).prev_sample
        sigmas = scheduler.sigmas.float()
        ref = sample_reflow(DiffusersDenoiser(student, FlowSchedule(1000), "flow"), z / FlowSchedule(1000).scale(sigmas[0]), sigmas,
                            {"class_labels": labels})  # fmt: skip
        euler = sample_euler(DiffusersDenoiser(student, FlowSchedule(1000), "flow"), z / FlowSchedule(1000).scale(sigmas[0]), sigmas,
                             {"class_labels": labels})  # fmt: skip
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
    assert (x - euler).abs().max() > 1e-3
    pipe = ClassConditionalPipeline(scheduler=scheduler, unet=student)
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(pipe(class_labels=labels, num_inference_steps=2, output_type="latent").images).all()


def test_pairs_resume_after_a_kill_and_start_from_the_pipelines_own_noise(tmp_path):
    from fastdiff.training.pairs import generate_pairs, load_pairs

    generate_pairs("digits", tmp_path / "full", 10, "ddim", 4, shard_size=4, progress=False)
    x, noise, labels, manifest = load_pairs(tmp_path / "full")
    assert (manifest["nfe"], manifest["shards"], labels.tolist()) == (4.0, 3, [i % 10 for i in range(10)])
    generate_pairs("digits", tmp_path / "cut", 10, "ddim", 4, shard_size=4, progress=False)
    (tmp_path / "cut" / "shard_00001.safetensors").unlink()  # killed before the second shard was renamed
    with pytest.raises(InputError, match="has 2 of 3 pair shards"):
        load_pairs(tmp_path / "cut")
    generate_pairs("digits", tmp_path / "cut", 10, "ddim", 4, shard_size=4, progress=False)
    again = load_pairs(tmp_path / "cut")
    assert torch.equal(again[0], x) and torch.equal(again[1], noise)
    with pytest.raises(InputError, match="differs in: steps"):
        generate_pairs("digits", tmp_path / "cut", 10, "ddim", 8, shard_size=4, progress=False)
    # the noise is what the pipeline started from: its first model input (DDIM scales nothing)
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    pipe = load_pipeline(pipeline_path("digits"))
    pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
    seen = []
    handle = pipe.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["sample"].clone()) if not seen else None, with_kwargs=True)
    sample_pipeline(pipe, 3, 4, 1.0, 0, first_index=4)
    handle.remove()
    torch.testing.assert_close(seen[0], noise[4:7])
    assert json.loads((tmp_path / "cut" / "pairs.json").read_text())["scheduler_class"] == "DDIMScheduler"


def test_reflow_objective_trains_the_flow_student_and_refuses_lpips_huber_without_a_distance():
    torch.manual_seed(0)
    obj = Reflow(tiny_unet(num_class_embeds=4), CONFIG, 3, loss="pseudo_huber")
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, "noise": torch.randn(4, 1, 8, 8, generator=g),
             "labels": torch.arange(4) % 3, "seeds": torch.arange(4)}  # fmt: skip
    out = obj(batch, "student", 0)
    out.total.backward()
    assert set(out.terms) == {"pseudo_huber"} and all(p.grad is not None for p in obj.net.base.conv_out.parameters())
    uniform = Reflow(tiny_unet(num_class_embeds=4), CONFIG, 3, loss="l2", t_distribution="uniform")
    assert not torch.equal(uniform.times(torch.arange(64)), obj.times(torch.arange(64)))
    with pytest.raises(InputError, match="needs a perceptual distance"):
        Reflow(tiny_unet(num_class_embeds=4), CONFIG, 3, loss="lpips_huber")
    with pytest.raises(InputError, match="reflow loss"):
        Reflow(tiny_unet(num_class_embeds=4), CONFIG, 3, loss="huber")


def test_students_do_not_carry_the_folder_their_teacher_was_loaded_from(tmp_path):
    """A flow student (and a CTM two-time model) of a teacher loaded from a folder stores the teacher's config without
    diffusers' ``_name_or_path``: a shipped student's config must not name the training machine's paths."""
    from diffusers import UNet2DModel

    from fastdiff.two_time import TwoTimeModel

    tiny_unet(num_class_embeds=4).save_pretrained(tmp_path / "teacher")
    teacher = UNet2DModel.from_pretrained(tmp_path / "teacher")
    assert str(teacher.config["_name_or_path"]) == str(tmp_path / "teacher")  # what diffusers records on loading
    for student in (VPFlowModel.from_base(teacher, CONFIG), TwoTimeModel.from_base(teacher)):
        student.save_pretrained(tmp_path / "student")
        assert str(tmp_path / "teacher") not in (tmp_path / "student" / "config.json").read_text()
        assert student.base.config.block_out_channels == teacher.config.block_out_channels
