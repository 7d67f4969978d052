"""Every recipe in recipes/ parses into its typed config; each consistency recipe runs a few steps on a tiny model
and its student loads back into a diffusers pipeline and samples."""

from pathlib import Path

import pytest
import torch

from fastdiff.config import load_config, recipe_objective
from fastdiff.distill import DistillRecipe, run_distill
from fastdiff.teacher import TeacherRecipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses(path):
    from fastdiff.lcm_lora import LCMLoRARecipe

    cls = {"denoising": TeacherRecipe, "lcm-lora": LCMLoRARecipe}.get(recipe_objective(path), DistillRecipe)
    recipe = load_config(cls, path)
    assert recipe.expected, f"{path.name} must state its expected cost and result"


CPU_RECIPES = [p for p in RECIPES if recipe_objective(p) in ("ict", "ilct", "cd") and "digits" in p.stem]


@pytest.mark.parametrize("path", CPU_RECIPES, ids=[p.stem for p in CPU_RECIPES])
def test_consistency_recipe_smoke(path, tmp_path):
    from diffusers import DiffusionPipeline

    from fastdiff.pipelines import ClassConditionalPipeline

    overrides = [f"output_dir={tmp_path / 'run'}", "trainer.steps=3", "trainer.batch_size=16", "trainer.tracker=none",
                 "eval.num_samples=10", "eval.steps=[1]", "eval.grid=4"]  # fmt: skip
    if recipe_objective(path) != "cd":
        overrides += ["model.block_out_channels=[8, 16]", "model.attention=false"]
    student = run_distill(load_config(DistillRecipe, path, overrides), progress=False)
    assert (tmp_path / "run" / "samples" / "step_00000003.png").is_file() and (tmp_path / "run" / "eval.jsonl").is_file()
    pipe = ClassConditionalPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    again = DiffusionPipeline.from_pretrained(student, custom_pipeline="pipeline", trust_remote_code=True)
    assert type(again.scheduler).__name__ == ("LCMScheduler" if "cd_" in path.stem else "CMStochasticIterativeScheduler")
