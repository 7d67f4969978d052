"""LCM-LoRA on a tiny Stable Diffusion pipeline built here: only the adapter trains, the teacher is the UNet with the
adapter off, and the saved LoRA loads back into a stock StableDiffusionPipeline with LCMScheduler; captioned images
are encoded per batch (the pipeline's own prompt embeddings; latents independent of how the batch is split), from a
map-style folder or streamed."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_cond_unet, tiny_sd_pipeline
from PIL import Image

from fastdiff.training.config import from_dict, load_config
from fastdiff.errors import InputError
from fastdiff.training.sd_lora import CaptionedFolder, CaptionRows, SDLoRARecipe, captioned_source, lcm_objective, run_sd_lora


def _captioned(folder):
    folder.mkdir()
    lines = []
    for i in range(4):
        Image.fromarray((torch.rand(10, 12, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": "a photo" if i % 2 else "photo"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_lcm_lora_trains_adapter_only_and_loads_into_stock_pipeline(tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    base = tiny_sd_pipeline(tmp_path)
    base.save_pretrained(tmp_path / "sd")
    recipe = from_dict(SDLoRARecipe, {
        "output_dir": str(tmp_path / "run"),
        "sd": {"pretrained": str(tmp_path / "sd"), "data_root": str(_captioned(tmp_path / "data")), "resolution": 8, "lora_rank": 4,
               "num_workers": 1},
        "trainer": {"steps": 3, "batch_size": 2, "tracker": "none", "ema_decay": 0.0, "optim": {"kind": "adamw", "lr": 1e-2}},
    })  # fmt: skip
    lora = run_sd_lora(recipe, progress=False)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 16)
    before = pipe.unet(x, t, emb).sample
    pipe.load_lora_weights(lora)
    after = pipe.unet(x, t, emb).sample
    assert not torch.allclose(before, after)  # the adapter learned something and is applied
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    images = pipe("a photo", num_inference_steps=2, guidance_scale=1.0, height=8, width=8, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 8, 8, 3)


def test_dmd2_lora_saves_the_generator_adapter_for_stock_pipelines(tmp_path):
    """DMD2 in the one-base layout on a tiny SD pipeline: only the two adapters train, the file saved holds the
    generator's adapter alone (not the fake score's), and a stock StableDiffusionPipeline loads it with
    load_lora_weights and samples one step with LCMScheduler at t = 999; bad DMD settings fail before any loading."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    tiny_sd_pipeline(tmp_path).save_pretrained(tmp_path / "sd")
    recipe = from_dict(SDLoRARecipe, {
        "objective": "dmd2-lora", "output_dir": str(tmp_path / "run"),
        "sd": {"pretrained": str(tmp_path / "sd"), "data_root": str(_captioned(tmp_path / "data")), "resolution": 8, "lora_rank": 4,
               "num_workers": 1},
        "dmd": {"guidance_scale": 1.75, "gan_generator_weight": 1e-3, "gan_critic_weight": 1e-2},
        "trainer": {"steps": 3, "batch_size": 2, "tracker": "none", "ema_decay": 0.0, "optim": {"kind": "adamw", "lr": 1e-2},
                    "phase_optim": {"generator": {"kind": "adamw", "lr": 1e-2, "update_every": 2}}},
    })  # fmt: skip
    lora = run_sd_lora(recipe, progress=False)
    saved = load_file(lora / "pytorch_lora_weights.safetensors")
    assert saved and all("lora" in k and "generator" not in k and "fake" not in k for k in saved)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 77, 16)
    before = pipe.unet(x, t, emb).sample
    pipe.load_lora_weights(lora)
    assert not torch.allclose(before, pipe.unet(x, t, emb).sample)  # the generator's adapter learned and is applied
    adapted = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(saved) == 2 * len(adapted) and all(len(m.lora_A) == 1 for m in adapted)  # A and B of one adapter per layer
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1, timestep_spacing="trailing")
    images = pipe("a photo", num_inference_steps=1, guidance_scale=0.0, height=8, width=8, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 4, 8, 8) and torch.isfinite(images).all() and int(pipe.scheduler.timesteps[0]) == 999
    for bad, message in (({"sd": {"lora_rank": None}}, "set sd.lora_rank"), ({"dmd": {"divergence": "forward_kl"}}, "reverse_kl"),
                         ({"dmd": {"gan_critic_weight": 0.0}}, "gan_critic_weight > 0"), ({"dmd": {"lora_rank": 8}}, "remove dmd.lora_rank")):  # fmt: skip
        broken = from_dict(SDLoRARecipe, {"objective": "dmd2-lora", "output_dir": str(tmp_path / "x"), **{
            k: {**getattr(recipe, k).__dict__, **v} for k, v in bad.items()}})  # fmt: skip
        with pytest.raises(InputError, match=message):
            run_sd_lora(broken, progress=False)


