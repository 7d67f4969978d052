"""Distillation of a Stable Diffusion UNet on the trainer, into a LoRA adapter or a full student.

* ``objective: lcm-lora`` -- LCM and LCM-LoRA (Luo et al. 2023), :class:`~fastdiff.objectives.ConsistencyDistillation`:
  into a LoRA adapter (``sd.lora_rank``), or into a full student with LCM's guidance-scale embedding
  (``sd.lora_rank: null``), saved as a ``unet`` folder that ``LatentConsistencyModelPipeline`` takes
  (``unet=UNet2DConditionModel.from_pretrained(folder)``). The teacher is the same UNet with the adapter off and
  guidance ``w ~ U[guidance_scale, guidance_max]``; the target is the student under stop-gradient (no EMA copy).
* ``objective: dmd2-lora`` -- DMD2 (Yin et al. 2024) in the one-frozen-base layout of
  :class:`~fastdiff.objectives.DistributionMatching`: the generator and the fake score are two LoRA adapters of rank
  ``sd.lora_rank`` on the UNet (the teacher: adapters off, guided by ``dmd.guidance_scale``), with gradient
  checkpointing, the GAN classifier on the fake score's mid-block reading the captioned images as real data. Only the
  generator's adapter is saved.
* ``objective: scott-lora`` -- SCott (Liu et al. 2025) as a LoRA: LCM-LoRA with the teacher's step made stochastic
  (``scott.eta``, ``scott.substeps``) and, with ``scott.adversarial_weight > 0``, a small t-conditioned discriminator
  on the latents (:class:`~fastdiff.objectives.critic.TimeDiscriminator`; the paper's discriminator -- a LoRA on the
  frozen SD UNet -- is not implemented), see :mod:`fastdiff.objectives.stochastic_consistency`.

Either result is a LoRA file that any Stable Diffusion pipeline loads with ``pipe.load_lora_weights(folder)`` and
samples with diffusers' ``LCMScheduler`` (LCM: 2-8 steps; DMD2: ``dmd.generator_steps`` steps, ``guidance_scale=0``).
Needs ``peft`` (``pip install fastdiff[lora]``).

Data: captioned images, read batch by batch and encoded on the fly on the training device (the VAE's latents, one
posterior draw per sample from its seed, and the text encoder's prompt embeddings), so no size limit. By default
``sd.data_root`` is a local folder with captions in ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per
line, the Hugging Face imagefolder layout), read as a map-style dataset: a resumed run is bit-exact. With
``sd.streaming: true`` it is streamed with Hugging Face ``datasets`` (``pip install fastdiff[data]``): that folder,
parquet files or webdataset ``.tar`` shards (``sd.image_column`` / ``sd.caption_column`` name the columns, e.g.
``jpg`` / ``txt``), split over processes; a resumed run continues at the next sample
(:mod:`fastdiff.training.data`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fastdiff.errors import InputError
from fastdiff.objectives import per_sample_randn
from fastdiff.objectives.conditioning import view
from fastdiff.training.data import DatasetSource, MappedSource, StreamSource, image_tensor, load_hf
from fastdiff.training.distill import DMDConfig, ScottConfig
from fastdiff.training.trainer import TrainerConfig, train

__all__ = ["SDLoRARecipe", "SDConfig", "CaptionedFolder", "CaptionRows", "LatentEncoder", "PromptEmbeddings", "captioned_source",
           "lcm_objective", "dmd_objective", "run_sd_lora", "save_lora"]


@dataclass
class SDConfig:
    pretrained: str = "runwayml/stable-diffusion-v1-5"  # a local diffusers Stable Diffusion folder
    data_root: str = "data/captioned"  # a folder with metadata.jsonl captions; streaming: also parquet / .tar shards
    streaming: bool = False  # stream data_root with Hugging Face datasets (resume: next sample) instead of map-style (bit-exact)
    image_column: str = "image"  # streaming: the columns holding the image and the caption
    caption_column: str = "text"
    num_workers: int = 4  # DataLoader worker processes per training process
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
class SDLoRARecipe:
    objective: Literal["lcm-lora", "scott-lora", "dmd2-lora"] = "lcm-lora"
    sd: SDConfig = field(default_factory=SDConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)  # dmd2-lora (its teacher and lora_rank: sd.pretrained, sd.lora_rank)
    scott: ScottConfig = field(default_factory=ScottConfig)  # scott-lora
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs/lcm-lora"
    expected: str = ""


def _tokens(tokenizer, text: str) -> Tensor:
    """The token ids the pipeline's ``encode_prompt`` feeds its text encoder (padded to the tokenizer's maximum)."""
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids[0]


class CaptionedFolder(Dataset):
    """A folder of images with captions in ``metadata.jsonl``, read lazily: item ``i`` is the image (resized on the
    shorter side and centre-cropped to ``resolution``, RGB, [-1, 1]) and its caption's token ids."""

    def __init__(self, root: str | Path, resolution: int, tokenizer):
        self.root, self.resolution, self.tokenizer = Path(root), resolution, tokenizer
        self.rows = _read_metadata(self.root)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        from PIL import Image

        path, text = self.rows[i]
        with Image.open(path) as img:
            return {"x": image_tensor(img, self.resolution), "labels": _tokens(self.tokenizer, text)}


