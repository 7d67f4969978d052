"""Every recipe in recipes/ parses into its typed config; each consistency recipe runs a few steps on a tiny model
and its student loads back into a diffusers pipeline and samples."""

from pathlib import Path

import pytest
import torch

from fastdiff.training.config import load_config, recipe_objective
from fastdiff.training.distill import DistillRecipe, build_objective, run_distill
from fastdiff.training.teacher import TeacherRecipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses(path):
    from fastdiff.training.sd_lora import SDLoRARecipe

    cls = {"denoising": TeacherRecipe, "lcm-lora": SDLoRARecipe, "scott-lora": SDLoRARecipe, "dmd2-lora": SDLoRARecipe}.get(recipe_objective(path), DistillRecipe)
    recipe = load_config(cls, path)
    assert recipe.expected, f"{path.name} must state its expected cost and result"


CPU_RECIPES = [p for p in RECIPES if recipe_objective(p) in ("ict", "ilct", "cd", "scott", "dmd2", "f_distill", "ctm", "reflow") and "digits" in p.stem]


@pytest.mark.parametrize("path", CPU_RECIPES, ids=[p.stem for p in CPU_RECIPES])
def test_consistency_recipe_smoke(path, tmp_path):
    from diffusers import DiffusionPipeline

    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline

    overrides = [f"output_dir={tmp_path / 'run'}", "trainer.steps=3", "trainer.batch_size=16", "trainer.tracker=none",
                 "eval.num_samples=10", "eval.steps=[1]", "eval.grid=4"]  # fmt: skip
    if recipe_objective(path) not in ("cd", "scott", "ctm", "reflow"):
        overrides += ["model.block_out_channels=[8, 16]", "model.attention=false"]
    if recipe_objective(path) == "ctm":
        overrides += ["ctm.gan_start=1"]  # the GAN term and the discriminator phase run within 3 steps
    if recipe_objective(path) == "reflow":
        overrides += [f"reflow.pairs={tmp_path / 'pairs'}", "reflow.num_pairs=40", "reflow.pair_steps=2"]
    student = run_distill(load_config(DistillRecipe, path, overrides), progress=False)
    assert (tmp_path / "run" / "samples" / "step_00000003.png").is_file() and (tmp_path / "run" / "eval.jsonl").is_file()
    pipe = ClassConditionalPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    steps = 1 if recipe_objective(path) in ("dmd2", "f_distill") else 2  # a one-step generator
    images = pipe(class_labels=[0, 1], num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    again = DiffusionPipeline.from_pretrained(student, custom_pipeline="pipeline", trust_remote_code=True)
    expected = {"ict": "CMStochasticIterativeScheduler", "ilct": "CMStochasticIterativeScheduler", "ctm": "CTMScheduler",
                "reflow": "FlowMatchEulerDiscreteScheduler"}
    assert type(again.scheduler).__name__ == expected.get(recipe_objective(path), "LCMScheduler")


TINY_UNET = ["model.block_out_channels=[8, 16]", "model.layers_per_block=1", "model.attention=false"]


def test_ict_cifar10_recipe_trains_an_unconditional_student():
    """iCT's CIFAR-10 FIDs (2.51 / 2.24 for iCT-deep) are unconditional: the recipe's student has no class embedding
    and its objective needs no labels."""
    recipe = load_config(DistillRecipe, ROOT / "recipes" / "ict_cifar10.yaml", TINY_UNET)
    objective, _ = build_objective(recipe, 3, 8, 10)
    assert objective.net.config.num_class_embeds is None and objective.conditioner is None
    batch = {"x": torch.rand(2, 3, 8, 8) * 2 - 1, "seeds": torch.arange(2)}
    assert torch.isfinite(objective(batch, "student", 0).total)


def test_unconditional_recipe_student_samples_in_diffusers_consistency_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from fastdiff.denoisers import consistency_precond
    from fastdiff.errors import InputError
    from fastdiff.samplers import sample_consistency

    overrides = [f"output_dir={tmp_path / 'run'}", "trainer.steps=2", "trainer.batch_size=16", "trainer.tracker=none",
                 "eval.num_samples=10", "eval.steps=[1]", "eval.grid=0", "conditional=false", "p_uncond=0", *TINY_UNET]  # fmt: skip
    student = run_distill(load_config(DistillRecipe, ROOT / "recipes" / "ict_digits.yaml", overrides), progress=False)
    pipe = DiffusionPipeline.from_pretrained(student)
    assert type(pipe).__name__ == "ConsistencyModelPipeline" and pipe.unet.config.num_class_embeds is None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80.0
    with torch.no_grad():
        ours = sample_consistency(consistency_precond(pipe.unet, noise_scale=1000.0), x, torch.tensor([80.0, 0.0]), {})
    torch.testing.assert_close(images, (ours / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="conditional: false is for iCT/iLCT"):
        build_objective(load_config(DistillRecipe, ROOT / "recipes" / "ict_digits.yaml", ["conditional=false"]), 1, 8, 10)


def test_dmd2_lora_layout_recipe_ships_a_plain_student(tmp_path):
    """dmd.lora_rank: the student folder holds the generator with its adapter merged: a plain diffusers model that
    loads back and samples, with the teacher's parameter count."""
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline

    overrides = [f"output_dir={tmp_path / 'run'}", "trainer.steps=2", "trainer.batch_size=8", "trainer.tracker=none",
                 "eval.num_samples=4", "eval.grid=0", "dmd.lora_rank=2", "dmd.gradient_checkpointing=true"]  # fmt: skip
    student = run_distill(load_config(DistillRecipe, ROOT / "recipes" / "dmd2_digits.yaml", overrides), progress=False)
    pipe = ClassConditionalPipeline.from_pretrained(student)
    teacher = ClassConditionalPipeline.from_pretrained(ROOT / "fastdiff" / "assets" / "teachers" / "digits")
    assert sum(p.numel() for p in pipe.model.parameters()) == sum(p.numel() for p in teacher.model.parameters())
    assert not any("lora" in n for n, _ in pipe.model.named_parameters())
    images = pipe(class_labels=[3], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.isfinite(images).all()


def _tiny_cifar(tmp_path):
    """A tiny random class-conditional RGB teacher folder and an image folder with two class subfolders (8x8)."""
    from PIL import Image

    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, save_teacher
    from fastdiff.training.teacher import ModelConfig, ScheduleConfig, build_model, scheduler_for

    g = torch.Generator().manual_seed(0)
    for label in ("airplane", "cat"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    net = build_model(ModelConfig(block_out_channels=(8, 16), attention=False), 3, 8, 2)
    save_teacher(ClassConditionalPipeline(unet=net, scheduler=scheduler_for(ScheduleConfig())), tmp_path / "teacher")
    return [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.size=8", "trainer.steps=3", "trainer.batch_size=4",
            "trainer.mixed_precision=no", "trainer.tracker=none", "eval.num_samples=4", "eval.grid=0"]  # fmt: skip


def _samples_back(student, channels=3):
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 1], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert images.shape == (2, channels, 8, 8) and torch.isfinite(images).all()
    return pipe


def test_dmd2_cifar10_recipe_runs_three_steps_on_tiny_random_components(tmp_path):
    """The GPU recipe as written (bf16 aside: CPU), on a tiny random class-conditional RGB teacher and an image folder
    with class subfolders: labels reach the teacher, generator and GAN, and the student loads back."""
    overrides = [*_tiny_cifar(tmp_path), f"dmd.teacher={tmp_path / 'teacher'}"]
    recipe = load_config(DistillRecipe, ROOT / "recipes" / "dmd2_cifar10.yaml", overrides)
    assert (recipe.trainer.batch_size, recipe.dmd.gan_generator_weight, recipe.objective) == (4, 1e-3, "dmd2")
    _samples_back(run_distill(recipe, progress=False))


def test_ctm_cifar10_recipe_runs_three_steps_with_offline_lpips_and_the_gan(tmp_path, capsys):
    """The CTM GPU recipe on tiny random components, LPIPS from a randomly initialised VGG-16 file the test writes
    (through `fastdiff train --lpips-weights`), the GAN from step 1: the student is a two-time model with CTMScheduler."""
    import torchvision

    from fastdiff.cli import main

    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg16.pth")
    overrides = [*_tiny_cifar(tmp_path), f"ctm.teacher={tmp_path / 'teacher'}", "ctm.gan_start=1", "ctm.num_scales=6", "ctm.max_jump=2"]
    assert main(["train", str(ROOT / "recipes" / "ctm_cifar10.yaml"), *(a for o in overrides for a in ("--set", o)),
                 "--lpips-weights", str(tmp_path / "vgg16.pth"), "--no-progress"]) in (0, None)  # fmt: skip
    pipe = _samples_back(tmp_path / "run" / "student")
    assert type(pipe.unet).__name__ == "TwoTimeModel" and type(pipe.scheduler).__name__ == "CTMScheduler"
    overrides[0] = f"output_dir={tmp_path / 'other'}"
    assert main(["train", str(ROOT / "recipes" / "ctm_cifar10.yaml"), *(a for o in overrides for a in ("--set", o))]) == 2
    assert "download https://download.pytorch.org/models/vgg16-397923af.pth and pass its path" in capsys.readouterr().err


def test_a_recipes_identity_leaves_out_other_objectives_sections():
    """Checkpoints and finished students are matched on the recipe's identity: a DMD2 run recorded before fastdiff had
    a CTM section (or with other CTM defaults) is the same run; a change to its own section is not."""
    from fastdiff.training.config import to_dict
    from fastdiff.training.distill import recipe_identity

    recipe = to_dict(load_config(DistillRecipe, ROOT / "recipes" / "dmd2_digits.yaml"))
    older = {k: v for k, v in recipe.items() if k != "ctm"}
    assert recipe_identity(older) == recipe_identity(recipe) == recipe_identity({**recipe, "ctm": {"max_jump": 3}})
    assert recipe_identity({**recipe, "dmd": {**recipe["dmd"], "generator_steps": 4}}) != recipe_identity(recipe)
    assert "expected" not in recipe_identity(recipe) and "dmd" in recipe_identity(recipe) and "distill" not in recipe_identity(recipe)


def test_reflow_cifar10_recipe_runs_three_steps_with_offline_lpips(tmp_path):
    """The reflow GPU recipe on tiny random components: pairs made from the tiny teacher, LPIPS-Huber-1/t with a
    random VGG-16 file; the student is a flow-matching model that loads back with FlowMatchEulerDiscreteScheduler."""
    import torchvision

    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg16.pth")
    overrides = [*_tiny_cifar(tmp_path), f"reflow.teacher={tmp_path / 'teacher'}", f"reflow.pairs={tmp_path / 'pairs'}",
                 "reflow.num_pairs=8", "reflow.pair_steps=2", f"reflow.lpips_weights={tmp_path / 'vgg16.pth'}"]  # fmt: skip
    pipe = _samples_back(run_distill(load_config(DistillRecipe, ROOT / "recipes" / "reflow_cifar10.yaml", overrides), progress=False))
    assert type(pipe.unet).__name__ == "VPFlowModel" and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