def test_lcm_lora_bad_input(tmp_path):
    recipe = from_dict(SDLoRARecipe, {"output_dir": str(tmp_path / "run"), "sd": {"pretrained": str(tmp_path)}})
    with pytest.raises(InputError, match="not a local diffusers pipeline folder"):
        run_sd_lora(recipe)
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="needs a metadata.jsonl"):
        CaptionedFolder(tmp_path / "d", 8, None)
    (tmp_path / "d" / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(InputError, match="missing.png does not exist"):
        CaptionedFolder(tmp_path / "d", 8, None)
    with pytest.raises(InputError, match="no column 'caption'.*set sd.image_column / sd.caption_column"):
        CaptionRows(None, 8, caption_column="caption")({"image": None, "text": "x"})


def test_full_lcm_student_with_guidance_embedding_runs_in_lcm_pipeline(tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    from fastdiff.objectives import guidance_embedding

    base = tiny_sd_pipeline(tmp_path)
    w = torch.tensor([0.0, 4.5, 14.0])
    lcm_pipe_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(guidance_embedding(w, 32), lcm_pipe_embedding)
    base.save_pretrained(tmp_path / "sd")
    recipe = from_dict(SDLoRARecipe, {
        "output_dir": str(tmp_path / "run"),
        "sd": {"pretrained": str(tmp_path / "sd"), "data_root": str(_captioned(tmp_path / "data")), "resolution": 8, "lora_rank": None,
               "guidance_embedding_dim": 32, "num_workers": 0},
        "trainer": {"steps": 2, "batch_size": 2, "tracker": "none", "optim": {"kind": "adamw", "lr": 1e-3}},
    })  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(run_sd_lora(recipe, progress=False))
    assert unet.config.time_cond_proj_dim == 32
    pipe = LatentConsistencyModelPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                          scheduler=LCMScheduler.from_config(base.scheduler.config), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo", num_inference_steps=2, guidance_scale=8.0, height=8, width=8, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_sd_recipe_loss_is_diffusers_elementwise_pseudo_huber():
    """recipes/lcm_lora_sd15.yaml trains on mean(sqrt((f_student - f_target)^2 + c^2) - c), c = 0.001: what the
    LCM-LoRA commands of diffusers' README run (--loss_type huber), not iCT's whole-sample pseudo-Huber."""
    from diffusers import DDPMScheduler

    from fastdiff.objectives import TextConditioner

    recipe = load_config(SDLoRARecipe, Path(__file__).resolve().parent.parent / "recipes" / "lcm_lora_sd15.yaml")
    cond = TextConditioner(torch.randn(3, 5, 16), torch.zeros(5, 16))
    obj = lcm_objective(recipe.sd, tiny_cond_unet(), dict(DDPMScheduler().config), cond)
    calls, consistency_fn = [], obj.consistency_fn

    def record(*args):  # (model, x_t, t, cond): the student's f, then the target's
        calls.append((consistency_fn(*args), args[2]))
        return calls[-1][0]

    obj.consistency_fn = record
    out = obj({"x": torch.randn(2, 4, 8, 8), "labels": torch.tensor([0, 2]), "seeds": torch.tensor([1, 2])}, "student", 0)
    (student, _), (target, t_prev) = calls
    assert bool((t_prev > 0).all())  # no sample at the boundary, where the target would be x_prev itself
    c = 0.001
    by_hand = (((student.double() - target.double()) ** 2 + c * c).sqrt() - c).mean()
    torch.testing.assert_close(out.terms["distillation"].double(), by_hand, rtol=1e-5, atol=0)


def test_batches_are_encoded_on_the_fly(tmp_path):
    """Map-style folder and streamed folder give the same batches: latents one posterior draw per sample (the same
    whatever the split over processes), prompt embeddings exactly the pipeline's encode_prompt."""
    pytest.importorskip("datasets")
    pytest.importorskip("torchdata")
    pipe = tiny_sd_pipeline(tmp_path)
    data = _captioned(tmp_path / "data")
    recipe = from_dict(SDLoRARecipe, {"sd": {"data_root": str(data), "resolution": 8, "num_workers": 0}})
    whole = next(captioned_source(recipe.sd, pipe, 4).batches(0))
    halves = [next(captioned_source(recipe.sd, pipe, 4).batches(0, rank, 2)) for rank in range(2)]
    torch.testing.assert_close(whole["x"], torch.cat([h["x"] for h in halves]), rtol=1e-5, atol=1e-6)
    assert whole["x"].shape == (4, 4, 8, 8) and whole["labels"].shape == (4, 77, 16)
    recipe.sd.streaming = True
    streamed = next(captioned_source(recipe.sd, pipe, 4).batches(0))  # the folder in file order
    texts = ["a photo" if i % 2 else "photo" for i in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(streamed["labels"], pipe.encode_prompt(texts, "cpu", 1, False)[0])
        dist = pipe.vae.encode(torch.stack([CaptionedFolder(data, 8, pipe.tokenizer)[i]["x"] for i in range(4)])).latent_dist
    noise = (streamed["x"] / pipe.vae.config.scaling_factor - dist.mean) / dist.std
    assert noise.std() > 0.5 and not torch.allclose(noise[0], noise[1])  # a draw per sample, not the mean


def test_lcm_lora_streams_captioned_images(tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("torchdata")
    tiny_sd_pipeline(tmp_path).save_pretrained(tmp_path / "sd")
    recipe = from_dict(SDLoRARecipe, {
        "output_dir": str(tmp_path / "run"),
        "sd": {"pretrained": str(tmp_path / "sd"), "data_root": str(_captioned(tmp_path / "data")), "resolution": 8, "lora_rank": 4,
               "streaming": True, "num_workers": 1},
        "trainer": {"steps": 3, "batch_size": 2, "checkpoint_every": 2, "tracker": "none", "ema_decay": 0.0, "optim": {"kind": "adamw", "lr": 1e-2}},
    })  # fmt: skip
    lora = run_sd_lora(recipe, progress=False)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "data_state_0.pt").is_file()  # where the stream stands


def test_scott_lora_recipe_runs_three_steps_on_a_tiny_sd_pipeline(tmp_path):
    """recipes/scott_sd15.yaml as written (bf16 aside) on a tiny random SD pipeline: the stochastic 3-sub-step teacher,
    the latent discriminator's phase, and a LoRA that a stock pipeline loads."""
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline(tmp_path).save_pretrained(tmp_path / "sd")
    recipe = load_config(SDLoRARecipe, Path(__file__).resolve().parent.parent / "recipes" / "scott_sd15.yaml", [
        f"output_dir={tmp_path / 'run'}", f"sd.pretrained={tmp_path / 'sd'}", f"sd.data_root={_captioned(tmp_path / 'data')}",
        "sd.resolution=64", "sd.lora_rank=4", "sd.num_workers=1", "trainer.steps=3", "trainer.batch_size=2", "trainer.tracker=none",
        "trainer.mixed_precision=no"])  # fmt: skip
    assert (recipe.scott.eta, recipe.scott.substeps, recipe.scott.adversarial_weight) == (0.3, 3, 0.4)
    lora = run_sd_lora(recipe, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora)
    history = json.loads((lora / "training.json").read_text())["history"]
    assert any("loss/discriminator/adversarial" in h for h in history) and any("loss/student/adversarial" in h for h in history)