def _read_metadata(root: Path) -> list[tuple[Path, str]]:
    """The (image path, caption) pairs ``root/metadata.jsonl`` lists, checked."""
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise InputError(f"{root} needs a metadata.jsonl with one {{\"file_name\": ..., \"text\": ...}} per line")
    rows = []
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
        rows.append((path, text))
    if not rows:
        raise InputError(f"{meta} lists no images")
    return rows


@dataclass
class CaptionRows:
    """A streamed row (Hugging Face ``datasets``) as a sample: its image as in :class:`CaptionedFolder`, its caption's
    token ids."""

    tokenizer: Any
    resolution: int
    image_column: str = "image"
    caption_column: str = "text"

    def __call__(self, row: dict) -> dict[str, Tensor]:
        missing = [c for c in (self.image_column, self.caption_column) if c not in row]
        if missing:
            raise InputError(f"the dataset's rows have no column {missing[0]!r} (columns: {', '.join(row)}); set sd.image_column / sd.caption_column")
        return {"x": image_tensor(row[self.image_column], self.resolution), "labels": _tokens(self.tokenizer, str(row[self.caption_column]))}


VAE_NOISE_STREAM = 11  # the per-sample random stream of the VAE posterior draw (the objectives use 0-3)


class LatentEncoder(nn.Module):
    """Per batch, on the training device: images to VAE latents (one posterior draw per sample, from its seed, times
    the VAE's ``scaling_factor``) and token ids to the text encoder's prompt embeddings (the batch's labels)."""

    def __init__(self, vae: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.vae, self.text_encoder = vae.requires_grad_(False).eval(), text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        dist = self.vae.encode(batch["x"].to(self.vae.dtype)).latent_dist
        latents = dist.mean + dist.std * per_sample_randn(dist.mean, batch["seeds"], VAE_NOISE_STREAM)
        prompts = self.text_encoder(batch["labels"])[0]
        return {"x": (latents * self.vae.config.scaling_factor).float(), "labels": prompts.float(), "seeds": batch["seeds"]}


class PromptEmbeddings(nn.Module):
    """Text conditioning from batches whose labels are prompt embeddings (:class:`LatentEncoder`); the empty prompt's
    embedding stands in where a sample's condition is dropped."""

    def __init__(self, null_embed: Tensor):
        super().__init__()
        self.register_buffer("null_embed", null_embed.reshape(1, *null_embed.shape[-2:]), persistent=False)

    def __call__(self, embeds: Tensor, null: Tensor) -> dict[str, Tensor]:
        return {"encoder_hidden_states": torch.where(view(null, embeds).bool(), self.null_embed.to(embeds.dtype), embeds)}

    def probe_labels(self, n: int, device: torch.device) -> Tensor:
        """``n`` valid labels (for a shape probe): the empty prompt's embedding."""
        return self.null_embed.to(device).expand(n, *self.null_embed.shape[1:])


def captioned_source(sd: SDConfig, pipe, batch_size: int, seed: int = 0) -> MappedSource:
    """The captioned images of ``sd.data_root`` (map-style, or streamed with ``sd.streaming``), encoded per batch by
    ``pipe``'s VAE and text encoder."""
    if sd.streaming:
        rows = CaptionRows(pipe.tokenizer, sd.resolution, sd.image_column, sd.caption_column)
        source = StreamSource(load_hf(sd.data_root, streaming=True), batch_size, rows, seed, sd.num_workers)
    else:
        source = DatasetSource(CaptionedFolder(sd.data_root, sd.resolution, pipe.tokenizer), batch_size, seed, num_workers=sd.num_workers)
    return MappedSource(source, LatentEncoder(pipe.vae, pipe.text_encoder))


def save_lora(unet, folder: str | Path, adapter: str = "default") -> Path:
    """The adapter ``adapter`` as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA layout (``pipe.load_lora_weights``)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet, adapter_name=adapter)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return Path(folder)


def lcm_objective(sd: SDConfig, unet, scheduler_config: dict, conditioner, scott: ScottConfig | None = None):
    """The :class:`~fastdiff.objectives.ConsistencyDistillation` of ``sd`` for a Stable Diffusion
    ``unet`` (LoRA on it, or a full student with a guidance embedding) and its scheduler's config; with ``scott``, the
    :class:`~fastdiff.objectives.stochastic_consistency.StochasticConsistency` around it."""
    from fastdiff.objectives import ConsistencyDistillation
    from fastdiff.schedules import VPSchedule

    teacher = (unet, VPSchedule.from_config(scheduler_config), scheduler_config.get("prediction_type", "epsilon"), conditioner)
    cd = dict(num_ddim_timesteps=sd.num_ddim_timesteps, guidance_scale=sd.guidance_scale, guidance_max=sd.guidance_max,
              loss=sd.loss, huber_c=sd.huber_c, lora_rank=sd.lora_rank, target_ema=0.0 if sd.lora_rank else 0.95,
              guidance_embedding=None if sd.lora_rank else sd.guidance_embedding_dim)  # fmt: skip
    if scott is None:
        return ConsistencyDistillation(*teacher, **cd)
    from fastdiff.objectives.critic import TimeDiscriminator
    from fastdiff.objectives.stochastic_consistency import StochasticConsistency

    channels, size = unet.config.in_channels, sd.resolution // 8  # the VAE's latents
    disc = TimeDiscriminator(channels, size, scheduler_config.get("num_train_timesteps", 1000)) if scott.adversarial_weight > 0 else None
    return StochasticConsistency(*teacher, eta=scott.eta, substeps=scott.substeps, discriminator=disc,
                                 adversarial_weight=scott.adversarial_weight, adaptive_adversary=scott.adaptive_adversary, **cd)  # fmt: skip


def _check_dmd(recipe: SDLoRARecipe) -> None:
    m = recipe.dmd
    if recipe.sd.lora_rank is None:
        raise InputError("objective dmd2-lora trains two LoRA adapters; set sd.lora_rank (e.g. 64)")
    if m.lora_rank is not None:
        raise InputError(f"objective dmd2-lora reads the adapters' rank from sd.lora_rank; remove dmd.lora_rank={m.lora_rank}")
    if m.divergence not in (None, "reverse_kl"):
        raise InputError(f"objective dmd2-lora is DMD2 (dmd.divergence reverse_kl); got dmd.divergence={m.divergence!r}")
    if m.gan_critic_weight <= 0 < m.gan_generator_weight:
        raise InputError("dmd.gan_generator_weight > 0 needs the classifier trained: set dmd.gan_critic_weight > 0")


def dmd_objective(recipe: SDLoRARecipe, unet, scheduler_config: dict, conditioner):
    """The DMD2 :class:`~fastdiff.objectives.DistributionMatching` of ``recipe`` on a Stable Diffusion ``unet``: two
    LoRA adapters (generator, fake score) on the frozen UNet, gradient checkpointing on."""
    from fastdiff.objectives import DistributionMatching
    from fastdiff.schedules import VPSchedule

    _check_dmd(recipe)
    m, rank = recipe.dmd, recipe.sd.lora_rank
    return DistributionMatching(
        unet, VPSchedule.from_config(scheduler_config), scheduler_config.get("prediction_type", "epsilon"), conditioner,
        guidance_scale=m.guidance_scale, generator_steps=m.generator_steps, dm_range=m.dm_range,
        gan_generator_weight=m.gan_generator_weight, gan_critic_weight=m.gan_critic_weight, lora_rank=rank,
        gradient_checkpointing=True,
    )  # fmt: skip


def run_sd_lora(recipe: SDLoRARecipe, resume: str | None = None, progress: bool = True) -> Path:
    """Distil ``recipe.sd.pretrained`` into a LoRA adapter saved in ``output_dir/lora`` (a full LCM student: ``unet``)."""
    from diffusers import StableDiffusionPipeline

    from fastdiff.training.config import to_dict

    out = Path(recipe.output_dir)
    for name in ("lora", "unet"):
        if (out / name).exists():
            raise InputError(f"{out / name} already exists; remove it or pass --set output_dir=NEW_DIR")
    sd, dmd = recipe.sd, recipe.objective == "dmd2-lora"
    if dmd:  # before minutes of loading
        _check_dmd(recipe)
    if not (Path(sd.pretrained) / "model_index.json").is_file():
        raise InputError(f"sd.pretrained={sd.pretrained} is not a local diffusers pipeline folder (no model_index.json); "
                         "fastdiff does not download weights")  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(sd.pretrained, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        null = pipe.encode_prompt([""], pipe.device, 1, False)[0].float()
    config, conditioner = dict(pipe.scheduler.config), PromptEmbeddings(null)
    scott = recipe.scott if recipe.objective == "scott-lora" else None
    objective = dmd_objective(recipe, pipe.unet, config, conditioner) if dmd else lcm_objective(sd, pipe.unet, config, conditioner, scott)
    source = captioned_source(sd, pipe, recipe.trainer.batch_size, recipe.trainer.seed)
    others = {"lcm-lora": ("dmd", "scott"), "scott-lora": ("dmd",), "dmd2-lora": ("scott",)}[recipe.objective]
    fingerprint = {k: v for k, v in to_dict(recipe).items() if k != "expected" and k not in others}  # as recipe_identity
    unet, record = train(objective, source, None, recipe.trainer, out, fingerprint, resume=resume, progress=progress)
    name = "lora" if sd.lora_rank else "unet"
    if record["is_main_process"]:
        tmp = out / f"{name}.tmp"
        if sd.lora_rank:
            save_lora(unet, tmp, "generator" if dmd else "default")
        else:
            unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps({"recipe": to_dict(recipe), "history": record["history"][-20:]}, indent=2) + "\n")
        tmp.rename(out / name)
    return out / name
