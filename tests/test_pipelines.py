"""fastdiff's class-conditional pipeline: offline save/load, scheduler swaps, seeds independent of batch size."""

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.configuration_utils import FrozenDict
from torch import nn

from fastdiff.errors import InputError
from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, load_pipeline, save_teacher
from fastdiff.pipelines.sampling import SCHEDULERS, make_scheduler, sample_pipeline
from fastdiff.schedules import VPSchedule

STD = 0.3  # data: class c ~ N(MEANS[c], STD^2 I) on 1x8x8 images; the last label is the null class
MEANS = torch.tensor([-0.6, -0.2, 0.2, 0.6, 0.0], dtype=torch.float64)
STOCHASTIC = ("ddpm", "euler-ancestral")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    scheduler = DDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    pipe = ClassConditionalPipeline(scheduler=scheduler, unet=tiny_unet(num_class_embeds=11))
    return save_teacher(pipe, tmp_path_factory.mktemp("teacher") / "tiny")


def test_loads_offline_both_ways(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    direct = ClassConditionalPipeline.from_pretrained(folder)
    generic = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)
    assert type(generic).__name__ == "ClassConditionalPipeline" and direct.num_classes == 10
    for key in direct.unet.state_dict():
        assert torch.equal(direct.unet.state_dict()[key], generic.unet.state_dict()[key])
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


class GaussianTeacher(nn.Module):
    """The exact v-prediction model of the Gaussian data above under a VP ``schedule``, standing in for a UNet2DModel."""

    dtype = torch.float32

    def __init__(self, schedule: VPSchedule):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("means", MEANS)
        self.config = FrozenDict(num_class_embeds=len(MEANS), in_channels=1, sample_size=8)

    @property
    def device(self) -> torch.device:
        return self.means.device

    def forward(self, sample, timestep, class_labels, return_dict=True):
        sigma = self.schedule.t_to_sigma(timestep.double().cpu()).view(-1, 1, 1, 1)
        alpha = 1 / (1 + sigma**2).sqrt()
        x, mu = sample.double() / alpha, self.means[class_labels].view(-1, 1, 1, 1)  # x = x0 + sigma eps
        x0 = (STD**2 * x + sigma**2 * mu) / (STD**2 + sigma**2)  # E[x0 | x]
        eps = (x - x0) / sigma
        return ((alpha * eps - alpha * sigma * x0).float(),)  # v = alpha eps - sigma_t x0


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_solves_an_exact_model(name):
    """Each named scheduler in the pipeline, on a model exact for Gaussian data. Guidance w makes it the exact model of
    N(w mu_c, STD^2) (the null mean is 0), whose probability-flow ODE takes the start noise z (at sigma_T, x = z / alpha_T)
    to mu + (x - mu) STD / sqrt(STD^2 + sigma_T^2). ODE schedulers must converge to that sample -- within 0.06 at 100
    steps, at most 0.7 x the 50-step error (first order or better) -- and stochastic ones must sample N(mu, STD^2)."""
    scheduler = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction",
                              timestep_spacing="trailing", clip_sample=False)  # fmt: skip
    schedule = VPSchedule.from_config(scheduler.config)
    pipe = ClassConditionalPipeline(scheduler=scheduler, unet=GaussianTeacher(schedule))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(64) % 4
    mu = 3.0 * MEANS[labels].view(-1, 1, 1, 1)

    def sample(steps: int) -> torch.Tensor:
        pipe.scheduler = make_scheduler(name, scheduler.config)
        return pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images.double()  # fmt: skip

    if name in STOCHASTIC:
        z = (sample(100) - mu) / STD
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.12, (z.mean(), z.std())
        return
    x_T = torch.randn((64, 1, 8, 8), generator=torch.Generator().manual_seed(0)).double() * math.sqrt(1 + schedule.sigma_max**2)
    exact = mu + (x_T - mu) * STD / math.sqrt(STD**2 + schedule.sigma_max**2)
    err50, err100 = ((sample(n) - exact).abs().max().item() for n in (50, 100))
    assert err100 < 0.06 and err100 < 0.7 * err50, (err50, err100)


def test_seed_fixes_images_whatever_the_batch_size(folder):
    pipe = load_pipeline(folder)
    pipe.scheduler = make_scheduler("ddpm", pipe.scheduler.config)  # stochastic: per-image step noise too
    a = sample_pipeline(pipe, 6, 5, 2.0, seed=3, batch_size=6)
    b = sample_pipeline(pipe, 6, 5, 2.0, seed=3, batch_size=4)
    c = sample_pipeline(pipe, 6, 5, 2.0, seed=4, batch_size=6)
    torch.testing.assert_close(a.images, b.images, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.images, c.images)
    assert a.nfe == 5  # guided calls are batched: one model call per step


