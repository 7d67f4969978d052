"""Training class-conditional pixel-space teachers with a standard denoising objective (v-prediction, DDPM schedule).

A recipe (:class:`TeacherRecipe`, YAML in ``recipes/teacher_*.yaml``) names the data, the diffusers model
(``UNet2DModel`` or ``DiTTransformer2DModel``), the discrete VP schedule and the optimisation; :func:`train_teacher`
runs it on ``accelerate`` and saves a :class:`~fastdiff.pipelines.class_conditional.ClassConditionalPipeline` folder (EMA weights,
safetensors) plus ``training.json`` recording how it was made. Labels are dropped to the null class with probability
``p_uncond`` so the teacher supports classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from fastdiff.training.config import to_dict
from fastdiff.datasets import LabeledData, load_dataset, make_loader
from fastdiff.denoisers import call_model
from fastdiff.errors import InputError
from fastdiff.param import output_from_x0
from fastdiff.schedules import VPSchedule

__all__ = ["TeacherRecipe", "train_teacher", "build_model", "scheduler_for"]


@dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion-mnist | folder
    root: str | None = None  # folder with Fashion-MNIST IDX files, or the image folder
    size: int | None = None  # image folder: resize the shorter side and centre-crop
    channels: int = 1  # image folder: 1 or 3


@dataclass
class ModelConfig:
    kind: Literal["unet", "dit"] = "unet"
    block_out_channels: tuple[int, ...] = (32, 64)  # unet: channels per resolution
    layers_per_block: int = 1  # unet
    attention: bool = True  # unet: self-attention at the lowest resolution
    num_layers: int = 6  # dit: transformer blocks
    num_attention_heads: int = 4  # dit
    attention_head_dim: int = 32  # dit: width = heads * head_dim
    patch_size: int = 4  # dit
    dropout: float = 0.0  # unet and dit (iCT CIFAR-10: 0.3)


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"  # default for the saved scheduler


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3  # AdamW, after a linear warm-up
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # label dropout for classifier-free guidance
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: what `accelerate launch` was told
    init_from: str | None = None  # a teacher folder to continue training from (same model config)


@dataclass
class TeacherRecipe:
    objective: Literal["denoising"] = "denoising"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/teacher"
    expected: str = ""  # what the recipe costs and gives, for people reading it


def build_model(cfg: ModelConfig, channels: int, size: int, num_classes: int | None) -> nn.Module:
    """The diffusers model of ``cfg`` for ``channels x size x size`` images and ``num_classes`` (+1 null) labels
    (``None``: an unconditional UNet, without class embedding)."""
    if cfg.kind == "unet":
        from diffusers import UNet2DModel

        n = len(cfg.block_out_channels)
        down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if cfg.attention else "DownBlock2D"]
        up = ["AttnUpBlock2D" if cfg.attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
        return UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=cfg.layers_per_block,
            block_out_channels=cfg.block_out_channels, down_block_types=tuple(down), up_block_types=tuple(up),
            num_class_embeds=None if num_classes is None else num_classes + 1, norm_num_groups=min(32, cfg.block_out_channels[0]),
            dropout=cfg.dropout,
        )  # fmt: skip
    from diffusers import DiTTransformer2DModel

    if size % cfg.patch_size:
        raise InputError(f"model.patch_size={cfg.patch_size} must divide the image size {size}")
    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim, in_channels=channels,
        out_channels=channels, num_layers=cfg.num_layers, sample_size=size, patch_size=cfg.patch_size,
        num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero", dropout=cfg.dropout,
    )  # fmt: skip


def scheduler_for(cfg: ScheduleConfig):
    """The diffusers scheduler saved with the teacher (DDPM; any compatible scheduler swaps in)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing,
        clip_sample=False,
    )  # fmt: skip


def denoising_loss(model: nn.Module, schedule: VPSchedule, x0: Tensor, labels: Tensor, prediction_type: str) -> Tensor:
    """Mean squared error of the model output against its target at a uniform random timestep (Ho et al. 2020,
    Algorithm 1; v-target of Salimans & Ho 2022)."""
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
    abar = schedule.alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.ndim - 1)))
    alpha, beta = abar.sqrt(), (1 - abar).sqrt()
    eps = torch.randn_like(x0)
    x_t = alpha * x0 + beta * eps
    target = output_from_x0(x0, x_t, alpha, beta, prediction_type)
    out = call_model(model, x_t, t, {"class_labels": labels})
    return (out.float() - target).pow(2).mean()


