"""The shipped teachers and extractors load offline, swap schedulers, and drive the quickstart and `fastdiff sample`."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from fastdiff.cli import main
from fastdiff.errors import InputError
from fastdiff.extractors import ASSETS, load_extractor
from fastdiff.pipelines import ClassConditionalPipeline
from fastdiff.quickstart import QuickstartConfig, run_quickstart

TEACHERS = ["digits", "fashion-mnist"]


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_loads_offline_and_swaps_scheduler(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = ASSETS / "teachers" / name
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{path} is {size / 2**20:.1f} MB"
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline", trust_remote_code=True)
    assert isinstance(pipe, ClassConditionalPipeline) and pipe.num_classes == 10
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(class_labels=[0, 7], num_inference_steps=3, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    assert out.images.shape[0] == 2 and np.isfinite(out.images).all()
    assert json.loads((path / "training.json").read_text())["steps"] > 0  # how it was trained is recorded


@pytest.mark.parametrize("name", TEACHERS)
def test_extractor_is_accurate(name):
    record = json.loads((ASSETS / "extractors" / name / "config.json").read_text())
    assert record["test_accuracy"] > 0.85
    ext = load_extractor(name)
    assert ext(torch.zeros(2, *ext.image_shape)).shape == (2, 128)


def test_quickstart_smoke(tmp_path):
    cfg = QuickstartConfig(teacher="digits", schedulers=("ddim", "pndm"), steps=(2,), reference_steps=3,
                           num_samples=20, out=str(tmp_path))  # fmt: skip
    record = run_quickstart(cfg, progress=False)
    assert [r["nfe"] for r in record["rows"]] == [2, 3, 3, 3]  # the last: the teacher's run with the feature cache
    assert record["rows"][-1]["sampler"].startswith("teacher: ddim + cache") and record["rows"][-1]["speedup"] > 0
    assert all(np.isfinite(r["fid"]) for r in record["rows"])
    for name in ("quickstart.json", "fid_vs_nfe.png", "grid.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_quickstart_refuses_a_bad_cache_setting_before_sampling(tmp_path, monkeypatch):
    import fastdiff.sampling

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the cache setting")

    monkeypatch.setattr(fastdiff.sampling, "sample_pipeline", no_sampling)
    cfg = QuickstartConfig(teacher="digits", schedulers=("ddim",), steps=(2,), num_samples=4, out=str(tmp_path), cache="every:0")
    with pytest.raises(InputError, match="interval must be an integer >= 1"):
        run_quickstart(cfg, progress=False)


def test_sample_cli(tmp_path):
    args = ["sample", "--pipeline", str(ASSETS / "teachers" / "digits"), "--scheduler", "unipc", "--steps", "3",
            "--num-samples", "6", "--classes", "3,4", "--guidance", "2", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    data = np.load(tmp_path / "samples.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["class_labels"].tolist() == [3, 4, 3, 4, 3, 4] and (tmp_path / "grid.png").is_file()
