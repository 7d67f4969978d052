"""Distillation recipes: iCT / iLCT from data, CD (LCM-style), DMD2, f-distill and CTM from a teacher, run by
:func:`fastdiff.training.trainer.train`.

A :class:`DistillRecipe` (YAML in ``recipes/``) names the objective, data, student network, trainer settings and the
evaluation; :func:`run_distill` builds them, trains (``--resume latest`` continues), evaluates the EMA student with
the domain FID of few-step samples, and saves it as a diffusers pipeline folder in ``output_dir/student``:
iCT/iLCT students with diffusers' ``CMStochasticIterativeScheduler``; CD, DMD2 and f-distill students with
``LCMScheduler`` (DMD2's multi-step generator on its own grid, ``original_inference_steps = dmd.generator_steps``);
CTM students (a :class:`~fastdiff.two_time.TwoTimeModel`) with fastdiff's ``CTMScheduler`` -- all load back with
``ClassConditionalPipeline.from_pretrained`` (or ``fastdiff sample``). Unconditional iCT/iLCT students
(``conditional: false``) are saved as diffusers' own ``ConsistencyModelPipeline``."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastdiff.training.config import to_dict
from fastdiff.errors import InputError
from fastdiff.training.teacher import DataConfig, ModelConfig, build_model
from fastdiff.training.trainer import TrainerConfig, train

__all__ = ["DistillRecipe", "ConsistencyConfig", "DistillConfig", "ScottConfig", "DMDConfig", "CTMConfig", "ReflowConfig", "EvalConfig",
           "run_distill",
           "build_objective",
           "recipe_identity"]

STUDENTS_OF_TEACHERS = ("cd", "scott", "dmd2", "f_distill", "ctm", "reflow")  # objectives that distil a teacher; students sample through their pipeline


@dataclass
class ConsistencyConfig:
    """iCT / iLCT (``objective: ict`` or ``ilct``); iLCT recipes set ``loss: cauchy``, ``diffusion_weight: 5``, ``ot: true``."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.1
    p_std: float = 2.0
    s0: int = 10
    s1: int = 1280
    loss: Literal["pseudo_huber", "cauchy"] = "pseudo_huber"
    huber_c: float | None = None  # None: 0.00054 sqrt(d) (pseudo-Huber; Cauchy's first stage), then Cauchy's c(N)
    diffusion_weight: float = 0.0
    ot: bool = False
    non_scaling_layernorm: bool = False
    two_step_sigma: float = 0.821  # the intermediate noise level of 2-step sampling (iCT)


@dataclass
class DistillConfig:
    """Consistency distillation (``objective: cd``) from a teacher pipeline folder."""

    teacher: str = "assets/teachers/digits"
    num_ddim_timesteps: int = 50
    guidance_scale: float = 1.0
    target_ema: float = 0.95
    loss: Literal["l2", "pseudo_huber", "pseudo_huber_elementwise"] = "l2"  # l2: diffusers' LCM scripts' default
    huber_c: float = 0.001  # c of the pseudo-Huber losses (LCM scripts' --huber_c default)


@dataclass
class DMDConfig:
    """DMD2 / f-distill (``objective: dmd2`` or ``f_distill``) from a teacher pipeline folder; the two phases' learning
    rates and DMD2's two time scales are ``trainer.phase_optim`` (``generator: {update_every: 5}``)."""

    teacher: str = "assets/teachers/digits"
    guidance_scale: float = 1.0  # the real score's classifier-free guidance (real_guidance_scale)
    generator_steps: int = 1  # K: 1 = one step from pure noise; 4 = DMD2's [999, 749, 499, 249] with backward simulation
    dm_range: tuple[float, float] = (0.02, 0.98)  # min/max_step_percent of the DM loss's timesteps
    divergence: str | None = None  # None: reverse_kl (dmd2), jensen_shannon (f_distill)
    gan_generator_weight: float = 3e-3  # DMD2 ImageNet-64
    gan_critic_weight: float = 1e-2
    lora_rank: int | None = None  # the one-frozen-base layout: generator and fake score as LoRA adapters of this rank
    gradient_checkpointing: bool = False
    generator_init: str | None = None  # a student folder of the same teacher (e.g. the CD student) that G starts from


