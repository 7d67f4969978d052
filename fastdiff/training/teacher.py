"""Training class-conditional pixel-space teachers with a standard denoising objective (v-prediction, DDPM schedule).

A recipe (:class:`TeacherRecipe`, YAML in ``recipes/teacher_*.yaml``) names the data, the diffusers model
(``UNet2DModel`` or ``DiTTransformer2DModel``), the discrete VP schedule and the optimisation; :func:`train_teacher`
builds the model and a :class:`~fastdiff.objectives.denoising.DenoisingObjective`, runs them on the trainer
(:func:`fastdiff.training.trainer.train`: checkpoints, ``--resume latest``, the NaN guard, trackers, EMA) and saves a
:class:`~fastdiff.pipelines.class_conditional.ClassConditionalPipeline` folder ``output_dir/teacher`` (EMA weights,
safetensors) plus ``training.json`` recording how it was made. Labels are dropped to the null class with probability
``p_uncond`` so the teacher supports classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from fastdiff.datasets import LabeledData, load_dataset
from fastdiff.errors import InputError
from fastdiff.objectives.denoising import DenoisingObjective
from fastdiff.schedules import VPSchedule
from fastdiff.training.config import to_dict
from fastdiff.training.trainer import OptimConfig, TrainerConfig, train

__all__ = ["TeacherRecipe", "train_teacher", "build_model", "scheduler_for", "trainer_config"]


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
    """The teacher's optimisation, run by the trainer (:func:`trainer_config` maps it onto a ``TrainerConfig``)."""

    steps: int = 4000
    batch_size: int = 128  # global: over all processes and accumulation micro-batches
    lr: float = 1e-3  # AdamW, after a linear warm-up
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ema_half_life: float | None = None  # in steps; overrides ema_decay
    p_uncond: float = 0.1  # label dropout for classifier-free guidance
    loss_weighting: Literal["none", "min_snr"] = "none"  # min_snr: Min-SNR-gamma (Hang et al. 2023)
    snr_gamma: float = 5.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = None  # None: what `accelerate launch` was told; auto: see TrainerConfig
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    init_from: str | None = None  # a teacher folder to continue training from (same model config)


@dataclass
class TeacherEvalConfig:
    """Evaluation during training (off by default): every ``every`` steps and at the end, the EMA teacher samples
    ``num_samples`` images with DDIM at ``steps`` steps (guidance 1, seed 0); domain FID against the test split
    (digits / Fashion-MNIST) goes to ``output_dir/eval.jsonl`` and the trackers, a grid to ``output_dir/samples/``."""

    every: int = 0  # 0: no evaluation
    num_samples: int = 500
    steps: int = 50
    grid: int = 64  # images in the sample grid (0: none)

    def __post_init__(self):
        for key, low in (("every", 0), ("num_samples", 2), ("steps", 1), ("grid", 0)):  # FID needs >= 2 samples
            if getattr(self, key) < low:
                raise InputError(f"eval.{key} must be >= {low}; got {getattr(self, key)}")


@dataclass
class TeacherRecipe:
    objective: Literal["denoising"] = "denoising"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TeacherEvalConfig = field(default_factory=TeacherEvalConfig)  # not part of the fingerprint: resumable
    output_dir: str = "runs/teacher"  # checkpoints and logs; the teacher is saved to output_dir/teacher
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


def _check_data(data: LabeledData, size: int | None = None) -> tuple[int, int]:
    if data.data.ndim != 4 or data.data.shape[2] != data.data.shape[3]:
        raise InputError(f"{data.name}: teachers need square images (N, C, H, H); got {tuple(data.data.shape)}")
    if data.num_classes < 1:
        raise InputError(f"{data.name}: class-conditional teachers need labels (e.g. class subfolders)")
    return data.data.shape[1], data.data.shape[2]


def trainer_config(cfg: TrainConfig) -> TrainerConfig:
    """The trainer's settings for a teacher recipe's ``train`` section (AdamW with a linear warm-up)."""
    optim = OptimConfig(kind="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)
    return TrainerConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
        ema_half_life=cfg.ema_half_life, mixed_precision=cfg.mixed_precision, compile=cfg.compile, seed=cfg.seed,
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints, tracker=cfg.tracker,
        optim=optim,
    )  # fmt: skip


