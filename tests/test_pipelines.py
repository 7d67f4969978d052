"""fastdiff's class-conditional pipeline: offline save/load, scheduler swaps, seeds independent of batch size."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler, DiffusionPipeline

from fastdiff.errors import InputError
from fastdiff.pipelines import ClassConditionalPipeline, load_pipeline, save_teacher
from fastdiff.sampling import SCHEDULERS, make_scheduler, sample_pipeline


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


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_swaps_in(folder, name):
    pipe = load_pipeline(folder)
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    out = pipe(class_labels=[1, 2], num_inference_steps=4, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    assert out.images.shape == (2, 8, 8, 1) and (out.images >= 0).all() and (out.images <= 1).all()


def test_seed_fixes_images_whatever_the_batch_size(folder):
    pipe = load_pipeline(folder)
    pipe.scheduler = make_scheduler("ddpm", pipe.scheduler.config)  # stochastic: per-image step noise too
    a = sample_pipeline(pipe, 6, 5, 2.0, seed=3, batch_size=6)
    b = sample_pipeline(pipe, 6, 5, 2.0, seed=3, batch_size=4)
    c = sample_pipeline(pipe, 6, 5, 2.0, seed=4, batch_size=6)
    torch.testing.assert_close(a.images, b.images, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.images, c.images)
    assert a.nfe == 5  # guided calls are batched: one model call per step


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