@dataclass
class CTMConfig:
    """CTM (``objective: ctm``) from a teacher pipeline folder (:class:`~fastdiff.objectives.ConsistencyTrajectory`)."""

    teacher: str = "assets/teachers/digits"
    num_scales: int = 18  # N of the Karras grid (CTM CIFAR-10: 18, ImageNet-64: 40)
    max_jump: int = 17  # K: teacher Heun steps per jump, p(k) ~ k on 1..K
    rho: float = 7.0
    sigma_data: float = 0.5
    target_ema: float = 0.999  # the target network theta^- (CTM's code: 0.999)
    distance: Literal["l2", "features", "lpips"] = "l2"  # features: the data set's domain extractor; lpips: VGG LPIPS
    lpips_weights: str | None = None  # distance lpips: torchvision's vgg16 weights file (read offline, weights_only)
    dsm_weight: float | None = None  # None: CTM's adaptive weight
    gan_weight: float | None = 0.0  # 0: no GAN; None: CTM's adaptive weight
    gan_start: int = 0  # first step with the GAN term
    guidance_scale: float = 1.0  # the teacher's classifier-free guidance in its Heun solve
    gamma: float = 0.0  # the student's CTMScheduler: 0 deterministic, 1 consistency multistep


@dataclass
class ScottConfig:
    """SCott (``objective: scott``): CD (the ``distill`` section) with a stochastic multi-step teacher and an
    adversarial term (:class:`~fastdiff.objectives.stochastic_consistency.StochasticConsistency`)."""

    eta: float = 0.3  # the teacher's DDIM noise; 0 with substeps 1 and no adversary is CD
    substeps: int = 3  # h: teacher sub-steps per jump (the paper's default)
    adversarial_weight: float = 0.4  # 0: no discriminator
    adaptive_adversary: bool = False  # times VQGAN's ratio ||grad L_CD|| / ||grad L_adv|| at the student's output


@dataclass
class ReflowConfig:
    """Reflow with 2-RF++ (``objective: reflow``): pairs from the teacher (made into ``pairs`` when missing, resumable),
    a flow-matching student initialised from the teacher (:class:`~fastdiff.objectives.reflow.Reflow`)."""

    teacher: str = "assets/teachers/digits"
    pairs: str = "runs/pairs-digits"  # the pairs folder, shared by every run that names it
    num_pairs: int = 20000
    pair_scheduler: str = "dpmpp-2m"  # any name of `fastdiff sample --scheduler`
    pair_steps: int = 20
    loss: Literal["l2", "pseudo_huber", "lpips_huber"] = "lpips_huber"
    distance: Literal["lpips", "features"] = "features"  # lpips_huber's perceptual term
    lpips_weights: str | None = None
    t_distribution: Literal["u_shaped", "uniform"] = "u_shaped"
    a: float = 4.0  # the U-shaped distribution's a (2-RF++: 4 in every config)
    sampler: Literal["euler", "reuse_noise"] = "euler"  # the student's scheduler: FlowMatchEuler or 2-RF++'s "new" sampler


@dataclass
class EvalConfig:
    num_samples: int = 360
    steps: tuple[int, ...] = (1, 2)
    grid: int = 64  # images in the sample grid (0: none)


