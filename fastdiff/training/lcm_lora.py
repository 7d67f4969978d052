"""LCM and LCM-LoRA: consistency distillation of a Stable Diffusion UNet (Luo et al. 2023), on the trainer and
:class:`~fastdiff.objectives.ConsistencyDistillation`: into a LoRA adapter (``sd.lora_rank``), or into a
full student with LCM's guidance-scale embedding (``sd.lora_rank: null``), saved as a ``unet`` folder that
``LatentConsistencyModelPipeline`` takes (``unet=UNet2DConditionModel.from_pretrained(folder)``).

Data is a local folder of images with captions in ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line,
the Hugging Face imagefolder layout). Images are encoded once by the pipeline's VAE and captions once by its text
encoder; the UNet keeps its weights and learns only the adapter; the teacher is the same UNet with the adapter off
and guidance ``w ~ U[guidance_scale, guidance_max]``; the target is the student under stop-gradient (no EMA copy).
The result is a LoRA file that any Stable Diffusion pipeline loads with ``pipe.load_lora_weights(folder)`` and
samples in 2-8 steps with diffusers' ``LCMScheduler``. The whole folder is encoded into memory up front: fine for
thousands of images; web-scale data would need a streaming loader, which fastdiff does not have yet. Needs ``peft``
(``pip install fastdiff[lora]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fastdiff.errors import InputError
from fastdiff.training.trainer import TrainerConfig, train

__all__ = ["LCMLoRARecipe", "SDConfig", "load_captioned_folder", "lcm_objective", "run_lcm_lora", "save_lora"]


@dataclass
class SDConfig:
    pretrained: str = "runwayml/stable-diffusion-v1-5"  # a local diffusers Stable Diffusion folder
    data_root: str = "data/captioned"
    resolution: int = 512
    lora_rank: int | None = 64  # None: full LCM student with a guidance embedding (time_cond_proj_dim 256)
    guidance_embedding_dim: int = 256
    guidance_scale: float = 6.0  # w ~ U[6, 16] in D_u + w (D_c - D_u), i.e. LCM's w in [5, 15]
    guidance_max: float = 16.0
    num_ddim_timesteps: int = 50
    # diffusers' LCM(-LoRA) scripts: --loss_type defaults to "l2", but their README's SD-1.5 / SDXL commands pass
    # --loss_type="huber" -- the element-wise mean(sqrt((a - b)^2 + c^2) - c) with --huber_c 0.001 (default).
    loss: Literal["l2", "pseudo_huber", "pseudo_huber_elementwise"] = "pseudo_huber_elementwise"
    huber_c: float = 0.001


@dataclass
class LCMLoRARecipe:
    objective: str = "lcm-lora"
    sd: SDConfig = field(default_factory=SDConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs/lcm-lora"
    expected: str = ""


def load_captioned_folder(root: str | Path, resolution: int) -> tuple[Tensor, list[str]]:
    """Images (resized on the shorter side and centre-cropped to ``resolution``, RGB, [-1, 1]) and their captions."""
    from PIL import Image

    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise InputError(f"{root} needs a metadata.jsonl with one {{\"file_name\": ..., \"text\": ...}} per line")
    images, captions = [], []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path, text = root / row["file_name"], str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}; {err}") from None
        if not path.is_file():
            raise InputError(f"{meta}:{n}: {path} does not exist")
        img = Image.open(path).convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        captions.append(text)
    if not images:
        raise InputError(f"{meta} lists no images")
    return torch.stack(images), captions


@torch.no_grad()
def _encode(pipe, images: Tensor, captions: list[str], batch: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """VAE latents (scaled by the VAE's ``scaling_factor``), caption embeddings and the empty prompt's embedding."""
    vae = pipe.vae
    latents = torch.cat([vae.encode(images[i : i + batch].to(vae.device, vae.dtype)).latent_dist.sample(torch.Generator().manual_seed(i))
                         for i in range(0, len(images), batch)]) * vae.config.scaling_factor  # fmt: skip

    def embed(texts):
        return pipe.encode_prompt(texts, pipe.device, 1, False)[0]

    prompts = torch.cat([embed(captions[i : i + batch]) for i in range(0, len(captions), batch)])
    return latents.float().cpu(), prompts.float().cpu(), embed([""]).float().cpu()


def save_lora(unet, folder: str | Path) -> Path:
    """The adapter as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA layout (``pipe.load_lora_weights``)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return Path(folder)


def lcm_objective(sd: SDConfig, unet, scheduler_config: dict, conditioner):
    """The :class:`~fastdiff.objectives.ConsistencyDistillation` of ``sd`` for a Stable Diffusion
    ``unet`` (LoRA on it, or a full student with a guidance embedding) and its scheduler's config."""
    from fastdiff.objectives import ConsistencyDistillation
    from fastdiff.schedules import VPSchedule

    return ConsistencyDistillation(
        unet, VPSchedule.from_config(scheduler_config), scheduler_config.get("prediction_type", "epsilon"), conditioner,
        num_ddim_timesteps=sd.num_ddim_timesteps, guidance_scale=sd.guidance_scale, guidance_max=sd.guidance_max,
        loss=sd.loss, huber_c=sd.huber_c, lora_rank=sd.lora_rank, target_ema=0.0 if sd.lora_rank else 0.95,
        guidance_embedding=None if sd.lora_rank else sd.guidance_embedding_dim,
    )  # fmt: skip


def run_lcm_lora(recipe: LCMLoRARecipe, resume: str | None = None, progress: bool = True) -> Path:
    """Distil ``recipe.sd.pretrained`` into a LoRA adapter saved in ``output_dir/lora``."""
    from diffusers import StableDiffusionPipeline

    from fastdiff.training.config import to_dict
    from fastdiff.objectives import TextConditioner

    out = Path(recipe.output_dir)
    for name in ("lora", "unet"):
        if (out / name).exists():
            raise InputError(f"{out / name} already exists; remove it or pass --set output_dir=NEW_DIR")
    sd = recipe.sd
    if not (Path(sd.pretrained) / "model_index.json").is_file():
        raise InputError(f"sd.pretrained={sd.pretrained} is not a local diffusers pipeline folder (no model_index.json); "
                         "fastdiff does not download weights")  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(sd.pretrained, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    images, captions = load_captioned_folder(sd.data_root, sd.resolution)
    latents, prompts, null = _encode(pipe, images, captions)
    objective = lcm_objective(sd, pipe.unet, dict(pipe.scheduler.config), TextConditioner(prompts, null))
    fingerprint = {k: v for k, v in to_dict(recipe).items() if k != "expected"}
    unet, record = train(objective, latents, torch.arange(len(captions)), recipe.trainer, out, fingerprint, resume=resume, progress=progress)
    name = "lora" if sd.lora_rank else "unet"
    if record["is_main_process"]:
        tmp = out / f"{name}.tmp"
        save_lora(unet, tmp) if sd.lora_rank else unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps({"recipe": to_dict(recipe), "history": record["history"][-20:]}, indent=2) + "\n")
        tmp.rename(out / name)
    return out / name