def train_teacher(recipe: TeacherRecipe, resume: str | None = None, progress: bool = True) -> Path:
    """Train the recipe's teacher and save it to ``output_dir/teacher`` (refusing to overwrite a finished one);
    ``resume``: ``"latest"`` or a checkpoint folder of ``output_dir/checkpoints``. Returns the teacher folder."""
    from accelerate.utils import set_seed

    out, cfg = Path(recipe.output_dir), recipe.train
    if (out / "teacher").exists():
        raise InputError(f"{out / 'teacher'} already exists; remove it or pass --set output_dir=NEW_DIR")
    set_seed(cfg.seed)  # the initial weights
    d = recipe.data
    data = load_dataset(d.name, "train", d.root, d.size, d.channels, labels=True)
    channels, size = _check_data(data)
    model = build_model(recipe.model, channels, size, data.num_classes)
    previous = _load_weights(model, cfg.init_from) if cfg.init_from else None
    # diffusers' DiT drops labels independently inside every block in train mode; we keep the model in eval mode
    # (it has no dropout or batch norm) and the objective drops labels once per sample.
    model.eval()
    schedule = VPSchedule.from_config(scheduler_for(recipe.schedule).config)
    objective = DenoisingObjective(model, schedule, recipe.schedule.prediction_type, data.num_classes, p_uncond=cfg.p_uncond,
                                   weighting=cfg.loss_weighting, snr_gamma=cfg.snr_gamma)  # fmt: skip
    fingerprint = {k: v for k, v in to_dict(recipe).items() if k not in ("expected", "eval")}
    fingerprint["train"] = {k: v for k, v in fingerprint["train"].items() if k not in ("steps", "log_every")}
    start = time.time()
    trainer_cfg = dataclasses.replace(trainer_config(cfg), eval_every=recipe.eval.every)
    evaluate = _evaluator(recipe, d.name) if recipe.eval.every > 0 else None
    ema, record = train(objective, data.data, data.labels, trainer_cfg, out, fingerprint, evaluate, resume=resume, progress=progress)
    if record["is_main_process"]:
        _save_teacher(recipe, ema, record, previous, time.time() - start)
    return out / "teacher"


def _evaluator(recipe: TeacherRecipe, dataset: str) -> Callable[[nn.Module, int], tuple[dict[str, float], Tensor | None]]:
    """The trainer's evaluation of the EMA teacher (see :class:`TeacherEvalConfig`)."""
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import fid_of_samples
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    scored = dataset in ("digits", "fashion-mnist")
    extractor = load_extractor(dataset) if scored else None
    reference = source_features(load_source(f"{dataset}:test", 1), extractor) if scored else None
    e, model_key = recipe.eval, "unet" if recipe.model.kind == "unet" else "transformer"

    def evaluate(net: nn.Module, step: int) -> tuple[dict[str, float], Tensor | None]:
        scheduler = make_scheduler("ddim", dict(scheduler_for(recipe.schedule).config))
        pipe = ClassConditionalPipeline(scheduler=scheduler, **{model_key: net})
        pipe.set_progress_bar_config(disable=True)
        images = sample_pipeline(pipe, e.num_samples, e.steps, 1.0, seed=0, progress=False).images
        metrics = {f"fid_{e.steps}nfe": fid_of_samples(images, extractor, reference)} if scored else {}
        return metrics, images[: e.grid].clamp(-1, 1) if e.grid else None

    return evaluate


def _save_teacher(recipe: TeacherRecipe, ema: nn.Module, record: dict, previous: dict | None, seconds: float) -> None:
    """The pipeline folder (safetensors + training.json), written to ``teacher.tmp`` and renamed."""
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, save_teacher

    out = Path(recipe.output_dir)
    tmp = out / "teacher.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model_key = "unet" if recipe.model.kind == "unet" else "transformer"
    save_teacher(ClassConditionalPipeline(scheduler=scheduler_for(recipe.schedule), **{model_key: ema.cpu()}), tmp)
    steps = recipe.train.steps
    last = [h["loss/denoiser/denoising"] for h in record["history"] if h["step"] > steps - 200]
    (tmp / "training.json").write_text(json.dumps({
        "recipe": to_dict(recipe), "command": " ".join(sys.argv), "steps": steps + (previous["steps"] if previous else 0),
        "continued_from": previous, "resumed_from_step": record["start_step"], "cpu_or_device": record["device"],
        "num_processes": record["num_processes"],
        "wall_minutes": round(seconds / 60 + (previous["wall_minutes"] if previous else 0), 2),  # since the last resume, plus init_from's
        "final_loss_mean_last_200": sum(last) / len(last) if last else None,  # over the logged steps among the last 200
        "parameters": sum(p.numel() for p in ema.parameters()), "history": record["history"][-20:], "torch": torch.__version__,
    }, indent=2) + "\n")  # fmt: skip
    tmp.rename(out / "teacher")  # atomic: a folder is either complete or absent


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