@dataclass
class DistillRecipe:
    objective: Literal["ict", "ilct", "cd", "scott", "dmd2", "f_distill", "ctm", "reflow"] = "ict"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # iCT/iLCT; CD students copy the teacher
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    scott: ScottConfig = field(default_factory=ScottConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    ctm: CTMConfig = field(default_factory=CTMConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    p_uncond: float = 0.1  # label dropout, for classifier-free guidance of the student
    conditional: bool = True  # false: no labels reach the student (iCT/iLCT only; needs p_uncond: 0)
    output_dir: str = "runs/ict"
    expected: str = ""


def _load_teacher(path: str, key: str = "distill.teacher"):
    """The teacher folder: a path, a shipped teacher's name, or ``assets/teachers/...`` (see :func:`pipeline_path`)."""
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, load_pipeline

    pipe = load_pipeline(pipeline_path(path))
    if not isinstance(pipe, ClassConditionalPipeline):
        raise InputError(f"{key}={path} is a {type(pipe).__name__}; expected a fastdiff class-conditional teacher folder")
    return pipe


OBJECTIVE_SECTIONS = {"ict": ("consistency", "model"), "ilct": ("consistency", "model"), "cd": ("distill",), "scott": ("distill", "scott"), "dmd2": ("dmd",),
                      "f_distill": ("dmd",), "ctm": ("ctm",), "reflow": ("reflow",)}  # fmt: skip


def _machine() -> dict:
    """What a training's minutes were measured on (kept in the student's training.json)."""
    from fastdiff.machine import machine

    return {k: v for k, v in machine().items() if k in ("cpu", "cpu_capability", "cores", "torch_threads", "device")}


def recipe_identity(recipe: dict) -> dict:
    """What decides a run of a recipe (as a plain dict): everything but ``expected`` and the sections of the other
    objectives, so that a section fastdiff adds for a new objective leaves earlier checkpoints and students valid."""
    others = {s for sections in OBJECTIVE_SECTIONS.values() for s in sections} - set(OBJECTIVE_SECTIONS[recipe["objective"]])
    return {k: v for k, v in recipe.items() if k != "expected" and k not in others}


def build_objective(recipe: DistillRecipe, channels: int, size: int, num_classes: int):
    """The objective of ``recipe`` (its networks built or loaded), and the scheduler config the student ships with."""
    from fastdiff.objectives import ConsistencyDistillation, ConsistencyTraining, non_scaling_layernorm
    from fastdiff.schedules import VPSchedule

    if not recipe.conditional and (recipe.objective in STUDENTS_OF_TEACHERS or recipe.p_uncond > 0 or recipe.model.kind != "unet"):
        raise InputError("conditional: false is for iCT/iLCT with model.kind: unet and p_uncond: 0 (CD distils a "
                         f"class-conditional teacher); got objective {recipe.objective}, model.kind {recipe.model.kind}, "
                         f"p_uncond {recipe.p_uncond}")  # fmt: skip
    if recipe.objective in ("ict", "ilct"):
        c = recipe.consistency
        classes = num_classes if recipe.conditional else None
        net = build_model(recipe.model, channels, size, classes)
        if c.non_scaling_layernorm:
            non_scaling_layernorm(net)
        objective = ConsistencyTraining(
            net, classes, recipe.trainer.steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho,
            p_mean=c.p_mean, p_std=c.p_std, s0=c.s0, s1=c.s1, loss=c.loss, huber_c=c.huber_c, diffusion_weight=c.diffusion_weight,
            ot=c.ot, p_uncond=recipe.p_uncond,
        )  # fmt: skip
        return objective, _cm_scheduler(c)
    if recipe.objective in ("dmd2", "f_distill"):
        return _distribution_matching(recipe, channels, size, num_classes)
    if recipe.objective == "ctm":
        return _trajectory(recipe, channels, size, num_classes)
    if recipe.objective == "reflow":
        return _reflow(recipe, channels, size, num_classes)
    d = recipe.distill
    pipe, config = _teacher_for(d.teacher, recipe, channels, size, num_classes, "distill.teacher")
    cd = dict(num_ddim_timesteps=d.num_ddim_timesteps, guidance_scale=d.guidance_scale, target_ema=d.target_ema, loss=d.loss,
              huber_c=d.huber_c, p_uncond=recipe.p_uncond)  # fmt: skip
    teacher = (pipe.model, VPSchedule.from_config(config), config.get("prediction_type", "epsilon"), num_classes)
    if recipe.objective == "scott":
        from fastdiff.objectives.critic import TimeDiscriminator
        from fastdiff.objectives.stochastic_consistency import StochasticConsistency

        sc = recipe.scott
        disc = TimeDiscriminator(channels, size, config.get("num_train_timesteps", 1000)) if sc.adversarial_weight > 0 else None
        objective = StochasticConsistency(*teacher, eta=sc.eta, substeps=sc.substeps, discriminator=disc,
                                          adversarial_weight=sc.adversarial_weight, adaptive_adversary=sc.adaptive_adversary, **cd)  # fmt: skip
    else:
        objective = ConsistencyDistillation(*teacher, **cd)
    return objective, _lcm_scheduler(config, d.num_ddim_timesteps)


def _teacher_for(path: str, recipe: DistillRecipe, channels: int, size: int, num_classes: int, key: str):
    """The teacher pipeline at ``path`` and its scheduler config, refused unless it makes the data's images and classes
    (``key``: the recipe key that named it, for the error)."""
    pipe = _load_teacher(path, key)
    if pipe.image_shape != (channels, size, size) or pipe.num_classes != num_classes:
        raise InputError(f"{key} {path} makes {pipe.image_shape} images with {pipe.num_classes} classes, but data "
                         f"{recipe.data.name} has {(channels, size, size)} with {num_classes}")  # fmt: skip
    return pipe, dict(pipe.scheduler.config)


def _distribution_matching(recipe: DistillRecipe, channels: int, size: int, num_classes: int):
    from fastdiff.objectives import DistributionMatching
    from fastdiff.schedules import VPSchedule

    m = recipe.dmd
    divergence = m.divergence or ("reverse_kl" if recipe.objective == "dmd2" else "jensen_shannon")
    if recipe.objective == "dmd2" and divergence != "reverse_kl":
        raise InputError(f"objective dmd2 is the reverse-KL divergence; for dmd.divergence={divergence!r} use objective: f_distill")
    if recipe.p_uncond > 0:
        raise InputError(f"p_uncond={recipe.p_uncond} has no effect on {recipe.objective} (the generator is sampled without "
                         "guidance; the teacher's guidance is dmd.guidance_scale); set p_uncond: 0")  # fmt: skip
    if max(recipe.eval.steps) > m.generator_steps:
        raise InputError(f"eval.steps={list(recipe.eval.steps)} asks for more steps than the generator has "
                         f"(dmd.generator_steps={m.generator_steps}); evaluate at most that many")  # fmt: skip
    pipe, config = _teacher_for(m.teacher, recipe, channels, size, num_classes, "dmd.teacher")
    objective = DistributionMatching(
        pipe.model, VPSchedule.from_config(config), config.get("prediction_type", "epsilon"), num_classes,
        guidance_scale=m.guidance_scale, generator_steps=m.generator_steps, dm_range=m.dm_range, divergence=divergence,
        gan_generator_weight=m.gan_generator_weight, gan_critic_weight=m.gan_critic_weight, lora_rank=m.lora_rank,
        gradient_checkpointing=m.gradient_checkpointing, generator=_starting_generator(m, recipe, channels, size, num_classes, config),
    )  # fmt: skip
    return objective, _lcm_scheduler(config, m.generator_steps)


def _starting_generator(m: DMDConfig, recipe: DistillRecipe, channels: int, size: int, num_classes: int, config: dict):
    """``dmd.generator_init``'s network (``None``: G starts as the teacher), refused unless it predicts as the teacher.

    A reflow student (:class:`~fastdiff.flow_student.VPFlowModel`) is a VP network of the teacher's convention read
    through the sigma <-> t change of variables: G starts as that network (``.base``), which computes the student's
    clean-sample estimate at every noise level, provided its VP schedule is the teacher's."""
    from fastdiff.flow_student import VPFlowModel
    from fastdiff.schedules import VPSchedule

    if m.generator_init is None:
        return None
    student, student_config = _teacher_for(m.generator_init, recipe, channels, size, num_classes, "dmd.generator_init")
    net = student.model
    if isinstance(net, VPFlowModel):
        student_config, net = dict(net.config.vp_config or {}), net.base
        if not torch.equal(VPSchedule.from_config(student_config).alphas_cumprod, VPSchedule.from_config(config).alphas_cumprod):
            raise InputError(f"dmd.generator_init={m.generator_init} is a reflow student of another noise schedule than the "
                             f"teacher {m.teacher} (unet config vp_config); start from a student of this teacher")  # fmt: skip
    want, got = config.get("prediction_type", "epsilon"), student_config.get("prediction_type", "epsilon")
    if got != want:
        raise InputError(f"dmd.generator_init={m.generator_init} predicts {got} but the teacher {m.teacher} predicts {want}; "
                         "start from a student of this teacher")  # fmt: skip
    return net


def _trajectory(recipe: DistillRecipe, channels: int, size: int, num_classes: int):
    from fastdiff.eval.perceptual import perceptual_distance
    from fastdiff.objectives import ConsistencyTrajectory
    from fastdiff.objectives.critic import ImageDiscriminator
    from fastdiff.samplers.diffusers import CTMScheduler
    from fastdiff.schedules import VPSchedule

    c = recipe.ctm
    pipe, config = _teacher_for(c.teacher, recipe, channels, size, num_classes, "ctm.teacher")
    distance = perceptual_distance(c.distance, recipe.data.name, c.lpips_weights)
    gan = c.gan_weight != 0
    objective = ConsistencyTrajectory(
        pipe.model, VPSchedule.from_config(config), config.get("prediction_type", "epsilon"), num_classes,
        num_scales=c.num_scales, max_jump=c.max_jump, rho=c.rho, sigma_data=c.sigma_data, target_ema=c.target_ema,
        distance=distance, dsm_weight=c.dsm_weight, gan_weight=c.gan_weight, gan_start=c.gan_start,
        discriminator=ImageDiscriminator(channels, size) if gan else None, guidance_scale=c.guidance_scale, p_uncond=recipe.p_uncond,
    )  # fmt: skip
    return objective, CTMScheduler.from_config(config, gamma=c.gamma)


def _reflow(recipe: DistillRecipe, channels: int, size: int, num_classes: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastdiff.eval.perceptual import perceptual_distance
    from fastdiff.objectives.reflow import Reflow
    from fastdiff.samplers.diffusers import ReflowScheduler

    r = recipe.reflow
    pipe, config = _teacher_for(r.teacher, recipe, channels, size, num_classes, "reflow.teacher")
    distance = perceptual_distance(r.distance, recipe.data.name, r.lpips_weights) if r.loss == "lpips_huber" else None
    objective = Reflow(pipe.model, config, num_classes, loss=r.loss, distance=distance, t_distribution=r.t_distribution, a=r.a,
                       p_uncond=recipe.p_uncond)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler()
    return objective, ReflowScheduler.from_config(scheduler.config) if r.sampler == "reuse_noise" else scheduler


def _training_data(recipe: DistillRecipe, data: Any, progress: bool) -> tuple[Any, Any]:
    """What the trainer draws batches from: the data set's images, or (reflow) the teacher's pairs, made first where
    missing (:func:`~fastdiff.training.pairs.generate_pairs`; resumable) -- the pairs' x, labels and noise."""
    if recipe.objective != "reflow":
        return data.data, data.labels
    from fastdiff.training.data import TensorSource
    from fastdiff.training.pairs import generate_pairs, load_pairs

    r = recipe.reflow
    generate_pairs(r.teacher, r.pairs, r.num_pairs, r.pair_scheduler, r.pair_steps, seed=recipe.trainer.seed, progress=progress)
    x, noise, labels, _ = load_pairs(r.pairs)
    return TensorSource(x, labels, recipe.trainer.batch_size, recipe.trainer.seed, {"noise": noise}), None


def _cm_scheduler(c: ConsistencyConfig):
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho)


def _lcm_scheduler(teacher_config: dict, original_steps: int):
    """diffusers' ``LCMScheduler`` on the teacher's noise schedule and prediction type."""
    import inspect

    from diffusers import LCMScheduler

    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in teacher_config.items() if k in accepted}  # DDPM-only keys would warn
    return LCMScheduler(**{**config, "original_inference_steps": original_steps, "timestep_spacing": "trailing"})


def student_pipeline(net: nn.Module, scheduler: Any):
    """The pipeline the student ships in: diffusers' ``ConsistencyModelPipeline`` for an unconditional UNet (no class
    embedding), else fastdiff's ``ClassConditionalPipeline``."""
    from diffusers import ConsistencyModelPipeline

    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline

    key = "transformer" if "Transformer" in type(net).__name__ else "unet"
    config = net.config.get("base_config", net.config)  # a CTM student's base UNet
    if key == "unet" and config.get("num_class_embeds") is None:
        pipe = ConsistencyModelPipeline(unet=net, scheduler=scheduler)
    else:
        pipe = ClassConditionalPipeline(scheduler=scheduler, **{key: net})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_student(recipe: DistillRecipe, net: nn.Module, scheduler: Any, n: int, steps: int, seed: int = 0) -> Tensor:
    """``n`` class-balanced (or unconditional) samples of ``steps`` model evaluations: the consistency sampler at
    iCT's levels for iCT/iLCT students (``sigma_max``, then ``two_step_sigma``), the pipeline with ``LCMScheduler``
    for CD."""
    from fastdiff.denoisers import consistency_precond
    from fastdiff.samplers import sample_consistency
    from fastdiff.pipelines.sampling import sample_pipeline

    from fastdiff.objectives.distribution_matching import generator_of

    pipe = student_pipeline(generator_of(net), scheduler)
    if recipe.objective in STUDENTS_OF_TEACHERS:
        return sample_pipeline(pipe, n, steps, 1.0, seed).images
    c = recipe.consistency
    levels = {1: [c.sigma_max], 2: [c.sigma_max, c.two_step_sigma]}.get(steps) or \
        torch.exp(torch.linspace(torch.tensor(c.sigma_max).log(), torch.tensor(c.sigma_min * 10).log(), steps)).tolist()
    sigmas = torch.tensor([*levels, 0.0])
    f = consistency_precond(net, c.sigma_min, c.sigma_data, noise_scale=1000.0)
    labels = torch.arange(n) % pipe.num_classes if recipe.conditional else None

    def cond(i: int) -> dict[str, Tensor]:
        return {} if labels is None else {"class_labels": labels[i : i + 256]}

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.config.in_channels, net.config.sample_size, net.config.sample_size, generator=gen) * c.sigma_max
    with torch.no_grad():
        return torch.cat([sample_consistency(f, x[i : i + 256], sigmas, cond(i), generator=gen, sigma_min=c.sigma_min)
                          for i in range(0, n, 256)])  # fmt: skip


