"""Teacher recipes: a few training steps of each shipped recipe's model family on a tiny model (on the trainer: the
recipe's settings reach it, checkpoints are written), continuing from a teacher, and the recipe keys' mapping."""

import json
import math

import pytest
import torch
from accelerate.utils import set_seed

from fastdiff.training.config import load_config
from fastdiff.errors import InputError
from fastdiff.pipelines.class_conditional import load_pipeline
from fastdiff.training.teacher import TeacherRecipe, build_model, train_teacher, trainer_config

TINY = {
    "teacher_digits.yaml": ["model.block_out_channels=[8, 16]", "train.tracker=none"],
    "teacher_fashion_mnist.yaml": ["model.block_out_channels=[8, 16, 16]", "train.tracker=none", "eval.every=0", "train.mixed_precision=null"],
    "teacher_fashion_mnist_dit.yaml": ["model.num_layers=1", "model.attention_head_dim=8", "model.num_attention_heads=2", "train.tracker=none"],
}


@pytest.mark.parametrize("recipe", sorted(TINY))
def test_recipe_smoke(recipe, tmp_path):
    overrides = [*TINY[recipe], "train.steps=3", "train.batch_size=8", "train.checkpoint_every=2", f"output_dir={tmp_path / 'out'}"]
    cfg = load_config(TeacherRecipe, f"recipes/{recipe}", overrides)
    out = train_teacher(cfg, progress=False)
    assert out == tmp_path / "out" / "teacher"
    assert (tmp_path / "out" / "checkpoints" / "step_00000002" / "ema.safetensors").is_file()  # the trainer's checkpoints
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and math.isfinite(record["final_loss_mean_last_200"])
    assert record["history"][-1]["step"] == 3 and "loss/denoiser/denoising" in record["history"][-1]
    pipe = load_pipeline(out)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(images).all()
    # what was saved is the trained (EMA) model, not the initialisation the same seed builds
    set_seed(cfg.train.seed)
    init = build_model(cfg.model, images.shape[1], images.shape[2], 10).state_dict()
    saved = (pipe.unet if cfg.model.kind == "unet" else pipe.transformer).state_dict()
    assert init.keys() == saved.keys()
    changed = [k for k in init if not torch.equal(init[k], saved[k])]
    assert len(changed) > len(init) // 2, f"only {len(changed)} of {len(init)} tensors moved in training"
    with pytest.raises(InputError, match="already exists"):
        train_teacher(cfg, progress=False)  # never overwrites a finished teacher


def test_recipe_train_section_maps_onto_the_trainer():
    """The teacher recipe's keys keep their meaning on the trainer: AdamW, warm-up, EMA decay, clip, steps, batch."""
    cfg = load_config(TeacherRecipe, "recipes/teacher_digits.yaml", ["train.weight_decay=0.01", "train.grad_clip=0.5"]).train
    t = trainer_config(cfg)
    assert (t.steps, t.batch_size, t.ema_decay, t.grad_clip, t.seed) == (2000, 128, 0.999, 0.5, 0)
    assert (t.optim.kind, t.optim.lr, t.optim.warmup_steps, t.optim.weight_decay) == ("adamw", 0.001, 200, 0.01)


def test_continue_from_a_teacher(tmp_path):
    tiny = [*TINY["teacher_digits.yaml"], "train.batch_size=8"]
    first = train_teacher(load_config(TeacherRecipe, "recipes/teacher_digits.yaml",
                                      [*tiny, "train.steps=2", f"output_dir={tmp_path / 'a'}"]), progress=False)  # fmt: skip
    cfg = load_config(TeacherRecipe, "recipes/teacher_digits.yaml",
                      [*tiny, "train.steps=1", f"train.init_from={first}", f"output_dir={tmp_path / 'b'}"])  # fmt: skip
    record = json.loads((train_teacher(cfg, progress=False) / "training.json").read_text())
    assert record["steps"] == 3 and record["continued_from"]["folder"] == str(first)
    other = load_config(TeacherRecipe, "recipes/teacher_digits.yaml",
                        ["model.block_out_channels=[16, 32]", "train.steps=1", f"train.init_from={first}", f"output_dir={tmp_path / 'c'}"])  # fmt: skip
    with pytest.raises(InputError, match="does not match the recipe's model"):
        train_teacher(other, progress=False)
    assert not (tmp_path / "c").exists()


def test_teacher_evaluates_during_training_and_eval_settings_do_not_block_resume(tmp_path):
    """eval.every: the EMA teacher's domain FID (DDIM, eval.steps) at every eval.every steps and at the end, equal to
    scoring the saved teacher by hand; a sample grid per evaluation; changing eval settings keeps --resume working."""
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import fid_of_samples
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    base = [*TINY["teacher_digits.yaml"], "train.batch_size=8", "train.checkpoint_every=2", f"output_dir={tmp_path / 'out'}",
            "eval.every=2", "eval.num_samples=20", "eval.steps=3", "eval.grid=4"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):  # stop after the step-2 checkpoint, as an interruption would
        _interrupt_after(3, lambda: train_teacher(load_config(TeacherRecipe, "recipes/teacher_digits.yaml", [*base, "train.steps=4"]),
                                                  progress=False))  # fmt: skip
    cfg = load_config(TeacherRecipe, "recipes/teacher_digits.yaml", [*base, "train.steps=4", "eval.num_samples=24"])
    out = train_teacher(cfg, resume="latest", progress=False)  # another eval section: still the same run
    rows = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(set(r) == {"step", "fid_3nfe"} for r in rows)
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    pipe = load_pipeline(out)
    pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
    extractor = load_extractor("digits")
    reference = source_features(load_source("digits:test", 1), extractor)
    by_hand = fid_of_samples(sample_pipeline(pipe, 24, 3, 1.0, seed=0).images, extractor, reference)
    assert rows[-1]["fid_3nfe"] == pytest.approx(by_hand, rel=1e-5)


def _interrupt_after(calls: int, run):
    """Run ``run()`` with the trainer's optimiser steps counted; raise KeyboardInterrupt at step ``calls``."""
    from unittest import mock

    import fastdiff.training.trainer as trainer

    original, count = trainer._phase_step, {"n": 0}

    def counted(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with mock.patch.object(trainer, "_phase_step", counted):
        return run()


@pytest.mark.parametrize("override", ["eval.every=-1", "eval.num_samples=1", "eval.steps=0", "eval.grid=-2"])
def test_bad_eval_settings_are_refused(override):
    with pytest.raises(InputError, match=f"eval.{override.split('.')[1].split('=')[0]} must be >="):
        load_config(TeacherRecipe, "recipes/teacher_digits.yaml", [override])
