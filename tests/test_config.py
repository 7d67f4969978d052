"""Typed YAML recipes: overrides, unknown keys and wrong types are named."""

import pytest

from fastdiff.training.config import load_config, to_dict
from fastdiff.errors import InputError
from fastdiff.training.teacher import TeacherRecipe


def test_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  name: digits\ntrain:\n  steps: 10\n  lr: 1\nmodel:\n  block_out_channels: [8, 16]\n")
    r = load_config(TeacherRecipe, path, ["train.lr=2e-4", "model.kind=dit", "data.root=null"])
    assert r.train.steps == 10 and r.train.lr == 2e-4 and isinstance(r.train.lr, float)
    assert r.model.kind == "dit" and r.model.block_out_channels == (8, 16)
    assert to_dict(r)["model"]["block_out_channels"] == [8, 16]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  stpes: 10\n", [], r"unknown key 'train.stpes'; expected one of train.steps"),
        ("train:\n  steps: ten\n", [], r"key 'train.steps' expects int; got str 'ten'"),
        ("", ["model.kind=vae"], r"key 'model.kind' must be one of 'unet', 'dit'; got 'vae'"),
        ("", ["train.lr"], r"must look like key.sub=value"),
        ("model: 3\n", [], r"model must be a mapping"),
        ("- a\n", [], r"mapping of keys at the top level"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(TeacherRecipe, path, overrides)


def test_missing_recipe(tmp_path):
    with pytest.raises(InputError, match="recipe not found"):
        load_config(TeacherRecipe, tmp_path / "nope.yaml")


def test_phase_optim_values_become_typed_optimiser_configs(tmp_path):
    """``trainer.phase_optim`` maps phase names to OptimConfig (not plain dicts the trainer cannot read); a bad key
    inside one is named with its full path."""
    from fastdiff.training.distill import DistillRecipe
    from fastdiff.training.trainer import OptimConfig

    path = tmp_path / "r.yaml"
    path.write_text("objective: dmd2\ntrainer:\n  phase_optim:\n    generator: {lr: 2e-6, update_every: 5}\n")
    recipe = load_config(DistillRecipe, path)
    assert recipe.trainer.phase_optim == {"generator": OptimConfig(lr=2e-6, update_every=5)}
    path.write_text("objective: dmd2\ntrainer:\n  phase_optim:\n    generator: {lr: 2e-6, every: 5}\n")
    with pytest.raises(InputError, match="unknown key 'trainer.phase_optim.generator.every'"):
        load_config(DistillRecipe, path)


def test_yaml_11_booleans_read_as_the_word_meant(tmp_path):
    """``--set trainer.mixed_precision=no`` (and ``mixed_precision: no`` in a file) reach YAML as the bool False;
    a Literal that has the word takes it, and a bool that matches no word is still an error."""
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(TeacherRecipe, path).train.mixed_precision == "no"
    assert load_config(TeacherRecipe, path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(InputError, match="train.loss_weighting"):
        load_config(TeacherRecipe, path, ["train.loss_weighting=yes"])