def _evaluator(recipe: DistillRecipe, scheduler: Any):
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import fid_of_samples

    name = recipe.data.name
    if name not in ("digits", "fashion-mnist"):
        extractor = reference = None
    else:
        extractor = load_extractor(name)
        reference = source_features(load_source(f"{name}:test", 1), extractor)

    def evaluate(net: nn.Module, step: int) -> tuple[dict[str, float], Tensor | None]:
        metrics, grid = {}, None
        net.eval()
        for steps in recipe.eval.steps:
            images = sample_student(recipe, net, scheduler, recipe.eval.num_samples, steps)
            if extractor is not None:
                metrics[f"fid_{steps}step"] = fid_of_samples(images, extractor, reference)
            if grid is None and recipe.eval.grid:
                grid = images[: recipe.eval.grid].clamp(-1, 1)
        return metrics, grid

    return evaluate


def run_distill(recipe: DistillRecipe, resume: str | None = None, progress: bool = True) -> Path:
    """Train ``recipe`` and save the EMA student to ``output_dir/student``; returns that folder."""
    from fastdiff.datasets import load_dataset

    out = Path(recipe.output_dir)
    student_dir = out / "student"
    if student_dir.exists():
        raise InputError(f"{student_dir} already exists; remove it or pass --set output_dir=NEW_DIR")
    torch.manual_seed(recipe.trainer.seed)  # the student's initial weights
    d = recipe.data
    data = load_dataset(d.name, "train", d.root, d.size, d.channels, labels=recipe.conditional)
    if data.data.ndim != 4 or (recipe.conditional and data.num_classes < 1):
        raise InputError(f"{d.name}: consistency recipes need images (N, C, H, W), labelled unless conditional: false; "
                         f"got {tuple(data.data.shape)} with {data.num_classes} classes")  # fmt: skip
    channels, size = data.data.shape[1], data.data.shape[2]
    objective, scheduler = build_objective(recipe, channels, size, data.num_classes)
    fingerprint = recipe_identity(to_dict(recipe))
    fingerprint["trainer"] = {k: v for k, v in fingerprint["trainer"].items() if k not in ("steps", "eval_every", "log_every")}
    start = time.time()
    images, labels = _training_data(recipe, data, progress)
    ema_net, record = train(objective, images, labels, recipe.trainer, out, fingerprint, _evaluator(recipe, scheduler),
                            resume=resume, progress=progress)  # fmt: skip
    if record["is_main_process"]:
        _save_student(recipe, ema_net, scheduler, out, record, time.time() - start)
    return student_dir