def test_initial_noise_is_scaled_for_this_calls_grid(folder):
    """Euler's ``init_noise_sigma`` depends on the grid ("leading" spacing starts below t = 999): the pipeline sets
    the grid before scaling the noise, so a call gives the same images on a fresh scheduler and after another call."""
    from diffusers import EulerDiscreteScheduler

    pipe = load_pipeline(folder)
    config = {**pipe.scheduler.config, "timestep_spacing": "leading", "steps_offset": 1}
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    fresh = sample_pipeline(pipe, 2, 4, 1.0, seed=0).images
    sample_pipeline(pipe, 2, 2, 1.0, seed=0)
    after_another = sample_pipeline(pipe, 2, 4, 1.0, seed=0).images
    torch.testing.assert_close(fresh, after_another, rtol=0, atol=0)


def test_nfe_counts_pndm_extra_call(folder):
    pipe = load_pipeline(folder)
    pipe.scheduler = make_scheduler("pndm", pipe.scheduler.config)
    assert sample_pipeline(pipe, 2, 5, 1.0).nfe == 6  # PLMS: N steps cost N + 1 calls


def test_bad_input(folder, tmp_path):
    pipe = load_pipeline(folder)
    with pytest.raises(InputError, match=r"class_labels must be in \[0, 9\]"):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(InputError, match="unknown scheduler 'magic'"):
        make_scheduler("magic", pipe.scheduler.config)
    with pytest.raises(InputError, match="exactly one of"):
        ClassConditionalPipeline(scheduler=pipe.scheduler)


def test_unknown_pipeline_class_is_a_one_line_error(folder, tmp_path, capsys):
    """A model_index.json naming a class neither fastdiff nor the installed diffusers has: an InputError naming the
    file, the key, the value and the fix -- exit 2 with one line from the command line, not a traceback."""
    from fastdiff.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    expected = r"model_index\.json: `_class_name` is 'NoSuchPipeline', which is neither .* set `_class_name` to"
    with pytest.raises(InputError, match=expected):
        load_pipeline(bad)
    code = main(["sample", "--pipeline", str(bad), "--out", str(tmp_path / "out"), "--num-samples", "1", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(bad / "model_index.json") in err and "NoSuchPipeline" in err, err
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": 3}))
    with pytest.raises(InputError, match="`_class_name` is 3"):
        load_pipeline(bad)


def test_student_folders_load_in_a_fresh_process(tmp_path):
    """diffusers loads a folder's component classes only from modules already imported: a CTM student (TwoTimeModel +
    CTMScheduler) and a reflow student (VPFlowModel) must load in a new interpreter through fastdiff's loader and
    through diffusers' custom-pipeline mechanism (the folder's pipeline.py)."""
    import subprocess
    import sys

    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from conftest import tiny_unet

    from fastdiff.flow_student import VPFlowModel
    from fastdiff.pipelines.class_conditional import save_teacher
    from fastdiff.samplers.diffusers import CTMScheduler
    from fastdiff.two_time import TwoTimeModel

    config = DDPMScheduler(prediction_type="v_prediction").config
    save_teacher(ClassConditionalPipeline(scheduler=CTMScheduler.from_config(config), unet=TwoTimeModel.from_base(tiny_unet(num_class_embeds=4))), tmp_path / "ctm")
    save_teacher(ClassConditionalPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), unet=VPFlowModel.from_base(tiny_unet(num_class_embeds=4), config)), tmp_path / "reflow")
    code = (f"from diffusers import DiffusionPipeline\nfrom fastdiff.pipelines import load_pipeline\n"
            f"for name in ('ctm', 'reflow'):\n"
            f"    a = load_pipeline(r'{tmp_path}/' + name)\n"
            f"    b = DiffusionPipeline.from_pretrained(r'{tmp_path}/' + name, custom_pipeline='pipeline', trust_remote_code=True)\n"
            f"    print(type(a.unet).__name__, type(b.unet).__name__, type(b.scheduler).__name__)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["TwoTimeModel TwoTimeModel CTMScheduler", "VPFlowModel VPFlowModel FlowMatchEulerDiscreteScheduler"]