def _check_data(data: LabeledData, size: int | None = None) -> tuple[int, int]:
    if data.data.ndim != 4 or data.data.shape[2] != data.data.shape[3]:
        raise InputError(f"{data.name}: teachers need square images (N, C, H, H); got {tuple(data.data.shape)}")
    if data.num_classes < 1:
        raise InputError(f"{data.name}: class-conditional teachers need labels (e.g. class subfolders)")
    return data.data.shape[1], data.data.shape[2]


def train_teacher(recipe: TeacherRecipe, progress: bool = True) -> Path:
    """Train the recipe's teacher and save it to ``output_dir`` (refusing to overwrite an existing folder)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, save_teacher

    out_dir, cfg = Path(recipe.output_dir), recipe.train
    if out_dir.exists():
        raise InputError(f"output_dir {out_dir} already exists; remove it or pass --set output_dir=NEW_DIR")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    d = recipe.data
    data = load_dataset(d.name, "train", d.root, d.size, d.channels, labels=True)
    channels, size = _check_data(data)
    model = build_model(recipe.model, channels, size, data.num_classes)
    previous = _load_weights(model, cfg.init_from) if cfg.init_from else None
    # diffusers' DiT drops labels independently inside every block in train mode; we keep the model in eval mode
    # (it has no dropout or batch norm) and drop labels once per sample below.
    model.eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    schedule = VPSchedule.from_config(scheduler_for(recipe.schedule).config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
    loader = make_loader(data, cfg.batch_size, seed=cfg.seed)
    model, opt, loader, warmup = accelerator.prepare(model, opt, loader, warmup)
    ema.to(accelerator.device)

    start, losses, step = time.time(), [], 0
    bar = tqdm(total=cfg.steps, disable=not progress or not accelerator.is_main_process, desc="teacher")
    while step < cfg.steps:
        for x0, labels in loader:
            drop = torch.rand(labels.shape, device=labels.device) < cfg.p_uncond
            labels = torch.where(drop, torch.full_like(labels, data.num_classes), labels)
            with accelerator.autocast():
                loss = denoising_loss(model, schedule, x0, labels, recipe.schedule.prediction_type)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {loss.item()} at step {step}; lower train.lr")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step(), warmup.step(), opt.zero_grad(set_to_none=True)
            _ema_update(ema, accelerator.unwrap_model(model), cfg.ema_decay)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if step >= cfg.steps:
                break
    bar.close()
    minutes = (time.time() - start) / 60
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model_key = "unet" if recipe.model.kind == "unet" else "transformer"
        pipe = ClassConditionalPipeline(scheduler=scheduler_for(recipe.schedule), **{model_key: ema.cpu()})
        save_teacher(pipe, tmp)
        record = {
            "recipe": to_dict(recipe),
            "command": " ".join(sys.argv),
            "steps": step + (previous["steps"] if previous else 0),
            "continued_from": previous,
            "cpu_or_device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "wall_minutes": round(minutes + (previous["wall_minutes"] if previous else 0), 2),
            "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
            "parameters": sum(p.numel() for p in ema.parameters()),
            "torch": torch.__version__,
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(out_dir)  # atomic: a folder is either complete or absent
    accelerator.wait_for_everyone()
    return out_dir


def _load_weights(model: nn.Module, folder: str) -> dict:
    """Load a saved teacher's weights into ``model``; returns that teacher's training record (steps, minutes)."""
    from safetensors.torch import load_file

    path = Path(folder)
    files = list(path.glob("*/diffusion_pytorch_model.safetensors"))
    if not (path / "model_index.json").is_file() or len(files) != 1:
        raise InputError(f"train.init_from={folder} is not a fastdiff teacher folder (model_index.json + one model)")
    try:
        model.load_state_dict(load_file(files[0]))
    except RuntimeError as err:  # missing / unexpected keys or shape mismatches
        raise InputError(f"train.init_from={folder} does not match the recipe's model: {str(err)[:300]}") from None
    record = json.loads((path / "training.json").read_text()) if (path / "training.json").is_file() else {}
    return {"folder": str(path), "steps": record.get("steps", 0), "wall_minutes": record.get("wall_minutes", 0.0)}


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)