def _save_student(recipe: DistillRecipe, ema_net: nn.Module, scheduler: Any, out: Path, record: dict, seconds: float) -> None:
    """The pipeline folder (safetensors + training.json), written to ``student.tmp`` and renamed."""
    import shutil

    from fastdiff.pipelines.class_conditional import save_teacher

    tmp, student_dir = out / "student.tmp", out / "student"
    shutil.rmtree(tmp, ignore_errors=True)
    from fastdiff.objectives.distribution_matching import generator_of

    net = generator_of(ema_net.cpu())  # DMD2's LoRA layout: the generator's adapter merged into the base
    pipe = student_pipeline(net, scheduler)
    save_teacher(pipe, tmp) if recipe.conditional else pipe.save_pretrained(tmp, safe_serialization=True)  # diffusers' own class
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()] if (out / "eval.jsonl").is_file() else []
    (tmp / "training.json").write_text(json.dumps({
        "recipe": to_dict(recipe), "command": " ".join(sys.argv), "steps": recipe.trainer.steps, "resumed_from_step": record["start_step"],
        "num_processes": record["num_processes"], "wall_minutes_this_run": round(seconds / 60, 2),
        "wall_minutes_all_pieces": round(record["seconds_all_pieces"] / 60, 2),
        "final_eval": evals[-1] if evals else None, "parameters": sum(p.numel() for p in net.parameters()),
        "history": record["history"][-20:], "torch": torch.__version__, "machine": _machine(),
        "mixed_precision": record.get("mixed_precision"),
    }, indent=2) + "\n")  # fmt: skip
    tmp.rename(student_dir)
